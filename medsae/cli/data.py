"""`medsae data ...`: write a phantom dataset, ingest a TotalSegmentator folder on its own."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import typer

from medsae.cli.common import RegistryOption, console

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


def _parse_shape(text: str) -> tuple[int, int, int]:
    from medsae.errors import SpecError

    try:
        values = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        values = ()
    if len(values) != 3:
        raise SpecError(f"--shape: expected three integers like 64,64,80, got '{text}'")
    return values  # type: ignore[return-value]


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

    root = write_phantom(
        out, subjects=subjects, seed=seed, mri_fraction=mri_fraction, shape=_parse_shape(shape)
    )
    scans = discover(root, present_modalities(root))
    n_ct = sum(s.modality == "ct" for s in scans)
    console().print(f"phantom at {root}: {n_ct} CT and {len(scans) - n_ct} MRI scans")


@app.command("ingest")
def ingest_command(
    root: Path = typer.Argument(
        ..., help="TotalSegmentator folder (CT_Dataset_v201/ and/or MRI_Dataset_v200/)."
    ),
    workers: int = typer.Option(1, "--workers", "-w", help="Processes reading volumes."),
    out: Path | None = typer.Option(  # noqa: UP007
        None, "--out", help="Output folder (default artifacts/slices/<key>).", show_default=False
    ),
    size: int = typer.Option(1024, "--size", help="Side of the rendered slice images (pixels)."),
    stride: int = typer.Option(1, "--stride", help="Keep every stride-th slice."),
    max_scans: int | None = typer.Option(None, "--max-scans", help="Read at most this many scans."),  # noqa: UP007
    reorient: bool = typer.Option(False, "--reorient", help="Reorient volumes to RAS before slicing."),
    registry: RegistryOption = None,
) -> None:
    """Index a dataset into slices and structure areas (the `slices` stage alone) and record it."""
    summary = ingest(
        root,
        {"root": str(root), "workers": workers, "size": size, "stride": stride, "max_scans": max_scans,
         "reorient": reorient},
        out,
        registry,
    )  # fmt: skip
    print_summary(summary)


def ingest(root: Path, params: dict, out: Path | None, registry_file: Path | None) -> dict:
    """Run the slices stage on ``root`` into ``out`` (resumable) and insert its rows in the registry."""
    from pydantic import ValidationError

    from medsae.data.build import run_ingest
    from medsae.data.config import DataSpec
    from medsae.data.index import load_skipped, load_slices, load_structures, load_vocab
    from medsae.data.stage import ingest_key, registry_tables
    from medsae.data.totalsegmentator import dataset_manifest, ensure_dataset
    from medsae.errors import SpecError
    from medsae.progress import track
    from medsae.registry.db import Registry, insert_rows

    try:
        spec = DataSpec.model_validate({k: v for k, v in params.items() if v is not None})
    except ValidationError as exc:
        err = exc.errors()[0]
        raise SpecError(f"medsae data ingest: {'.'.join(map(str, err['loc']))}: {err['msg']}") from None
    data = spec.model_dump(mode="json")
    root = ensure_dataset(data)
    key = ingest_key(data, dataset_manifest(root))
    out = out or Path("artifacts") / "slices" / key
    work = out.parent / f".{out.name}.work"
    if (out / "render.json").is_file():
        from medsae.data.build import IngestResult, summarize

        slices = load_slices(out)
        n_scans = int(slices[["modality", "image_id"]].drop_duplicates().shape[0])
        result = IngestResult(out, slices, load_structures(out), load_skipped(out).to_dict("records"),
                              load_vocab(out), n_scans, 0, 0, 0, 0.0)  # fmt: skip
        summary = summarize(result)
        summary["already_done"] = True
    else:
        tmp = out.parent / f".{out.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)

        def progress(iterable, total=None, description=""):  # noqa: ANN001, ANN202
            return track(iterable, total=total, description=description, unit="vol")

        result = run_ingest(root, data, tmp, work, progress=progress)
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, out)
        shutil.rmtree(work, ignore_errors=True)
        summary = dict(result.summary)
    reg = Registry(registry_file)
    done = (
        reg.query("SELECT count(*) AS n FROM slices WHERE slices_key = ?", [key]) if reg.path.exists() else []
    )
    if not done or not done[0]["n"]:
        tables = registry_tables(result)
        with reg.write() as con:
            for name, rows in tables.items():
                rows = _with_key(rows, key)
                insert_rows(con, name, rows)
    summary.update(key=key, out=str(out), registry=str(reg.path))
    return summary


def _with_key(rows, key: str):  # noqa: ANN001, ANN202
    import pyarrow as pa

    if isinstance(rows, pa.Table):
        return rows.append_column("slices_key", pa.array([key] * rows.num_rows, pa.string()))
    return [{**r, "slices_key": key} for r in rows]


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
        con.print(
            f"... {summary['skipped'] - len(summary['skipped_scans'])} more skipped (see skipped.parquet)"
        )


if __name__ == "__main__":  # `python -m medsae.cli.data ...` (used by tests that kill an ingest)
    import sys

    from medsae.errors import MedsaeError

    try:
        app()
    except MedsaeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
