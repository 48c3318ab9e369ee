"""The speed boundary: fusing a rewritten block's graph around its channel-gate module.

The attention layers (`se_inject.layers`) read like timm's ``SEModule``: ``forward(x)`` returns ``x * gate``. Where a
block's traced graph allows it, `fuse` changes how (never what) the block computes around the module's call:

- residual: when the module's output is read only by an addition of two tensors (``out += shortcut``), the
  addition moves into the module's call, which computes ``shortcut + x * s`` in one pass;
- in place: when nothing else reads the module's input (`only_reader`), the scaling is written into it with
  autograd off (an eager-mode allocation saved);
- squeezed: when its input is ``bn(conv1x1(h))``, the squeeze may be taken from the narrower `h` under
  torch.compile (`squeeze_through`).

The module then becomes its class's fused twin (`fused_class`: same parameters and keys, a forward taking these
extra arguments), and the graph passes them as constants and tensors, so nothing is set on the module from outside
and nothing reads a tensor's state in Python on a traced path.
"""

from __future__ import annotations

import itertools
import operator
from typing import Any, Optional

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from ..layers import squeeze_excite, tokens
from ..layers.squeeze_excite import ChannelGate
from ..layers.tokens import Excitation, TokenGate
from .keys import BoundedCache

__all__ = ["FusedGate", "fusable", "fuse", "fused_class", "layer_class", "only_reader", "scale", "squeeze_through"]


def scale(x: torch.Tensor, s: torch.Tensor, inplace: bool, residual: Optional[torch.Tensor] = None) -> torch.Tensor:  # noqa: UP045
    """``x * s``, or ``residual + x * s`` in one pass. Written into `x` where the graph allows it (`inplace`) and
    autograd is off, in eager mode only (under torch.compile the out-of-place form fuses better; a traced or
    symbolic input keeps the plain form). A single channels_last map is not written in place (measured slower)."""
    if not torch.jit.is_scripting():  # noqa: SIM102  (TorchScript skips this block only when the test stands alone)
        if isinstance(x, torch.fx.Proxy):  # symbolic tracing: no Python decision on the tensor's state
            inplace = False
    inplace = inplace and not torch.is_grad_enabled() and not (torch.compiler.is_compiling() or torch.jit.is_tracing())
    if inplace and x.shape[0] == 1 and not x.is_contiguous():
        inplace = False
    if residual is None:
        return x.mul_(s) if inplace else x * s
    if inplace and residual.shape == x.shape:
        return torch.addcmul(residual, x, s, out=x)
    return torch.addcmul(residual, x, s)


def squeeze_through(
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],  # noqa: UP045  (TorchScript reads the annotations)
    running_mean: Optional[torch.Tensor],  # noqa: UP045
    running_var: Optional[torch.Tensor],  # noqa: UP045
    bn_weight: Optional[torch.Tensor],  # noqa: UP045
    bn_bias: Optional[torch.Tensor],  # noqa: UP045
    eps: float,
    bn_training: bool,
) -> Optional[torch.Tensor]:  # noqa: UP045
    """The squeeze of ``bn(conv1x1(h))`` computed from `h`, or None where the direct squeeze is to be used.

    A 1x1 convolution (stride 1) and an eval-mode BatchNorm are per-pixel affine maps, so they commute with the
    spatial mean: ``mean_hw(bn(conv(h))) == bn(conv(mean_hw(h)))`` up to float rounding. In a bottleneck `h` is
    a quarter of the width of the SE input, and under torch.compile its mean fuses into the kernel that writes
    `h`, so the SE no longer reads its whole input map once more. Used only there, only for an eval-mode BN with
    running statistics, and only where the map is large next to the matrix the descriptor then goes through
    (``N*H*W*(C - C_h) > 2*C*C_h``); in eager mode the direct mean is as fast and this returns None.
    """
    if bn_training or running_mean is None or running_var is None or not torch.compiler.is_compiling() or h.dim() != 4:
        return None
    n, c_h, height, width = h.shape
    if not isinstance(n, int):  # a symbolic batch (dynamic export): the size test below would constrain it
        return None
    c = weight.shape[0]
    if n * height * width * (c - c_h) <= 2 * c * c_h:
        return None
    s = F.linear(h.mean((2, 3)), weight.flatten(1), bias)
    return F.batch_norm(s, running_mean, running_var, bn_weight, bn_bias, False, 0.0, eps)


