"""Counting: parameters, MACs (torch.utils.flop_counter on the meta device) and the elementwise work of attention.

MACs follow torchvision's documented GFLOPS and the SE paper: FLOPs / 2 over convolutions, linear layers and
matmuls. The pool, gate and channel-wise multiply that SE adds are not MACs; they are counted separately as
elementwise operations (one per output element of a pointwise op, one per input element of a reduction).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from ..layers.attention import is_attention
from .meta import as_meta, output_shapes, run_meta

_POOLS = {  # reductions without the reduction tag: one op per input element
    torch.ops.aten._adaptive_avg_pool2d.default,
    torch.ops.aten.adaptive_max_pool2d.default,
    torch.ops.aten.avg_pool2d.default,
}
_NORMS = {  # affine normalisation: one op per output element, like a pointwise op
    torch.ops.aten._native_batch_norm_legit_no_training.default,
    torch.ops.aten._native_batch_norm_legit.default,
    torch.ops.aten._native_batch_norm_legit.no_stats,
    torch.ops.aten.native_batch_norm.default,
}


# Normalisations have no MACs. FlopCounterMode decomposes every op it does not count into prims, whose meta functions
# are Python: one batch norm costs about as much as the rest of its block. Outside the modules whose elementwise work
# is tallied, a norm on the meta device is answered with its output's shape alone (`_ShapeOnlyNorms`).
_NORM_FUNCTIONS = frozenset({F.batch_norm, torch.batch_norm, F.layer_norm, torch.layer_norm, F.group_norm,
                             torch.group_norm, F.instance_norm, torch.instance_norm, F.rms_norm, torch.rms_norm})


class _ShapeOnlyNorms(TorchFunctionMode):
    def __init__(self, tallying: Callable[[], bool]):
        super().__init__()
        self.tallying = tallying

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        x = args[0] if args else None
        if func in _NORM_FUNCTIONS and isinstance(x, torch.Tensor) and x.is_meta and not self.tallying():
            nhwc = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
            return torch.empty_like(x, memory_format=torch.channels_last if nhwc else torch.contiguous_format)
        return func(*args, **(kwargs or {}))


@dataclass(frozen=True)
class Counts:
    """What one forward pass at batch 1 costs. Per-module figures are keyed by the attention module's path."""

    params: int
    macs: int
    output_shapes: tuple[tuple[int, ...], ...]
    attention_macs: dict[str, int]
    attention_elementwise: dict[str, int]

    @property
    def attention_elementwise_ops(self) -> int:
        return sum(self.attention_elementwise.values())


class _Tally(TorchDispatchMode):
    """Adds the elementwise work of every op it sees to ``ops[path]``."""

    def __init__(self, ops: dict[str, int], path: str):
        super().__init__()
        self.ops, self.path = ops, path

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        if torch.Tag.reduction in func.tags or func in _POOLS:
            self.ops[self.path] += args[0].numel()
        elif torch.Tag.pointwise in func.tags:
            self.ops[self.path] += out.numel()
        elif func in _NORMS:
            self.ops[self.path] += out[0].numel()
        return out


class ElementwiseCounter:
    """Counts elementwise and reduction work done inside the given modules, by outermost module path. The counting
    dispatch mode is active only inside those modules, so the rest of the forward pays nothing."""

    def __init__(self, modules: dict[str, nn.Module]):
        self.ops: dict[str, int] = dict.fromkeys(modules, 0)
        self._active: list[tuple[nn.Module, _Tally]] = []
        self._handles: list[Any] = []
        for path, m in modules.items():
            self._handles.append(m.register_forward_pre_hook(lambda module, _, p=path: self._enter(module, p)))
            self._handles.append(m.register_forward_hook(lambda module, *_: self._exit(module)))

    def _enter(self, module: nn.Module, path: str) -> None:  # hooks return None: a value would replace the input
        if not self._active:
            tally = _Tally(self.ops, path)
            tally.__enter__()
            self._active.append((module, tally))

    def _exit(self, module: nn.Module) -> None:
        if self._active and self._active[-1][0] is module:
            self._active.pop()[1].__exit__(None, None, None)

    def tallying(self) -> bool:
        """Whether a counted module's forward is running now."""
        return bool(self._active)

    def __enter__(self) -> ElementwiseCounter:
        return self

    def __exit__(self, *exc: Any) -> None:
        while self._active:
            self._active.pop()[1].__exit__(None, None, None)
        for h in self._handles:
            h.remove()


def count_params(model: nn.Module) -> int:
    """Number of distinct parameters (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters())


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Outermost channel-attention modules in `model`, by path."""
    found: dict[str, nn.Module] = {}
    for path, m in model.named_modules():
        if is_attention(m) and not any(path.startswith(f"{p}.") for p in found):
            found[path] = m
    return found


def count(model: nn.Module, input_size: tuple[int, int, int]) -> Counts:
    """Params, MACs and attention elementwise ops of `model` at batch 1, measured on a meta copy."""
    probe = as_meta(model)
    modules = attention_modules(probe)
    # FlopCounterMode's module tracker hooks the autograd graph of every module input that requires grad; a view of
    # a parameter made under no_grad (CaiT's expanded class token) requires grad but has no graph, and the hook fails.
    # Nothing here needs gradients: the parameters stop requiring them for the count.
    flags = [(p, p.requires_grad) for p in probe.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        with FlopCounterMode(display=False) as flops, ElementwiseCounter(modules) as elementwise, \
                _ShapeOnlyNorms(elementwise.tallying):
            out = run_meta(probe, input_size)
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
    per_module = flops.get_flop_counts()
    root = type(probe).__name__
    return Counts(
        params=count_params(model),
        macs=flops.get_total_flops() // 2,
        output_shapes=output_shapes(out),
        attention_macs={p: sum(per_module.get(f"{root}.{p}", {}).values()) // 2 for p in modules},
        attention_elementwise=elementwise.ops,
    )
