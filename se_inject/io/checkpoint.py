"""Saving and loading: a folder with ``model.safetensors`` (weights + the plan in its metadata) and ``report.json``.

A folder is staged complete and swapped in with one atomic step (see `atomic`), so an interrupted run leaves either
the previous output or the complete new one. ``load`` validates the plan and the weights' digest, rebuilds the base
model (timm/torchvision names only; code only when trusted), replays the plan and loads the weights strictly.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import __version__
from ..engine.coverage import check_calls
from ..engine.meta import as_meta
from ..engine.models import (
    ModelSpec,
    build_model,
    check_readable,
    check_state_dict,
    load_state,
    registered,
)
from ..engine.plan import Plan
from ..engine.schema import plan_from_data
from ..engine.surgery import apply_plan
from ..errors import CheckpointError, SEInjectError, WeightsError, describe
from .features import feature_options, is_feature_extractor, wrap_features

MODEL_FILE = "model.safetensors"
REPORT_FILE = "report.json"
PLAN_KEY = "se_inject.plan"
PLAN_HASH_KEY = "se_inject.plan_sha256"
OUTPUT_FILES = (MODEL_FILE, REPORT_FILE, "config.json", "model.pt", "model.pt2", "model.onnx")  # names it writes


def library_versions() -> dict[str, str]:
    import timm
    import torchvision


    return {"se_inject": __version__, "torch": torch.__version__, "timm": timm.__version__,
            "torchvision": torchvision.__version__}


def checkpoint_metadata(plan: Plan) -> dict[str, str]:
    text = plan.to_json()
    return {
        "format": "pt",
        PLAN_KEY: text,
        PLAN_HASH_KEY: hashlib.sha256(text.encode()).hexdigest(),
        WEIGHTS_HASH_KEY: _PLACEHOLDER,  # the writer fills in the digest of the tensors it streams
        "se_inject.versions": json.dumps(library_versions(), sort_keys=True),
    }


WEIGHTS_HASH_KEY = "se_inject.weights_sha256"
_PLACEHOLDER = "0" * 64
_DIGEST_PREFIX = b"se-inject.weights/1\n"
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit


def _weights_hasher(header: dict[str, Any]) -> Any:
    """SHA-256 over the tensor index (names, dtypes, shapes, offsets) and then the data bytes, in file order: binds
    what each tensor is to its bytes, so a changed dtype or a swapped tensor is caught as well as a flipped bit."""
    index = {k: v for k, v in header.items() if k != "__metadata__"}
    hasher = hashlib.sha256(_DIGEST_PREFIX)
    hasher.update(json.dumps(index, sort_keys=True, separators=(",", ":")).encode())
    hasher.update(b"\n")
    return hasher


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
    hasher = _weights_hasher(header)
    placeholder = f'"{WEIGHTS_HASH_KEY}":"{_PLACEHOLDER}"'.encode()
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for name in sorted(tensors):
            t = tensors[name].to("cpu").contiguous().reshape(-1)
            if t.numel():
                data = t.view(torch.uint8).numpy().data
                hasher.update(data)  # hashed as streamed: no second pass over the weights
                f.write(data)
        if placeholder in blob:  # same length as the digest: no offset moves
            f.seek(8 + blob.index(placeholder) + len(placeholder) - len(_PLACEHOLDER) - 1)
            f.write(hasher.hexdigest().encode())


def write_checkpoint(model: nn.Module, plan: Plan) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        write_safetensors_file(path, state_for_saving(model), checkpoint_metadata(plan))

    return write


def write_text(text: str) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        path.write_text(text, encoding="utf-8")

    return write


def _model_file(path: str | Path) -> Path:
    path = Path(path)
    file = path / MODEL_FILE if path.is_dir() else path
    if not file.is_file():
        if path.is_dir():
            raise CheckpointError(f"{path}: no {MODEL_FILE} in this folder (not an se-inject output?)")
        raise CheckpointError(f"{path}: no such file or folder")
    check_readable(file, CheckpointError)
    return file


def read_metadata(path: str | Path) -> dict[str, str]:
    from safetensors import SafetensorError, safe_open

    file = _model_file(path)
    try:
        with safe_open(str(file), "pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{file}: not a valid safetensors file ({describe(e, 160)})") from None


def read_plan(path: str | Path) -> Plan:
    """The plan stored in a saved checkpoint, verified against its checksum and validated field by field."""

    file = _model_file(path)
    metadata = read_metadata(file)
    text = metadata.get(PLAN_KEY)
    if text is None:
        raise CheckpointError(f"{file}: no se-inject plan in its metadata (a plain checkpoint? use --weights)")
    if metadata.get(PLAN_HASH_KEY) != hashlib.sha256(text.encode()).hexdigest():
        raise CheckpointError(f"{file}: the plan in its metadata was modified (checksum mismatch)")
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"{file}: the plan in its metadata is not valid JSON ({str(e)[:120]})") from None
    try:
        return plan_from_data(data)
    except CheckpointError as e:
        raise CheckpointError(f"{file}: {e}") from None


def check_weights_digest(path: str | Path) -> None:
    """Check the tensors' bytes against the digest the writer stored (streamed in 16 MiB chunks). A file saved by
    an se-inject without weight digests passes; a damaged header, a changed byte or a swapped tensor raises."""
    file = _model_file(path)
    try:
        with open(file, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 0 < size <= MAX_HEADER_BYTES:
                raise CheckpointError(f"{file}: not a valid safetensors file (header size {size})")
            header = json.loads(f.read(size))
            if not isinstance(header, dict) or not isinstance(header.get("__metadata__", {}), dict):
                raise CheckpointError(f"{file}: not a valid safetensors file (the header is not an object)")
            expected = header.get("__metadata__", {}).get(WEIGHTS_HASH_KEY)
            if expected is None:
                return
            hasher = _weights_hasher(header)
            chunk = bytearray(16 << 20)
            view = memoryview(chunk)
            while n := f.readinto(chunk):
                hasher.update(view[:n])
    except (OSError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{file}: cannot read its header ({_reason(e)})") from None
    if hasher.hexdigest() != expected:
        raise CheckpointError(f"{file}: the weights were modified or damaged (digest mismatch); "
                              "re-save the model, or load with verify_weights=False at your own risk")


def _reason(e: BaseException) -> str:
    if isinstance(e, PermissionError):
        return "permission denied"
    return describe(e, 160) or type(e).__name__


def _check_model_spec(spec: ModelSpec, file: Path, metadata: dict[str, str], trust_code: bool) -> None:
    """Only registry names are built from a folder; code named by it runs only with `trust_code`."""
    if spec.source == "python":
        if not trust_code:
            raise CheckpointError(
                f"{file}: the plan's model is code ({spec.name}); se-inject never runs code named by a folder. "
                "Pass the model yourself: load(DIR, model=...) or --model FILE.py:FACTORY; or, if you trust this "
                "folder, trust_code=True / --trust-code"
            )
        return
    if not registered(spec):
        saved = _saved_version(metadata, spec.source)
        installed = library_versions()[spec.source]
        raise CheckpointError(f"{file}: plan field 'model.name': {spec.source} {installed} has no model "
                              f"{spec.name!r} (the folder was saved with {spec.source} {saved})")


def _saved_version(metadata: dict[str, str], library: str) -> str:
    """The library's version the folder records (untrusted text: any parse failure reads as unknown)."""
    try:
        saved = json.loads(metadata.get("se_inject.versions", "{}")).get(library)
    except (ValueError, AttributeError, RecursionError):
        saved = None
    return saved[:40] if isinstance(saved, str) else "another version"


