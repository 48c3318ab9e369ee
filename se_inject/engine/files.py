"""Reading a file the user named: a regular file or a typed error at once, and never more than a stated cap.

A FIFO would block a reader forever, ``/dev/zero`` would grow it until memory runs out, and a sparse file claims
terabytes it does not hold; each is refused from `fstat` alone, before a byte is read. The file is opened with
``O_NONBLOCK`` (an open of a FIFO without a writer returns at once) and checked on the descriptor it is then read from,
so it cannot be swapped between the check and the read.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

from ..errors import SEInjectError

Error = Callable[[str], SEInjectError]


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n:,} bytes"


def open_regular(path: str | Path, error: Error, *, limit: int | None = None) -> int:
    """A read-only descriptor of `path` (symlinks followed: the user named it) when it is a regular file of at most
    `limit` bytes; else `error(reason)` is raised. The caller closes the descriptor."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise error("no such file") from None
    except PermissionError:
        raise error("permission denied") from None
    except OSError as e:
        raise error(f"cannot read ({e.strerror or e})") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        kind = "a folder" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode) else "a device"
        raise error(f"not a regular file ({kind})")
    if limit is not None and st.st_size > limit:
        os.close(fd)
        raise error(f"{_size(st.st_size)}, more than the {_size(limit)} such a file can need")
    os.set_blocking(fd, True)
    return fd


def read_regular(path: str | Path, error: Error, *, limit: int) -> bytes:
    """The bytes of `path`, a regular file of at most `limit` bytes (see `open_regular`)."""
    fd = open_regular(path, error, limit=limit)
    try:
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise error(f"cannot read ({e.strerror or e})") from None
    finally:
        os.close(fd)
    if len(data) > limit:  # grew since fstat
        raise error(f"more than the {_size(limit)} such a file can need")
    return data
