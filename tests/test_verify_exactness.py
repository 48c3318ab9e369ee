"""What "exact" means, pinned: the verifier accepts a rewrite only when its outputs, the inputs after the call and
the updated buffers are bitwise equal to the original block's (one ulp off is refused); fused forms with trained
gates reorder rounding and agree within `FUSED_TOLERANCE`, which a defect ten times the reordering error exceeds."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import timm
import torch
from helpers import randomize_norm_stats
from torch import nn

import se_inject
import se_inject.engine.verify
from se_inject import NoSitesError
from se_inject.engine.verify import FUSED_TOLERANCE, difference
from se_inject.layers.attention import class_path


class Residual(nn.Module):
    def __init__(self, channels: int = 8):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)) + x)


class OnInput(nn.Module):
    """The place after `pre` (an identity) is the block's own input: a module there could write into the caller's
    tensor."""

    def __init__(self, channels: int = 8):
        super().__init__()
        self.pre = nn.Identity()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(self.pre(x))


def _inject(tmp_path: Path, block: type, anchor: str):
    recipe = tmp_path / "toy.toml"
    recipe.write_text(f'name = "toy"\n[defaults]\nreduction = 4\n[[blocks]]\nclasses = ["{class_path(block)}"]\n'
                      f'after = "{anchor}"\n')
    model = randomize_norm_stats(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), block(), block())).eval()
    return se_inject.inject(model, se_inject.Settings(init="identity"), recipes=["toy", recipe], input_size=16, seed=0)


def _hook_checked_module(monkeypatch, hook) -> None:
    """Give the module the verifier inserts a forward hook (the identity module, made subtly wrong)."""
    init = se_inject.engine.verify.init_attention

    def init_and_hook(module: nn.Module, how: str) -> None:
        init(module, how)
        module.register_forward_hook(hook)

    monkeypatch.setattr(se_inject.engine.verify, "init_attention", init_and_hook)


def test_a_rewrite_one_ulp_off_is_refused(tmp_path, monkeypatch):
    """assert_close's float32 defaults (and any tolerance) would accept this: "exactly" is bit for bit."""
    _, report = _inject(tmp_path, Residual, "bn")  # control
    assert len(report.plan.sites) == 2 and not report.skipped
    one_ulp = 1 + torch.finfo(torch.float32).eps
    _hook_checked_module(monkeypatch, lambda _m, _args, out: out * one_ulp)
    with pytest.raises(NoSitesError, match="failed its verification") as info:
        _inject(tmp_path, Residual, "bn")
    assert info.value.reason == "unverified"
    assert "output differs from the original's in eval mode" in str(info.value), str(info.value)


def test_a_rewrite_that_writes_into_its_input_is_refused(tmp_path, monkeypatch):
    """The module returns the right values but scales the block's input afterwards: the outputs match, only the
    inputs after the call show it."""
    _, report = _inject(tmp_path, OnInput, "pre")  # control: the module reads the block's own input
    assert [s.anchor for s in report.plan.sites] == ["pre", "pre"] and not report.skipped

    def write_into_input(_m, args, out):
        with torch.no_grad():
            args[0].mul_(1.5)
        return out

    _hook_checked_module(monkeypatch, write_into_input)
    with pytest.raises(NoSitesError, match="failed its verification") as info:
        _inject(tmp_path, OnInput, "pre")
    assert "inputs after the call differs from the original's in eval mode" in str(info.value), str(info.value)


@pytest.mark.parametrize(("got", "expected", "same"), [
    (torch.tensor([1.0, float("nan")]), torch.tensor([1.0, float("nan")]), True),  # NaN where the original has NaN
    (torch.tensor([-0.0]), torch.tensor([0.0]), True),
    (torch.tensor([1.0, 2.0]), torch.tensor([1.0, float("nan")]), False),
    (torch.tensor([1.0]), torch.tensor([1.0], dtype=torch.float64), False),  # dtype
    (torch.ones(2, 1), torch.ones(2), False),  # shape, even where broadcasting would compare
    ((torch.ones(2), 3), (torch.ones(2), 3), True),
    ((torch.ones(2), 3), [torch.ones(2), 3], False),  # tuple vs list
    ((torch.ones(2),), (torch.ones(2), torch.ones(2)), False),
    ({"a": torch.ones(1)}, {"b": torch.ones(1)}, False),
    ({"a": torch.ones(1)}, {"a": torch.zeros(1)}, False),
    (torch.tensor([1, 2]), torch.tensor([1, 3]), False),  # integers
    (None, None, True),
    (torch.ones(1), 1.0, False),
])
def test_difference_is_exact_equality(got, expected, same):
    assert (difference(got, expected) is None) == same


def test_difference_says_how_many_values_differ_and_by_how_much():
    got = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert difference(got, torch.tensor([1.0, 2.5, 3.0, 4.25])) == "2 of 4 values differ, by up to 0.5"


# --- fused forms with trained gates: reordered rounding, within FUSED_TOLERANCE ---------------------------------


def _unfused(model: nn.Module) -> nn.Module:
    """A copy whose rewritten blocks run their original class's forward (the module, then the addition)."""
    model = copy.deepcopy(model)
    for m in model.modules():
        base = getattr(type(m), "__se_inject_base__", None)
        if base is not None and any(n == "se" for n, _ in m.named_children()):
            m.__class__ = base
    return model


@pytest.fixture(scope="module")
def fused_and_plain():
    base = randomize_norm_stats(timm.create_model("test_resnet").eval())
    fused, _ = se_inject.inject(base, seed=0)  # paper init: gates away from 1
    fused = randomize_norm_stats(fused, seed=1)
    return fused, _unfused(fused), torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def test_fused_blocks_reorder_rounding_within_the_tolerance(fused_and_plain):
    fused, plain, x = fused_and_plain
    with torch.no_grad():
        got, expected = fused(x), plain(x)
    assert not torch.equal(got, expected)  # the tolerance is needed: fusion rounds differently
    torch.testing.assert_close(got, expected, **FUSED_TOLERANCE)


def test_a_fused_form_off_by_ten_times_the_rounding_is_refused(fused_and_plain):
    """A defect of 5e-5 relative in each inserted module's scale (about 50 times what reordering moves the output)
    exceeds FUSED_TOLERANCE; ten times looser would let it through."""
    fused, plain, x = fused_and_plain
    wrong = copy.deepcopy(fused)
    for site_module in (m for m in wrong.modules() if type(m).__name__ == "SqueezeExcite"):
        site_module.gain *= 1 + 5e-5
    with torch.no_grad():
        got, expected = wrong(x), plain(x)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(got, expected, **FUSED_TOLERANCE)
    loose = {k: 10 * v for k, v in FUSED_TOLERANCE.items()}
    torch.testing.assert_close(got, expected, **loose)  # the defect this tolerance exists to catch
