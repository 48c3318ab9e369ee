"""The checkpoint file, ``model.safetensors``: written with a digest of its tensors in its metadata, and checked on
reading (a regular, readable file; exactly the size its header places; the digest) before anything loads it.

What the file holds and how a model is rebuilt from it is `se_inject.io.checkpoint`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from ..engine.weights import check_readable
from ..errors import CheckpointError, SEInjectError, describe

MODEL_FILE = "model.safetensors"
WEIGHTS_HASH_KEY = "se_inject.weights_sha256"
DIGEST_PLACEHOLDER = "0" * 64
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


DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}




def write_safetensors_file(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write the safetensors format tensor by tensor: no second copy of the weights in memory, and the same bytes
    for the same inputs (safetensors' own writer orders the metadata differently from run to run)."""
    header: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))}
    offset = 0
    for name in sorted(tensors):
        t = tensors[name]
        if t.dtype not in DTYPES:
            raise SEInjectError(f"cannot save {name}: dtype {t.dtype} has no safetensors code")
        size = t.numel() * t.element_size()
        header[name] = {"dtype": DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format allows space padding; keeps the data 8-byte aligned
    hasher = _weights_hasher(header)
    placeholder = f'"{WEIGHTS_HASH_KEY}":"{DIGEST_PLACEHOLDER}"'.encode()
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
            f.seek(8 + blob.index(placeholder) + len(placeholder) - len(DIGEST_PLACEHOLDER) - 1)
            f.write(hasher.hexdigest().encode())


def model_file(path: str | Path) -> Path:
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

    file = model_file(path)
    try:
        with safe_open(str(file), "pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{file}: not a valid safetensors file ({describe(e, 160)})") from None



def check_file_size(path: str | Path) -> None:
    """The file is exactly its header and the tensor bytes the header places: a longer one (padding, or a sparse
    file claiming terabytes) is refused before a byte of it is hashed."""
    file = model_file(path)
    try:
        with open(file, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 0 < size <= MAX_HEADER_BYTES:
                raise CheckpointError(f"{file}: not a valid safetensors file (header size {size})")
            header = json.loads(f.read(size))
            length = os.fstat(f.fileno()).st_size
    except (OSError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{file}: cannot read its header ({read_reason(e)})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: not a valid safetensors file (the header is not an object)")
    offsets = [v.get("data_offsets") for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    needed = 8 + size + max([o[-1] for o in offsets if isinstance(o, list) and o and type(o[-1]) is int], default=0)
    if length != needed:
        raise CheckpointError(f"{file}: the file is {length:,} bytes, its header places {needed:,} (truncated, "
                              "padded or damaged)")


def check_weights_digest(path: str | Path) -> None:
    """Check the tensors' bytes against the digest the writer stored (streamed in 16 MiB chunks). A file saved by
    an se-inject without weight digests passes; a damaged header, a changed byte or a swapped tensor raises."""
    file = model_file(path)
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
        raise CheckpointError(f"{file}: cannot read its header ({read_reason(e)})") from None
    if hasher.hexdigest() != expected:
        raise CheckpointError(f"{file}: the weights were modified or damaged (digest mismatch); "
                              "re-save the model, or load with verify_weights=False at your own risk")


def read_reason(e: BaseException) -> str:
    if isinstance(e, PermissionError):
        return "permission denied"
    return describe(e, 160) or type(e).__name__
