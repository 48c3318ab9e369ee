"""Width inference: the SE design of a model's own SE modules (layer names, activation, gate, bias, and the width rule
that gives every one of them its width), and each block's own activation.

`--fill` gives the blocks of a partial-SE model what the model's other blocks of the same class have
(`with_own_designs`). Nothing here changes the model.
"""

from __future__ import annotations

from dataclasses import replace
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


def own_design(blocks: list[nn.Module], defaults: Any, rules: tuple[tuple[str, str, int, float], ...] = ()) -> Any:
    """The SE design of a model's own SE modules in `blocks` (its partial SE), as settings over `defaults`: their
    layer names, activation, gate, bias, and the first width rule (of `rules`, default all) that gives every one of
    them its width; None where the modules are not plain SE layers or disagree."""

    seen = []
    for block in blocks:
        at = find_attention(block)
        parts = _se_parts(block if at == "." else block.get_submodule(at)) if at is not None else None
        conv = _input_conv(block)
        if parts is None or conv is None:
            return None
        reduce, _expand, act, gate, layout, norm = parts
        act_name = block_activation(act) if not isinstance(act, nn.Identity) else None
        gate_name = _GATE_NAMES.get(type(gate).__name__)
        if act_name is None or gate_name is None:
            return None
        own_act = "block" if act_name == block_activation(nn.ModuleList(
            m for name, m in block.named_children() if name != at)) else act_name
        seen.append(((layout, norm), gate_name, reduce.bias is not None, act_name, own_act,
                     reduce.in_channels, conv.in_channels, reduce.out_channels))
    if not seen or len({row[:3] for row in seen}) != 1:
        return None
    (layout, norm), gate, bias = seen[0][:3]
    if len({row[3] for row in seen}) == 1:  # one activation throughout (MobileNetV3 forces ReLU)
        act = seen[0][3]
    elif {row[4] for row in seen} == {"block"}:  # each block's own (it changes along the network)
        act = "block"
    else:
        return None
    first = (defaults.squeeze_from, defaults.rounding, defaults.divisor, defaults.round_limit)
    for source, rounding, divisor, limit in dict.fromkeys(rules or (first, *_WIDTH_RULES)):
        for reduction in dict.fromkeys((defaults.reduction, *_REDUCTIONS)):
            if all(squeeze_channels(c_in if source == "input" else c, reduction, divisor, limit, rounding) == rd
                   for *_, c, c_in, rd in seen):
                return replace(defaults, reduction=reduction, squeeze_from=source, rounding=rounding, divisor=divisor,
                               round_limit=limit, act=act, gate=gate, bias=bias, layout=layout, norm=norm,
                               convention=f"the model's own SE ({len(seen)} modules): "
                               f"{'the block activation' if act == 'block' else act} inside, {gate} gate, "
                               f"{_width_text(source, rounding, divisor, limit, reduction)}")
    return None


def _staged_designs(owned: list[tuple[str, nn.Module]], key: tuple[Any, ...], defaults: Any) -> dict[Any, Any]:
    """One width rule for every stage (parent module) of a class's own SE modules, with a reduction per stage: the
    design of each stage's blocks, keyed by `key` + the stage's path. Empty where no one rule fits every stage."""
    stages: dict[str, list[nn.Module]] = {}
    for path, block in owned:
        stages.setdefault(path.rpartition(".")[0], []).append(block)
    first = (defaults.squeeze_from, defaults.rounding, defaults.divisor, defaults.round_limit)
    for rule in dict.fromkeys((first, *_WIDTH_RULES)):
        designs = {(*key, stage): own_design(blocks, defaults, (rule,)) for stage, blocks in stages.items()}
        if all(d is not None for d in designs.values()):
            return designs
    return {(*key, stage): None for stage in stages}


def _width_text(source: str, rounding: str, divisor: int, limit: float, reduction: int) -> str:
    width = "block input" if source == "input" else "scaled"
    if rounding == "divisible":
        return f"{width} channels / {reduction} to a multiple of {divisor}" + (
            f" (round_limit {limit:g})" if limit else "")
    return f"{'round' if rounding == 'round' else 'floor'}({width} channels / {reduction})"


def with_own_designs(model: nn.Module, matches: list[Any], skipped: list[Any]) -> list[Any]:
    """In a model with partial SE, a match whose block class has the model's own SE in other blocks takes that SE's
    design (`own_design`): filling them gives the blocks what the family's SE blocks of that class have. Where those
    blocks follow no one width rule (MixNet's se0.5 and se0.25 stages), the SE of the block's siblings (its stage)."""
    owned: dict[str, list[tuple[str, str, nn.Module]]] = {}
    for skip in skipped:
        if skip.already_attention:
            owned.setdefault(skip.recipe, []).append((skip.block, skip.path, model.get_submodule(skip.path)))
    if not owned:
        return matches
    designs: dict[tuple[str, str, Any, str | None], Any] = {}
    result = []
    for m in matches:
        key = (m.recipe.name, m.block, m.defaults, None)
        if key not in designs:  # the SE of the model's blocks of the same class
            same = [b for cp, _, b in owned.get(m.recipe.name, []) if cp == m.block]
            designs[key] = own_design(same, m.defaults) if same else None
        if designs[key] is None:
            key = (m.recipe.name, m.block, m.defaults, m.path.rpartition(".")[0])
            if key not in designs:
                designs.update(_staged_designs([(p, b) for cp, p, b in owned.get(m.recipe.name, []) if cp == m.block],
                                               key[:3], m.defaults))
        design = designs.get(key)
        if design is not None and design.act == "block":
            design = replace(design, act=block_activation(model.get_submodule(m.path)) or "relu")
        result.append(replace(m, defaults=design) if design is not None else m)
    return result


# Activation modules by class name (torch's and timm's own), as `SEDefaults.act` names them.
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

