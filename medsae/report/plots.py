"""The report's figures: matplotlib (Agg canvas, no global backend state) -> PNG data URLs.

Each function takes plain data and returns ``data:image/png;base64,...`` or ``None`` when there is
nothing to draw, so the template can show a note instead of an empty axis.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from medsae.report.names import FVU, L0, R2, RECOVERY_CURVES, preferred_split

_DPI = 100


def _horizontal_kwargs() -> dict[str, object]:
    import matplotlib

    major, minor = (int(x) for x in matplotlib.__version__.split(".")[:2])
    return {"orientation": "horizontal"} if (major, minor) >= (3, 10) else {"vert": False}


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def png_data_url(png: bytes) -> str:
    """Embed PNG bytes as a data URL."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _to_url(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI)
    return png_data_url(buf.getvalue())


def sweep_plot(points: pd.DataFrame) -> str | None:
    """FVU vs L0 and R² vs L0, one dot per experiment of the sweep; the current one ringed."""
    if points.empty or points[L0].isna().all():
        return None
    fig = _figure(9, 3.6)
    axes = fig.subplots(1, 2)
    archs = sorted(points["arch"].fillna("").unique())
    colors = {a: f"C{i % 10}" for i, a in enumerate(archs)}
    for ax, metric, label in (
        (axes[0], FVU, "FVU (lower is better)"),
        (axes[1], R2, "R² (study definition)"),
    ):
        have = points.dropna(subset=[L0, metric])
        for arch in archs:
            sel = have[have["arch"].fillna("") == arch].sort_values(L0)
            if sel.empty:
                continue
            ax.plot(sel[L0], sel[metric], "o-", color=colors[arch], label=arch or "sae", alpha=0.85)
        cur = have[have["current"]]
        if not cur.empty:
            ax.scatter(
                cur[L0],
                cur[metric],
                s=180,
                facecolors="none",
                edgecolors="crimson",
                linewidths=2,
                label="this experiment",
                zorder=5,
            )
        if have.empty:
            ax.text(0.5, 0.5, f"no {metric} rows", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel("L0 (mean active latents per slice)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if len(have) > 1 and (have[L0] > 0).all() and have[L0].max() / have[L0].min() > 20:
            ax.set_xscale("log")
    axes[0].legend(fontsize=8, loc="best")
    fig.suptitle(f"Reconstruction vs sparsity across {len(points)} experiment(s)", fontsize=11)
    return _to_url(fig)


def recovery_plot(metrics: pd.DataFrame) -> str | None:
    """Performance recovery vs the number of latents N, one panel per curve in ``RECOVERY_CURVES``.

    Each task's curve is a thin grey line; the mean over tasks (the evaluate stage's ``*_mean``
    rows, else the mean of the drawn tasks) is the bold line; 1.0 is the dense probe's level.
    """
    curves = metrics[metrics["n_features"].notna()] if not metrics.empty else metrics
    panels = [
        (task, mean)
        for task, mean in RECOVERY_CURVES
        if not curves.empty and curves["name"].isin([task, mean]).any()
    ]
    if not panels:
        return None
    fig = _figure(4.8 * len(panels), 3.6)
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    for ax, (task_name, mean_name) in zip(axes, panels, strict=True):
        sel = curves[curves["name"].isin([task_name, mean_name])]
        split = preferred_split(sel["split"])
        sel = sel[sel["split"] == split] if split is not None else sel
        per_task = sel[(sel["name"] == task_name) & sel["target"].notna()]
        wide = per_task.pivot_table(index="n_features", columns="target", values="value", aggfunc="mean")
        for t in wide.columns:
            ax.plot(wide.index, wide[t], color="0.78", lw=0.8)
        mean = sel[(sel["name"] == mean_name) & sel["target"].isna()].groupby("n_features")["value"].mean()
        label = f"{mean_name}"
        if mean.empty and not wide.empty:
            mean, label = wide.mean(axis=1), f"mean of {wide.shape[1]} tasks"
        if not mean.empty:
            ax.plot(mean.index, mean.values, "o-", color="C0", lw=2, label=label)
        ax.axhline(1.0, color="crimson", lw=1, ls="--", label="dense probe")
        ax.set_xscale("log")
        ax.set_xlabel("number of latents N")
        ax.set_ylabel(task_name)
        ax.set_title(f"{task_name}: {wide.shape[1]} tasks ({split or 'no split'})", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    return _to_url(fig)


def frequency_histogram(frequency: Sequence[float], status: Sequence[str] | None = None) -> str | None:
    """Histogram of log10 firing frequency of the latents; dead latents counted in the title."""
    freq = np.asarray(frequency, dtype=float)
    if freq.size == 0:
        return None
    alive = freq[np.isfinite(freq) & (freq > 0)]
    n_dead = int(freq.size - alive.size)
    fig = _figure(6, 3.4)
    ax = fig.subplots()
    if alive.size:
        lo, hi = np.log10(alive.min()), np.log10(alive.max())
        bins = np.linspace(lo - 0.05, hi + 0.05, 31) if hi > lo else 10
        ax.hist(np.log10(alive), bins=bins, color="C0", alpha=0.85)
    else:
        ax.text(0.5, 0.5, "no latent fires", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("log10 firing frequency (fraction of slices)")
    ax.set_ylabel("latents")
    extra = ""
    if status is not None:
        dense = int(sum(1 for s in status if s == "dense"))
        extra = f", {dense} dense"
    ax.set_title(f"{freq.size} latents: {alive.size} fire, {n_dead} never{extra}", fontsize=10)
    ax.grid(alpha=0.3)
    return _to_url(fig)


def score_distributions(
    groups: Mapping[str, Mapping[str, Sequence[float]]], chance: Mapping[str, float] | None = None
) -> str | None:
    """Box plots of explanation scores, one panel per method, one box per explainer or baseline.

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
    return _to_url(fig)
