"""Width inference: the SE design of SE modules a family built (layer names, activation, gate, bias, and the width
rules that give every one of them its width), and each block's own activation. Which modules are read, and which
of several fitting rules is taken, is `engine.designs`'. Nothing here changes a model.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from torch import nn

from ..layers.attention import class_path, find_attention, squeeze_channels


def _input_conv(block: nn.Module) -> nn.Module | None:
    """The module taking the block's input: its first conv, or the mixed conv holding it (MixNet's first conv takes
    one split of the input)."""
    conv = next((m for m in block.modules() if isinstance(m, nn.Conv2d)), None)
    return next((m for m in block.modules() if m is not block and isinstance(getattr(m, "in_channels", None), int)
                 and any(c is conv for c in m.modules())), conv)


# The width rules a family's own SE may follow, tried in this order after the recipe's own: (the width r divides,
# rounding, divisor, round_limit). timm's EfficientNet (round of the input or expanded width), MobileNetV3
# (round_channels: to 8, round_limit 0.9), FBNetV3 (round_channels with round_limit 0.95 of the input width),
# GhostNet (to 4), SEModule (to 8), torchvision (floor), wide ReXNet-R (ch_div 16), TResNet's BasicBlock
# (max(C / 4, 64), which to a multiple of 64 equals on TResNet's widths, C / 4 < 96).
_WIDTH_RULES = tuple(
    (source, rounding, divisor, limit)
    for source in ("output", "input")
    for rounding, divisor, limit in (("round", 1, 0.0), ("divisible", 8, 0.9), ("divisible", 8, 0.95),
                                     ("divisible", 4, 0.9), ("divisible", 8, 0.0), ("floor", 1, 0.0),
                                     ("divisible", 16, 0.9), ("divisible", 64, 0.0))
)
_REDUCTIONS = (4, 16, 8, 12, 2)
_GATE_NAMES = {"Sigmoid": "sigmoid", "Hardsigmoid": "hard-sigmoid", "HardSigmoid": "hard-sigmoid"}


def _se_parts(module: nn.Module) -> tuple[nn.Conv2d, nn.Conv2d, nn.Module, nn.Module, str, bool] | None:
    """(reduce, expand, activation, gate, layout, norm) of an SE module of timm's or torchvision's, or None."""
    names = {"timm.models._efficientnet_blocks.SqueezeExcite": ("conv_reduce", "conv_expand", "act1", "gate", "conv"),
             "timm.layers.squeeze_excite.SEModule": ("fc1", "fc2", "act", "gate", "fc"),
             "torchvision.ops.misc.SqueezeExcitation": ("fc1", "fc2", "activation", "scale_activation", "fc")}
    parts = names.get(class_path(module))
    bn = getattr(module, "bn", nn.Identity())
    if parts is None or not isinstance(bn, (nn.Identity, nn.BatchNorm2d)):
        return None
    reduce, expand, act, gate = (getattr(module, n, None) for n in parts[:4])
    if not isinstance(reduce, nn.Conv2d) or not isinstance(expand, nn.Conv2d) or act is None or gate is None:
        return None
    return reduce, expand, act, gate, parts[4], isinstance(bn, nn.BatchNorm2d)


@dataclass(frozen=True)
class OwnSE:
    """One of a model's own SE modules, as width inference reads it."""

    block: str  # the block's path
    place: str  # the SE module's path in the block
    design: tuple[str, bool, str, bool]  # (layout, norm, gate, bias)
    act: str  # the activation between its layers
    block_act: bool  # ... which is the block's own
    channels: int  # of the map it scales
    input_channels: int  # of the block's input
    rd_channels: int


# (the width r divides: "output" or "input", rounding, divisor, round_limit, r)
WidthRule = tuple[str, str, int, float, int]


def read_own_se(path: str, block: nn.Module, place: str | None = None) -> OwnSE | None:
    """The SE module at `place` in `block` (default: its first channel attention), or None where it is not a plain SE
    layer of timm's or torchvision's with an activation and a gate se-inject builds."""
    at = place if place is not None else find_attention(block)
    parts = _se_parts(block if at == "." else block.get_submodule(at)) if at is not None else None
    conv = _input_conv(block)
    if parts is None or conv is None:
        return None
    reduce, _expand, act, gate, layout, norm = parts
    act_name = block_activation(act) if not isinstance(act, nn.Identity) else None
    gate_name = _GATE_NAMES.get(type(gate).__name__)
    if act_name is None or gate_name is None:
        return None
    own = act_name == block_activation(nn.ModuleList(m for name, m in block.named_children() if name != at))
    return OwnSE(path, at, (layout, norm, gate_name, reduce.bias is not None), act_name, own, reduce.in_channels,
                 conv.in_channels, reduce.out_channels)


