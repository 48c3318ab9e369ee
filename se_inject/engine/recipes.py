"""Recipes: declarative TOML files saying which block classes get SE, and where in the block it goes.

A recipe never runs code. It names block classes by full class path and, for each, the place of the SE:

- ``after = "bn3"``: SE takes the output of the child ``bn3`` (``"."`` is the block itself: SE on the block's output);
- ``before = "conv.-2"``: SE takes the input of that child (path parts may be negative indexes into a Sequential);
- ``slot = "se"`` (optional): the block's own forward already calls ``self.se`` at that place (timm's attention slot),
  so the slot is filled instead of rewriting the forward. ``after``/``before`` then only tells where to measure the
  feature map; without them the slot must hold a module (e.g. ``nn.Identity``), whose input is measured;
- ``slot_gain = 2.0`` (optional, with ``slot``): the block multiplies the slot's output by this constant (NFNet's
  ``attn_gain * attn_last(x)``; narrow the rule with ``when`` to blocks that have it). The SE keeps the family's
  scaling, and identity initialisation divides the gate's identity gain by it (see `site_attention`);
- ``in_child = true`` (optional): the SE goes into the anchor child's own forward (``conv2.se`` on conv2's output),
  as it does where several places share a block, and the block's forward is left as it is: for blocks whose forward
  cannot be rewritten (it takes a tensor or a list, as DenseNet's and SelecSLS's layers do);
- ``when``, ``require``, ``within``/``not_within`` (optional) narrow a rule to blocks with these attribute values
  (a child module or None by its class name: ``mixer = "Identity"``, ``token_mixer = "None"``), this structure,
  or (fnmatch globs over class paths) under a model or ancestor of these classes.

A ``[[patterns]]`` table names a structure instead of classes (see `se_inject.patterns`): ``pattern = "residual"``
matches every block whose graph has that shape, optionally narrowed to classes or to models by fnmatch globs over
class paths (``classes``, ``within``, ``not_within``) or to paths below the ``within`` ancestor (``paths``). Class
rules are exact and take precedence over patterns.

Reading and validating a recipe file, and the shipped recipes, are in `se_inject.engine.recipe_files`.
This module imports no torch, so listing recipes stays instant.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from fnmatch import fnmatchcase
from functools import lru_cache
from typing import Any

from ..errors import UsageError
from ..settings import LIBRARY, RECIPE_KEYS, SESettings, compose


@dataclass(frozen=True)
class Convention:
    """A model family's own SE settings, used instead of the recipe's defaults in models of these classes."""

    models: tuple[str, ...]  # full class paths of the whole model (its root module)
    defaults: SESettings


@dataclass(frozen=True)
class BlockRule:
    """Where SE goes in blocks of the given classes."""

    classes: tuple[str, ...]
    anchor: str  # child path; "." is the block itself
    position: str  # "after" | "before"
    slot: str | None = None
    name: str = "se"
    require: tuple[str, ...] = ()
    when: tuple[tuple[str, Any], ...] = ()  # (attribute, value): the block's attribute equals (child: is named) it
    within: tuple[str, ...] = ()  # fnmatch globs: a class among the block's ancestors (the model included) must match
    not_within: tuple[str, ...] = ()  # ... and none may
    slot_gain: float = 1.0  # the constant the block's forward multiplies the slot's output by
    in_child: bool = False  # SE in the anchor child's own forward, the block's forward left as it is
    placement: str = "paper"  # "family": the family's own SE design (its timm twin, its paper); "paper": Hu et al.
    se: SESettings = field(default_factory=SESettings)  # SE settings of this rule over the recipe's (`[blocks.se]`)
    source: str = ""  # where the place and settings come from ("timm regnety_*", "Hu et al., Fig. 3", ...)

    def settings(self, defaults: SESettings) -> SESettings:
        """The SE settings of a block this rule matched: the rule's own over the recipe's (model's) defaults."""
        return compose(defaults, self.se)

    def applies_to(self, block: Any) -> bool:
        return all(_attribute_matches(block, attr, value) for attr, value in self.when)

    def in_scope(self, ancestors: tuple[str, ...]) -> bool:
        """Whether a block under ancestors of these classes (outermost first) is in this rule's scope."""
        return _in_scope(self.within, self.not_within, ancestors, ancestors)


def _in_scope(within: tuple[str, ...], not_within: tuple[str, ...], ancestors: tuple[str, ...],
              excluded: tuple[str, ...]) -> bool:
    """Some class of `ancestors` matches a glob of `within` (when given), and none of `excluded` one of
    `not_within`."""
    return (not within or any(_matches(within, a) for a in ancestors)) and not (
        not_within and any(_matches(not_within, a) for a in excluded))


@lru_cache(maxsize=1 << 16)
def _matches(globs: tuple[str, ...], name: str) -> bool:
    """Whether `name` matches one of the fnmatch `globs` (case-sensitive). Cached: finding asks this of every
    module's class and ancestors, for every rule, and the pairs repeat."""
    return any(fnmatchcase(name, g) for g in globs)


_MISSING = object()
_PLAIN = (bool, int, float, str)


def _attribute_matches(block: Any, attr: str, value: Any) -> bool:
    """A plain attribute equals `value`; a child module (or None) matches a string naming its class, "None" for
    None: ``when = { mixer = "Identity" }`` picks the blocks built without a token mixer. Anything else (a tensor,
    whose ``==`` is elementwise) is a `UsageError`."""
    actual = getattr(block, attr, _MISSING)
    try:
        equal = actual == value
        if not isinstance(equal, bool):
            raise TypeError
    except Exception:
        raise UsageError(f"recipe field 'when': {type(block).__name__}.{attr} is a {type(actual).__name__}, not a "
                         "plain value (bool, int, float, string) or a child module; 'when' cannot compare it") from None
    if equal:
        return True
    if actual is _MISSING or isinstance(actual, _PLAIN) or not isinstance(value, str):
        return False
    return value == ("None" if actual is None else type(actual).__name__)


@dataclass(frozen=True)
class PatternRule:
    """SE wherever a block's structure has `pattern` (see `se_inject.patterns`), whatever the block's class.

    Narrowing, all fnmatch globs over full class paths: `classes` the block's own class (default any); `within` a
    class among the block's ancestors, the model itself included (default any); `not_within` none of them may be.
    `paths`: fnmatch globs over the block's dotted path below its nearest `within` ancestor (below the model without
    `within`): SSD's VGG-16 body is its extractor's ``features`` and ``extra.0``, not the extra layers.
    """

    pattern: str
    classes: tuple[str, ...] = ("*",)
    within: tuple[str, ...] = ()
    not_within: tuple[str, ...] = ()
    name: str = "se"
    paths: tuple[str, ...] = ()

    def accepts(self, class_path: str, ancestors: tuple[str, ...], path: str = "") -> bool:
        """Whether a block of class `class_path` at `path` under ancestors of these classes (outermost first, one per
        leading part of `path`) is in this rule's scope."""
        return _matches(self.classes, class_path) and _in_scope(
            self.within, self.not_within, ancestors, (*ancestors, class_path)) and self._on_paths(ancestors, path)

    def _on_paths(self, ancestors: tuple[str, ...], path: str) -> bool:
        if not self.paths:
            return True
        parts = path.split(".")
        start = max((i for i, a in enumerate(ancestors) if _matches(self.within, a)), default=0)
        return any(fnmatchcase(".".join(parts[start:]), g) for g in self.paths)


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    blocks: tuple[BlockRule, ...]
    defaults: SESettings = LIBRARY
    reference: str = ""
    source: str = ""
    conventions: tuple[Convention, ...] = ()
    patterns: tuple[PatternRule, ...] = ()
    auto: bool = True  # applied by "auto"; false: an option applied only when named (``--recipe localvit``)

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(c for rule in self.blocks for c in rule.classes)

    def rules_for(
        self, class_path: str, block: Any = None, ancestors: tuple[str, ...] | None = None
    ) -> Iterator[BlockRule]:
        """The rules naming this class whose `when` conditions the block meets and whose scope its ancestors are in
        (each checked only when given), in file order."""
        return (rule for rule in self.blocks if class_path in rule.classes
                and (block is None or rule.applies_to(block)) and (ancestors is None or rule.in_scope(ancestors)))

    def rule_for(
        self, class_path: str, block: Any = None, ancestors: tuple[str, ...] | None = None
    ) -> BlockRule | None:
        """The first of `rules_for`."""
        return next(self.rules_for(class_path, block, ancestors), None)

    def for_placement(self, placement: str) -> Recipe:
        """The recipe with, for each class, the rules of this placement where it has some, else the others: a
        family's own design by default, the SE paper's place with ``placement="paper"``."""
        chosen = {(c, rule_scope(r)) for r in self.blocks if r.placement == placement for c in r.classes}

        def covered(rule: BlockRule) -> bool:  # the other placement has a rule (or, for the paper, a pattern) here
            return any((c, rule_scope(rule)) in chosen or (placement == "paper" and any(
                fnmatchcase(c, g) for p in self.patterns for g in p.classes)) for c in rule.classes)

        kept = tuple(r for r in self.blocks if r.placement == placement or not covered(r))
        return self if kept == self.blocks else replace(self, blocks=kept)

    def defaults_for(self, model_class: str) -> SESettings:
        """The SE settings in a model of this class: its family's convention, else the recipe's defaults."""
        return next((c.defaults for c in self.conventions if model_class in c.models), self.defaults)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "reference": self.reference,
            "defaults": recipe_table(self.defaults),
            "conventions": [{"models": list(c.models), **recipe_table(c.defaults)} for c in self.conventions],
            "classes": list(self.classes),
            "blocks": [
                {"classes": list(b.classes), "anchor": b.anchor, "position": b.position, "slot": b.slot, "name": b.name,
                 "require": list(b.require), "when": dict(b.when), "within": list(b.within),
                 "not_within": list(b.not_within), "slot_gain": b.slot_gain,
                 "in_child": b.in_child, "placement": b.placement, "se": recipe_table(b.se), "source": b.source}
                for b in self.blocks
            ],
            "patterns": [
                {"pattern": p.pattern, "classes": list(p.classes), "within": list(p.within),
                 "not_within": list(p.not_within), "paths": list(p.paths)}
                for p in self.patterns
            ],
            "source": self.source,
        }


# A recipe's SE settings as its file names them (`RECIPE_KEYS`: ``reduction`` is r, ``norm`` a boolean).
TABLE_KEYS = {**{f: f for f in ("round_limit", "bias", "convention", "layout")}, **RECIPE_KEYS}


def recipe_table(settings: SESettings) -> dict[str, Any]:
    """The settings a recipe file's table gives, in the file's names (`RECIPE_KEYS`)."""
    values = settings.to_dict()
    table = {key: values[name] for key, name in TABLE_KEYS.items() if name in values}
    if "reduction" in table:
        table["reduction"] = settings.reduction
    if "norm" in table:
        table["norm"] = True
    return table



def rule_scope(rule: BlockRule) -> tuple[object, ...]:
    """What narrows a rule to some blocks of its classes: two rules of one class and scope overlap."""
    return rule.when, rule.require, rule.within, rule.not_within
