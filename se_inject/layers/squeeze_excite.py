"""Squeeze-and-Excitation channel attention (Hu et al., "Squeeze-and-Excitation Networks", Sec. 3).

Parameter names follow timm's ``SEModule`` (``fc1``, ``fc2`` as 1x1 convolutions), so a timm ResNet with this
module in its ``se`` slot has exactly the state_dict of timm's ``seresnet*``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

GATE_LAYERS: dict[str, type[nn.Module]] = {"sigmoid": nn.Sigmoid, "hard-sigmoid": nn.Hardsigmoid}


def fc(s: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A 1x1 convolution's parameters applied to (N, C) descriptors as a linear layer: a single GEMM instead of a
    convolution dispatch (on the CPU, PyTorch sends 1x1-spatial convolutions down a slow path)."""
    return F.linear(s, weight.flatten(1), bias)


class ChannelGate(nn.Module):
    """Channel attention that squeezes by the spatial mean and scales each channel by a gate (SE, ESE, ECA):
    ``x * gain * excite(mean_hw(x))``, with `excite` mapping (N, C) descriptors to (N, C) gates."""

    def _init_gate(self, gate: str, gain: float) -> None:
        """The gate nonlinearity and its constant gain; called by subclasses after their own layers."""
        self.gate = GATE_LAYERS[gate]()
        self.gain = float(gain)

    def squeeze(self, x: torch.Tensor) -> torch.Tensor:
        """Global average pooling of each channel, eq. 2: (N, C, H, W) -> (N, C)."""
        return x.mean((2, 3))

    def excite(self, s: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.excite(self.squeeze(x))
        if self.gain != 1.0:
            s = s * self.gain
        return x * s[:, :, None, None]  # scale, eq. 4

    def extra_repr(self) -> str:
        return f"gain={self.gain:g}" if self.gain != 1.0 else ""


class SqueezeExcite(ChannelGate):
    """SE block: ``x * gain * gate(fc2(relu(fc1(mean_hw(x)))))``.

    Args:
        channels: C, channels of the feature map.
        rd_channels: C / r, width of the bottleneck (``fc1`` output); ``W1`` in eq. 3 of the paper is ``fc1``.
        bias: Whether both FC layers have a bias.
        gate: The gating nonlinearity, sigma in eq. 3 ("sigmoid" in the paper).
        gain: Constant multiplier of the gate. 1 in the paper; 2 with identity initialisation, where the gate
            starts at exactly 0.5 and the block at exactly the identity (as NFNets' ``attn_gain``).
    """

    def __init__(
        self,
        channels: int,
        rd_channels: int,
        *,
        bias: bool = True,
        gate: str = "sigmoid",
        gain: float = 1.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.fc1 = nn.Conv2d(channels, rd_channels, kernel_size=1, bias=bias, **dd)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(rd_channels, channels, kernel_size=1, bias=bias, **dd)
        self._init_gate(gate, gain)

    def excite(self, s: torch.Tensor) -> torch.Tensor:
        s = self.act(fc(s, self.fc1.weight, self.fc1.bias))  # excitation, eq. 3: delta(W1 z) ...
        return self.gate(fc(s, self.fc2.weight, self.fc2.bias))  # ... then sigma(W2 .)

    def init_identity(self) -> None:
        """Zero fc2, so the gate is gate(0) = 0.5 for every input; with gain = 2 the block then computes exactly x."""
        nn.init.zeros_(self.fc2.weight)
        if self.fc2.bias is not None:
            nn.init.zeros_(self.fc2.bias)


class EffectiveSqueezeExcite(ChannelGate):
    """Effective SE (Lee & Park, CenterMask): ``x * gain * gate(fc(mean_hw(x)))`` with one C -> C layer.

    Parameter names follow timm's ``EffectiveSEModule`` (``fc``).
    """

    def __init__(
        self,
        channels: int,
        *,
        bias: bool = True,
        gate: str = "hard-sigmoid",
        gain: float = 1.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.fc = nn.Conv2d(channels, channels, kernel_size=1, bias=bias, device=device, dtype=dtype)
        self._init_gate(gate, gain)

    def excite(self, s: torch.Tensor) -> torch.Tensor:
        return self.gate(fc(s, self.fc.weight, self.fc.bias))

    def init_identity(self) -> None:
        """Zero fc: the gate is gate(0) = 0.5 for every input, and gain 2 makes the module compute exactly x."""
        nn.init.zeros_(self.fc.weight)
        if self.fc.bias is not None:
            nn.init.zeros_(self.fc.bias)
