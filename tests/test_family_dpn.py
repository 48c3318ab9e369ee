"""DPN family (recipe `dpn`): SE on each DualPathBlock's branch output (c1x1_c), before the residual/dense split."""

from __future__ import annotations

import pytest
import timm
import torch
from family_checks import assert_identity_reproduces
from helpers import randomize_norm_stats
from timm.models.dpn import DPN, DualPathBlock
from torch import nn

import se_inject


def _branch_width(block: DualPathBlock) -> int:
    """Channels of the branch's last tensor before the split: the single 1x1 conv's output, or in "b" blocks (two
    1x1 convs do the split) their common input."""
    if block.b:
        return block.c1x1_c1.in_channels
    return block.c1x1_c.conv.out_channels


@pytest.mark.parametrize(("name", "b"), [("dpn48b", True), ("dpn68", False)])
def test_one_se_per_dual_path_block_at_the_end_of_its_branch(name, b):
    model, report = se_inject.inject(name, device="meta", seed=0)
    blocks = [(p, m) for p, m in model.named_modules() if isinstance(m, DualPathBlock)]
    assert report.plan.recipes == ("dpn",) and blocks
    assert [s.path for s in report.plan.sites] == [p for p, _ in blocks]
    assert all(m.b == b for _, m in blocks)
    assert [s.channels for s in report.plan.sites] == [_branch_width(m) for _, m in blocks]
    if not b:  # the whole branch output: residual increment and new dense features
        assert [s.channels for s in report.plan.sites] == [m.num_1x1_c + m.inc for _, m in blocks]


@pytest.mark.parametrize("b", [False, True])
def test_identity_init_reproduces_a_real_dpn(b):
    base = randomize_norm_stats(DPN(k_sec=(1, 2, 1, 1), inc_sec=(8, 8, 8, 8), k_r=32, groups=4, small=True,
                                    num_init_features=16, b=b, num_classes=10)).eval()
    _, report = assert_identity_reproduces(base, 32, train=True)
    assert len(report.plan.sites) == 5


@pytest.mark.slow
def test_dpn48b_scripts_and_exports():
    injected, _ = se_inject.inject(timm.create_model("dpn48b").eval(), seed=0, input_size=32)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = injected.eval()(x)
        torch.testing.assert_close(torch.jit.script(injected)(x), expected)
        torch.testing.assert_close(torch.export.export(injected, (x,)).module()(x), expected)
    assert isinstance(injected.features.conv2_1.se, nn.Module)
