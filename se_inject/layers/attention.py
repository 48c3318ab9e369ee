"""Attention variants behind one registry: a frozen spec in, a module out.

The spec is what the plan stores for every site, so ``se_inject.load`` rebuilds the same modules.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from timm.layers import make_divisible
from torch import nn

from ..errors import UsageError
from ..names import INITS, VARIANTS
from .cbam import ConvBlockAttention
from .eca import EfficientChannelAttention, eca_kernel_size
from .squeeze_excite import GATE_LAYERS, EffectiveSqueezeExcite, SqueezeExcite, SqueezeExciteConv
from .tokens import TOKEN_LAYERS

# Module structures of an SE layer (names.LAYOUTS), named as the families whose state_dict they reproduce.
LAYOUTS: dict[str, type[SqueezeExcite]] = {
    "fc": SqueezeExcite,  # fc1/fc2: timm SEModule (ResNet, RegNetY, ByobNet, CSPNet, ...)
    "conv": SqueezeExciteConv,  # conv_reduce/conv_expand: timm EfficientNet/MobileNetV3 SqueezeExcite
}


@dataclass(frozen=True)
class AttentionSpec:
    """Everything needed to build one attention module.

    Attributes:
        kind: Registered variant name ("se", ...).
        channels: C, channels of the feature map it scales.
        rd_channels: Squeeze (bottleneck) width, C / r rounded to the divisor; 0 where the variant has none.
        kernel_size: ECA's 1-D kernel, CBAM's spatial kernel; 0 where the variant has none.
        bias: Bias in the FC layers.
        gate: Gating nonlinearity name.
        gain: Constant gate multiplier at the site (2 under identity initialisation).
        host_gain: Constant the host block itself multiplies the module's output by (NFNet's ``attn_gain``, an
            attention slot's own gain); the module's gain is ``gain / host_gain``, so the site scales by ``gain``.
        act: The activation between SE's FC layers (the paper's ReLU, or the family's block activation).
        layout: The names of SE's layers (`LAYOUTS`): "fc" (timm ``SEModule``) or "conv" (timm EfficientNet).
        norm: A BatchNorm between SE's layers (ReXNet's SE); "fc" layout only.
        channels_last: The features are channels-last, as a transformer's tokens (B, N, C) or maps (B, H, W, C),
            (B, T, H, W, C) (`se_inject.layers.tokens`); false for NCHW maps.
        prefix_tokens: Leading tokens of a sequence left out of the squeeze (class, distillation, register tokens).
    """

    kind: str
    channels: int
    rd_channels: int = 0
    kernel_size: int = 0
    bias: bool = True
    gate: str = "sigmoid"
    gain: float = 1.0
    host_gain: float = 1.0
    act: str = "relu"
    layout: str = "fc"
    norm: bool = False
    channels_last: bool = False
    prefix_tokens: int = 0

    @property
    def module_gain(self) -> float:
        """The gain of the module itself: the site's `gain` less what the host block multiplies by."""
        return self.gain / self.host_gain

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key, default in (("host_gain", 1.0), ("act", "relu"), ("layout", "fc"), ("norm", False),
                             ("channels_last", False), ("prefix_tokens", 0)):
            if data[key] == default:  # plans with the paper's settings read as they did before these fields
                del data[key]
        return data


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


def _layer(cls: type[nn.Module], spec: AttentionSpec, dd: dict[str, Any]) -> tuple[type[nn.Module], dict[str, Any]]:
    """The layer class for the spec's features (its channels-last form for tokens) and its keyword arguments."""
    if not spec.channels_last:
        return cls, dd
    token = TOKEN_LAYERS[cls]
    return token, {**dd, "prefix_tokens": spec.prefix_tokens} if cls is not ConvBlockAttention else dd


@register_attention("se", SqueezeExcite)
def _build_se(spec: AttentionSpec, **dd: Any) -> nn.Module:
    cls, kw = _layer(LAYOUTS[spec.layout], spec, dd)
    return cls(spec.channels, spec.rd_channels, bias=spec.bias, gate=spec.gate, gain=spec.module_gain, act=spec.act,
               **({"norm": True} if spec.norm else {}), **kw)


