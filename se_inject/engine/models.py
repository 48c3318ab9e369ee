"""Model names -> modules: resolve a timm/torchvision name, build it (random weights, any device), load weights."""

from __future__ import annotations

import difflib
import re
import warnings
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import SEInjectError, UnknownModelError, UsageError, WeightsError, describe
from ..names import MAX_SIDE
from .tasks import (
    DEFAULT_CLIP_LEN,
    RAFT_INPUT_SIZE,
    clip_len,
    detection_size,
    input_rank,
    model_task,
    torchvision_task,
)

SOURCES = ("timm", "torchvision")  # named model libraries; "python" specs are factories of the user's
DEFAULT_INPUT_SIZE = (3, 224, 224)


@dataclass(frozen=True)
class ModelSpec:
    """A model the tool can rebuild: ``source`` is "timm" or "torchvision", ``name`` its registered name."""

    source: str
    name: str

    def __str__(self) -> str:
        return f"{self.source}:{self.name}"

    @property
    def short_name(self) -> str:
        """A file-name-safe name: ``resnet50``, or ``<file stem>_<factory>`` for a factory."""
        if self.source != "python":
            return self.name.replace("/", "_")
        source, _, factory = self.name.rpartition(":")
        return f"{Path(source).stem if source.endswith('.py') else source.rsplit('.', 1)[-1]}_{factory}"

    def to_dict(self) -> dict[str, str]:
        return {"source": self.source, "name": self.name}


@cache
def torchvision_names() -> tuple[str, ...]:
    """Every torchvision model: classification, detection, segmentation, video, optical flow and quantization."""
    import torchvision

    return tuple(torchvision.models.list_models())


@cache
def timm_names() -> tuple[str, ...]:
    import timm

    return tuple(timm.list_models())


def _timm_has(name: str) -> bool:
    import timm

    return timm.is_model(name)


def registered(spec: ModelSpec) -> bool:
    """Whether a timm/torchvision spec names a model its library has, and its tag (if any) weights of that model."""
    arch, tag = split_tag(spec.name)
    if spec.source == "timm":
        return _timm_has(arch) and (not tag or tag in timm_tags(arch))
    if spec.source == "torchvision":
        return arch in torchvision_names() and (not tag or tag in torchvision_tags(arch))
    return False


def _closest(name: str, names: tuple[str, ...]) -> list[str]:
    return difflib.get_close_matches(name.split(".", 1)[0], list(dict.fromkeys(names)), n=3, cutoff=0.6)


def split_tag(name: str) -> tuple[str, str]:
    """``resnet50.a1_in1k`` -> ``("resnet50", "a1_in1k")``; ``resnet50`` -> ``("resnet50", "")``. The tag names
    pretrained weights: a timm pretrained tag, or a torchvision weights enum member (``IMAGENET1K_V2``)."""
    arch, _, tag = name.partition(".")
    return arch, tag


def timm_tags(arch: str) -> tuple[str, ...]:
    import timm

    return tuple(split_tag(n)[1] for n in timm.list_pretrained(f"{arch}.*"))


def torchvision_weights_enum(arch: str) -> Any:
    """The weights enum of a torchvision model (``ResNet50_Weights``), or None when it has no weights."""
    import torchvision

    try:
        weights = torchvision.models.get_model_weights(arch)
    except ValueError:
        return None
    return weights if len(weights) else None


def torchvision_tags(arch: str) -> tuple[str, ...]:
    """The weights enum members of a torchvision model, ``DEFAULT`` (an alias) last."""
    weights = torchvision_weights_enum(arch)
    members = [m for m in weights.__members__ if m != "DEFAULT"] if weights is not None else []
    return (*members, "DEFAULT") if members else ()


def _tagged(source: str, arch: str, tag: str) -> ModelSpec | None:
    """The spec for ARCH.TAG in `source` if the tag names weights there (torchvision's DEFAULT is resolved to the
    member it stands for, so the plan records which weights)."""
    if source == "timm":
        return ModelSpec("timm", f"{arch}.{tag}") if tag in timm_tags(arch) else None
    if tag not in torchvision_tags(arch):
        return None
    if tag == "DEFAULT":
        tag = torchvision_weights_enum(arch).DEFAULT.name
    return ModelSpec("torchvision", f"{arch}.{tag}")


