"""What the explorer's index page shows above the latent table: quality metrics, plots and timings.

* :func:`gather_index` reads what the page needs out of the registry (inside the build's read block);
* :func:`index_vars` turns it into the template's variables, storing every plot as a PNG file.

Quality metrics come first, each with its split and a better/worse hint. The dead-latent figures
are one row per set of slices they were counted on (the train stage's train split, the evaluation's
val and test splits, the summarize stage's explanation pool), next to the study's alive count.
When the evaluate stage ran the study's protocol (``eval.protocol: study``) on one of the study's
three selected configurations, the study's published figures (:data:`STUDY_HEADLINE`,
docs/method.md#headline-numbers) stand beside medsae's. Timings are a separate, folded table.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pandas as pd

from medsae.report import gather
from medsae.report.names import (
    DEAD_ALIVE_DEFINITIONS,
    FVU,
    L0,
    METRIC_DEFINITIONS,
    PREFERRED_SPLITS,
    R2,
)
from medsae.report.site.rows import headline_metrics
from medsae.stages import STAGES

#: The train stage's per-epoch record (written by ``medsae.sae``): {"version": 1, "rows": [...]}.
HISTORY_FILE = "history.json"
HISTORY_VERSION = 1
NO_HISTORY = (
    "no training curve recorded for this SAE (trained before medsae recorded history); "
    "rerun train with --force to get one"
)

#: The study's headline figures of its three selected configurations (docs/method.md#headline-numbers,
#: validation split), keyed by (backbone, configuration) as :func:`study_configuration` names them and
#: by the metric column of the quality table. ``recovery_10`` is the study's derived mean AUC with 10
#: latents over its mean dense AUC.
STUDY_HEADLINE: dict[tuple[str, str], dict[str, float]] = {
    ("DINOv3", "D_128_512_2048_8192_K_5_10_20_40"): {
        "r2_study": 0.7155,
        "l0": 41.19,
        "alive_per_batch": 2450,
        "mono_config": 0.8844,
        "probe_auc_dense": 0.912,
        "probe_auc_sparse": 0.848,
        "recovery_10": 0.824,
    },
    ("BiomedParse", "D_128_512_2048_8192_K_20_40_80_160"): {
        "r2_study": 0.9314,
        "l0": 131.68,
        "alive_per_batch": 2273,
        "mono_config": 0.7116,
        "probe_auc_dense": 0.930,
        "probe_auc_sparse": 0.840,
        "recovery_10": 0.856,
    },
    ("random BiomedParse", "D_64_256_1024_4096_K_30_60_120_240"): {
        "r2_study": 0.9114,
        "l0": 236.03,
        "alive_per_batch": 856,
        "mono_config": 0.2748,
        "probe_auc_dense": 0.735,
        "probe_auc_sparse": 0.664,
        "recovery_10": 0.869,
    },
}
STUDY_SOURCE = "docs/method.md#headline-numbers"

#: The dead / alive rows of the quality table: (metric name, stage kind, split or None for any, label).
#: A split of None takes every split the stage wrote (the summarize stage names its pool, e.g. test+val).
DEAD_ROWS: tuple[tuple[str, str, str | None, str], ...] = (
    ("dead_fraction", "train", "train", "dead: never fire on the train split (train stage)"),
    ("dead_fraction", "evaluate", "val", "dead: never fire on the val split (evaluate)"),
    ("dead_fraction", "evaluate", "test", "dead: never fire on the test split (evaluate)"),
    ("latents_dead", "summarize", None, "dead: never fire on the explanation pool (summarize)"),
    ("alive_per_batch_study", "evaluate", "val", "alive per 2,048-slice batch (the study's count)"),
)
#: Quality-table groups: (title, key-metric columns); the dead / alive group is built from DEAD_ROWS.
GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Reconstruction", ("fvu", "r2_study", "l0")),
    ("Dead and alive latents", ()),
    ("Probes, recovery, monosemanticity, retrieval", (
        "probe_auc_dense", "probe_auc_sparse", "recovery_10", "mono_config", "retrieval_precision",
    )),
    ("Explanations", ("explanation_score",)),
)  # fmt: skip


@dataclass
class IndexData:
    """What :func:`gather_index` read: the experiment's metric rows, its sweep neighbours, its training history."""

    metrics: pd.DataFrame
    sweep: pd.DataFrame
    stages: list[dict[str, Any]]
    history: list[dict[str, Any]] | None = None
    history_note: str | None = None
    study: dict[str, Any] = field(default_factory=dict)


