"""Meta-device helpers: copies of a model that hold no data, and the forward pass that measures shapes and counts.

A model on the ``meta`` device costs no memory and runs in a fraction of a second even at billions of parameters;
finding, measuring and the memory estimate all work on such copies.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..errors import SEInjectError, describe
from .tasks import example_inputs, forward


def is_meta(module: nn.Module) -> bool:
    """Whether `module` holds a parameter or buffer on the meta device: it has no data to run on for real (a module
    without tensors has data enough)."""
    return any(t.is_meta for t in itertools.chain(module.parameters(), module.buffers()))


@contextmanager
def training_flags(module: nn.Module) -> Iterator[nn.Module]:
    """Within the block, `module` and its submodules may change modes (``eval()``, ``train()``); on leaving it, each
    has its own ``training`` flag back."""
    modes = [(m, m.training) for m in module.modules()]
    try:
        yield module
    finally:
        for m, training in modes:
            m.training = training


def meta_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` whose parameters and buffers live on the meta device; no tensor data is copied."""
    memo: dict[int, Any] = {}
    for t in itertools.chain(model.parameters(), model.buffers()):
        if id(t) not in memo:
            meta = torch.empty_like(t, device="meta")
            memo[id(t)] = nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else meta
    return copy.deepcopy(model, memo)


def as_meta(model: nn.Module) -> nn.Module:
    """`model` itself when it is already on the meta device (nothing to protect), else a meta copy."""
    return model if is_meta(model) else meta_copy(model)


def output_shapes(output: Any) -> tuple[tuple[int, ...], ...]:
    """Shapes of every tensor in a forward's output (tensors, tuples, lists, dicts), in order."""
    if isinstance(output, torch.Tensor):
        return (tuple(output.shape),)
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        return tuple(shape for item in output for shape in output_shapes(item))
    return ()


def run_meta(model: nn.Module, input_size: tuple[int, ...]) -> Any:
    """Forward a meta-device `model` in eval mode at batch 1 (training flags restored) on the task's example input
    (`tasks.example_inputs`; a detector up to its backbone); returns the output. Failures raise SEInjectError."""
    dtype = next((t.dtype for t in model.parameters() if t.is_floating_point()), torch.get_default_dtype())
    try:
        args = example_inputs(model, input_size, device="meta", dtype=dtype)
        with torch.no_grad(), training_flags(model):
            return forward(model.eval(), args)
    except SEInjectError:
        raise
    except Exception as e:
        raise SEInjectError(
            f"the model does not run on the meta device at input size {'x'.join(map(str, input_size))}: "
            f"{describe(e, kind=True)}"
        ) from e
