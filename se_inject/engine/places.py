"""From recipes to places: which blocks of a model a recipe names (a class rule) or a pattern recognises, where in
each the SE goes (`Place`, the recipe's `BlockRule` in the engine's terms), and whether that place exists and is free.

Pure: reads the model, changes nothing and runs no forward (`engine.find` measures what this finds).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace

from torch import nn

from ..errors import UsageError
from ..layers.attention import class_path, find_attention
from ..settings import SESettings, compose
from .patterns import conv_chain, match_block
from .plan import Skip
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
class Place:
    """Where one SE goes in one matched block, and with which settings: what finding passes on to planning. Built from
    a recipe's `BlockRule` (`place_of`) or by a structural pattern; the recipe language stays the user's."""

    anchor: str  # child path ("." the block itself) or a graph node ("%name")
    position: str  # "after" | "before"
    name: str = "se"
    slot: str | None = None  # an attribute the block's forward already calls, filled with the SE
    require: tuple[str, ...] = ()
    slot_gain: float = 1.0
    in_child: bool = False
    placement: str = "paper"
    source: str = ""
    se: SESettings = field(default_factory=SESettings)  # SE settings over the recipe's

    def settings(self, defaults: SESettings) -> SESettings:
        return compose(defaults, self.se)


def place_of(rule: BlockRule) -> Place:
    return Place(anchor=rule.anchor, position=rule.position, name=rule.name, slot=rule.slot, require=rule.require,
                 slot_gain=rule.slot_gain, in_child=rule.in_child, placement=rule.placement, source=rule.source,
                 se=rule.se)


def _shipped(recipe: Recipe) -> bool:
    return recipe.source.startswith("se_inject/recipes/")


@dataclass(frozen=True)
class Candidate:
    """A block a recipe names (or a pattern matched), and the place in it, before the place is checked."""

    path: str
    block: nn.Module
    recipe: Recipe
    place: Place
    pattern: str = ""  # the structural pattern that matched; "" for a class rule


@dataclass(frozen=True)
class Pending:
    """A checked candidate whose feature map the planning forward measures."""

    path: str
    recipe: Recipe
    place: Place
    block: str  # class path
    anchor: str  # the resolved child path, or a graph node ("%name")
    pattern: str


def _rule_for(recipe: Recipe, cp: str, module: nn.Module, ancestors: tuple[str, ...]) -> BlockRule | None:
    return next((rule for rule in recipe.rules_for(cp, module, ancestors)
                 if _block_requirements_met(module, rule.require)), None)


def candidates(model: nn.Module, recipes: list[Recipe]) -> Iterator[Candidate]:
    """Each module a recipe names, with its recipe; then blocks matched by structural patterns where no class rule
    matched the block, one of its ancestors or one of its descendants (class rules are exact and take precedence).

    Where several recipes name a block, a recipe file of the user's takes it from a shipped recipe; recipes putting
    SE at the same place are one site if their settings agree, and a conflict (UsageError naming both) if not;
    recipes putting SE at different places are each applied (see `_places`)."""
    taken: list[str] = []
    classes = {path: class_path(m) for path, m in model.named_modules()}
    named = frozenset(c for recipe in recipes for c in recipe.classes)  # class rules name exact class paths
    for path, module in model.named_modules():
        cp = classes[path]
        if cp not in named:
            continue
        ancestors = _ancestors(path, classes)
        found = [(recipe, place_of(rule)) for recipe in recipes
                 if (rule := _rule_for(recipe, cp, module, ancestors)) is not None]
        if not found:
            continue
        if any(not _shipped(recipe) for recipe, _ in found):
            found = [(recipe, rule) for recipe, rule in found if not _shipped(recipe)]
        places: dict[tuple[object, ...], tuple[Recipe, Place]] = {}
        for recipe, place in found:
            key = (resolve_child(module, place.anchor) if not place.anchor.startswith("%") else place.anchor,
                   place.position, place.slot)
            if key not in places:
                places[key] = (recipe, place)
            elif (places[key][1].name, places[key][0].defaults) != (place.name, recipe.defaults):
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
                     f"{path or 'the model'} ({cp}) at {how}; keep one (recipes=NAME, --recipe NAME)")


def _places(path: str, block: nn.Module, found: list[tuple[Recipe, Place]]) -> Iterator[Candidate]:
    """One block's candidates. Several places in one block (e.g. one recipe file per child of a VGG `features`
    Sequential), or a rule with `in_child`: each SE goes into its anchor child's own forward, on the child's output
    ("after") or input ("before"): the same tensor as at the anchor in the block, and the places cannot collide on a
    module name. At most one place, the block's own output, a slot or a graph node, stays with the block."""
    if (len(found) == 1 and not found[0][1].in_child) or find_attention(block) is not None:  # attention: a skip
        recipe, place = found[0]
        yield Candidate(path, block, recipe, place)
        return
    children: dict[str, Recipe] = {}
    own: tuple[Recipe, Place] | None = None
    for recipe, place in found:
        anchor = resolve_child(block, place.anchor) if not place.anchor.startswith("%") else None
        if place.slot is not None or not anchor:  # no child to move into (or none by that name: reported as such)
            if own is not None:
                _conflict(own[0], recipe, path, class_path(block), "places that cannot be combined in one block")
            own = recipe, place
            continue
        if anchor in children:
            _conflict(children[anchor], recipe, path, class_path(block), f"both sides of its child {anchor!r}")
        children[anchor] = recipe
        require = tuple(r for r in place.require if r == "pointwise")  # the block-level requirements were met
        yield Candidate(f"{path}.{anchor}" if path else anchor, block.get_submodule(anchor), recipe,
                        replace(place, anchor=".", slot=None, require=require, slot_gain=1.0, in_child=False))
    if own is not None:
        yield Candidate(path, block, *own)


