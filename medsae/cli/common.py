"""Pieces shared by the CLI modules: the registry and format options, choice checks, the console.

Options with a fixed set of values (formats, stage names, modes) are checked by :func:`choice`
while the command line is parsed, so a wrong value is one line (``--force: unknown stage 'trian'
(expected one of ...; did you mean 'train'?)``) before any work starts; the values are listed in
``--help`` and offered by shell completion; case does not matter.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from medsae.errors import MedsaeError
from medsae.registry import Registry

RegistryOption = Annotated[
    Path | None,
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


class ArgumentError(MedsaeError):
    """A command-line value that is not one of its choices (exit 2, like other usage errors)."""

    exit_code = 2


def check_choice(value: str, choices: Sequence[str], where: str, what: str) -> str:
    """``value`` (lower-cased) if it is one of ``choices``; else one line naming them and the closest."""
    normal = value.strip().lower()
    if normal in choices:
        return normal
    close = difflib.get_close_matches(normal, choices, n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    raise ArgumentError(f"{where}: unknown {what} '{value}' (expected one of {', '.join(choices)}{hint})")


def choice(where: str, what: str, choices: Sequence[str]) -> dict[str, Any]:
    """``typer.Option`` keywords checking a str (or repeatable list[str]) option against ``choices``.

    The check runs while arguments are parsed (before the command does anything); the metavar lists
    the choices in ``--help``; shell completion offers them.
    """

    def check(value: Any) -> Any:
        if value is None:
            return None
        if isinstance(value, list | tuple):
            return [check_choice(v, choices, where, what) for v in value]
        return check_choice(value, choices, where, what)

    def complete(incomplete: str) -> list[str]:
        return [c for c in choices if c.startswith(incomplete.lower())]

    return {"callback": check, "autocompletion": complete, "metavar": "[" + "|".join(choices) + "]"}


#: Output formats of the listing commands (see medsae.cli.output).
FORMATS: tuple[str, ...] = ("table", "csv", "json")

FormatOption = Annotated[
    str,
    typer.Option(
        "--format",
        "-f",
        help="Output format. table: cells wrap and are never cut (in a pipe, full width: one line per row); "
        "csv and json: every row, values unrounded.",
        **choice("--format", "format", FORMATS),
    ),
]


def stage_choice(where: str) -> dict[str, Any]:
    """:func:`choice` keywords for an option naming stages (the stage table's kinds)."""
    from medsae.stages import STAGES

    return choice(where, "stage", STAGES) | {"metavar": "STAGE"}


def stage_help(text: str) -> str:
    """``text`` followed by the stage names, for an option taking stages."""
    from medsae.stages import STAGES

    return f"{text} STAGE: {', '.join(STAGES)}."


def name_help(text: str = "Experiment") -> str:
    """Help of an argument naming an experiment."""
    return f"{text}: NAME (its latest registration) or NAME@HASH (a hash prefix from `medsae exp list`)."


__all__ = [
    "FORMATS",
    "ArgumentError",
    "FormatOption",
    "RegistryOption",
    "check_choice",
    "choice",
    "console",
    "name_help",
    "open_registry",
    "stage_choice",
    "stage_help",
]
