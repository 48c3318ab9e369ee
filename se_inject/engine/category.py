"""What kind of network a model is (transformer, MLP, hybrid, CNN), told to users of models no recipe takes."""

from __future__ import annotations

import re

from torch import nn

__all__ = ["CATEGORIES", "architecture_category"]

CATEGORIES = ("transformer", "MLP", "hybrid", "CNN")


def architecture_category(model: nn.Module) -> str:
    """What kind of network `model` is, for models no recipe takes: "transformer" or "MLP" when its only spatial
    convolutions are a stem or patch embedding (at most 4, or strided by their own kernel size, or inside a module
    named as a stem, patch embedding or positional encoding), or pool inside attention, and it does (does not) have
    attention; "hybrid" or "CNN" when it has convolutional layers beyond that (a family no recipe covers yet)."""
    spatial = []
    for path, m in model.named_modules():
        if not isinstance(m, nn.Conv2d) or m.kernel_size == (1, 1) or tuple(m.stride) == tuple(m.kernel_size):
            continue
        owners = [type(model.get_submodule(".".join(path.split(".")[:i]))).__name__ for i in range(path.count(".") + 1)]
        if any(_EMBEDDING.search(name) for name in owners) or _ATTENTION.search(owners[-1]):
            continue
        spatial.append(m)
    attention = any(
        isinstance(m, nn.MultiheadAttention) or _ATTENTION.search(type(m).__name__) for m in model.modules()
    )
    if len(spatial) <= 4:
        return "transformer" if attention else "MLP"
    return "hybrid" if attention else "CNN"


# Class names of modules whose convolutions are not convolutional blocks: stems, patch embeddings, positional
# encodings (DaViT's ConvPosEnc, PEG); and of attention modules (MViTv2 pools queries and keys with convolutions).
_EMBEDDING = re.compile(r"patchembed|stem|posenc|posconv|peg$", re.IGNORECASE)
_ATTENTION = re.compile(r"attention|attn|msa$|mhsa$|gpsa$", re.IGNORECASE)
