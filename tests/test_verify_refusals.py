"""The verifier refuses what it must: a rewrite that computes something else by a fraction of a percent, that updates
a buffer differently only in training mode, or that would borrow another block's verdict. Each test injects a
deliberately wrong rewrite (or a block the rewrite cannot handle) and checks the refusal, next to a control run where
the same model is accepted."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import se_inject
import se_inject.engine.verify
from se_inject import NoSitesError
from se_inject.layers.attention import class_path


def _recipe(tmp_path: Path, cls: type, anchor: str | None = None, slot: str | None = None) -> Path:
    path = tmp_path / "toy.toml"
    place = (f'after = "{anchor}"\n' if anchor else "") + (f'slot = "{slot}"\n' if slot else "")
    path.write_text(f'name = "toy"\n[defaults]\nreduction = 4\n[[blocks]]\nclasses = ["{class_path(cls)}"]\n{place}')
    return path


def _inject(model: nn.Module, recipe: Path):
    return se_inject.inject(model, se_inject.Settings(init="identity"), recipes=["toy", recipe], input_size=16, seed=0)


def _perturb_checked_module(monkeypatch, factor: float) -> None:
    """Make the module the verifier inserts scale its output by `factor` (an identity that is almost one)."""
    init = se_inject.engine.verify.init_attention

    def almost_identity(module: nn.Module, how: str) -> None:
        init(module, how)
        module.register_forward_hook(lambda _m, _inputs, out: out * factor)

    monkeypatch.setattr(se_inject.engine.verify, "init_attention", almost_identity)


class Residual(nn.Module):
    def __init__(self, channels: int = 8):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)) + x)


class Stats(nn.Module):
    """The anchor's output only feeds a BatchNorm whose output is dropped: what the block returns never depends on
    it, only the statistics training mode updates do."""

    def __init__(self, channels: int = 8):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 1)
        self.stats = nn.BatchNorm2d(channels)
        self.out = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        self.stats(self.conv(x))
        return self.out(x)


class Branching(nn.Module):
    """Applies `act` to its NCHW map, or to the same map channels-last, depending on its own float setting. With
    16 channels on a 16x16 map both take a map with 16 at dimension 1 (the same planned SE), but only the first is
    a place for SE: on the channels-last map the SE runs over the rows."""

    def __init__(self, threshold: float, channels: int = 16):
        super().__init__()
        self.threshold = threshold
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.act = nn.ReLU()

    def forward(self, x):
        y = self.conv(x)
        y = self.act(y.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) if self.threshold > 0.5 else self.act(y)
        return y + x


class SlotBranching(nn.Module):
    """`Branching` with timm's attention slot: the forward calls ``self.se`` and the rewrite only fills the slot, so
    both blocks end up with the same class and code, and only the float tells their verdicts apart."""

    def __init__(self, threshold: float, channels: int = 16):
        super().__init__()
        self.threshold = threshold
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.se = nn.Identity()

    def forward(self, x):
        y = self.conv(x)
        y = self.se(y.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) if self.threshold > 0.5 else self.se(y)
        return torch.relu(y)


def _net(*blocks: nn.Module, channels: int = 8) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, channels, 3, padding=1), *blocks).eval()


@pytest.mark.parametrize("factor", [1.001, 0.999])
def test_a_rewrite_off_by_a_tenth_of_a_percent_is_refused(tmp_path, monkeypatch, factor):
    recipe = _recipe(tmp_path, Residual, "bn")
    model = _net(Residual(), Residual())
    _, report = _inject(model, recipe)  # control: the true identity passes
    assert len(report.plan.sites) == 2 and not report.skipped
    _perturb_checked_module(monkeypatch, factor)
    with pytest.raises(NoSitesError, match="failed its verification") as info:
        _inject(model, recipe)
    assert info.value.reason == "unverified"


def test_a_rewrite_off_by_a_tenth_of_a_percent_on_a_timm_model_is_refused(monkeypatch):
    _perturb_checked_module(monkeypatch, 1.001)
    with pytest.raises(NoSitesError, match="differs from the original") as info:
        se_inject.inject("timm:test_resnet", device="meta", seed=0)
    assert info.value.reason == "unverified"


def test_a_training_only_buffer_difference_is_refused(tmp_path, monkeypatch):
    recipe = _recipe(tmp_path, Stats, "conv")
    model = _net(Stats())
    _, report = _inject(model, recipe)  # control: the true identity passes
    assert [s.path for s in report.plan.sites] == ["1"]
    _perturb_checked_module(monkeypatch, 1.001)  # outputs stay exactly equal; only running statistics move
    with pytest.raises(NoSitesError, match=r"updates stats\.running_mean differently in training mode"):
        _inject(model, recipe)


@pytest.mark.parametrize("order", [(0.25, 0.75), (0.75, 0.25)])
@pytest.mark.parametrize(("cls", "place"), [(Branching, {"anchor": "act"}), (SlotBranching, {"slot": "se"})])
def test_blocks_differing_only_in_a_float_their_forward_branches_on_get_their_own_verdicts(
    tmp_path, monkeypatch, order, cls, place
):
    checked = []
    check = se_inject.engine.verify.check_site
    monkeypatch.setattr(se_inject.engine.verify, "check_site", lambda *a: checked.append(a[1].path) or check(*a))
    model = _net(*(cls(t) for t in order), channels=16)
    injected, report = _inject(model, _recipe(tmp_path, cls, **place))
    once = [str(i + 1) for i, t in enumerate(order) if t < 0.5]
    channels_last = [str(i + 1) for i, t in enumerate(order) if t > 0.5]
    assert sorted(checked) == ["1", "2"]  # verified separately
    assert [s.path for s in report.plan.sites] == once
    assert [s.path for s in report.skipped] == channels_last
    assert report.skipped[0].reason.startswith("the rewritten block fails where the original runs")
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(injected(x), model(x), rtol=0, atol=0)
