"""Building a model from its `ModelSpec` with random weights, on any device (on "meta" without memory or init
time). Nothing is downloaded and no function or method is replaced (torchvision's weights loading is left out
through a stand-in for the weights, `_ArchitectureOf`), so another thread that builds or loads a model meanwhile is
not affected. Process-wide still: a `seed` seeds torch's CPU generator for the build (`seeded`, restored after), and
the builders' warnings are silenced with `warnings.catch_warnings`."""

from __future__ import annotations

import sys
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import SEInjectError, UnknownModelError, UsageError
from .resolve import ModelSpec, split_tag, torchvision_weights_enum


def _import_factory(spec: ModelSpec) -> Any:
    import importlib
    import importlib.util
    import sys

    source, _, factory = spec.name.rpartition(":")
    if source.endswith(".py"):
        path = Path(source)
        module_name = path.stem  # classes get the path "<file stem>.<Class>", the name a recipe file uses
        module = sys.modules.get(module_name)
        if module is None or Path(getattr(module, "__file__", "") or "").resolve() != path:
            if module is not None and not getattr(module, "__se_inject_factory__", False):
                raise UsageError(f"{path}: a different module named {module_name!r} is already imported; "
                                 "rename the file")
            if not path.is_file():
                raise UnknownModelError(spec.name, hint=f"no such file: {path}")
            module_spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(module_spec)  # type: ignore[arg-type]
            module.__se_inject_factory__ = True  # ours to replace when another file of that name comes
            sys.modules[module_name] = module
            try:
                module_spec.loader.exec_module(module)  # type: ignore[union-attr]
            except Exception as e:
                del sys.modules[module_name]
                raise SEInjectError(f"{path}: importing it failed ({type(e).__name__}: {e})") from None
    else:
        try:
            module = importlib.import_module(source)
        except Exception as e:
            raise SEInjectError(f"{source}: importing it failed ({type(e).__name__}: {e})") from None
    fn = getattr(module, factory, None)
    if not callable(fn):
        raise SEInjectError(f"{spec.name}: {source} has no function {factory!r}")
    return fn


@contextmanager
def seeded(seed: int | None):
    """Run a block with torch's CPU RNG seeded, restoring the caller's RNG state afterwards."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def build_model(spec: ModelSpec, *, device: torch.device | str = "cpu", seed: int | None = None) -> nn.Module:
    """Build the model with random weights. On the "meta" device this takes no memory and no init time."""
    with seeded(seed), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's inception/googlenet init FutureWarnings
        if str(device) != "meta":
            with torch.device(device):
                return _construct(spec)
        try:
            with torch.device("meta"), _SkipMetaInit():
                return _construct(spec)
        except (NotImplementedError, RuntimeError):  # the constructor computes with tensors (.tolist(), .item())
            with empty_weights(), _SkipMetaInit():
                return _construct(spec)


class _SkipMetaInit(torch.overrides.TorchFunctionMode):
    """In-place value operations on meta tensors (the weight init: ``uniform_``, ``trunc_normal_``'s ``erfinv_``,
    ``clamp_``, ...) return their tensor at once: on the meta device they compute nothing but still cost a Python
    decomposition each, and on a large model initialising weights that have no values is most of the build."""

    _METADATA = frozenset({"resize_", "resize_as_", "set_", "as_strided_", "t_", "transpose_", "swapdims_",
                           "swapaxes_", "squeeze_", "unsqueeze_", "requires_grad_", "detach_", "share_memory_"})

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name.endswith("_") and not name.startswith("_") and name not in self._METADATA:
            target = args[0] if args else kwargs.get("tensor")  # torch.nn.init's functions take `tensor=`
            if isinstance(target, torch.Tensor) and target.is_meta:
                return target
        return func(*args, **kwargs)


def _construct(spec: ModelSpec) -> nn.Module:
    if spec.source == "timm":
        import timm

        return timm.create_model(spec.name, pretrained=False)
    if spec.source == "torchvision":
        return _construct_torchvision(*split_tag(spec.name))
    if spec.source == "python":
        factory = _import_factory(spec)
        try:
            model = factory()
        except SEInjectError:
            raise
        except (Exception, SystemExit) as e:  # exit() too: the factory's, not the run's, way to end
            raise SEInjectError(f"{spec.name}: the factory raised {type(e).__name__}: {e}") from None
        if not isinstance(model, nn.Module):
            raise SEInjectError(f"{spec.name}: the factory returned a {type(model).__name__}, not an nn.Module")
        return model
    raise UsageError(f"cannot build models from source {spec.source!r}")


def _construct_torchvision(arch: str, tag: str) -> nn.Module:
    """Random weights, nothing downloaded: no backbone weights for detection and segmentation models, and for a
    tagged name the architecture those weights need (a COCO detector's frozen BatchNorm, a segmentation model's
    auxiliary head, the number of classes), built by torchvision's own builder with the loading left out."""
    import inspect

    import torchvision

    builder = torchvision.models.get_model_builder(arch)
    kwargs: dict[str, Any] = {"weights": None}
    if "weights_backbone" in inspect.signature(builder).parameters:
        kwargs["weights_backbone"] = None
    weights = torchvision_weights_enum(arch)[tag] if tag else None
    if weights is None or "unquantized" in weights.meta:  # int8 weights: the float model's architecture is the same
        return builder(**kwargs)
    return builder(**{**kwargs, "weights": _ArchitectureOf(weights)})