def read_history(train_dir: str | None) -> tuple[list[dict[str, Any]] | None, str | None]:
    """The train stage's ``history.json`` rows, or None and why not (missing: :data:`NO_HISTORY`)."""
    if not train_dir:
        return None, "no train stage folder recorded for this experiment"
    path = Path(train_dir) / HISTORY_FILE
    if not path.is_file():
        return None, NO_HISTORY
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return None, f"{path}: unreadable training history ({exc})"
    rows = data.get("rows") if isinstance(data, dict) else None
    if not isinstance(data, dict) or data.get("version") != HISTORY_VERSION or not isinstance(rows, list):
        return None, f"{path}: not a version-{HISTORY_VERSION} training history"
    if not rows:
        return None, f"{path}: the training history has no rows"
    if not all(isinstance(r, dict) and isinstance(r.get("samples"), int | float) for r in rows):
        return None, f"{path}: every training-history row needs a number of samples"
    return rows, None


def study_backbone(embed_params: dict[str, Any]) -> str | None:
    """The study's name for the embedding backbone (DINOv3, BiomedParse, random BiomedParse), else None."""
    source = str(embed_params.get("source") or "").lower()
    model = str(embed_params.get("model") or "").lower()
    if source == "biomedparse" or "biomedparse" in model:
        return "BiomedParse" if embed_params.get("pretrained", True) else "random BiomedParse"
    if "dinov3" in model and embed_params.get("pretrained", True):
        return "DINOv3"
    return None


