"""`medsae export EXP --format saelens DIR`: write an experiment's trained SAE in another library's layout."""

from __future__ import annotations

from pathlib import Path

import typer

from medsae.cli.common import RegistryOption, console
from medsae.errors import MedsaeError

FORMATS = ("saelens", "parquet")
L2_MODES = ("rescale", "unit")


def export_command(
    experiment: str = typer.Argument(..., help="Experiment name (as registered by `medsae exp run`)."),
    out_dir: Path = typer.Argument(..., help="Folder to write (created if missing)."),
    format: str = typer.Option("saelens", "--format", "-f", help="saelens, or parquet (codes + slices)."),
    l2: str = typer.Option(
        "rescale",
        "--l2",
        help="saelens, SAEs trained on L2-normalised inputs: rescale = raw embeddings in and out (SAELens "
        "constant_norm_rescale; decode only right after encode), unit = feed unit-norm inputs, decode works alone.",
    ),
    registry: RegistryOption = None,
) -> None:
    """Export the experiment's SAE or its codes.

    saelens: cfg.json, sae_weights.safetensors, sparsity.safetensors (log10 firing frequency on the
    train split) and README.md (a model card: inputs, normalisation, loading, metrics with their splits).

    parquet: its codes as a long table (codes.parquet: slice_id, latent, value) and its slice metadata
    (slices.parquet, slice_structures.parquet), without paths, for use outside medsae.
    """
    if format not in FORMATS:
        raise MedsaeError(f"--format: expected one of {', '.join(FORMATS)}, got '{format}'")
    if l2 not in L2_MODES:
        raise MedsaeError(f"--l2: expected one of {', '.join(L2_MODES)}, got '{l2}'")
    if format == "parquet":
        from medsae.api import open as open_registry

        files = open_registry(registry).experiment(experiment).export_parquet(out_dir)
        console().print(f"[green]exported[/] {experiment} -> {out_dir}: {', '.join(p.name for p in files)} [parquet]")
        return
    from medsae.api import export_experiment_saelens

    out = export_experiment_saelens(experiment, out_dir, registry, l2=l2)
    files = sorted(p.name for p in out.iterdir() if p.is_file())
    console().print(f"[green]exported[/] {experiment} -> {out}: {', '.join(files)} [{format}, --l2 {l2}]")


app = typer.Typer(help="Export trained SAEs.")
app.command("export")(export_command)
