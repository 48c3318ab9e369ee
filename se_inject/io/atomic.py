"""All-or-nothing writes of an output folder, touching only what se-inject itself wrote.

A folder is written complete in a staging folder next to it, then swapped in with one atomic step (Linux
``renameat2(RENAME_EXCHANGE)``; a new folder is renamed into place). The folder path therefore always holds one
complete run, whenever the writer is killed. The user's own files in the folder are hard-linked into the new folder
before the swap, so they are never missing either.

Ownership comes from a record, not from names: ``.se-inject.json`` in the folder lists each file se-inject wrote with
its size and modification time. ``--force`` replaces and removes only recorded files that are unchanged since; a
file the user put there or changed is theirs and survives. Temporaries are named ``.se-inject-<32 hex>`` (a random
token no user picks); a staging folder also holds a marker naming its target. A later run removes such leftovers
only when their writer is gone: each writer holds an exclusive ``flock`` on its temporaries while it runs.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import shutil
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

from ..errors import OutputExistsError, SEInjectError, UsageError

RECORD_FILE = ".se-inject.json"
RECORD_FORMAT = "se-inject.files/1"
_PREFIX = ".se-inject-"
_MARKER = ".se-inject-staging"
_TEMPORARY = re.compile(r"\.se-inject-[0-9a-f]{32}(\.tmp(\.[A-Za-z0-9]+)?)?")

Writer = Callable[[Path], None]


def fault_point(step: str) -> None:
    """Called between the steps of a write; tests replace it to kill the writer there (fault injection)."""


# --- the record of what se-inject wrote ---------------------------------------------------------------------------


def _stamp(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def read_record(directory: Path) -> dict[str, dict[str, int]]:
    """Files se-inject wrote into `directory` (name -> size and mtime then); empty when there is no valid record."""
    try:
        data = json.loads((directory / RECORD_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return {}
    files = data.get("files") if isinstance(data, dict) and data.get("format") == RECORD_FORMAT else None
    if not isinstance(files, dict):
        return {}
    return {
        name: {"size": v["size"], "mtime_ns": v["mtime_ns"]}
        for name, v in files.items()
        if isinstance(name, str) and "/" not in name and name not in ("", ".", "..") and isinstance(v, dict)
        and isinstance(v.get("size"), int) and isinstance(v.get("mtime_ns"), int)
    }


def owned_files(directory: Path) -> set[str]:
    """Recorded files that are still as se-inject wrote them (same size and mtime): ours to replace or remove."""
    owned = set()
    for name, stamp in read_record(directory).items():
        path = directory / name
        with contextlib.suppress(OSError):
            if path.is_file() and not path.is_symlink() and _stamp(path) == stamp:
                owned.add(name)
    return owned


def _record_text(directory: Path, names: list[str]) -> str:
    files = {name: _stamp(directory / name) for name in sorted(names)}
    return json.dumps({"format": RECORD_FORMAT, "files": files}, indent=1, sort_keys=True) + "\n"


# --- temporaries ----------------------------------------------------------------------------------------------------


def _lock(fd: int) -> bool:
    """Take an exclusive, non-blocking lock on `fd`; False when another live process holds it."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): never judge another run dead
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def _is_our_leftover(entry: Path, target: str | None) -> bool:
    """Whether `entry` is a temporary of a killed se-inject run: our name pattern, for a staging folder our marker
    naming `target`, and no live writer holding its lock."""
    if not _TEMPORARY.fullmatch(entry.name) or entry.is_symlink():
        return False
    if entry.is_dir():
        try:
            marker = json.loads((entry / _MARKER).read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):
            return False
        if not isinstance(marker, dict) or (target is not None and marker.get("target") != target):
            return False
    try:
        fd = os.open(entry, os.O_RDONLY)
    except OSError:
        return False
    try:
        return _lock(fd)
    finally:
        os.close(fd)


