"""Exact cache keys for modules, and the bounded caches that use them.

A traced forward depends on the code it runs and on every Python value that code reads while tracing: its own
attributes of any type, its children's attributes (``self.conv.stride``, ``self.downsample is None``), the names and
presence of its parameters and buffers. `module_key` captures all of that, exactly, for the whole subtree: two
modules with equal keys trace to the same graph. The code is each class's, not the class object: every method the
class defines or inherits (its ``__code__``, defaults and closure) and the module-level names that code reads (a
function by its code, any other object as `freeze` keys it), so a class whose ``forward`` is patched in-process keys
differently. A value it cannot capture exactly (a tensor attribute, an object with value equality it does not know,
a method that is not a plain function) makes the module unkeyable (None), and callers then do the work uncached: a
wrong hit is impossible, not unlikely. (What code reaches through a module, ``F.relu``, is keyed by that module.)
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
    if kind is types.FunctionType:
        return kind, function_key(value)
    by_identity = kind.__eq__ is object.__eq__ and kind.__hash__ is object.__hash__
    if by_identity or isinstance(value, types.BuiltinFunctionType):  # a builtin function: by its owner and name
        return "object", value
    raise _Unkeyable


def function_key(fn: types.FunctionType, _open: frozenset[int] = frozenset()) -> Hashable:
    """What calling `fn` runs: its code, defaults and closure (a function there keyed the same way; one already
    being keyed, by its identity), and the module-level names its code reads: a function there by its identity and
    code (so rebinding the name or replacing the code changes the key), any other value as `freeze` keys it."""
    if id(fn) in _open:
        return "recursive", fn
    inner = _open | {id(fn)}

    def value_key(value: Any) -> Hashable:
        if type(value) is types.FunctionType:
            return function_key(value, inner)
        if isinstance(value, tuple):
            return tuple(value_key(v) for v in value)
        return freeze(value)

    def global_key(value: Any) -> Hashable:
        return ("function", value, value.__code__) if type(value) is types.FunctionType else freeze(value)

    code, names = fn.__code__, fn.__globals__
    cells = tuple(value_key(_cell_contents(cell)) for cell in fn.__closure__ or ())
    used = tuple((name, global_key(names[name])) for name in _names_read(code) if name in names)
    return code, value_key(fn.__defaults__), freeze(fn.__kwdefaults__), cells, used


def _names_read(code: types.CodeType) -> dict[str, None]:
    """The global and attribute names `code` and the code nested in it (lambdas, comprehensions) read, in order."""
    names = dict.fromkeys(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names.update(_names_read(const))
    return names


def _cell_contents(cell: Any) -> Any:
    try:
        return cell.cell_contents
    except ValueError:  # a cell not yet assigned
        return None


def class_key(cls: type, memo: dict[type, Hashable] | None = None) -> Hashable:
    """A class and the code of every method it defines or inherits (below ``nn.Module``, whose machinery calls
    them; ``__init__`` aside, as the state it made is keyed): equal keys, the same code runs. Raises `_Unkeyable`
    where some value that code reads cannot be keyed exactly."""
    if memo is not None and cls in memo:
        return memo[cls]
    items: list[Hashable] = [cls]
    for base in cls.__mro__:
        if base is nn.Module or base is object:
            continue
        for name, value in vars(base).items():
            if name == "__init__":
                continue
            if isinstance(value, (staticmethod, classmethod)):
                value = value.__func__
            if type(value) is types.FunctionType:
                items.append((base, name, function_key(value)))
            elif isinstance(value, property):
                items.append((base, name, *(function_key(f) if type(f) is types.FunctionType else freeze(f)
                                            for f in (value.fget, value.fset))))
    key = tuple(items)
    if memo is not None:
        memo[cls] = key
    return key


def code_key(cls: type) -> Hashable | None:
    """`class_key`, or None when the class's code cannot be keyed exactly."""
    try:
        return class_key(cls)
    except _Unkeyable:
        return None


def _tensor_slot(value: torch.Tensor | None) -> Hashable:
    if value is None:
        return None
    return type(value), tuple(value.shape), value.dtype, value.requires_grad


def _module_state(
    module: nn.Module, own_only: bool, coarse: Callable[[Any], Hashable] | None, modes: bool,
    memo: dict[type, Hashable],
) -> Hashable:
    items: list[Hashable] = [class_key(type(module), memo), module.training if modes else None]
    for name, value in sorted(vars(module).items()):
        if name in _BOOKKEEPING or name == "training":
            continue
        if name in ("_parameters", "_buffers"):
            items.append((name, tuple((k, _tensor_slot(v)) for k, v in value.items())))
        elif name == "_non_persistent_buffers_set":
            items.append((name, frozenset(value)))
        elif name == "_modules":
            items.append((name, tuple(
                (k, None if child is None else class_key(type(child), memo) if own_only
                 else _module_state(child, False, coarse, modes, memo))
                for k, child in value.items()
            )))
        elif coarse is not None and type(value) is float:
            items.append((name, coarse(value)))
        else:
            items.append((name, freeze(value)))
    return tuple(items)


def module_key(module: nn.Module, *, modes: bool = True) -> Hashable | None:
    """The exact state of `module`'s subtree that a trace of its forward can read, its classes' code included (see
    the module docstring), or None when some value cannot be keyed exactly. Without `modes`, the training flags are
    left out: for callers that trace in both modes and require the same graph."""
    try:
        return _module_state(module, False, None, modes, {})
    except _Unkeyable:
        return None


def config_key(module: nn.Module, coarse: Callable[[Any], Hashable]) -> Hashable | None:
    """Like `module_key`, but the float attributes of descendants pass through `coarse` (the module's own stay
    exact); None when some value cannot be keyed exactly."""
    memo: dict[type, Hashable] = {}
    try:
        own = _module_state(module, True, None, True, memo)
        return own, tuple((path, _module_state(m, True, coarse, True, memo))
                          for path, m in module.named_modules() if path)
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
