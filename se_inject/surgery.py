"""Applying a plan: build each site's attention module and put it in its block, keeping every existing key.

Two mechanics:

- fill a slot: the block's forward already calls ``self.<slot>`` at the SE place (timm's ``se`` attribute), so the
  module just goes there;
- rewrite the forward: the block is traced with torch.fx (children stay opaque), a call to the new child is inserted
  after (or before) the anchor child's call, and the block's class is swapped for a subclass running that graph. The
  block keeps all its children under their names, its methods and ``isinstance``; the new class is scriptable and
  exportable like torch.fx's own GraphModule code.
"""

from __future__ import annotations

import copy
import itertools
import linecache
import operator
from contextlib import nullcontext
from typing import Any

import torch
import torch.fx
from torch import nn

from .attention import create_attention, init_attention
from .errors import SurgeryError
from .find import class_path
from .models import seeded
from .plan import Plan, Site


def apply_plan(model: nn.Module, plan: Plan, *, inplace: bool = False) -> nn.Module:
    """Insert every site of `plan` into `model` (a copy unless `inplace`) and return it.

    New modules take the block's device and dtype; their initial values depend only on ``plan.seed`` and the site
    order, so replaying a plan gives the same modules.
    """
    if not inplace:
        model = copy.deepcopy(model)
    for site in plan.sites:
        try:
            block = model.get_submodule(site.path)
        except AttributeError:
            raise SurgeryError(f"plan site {site.path!r}: the model has no such module") from None
        if class_path(block) != site.block:
            raise SurgeryError(f"plan site {site.path!r}: expected a {site.block}, found a {class_path(block)}")
    real = [site for site in plan.sites if not _is_meta(model.get_submodule(site.path))]
    modules: dict[str, nn.Module] = {}
    with seeded(plan.seed) if real else nullcontext():
        for site in plan.sites:
            block = model.get_submodule(site.path)
            device, dtype = _device_dtype(block, model)
            if device.type == "meta":
                modules[site.path] = create_attention(site.attention, device="meta", dtype=dtype)
            else:  # built on the CPU so values do not depend on the device's RNG
                module = create_attention(site.attention)
                init_attention(module, plan.init)
                modules[site.path] = module.to(device=device, dtype=dtype)
    for site in plan.sites:
        insert(model.get_submodule(site.path), site, modules[site.path])
    return model


def insert(block: nn.Module, site: Site, module: nn.Module) -> None:
    """Put `module` into `block` at the site's place."""
    if site.slot is not None:
        current = getattr(block, site.slot, None)
        if current is not None and not isinstance(current, nn.Identity):
            raise SurgeryError(f"{site.path}: slot {site.slot!r} already holds a {type(current).__name__}")
        setattr(block, site.slot, module)
        module.scale_inplace = _slot_reads_alone(block, site.slot)
    else:
        rewrite_forward(block, site, module)


_slot_verdicts: dict[tuple[Any, ...], bool] = {}


def _slot_reads_alone(block: nn.Module, slot: str) -> bool:
    """Whether the block's own forward passes the slot a tensor nothing else reads (see `_only_reader`). Traced
    once per block class and configuration: the forward's branches depend only on these."""
    config = tuple(
        (name, type(value).__name__ if isinstance(value, nn.Module) else value)
        for name, value in sorted({**vars(block), **block._modules}.items())
        if not name.startswith("_") and (isinstance(value, (nn.Module, int, float, bool, str)) or value is None)
    )
    key = (type(block), slot, config)
    if key not in _slot_verdicts:
        try:
            graph = _BlockTracer(set()).trace(block)
        except Exception:  # an untraceable forward: the module just never scales in place
            _slot_verdicts[key] = False
        else:
            calls = [n for n in graph.nodes if n.op == "call_module" and n.target == slot]
            _slot_verdicts[key] = len(calls) == 1 and _only_reader(calls[0], block)
    return _slot_verdicts[key]


def _only_reader(call: torch.fx.Node, block: nn.Module) -> bool:
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


_FRESH = {torch.cat, torch.add, operator.add, operator.mul, torch.mul}
_PASS_THROUGH = {torch.relu, torch.nn.functional.relu, torch.nn.functional.silu, torch.sigmoid}


