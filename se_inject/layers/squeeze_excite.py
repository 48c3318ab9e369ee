"""Squeeze-and-Excitation channel attention (Hu et al., "Squeeze-and-Excitation Networks", Sec. 3), as timm builds it.

`SqueezeExcite` is timm's ``SEModule`` with its parameter names chosen by `layout`: ``fc1``/``fc2`` (timm
``SEModule``: ResNet, RegNetY, ByobNet, ...) or ``conv_reduce``/``conv_expand`` (timm EfficientNet/MobileNetV3
``SqueezeExcite``), so a model with it in its family's SE slot has exactly the state_dict of the family's own SE
models. Layers (``act_layer``, ``gate_layer``, ``norm_layer``) are a class or a name, resolved by timm's
``create_act_layer``/``get_norm_layer``. Maps of any rank (N, C, ...) are squeezed over every dimension after the
channels (3-D SE for video, as X3D; 1-D for sequences). Speed tricks live in `se_inject.engine.fusion`.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.layers import create_act_layer, get_act_layer, get_norm_layer, make_divisible
from torch import nn

LayerType = str | type[nn.Module]

# The names of SE's layers, by layout (`se_inject.names.LAYOUTS`): (reduce, activation, expand).
LAYOUT_NAMES = {"fc": ("fc1", "act", "fc2"), "conv": ("conv_reduce", "act1", "conv_expand")}


def act_layer_class(layer: LayerType) -> type[nn.Module]:
    """The activation class for a class or a name (se-inject's "hard-sigmoid" is timm's "hard_sigmoid")."""
    cls = get_act_layer(layer.replace("-", "_") if isinstance(layer, str) else layer)
    if cls is None:
        raise ValueError(f"no activation layer {layer!r}")
    return cls


def create_act(layer: LayerType, inplace: bool = False) -> nn.Module:
    """An activation module for a class or a name, as timm's ``create_act_layer`` makes it."""
    return create_act_layer(act_layer_class(layer), inplace=inplace)


@torch.fx.wrap
def squeeze(x: torch.Tensor) -> torch.Tensor:
    """The squeeze, eq. 2: the mean of each channel over every dimension after it, as (N, C, 1, 1) (the shape timm's
    ``x.mean((2, 3), keepdim=True)`` gives a 2-D map). One call in a torch.fx graph: the rank is not known while
    tracing."""
    s = x.mean((2, 3), keepdim=True) if x.dim() == 4 else x.mean(list(range(2, x.dim())))
    return s.view(s.shape[0], s.shape[1], 1, 1)


