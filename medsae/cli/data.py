"""`medsae data ...`: write a phantom dataset, check a dataset, ingest one on its own.

``ingest`` and ``check`` take a TotalSegmentator folder, a manifest file (or a folder holding
``manifest.csv``) or a folder of DICOM series; ``--format`` overrides the guess
(:func:`medsae.data.check.detect_format`). ``ingest --spec SPEC`` builds exactly the slices stage
``medsae exp run SPEC`` would build; without it, options left out take the ``data:`` section's defaults.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import typer

from medsae.cli.common import RegistryOption, choice, console
from medsae.data.config import DataSpec

SOURCE_FORMATS = ("totalsegmentator", "manifest", "dicom")
FormatOption = typer.Option(
    None,
    "--format",
    help="Dataset format (default: guessed from ROOT).",
    show_default=False,
    **choice("--format", "format", SOURCE_FORMATS),
)

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
    root: Path | None = typer.Argument(
        None, help="TotalSegmentator folder, manifest file (or its folder) or DICOM folder.", show_default=False
    ),
    spec: Path | None = typer.Option(
        None,
        "--spec",
        help="Take the data section, seed and artifacts folder from this experiment spec.",
        show_default=False,
    ),
    data_format: str | None = FormatOption,
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
    orientation: str | None = typer.Option(
        None,
        "--orientation",
        help=f"Slice display (default {_default('orientation')}; stored = the study's).",
        show_default=False,
        **choice("--orientation", "orientation", ("radiological", "stored")),
    ),
    reorient: bool | None = typer.Option(
        None,
        "--reorient/--no-reorient",
        help="Reorient volumes to RAS before slicing (default: as the orientation needs).",
        show_default=False,
    ),
    labels: str | None = typer.Option(
        None, "--labels", help="Manifest: label table of label-map masks, relative to the root.", show_default=False
    ),
    registry: RegistryOption = None,
) -> None:
    """Index a dataset into slices and structure areas (the `slices` stage alone) and record it.

    Unset options take the `data:` section's defaults; `exp run` of a spec with the same data reuses the stage.
    """
    from medsae.errors import SpecError

    options = {"workers": workers, "size": size, "stride": stride, "max_scans": max_scans,
               "orientation": orientation, "reorient": reorient, "labels": labels}  # fmt: skip
    if spec is not None:
        given = [f"--{k.replace('_', '-')}" for k, v in options.items() if v is not None and k != "workers"]
        if root is not None or data_format is not None or given:
            extra = ", ".join((["ROOT"] if root is not None else []) + (["--format"] if data_format else []) + given)
            raise SpecError(f"medsae data ingest: --spec takes every data setting from the spec ({extra} given)")
        print_summary(ingest_spec(spec, workers, out, registry))
        return
    if root is None:
        raise SpecError("medsae data ingest: give ROOT (a dataset folder or manifest) or --spec SPEC")
    base, detected, manifest = _detect(root, data_format)
    params = {"root": str(base), "format": detected, "manifest": manifest, **options}
    print_summary(ingest(base, params, out, registry))


def _detect(root: Path, data_format: str | None) -> tuple[Path, str, str | None]:
    """Dataset folder, format and manifest name of ROOT (``--format`` wins over the guess)."""
    from medsae.data.check import detect_format

    base, guessed, manifest = detect_format(root)
    if data_format is None or data_format == guessed:
        return base, guessed, manifest
    if root.is_file():
        from medsae.errors import SpecError

        raise SpecError(f"medsae data ingest: {root} is a file; --format {data_format} needs a folder")
    return root, data_format, None


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
    from medsae.spec import ExperimentSpec

    values = {k: v for k, v in params.items() if v is not None}
    values["root"] = str(root)
    try:
        data = DataSpec.model_validate(values)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(map(str, err["loc"])) or "data"
        raise SpecError(f"medsae data ingest: {where}: {err['msg']}") from None
    return _build(ExperimentSpec(name="data-ingest", data=data), out, registry_file)


def ingest_spec(path: Path, workers: int | None, out: Path | None, registry_file: Path | None) -> dict:
    """Build the ``slices`` stage of the experiment spec at ``path`` (its key, folder and registry rows)."""
    from medsae.errors import SpecError
    from medsae.spec import load_specs

    specs = load_specs(path)
    if len({s.data.model_dump_json() for s in specs}) > 1:
        raise SpecError(f"{path}: the sweep varies the data section; ingest one setting with `exp run --only slices`")
    spec = specs[0]
    if workers is not None:
        spec = spec.model_copy(update={"data": spec.data.model_copy(update={"workers": workers})})
    return _build(spec, out, registry_file)


def _build(spec: Any, out: Path | None, registry_file: Path | None) -> dict:
    from medsae.plan import plan_experiment, run_stage, stage_summary
    from medsae.registry.db import Registry

    reg = Registry(registry_file)
    reg.check_writable()  # every write place is checked before any work
    node = plan_experiment(spec, only={"slices"}).nodes["slices"]
    node.folder = out
    outcome = run_stage(node, reg)
    summary = stage_summary(node)
    summary.update(key=node.key, out=str(node.final_dir), registry=str(reg.path), already_done=outcome.action != "ran")
    return summary


@app.command("check")
def check_command(
    root: Path = typer.Argument(..., help="TotalSegmentator folder, manifest file (or its folder) or DICOM folder."),
    data_format: str | None = FormatOption,
    labels: str | None = typer.Option(
        None, "--labels", help="Manifest: label table of label-map masks, relative to the root.", show_default=False
    ),
) -> None:
    """Dry run of an ingest: what would be read, per modality and kind, and every problem found; writes nothing.

    Exits 1 when a scan has a problem (an ingest would skip it), 0 otherwise.
    """
    from pydantic import ValidationError

    from medsae.data.check import check_dataset
    from medsae.errors import MissingInputError, SpecError

    if not root.exists():
        raise MissingInputError(f"{root}: not found")
    base, detected, manifest = _detect(root, data_format)
    values = {"root": str(base), "format": detected, "manifest": manifest, "labels": labels}
    try:
        data = DataSpec.model_validate({k: v for k, v in values.items() if v is not None})
    except ValidationError as exc:
        err = exc.errors()[0]
        raise SpecError(f"medsae data check: {'.'.join(map(str, err['loc'])) or 'data'}: {err['msg']}") from None
    from medsae.data.sources import check_source

    if detected != "totalsegmentator":
        check_source(base, data)
    report = check_dataset(base, data)
    print_check(report)
    if report.problems:
        raise typer.Exit(1)


def print_check(report: Any) -> None:
    """The check's table (modality x kind) and one line per scan with a problem."""
    from rich.table import Table

    con = console()
    con.print(f"[bold]check[/bold] {report.root} ({report.format}); nothing written")
    for note in report.notes:
        con.print(note)
    table = Table("modality", "kind", "scans", "segmentation", "to ingest", "with problems")
    for row in report.summary():
        table.add_row(row["modality"], row["kind"], str(row["scans"]), row["segmentation"], str(row["to_ingest"]),
                      str(row["problems"]))  # fmt: skip
    con.print(table)
    for scan in report.problems:
        con.print(f"problem {scan.modality}/{scan.image_id}: {'; '.join(scan.problems)}", markup=False)
    if not report.problems:
        con.print("no problems found")


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
