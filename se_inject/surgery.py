"""Applying a plan: build each site's attention module and put it in its block, keeping every existing key.

Two mechanics:

- fill a slot: the block's forward already calls ``self.<slot>`` at the SE place (timm's ``se`` attribute), so the
  module just goes there;
- rewrite the forward: the block is traced with torch.fx (children stay opaque), a call to the new child is inserted
  after (or before) the anchor child's call, and the block's class is swapped for a subclass running that graph. The
  block keeps all its children under their names, its methods and ``isinstance``; the new class is scriptable and
  exportable like torch.fx's own GraphModule code.

Either way the block's graph is then fused around a fusable module (`_fuse`), which changes how, not what, it
computes: a residual addition right after it is done in the same pass as its scaling, and where its input is
``bn(conv1x1(h))`` the squeeze may be taken from the narrower `h` (see `squeeze_excite.squeeze_through`).
"""

from __future__ import annotations

import copy
import inspect
import itertools
import linecache
import operator
import types
import typing
from contextlib import nullcontext
from typing import Any, Optional

import torch
import torch.fx
from torch import nn

from .errors import SurgeryError, describe
from .layers.attention import class_path, create_attention, init_attention
from .layers.squeeze_excite import squeeze_through
from .models import seeded
from .patterns import graph_key
from .plan import Plan, Site
from .schema import attribute_name_problem


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
        check_site_name(block, site)  # before any name reaches generated code
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


def check_site_name(block: nn.Module, site: Site) -> None:
    """The new module's attribute name becomes Python source in the rewritten forward: only a plain identifier
    that the block does not already have (``forward``, ``training``, a child) passes; a slot must be an attribute."""
    problem = attribute_name_problem(site.name)
    if problem is None and site.slot is None and hasattr(block, site.name):
        problem = f"the block already has an attribute {site.name!r}"
    elif problem is None and site.slot is not None and site.slot not in block._modules and site.slot not in vars(block):
        problem = f"the block has no slot {site.slot!r}"
    if problem:
        raise SurgeryError(f"plan site {site.path!r}: invalid module name: {problem}")
    for arg in site.fixed_args:  # parameter names end up in the traced forward's source too
        problem = attribute_name_problem(arg)
        if problem:
            raise SurgeryError(f"plan site {site.path!r}: invalid fixed argument name: {problem}")


def insert(block: nn.Module, site: Site, module: nn.Module) -> None:
    """Put `module` into `block` at the site's place."""
    if site.slot is not None:
        current = getattr(block, site.slot, None)
        if current is not None and not isinstance(current, nn.Identity):
            raise SurgeryError(f"{site.path}: slot {site.slot!r} already holds a {type(current).__name__}")
        setattr(block, site.slot, module)
        module.scale_inplace, fused = _slot_rewrite(block, site.slot, site.fixed_args)
        if fused is not None:
            block.__class__ = fused
    else:
        rewrite_forward(block, site, module)


_slot_rewrites: dict[tuple[Any, ...], tuple[bool, type | None]] = {}


def _slot_rewrite(block: nn.Module, slot: str, fixed: dict[str, Any]) -> tuple[bool, type | None]:
    """For a filled slot: whether the block's forward passes it a tensor nothing else reads (see `_only_reader`),
    and the fused class for the block, if fusing changes anything. Traced once per block class, configuration
    (its scalar attributes and its children's types and settings) and fixed arguments: the forward's graph depends
    only on these."""
    key = (graph_key(block), slot, tuple(sorted(fixed.items())))
    if key not in _slot_rewrites:
        try:
            graph, consistent = _trace_modes(block, set(), fixed)
        except Exception:  # an untraceable forward: the module just never scales in place
            _slot_rewrites[key] = (False, None)
        else:
            calls = [n for n in graph.nodes if n.op == "call_module" and n.target == slot]
            inplace = len(calls) == 1 and _only_reader(calls[0], block)
            fused = consistent and len(calls) == 1 and _fuse(graph, block, slot)
            _slot_rewrites[key] = (inplace, _rewritten_class(type(block), graph) if fused else None)
    return _slot_rewrites[key]


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


_FX_ASSERT_IS_NONE = getattr(torch.fx._symbolic_trace, "_assert_is_none", None)


def assert_is_none(value: Optional[Any], msg: str) -> None:  # noqa: UP045  (TorchScript reads the annotation)
    """torch.fx's guard for an argument specialised to None; fx annotates it ``object``, which TorchScript cannot
    compile."""
    if value is not None:
        raise AssertionError(msg)


def _type_hints(fn: Any) -> dict[str, Any]:
    try:
        return typing.get_type_hints(fn)
    except Exception:  # an annotation that does not resolve: the parameter stays unannotated
        return {}


