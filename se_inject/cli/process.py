"""The command line's process: printable streams, the error funnel (library errors -> one line and an exit code),
and the fast exit that skips the interpreter's module teardown."""

from __future__ import annotations

import atexit
import bdb
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

import typer

from ..errors import SEInjectError, describe, torch_pair_problem


def error(message: str) -> None:
    """One line on stderr."""
    typer.echo(f"se-inject: {message}", err=True)


def printable_streams() -> None:
    """Text the terminal's encoding cannot show (PYTHONIOENCODING=ascii, a path with 'é') is escaped, not fatal."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(errors="backslashreplace")


@contextmanager
def error_funnel_exit() -> Iterator[None]:
    """`error_funnel` outside a typer command: exit directly."""
    try:
        with error_funnel():
            yield
    except typer.Exit as e:
        sys.exit(e.exit_code)


@contextmanager
def error_funnel() -> Iterator[None]:
    """Turn library errors into one line on stderr and an exit code; tracebacks only with SE_INJECT_DEBUG=1."""
    try:
        yield
    except (typer.Exit, typer.Abort):
        raise
    except SEInjectError as e:
        if os.environ.get("SE_INJECT_DEBUG"):
            raise
        error(f"error: {e}")
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt:
        error("interrupted")
        raise typer.Exit(130) from None
    except bdb.BdbQuit:  # the model's own code started a debugger (breakpoint()) and it was quit, or read no input
        error("error: a debugger started by the model's code (breakpoint()) was quit; nothing was written")
        raise typer.Exit(1) from None
    except BrokenPipeError:  # the reader went away (`se-inject recipes | head`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise typer.Exit(141) from None
    except Exception as e:
        if os.environ.get("SE_INJECT_DEBUG"):
            raise
        problem = torch_pair_problem(e)
        if problem is not None:  # the environment, not se-inject
            error(f"error: {problem}")
            raise typer.Exit(problem.exit_code) from None
        error(f"internal error: {describe(e, kind=True)} (SE_INJECT_DEBUG=1 shows the traceback)")
        raise typer.Exit(3) from None


def exit_now(code: Any) -> NoReturn:
    """End the process as `sys.exit(code)` would, without the interpreter's teardown of every imported module: once
    torch and timm are imported that teardown takes about a second, longer than the work of many commands.

    The exit itself is normal (`sys.exit`): the interpreter waits for non-daemon threads and runs the exit handlers.
    The last handler to run is `_end_process`, registered when this module is imported (handlers run in reverse
    order of registration, so every one registered after it, torch's and timm's included, has run); it flushes the
    streams and ends the process with the status before the teardown starts."""
    global _exit_status
    if isinstance(code, str):  # sys.exit("message"): printed, status 1
        print(code, file=sys.stderr)
        code = 1
    _exit_status = 0 if code is None else code if isinstance(code, int) else 1
    sys.exit(_exit_status)


_exit_status: int | None = None  # set by `exit_now`: the status `_end_process` ends the process with


def _end_process() -> None:
    """The last exit handler: flush the streams and end the process with `exit_now`'s status, skipping the module
    teardown. Does nothing where `exit_now` was not called (the module imported as a library, in tests)."""
    if _exit_status is None:
        return
    code = _exit_status
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BrokenPipeError:  # the reader is gone: the shell's code for SIGPIPE, as the commands exit
            code = 141
        except (OSError, ValueError):
            pass
    os._exit(code)


atexit.register(_end_process)