def _is_meta(module: nn.Module) -> bool:
    return any(t.is_meta for t in itertools.chain(module.parameters(), module.buffers()))


def _device_dtype(block: nn.Module, model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for source in (block, model):
        for t in itertools.chain(source.parameters(), source.buffers()):
            if t.is_floating_point():
                return t.device, t.dtype
    return torch.device("cpu"), torch.get_default_dtype()


# --- forward rewriting -------------------------------------------------------------------------------------------


class _BlockTracer(torch.fx.Tracer):
    """Traces one block; every child is a leaf except the containers on the way to the anchor."""

    def __init__(self, open_paths: set[str]):
        super().__init__()
        self.open_paths = open_paths

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name not in self.open_paths


def _trace(block: nn.Module, anchor: str, path: str) -> torch.fx.Graph:
    parts = anchor.split(".") if anchor else []
    open_paths = {".".join(parts[:i]) for i in range(1, len(parts))}
    modes = [m.training for m in block.modules()]
    try:
        graphs = []
        for training in (True, False):
            block.train(training)
            graphs.append(_BlockTracer(open_paths).trace(block))
    except Exception as e:
        msg = str(e).strip().splitlines()
        raise SurgeryError(
            f"{path}: cannot trace {class_path(block)}.forward with torch.fx "
            f"({type(e).__name__}: {msg[0] if msg else ''})"
        ) from e
    finally:
        for m, training in zip(block.modules(), modes, strict=True):
            m.training = training
    train_code, eval_code = (g.python_code(root_module="self").src for g in graphs)
    if train_code != eval_code:
        raise SurgeryError(f"{path}: {class_path(block)}.forward branches on self.training; cannot rewrite it")
    return graphs[0]


def rewrite_forward(block: nn.Module, site: Site, module: nn.Module) -> None:
    """Swap `block`'s class for a subclass whose forward also calls `module` (added as child ``site.name``)."""
    graph = _trace(block, site.anchor, site.path)
    if site.anchor:
        calls = [n for n in graph.nodes if n.op == "call_module" and n.target == site.anchor]
        if len(calls) != 1:
            raise SurgeryError(f"{site.path}: expected one call of {site.anchor!r} in the forward, found {len(calls)}")
        anchor = calls[0]
    else:
        anchor = next(n for n in graph.nodes if n.op == "output")
        if not isinstance(anchor.args[0], torch.fx.Node):
            raise SurgeryError(f"{site.path}: the block returns a {type(anchor.args[0]).__name__}, not one tensor")
    if site.position == "after" and site.anchor:
        with graph.inserting_after(anchor):
            call = graph.call_module(site.name, (anchor,))
        anchor.replace_all_uses_with(call, delete_user_cb=lambda user: user is not call)
    else:  # before the anchor: "before X", or "after" the block itself = before its output
        source = anchor.args[0]
        with graph.inserting_before(anchor):
            call = graph.call_module(site.name, (source,))
        anchor.args = (call, *anchor.args[1:])
    block.add_module(site.name, module)
    graph.lint()
    module.scale_inplace = _only_reader(call, block)
    block.__class__ = _rewritten_class(type(block), graph)


_classes: dict[tuple[type, str], type] = {}
_counter = itertools.count()


def _rewritten_class(cls: type, graph: torch.fx.Graph) -> type:
    """A subclass of `cls` whose forward runs `graph`; one class per (class, code), reused across blocks."""
    code = graph.python_code(root_module="self")
    key = (cls, code.src)
    if key not in _classes:
        base = getattr(cls, "__se_inject_base__", cls)
        filename = f"<se-inject {base.__qualname__} #{next(_counter)}>"
        # Registered in linecache so inspect.getsource (TorchScript, tracebacks) can read it, as torch.fx does.
        linecache.cache[filename] = (len(code.src), None, code.src.splitlines(keepends=True), filename)
        namespace = dict(code.globals)
        exec(compile(code.src, filename, "exec"), namespace)
        _classes[key] = type(
            base.__name__,
            (cls,),
            {"forward": namespace["forward"], "__se_inject_base__": base, "__module__": __name__},
        )
    return _classes[key]
