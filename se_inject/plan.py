"""The plan: a frozen, JSON-serialisable record of every SE insertion, replayable on a fresh model."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from .layers.attention import AttentionSpec
from .models import ModelSpec
from .recipes import PATTERNS

PLAN_FORMAT = "se-inject.plan/1"


@dataclass(frozen=True)
class Site:
    """One insertion.

    Attributes:
        path: Dotted path of the block (``model.get_submodule(path)``).
        recipe: Name of the recipe that matched.
        block: Full class path of the block, checked again on replay.
        anchor: Child path inside the block the SE is placed against; "" is the block's own output.
        position: "after" (SE takes the anchor's output) or "before" (SE takes the anchor's input).
        slot: Attribute the block's forward already calls at that place, filled instead of rewriting the forward.
        name: Attribute name of the new module in the block.
        attention: The module to build.
        fixed_args: The block's non-tensor forward arguments as its parent passes them (``shortcut=None``, flags),
            by parameter name: tracing specialises on them. Empty for blocks called with tensors only.
        pattern: The structural pattern that matched the block ("residual", "conv-chain", ...; see
            `se_inject.patterns`), or "" when a class rule named it.
    """

    path: str
    recipe: str
    block: str
    anchor: str
    position: str
    slot: str | None
    name: str
    attention: AttentionSpec
    fixed_args: dict[str, Any] = field(default_factory=dict, hash=False)
    pattern: str = ""

    @property
    def channels(self) -> int:
        return self.attention.channels

    @property
    def squeeze_channels(self) -> int:
        return self.attention.rd_channels

    @property
    def module_path(self) -> str:
        """Dotted path of the inserted module."""
        return f"{self.path}.{self.name}" if self.path else self.name

    def to_dict(self) -> dict[str, Any]:
        data = {
            "path": self.path,
            "recipe": self.recipe,
            "block": self.block,
            "anchor": self.anchor,
            "position": self.position,
            "slot": self.slot,
            "name": self.name,
            "attention": self.attention.to_dict(),
        }
        if self.pattern:  # a structural match (class-rule sites read as before)
            data["pattern"] = self.pattern
        if self.fixed_args:  # absent for most blocks: their plans read as before
            data["fixed_args"] = dict(self.fixed_args)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Site:
        fixed = data.get("fixed_args", {})
        if not isinstance(fixed, dict) or not all(
            isinstance(k, str) and (v is None or isinstance(v, (bool, int, float, str))) for k, v in fixed.items()
        ):
            raise ValueError(f"site {data.get('path')!r}: fixed_args must map names to plain values")
        if data.get("pattern", "") not in ("", *PATTERNS):
            raise ValueError(f"site {data.get('path')!r}: unknown pattern {data.get('pattern')!r}")
        return cls(**{**data, "attention": AttentionSpec.from_dict(data["attention"]), "fixed_args": dict(fixed)})


@dataclass(frozen=True)
class Plan:
    """What to insert where, and how to rebuild the base model.

    Attributes:
        model: The base model's spec, or None for a model object the caller built (then ``load`` needs it).
        sites: Every insertion, in module order.
        input_size: (C, H, W) used for planning and counting; (C, T, H, W) for video, (C, L) for 1-D models.
        init: "paper" or "identity".
        seed: Seed of the SE initialisation (and of the base model's random weights when built from a name).
        settings: The options the plan was made with, for the record.
    """

    model: ModelSpec | None
    sites: tuple[Site, ...]
    input_size: tuple[int, int, int]
    init: str = "paper"
    seed: int = 0
    settings: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    format: str = PLAN_FORMAT

    @property
    def recipes(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(s.recipe for s in self.sites))

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "model": self.model.to_dict() if self.model else None,
            "input_size": list(self.input_size),
            "init": self.init,
            "seed": self.seed,
            "settings": dict(self.settings),
            "sites": [s.to_dict() for s in self.sites],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        if data.get("format") != PLAN_FORMAT:
            raise ValueError(f"unsupported plan format {data.get('format')!r} (expected {PLAN_FORMAT!r})")
        return cls(
            model=ModelSpec.from_dict(data["model"]) if data.get("model") else None,
            sites=tuple(Site.from_dict(s) for s in data["sites"]),
            input_size=tuple(int(v) for v in data["input_size"]),  # type: ignore[arg-type]
            init=str(data["init"]),
            seed=int(data["seed"]),
            settings=dict(data.get("settings", {})),
        )

    @classmethod
    def from_json(cls, text: str) -> Plan:
        return cls.from_dict(json.loads(text))


@dataclass(frozen=True)
class Settings:
    """User choices that override a recipe's defaults (None keeps the recipe's value)."""

    attention: str = "se"
    reduction: int | None = None
    divisor: int | None = None
    bias: bool | None = None
    gate: str | None = None
    init: str = "paper"
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    min_channels: int = 0
    fill: bool = False  # add SE to the blocks without it in a model where other matching blocks have attention

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in vars(self).items()}
