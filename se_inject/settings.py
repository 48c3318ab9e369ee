"""An SE site's settings: one frozen record in timm's vocabulary, validated in one place, composed by one rule.

`SESettings` holds what timm's ``SEModule`` takes (``rd_ratio``, ``rd_divisor``, ``rd_channels``, ``act_layer``,
``gate_layer``, ``norm_layer``, ``bias``) and what else a site needs (the variant, how the squeeze width rounds, the
gain). Every source of settings produces this one record, with None for what it leaves to others:

- the library's defaults (`LIBRARY`: the SE paper's, timm ``SEModule``'s);
- a recipe file's ``[defaults]``, its ``[[conventions]]`` and a block rule's ``[blocks.se]``;
- a fill's inferred design (the model's own SE modules' widths);
- an attention variant's own (`VARIANTS`: ESE's hard-sigmoid gate, CBAM's C // r);
- the user's options (`Settings`, from the CLI or the Python API);
- the saved plan (each site's resolved record).

The record checks itself when it is made (`SESettings.__post_init__`), so a value that exists is valid; files and
command lines come in through `SESettings.parse`, which turns their keys and strings into typed fields at the edge (as
torchvision's ``Weights.verify``). `compose` is the one rule by which the sources combine. Torch-free: the CLI checks
its options with it before importing torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from .errors import UsageError
from .names import (
    GATES,
    INITS,
    LAYOUTS,
    MAX_CHANNELS,
    MAX_DIVISOR,
    PLACEMENTS,
    ROUNDINGS,
    SE_ACTIVATIONS,
    SQUEEZE_FROM,
    VARIANTS,
)

# Activation and gate classes (torch's, timm's) by class name, as the record names them.
LAYER_NAMES = {"ReLU": "relu", "ReLU6": "relu6", "SiLU": "silu", "Swish": "silu", "LeakyReLU": "leaky-relu",
               "Hardswish": "hard-swish", "HardSwish": "hard-swish", "GELU": "gelu", "Mish": "mish",
               "Sigmoid": "sigmoid", "Hardsigmoid": "hard-sigmoid", "HardSigmoid": "hard-sigmoid"}
NORM_LAYERS = ("batchnorm",)  # a norm between SE's layers (ReXNet's SE: timm ``SEModule(norm_layer=BatchNorm2d)``)
KERNELLED = ("eca", "cbam", "cbam-timm")  # variants with a kernel size (ECA's 1-D conv, CBAM's spatial conv)


class SettingsError(UsageError):
    """A setting with a wrong type, range or name. `field` names it as the caller did (``divisor``, ``rd_divisor``,
    ``sites[0].attention.gate``); `reason` is the message without the field."""

    def __init__(self, field: str, reason: str):
        self.field = field
        self.reason = reason
        super().__init__(reason.replace("{field}", field) if "{field}" in reason else f"invalid {field}: {reason}")


def _int(value: Any, lo: int, hi: int) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        return f"expected an integer in [{lo}, {hi}], got {str(value)[:40]}"
    return None


def _number(value: Any, lo: float, hi: float, *, open_low: bool = True) -> str | None:
    """A number in the range; integers are compared as integers (10**400 has no float)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            isinstance(value, float) and not math.isfinite(value)) or not (
            (lo < value if open_low else lo <= value) and value <= hi):
        return f"expected a finite number in {'(' if open_low else '['}{lo:g}, {hi:g}], got {str(value)[:40]}"
    return None


def _choice(value: Any, choices: tuple[str, ...]) -> str | None:
    if not isinstance(value, str) or value not in choices:
        return f"unknown {{field}} {str(value)[:80]!r}; choose from {', '.join(choices)}"
    return None


def _ratio(value: Any) -> str | None:
    problem = _number(value, 0, 1)
    if problem is None and abs(1 / value - round(1 / value)) > 1e-9 * (1 / value):
        problem = f"expected 1 / r for an integer reduction r (0.25, 1 / 16), got {value!r}"
    return problem