@torch.fx.wrap
def spatial_mean(x: torch.Tensor) -> torch.Tensor:
    """The squeeze as (N, C) descriptors: the mean over every dimension after the channels."""
    return x.mean((2, 3)) if x.dim() == 4 else x.mean(list(range(2, x.dim())))


class FusedGate(Excitation):
    """Mixin of a channel gate's fused twin: the layer's own layers and `gain`, computed on (N, C) descriptors (a
    1x1 convolution's weights applied as one GEMM: on the CPU, PyTorch sends 1x1-spatial convolutions down a slow
    path), with the fused arguments."""

    def forward(
        self,
        x: torch.Tensor,
        residual: Optional[torch.Tensor] = None,  # noqa: UP045
        squeezed: Optional[torch.Tensor] = None,  # noqa: UP045
        inplace: bool = False,
    ) -> torch.Tensor:
        s = self.excite(spatial_mean(x) if squeezed is None else squeezed)
        return scale(x, squeeze_excite.unsqueeze_as(s, x), inplace, residual)

    def __reduce_ex__(self, protocol: int) -> Any:  # rebuilt from its layer class, which pickles by reference
        return _restore_fused, (type(self).__se_inject_layer__,), self.__dict__


class FusedTokenGate(FusedGate):
    """`FusedGate` for channels-last features (`TokenGate`): the gate broadcasts along the last axis."""

    def forward(
        self,
        x: torch.Tensor,
        residual: Optional[torch.Tensor] = None,  # noqa: UP045
        squeezed: Optional[torch.Tensor] = None,  # noqa: UP045
        inplace: bool = False,
    ) -> torch.Tensor:
        # `squeezed` is never passed to a token gate (its map is no conv-BN output); the gate squeezes its own input
        s = self.token_gate(x)
        return scale(x, tokens.unsqueeze_tokens(s, x), inplace, residual)  # the module's name: fx's wrap patches it


_fused: BoundedCache[type, type] = BoundedCache(64)


def fused_class(cls: type) -> type:
    """The fused twin of a channel-gate layer class (one per class)."""
    if "__se_inject_layer__" in vars(cls):  # already the fused twin
        return cls
    fused = _fused.get(cls)
    if fused is None:
        mixin = FusedTokenGate if issubclass(cls, TokenGate) else FusedGate
        fused = type(cls.__name__, (mixin, cls), {"__se_inject_layer__": cls, "__module__": cls.__module__,
                                                      "__qualname__": cls.__qualname__})
        _fused[cls] = fused
    return fused


def layer_class(module: nn.Module) -> type:
    """The layer class of `module`, also when it has its fused twin's class."""
    return getattr(type(module), "__se_inject_layer__", type(module))


def _restore_fused(cls: type) -> nn.Module:
    fused = fused_class(cls)
    return fused.__new__(fused)


# --- the graph pass ---------------------------------------------------------------------------------------------------

_ADDITIONS = {operator.add, operator.iadd, torch.add}
_FRESH = {torch.cat, torch.add, operator.add, operator.mul, torch.mul}
_PASS_THROUGH = {torch.relu, torch.nn.functional.relu, torch.nn.functional.silu, torch.sigmoid}


def fusable(module: nn.Module) -> bool:
    """Whether `module` is a channel gate (squeeze by the mean, excite, scale) the pass may fuse."""
    return isinstance(module, ChannelGate)


