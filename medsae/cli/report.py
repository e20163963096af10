"""`medsae report EXP` (the HTML report) and `medsae exp compare A B ...` (key metrics side by side)."""

from __future__ import annotations

from pathlib import Path

import typer

from medsae.cli.common import FormatOption, RegistryOption, console, name_help, open_registry
from medsae.cli.output import Column, Listing, render
from medsae.errors import MedsaeError


def report_command(
    exp: str = typer.Argument(..., help=name_help()),
    output: Path = typer.Option(
        Path("report.html"),
        "--output",
        "-o",
        help="A .html file: the one-file report; any other path: a folder holding the latent explorer "
        "(index page, one page per latent, thumbnails; works from file:// and any static host).",
    ),
    latents: int | None = typer.Option(
        None, "--latents", "-n", help="One-file report only: number of latent cards [default: 50]."
    ),
    sort_by: str | None = typer.Option(
        None,
        "--sort-by",
        help="One-file report only: card order: frequency, max_act, mean_act, n_patients, score, "
        "score:METHOD, latent... (largest first; latent: by id) [default: frequency].",
    ),
    compare: list[str] = typer.Option(
        [],
        "--compare",
        help="Explorer only (repeatable): another experiment whose latents are matched with EXP's by decoder "
        "cosine, written to compare/<name>.html. Both SAEs must read the same backbone.",
        metavar="NAME",
    ),
    registry: RegistryOption = None,
) -> None:
    """Write one self-contained HTML report (-o X.html) or the latent explorer folder (-o FOLDER/)."""
    if output.suffix.lower() not in (".html", ".htm"):
        from medsae.report.site.build import build_site

        for flag, value in (("--latents", latents), ("--sort-by", sort_by)):
            if value is not None:
                raise MedsaeError(
                    f"{flag}: applies to the one-file report (-o X.html); the explorer {output} has a page for "
                    "every latent and sorts in its index page"
                )
        site = build_site(open_registry(registry), exp, output, compare_with=compare)
        console().print(
            f"wrote {site.path}/ ({site.n_pages} latent pages, {site.n_images} images, {site.n_bytes / 1e6:.1f} MB, "
            f"{site.seconds:.1f} s); open {site.path / 'index.html'} in any browser, it needs no network"
        )
        for note in site.notes:
            console().print(f"note: {note}")
        return
    if compare:
        raise MedsaeError(
            f"--compare {compare[0]}: comparisons are pages of the explorer; -o must be a folder, not {output}"
        )
    from medsae.report.build import build_report
    from medsae.stage import check_writable_file

    check_writable_file(output, "the report")  # before any work: one line naming the path
    n_latents = 50 if latents is None else latents  # --latents 0: a report without cards
    order = "frequency" if sort_by is None else sort_by
    path = build_report(open_registry(registry), exp, output, n_latents=n_latents, sort_by=order)
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
