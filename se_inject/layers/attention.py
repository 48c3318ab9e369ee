"""Attention variants behind one registry: a site's `SESettings` in, a module out.

The site's settings are what the plan stores for every site, so ``se_inject.load`` rebuilds the same modules.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from timm.layers import make_divisible
from torch import nn

from ..errors import UsageError
from ..names import VARIANTS
from ..settings import KERNELLED, LIBRARY, SESettings, compose
from .cbam import ConvBlockAttention
from .eca import EfficientChannelAttention, eca_kernel_size
from .squeeze_excite import EffectiveSqueezeExcite, SqueezeExcite, create_act
from .tokens import TOKEN_LAYERS

Builder = Callable[..., nn.Module]
_BUILDERS: dict[str, Builder] = {}
_CLASSES: dict[str, type[nn.Module]] = {}


def register_attention(kind: str, cls: type[nn.Module]) -> Callable[[Builder], Builder]:
    """Register a builder ``fn(spec, device=..., dtype=...) -> nn.Module`` for a variant; duplicate names raise."""

    def decorator(fn: Builder) -> Builder:
        if kind in _BUILDERS:
            raise ValueError(f"attention {kind!r} is already registered")
        _BUILDERS[kind] = fn
        _CLASSES[kind] = cls
        return fn

    return decorator


def _layer(cls: type[nn.Module], spec: SESettings, dd: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The layer class for the site's features (its channels-last form on tokens, `se_inject.layers.tokens`) and
    its keyword arguments."""
    if not spec.channels_last:
        return cls, dd
    return TOKEN_LAYERS[cls], {**dd, "prefix_tokens": spec.prefix_tokens or 0} if cls is not ConvBlockAttention else dd


@register_attention("se", SqueezeExcite)
def _build_se(spec: SESettings, **dd: Any) -> nn.Module:
    cls, dd = _layer(SqueezeExcite, spec, dd)
    return cls(spec.channels, rd_channels=spec.rd_channels, bias=spec.bias, act_layer=spec.act_layer,
                         gate_layer=spec.gate_layer, norm_layer=spec.norm_layer, layout=spec.layout,
                         gain=spec.module_gain, **dd)


@register_attention("eca", EfficientChannelAttention)
def _build_eca(spec: SESettings, **dd: Any) -> nn.Module:
    cls, dd = _layer(EfficientChannelAttention, spec, dd)
    return cls(spec.channels, spec.kernel_size, gate_layer=spec.gate_layer,
                                     gain=spec.module_gain, **dd)


@register_attention("cbam", ConvBlockAttention)
def _build_cbam(spec: SESettings, **dd: Any) -> nn.Module:
    cls, dd = _layer(ConvBlockAttention, spec, dd)
    return cls(spec.channels, spec.rd_channels, kernel_size=spec.kernel_size, bias=spec.bias,
                              gate_layer=spec.gate_layer, gain=spec.module_gain, **dd)


@register_attention("cbam-timm", ConvBlockAttention)
def _build_cbam_timm(spec: SESettings, **dd: Any) -> nn.Module:
    return _build_cbam(spec, **dd)  # the same module: the variant differs in its width and bias (`VARIANT_SETTINGS`)


@register_attention("ese", EffectiveSqueezeExcite)
def _build_ese(spec: SESettings, **dd: Any) -> nn.Module:
    cls, dd = _layer(EffectiveSqueezeExcite, spec, dd)
    return cls(spec.channels, bias=spec.bias, gate_layer=spec.gate_layer, gain=spec.module_gain,
                                  **dd)


def list_attention() -> list[str]:
    return list(_BUILDERS)


def site_attention(
    settings: SESettings, channels: int, *, input_channels: int | None = None, host_gain: float = 1.0,
    init: str = "paper", channels_last: bool = False, prefix_tokens: int = 0,
) -> SESettings:
    """The settings of the module at one site, from the site's composed settings (`se_inject.settings.site_settings`):
    its channels, its squeeze width (``rd_channels`` where set, else ``rd_ratio`` of the width ``rd_from`` names,
    rounded as ``rd_round`` says), its kernel and its gain; only what building the module takes.

    `host_gain` is the constant the block multiplies the module's output by (an attention slot with a gain, as
    NFNet's ``attn_gain * attn_last(x)``): "paper" init keeps the family's scaling (the module's own gain is 1, so
    the block computes exactly what the family's own SE models compute), "identity" divides the gate's identity gain
    by it (NFNet: 2 / 2, a plain module whose gate starts at 0.5).

    ``act_layer``, ``layout`` and ``norm_layer`` apply to the "se" variant only."""
    kind = settings.attn_layer or "se"
    assert settings.reduction is not None  # composed over `LIBRARY`
    assert settings.gate_layer is not None
    if not VARIANTS[kind].uses_reduction:
        rd_channels = 0
    elif settings.rd_channels is not None:
        rd_channels = settings.rd_channels
    else:
        base = input_channels if settings.rd_from == "input" and input_channels is not None else channels
        rd_channels = squeeze_channels(base, settings.reduction, settings.rd_divisor or 8, settings.round_limit or 0.0,
                                       settings.rd_round or "divisible")
    se = kind == "se"
    layout = (settings.layout or "fc") if se else "fc"
    return SESettings(
        attn_layer=kind,
        channels=channels,
        rd_channels=rd_channels,
        kernel_size=eca_kernel_size(channels) if kind == "eca" else 7 if kind in KERNELLED else 0,
        bias=settings.bias,
        gate_layer=settings.gate_layer,
        gain=identity_gain(settings.gate_layer) if init == "identity" else host_gain,
        host_gain=host_gain,
        act_layer=(settings.act_layer or "relu") if se else "relu",
        layout=layout,
        norm_layer=settings.norm_layer if se and layout == "fc" else None,
        channels_last=True if channels_last else None,  # token features (`se_inject.layers.tokens`)
        prefix_tokens=prefix_tokens if channels_last and prefix_tokens else None,
    )


