"""Applying a plan: build each site's attention module and put it in its block, keeping every existing key.

Two mechanics:

- fill a slot: the block's forward already calls ``self.<slot>`` at the SE place (timm's ``se`` attribute), so the
  module just goes there;
- rewrite the forward: the block is traced with torch.fx (children stay opaque), a call to the new child is inserted
  after (or before) the anchor child's call, and the block's class is swapped for a subclass running that graph. The
  block keeps all its children under their names, its methods and ``isinstance``; the new class is scriptable and
  exportable like torch.fx's own GraphModule code.

Either way the block's graph is then fused around a channel-gate module (`se_inject.fusion`), which changes how,
not what, it computes. Generated classes pickle, deep-copy and script (see *generated classes* below).
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import inspect
import itertools
import linecache
import types
import typing
from collections.abc import Hashable
from contextlib import nullcontext
from typing import Any, Optional

import torch
import torch.fx
from torch import nn

from ..errors import SurgeryError, describe
from ..layers.attention import class_path, create_attention, init_attention
from ..names import attribute_name_problem
from .build import seeded
from .fusion import fuse, fused_class, layer_class
from .keys import BoundedCache, code_key, freeze, module_key
from .meta import is_meta, training_flags
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
        check_site_name(block, site)  # before any name reaches generated code
    real = [site for site in plan.sites if not is_meta(model.get_submodule(site.path))]
    modules: list[nn.Module] = []  # one per site: several sites can share a block
    with seeded(plan.seed) if real else nullcontext():
        for site in plan.sites:
            block = model.get_submodule(site.path)
            device, dtype = _device_dtype(block, model)
            if device.type == "meta":
                modules.append(create_attention(site.attention, device="meta", dtype=dtype))
            else:  # built on the CPU so values do not depend on the device's RNG
                module = create_attention(site.attention)
                init_attention(module, plan.init)
                modules.append(module.to(device=device, dtype=dtype))
    for site, module in zip(plan.sites, modules, strict=True):
        insert(model.get_submodule(site.path), site, module)
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
        block_key = module_key(block, modes=False)  # before the fill: the module is an opaque call, keyed by class
        setattr(block, site.slot, module)
        cls, fused = _slot_rewrite(block, site.slot, site.fixed_args, block_key, code_key(layer_class(module)))
        if fused:
            module.__class__ = fused_class(type(module))
        if cls is not None:
            block.__class__ = cls
    else:
        rewrite_forward(block, site, module)


_slot_rewrites: BoundedCache[Hashable, tuple[type | None, bool]] = BoundedCache(1024)


def _slot_rewrite(
    block: nn.Module, slot: str, fixed: dict[str, Any], block_key: Hashable | None, kind: Hashable | None
) -> tuple[type | None, bool]:
    """For a filled slot: the block's class with its graph fused around the slot's module (`fusion.fuse`), or None
    where fusing changes nothing (or the forward does not trace), and whether the module takes its fused class.
    Cached by the block's exact state before the fill (`block_key`, traced in both modes, its code included), the
    module's class and code (`kind`) and the fixed arguments: the graph calls the module opaquely, and fusing
    depends on its class alone."""
    key = None if block_key is None or kind is None else (block_key, slot, kind, freeze(fixed))
    cached = _slot_rewrites.get(key) if key is not None else None
    if cached is None:
        try:
            graph, consistent = _trace_modes(block, set(), fixed)
        except Exception:  # an untraceable forward: the module is called as it is
            cached = None, False
        else:
            calls = [n for n in graph.nodes if n.op == "call_module" and n.target == slot]
            fused = consistent and len(calls) == 1 and fuse(graph, block, slot, inplace_alone=False)
            cached = (_rewritten_class(type(block), graph), True) if fused else (None, False)
        if key is not None:
            _slot_rewrites[key] = cached
    return cached


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
    passed = {name for name, value in fixed.items() if value is None or type(value) is bool}
    if passed:  # a mask or flag only handed on to children (a ViT block's attn_mask=None, is_causal=False)
        loose = _passed_on(block, open_paths, fixed, passed)
        if loose is not None:
            return loose
    sizes = {name for name, value in fixed.items() if type(value) is int}
    if sizes:
        try:
            return _trace_both(block, open_paths, {k: v for k, v in fixed.items() if k not in sizes})
        except Exception:  # the forward branches on them (or needs them concrete): specialise on them too
            pass
    return _trace_both(block, open_paths, fixed)


def _passed_on(block: nn.Module, open_paths: set[str], fixed: dict[str, Any], passed: set[str]
               ) -> tuple[torch.fx.Graph, bool] | None:
    """The trace with the `passed` arguments left as arguments, where the forward only hands them on to its
    children: each is read by child calls alone, and the graph calls what the specialised one calls, in order (a
    forward that branched on ``arg is None`` would call something else). None where that does not hold."""
    try:
        special = _trace_both(block, open_paths, fixed)
        loose = _trace_both(block, open_paths, {k: v for k, v in fixed.items() if k not in passed})
    except Exception:
        return None
    guards = (assert_is_none, torch._assert)
    calls = [[(n.op, n.target) for n in g.nodes if n.op in ("call_module", "call_function", "call_method")
              and n.target not in guards and not (n.users and all(u.target in guards for u in n.users))]
             for g in (special[0], loose[0])]
    handed = all(user.op == "call_module" for n in loose[0].nodes if n.op == "placeholder" and n.target in passed
                 for user in n.users)
    return loose if handed and calls[0] == calls[1] else None


def _trace_both(block: nn.Module, open_paths: set[str], fixed: dict[str, Any]) -> tuple[torch.fx.Graph, bool]:
    renamed = {f"{name}_1": name for name in fixed}
    hints = _type_hints(type(block).forward)
    with training_flags(block):
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
                elif node.op == "output" and isinstance(node.type, str):  # a postponed return annotation
                    node.type = hints.get("return")
                elif node.op == "call_function" and node.target is _FX_ASSERT_IS_NONE:
                    node.target = assert_is_none  # the same guard, in a form TorchScript compiles
            graphs.append(graph)
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

    The rewritten class is computed once per exact block state (`module_key`: its values and its classes' code),
    site place and module class and code: blocks alike (a stage's repeated blocks) take the class of the first
    without being traced again, and a block whose class's forward was patched since is traced anew. Training flags
    are not part of the key: the block is traced in both modes, and one that branches on them is refused."""
    block_key, kind = module_key(block, modes=False), code_key(layer_class(module))
    key = None if block_key is None or kind is None else (
        block_key, site.anchor, site.position, site.name, freeze(site.fixed_args), kind)
    cached = _rewrites.get(key) if key is not None else None
    if cached is not None:
        cls, fused = cached
        if fused:
            module.__class__ = fused_class(type(module))
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
    fused = fuse(graph, block, site.name)
    if fused:
        module.__class__ = fused_class(type(module))
    graph.lint()
    cls = _rewritten_class(type(block), graph)
    if key is not None:
        _rewrites[key] = cls, fused
    block.__class__ = cls


