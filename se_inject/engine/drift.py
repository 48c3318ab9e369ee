"""Drift: how far the injected model's outputs are from the base model's, before anyone trains.

Measured on a deterministic batch of random inputs, or on images from a folder (decoded with torchvision.io and
preprocessed with the model's own resize/crop/normalisation settings).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import SEInjectError, describe
from .files import open_regular
from .meta import training_flags
from .tasks import example_inputs, model_task, planning_scope

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
MAX_IMAGES = 64


def max_image_pixels() -> int:
    """The largest image decoded: Pillow's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``, about 89
    million pixels, 256 MiB as RGB), read when called so a caller who changes it is followed."""
    from PIL import Image

    return int(Image.MAX_IMAGE_PIXELS or 0) or 89_478_485


def _read_image(file: Path) -> bytes:
    """The bytes of one image file, refused (`SEInjectError`) from its header alone before its pixels are read: not a
    regular file, more than one frame (torchvision decodes every frame of an animation, e.g. an animated GIF named
    .png), more pixels than `max_image_pixels` (a decompression bomb: a small file declaring gigabytes), or more bytes
    than its pixels can need (16 bits in each of 4 channels, uncompressed, plus 1 MiB: padding, or a sparse file)."""
    import warnings

    from PIL import Image

    limit = max_image_pixels()
    with os.fdopen(open_regular(file, SEInjectError), "rb") as f:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with Image.open(f) as image:
                    (width, height), frames = image.size, getattr(image, "n_frames", 1)
        except Image.DecompressionBombError:
            raise SEInjectError(f"more than {limit:,} pixels") from None
        except (OSError, ValueError, SyntaxError, EOFError) as e:  # Pillow cannot read its header: nor torchvision
            raise SEInjectError(describe(e, 120) or "not an image") from None
        if frames != 1:
            raise SEInjectError(f"{frames} frames; only single images are read")
        if width * height > limit:
            raise SEInjectError(f"{width}x{height} pixels, more than {limit:,}")
        cap = width * height * 8 + (1 << 20)
        if os.fstat(f.fileno()).st_size > cap:
            raise SEInjectError(f"{os.fstat(f.fileno()).st_size:,} bytes, more than a {width}x{height} image needs")
        f.seek(0)
        return f.read(cap)


@dataclass(frozen=True)
class Drift:
    """Relative L2 change of the outputs (``||y' - y|| / ||y||``) and the fraction of inputs whose top-1 class
    stays the same."""

    inputs: str
    relative_l2: float
    top1_agreement: float | None  # None where the outputs are not class scores (detection features, masks, flows)
    max_abs_diff: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def random_batch(
    input_size: tuple[int, ...], *, batch: int = 8, seed: int = 0, model: nn.Module | None = None
) -> tuple[torch.Tensor | tuple[Any, ...], str]:
    """A deterministic random batch: a tensor of `batch` inputs for an image classifier; for other tasks the
    model's own arguments (`tasks.example_inputs`: a detector's list of images, RAFT's two frames) at batch 2."""
    generator = torch.Generator().manual_seed(seed)
    if model is not None and model_task(model) not in ("classification", "quantization"):
        batch = 2
        return example_inputs(model, input_size, batch=batch, generator=generator), (
            f"{batch} random normal inputs (seed {seed})")
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
        raise SEInjectError(f"drift={str(directory)!r} (--images): not a folder")
    files = sorted(p for p in directory.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:MAX_IMAGES]
    # Files only: a FIFO or a device with an image's name would block or never end.
    if not files:
        raise SEInjectError(f"drift={str(directory)!r} (--images): no {', '.join(IMAGE_SUFFIXES)} files")
    from timm.data import DEFAULT_CROP_PCT, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean, std = cfg.get("mean", IMAGENET_DEFAULT_MEAN), cfg.get("std", IMAGENET_DEFAULT_STD)
    crop_pct = cfg.get("crop_pct", DEFAULT_CROP_PCT)
    _, height, width = input_size
    images, undecodable = [], []
    for file in files:
        try:
            data = _read_image(file)
            image = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        except (SEInjectError, RuntimeError, ValueError) as e:
            undecodable.append((file.name, describe(e, 120)))
            continue
        image = F.resize(image, [int(min(height, width) / crop_pct)], antialias=True)
        image = F.center_crop(image, [height, width])
        image = F.to_dtype(image, torch.float32, scale=True)
        images.append(F.normalize(image, list(mean), list(std)))
    if not images:
        name, reason = undecodable[0]
        raise SEInjectError(f"drift={str(directory)!r} (--images): none of the {len(files)} files decodes "
                            f"(e.g. {name}: {reason})")
    described = f"{len(images)} images from {directory}"
    if undecodable:
        names = ", ".join(name for name, _ in undecodable[:3]) + (", ..." if len(undecodable) > 3 else "")
        described += f" (skipped {len(undecodable)} that do not decode: {names})"
        large = [f"{name} ({why})" for name, why in undecodable if "pixels" in why]
        if large:
            described += f"; too large to decode: {', '.join(large[:3])}{', ...' if len(large) > 3 else ''}"
    return torch.stack(images), described


def outputs(model: nn.Module, x: torch.Tensor | tuple[Any, ...]) -> torch.Tensor:
    """The model's eval-mode output on `x` (a tensor, or a tuple of positional arguments) as one (N, D) or (N, K)
    tensor (its training flag is restored): a detector's backbone features (where SE acts: its detections are
    data-dependent lists), every tensor of a dict or list output (segmentation, optical flow) flattened per input.

    Computed on one CPU thread: how kernels split reductions depends on the thread count, and the last digits of the
    drift figures with it; on one thread they are the same on every machine, so seeded reports are byte-identical.
    """
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    args = x if isinstance(x, tuple) else (x,)
    args = tuple(_to(a, device) for a in args)
    threads = torch.get_num_threads()
    captured: list[Any] = []
    scope = planning_scope(model)
    handle = scope.register_forward_hook(lambda _m, _a, out: captured.append(out)) if scope is not None else None
    try:
        torch.set_num_threads(1)
        with torch.no_grad(), training_flags(model):
            out = model.eval()(*args)
    finally:
        torch.set_num_threads(threads)
        if handle is not None:
            handle.remove()
    if captured:
        out = captured[0]
    if isinstance(out, torch.Tensor):
        return out.detach().float().cpu()
    tensors = [t for t in _tensors(out) if t.dim() > 0]
    if not tensors or len({t.shape[0] for t in tensors}) != 1:
        raise SEInjectError("drift needs a model whose outputs are tensors with a batch dimension")
    return torch.cat([t.detach().float().cpu().flatten(1) for t in tensors], dim=1)


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    return [_to(v, device) for v in value] if isinstance(value, list) else value


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    return []


def compare(base: torch.Tensor, injected: torch.Tensor, inputs: str, *, classes: bool = True) -> Drift:
    """The drift of `injected` from `base`; the top-1 agreement only where the outputs are class scores."""
    norm = float(base.norm())
    top1 = float((base.flatten(1).argmax(1) == injected.flatten(1).argmax(1)).float().mean()) if classes else None
    return Drift(
        inputs=inputs,
        relative_l2=float((injected - base).norm()) / norm if norm else float("inf"),
        top1_agreement=top1,
        max_abs_diff=float((injected - base).abs().max()),
    )
