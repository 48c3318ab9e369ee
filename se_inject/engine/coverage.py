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

from .meta import as_meta, training_flags
from .plan import Plan, Site
from .tasks import example_inputs, forward, planning_scope


class Problem(str):
    """Why a site's module does not run as planned; `field` names the plan field it contradicts ("slot", "anchor",
    "attention.channels")."""

    field: str

    def __new__(cls, text: str, field: str) -> Problem:
        problem = super().__new__(cls, text)
        problem.field = field
        return problem


class _WrongMap(Exception):
    """Raised by a module's pre-hook on a map of other channels: its forward would fail on it anyway."""


# Methods beside ``forward`` that run a timm model's trunk: each is checked where the model has it.
FORWARD_PATHS = ("forward_features", "forward_intermediates")


def check_calls(model: nn.Module, plan: Plan, input_size: tuple[int, ...] | None = None) -> dict[str, Problem]:
    """Problems by site path (empty when every inserted module runs as the plan says). `model` is the applied
    model (a meta copy is used unless it is on the meta device already)."""
    probe = as_meta(model)
    scope = planning_scope(probe)  # a detector's heads depend on its detections: only its backbone is checked
    if scope is not None:
        where = next(name for name, m in probe.named_modules() if m is scope)
        outside = {site.path: Problem(f"{site.path or 'the model'} is outside the detector's backbone ({where!r}), "
                                      "the only part of a detector whose calls are checked", "path")
                   for site in plan.sites if not (site.path + ".").startswith(where + ".")}
        if outside:
            return outside
    size = tuple(input_size or plan.input_size)
    dtype = next((t.dtype for t in probe.parameters() if t.is_floating_point()), torch.get_default_dtype())
    with CallWatch(probe, plan) as watch:  # the task's example input; a detector up to its backbone (engine.tasks)
        ran = _run(probe, lambda: forward(probe, example_inputs(probe, size, device="meta", dtype=dtype)))
    problems = watch.problems()
    if not ran and not problems:
        return {site.path: Problem("the model does not run on the meta device", "") for site in plan.sites}
    return problems or check_other_paths(probe, plan, size, watch)


def check_other_paths(model: nn.Module, plan: Plan, size: tuple[int, ...], watch: CallWatch
                      ) -> dict[str, Problem]:
    """`check_calls` for the forward paths besides ``forward`` (a meta `model`; `watch` watched its forward).

    A path runs again only where it can differ from ``forward`` for an inserted module: ``forward_features`` where
    the forward did not call it (timm's models do, and that run was checked), ``forward_intermediates`` where a
    block hosting a module has a forward-like method of its own beside ``forward`` (timm's ``forward_with_tap``).
    Everywhere else a path reaches a host block through its ``__call__`` or its ``forward``, which is the rewritten
    one, so the modules run there as they ran in ``forward``."""
    alternates = _alternate_forwards(model, plan)
    problems: dict[str, Problem] = {}
    for name in FORWARD_PATHS:
        method = getattr(model, name, None)
        if not callable(method) or name in watch.called_paths or (name == "forward_intermediates" and not alternates):
            continue
        with CallWatch(model, plan, watch_paths=False) as other:
            ran = _run(model, lambda method=method: method(_input(model, size)))
        if not ran:  # this path does not run here (its own arguments, a feature the model lacks)
            continue
        for path, problem in other.problems().items():
            problems.setdefault(path, Problem(f"{problem} in {name}", problem.field))
    return problems


def _alternate_forwards(model: nn.Module, plan: Plan) -> set[str]:
    """Methods named ``forward_*`` that the classes of the blocks hosting inserted modules define (not nn.Module)."""
    found: set[str] = set()
    for site in plan.sites:
        try:
            host = model.get_submodule(_host_path(site))
        except AttributeError:
            continue
        for cls in type(host).__mro__:
            if cls is nn.Module or cls is object:
                break
            found.update(n for n, v in vars(cls).items() if n.startswith("forward_") and callable(v))
    return found


def _input(model: nn.Module, size: tuple[int, ...]) -> torch.Tensor:
    dtype = next((t.dtype for t in model.parameters() if t.is_floating_point()), torch.get_default_dtype())
    return torch.empty((1, *size), device="meta", dtype=dtype)


def _run(model: nn.Module, run: Callable[[], Any]) -> bool:
    try:
        with torch.no_grad(), training_flags(model):
            model.eval()
            run()
        return True
    except Exception:  # _WrongMap included: that problem is recorded
        return False


def _host_path(site: Site) -> str:
    return site.module_path.rpartition(".")[0]


