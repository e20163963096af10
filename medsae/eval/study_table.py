"""The study's result tables from registry rows (``medsae study-table``, docs/method.md#study-tables).

One row per SAE configuration (a train stage), laid out as the paper's tables: L0, R², alive latents
per batch, monosemanticity (top-10 and top-50 means), probe AUC means, the mean AUC with 10 latents
and its share of the dense AUC, the ranking quantity and ranks, fingerprint quality at K = 5 and the
5-way ranking's top-1 / top-2 rates; and a fingerprint table over K. Each number is read from the
evaluate stage of the configuration's study-protocol run; when a medsae-protocol run of the same
configuration exists, its numbers stand beside them in ``(medsae)`` columns.

Ranks follow the study's ranking (docs/method.md#ranking) within the runs shown that share an
embedding: study runs by the top-50 monosemanticity mean (what the study's shipped ranking used),
medsae runs by the top-10 mean (medsae's default); runs lacking either score are not ranked (the
study joined the two tables).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

PROTOCOLS = ("study", "medsae")
#: Fingerprint size of the study's detailed results.
FINGERPRINT_K = 5
#: N of the study's "performance with 10 features".
RECOVERY_N = 10
#: The monosemanticity score each protocol ranks by.
RANK_MONO = {"study": "monosemanticity_top50_mean", "medsae": "mono_config_top10"}

#: Metrics a table reads (val split).
METRICS = (
    "l0_mean",
    "r2_scalar_mean_study",
    "alive_per_batch_study",
    "mono_config_top10",
    "monosemanticity_top50_mean",
    "probe_auc_dense_mean",
    "probe_auc_sparse_mean",
    "recovery_auc_mean",
    "recovery_mean_n_features",
    "fingerprint_quality_sparse",
    "fingerprint_quality_dense_fp",
    "fingerprint_quality_dense",
    "fingerprint_relative_sparse",
)

#: (key, header) of the per-protocol columns of the configuration table.
VALUE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("l0", "L0"),
    ("r2", "R²"),
    ("alive", "alive/batch"),
    ("m10", "M10"),
    ("m50", "M50"),
    ("dense_auc", "dense AUC"),
    ("sparse_auc", "sparse AUC"),
    ("auc10", "AUC@10"),
    ("rec10", "rec@10"),
    ("mean_n", "mean N"),
    ("n_targets", "nT"),
    ("rank_mono", "rank mono"),
    ("rank_perf", "rank perf"),
    ("final_rank", "rank"),
    ("fp_sparse", "FP@5 sparse"),
    ("fp_dense_fp", "FP@5 dense-fp"),
    ("fp_dense", "FP dense"),
    ("fp_relative", "FP@5 rel"),
    ("top1", "top-1"),
    ("top2", "top-2"),
)
#: (key, header) of the per-protocol columns of the fingerprint table.
FINGERPRINT_COLUMNS: tuple[tuple[str, str], ...] = (("sparse", "sparse"), ("dense_fp", "dense-fp"))


@dataclass
class Run:
    """One evaluated experiment as a table reads it."""

    experiment_id: str
    name: str
    protocol: str
    config: str
    backbone: str
    embed_key: str
    train_key: str
    summarize_key: str | None
    #: (metric, target, n_features) -> value, and the same key -> n
    metrics: dict[tuple[str, str | None, int | None], float | None] = field(default_factory=dict)
    counts: dict[tuple[str, str | None, int | None], int | None] = field(default_factory=dict)
    ranking: dict[str, Any] | None = None  # n, n_ranked, top1, top2 of the 5-way ranking

    def metric(self, name: str, n_features: int | None = None) -> float | None:
        value = self.metrics.get((name, None, n_features))
        return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def _json(text: str | None) -> dict[str, Any]:
    try:
        return json.loads(text) if text else {}
    except ValueError:
        return {}


def protocol_of(eval_params_json: str | None) -> str:
    """The evaluate stage's protocol (stages written before protocols existed are medsae's)."""
    return str(_json(eval_params_json).get("protocol", "medsae"))


def config_label(train_params: dict[str, Any], d_sae: Any = None) -> str:
    """The study's configuration name ``D_{levels}_K_{budgets}``; other SAEs ``{arch} D_{d}_K_{k}``."""
    if train_params.get("arch") == "matryoshka" and train_params.get("levels"):
        levels = "_".join(str(v) for v in train_params["levels"])
        budgets = "_".join(str(v) for v in train_params.get("level_k") or [])
        return f"D_{levels}_K_{budgets}"
    d = train_params.get("d_sae") or d_sae or "?"
    return f"{train_params.get('arch', '?')} D_{d}_K_{train_params.get('k', '?')}"


