"""Counting: parameters, MACs (torch.utils.flop_counter on the meta device) and the elementwise work of attention.

MACs follow torchvision's documented GFLOPS and the SE paper: FLOPs / 2 over convolutions, linear layers and
matmuls. The pool, gate and channel-wise multiply that SE adds are not MACs; they are counted separately as
elementwise operations (one per output element of a pointwise op, one per input element of a reduction).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from .find import is_attention, meta_copy, output_shapes, run_meta

_POOLS = {
    torch.ops.aten._adaptive_avg_pool2d.default,
    torch.ops.aten.adaptive_max_pool2d.default,
    torch.ops.aten.avg_pool2d.default,
}


@dataclass(frozen=True)
class Counts:
    """What one forward pass at batch 1 costs."""

    params: int
    macs: int
    attention_elementwise_ops: int
    output_shapes: tuple[tuple[int, ...], ...]


class ElementwiseCounter(TorchDispatchMode):
    """Counts elementwise and reduction work done inside the given modules (nested calls counted once)."""

    def __init__(self, modules: list[nn.Module]):
        super().__init__()
        self.ops = 0
        self._depth = 0
        self._handles: list[Any] = []
        for m in modules:
            self._handles.append(m.register_forward_pre_hook(self._enter))
            self._handles.append(m.register_forward_hook(self._exit))

    def _enter(self, *_: Any) -> None:
        self._depth += 1

    def _exit(self, *_: Any) -> None:
        self._depth -= 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        if self._depth:
            if torch.Tag.reduction in func.tags or func in _POOLS:
                self.ops += args[0].numel()
            elif torch.Tag.pointwise in func.tags:
                self.ops += out.numel()
        return out

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        super().__exit__(*exc)


def count_params(model: nn.Module) -> int:
    """Number of distinct parameters (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters())


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """Outermost channel-attention modules in `model`."""
    found: list[nn.Module] = []
    inside: set[int] = set()
    for m in model.modules():
        if id(m) in inside:
            continue
        if is_attention(m):
            found.append(m)
            inside.update(id(sub) for sub in m.modules())
    return found


def count(model: nn.Module, input_size: tuple[int, int, int]) -> Counts:
    """Params, MACs and attention elementwise ops of `model` at batch 1, measured on a meta copy."""
    probe = meta_copy(model)
    with FlopCounterMode(display=False) as flops, ElementwiseCounter(attention_modules(probe)) as elementwise:
        out = run_meta(probe, input_size)
    return Counts(
        params=count_params(model),
        macs=flops.get_total_flops() // 2,
        attention_elementwise_ops=elementwise.ops,
        output_shapes=output_shapes(out),
    )
