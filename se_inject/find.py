"""Finding: which blocks a recipe matches, where in each the SE goes, and the feature map it would see.

Nothing here changes the model: shapes come from one forward pass of a meta-device copy.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .errors import UsageError
from .layers.attention import class_path, find_attention
from .meta import as_meta, output_shapes, run_meta
from .recipes import BlockRule, PatternRule, Recipe


def resolve_child(block: nn.Module, path: str) -> str | None:
    """Canonical path of a child given with optional negative indexes (``"conv.-2"`` -> ``"conv.2"``); "." -> ""."""
    if path in (".", ""):
        return ""
    parts: list[str] = []
    module = block
    for part in path.split("."):
        names = list(module._modules)
        if part.lstrip("-").isdigit() and part.startswith("-"):
            index = int(part)
            if not -len(names) <= index < 0:
                return None
            part = names[index]
        child = module._modules.get(part)
        if child is None:
            return None
        parts.append(part)
        module = child
    return ".".join(parts)


def _first_conv(module: nn.Module) -> nn.Conv2d | None:
    return next((m for m in module.modules() if isinstance(m, nn.Conv2d)), None)


def _has_depthwise(block: nn.Module) -> bool:
    return any(
        isinstance(m, nn.Conv2d) and 1 < m.groups == m.in_channels == m.out_channels and m.kernel_size != (1, 1)
        for m in block.modules()
    )


def _block_requirements_met(block: nn.Module, require: Iterable[str]) -> bool:
    for req in require:
        if req == "depthwise" and not _has_depthwise(block):
            return False
        if req == "no-depthwise" and _has_depthwise(block):
            return False
    return True


def _unmet_requirement(anchor_module: nn.Module, require: Iterable[str]) -> str | None:
    for req in require:
        if req == "pointwise":
            conv = _first_conv(anchor_module)
            if conv is None or conv.kernel_size != (1, 1) or conv.groups != 1:
                return "no pointwise projection to put SE before"
    return None


@dataclass(frozen=True)
class Match:
    """A block a recipe matched, before settings are applied."""

    path: str
    recipe: Recipe
    rule: BlockRule
    block: str
    anchor: str
    shape: tuple[int, ...]  # (N, C, H, W) of the map the SE scales at the planning input size ((N, C, T, H, W): video)
    pattern: str = ""  # the structural pattern that matched ("residual", ...); "" for a class rule
    call: Any = field(default=None, compare=False)  # how the parent called the block (`verify.Call`)
    fixed_args: dict[str, Any] = field(default_factory=dict, compare=False)  # its non-tensor arguments, by name
    input_channels: int | None = None  # channels of the block's input (its first tensor argument), if NCHW
    defaults: Any = None  # the recipe's SE settings in this model (`Recipe.defaults_for` the model's class)

    @property
    def channels(self) -> int:
        return self.shape[1]


@dataclass(frozen=True)
class Skip:
    """A block a recipe matched but that gets no SE, and why."""

    path: str
    block: str
    recipe: str
    reason: str
    already_attention: bool = False


@dataclass(frozen=True)
class Findings:
    matches: tuple[Match, ...]
    skipped: tuple[Skip, ...]
    recipes: tuple[str, ...]
    input_size: tuple[int, int, int]
    output_shapes: tuple[tuple[int, ...], ...]  # the base model's output shapes, to check surgery against
    block_classes: tuple[str, ...]  # class paths present in the model (outside torch.nn), most frequent first
    counts: Any = None  # the model's Counts, when find_sites(count_base=True)


def _shipped(recipe: Recipe) -> bool:
    return recipe.source.startswith("se_inject/recipes/")


Candidate = tuple[str, nn.Module, Recipe, BlockRule, str]  # path, block, recipe, rule, pattern ("" for classes)


def _rule_for(recipe: Recipe, cp: str, module: nn.Module, ancestors: tuple[str, ...]) -> BlockRule | None:
    return next((rule for rule in recipe.rules_for(cp, module, ancestors)
                 if _block_requirements_met(module, rule.require)), None)


def _candidates(model: nn.Module, recipes: list[Recipe]) -> Iterator[Candidate]:
    """Each module a recipe names, with its recipe; then blocks matched by structural patterns where no class rule
    matched the block, one of its ancestors or one of its descendants (class rules are exact and take precedence).

    Where several recipes name a block, a recipe file of the user's takes it from a shipped recipe; recipes putting
    SE at the same place are one site if their settings agree, and a conflict (UsageError naming both) if not;
    recipes putting SE at different places are each applied (see `_places`)."""
    taken: list[str] = []
    classes = {path: class_path(m) for path, m in model.named_modules()}
    for path, module in model.named_modules():
        cp = classes[path]
        ancestors = _ancestors(path, classes)
        found = [(recipe, rule) for recipe in recipes if (rule := _rule_for(recipe, cp, module, ancestors)) is not None]
        if not found:
            continue
        if any(not _shipped(recipe) for recipe, _ in found):
            found = [(recipe, rule) for recipe, rule in found if not _shipped(recipe)]
        places: dict[tuple[object, ...], tuple[Recipe, BlockRule]] = {}
        for recipe, rule in found:
            key = (resolve_child(module, rule.anchor) if not rule.anchor.startswith("%") else rule.anchor,
                   rule.position, rule.slot)
            if key not in places:
                places[key] = (recipe, rule)
            elif (places[key][1].name, places[key][0].defaults) != (rule.name, recipe.defaults):
                _conflict(places[key][0], recipe, path, cp, "the same place with different settings")
        taken.append(path)
        yield from _places(path, module, list(places.values()))
    pattern_rules = [(recipe, rule) for recipe in recipes for rule in recipe.patterns]
    if pattern_rules:
        yield from _structural(model, pattern_rules, taken, classes)


def _ancestors(path: str, classes: dict[str, str]) -> tuple[str, ...]:
    """Class paths of the module's ancestors, the model first."""
    if not path:
        return ()
    parts = path.split(".")
    return tuple(classes[".".join(parts[:i])] for i in range(len(parts)))


