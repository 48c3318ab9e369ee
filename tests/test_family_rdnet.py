"""RDNet: effective SE in the later stages' dense blocks by design (partial SE); --fill puts SE at the same place in
the others: on the block's new features, before layer-scale, drop-path and the stage's concat."""

from __future__ import annotations

import pytest
import timm
from family_checks import assert_identity_reproduces, assert_scripts_and_exports, real_model
from timm.layers import EffectiveSEModule, make_divisible
from timm.models.rdnet import Block, BlockESE, DenseBlock
from torch import nn

import se_inject
from se_inject import NoSitesError

SMALL = {"num_init_features": 16, "growth_rates": [16, 24, 32, 32, 32, 32, 48], "num_blocks_list": [2] * 7}


def _blocks(name: str) -> tuple[list[str], list[tuple[str, int]]]:
    """Independent count: dense blocks whose layers end in eSE, and (path, growth rate) of those without."""
    model = timm.create_model(name, device="meta")
    blocks = [(p, m) for p, m in model.named_modules() if isinstance(m, DenseBlock)]
    assert all(isinstance(m.layers, (Block, BlockESE)) for _, m in blocks)
    has = [p for p, m in blocks if isinstance(m.layers.layers[-1], EffectiveSEModule)]
    width = {p: [c for c in m.layers.modules() if isinstance(c, nn.Conv2d)][-1].out_channels for p, m in blocks}
    return has, [(p, width[p]) for p, _ in blocks if p not in has]


def test_partial_se_refused_by_default_and_filled_before_layer_scale():
    has, lacks = _blocks("rdnet_tiny")
    assert has and lacks
    with pytest.raises(NoSitesError) as info:
        se_inject.inject("rdnet_tiny", device="meta", seed=0)
    assert info.value.reason == "partial-attention"
    _, report = se_inject.inject("rdnet_tiny", se_inject.Settings(fill=True), device="meta", seed=0)
    assert report.plan.recipes == ("rdnet",)
    assert report.to_dict()["already_attention"] == has
    assert [(s.path, s.anchor, s.position, s.channels, s.squeeze_channels) for s in report.plan.sites] == [
        (p, "layers", "after", c, make_divisible(c / 16, 8)) for p, c in lacks]


@pytest.mark.slow
def test_identity_init_reproduces_the_base_model():
    for attention in ("se", "ese"):
        assert_identity_reproduces(real_model("rdnet_tiny", **SMALL), 64, fill=True, attn_layer=attention)


@pytest.mark.slow
def test_script_and_export():
    assert_scripts_and_exports(real_model("rdnet_tiny", **SMALL), 64, fill=True)
