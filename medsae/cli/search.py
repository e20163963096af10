"""`medsae search EXP "query"`: slices retrieved through the latents whose explanations match."""

from __future__ import annotations

import typer

from medsae.cli.common import FormatOption, RegistryOption, name_help, open_registry
from medsae.cli.output import Listing, columns, render


def search_command(
    experiment: str = typer.Argument(..., help=name_help()),
    query: str | None = typer.Argument(None, help='Clinical query, e.g. "axial CT through the liver".'),
    model: str | None = typer.Option(None, "--model", help="Matching LLM (default: the reference scorer)."),
    k: int = typer.Option(10, "--k", help="Slices returned (one per scan)."),
    n_latents: int = typer.Option(3, "--latents", help="Latents the LLM picks per query."),
    min_score: float = typer.Option(0.3, "--min-score", help="Only explanations with pearson r at least this."),
    explainer: str | None = typer.Option(None, "--explainer", help="Use this explainer's explanations."),
    evaluate: bool = typer.Option(False, "--evaluate", help="Run the study's 12 queries; store precision@k."),
    registry: RegistryOption = None,
    format: FormatOption = "table",
) -> None:
    """Retrieve slices for a text query; precision@k against metadata is stored as metrics.

    Table output: for an ad-hoc query the latents chosen and the slices found, then one
    precision line per query. csv prints the precision table (json: everything).
    """
    import sys

    from medsae.errors import MedsaeError
    from medsae.interp.search import QUERIES, metric_rows, run_search, store_metrics

    if query is None and not evaluate:
        raise MedsaeError("search: give a QUERY or --evaluate")
    reg = open_registry(registry)
    jobs = [(q.name, q.text, q.criteria) for q in QUERIES] if evaluate else [("adhoc", query, None)]
    precision_rows, latent_rows, slice_rows, metrics = [], [], [], []
    for name, text, criteria in jobs:
        result = run_search(
            reg,
            experiment,
            text,
            model=model,
            k=k,
            n_latents=n_latents,
            min_score=min_score,
            explainer=explainer,
            criteria=criteria,
        )
        metrics += metric_rows(result, name if evaluate else text)
        prec = result["precision"]
        precision_rows.append(
            {
                "query": text,
                "latents": [x["latent"] for x in result["latents"]],
                "precision": prec.get("all"),
                "modality": prec.get("modality"),
                "plane": prec.get("plane"),
            }
        )
        latent_rows += [{"query": text, **lat} for lat in result["latents"]]
        slice_rows += [{"query": text, **found} for found in result["slices"]]
    listings = []
    if not evaluate:
        listings += [
            Listing(columns("latent", ("score", "r"), "text"), latent_rows, title="latents matched", key="latents"),
            Listing(
                columns("slice_uid", "modality", "plane", ("body_region", "region"), "sex", "similarity"),
                slice_rows,
                title=f'top {k} for "{query}"',
                key="slices",
            ),
        ]
    summary = Listing(
        columns("query", "latents", "precision", "modality", "plane"),
        precision_rows,
        title=f"search precision@{k} on {experiment}",
        key="precision",
    )
    if format == "csv":  # one table: the precision per query
        render(summary, format)
    else:
        render([*listings, summary], format)
    stored = store_metrics(reg, metrics)
    print(f"{stored} new metric row(s) stored", file=sys.stdout if format == "table" else sys.stderr)