def fuse(graph: torch.fx.Graph, block: nn.Module, name: str, *, inplace_alone: bool = True) -> bool:
    """Rewrite the single call of the channel gate `name` in `graph` (see the module docstring); whether anything
    changed. The caller then gives the module its fused class (`fused_class`). Without `inplace_alone`, scaling in
    place alone is no reason to rewrite (a filled slot keeps its block's own class unless there is more to fuse)."""
    module = block.get_submodule(name)
    calls = [n for n in graph.nodes if n.op == "call_module" and n.target == name]
    if not fusable(module) or len(calls) != 1 or len(calls[0].args) != 1 or calls[0].kwargs:
        return False
    call = calls[0]
    kwargs: dict[str, Any] = {}
    if only_reader(call, block):
        kwargs["inplace"] = True
    users = list(call.users)
    addition = users[0] if len(users) == 1 else None
    if (
        addition is not None
        and addition.op == "call_function"
        and addition.target in _ADDITIONS
        and not addition.kwargs
        and len(addition.args) == 2
        and all(isinstance(a, torch.fx.Node) and a.op != "get_attr" for a in addition.args)  # two computed tensors
        and addition.args[0] is not addition.args[1]
    ):
        kwargs["residual"] = addition.args[1] if addition.args[0] is call else addition.args[0]
    else:
        addition = None
    place = addition or call
    conv = _conv_bn_source(call.args[0], block)
    if conv is not None:
        bn = call.args[0]
        with graph.inserting_before(place):
            attrs = [
                graph.get_attr(f"{owner.target}.{attr}")
                for owner, attr in [(conv, "weight"), (conv, "bias"), (bn, "running_mean"), (bn, "running_var"),
                                    (bn, "weight"), (bn, "bias"), (bn, "eps"), (bn, "training")]
            ]
            kwargs["squeezed"] = graph.call_function(squeeze_through, (conv.args[0], *attrs))
    if not kwargs or (not inplace_alone and set(kwargs) == {"inplace"}):
        return False
    with graph.inserting_before(place):
        fused = graph.call_module(name, call.args, kwargs)
    place.replace_all_uses_with(fused)
    if addition is not None:
        graph.erase_node(addition)
    graph.erase_node(call)
    return True


def only_reader(call: torch.fx.Node, block: nn.Module) -> bool:
    """Whether `call` is the only reader of its input tensor, so it may scale it in place (autograd off).

    Walks back through parameterless modules (activations, Identity, dropout: they may return their input) while
    each tensor has a single user; a module with parameters, or a concatenation/addition, makes a fresh tensor.
    """
    node = call.args[0] if call.args else None
    while isinstance(node, torch.fx.Node) and len(node.users) == 1:
        if node.op == "call_module":
            module = block.get_submodule(str(node.target))
            if next(itertools.chain(module.parameters(), module.buffers()), None) is not None:
                return True
        elif node.op == "call_function" and node.target in _FRESH:
            return True
        elif node.op != "call_function" or node.target not in _PASS_THROUGH:
            return False
        node = node.args[0] if node.args else None
    return False


def _conv_bn_source(node: Any, block: nn.Module) -> torch.fx.Node | None:
    """The convolution node when `node` computes ``bn(conv(h))`` with a 1x1, stride-1, unpadded, ungrouped
    nn.Conv2d and an nn.BatchNorm2d keeping running statistics: per-pixel affine maps, which commute with the
    spatial mean in eval mode."""
    if not (isinstance(node, torch.fx.Node) and node.op == "call_module" and len(node.args) == 1 and not node.kwargs):
        return None
    conv = node.args[0]
    if not (isinstance(conv, torch.fx.Node) and conv.op == "call_module" and len(conv.args) == 1 and not conv.kwargs):
        return None
    bn_module, conv_module = block.get_submodule(str(node.target)), block.get_submodule(str(conv.target))
    if type(bn_module) is not nn.BatchNorm2d or not bn_module.track_running_stats:
        return None
    if type(conv_module) is not nn.Conv2d or not isinstance(conv.args[0], torch.fx.Node):
        return None
    if conv_module.kernel_size != (1, 1) or conv_module.stride != (1, 1) or conv_module.groups != 1:
        return None
    return conv if conv_module.padding in ((0, 0), "valid") and conv_module.padding_mode == "zeros" else None
