"""Latent cards: which latents, in which order, their top slices, thumbnails and explanations.

The top slices of a latent come from its 'explain' example set (what the explainer saw) when the
summarize stage ran, otherwise from the encode stage's sparse codes. Thumbnails are rendered by
``medsae.data.render.thumbnail``; when that is not possible the card says why instead.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medsae.errors import MedsaeError
from medsae.plots import png_data_url
from medsae.progress import track
from medsae.report.names import EXPLANATION_KIND, HEADLINE_SCORE

log = logging.getLogger("medsae")

#: Columns of the ``latents`` table a card list can be sorted by (descending).
LATENT_SORT_COLUMNS = ("frequency", "n_active", "n_patients", "mean_act", "max_act", "q50", "q90", "q99")
#: Every accepted ``sort_by``; ``score:<method>`` sorts by the best score of that method.
SORT_CHOICES = (*LATENT_SORT_COLUMNS, "latent", "score")


@dataclass
class SliceView:
    """One thumbnail of a card: the slice, its activation and role, caption lines and tooltip."""

    slice_id: int
    activation: float
    role: str
    caption: list[str]
    title: str
    img: str | None = None


@dataclass
class ExplanationView:
    """One explanation version (or baseline) of a latent with its score rows."""

    explanation_id: str
    model: str
    kind: str
    status: str
    template: str
    created_at: str
    text: str | None
    scores: list[dict[str, Any]]

    @property
    def is_baseline(self) -> bool:
        return self.kind != EXPLANATION_KIND


@dataclass
class LatentCard:
    """Everything one latent card shows."""

    latent: int
    stats: dict[str, Any]
    slices: list[SliceView] = field(default_factory=list)
    explanations: list[ExplanationView] = field(default_factory=list)
    slice_source: str = ""
    note: str | None = None
    grounding: Any = None  # medsae.report.grounding.GroundingView when the ground stage scored the latent


def latent_table(latents: pd.DataFrame, codes: tuple[Any, np.ndarray] | None) -> pd.DataFrame:
    """Per-latent statistics: the ``latents`` rows, else frequency/max/mean computed from codes."""
    if not latents.empty:
        return latents
    if codes is None:
        return pd.DataFrame()
    csr, _ = codes
    csc = csr.tocsc()
    n = max(csr.shape[0], 1)
    n_active = np.diff(csc.indptr)
    sums = np.asarray(csc.sum(axis=0)).ravel()
    max_act = np.zeros(csc.shape[1], dtype=np.float64)
    nonempty = n_active > 0
    if csc.nnz:
        max_act[nonempty] = np.maximum.reduceat(csc.data, csc.indptr[:-1][nonempty])
    return pd.DataFrame(
        {
            "latent": np.arange(csc.shape[1]),
            "frequency": n_active / n,
            "n_active": n_active,
            "mean_act": np.divide(sums, n_active, out=np.zeros_like(sums, dtype=float), where=nonempty),
            "max_act": max_act,
            "status": np.where(nonempty, "live", "dead"),
        }
    )


def best_scores(scores: pd.DataFrame, method: str) -> pd.Series:
    """Best value of ``method`` per latent over LLM explanations (baselines excluded)."""
    if scores.empty:
        return pd.Series(dtype=float)
    sel = scores[(scores["method"] == method) & (scores["kind"] == EXPLANATION_KIND)]
    return sel.groupby("latent")["value"].max()


def choose_latents(table: pd.DataFrame, scores: pd.DataFrame, sort_by: str, n_latents: int) -> pd.DataFrame:
    """The ``n_latents`` firing latents with the largest ``sort_by`` (``latent``: ascending id)."""
    if table.empty:
        return table
    table = table.copy()
    fires = table["frequency"].fillna(0) > 0 if "frequency" in table else pd.Series(True, index=table.index)
    table = table[fires]
    if sort_by == "latent":
        return table.sort_values("latent").head(n_latents)
    if sort_by == "score" or sort_by.startswith("score:"):
        method = sort_by.split(":", 1)[1] if ":" in sort_by else HEADLINE_SCORE
        table["_sort"] = table["latent"].map(best_scores(scores, method))
    elif sort_by in LATENT_SORT_COLUMNS:
        if sort_by not in table:
            raise MedsaeError(f"--sort-by {sort_by}: this experiment has no '{sort_by}' column (run summarize)")
        table["_sort"] = table[sort_by]
    else:
        raise MedsaeError(f"--sort-by {sort_by}: unknown; choose one of {', '.join(SORT_CHOICES)} or score:METHOD")
    table = table.sort_values(["_sort", "latent"], ascending=[False, True], na_position="last")
    return table.drop(columns="_sort").head(n_latents)


def top_slices_from_sets(sets: dict[int, dict], latent: int, n: int) -> list[tuple[int, float, str]]:
    """(slice_id, activation, role) of the ``n`` strongest slices of the latent's explain set."""
    row = sets.get(latent)
    if not row or not row["slice_ids"]:
        return []
    ids = np.asarray(row["slice_ids"], dtype=np.int64)
    acts = np.asarray(row["activations"] if row["activations"] is not None else np.zeros(len(ids)), dtype=float)
    roles = list(row["roles"]) if row["roles"] is not None else ["example"] * len(ids)
    order = np.argsort(-acts, kind="stable")[:n]
    return [(int(ids[i]), float(acts[i]), str(roles[i])) for i in order]