def _trace_modes(
    block: nn.Module, open_paths: set[str], fixed: dict[str, Any] | None = None
) -> tuple[torch.fx.Graph, bool]:
    """The block's graph, and whether it is the same in training and eval mode (the forward does not branch on
    ``self.training``). Arguments in `fixed` are specialised on (torch.fx ``concrete_args``: the graph asserts their
    value) and keep their names, except integers where the trace does not need them: sizes such as XCiT's
    ``forward(x, H, W)`` stay arguments, so the model keeps running at any input size. Raises what tracing raises."""
    fixed = fixed or {}
    sizes = {name for name, value in fixed.items() if type(value) is int}
    if sizes:
        try:
            return _trace_both(block, open_paths, {k: v for k, v in fixed.items() if k not in sizes})
        except Exception:  # the forward branches on them (or needs them concrete): specialise on them too
            pass
    return _trace_both(block, open_paths, fixed)


def _trace_both(block: nn.Module, open_paths: set[str], fixed: dict[str, Any]) -> tuple[torch.fx.Graph, bool]:
    modes = [m.training for m in block.modules()]
    renamed = {f"{name}_1": name for name in fixed}
    hints = _type_hints(type(block).forward)
    try:
        graphs = []
        for training in (True, False):
            block.train(training)
            graph = _BlockTracer(open_paths).trace(block, concrete_args=dict(fixed) if fixed else None)
            for node in graph.nodes:  # torch.fx names a specialised parameter `name_1`; callers may pass `name=`
                if node.op == "placeholder" and node.target in renamed:
                    node.target = renamed[node.target]
                    node.type = hints.get(node.target)  # fx drops a specialised parameter's annotation
                elif node.op == "placeholder" and isinstance(node.type, str):  # a postponed annotation ("int")
                    node.type = hints.get(str(node.target).lstrip("*"))
                elif node.op == "call_function" and node.target is _FX_ASSERT_IS_NONE:
                    node.target = assert_is_none  # the same guard, in a form TorchScript compiles
            graphs.append(graph)
    finally:
        for m, training in zip(block.modules(), modes, strict=True):
            m.training = training
    train_code, eval_code = (g.python_code(root_module="self").src for g in graphs)
    return graphs[0], train_code == eval_code


def _open_paths(anchor: str) -> set[str]:
    """The containers on the way to a nested anchor (``"conv.1"`` -> ``{"conv"}``): traced through, not opaque."""
    parts = anchor.split(".") if anchor and not anchor.startswith("%") else []
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def _trace(block: nn.Module, anchor: str, path: str, fixed: dict[str, Any]) -> torch.fx.Graph:
    open_paths = _open_paths(anchor)
    try:
        graph, consistent = _trace_modes(block, open_paths, fixed)
    except Exception as e:
        raise SurgeryError(
            f"{path}: cannot trace {class_path(block)}.forward with torch.fx ({type(e).__name__}: {describe(e)})"
        ) from e
    if not consistent:
        raise SurgeryError(f"{path}: {class_path(block)}.forward branches on self.training; cannot rewrite it")
    return graph


def rewrite_forward(block: nn.Module, site: Site, module: nn.Module) -> None:
    """Swap `block`'s class for a subclass whose forward also calls `module` (added as child ``site.name``).

    The rewritten class is computed once per block configuration (`graph_key`), site place and module kind: blocks
    alike (a stage's repeated blocks) take the class of the first without being traced again."""
    key = (graph_key(block, _open_paths(site.anchor)), site.anchor, site.position, site.name,
           tuple(sorted(site.fixed_args.items())), type(module), getattr(module, "fusable", False))
    if key in _rewrites:
        cls, module.scale_inplace = _rewrites[key]
        block.add_module(site.name, module)
        block.__class__ = cls
        return
    try:
        graph = _trace(block, site.anchor, site.path, site.fixed_args)
    except SurgeryError:
        if site.anchor or site.fixed_args or not _wrappable(type(block)):
            raise
        block.add_module(site.name, module)  # SE on the output (input) of a forward fx cannot trace (BatchNorm2d)
        block.__class__ = _wrapped_class(type(block), site.name, site.position)
        return
    if site.anchor.startswith("%"):  # a graph node of a structural match (see se_inject.patterns.Place)
        calls = [n for n in graph.nodes if n.name == site.anchor[1:]]
        if len(calls) != 1:
            raise SurgeryError(f"{site.path}: no node {site.anchor[1:]!r} in the traced forward")
        anchor = calls[0]
    elif site.anchor:
        calls = [n for n in graph.nodes if n.op == "call_module" and n.target == site.anchor]
        if len(calls) != 1:
            raise SurgeryError(f"{site.path}: expected one call of {site.anchor!r} in the forward, found {len(calls)}")
        anchor = calls[0]
    else:
        anchor = next(n for n in graph.nodes if n.op == "output")
        if not isinstance(anchor.args[0], torch.fx.Node):
            raise SurgeryError(f"{site.path}: the block returns a {type(anchor.args[0]).__name__}, not one tensor")
    if site.position == "before" and not site.anchor:  # on the block's input (its first argument)
        source = next(n for n in graph.nodes if n.op == "placeholder")
        last = [n for n in graph.nodes if n.op == "placeholder"][-1]
        with graph.inserting_after(last):
            call = graph.call_module(site.name, (source,))
        source.replace_all_uses_with(call, delete_user_cb=lambda user: user is not call)
    elif site.position == "after" and site.anchor:
        with graph.inserting_after(anchor):
            call = graph.call_module(site.name, (anchor,))
        anchor.replace_all_uses_with(call, delete_user_cb=lambda user: user is not call)
    else:  # before the anchor: "before X", or "after" the block itself = before its output
        source = anchor.args[0]
        with graph.inserting_before(anchor):
            call = graph.call_module(site.name, (source,))
        anchor.args = (call, *anchor.args[1:])
    block.add_module(site.name, module)
    module.scale_inplace = _only_reader(call, block)
    _fuse(graph, block, site.name)
    graph.lint()
    cls = _rewritten_class(type(block), graph)
    _rewrites[key] = cls, module.scale_inplace
    block.__class__ = cls


