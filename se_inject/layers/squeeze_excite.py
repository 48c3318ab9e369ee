"""Squeeze-and-Excitation channel attention (Hu et al., "Squeeze-and-Excitation Networks", Sec. 3).

Parameter names follow timm's ``SEModule`` (``fc1``, ``fc2`` as 1x1 convolutions), so a timm ResNet with this
module in its ``se`` slot has exactly the state_dict of timm's ``seresnet*``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

GATE_LAYERS: dict[str, type[nn.Module]] = {"sigmoid": nn.Sigmoid, "hard-sigmoid": nn.Hardsigmoid}


def squeeze_dims(x: torch.Tensor) -> list[int]:
    """Every dimension after the channels: (H, W) of an (N, C, H, W) map, (T, H, W) of a video block's, (L) of a 1-D
    one. The squeeze pools them all (3-D SE for video, as X3D)."""
    return list(range(2, x.dim()))


def unsqueeze_as(s: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(N, C) gates shaped to broadcast over `x`: (N, C, 1, 1) for an (N, C, H, W) map, (N, C, 1, 1, 1) for video."""
    while s.dim() < x.dim():
        s = s.unsqueeze(-1)
    return s


def fc(s: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A 1x1 convolution's parameters applied to (N, C) descriptors as a linear layer: a single GEMM instead of a
    convolution dispatch (on the CPU, PyTorch sends 1x1-spatial convolutions down a slow path)."""
    return F.linear(s, weight.flatten(1), bias)


def scale(x: torch.Tensor, s: torch.Tensor, inplace: bool, residual: torch.Tensor | None = None) -> torch.Tensor:
    """``x * s``, or ``residual + x * s`` in one pass when the block's residual addition was fused into the
    attention module. Written into `x` when allowed and autograd is off (saves allocating a feature map in eager
    mode; under torch.compile the out-of-place form fuses better, so it is kept there). A single channels_last map
    is the exception: SE-ResNet-50 measured slower in place there (its SE overhead 1.18x timm's in place, 1.03x out
    of place: medians of 10 and 7 runs; from batch 2 on in place wins), so it is not written in place."""
    inplace = inplace and not torch.is_grad_enabled() and not (torch.compiler.is_compiling() or torch.jit.is_tracing())
    if inplace and x.shape[0] == 1 and not x.is_contiguous():
        inplace = False
    if residual is None:
        return x.mul_(s) if inplace else x * s
    if inplace and residual.shape == x.shape:
        return torch.addcmul(residual, x, s, out=x)
    return torch.addcmul(residual, x, s)


def squeeze_through(
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    bn_weight: torch.Tensor | None,
    bn_bias: torch.Tensor | None,
    eps: float,
    bn_training: bool,
) -> torch.Tensor | None:
    """The squeeze of ``bn(conv1x1(h))`` computed from `h`, or None where the direct squeeze is to be used.

    A 1x1 convolution (stride 1) and an eval-mode BatchNorm are per-pixel affine maps, so they commute with the
    spatial mean: ``mean_hw(bn(conv(h))) == bn(conv(mean_hw(h)))`` up to float rounding. In a bottleneck `h` is
    a quarter of the width of the SE input, and under torch.compile its mean fuses into the kernel that writes
    `h`, so the SE no longer reads its whole input map once more. Used only there, only for an eval-mode BN with
    running statistics, and only where the map is large next to the matrix the descriptor then goes through
    (``N*H*W*(C - C_h) > 2*C*C_h``); in eager mode the direct mean is as fast and this returns None.
    """
    if bn_training or running_mean is None or running_var is None or not torch.compiler.is_compiling() or h.dim() != 4:
        return None
    n, c_h, height, width = h.shape
    if not isinstance(n, int):  # a symbolic batch (dynamic export): the size test below would constrain it
        return None
    c = weight.shape[0]
    if n * height * width * (c - c_h) <= 2 * c * c_h:
        return None
    s = F.linear(h.mean((2, 3)), weight.flatten(1), bias)
    return F.batch_norm(s, running_mean, running_var, bn_weight, bn_bias, False, 0.0, eps)


class ChannelGate(nn.Module):
    """Channel attention that squeezes by the spatial mean and scales each channel by a gate (SE, ESE, ECA):
    ``x * gain * excite(mean_hw(x))``, with `excite` mapping (N, C) descriptors to (N, C) gates. Maps of any rank
    (N, C, ...) are squeezed over every dimension after the channels: (T, H, W) for video, (L) for 1-D signals.

    ``scale_inplace`` is set by se-inject's surgery where the block's graph shows that nothing else reads the
    input: then, with autograd off, the input is scaled in place. The surgery may also fuse the block around the
    module (``fusable``): the residual addition that follows it is passed as `residual` and done in the same pass
    as the scaling, and `squeezed` may carry the squeeze computed upstream (see `squeeze_through`).
    """

    fusable = True

    def _init_gate(self, gate: str, gain: float) -> None:
        """The gate nonlinearity and its constant gain; called by subclasses after their own layers."""
        self.gate = GATE_LAYERS[gate]()
        self.gain = float(gain)
        self.scale_inplace = False

    def excite(self, s: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None, squeezed: torch.Tensor | None = None
    ) -> torch.Tensor:
        s = self.excite(x.mean(squeeze_dims(x)) if squeezed is None else squeezed)  # squeeze: global avg pool, eq. 2
        if self.gain != 1.0:
            s = s * self.gain
        return scale(x, unsqueeze_as(s, x), self.scale_inplace, residual)  # scale, eq. 4

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
