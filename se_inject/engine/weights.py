"""Weight files: read a local checkpoint without executing code, check that it fits a model, load it strictly."""

from __future__ import annotations

import re
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import SEInjectError, WeightsError, describe


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a local checkpoint without executing code: safetensors, or torch.load(weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such file" if not path.exists() else f"{path}: not a file")
    if path.stat().st_size == 0:
        raise WeightsError(f"{path}: empty file")
    check_readable(path, WeightsError)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            data: Any = load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise WeightsError(f"{path}: not a valid safetensors file ({describe(e) or type(e).__name__})") from None
    else:
        import pickle

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                data = torch.load(str(path), map_location="cpu", weights_only=True)
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
    return _unwrap_state_dict(data, path)


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
