"""Xception family (recipe `xception`): SE at the end of each module's separable-conv stack, before the skip add."""

from __future__ import annotations

import pytest
import torch
from family_checks import assert_identity_reproduces
from helpers import randomize_norm_stats
from timm.models.xception import Block
from timm.models.xception_aligned import PreXceptionModule, XceptionAligned, XceptionModule
from torch import nn

import se_inject


def _branch(module: nn.Module) -> nn.Module:
    return module.rep if isinstance(module, Block) else module.stack


def _residual_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules whose branch is added to a skip (the aligned exit flow's last has none)."""
    return [(p, m) for p, m in model.named_modules()
            if isinstance(m, Block) or (isinstance(m, (XceptionModule, PreXceptionModule)) and not m.no_skip)]


def _branch_width(module: nn.Module) -> int:
    """Channels at the end of the branch: its last convolution's output."""
    return [m for m in _branch(module).modules() if isinstance(m, nn.Conv2d)][-1].out_channels


@pytest.mark.parametrize(("name", "modules"), [("legacy_xception", 12), ("xception41", 12), ("xception41p", 12)])
def test_one_se_per_residual_module_at_the_end_of_its_branch(name, modules):
    model, report = se_inject.inject(name, device="meta", seed=0)
    expected = _residual_modules(model)
    assert report.plan.recipes == ("xception",) and len(expected) == modules
    # legacy blocks: after `rep`; aligned modules: on the output of the stack's last separable conv, in its own
    # forward (which forward_with_tap runs too)
    places = [(p, "rep") if isinstance(m, Block) else (f"{p}.stack.{list(m.stack._modules)[-1]}", "")
              for p, m in expected]
    assert [(s.path, s.anchor) for s in report.plan.sites] == places
    assert [s.channels for s in report.plan.sites] == [_branch_width(m) for _, m in expected]
    if name != "legacy_xception":  # the exit flow's last module (no skip) gets none
        assert any(getattr(m, "no_skip", False) for m in model.modules())


def _tiny_aligned(preact: bool) -> nn.Module:
    cfg = [{"in_chs": 64, "out_chs": 32, "stride": 2}, {"in_chs": 32, "out_chs": 32, "stride": 1},
           {"in_chs": 32, "out_chs": (32, 48, 48), "stride": 2},
           {"in_chs": 48, "out_chs": (48, 64, 64), "stride": 1, "no_skip": True, "start_with_relu": False}]
    if preact:
        cfg[-1].pop("start_with_relu")
    return XceptionAligned(cfg, num_classes=10, preact=preact)


def _tiny_legacy() -> nn.Module:
    """timm's legacy Xception blocks (the model itself has a fixed size): a strided projection block, one
    growing later, an identity block."""
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), Block(16, 32, 2, 2, start_with_relu=False),
                         Block(32, 32, 3, 1), Block(32, 48, 2, 1, grow_first=False))


@pytest.mark.parametrize("make", [_tiny_legacy, lambda: _tiny_aligned(False), lambda: _tiny_aligned(True)],
                         ids=["legacy", "aligned", "aligned-preact"])
def test_identity_init_reproduces_a_real_xception(make):
    base = randomize_norm_stats(make()).eval()
    _, report = assert_identity_reproduces(base, 32, train=True)
    assert len(report.plan.sites) == 3


@pytest.mark.slow
@pytest.mark.parametrize("make", [_tiny_legacy, lambda: _tiny_aligned(True)], ids=["legacy", "aligned-preact"])
def test_xception_with_se_scripts_and_exports(make):
    injected, _ = se_inject.inject(make().eval(), seed=0, input_size=32)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = injected.eval()(x)
        torch.testing.assert_close(torch.jit.script(injected)(x), expected)
        torch.testing.assert_close(torch.export.export(injected, (x,)).module()(x), expected)
