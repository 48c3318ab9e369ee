"""Checks that need no model: run before torch is even imported, so a wrong command fails in well under a second.

Torch-free on purpose (the CLI calls these first); the names here are the ones the writers use.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from ..errors import OutputExistsError, UsageError
from ..names import EXPORT_FORMATS
from .atomic import check_names
from .ownership import RECORD_FILE

# Every name the writers (io.checkpoint, io.export) put in an output folder: the names the check guards.
OUTPUT_FILES = ("model.safetensors", "report.json", "config.json", "model.pt", "model.pt2", "model.onnx")
SAVED_FILES = (*OUTPUT_FILES[:3], RECORD_FILE)  # what a saved folder is made of; exports are written beside
MIN_OPSET = 18  # the oldest opset torch's dynamo-based ONNX exporter writes directly


def check_export_options(formats: tuple[str, ...] | list[str], *, batch: int | None = None,
                         opset: int | None = None) -> None:
    """Raise UsageError for an unknown format, or a static batch or opset that is invalid or applies to nothing."""
    unknown = [f for f in formats if f not in EXPORT_FORMATS]
    if unknown:
        raise UsageError(f"unknown export format {unknown[0]!r}; choose from {', '.join(EXPORT_FORMATS)}")
    if batch is not None:
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise UsageError(f"invalid static batch {batch!r}: expected an integer >= 1")
        if not formats:
            raise UsageError("export_batch (--static-batch) applies to exports only: "
                             "add one to exports (--export FORMAT)")
    if opset is not None:
        if isinstance(opset, bool) or not isinstance(opset, int) or opset < MIN_OPSET:
            raise UsageError(f"invalid opset {opset!r}: expected an integer >= {MIN_OPSET}")
        if "onnx" not in formats:
            raise UsageError("opset (--opset) applies to ONNX exports only: add \"onnx\" to exports (--export onnx)")


def check_output_folder(directory: str | Path, *, force: bool) -> None:
    """Raise OutputExistsError if `directory` is a file, or holds se-inject outputs and `force` is off (the same
    rule the writer applies, checked before any work)."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise OutputExistsError(f"{directory} exists and is not a directory")

    # The files every run writes; the others (config.json, exports) are checked when the run knows it writes them.
    check_names(directory, OUTPUT_FILES[:2], force=force, outputs=True)
    if not force:
        existing = [name for name in OUTPUT_FILES if os.path.lexists(directory / name)]
        if existing:
            raise OutputExistsError(
                f"{directory / existing[0]} already exists; pass force=True (--force) to overwrite it")


def check_output_file(path: str | Path, *, force: bool) -> None:
    """Raise OutputExistsError unless `path` is missing, or (with `force`) a regular file that is not part of a saved
    folder: an export never replaces the weights, report, config or record it may have been read from, nor a
    folder, symlink, device, FIFO or socket."""
    path = Path(path)
    st = _lstat(path)
    if st is None:
        return
    if stat.S_ISDIR(st.st_mode):
        raise OutputExistsError(f"{path} is a directory; name a file")
    if not stat.S_ISREG(st.st_mode):
        kind = "a symlink" if stat.S_ISLNK(st.st_mode) else "a device, FIFO or socket"
        raise OutputExistsError(f"{path} is not a regular file ({kind}): se-inject replaces only regular files, even "
                                "with force=True (--force); choose another output")
    if path.name in SAVED_FILES and any(_lstat(path.parent / n) is not None for n in (RECORD_FILE, OUTPUT_FILES[0])):
        raise OutputExistsError(f"{path} is part of the saved folder {path.parent}: an export never replaces it, "
                                "even with force=True (--force); choose another output")
    if not force:
        raise OutputExistsError(f"{path} already exists; pass force=True (--force) to overwrite it")


def _lstat(path: Path) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except OSError:
        return None
