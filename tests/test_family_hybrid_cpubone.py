"""CPUBone (recipe hybrid-cpubone): SE in the MBConv / Fused-MBConv blocks, after the depthwise (fused: expansion)
conv and its norm-activation, before the 1x1 projection `point_conv`."""

from __future__ import annotations

import pytest
import torch
from family_checks import assert_identity_reproduces, assert_scripts_and_exports, real_model, se_input
from timm.models.cpubone import CPUBoneBlock, FusedMBConv, MBConv

import se_inject

SMALLEST = "cpubone_nano"


def _convs(block):
    """The block's own convolutions, in order (not the inserted SE's)."""
    return [m for n, m in block.named_modules() if isinstance(m, torch.nn.Conv2d) and not n.startswith("se.")]


@pytest.mark.parametrize("name", [SMALLEST, "cpubone_b0_bfrobust"])  # Fused-MBConv only; both kinds
def test_one_se_per_mbconv_before_its_projection(name):
    model, report = se_inject.inject(f"timm:{name}", device="meta", seed=0)
    # Independent count: the convolutional blocks are the (Fused-)MBConvs; each ends in a 1x1 projection.
    blocks = [(p, m) for p, m in model.named_modules() if isinstance(m, (MBConv, FusedMBConv))]
    assert blocks and all(_convs(m)[-1].kernel_size == (1, 1) for _, m in blocks)
    assert report.plan.recipes == ("hybrid-cpubone",)
    assert [s.path for s in report.plan.sites] == [p for p, _ in blocks]
    assert all((s.anchor, s.position) == ("point_conv", "before") for s in report.plan.sites)
    assert [s.channels for s in report.plan.sites] == [_convs(m)[-1].in_channels for _, m in blocks]
    assert [s.attention.rd_channels for s in report.plan.sites] == [round(_convs(m)[0].in_channels / 4)
                                                                    for _, m in blocks]
    local = [m.total[-1].main for m in model.modules() if isinstance(m, CPUBoneBlock)]
    assert all(any(b is m for _, b in blocks) for m in local)  # every attention block's local branch takes SE
    assert not report.skipped


def test_identity_init_keeps_outputs_keys_and_takes_the_expanded_map():
    model = real_model(SMALLEST)
    injected, _ = assert_identity_reproduces(model, 64)
    block, base = injected.stages[1][0].main, model.stages[1][0].main
    x = torch.randn(2, base.spatial_conv.conv.in_channels, 8, 8)
    with torch.no_grad():
        expected = base.spatial_conv(x)
    assert torch.equal(se_input(block, "se", x), expected)


@pytest.mark.slow
def test_cpubone_script_and_export():
    assert_scripts_and_exports(real_model(SMALLEST), 64)
