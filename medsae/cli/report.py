"""`medsae report EXP` (the HTML report) and `medsae exp compare A B ...` (key metrics side by side)."""

from __future__ import annotations

from pathlib import Path

import typer

from medsae.cli.common import FormatOption, RegistryOption, console, name_help, open_registry
from medsae.cli.output import Column, Listing, render


def report_command(
    exp: str = typer.Argument(..., help=name_help()),
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
    experiments: list[str] = typer.Argument(..., help=name_help("Experiments to put side by side"), metavar="NAME..."),
    registry: RegistryOption = None,
    format: FormatOption = "table",
    split: str = typer.Option("val", "--split", help="Split of the metrics (the study reports val)."),
    show_sql: bool = typer.Option(
        False,
        "--show-sql",
        help="Print only the SQL behind the table; it runs as printed (... --show-sql | medsae sql -).",
    ),
) -> None:
    """Key metrics of several experiments side by side (one SQL query over the registry)."""
    from medsae.report.compare import column_labels, compare_experiments

    sql, rows = compare_experiments(open_registry(registry), experiments, split=split)
    if show_sql:
        print(sql)
        return
    labels = column_labels()
    cols = [Column(c, labels.get(c, c)) for c in (list(rows[0]) if rows else ["experiment"])]
    note = f"the SQL behind this table: medsae exp compare {' '.join(experiments)} --show-sql"
    render(Listing(cols, rows, title=f"key metrics, {split} split", notes=[note]), format, meta={"sql": sql})
