"""Tasks beyond image classification: what a model takes and gives, the example input built for it, and the part of
it a forward pass on the meta device runs.

- classification (and torchvision's quantizable models in float mode): one (N, C, H, W) tensor in, logits out;
- segmentation: one image tensor in, a dict of mask logits out (``out``, ``aux``);
- video: one (N, C, T, H, W) clip in, logits out; the input size is (C, T, H, W);
- optical flow (RAFT): two images in, the list of flow refinements out;
- detection: a list of (C, H, W) images in, a list of dicts (boxes, scores, labels, ...) out. The heads select
  proposals with data-dependent ops (``torch.nonzero``, NMS) that the meta device cannot run and whose work
  depends on the detections, so planning and MAC counting run the model's own transform and its backbone
  (``model.backbone``), where SE goes; parameters are counted over the whole model.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

TASKS = ("classification", "detection", "segmentation", "video", "optical_flow", "quantization")
_TORCHVISION_MODULES = {f"torchvision.models.{t}": t for t in TASKS if t != "classification"}
DEFAULT_CLIP_LEN = 16
RAFT_INPUT_SIZE = (3, 368, 496)  # RAFT's FlyingChairs training crop; the sides must be multiples of 8


def torchvision_task(arch: str) -> str:
    """The task of a torchvision model name, by the module that registers it."""
    import torchvision

    for module, task in _TORCHVISION_MODULES.items():
        if arch in torchvision.models.list_models(module=getattr(torchvision.models, module.rsplit(".", 1)[1])):
            return task
    return "classification"


def model_task(model: nn.Module) -> str:
    """The task of a model object: torchvision's by its class's module, else "video" for a model whose first
    convolution is 3-D, "sequence" for a 1-D one, else "classification"."""
    cls = type(model)
    module = getattr(cls, "__se_inject_base__", cls).__module__
    for prefix, task in _TORCHVISION_MODULES.items():
        if module == prefix or module.startswith(f"{prefix}."):
            return task
    first = next((m for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))), None)
    if isinstance(first, nn.Conv3d):
        return "video"
    if isinstance(first, nn.Conv1d):
        return "sequence"
    return "classification"


def input_rank(task: str) -> int:
    """Dimensions of one example without the batch: (C, T, H, W) for video, (C, L) for sequences, else (C, H, W)."""
    return {"video": 4, "sequence": 2}.get(task, 3)


def clip_len(weights: Any) -> int:
    """Frames per clip a torchvision video model's weights were evaluated at (their docs' ``clip_len=``)."""
    found = re.search(r"clip_len=(\d+)", str(getattr(weights, "meta", {}).get("_docs", "")))
    return int(found.group(1)) if found else DEFAULT_CLIP_LEN


def detection_size(model: nn.Module) -> tuple[int, int, int] | None:
    """(3, S, S) for a detector whose transform resizes the short side to S (a square image of that size reaches
    the backbone as it is), None for other models."""
    transform = getattr(model, "transform", None)
    sizes = getattr(transform, "min_size", None)
    if not sizes:
        return None
    side = int(sizes[-1] if isinstance(sizes, (tuple, list)) else sizes)
    return (3, side, side)


def example_inputs(
    model: nn.Module,
    input_size: tuple[int, ...],
    *,
    batch: int = 1,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    generator: torch.Generator | None = None,
    task: str | None = None,
) -> tuple[Any, ...]:
    """The positional arguments of one forward pass: random normal values from `generator`, else empty tensors."""
    task = task or model_task(model)

    def tensor(shape: tuple[int, ...]) -> torch.Tensor:
        if generator is None:
            return torch.empty(shape, device=device, dtype=dtype)
        return torch.randn(shape, generator=generator, dtype=dtype or torch.float32).to(device)

    if task == "detection":
        return ([tensor(tuple(input_size)) for _ in range(batch)],)
    if task == "optical_flow":
        return (tensor((batch, *input_size)), tensor((batch, *input_size)))
    return (tensor((batch, *input_size)),)


class _Stop(Exception):
    def __init__(self, output: Any):
        super().__init__()
        self.output = output


def planning_scope(model: nn.Module) -> nn.Module | None:
    """The submodule a detector's planning forward ends at (its backbone), None for other models."""
    if model_task(model) != "detection":
        return None
    backbone = getattr(model, "backbone", None)
    return backbone if isinstance(backbone, nn.Module) else None


def forward(model: nn.Module, args: tuple[Any, ...]) -> Any:
    """``model(*args)``; for a detector on the meta device, up to its backbone's output (see the module's doc)."""
    scope = planning_scope(model)
    if scope is None or not any(t.is_meta for t in scope.parameters()):
        return model(*args)

    def stop(_module: nn.Module, _args: Any, output: Any) -> None:
        raise _Stop(output)

    handle = scope.register_forward_hook(stop)
    try:
        model(*args)
    except _Stop as s:
        return s.output
    finally:
        handle.remove()
    raise RuntimeError("the detector's forward did not reach its backbone")
