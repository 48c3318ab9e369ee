"""A block's forward as a torch.fx graph, every child opaque (one node per child call), and the shape of one node's
value on given inputs: what structural matching (`engine.patterns`) reads and what measuring a ``%node`` anchor
(`engine.find`) runs. Both are cached per exact block state (`module_key`).
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import torch
import torch.fx
from torch import nn

from .keys import BoundedCache, module_key

__all__ = ["node_output_shape", "trace_block"]


class _OpaqueTracer(torch.fx.Tracer):
    """Every child module is one node."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


_traces: BoundedCache[Hashable, torch.fx.Graph | None] = BoundedCache(2048)


def trace_block(block: nn.Module) -> torch.fx.Graph | None:
    """The block's forward traced with every child opaque, or None when torch.fx cannot trace it. Cached by the
    block's exact state (`module_key`), so a model with 50 identical blocks is traced once."""
    key = module_key(block)
    graph = _traces.get(key, False) if key is not None else False
    if graph is False:
        try:
            graph = _OpaqueTracer().trace(block)
        except Exception:  # data-dependent control flow, unsupported arguments, ...: no structural match
            graph = None
        if key is not None:
            _traces[key] = graph
    return graph


def node_output_shape(block: nn.Module, node_name: str, args: tuple[Any, ...]) -> tuple[int, ...] | None:
    """Shape of the value of graph node `node_name` when `block` runs on these (meta) inputs; computed once per
    exact block state (`module_key`), node and input shapes."""
    graph = trace_block(block)
    if graph is None:
        return None
    block_key = module_key(block)
    if block_key is None:
        return _run_to_node(block, graph, node_name, args)
    key = (block_key, node_name, tuple(tuple(a.shape) if isinstance(a, torch.Tensor) else repr(a) for a in args))
    if key not in _node_shapes:
        _node_shapes[key] = _run_to_node(block, graph, node_name, args)
    return _node_shapes.get(key)


_node_shapes: BoundedCache[Hashable, tuple[int, ...] | None] = BoundedCache(4096)


def _run_to_node(block: nn.Module, graph: torch.fx.Graph, node_name: str, args: tuple[Any, ...]) -> Any:
    module = torch.fx.GraphModule(block, graph)
    seen: dict[str, Any] = {}

    class _Recorder(torch.fx.Interpreter):
        def run_node(self, n: torch.fx.Node) -> Any:
            value = super().run_node(n)
            if n.name == node_name:
                seen["value"] = value
            return value

    try:
        _Recorder(module).run(*args)
    except Exception:
        return None
    value = seen.get("value")
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None
