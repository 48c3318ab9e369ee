"""Hybrids whose only convolutions are positional encodings, attention pooling, patch embeddings, stems or
downsampling layers: DaViT (ConvPosEnc), MViTv2 (pooling convs inside attention), CrossViT "dagger" (a multi-conv
patch embedding). None of these is a convolutional block, so no convolutional recipe takes them; their transformer
blocks take token SE (the transformer recipe), never inside one of those modules."""

from __future__ import annotations

import pytest
from torch import nn

import se_inject
from se_inject import build_model, find_sites, resolve_model
from se_inject.engine.recipes import resolve_recipes

# Where each model's convolutions are allowed to live (the class of a module on the path to the conv), and its size.
NOT_BLOCKS = {
    "timm:davit_tiny": ({"ConvPosEnc", "Stem", "Downsample"}, 224),
    "timm:mvitv2_tiny": ({"MultiScaleAttention", "PatchEmbed"}, 224),
    "timm:crossvit_9_dagger_240": ({"PatchEmbed"}, 240),
}


@pytest.mark.parametrize("name", list(NOT_BLOCKS))
def test_models_with_only_positional_or_embedding_convs_take_token_se_in_their_blocks(name):
    allowed, size = NOT_BLOCKS[name]
    model = build_model(resolve_model(name), device="meta")
    convs = [p for p, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert convs
    for path in convs:  # the independent check: every conv sits inside one of the non-block modules
        parts = path.split(".")
        owners = {type(model.get_submodule(".".join(parts[:i]))).__name__ for i in range(1, len(parts))}
        assert owners & allowed, path
    findings = find_sites(model, resolve_recipes("auto"), (3, size, size))  # every shipped recipe
    assert findings.matches and not findings.skipped
    assert {(m.recipe.name, m.pattern, m.channels_last) for m in findings.matches} == {
        ("transformer", "token-residual", True)}
    for m in findings.matches:  # a transformer block, holding none of the convolutions
        assert not any(isinstance(sub, nn.Conv2d) for sub in model.get_submodule(m.path).get_submodule(
            m.anchor).modules()), m.path


def test_the_scan_takes_them_with_token_se():
    _, report = se_inject.inject("timm:mvitv2_tiny", se_inject.Settings(fill=True), device="meta", seed=0)
    assert report.plan.recipes == ("transformer",) and len(report.plan.sites) == 10
