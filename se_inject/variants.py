"""The attention variants se-inject can insert, described without importing torch (for fast listings)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Variant:
    """What a variant is and its own defaults; `gate` None means the recipe's gate (sigmoid)."""

    name: str
    description: str
    reference: str
    gate: str | None = None
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
                "Woo et al., CBAM: Convolutional Block Attention Module",
                params="2*C*rd + rd + C (with bias) + 98 + 2", any_rank=False),
        Variant("ese", "effective SE: global average pool -> one FC C->C -> hard-sigmoid -> scale",
                "Lee & Park, CenterMask (VoVNetV2)", gate="hard-sigmoid", uses_reduction=False,
                params="C*C + C (with bias)"),
    )
}


def list_variants() -> list[str]:
    return list(VARIANTS)
