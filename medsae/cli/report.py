"""`medsae report EXP` (the HTML report) and `medsae exp compare A B ...` (key metrics side by side)."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import typer

from medsae.cli.common import RegistryOption, console, open_registry
from medsae.errors import MedsaeError


def report_command(
    exp: str = typer.Argument(..., help="Experiment name (see `medsae exp list`)."),
    output: Path = typer.Option(Path("report.html"), "--output", "-o", help="HTML file to write."),
    latents: int = typer.Option(50, "--latents", "-n", help="Number of latent cards."),
    sort_by: str = typer.Option(
        "frequency",
        "--sort-by",
        help="Card order: frequency, max_act, mean_act, n_patients, score, "
        "score:METHOD, latent... (largest first; latent: by id).",
    ),
    registry: RegistryOption = None,
) -> None:
    """Write one self-contained HTML report: spec, provenance, metrics, plots and latent cards."""
    from medsae.report.build import build_report
    from medsae.stage import check_writable_file

    check_writable_file(output, "the report")  # before any work: one line naming the path
    path = build_report(open_registry(registry), exp, output, n_latents=latents, sort_by=sort_by)
    size = path.stat().st_size / 1e6
    console().print(f"wrote {path} ({size:.1f} MB); open it in any browser, it needs no network")


def compare_command(
    experiments: list[str] = typer.Argument(..., help="Experiment names to put side by side."),
    registry: RegistryOption = None,
    format: str = typer.Option("table", "--format", "-f", help="table, csv or json."),
    split: str = typer.Option("val", "--split", help="Split of the metrics (the study reports val)."),
) -> None:
    """Key metrics of several experiments side by side; prints the SQL it ran first."""
    from rich.syntax import Syntax
    from rich.table import Table

    from medsae.report.compare import column_labels, compare_experiments

    if format not in ("table", "csv", "json"):
        raise MedsaeError(f"--format: expected table, csv or json, got '{format}'")
    sql, rows = compare_experiments(open_registry(registry), experiments, split=split)
    columns = list(rows[0]) if rows else ["experiment"]
    if format == "csv":
        writer = csv.writer(sys.stdout)
        writer.writerow(columns)
        writer.writerows([r[c] for c in columns] for r in rows)
        return
    if format == "json":
        print(json.dumps({"sql": sql, "rows": rows}, default=str, indent=1))
        return
    out = console()
    out.print("[bold]SQL[/] (paste into `medsae sql` to rerun):")
    out.print(Syntax(sql, "sql", word_wrap=True, theme="ansi_dark"))
    labels = column_labels()
    table = Table(*(labels.get(c, c) for c in columns))
    for r in rows:
        table.add_row(
            *(
                "—" if r[c] is None else f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c])
                for c in columns
            )
        )
    out.print(table)