def remove_leftovers(directory: Path) -> None:
    """Remove what killed se-inject runs left: temporaries inside `directory`, and staging folders for it next to it
    (both recognised by their marker and a free lock, never by a name alone)."""
    with contextlib.suppress(OSError):
        (directory / _MARKER).unlink()  # a run killed just before its swap
    places = [(directory, None), (directory.parent, directory.name)]
    for place, target in places:
        with contextlib.suppress(OSError):
            for entry in place.iterdir():
                if entry.name.startswith(_PREFIX) and _is_our_leftover(entry, target):
                    if entry.is_dir():
                        shutil.rmtree(entry, ignore_errors=True)
                    else:
                        with contextlib.suppress(OSError):
                            entry.unlink()


@contextlib.contextmanager
def _held(path: Path) -> Iterator[None]:
    """Hold the lock that marks `path` as being written by a live process."""
    fd = os.open(path, os.O_RDONLY)
    try:
        _lock(fd)
        yield
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _finish(path: Path, mode: int) -> None:
    """Give a written file its final permissions and flush it to disk before it is renamed."""
    os.chmod(path, mode)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# --- the atomic swap ------------------------------------------------------------------------------------------------

_RENAME_EXCHANGE = 2


def exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE). False where the system cannot."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBUSY, errno.EPERM):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _link_tree(source: Path, target: Path) -> None:
    """`source` at `target` without copying data where the filesystem allows (hard links), else copied."""
    if source.is_symlink():
        os.symlink(os.readlink(source), target)
    elif source.is_dir():
        shutil.copytree(source, target, symlinks=True, copy_function=_link_or_copy)
    else:
        _link_or_copy(str(source), str(target))


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target, follow_symlinks=False)
    except OSError:
        shutil.copy2(source, target, follow_symlinks=False)


def _contains_cwd(directory: Path) -> bool:
    with contextlib.suppress(OSError):
        cwd = Path.cwd().resolve()
        return cwd == directory or directory in cwd.parents
    return False


def write_folder(
    directory: str | Path, files: dict[str, Writer], *, force: bool = False, outputs: bool = False
) -> Path:
    """Write `files` (name -> writer) into `directory`, all or nothing.

    Raises OutputExistsError, touching nothing, when a file to write exists and `force` is off. With `outputs` (a
    whole se-inject output folder) the folder is replaced in one atomic step, and the files se-inject recorded there
    that this write does not produce count too (they are removed as stale with `force`); other files in the folder
    are the user's and are kept. Without `outputs` (one file, e.g. an export) each file is renamed into place, and
    the folder's record gains it.
    """
    directory = Path(directory)
    try:
        os.fsencode(directory).decode("utf-8")
    except UnicodeDecodeError:  # written, it could not be named in report.json nor read back by other tools
        raise UsageError(f"output path {str(directory)!r} is not valid UTF-8; choose another name") from None
    if directory.is_symlink():
        directory = directory.resolve()
    if directory.exists() and not directory.is_dir():
        raise OutputExistsError(f"{directory} exists and is not a directory")
    directory = directory.absolute()
    owned = owned_files(directory) if outputs and directory.is_dir() else set()
    existing = [name for name in files if os.path.lexists(directory / name)]
    conflicts = sorted(set(existing) | owned, key=lambda n: (n not in files, n))
    if conflicts and not force:
        raise OutputExistsError(f"{directory / conflicts[0]} already exists; pass --force to overwrite it")
    try:
        remove_leftovers(directory)
        if outputs or not directory.is_dir():
            _swap_in(directory, files, owned, record=outputs)
        else:
            _replace_files(directory, files)
    except OSError as e:
        reason = "permission denied" if isinstance(e, PermissionError) else (e.strerror or str(e))
        raise SEInjectError(f"cannot write {directory}: {reason}") from None
    return directory


