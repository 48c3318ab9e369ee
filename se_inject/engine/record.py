"""Recording how each block is called: the planning forward's pre-hooks turn a block's arguments into a `Call`
(tensors kept as shape and dtype, works on the meta device), which verification rebuilds as random inputs and the
surgery specialises the trace on (non-tensor arguments such as ``shortcut=None``)."""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

FIXED_TYPES = (bool, int, float, str, type(None))  # argument values tracing specialises on (and a plan may hold)


@dataclass(frozen=True)
class TensorArg:
    """A recorded tensor argument: its shape, dtype, and which recorded tensor it is (the same tensor passed twice
    has the same `alias`)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    alias: int


class Opaque:
    """A recorded argument se-inject cannot rebuild (an arbitrary object)."""

    def __init__(self, value: Any):
        self.kind = type(value).__name__

    def __repr__(self) -> str:
        return f"<{self.kind}>"


@dataclass(frozen=True)
class Call:
    """How a block's parent called it (recorded by a forward pre-hook with ``with_kwargs=True``)."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]

    def fixed(self, forward: Any) -> dict[str, Any]:
        """The forward's parameters bound to a non-tensor value in this call (defaults included), by name: tracing
        specialises on these, and a call with other values fails the trace's own assertion instead of silently
        taking the other branch."""
        try:
            bound = inspect.signature(forward).bind(*self.args, **self.kwargs)
        except (TypeError, ValueError):
            return {}
        bound.apply_defaults()
        plain = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                 inspect.Parameter.KEYWORD_ONLY)
        params = bound.signature.parameters
        return {
            name: value for name, value in bound.arguments.items()
            if params[name].kind in plain and isinstance(value, FIXED_TYPES)
        }

    def first_tensor(self) -> TensorArg | None:
        return next((leaf for leaf in leaves((self.args, self.kwargs)) if isinstance(leaf, TensorArg)), None)

    def signature(self) -> str:
        """A hashable description: tensors by rank and dtype, other values as they are."""
        return repr(_describe((self.args, self.kwargs)))

    def opaque(self) -> str | None:
        """The type of the first argument that cannot be rebuilt, if any."""
        for leaf in leaves((self.args, self.kwargs)):
            if isinstance(leaf, Opaque):
                return leaf.kind
        return None

    def build(
        self, batch: int, generator: torch.Generator | None, shrink: int = 1, grow: int = 1,
        channels_last: bool = False,
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Random inputs shaped like the recorded ones, with a batch dimension of 1 widened to `batch` and the
        spatial dimensions of NCHW tensors (NHWC with `channels_last`) divided by `shrink` (multiplied by `grow`);
        without a generator, empty tensors on the meta device (shapes only)."""
        spatial = slice(-3, -1) if channels_last else slice(-2, None)
        made: dict[int, torch.Tensor] = {}

        def make(value: Any) -> Any:
            if isinstance(value, TensorArg):
                if value.alias not in made:
                    shape = list(value.shape)
                    if shape and shape[0] == 1:
                        shape[0] = batch
                    if len(shape) in (4, 5):  # NCHW, or NCTHW (video: the frames stay)
                        shape[spatial] = [d // shrink * grow for d in shape[spatial]]
                    if generator is None:
                        made[value.alias] = torch.empty(shape, dtype=value.dtype, device="meta")
                    elif value.dtype.is_floating_point:
                        made[value.alias] = torch.randn(shape, generator=generator, dtype=torch.float32)
                    else:
                        made[value.alias] = torch.zeros(shape, dtype=value.dtype)
                return made[value.alias]
            return map_values(value, make)

        return make(self.args), make(self.kwargs)

    def shrink_factor(self, smallest: int = 4, channels_last: bool = False) -> int:
        """The largest factor dividing every recorded NCHW (`channels_last`: NHWC) tensor's height and width that
        leaves them at least `smallest` (1 when none does): the check runs on small maps of the same proportions."""
        spatial = slice(-3, -1) if channels_last else slice(-2, None)
        dims = [d for leaf in leaves((self.args, self.kwargs))
                if isinstance(leaf, TensorArg) and len(leaf.shape) in (4, 5) for d in leaf.shape[spatial]]
        if not dims:
            return 1
        common = math.gcd(*dims)
        return max((f for f in range(1, common + 1) if common % f == 0 and min(dims) // f >= smallest), default=1)


def map_values(value: Any, fn: Any) -> Any:
    if isinstance(value, tuple):
        return tuple(fn(v) for v in value)
    if isinstance(value, list):
        return [fn(v) for v in value]
    if isinstance(value, dict):
        return {k: fn(v) for k, v in value.items()}
    return value


def leaves(value: Any) -> Iterable[Any]:
    if isinstance(value, (tuple, list)):
        for v in value:
            yield from leaves(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from leaves(v)
    else:
        yield value


def _describe(value: Any) -> Any:
    if isinstance(value, TensorArg):
        return ("tensor", len(value.shape), str(value.dtype), value.alias)
    if isinstance(value, (tuple, list, dict)):
        return (type(value).__name__, map_values(value, _describe))
    return value if isinstance(value, FIXED_TYPES) else repr(value)


def record_call(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Call:
    """A `Call` from a forward pre-hook's arguments (tensors become `TensorArg`s; works on the meta device)."""
    aliases: dict[int, int] = {}

    def convert(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            alias = aliases.setdefault(id(value), len(aliases))
            return TensorArg(tuple(value.shape), value.dtype, alias)
        if isinstance(value, (tuple, list, dict)):
            return map_values(value, convert)
        return value if isinstance(value, FIXED_TYPES) else Opaque(value)

    return Call(convert(tuple(args)), convert(dict(kwargs)))


