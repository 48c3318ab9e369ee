"""Strict validation of what a file says: the plan stored in a checkpoint, and names that reach generated code.

A saved folder is data from anyone. Before anything is built from its plan, every field is checked here: its type,
its range, registry names (a site's settings are checked by `SESettings` itself), and every string that becomes
Python source (the attribute name of an inserted module) is a plain identifier. Violations raise `PlanSchemaError`,
which names the field. Recipe files are checked with the same name rule (`se_inject.names.attribute_name_problem`).

Plans from before the settings record read as they are: a site's ``attention`` keeps its keys (`PLAN_SITE_KEYS`
maps them to `SESettings`), and the plan's ``settings`` of the CLI's names (``attention``, ``reduction``,
``divisor``, ``gate``; `OPTION_KEYS`) become a `Settings`.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from ..errors import CheckpointError
from ..names import (
    MAX_SEED,
    MAX_SIDE,
    MAX_SITES,
    MAX_SITES_PER_BLOCK,
    MODEL_SOURCES,
    PATTERNS,
    PLACEMENTS,
    POSITIONS,
    attribute_name_problem,
)
from ..settings import OPTION_KEYS, PLAN_SITE_KEYS, SESettings, Settings, SettingsError
from .plan import PLAN_FORMAT, Plan, Site
from .resolve import ModelSpec

_MODULE_PATH = re.compile(r"[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*")
_CHILD_PATH = re.compile(r"[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*")
_ANCHOR = re.compile(r"%[A-Za-z_]\w*|[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*")  # a child, or a graph node (patterns)
_CLASS_PATH = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+")
_RECIPE_NAME = re.compile(r"[a-z][a-z0-9-]*")
_REGISTRY_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")  # timm/torchvision names; no "hf-hub:", "/", ".."


class PlanSchemaError(CheckpointError):
    """A plan field with a wrong type, range or value. `field` is its path, e.g. ``sites[3].name``."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"plan field {field!r}: {message}")


def _fail(field: str, message: str) -> PlanSchemaError:
    return PlanSchemaError(field, message)


def _keys(
    field: str, data: Any, required: set[str], optional: frozenset[str] | set[str] = frozenset()
) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise _fail(field or "plan", f"expected an object, got {type(data).__name__}")
    prefix = f"{field}." if field else ""
    unknown = sorted(set(data) - required - optional, key=str)
    if unknown:
        raise _fail(f"{prefix}{unknown[0]}", "unknown field")
    missing = sorted(required - set(data))
    if missing:
        raise _fail(f"{prefix}{missing[0]}", "missing")
    return data