def width(rule: WidthRule, channels: int, input_channels: int | None) -> int:
    source, rounding, divisor, limit, reduction = rule
    base = input_channels if source == "input" and input_channels is not None else channels
    return squeeze_channels(base, reduction, divisor, limit, rounding)


def fits(rule: WidthRule, ses: list[OwnSE]) -> bool:
    return all(width(rule, se.channels, se.input_channels) == se.rd_channels for se in ses)


def fitting_rules(ses: list[OwnSE], defaults: Any, rules: tuple[tuple[str, str, int, float], ...] = ()) -> list[
        WidthRule]:
    """Every width rule (of `rules`, default all) and r that gives each module its width, in se-inject's order: the
    recipe's own rule and r first (the family's documented rule), then `_WIDTH_RULES` and `_REDUCTIONS`."""
    first = (defaults.rd_from, defaults.rd_round, defaults.rd_divisor, defaults.round_limit)
    return [(*rule, r) for rule in dict.fromkeys(rules or (first, *_WIDTH_RULES))
            for r in dict.fromkeys((defaults.reduction, *_REDUCTIONS)) if fits((*rule, r), ses)]


def design_of(ses: list[OwnSE], defaults: Any, rule: WidthRule, source: str = "the model") -> Any:
    """The settings over `defaults` that build these SE modules with width `rule`: their layer names, activation,
    gate, bias; None where they disagree."""
    if not ses or len({se.design for se in ses}) != 1:
        return None
    layout, norm, gate, bias = ses[0].design
    if len({se.act for se in ses}) == 1:  # one activation throughout (MobileNetV3 forces ReLU)
        act = ses[0].act
    elif all(se.block_act for se in ses):  # each block's own (it changes along the network)
        act = "block"
    else:
        return None
    squeeze_from, rounding, divisor, limit, reduction = rule
    return replace(defaults, rd_ratio=1 / reduction, rd_from=squeeze_from, rd_round=rounding, rd_divisor=divisor,
                   round_limit=limit, act_layer=act, gate_layer=gate, bias=bias, layout=layout,
                   norm_layer="batchnorm" if norm else None,
                   convention=f"{source}'s own SE ({len(ses)} modules): "
                   f"{'the block activation' if act == 'block' else act} inside, {gate} gate, "
                   f"{_width_text(*rule)}")


def staged_rules(ses: list[OwnSE], defaults: Any) -> dict[str, WidthRule]:
    """One width rule for every stage (the blocks' parent module) of these SE modules, with an r per stage (MixNet's
    se0.5 and se0.25 stages of one block class): each stage's rule, by the stage's path. Empty where none fits."""
    stages: dict[str, list[OwnSE]] = {}
    for se in ses:
        stages.setdefault(se.block.rpartition(".")[0], []).append(se)
    first = (defaults.rd_from, defaults.rd_round, defaults.rd_divisor, defaults.round_limit)
    for rule in dict.fromkeys((first, *_WIDTH_RULES)):
        found = {stage: fitting_rules(group, defaults, (rule,)) for stage, group in stages.items()}
        if all(found.values()):
            return {stage: rules[0] for stage, rules in found.items()}
    return {}


def _width_text(source: str, rounding: str, divisor: int, limit: float, reduction: int) -> str:
    width = "block input" if source == "input" else "scaled"
    if rounding == "divisible":
        return f"{width} channels / {reduction} to a multiple of {divisor}" + (
            f" (round_limit {limit:g})" if limit else "")
    return f"{'round' if rounding == 'round' else 'floor'}({width} channels / {reduction})"


# Activation modules by class name (torch's and timm's own), as `SESettings.act_layer` names them.
_ACTIVATION_NAMES = {
    "ReLU": "relu", "ReLU6": "relu6", "SiLU": "silu", "Swish": "silu", "LeakyReLU": "leaky-relu",
    "Hardswish": "hard-swish", "HardSwish": "hard-swish", "GELU": "gelu", "Mish": "mish",
}


def block_activation(block: nn.Module) -> str | None:
    """The block's own activation (its first activation module: timm builds a block's layers, and its SE, with one
    ``act_layer``), as an `ACT_LAYERS` name; None where it has none se-inject can build (LeakyReLU other than
    torch's default slope, which timm's ``leaky_relu`` uses, counts as none)."""
    for m in block.modules():
        name = _ACTIVATION_NAMES.get(type(m).__name__)
        if name == "leaky-relu" and getattr(m, "negative_slope", 0.01) != 0.01:
            return None
        if name is not None:
            return name
    return None

