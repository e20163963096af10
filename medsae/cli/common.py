"""Pieces shared by the CLI modules: the registry option and the console."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from medsae.registry import Registry

RegistryOption = Annotated[
    Path | None,  # noqa: UP007 - typer needs Optional on Python 3.10
    typer.Option(
        "--registry",
        help="Registry file (default: $MEDSAE_REGISTRY, else ./registry.duckdb).",
        show_default=False,
    ),
]

_console: Console | None = None


def console() -> Console:
    """The shared stdout console (plain text when stdout is not a terminal)."""
    global _console
    if _console is None:
        _console = Console(highlight=False, soft_wrap=True)
    return _console


def open_registry(path: Path | None) -> Registry:
    return Registry(path)
