"""Pretrained weights by name, through timm's and torchvision's own loaders and caches.

A model name's tag names the weights (``resnet50.a1_in1k``, ``torchvision:resnet50.IMAGENET1K_V2``; no tag: the
library's default weights). The weights are looked up in the cache the library itself uses (huggingface_hub's for
timm's hub weights, torch.hub's ``checkpoints`` folder for URL weights and torchvision's) and loaded by the library
from there; only when they are not cached does the library download them. Offline (``HF_HUB_OFFLINE=1``, which
se-inject applies to torchvision's downloads as well, or when the weights' host does not resolve) a missing file
fails at once, naming the cache that was looked in, instead of waiting through the hub's retries.
"""

from __future__ import annotations

import os
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from ..engine.resolve import ModelSpec, split_tag, torchvision_weights_enum
from ..errors import WeightsError, describe

HF_FILENAMES = ("model.safetensors", "pytorch_model.bin")  # what timm's hub loader tries, in its order


@dataclass(frozen=True)
class PretrainedWeights:
    """Where a model's pretrained weights come from.

    Attributes:
        spec: The model, its name carrying the resolved tag (``timm:resnet50.a1_in1k``).
        weights: The weights in the library's own words (``timm/resnet50.a1_in1k``, ``ResNet50_Weights.IMAGENET1K_V2``).
        cache: The cache folder the library keeps them in.
        file: The cached file, or None when it would have to be downloaded.
        url: Where the library downloads them from (a URL or a Hugging Face hub id).
    """

    spec: ModelSpec
    weights: str
    cache: str
    file: str | None
    url: str


def offline() -> bool:
    """huggingface_hub's offline switch (its constant, or the environment variable set after its import)."""
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE", "")
    return bool(constants.HF_HUB_OFFLINE) or value.strip().lower() in ("1", "on", "yes", "true")


def _resolvable(url: str) -> bool:
    host = urlparse(url if "://" in url else f"https://{url}").hostname
    try:
        socket.getaddrinfo(host or "", 443)
    except (OSError, UnicodeError):
        return False
    return True


def _torch_hub_checkpoints() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def locate_pretrained(spec: ModelSpec) -> PretrainedWeights:
    """Find the weights the spec's tag (or the library's default) names, and whether they are cached.

    Raises WeightsError when the model has no such weights, or when they are not cached and cannot be downloaded
    (offline): the message names the cache looked in.
    """
    if spec.source == "timm":
        located = _locate_timm(spec)
    elif spec.source == "torchvision":
        located = _locate_torchvision(spec)
    else:
        raise WeightsError(f"{spec}: pretrained weights come from timm or torchvision; use --weights FILE for your own")
    if located.file is None:
        if offline():
            reason = "offline (HF_HUB_OFFLINE is set)"
        elif not _resolvable(located.url):
            reason = f"offline ({urlparse(located.url).hostname or 'huggingface.co'} does not resolve)"
        else:
            return located
        raise WeightsError(f"pretrained weights {located.weights} are not in the cache {located.cache} and "
                           f"cannot be downloaded: {reason}; put the file in that cache (copied from a machine that "
                           f"downloaded it), or load a local file with --weights FILE (Python: weights=FILE)")
    return located


def _locate_timm(spec: ModelSpec) -> PretrainedWeights:
    import timm
    from huggingface_hub import constants, try_to_load_from_cache

    cfg = timm.models.get_pretrained_cfg(spec.name, allow_unregistered=True)
    if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
        raise WeightsError(f"timm has no pretrained weights for {spec.name}")
    resolved = ModelSpec("timm", f"{split_tag(spec.name)[0]}.{cfg.tag}" if cfg.tag else spec.name)
    if cfg.hf_hub_id:
        repo = cfg.hf_hub_id
        cache = str(constants.HF_HUB_CACHE)
        for filename in (cfg.hf_hub_filename,) if cfg.hf_hub_filename else HF_FILENAMES:
            found = try_to_load_from_cache(repo, filename, cache_dir=cache)
            if isinstance(found, str):
                return PretrainedWeights(resolved, repo, cache, found, f"https://huggingface.co/{repo}")
        return PretrainedWeights(resolved, repo, cache, None, f"https://huggingface.co/{repo}")
    if cfg.file:
        return PretrainedWeights(resolved, str(cfg.file), str(Path(cfg.file).parent),
                                 str(cfg.file) if Path(cfg.file).is_file() else None, str(cfg.file))
    cached = _torch_hub_checkpoints() / os.path.basename(urlparse(cfg.url).path)
    return PretrainedWeights(resolved, cfg.url, str(cached.parent), str(cached) if cached.is_file() else None,
                             cfg.url)


def _locate_torchvision(spec: ModelSpec) -> PretrainedWeights:
    arch, tag = split_tag(spec.name)
    enum = torchvision_weights_enum(arch)
    if enum is None:
        raise WeightsError(f"torchvision has no pretrained weights for {arch}")
    weights = enum[tag or "DEFAULT"]
    cached = _torch_hub_checkpoints() / os.path.basename(urlparse(weights.url).path)
    return PretrainedWeights(ModelSpec("torchvision", f"{arch}.{weights.name}"), str(weights), str(cached.parent),
                             str(cached) if cached.is_file() else None, weights.url)


def build_pretrained(located: PretrainedWeights, *, device: torch.device | str = "cpu") -> nn.Module:
    """Build the model with its pretrained weights, loaded by its library (from the cached file where there is one,
    without touching the network)."""
    spec = located.spec
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if spec.source == "timm":
                import timm

                overlay: dict[str, Any] | None = {"file": located.file} if located.file else None
                model = timm.create_model(spec.name, pretrained=True, pretrained_cfg_overlay=overlay)
            else:
                import torchvision

                arch, tag = split_tag(spec.name)
                model = torchvision.models.get_model(arch, weights=tag)
    except Exception as e:
        where = f"the cached file {located.file}" if located.file else f"a download into the cache {located.cache}"
        raise WeightsError(f"loading pretrained weights {located.weights} from {where} failed: {describe(e)}") from None
    return model.to(device)

