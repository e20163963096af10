"""`medsae export EXP --format saelens DIR`: write an experiment's trained SAE in another library's layout."""

from __future__ import annotations

from pathlib import Path

import typer

from medsae.cli.common import RegistryOption, console
from medsae.errors import MedsaeError

FORMATS = ("saelens",)


def export_command(
    experiment: str = typer.Argument(..., help="Experiment name (as registered by `medsae exp run`)."),
    out_dir: Path = typer.Argument(..., help="Folder to write (created if missing)."),
    format: str = typer.Option("saelens", "--format", "-f", help="Output layout: saelens."),
    registry: RegistryOption = None,
) -> None:
    """Export the experiment's SAE: SAELens = cfg.json + sae_weights.safetensors (normalisation folded in)."""
    from medsae.sae.checkpoint import export_saelens, resolve_train_dir

    if format not in FORMATS:
        raise MedsaeError(f"--format: expected one of {', '.join(FORMATS)}, got '{format}'")
    train_dir = resolve_train_dir(experiment, registry)
    out = export_saelens(train_dir, out_dir)
    console().print(f"[green]exported[/] {experiment} ({train_dir}) -> {out} [{format}]")


app = typer.Typer(help="Export trained SAEs.")
app.command("export")(export_command)