_CHECKS = {  # field -> its check (None: valid); each field is checked here and nowhere else
    "attn_layer": lambda v: _choice(v, tuple(VARIANTS)),
    "channels": lambda v: _int(v, 1, MAX_CHANNELS),
    "rd_ratio": _ratio,
    "rd_channels": lambda v: _int(v, 0, MAX_CHANNELS),
    "rd_divisor": lambda v: _int(v, 1, MAX_DIVISOR),
    "round_limit": lambda v: _number(v, 0, 1, open_low=False),
    "rd_round": lambda v: _choice(v, ROUNDINGS),
    "rd_from": lambda v: _choice(v, SQUEEZE_FROM),
    "bias": lambda v: None if isinstance(v, bool) else f"expected true or false, got {v!r}",
    "act_layer": lambda v: _choice(v, SE_ACTIVATIONS),
    "gate_layer": lambda v: _choice(v, GATES),
    "norm_layer": lambda v: _choice(v, NORM_LAYERS),
    "layout": lambda v: _choice(v, LAYOUTS),
    "kernel_size": lambda v: _int(v, 0, 255),
    "gain": lambda v: _number(v, 0, 1e6),
    "host_gain": lambda v: _number(v, 0, 1e6),
    "convention": lambda v: None if isinstance(v, str) else f"expected a string, got {type(v).__name__}",
    "channels_last": lambda v: None if isinstance(v, bool) else f"expected true or false, got {v!r}",
    "prefix_tokens": lambda v: _int(v, 0, MAX_CHANNELS),
}


