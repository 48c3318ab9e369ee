"""Checks shared by the family tests (tests/test_family_*.py): a real CPU model keeps its weights and, with
identity-initialised SE, its outputs; TorchScript and torch.export keep working where they worked before."""

from __future__ import annotations

import timm
import torch
from conftest import randomize_norm_stats, state_snapshot
from torch import nn

import se_inject


def assert_identity_reproduces(
    name: str, size: int, *, fill: bool = False, attention: str = "se", **model_kwargs: object
) -> tuple[nn.Module, object]:
    """Inject identity-initialised SE into a real (CPU, random-weight) timm model (`model_kwargs` narrow its config,
    e.g. fewer channels): every base key keeps its tensor and the outputs are exactly the base model's. Returns
    ``(injected, report)``."""
    model = randomize_norm_stats(timm.create_model(name, **model_kwargs)).eval()
    before = state_snapshot(model)
    injected, report = se_inject.inject(model, seed=0, init="identity", input_size=size, fill=fill,
                                       attention=attention)
    after = injected.state_dict()
    assert report.plan.sites
    assert all(k in after and torch.equal(after[k], v) for k, v in before.items())
    assert set(after) - set(before) == {f"{s.module_path}.{k}" for s in report.plan.sites
                                        for k in injected.get_submodule(s.module_path).state_dict()}
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert torch.equal(injected.eval()(x), model(x))
    return injected, report


def assert_scripts_and_exports(name: str, size: int, *, fill: bool = False, **model_kwargs: object) -> None:
    """The injected model scripts (where the base model scripts) and exports, computing what eager mode does."""
    model = timm.create_model(name, **model_kwargs).eval()
    injected, _ = se_inject.inject(model, seed=0, input_size=size, fill=fill)
    x = torch.randn(1, 3, size, size)
    try:
        torch.jit.script(model)
        scripts = True
    except Exception:  # the base model does not script: nothing to keep
        scripts = False
    with torch.no_grad():
        expected = injected.eval()(x)
        if scripts:
            torch.testing.assert_close(torch.jit.script(injected)(x), expected)
        torch.testing.assert_close(torch.export.export(injected, (x,)).module()(x), expected)
