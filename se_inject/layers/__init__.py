"""The attention layers se-inject inserts: SE (Hu et al.), effective SE, ECA, CBAM, and the spec/registry that builds
them (as timm keeps its own in ``timm.layers``)."""

from .attention import AttentionSpec, attention_classes, create_attention, list_attention
from .cbam import ConvBlockAttention
from .eca import EfficientChannelAttention
from .squeeze_excite import EffectiveSqueezeExcite, SqueezeExcite

__all__ = [
    "AttentionSpec",
    "ConvBlockAttention",
    "EffectiveSqueezeExcite",
    "EfficientChannelAttention",
    "SqueezeExcite",
    "attention_classes",
    "create_attention",
    "list_attention",
]
