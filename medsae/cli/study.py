"""`medsae study-table EXP...`: the study's result tables, laid out as the paper prints them.

Thin: resolve the experiments, read the registry through :mod:`medsae.registry.queries`, build the
tables with :mod:`medsae.eval.study_table`, print them with :mod:`medsae.cli.output`.
"""

from __future__ import annotations

from typing import Any

import typer

from medsae.cli.common import FormatOption, RegistryOption, open_registry
from medsae.cli.output import Column, Listing, render
from medsae.errors import MedsaeError
from medsae.registry import queries

#: What a missing value shows as in a table (csv and json leave it empty / null).
MISSING = "–"


def resolve_experiments(source: Any, names: list[str]) -> list[str] | None:
    """experiment_ids named by ``names`` (an experiment ``NAME`` or ``NAME@HASH``, or a sweep name for
    all its experiments); None (every experiment's latest registration) when no name is given."""
    if not names:
        return None
    ids: list[str] = []
    for name in names:
        members = queries.sweep_members(source, name)
        found = members or [queries.find_experiment(source, name)["experiment_id"]]
        ids += [i for i in found if i not in ids]
    return ids


def _table_rows(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """Rows for the terminal: a missing value shows as '–'."""
    return [{key: MISSING if r.get(key) is None else r.get(key) for key, _ in columns} for r in rows]


def study_table_command(
    experiments: list[str] = typer.Argument(
        None, help="Experiments or sweep names (default: every evaluated experiment).", metavar="EXP..."
    ),
    format: FormatOption = "table",
    registry: RegistryOption = None,
) -> None:
    """The study's tables: R², L0, monosemanticity, recovery with 10 latents, ranks, fingerprint
    quality and 5-way ranking rates per configuration, study protocol beside medsae's when both ran."""
    from medsae.eval.study_table import METRICS, build_tables, make_runs

    reg = open_registry(registry)
    ids = resolve_experiments(reg, experiments or [])
    run_rows = queries.evaluated_runs(reg, ids)
    if not run_rows:
        what = "the experiments named" if experiments else "the registry"
        raise MedsaeError(f"{reg.path}: no evaluated experiment in {what} (run `medsae exp run SPEC` first)")
    metric_rows = queries.stage_metric_rows(reg, [r["evaluate_key"] for r in run_rows], METRICS)
    rankings = queries.ranking_outcomes(reg, [r["summarize_key"] for r in run_rows if r["summarize_key"]])
    tables = build_tables(make_runs(run_rows, metric_rows, rankings))
    config_rows, fp_rows = tables.config_rows, tables.fingerprint_rows
    if format == "table":
        config_rows = _table_rows(config_rows, tables.config_columns)
        fp_rows = _table_rows(fp_rows, tables.fingerprint_columns)
    notes = [
        "val split. R²: the study's per-batch scalar-mean R²; M10 / M50: mean of the 10 / 50 largest M_10; "
        "AUC@10: mean AUC with the top 10 latents (dense AUC > 0.6); rec@10 = AUC@10 / dense AUC; mean N / nT: "
        "the ranking's mean latents to reach 50-100 % of the dense AUC and its targets; ranks per embedding "
        "(study: by M50, medsae: by M10); FP: fingerprint quality (dense-space cosine of the 5 retrievals); "
        "top-1 / top-2: share of explanations the 5-way ranking put first / in the first two."
    ]
    listings = [
        Listing(
            [Column(k, h) for k, h in tables.config_columns],
            config_rows,
            title=f"SAE configurations ({', '.join(tables.protocols)} protocol)",
            key="configurations",
            notes=notes,
        ),
        Listing(
            [Column(k, h) for k, h in tables.fingerprint_columns],
            fp_rows,
            title="fingerprint quality by K (K = dense: full dense retrieval)",
            key="fingerprint",
        ),
    ]
    render(listings, format, meta={"protocols": tables.protocols})
