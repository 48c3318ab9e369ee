"""The command line: a thin Typer layer over the library (`se_inject.api`). Importing it does not import torch."""

from .app import app, main

__all__ = ["app", "main"]
