"""`medsae eval ...`: the study's configuration ranking and the sweep plot (thin: parse, call, print)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from medsae.cli.common import RegistryOption, console, open_registry
from medsae.registry import queries

app = typer.Typer(help="Evaluation across experiments: configuration ranking, sweep plots.", no_args_is_help=True)


@app.command()
def rank(
    experiments: list[str] = typer.Argument(
        None, help="Experiment names to rank (default: all evaluated).", metavar="NAME..."
    ),
    mono: str = typer.Option(
        "mono_config_top10",
        help="mono_config_top10 (study code) or monosemanticity_top50_mean (study's shipped ranking).",
    ),
    split: str = typer.Option("val", help="Split whose metrics are ranked."),
    together: bool = typer.Option(False, "--together", help="Rank across embeddings instead of per embedding."),
    registry: RegistryOption = None,
) -> None:
    """The study's ranking: mean of the monosemanticity rank and the performance-recovery rank."""
    from medsae.errors import MedsaeError
    from medsae.eval.ranking import MONO_METRICS, ranking_sql

    if mono not in MONO_METRICS:
        raise MedsaeError(f"--mono must be one of {', '.join(MONO_METRICS)}")
    rows = queries.rows(open_registry(registry), ranking_sql(experiments or None, split, mono, not together))
    table = Table(title=f"configuration ranking ({split}, {mono})")
    for col in ("embed", "experiment", "mono", "mean N", "rank mono", "rank perf", "combined", "final"):
        table.add_column(col)
    for r in rows:
        fmt = lambda v: "" if v is None else f"{v:.4g}"  # noqa: E731
        table.add_row(
            r["embed_key"][:8],
            r["experiment"],
            fmt(r["mono_score"]),
            fmt(r["mean_n_features"]),
            str(r["rank_mono"]),
            str(r["rank_perf"]),
            fmt(r["rank_combined"]),
            str(r["final_rank"]),
        )
    console().print(table)


@app.command("plot-sweep")
def plot_sweep(
    out: Path = typer.Option(Path("sweep.png"), "--out", "-o", help="PNG file to write."),
    experiments: list[str] = typer.Argument(None, help="Experiment names (default: all evaluated).", metavar="NAME..."),
    split: str = typer.Option("val", help="Split whose metrics are plotted."),
    registry: RegistryOption = None,
) -> None:
    """FVU and the study's R² against L0, one point per experiment."""
    import pandas as pd

    from medsae import plots
    from medsae.errors import MedsaeError

    points = pd.DataFrame(sweep_points(open_registry(registry), experiments or None, split))
    path = plots.save_png(plots.reconstruction_vs_l0(points), out)
    if path is None:
        raise MedsaeError(f"no evaluated experiment with L0 on split '{split}' in the registry")
    console().print(f"wrote {path}")


def sweep_points(registry: Any, names: list[str] | None, split: str) -> list[dict[str, Any]]:
    """One row per experiment (the latest registration of each name, or of the ``names`` given):
    ``experiment`` and the evaluate stage's L0, FVU and R² on ``split``, for those that have any."""
    from medsae import plots
    from medsae.registry import queries

    latest = {e["name"]: e["experiment_id"] for e in queries.list_experiments(registry)}  # oldest first
    chosen = {name: eid for name, eid in latest.items() if names is None or name in names}
    values = queries.key_metrics(registry, list(chosen.values()), [plots.L0, plots.FVU, plots.R2], split)
    return [{"experiment": name, **values[eid]} for name, eid in sorted(chosen.items()) if eid in values]
