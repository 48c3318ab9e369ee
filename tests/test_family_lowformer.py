"""LowFormer (timm lowformer): SE after the MBConv's depthwise conv / the FusedMBConv's fused expansion, before the
1x1 projection (see recipes/lowformer.toml)."""

from __future__ import annotations

import pytest
from family_checks import assert_identity_reproduces, assert_scripts_and_exports, real_model
from timm.models.lowformer import FusedMBConv, MBConv

import se_inject


def _expansion(block: MBConv | FusedMBConv):
    """The conv whose output the SE scales: the depthwise one, or the fused kxk expansion."""
    return block.depth_conv.conv if isinstance(block, MBConv) else block.spatial_conv.conv


def test_every_mbconv_takes_se_before_its_projection():
    model, report = se_inject.inject("timm:lowformer_b0", device="meta", seed=0)
    blocks = [(p, m) for p, m in model.named_modules() if isinstance(m, (MBConv, FusedMBConv))]
    assert report.plan.recipes == ("lowformer",)
    assert all(any(isinstance(m, kind) for _, m in blocks) for kind in (MBConv, FusedMBConv))
    assert [s.path for s in report.plan.sites] == [p for p, _ in blocks]
    assert [s.channels for s in report.plan.sites] == [_expansion(m).out_channels for _, m in blocks]
    assert all((s.anchor, s.position) == ("point_conv", "before") for s in report.plan.sites)
    # EfficientNet's width: the block's input channels / 4, rounded
    assert [s.squeeze_channels for s in report.plan.sites] == [round(_expansion(m).in_channels / 4) if
                                                                isinstance(m, FusedMBConv) else
                                                                round(m.inverted_conv.conv.in_channels / 4)
                                                                for _, m in blocks]


@pytest.mark.slow
def test_identity_init_reproduces_the_base_model():
    assert_identity_reproduces(real_model("lowformer_b0"), 32)


@pytest.mark.slow
def test_scripts_and_exports():
    assert_scripts_and_exports(real_model("lowformer_b0"), 32)