_rewrites: dict[tuple[Any, ...], tuple[type, bool]] = {}


# --- fusing the block around the attention module -----------------------------------------------------------------

_ADDITIONS = {operator.add, operator.iadd, torch.add}


def _fuse(graph: torch.fx.Graph, block: nn.Module, name: str) -> bool:
    """Rewrite the single call of the fusable module `name` in `graph`; whether anything changed.

    - residual: when the module's output is read only by an addition of two tensors (``out += shortcut``), the
      addition moves into the module, which computes ``shortcut + x * s`` in one pass (and in place where its
      input is its own, see `_only_reader`) instead of scaling the map and then reading it again to add;
    - squeezed: when its input is ``bn(conv1x1(h))``, the block passes ``squeeze_through(h, ...)``, which the
      module uses instead of its own squeeze where that is cheaper (see there).
    """
    module = block.get_submodule(name)
    calls = [n for n in graph.nodes if n.op == "call_module" and n.target == name]
    if not getattr(module, "fusable", False) or len(calls) != 1 or len(calls[0].args) != 1 or calls[0].kwargs:
        return False
    call = calls[0]
    kwargs: dict[str, Any] = {}
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
    if not kwargs:
        return False
    with graph.inserting_before(place):
        fused = graph.call_module(name, call.args, kwargs)
    place.replace_all_uses_with(fused)
    if addition is not None:
        graph.erase_node(addition)
    graph.erase_node(call)
    return True


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


def _wrappable(cls: type) -> bool:
    """Whether `cls.forward` takes plain parameters only (a wrapper's forward can then repeat its signature)."""
    try:
        params = list(inspect.signature(cls.forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return False
    return bool(params) and all(p.kind is p.POSITIONAL_OR_KEYWORD and p.name.isidentifier() for p in params)


def _wrapped_class(cls: type, name: str, position: str) -> type:
    """A subclass of `cls` whose forward calls the module `name` on the output (`position` "after") or the first
    input ("before") of the class's own forward, kept as method ``se_inject_forward`` so TorchScript compiles it."""
    problem = attribute_name_problem(name)  # it becomes source code below
    if problem:
        raise SurgeryError(f"invalid module name: {problem}")
    key = (cls, f"wrap {name} {position}")
    if key not in _classes:
        base = getattr(cls, "__se_inject_base__", cls)
        params = list(inspect.signature(cls.forward).parameters)[1:]
        args = ", ".join(params)
        call = (f"self.{name}(self.se_inject_forward({args}))" if position == "after"
                else f"self.se_inject_forward(self.{name}({params[0]}){''.join(f', {p}' for p in params[1:])})")
        src = f"def forward(self, {args}):\n    return {call}\n"
        filename = f"<se-inject {base.__qualname__} #{next(_counter)}>"
        linecache.cache[filename] = (len(src), None, src.splitlines(keepends=True), filename)
        namespace: dict[str, Any] = {}
        exec(compile(src, filename, "exec"), namespace)
        forward, inner = namespace["forward"], cls.forward
        forward.__annotations__ = dict(inner.__annotations__)
        renamed = types.FunctionType(inner.__code__, inner.__globals__, "se_inject_forward", inner.__defaults__,
                                     inner.__closure__)  # TorchScript compiles a method under its function's name
        renamed.__annotations__, renamed.__qualname__ = inner.__annotations__, inner.__qualname__
        _classes[key] = type(base.__name__, (cls,), {"forward": forward, "se_inject_forward": renamed,
                                                     "__se_inject_base__": base, "__module__": __name__})
    return _classes[key]
