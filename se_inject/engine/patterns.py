"""Structural patterns: where SE goes in a block recognised by the shape of its graph, whatever its class.

A block's graph is its forward traced with torch.fx, every child opaque (`engine.traces`). Four patterns,
each the SE paper's place for a kind of network (Hu et al., *Squeeze-and-Excitation Networks*):

- ``residual`` (SE-ResNet, Fig. 3): the block adds a branch to a shortcut. SE goes at the end of the branch: after its
  last convolution or norm (or an MLP's last projection once the map is back in NCHW, as in ConvNeXt), before the
  layer-scale, drop-path and the addition. Where a block has several additions (MetaFormer), the last one's branch.
- ``concat`` (SE-Inception, Fig. 2): the block returns a concatenation of parallel branches; SE on that output.
- ``inverted-residual`` (MobileNetV3 / EfficientNet): a depthwise convolution (a child that is one, or a
  conv-norm-act unit around one) followed, through norms, activations and empty slots only, by a 1x1 projection;
  SE goes before the projection.
- ``token-residual`` (the same rule on token features, for transformer and MLP blocks): the block's last addition
  adds a branch ending in an MLP's last projection (a child whose last layer is a ``Linear``), or the norm right after
  it (Swin V2's post-norm); SE goes after it, before layer-scale, drop-path and the addition. The features there are
  channels-last, (B, N, C) tokens or (B, H, W, C) / (B, T, H, W, C) maps.
- ``token-ffn`` (LocalViT, Li et al.): in the same MLP, on its expanded hidden features: before its last
  projection (fc2), after fc1's activation (and the depthwise conv, where the MLP has one). An option
  (``--recipe localvit``), not a default.
- ``conv-chain`` (SE-VGG-16, Table 2): a plain ``nn.Sequential`` stack of conv(-norm)-activation units (at least
  two); SE after each unit's activation. The activation module is the "block": its forward gets the SE call, so the
  Sequential keeps its children, their numbering and its own forward.

Matching is pure: it returns where SE would go (`Place`) and changes nothing. The engine then treats a structural
place exactly like a class rule's (``find`` measures it, ``surgery`` rewrites the forward).

Why a hand walk over ``graph.nodes`` rather than torch.fx's ``SubgraphMatcher``: these patterns have variable length
(any number of optional layer-scale, drop-path, dropout or identity nodes between the branch's end and the addition;
any number of norms and activations between a depthwise conv and its projection) and their nodes are told apart by
the *type* of the module called (a conv, a norm), not by a fixed call target. SubgraphMatcher matches a fixed graph
and compares ``call_module`` targets by name, so each family would need its own set of pattern graphs; a short walk
backwards from each addition states the rule once.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
from torch import nn

from ..names import PATTERNS
from .traces import trace_block

__all__ = ["PATTERNS", "Place", "conv_chain", "match_block", "token_layer"]


@dataclass(frozen=True)
class Place:
    """Where SE goes in a block: ``after``/``before`` an anchor.

    The anchor is a child path (``"bn3"``), ``""`` for the block's own output, or ``"%name"`` for a graph node that
    is not a child call (e.g. the ``permute`` that brings a ConvNeXt MLP's output back to NCHW).
    """

    anchor: str
    position: str


# --- what the nodes are ---------------------------------------------------------------------------------------------

_PASS_MODULES = (nn.Identity, nn.Dropout, nn.Dropout2d)
_PASS_MODULE_NAMES = {"DropPath", "StochasticDepth", "LayerScale", "LayerScale2d", "Scale"}
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)
_NCHW_LAYER_NORMS = {"LayerNorm2d", "LayerNormChannel"}  # LayerNorm over dim 1 of an NCHW map (timm)
_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
                nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh)
_ADDITIONS = {operator.add, operator.iadd, torch.add}
_MULS = {operator.mul, operator.imul, torch.mul}


def _module(block: nn.Module, node: torch.fx.Node) -> nn.Module | None:
    return block.get_submodule(str(node.target)) if node.op == "call_module" else None


def _passes_through(module: nn.Module) -> bool:
    """Layer-scale, drop-path, dropout, identity: what may sit between a branch's end and its addition."""
    return isinstance(module, _PASS_MODULES) or type(module).__name__ in _PASS_MODULE_NAMES


def _is_conv_or_norm(module: nn.Module) -> bool:
    """A 2-D convolution or a norm over the channels of an NCHW map."""
    return (
        isinstance(module, (nn.Conv2d, *_NORMS))
        or type(module).__name__ in _NCHW_LAYER_NORMS
        or (isinstance(module, nn.LayerNorm) and type(module).__name__.endswith("2d"))
    )


def _last_layer(module: nn.Module) -> nn.Module:
    """The last conv, norm or linear layer inside `module` (in registration order), skipping containers,
    pass-through modules and activations: `ConvNormAct(conv, bn(drop, act))` ends in its norm."""
    for sub in reversed(list(module.modules())):
        if isinstance(sub, (nn.Sequential, nn.ModuleList, nn.ModuleDict, *_ACTIVATIONS)) or _passes_through(sub):
            continue
        if sub is not module and next(iter(sub.children()), None) is not None and not _is_conv_or_norm(sub):
            continue  # a composite child: its own last layer comes later in the list
        return sub
    return module


def _is_constant(node: Any) -> bool:
    """Whether `node` is computed from parameters/constants only (a layer-scale gamma, reshaped or not)."""
    if not isinstance(node, torch.fx.Node):
        return True
    if node.op == "get_attr":
        return True
    if node.op in ("placeholder", "call_module"):
        return False
    return all(_is_constant(a) for a in node.all_input_nodes)


def _depends_on(node: torch.fx.Node, target: torch.fx.Node) -> bool:
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n is target:
            return True
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return False


def _from_input(node: torch.fx.Node) -> bool:
    return any(_depends_on(node, p) for p in node.graph.nodes if p.op == "placeholder")


# --- the patterns ----------------------------------------------------------------------------------------------------


def _branch_end(block: nn.Module, node: torch.fx.Node) -> torch.fx.Node | None:
    """Walk back from an addition's operand over layer-scale, drop-path and the like to the node after which SE
    goes, or None when the branch does not end in a conv/norm (or an MLP back in NCHW)."""
    node = _skip_to_branch(block, node)
    if not isinstance(node, torch.fx.Node):
        return None
    module = _module(block, node)
    if module is not None:
        last = _last_layer(module)
        if isinstance(last, nn.BatchNorm1d) and isinstance(_last_token_layer(module), nn.Linear):
            return None  # a token MLP (LeViT's Linear + BatchNorm1d over the tokens): the token-residual pattern's
        if _is_conv_or_norm(last):
            return node
        if isinstance(module, nn.Sequential) and type(last).__name__ == "Permute" and _mlp_back_to_nchw(module):
            return node  # torchvision CNBlock: Sequential(..., Linear, Permute([0, 3, 1, 2]))
        return None
    if node.op == "call_method" and node.target == "permute" and tuple(node.args[1:]) == (0, 3, 1, 2):
        source = _skip_layer_scale(node.args[0])
        inner = _module(block, source) if isinstance(source, torch.fx.Node) else None
        if inner is not None and isinstance(_last_layer(inner), nn.Linear):
            # timm ConvNeXtBlock: mlp (channels-last) then permute back to NCHW. Where the layer scale is applied
            # channels-last, before the permute (EdgeNeXt's ConvBlock), the first NCHW map is after it: SE goes there.
            return node
    return None


def _skip_to_branch(block: nn.Module, node: Any) -> Any:
    """From an addition's operand back over layer-scale (a module or ``x * gamma``), drop-path, dropout and
    identities to the node that ends the branch."""
    while isinstance(node, torch.fx.Node):
        module = _module(block, node)
        if module is not None and _passes_through(module) and len(node.args) == 1:
            node = node.args[0]
            continue
        if node.op in ("call_function", "call_method") and node.target in (*_MULS, "mul", "mul_"):
            tensors = [a for a in node.args if not _is_constant(a)]
            if len(tensors) == 1 and len(node.args) == 2:  # x * gamma: layer scale
                node = tensors[0]
                continue
        break
    return node


def _skip_layer_scale(node: Any) -> Any:
    """The tensor operand of ``gamma * x`` / ``x * gamma`` (a constant per-channel scale), else `node` itself."""
    if isinstance(node, torch.fx.Node) and node.op in ("call_function", "call_method") and len(node.args) == 2 \
            and node.target in (*_MULS, "mul", "mul_"):
        tensors = [a for a in node.args if not _is_constant(a)]
        if len(tensors) == 1:
            return tensors[0]
    return node


def _mlp_back_to_nchw(seq: nn.Sequential) -> bool:
    layers = [m for m in seq if not _passes_through(m)]
    return (
        len(layers) >= 2
        and list(getattr(layers[-1], "dims", ())) == [0, 3, 1, 2]
        and isinstance(_last_layer(layers[-2]), nn.Linear)
    )


def _anchor(node: torch.fx.Node) -> str:
    return str(node.target) if node.op == "call_module" else f"%{node.name}"


def match_residual(block: nn.Module, graph: torch.fx.Graph) -> Place | None:
    for addition in reversed(_additions(graph)):  # the last residual: MetaFormer's MLP branch rather than its mixer's
        # The branch is the operand with more layers between the block's input and the addition; the other is the
        # shortcut (the input itself, or a projection such as conv-BN, which must not be mistaken for the branch).
        branch, shortcut = sorted(addition.args, key=_depth, reverse=True)
        if _depth(branch) == _depth(shortcut):
            continue
        end = _branch_end(block, branch)
        if end is None or _depends_on(shortcut, end) or _is_constant(shortcut) or not _from_input(end):
            continue
        return Place(_anchor(end), "after")
    return None


_TOKEN_NORMS = (nn.LayerNorm, nn.RMSNorm)


def token_layer(module: nn.Module) -> bool:
    """Whether `module` works on channels-last features: a ``Linear``, or a ``LayerNorm``/``RMSNorm`` over the last
    dimension (not timm's ``LayerNorm2d``, which normalises dimension 1 of an NCHW map)."""
    return isinstance(module, nn.Linear) or (isinstance(module, _TOKEN_NORMS) and not _is_conv_or_norm(module)
                                             and type(module).__name__ not in _NCHW_LAYER_NORMS)


def _token_branch_end(block: nn.Module, node: torch.fx.Node) -> torch.fx.Node | None:
    """The node ending a token MLP branch: a child whose last layer is a Linear (an MLP, or a Linear itself), or a
    token norm right after one (post-norm); None otherwise."""
    node = _skip_to_branch(block, node)
    module = _module(block, node) if isinstance(node, torch.fx.Node) else None
    if module is None:
        return None
    if isinstance(module, _TOKEN_NORMS) and token_layer(module) and len(node.args) == 1:
        inner = node.args[0]
        inner_module = _module(block, inner) if isinstance(inner, torch.fx.Node) else None
        return node if inner_module is not None and isinstance(_last_layer(inner_module), nn.Linear) else None
    return node if isinstance(_last_token_layer(module), nn.Linear) else None


def _last_token_layer(module: nn.Module) -> nn.Module | None:
    """The last linear, conv or norm layer in `module`, a ``BatchNorm1d`` that follows a ``Linear`` skipped: LeViT's
    ``LinearNorm`` normalises the flattened tokens, so its output keeps the channels last."""
    layers = [m for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, *_NORMS,
                                                            *_TOKEN_NORMS))]
    while len(layers) > 1 and isinstance(layers[-1], nn.BatchNorm1d) and isinstance(layers[-2], nn.Linear):
        layers.pop()
    return layers[-1] if layers else None


