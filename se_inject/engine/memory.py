"""Will one forward pass fit? An estimate from a meta-device forward, made before anything allocates real memory."""

from __future__ import annotations

import math
import os

from torch import nn

from ..errors import SEInjectError, UsageError
from .meta import as_meta, run_meta

CHEAP_ELEMENTS = 3 * 1024 * 1024  # inputs up to 3x1024x1024 are never checked: no model of ours needs the RAM


def forward_bytes(model: nn.Module, input_size: tuple[int, ...], batches: tuple[int, ...] = (1,)) -> int:
    """Rough peak memory of eval-mode forwards at each of `batches`, their inputs all kept (as an export keeps them):
    the weights, the inputs, and three times the largest activation of the largest batch (a block's input, its
    output and one temporary alive at once), measured on a meta copy at batch 1."""
    import torch

    probe = as_meta(model)
    largest = [0]

    def hook(_module: nn.Module, _args: object, out: object) -> None:
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                largest[0] = max(largest[0], t.numel() * t.element_size())

    handles = [m.register_forward_hook(hook) for m in probe.modules()]
    try:
        run_meta(probe, input_size)
    finally:
        for h in handles:
            h.remove()
    weights = sum(t.numel() * t.element_size() for t in (*probe.parameters(), *probe.buffers()))
    return weights + 4 * math.prod(input_size) * sum(batches) + 3 * largest[0] * max(batches)


def machine_memory() -> int | None:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_forward_memory(
    model: nn.Module, input_size: tuple[int, ...], *, batches: tuple[int, ...] = (1,),
    error: type[SEInjectError] = UsageError, what: str = "one forward pass",
) -> None:
    """Raise `error` when forwards at `batches` (inputs all kept) at `input_size` need more memory than this machine
    has. A dry run checks too: it verifies each rewrite on real tensors of its block's input size."""
    if math.prod(input_size) * max(batches) <= CHEAP_ELEMENTS:
        return
    need, have = forward_bytes(model, input_size, batches), machine_memory()
    if have is not None and need > have:
        size = "x".join(map(str, input_size))
        raise error(f"input size {size}: {what} needs about {need / 2**30:.0f} GiB, more than this "
                    f"machine's {have / 2**30:.0f} GiB; choose a smaller input_size (--input-size)")