def _inside(path: str, prefixes: Iterable[str]) -> bool:
    return any(path == p or path.startswith(f"{p}.") or not p for p in prefixes)


def _structural(
    model: nn.Module, rules: list[tuple[Recipe, PatternRule]], taken: list[str], classes: dict[str, str]
) -> Iterator[Candidate]:

    above = {".".join(p.split(".")[:i]) for p in taken for i in range(len(p.split(".")))}  # ancestors of taken
    matched: list[str] = []
    for path, module in model.named_modules():
        if not path or path in above or _inside(path, taken) or _inside(path, matched):
            continue
        cp = classes[path]
        ancestors = _ancestors(path, classes)
        for recipe, rule in rules:
            if not rule.accepts(cp, ancestors, path):
                continue
            if rule.pattern == "conv-chain":
                names = conv_chain(module)
                for name in names:  # SE in each unit's activation module: the Sequential stays as it is
                    child = module.get_submodule(name)
                    yield Candidate(f"{path}.{name}", child, recipe, Place(".", "after", rule.name), rule.pattern)
                if names:  # not marked matched: a nested Sequential is a stack of its own, for its own rules
                    break
                continue
            place = match_block(module, rule.pattern)
            if place is not None:
                matched.append(path)
                yield Candidate(path, module, recipe, Place(place.anchor or ".", place.position, rule.name),
                                rule.pattern)
                break


def check_candidate(candidate: Candidate) -> Pending | Skip:
    """A candidate whose place exists and is free (`Pending`), or why it is skipped."""
    path, block, recipe, place = candidate.path, candidate.block, candidate.recipe, candidate.place
    cp = class_path(block)

    def skip(reason: str, existing: bool = False) -> Skip:
        return Skip(path, cp, recipe.name, reason, existing)

    attention = find_attention(block)
    if attention is not None:
        at = type(block.get_submodule("" if attention == "." else attention)).__name__
        return skip(f"already has channel attention ({at} at {attention})", True)
    anchor = place.anchor if place.anchor.startswith("%") else resolve_child(block, place.anchor)
    if anchor is None:
        return skip(f"no child {place.anchor!r}")
    if place.slot is not None:
        if not hasattr(block, place.slot):
            return skip(f"no attribute {place.slot!r} to fill")
        current = getattr(block, place.slot)
        if current is not None and not isinstance(current, nn.Identity):
            return skip(f"slot {place.slot!r} holds {type(current).__name__}")
    elif hasattr(block, place.name):
        return skip(f"attribute {place.name!r} is taken")
    unmet = None if anchor.startswith("%") else _unmet_requirement(block.get_submodule(anchor), place.require)
    if unmet is None and not _block_requirements_met(block, place.require):
        unmet = "its structure fits none of the recipe's rules for its class"
    return skip(unmet) if unmet else Pending(path, recipe, place, cp, anchor, candidate.pattern)
