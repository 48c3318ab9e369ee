"""All-or-nothing writes of an output folder, touching only what se-inject itself wrote.

The rule (docs/security.md): se-inject deletes or replaces only entries it created and can prove it created. A file
is proven by ``.se-inject.json``, the record in its folder (`se_inject.io.ownership`): a regular file whose size,
modification time and SHA-256 match what was recorded when se-inject wrote it. A temporary folder (``tempfile.mkdtemp``
beside the target, or in it) is proven by its marker, which names the folder's own inode, and is left alone while its
writer holds its lock. Nothing else is ever removed: no ``rmtree``, no descent into a folder se-inject did not make,
and an entry that cannot be given back stops the run with the entry where it is.

A folder is staged complete beside the target and swapped in with one atomic step (Linux
``renameat2(RENAME_EXCHANGE)``; a new folder is one rename), so the target always holds one complete run. The user's
entries come along: files as hard links (same inode), subfolders renamed back right after the swap. Where a swap would
move something that cannot move (a mount point in or at the folder, the working directory, a file that cannot be
hard-linked), the files are replaced one by one with ``os.replace`` from a temporary folder inside the target.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from ..errors import OutputExistsError, SEInjectError, UsageError
from .ownership import (
    MARKER,
    MAX_RECORD_BYTES,
    RECORD_FILE,
    create_new,
    lstat,
    owned_files,
    proven,
    read_json,
    read_record,
    write_record,
)

_PREFIX = ".se-inject-"
_MKDTEMP = re.compile(r"\.se-inject-[a-z0-9_]{8}")  # what tempfile.mkdtemp names with our prefix

Writer = Callable[[Path], None]


# --- temporaries: made by mkdtemp, proven by a marker naming their inode, locked while their writer lives ---------


def _lock(fd: int) -> bool:
    """An exclusive lock on `fd`; False when a live process holds it (or the system has no flock)."""
    try:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except (ImportError, OSError):
        return False
    return True


def _marker(folder: Path, target: str | None) -> dict | None:
    """The marker of `folder` when se-inject made the folder (for `target`, when given), else None."""
    st = lstat(folder)
    if st is None or not stat.S_ISDIR(st.st_mode):
        return None
    marker = read_json(folder / MARKER, 1 << 16)
    if (not isinstance(marker, dict) or marker.get("inode") != st.st_ino
            or marker.get("role") not in ("staging", "previous", "files")
            or not isinstance(marker.get("target"), str) or target not in (None, marker["target"])
            or not isinstance(marker.get("files"), list) or not all(isinstance(n, str) for n in marker["files"])):
        return None
    return marker


def _marker_text(folder: Path, target: str, role: str, files: Iterable[str]) -> str:
    return json.dumps({"target": target, "role": role, "inode": os.lstat(folder).st_ino, "files": sorted(files)})


@contextlib.contextmanager
def _temporary(where: Path, target: str, role: str, files: Iterable[str]) -> Iterator[Path]:
    """A folder of ours in `where`, locked and marked, for the life of the block."""
    folder = Path(tempfile.mkdtemp(prefix=_PREFIX, dir=where))
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        _lock(fd)
        create_new(folder / MARKER, _marker_text(folder, target, role, files), 0o600)
        yield folder
    finally:
        os.close(fd)


def _discard(folder: Path, directory: Path) -> None:
    """Empty and remove a temporary of ours: unlink what it provably holds of ours (files it wrote, the record, hard
    links whose twin is in `directory`), give everything else back to `directory` (renamed, never over an entry).
    Raises, leaving the rest where it is, when something cannot be given back."""
    marker = _marker(folder, None)
    if marker is None:
        return
    record = read_record(folder)
    kept = []
    for entry in sorted(folder.iterdir(), key=lambda e: (e.name == RECORD_FILE, e.name)):  # the record: last
        st, live = lstat(entry), lstat(directory / entry.name)
        if entry.name == MARKER or st is None:
            continue
        name = entry.name
        ours = name == RECORD_FILE and isinstance(read_json(entry, MAX_RECORD_BYTES), dict)
        written = stat.S_ISREG(st.st_mode) and (ours or (name in record and proven(entry, record[name]))
                                                or (marker["role"] != "previous" and name in marker["files"]))
        twin = live is not None and not stat.S_ISDIR(st.st_mode) and live[1:3] == st[1:3]  # same inode and device
        if written or twin:
            os.unlink(entry)
        elif not (directory.is_dir() and folder.parent != directory and _move(entry, directory / entry.name)):
            kept.append(entry.name)
    if kept:
        raise SEInjectError(f"{directory}: {len(kept)} of your entries ({', '.join(kept[:3])}) could not be put back "
                            f"after an interrupted run (the name is taken, or it cannot move): they are in {folder}, "
                            "untouched. Move them where you want them, then remove that folder and run again")
    os.unlink(folder / MARKER)
    os.rmdir(folder)


def remove_leftovers(directory: Path) -> None:
    """Remove what killed runs left for `directory`: a marker in it, our temporaries in it and beside it (proven by
    their marker, their writer gone), giving the user's entries back first; empty folders named by mkdtemp."""
    if _marker(directory, directory.name) is not None:
        os.unlink(directory / MARKER)
    for place in (directory, directory.parent):
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            for entry in sorted(place.iterdir()):
                marker = _marker(entry, directory.name) if entry.name.startswith(_PREFIX) else None
                empty = marker is None and _MKDTEMP.fullmatch(entry.name) is not None
                if (marker is None and not empty) or (marker and (marker["role"] == "files") != (place == directory)):
                    continue
                try:
                    fd = os.open(entry, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
                except OSError:
                    continue
                try:
                    if not _lock(fd):
                        continue
                    if marker is not None:
                        _discard(entry, directory)
                    else:
                        with contextlib.suppress(OSError):
                            os.rmdir(entry)  # only when empty: it holds nothing
                finally:
                    os.close(fd)


def foreign_entries(directory: str | Path) -> list[str]:
    """Entries with se-inject's naming that se-inject did not make (or cannot prove it made): left alone by every
    run; reported so the user knows."""
    directory = Path(directory)
    found = []
    for place in (directory, directory.parent):
        with contextlib.suppress(OSError):
            for entry in sorted(place.iterdir()):
                if (entry.name.startswith(_PREFIX) and entry.name != RECORD_FILE
                        and _marker(entry, None) is None and not (entry.name == MARKER and place == directory
                                                                  and _marker(directory, None) is not None)):
                    found.append(str(entry))
    return found


# --- moving entries ----------------------------------------------------------------------------------------------


def _renameat2(a: Path, b: Path, flags: int) -> bool | None:
    """Linux renameat2; None where the system or the filesystem lacks it."""
    import ctypes

    try:
        call = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    call.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if call(-100, os.fsencode(a), -100, os.fsencode(b), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return None
    if code in (errno.EEXIST, errno.ENOTEMPTY, errno.EBUSY, errno.EXDEV, errno.EPERM):
        return False
    raise OSError(code, os.strerror(code), str(b))


def exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (RENAME_EXCHANGE). False where the system cannot."""
    return bool(_renameat2(a, b, 2))


def _move(source: Path, target: Path) -> bool:
    """Rename `source` to `target` unless `target` exists (RENAME_NOREPLACE; elsewhere checked just before)."""
    done = _renameat2(source, target, 1)
    if done is None and lstat(target) is None:
        try:
            os.rename(source, target)
        except OSError:
            return False
        return True
    return bool(done)


def _link(source: Path, target: Path) -> bool:
    """Hard-link `source` itself (a symlink or FIFO is linked, never followed); False where it cannot be."""
    try:
        os.link(source, target, follow_symlinks=False)
    except OSError:
        return False
    return True


def _mount_points() -> set[str]:
    try:
        text = Path("/proc/self/mountinfo").read_bytes()
    except OSError:
        return set()
    fields = [line.split(b" ") for line in text.splitlines()]
    return {os.fsdecode(re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m[1], 8)]), f[4])) for f in fields if len(f) > 4}


def _swappable(directory: Path) -> bool:
    """Whether a swap moves only what can move: the folder is no mount point and holds none, is on its parent's
    filesystem, and holds no process's working directory (ours: the same test)."""
    real = os.path.realpath(directory)
    with contextlib.suppress(OSError):
        cwd = os.path.realpath(os.getcwd())
        if cwd == real or cwd.startswith(real + os.sep):
            return False
    if os.lstat(directory).st_dev != os.lstat(directory.parent).st_dev:
        return False
    return not any(m == real or m.startswith(real + os.sep) for m in _mount_points())


def _default_mode() -> int:
    """0o777 less the umask, read without changing it."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        status = Path("/proc/self/status").read_text()
        return 0o777 & ~int(next(line for line in status.splitlines() if line.startswith("Umask:")).split()[1], 8)
    return 0o755


# --- writing --------------------------------------------------------------------------------------------------------


def write_folder(
    directory: str | Path, files: dict[str, Writer], *, force: bool = False, outputs: bool = False
) -> Path:
    """Write `files` (name -> writer) into `directory`, all or nothing.

    Raises OutputExistsError, touching nothing, when a file to write exists and `force` is off, or (with or without
    `force`) when a name to write is taken by an entry se-inject cannot prove it wrote, in a folder it keeps a record
    of (or in any existing folder, with `outputs`). With `outputs` (a whole se-inject output folder) the folder is
    replaced in one atomic step, and its recorded files this write does not produce are removed as stale (`force`);
    other entries are the user's and are kept as they are. Without `outputs` (one file, e.g. an export) each file is
    replaced in place, and the folder's record, if any, gains it.
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
    try:
        remove_leftovers(directory)
        owned = check_names(directory, files, force=force, outputs=outputs)
        exists = directory.is_dir()
        swap = not exists or (outputs and _swappable(directory))
        if not exists:
            directory.parent.mkdir(parents=True, exist_ok=True)
        names = [*files, *([RECORD_FILE] if outputs else [])]
        with _temporary(directory.parent if swap else directory, directory.name,
                        "staging" if swap else "files", names) as staging:
            try:
                for name, write in files.items():
                    write(staging / name)
                if not (swap and _swap(staging, directory, files, owned, record=outputs)):
                    _put(staging, directory, files, owned, outputs=outputs)
            except BaseException as error:
                with contextlib.suppress(FileNotFoundError):
                    try:
                        _discard(staging, directory)
                    except SEInjectError as lost:
                        raise lost from error
                raise
            _discard(staging, directory)  # after a swap: the previous folder
    except OSError as e:
        if isinstance(e, SEInjectError):
            raise
        reason = "permission denied" if isinstance(e, PermissionError) else (e.strerror or str(e))
        raise SEInjectError(f"cannot write {directory}: {reason}") from None
    return directory


def check_names(directory: Path, names: dict[str, Writer] | list[str] | tuple[str, ...], *, force: bool,
                outputs: bool) -> set[str]:
    """The names a write needs in `directory`: refused when taken by an entry se-inject cannot prove it wrote
    (whatever `force` says), or by one it wrote and `force` is off. Returns the folder's proven files."""
    if not directory.is_dir():
        return set()
    owned = owned_files(directory)
    recorded = outputs or lstat(directory / RECORD_FILE) is not None
    existing = [name for name in names if lstat(directory / name) is not None]
    odd = [name for name in existing if not stat.S_ISREG(os.lstat(directory / name).st_mode)]
    if odd:  # a folder, symlink, device, FIFO or socket: never replaced
        raise OutputExistsError(f"{directory / odd[0]} already exists and is not a regular file: se-inject never "
                                "replaces it, even with force=True (--force); move it away or choose another output")
    theirs = [name for name in existing if name not in owned] if recorded else []
    if theirs:
        raise OutputExistsError(f"{directory / theirs[0]} already exists and is not a file se-inject wrote (or it was "
                                "changed since): se-inject never replaces it, even with force=True (--force); move it "
                                "away or choose another output")
    record = directory / RECORD_FILE
    if outputs and lstat(record) is not None and not isinstance(read_json(record, MAX_RECORD_BYTES), dict):
        raise OutputExistsError(f"{record} is in the way of se-inject's record and is not se-inject's; move it away")
    if outputs and lstat(directory / MARKER) is not None and _marker(directory, None) is None:
        raise OutputExistsError(f"{directory / MARKER} is in the way of se-inject's staging marker and is not "
                                "se-inject's; move it away")
    conflicts = sorted(set(existing) | (owned if outputs else set()), key=lambda n: (n not in names, n))
    if conflicts and not force:
        raise OutputExistsError(f"{directory / conflicts[0]} already exists; pass force=True (--force) to overwrite it")
    return owned


def _swap(staging: Path, directory: Path, files: dict[str, Writer], owned: set[str], *, record: bool) -> bool:
    """Make `staging` the complete new folder (the user's files hard-linked in) and swap it in; False, having swapped
    nothing, where an entry cannot come along. The user's subfolders are given back from the previous folder, which
    `staging` names afterwards."""
    if record:
        write_record(staging, staging, files)
    st = lstat(directory)
    if st is None:
        os.chmod(staging, _default_mode())
        if not _move(staging, directory):
            raise FileExistsError(errno.EEXIST, "created meanwhile", str(directory))
        os.unlink(directory / MARKER)
        return True
    for entry in os.scandir(directory):
        kind = entry.stat(follow_symlinks=False)
        if entry.name in files or entry.name in owned or entry.name in (RECORD_FILE, MARKER):
            continue
        if stat.S_ISDIR(kind.st_mode) and kind.st_dev != st.st_dev:
            return False
        if not stat.S_ISDIR(kind.st_mode) and not _link(Path(entry.path), staging / entry.name):
            return False
    os.chmod(staging, stat.S_IMODE(st.st_mode))
    create_new(directory / MARKER, _marker_text(directory, directory.name, "previous", []), 0o600)
    if not exchange(staging, directory):
        os.unlink(directory / MARKER)
        return False
    os.unlink(directory / MARKER)  # the new folder's: it was the staging folder's marker
    return True


def _put(staging: Path, directory: Path, files: dict[str, Writer], owned: set[str], *, outputs: bool) -> None:
    """Replace the files one by one (os.replace), remove stale ones still proven ours, then the record."""
    for name in files:
        os.replace(staging / name, directory / name)
    record = read_record(directory)
    for name in sorted(owned - set(files)) if outputs else ():
        if name in record and proven(directory / name, record[name]):
            os.unlink(directory / name)
    if outputs or lstat(directory / RECORD_FILE) is not None:
        write_record(staging, directory, set(files) | (set() if outputs else owned_files(directory)))
        os.replace(staging / RECORD_FILE, directory / RECORD_FILE)
