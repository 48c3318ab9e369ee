"""Checks shared by the conv-attention hybrid family tests (tests/test_family_hybrid_*.py): the invariants every
covered family must keep, run on a real CPU model."""

from __future__ import annotations

import timm
import torch
from conftest import randomize_norm_stats, state_snapshot
from torch import nn

import se_inject
from se_inject.layers.attention import is_attention


def real(name: str, **kwargs) -> nn.Module:
    """A timm model on the CPU, random weights, non-trivial BatchNorm statistics, eval mode."""
    return randomize_norm_stats(timm.create_model(name, **kwargs)).eval()


def assert_identity_keeps_model(model: nn.Module, size: int) -> tuple[nn.Module, se_inject.Report]:
    """Identity-initialised SE: every base key kept with its tensor, only SE keys added, outputs exactly equal."""
    before = state_snapshot(model)
    injected, report = se_inject.inject(model, seed=0, init="identity", input_size=size)
    assert report.plan.sites and not report.skipped, report.skipped
    after = injected.state_dict()
    for key, value in before.items():
        assert torch.equal(after[key], value), key  # nothing renamed, moved or renumbered
    added = set(after) - set(before)
    assert added and all(any(k.startswith(f"{s.module_path}.") for s in report.plan.sites) for k in added)
    for site in report.plan.sites:
        assert is_attention(injected.get_submodule(site.module_path))
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert torch.equal(injected.eval()(x), model(x))
    return injected, report


def assert_scripts_and_exports(model: nn.Module, size: int) -> None:
    """TorchScript and torch.export of the injected model give its eager outputs."""
    injected, _ = se_inject.inject(model.eval(), seed=0, input_size=size)
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        expected = injected.eval()(x)
        torch.testing.assert_close(torch.jit.script(injected)(x), expected)
        torch.testing.assert_close(torch.export.export(injected, (x,)).module()(x), expected)


def se_input(block: nn.Module, name: str, *args) -> torch.Tensor:
    """What the SE module `name` of `block` receives when the block runs on `args`."""
    seen = {}
    hook = block.get_submodule(name).register_forward_hook(lambda _m, inputs, _out: seen.update(x=inputs[0]))
    try:
        with torch.no_grad():
            block(*args)
    finally:
        hook.remove()
    return seen["x"]
