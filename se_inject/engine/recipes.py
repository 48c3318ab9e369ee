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

This module imports no torch, so listing recipes stays instant.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from fnmatch import fnmatchcase
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

from ..errors import RecipeFileError, UnknownRecipeError, UsageError
from ..names import PATTERNS, PLACEMENTS, attribute_name_problem
from ..settings import LIBRARY, RECIPE_KEYS, SESettings, SettingsError, compose
from .files import read_regular

# "pointwise": the anchor is (or starts with) a 1x1 convolution, e.g. a projection; "depthwise" / "no-depthwise": the
# block has (has not) a depthwise convolution, so one class can take SE at different places by its structure.
REQUIREMENTS = ("pointwise", "depthwise", "no-depthwise")
_NAME_RE = re.compile(r"^[a-z][a-z0-9-]*$")
_CLASS_PATH_RE = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)+$")
_CHILD_PATH_RE = re.compile(r"^(\.|-?\w+(\.-?\w+)*)$")
_CLASS_GLOB_RE = re.compile(r"^[\w.*?\[\]!]+$")
_PATH_GLOB_RE = re.compile(r"^[\w.*?\[\]!-]+$")


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
        chosen = {(c, _scope(r)) for r in self.blocks if r.placement == placement for c in r.classes}

        def covered(rule: BlockRule) -> bool:  # the other placement has a rule (or, for the paper, a pattern) here
            return any((c, _scope(rule)) in chosen or (placement == "paper" and any(
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


def _expect(path: str, where: str, value: Any, kind: type | tuple[type, ...], what: str) -> Any:
    if isinstance(value, bool) and kind in (int, float, (int, float)):
        raise RecipeFileError(path, f"field {where!r}: expected {what}, got {value!r}")
    if not isinstance(value, kind):
        raise RecipeFileError(path, f"field {where!r}: expected {what}, got {type(value).__name__} {value!r}")
    return value


def _check_keys(path: str, where: str, table: dict[str, Any], allowed: set[str], required: set[str]) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        expected = ", ".join(sorted(allowed))
        raise RecipeFileError(path, f"unknown field {where}{unknown[0]!r}; expected one of {expected}")
    missing = sorted(required - set(table))
    if missing:
        raise RecipeFileError(path, f"missing field {where}{missing[0]!r}")


def _parse_defaults(path: str, table: Any, where: str = "defaults") -> SESettings:
    """A ``[defaults]``, ``[[conventions]]`` or ``[blocks.se]`` table: the settings it gives (the rest None)."""
    _expect(path, where, table, dict, "a table")
    _check_keys(path, f"{where}.", table, set(_TABLE_KEYS), set())
    try:
        return SESettings.parse(table, RECIPE_KEYS, where=f"{where}.")
    except SettingsError as e:
        raise RecipeFileError(path, f"field {e.field!r}: {e.reason.replace('{field}', e.field)}") from None


# A recipe's SE settings as its file names them (`RECIPE_KEYS`: ``reduction`` is r, ``norm`` a boolean).
_TABLE_KEYS = {**{f: f for f in ("round_limit", "bias", "convention", "layout")}, **RECIPE_KEYS}


def recipe_table(settings: SESettings) -> dict[str, Any]:
    """The settings a recipe file's table gives, in the file's names (`RECIPE_KEYS`)."""
    values = settings.to_dict()
    table = {key: values[name] for key, name in _TABLE_KEYS.items() if name in values}
    if "reduction" in table:
        table["reduction"] = settings.reduction
    if "norm" in table:
        table["norm"] = True
    return table


def _parse_rule(path: str, index: int, table: Any) -> BlockRule:
    where = f"blocks[{index}]"
    _expect(path, where, table, dict, "a table ([[blocks]])")
    _check_keys(path, f"{where}.", table,
                {"classes", "after", "before", "slot", "slot_gain", "in_child", "name", "require", "when", "within",
                 "not_within", "placement", "se", "source"}, {"classes"})
    classes = _expect(path, f"{where}.classes", table["classes"], list, "a list of full class paths")
    if not classes:
        raise RecipeFileError(path, f"field '{where}.classes': expected at least one class path")
    for c in classes:
        if not isinstance(c, str) or not _CLASS_PATH_RE.fullmatch(c):
            raise RecipeFileError(
                path, f"field '{where}.classes': expected full class paths like 'package.module.Class', got {c!r}"
            )
    places = [key for key in ("after", "before") if key in table]
    if len(places) > 1 or (not places and "slot" not in table):
        raise RecipeFileError(path, f"field '{where}': expected exactly one of 'after' or 'before'")
    position = places[0] if places else "before"
    default_anchor = table.get("slot") if isinstance(table.get("slot"), str) else "?"
    anchor = _expect(path, f"{where}.{position}", table.get(position, default_anchor), str,
                     "a child path such as 'bn3' or 'conv.-2'")
    if not _CHILD_PATH_RE.fullmatch(anchor) or (position == "before" and anchor == "."):
        raise RecipeFileError(
            path, f"field '{where}.{position}': expected a child path such as 'bn3' or 'conv.-2', got {anchor!r}"
        )
    slot = table.get("slot")
    if slot is not None and attribute_name_problem(slot):
        raise RecipeFileError(path, f"field '{where}.slot': {attribute_name_problem(slot)}")
    name = table.get("name", slot or "se")
    if attribute_name_problem(name):
        raise RecipeFileError(path, f"field '{where}.name': {attribute_name_problem(name)}")
    if slot is not None and name != slot:
        raise RecipeFileError(path, f"field '{where}.name': must equal 'slot' ({slot!r}) when a slot is filled")
    slot_gain = _expect(path, f"{where}.slot_gain", table.get("slot_gain", 1.0), (int, float), "a positive number")
    if not 0 < slot_gain <= 1e6:  # also refuses nan
        raise RecipeFileError(path, f"field '{where}.slot_gain': expected a positive number, got {slot_gain!r}")
    if slot is None and "slot_gain" in table:
        raise RecipeFileError(path, f"field '{where}.slot_gain': only a filled 'slot' has a gain")
    in_child = _expect(path, f"{where}.in_child", table.get("in_child", False), bool, "true or false")
    if in_child and (slot is not None or anchor == "."):
        raise RecipeFileError(path, f"field '{where}.in_child': expected a child to put SE in, not a slot or the block")
    require = _expect(path, f"{where}.require", table.get("require", []), list, "a list of requirement names")
    for req in require:
        if req not in REQUIREMENTS:
            raise RecipeFileError(
                path, f"field '{where}.require': expected names from {', '.join(REQUIREMENTS)}, got {req!r}"
            )
    when = _expect(path, f"{where}.when", table.get("when", {}), dict, "a table of attribute = value")
    for attr, value in when.items():
        if attribute_name_problem(attr) or not isinstance(value, (bool, int, float, str)):
            raise RecipeFileError(path, f"field '{where}.when': expected attribute = plain value, got {attr!r}")
    within = _globs(path, f"{where}.within", table.get("within", []))
    not_within = _globs(path, f"{where}.not_within", table.get("not_within", []))
    placement = _expect(path, f"{where}.placement", table.get("placement", "paper"), str,
                        f"one of {', '.join(PLACEMENTS)}")
    if placement not in PLACEMENTS:
        raise RecipeFileError(path, f"field '{where}.placement': expected one of {', '.join(PLACEMENTS)}, "
                                    f"got {placement!r}")
    se = _parse_defaults(path, table.get("se", {}), f"{where}.se")  # only the keys given override the recipe's
    source = _expect(path, f"{where}.source", table.get("source", ""), str, "a string")
    return BlockRule(tuple(classes), anchor, position, slot, name, tuple(require), tuple(sorted(when.items())),
                     within, not_within, float(slot_gain), in_child, placement, se, source)


def _globs(path: str, where: str, value: Any) -> tuple[str, ...]:
    _expect(path, where, value, list, "a list of class paths or fnmatch globs")
    for g in value:
        if not isinstance(g, str) or not _CLASS_GLOB_RE.match(g):
            raise RecipeFileError(
                path, f"field {where!r}: expected class paths or globs like 'timm.models.*', got {g!r}"
            )
    return tuple(value)


def _parse_pattern(path: str, index: int, table: Any) -> PatternRule:
    where = f"patterns[{index}]"
    _expect(path, where, table, dict, "a table ([[patterns]])")
    _check_keys(path, f"{where}.", table, {"pattern", "classes", "within", "not_within", "name", "paths"},
                {"pattern"})
    pattern = table["pattern"]
    if pattern not in PATTERNS:
        raise RecipeFileError(path, f"field '{where}.pattern': expected one of {', '.join(PATTERNS)}, got {pattern!r}")
    name = table.get("name", "se")
    if attribute_name_problem(name):
        raise RecipeFileError(path, f"field '{where}.name': {attribute_name_problem(name)}")
    classes = _globs(path, f"{where}.classes", table.get("classes", ["*"]))
    if not classes:
        raise RecipeFileError(path, f"field '{where}.classes': expected at least one class path or glob")
    within = _globs(path, f"{where}.within", table.get("within", []))
    not_within = _globs(path, f"{where}.not_within", table.get("not_within", []))
    paths = _expect(path, f"{where}.paths", table.get("paths", []), list, "a list of path globs like 'extra.0'")
    for g in paths:
        if not isinstance(g, str) or not _PATH_GLOB_RE.fullmatch(g):
            raise RecipeFileError(path, f"field '{where}.paths': expected dotted path globs like 'extra.0', got {g!r}")
    return PatternRule(pattern, classes, within, not_within, name, tuple(paths))


def _scope(rule: BlockRule) -> tuple[object, ...]:
    return rule.when, rule.require, rule.within, rule.not_within


def _scope_placed(rule: BlockRule) -> tuple[object, ...]:
    return (*_scope(rule), rule.placement)


def parse_recipe(data: dict[str, Any], source: str) -> Recipe:
    """Validate a parsed recipe table; errors name the file, the field and what was expected."""
    allowed = {"name", "description", "reference", "defaults", "blocks", "conventions", "patterns", "auto"}
    _check_keys(source, "", data, allowed, {"name"})
    name = _expect(source, "name", data["name"], str, "a recipe name")
    if not _NAME_RE.fullmatch(name):
        raise RecipeFileError(source, f"field 'name': expected lowercase letters, digits and '-', got {name!r}")
    description = _expect(source, "description", data.get("description", ""), str, "a string")
    auto = _expect(source, "auto", data.get("auto", True), bool, "true or false")
    reference = _expect(source, "reference", data.get("reference", ""), str, "a string")
    blocks = _expect(source, "blocks", data.get("blocks", []), list, "an array of tables ([[blocks]])")
    patterns = _expect(source, "patterns", data.get("patterns", []), list, "an array of tables ([[patterns]])")
    if not blocks and not patterns:
        raise RecipeFileError(source, "field 'blocks': expected at least one [[blocks]] or [[patterns]] table")
    rules = tuple(_parse_rule(source, i, table) for i, table in enumerate(blocks))
    pattern_rules = tuple(_parse_pattern(source, i, table) for i, table in enumerate(patterns))
    seen: dict[tuple[str, tuple[str, ...]], int] = {}
    for i, rule in enumerate(rules):
        for c in rule.classes:
            if c in seen and _scope_placed(rules[seen[c]]) == _scope_placed(rule):
                raise RecipeFileError(source, f"field 'blocks[{i}].classes': {c!r} is already in blocks[{seen[c]}]")
            seen[c] = i
    defaults = compose(LIBRARY, _parse_defaults(source, data.get("defaults", {})))
    conventions = []
    tables = _expect(source, "conventions", data.get("conventions", []), list, "an array of tables ([[conventions]])")
    for i, table in enumerate(tables):
        where = f"conventions[{i}]"
        _expect(source, where, table, dict, "a table ([[conventions]])")
        models = _expect(source, f"{where}.models", table.get("models"), list, "a list of full model class paths")
        if not models or not all(isinstance(m, str) and _CLASS_PATH_RE.match(m) for m in models):
            raise RecipeFileError(source, f"field '{where}.models': expected full class paths of models")
        own = _parse_defaults(source, {k: v for k, v in table.items() if k != "models"}, where)
        conventions.append(Convention(tuple(models), compose(defaults, own)))
    return Recipe(name, description, rules, defaults, reference, source, tuple(conventions), pattern_rules, auto)


MAX_RECIPE_BYTES = 1 << 20  # the shipped recipes are a few KiB each


def load_recipe_file(path: str | Path) -> Recipe:
    """Read and validate one recipe file."""
    path = Path(path)
    data = read_regular(path, lambda why: RecipeFileError(str(path), why), limit=MAX_RECIPE_BYTES)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecipeFileError(str(path), f"cannot read: {e}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise RecipeFileError(str(path), f"invalid TOML: {e}") from None
    except RecursionError:
        raise RecipeFileError(str(path), "invalid TOML: nested too deeply") from None
    return parse_recipe(data, str(path))


def _shipped_dir() -> Path:
    """The top-level ``recipes/`` folder: installed as ``se_inject/recipe_files``, or read from a source checkout."""
    package = Path(__file__).resolve().parents[1]
    installed = package / "recipe_files"
    return installed if installed.is_dir() else package.parent / "recipes"


@cache
def _shipped() -> dict[str, Recipe]:
    recipes: dict[str, Recipe] = {}
    for entry in sorted(_shipped_dir().iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".toml"):
            source = f"se_inject/recipes/{entry.name}"
            try:
                recipe = parse_recipe(tomllib.loads(entry.read_text(encoding="utf-8")), source)
            except tomllib.TOMLDecodeError as e:
                raise RecipeFileError(source, f"invalid TOML: {e}") from None
            if recipe.name in recipes:
                raise RecipeFileError(source, f"duplicate recipe name {recipe.name!r}")
            recipes[recipe.name] = recipe
    return recipes


def list_recipes() -> list[str]:
    """Names of the shipped recipes."""
    return sorted(_shipped())


def get_recipe(name: str) -> Recipe:
    try:
        return _shipped()[name]
    except KeyError:
        raise UnknownRecipeError(f"unknown recipe {name!r}; choose from {', '.join(list_recipes())}") from None


def resolve_recipes(
    names: str | list[str] | tuple[str, ...] = "auto", files: tuple[str | Path, ...] = ()
) -> list[Recipe]:
    """Recipes to apply: "auto" means every shipped recipe (but the options, ``auto = false``) plus the given files;
    names restrict to those."""
    extra = [load_recipe_file(f) for f in files]
    if isinstance(names, str):
        names = [] if names == "auto" else [names]
    names = [n for n in names if n != "auto"]
    by_name = {r.name: r for r in extra}
    if not names:
        chosen = [*extra, *(r for n, r in _shipped().items() if n not in by_name and r.auto)]
    else:
        chosen = [by_name[n] if n in by_name else get_recipe(n) for n in dict.fromkeys(names)]
    return chosen