def backbone_label(embed_params: dict[str, Any]) -> str:
    """A short backbone name: the model id's last part (``dinov3-vitl16-pretrain-lvd1689m``)."""
    model = str(embed_params.get("model") or embed_params.get("source") or "?")
    return model.rstrip("/").split("/")[-1]


def make_runs(
    run_rows: Sequence[dict[str, Any]], metric_rows: Sequence[dict[str, Any]], ranking_rows: Sequence[dict[str, Any]]
) -> list[Run]:
    """:class:`Run` objects from :func:`medsae.registry.queries.evaluated_runs`, ``stage_metric_rows``
    and ``ranking_outcomes`` rows."""
    by_stage: dict[str, list[dict[str, Any]]] = {}
    for m in metric_rows:
        by_stage.setdefault(m["stage_key"], []).append(m)
    rankings = {r["summarize_key"]: r for r in ranking_rows}
    runs = []
    for r in run_rows:
        run = Run(
            experiment_id=r["experiment_id"],
            name=r["name"],
            protocol=protocol_of(r["eval_params_json"]),
            config=config_label(_json(r["train_params_json"]), _json(r["evaluate_summary_json"]).get("d_sae")),
            backbone=backbone_label(_json(r["embed_params_json"])),
            embed_key=r["embed_key"] or "",
            train_key=r["train_key"] or r["evaluate_key"],
            summarize_key=r["summarize_key"],
            ranking=rankings.get(r["summarize_key"]),
        )
        for m in by_stage.get(r["evaluate_key"], []):
            key = (m["name"], m["target"], None if m["n_features"] is None else int(m["n_features"]))
            run.metrics[key] = m["value"]
            run.counts[key] = m["n"]
        runs.append(run)
    return runs


def rank_runs(runs: Sequence[Run], mono_metric: str) -> dict[str, dict[str, float]]:
    """The study's ranking (per embedding): experiment_id -> rank_mono, rank_perf, final_rank
    (pandas ``rank(method="min")``, as the study) for runs having both scores."""
    frame = pd.DataFrame(
        [
            {
                "id": r.experiment_id,
                "embed": r.embed_key,
                "mono": r.metric(mono_metric),
                "perf": r.metric("recovery_mean_n_features"),
            }
            for r in runs
        ]
    )
    if frame.empty:
        return {}
    frame = frame.dropna(subset=["mono", "perf"])
    out: dict[str, dict[str, float]] = {}
    for _, part in frame.groupby("embed", sort=False):
        mono = part["mono"].rank(ascending=False, method="min")
        perf = part["perf"].rank(ascending=True, method="min")
        combined = (mono + perf) / 2
        final = combined.rank(method="min")
        for i, rid in part["id"].items():
            out[rid] = {"rank_mono": int(mono[i]), "rank_perf": int(perf[i]), "final_rank": int(final[i])}
    return out


def run_values(run: Run, ranks: dict[str, float] | None) -> dict[str, Any]:
    """The configuration-table values of one run (None where the run lacks a number)."""
    auc10 = run.metric("recovery_auc_mean", RECOVERY_N)
    dense = run.metric("probe_auc_dense_mean")
    ranking = run.ranking or {}
    return {
        "l0": run.metric("l0_mean"),
        "r2": run.metric("r2_scalar_mean_study"),
        "alive": run.metric("alive_per_batch_study"),
        "m10": run.metric("mono_config_top10"),
        "m50": run.metric("monosemanticity_top50_mean"),
        "dense_auc": dense,
        "sparse_auc": run.metric("probe_auc_sparse_mean"),
        "auc10": auc10,
        "rec10": auc10 / dense if auc10 is not None and dense else None,
        "mean_n": run.metric("recovery_mean_n_features"),
        "n_targets": run.counts.get(("recovery_mean_n_features", None, None)),
        "rank_mono": (ranks or {}).get("rank_mono"),
        "rank_perf": (ranks or {}).get("rank_perf"),
        "final_rank": (ranks or {}).get("final_rank"),
        "fp_sparse": run.metric("fingerprint_quality_sparse", FINGERPRINT_K),
        "fp_dense_fp": run.metric("fingerprint_quality_dense_fp", FINGERPRINT_K),
        "fp_dense": run.metric("fingerprint_quality_dense"),
        "fp_relative": run.metric("fingerprint_relative_sparse", FINGERPRINT_K),
        "top1": ranking.get("top1"),
        "top2": ranking.get("top2"),
    }


