"""Finding: which blocks a recipe matches, where in each the SE goes (`engine.places`), and the feature map it would
see, measured by one forward pass of a meta-device copy. Nothing here changes the model.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from ..layers.attention import class_path
from .designs import with_own_designs
from .measure import Counts, count
from .meta import as_meta, output_shapes, run_meta
from .places import Pending, Place, candidates, check_candidate
from .plan import Skip
from .recipes import Recipe
from .record import record_call
from .tokens import channels_last, prefix_tokens
from .traces import node_output_shape
from .widths import block_activation


@dataclass(frozen=True)
class Match:
    """A block a recipe matched, before settings are applied."""

    path: str
    recipe: Recipe
    place: Place
    block: str
    anchor: str
    shape: tuple[int, ...]  # (N, C, H, W) of the map the SE scales at the planning input size ((N, C, T, H, W): video)
    pattern: str = ""  # the structural pattern that matched ("residual", ...); "" for a class rule
    call: Any = field(default=None, compare=False)  # how the parent called the block (`verify.Call`)
    fixed_args: dict[str, Any] = field(default_factory=dict, compare=False)  # its non-tensor arguments, by name
    input_channels: int | None = None  # channels of the block's input (its first tensor argument), if NCHW
    defaults: Any = None  # the recipe's SE settings in this model (`Recipe.defaults_for` the model's class)
    channels_last: bool = False  # token features: (B, N, C), (B, H, W, C) or (B, T, H, W, C) (`engine.tokens`)
    prefix_tokens: int = 0  # leading tokens of a sequence its squeeze leaves out (class, distillation, registers)

    @property
    def channels(self) -> int:
        return self.shape[-1] if self.channels_last else self.shape[1]

    @property
    def feature_map(self) -> tuple[int, ...]:
        """(C, positions...) of the map the SE scales, batch left out: (C, H, W), (C, T, H, W); (C, N) for tokens."""
        return (self.shape[-1], *self.shape[1:-1]) if self.channels_last else self.shape[1:]


@dataclass(frozen=True)
class Findings:
    matches: tuple[Match, ...]
    skipped: tuple[Skip, ...]
    recipes: tuple[str, ...]
    input_size: tuple[int, int, int]
    output_shapes: tuple[tuple[int, ...], ...]  # the base model's output shapes, to check surgery against
    block_classes: tuple[str, ...]  # class paths present in the model (outside torch.nn), most frequent first
    counts: Counts | None = None  # the model's Counts, when find_sites(count_base=True)


@dataclass
class _Probe:
    """What one forward of a meta copy saw."""

    model: nn.Module  # the meta copy
    places: dict[str, list[Any]]  # the map's shape at each pending place, per call, by block path
    calls: dict[str, Any]  # each block's first call (`record.Call`), by path
    counts: Counts | None  # the model's counts, with count_base
    output_shapes: tuple[tuple[int, ...], ...]


def _measure(model: nn.Module, pending: list[Pending], input_size: tuple[int, ...], count_base: bool) -> _Probe:
    """One forward of a meta copy: the shapes at each pending place, each block's call, the output shapes, and with
    `count_base` the model's counts."""
    probe = as_meta(model)
    seen: dict[str, list[tuple[int, ...]]] = {}
    node_inputs: dict[str, list[tuple[Any, ...]]] = {}  # block inputs, for anchors that are graph nodes
    calls: dict[str, Any] = {}
    handles = []

    def recorder(path: str) -> Any:
        def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if path not in calls:
                calls[path] = record_call(args, kwargs)

        return hook

    for p in pending:
        handles.append(probe.get_submodule(p.path).register_forward_pre_hook(recorder(p.path), with_kwargs=True))
        record = seen.setdefault(p.path, [])
        if p.anchor.startswith("%"):
            inputs = node_inputs.setdefault(p.path, [])
            handles.append(probe.get_submodule(p.path).register_forward_pre_hook(
                lambda _m, args, inputs=inputs: inputs.append(args)))
            continue
        target = probe.get_submodule(f"{p.path}.{p.anchor}" if p.path and p.anchor else p.path or p.anchor)
        if p.place.position == "before":
            handles.append(target.register_forward_pre_hook(lambda _m, args, rec=record: rec.append(_shape(args))))
        else:
            handles.append(target.register_forward_hook(lambda _m, _a, out, rec=record: rec.append(_shape(out))))
    try:
        if count_base:
            counts = count(probe, input_size)
            shapes = counts.output_shapes
        else:
            counts, shapes = None, output_shapes(run_meta(probe, input_size))
    finally:
        for h in handles:
            h.remove()

    anchors = {p.path: p.anchor for p in pending}
    for path, inputs in node_inputs.items():
        seen[path] = [node_output_shape(probe.get_submodule(path), anchors[path][1:], args) for args in inputs]
    return _Probe(probe, seen, calls, counts, shapes)


