"""All-or-nothing writes of an output folder, touching only what se-inject itself wrote.

A folder is written complete in a staging folder next to it, then swapped in with one atomic step (Linux
``renameat2(RENAME_EXCHANGE)``; a new folder is renamed into place). The folder path therefore always holds one
complete run, whenever the writer is killed. The user's own entries in the folder are never copied: files (and
symlinks, FIFOs, ...) are hard-linked into the new folder before the swap, so they keep their inode and owner and are
never missing; subfolders are moved (renamed) into the new folder right after the swap. Where an entry cannot be
hard-linked (another filesystem), the files are replaced one by one in place instead.

Ownership comes from a record, not from names: ``.se-inject.json`` in the folder lists each file se-inject wrote with
its size and modification time. ``--force`` replaces and removes only recorded files that are unchanged since; a
file the user put there or changed is theirs and survives, and a name this run must write that is taken by such a
file is refused (`OutputExistsError` naming it), with or without ``--force``.

Temporaries are named ``.se-inject-<32 hex>`` (a random token no user picks); a staging folder also holds a marker
naming its target. A later run removes such leftovers only when they are what se-inject makes (a regular file, or a
folder with a valid marker; never a symlink, FIFO, device or socket) and their writer is gone: each writer holds an
exclusive ``flock`` on its temporaries while it runs. Paths se-inject did not create are only ever examined with
``lstat`` or opened with ``O_NOFOLLOW | O_NONBLOCK`` after it, so a FIFO or a device with our naming cannot block a
run; such foreign entries are left alone and reported (`foreign_entries`).
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
MAX_RECORD_BYTES = 1 << 20

Writer = Callable[[Path], None]


# --- reading paths se-inject did not create ------------------------------------------------------------------------


def _lstat(path: Path) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except OSError:
        return None


def _open_checked(path: Path, kind: int) -> int | None:
    """A read-only descriptor of `path` if it is (still) of `kind` (``stat.S_IFREG`` or ``stat.S_IFDIR``), else None.
    Never follows a symlink, never blocks on a FIFO, never opens a device."""
    st = _lstat(path)
    if st is None or stat.S_IFMT(st.st_mode) != kind:
        return None
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | (os.O_DIRECTORY if kind == stat.S_IFDIR else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return None
    now = os.fstat(fd)
    if stat.S_IFMT(now.st_mode) != kind or (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):  # swapped meanwhile
        os.close(fd)
        return None
    return fd


def _read_small(path: Path, limit: int) -> bytes | None:
    """The bytes of a regular file of at most `limit` bytes, or None (missing, too large, not a regular file)."""
    fd = _open_checked(path, stat.S_IFREG)
    if fd is None:
        return None
    try:
        data = os.read(fd, limit + 1)
    except OSError:
        return None
    finally:
        os.close(fd)
    return data if len(data) <= limit else None


def _read_json(path: Path, limit: int) -> object:
    data = _read_small(path, limit)
    if data is None:
        return None
    try:
        return json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError):
        return None


def _create(path: Path, text: str, mode: int = 0o600) -> None:
    """Write a new file; fails (FileExistsError) rather than write through whatever already has that name."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        os.write(fd, text.encode("utf-8"))
    finally:
        os.close(fd)


# --- the record of what se-inject wrote ---------------------------------------------------------------------------