_rewrites: BoundedCache[Hashable, tuple[type, bool]] = BoundedCache(1024)


# --- generated classes ------------------------------------------------------------------------------------------
#
# A rewritten block's class is a subclass of its own class, generated from source code: one class per (parent
# class, code, the objects the code names), reused across blocks and models. Each carries the recipe it was made
# from (`__se_inject_recipe__`: the parent class or its recipe, then the code), so pickle, deepcopy and spawned
# processes rebuild it (`_restore_block`) as torch.fx's GraphModule rebuilds itself from its code.

_classes: BoundedCache[Hashable, type] = BoundedCache(512)


class _ModuleRef:
    """A module named by the generated code's globals (``torch``), pickled by its import name."""

    def __init__(self, name: str):
        self.name = name

    def __reduce__(self) -> Any:
        return _ModuleRef, (self.name,)


def _portable_globals(namespace: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted(
        (name, _ModuleRef(value.__name__) if isinstance(value, types.ModuleType) else value)
        for name, value in namespace.items() if name != "__builtins__"
    ))


def _live_globals(portable: tuple[tuple[str, Any], ...]) -> dict[str, Any]:
    return {name: importlib.import_module(value.name) if isinstance(value, _ModuleRef) else value
            for name, value in portable}


def _parent(recipe_or_class: Any) -> type:
    return recipe_or_class if isinstance(recipe_or_class, type) else class_from_recipe(recipe_or_class)


def _recipe_of(cls: type) -> Any:
    """What `cls` is rebuilt from: an importable class is itself, a generated one its recipe."""
    return getattr(cls, "__se_inject_recipe__", None) if "__se_inject_recipe__" in vars(cls) else cls