@register_attention("eca", EfficientChannelAttention)
def _build_eca(spec: AttentionSpec, **dd: Any) -> nn.Module:
    cls, kw = _layer(EfficientChannelAttention, spec, dd)
    return cls(spec.channels, spec.kernel_size, gate=spec.gate, gain=spec.module_gain, **kw)


@register_attention("cbam", ConvBlockAttention)
def _build_cbam(spec: AttentionSpec, **dd: Any) -> nn.Module:
    cls, kw = _layer(ConvBlockAttention, spec, dd)
    return cls(spec.channels, spec.rd_channels, kernel_size=spec.kernel_size, bias=spec.bias, gate=spec.gate,
               gain=spec.module_gain, **kw)


@register_attention("cbam-timm", ConvBlockAttention)
def _build_cbam_timm(spec: AttentionSpec, **dd: Any) -> nn.Module:
    return _build_cbam(spec, **dd)  # the same module: the variant differs in its width and bias (`attention_spec`)


@register_attention("ese", EffectiveSqueezeExcite)
def _build_ese(spec: AttentionSpec, **dd: Any) -> nn.Module:
    cls, kw = _layer(EffectiveSqueezeExcite, spec, dd)
    return cls(spec.channels, bias=spec.bias, gate=spec.gate, gain=spec.module_gain, **kw)


def list_attention() -> list[str]:
    return list(_BUILDERS)


def attention_spec(
    kind: str, channels: int, *, reduction: int, divisor: int, round_limit: float, bias: bool, gate: str | None,
    recipe_gate: str, init: str, squeeze_base: int | None = None, rounding: str = "divisible", host_gain: float = 1.0,
    act: str = "relu", layout: str = "fc", norm: bool = False, channels_last: bool = False, prefix_tokens: int = 0,
) -> AttentionSpec:
    """The module for one site. The gate is the user's, else the variant's own (ESE: hard-sigmoid), else the
    recipe's. The squeeze width divides `squeeze_base` (default: `channels`) by r, rounded as `rounding` says.

    `host_gain` is the constant the block multiplies the module's output by (an attention slot with a gain, as
    NFNet's ``attn_gain * attn_last(x)``): "paper" init keeps the family's scaling (the module's own gain is 1, so
    the block computes exactly what the family's own SE models compute), "identity" divides the gate's identity gain
    by it (NFNet: 2 / 2, a plain module whose gate starts at 0.5).

    `act` and `layout` (the activation inside SE, the names of its layers) apply to the "se" variant only."""
    variant = VARIANTS[kind]
    gate = gate or variant.gate or recipe_gate
    return AttentionSpec(
        kind=kind,
        channels=channels,
        rd_channels=squeeze_channels(squeeze_base or channels, reduction, divisor, round_limit, rounding)
        if variant.uses_reduction else 0,
        kernel_size={"eca": eca_kernel_size(channels), "cbam": 7, "cbam-timm": 7}.get(kind, 0),
        bias=bias,
        gate=gate,
        gain=identity_gain(gate) if init == "identity" else host_gain,
        host_gain=host_gain,
        act=act if kind == "se" else "relu",
        layout=layout if kind == "se" else "fc",
        norm=norm and kind == "se" and layout == "fc",
        channels_last=channels_last,
        prefix_tokens=prefix_tokens if channels_last else 0,
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

    return 1.0 / float(GATE_LAYERS[gate]()(torch.zeros(())))


def create_attention(
    spec: AttentionSpec, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> nn.Module:
    try:
        builder = _BUILDERS[spec.kind]
    except KeyError:
        raise UsageError(f"unknown attention {spec.kind!r}; choose from {', '.join(list_attention())}") from None
    return builder(spec, device=device, dtype=dtype)


def init_attention(module: nn.Module, init: str) -> None:
    """Initialise a freshly built module: "paper" keeps PyTorch's default init; "identity" makes it compute x."""
    if init == "identity":
        module.init_identity()
    elif init != "paper":
        raise UsageError(f"unknown init {init!r}; choose from {', '.join(INITS)}")


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
