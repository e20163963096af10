"""Every figure medsae draws, in one place (matplotlib's Agg canvas; no global backend state is touched).

Each figure function takes plain data and returns a matplotlib ``Figure``, or ``None`` when there is
nothing to draw. Three sinks turn a figure into output and pass ``None`` through: :func:`save_png`
(the evaluate stage's ``plots/*.png``, ``medsae eval plot-sweep``), :func:`data_url` (the HTML
report embeds its figures as ``data:image/png`` URLs) and :func:`png_bytes` (the explorer's files).

* :func:`reconstruction_vs_l0` - FVU and the study's R² against L0, one point per experiment;
* :func:`recovery_curves` - performance recovery against the number of latents N, from the
  evaluate stage's metric rows (registry rows or the stage's own ``Metric`` list);
* :func:`latent_frequency` - histogram of log10 firing frequency with the dead and dense counts;
* :func:`probe_aucs` - dense vs sparse probe AUC per target;
* :func:`score_distributions` - explanation scores per explainer against the baselines;
* :func:`training_curves` - training loss and FVU against samples seen (the train stage's ``history.json``).
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from matplotlib.figure import Figure

_DPI = 100

#: Reconstruction metrics plotted against L0 (scalar rows of the evaluate stage; see ``medsae/eval/rows.py``).
FVU = "fvu"
R2 = "r2_scalar_mean_study"
L0 = "l0_mean"

#: Performance-recovery panels: (per-task metric, its mean over tasks, axis label); rows with ``n_features`` = N.
RECOVERY_CURVES: tuple[tuple[str, str, str], ...] = (
    ("recovery", "recovery_mean", "AUC(N) / AUC_dense (study)"),
    ("recovery_chance_adjusted", "recovery_chance_adjusted_mean", "(AUC(N) - 0.5) / (AUC_dense - 0.5)"),
)

#: Columns of a metric row that the recovery figure reads.
_METRIC_COLUMNS = ("name", "split", "target", "n_features", "value")

#: Points of a sweep get their experiment's name written next to them up to this many points.
_MAX_ANNOTATED = 12


def _figure(width: float, height: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: Figure | None, path: Path) -> Path | None:
    """Write ``fig`` as a PNG file (creating its folder) and return the path; None for no figure."""
    if fig is None:
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=_DPI)
    return path


def png_data_url(png: bytes) -> str:
    """Embed PNG bytes as a data URL."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def png_bytes(fig: Figure | None) -> bytes | None:
    """``fig`` as PNG bytes (the explorer stores them as files); None for no figure."""
    if fig is None:
        return None
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI)
    return buf.getvalue()


def data_url(fig: Figure | None) -> str | None:
    """``fig`` as a ``data:image/png;base64,...`` URL; None for no figure."""
    png = png_bytes(fig)
    return None if png is None else png_data_url(png)