def _unknown_tag(name: str, sources: list[tuple[str, str]], tag: str) -> UnknownModelError:
    known = [f"{s}:{a}.{t}" for s, a in sources for t in (timm_tags(a) if s == "timm" else torchvision_tags(a))]
    hint = (f"no weights tagged {tag!r}; known: {', '.join(known[:6])}{', ...' if len(known) > 6 else ''}" if known
            else "the model has no pretrained weights in its library")
    return UnknownModelError(name, hint=hint)


def resolve_model(name: str) -> ModelSpec:
    """``NAME`` (timm first, then torchvision), ``timm:NAME``, ``torchvision:NAME``, or a factory of your own:
    ``path/to/file.py:factory`` or ``package.module:factory``. Unknown names raise with the closest names.

    A name may carry a weights tag, ``NAME.TAG``: a timm pretrained tag (``resnet50.a1_in1k``) or a torchvision
    weights enum member (``torchvision:resnet50.IMAGENET1K_V2``; ``DEFAULT`` is resolved to the member it names).
    """
    if not name or not name.strip():
        raise UsageError("empty model name")
    source, sep, bare = name.partition(":")
    if sep and source in SOURCES:
        arch, tag = split_tag(bare)
        if (source == "timm" and _timm_has(arch)) or (source == "torchvision" and arch in torchvision_names()):
            spec = _tagged(source, arch, tag) if tag else ModelSpec(source, arch)
            if spec is None:
                raise _unknown_tag(name, [(source, arch)], tag)
            return spec
        names = timm_names() if source == "timm" else torchvision_names()
        raise UnknownModelError(name, [f"{source}:{n}" for n in _closest(arch, names)])
    if sep:
        return _resolve_factory(name, source, bare)
    arch, tag = split_tag(name)
    sources = [s for s, known in (("timm", _timm_has(arch)), ("torchvision", arch in torchvision_names())) if known]
    if sources and not tag:
        return ModelSpec(sources[0], arch)
    for s in sources:
        spec = _tagged(s, arch, tag)
        if spec is not None:
            return spec
    if sources:
        raise _unknown_tag(name, [(s, arch) for s in sources], tag)
    raise UnknownModelError(name, _closest(name, timm_names() + torchvision_names()))


def _resolve_factory(name: str, source: str, factory: str) -> ModelSpec:
    """``file.py:factory`` (stored with the absolute path, so ``load`` works from anywhere) or ``module:factory``."""
    import importlib.util

    if not factory.isidentifier():
        raise UsageError(f"{name!r}: expected FILE.py:FACTORY or MODULE:FACTORY with a function name after ':'")
    if source.endswith(".py"):
        path = Path(source).expanduser().resolve()
        if not path.is_file():
            raise UnknownModelError(name, hint=f"no such file: {path}")
        return ModelSpec("python", f"{path}:{factory}")
    try:
        found = all(p.isidentifier() for p in source.split(".")) and importlib.util.find_spec(source) is not None
    except (ImportError, ValueError):
        found = False
    local = Path(f"{source}.py")
    if not found and local.is_file():  # `mynets:make` next to mynets.py: the console script's path lacks "."
        return ModelSpec("python", f"{local.resolve()}:{factory}")
    if not found:
        raise UsageError(
            f"unknown model source {source!r} in {name!r}; use timm:NAME, torchvision:NAME, FILE.py:FACTORY or "
            "MODULE:FACTORY"
        )
    return ModelSpec("python", f"{source}:{factory}")


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
    with _architecture_only():
        return builder(**{**kwargs, "weights": weights})


class _NoState(dict):
    """What a torchvision weights enum hands its builder under `_architecture_only`: loading it is a no-op."""


