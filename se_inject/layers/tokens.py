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

import torch
from torch import nn

from .cbam import ConvBlockAttention
from .eca import EfficientChannelAttention
from .squeeze_excite import EffectiveSqueezeExcite, SqueezeExcite, SqueezeExciteConv


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
    while s.dim() < x.dim():
        s = s.unsqueeze(1)
    return s


class TokenGate:
    """Mixin turning a channel gate (`ChannelGate`: ``excite`` and ``gain``) into its channels-last form; the
    subclass sets ``prefix_tokens`` (an int: TorchScript reads it as a constant attribute of the module)."""

    def squeeze(self, x: torch.Tensor) -> torch.Tensor:
        return token_mean(x, self.prefix_tokens)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.excite(self.squeeze(x))
        if self.gain != 1.0:
            s = s * self.gain
        return x * unsqueeze_tokens(s, x)

    def extra_repr(self) -> str:
        text = super().extra_repr()  # type: ignore[misc]
        prefix = f"prefix_tokens={self.prefix_tokens}" if self.prefix_tokens else ""
        return ", ".join(t for t in ("channels_last", prefix, text) if t)


class TokenSqueezeExcite(TokenGate, SqueezeExcite):
    """SE on channels-last features (`SqueezeExcite`'s layers and names): ``x * gain * gate(fc2(act(fc1(s))))``,
    ``s`` the mean over the positions (the patch tokens of a sequence: `prefix_tokens` are left out of it)."""

    def __init__(self, channels: int, rd_channels: int, *, prefix_tokens: int = 0, **kwargs: object):
        super().__init__(channels, rd_channels, **kwargs)  # type: ignore[arg-type]
        self.prefix_tokens = int(prefix_tokens)


class TokenSqueezeExciteConv(TokenGate, SqueezeExciteConv):
    """`TokenSqueezeExcite` with timm's EfficientNet names (``conv_reduce``, ``act1``, ``conv_expand``)."""

    def __init__(self, channels: int, rd_channels: int, *, prefix_tokens: int = 0, **kwargs: object):
        super().__init__(channels, rd_channels, **kwargs)  # type: ignore[arg-type]
        self.prefix_tokens = int(prefix_tokens)


class TokenEffectiveSqueezeExcite(TokenGate, EffectiveSqueezeExcite):
    """Effective SE on channels-last features."""

    def __init__(self, channels: int, *, prefix_tokens: int = 0, **kwargs: object):
        super().__init__(channels, **kwargs)  # type: ignore[arg-type]
        self.prefix_tokens = int(prefix_tokens)


class TokenEfficientChannelAttention(TokenGate, EfficientChannelAttention):
    """ECA on channels-last features: the 1-D convolution runs across the channels of the token mean."""

    def __init__(self, channels: int, kernel_size: int, *, prefix_tokens: int = 0, **kwargs: object):
        super().__init__(channels, kernel_size, **kwargs)  # type: ignore[arg-type]
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
    SqueezeExciteConv: TokenSqueezeExciteConv,
    EffectiveSqueezeExcite: TokenEffectiveSqueezeExcite,
    EfficientChannelAttention: TokenEfficientChannelAttention,
    ConvBlockAttention: TokenConvBlockAttention,
}
