"""Channel attention on token features: the same SE, ESE, ECA and CBAM layers for channels-last inputs.

Transformer and MLP blocks carry their features channels-last: sequences (B, N, C) (ViT, DeiT, EVA, Mixer, MViT) and
maps (B, H, W, C) or (B, T, H, W, C) (Swin, Swin3D, MaxViT's attention). SE needs only channels and the positions they
are spread over (Hu et al., Sec. 3), so the layer is unchanged but for its axes: the squeeze averages each channel over
every axis between the batch and the channels, and the scale multiplies along the last axis. Parameters and their
names are the NCHW layer's (``fc1``/``fc2`` as 1x1 convolutions, timm's ``SEModule``).

Prefix tokens. A ViT sequence starts with tokens that are not positions: a class token, DeiT's distillation token,
register tokens (`num_prefix_tokens` of timm's models; 1 in torchvision's ViT and MViT). The squeeze averages the
patch tokens only, ``x[:, prefix_tokens:]``, and the gate scales every token, prefix tokens included:

- SE's squeeze is a statistic of the positions (eq. 2, the mean over H x W); the class token is the block's own
  summary and register tokens hold the high-norm values Darcet et al. ("Vision Transformers Need Registers") found,
  neither a position;
- timm's own average pooling of these models (``global_pool='avg'``) takes the same tokens, ``x[:, prefix:]``;
- every token, the class token included, then has its channels recalibrated alike, as SE scales every position.

The count is recorded per site in the plan (`SESettings.prefix_tokens`), so ``se_inject.load`` rebuilds it exactly.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .cbam import ConvBlockAttention
from .eca import EfficientChannelAttention
from .squeeze_excite import EffectiveSqueezeExcite, SqueezeExcite


@torch.fx.wrap
def token_mean(x: torch.Tensor, prefix_tokens: int) -> torch.Tensor:
    """The squeeze of channels-last features: (B, ..., C) -> (B, C), the mean over every axis between the batch and
    the channels; on a sequence (B, N, C), over the tokens after the first `prefix_tokens`."""
    if prefix_tokens > 0 and x.dim() == 3:
        x = x[:, prefix_tokens:]
    return x.mean(list(range(1, x.dim() - 1)))


@torch.fx.wrap
def unsqueeze_tokens(s: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B, C) gates shaped to broadcast over channels-last `x`: (B, 1, C) for a sequence, (B, 1, 1, C) for a map."""
    return s.view([s.shape[0]] + [1] * (x.dim() - 2) + [-1])


class Excitation:
    """Mixin: a channel gate's excitation on squeezed (B, C) descriptors, its 1x1 convolutions' weights applied as
    linear layers, times its gain. Shared by the channels-last layers and the fusion pass's fused NCHW gates."""

    def excite(self, s: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "fc1"):  # SqueezeExcite, layout "fc" (its norm, where it has one, on (B, rd, 1, 1))
            s = F.linear(s, self.fc1.weight.flatten(1), self.fc1.bias)
            s = self.act(self.bn(s[:, :, None, None]).flatten(1))
            s = F.linear(s, self.fc2.weight.flatten(1), self.fc2.bias)
        elif hasattr(self, "conv_reduce"):  # SqueezeExcite, layout "conv"
            s = self.act1(F.linear(s, self.conv_reduce.weight.flatten(1), self.conv_reduce.bias))
            s = F.linear(s, self.conv_expand.weight.flatten(1), self.conv_expand.bias)
        elif hasattr(self, "conv"):  # EfficientChannelAttention: the channels as a 1-D signal
            s = self.conv(s.unsqueeze(1)).squeeze(1)
        else:  # EffectiveSqueezeExcite
            s = F.linear(s, self.fc.weight.flatten(1), self.fc.bias)
        s = self.gate(s)
        if self.gain != 1.0:
            s = s * self.gain
        return s


class TokenGate(Excitation):
    """Mixin giving a channel gate (SE, ESE, ECA: their own layers and `gain`) its channels-last form: the gate of
    each channel from the token mean, broadcast along the last axis. The subclass sets ``prefix_tokens``."""

    def token_gate(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C) gates, times the gain: the layer's excitation on the token mean (a 1x1 convolution's weights
        applied as a linear layer, as the fused NCHW gate does)."""
        return self.excite(token_mean(x, self.prefix_tokens))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * unsqueeze_tokens(self.token_gate(x), x)

    def extra_repr(self) -> str:
        text = super().extra_repr()  # type: ignore[misc]
        prefix = f"prefix_tokens={self.prefix_tokens}" if self.prefix_tokens else ""
        return ", ".join(t for t in ("channels_last", prefix, text) if t)


class TokenSqueezeExcite(TokenGate, SqueezeExcite):
    """SE on channels-last features (`SqueezeExcite`'s layers and names, either layout): ``x * gain *
    gate(fc2(act(fc1(s))))``, ``s`` the mean over the positions (a sequence's patch tokens: the first
    `prefix_tokens` are left out of it)."""

    def __init__(self, channels: int, *args: Any, prefix_tokens: int = 0, **kwargs: Any):
        super().__init__(channels, *args, **kwargs)
        self.prefix_tokens = int(prefix_tokens)


class TokenEffectiveSqueezeExcite(TokenGate, EffectiveSqueezeExcite):
    """Effective SE on channels-last features."""

    def __init__(self, channels: int, *, prefix_tokens: int = 0, **kwargs: Any):
        super().__init__(channels, **kwargs)
        self.prefix_tokens = int(prefix_tokens)


class TokenEfficientChannelAttention(TokenGate, EfficientChannelAttention):
    """ECA on channels-last features: the 1-D convolution runs across the channels of the token mean."""

    def __init__(self, channels: int, kernel_size: int, *, prefix_tokens: int = 0, **kwargs: Any):
        super().__init__(channels, kernel_size, **kwargs)
        self.prefix_tokens = int(prefix_tokens)


class TokenConvBlockAttention(ConvBlockAttention):
    """CBAM on a channels-last map (B, H, W, C): its spatial attention needs 2-D positions, so it runs on the map
    seen as NCHW (a view, no copy) and returns the map channels-last. Sequences are refused at planning."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)

    def extra_repr(self) -> str:
        return "channels_last"


TOKEN_LAYERS: dict[type[nn.Module], type[nn.Module]] = {
    SqueezeExcite: TokenSqueezeExcite,
    EffectiveSqueezeExcite: TokenEffectiveSqueezeExcite,
    EfficientChannelAttention: TokenEfficientChannelAttention,
    ConvBlockAttention: TokenConvBlockAttention,
}
