"""Efficient Channel Attention (Wang et al., "ECA-Net", CVPR 2020).

Parameter names follow timm's ``EcaModule`` (``conv``), so a timm ResNet with this module in its ``se`` slot has
exactly the state_dict of timm's ``ecaresnet*``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .squeeze_excite import ChannelGate, LayerType, create_act, squeeze, unsqueeze_as


def eca_kernel_size(channels: int, gamma: float = 2, beta: float = 1) -> int:
    """k = |(log2 C + beta) / gamma|, made odd by rounding up, at least 3 (the paper's psi(C), timm's rule)."""
    t = int(abs(math.log(channels, 2) + beta) / gamma)
    return max(t if t % 2 else t + 1, 3)


class EfficientChannelAttention(ChannelGate):
    """``x * gate(conv1d(mean(x)))``, times `gain`: a k-wide 1-D convolution across channels replaces SE's FC
    layers."""

    def __init__(
        self,
        channels: int,
        kernel_size: int,
        *,
        gate_layer: LayerType = "sigmoid",
        gain: float = 1.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.conv = nn.Conv1d(1, 1, kernel_size, padding=(kernel_size - 1) // 2, bias=False, device=device,
                              dtype=dtype)
        self.gate = create_act(gate_layer)
        self.gain = float(gain)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = squeeze(x).view(x.shape[0], 1, -1)  # the channels as a 1-D signal: (N, 1, C)
        y = self.gate(self.conv(y))
        if self.gain != 1.0:
            y = y * self.gain
        return x * unsqueeze_as(y, x)

    def init_identity(self) -> None:
        """Zero the convolution: the gate is 0.5 everywhere, and gain 2 makes the module compute exactly x."""
        nn.init.zeros_(self.conv.weight)