def _conflict(first: Recipe, other: Recipe, path: str, cp: str, how: str) -> None:
    raise UsageError(f"recipes {first.name!r} ({first.source}) and {other.name!r} ({other.source}) both take "
                     f"{path or 'the model'} ({cp}) at {how}; keep one (--recipe NAME)")


def _places(path: str, block: nn.Module, found: list[tuple[Recipe, BlockRule]]) -> Iterator[Candidate]:
    """One block's candidates. Several places in one block (e.g. one recipe file per child of a VGG `features`
    Sequential), or a rule with `in_child`: each SE goes into its anchor child's own forward, on the child's output
    ("after") or input ("before"): the same tensor as at the anchor in the block, and the places cannot collide on a
    module name. At most one place, the block's own output, a slot or a graph node, stays with the block."""
    if (len(found) == 1 and not found[0][1].in_child) or find_attention(block) is not None:  # attention: a skip
        recipe, rule = found[0]
        yield path, block, recipe, rule, ""
        return
    children: dict[str, Recipe] = {}
    own: tuple[Recipe, BlockRule] | None = None
    for recipe, rule in found:
        anchor = resolve_child(block, rule.anchor) if not rule.anchor.startswith("%") else None
        if rule.slot is not None or not anchor:  # no child to move into (or none by that name: reported as such)
            if own is not None:
                _conflict(own[0], recipe, path, class_path(block), "places that cannot be combined in one block")
            own = recipe, rule
            continue
        if anchor in children:
            _conflict(children[anchor], recipe, path, class_path(block), f"both sides of its child {anchor!r}")
        children[anchor] = recipe
        child = block.get_submodule(anchor)
        require = tuple(r for r in rule.require if r == "pointwise")  # the block-level requirements were met
        yield (f"{path}.{anchor}" if path else anchor, child, recipe,
               BlockRule((class_path(child),), ".", rule.position, None, rule.name, require), "")
    if own is not None:
        yield path, block, *own, ""


def _inside(path: str, prefixes: Iterable[str]) -> bool:
    return any(path == p or path.startswith(f"{p}.") or not p for p in prefixes)


def _structural(
    model: nn.Module, rules: list[tuple[Recipe, PatternRule]], taken: list[str], classes: dict[str, str]
) -> Iterator[Candidate]:
    from .patterns import conv_chain, match_block

    above = {".".join(p.split(".")[:i]) for p in taken for i in range(len(p.split(".")))}  # ancestors of taken
    matched: list[str] = []
    for path, module in model.named_modules():
        if not path or path in above or _inside(path, taken) or _inside(path, matched):
            continue
        cp = classes[path]
        ancestors = _ancestors(path, classes)
        for recipe, rule in rules:
            if not rule.accepts(cp, ancestors):
                continue
            if rule.pattern == "conv-chain":
                names = conv_chain(module)
                for name in names:  # SE in each unit's activation module: the Sequential stays as it is
                    child = module.get_submodule(name)
                    yield f"{path}.{name}", child, recipe, BlockRule((class_path(child),), ".", "after", None,
                                                                      rule.name), rule.pattern
                if names:
                    matched.append(path)
                    break
                continue
            place = match_block(module, rule.pattern)
            if place is not None:
                matched.append(path)
                yield path, module, recipe, BlockRule((cp,), place.anchor or ".", place.position, None,
                                                      rule.name), rule.pattern
                break