class _ArchitectureOf:
    """Stands in for a torchvision weights enum member, for its builder alone: the builder sees the member (an
    instance of its enum, its ``meta``, ``weights == X.COCO_V1``) and so builds the architecture those weights need.
    Asked for the weights, it hands back the state of the model being built (the builder's local ``model``, the one
    its next line loads into), so that ``model.load_state_dict`` copies each tensor onto itself: nothing is
    fetched, and nothing outside that model is touched (no patched ``load_state_dict`` or ``get_state_dict``)."""

    def __init__(self, member: Any):
        self._member = member

    @property  # type: ignore[misc]
    def __class__(self) -> type:  # isinstance(stand_in, ResNet50_Weights), as the builder's `verify` asks
        return type(self._member)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._member, name)

    def __eq__(self, other: object) -> bool:
        return other is self._member or other is self

    def __hash__(self) -> int:
        return hash(self._member)

    def get_state_dict(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        model = sys._getframe(1).f_locals.get("model")  # torchvision: `model.load_state_dict(w.get_state_dict())`
        if not isinstance(model, nn.Module):
            raise SEInjectError(f"cannot build the architecture of {self._member!r} without its weights: the "
                                "builder does not load them into a local `model`; build it untagged")
        return model.state_dict()


@contextmanager
def empty_weights():
    """Build on the CPU but move each parameter and buffer to the meta device as it is registered (the init then
    runs on meta tensors): for constructors that compute with tensors and cannot run under ``torch.device("meta")``.
    Uses torch's registration hooks, which are process-wide: they act only on modules built in this thread."""
    from torch.nn.modules.module import (
        register_module_buffer_registration_hook,
        register_module_parameter_registration_hook,
    )

    thread = threading.get_ident()

    def parameter_on_meta(_module: nn.Module, _name: str, param: nn.Parameter | None) -> nn.Parameter | None:
        if param is None or param.is_meta or threading.get_ident() != thread:
            return None  # kept as it is
        return nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    def buffer_on_meta(_module: nn.Module, _name: str, tensor: torch.Tensor | None) -> torch.Tensor | None:
        return None if tensor is None or tensor.is_meta or threading.get_ident() != thread else tensor.to("meta")

    handles = [register_module_parameter_registration_hook(parameter_on_meta),
               register_module_buffer_registration_hook(buffer_on_meta)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
