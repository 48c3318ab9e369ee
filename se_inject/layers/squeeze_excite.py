"""Squeeze-and-Excitation channel attention (Hu et al., "Squeeze-and-Excitation Networks", Sec. 3).

Parameter names follow timm's ``SEModule`` (``fc1``, ``fc2`` as 1x1 convolutions), so a timm ResNet with this
module in its ``se`` slot has exactly the state_dict of timm's ``seresnet*``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

GATE_LAYERS: dict[str, type[nn.Module]] = {"sigmoid": nn.Sigmoid, "hard-sigmoid": nn.Hardsigmoid}
# The activation between the two FC layers (delta in eq. 3 of the paper: ReLU). Families put their blocks' own
# activation there (timm's ``act_layer`` of the containing block: SiLU in EfficientNet, LeakyReLU in DarkNet).
ACT_LAYERS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "relu6": nn.ReLU6,
    "silu": nn.SiLU,
    "leaky-relu": nn.LeakyReLU,  # timm's "leaky_relu": torch's default slope 0.01
    "hard-swish": nn.Hardswish,
    "gelu": nn.GELU,
    "mish": nn.Mish,
}


def create_act(name: str) -> nn.Module:
    """The activation module for a name of `ACT_LAYERS` (in place where the module allows it)."""
    cls = ACT_LAYERS[name]
    return cls(inplace=True) if cls in (nn.ReLU, nn.ReLU6, nn.SiLU, nn.LeakyReLU, nn.Hardswish, nn.Mish) else cls()


def fc(s: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A 1x1 convolution's parameters applied to (N, C) descriptors as a linear layer: a single GEMM instead of a
    convolution dispatch (on the CPU, PyTorch sends 1x1-spatial convolutions down a slow path)."""
    return F.linear(s, weight.flatten(1), bias)


@torch.fx.wrap
def spatial_mean(x: torch.Tensor) -> torch.Tensor:
    """The squeeze, eq. 2: the mean over every dimension after the channels, (H, W) of an (N, C, H, W) map, (T, H, W)
    of a video block's, (L) of a 1-D one (3-D SE for video, as X3D). One call in a torch.fx graph: the rank is not
    known while tracing."""
    return x.mean(list(range(2, x.dim())))


@torch.fx.wrap
def unsqueeze_as(s: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(N, C) gates shaped to broadcast over `x`: (N, C, 1, 1) for an (N, C, H, W) map, (N, C, 1, 1, 1) for video."""
    while s.dim() < x.dim():
        s = s.unsqueeze(-1)
    return s


class ChannelGate(nn.Module):
    """Channel attention that squeezes by the spatial mean and scales each channel by a gate (SE, ESE, ECA):
    ``x * gain * excite(mean(x))``, with `excite` mapping (N, C) descriptors to (N, C) gates. Maps of any rank
    (N, C, ...) are squeezed over every dimension after the channels."""

    def _init_gate(self, gate: str, gain: float) -> None:
        """The gate nonlinearity and its constant gain; called by subclasses after their own layers."""
        self.gate = GATE_LAYERS[gate]()
        self.gain = float(gain)

    def squeeze(self, x: torch.Tensor) -> torch.Tensor:
        """Global average pooling of each channel, eq. 2: (N, C, ...) -> (N, C)."""
        return spatial_mean(x)

    def excite(self, s: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.excite(self.squeeze(x))
        if self.gain != 1.0:
            s = s * self.gain
        return x * unsqueeze_as(s, x)  # scale, eq. 4

    def extra_repr(self) -> str:
        return f"gain={self.gain:g}" if self.gain != 1.0 else ""


class SqueezeExcite(ChannelGate):
    """SE block: ``x * gain * gate(fc2(act(fc1(mean_hw(x)))))``.

    Args:
        channels: C, channels of the feature map.
        rd_channels: C / r, width of the bottleneck (``fc1`` output); ``W1`` in eq. 3 of the paper is ``fc1``.
        bias: Whether both FC layers have a bias.
        gate: The gating nonlinearity, sigma in eq. 3 ("sigmoid" in the paper).
        gain: Constant multiplier of the gate. 1 in the paper; 2 with identity initialisation, where the gate
            starts at exactly 0.5 and the block at exactly the identity (as NFNets' ``attn_gain``).
        act: The activation between the FC layers, delta in eq. 3 (a name of `ACT_LAYERS`; "relu" in the paper).
        norm: A BatchNorm on the bottleneck, before the activation (ReXNet's SE; timm ``SEModule(norm_layer=...)``).
    """

    def __init__(
        self,
        channels: int,
        rd_channels: int,
        *,
        bias: bool = True,
        gate: str = "sigmoid",
        gain: float = 1.0,
        act: str = "relu",
        norm: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.fc1 = nn.Conv2d(channels, rd_channels, kernel_size=1, bias=bias, **dd)
        self.bn = nn.BatchNorm2d(rd_channels, **dd) if norm else nn.Identity()
        self.norm = norm
        self.act = create_act(act)
        self.fc2 = nn.Conv2d(rd_channels, channels, kernel_size=1, bias=bias, **dd)
        self._init_gate(gate, gain)

    def excite(self, s: torch.Tensor) -> torch.Tensor:
        s = fc(s, self.fc1.weight, self.fc1.bias)
        if self.norm:  # BatchNorm2d over (N, rd, 1, 1), as the family's own module runs it
            s = self.bn(s[:, :, None, None]).flatten(1)
        s = self.act(s)  # excitation, eq. 3: delta(W1 z) ...
        return self.gate(fc(s, self.fc2.weight, self.fc2.bias))  # ... then sigma(W2 .)

    def init_identity(self) -> None:
        """Zero fc2, so the gate is gate(0) = 0.5 for every input; with gain = 2 the block then computes exactly x."""
        nn.init.zeros_(self.fc2.weight)
        if self.fc2.bias is not None:
            nn.init.zeros_(self.fc2.bias)


class SqueezeExciteConv(SqueezeExcite):
    """The same SE block with timm's EfficientNet/MobileNetV3 names (``conv_reduce``, ``act1``, ``conv_expand``), so
    an EfficientNet-family model with it has exactly the state_dict of the family's own SE models."""

    def __init__(
        self,
        channels: int,
        rd_channels: int,
        *,
        bias: bool = True,
        gate: str = "sigmoid",
        gain: float = 1.0,
        act: str = "relu",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        ChannelGate.__init__(self)
        dd = {"device": device, "dtype": dtype}
        self.conv_reduce = nn.Conv2d(channels, rd_channels, kernel_size=1, bias=bias, **dd)
        self.act1 = create_act(act)
        self.conv_expand = nn.Conv2d(rd_channels, channels, kernel_size=1, bias=bias, **dd)
        self._init_gate(gate, gain)

    def excite(self, s: torch.Tensor) -> torch.Tensor:
        s = self.act1(fc(s, self.conv_reduce.weight, self.conv_reduce.bias))
        return self.gate(fc(s, self.conv_expand.weight, self.conv_expand.bias))

    def init_identity(self) -> None:
        """Zero conv_expand: the gate is 0.5 for every input, and gain 2 makes the module compute exactly x."""
        nn.init.zeros_(self.conv_expand.weight)
        if self.conv_expand.bias is not None:
            nn.init.zeros_(self.conv_expand.bias)


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