def match_token_residual(block: nn.Module, graph: torch.fx.Graph) -> Place | None:
    """`match_residual` for token blocks: the last addition whose branch ends in an MLP's projection (or its norm)."""
    for addition in reversed(_additions(graph)):
        branch, shortcut = sorted(addition.args, key=_depth, reverse=True)
        if _depth(branch) == _depth(shortcut):
            continue
        end = _token_branch_end(block, branch)
        if end is None or _depends_on(shortcut, end) or _is_constant(shortcut) or not _from_input(end):
            continue
        return Place(_anchor(end), "after")
    return None


def match_token_ffn(block: nn.Module, graph: torch.fx.Graph) -> Place | None:
    """LocalViT's place: in the MLP `match_token_residual` finds, before its last ``Linear`` (fc2), on the hidden
    features (an anchor inside the MLP child: ``mlp.fc2``)."""
    place = match_token_residual(block, graph)
    if place is None or place.anchor.startswith("%"):
        return None
    mlp = block.get_submodule(place.anchor)
    if not isinstance(_last_token_layer(mlp), nn.Linear) or isinstance(mlp, nn.Linear):
        mlp = next((m for m in (block.get_submodule(str(n.args[0].target)) for n in graph.nodes
                                if n.op == "call_module" and n.target == place.anchor
                                and isinstance(n.args[0], torch.fx.Node) and n.args[0].op == "call_module")), None)
        if mlp is None:
            return None  # a post-norm whose input is no MLP child
    linears = [(path, m) for path, m in mlp.named_modules() if isinstance(m, nn.Linear)]
    if len(linears) < 2:
        return None  # one projection: no hidden features
    owner = next(path for path, m in block.named_modules() if m is mlp)
    return Place(f"{owner}.{linears[-1][0]}", "before")


