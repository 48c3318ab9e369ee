"""Proof that a model's inserted modules run: each exactly once per call of the block that hosts it, on the map
the plan says, on every forward path the model exposes.

A plan can name a module that never runs (a slot the forward does not call, a call placed after ``return``), and a
block can have a second forward (timm's ``forward_with_tap``, used by ``forward_intermediates`` and feature
extraction) that skips it. Neither changes what the eager ``forward`` computes under identity initialisation, so no
output comparison sees it. Here the applied model runs on the meta device (no data, no compute) with hooks on every
inserted module and its host block: per forward path, each module must be called as often as its host block runs
(its forward, or when another method of it runs instead, its children), at least once on the model's own forward,
with the planned channel count, and for a child anchor on that child's output ("after") or input ("before").
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..errors import describe
from .meta import as_meta
from .plan import Plan, Site

# Methods beside ``forward`` that run a timm model's trunk: each is checked where the model has it.
FORWARD_PATHS = ("forward_features", "forward_intermediates")


def check_calls(model: nn.Module, plan: Plan, input_size: tuple[int, ...] | None = None) -> dict[str, str]:
    """Problems by site path (empty when every inserted module runs as the plan says). `model` is the applied
    model (a meta copy is used unless it is on the meta device already)."""
    probe = as_meta(model)
    size = tuple(input_size or plan.input_size)
    dtype = next((t.dtype for t in probe.parameters() if t.is_floating_point()), torch.get_default_dtype())
    problems: dict[str, str] = {}
    modes = [(m, m.training) for m in probe.modules()]
    probe.eval()
    try:
        for path_name in ("forward", *FORWARD_PATHS):
            method = getattr(probe, path_name, None)
            if path_name != "forward" and not callable(method):
                continue
            x = torch.empty((1, *size), device="meta", dtype=dtype)
            call = probe if path_name == "forward" else method
            found = _run_path(probe, plan, lambda call=call, x=x: call(x))
            if found is None:  # this path does not run here (its own arguments, a feature the model lacks)
                if path_name == "forward":
                    return {site.path: "the model does not run on the meta device" for site in plan.sites}
                continue
            for site in plan.sites:
                problem = found.get(site.path)
                if problem and site.path not in problems:
                    problems[site.path] = problem if path_name == "forward" else f"{problem} in {path_name}"
    finally:
        for m, training in modes:
            m.training = training
    return problems


def _host_path(site: Site) -> str:
    return site.module_path.rpartition(".")[0]


def _run_path(model: nn.Module, plan: Plan, run: Callable[[], Any]) -> dict[str, str] | None:
    counts: Counter[str] = Counter()
    inputs: dict[str, list[Any]] = {}
    outputs: dict[str, list[Any]] = {}
    handles = []

    def counter(key: str) -> Callable[..., None]:
        def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
            counts[key] += 1
            inputs.setdefault(key, []).append(args[0] if args else None)
        return hook

    def recorder(key: str) -> Callable[..., None]:
        def hook(_m: nn.Module, _args: tuple[Any, ...], output: Any) -> None:
            outputs.setdefault(key, []).append(output)
        return hook

    missing: dict[str, str] = {}
    try:
        for site in plan.sites:
            try:
                module = model.get_submodule(site.module_path)
                host = model.get_submodule(_host_path(site))
            except AttributeError:
                missing[site.path] = f"no inserted module at {site.module_path!r}"
                continue
            handles.append(module.register_forward_pre_hook(counter(f"module {site.path}")))
            handles.append(module.register_forward_hook(recorder(f"module {site.path}")))
            handles.append(host.register_forward_pre_hook(counter(f"host {site.path}")))
            for name, child in host.named_children():
                if child is not module:
                    handles.append(child.register_forward_pre_hook(counter(f"child {site.path} {name}")))
            anchor = _anchor(host, site)
            if anchor is not None:
                handles.append(anchor.register_forward_pre_hook(counter(f"anchor {site.path}")))
                handles.append(anchor.register_forward_hook(recorder(f"anchor {site.path}")))
        try:
            with torch.no_grad():
                run()
        except Exception:
            return None
    finally:
        for handle in handles:
            handle.remove()
    found: dict[str, str] = dict(missing)
    for site in plan.sites:
        problem = missing.get(site.path) or _problem(site, model, counts, inputs, outputs)
        if problem:
            found[site.path] = problem
    return found


def _anchor(host: nn.Module, site: Site) -> nn.Module | None:
    """The child the site is placed against, where the plan names one (not a graph node, not a slot)."""
    if site.slot is not None or not site.anchor or site.anchor.startswith("%") or _host_path(site) != site.path:
        return None
    try:
        return host.get_submodule(site.anchor)
    except AttributeError:
        return None


def _problem(site: Site, model: nn.Module, counts: Counter[str], inputs: dict[str, list[Any]],
             outputs: dict[str, list[Any]]) -> str | None:
    host_calls = counts[f"host {site.path}"]
    children = [n for k, n in counts.items() if k.startswith(f"child {site.path} ")]
    expected = host_calls or max(children, default=0)
    got = counts[f"module {site.path}"]
    where = site.module_path
    if got != expected:
        return (f"{where} runs {got} time(s) where its block runs {expected} time(s): the inserted module must run "
                "exactly once per call of its block")
    for x in inputs.get(f"module {site.path}", []):
        if not isinstance(x, torch.Tensor) or x.dim() < 2 or x.shape[1] != site.channels:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            return f"{where} is planned for {site.channels} channels but takes a {shape} map"
    anchor = f"anchor {site.path}"
    if counts[anchor] and site.position == "after":
        taken = inputs.get(f"module {site.path}", [])
        made = outputs.get(anchor, [])
        if not all(any(t is m for m in made) for t in taken):
            return f"{where} does not take the output of {site.anchor!r}, where the plan puts it"
    elif counts[anchor] and site.position == "before":
        fed = inputs.get(anchor, [])
        made = outputs.get(f"module {site.path}", [])
        if not all(any(f is m for m in made) for f in fed):
            return f"{site.anchor!r} does not take the output of {where}, where the plan puts it"
    return None


def describe_problems(problems: dict[str, str], limit: int = 3) -> str:
    """One line naming the first problems."""
    return "; ".join(f"{path or 'the model'}: {describe(text)}" for path, text in list(problems.items())[:limit])
