"""PP-LCNetV2: SE in the third stage's blocks by design (partial SE); --fill gives the others LCNetV2's own SE (after
the depthwise conv and activation, channels // 4)."""

from __future__ import annotations

import pytest
import timm
from family_checks import assert_identity_reproduces, assert_scripts_and_exports, real_model
from timm.models.lcnetv2 import RepDepthwiseSeparable
from torch import nn

import se_inject
from se_inject import NoSitesError


def test_partial_se_refused_by_default_and_filled_with_lcnetv2s_own_se():
    model = timm.create_model("lcnetv2_small", device="meta")
    blocks = [(p, m) for p, m in model.named_modules() if isinstance(m, RepDepthwiseSeparable)]
    own = [m.se for _, m in blocks if not isinstance(m.se, nn.Identity)]
    # the depthwise conv's width (the first conv of the block: single or multi-kernel)
    lacks = [(p, next(c for c in m.modules() if isinstance(c, nn.Conv2d)).out_channels) for p, m in blocks
             if isinstance(m.se, nn.Identity)]
    assert own and lacks
    assert all(se.fc1.out_channels == int(se.fc1.in_channels * 0.25) for se in own)  # LCNetV2's rule
    with pytest.raises(NoSitesError) as info:
        se_inject.inject("lcnetv2_small", device="meta", seed=0)
    assert info.value.reason == "partial-attention"
    _, report = se_inject.inject("lcnetv2_small", se_inject.Settings(fill=True), device="meta", seed=0)
    assert report.plan.recipes == ("lcnetv2",)
    assert len(report.to_dict()["already_attention"]) == len(own)
    assert [(s.path, s.slot, s.channels, s.squeeze_channels) for s in report.plan.sites] == [
        (p, "se", c, int(c * 0.25)) for p, c in lacks]


def test_identity_init_reproduces_the_base_model():
    assert_identity_reproduces(real_model("lcnetv2_small", scale=0.5, depths=(1, 1, 2, 1)), 64, fill=True)


@pytest.mark.slow
def test_script_and_export():
    assert_scripts_and_exports(real_model("lcnetv2_small", scale=0.5, depths=(1, 1, 2, 1)), 64, fill=True)