def find_sites(
    model: nn.Module, recipes: list[Recipe], input_size: tuple[int, int, int], *, count_base: bool = False
) -> Findings:
    """Match the recipes' block classes and measure the feature map at each SE place. Changes nothing.

    With `count_base`, the same forward pass also counts the model's params and MACs (``Findings.counts``).
    """
    pending: list[tuple[str, Recipe, BlockRule, str, str, str]] = []  # path, recipe, rule, class path, anchor, pattern
    skipped: list[Skip] = []
    for path, block, recipe, rule, pattern in _candidates(model, recipes):
        cp = class_path(block)
        attention = find_attention(block)
        if attention is not None:
            at = type(block.get_submodule("" if attention == "." else attention)).__name__
            skipped.append(Skip(path, cp, recipe.name, f"already has channel attention ({at} at {attention})", True))
            continue
        anchor = rule.anchor if rule.anchor.startswith("%") else resolve_child(block, rule.anchor)
        if anchor is None:
            skipped.append(Skip(path, cp, recipe.name, f"no child {rule.anchor!r}"))
            continue
        if rule.slot is not None:
            if not hasattr(block, rule.slot):
                skipped.append(Skip(path, cp, recipe.name, f"no attribute {rule.slot!r} to fill"))
                continue
            current = getattr(block, rule.slot)
            if current is not None and not isinstance(current, nn.Identity):
                skipped.append(Skip(path, cp, recipe.name, f"slot {rule.slot!r} holds {type(current).__name__}"))
                continue
        elif hasattr(block, rule.name):
            skipped.append(Skip(path, cp, recipe.name, f"attribute {rule.name!r} is taken"))
            continue
        unmet = None if anchor.startswith("%") else _unmet_requirement(block.get_submodule(anchor), rule.require)
        if unmet is None and not _block_requirements_met(block, rule.require):
            unmet = "its structure fits none of the recipe's rules for its class"
        if unmet:
            skipped.append(Skip(path, cp, recipe.name, unmet))
            continue
        pending.append((path, recipe, rule, cp, anchor, pattern))

    if not pending:  # nothing to measure: skip the forward pass
        return _findings(model, (), skipped, recipes, input_size, ())
    from .verify import record_call

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

    for path, _recipe, rule, _cp, anchor, _pattern in pending:
        handles.append(probe.get_submodule(path).register_forward_pre_hook(recorder(path), with_kwargs=True))
        record = seen.setdefault(path, [])
        if anchor.startswith("%"):
            inputs = node_inputs.setdefault(path, [])
            handles.append(probe.get_submodule(path).register_forward_pre_hook(
                lambda _m, args, inputs=inputs: inputs.append(args)))
            continue
        target = probe.get_submodule(f"{path}.{anchor}" if path and anchor else path or anchor)
        if rule.position == "before":
            handles.append(target.register_forward_pre_hook(lambda _m, args, rec=record: rec.append(_shape(args))))
        else:
            handles.append(target.register_forward_hook(lambda _m, _a, out, rec=record: rec.append(_shape(out))))
    try:
        if count_base:
            from .measure import count

            counts = count(probe, input_size)
            shapes = counts.output_shapes
        else:
            counts, shapes = None, output_shapes(run_meta(probe, input_size))
    finally:
        for h in handles:
            h.remove()

    if node_inputs:
        from .patterns import node_output_shape

        for path, inputs in node_inputs.items():
            block = probe.get_submodule(path)
            anchor = next(a for p, _r, _ru, _c, a, _pt in pending if p == path)
            seen[path] = [node_output_shape(block, anchor[1:], args) for args in inputs]
    matches: list[Match] = []
    for path, recipe, rule, cp, anchor, pattern in pending:
        places = seen[path]
        if not places:
            skipped.append(Skip(path, cp, recipe.name, "not executed by the model's forward"))
        elif len(places) > 1:
            skipped.append(Skip(path, cp, recipe.name, f"its SE place runs {len(places)} times per forward"))
        elif places[0] is None or not 3 <= len(places[0]) <= 5:
            skipped.append(Skip(path, cp, recipe.name,
                                f"expects an (N, C, ...) feature map of 1 to 3 spatial dimensions, got {places[0]}"))
        else:
            call = calls.get(path)
            fixed = call.fixed(probe.get_submodule(path).forward) if call is not None else {}
            first = call.first_tensor() if call is not None else None
            matches.append(Match(path, recipe, rule, cp, anchor, places[0], pattern, call, fixed,
                                 first.shape[1] if first is not None and 3 <= len(first.shape) <= 5 else None,
                                 recipe.defaults_for(class_path(model))))
    return _findings(model, matches, skipped, recipes, input_size, shapes, counts)


def _findings(
    model: nn.Module,
    matches: Iterable[Match],
    skipped: Iterable[Skip],
    recipes: list[Recipe],
    input_size: tuple[int, int, int],
    shapes: tuple[tuple[int, ...], ...],
    counts: Any = None,
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