def reconstruction_vs_l0(points: pd.DataFrame) -> Figure | None:
    """FVU vs L0 and the study's R² vs L0, one point per experiment.

    ``points``: one row per experiment with columns ``experiment``, ``l0_mean``, ``fvu`` and
    ``r2_scalar_mean_study``; optional ``arch`` (one line per SAE architecture) and ``current``
    (True rings the experiment a report is about). Points are named when there are few of them.
    """
    if points.empty or L0 not in points or points[L0].isna().all():
        return None
    points = points.assign(
        arch=points["arch"].fillna("").astype(str) if "arch" in points else "",
        current=points["current"].astype(bool) if "current" in points else False,
    )
    archs = sorted(points["arch"].unique())
    fig = _figure(9, 3.6)
    axes = fig.subplots(1, 2)
    for ax, metric, label in (
        (axes[0], FVU, "FVU (per-dimension mean; lower is better)"),
        (axes[1], R2, "R² (study: scalar mean per 2,048-slice batch)"),
    ):
        have = points.dropna(subset=[L0, metric]) if metric in points else points.iloc[:0]
        for i, arch in enumerate(archs):
            sel = have[have["arch"] == arch].sort_values(L0)
            if not sel.empty:
                ax.plot(sel[L0], sel[metric], "o-", color=f"C{i % 10}", label=arch or "sae", alpha=0.85)
        current = have[have["current"]]
        if not current.empty:
            ax.scatter(
                current[L0],
                current[metric],
                s=180,
                facecolors="none",
                edgecolors="crimson",
                linewidths=2,
                label="this experiment",
                zorder=5,
            )
        if len(have) <= _MAX_ANNOTATED:
            for _, row in have.iterrows():
                xy = (row[L0], row[metric])
                ax.annotate(str(row["experiment"]), xy, fontsize=7, xytext=(3, 3), textcoords="offset points")
        if have.empty:
            ax.text(0.5, 0.5, f"no {metric} rows", ha="center", va="center", transform=ax.transAxes)
        elif (have[L0] > 0).all() and have[L0].max() / have[L0].min() > 20:
            ax.set_xscale("log")
        ax.set_xlabel("L0 (mean active latents per slice)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="best")
    fig.suptitle(f"Reconstruction vs sparsity across {len(points)} experiment(s)", fontsize=11)
    return fig


def _metric_frame(metrics: pd.DataFrame | Iterable[Any]) -> pd.DataFrame:
    """Metric rows as a frame: a frame as it is, else objects with the ``_METRIC_COLUMNS`` attributes."""
    if isinstance(metrics, pd.DataFrame):
        return metrics
    return pd.DataFrame([{c: getattr(m, c) for c in _METRIC_COLUMNS} for m in metrics], columns=_METRIC_COLUMNS)


def recovery_curves(metrics: pd.DataFrame | Iterable[Any], splits: Sequence[str]) -> Figure | None:
    """Performance recovery vs the number of latents N, one panel per entry of :data:`RECOVERY_CURVES`.

    ``metrics``: metric rows (columns or attributes ``name, split, target, n_features, value``).
    Each panel draws the first of ``splits`` that has its rows. Each task's curve is a thin grey
    line; the evaluate stage's ``*_mean`` rows (tasks whose dense probe is good enough), else the
    mean of the drawn tasks, are the bold line; 1.0 is the dense probe's level.
    """
    rows = _metric_frame(metrics)
    curves = rows[rows["n_features"].notna()] if not rows.empty else rows
    panels = []
    for task_name, mean_name, label in RECOVERY_CURVES:
        sel = curves[curves["name"].isin([task_name, mean_name])] if not curves.empty else curves
        split = next((s for s in splits if (sel["split"] == s).any()), None) if not sel.empty else None
        if split is not None:
            panels.append((task_name, mean_name, label, split, sel[sel["split"] == split]))
    if not panels:
        return None
    fig = _figure(4.5 * len(panels), 3.6)
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    for ax, (task_name, mean_name, label, split, sel) in zip(axes, panels, strict=True):
        per_task = sel[(sel["name"] == task_name) & sel["target"].notna()]
        wide = per_task.pivot_table(index="n_features", columns="target", values="value", aggfunc="mean")
        for task in wide.columns:
            ax.plot(wide.index, wide[task], color="0.7", lw=0.8)
        mean = sel[(sel["name"] == mean_name) & sel["target"].isna()].groupby("n_features")["value"].mean()
        mean_label = mean_name
        if mean.empty and not wide.empty:
            mean, mean_label = wide.mean(axis=1), f"mean of {wide.shape[1]} tasks"
        if not mean.empty:
            ax.plot(mean.index, mean.values, "o-", color="C0", lw=2, label=mean_label)
        ax.axhline(1.0, color="crimson", lw=1, ls="--", label="dense probe")
        ax.set_xscale("log")
        ax.set_xlabel("N latents (top by sparse-probe |coef|)")
        ax.set_ylabel(label)
        ax.set_title(f"{task_name}: {wide.shape[1]} tasks ({split})", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    return fig


def frequency_bins(alive: np.ndarray) -> np.ndarray:
    """Bin edges in log10 frequency for the histogram of :func:`latent_frequency` (``alive``: frequencies > 0).

    30 equal bins from just below the rarest to just above the most frequent latent; all equal: 10 bins
    around that value. Public so a page can print the counts the figure draws.
    """
    logs = np.log10(np.asarray(alive, dtype=np.float64))
    lo, hi = float(logs.min()), float(logs.max())
    return np.linspace(lo - 0.05, hi + 0.05, 31) if hi > lo else np.histogram_bin_edges(logs, bins=10)


def latent_frequency(
    frequency: Sequence[float] | np.ndarray,
    dense_threshold: float | None = None,
    n_dense: int | None = None,
    title: str = "",
) -> Figure | None:
    """Histogram of log10 firing frequency over the latents that fire; dead and dense counts in the title.

    ``n_dense`` is the number of dense latents when the caller has its own definition (the report
    reads the summarize stage's status); otherwise latents firing more often than ``dense_threshold``
    are counted, and the threshold is drawn.
    """
    freq = np.asarray(frequency, dtype=np.float64)
    if freq.size == 0:
        return None
    alive = freq[np.isfinite(freq) & (freq > 0)]
    if n_dense is None and dense_threshold is not None:
        n_dense = int((freq > dense_threshold).sum())
    fig = _figure(6, 3.6)
    ax = fig.subplots()
    if alive.size:
        ax.hist(np.log10(alive), bins=frequency_bins(alive), color="C0", alpha=0.85)
    else:
        ax.text(0.5, 0.5, "no latent fires", ha="center", va="center", transform=ax.transAxes)
    if dense_threshold is not None:
        ax.axvline(np.log10(dense_threshold), color="C3", ls="--", lw=1, label=f"dense > {dense_threshold:g}")
        ax.legend(fontsize=8)
    ax.set_xlabel("log10 firing frequency (fraction of slices)")
    ax.set_ylabel("latents")
    dense = f", {n_dense} dense" if n_dense is not None else ""
    heading = f"{freq.size} latents: {alive.size} fire, {freq.size - alive.size} never{dense}"
    ax.set_title(f"{title} {heading}".strip(), fontsize=10)
    ax.grid(alpha=0.3)
    return fig


def probe_aucs(table: pd.DataFrame, title: str = "") -> Figure | None:
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
    values = t[["dense", "sparse"]].to_numpy(dtype=float)
    low = np.nanmin(values) if np.isfinite(values).any() else 0.5
    ax.set_ylim(min(0.4, low - 0.05), 1.0)
    ax.set_ylabel("ROC-AUC")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return fig


def _horizontal_kwargs() -> dict[str, object]:
    import matplotlib

    major, minor = (int(x) for x in matplotlib.__version__.split(".")[:2])
    return {"orientation": "horizontal"} if (major, minor) >= (3, 10) else {"vert": False}


def score_distributions(
    groups: Mapping[str, Mapping[str, Sequence[float]]], chance: Mapping[str, float] | None = None
) -> Figure | None:
    """Box plots of explanation scores, one panel per method (the first three), one box per explainer or baseline.

    ``groups`` maps method -> {group label -> values}; labels that start with ``baseline:`` are
    drawn in grey so an LLM's distribution is read against them. ``chance`` (method -> level)
    draws the chance level as a dashed line.
    """
    methods = [m for m, g in groups.items() if any(len(v) for v in g.values())][:3]
    if not methods:
        return None
    fig = _figure(4.8 * len(methods), 3.8)
    axes = np.atleast_1d(fig.subplots(1, len(methods)))
    rng = np.random.default_rng(0)
    for ax, method in zip(axes, methods, strict=True):
        labels = [lab for lab, v in groups[method].items() if len(v)]
        data = [np.asarray(groups[method][lab], dtype=float) for lab in labels]
        box = ax.boxplot(data, patch_artist=True, widths=0.55, showfliers=False, **_horizontal_kwargs())
        for patch, lab in zip(box["boxes"], labels, strict=True):
            patch.set_facecolor("0.85" if lab.startswith("baseline:") else "#9ecae1")
        for i, values in enumerate(data, 1):
            ax.scatter(values, i + rng.uniform(-0.15, 0.15, values.size), s=8, color="k", alpha=0.5, zorder=3)
        ax.set_yticks(
            range(1, len(labels) + 1),
            [f"{lab} (n={len(d)})" for lab, d in zip(labels, data, strict=True)],
            fontsize=8,
        )
        ax.set_xlabel(method)
        level = (chance or {}).get(method)
        if level is not None and np.isfinite(level):
            ax.axvline(level, color="crimson", lw=1, ls="--", label="chance")
            ax.legend(fontsize=7, loc="lower right")
        ax.grid(alpha=0.3, axis="x")
    fig.suptitle("Explanation scores per explainer vs baselines", fontsize=11)
    return fig


def training_curves(rows: Sequence[Mapping[str, Any]], title: str = "") -> Figure | None:
    """Training loss and FVU against samples seen, one panel each; epoch starts as faint vertical lines.

    ``rows``: the train stage's ``history.json`` rows (keys ``epoch, step, samples, loss, fvu``), in
    training order. Rows without a finite value are left out of that panel.
    """
    frame = pd.DataFrame(list(rows), columns=["epoch", "step", "samples", "loss", "fvu"])
    frame = frame.apply(pd.to_numeric, errors="coerce").dropna(subset=["samples"]).sort_values("samples")
    panels = [
        (c, label) for c, label in (("loss", "training loss"), ("fvu", "FVU (train batches)")) if frame[c].notna().any()
    ]
    if not panels:
        return None
    fig = _figure(4.5 * len(panels), 3.4)
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    starts = frame.groupby("epoch")["samples"].min().iloc[1:] if frame["epoch"].notna().any() else []
    for ax, (column, label) in zip(axes, panels, strict=True):
        sel = frame.dropna(subset=[column])
        ax.plot(sel["samples"], sel[column], "-", color="C0", lw=1.2, marker="o" if len(sel) < 30 else None, ms=3)
        for x in starts:
            ax.axvline(x, color="0.85", lw=0.8, zorder=0)
        values = sel[column].to_numpy(dtype=float)
        if (values > 0).all() and values.max() / values.min() > 20:
            ax.set_yscale("log")
        ax.set_xlabel("samples seen")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    n_epochs = frame["epoch"].nunique()
    fig.suptitle(f"{title} training: {len(frame)} points over {n_epochs} epoch(s)".strip(), fontsize=11)
    return fig
