"""Weight files: read a local checkpoint without executing code, check that it fits a model, load it strictly."""

from __future__ import annotations

import os
import re
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import nn

from ..errors import SEInjectError, WeightsError, describe
from .files import open_regular
from .memory import machine_memory

MAX_SAFETENSORS_HEADER = 100_000_000  # safetensors' own limit on its JSON header


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a local checkpoint without executing code: safetensors, or torch.load(weights_only=True). The file must be
    a regular file no larger than the machine's memory (its tensors are all read into it), else a WeightsError."""
    path = Path(path)
    with os.fdopen(_open(path), "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise WeightsError(f"{path}: empty file")
        if path.suffix == ".safetensors":
            _check_safetensors_header(f, size, path)
            data: Any = _load_safetensors(path)
        else:
            data = _load_pickle(f, path)
    return _unwrap_state_dict(data, path)


def _open(path: Path) -> int:
    return open_regular(path, lambda why: WeightsError(f"{path}: {why}"), limit=machine_memory())


def _check_safetensors_header(f: BinaryIO, size: int, path: Path) -> None:
    """Refuse a header longer than safetensors' own limit or than the file, before anything parses it."""
    head = f.read(8)
    length = int.from_bytes(head, "little") if len(head) == 8 else None
    if length is None or length > min(MAX_SAFETENSORS_HEADER, size - 8):
        got = "too short for its header length" if length is None else f"header of {length:,} bytes"
        raise WeightsError(f"{path}: not a valid safetensors file ({got} in a file of {size:,} bytes)")


def _load_safetensors(path: Path) -> Any:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise WeightsError(f"{path}: not a valid safetensors file ({describe(e) or type(e).__name__})") from None


def _load_pickle(f: BinaryIO, path: Path) -> Any:
    import pickle

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(f, map_location="cpu", weights_only=True)
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