def study_configuration(stages: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Whether the evaluate stage ran the study's protocol, and if so on which configuration.

    Keys: ``ran`` (bool); with ``ran``: ``backbone``, ``config``, ``figures`` (the study's headline
    figures when the configuration is one of its three selected ones, else None) and ``note``.
    """
    from medsae.eval.study_table import config_label, protocol_of

    evaluate = stages.get("evaluate") or {}
    if evaluate.get("status") != "done" or protocol_of(evaluate.get("params_json")) != "study":
        return {"ran": False}
    backbone = study_backbone(gather._loads((stages.get("embed") or {}).get("params_json")))
    config = config_label(gather._loads((stages.get("train") or {}).get("params_json")))
    figures = STUDY_HEADLINE.get((backbone, config)) if backbone else None
    if figures:
        note = f"the study's figures for {backbone} {config}, its selected configuration ({STUDY_SOURCE})"
    else:
        chosen = "; ".join(f"{b} {c}" for b, c in STUDY_HEADLINE)
        note = (
            f"evaluated under the study's protocol, but {backbone or 'this backbone'} {config} is not one of "
            f"the study's selected configurations ({chosen}), whose headline figures are all it published "
            "in one place; `medsae study-table` lays out the grid"
        )
    return {"ran": True, "backbone": backbone, "config": config, "figures": figures, "note": note}


def gather_index(con: duckdb.DuckDBPyConnection, exp: Any) -> IndexData:
    """Everything the index page reads from the registry and the train folder (``exp``: a gather.ExperimentRecord)."""
    metrics = gather.experiment_metrics(con, exp)
    history, note = read_history(exp.artifact_dir("train"))
    return IndexData(
        metrics=metrics,
        sweep=gather.sweep_points(con, exp, shared_embeddings=True),
        stages=[exp.stages[k] for k in STAGES if k in exp.stages],
        history=history,
        history_note=note,
        study=study_configuration(exp.stages),
    )


def _scalar(metrics: pd.DataFrame, name: str, stage: str, split: str | None) -> list[tuple[str, float]]:
    """(split, mean value) of the scalar rows ``name`` of ``stage`` (every split when ``split`` is None)."""
    if metrics.empty:
        return []
    sel = metrics[
        (metrics["name"] == name)
        & (metrics["stage"] == stage)
        & metrics["target"].isna()
        & metrics["n_features"].isna()
        & metrics["value"].notna()
    ]
    if split is not None:
        sel = sel[sel["split"] == split]
    return [(str(s), float(v)) for s, v in sel.groupby("split", sort=True)["value"].mean().items()]


def dead_alive_rows(metrics: pd.DataFrame) -> list[dict[str, Any]]:
    """One labelled row per dead / alive figure the experiment recorded (:data:`DEAD_ROWS` order)."""
    out = []
    for name, stage, split, label in DEAD_ROWS:
        column = "alive_per_batch" if name == "alive_per_batch_study" else "dead_fraction"
        for found_split, value in _scalar(metrics, name, stage, split):
            out.append(
                {
                    "column": column,
                    "label": label,
                    "split": found_split,
                    "value": value,
                    "hint": "higher is better" if column == "alive_per_batch" else "lower is better",
                    "definition": DEAD_ALIVE_DEFINITIONS.get(name, ""),
                }
            )
    return out


def quality_groups(
    compare_row: dict[str, Any], labels: dict[str, str], metrics: pd.DataFrame, study: dict[str, Any]
) -> list[dict[str, Any]]:
    """The quality table: groups of rows (label, split, value, hint, definition, study figure), no empty group."""
    key = {m["column"]: m for m in headline_metrics(compare_row, labels)}
    figures = study.get("figures") or {}
    definitions = {"fvu": METRIC_DEFINITIONS[FVU], "r2_study": METRIC_DEFINITIONS[R2], "l0": METRIC_DEFINITIONS[L0]}
    groups = []
    for title, columns in GROUPS:
        rows = [dict(key[c]) for c in columns if c in key] if columns else dead_alive_rows(metrics)
        for row in rows:
            row.setdefault("definition", definitions.get(row["column"], ""))
            row["study"] = figures.get(row["column"]) if row["split"] in ("val", "") else None
        if rows:
            groups.append({"title": title, "rows": rows})
    return groups


def is_timing(name: str) -> bool:
    """Whether a metric row is a timing or a throughput (``seconds_*``, ``*_seconds``, ``*_per_s``), not quality."""
    return name.startswith("seconds") or name.endswith(("_seconds", "_per_s"))


def timing_rows(stages: list[dict[str, Any]], metrics: pd.DataFrame) -> list[dict[str, Any]]:
    """Wall time per stage (the ``stages`` table), then its timing metric rows (:func:`is_timing`), in stage order.

    Keys: stage, part, value, unit (``s``, or ``per s`` for a throughput).
    """
    parts = metrics[metrics["name"].map(is_timing)] if not metrics.empty else metrics
    out = []
    for s in stages:
        if s.get("seconds") is not None and not (isinstance(s["seconds"], float) and math.isnan(s["seconds"])):
            out.append({"stage": s["kind"], "part": "stage total", "value": float(s["seconds"]), "unit": "s"})
        if not parts.empty:
            sel = parts[(parts["stage"] == s["kind"]) & parts["value"].notna()]
            for name, value in sel.groupby("name", sort=True)["value"].mean().items():
                part = str(name).removeprefix("seconds_").removesuffix("_seconds").removesuffix("_per_s")
                unit = "per s" if str(name).endswith("_per_s") else "s"
                out.append({"stage": s["kind"], "part": part, "value": float(value), "unit": unit})
    return out


def frequency_table(frequency: pd.Series, status: pd.Series | None) -> dict[str, Any] | None:
    """Counts the frequency histogram draws: latents, firing, never firing, dense, and per log10 bin."""
    from medsae.plots import frequency_bins

    freq = pd.to_numeric(frequency, errors="coerce").to_numpy(dtype=float)
    if freq.size == 0:
        return None
    alive = freq[np.isfinite(freq) & (freq > 0)]
    bins: list[dict[str, Any]] = []
    if alive.size:
        counts, edges = np.histogram(np.log10(alive), bins=frequency_bins(alive))
        bins = [{"lo": float(edges[i]), "hi": float(edges[i + 1]), "count": int(c)} for i, c in enumerate(counts) if c]
    return {
        "n": int(freq.size),
        "firing": int(alive.size),
        "never": int(freq.size - alive.size),
        "dense": int((status == "dense").sum()) if status is not None else None,
        "bins": bins,
    }


def _plot(store: Any, plot_id: str, title: str, fig: Any, missing: str, **extra: Any) -> dict[str, Any]:
    from medsae.plots import png_bytes

    png = png_bytes(fig)
    img = store.put(png) if png else None
    return {"id": plot_id, "title": title, "img": img, "missing": missing, "counts": None, "points": []} | extra


def plots_of(
    data: IndexData, latents: pd.DataFrame, scores: pd.DataFrame, store: Any, name: str
) -> list[dict[str, Any]]:
    """The index page's figures, each a PNG file in ``store`` (or None and a line saying why)."""
    from medsae import plots
    from medsae.report.build import chance_levels, score_groups

    sweep = data.sweep.dropna(subset=[L0]) if not data.sweep.empty else data.sweep
    sweep = sweep[sweep[[FVU, R2]].notna().any(axis=1)] if not sweep.empty else sweep
    if len(sweep) >= 2:
        sweep_fig, sweep_missing = plots.reconstruction_vs_l0(sweep), ""
    else:
        sweep_fig = None
        sweep_missing = (
            "no FVU / R² / L0 metrics recorded yet"
            if sweep.empty
            else "only this experiment has FVU / R² / L0 rows among the experiments of its sweep or sharing its "
            "embeddings; one point says nothing about the trade-off: run a sweep (a `sweep:` grid in the spec)"
        )
    counts = frequency_table(latents["frequency"], latents.get("status")) if "frequency" in latents else None
    freq_fig = None
    if counts:
        freq_fig = plots.latent_frequency(latents["frequency"], n_dense=counts["dense"])
    return [
        _plot(
            store, "sweep", "FVU and R² vs L0 across the sweep", sweep_fig, sweep_missing,
            points=sweep.to_dict("records") if len(sweep) >= 2 else [],
        ),
        _plot(
            store, "recovery", "Performance recovery vs number of latents",
            plots.recovery_curves(data.metrics, PREFERRED_SPLITS) if not data.metrics.empty else None,
            "no performance-recovery rows recorded yet (run evaluate)",
        ),
        _plot(
            store, "frequency", "Latent firing frequency", freq_fig,
            "no latent statistics yet (run summarize)", counts=counts,
        ),
        _plot(
            store, "scores", "Explanation scores per explainer vs baselines",
            plots.score_distributions(score_groups(scores), chance_levels(scores)),
            "no explanation scores yet (run interpret)",
        ),
        _plot(
            store, "training", "Training curves",
            plots.training_curves(data.history, title=name) if data.history else None,
            data.history_note or "the training history has nothing to draw",
        ),
    ]  # fmt: skip


def index_vars(
    data: IndexData,
    compare_row: dict[str, Any],
    labels: dict[str, str],
    latents: pd.DataFrame,
    scores: pd.DataFrame,
    store: Any,
    name: str,
) -> dict[str, Any]:
    """The index template's variables above the latent table: ``quality``, ``study``, ``plots``, ``timings``."""
    return {
        "quality": quality_groups(compare_row, labels, data.metrics, data.study),
        "study": data.study,
        "plots": plots_of(data, latents, scores, store, name),
        "timings": timing_rows(data.stages, data.metrics),
    }
