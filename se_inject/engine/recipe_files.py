"""Recipe files: the TOML schema of a recipe and its validation, and the recipes shipped in ``recipes/``.

Each error names the file, the field and what was expected (`RecipeFileError`). What a recipe means once read is in
`se_inject.engine.recipes`. This module imports no torch, so listing recipes stays instant.
"""

from __future__ import annotations

import re
import tomllib
from functools import cache
from pathlib import Path
from typing import Any

from ..errors import RecipeFileError, UnknownRecipeError
from ..names import PATTERNS, PLACEMENTS, attribute_name_problem
from ..settings import LIBRARY, RECIPE_KEYS, SESettings, SettingsError, compose
from .files import read_regular
from .recipes import TABLE_KEYS, BlockRule, Convention, PatternRule, Recipe, rule_scope

# "pointwise": the anchor is (or starts with) a 1x1 convolution, e.g. a projection; "depthwise" / "no-depthwise": the
# block has (has not) a depthwise convolution, so one class can take SE at different places by its structure.
REQUIREMENTS = ("pointwise", "depthwise", "no-depthwise")
_NAME_RE = re.compile(r"^[a-z][a-z0-9-]*$")
_CLASS_PATH_RE = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)+$")
_CHILD_PATH_RE = re.compile(r"^(\.|-?\w+(\.-?\w+)*)$")
_CLASS_GLOB_RE = re.compile(r"^[\w.*?\[\]!]+$")
_PATH_GLOB_RE = re.compile(r"^[\w.*?\[\]!-]+$")


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
    _check_keys(path, f"{where}.", table, set(TABLE_KEYS), set())
    try:
        return SESettings.parse(table, RECIPE_KEYS, where=f"{where}.")
    except SettingsError as e:
        raise RecipeFileError(path, f"field {e.field!r}: {e.reason.replace('{field}', e.field)}") from None


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

def _scope_placed(rule: BlockRule) -> tuple[object, ...]:
    return (*rule_scope(rule), rule.placement)



def parse_recipe(data: dict[str, Any], source: str) -> Recipe:
    """Validate a parsed recipe table; errors name the file, the field and what was expected."""
    allowed = {"name", "description", "reference", "defaults", "blocks", "conventions", "patterns", "auto"}
    _check_keys(source, "", data, allowed, {"name"})
    name = _expect(source, "name", data["name"], str, "a recipe name")
    if not _NAME_RE.fullmatch(name):
        raise RecipeFileError(source, f"field 'name': expected lowercase letters, digits and '-', got {name!r}")
    description = _expect(source, "description", data.get("description", ""), str, "a string")
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
    auto = _expect(source, "auto", data.get("auto", True), bool, "true or false")
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