def _stamp(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def read_record(directory: Path) -> dict[str, dict[str, int]]:
    """Files se-inject wrote into `directory` (name -> size and mtime then); empty when there is no valid record."""
    data = _read_json(directory / RECORD_FILE, MAX_RECORD_BYTES)
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
    """Recorded files that are still as se-inject wrote them (regular files, same size and mtime): ours to replace
    or remove."""
    owned = set()
    for name, stamp in read_record(directory).items():
        st = _lstat(directory / name)
        if st is not None and stat.S_ISREG(st.st_mode) and {"size": st.st_size, "mtime_ns": st.st_mtime_ns} == stamp:
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


def _marker(entry: Path, target: str | None) -> dict[str, object] | None:
    """The staging marker in folder `entry` when it is se-inject's (for `target`, when given), else None."""
    marker = _read_json(entry / _MARKER, 4096)
    if not isinstance(marker, dict) or not isinstance(marker.get("target"), str):
        return None
    if target is not None and marker["target"] != target:
        return None
    return marker


def _is_ours(entry: Path, target: str | None) -> bool:
    """Whether `entry` has the shape of an se-inject temporary: our name, and a regular ``.tmp`` file or a folder
    holding our marker (for `target`, when given). A symlink, FIFO, device or socket never is."""
    if not _TEMPORARY.fullmatch(entry.name):
        return False
    st = _lstat(entry)
    if st is None:
        return False
    if stat.S_ISDIR(st.st_mode):  # empty: a staging folder removed up to its last step (nothing to lose)
        return _marker(entry, target) is not None or _empty(entry)
    return stat.S_ISREG(st.st_mode) and ".tmp" in entry.name


def _empty(folder: Path) -> bool:
    try:
        with os.scandir(folder) as entries:
            return next(entries, None) is None
    except OSError:
        return False


def _is_our_leftover(entry: Path, target: str | None) -> bool:
    """Whether `entry` is a temporary of a killed se-inject run: ours (see `_is_ours`) and no live writer holds its
    lock."""
    if not _is_ours(entry, target):
        return False
    st = _lstat(entry)
    fd = _open_checked(entry, stat.S_IFMT(st.st_mode)) if st is not None else None
    if fd is None:
        return False
    try:
        return _lock(fd)
    finally:
        os.close(fd)


def foreign_entries(directory: str | Path) -> list[str]:
    """Entries with se-inject's temporary naming that se-inject did not make (symlinks, FIFOs, devices, sockets,
    folders without our marker, a foreign staging marker): left alone by every run; reported so the user knows."""
    directory = Path(directory)
    found = []
    marker = directory / _MARKER
    if _lstat(marker) is not None and not _is_our_marker_file(marker):
        found.append(str(marker))
    for place, target in ((directory, None), (directory.parent, directory.name)):
        with contextlib.suppress(OSError):
            for entry in sorted(place.iterdir()):
                if not _TEMPORARY.fullmatch(entry.name) or _is_ours(entry, target):
                    continue
                st = _lstat(entry)
                if place == directory or (st is not None and not stat.S_ISDIR(st.st_mode)):
                    found.append(str(entry))  # a folder next to it with another target is another run's
    return found


def _is_our_marker_file(path: Path) -> bool:
    """Whether `path` is a marker se-inject wrote (a small regular file holding its JSON; the folder it names may
    have been renamed since)."""
    marker = _read_json(path, 4096)
    return isinstance(marker, dict) and isinstance(marker.get("target"), str)


def remove_leftovers(directory: Path) -> None:
    """Remove what killed se-inject runs left: temporaries inside `directory`, and staging folders for it next to it
    (recognised by their shape, their marker and a free lock, never by a name alone). A previous folder that a run
    swapped out and was killed before moving the user's subfolders back gives them back first."""
    marker = directory / _MARKER
    if _is_our_marker_file(marker):  # a run killed just before its swap
        with contextlib.suppress(OSError):
            marker.unlink()
    for place, target in ((directory, None), (directory.parent, directory.name)):
        with contextlib.suppress(OSError):
            for entry in list(place.iterdir()):
                if not entry.name.startswith(_PREFIX) or not _is_our_leftover(entry, target):
                    continue
                if stat.S_ISDIR(os.lstat(entry).st_mode):
                    if place != directory and (_marker(entry, target) or {}).get("role") == "previous":
                        _give_back(entry, directory)
                    _remove_staging(entry)
                else:
                    with contextlib.suppress(OSError):
                        entry.unlink()


def _give_back(previous: Path, directory: Path) -> None:
    """Entries of a swapped-out folder that are not se-inject's recorded files and are missing from `directory` (the
    user's subfolders, entries added meanwhile) are moved back: renamed, so they keep their inode and owner."""
    if not directory.is_dir():
        return
    recorded = set(read_record(previous))
    for entry in previous.iterdir():
        if entry.name in recorded or entry.name in (RECORD_FILE, _MARKER):
            continue
        if _lstat(directory / entry.name) is None:
            with contextlib.suppress(OSError):
                os.rename(entry, directory / entry.name)


@contextlib.contextmanager
def _held(path: Path) -> Iterator[None]:
    """Hold the lock that marks `path` (created by this run) as being written by a live process."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
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
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
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
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBUSY, errno.EPERM,
                errno.EXDEV):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _contains_cwd(directory: Path) -> bool:
    with contextlib.suppress(OSError):
        cwd = Path.cwd().resolve()
        return cwd == directory or directory in cwd.parents
    return False


def write_folder(
    directory: str | Path, files: dict[str, Writer], *, force: bool = False, outputs: bool = False
) -> Path:
    """Write `files` (name -> writer) into `directory`, all or nothing.

    Raises OutputExistsError, touching nothing, when a file to write exists and `force` is off, or (with or without
    `force`) when a name to write is taken by an entry se-inject did not write in a folder it keeps a record of (or
    in any existing folder, with `outputs`). With `outputs` (a whole se-inject output folder) the folder is replaced
    in one atomic step, and the files se-inject recorded there that this write does not produce count too (they are
    removed as stale with `force`); other entries in the folder are the user's and are kept as they are. Without
    `outputs` (one file, e.g. an export) each file is renamed into place, and the folder's record gains it.
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
    check_names(directory, files, force=force, outputs=outputs)
    owned = owned_files(directory) if outputs and directory.is_dir() else set()
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


def check_names(directory: Path, names: dict[str, Writer] | list[str] | tuple[str, ...], *, force: bool,
                outputs: bool) -> None:
    """The names a write needs in `directory`: refused when taken by an entry that is not se-inject's (whatever
    `force` says), or by one that is and `force` is off. See `write_folder`."""
    if not directory.is_dir():
        return
    owned = owned_files(directory)
    recorded = outputs or _lstat(directory / RECORD_FILE) is not None
    existing = [name for name in names if _lstat(directory / name) is not None]
    theirs = [name for name in existing if name not in owned] if recorded else []
    if theirs:
        raise OutputExistsError(f"{directory / theirs[0]} already exists and is not a file se-inject wrote (or it was "
                                "changed since): se-inject never replaces it, even with --force; move it away or "
                                "choose another output")
    marker = directory / _MARKER
    if outputs and _lstat(marker) is not None and not _is_our_marker_file(marker):
        raise OutputExistsError(f"{marker} is in the way of se-inject's staging marker and is not se-inject's; "
                                "move it away")
    conflicts = sorted(set(existing) | (owned if outputs else set()), key=lambda n: (n not in names, n))
    if conflicts and not force:
        raise OutputExistsError(f"{directory / conflicts[0]} already exists; pass --force to overwrite it")


def _link(source: Path, target: Path) -> bool:
    """Hard-link `source` itself (a symlink, FIFO or socket is linked, never followed or opened); False where the
    filesystem cannot."""
    try:
        os.link(source, target, follow_symlinks=False)
    except OSError:
        return False
    return True


def _swap_in(directory: Path, files: dict[str, Writer], owned: set[str], *, record: bool = True) -> None:
    """Stage `files` (plus hard links of the user's files already in `directory`, and with `record` the record of
    what se-inject wrote) in a folder next to `directory`, then swap it in and move the user's subfolders over."""
    umask = _umask()
    parent = directory.parent
    parent.mkdir(parents=True, exist_ok=True)
    staging = parent / f"{_PREFIX}{secrets.token_hex(16)}"
    staging.mkdir(mode=0o700)
    swapped = False
    try:
        with _held(staging):
            _create(staging / _MARKER, json.dumps({"target": directory.name, "role": "staging"}) + "\n")
            for name, write in files.items():
                write(staging / name)
                _finish(staging / name, 0o666 & ~umask)
            old_mode = None
            folders: list[str] = []  # the user's subfolders: moved after the swap (a folder has no hard link)
            linked = True
            if directory.is_dir():
                old_mode = stat.S_IMODE(directory.stat().st_mode)
                for entry in directory.iterdir():  # the user's own entries come along (same inode: no copy)
                    if entry.name in files or entry.name in owned or entry.name in (RECORD_FILE, _MARKER):
                        continue
                    if stat.S_ISDIR(os.lstat(entry).st_mode):
                        folders.append(entry.name)
                    elif not _link(entry, staging / entry.name):
                        linked = False  # another filesystem: no swap, the files are replaced in place
                        break
            if record:  # an output folder; a folder made for one file (an export, scan rows) gets none
                (staging / RECORD_FILE).write_text(_record_text(staging, list(files)), encoding="utf-8")
                _finish(staging / RECORD_FILE, 0o666 & ~umask)
            os.chmod(staging, old_mode if old_mode is not None else 0o777 & ~umask)
            _fsync_dir(staging)
            if old_mode is None:
                os.rename(staging, directory)  # a new folder: appears complete
            else:
                # The previous folder gets a marker before the swap, so a run killed right after it leaves a staging
                # folder that the next run recognises, gives the user's subfolders back from, and removes.
                _create(directory / _MARKER, json.dumps({"target": directory.name, "role": "previous"}) + "\n")
                if linked and not _contains_cwd(directory) and exchange(staging, directory):
                    swapped = True  # `staging` now holds the previous folder
                    _give_back(staging, directory)
                else:  # no atomic swap here (another OS or filesystem, the working directory): file by file
                    for name in [*files, *([RECORD_FILE] if record else [])]:
                        os.replace(staging / name, directory / name)
                    for name in owned - set(files):
                        with contextlib.suppress(FileNotFoundError):
                            (directory / name).unlink()
            with contextlib.suppress(FileNotFoundError):
                (directory / _MARKER).unlink()  # the marker the new folder (or the kept one) still carries
            _fsync_dir(parent)
    finally:
        if _lstat(staging) is not None:  # the unfinished new folder, or the previous one after the swap
            if swapped:
                _give_back(staging, directory)  # nothing of the user's goes with it, whatever failed
            _remove_staging(staging)


def _remove_staging(staging: Path) -> None:
    """Remove a staging folder, its marker last: one killed midway is still recognised and removed next time."""
    with contextlib.suppress(OSError):
        for entry in staging.iterdir():
            if entry.name == _MARKER:
                continue
            if stat.S_ISDIR(os.lstat(entry).st_mode):
                shutil.rmtree(entry, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.unlink(entry)
    shutil.rmtree(staging, ignore_errors=True)


def _replace_files(directory: Path, files: dict[str, Writer]) -> None:
    umask = _umask()
    temporaries: dict[str, Path] = {}
    try:
        for name, write in files.items():
            ext = Path(name).suffix  # kept: some writers check it (.pt2)
            ext = ext if re.fullmatch(r"\.[A-Za-z0-9]+", ext) else ""
            tmp = directory / f"{_PREFIX}{secrets.token_hex(16)}.tmp{ext}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            os.close(fd)
            temporaries[name] = tmp
            with _held(tmp):
                write(tmp)
                _finish(tmp, 0o666 & ~umask)
        for name, tmp in temporaries.items():
            os.replace(tmp, directory / name)
        temporaries.clear()
        if _lstat(directory / RECORD_FILE) is not None:  # an se-inject output folder: the new file is ours too
            names = sorted(owned_files(directory) | set(files))
            tmp = directory / f"{_PREFIX}{secrets.token_hex(16)}.tmp"
            temporaries[RECORD_FILE] = tmp
            _create(tmp, _record_text(directory, names), 0o666 & ~umask)
            _finish(tmp, 0o666 & ~umask)
            os.replace(tmp, directory / RECORD_FILE)
            temporaries.clear()
    finally:
        for tmp in temporaries.values():
            with contextlib.suppress(OSError):
                tmp.unlink()