class CallWatch:
    """Hooks on every inserted module of `plan`, its host block, the block's other children and its anchor, for
    the runs made inside the ``with``; `problems` judges them. Also notes which of `FORWARD_PATHS` the model's own
    methods were called (``forward`` calling ``forward_features``) unless `watch_paths` is off. Use it around any
    forward of the applied meta model (the counting forward: no run of its own)."""

    def __init__(self, model: nn.Module, plan: Plan, *, watch_paths: bool = True):
        self.model, self.plan, self.watch_paths = model, plan, watch_paths
        self.counts: Counter[str] = Counter()
        self.inputs: dict[str, list[Any]] = {}
        self.outputs: dict[str, list[Any]] = {}
        self.missing: dict[str, Problem] = {}
        self.called_paths: set[str] = set()
        self._handles: list[Any] = []
        self._patched: list[str] = []

    def __enter__(self) -> CallWatch:
        for site in self.plan.sites:
            try:
                module = self.model.get_submodule(site.module_path)
                host = self.model.get_submodule(_host_path(site))
            except AttributeError:
                self.missing[site.path] = Problem(f"no inserted module at {site.module_path!r}", "name")
                continue
            key = site.module_path  # by site: several sites can share a block
            self._watch(module, f"module {key}", outputs=True, channels=site.channels,
                        axis=-1 if site.attention.channels_last else 1)
            self._watch(host, f"host {key}")
            for name, child in host.named_children():
                if child is not module:
                    self._watch(child, f"child {key} {name}")
            anchor = _anchor(host, site)
            if anchor is not None:
                self._watch(anchor, f"anchor {key}", outputs=True)
        if self.watch_paths:
            for name in FORWARD_PATHS:
                method = getattr(self.model, name, None)
                if callable(method):
                    setattr(self.model, name, self._noting(name, method))  # an instance attribute, removed on exit
                    self._patched.append(name)
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        for name in self._patched:
            delattr(self.model, name)

    def _noting(self, name: str, method: Callable[..., Any]) -> Callable[..., Any]:
        def noted(*args: Any, **kwargs: Any) -> Any:
            self.called_paths.add(name)
            return method(*args, **kwargs)
        return noted

    def _watch(self, module: nn.Module, key: str, outputs: bool = False, channels: int | None = None,
               axis: int = 1) -> None:
        def pre(_m: nn.Module, args: tuple[Any, ...]) -> None:
            self.counts[key] += 1
            x = args[0] if args else None
            self.inputs.setdefault(key, []).append(x)
            if channels is not None and not (isinstance(x, torch.Tensor) and x.dim() >= 2
                                             and x.shape[axis] == channels):
                raise _WrongMap

        self._handles.append(module.register_forward_pre_hook(pre))
        if outputs:
            self._handles.append(module.register_forward_hook(
                lambda _m, _a, out: self.outputs.setdefault(key, []).append(out)))

    def problems(self) -> dict[str, Problem]:
        found = dict(self.missing)
        for site in self.plan.sites:
            problem = found.get(site.path) or _problem(site, self.counts, self.inputs, self.outputs)
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


def _problem(site: Site, counts: Counter[str], inputs: dict[str, list[Any]], outputs: dict[str, list[Any]]
             ) -> Problem | None:
    where = site.module_path
    host_calls = counts[f"host {where}"]
    children = [n for k, n in counts.items() if k.startswith(f"child {where} ")]
    expected = host_calls or max(children, default=0)
    got = counts[f"module {where}"]
    axis = -1 if site.attention.channels_last else 1
    for x in inputs.get(f"module {where}", []):  # first: a wrong map stops the run there
        if not isinstance(x, torch.Tensor) or x.dim() < 2 or x.shape[axis] != site.channels:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            return Problem(f"{where} is planned for {site.channels} channels but takes a {shape} map",
                           "attention.channels")
    if got != expected:
        return Problem(f"{where} runs {got} time(s) where its block runs {expected} time(s): the inserted module "
                       "must run exactly once per call of its block", "slot" if site.slot else "anchor")
    anchor = f"anchor {where}"
    if counts[anchor] and site.position == "after":
        taken = inputs.get(f"module {where}", [])
        made = outputs.get(anchor, [])
        if not all(any(t is m for m in made) for t in taken):
            return Problem(f"{where} does not take the output of {site.anchor!r}, where the plan puts it", "anchor")
    elif counts[anchor] and site.position == "before":
        fed = inputs.get(anchor, [])
        made = outputs.get(f"module {where}", [])
        if not all(any(f is m for m in made) for f in fed):
            return Problem(f"{site.anchor!r} does not take the output of {where}, where the plan puts it", "anchor")
    return None
