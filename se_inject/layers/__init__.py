"""The attention layers se-inject inserts: SE (Hu et al.), effective SE, ECA, CBAM, and the registry that builds
them from a site's settings (as timm keeps its own in ``timm.layers``)."""

from .attention import attention_classes, create_attention, list_attention
from .cbam import ConvBlockAttention
from .eca import EfficientChannelAttention
from .squeeze_excite import EffectiveSqueezeExcite, SqueezeExcite

__all__ = [
    "ConvBlockAttention",
    "EffectiveSqueezeExcite",
    "EfficientChannelAttention",
    "SqueezeExcite",
    "attention_classes",
    "create_attention",
    "list_attention",
]
