"""XCiT (recipe hybrid-xcit): SE at the end of each block's local patch interaction (LPI), its convolutional
residual branch, while the map is NCHW."""

from __future__ import annotations

import pytest
import torch
from family_checks import assert_identity_reproduces, assert_scripts_and_exports, real_model, se_input
from timm.layers import make_divisible
from timm.models.xcit import LPI, XCABlock
from torch import nn

import se_inject

SMALLEST = "xcit_nano_12_p16_224"


def test_one_se_per_lpi_on_its_depthwise_channels():
    model, report = se_inject.inject(f"timm:{SMALLEST}", device="meta", seed=0)
    # Independent count: the model's convolutional blocks are its LPIs (two depthwise kxk convs on an NCHW map).
    lpis = [(p, m) for p, m in model.named_modules() if isinstance(m, LPI)]
    assert len(lpis) == sum(isinstance(m, XCABlock) for m in model.modules()) > 0
    assert all(c.groups == c.in_channels > 1 for _, m in lpis for c in (m.conv1, m.conv2))
    assert report.plan.recipes == ("hybrid-xcit",)
    assert [s.path for s in report.plan.sites] == [p for p, _ in lpis]
    assert [(s.anchor, s.position) for s in report.plan.sites] == [("conv2", "after")] * len(lpis)
    assert [s.channels for s in report.plan.sites] == [m.conv2.out_channels for _, m in lpis]
    assert [s.attention.rd_channels for s in report.plan.sites] == [
        make_divisible(m.conv2.out_channels / 16, 8, round_limit=0.0) for _, m in lpis]
    assert not report.skipped
    params = sum(2 * s.channels * s.attention.rd_channels + s.channels + s.attention.rd_channels
                 for s in report.plan.sites)  # two 1x1 convs with bias per SE
    assert report.after.params - report.before.params == params


def _small_xcit() -> nn.Module:
    return real_model(SMALLEST, depth=2, cls_attn_layers=1)  # the family's blocks, fewer of them: fast on a CPU


def test_identity_init_keeps_outputs_keys_and_takes_the_lpi_map():
    model = _small_xcit()
    injected, _ = assert_identity_reproduces(model, 32)
    lpi, base = injected.blocks[0].local_mp, model.blocks[0].local_mp
    tokens = torch.randn(2, 4, lpi.conv1.in_channels)  # the plan's 2x2 grid at 32x32 input, patch 16
    with torch.no_grad():
        x = tokens.permute(0, 2, 1).reshape(2, -1, 2, 2)
        expected = base.conv2(base.bn(base.act(base.conv1(x))))
    assert torch.equal(se_input(lpi, "se", tokens, 2, 2), expected)  # NCHW, after conv2, before the reshape


@pytest.mark.slow
def test_smallest_xcit_identity_script_and_export():
    assert_identity_reproduces(real_model(SMALLEST), 64)
    assert_scripts_and_exports(real_model(SMALLEST), 64)
