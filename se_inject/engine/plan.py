"""The plan: a frozen, JSON-serialisable record of every SE insertion, replayable on a fresh model."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from ..settings import SESettings, Settings
from .resolve import ModelSpec

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
        attention: The module to build: the site's resolved settings (`se_inject.layers.attention.site_attention`).
        fixed_args: The block's non-tensor forward arguments as its parent passes them (``shortcut=None``, flags),
            by parameter name: tracing specialises on them. Empty for blocks called with tensors only.
        pattern: The structural pattern that matched the block ("residual", "conv-chain", ...; see
            `se_inject.patterns`), or "" when a class rule named it.
        placement: Whose SE design the site follows: "family" (the family's own: its timm SE twin or its paper)
            or "paper" (the SE paper's place). Plans from before this field followed the paper.
        source: Where that design comes from, as the recipe names it ("timm regnety_*", ...); "" where not recorded.
    """

    path: str
    recipe: str
    block: str
    anchor: str
    position: str
    slot: str | None
    name: str
    attention: SESettings
    fixed_args: dict[str, Any] = field(default_factory=dict, hash=False)
    pattern: str = ""
    placement: str = "paper"
    source: str = ""

    @property
    def channels(self) -> int:
        assert self.attention.channels is not None
        return self.attention.channels

    @property
    def squeeze_channels(self) -> int:
        assert self.attention.rd_channels is not None
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
            "attention": attention_to_dict(self.attention),
        }
        if self.pattern:  # a structural match (class-rule sites read as before)
            data["pattern"] = self.pattern
        if self.fixed_args:  # absent for most blocks: their plans read as before
            data["fixed_args"] = dict(self.fixed_args)
        if self.placement != "paper":
            data["placement"] = self.placement
        if self.source:
            data["source"] = self.source
        return data


@dataclass(frozen=True)
class Skip:
    """A block a recipe matched but that gets no SE, and why."""

    path: str
    block: str
    recipe: str
    reason: str
    already_attention: bool = False


@dataclass(frozen=True)
class Plan:
    """What to insert where, and how to rebuild the base model.

    Attributes:
        model: The base model's spec, or None for a model object the caller built (then ``load`` needs it).
        sites: Every insertion, in module order.
        input_size: (C, H, W) used for planning and counting; (C, T, H, W) for video, (C, L) for 1-D models.
        init: "paper" or "identity".
        seed: Seed of the SE initialisation (and of the base model's random weights when built from a name).
        settings: The user's options the plan was made with, for the record.
    """

    model: ModelSpec | None
    sites: tuple[Site, ...]
    input_size: tuple[int, int, int]
    init: str = "paper"
    seed: int = 0
    settings: Settings = field(default_factory=Settings, compare=False, hash=False)
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
            "settings": self.settings.to_dict(),
            "sites": [s.to_dict() for s in self.sites],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))


def attention_to_dict(spec: SESettings) -> dict[str, Any]:
    """A site's settings as the plan stores them (`PLAN_SITE_KEYS` names; the optional keys only where they differ
    from the SE paper's, so plans read as they did before those keys)."""
    data: dict[str, Any] = {"kind": spec.attn_layer, "channels": spec.channels, "rd_channels": spec.rd_channels,
                            "kernel_size": spec.kernel_size, "bias": spec.bias, "gate": spec.gate_layer,
                            "gain": spec.gain}
    for key, value, default in (("host_gain", spec.host_gain, 1.0), ("act", spec.act_layer, "relu"),
                                ("layout", spec.layout, "fc"), ("norm", spec.norm_layer is not None, False),
                                ("channels_last", bool(spec.channels_last), False),
                                ("prefix_tokens", spec.prefix_tokens or 0, 0)):
        if value != default:
            data[key] = value
    return data