def _check_anchors(model: nn.Module, plan: Plan, file: Path) -> None:
    """Each site's anchor is a child module of its block (a graph node anchor is checked when the block is traced;
    a missing block is reported by `apply_plan`, naming the site's path)."""
    for i, site in enumerate(plan.sites):
        if not site.anchor or site.anchor.startswith("%"):
            continue
        try:
            block = model.get_submodule(site.path)
        except AttributeError:
            continue
        try:
            block.get_submodule(site.anchor)
        except AttributeError:
            raise CheckpointError(f"{file}: plan field 'sites[{i}].anchor': {site.path or 'the model'} has no child "
                                  f"module {site.anchor[:80]!r}") from None


def _header_tensors(file: Path) -> dict[str, torch.Tensor]:
    """The file's tensors as meta tensors (names, shapes, dtypes from its header): no data is read."""
    from safetensors import SafetensorError, safe_open

    codes = {code: dtype for dtype, code in _DTYPES.items()}
    tensors = {}
    try:
        with safe_open(str(file), "pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open has no iterator)
                piece = f.get_slice(key)
                dtype = codes.get(piece.get_dtype())
                if dtype is None:
                    raise CheckpointError(f"{file}: tensor {key[:80]!r} has dtype {piece.get_dtype()[:20]!r}, which "
                                          "se-inject does not write")
                tensors[key] = torch.empty(piece.get_shape(), dtype=dtype, device="meta")
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as e:
        raise CheckpointError(f"{file}: cannot read the weights ({_reason(e)})") from None
    return tensors


def _check_state(model: nn.Module, state: dict[str, torch.Tensor], file: Path) -> None:
    try:
        check_state_dict(model, state, f"{file}: the weights")
    except WeightsError as e:
        raise CheckpointError(f"{e} (they do not match the plan)") from None
    _check_dtypes(model, state, file)


def _check_dtypes(model: nn.Module, state: dict[str, torch.Tensor], file: Path) -> None:
    own = model.state_dict(keep_vars=True)
    for key, tensor in state.items():
        expected = own[key]
        if tensor.is_floating_point() != expected.is_floating_point() or (
            not tensor.is_floating_point() and tensor.dtype != expected.dtype
        ):
            raise CheckpointError(f"{file}: tensor {key!r} has dtype {tensor.dtype} in the file, the model expects "
                                  f"{expected.dtype} (a damaged header?)")


def _check_calls(model: nn.Module, plan: Plan, file: Path) -> None:
    """Every inserted module must run exactly once per call of its block, on the planned map, on every forward path
    (`se_inject.engine.coverage`): a plan whose module would be dead code, or sit on another map, is refused, naming
    the plan field it contradicts."""
    problems = check_calls(model, plan)
    if problems:
        path, problem = next(iter(problems.items()))
        index = next(i for i, s in enumerate(plan.sites) if s.path == path)
        field = f"plan field 'sites[{index}].{problem.field}': " if problem.field else ""
        raise CheckpointError(f"{file}: the plan does not fit the model: {field}{problem}")


def load(
    path: str | Path,
    *,
    model: nn.Module | None = None,
    device: str | torch.device = "cpu",
    trust_code: bool = False,
    verify_weights: bool = True,
    features_only: bool = False,
    out_indices: tuple[int, ...] | list[int] | None = None,
    feature_cls: str | None = None,
) -> nn.Module:
    """Rebuild a saved model: base model from the plan's spec (or `model`), replay the plan, load weights strictly.

    Nothing named by the folder is imported or executed: only timm and torchvision models are built by registry
    name. A plan whose model is code (``FILE.py:factory``) needs `model` (the base model, built by you) or
    `trust_code=True`. The plan is validated field by field and the weights against their digest first
    (`verify_weights=False` skips the digest, a full read of the file, for very large checkpoints).

    With `features_only` (or a timm feature extractor as `model`, whose out_indices are kept) the result is the
    feature extractor timm's ``create_model(name, features_only=True, out_indices=..., feature_cls=...)`` builds,
    around the SE model.

    Returns the model in eval mode on `device`.
    """
    from safetensors import SafetensorError, safe_open

    if model is not None and is_feature_extractor(model):
        features_only, out_indices, model = True, out_indices or feature_options(model).get("out_indices"), None
    file = _model_file(path)
    plan = read_plan(file)
    if model is None and plan.model is None:
        raise CheckpointError(f"{file}: saved from a model object; pass the base model: load(path, model=...)")
    if model is None:
        assert plan.model is not None
        _check_model_spec(plan.model, file, read_metadata(file), trust_code)
    if verify_weights:
        check_weights_digest(file)
    # Everything the plan says is checked against the model on the meta device first (its anchors, its channels,
    # every tensor's shape and dtype in the file): nothing is allocated for a plan that does not fit.

    try:
        if model is None:
            assert plan.model is not None
            probe = build_model(plan.model, device="meta")
        else:
            probe = as_meta(model)
        _check_anchors(probe, plan, file)
        probe = apply_plan(probe, plan, inplace=probe is not model)  # never changes the caller's model
        _check_calls(probe, plan, file)
    except CheckpointError:
        raise
    except SEInjectError as e:
        raise CheckpointError(f"{file}: the plan does not fit the model: {e}") from None
    _check_state(probe, _header_tensors(file), file)
    try:
        with safe_open(str(file), "pt") as f:
            # Cloned into torch's own (64-byte aligned) memory: kernels then take the same paths as for the saved
            # model, and outputs are bit-identical.
            state = {key: f.get_tensor(key).clone() for key in f.keys()}  # noqa: SIM118 (safe_open has no iterator)
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as e:
        raise CheckpointError(f"{file}: cannot read the weights ({_reason(e)})") from None
    _check_state(probe, state, file)
    try:
        if model is not None:
            rebuilt = apply_plan(model, plan)
        elif set(dict(probe.named_buffers())) - set(state):
            # The model has state that is not in the file (non-persistent buffers), which only a real build computes.
            assert plan.model is not None
            rebuilt = apply_plan(build_model(plan.model, seed=plan.seed), plan, inplace=True)
        else:  # weights are assigned from the file into the meta build: no init cost
            rebuilt = probe
    except SEInjectError as e:
        raise CheckpointError(f"{file}: the plan does not fit the model: {e}") from None
    try:
        load_state(rebuilt, state)
    except (RuntimeError, ValueError, TypeError) as e:
        raise CheckpointError(f"{file}: cannot load the weights into the model ({_reason(e)})") from None
    if features_only:
        options = {k: v for k, v in (("out_indices", out_indices), ("feature_cls", feature_cls)) if v is not None}
        rebuilt = wrap_features(rebuilt, plan, **options)
    return rebuilt.to(device).eval()