@dataclass(frozen=True)
class SESettings:
    """An SE site's settings; None leaves a field to the sources below it (see `compose`).

    Attributes:
        attn_layer: The attention variant (`se_inject.names.VARIANTS`: "se", "eca", "cbam", "cbam-timm", "ese").
        channels: C, channels of the feature map the module scales (a site's own).
        rd_ratio: The squeeze width's ratio to C, 1 / r in the SE paper (1 / 16).
        rd_channels: The squeeze width (C / r rounded); 0 for variants without one. Set: used as it is.
        rd_divisor: The squeeze width rounds to a multiple of this (timm ``make_divisible``; 1: C // r).
        round_limit: timm ``make_divisible``'s round_limit: round up when rounding down loses more than 1 - it.
        rd_round: How C * rd_ratio rounds (`se_inject.names.ROUNDINGS`): "divisible" (to `rd_divisor`), "round"
            (timm EfficientNet), "floor" (torchvision), "half-up" (timm CbamModule).
        rd_from: The width rd_ratio scales: "output" (the map SE scales) or "input" (the block's input, as timm's
            EfficientNet and RegNetY size their SE).
        bias: Bias in the FC layers.
        act_layer: The activation between the FC layers, delta in eq. 3 of the SE paper ("relu"; "block": the
            block's own activation, resolved when planning); a class (``nn.SiLU``) becomes its name.
        gate_layer: The gate, sigma in eq. 3 ("sigmoid", "hard-sigmoid"; or the class).
        norm_layer: A norm between the FC layers ("batchnorm": ReXNet's SE), or None.
        layout: The names of SE's layers (`se_inject.names.LAYOUTS`): "fc" (``fc1``/``fc2``, timm ``SEModule``) or
            "conv" (``conv_reduce``/``conv_expand``, timm EfficientNet).
        kernel_size: ECA's 1-D kernel, CBAM's spatial kernel; 0 where the variant has none (a site's own).
        gain: The constant the gate is multiplied by at the site (2 under identity initialisation).
        host_gain: The constant the host block multiplies the module's output by (NFNet's ``attn_gain``).
        convention: What these settings reproduce, for the record ("timm EfficientNet").
        channels_last: The site's features are channels-last, a transformer's tokens: (B, N, C) sequences or
            (B, H, W, C), (B, T, H, W, C) maps (`se_inject.layers.tokens`); None or false for NCHW maps.
        prefix_tokens: Leading tokens of a sequence left out of the squeeze (class, distillation, register tokens);
            channels-last sites only.
    """

    attn_layer: str | None = None
    channels: int | None = None
    rd_ratio: float | None = None
    rd_channels: int | None = None
    rd_divisor: int | None = None
    round_limit: float | None = None
    rd_round: str | None = None
    rd_from: str | None = None
    bias: bool | None = None
    act_layer: str | None = None
    gate_layer: str | None = None
    norm_layer: str | None = None
    layout: str | None = None
    kernel_size: int | None = None
    gain: float | None = None
    host_gain: float | None = None
    convention: str | None = None
    channels_last: bool | None = None
    prefix_tokens: int | None = None

    def __post_init__(self) -> None:
        for name in ("act_layer", "gate_layer"):  # a layer class becomes its name: the record stays JSON
            value = getattr(self, name)
            if isinstance(value, type) and value.__name__ in LAYER_NAMES:
                object.__setattr__(self, name, LAYER_NAMES[value.__name__])
        for f in fields(SESettings):
            value = getattr(self, f.name)
            problem = None if value is None else _CHECKS[f.name](value)
            if problem:
                raise SettingsError(f.name, problem)
        if self.channels is not None:
            self._check_site()

    def _check_site(self) -> None:
        """A site's record (one with `channels`): its fields agree with each other and with its variant."""
        kind, channels = self.attn_layer or "se", self.channels or 0
        uses_reduction = VARIANTS[kind].uses_reduction
        # A squeeze wider than its site exists only where a divisor rounded a narrow site up (at most MAX_DIVISOR).
        widths = (1, max(channels, MAX_DIVISOR)) if uses_reduction else (0, 0)
        problem = None if self.rd_channels is None else _int(self.rd_channels, *widths)
        if problem:
            raise SettingsError("rd_channels", problem)
        if self.kernel_size is not None and kind in KERNELLED and self.kernel_size % 2 == 0:
            raise SettingsError("kernel_size", f"expected an odd kernel size, got {self.kernel_size}")
        if self.kernel_size is not None and kind not in KERNELLED and self.kernel_size != 0:
            raise SettingsError("kernel_size", f"expected 0: {kind!r} has no kernel, got {self.kernel_size}")
        if self.prefix_tokens and not self.channels_last:
            raise SettingsError("prefix_tokens", "prefix tokens exist on channels-last (token) features only")
        if self.norm_layer is not None and (self.layout or "fc") != "fc":
            raise SettingsError("norm_layer", "a norm layer takes the 'fc' layout")
        if kind != "se" and (self.act_layer or "relu", self.layout or "fc", self.norm_layer) != ("relu", "fc", None):
            raise SettingsError("act_layer", f"only 'se' takes an activation, layout and norm, not {kind!r}")

    @property
    def reduction(self) -> int | None:
        """The SE paper's r, 1 / `rd_ratio` (an integer: `rd_ratio` is checked to be 1 / r)."""
        return None if self.rd_ratio is None else round(1 / self.rd_ratio)

    @property
    def module_gain(self) -> float:
        """The gain of the module itself: the site's `gain` less what the host block multiplies by."""
        return (1.0 if self.gain is None else self.gain) / (1.0 if self.host_gain is None else self.host_gain)

    def to_dict(self) -> dict[str, Any]:
        """The fields this record sets (not None), by name: what it overrides when composed."""
        return {f.name: getattr(self, f.name) for f in fields(SESettings) if getattr(self, f.name) is not None}

    @classmethod
    def parse(cls, data: Mapping[str, Any], names: Mapping[str, str] | None = None, where: str = "",
              **extra: Any) -> Any:
        """The record from a file's or a command line's keys: `names` maps each key to its field (keys not in it
        are field names), ``reduction`` (r) becomes ``rd_ratio`` (1 / r), a boolean ``norm`` becomes
        ``norm_layer``; `extra` are fields given as they are. Errors name the key as given, under `where`."""
        names = names or {}
        values: dict[str, Any] = dict(extra)
        for key, value in data.items():
            name = names.get(key, key)
            field = f"{where}{key}"
            if value is None:
                continue
            if name == "rd_ratio" and key != "rd_ratio":  # an integer r, as the SE paper and the CLI say it
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise SettingsError(field, f"expected an integer >= 1, got {str(value)[:40]}")
                value = 1 / value
            elif name == "norm_layer" and isinstance(value, bool):
                value = "batchnorm" if value else None
            if name not in {f.name for f in fields(cls)}:
                raise SettingsError(field, "unknown setting")
            values[name] = value
        try:
            return cls(**values)
        except SettingsError as e:
            key = next((k for k, n in names.items() if n == e.field and k in data), e.field)
            raise SettingsError(f"{where}{key}", e.reason) from None


