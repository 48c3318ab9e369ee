"""Fine-tuning helpers: the parameters se-inject added, for their own optimizer group or a warm-up."""

from __future__ import annotations

from torch import nn

from ..layers.attention import attention_classes


def new_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of the attention modules se-inject inserted into `model` (every registered variant: SE, ECA,
    CBAM, ESE), each once, in module order.

    Use them as their own optimizer group (e.g. a larger learning rate), or train only them for a warm-up with the
    base frozen::

        new = set(map(id, se_inject.new_parameters(model)))
        for p in model.parameters():
            p.requires_grad_(id(p) in new)
    """

    classes = attention_classes()
    found: dict[int, nn.Parameter] = {}
    for module in model.modules():
        if isinstance(module, classes):
            for p in module.parameters():
                found.setdefault(id(p), p)
    return list(found.values())
