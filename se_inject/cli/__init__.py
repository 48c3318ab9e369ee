"""The command line: a thin Typer layer over the library (`se_inject.api`). Importing it does not import torch."""

from __future__ import annotations

import sys
from typing import Any


def main() -> None:
    """The `se-inject` entry point. `recipes` and `variants` [--json] are answered before the Typer app and its
    commands are imported; anything else goes to `commands.main`."""
    from .process import exit_now, printable_streams
    from .render import run_listing

    try:
        printable_streams()
        run_listing(tuple(sys.argv[1:]))
    except SystemExit as e:
        exit_now(e.code)
    from .commands import main as commands_main

    commands_main()


def __getattr__(name: str) -> Any:
    """`se_inject.cli.app`: the Typer app (in `commands`), imported on first use."""
    if name == "app":
        from .commands import app

        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["app", "main"]