@contextmanager
def _architecture_only():
    """Torchvision builders called with weights build the architecture they need, but neither fetch nor load them."""
    from torchvision.models._api import WeightsEnum

    get_state_dict, load_state_dict = WeightsEnum.get_state_dict, nn.Module.load_state_dict

    def no_state(self: Any, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        return _NoState()

    def load_unless_empty(module: nn.Module, state: Any, *args: Any, **kwargs: Any) -> Any:
        return None if isinstance(state, _NoState) else load_state_dict(module, state, *args, **kwargs)

    WeightsEnum.get_state_dict = no_state  # type: ignore[method-assign]
    nn.Module.load_state_dict = load_unless_empty  # type: ignore[method-assign]
    try:
        yield
    finally:
        WeightsEnum.get_state_dict = get_state_dict  # type: ignore[method-assign]
        nn.Module.load_state_dict = load_state_dict  # type: ignore[method-assign]


@contextmanager
def empty_weights():
    """Build on the CPU but move each parameter and buffer to the meta device as it is registered (the init then
    runs on meta tensors): for constructors that compute with tensors and cannot run under ``torch.device("meta")``.
    Uses torch's registration hooks, which apply to every module while the context is open."""
    from torch.nn.modules.module import (
        register_module_buffer_registration_hook,
        register_module_parameter_registration_hook,
    )

    def parameter_on_meta(_module: nn.Module, _name: str, param: nn.Parameter | None) -> nn.Parameter | None:
        if param is None or param.is_meta:
            return None  # kept as it is
        return nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    def buffer_on_meta(_module: nn.Module, _name: str, tensor: torch.Tensor | None) -> torch.Tensor | None:
        return None if tensor is None or tensor.is_meta else tensor.to("meta")

    handles = [register_module_parameter_registration_hook(parameter_on_meta),
               register_module_buffer_registration_hook(buffer_on_meta)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def default_input_size(spec: ModelSpec | None, model: nn.Module | None = None) -> tuple[int, ...]:
    """The size of one example the model is evaluated at: (C, H, W), or (C, T, H, W) for video.

    Torchvision's weights transforms give it (crop size; a segmentation model's resize size; a video model's crop
    and the clip length its weights were evaluated at); a detector's transform its short side (a square image
    that size reaches the backbone unresized); RAFT its training crop; a timm-style ``pretrained_cfg`` its
    ``input_size``; else 224."""
    task = model_task(model) if model is not None else None
    if spec is not None and spec.source == "torchvision":
        arch, tag = split_tag(spec.name)
        task = task or torchvision_task(arch)
        weights = torchvision_weights_enum(arch)
        if weights is not None:
            member = weights[tag] if tag in weights.__members__ else next(iter(weights))
            keywords = getattr(member.transforms, "keywords", {})
            side = keywords.get("crop_size") or keywords.get("resize_size")
            if side and task != "detection":
                height, width = (side, side) if isinstance(side, int) else (side[0], side[-1])
                frames = (clip_len(member),) if task == "video" else ()
                return (3, *frames, int(height), int(width))
    if task == "detection" and model is not None:
        size = detection_size(model)
        if size is not None:
            return size
    if task == "optical_flow":
        return RAFT_INPUT_SIZE
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if "input_size" in cfg:
        return tuple(int(v) for v in cfg["input_size"])
    if task == "video":
        return (3, DEFAULT_CLIP_LEN, *DEFAULT_INPUT_SIZE[1:])
    if task == "sequence" and model is not None:
        first = next(m for m in model.modules() if isinstance(m, nn.Conv1d))
        return (first.in_channels, DEFAULT_INPUT_SIZE[-1])
    return DEFAULT_INPUT_SIZE


InputSize = int | str | tuple[int, ...] | list[int] | None
_FORMS = {3: "N, HxW or C,H,W", 4: "N (H=W), HxW, T,H,W or C,T,H,W (a video model)", 2: "L or C,L (a 1-D model)"}


def parse_input_size(value: InputSize, task: str = "classification",
                     default: tuple[int, ...] | None = None) -> tuple[int, ...] | None:
    """The size of one example for a model of `task` (`tasks.model_task`): ``224``, ``"224x192"`` or
    ``"3,224,224"`` -> (C, H, W); for video also ``"16,112,112"`` (T, H, W) or ``"3,16,112,112"`` (C, T, H, W),
    where N and HxW keep the `default` clip length. Channels default to 3 (a 1-D model: its first conv's)."""
    if value is None:
        return None
    rank = input_rank(task)
    forms = _FORMS[rank]
    try:
        if isinstance(value, str):
            parts = [int(p) for p in value.replace("x", ",").split(",") if p.strip()]
        elif isinstance(value, int) and not isinstance(value, bool):
            parts = [value]
        else:
            parts = [int(p) for p in value]
    except (TypeError, ValueError):
        raise UsageError(f"invalid input size {value!r}: expected {forms} with positive integers") from None
    if any(p <= 0 for p in parts):
        raise UsageError(f"invalid input size {value!r}: expected {forms} with positive integers")
    channels = default[0] if default else 3
    if rank == 2:
        parts = [channels, *parts] if len(parts) == 1 else parts
    elif rank == 4:
        frames = default[1] if default and len(default) == 4 else DEFAULT_CLIP_LEN
        if len(parts) == 1:
            parts = [channels, frames, parts[0], parts[0]]
        elif len(parts) == 2:
            parts = [channels, frames, *parts]
        elif len(parts) == 3:
            parts = [channels, *parts]
    elif len(parts) == 1:
        parts = [3, parts[0], parts[0]]
    elif len(parts) == 2:
        parts = [3, *parts]
    if len(parts) != rank:
        hint = {4: " (C,T,H,W is for video models)", 3: " (C,H,W is for image models)"}.get(len(parts), "")
        raise UsageError(f"invalid input size {value!r}: expected {forms}{hint}")
    if any(p > MAX_SIDE for p in parts):
        raise UsageError(f"invalid input size {value!r}: each dimension must be at most {MAX_SIDE}")
    return tuple(parts)


# --- weights -----------------------------------------------------------------------------------------------------


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a local checkpoint without executing code: safetensors, or torch.load(weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such file" if not path.exists() else f"{path}: not a file")
    if path.stat().st_size == 0:
        raise WeightsError(f"{path}: empty file")
    check_readable(path, WeightsError)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            data: Any = load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise WeightsError(f"{path}: not a valid safetensors file ({describe(e) or type(e).__name__})") from None
    else:
        import pickle

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                data = torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            target = re.search(r"GLOBAL\s+([\w.]+)", str(e))  # torch names what the pickle would import and call
            if target:
                raise WeightsError(
                    f"{path}: refused, loading it would call {target.group(1)}; only tensors are read "
                    "(torch.load weights_only=True). Convert it with code you trust, or use .safetensors"
                ) from None
            detail = str(e).split("WeightsUnpickler error:", 1)[-1].strip().splitlines()
            detail_line = detail[0] if detail else ""
            raise WeightsError(f"{path}: not a readable PyTorch checkpoint ({_pickle_detail(detail_line)})") from None
        except Exception as e:  # truncated zip, random bytes, ...
            raise WeightsError(
                f"{path}: not a readable PyTorch checkpoint, truncated or corrupt? ({_pickle_detail(e)})"
            ) from None
    return _unwrap_state_dict(data, path)


def _pickle_detail(e: BaseException | str) -> str:
    """What went wrong, in words: the unpickler's bare opcode ("105", "Unsupported operand 105") says nothing."""
    text = describe(e, 120) or type(e).__name__
    if re.fullmatch(r"(Unsupported operand )?\d+", text):
        return "neither the zip archive nor the pickle torch.save writes"
    return text


def check_readable(path: Path, error: type[SEInjectError]) -> None:
    """Raise `error` saying "permission denied" (not "no such file" or "corrupt") for a file we may not read."""
    try:
        with open(path, "rb"):
            pass
    except PermissionError:
        raise error(f"{path}: permission denied") from None
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror or e})") from None


def _unwrap_state_dict(data: Any, path: Path) -> dict[str, torch.Tensor]:
    for key in ("state_dict", "model", "state_dict_ema", "model_ema"):
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
            break
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise WeightsError(f"{path}: does not hold a state_dict (a mapping of names to tensors)")
    if data and all(k.startswith("module.") for k in data):  # saved from DataParallel/DDP
        data = {k[len("module.") :]: v for k, v in data.items()}
    return data


def check_state_dict(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Raise naming the first missing/unexpected keys and shape mismatches, if `state` does not fit `model`."""
    expected = model.state_dict(keep_vars=True)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
    if unexpected:
        more = ", ..." if len(unexpected) > 3 else ""
        problems.append(f"{len(unexpected)} unexpected keys ({', '.join(unexpected[:3])}{more})")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatches ({'; '.join(shapes[:3])}{'; ...' if len(shapes) > 3 else ''})")
    if problems:
        raise WeightsError(f"{what} does not fit the model: {'; '.join(problems)}")


def load_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """``load_state_dict(strict=True)``, assigning the tensors when `model` is on the meta device. The modules'
    own version metadata is attached, as a state_dict from a file has none (torchvision's MNASNet requires it)."""
    own = model.state_dict(keep_vars=True)
    state = OrderedDict(state)
    state._metadata = getattr(own, "_metadata", {})  # type: ignore[attr-defined]
    model.load_state_dict(state, strict=True, assign=any(t.is_meta for t in own.values()))


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load a local checkpoint into `model` strictly (in place)."""
    state = read_state_dict(path)
    check_state_dict(model, state, str(path))
    load_state(model, state)