def _additions(graph: torch.fx.Graph) -> list[torch.fx.Node]:
    return [
        n for n in graph.nodes
        if ((n.op == "call_function" and n.target in _ADDITIONS) or (n.op == "call_method" and n.target in
            ("add", "add_")))
        and len(n.args) == 2 and not n.kwargs and all(isinstance(a, torch.fx.Node) for a in n.args)
    ]


def _depth(node: torch.fx.Node) -> int:
    """Child calls on the longest path from the block's input to `node`."""
    depths: dict[torch.fx.Node, int] = {}
    for n in node.graph.nodes:  # topological order
        inputs = [depths[a] for a in n.all_input_nodes if a in depths]
        depths[n] = (max(inputs) if inputs else 0) + (n.op == "call_module")
        if n is node:
            break
    return depths[node]


def match_concat(block: nn.Module, graph: torch.fx.Graph) -> Place | None:
    output = next(n for n in graph.nodes if n.op == "output")
    result = output.args[0]
    if not (isinstance(result, torch.fx.Node) and result.op == "call_function" and result.target is torch.cat):
        return None
    tensors, dim = result.args[0], result.args[1] if len(result.args) > 1 else result.kwargs.get("dim", 0)
    if dim != 1 or not isinstance(tensors, (list, tuple)) or len(tensors) < 2:
        return None
    if sum(isinstance(t, torch.fx.Node) and _computed_by_modules(t) for t in tensors) < 2:
        return None  # parallel branches: at least two computed by the block's children
    return Place("", "after")