@dataclass
class Tables:
    """The two tables: columns as (key, header) and rows as dicts."""

    config_columns: list[tuple[str, str]]
    config_rows: list[dict[str, Any]]
    fingerprint_columns: list[tuple[str, str]]
    fingerprint_rows: list[dict[str, Any]]
    protocols: list[str]


def build_tables(runs: Sequence[Run]) -> Tables:
    """The configuration and fingerprint tables of ``runs`` (see the module docstring).

    Configurations pair by train stage; of several runs of one protocol on a configuration the
    latest (last in ``runs``) is shown. With runs of one protocol only, its columns carry no suffix.
    """
    protocols = [p for p in PROTOCOLS if any(r.protocol == p for r in runs)]
    both = len(protocols) == 2
    chosen: dict[str, dict[str, Run]] = {}
    for r in runs:
        chosen.setdefault(r.train_key, {})[r.protocol] = r
    ranks = {
        p: rank_runs([r for c in chosen.values() for q, r in c.items() if q == p], RANK_MONO[p]) for p in protocols
    }

    def column(p: str, key: str, header: str) -> tuple[str, str]:
        return (f"{key}_medsae", f"{header} (medsae)") if both and p == "medsae" else (key, header)

    config_columns = [("backbone", "backbone"), ("config", "configuration")]
    for p in protocols:
        config_columns.append(column(p, "experiment", "experiment"))
    for key, header in VALUE_COLUMNS:
        for p in protocols:
            config_columns.append(column(p, key, header))
    fingerprint_columns = [("backbone", "backbone"), ("config", "configuration"), ("k", "K")]
    for key, header in FINGERPRINT_COLUMNS:
        for p in protocols:
            fingerprint_columns.append(column(p, key, header))

    config_rows: list[dict[str, Any]] = []
    fingerprint_rows: list[dict[str, Any]] = []
    for pair in chosen.values():
        first = next(iter(pair.values()))
        row: dict[str, Any] = {"backbone": first.backbone, "config": first.config}
        for p, run in pair.items():
            row[column(p, "experiment", "experiment")[0]] = run.name
            for key, value in run_values(run, ranks[p].get(run.experiment_id)).items():
                row[column(p, key, key)[0]] = value
        row["_order"] = (first.backbone, first.embed_key, _rank_key(row), first.config)
        config_rows.append(row)
        fingerprint_rows += _fingerprint_rows(pair, column)
    config_rows.sort(key=lambda r: r.pop("_order"))
    fingerprint_rows.sort(key=lambda r: r.pop("_order"))
    return Tables(config_columns, config_rows, fingerprint_columns, fingerprint_rows, protocols)


def _rank_key(row: dict[str, Any]) -> tuple[float, float]:
    """Rows ordered by the study's final rank, then medsae's; unranked last."""
    study = row.get("final_rank")
    medsae = row.get("final_rank_medsae")
    return (math.inf if study is None else study, math.inf if medsae is None else medsae)


def _fingerprint_rows(pair: dict[str, Run], column: Any) -> list[dict[str, Any]]:
    first = next(iter(pair.values()))
    ks = sorted(
        {n for run in pair.values() for (name, _, n) in run.metrics if name == "fingerprint_quality_sparse" and n}
    )
    out = []
    for position, k in enumerate([*ks, None]):
        row: dict[str, Any] = {"backbone": first.backbone, "config": first.config, "k": "dense" if k is None else k}
        for p, run in pair.items():
            if k is None:  # the study's k = 9999 row: full dense retrieval in both columns
                value = run.metric("fingerprint_quality_dense")
                row[column(p, "sparse", "")[0]] = row[column(p, "dense_fp", "")[0]] = value
            else:
                row[column(p, "sparse", "")[0]] = run.metric("fingerprint_quality_sparse", k)
                row[column(p, "dense_fp", "")[0]] = run.metric("fingerprint_quality_dense_fp", k)
        row["_order"] = (first.backbone, first.embed_key, first.config, position)
        out.append(row)
    return out
