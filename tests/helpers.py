"""Helpers shared by the tests: snapshots of a model's state and norm statistics that make equality checks mean
something."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


def state_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of every state_dict entry."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def randomize_norm_stats(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial running statistics and affine parameters, so equality checks mean something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                    m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return model


def hf_cache(root: Path, repo: str, state: dict[str, torch.Tensor]) -> Path:
    """A huggingface_hub cache holding `repo`'s model.safetensors (the layout try_to_load_from_cache reads)."""
    from safetensors.torch import save_file

    commit = "0" * 40
    base = root / f"models--{repo.replace('/', '--')}"
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)
    (base / "snapshots" / commit).mkdir(parents=True)
    save_file(state, str(base / "snapshots" / commit / "model.safetensors"))
    return root


# A tiny ViT whose blocks run attention and MLP as parallel branches summed into one residual (timm's
# ParallelThingsBlock, as vit_small_patch16_18x2_224): no branch ends in one projection, so no recipe takes it.
PARALLEL_VIT_SOURCE = """
from timm.models.vision_transformer import ParallelThingsBlock, VisionTransformer


def make():
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10,
                             block_fn=ParallelThingsBlock)
"""


def parallel_vit_factory(folder: Path) -> str:
    """`FILE.py:make` building the no-match transformer above, written into `folder`."""
    path = folder / "parallel_vit.py"
    path.write_text(PARALLEL_VIT_SOURCE)
    return f"{path}:make"


def parallel_vit() -> nn.Module:
    namespace: dict = {}
    exec(PARALLEL_VIT_SOURCE, namespace)  # our own source, above
    return namespace["make"]()
