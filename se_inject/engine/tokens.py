"""Token features: whether the map at an SE place is channels-last, and how many prefix tokens a sequence starts with.

A transformer's block carries its features as tokens, channels last: (B, N, C) sequences, (B, H, W, C) or
(B, T, H, W, C) maps. Finding measures the shape at each place; this module says which axis is the channels there
(the last one where the place is a ``Linear``'s or a token norm's output or input) and, for a sequence, how many of
its leading tokens are not positions (`se_inject.layers.tokens` says why the squeeze leaves them out).
"""

from __future__ import annotations

from torch import nn

from .patterns import token_layer

__all__ = ["channels_last", "model_prefix_tokens", "prefix_tokens"]

_LAYERS = (nn.Linear, nn.LayerNorm, nn.RMSNorm, nn.Conv1d, nn.Conv2d, nn.Conv3d,
           nn.modules.batchnorm._BatchNorm, nn.GroupNorm)
_SKIPPED = (nn.Identity, nn.Dropout)


def _width(layer: nn.Module, side: str) -> int | None:
    if isinstance(layer, nn.Linear):
        return layer.out_features if side == "after" else layer.in_features
    shape = getattr(layer, "normalized_shape", None)
    return int(shape[-1]) if shape else None


def channels_last(block: nn.Module, anchor: str, position: str, shape: tuple[int, ...] | None) -> bool:
    """Whether the features at `anchor` (a child path, "" the block; a graph node "%name" is never) are channels-last:
    the layer the place follows (``after``: the anchor's last layer) or precedes (``before``: its first) is a
    ``Linear`` or a ``LayerNorm``/``RMSNorm`` over the last axis, and that axis has its width."""
    if shape is None or not 3 <= len(shape) <= 5 or anchor.startswith("%"):
        return False
    try:
        module = block.get_submodule(anchor) if anchor not in ("", ".") else block
    except AttributeError:
        return False
    layers = [m for m in module.modules() if isinstance(m, _LAYERS)]
    while position == "after" and len(layers) > 1 and isinstance(layers[-1], nn.BatchNorm1d) \
            and isinstance(layers[-2], nn.Linear):
        layers.pop()  # LeViT's LinearNorm: a BatchNorm1d over the flattened tokens keeps the channels last
    if not layers:
        return False
    layer = layers[-1] if position == "after" else layers[0]
    return token_layer(layer) and _width(layer, position) == shape[-1]


def model_prefix_tokens(model: nn.Module) -> int:
    """How many tokens a model's sequences start with that are not positions: timm's `num_prefix_tokens`; else the
    class/distillation/register token parameters it holds (torchvision ViT's ``class_token``, MViT's
    ``pos_encoding.class_token``), each counted by its token axis."""
    count = getattr(model, "num_prefix_tokens", None)
    if isinstance(count, int) and not isinstance(count, bool):
        return max(0, count)
    total = 0
    for name, param in model.named_parameters():
        leaf = name.rpartition(".")[2]
        if leaf in ("class_token", "cls_token", "dist_token", "reg_token", "register_tokens"):
            total += param.shape[-2] if param.dim() >= 2 else 1
    return total


def _patch_count(model: nn.Module) -> int | None:
    patch_embed = getattr(model, "patch_embed", None)
    count = getattr(patch_embed, "num_patches", None)
    return count if isinstance(count, int) else None


def prefix_tokens(model: nn.Module, shape: tuple[int, ...]) -> int:
    """The prefix tokens of the sequence (B, N, C) at a place: the model's (`model_prefix_tokens`), except where the
    sequence holds the patch tokens only (N equals the patch embedding's count, CaiT's self-attention blocks) or
    no more tokens than the prefix (CaiT's class-attention blocks run their MLP on the class token alone). Maps
    have none."""
    if len(shape) != 3:
        return 0
    count = model_prefix_tokens(model)
    tokens = shape[1]
    if count <= 0 or tokens <= count or tokens == _patch_count(model):
        return 0
    return count
