"""Efficient Channel Attention (Wang et al., "ECA-Net", CVPR 2020).

Parameter names follow timm's ``EcaModule`` (``conv``), so a timm ResNet with this module in its ``se`` slot has
exactly the state_dict of timm's ``ecaresnet*``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .squeeze_excite import ChannelGate


def eca_kernel_size(channels: int, gamma: float = 2, beta: float = 1) -> int:
    """k = |(log2 C + beta) / gamma|, made odd by rounding up, at least 3 (the paper's psi(C), timm's rule)."""
    t = int(abs(math.log(channels, 2) + beta) / gamma)
    return max(t if t % 2 else t + 1, 3)


class EfficientChannelAttention(ChannelGate):
    """``x * gain * gate(conv1d(mean_hw(x)))``: a k-wide 1-D convolution across channels replaces SE's FC layers."""

    def __init__(
        self,
        channels: int,
        kernel_size: int,
        *,
        gate: str = "sigmoid",
        gain: float = 1.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.conv = nn.Conv1d(1, 1, kernel_size, padding=(kernel_size - 1) // 2, bias=False, device=device,
                              dtype=dtype)
        self._init_gate(gate, gain)

    def excite(self, s: torch.Tensor) -> torch.Tensor:
        return self.gate(self.conv(s.unsqueeze(1))).squeeze(1)  # channels as a 1-D signal: (N, 1, C)

    def init_identity(self) -> None:
        """Zero the convolution: the gate is 0.5 everywhere, and gain 2 makes the module compute exactly x."""
        nn.init.zeros_(self.conv.weight)
