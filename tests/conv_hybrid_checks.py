"""Checks shared by the conv-attention hybrid families' tests (tests/test_family_*.py): a real CPU model with SE
initialised to the identity computes exactly what the base model computes, keeps every base key, and still scripts
and exports."""

from __future__ import annotations

from typing import Any

import timm
import torch
from conftest import randomize_norm_stats, state_snapshot
from torch import nn

import se_inject


def real_model(name: str, **kwargs: Any) -> nn.Module:
    """A timm model with random weights and non-trivial norm statistics, in eval mode."""
    return randomize_norm_stats(timm.create_model(name, **kwargs)).eval()


def assert_identity_reproduces_base(model: nn.Module, size: int, **inject: Any) -> tuple[nn.Module, Any]:
    """Identity-initialised SE: every base key survives with its tensor, and the outputs are exactly the base's.
    Returns the model with SE and the report."""
    before = state_snapshot(model)
    injected, report = se_inject.inject(model, seed=0, init="identity", input_size=size, **inject)
    after = injected.state_dict()
    prefixes = tuple(f"{s.path}.{s.name}." for s in report.plan.sites)
    assert all(k.startswith(prefixes) for k in set(after) - set(before))  # new keys: the SE modules' only
    assert all(torch.equal(after[k], v) for k, v in before.items())
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert torch.equal(injected.eval()(x), model(x))
    return injected, report


def assert_scripts_and_exports(model: nn.Module, size: int, **inject: Any) -> None:
    """TorchScript and torch.export of the model with SE give its eager outputs."""
    injected, _ = se_inject.inject(model, seed=0, input_size=size, **inject)
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        expected = injected.eval()(x)
        torch.testing.assert_close(torch.jit.script(injected)(x), expected)
        torch.testing.assert_close(torch.export.export(injected, (x,)).module()(x), expected)
