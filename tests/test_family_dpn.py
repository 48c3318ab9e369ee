"""DPN family (recipe `dpn`): SE on each DualPathBlock's grouped 3x3 output, before its last 1x1 unit and the
residual/dense split: one place in both DPN forms."""

from __future__ import annotations

import pytest
import timm
import torch
from family_checks import assert_identity_reproduces
from helpers import randomize_norm_stats
from timm.models.dpn import DPN, DualPathBlock
from torch import nn

import se_inject


@pytest.mark.parametrize(("name", "b"), [("dpn48b", True), ("dpn68", False)])
def test_one_se_per_dual_path_block_before_its_last_1x1(name, b):
    model, report = se_inject.inject(name, device="meta", seed=0)
    blocks = [(p, m) for p, m in model.named_modules() if isinstance(m, DualPathBlock)]
    assert report.plan.recipes == ("dpn",) and blocks
    assert [s.path for s in report.plan.sites] == [p for p, _ in blocks]
    assert all(m.b == b for _, m in blocks)
    last_1x1 = [m.c1x1_c1 if b else m.c1x1_c.conv for _, m in blocks]  # the split convs' (or the conv's) input
    assert [s.channels for s in report.plan.sites] == [conv.in_channels for conv in last_1x1]


def test_dpn68_and_dpn68b_get_the_same_se():
    """The same network (the "b" form splits the last 1x1 conv in two): the same SE, place and width."""
    _, p = se_inject.inject("dpn68", device="meta", seed=0)
    _, q = se_inject.inject("dpn68b", device="meta", seed=0)
    assert [(s.path, s.anchor, s.channels, s.squeeze_channels) for s in p.plan.sites] == [
        (s.path, s.anchor, s.channels, s.squeeze_channels) for s in q.plan.sites]
    assert p.after.params - p.before.params == q.after.params - q.before.params


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
