"""The ownership record: ``.se-inject.json`` proves which files in a folder se-inject wrote.

A file is se-inject's (to replace or remove) only while it is the regular file recorded there: same size,
modification time and SHA-256 (docs/security.md). Entries se-inject may not have made are looked at with lstat first,
then as regular files only, never blocking. The folder writer that keeps the record is `se_inject.io.atomic`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path

RECORD_FILE = ".se-inject.json"
RECORD_FORMAT = "se-inject.files/1"
MAX_RECORD_BYTES = 1 << 20
MARKER = ".se-inject-staging"  # a staging folder's marker (`se_inject.io.atomic`), never a recorded file


# --- looking at entries se-inject may not have made: lstat first, then regular files only, never blocking --------


def lstat(path: Path) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except OSError:
        return None


@contextlib.contextmanager
def _regular(path: Path) -> Iterator[int | None]:
    """A read-only descriptor of `path` while it is a regular file (never a symlink, FIFO or device), else None."""
    st = lstat(path)
    fd = None
    if st is not None and stat.S_ISREG(st.st_mode):
        with contextlib.suppress(OSError):
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        if fd is not None and (os.fstat(fd).st_dev, os.fstat(fd).st_ino) != (st.st_dev, st.st_ino):
            os.close(fd)  # swapped meanwhile
            fd = None
    try:
        yield fd
    finally:
        if fd is not None:
            os.close(fd)


def read_json(path: Path, limit: int) -> object:
    with _regular(path) as fd:
        data = os.read(fd, limit + 1) if fd is not None else b""
    try:
        return json.loads(data.decode("utf-8")) if 0 < len(data) <= limit else None
    except (ValueError, RecursionError):
        return None


def _digest(path: Path) -> str | None:
    with _regular(path) as fd:
        if fd is None:
            return None
        digest = hashlib.sha256()
        while chunk := os.read(fd, 1 << 20):
            digest.update(chunk)
        return digest.hexdigest()


def create_new(path: Path, text: str, mode: int = 0o666) -> None:
    """Write a new file; fails (FileExistsError) rather than write through whatever already has that name."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        os.write(fd, text.encode("utf-8"))
    finally:
        os.close(fd)


# --- the record: which files are se-inject's -----------------------------------------------------------------------


def read_record(directory: Path) -> dict[str, dict[str, object]]:
    """Files se-inject wrote into `directory` (name -> size, mtime and digest then); empty without a valid record."""
    data = read_json(directory / RECORD_FILE, MAX_RECORD_BYTES)
    files = data.get("files") if isinstance(data, dict) and data.get("format") == RECORD_FORMAT else None
    if not isinstance(files, dict):
        return {}
    return {name: stamp for name, stamp in files.items()
            if isinstance(name, str) and "/" not in name and name not in ("", ".", "..", RECORD_FILE, MARKER)
            and isinstance(stamp, dict) and type(stamp.get("size")) is int and type(stamp.get("mtime_ns")) is int
            and isinstance(stamp.get("sha256"), str)}  # records from before the digest prove nothing


def proven(path: Path, stamp: dict[str, object]) -> bool:
    """Whether `path` is the regular file se-inject recorded: same size, mtime and SHA-256."""
    st = lstat(path)
    if st is None or not stat.S_ISREG(st.st_mode) or (st.st_size, st.st_mtime_ns) != (stamp["size"], stamp["mtime_ns"]):
        return False
    return _digest(path) == stamp["sha256"]


def owned_files(directory: Path) -> set[str]:
    """Recorded files still exactly as se-inject wrote them: ours to replace or remove."""
    return {name for name, stamp in read_record(directory).items() if proven(directory / name, stamp)}


def write_record(folder: Path, stamped_in: Path, names: Iterable[str]) -> None:
    """Write the record of `names` (stamped as they are in `stamped_in`) into `folder`."""
    files = {}
    for name in sorted(names):
        st = os.lstat(stamped_in / name)
        files[name] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": _digest(stamped_in / name)}
    with contextlib.suppress(FileNotFoundError):
        os.unlink(folder / RECORD_FILE)
    create_new(folder / RECORD_FILE, json.dumps({"format": RECORD_FORMAT, "files": files}, indent=1) + "\n")
