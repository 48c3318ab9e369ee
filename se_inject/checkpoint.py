"""Saving and loading: a folder with ``model.safetensors`` (weights + the plan in its metadata) and ``report.json``.

Files are written to temporary names and renamed into place, so an interrupted run leaves either the previous
output or the complete new one. ``load`` rebuilds the base model, replays the plan and loads the weights strictly.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import CheckpointError, OutputExistsError, SEInjectError, WeightsError
from .models import build_model, check_state_dict, load_state
from .plan import Plan
from .surgery import apply_plan

MODEL_FILE = "model.safetensors"
REPORT_FILE = "report.json"
PLAN_KEY = "se_inject.plan"
PLAN_HASH_KEY = "se_inject.plan_sha256"
OUTPUT_FILES = (MODEL_FILE, REPORT_FILE, "config.json", "model.pt", "model.pt2", "model.onnx")  # names we own


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


_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}


def state_for_saving(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state_dict, detached; refuses a model without data."""
    state = {k: v.detach() for k, v in model.state_dict().items()}
    if any(t.is_meta for t in state.values()):
        raise SEInjectError("the model lives on the meta device and has no weights to save")
    return state


def write_safetensors_file(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write the safetensors format tensor by tensor: no second copy of the weights in memory, and the same bytes
    for the same inputs (safetensors' own writer orders the metadata differently from run to run)."""
    header: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))}
    offset = 0
    for name in sorted(tensors):
        t = tensors[name]
        if t.dtype not in _DTYPES:
            raise SEInjectError(f"cannot save {name}: dtype {t.dtype} has no safetensors code")
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format allows space padding; keeps the data 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for name in sorted(tensors):
            t = tensors[name].to("cpu").contiguous().reshape(-1)
            if t.numel():
                f.write(t.view(torch.uint8).numpy().data)


def write_checkpoint(model: nn.Module, plan: Plan) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        write_safetensors_file(path, state_for_saving(model), checkpoint_metadata(plan))

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


_TEMPORARY = re.compile(r"^\..+\.tmp-(\d+)-")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_temporaries(directory: Path, prefix: str = ".") -> None:
    """Delete temporaries (files, staging folders) that a killed se-inject run left in `directory`."""
    if not directory.is_dir():
        return
    for entry in directory.iterdir():
        match = _TEMPORARY.match(entry.name)
        if match and entry.name.startswith(prefix) and not _alive(int(match.group(1))):
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    entry.unlink()


def write_atomically(
    directory: str | Path, files: dict[str, Callable[[Path], None]], *, force: bool = False, outputs: bool = False
) -> Path:
    """Write `files` (name -> writer) into `directory`: all to temporary names first, then renamed into place.

    Raises OutputExistsError, without touching anything, when a file to write exists and `force` is off. With
    `outputs` (a whole se-inject output folder), our other output files count too, and with `force` the ones this
    write does not produce are removed as stale; other files in the folder are never touched.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise OutputExistsError(f"{directory} exists and is not a directory")
    names = (*files, *OUTPUT_FILES) if outputs else tuple(files)
    owned = [name for name in dict.fromkeys(names) if (directory / name).exists()]
    if owned and not force:
        raise OutputExistsError(f"{directory / owned[0]} already exists; pass --force to overwrite it")
    temporaries: list[Path] = []
    staging: Path | None = None
    umask = _umask()
    tag = f".tmp-{os.getpid()}-"  # temporaries carry the writer's pid, so a later run can clear a killed run's
    try:
        _remove_stale_temporaries(directory)
        _remove_stale_temporaries(directory.parent, f".{directory.name}.tmp-")
        if directory.is_dir():
            targets = {}
            for name, write in files.items():
                stem, dot, ext = name.rpartition(".")  # keep the extension: some writers check it (.pt2)
                prefix, suffix = (f".{stem}{tag}", f"{dot}{ext}") if dot else (f".{name}{tag}", "")
                fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=directory)
                os.close(fd)
                temporaries.append(Path(tmp))
                write(Path(tmp))
                _finish(Path(tmp), 0o666 & ~umask)
                targets[Path(tmp)] = directory / name
            for tmp, target in targets.items():
                os.replace(tmp, target)
            temporaries.clear()
            for name in set(owned) - set(files):  # a previous run's outputs, now stale (only with `outputs`)
                (directory / name).unlink()
        else:
            directory.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}{tag}", dir=directory.parent))
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
            shutil.rmtree(staging, ignore_errors=True)
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
    files: dict[str, Callable[[Path], None]] = {MODEL_FILE: write_checkpoint(model, plan)}
    if report is not None:
        files[REPORT_FILE] = write_text(json.dumps(report, indent=2, sort_keys=False) + "\n")
    for name, text in (extra_files or {}).items():
        files[name] = write_text(text)
    return write_atomically(directory, files, force=force, outputs=True)


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
    from safetensors import SafetensorError, safe_open

    file = _model_file(path)
    plan = read_plan(file)
    if model is None and plan.model is None:
        raise CheckpointError(f"{file}: saved from a model object; pass the base model: load(path, model=...)")
    try:
        with safe_open(str(file), "pt") as f:
            # Cloned into torch's own (64-byte aligned) memory: kernels then take the same paths as for the saved
            # model, and outputs are bit-identical.
            state = {key: f.get_tensor(key).clone() for key in f.keys()}  # noqa: SIM118 (safe_open has no iterator)
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
    load_state(rebuilt, state)
    return rebuilt.to(device).eval()