def _swap_in(directory: Path, files: dict[str, Writer], owned: set[str], *, record: bool = True) -> None:
    """Stage `files` (plus the user's files already in `directory`, and with `record` the record of what se-inject
    wrote) in a folder next to `directory`, then swap it in."""
    umask = _umask()
    parent = directory.parent
    parent.mkdir(parents=True, exist_ok=True)
    staging = parent / f"{_PREFIX}{secrets.token_hex(16)}"
    staging.mkdir(mode=0o700)
    try:
        with _held(staging):
            (staging / _MARKER).write_text(json.dumps({"target": directory.name}) + "\n", encoding="utf-8")
            fault_point("staging")
            for name, write in files.items():
                write(staging / name)
                _finish(staging / name, 0o666 & ~umask)
                fault_point(f"wrote {name}")
            old_mode = None
            if directory.is_dir():
                old_mode = stat.S_IMODE(directory.stat().st_mode)
                for entry in directory.iterdir():  # the user's own files come along (hard links: no copy)
                    if entry.name in files or entry.name in owned or entry.name in (RECORD_FILE, _MARKER):
                        continue
                    if _TEMPORARY.fullmatch(entry.name):
                        continue
                    _link_tree(entry, staging / entry.name)
                fault_point("linked")
            if record:  # an output folder; a folder made for one file (an export, scan rows) gets none
                (staging / RECORD_FILE).write_text(_record_text(staging, list(files)), encoding="utf-8")
                _finish(staging / RECORD_FILE, 0o666 & ~umask)
            os.chmod(staging, old_mode if old_mode is not None else 0o777 & ~umask)
            _fsync_dir(staging)
            fault_point("staged")
            if old_mode is None:
                os.rename(staging, directory)  # a new folder: appears complete
                fault_point("renamed")
            else:
                # The previous folder gets the marker before the swap, so a run killed right after it leaves a
                # staging folder that the next run recognises and removes.
                (directory / _MARKER).write_text(json.dumps({"target": directory.name}) + "\n", encoding="utf-8")
                if not _contains_cwd(directory) and exchange(staging, directory):
                    fault_point("swapped")  # `staging` now holds the previous folder
                    _keep_late_files(staging, directory, owned)
                else:  # no atomic swap here (another OS, a mount point, the working directory): file by file
                    for name in [*files, *([RECORD_FILE] if record else [])]:
                        os.replace(staging / name, directory / name)
                        fault_point(f"replaced {name}")
                    for name in owned - set(files):
                        with contextlib.suppress(FileNotFoundError):
                            (directory / name).unlink()
            with contextlib.suppress(FileNotFoundError):
                (directory / _MARKER).unlink()  # the staging marker the new folder still carries
            _fsync_dir(parent)
    finally:
        if staging.exists():  # the unfinished new folder, or the previous one after the swap
            shutil.rmtree(staging, ignore_errors=True)


def _keep_late_files(previous: Path, directory: Path, owned: set[str]) -> None:
    """Files the user added to the folder while the new one was staged are moved over, not deleted."""
    for entry in previous.iterdir():
        if entry.name in owned or entry.name in (RECORD_FILE, _MARKER) or _TEMPORARY.fullmatch(entry.name):
            continue
        if not os.path.lexists(directory / entry.name):
            with contextlib.suppress(OSError):
                os.rename(entry, directory / entry.name)


def _replace_files(directory: Path, files: dict[str, Writer]) -> None:
    umask = _umask()
    temporaries: dict[str, Path] = {}
    try:
        for name, write in files.items():
            ext = Path(name).suffix  # kept: some writers check it (.pt2)
            ext = ext if re.fullmatch(r"\.[A-Za-z0-9]+", ext) else ""
            tmp = directory / f"{_PREFIX}{secrets.token_hex(16)}.tmp{ext}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.close(fd)
            temporaries[name] = tmp
            with _held(tmp):
                write(tmp)
                _finish(tmp, 0o666 & ~umask)
        for name, tmp in temporaries.items():
            os.replace(tmp, directory / name)
            fault_point(f"replaced {name}")
        temporaries.clear()
        if (directory / RECORD_FILE).is_file():  # an se-inject output folder: the new file is ours too
            names = sorted(owned_files(directory) | set(files))
            tmp = directory / f"{_PREFIX}{secrets.token_hex(16)}.tmp"
            tmp.write_text(_record_text(directory, names), encoding="utf-8")
            _finish(tmp, 0o666 & ~umask)
            temporaries[RECORD_FILE] = tmp
            os.replace(tmp, directory / RECORD_FILE)
            temporaries.clear()
    finally:
        for tmp in temporaries.values():
            with contextlib.suppress(OSError):
                tmp.unlink()