def find_sites(
    model: nn.Module, recipes: list[Recipe], input_size: tuple[int, int, int], *, count_base: bool = False
) -> Findings:
    """Match the recipes' block classes and measure the feature map at each SE place. Changes nothing.

    With `count_base`, the same forward pass also counts the model's params and MACs (``Findings.counts``).
    """
    pending: list[Pending] = []
    skipped: list[Skip] = []
    for candidate in candidates(model, recipes):
        checked = check_candidate(candidate)
        (pending if isinstance(checked, Pending) else skipped).append(checked)

    if not pending:  # nothing to measure: skip the forward pass
        return _findings(model, (), skipped, recipes, input_size, ())

    probe = _measure(model, pending, input_size, count_base)
    matches: list[Match] = []
    for p in pending:
        places = probe.places[p.path]
        if not places:
            skipped.append(Skip(p.path, p.block, p.recipe.name, "not executed by the model's forward"))
        elif len(places) > 1:
            skipped.append(Skip(p.path, p.block, p.recipe.name, f"its SE place runs {len(places)} times per forward"))
        elif places[0] is None or not 3 <= len(places[0]) <= 5:
            skipped.append(Skip(p.path, p.block, p.recipe.name,
                                f"expects an (N, C, ...) feature map of 1 to 3 spatial dimensions, got {places[0]}"))
        else:
            call = probe.calls.get(p.path)
            fixed = call.fixed(probe.model.get_submodule(p.path).forward) if call is not None else {}
            first = call.first_tensor() if call is not None else None
            defaults = p.place.settings(p.recipe.defaults_for(class_path(model)))
            if defaults.act_layer == "block":
                defaults = replace(defaults, act_layer=block_activation(model.get_submodule(p.path)) or "relu")
            tokens = channels_last(model.get_submodule(p.path), p.anchor, p.place.position, places[0])
            if p.pattern and p.pattern.startswith("token-") != tokens:
                # a token pattern on a Linear's output permuted back to NCHW (SwiftFormer's attention), or an NCHW
                # pattern on tokens (LeViT's Linear + BatchNorm1d MLP): not this pattern's match
                continue
            width = (first.shape[-1] if tokens else first.shape[1]) if first is not None \
                and 3 <= len(first.shape) <= 5 else None
            matches.append(Match(p.path, p.recipe, p.place, p.block, p.anchor, places[0], p.pattern, call, fixed,
                                 width, defaults, tokens, prefix_tokens(model, places[0]) if tokens else 0))
    return _findings(model, with_own_designs(model, matches, skipped), skipped, recipes, input_size,
                     probe.output_shapes, probe.counts)


def _findings(
    model: nn.Module,
    matches: Iterable[Match],
    skipped: Iterable[Skip],
    recipes: list[Recipe],
    input_size: tuple[int, int, int],
    shapes: tuple[tuple[int, ...], ...],
    counts: Counts | None = None,
) -> Findings:
    classes = Counter(
        class_path(m) for m in model.modules() if not type(m).__module__.startswith("torch.nn") and m is not model
    )
    order = {path: i for i, (path, _) in enumerate(model.named_modules())}
    return Findings(
        matches=tuple(sorted(matches, key=lambda m: order[m.path])),
        skipped=tuple(sorted(skipped, key=lambda s: order[s.path])),
        recipes=tuple(r.name for r in recipes),
        input_size=input_size,
        output_shapes=shapes,
        block_classes=tuple(c for c, _ in classes.most_common()),
        counts=counts,
    )


def _shape(value: Any) -> tuple[int, ...] | None:
    if isinstance(value, tuple) and value:
        value = value[0]
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None
