"""Visformer (recipe hybrid-visformer): SE at the end of the convolutional first-stage blocks' residual branch,
none in the attention stages."""

from __future__ import annotations

import pytest
import torch
from family_checks import assert_identity_reproduces, assert_scripts_and_exports, real_model, se_input
from timm.layers import make_divisible
from timm.models.visformer import Block
from torch import nn

import se_inject

SMALLEST = "visformer_tiny"


def _is_conv_block(block: Block) -> bool:
    """No attention, and a spatial (3x3) conv in its MLP: a convolutional residual block."""
    return block.attn is None and any(
        isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) for m in block.mlp.modules())


def test_one_se_per_convolutional_block_on_its_output_channels():
    model, report = se_inject.inject(f"timm:{SMALLEST}", device="meta", seed=0)
    blocks = [(p, m) for p, m in model.named_modules() if isinstance(m, Block)]
    conv_blocks = [(p, m) for p, m in blocks if _is_conv_block(m)]
    assert 0 < len(conv_blocks) < len(blocks)  # the attention stages' blocks take none
    assert report.plan.recipes == ("hybrid-visformer",)
    assert [s.path for s in report.plan.sites] == [p for p, _ in conv_blocks]
    assert all((s.anchor, s.position) == ("mlp", "after") for s in report.plan.sites)
    assert [s.channels for s in report.plan.sites] == [m.mlp.conv3.out_channels for _, m in conv_blocks]
    assert [s.attention.rd_channels for s in report.plan.sites] == [
        make_divisible(m.mlp.conv3.out_channels / 16, 8, round_limit=0.0) for _, m in conv_blocks]
    assert not report.skipped


def test_identity_init_keeps_outputs_keys_and_takes_the_branch_output():
    model = real_model(SMALLEST, img_size=64)  # Visformer's position embeddings fix the input size
    injected, _ = assert_identity_reproduces(model, 64)
    block, base = injected.stage1[0], model.stage1[0]
    x = torch.randn(2, base.mlp.conv1.in_channels, 8, 8)
    with torch.no_grad():
        expected = base.mlp(base.norm2(x))
    assert torch.equal(se_input(block, "se", x), expected)  # before drop-path and the addition


@pytest.mark.slow
def test_visformer_script_and_export():
    assert_identity_reproduces(real_model(SMALLEST), 224)
    assert_scripts_and_exports(real_model(SMALLEST, img_size=64), 64)
