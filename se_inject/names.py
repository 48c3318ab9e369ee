"""Names and limits: every vocabulary se-inject accepts (attention variants, gates, inits, patterns, export formats,
model sources), its size limits, and the rule for names that become Python source. Torch-free, so the CLI checks
options and lists variants before importing torch; everything else imports its words from here.
"""

from __future__ import annotations

import keyword
import re
from dataclasses import asdict, dataclass
from typing import Any

GATES = ("sigmoid", "hard-sigmoid")
# The activation between SE's FC layers ("block": the block's own activation, resolved per block when planning).
ACTIVATIONS = ("relu", "relu6", "silu", "leaky-relu", "hard-swish", "gelu", "mish")
SE_ACTIVATIONS = (*ACTIVATIONS, "block")
LAYOUTS = ("fc", "conv")  # SE's layer names: fc1/fc2 (timm SEModule), conv_reduce/conv_expand (timm EfficientNet)
PLACEMENTS = ("family", "paper")  # whose SE place a rule follows: the family's own design, or the SE paper's
INITS = ("paper", "identity")
# see se_inject.engine.patterns
PATTERNS = ("residual", "concat", "inverted-residual", "conv-chain", "token-residual", "token-ffn")
POSITIONS = ("after", "before")
SQUEEZE_FROM = ("output", "input")
ROUNDINGS = ("divisible", "round", "floor", "half-up")
MODEL_SOURCES = ("timm", "torchvision", "python")
EXPORT_FORMATS = {"torchscript": ".pt", "exported": ".pt2", "onnx": ".onnx"}  # format -> file suffix

MAX_SEED = 2**64 - 1  # torch.manual_seed's range (non-negative part)
MAX_SIDE = 16384  # largest input height/width/channels se-inject accepts (4x a 4K image side)
MAX_CHANNELS = 1 << 20
MAX_SITES = 100_000
# Sites on one block: each rewrites the block's forward again, so a block's cost grows with the square of its sites.
# 64 replay in about a second; the shipped recipes put one or two on a block.
MAX_SITES_PER_BLOCK = 64
# The largest squeeze width beyond a site's own channels: a divisor rounds a narrow site's C/r up to it.
MAX_DIVISOR = 1024
MAX_NAME_LENGTH = 200
RESERVED_PREFIX = "se_inject"  # se-inject's own attributes on rewritten blocks (the wrapped forward, the base class)

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")  # ASCII only; matched with fullmatch (no "$" newline loophole)


def attribute_name_problem(name: Any) -> str | None:
    """Why `name` cannot be the attribute name of an inserted module (None when it can): a plain ASCII Python
    identifier, not a keyword, not a dunder, at most 200 characters."""
    if not isinstance(name, str):
        return f"expected a string, got {type(name).__name__}"
    if not _IDENTIFIER.fullmatch(name) or len(name) > MAX_NAME_LENGTH:
        return f"expected a plain Python identifier (ASCII letters, digits, '_'), got {name!r}"
    if keyword.iskeyword(name) or keyword.issoftkeyword(name):
        return f"{name!r} is a Python keyword"
    if name.startswith("__") and name.endswith("__"):
        return f"{name!r} is a dunder name"
    if name.startswith(RESERVED_PREFIX):
        return f"{name!r}: names starting with {RESERVED_PREFIX!r} are se-inject's own"
    return None


@dataclass(frozen=True)
class Variant:
    """What a variant is (its own settings are `se_inject.settings.VARIANT_SETTINGS`)."""

    name: str
    description: str
    reference: str
    uses_reduction: bool = True
    params: str = ""  # per site, C channels, rd squeeze width, k kernel size
    any_rank: bool = True  # defined for maps of 1, 2 or 3 spatial dimensions (video, 1-D), not only (N, C, H, W)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


VARIANTS = {
    v.name: v
    for v in (
        Variant("se", "squeeze (global average pool) -> FC C->C/r -> ReLU -> FC C/r->C -> sigmoid -> scale",
                "Hu et al., Squeeze-and-Excitation Networks", params="2*C*rd + rd + C (with bias)"),
        Variant("eca", "global average pool -> 1-D conv across channels, k = |(log2 C + 1) / 2| rounded up to odd "
                "(>= 3) -> sigmoid -> scale; no FC layers, no reduction",
                "Wang et al., ECA-Net: Efficient Channel Attention", uses_reduction=False, params="k"),
        Variant("cbam", "channel attention (avg- and max-pooled descriptors through one shared MLP with reduction r) "
                "then spatial attention (channel-wise avg/max maps -> 7x7 conv + BN -> sigmoid)",
                "Woo et al., CBAM: Convolutional Block Attention Module (the authors' code: rd = C // r, biases)",
                params="2*C*rd + rd + C (with bias) + 98 + 2", any_rank=False),
        Variant("cbam-timm", "CBAM as timm's CbamModule builds it: the same modules and names as cbam, squeeze width "
                "C / r rounded half up (at least 1) and no biases in the shared MLP",
                "Woo et al., CBAM, as timm.layers.CbamModule implements it", params="2*C*rd + 98 + 2",
                any_rank=False),
        Variant("ese", "effective SE: global average pool -> one FC C->C -> hard-sigmoid -> scale",
                "Lee & Park, CenterMask (VoVNetV2)", uses_reduction=False,
                params="C*C + C (with bias)"),
    )
}


def list_variants() -> list[str]:
    return list(VARIANTS)
