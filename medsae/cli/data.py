"""`medsae data ...`: write a phantom dataset, ingest a TotalSegmentator folder on its own."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import typer

from medsae.cli.common import RegistryOption, console
from medsae.data.config import DataSpec

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


def _parse_shape(text: str) -> tuple[int, int, int]:
    from medsae.errors import SpecError

    try:
        values = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        values = ()
    if len(values) != 3:
        raise SpecError(f"--shape: expected three integers like 64,64,80, got '{text}'")
    return values


@app.command("phantom")
def phantom_command(
    out: Path = typer.Argument(..., help="Folder to write CT_Dataset_v201/ and MRI_Dataset_v200/ into."),
    subjects: int = typer.Option(12, "--subjects", "-n", help="Number of scans (CT and MRI together)."),
    seed: int = typer.Option(0, "--seed", help="Generator seed."),
    mri_fraction: float = typer.Option(0.34, "--mri-fraction", help="Share of subjects written as MRI."),
    shape: str = typer.Option("64,64,80", "--shape", help="CT voxel grid x,y,z."),
) -> None:
    """Write a synthetic dataset in the TotalSegmentator layout (reused if already there)."""
    from medsae.data.phantom import write_phantom
    from medsae.data.totalsegmentator import discover, present_modalities

    root = write_phantom(out, subjects=subjects, seed=seed, mri_fraction=mri_fraction, shape=_parse_shape(shape))
    scans = discover(root, present_modalities(root))
    n_ct = sum(s.modality == "ct" for s in scans)
    console().print(f"phantom at {root}: {n_ct} CT and {len(scans) - n_ct} MRI scans")


def _default(name: str) -> str:
    """The ``data:`` section's default of a field, for help texts (the options default to it)."""
    return str(DataSpec.model_fields[name].default)


@app.command("ingest")
def ingest_command(
    root: Path = typer.Argument(..., help="TotalSegmentator folder (CT_Dataset_v201/ and/or MRI_Dataset_v200/)."),
    workers: int | None = typer.Option(
        None, "--workers", "-w", help=f"Processes reading volumes (default {_default('workers')}).", show_default=False
    ),
    out: Path | None = typer.Option(
        None,
        "--out",
        help="Output folder (default artifacts/slices/<key>, where `exp run` puts it).",
        show_default=False,
    ),
    size: int | None = typer.Option(
        None,
        "--size",
        help=f"Side of the rendered slice images in pixels (default {_default('size')}).",
        show_default=False,
    ),
    stride: int | None = typer.Option(
        None, "--stride", help=f"Keep every stride-th slice (default {_default('stride')}).", show_default=False
    ),
    max_scans: int | None = typer.Option(None, "--max-scans", help="Read at most this many scans."),
    reorient: bool | None = typer.Option(
        None,
        "--reorient/--no-reorient",
        help=f"Reorient volumes to RAS before slicing (default {_default('reorient')}).",
        show_default=False,
    ),
    registry: RegistryOption = None,
) -> None:
    """Index a dataset into slices and structure areas (the `slices` stage alone) and record it.

    Unset options take the `data:` section's defaults; `exp run` of a spec with the same data reuses the stage.
    """
    params = {"root": str(root), "workers": workers, "size": size, "stride": stride, "max_scans": max_scans,
              "reorient": reorient}  # fmt: skip
    print_summary(ingest(root, params, out, registry))


def ingest(root: Path, params: Mapping[str, Any], out: Path | None, registry_file: Path | None) -> dict:
    """Build the ``slices`` stage of ``params`` (a ``data:`` section; None = default) through the planner.

    The stage is planned like one of a spec (seed and artifacts folder at the spec's defaults) and
    built by :func:`medsae.plan.run_stage`: written to a temporary folder, renamed into place, then
    registered; a killed ingest resumes at the next volume, and a finished one is reused. ``out``
    replaces the folder ``artifacts/slices/<key>``. Returns the stage's summary plus ``key``,
    ``out``, ``registry`` and ``already_done``.
    """
    from pydantic import ValidationError

    from medsae.errors import SpecError
    from medsae.plan import plan_experiment, run_stage, stage_summary
    from medsae.registry.db import Registry
    from medsae.spec import ExperimentSpec

    values = {k: v for k, v in params.items() if v is not None}
    values["root"] = str(root)
    try:
        data = DataSpec.model_validate(values)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise SpecError(f"medsae data ingest: {'.'.join(map(str, err['loc']))}: {err['msg']}") from None
    reg = Registry(registry_file)
    reg.check_writable()  # every write place is checked before any work
    node = plan_experiment(ExperimentSpec(name="data-ingest", data=data), only={"slices"}).nodes["slices"]
    node.folder = out
    outcome = run_stage(node, reg)
    summary = stage_summary(node)
    summary.update(key=node.key, out=str(node.final_dir), registry=str(reg.path), already_done=outcome.action != "ran")
    return summary


def print_summary(summary: dict) -> None:
    """Scans read, slices per modality and plane, skipped scans with reasons."""
    from rich.table import Table

    con = console()
    state = "already ingested" if summary.get("already_done") else f"{summary['seconds']:.1f}s"
    con.print(f"[bold]ingest[/bold] {summary['out']} ({state}); registry {summary['registry']}")
    con.print(
        f"scans read: {summary['scans_read']}  slices: {summary['slices']}  "
        f"structures: {summary['structures']}  skipped: {summary['skipped']}"
    )
    if not summary.get("already_done"):
        con.print(
            f"volumes indexed now: {summary['volumes_indexed']} (resumed {summary['volumes_resumed']}), "
            f"{summary['volumes_per_s']:.1f} volumes/s, {summary['slices_per_s']:.0f} slices/s"
        )
    table = Table("modality/plane", "slices")
    for target, count in summary["slices_by_modality_plane"].items():
        table.add_row(target, str(count))
    con.print(table)
    if summary["slices_by_split"]:
        con.print("splits: " + ", ".join(f"{k} {v}" for k, v in sorted(summary["slices_by_split"].items())))
    for row in summary.get("skipped_scans", []):
        con.print(f"skipped {row['modality']}/{row['image_id']}: {row['reason']}")
    if summary["skipped"] > len(summary.get("skipped_scans", [])):
        con.print(f"... {summary['skipped'] - len(summary['skipped_scans'])} more skipped (see skipped.parquet)")


if __name__ == "__main__":  # `python -m medsae.cli.data ...` (used by tests that kill an ingest)
    import sys

    from medsae.errors import MedsaeError

    try:
        app()
    except MedsaeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
