"""The size of one example a model is evaluated at: its default (from its weights, its task, its config) and the
user's ``--input-size`` parsed for the model's task."""

from __future__ import annotations

from torch import nn

from ..errors import UsageError
from ..names import MAX_SIDE
from .resolve import ModelSpec, split_tag, torchvision_weights_enum
from .tasks import (
    DEFAULT_CLIP_LEN,
    RAFT_INPUT_SIZE,
    clip_len,
    detection_size,
    input_rank,
    model_task,
    torchvision_task,
)

DEFAULT_INPUT_SIZE = (3, 224, 224)


def default_input_size(spec: ModelSpec | None, model: nn.Module | None = None) -> tuple[int, ...]:
    """The size of one example the model is evaluated at: (C, H, W), or (C, T, H, W) for video.

    A torchvision model built for one size (ViT's ``image_size``) is evaluated at it; else its weights transforms
    give it (crop size; a segmentation model's resize size; a video model's crop and the clip length its weights
    were evaluated at); a detector's transform its short side (a square image that size reaches the backbone
    unresized); RAFT its training crop; a timm-style ``pretrained_cfg`` its ``input_size``; else 224."""
    task = model_task(model) if model is not None else None
    if spec is not None and spec.source == "torchvision":
        arch, tag = split_tag(spec.name)
        task = task or torchvision_task(arch)
        fixed = getattr(model, "image_size", None)  # an architecture built for one size (torchvision's ViT)
        if isinstance(fixed, int) and not isinstance(fixed, bool) and task == "classification":
            return (3, fixed, fixed)  # untagged vit_h_14 is built for 224, whatever its first weights' 518
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
