"""ReXNet: SE in all but the first stages' LinearBottlenecks by design (partial SE); --fill gives the others ReXNet's
own SE (after the depthwise conv and norm, depthwise channels // 12)."""

from __future__ import annotations

import pytest
import timm
from family_checks import assert_identity_reproduces, assert_scripts_and_exports, real_model
from timm.layers import make_divisible
from timm.models.rexnet import LinearBottleneck

import se_inject
from se_inject import NoSitesError


def _blocks(name: str) -> tuple[list, list[tuple[str, int]]]:
    """Independent count: the designers' SE modules, and (path, depthwise channels) of the blocks without SE."""
    model = timm.create_model(name, device="meta")
    blocks = [(p, m) for p, m in model.named_modules() if isinstance(m, LinearBottleneck)]
    return [m.se for _, m in blocks if m.se is not None], [(p, m.conv_dw.conv.out_channels) for p, m in blocks
                                                          if m.se is None]


@pytest.mark.parametrize(("name", "ch_div", "divisor"), [("rexnet_100", 1, None), ("rexnetr_100", 8, 8)])
def test_partial_se_refused_by_default_and_filled_with_rexnets_own_se(name, ch_div, divisor):
    def own_width(c: int) -> int:  # ReXNet's rule (timm rexnet.py: make_divisible(int(C * se_ratio), ch_div))
        return make_divisible(int(c * (1 / 12.0)), ch_div)

    own, lacks = _blocks(name)
    assert own and lacks
    assert all(se.fc1.out_channels == own_width(se.fc1.in_channels) for se in own)
    with pytest.raises(NoSitesError) as info:
        se_inject.inject(name, device="meta", seed=0)
    assert info.value.reason == "partial-attention"
    _, report = se_inject.inject(name, se_inject.Settings(fill=True, rd_divisor=divisor), device="meta", seed=0)
    assert report.plan.recipes == ("rexnet",)
    assert len(report.to_dict()["already_attention"]) == len(own)
    assert [(s.path, s.slot, s.anchor, s.channels, s.squeeze_channels) for s in report.plan.sites] == [
        (p, "se", "conv_dw", c, own_width(c)) for p, c in lacks]


def test_identity_init_reproduces_the_base_model():
    injected, report = assert_identity_reproduces(real_model("rexnet_100", width_mult=0.5), 64, fill=True)
    assert all(injected.get_submodule(s.path).se is not None for s in report.plan.sites)


@pytest.mark.slow
def test_script_and_export():
    assert_scripts_and_exports(real_model("rexnet_100"), 64, fill=True)
