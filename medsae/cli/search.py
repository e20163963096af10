"""`medsae search EXP "query"`: slices retrieved through the latents whose explanations match."""

from __future__ import annotations

import typer
from rich.table import Table

from medsae.cli.common import RegistryOption, console, open_registry


def search_command(
    experiment: str = typer.Argument(..., help="Experiment name."),
    query: str | None = typer.Argument(None, help='Clinical query, e.g. "axial CT through the liver".'),  # noqa: UP007
    model: str | None = typer.Option(None, "--model", help="Matching LLM (default: the reference scorer)."),  # noqa: UP007
    k: int = typer.Option(10, "--k", help="Slices returned (one per scan)."),
    n_latents: int = typer.Option(3, "--latents", help="Latents the LLM picks per query."),
    min_score: float = typer.Option(
        0.3, "--min-score", help="Only explanations with pearson r at least this."
    ),
    explainer: str | None = typer.Option(None, "--explainer", help="Use this explainer's explanations."),  # noqa: UP007
    evaluate: bool = typer.Option(False, "--evaluate", help="Run the study's 12 queries; store precision@k."),
    registry: RegistryOption = None,
) -> None:
    """Retrieve slices for a text query; precision@k against metadata is stored as metrics."""
    from medsae.errors import MedsaeError
    from medsae.interp.search import QUERIES, metric_rows, run_search, store_metrics

    if query is None and not evaluate:
        raise MedsaeError("search: give a QUERY or --evaluate")
    reg = open_registry(registry)
    out = console()
    jobs = [(q.name, q.text, q.criteria) for q in QUERIES] if evaluate else [("adhoc", query, None)]
    summary = Table(title=f"search precision@{k} on {experiment}")
    for col in ("query", "latents", "precision", "modality", "plane"):
        summary.add_column(col)
    rows = []
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
        rows += metric_rows(result, name if evaluate else text)
        prec = result["precision"]
        fmt = {key: "-" if v is None else f"{v:.2f}" for key, v in prec.items()}
        summary.add_row(
            text,
            ",".join(str(x["latent"]) for x in result["latents"]),
            fmt.get("all", "-"),
            fmt.get("modality", "-"),
            fmt.get("plane", "-"),
        )
        if not evaluate:
            for lat in result["latents"]:
                out.print(f"latent {lat['latent']} (r={lat['score']:.2f}): {lat['text']}")
            found = Table(title=f'top {k} for "{text}"')
            for col in ("slice", "modality", "plane", "region", "sex", "similarity"):
                found.add_column(col)
            for s in result["slices"]:
                found.add_row(
                    str(s["slice_uid"]),
                    str(s["modality"]),
                    str(s["plane"]),
                    str(s["body_region"]),
                    str(s["sex"]),
                    f"{s['similarity']:.3f}",
                )
            out.print(found)
    out.print(summary)
    stored = store_metrics(reg, rows)
    out.print(f"{stored} new metric row(s) stored")