def _computed_by_modules(node: torch.fx.Node) -> bool:
    return any(n.op == "call_module" for n in _ancestors(node))


def _ancestors(node: torch.fx.Node) -> Iterator[torch.fx.Node]:
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            yield n
            stack.extend(n.all_input_nodes)


def _only_conv(module: nn.Module | None) -> nn.Conv2d | None:
    """The module's single 2-D convolution (itself, or the one inside a conv-norm-act unit), else None."""
    if module is None:
        return None
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    return convs[0] if len(convs) == 1 else None


def _is_depthwise(conv: nn.Conv2d | None) -> bool:
    return conv is not None and 1 < conv.groups == conv.in_channels == conv.out_channels and conv.kernel_size != (1, 1)


def _is_pointwise(conv: nn.Conv2d | None) -> bool:
    return conv is not None and conv.kernel_size == (1, 1) and conv.groups == 1


def _no_layer(module: nn.Module | None) -> bool:
    """Norms, activations, identities, empty slots: nothing with a conv or linear layer."""
    return module is not None and not any(isinstance(m, (nn.Conv2d, nn.Linear)) for m in module.modules())


def match_inverted_residual(block: nn.Module, graph: torch.fx.Graph) -> Place | None:
    for node in graph.nodes:
        if not _is_depthwise(_only_conv(_module(block, node))):
            continue
        current = node
        while len(current.users) == 1:
            current = next(iter(current.users))
            module = _module(block, current)
            if _is_pointwise(_only_conv(module)):
                return Place(str(current.target), "before")
            if not _no_layer(module):
                break
    return None


def conv_chain(seq: nn.Module) -> list[str]:
    """Names of the activation children that close each conv(-norm)-activation unit of a plain Sequential stack
    (every child a single layer or a nested plain Sequential, a stack of its own), when there are at least two
    units; else []. SSD's VGG-16 keeps conv5_1-5_3 in one Sequential with the nested fc6/fc7 Sequential."""
    if type(seq).forward is not nn.Sequential.forward or not isinstance(seq, nn.Sequential):
        return []
    children = list(seq.named_children())
    if any(next(iter(child.children()), None) is not None and not _plain_sequential(child) for _, child in children):
        return []  # not plain: it holds blocks
    sites = []
    for i, (_, child) in enumerate(children):
        if not isinstance(child, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):  # SE squeezes a map of any rank
            continue
        j = i + 1
        if j < len(children) and isinstance(children[j][1], _NORMS):
            j += 1
        if j < len(children) and isinstance(children[j][1], _ACTIVATIONS):
            sites.append(children[j][0])
    return sites if len(sites) >= 2 else []


def _plain_sequential(module: nn.Module) -> bool:
    return (type(module) is nn.Sequential
            and all(next(iter(child.children()), None) is None for child in module.children()))


_MATCHERS = {
    "residual": match_residual,
    "concat": match_concat,
    "inverted-residual": match_inverted_residual,
    "token-residual": match_token_residual,
    "token-ffn": match_token_ffn,
}


def match_block(block: nn.Module, pattern: str) -> Place | None:
    """Where `pattern` puts SE in `block`, or None. Pure: traces (cached) and reads, changes nothing."""
    if isinstance(block, (nn.Sequential, nn.ModuleList, nn.ModuleDict)) or not block._modules:
        return None
    graph = trace_block(block)
    return None if graph is None else _MATCHERS[pattern](block, graph)