def top_slices_from_codes(codes: tuple[Any, np.ndarray], latents: list[int], n: int) -> dict[int, list]:
    """(slice_id, activation, 'top') of the ``n`` strongest slices of each latent, from sparse codes."""
    csr, slice_ids = codes
    csc = csr[:, latents].tocsc()
    out: dict[int, list] = {}
    for j, latent in enumerate(latents):
        start, stop = csc.indptr[j], csc.indptr[j + 1]
        vals, rows = csc.data[start:stop], csc.indices[start:stop]
        order = np.argsort(-vals, kind="stable")[:n]
        out[latent] = [(int(slice_ids[rows[i]]), float(vals[i]), "top") for i in order]
    return out


def load_thumbnails(slices_dir: str | None, slice_ids: list[int], size: int) -> tuple[dict[int, str], str | None]:
    """slice_id -> PNG data URL for every slice that can be rendered, and a note when some cannot."""
    if not slice_ids:
        return {}, None
    if not slices_dir or not Path(slices_dir).is_dir():
        return {}, f"thumbnails unavailable: slices artifact folder {slices_dir or '(none)'} not found"
    try:
        from medsae.data.render import thumbnail
    except ImportError as exc:
        return {}, f"thumbnails unavailable: cannot import medsae.data.render ({exc})"
    urls: dict[int, str] = {}
    failure: str | None = None
    for sid in track(sorted(set(slice_ids)), description="thumbnails", unit="slices"):
        try:
            urls[sid] = png_data_url(thumbnail(Path(slices_dir), sid, size=size))
        except Exception as exc:  # a bad volume must not sink the whole report; the card says why
            failure = failure or f"slice {sid}: {type(exc).__name__}: {exc}"
    if failure:
        log.warning("report: some thumbnails failed (%s)", failure)
        return urls, f"{len(set(slice_ids)) - len(urls)} thumbnail(s) could not be rendered ({failure})"
    return urls, None


def _caption(meta: pd.DataFrame, sid: int) -> tuple[list[str], str]:
    if meta.empty or sid not in meta.index:
        return [f"slice {sid}"], f"slice {sid} (no metadata in the registry)"
    m = meta.loc[sid]

    def val(key: str) -> Any:
        return _none_if_nan(m.get(key))

    line1 = " · ".join(str(x) for x in (val("modality"), val("plane"), val("body_region")) if x)
    pathology = val("pathology") if val("pathology") not in ("none", "no_pathology") else None
    who = " · ".join(str(x) for x in (val("sex"), val("age_bin"), pathology) if x)
    lines = [x for x in (line1, who, val("top_structures")) if x]
    fields = (
        "slice_uid",
        "split",
        "institute",
        "sex",
        "age",
        "study_type",
        "pathology",
        "pathology_location",
        "manufacturer",
        "scanner_model",
        "body_region",
        "position",
        "n_structures",
        "top_structures",
    )
    title = "; ".join(f"{f}={val(f)}" for f in fields if val(f) is not None)
    return lines, title


def _none_if_nan(value: Any) -> Any:
    return None if value is None or (isinstance(value, float) and np.isnan(value)) else value


