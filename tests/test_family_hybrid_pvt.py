"""PVT v2 (recipe hybrid-pvt): SE in every convolutional feed-forward, on the depthwise conv's NCHW output,
before the activation and the projection fc2."""

from __future__ import annotations

import pytest
import torch
from family_checks import assert_identity_reproduces, assert_scripts_and_exports, real_model, se_input
from timm.layers import make_divisible
from timm.models.pvt_v2 import Block, MlpWithDepthwiseConv

import se_inject

SMALLEST = "pvt_v2_b0"


@pytest.mark.parametrize("name", [  # and the linear-attention variant, with its extra ReLU before the depthwise conv
    SMALLEST, pytest.param("pvt_v2_b2_li", marks=pytest.mark.slow)])
def test_one_se_per_ffn_on_its_depthwise_channels(name):
    model, report = se_inject.inject(f"timm:{name}", device="meta", seed=0)
    # Independent count: every block's FFN holds one depthwise 3x3 conv on an NCHW map.
    ffns = [(p, m) for p, m in model.named_modules() if isinstance(m, MlpWithDepthwiseConv)]
    assert len(ffns) == sum(isinstance(m, Block) for m in model.modules()) > 0
    assert all(m.dwconv.groups == m.dwconv.in_channels == m.fc1.out_features for _, m in ffns)
    assert report.plan.recipes == ("hybrid-pvt",)
    assert [s.path for s in report.plan.sites] == [p for p, _ in ffns]
    assert all((s.anchor, s.position) == ("dwconv", "after") for s in report.plan.sites)
    assert [s.channels for s in report.plan.sites] == [m.dwconv.out_channels for _, m in ffns]
    assert [s.attention.rd_channels for s in report.plan.sites] == [
        make_divisible(m.dwconv.out_channels / 16, 8, round_limit=0.0) for _, m in ffns]
    assert not report.skipped


def test_identity_init_keeps_outputs_keys_and_takes_the_depthwise_map():
    model = real_model(SMALLEST, depths=(1, 1, 1, 1))  # the family's blocks, fewer of them: fast on a CPU
    injected, _ = assert_identity_reproduces(model, 32)
    ffn, base = injected.stages[0].blocks[0].mlp, model.stages[0].blocks[0].mlp
    tokens = torch.randn(2, 64, base.fc1.in_features)  # stage 0 at 32x32 input: an 8x8 grid
    with torch.no_grad():
        x = base.fc1(tokens).transpose(1, 2).reshape(2, -1, 8, 8)
        expected = base.dwconv(base.relu(x))
    assert torch.equal(se_input(ffn, "se", tokens, [8, 8]), expected)  # NCHW, before the GELU on tokens
    with torch.no_grad():  # not specialised to the planned grid: another size runs and still equals the base
        x = torch.randn(1, 3, 64, 48)
        assert torch.equal(injected(x), model(x))


@pytest.mark.slow
def test_smallest_pvt_identity_script_and_export():
    assert_identity_reproduces(real_model(SMALLEST), 64)
    assert_scripts_and_exports(real_model(SMALLEST), 64)
