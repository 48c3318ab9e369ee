"""Checks shared by the family tests (tests/test_family_*.py), run on real CPU models: with identity-initialised SE
a model keeps every weight and computes exactly what it computed; TorchScript and torch.export keep working where
they worked before."""

from __future__ import annotations

from typing import Any

import timm
import torch
from helpers import randomize_norm_stats, state_snapshot
from torch import nn

import se_inject
from se_inject.layers.attention import is_attention


def real_model(name: str, **kwargs: Any) -> nn.Module:
    """A timm model on the CPU with random weights and non-trivial norm statistics, in eval mode (`kwargs` narrow
    its configuration, e.g. fewer blocks)."""
    return randomize_norm_stats(timm.create_model(name, **kwargs)).eval()


def assert_identity_reproduces(
    model: nn.Module, size: int, *, train: bool = False, **inject: Any
) -> tuple[nn.Module, se_inject.Report]:
    """Inject identity-initialised SE: no site refused (blocks that already have attention aside), every base key
    kept with its tensor, only the SE modules' keys added, outputs exactly the base model's (in eval mode, and with
    `train` in training mode too). Returns ``(injected, report)`` in eval mode."""
    before = state_snapshot(model)
    injected, report = se_inject.inject(model, se_inject.Settings(init="identity", **inject), seed=0, input_size=size)
    assert report.plan.sites
    assert not [s for s in report.skipped if not s.already_attention], report.skipped
    after = injected.state_dict()
    for key, value in before.items():
        assert torch.equal(after[key], value), key  # nothing renamed, moved or renumbered
    assert set(after) - set(before) == {f"{s.module_path}.{k}" for s in report.plan.sites
                                        for k in injected.get_submodule(s.module_path).state_dict()}
    assert all(is_attention(injected.get_submodule(s.module_path)) for s in report.plan.sites)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert torch.equal(injected.eval()(x), model(x))
        if train:
            assert torch.equal(injected.train()(x), model.train()(x))
            injected.eval(), model.eval()
    return injected, report


def assert_scripts_and_exports(model: nn.Module, size: int, **inject: Any) -> None:
    """The model with SE scripts (where the base model scripts) and exports, computing what eager mode does."""
    try:
        torch.jit.script(model)
        scripts = True
    except Exception:  # the base model does not script: nothing to keep
        scripts = False
    injected, _ = se_inject.inject(model.eval(), se_inject.Settings(**inject), seed=0, input_size=size)
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        expected = injected.eval()(x)
        if scripts:
            torch.testing.assert_close(torch.jit.script(injected)(x), expected)
        torch.testing.assert_close(torch.export.export(injected, (x,)).module()(x), expected)


def se_input(block: nn.Module, name: str, *args: Any) -> torch.Tensor:
    """What the SE module `name` of `block` receives when the block runs on `args`."""
    seen = {}
    hook = block.get_submodule(name).register_forward_hook(lambda _m, inputs, _out: seen.update(x=inputs[0]))
    try:
        with torch.no_grad():
            block(*args)
    finally:
        hook.remove()
    return seen["x"]


def assert_sites_shaped_like(model: nn.Module, report: se_inject.Report, own: Any) -> None:
    """Each inserted module has the state_dict shapes of `own(channels)`, the family's own attention module at the
    site's width (e.g. ``lambda c: timm.layers.SEModule(c, rd_ratio=0.25, device="meta")``)."""
    for site in report.plan.sites:
        added = model.get_submodule(site.module_path)
        expected = {k: v.shape for k, v in own(site.channels).state_dict().items()}
        assert {k: v.shape for k, v in added.state_dict().items()} == expected, site.path


def scales_in_place(model: nn.Module, site: Any) -> bool:
    """Whether the site's block passes ``inplace=True`` to its attention module (the fusion pass's in-place
    decision, a constant of the block's generated forward)."""
    import inspect

    return "inplace = True" in inspect.getsource(type(model.get_submodule(site.path)).forward)