def attention_classes() -> tuple[type[nn.Module], ...]:
    return tuple(_CLASSES.values())


def squeeze_channels(
    channels: int, reduction: int, divisor: int = 8, round_limit: float = 0.0, rounding: str = "divisible"
) -> int:
    """Squeeze width from C and r.

    - "divisible": C // r rounded to a multiple of `divisor`, never below it (timm's ``make_divisible``). With an
      even divisor this equals timm's ``make_divisible(C / r, divisor)`` (``seresnet*``; with ``round_limit`` 0.9
      MobileNetV3's ``_make_divisible(C // 4, 8)``); with divisor 1 it is the seed document's ``C // r``;
    - "round": ``round(C / r)``, timm's EfficientNet ``SqueezeExcite`` (``rd_round_fn`` defaults to ``round``);
    - "floor": ``max(1, C // r)``, torchvision's EfficientNet (``max(1, input_channels // 4)``);
    - "half-up": C / r rounded half up, at least 1: timm's ``make_divisible(C * (1 / r), 1, round_limit=0)``, as
      timm's ``CbamModule`` sizes its MLP.
    """
    if rounding == "half-up":
        return make_divisible(channels * (1.0 / reduction), 1, round_limit=0.0)
    if rounding == "round":
        return max(1, round(channels / reduction))
    if rounding == "floor":
        return max(1, channels // reduction)
    return make_divisible(channels // reduction, divisor, round_limit=round_limit)


def identity_gain(gate: str) -> float:
    """The gain that turns gate(0) into exactly 1."""

    return 1.0 / float(create_act(gate)(torch.zeros(())))


def create_attention(
    spec: SESettings, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> nn.Module:
    spec = compose(LIBRARY, spec)  # a field the caller left out: the SE paper's
    try:
        builder = _BUILDERS[spec.attn_layer or "se"]
    except KeyError:
        raise UsageError(f"unknown attention {spec.attn_layer!r}; choose from {', '.join(list_attention())}") from None
    return builder(spec, device=device, dtype=dtype)


def init_attention(module: nn.Module, init: str) -> None:
    """Initialise a freshly built module: "paper" keeps PyTorch's default init; "identity" makes it compute x (the
    init is a `Settings`' or a plan's, checked there)."""
    if init == "identity":
        module.init_identity()


# Channel-attention modules already in timm/torchvision models: a block holding one "already has SE".
KNOWN_ATTENTION = frozenset(
    {
        "timm.layers.squeeze_excite.SEModule",
        "timm.layers.squeeze_excite.EffectiveSEModule",
        "timm.layers.squeeze_excite.SqueezeExciteCl",
        "timm.layers.eca.EcaModule",
        "timm.layers.eca.CecaModule",
        "timm.layers.cbam.CbamModule",
        "timm.layers.cbam.LightCbamModule",
        "timm.layers.gather_excite.GatherExcite",
        "timm.layers.global_context.GlobalContext",
        "timm.layers.coord_attn.CoordAttn",
        "timm.layers.coord_attn.SimpleCoordAttn",
        "timm.models._efficientnet_blocks.SqueezeExcite",
        "timm.models.senet.SEModule",
        "timm.models.hgnet.EseModule",
        "torchvision.ops.misc.SqueezeExcitation",
    }
)


def class_path(module: nn.Module | type) -> str:
    """Full class path; for a block se-inject rewrote, the path of its original class."""
    cls = module if isinstance(module, type) else type(module)
    cls = getattr(cls, "__se_inject_base__", cls)
    return f"{cls.__module__}.{cls.__qualname__}"


def is_attention(module: nn.Module) -> bool:
    return isinstance(module, attention_classes()) or class_path(module) in KNOWN_ATTENTION


def find_attention(module: nn.Module) -> str | None:
    """Path (relative to `module`) of the first channel-attention module inside it, if any."""
    for name, sub in module.named_modules():
        if is_attention(sub):
            return name or "."
    return None
