"""Convolutional Block Attention Module (Woo et al., "CBAM", ECCV 2018): channel then spatial attention.

Parameter names follow timm's ``CbamModule`` (``channel.fc1/fc2``, ``spatial.conv.conv/bn``).
"""

from __future__ import annotations

from typing import Any

import torch
from timm.layers import ConvNormAct
from torch import nn

from .squeeze_excite import LayerType, create_act


class ChannelAttention(nn.Module):
    """``x * gate(mlp(avg_hw(x)) + mlp(max_hw(x)))``, times `gain`: SE's layers, with max pooling added to the squeeze
    and one shared MLP for both descriptors (eq. 2 of the paper), as timm's ``ChannelAttn``."""

    def __init__(self, channels: int, rd_channels: int, *, bias: bool, act_layer: LayerType = "relu",
                 gate_layer: LayerType = "sigmoid", gain: float = 1.0, **dd: Any):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, rd_channels, kernel_size=1, bias=bias, **dd)
        self.act = create_act(act_layer, inplace=True)
        self.fc2 = nn.Conv2d(rd_channels, channels, kernel_size=1, bias=bias, **dd)
        self.gate = create_act(gate_layer)
        self.gain = float(gain)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_avg = self.fc2(self.act(self.fc1(x.mean((2, 3), keepdim=True))))
        x_max = self.fc2(self.act(self.fc1(x.amax((2, 3), keepdim=True))))
        s = self.gate(x_avg + x_max)
        if self.gain != 1.0:
            s = s * self.gain
        return x * s


class SpatialAttention(nn.Module):
    """``x * gain * gate(bn(conv7x7([avg_c(x), max_c(x)])))`` (eq. 3 of the paper)."""

    def __init__(self, kernel_size: int, *, gate_layer: LayerType, gain: float, **dd: Any):
        super().__init__()
        self.conv = ConvNormAct(2, 1, kernel_size, apply_act=False, **dd)
        self.gate = create_act(gate_layer)
        self.gain = float(gain)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.gate(self.conv(torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)))
        if self.gain != 1.0:
            s = s * self.gain
        return x * s


class ConvBlockAttention(nn.Module):
    """CBAM: channel attention, then spatial attention on its result."""

    def __init__(
        self,
        channels: int,
        rd_channels: int,
        *,
        kernel_size: int = 7,
        bias: bool = True,
        gate_layer: LayerType = "sigmoid",
        gain: float = 1.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.channel = ChannelAttention(channels, rd_channels, bias=bias, gate_layer=gate_layer, gain=gain, **dd)
        self.spatial = SpatialAttention(kernel_size, gate_layer=gate_layer, gain=gain, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.spatial(self.channel(x))

    def init_identity(self) -> None:
        """Zero both gates' last maps (fc2, the 7x7 conv): each gate is 0.5, and gain 2 makes the module compute x."""
        nn.init.zeros_(self.channel.fc2.weight)
        if self.channel.fc2.bias is not None:
            nn.init.zeros_(self.channel.fc2.bias)
        nn.init.zeros_(self.spatial.conv.conv.weight)
