"""Drift: how far the injected model's outputs are from the base model's, before anyone trains.

Measured on a deterministic batch of random inputs, or on images from a folder (decoded with torchvision.io and
preprocessed with the model's own resize/crop/normalisation settings).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import SEInjectError, describe

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
MAX_IMAGES = 64

@dataclass(frozen=True)
class Drift:
    """Relative L2 change of the outputs (``||y' - y|| / ||y||``) and the fraction of inputs whose top-1 class
    stays the same."""

    inputs: str
    relative_l2: float
    top1_agreement: float
    max_abs_diff: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def random_batch(input_size: tuple[int, int, int], *, batch: int = 8, seed: int = 0) -> tuple[torch.Tensor, str]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((batch, *input_size), generator=generator)
    return x, f"{batch} random normal inputs (seed {seed})"


def image_batch(
    directory: str | Path, input_size: tuple[int, int, int], model: nn.Module | None = None
) -> tuple[torch.Tensor, str]:
    """Up to 64 images from `directory` (sorted by name), resized, center-cropped and normalised for `model`.

    Files that do not decode are skipped and named in the description; it is an error only when none decodes.
    """
    from torchvision.io import ImageReadMode, decode_image
    from torchvision.transforms.v2 import functional as F

    directory = Path(directory)
    if not directory.is_dir():
        raise SEInjectError(f"--images {directory}: not a folder")
    files = sorted(p for p in directory.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:MAX_IMAGES]
    if not files:
        raise SEInjectError(f"--images {directory}: no {', '.join(IMAGE_SUFFIXES)} files")
    from timm.data import DEFAULT_CROP_PCT, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean, std = cfg.get("mean", IMAGENET_DEFAULT_MEAN), cfg.get("std", IMAGENET_DEFAULT_STD)
    crop_pct = cfg.get("crop_pct", DEFAULT_CROP_PCT)
    _, height, width = input_size
    images, undecodable = [], []
    for file in files:
        try:
            image = decode_image(str(file), mode=ImageReadMode.RGB)
        except (RuntimeError, ValueError) as e:
            undecodable.append((file.name, describe(e, 120)))
            continue
        image = F.resize(image, [int(min(height, width) / crop_pct)], antialias=True)
        image = F.center_crop(image, [height, width])
        image = F.to_dtype(image, torch.float32, scale=True)
        images.append(F.normalize(image, list(mean), list(std)))
    if not images:
        name, reason = undecodable[0]
        raise SEInjectError(f"--images {directory}: none of the {len(files)} files decodes (e.g. {name}: {reason})")
    described = f"{len(images)} images from {directory}"
    if undecodable:
        names = ", ".join(name for name, _ in undecodable[:3]) + (", ..." if len(undecodable) > 3 else "")
        described += f" (skipped {len(undecodable)} that do not decode: {names})"
    return torch.stack(images), described


def outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's eval-mode output on `x` (its training flag is restored).

    Computed on one CPU thread: how kernels split reductions depends on the thread count, and the last digits of the
    drift figures with it; on one thread they are the same on every machine, so seeded reports are byte-identical.
    """
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    training, threads = model.training, torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        with torch.no_grad():
            out = model.eval()(x.to(device))
    finally:
        torch.set_num_threads(threads)
        model.train(training)
    if not isinstance(out, torch.Tensor):
        raise SEInjectError("drift needs a model that returns one tensor")
    return out.detach().float().cpu()


def compare(base: torch.Tensor, injected: torch.Tensor, inputs: str) -> Drift:
    norm = float(base.norm())
    top1 = float((base.flatten(1).argmax(1) == injected.flatten(1).argmax(1)).float().mean())
    return Drift(
        inputs=inputs,
        relative_l2=float((injected - base).norm()) / norm if norm else float("inf"),
        top1_agreement=top1,
        max_abs_diff=float((injected - base).abs().max()),
    )
