"""PNG plots of the evaluation (matplotlib's Agg canvas; no global backend state is touched).

* :func:`plot_reconstruction_vs_l0` - FVU and the study's R² against L0 across a sweep, from
  registry rows (:func:`sweep_rows`);
* :func:`plot_recovery_curves` - recovery (AUC(N) / AUC_dense) and its chance-adjusted version
  against N, one thin line per task and the mean;
* :func:`plot_latent_frequency` - histogram of latent firing frequencies (log scale) with the
  dead and dense counts;
* :func:`plot_probe_aucs` - dense vs sparse probe AUC per target.

Each function writes ``path`` and returns it, or returns ``None`` when there is nothing to draw.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


SWEEP_METRICS = ("l0_mean", "fvu", "r2_scalar_mean_study")


def sweep_rows(registry: Any, experiments: Sequence[str] | None = None, split: str = "val") -> pd.DataFrame:
    """Long-form rows ``experiment, metric, value`` of the reconstruction metrics of every (or the
    named) experiment's evaluate stage, from a :class:`medsae.registry.db.Registry`."""
    sql = """SELECT experiment, metric, value FROM experiment_metrics
             WHERE stage = 'evaluate' AND split = ? AND target IS NULL AND n_features IS NULL
               AND metric IN ('l0_mean', 'fvu', 'r2_scalar_mean_study')"""
    rows = pd.DataFrame(registry.query(sql, [split]), columns=["experiment", "metric", "value"])
    if experiments is not None:
        rows = rows[rows["experiment"].isin(list(experiments))]
    return rows


def plot_reconstruction_vs_l0(rows: pd.DataFrame | Iterable[Mapping[str, Any]], path: Path) -> Path | None:
    """FVU vs L0 and the study's scalar-mean R² vs L0, one point per experiment (labelled).

    ``rows``: long form with columns ``experiment, metric, value`` (as :func:`sweep_rows`).
    """
    df = pd.DataFrame(rows)
    if df.empty:
        return None
    wide = df.pivot_table(index="experiment", columns="metric", values="value", aggfunc="mean")
    if "l0_mean" not in wide or wide["l0_mean"].isna().all():
        return None
    wide = wide.sort_values("l0_mean")
    fig = _figure(9, 3.6)
    axes = fig.subplots(1, 2)
    for ax, metric, label in (
        (axes[0], "fvu", "FVU (per-dimension mean; lower is better)"),
        (axes[1], "r2_scalar_mean_study", "R² (study: scalar mean per 2048-batch)"),
    ):
        if metric not in wide:
            ax.set_visible(False)
            continue
        have = wide.dropna(subset=["l0_mean", metric])
        ax.plot(have["l0_mean"], have[metric], "o-", color="C0")
        for name, row in have.iterrows():
            ax.annotate(
                str(name),
                (row["l0_mean"], row[metric]),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
        ax.set_xlabel("L0 (mean active latents per slice)")
        ax.set_ylabel(label)
        ax.set_xscale("log")
        ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_recovery_curves(curves: Sequence[Any], split: str, path: Path) -> Path | None:
    """Recovery vs N for :class:`medsae.eval.recovery.RecoveryCurve` objects on ``split``."""
    curves = [c for c in curves if split in c.auc]
    if not curves:
        return None
    fig = _figure(9, 3.6)
    axes = fig.subplots(1, 2)
    for ax, getter, label in (
        (axes[0], lambda c: c.ratios(split), "AUC(N) / AUC_dense (study)"),
        (axes[1], lambda c: c.chance_adjusted(split), "(AUC(N) - 0.5) / (AUC_dense - 0.5)"),
    ):
        common = sorted(set.intersection(*(set(c.ns) for c in curves)))  # not the per-task n_nonzero
        table = np.full((len(curves), len(common)), np.nan)
        for i, c in enumerate(curves):
            values = getter(c)
            ax.plot(c.ns, values, color="0.6", lw=0.7, alpha=0.7)
            for n, v in zip(c.ns, values, strict=True):
                if n in common:
                    table[i, common.index(n)] = v
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            mean = np.nanmean(table, axis=0)
        ax.plot(common, mean, "o-", color="C3", lw=2, label=f"mean of {len(curves)} tasks")
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set_xscale("log")
        ax.set_xlabel("N latents (top by sparse-probe |coef|)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"performance recovery ({split})")
    return _save(fig, path)


def plot_latent_frequency(
    frequencies: np.ndarray, path: Path, dense_threshold: float = 0.1, title: str = ""
) -> Path | None:
    """Histogram of log10 firing frequency over the latents that fire; dead / dense counts in the title."""
    f = np.asarray(frequencies, dtype=np.float64)
    if f.size == 0:
        return None
    firing = f[f > 0]
    fig = _figure(6, 3.6)
    ax = fig.subplots()
    if firing.size:
        ax.hist(np.log10(firing), bins=50, color="C0")
    ax.axvline(np.log10(dense_threshold), color="C3", ls="--", lw=1, label=f"dense > {dense_threshold:g}")
    ax.set_xlabel("log10(fraction of slices the latent fires on)")
    ax.set_ylabel("latents")
    ax.set_title(f"{title} dead {int((f == 0).sum())} / {f.size}, dense {int((f > dense_threshold).sum())}".strip())
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_probe_aucs(table: pd.DataFrame, path: Path, title: str = "") -> Path | None:
    """Grouped bars of probe AUC per target; ``table`` columns ``target, dense, sparse``."""
    if table.empty:
        return None
    t = table.sort_values("target")
    fig = _figure(max(6, 0.35 * len(t) + 2), 4)
    ax = fig.subplots()
    x = np.arange(len(t))
    ax.bar(x - 0.2, t["dense"], 0.4, label="dense embedding", color="C0")
    ax.bar(x + 0.2, t["sparse"], 0.4, label="SAE codes", color="C1")
    ax.axhline(0.5, color="k", lw=0.8, ls="--")
    ax.set_xticks(x, t["target"], rotation=70, ha="right", fontsize=7)
    low = np.nanmin(t[["dense", "sparse"]].to_numpy(dtype=float)) if t[["dense", "sparse"]].notna().any().any() else 0.5
    ax.set_ylim(min(0.4, low - 0.05), 1.0)
    ax.set_ylabel("ROC-AUC")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _save(fig, path)
