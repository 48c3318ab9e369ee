"""Exact cache keys for modules, and the bounded caches that use them.

A traced forward depends on the block's class and on every Python value its forward reads while tracing: its own
attributes of any type, its children's attributes (``self.conv.stride``, ``self.downsample is None``), the names and
presence of its parameters and buffers. `module_key` captures all of that, exactly, for the whole subtree: two
modules with equal keys trace to the same graph. A value it cannot capture exactly (a tensor attribute, an object
with value equality it does not know) makes the module unkeyable (None), and callers then do the work uncached:
a wrong hit is impossible, not unlikely.
"""

from __future__ import annotations

import dataclasses
import enum
import types
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar

import torch
from torch import nn

# nn.Module's own bookkeeping: hooks do not change what the forward computes when traced (a block's own hooks are
# not called by tracing, its children's run as they are); the training flag is keyed separately where it matters.
_BOOKKEEPING = frozenset(vars(nn.Module())) - {"_parameters", "_buffers", "_modules", "_non_persistent_buffers_set"}


class _Unkeyable(Exception):
    pass


def freeze(value: Any) -> Hashable:
    """An exact, hashable stand-in for an attribute value: equal stand-ins mean equal values of the same type.

    Scalars, strings, containers, enums, dtypes and devices are keyed by value (``1``, ``1.0`` and ``True`` stay
    apart; floats by their exact bits); functions, classes and other objects that compare by identity, by
    identity. Raises `_Unkeyable` for anything else (tensors, objects with their own equality)."""
    kind = type(value)
    if value is None or kind in (bool, int, str, bytes):
        return kind, value
    if kind is float:
        return kind, value.hex()
    if isinstance(value, enum.Enum):
        return kind, value.name
    if isinstance(value, (tuple, list)):
        return kind, tuple(freeze(v) for v in value)
    if isinstance(value, dict):
        return kind, tuple((freeze(k), freeze(v)) for k, v in value.items())
    if isinstance(value, (set, frozenset)):
        return kind, frozenset(freeze(v) for v in value)
    if isinstance(value, (torch.dtype, torch.device, torch.layout, torch.memory_format)):
        return kind, str(value)
    if isinstance(value, (torch.Tensor, nn.Module)):
        raise _Unkeyable
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return kind, tuple(freeze(getattr(value, f.name)) for f in dataclasses.fields(value))
    if isinstance(value, types.SimpleNamespace):
        return kind, freeze(vars(value))
    by_identity = kind.__eq__ is object.__eq__ and kind.__hash__ is object.__hash__
    if by_identity or isinstance(value, types.BuiltinFunctionType):  # a builtin function: by its owner and name
        return "object", value
    raise _Unkeyable


def _tensor_slot(value: torch.Tensor | None) -> Hashable:
    if value is None:
        return None
    return type(value), tuple(value.shape), value.dtype, value.requires_grad


def _module_state(
    module: nn.Module, own_only: bool, coarse: Callable[[Any], Hashable] | None, modes: bool = True
) -> Hashable:
    items: list[Hashable] = [type(module), module.training if modes else None]
    for name, value in sorted(vars(module).items()):
        if name in _BOOKKEEPING or name == "training":
            continue
        if name in ("_parameters", "_buffers"):
            items.append((name, tuple((k, _tensor_slot(v)) for k, v in value.items())))
        elif name == "_non_persistent_buffers_set":
            items.append((name, frozenset(value)))
        elif name == "_modules":
            items.append((name, tuple(
                (k, None if child is None else type(child) if own_only else _module_state(child, False, coarse, modes))
                for k, child in value.items()
            )))
        elif coarse is not None and type(value) is float:
            items.append((name, coarse(value)))
        else:
            items.append((name, freeze(value)))
    return tuple(items)


def module_key(module: nn.Module, *, modes: bool = True) -> Hashable | None:
    """The exact state of `module`'s subtree that a trace of its forward can read (see the module docstring), or
    None when some value cannot be keyed exactly. Without `modes`, the training flags are left out: for callers
    that trace in both modes and require the same graph."""
    try:
        return _module_state(module, False, None, modes)
    except _Unkeyable:
        return None


def config_key(module: nn.Module, coarse: Callable[[Any], Hashable]) -> Hashable | None:
    """Like `module_key`, but the float attributes of descendants pass through `coarse` (the module's own stay
    exact); None when some value cannot be keyed exactly."""
    try:
        own = _module_state(module, True, None)
        return own, tuple((path, _module_state(m, True, coarse)) for path, m in module.named_modules() if path)
    except _Unkeyable:
        return None


K = TypeVar("K")
V = TypeVar("V")
_MISSING = object()


class BoundedCache(Generic[K, V]):
    """A least-recently-used mapping of at most `maxsize` entries: process-wide caches that hold classes and graphs
    must not pin them forever."""

    def __init__(self, maxsize: int):
        self.maxsize = maxsize
        self._data: OrderedDict[K, V] = OrderedDict()

    def get(self, key: K, default: Any = None) -> Any:
        value = self._data.get(key, _MISSING)
        if value is _MISSING:
            return default
        self._data.move_to_end(key)
        return value

    def __contains__(self, key: K) -> bool:
        return key in self._data

    def __setitem__(self, key: K, value: V) -> None:
        self._data[key] = value
        self._data.move_to_end(key)
        while len(self._data) > self.maxsize:
            self._data.popitem(last=False)

    def __len__(self) -> int:
        return len(self._data)

    def clear(self) -> None:
        self._data.clear()