def class_from_recipe(recipe: tuple[Any, ...]) -> type:
    """The generated class a recipe describes: ``("graph", parent, source, globals)`` or
    ``("wrap", parent, name, position)``."""
    kind, parent = recipe[0], _parent(recipe[1])
    if kind == "graph":
        return _class_from_code(parent, recipe[2], _live_globals(recipe[3]))
    if kind == "wrap":
        return _wrapped_class(parent, recipe[2], recipe[3])
    raise SurgeryError(f"unknown generated-class recipe {kind!r}")


def _restore_block(recipe: tuple[Any, ...]) -> nn.Module:
    """Unpickling: an empty instance of the generated class; pickle then restores its state (``__setstate__``)."""
    cls = class_from_recipe(recipe)
    return cls.__new__(cls)


def _reduce_block(self: nn.Module, protocol: int) -> Any:
    return _restore_block, (type(self).__se_inject_recipe__,), self.__dict__


def _source_name(base: type, src: str) -> str:
    """A file name for generated code, registered in linecache so inspect.getsource (TorchScript, tracebacks) can
    read it, as torch.fx does; named by the code's digest, so the same code always has the same name."""
    filename = f"<se-inject {base.__qualname__} {hashlib.sha1(src.encode()).hexdigest()[:12]}>"
    linecache.cache[filename] = (len(src), None, src.splitlines(keepends=True), filename)
    return filename


def _globals_key(namespace: dict[str, Any]) -> Hashable | None:
    try:
        return tuple(sorted((name, value) for name, value in namespace.items() if name != "__builtins__"))
    except TypeError:  # an unhashable object named by the code
        return None


def _generate(parent: type, recipe: tuple[Any, ...], attrs: dict[str, Any]) -> type:
    base = getattr(parent, "__se_inject_base__", parent)
    return type(base.__name__, (parent,), {
        **attrs, "__se_inject_base__": base, "__se_inject_recipe__": recipe, "__reduce_ex__": _reduce_block,
        "__module__": base.__module__, "__qualname__": base.__qualname__,
    })


def _rewritten_class(cls: type, graph: torch.fx.Graph) -> type:
    """A subclass of `cls` whose forward runs `graph`."""
    code = graph.python_code(root_module="self")
    return _class_from_code(cls, code.src, dict(code.globals))


def _class_from_code(cls: type, src: str, namespace: dict[str, Any]) -> type:
    names = _globals_key(namespace)
    key = None if names is None else (cls, src, names)
    generated = _classes.get(key) if key is not None else None
    if generated is None:
        base = getattr(cls, "__se_inject_base__", cls)
        run = dict(namespace)
        exec(compile(src, _source_name(base, src), "exec"), run)
        recipe = ("graph", _recipe_of(cls), src, _portable_globals(namespace))
        generated = _generate(cls, recipe, {"forward": run["forward"]})
        if key is not None:
            _classes[key] = generated
    return generated


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
    if problem is None and position not in ("after", "before"):
        problem = f"unknown position {position!r}"
    if problem:
        raise SurgeryError(f"invalid module name: {problem}")
    code = code_key(cls)  # the class's own forward is copied into the generated one: keyed by its code
    key = None if code is None else (code, "wrap", name, position)
    generated = _classes.get(key) if key is not None else None
    if generated is None:
        base = getattr(cls, "__se_inject_base__", cls)
        params = list(inspect.signature(cls.forward).parameters)[1:]
        args = ", ".join(params)
        call = (f"self.{name}(self.se_inject_forward({args}))" if position == "after"
                else f"self.se_inject_forward(self.{name}({params[0]}){''.join(f', {p}' for p in params[1:])})")
        src = f"def forward(self, {args}):\n    return {call}\n"
        namespace: dict[str, Any] = {}
        exec(compile(src, _source_name(base, src), "exec"), namespace)
        forward, inner = namespace["forward"], cls.forward
        forward.__annotations__ = dict(inner.__annotations__)
        renamed = types.FunctionType(inner.__code__, inner.__globals__, "se_inject_forward", inner.__defaults__,
                                     inner.__closure__)  # TorchScript compiles a method under its function's name
        renamed.__annotations__, renamed.__qualname__ = inner.__annotations__, inner.__qualname__
        generated = _generate(cls, ("wrap", _recipe_of(cls), name, position),
                              {"forward": forward, "se_inject_forward": renamed})
        if key is not None:
            _classes[key] = generated
    return generated
