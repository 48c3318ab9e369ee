"""CSATv2 (recipe hybrid-csatv2): SE at the end of the ConvNeXt-style blocks' residual branch, after the spatial
gate, before layer-scale, drop-path and the addition; none in the transformer stages."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from family_checks import assert_identity_reproduces, assert_scripts_and_exports, real_model, se_input
from timm.layers import make_divisible
from timm.models.csatv2 import Block, TransformerBlock

import se_inject

SMALLEST = "csatv2"


def test_one_se_per_conv_block_on_its_output_channels():
    model, report = se_inject.inject(f"timm:{SMALLEST}", device="meta", seed=0)
    # Independent count: the convolutional blocks are those with a depthwise kxk conv on the NCHW map.
    blocks = [(p, m) for p, m in model.named_modules()
              if isinstance(m, Block) and m.dwconv.groups == m.dwconv.in_channels > 1]
    assert blocks and any(isinstance(m, TransformerBlock) for m in model.modules())
    assert report.plan.recipes == ("hybrid-csatv2",)
    assert [s.path for s in report.plan.sites] == [p for p, _ in blocks]
    assert all((s.anchor, s.position) == ("ls", "before") for s in report.plan.sites)
    assert [s.channels for s in report.plan.sites] == [m.pwconv2.out_features for _, m in blocks]
    assert [s.attention.rd_channels for s in report.plan.sites] == [
        make_divisible(m.pwconv2.out_features / 16, 8, round_limit=0.0) for _, m in blocks]
    assert not report.skipped


def test_identity_init_keeps_outputs_keys_and_takes_the_gated_branch():
    model = real_model(SMALLEST, depths=(1, 1, 3, 3))  # the family's blocks, fewer of them: fast on a CPU
    injected, _ = assert_identity_reproduces(model, 64)
    path = next(p for p, m in model.named_modules() if isinstance(m, Block))
    block, base = injected.get_submodule(path), model.get_submodule(path)
    x = torch.randn(2, base.dwconv.in_channels, 8, 8)
    with torch.no_grad():
        y = base.dwconv(x).permute(0, 2, 3, 1)
        y = base.pwconv2(base.grn(base.act(base.pwconv1(base.norm(y))))).permute(0, 3, 1, 2)
        expected = y * F.interpolate(base.attn(y), size=y.shape[2:], mode="bilinear", align_corners=True)
    assert torch.equal(se_input(block, "se", x), expected)  # after the spatial gate, before ls and the addition


@pytest.mark.slow
def test_smallest_csatv2_identity_script_and_export():
    assert_identity_reproduces(real_model(SMALLEST), 64)
    assert_scripts_and_exports(real_model(SMALLEST), 64)