def _int(field: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(field, f"expected an integer, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise _fail(field, f"expected an integer in [{lo}, {hi}], got {value}")
    return value


MAX_TEXT = 1000  # any string field of a plan


def _str(field: str, value: Any, pattern: re.Pattern[str] | None = None, what: str = "", empty: bool = False) -> str:
    if not isinstance(value, str):
        raise _fail(field, f"expected a string, got {type(value).__name__}")
    if empty and value == "":
        return value
    if len(value) > MAX_TEXT:
        raise _fail(field, f"expected at most {MAX_TEXT:,} characters, got {len(value):,}")
    if pattern is not None and not pattern.fullmatch(value):
        raise _fail(field, f"expected {what}, got {value[:80]!r}")
    return value


def _choice(field: str, value: Any, choices: tuple[str, ...] | list[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise _fail(field, f"expected one of {', '.join(choices)}, got {value!r}"[:300])
    return value


def _attention(field: str, data: Any) -> SESettings:
    """A site's settings: the keys the plan has always had, values checked by `SESettings` itself."""
    _keys(field, data, {"kind", "channels", "rd_channels", "kernel_size", "bias", "gate", "gain"},
          {"host_gain", "act", "layout", "norm", "channels_last", "prefix_tokens"})
    if not isinstance(data.get("norm", False), bool):
        raise _fail(f"{field}.norm", f"expected true or false, got {data['norm']!r}")
    return _settings(SESettings, field, {"host_gain": 1.0, "act": "relu", "layout": "fc", **data}, PLAN_SITE_KEYS)


def _settings(cls: Any, field: str, data: dict[str, Any], names: dict[str, str]) -> Any:
    try:
        return cls.parse(data, names, where=f"{field}." if field else "")
    except SettingsError as e:
        raise PlanSchemaError(e.field, e.reason.replace("{field}", e.field.rsplit(".", 1)[-1])) from None


def _site(field: str, data: Any) -> Any:

    _keys(field, data, {"path", "recipe", "block", "anchor", "position", "slot", "name", "attention"},
          {"fixed_args", "pattern", "placement", "source"})
    path = _str(f"{field}.path", data["path"], _MODULE_PATH, "a dotted module path", empty=True)
    recipe = _str(f"{field}.recipe", data["recipe"], _RECIPE_NAME, "a recipe name (lowercase letters, digits, '-')")
    block = _str(f"{field}.block", data["block"], _CLASS_PATH, "a full class path like 'package.module.Class'")
    anchor = _str(f"{field}.anchor", data["anchor"], _ANCHOR, "a child path or a graph node ('%name')", empty=True)
    position = _choice(f"{field}.position", data["position"], POSITIONS)
    if anchor.startswith("%") and position != "after":  # a graph node is only ever a place to take the output of
        raise _fail(f"{field}.position", f"a graph node anchor ({anchor[:40]!r}) takes only 'after'")
    slot = data["slot"]
    if slot is not None:
        problem = attribute_name_problem(slot)
        if problem:
            raise _fail(f"{field}.slot", problem)
    name = data["name"]
    problem = attribute_name_problem(name)
    if problem:
        raise _fail(f"{field}.name", problem)
    if slot is not None and name != slot:
        raise _fail(f"{field}.name", f"must equal the slot {slot!r}")
    attention = _attention(f"{field}.attention", data["attention"])
    fixed = _fixed_args(f"{field}.fixed_args", data.get("fixed_args", {}))
    pattern = _choice(f"{field}.pattern", data.get("pattern", ""), ("", *PATTERNS))
    placement = _choice(f"{field}.placement", data.get("placement", "paper"), PLACEMENTS)
    source = _str(f"{field}.source", data.get("source", ""))
    return Site(path, recipe, block, anchor, position, slot, name, attention, pattern=pattern, fixed_args=fixed,
                placement=placement, source=source)


def _fixed_args(field: str, data: Any) -> dict[str, Any]:
    """The block's non-tensor forward arguments: parameter names become names in the traced forward's source, so
    they are identifiers; values are plain literals (finite numbers, short strings, booleans, None)."""
    if not isinstance(data, dict) or len(data) > 64:
        raise _fail(field, "expected an object of at most 64 parameter names")
    for name, value in data.items():
        problem = attribute_name_problem(name)
        if problem:
            raise _fail(f"{field}.{name[:40]}", problem)
        plain = value is None or isinstance(value, (bool, str)) or (
            isinstance(value, int) and abs(value) < 2**63) or (isinstance(value, float) and math.isfinite(value))
        if not plain or (isinstance(value, str) and len(value) > 200):
            raise _fail(f"{field}.{name}", f"expected None, a boolean, a finite number or a short string, got "
                        f"{str(value)[:40]!r}")
    return dict(data)


def _model(field: str, data: Any) -> ModelSpec | None:

    if data is None:
        return None
    _keys(field, data, {"source", "name"})
    source = _choice(f"{field}.source", data["source"], MODEL_SOURCES)
    if source == "python":  # FILE.py:factory or module:factory; never imported on load without trust_code
        name = _str(f"{field}.name", data["name"])
        if not name or "\x00" in name:
            raise _fail(f"{field}.name", f"expected FILE.py:FACTORY or MODULE:FACTORY, got {name[:80]!r}")
    else:
        name = _str(f"{field}.name", data["name"], _REGISTRY_NAME,
                    f"a {source} registry name (hub, URL and local-dir names are refused: loading is offline)")
    return ModelSpec(source, name)


def plan_from_data(data: Any) -> Plan:
    """A `Plan` from parsed plan JSON, after checking every field; raises `PlanSchemaError` naming the field."""

    _keys("", data, {"format", "model", "input_size", "init", "seed", "sites"}, {"settings"})
    if data["format"] != PLAN_FORMAT:
        raise _fail("format", f"unsupported plan format {data['format']!r} (expected {PLAN_FORMAT!r})"[:300])
    model = _model("model", data["model"])
    size = data["input_size"]
    if not isinstance(size, list) or not 2 <= len(size) <= 4:
        raise _fail("input_size", "expected [channels, height, width] ([channels, frames, height, width]: video)")
    input_size = tuple(_int(f"input_size[{i}]", v, 1, MAX_SIDE) for i, v in enumerate(size))
    init = _settings(Settings, "", {"init": data["init"]}, {}).init
    seed = _int("seed", data["seed"], 0, MAX_SEED)
    if not isinstance(data.get("settings", {}), dict):
        raise _fail("settings", f"expected an object, got {type(data['settings']).__name__}")
    settings = _settings(Settings, "settings", data.get("settings", {}), OPTION_KEYS)  # old plans: their own keys
    sites_data = data["sites"]
    if not isinstance(sites_data, list) or not 1 <= len(sites_data) <= MAX_SITES:
        raise _fail("sites", f"expected a list of 1 to {MAX_SITES} sites")
    sites = tuple(_site(f"sites[{i}]", s) for i, s in enumerate(sites_data))
    per_block: dict[str, int] = {}
    for i, site in enumerate(sites):
        per_block[site.path] = per_block.get(site.path, 0) + 1
        if per_block[site.path] > MAX_SITES_PER_BLOCK:
            raise _fail(f"sites[{i}].path", f"more than {MAX_SITES_PER_BLOCK} sites on block {site.path!r}")
    seen: dict[str, int] = {}
    for i, site in enumerate(sites):
        if site.module_path in seen:
            first = seen[site.module_path]
            raise _fail(f"sites[{i}].name", f"{site.module_path!r} is already inserted by sites[{first}]")
        seen[site.module_path] = i
    return Plan(model=model, sites=sites, input_size=input_size, init=init, seed=seed,  # type: ignore[arg-type]
                settings=settings)


def plan_from_json(text: str) -> Plan:
    """A `Plan` from its JSON text (`Plan.to_json`), validated as `plan_from_data` does."""
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise PlanSchemaError("", f"invalid JSON ({type(e).__name__})") from None
    return plan_from_data(data)