@torch.fx.wrap
def unsqueeze_as(s: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Gates of shape (N, C), (N, 1, C) or (N, C, 1, 1) shaped to broadcast over `x`: (N, C, 1, 1) for an
    (N, C, H, W) map, (N, C, 1, 1, 1) for video, (N, C, 1) for a 1-D map."""
    return s.view([s.shape[0], -1] + [1] * (x.dim() - 2))


class ChannelGate(nn.Module):
    """Channel attention that squeezes by the spatial mean and scales each channel by a gate (SE, ESE, ECA): the
    class `se_inject.engine.fusion` recognises. `gain` is a constant multiplier of the gate (1 in the papers; 2
    under identity initialisation, where the gate starts at exactly 0.5 and the module at exactly the identity, as
    NFNets' ``attn_gain``)."""

    def extra_repr(self) -> str:
        return f"gain={self.gain:g}" if self.gain != 1.0 else ""


class SqueezeExcite(ChannelGate):
    """SE block: ``x * gate(fc2(act(bn(fc1(mean(x))))))``, times `gain`.

    Args:
        channels: C, channels of the feature map.
        rd_ratio: The bottleneck width's ratio to C, 1 / r in the paper (used when `rd_channels` is not given).
        rd_channels: The bottleneck width C / r (``fc1``'s output); ``W1`` in eq. 3 of the paper is ``fc1``.
        rd_divisor: `rd_ratio`'s width is rounded to a multiple of this (timm's ``make_divisible``).
        bias: Whether both FC layers have a bias.
        act_layer: The activation between the FC layers, delta in eq. 3 (ReLU in the paper).
        gate_layer: The gate, sigma in eq. 3 (sigmoid in the paper).
        norm_layer: A norm on the bottleneck, before the activation (ReXNet's SE; "fc" layout only).
        layout: The layers' names (`LAYOUT_NAMES`): "fc" (timm ``SEModule``) or "conv" (timm EfficientNet).
        gain: Constant multiplier of the gate.
    """

    __jit_unused_properties__ = ["expand"]  # noqa: RUF012  (TorchScript's name)

    def __init__(
        self,
        channels: int,
        rd_ratio: float = 1.0 / 16,
        rd_channels: int | None = None,
        rd_divisor: int = 8,
        *,
        bias: bool = True,
        act_layer: LayerType = "relu",
        gate_layer: LayerType = "sigmoid",
        norm_layer: LayerType | None = None,
        layout: str = "fc",
        gain: float = 1.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        dd: dict[str, Any] = {"device": device, "dtype": dtype}
        if not rd_channels:
            rd_channels = make_divisible(channels * rd_ratio, rd_divisor, round_limit=0.0)
        reduce, act, expand = LAYOUT_NAMES[layout]
        if norm_layer is not None and layout != "fc":
            raise ValueError(f"a norm layer takes the 'fc' layout, not {layout!r}")
        self.add_module(reduce, nn.Conv2d(channels, rd_channels, kernel_size=1, bias=bias, **dd))
        if layout == "fc":
            self.bn = get_norm_layer(norm_layer)(rd_channels, **dd) if norm_layer is not None else nn.Identity()
        self.add_module(act, create_act(act_layer, inplace=True))
        self.add_module(expand, nn.Conv2d(rd_channels, channels, kernel_size=1, bias=bias, **dd))
        self.gate = create_act(gate_layer)
        self.gain = float(gain)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_se = squeeze(x)
        if hasattr(self, "fc1"):  # layout "fc": timm's SEModule
            x_se = self.fc2(self.act(self.bn(self.fc1(x_se))))
        else:  # layout "conv": timm's EfficientNet SqueezeExcite
            x_se = self.conv_expand(self.act1(self.conv_reduce(x_se)))
        x_se = self.gate(x_se)
        if self.gain != 1.0:
            x_se = x_se * self.gain
        return x * unsqueeze_as(x_se, x)

    @property
    def expand(self) -> nn.Conv2d:
        """The layer that maps the bottleneck back to C channels (``fc2`` or ``conv_expand``)."""
        return self.fc2 if hasattr(self, "fc2") else self.conv_expand

    def init_identity(self) -> None:
        """Zero the expanding layer: the gate is gate(0) = 0.5 for every input; with gain 2 the module computes x."""
        nn.init.zeros_(self.expand.weight)
        if self.expand.bias is not None:
            nn.init.zeros_(self.expand.bias)


class EffectiveSqueezeExcite(ChannelGate):
    """Effective SE (Lee & Park, CenterMask): ``x * gate(fc(mean(x)))`` with one C -> C layer, times `gain`.

    Parameter names follow timm's ``EffectiveSEModule`` (``fc``).
    """

    def __init__(
        self,
        channels: int,
        *,
        bias: bool = True,
        gate_layer: LayerType = "hard-sigmoid",
        gain: float = 1.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.fc = nn.Conv2d(channels, channels, kernel_size=1, bias=bias, device=device, dtype=dtype)
        self.gate = create_act(gate_layer)
        self.gain = float(gain)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_se = self.gate(self.fc(squeeze(x)))
        if self.gain != 1.0:
            x_se = x_se * self.gain
        return x * unsqueeze_as(x_se, x)

    def init_identity(self) -> None:
        """Zero fc: the gate is gate(0) = 0.5 for every input, and gain 2 makes the module compute exactly x."""
        nn.init.zeros_(self.fc.weight)
        if self.fc.bias is not None:
            nn.init.zeros_(self.fc.bias)
