"""Model names -> `ModelSpec`: which library has a name, its weights tags, and factories of the user's own.

Resolution reads the registries of timm and torchvision and changes nothing; building is `engine.build`'s job.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from ..errors import UnknownModelError, UsageError

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