def explanation_views(expl: pd.DataFrame, scores: pd.DataFrame, latents: list[int]) -> dict[int, list]:
    """latent -> its explanation versions (LLM first, then baselines; by creation) with their scores."""
    if expl.empty or not latents:
        return {}
    expl = expl[expl["latent"].isin(latents)]
    by_id: dict[str, list[dict[str, Any]]] = {}
    if not scores.empty:
        sel = scores[scores["explanation_id"].isin(expl["explanation_id"])]
        sel = sel.sort_values(["explanation_id", "method", "scorer_model"], na_position="last")
        for rec in sel.to_dict("records"):
            by_id.setdefault(rec["explanation_id"], []).append({k: _none_if_nan(v) for k, v in rec.items()})
    views: dict[int, list[ExplanationView]] = {}
    for r in expl.itertuples(index=False):
        views.setdefault(int(r.latent), []).append(
            ExplanationView(
                explanation_id=r.explanation_id,
                model=r.explainer_model,
                kind=r.kind or EXPLANATION_KIND,
                status=r.status or "",
                template=(r.template_hash or "")[:10],
                created_at=str(r.created_at)[:19] if r.created_at is not None else "",
                text=r.text if isinstance(r.text, str) else None,
                scores=by_id.get(r.explanation_id, []),
            )
        )
    return views


def scorer_gap_words(scores: pd.DataFrame) -> dict[str, list[str]]:
    """scorer -> sentences on whether it tells real from shuffled explanations (gap with 95% CI).

    Degenerate scores (method suffixed by ``gather.DEGENERATE_SUFFIX``) count in the gap: a scorer
    whose predictions ignore the explanation is exactly one that cannot tell them apart.
    """
    from medsae.interp.scorers.sanity import scorer_gaps
    from medsae.report.gather import DEGENERATE_SUFFIX

    if scores.empty or "kind" not in scores:
        return {}
    frame = scores.assign(method=scores["method"].astype(str).str.removesuffix(DEGENERATE_SUFFIX))
    out: dict[str, list[str]] = {}
    for gap in scorer_gaps(frame):
        out.setdefault(gap["scorer"], []).append(gap["words"])
    return out


def build_cards(
    chosen: pd.DataFrame,
    sets: dict[int, dict],
    codes: tuple[Any, np.ndarray] | None,
    meta_fn: Callable[[list[int]], pd.DataFrame],
    slices_dir: str | None,
    explanations: pd.DataFrame,
    scores: pd.DataFrame,
    n_slices: int = 8,
    thumb_size: int = 128,
) -> list[LatentCard]:
    """One card per chosen latent, in order. ``meta_fn(slice_ids) -> DataFrame`` gives metadata."""
    if chosen.empty:
        return []
    latents = [int(x) for x in chosen["latent"]]
    picks: dict[int, list] = {}
    source: dict[int, str] = {}
    for latent in latents:
        picks[latent] = top_slices_from_sets(sets, latent, n_slices)
        source[latent] = "explain example set" if picks[latent] else ""
    missing = [lat for lat in latents if not picks[lat]]
    if missing and codes is not None:
        for latent, top in top_slices_from_codes(codes, missing, n_slices).items():
            picks[latent], source[latent] = top, "encode stage codes"
    all_ids = [sid for top in picks.values() for sid, _, _ in top]
    meta = meta_fn(all_ids)
    thumbs, note = load_thumbnails(slices_dir, all_ids, thumb_size)
    views_by_latent = explanation_views(explanations, scores, latents)
    gap_words = scorer_gap_words(scores)
    cards = []
    stat_cols = [
        c for c in ("frequency", "n_active", "n_patients", "mean_act", "max_act", "q99", "status") if c in chosen
    ]
    for row in chosen.to_dict("records"):
        latent = int(row["latent"])
        views = []
        for sid, act, role in picks[latent]:
            caption, title = _caption(meta, sid)
            views.append(SliceView(sid, act, role, caption, title, thumbs.get(sid)))
        card_note = note if views and any(v.img is None for v in views) else None
        if not views:
            card_note = "no top slices: neither an explain example set nor encode codes are available"
        shown = {s["scorer_model"] for v in views_by_latent.get(latent, []) for s in v.scores}
        words = [w for scorer in sorted(shown, key=str) for w in gap_words.get(scorer, [])]
        if words:
            card_note = " ".join([card_note or "", *(w + "." for w in words)]).strip()
        cards.append(
            LatentCard(
                latent=latent,
                stats={c: row[c] for c in stat_cols if _none_if_nan(row[c]) is not None},
                slices=views,
                explanations=views_by_latent.get(latent, []),
                slice_source=source[latent],
                note=card_note,
            )
        )
    return cards
