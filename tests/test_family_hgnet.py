"""HGNet / HGNetV2: SE after each HighPerfGpuBlock's aggregation, before drop-path and the residual addition (where
HGNet v1 has its effective SE, so v1 is already SE)."""

from __future__ import annotations

import pytest
import timm
from family_checks import assert_identity_reproduces, assert_scripts_and_exports, real_model
from timm.models.hgnet import EseModule, HighPerfGpuBlock
from torch import nn

import se_inject
from se_inject import NoSitesError


def test_hgnetv2_gets_se_after_every_blocks_aggregation():
    model = timm.create_model("hgnetv2_b0", device="meta")
    blocks = [(p, m) for p, m in model.named_modules() if isinstance(m, HighPerfGpuBlock)]
    assert blocks and not any(isinstance(m, EseModule) for m in model.modules())
    width = [[c for c in m.aggregation.modules() if isinstance(c, nn.Conv2d)][-1].out_channels for _, m in blocks]
    _, report = se_inject.inject(model, seed=0)
    assert report.plan.recipes == ("hgnet",)
    assert [(s.path, s.anchor, s.position, s.channels) for s in report.plan.sites] == [
        (p, "aggregation", "after", c) for (p, _), c in zip(blocks, width, strict=True)]
    assert [s.squeeze_channels for s in report.plan.sites] == [timm.layers.make_divisible(c / 16, 8) for c in width]


def test_hgnet_v1_already_has_ese_in_every_block():
    model = timm.create_model("hgnet_tiny", device="meta")
    blocks = [m for m in model.modules() if isinstance(m, HighPerfGpuBlock)]
    assert blocks and all(isinstance(m.aggregation[-1], EseModule) for m in blocks)
    with pytest.raises(NoSitesError) as info:
        se_inject.inject(model, seed=0)
    assert info.value.reason == "already-attention"
    assert f"all {len(blocks)} matching blocks" in str(info.value)


def test_identity_init_reproduces_the_base_model():
    assert_identity_reproduces(real_model("hgnetv2_b0"), 64)


@pytest.mark.slow
def test_script_and_export():
    assert_scripts_and_exports(real_model("hgnetv2_b0"), 64)
