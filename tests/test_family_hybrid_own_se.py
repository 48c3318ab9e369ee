"""Hybrids whose convolutional blocks already have SE at MobileNetV3's place (after the depthwise conv, before the
1x1 projection): GCViT (hybrid-gcvit), EfficientViT-MSRA (hybrid-efficientvit-msra), torchvision MaxViT
(hybrid-maxvit). Their recipes name that place, so every such block is recognised and the model is "already SE"."""

from __future__ import annotations

import pytest
import torchvision.models.maxvit as tv_maxvit
from timm.models import efficientvit_msra, gcvit
from torch import nn

import se_inject
from se_inject import NoSitesError, build_model, find_sites, get_recipe, resolve_model
from se_inject.layers.attention import is_attention
from se_inject.tools.scan import scan_one

CASES = [  # model, recipe, its convolutional block class, the block's own SE, the projection the SE precedes
    ("timm:gcvit_xxtiny", "hybrid-gcvit", gcvit.MbConvBlock, "se", "conv_pw"),
    ("timm:efficientvit_m0", "hybrid-efficientvit-msra", efficientvit_msra.PatchMerging, "se", "conv3"),
    ("torchvision:maxvit_t", "hybrid-maxvit", tv_maxvit.MBConv, "layers.squeeze_excitation", "layers.conv_c"),
]


@pytest.mark.parametrize(("name", "recipe", "block_class", "own_se", "projection"), CASES)
def test_every_conv_block_is_recognised_with_its_own_se(name, recipe, block_class, own_se, projection):
    model = build_model(resolve_model(name), device="meta")
    blocks = [(p, m) for p, m in model.named_modules() if isinstance(m, block_class)]
    assert blocks
    for _, block in blocks:  # the family's SE sits on the depthwise conv's map, feeding the 1x1 projection
        se, proj = block.get_submodule(own_se), block.get_submodule(projection)
        assert is_attention(se)
        conv = proj if isinstance(proj, nn.Conv2d) else proj.conv
        assert conv.kernel_size == (1, 1)
    findings = find_sites(model, [get_recipe(recipe)], (3, 224, 224))
    assert not findings.matches
    assert [s.path for s in findings.skipped] == [p for p, _ in blocks]
    assert all(s.already_attention and s.recipe == recipe for s in findings.skipped)
    attention = [p for p, m in model.named_modules() if type(m).__name__ in TOKEN_BLOCKS]
    if not attention:
        with pytest.raises(NoSitesError) as caught:
            se_inject.inject(name, se_inject.Settings(fill=True), device="meta", seed=0)
        assert caught.value.reason == "already-attention"
        return
    # Their attention blocks lack SE: the model is partial SE, and --fill gives those token SE (docs/transformers.md)
    _, report = se_inject.inject(name, se_inject.Settings(fill=True), device="meta", seed=0)
    assert [s.path for s in report.plan.sites] == attention
    assert {s.recipe for s in report.plan.sites} == {"transformer"}


# The attention blocks that take token SE (their MLP channels-last), by class name.
TOKEN_BLOCKS = {"GlobalContextVitBlock", "PartitionAttentionLayer"}


def test_scan_reports_them_already_se():
    row = scan_one(CASES[1][0])  # EfficientViT-MSRA: its attention blocks are convolutional, with their own SE
    assert (row.status, row.category) == ("already-se", "")