@dataclass(frozen=True)
class Settings(SESettings):
    """What a user chooses: SE settings over the recipes' (None keeps the recipe's), which sites, and the init.

    Attributes:
        attn_layer: The attention variant ("se" unless chosen; see `SESettings`).
        init: "paper" (PyTorch's default init) or "identity" (the model computes exactly what it did before).
        include, exclude: fnmatch globs over site paths: only sites matching one of `include` (when given), none
            matching one of `exclude`.
        min_channels: Skip sites with fewer channels.
        fill: Add SE to the blocks without it in a model where other matching blocks have channel attention.
        placement: "family" (a family's own SE design where it has one) or "paper" (the SE paper's place).
    """

    attn_layer: str | None = "se"  # the user's variant: SE unless chosen
    init: str = "paper"
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    min_channels: int = 0
    fill: bool = False
    placement: str = "family"

    def __post_init__(self) -> None:
        for name in ("include", "exclude"):  # lists become tuples at the edge
            value = getattr(self, name)
            if isinstance(value, str) or not all(isinstance(g, str) for g in value):
                raise SettingsError(name, f"expected a list of globs, got {str(value)[:40]}")
            object.__setattr__(self, name, tuple(value))
        super().__post_init__()
        own = [n for n in SITE_FIELDS if getattr(self, n) is not None]
        if own:
            raise SettingsError(own[0], "a site's own (its channels, kernel, gain): not a user setting")
        for name, problem in (("init", _choice(self.init, INITS)), ("min_channels", _int(self.min_channels, 0,
                              MAX_CHANNELS)), ("placement", _choice(self.placement, PLACEMENTS)),
                              ("fill", None if isinstance(self.fill, bool) else f"expected true or false, got "
                                                                               f"{self.fill!r}")):
            if problem:
                raise SettingsError(name, problem)

    def to_dict(self) -> dict[str, Any]:
        """The settings as the saved plan records them (`PLAN_SETTINGS_KEYS` reads plans from before)."""
        return {f.name: list(v) if isinstance(v, tuple) else v for f in fields(self)
                if (v := getattr(self, f.name)) is not None and f.name not in SITE_FIELDS}


SITE_FIELDS = ("channels", "kernel_size", "gain", "host_gain", "convention", "channels_last", "prefix_tokens")

# How files and the command line name the settings (the record's field where it differs).
RECIPE_KEYS = {"reduction": "rd_ratio", "divisor": "rd_divisor", "gate": "gate_layer", "act": "act_layer",
               "norm": "norm_layer", "rounding": "rd_round", "squeeze_from": "rd_from"}
PLAN_SITE_KEYS = {"kind": "attn_layer", "gate": "gate_layer", "act": "act_layer", "norm": "norm_layer"}
# The saved plan's "settings" before they were this record, and the CLI's options.
OPTION_KEYS = {"attention": "attn_layer", "reduction": "rd_ratio", "divisor": "rd_divisor", "gate": "gate_layer",
               "min-channels": "min_channels"}

# The library's own: the SE paper's, as timm's SEModule builds it.
LIBRARY = SESettings(attn_layer="se", rd_ratio=1 / 16, rd_divisor=8, round_limit=0.0, rd_round="divisible",
                     rd_from="output", bias=True, act_layer="relu", gate_layer="sigmoid", layout="fc", convention="")

# Each variant's own settings (timm's and the papers'), over the recipe's: ESE gates with a hard-sigmoid; CBAM's
# authors' code takes C // r (divisor 1), timm's CbamModule rounds C / r half up and has no MLP bias.
VARIANT_SETTINGS = {
    "cbam": SESettings(rd_divisor=1),
    "cbam-timm": SESettings(rd_round="half-up", bias=False),
    "ese": SESettings(gate_layer="hard-sigmoid"),
}


def compose(*layers: SESettings | None) -> SESettings:
    """The settings the `layers` give together: each field from the last layer that sets it (None sets nothing).
    Returns a plain `SESettings` (a `Settings`' own fields are not SE settings)."""
    values: dict[str, Any] = {}
    for layer in layers:
        if layer is not None:
            values.update(layer.to_dict())
    return SESettings(**{k: v for k, v in values.items() if k in _SE_NAMES})


_SE_NAMES = frozenset(f.name for f in fields(SESettings))


def site_settings(family: SESettings, user: SESettings) -> SESettings:
    """The one rule for an SE site's settings. Each field comes from the last of these that sets it:

    1. `LIBRARY`: the SE paper's (r 16, sigmoid, ReLU), as timm's ``SEModule`` builds it;
    2. `family`: the recipe's defaults, its convention for this model, the block rule's ``[blocks.se]`` and a
       fill's inferred design, composed in that order (`compose`);
    3. the variant's own (`VARIANT_SETTINGS`); its rounding (``rd_divisor``, ``rd_round``) only where the layers
       below round to a divisor, as a family that rounds its own way (timm EfficientNet's ``round``) keeps it;
    4. the user's (`Settings`); a user's ``rd_divisor`` rounds to that divisor.
    """
    below = compose(LIBRARY, family)
    variant = VARIANT_SETTINGS.get(compose(below, user).attn_layer or "se", SESettings())
    if below.rd_round != "divisible":
        variant = replace(variant, rd_divisor=None, rd_round=None)
    chosen = compose(below, variant, user)
    return replace(chosen, rd_round="divisible") if user.rd_divisor is not None else chosen
