"""Saving and loading: a folder with ``model.safetensors`` (weights + the plan in its metadata) and ``report.json``.

Files are written to temporary names and renamed into place, so an interrupted run leaves either the previous
output or the complete new one. ``load`` rebuilds the base model, replays the plan and loads the weights strictly.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import CheckpointError, OutputExistsError, SEInjectError, WeightsError
from .models import build_model, check_state_dict
from .plan import Plan
from .surgery import apply_plan

MODEL_FILE = "model.safetensors"
REPORT_FILE = "report.json"
PLAN_KEY = "se_inject.plan"
PLAN_HASH_KEY = "se_inject.plan_sha256"
OUTPUT_FILES = (MODEL_FILE, REPORT_FILE, "config.json")


def library_versions() -> dict[str, str]:
    import timm
    import torchvision

    from . import __version__

    return {"se_inject": __version__, "torch": torch.__version__, "timm": timm.__version__,
            "torchvision": torchvision.__version__}


def checkpoint_metadata(plan: Plan) -> dict[str, str]:
    text = plan.to_json()
    return {
        "format": "pt",
        PLAN_KEY: text,
        PLAN_HASH_KEY: hashlib.sha256(text.encode()).hexdigest(),
        "se_inject.versions": json.dumps(library_versions(), sort_keys=True),
    }


def state_for_saving(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state_dict as contiguous CPU tensors, with storage shared between entries broken (safetensors needs it)."""
    state: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for key, t in model.state_dict().items():
        if t.is_meta:
            raise SEInjectError("the model lives on the meta device and has no weights to save")
        t = t.detach().to("cpu").contiguous()
        ident = (t.untyped_storage().data_ptr(), t.storage_offset())
        if t.numel() and ident in seen:
            t = t.clone()
        seen.add(ident)
        state[key] = t
    return state


def write_safetensors(model: nn.Module, plan: Plan) -> Callable[[Path], None]:
    from safetensors.torch import save_file

    def write(path: Path) -> None:
        save_file(state_for_saving(model), str(path), metadata=checkpoint_metadata(plan))

    return write


def write_text(text: str) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        path.write_text(text, encoding="utf-8")

    return write


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _finish(path: Path, mode: int) -> None:
    """Give a written temporary file its final permissions and flush it to disk before it is renamed."""
    os.chmod(path, mode)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(directory: str | Path, files: dict[str, Callable[[Path], None]], *, force: bool = False) -> Path:
    """Write `files` (name -> writer) into `directory`: all to temporary names first, then renamed into place.

    Raises OutputExistsError, without touching anything, when one of our output files exists and `force` is off.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise OutputExistsError(f"{directory} exists and is not a directory")
    if directory.is_dir() and not force:
        existing = [name for name in OUTPUT_FILES if (directory / name).exists()]
        if existing:
            raise OutputExistsError(f"{directory / existing[0]} already exists; pass --force to overwrite it")
    temporaries: list[Path] = []
    staging: Path | None = None
    umask = _umask()
    try:
        if directory.is_dir():
            targets = {}
            for name, write in files.items():
                fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
                os.close(fd)
                temporaries.append(Path(tmp))
                write(Path(tmp))
                _finish(Path(tmp), 0o666 & ~umask)
                targets[Path(tmp)] = directory / name
            for tmp, target in targets.items():
                os.replace(tmp, target)
            temporaries.clear()
        else:
            directory.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
            os.chmod(staging, 0o777 & ~umask)
            for name, write in files.items():
                write(staging / name)
                _finish(staging / name, 0o666 & ~umask)
            os.rename(staging, directory)
            staging = None
    except OSError as e:
        raise SEInjectError(f"cannot write {directory}: {e.strerror or e}") from None
    finally:
        for tmp in temporaries:
            with contextlib.suppress(OSError):
                tmp.unlink()
        if staging is not None:
            for child in staging.iterdir() if staging.exists() else ():
                with contextlib.suppress(OSError):
                    child.unlink()
            with contextlib.suppress(OSError):
                staging.rmdir()
    return directory


def save(
    model: nn.Module,
    plan: Plan,
    directory: str | Path,
    *,
    report: dict[str, Any] | None = None,
    extra_files: dict[str, str] | None = None,
    force: bool = False,
) -> Path:
    """Save `model` (weights + plan) and its report into `directory`."""
    files: dict[str, Callable[[Path], None]] = {MODEL_FILE: write_safetensors(model, plan)}
    if report is not None:
        files[REPORT_FILE] = write_text(json.dumps(report, indent=2, sort_keys=False) + "\n")
    for name, text in (extra_files or {}).items():
        files[name] = write_text(text)
    return write_atomically(directory, files, force=force)


def _model_file(path: str | Path) -> Path:
    path = Path(path)
    file = path / MODEL_FILE if path.is_dir() else path
    if not file.is_file():
        if path.is_dir():
            raise CheckpointError(f"{path}: no {MODEL_FILE} in this folder (not an se-inject output?)")
        raise CheckpointError(f"{path}: no such file or folder")
    return file


def read_metadata(path: str | Path) -> dict[str, str]:
    from safetensors import SafetensorError, safe_open

    file = _model_file(path)
    try:
        with safe_open(str(file), "pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{file}: not a valid safetensors file ({str(e).splitlines()[0][:160]})") from None


def read_plan(path: str | Path) -> Plan:
    """The plan stored in a saved checkpoint, verified against its checksum."""
    file = _model_file(path)
    metadata = read_metadata(file)
    text = metadata.get(PLAN_KEY)
    if text is None:
        raise CheckpointError(f"{file}: no se-inject plan in its metadata (a plain checkpoint? use --weights)")
    if metadata.get(PLAN_HASH_KEY) != hashlib.sha256(text.encode()).hexdigest():
        raise CheckpointError(f"{file}: the plan in its metadata was modified (checksum mismatch)")
    try:
        return Plan.from_json(text)
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{file}: the plan in its metadata is damaged ({e})") from None


def load(path: str | Path, *, model: nn.Module | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a saved model: base model from the plan's spec (or `model`), replay the plan, load weights strictly.

    Returns the model in eval mode on `device`.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = _model_file(path)
    plan = read_plan(file)
    if model is None and plan.model is None:
        raise CheckpointError(f"{file}: saved from a model object; pass the base model: load(path, model=...)")
    try:
        state = load_file(str(file))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{file}: cannot read the weights ({str(e).splitlines()[0][:160]})") from None
    if model is not None:
        rebuilt = apply_plan(model, plan)
    else:
        assert plan.model is not None
        # Meta build: no init cost; weights are assigned from the file. Fall back to a real build when the model has
        # state that is not in the file (non-persistent buffers), which only a real build computes.
        rebuilt = apply_plan(build_model(plan.model, device="meta"), plan, inplace=True)
        if set(dict(rebuilt.named_buffers())) - set(state):
            rebuilt = apply_plan(build_model(plan.model, seed=plan.seed), plan, inplace=True)
    try:
        check_state_dict(rebuilt, state, f"{file}: the weights")
    except WeightsError as e:
        raise CheckpointError(f"{e} (they do not match the plan)") from None
    rebuilt.load_state_dict(state, strict=True, assign=True)
    return rebuilt.to(device).eval()
