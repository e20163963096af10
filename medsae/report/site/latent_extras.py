"""Per-latent panels of the explorer computed over the whole SAE: neighbours and probe weights.

* :func:`decoder_neighbours` - the latents whose decoder directions are closest (cosine of the
  decoder rows of the trained SAE), by chunked matrix products: ``d_sae x d_sae`` is never held.
* :func:`coactivation_neighbours` - the latents that fire on the same slices (Jaccard index of
  their firing sets over every encoded slice), by chunked sparse products of the firing matrix.
* :func:`probe_weights_by_latent` - the targets whose sparse-code probe gives the latent a non-zero
  weight (``probe_weights.parquet`` of the evaluate stage, :mod:`medsae.eval.probe_weights`), with
  the probe's AUC from the registry's metrics rows (:func:`probe_aucs`).

:meth:`LatentExtras.gather` collects all three for one experiment, each with a one-line note instead
when its input is missing, and :meth:`LatentExtras.page` gives one latent page's share.
Ties are broken by the lower latent id, so the lists are reproducible.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from medsae.errors import MedsaeError
from medsae.eval.metrics import FIRE_EPS  # == medsae.sae.models.FIRE_EPS, without importing torch
from medsae.report.names import preferred_split

log = logging.getLogger("medsae")

#: Neighbours listed per latent.
N_NEIGHBOURS = 8
#: Rows of the similarity matrix computed at once (a 1024 x 8192 float64 block is 64 MiB).
CHUNK = 1024

COACTIVATION_MEASURE = (
    "Jaccard index of the slices where each fires: both fire / either fires, over every encoded slice"
)
DECODER_MEASURE = "cosine of the two latents' decoder directions (rows of W_dec of the trained SAE)"


@dataclass
class Neighbours:
    """Top neighbours of every latent, strongest first: ``index[i, r]`` (-1 = none) with ``value[i, r]``."""

    index: np.ndarray  # [d, k] int64
    value: np.ndarray  # [d, k] float64
    extra: dict[str, np.ndarray] = field(default_factory=dict)  # other [d, k] columns (co-activation counts)


def top_k(scores: np.ndarray, k: int, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Columns of the ``k`` largest values of each row of ``scores``, largest first, ties to the lower column.

    ``offset``: the row's own latent is ``offset + row`` and is left out. Vectorised (no Python loop
    over rows): a partition finds each row's k-th value, then the ties at it are cut by column.
    """
    scores = np.array(scores, dtype=np.float64)
    rows, d = scores.shape
    if rows:
        scores[np.arange(rows), offset + np.arange(rows)] = -np.inf
    k = min(k, d - 1)
    if k <= 0 or rows == 0:
        return np.zeros((rows, 0), np.int64), np.zeros((rows, 0))
    kth = -np.partition(-scores, k - 1, axis=1)[:, k - 1]
    greater = scores > kth[:, None]
    equal = scores == kth[:, None]
    need = k - greater.sum(axis=1)
    take = greater | (equal & (np.cumsum(equal, axis=1) <= need[:, None]))
    cols = np.nonzero(take)[1].reshape(rows, k)
    vals = np.take_along_axis(scores, cols, axis=1)
    order = np.lexsort((cols, -vals), axis=-1)
    return np.take_along_axis(cols, order, axis=1), np.take_along_axis(vals, order, axis=1)


def decoder_neighbours(decoder: np.ndarray, k: int = N_NEIGHBOURS, chunk: int = CHUNK) -> Neighbours:
    """Each latent's ``k`` latents of highest decoder cosine. ``decoder [d_sae, d_in]``: one row per latent."""
    w = np.asarray(decoder, dtype=np.float32)
    norms = np.linalg.norm(w, axis=1, keepdims=True)
    unit = np.divide(w, norms, out=np.zeros_like(w), where=norms > 0)
    parts = [top_k(unit[s : s + chunk] @ unit.T, k, offset=s) for s in range(0, len(unit), chunk)]
    return _stack(parts, k)


def coactivation_neighbours(codes: sp.spmatrix, k: int = N_NEIGHBOURS, chunk: int = CHUNK) -> Neighbours:
    """Each latent's ``k`` latents of highest Jaccard index of firing sets; ``codes [n_slices, d_sae]``.

    ``extra``: ``both`` (slices where both fire), ``p_given`` (P(neighbour fires | latent fires)) and
    ``fires`` ([d] slices where each latent fires). Latents that never fire together are left out (-1).
    """
    fires = sp.csc_matrix(codes, dtype=np.float32, copy=True)
    fires.data = (fires.data > FIRE_EPS).astype(np.float32)
    fires.eliminate_zeros()
    count = np.diff(fires.indptr).astype(np.float64)  # slices where each latent fires
    by_latent = fires.T.tocsr()  # [d, n]
    by_slice = fires.tocsr()  # [n, d]
    parts, both_parts = [], []
    for s in range(0, fires.shape[1], chunk):
        both = (by_latent[s : s + chunk] @ by_slice).toarray().astype(np.float64)  # [c, d] co-firing counts
        union = count[s : s + chunk, None] + count[None, :] - both
        jaccard = np.divide(both, union, out=np.zeros_like(both), where=union > 0)
        cols, vals = top_k(jaccard, k, offset=s)
        parts.append((cols, vals))
        both_parts.append(np.take_along_axis(both, cols, axis=1))
    out = _stack(parts, k)
    n_both = np.concatenate(both_parts) if both_parts else np.zeros_like(out.value)
    none = n_both <= 0
    out.index[none], out.value[none] = -1, 0.0
    out.extra = {
        "both": np.where(none, 0, n_both).astype(np.int64),
        "p_given": np.divide(n_both, count[:, None], out=np.zeros_like(n_both), where=~none),
        "fires": count.astype(np.int64),
    }
    return out


def _stack(parts: list[tuple[np.ndarray, np.ndarray]], k: int) -> Neighbours:
    if not parts:
        return Neighbours(np.zeros((0, k), np.int64), np.zeros((0, k)))
    return Neighbours(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))


def decoder_rows(train_dir: str | Path) -> np.ndarray:
    """The decoder directions [d_sae, d_in] (float32) of the SAE in ``train_dir``, read by medsae's checkpoint code."""
    from medsae.sae.checkpoint import load_sae

    return load_sae(train_dir).decoder_weight.detach().float().cpu().numpy()


def probe_aucs(metrics: pd.DataFrame | None) -> tuple[dict[str, float], str | None]:
    """target -> sparse-probe AUC of the evaluate stage on one split (:func:`preferred_split`), and that split.

    ``metrics``: the experiment's registry rows (:func:`medsae.report.gather.experiment_metrics`).
    """
    if metrics is None or metrics.empty:
        return {}, None
    rows = metrics[(metrics["stage"] == "evaluate") & (metrics["name"] == "probe_auc_sparse")]
    rows = rows[rows["target"].notna() & (rows["target"] != "")]
    split = preferred_split(rows["split"])
    rows = rows[rows["split"] == split]
    return {str(t): float(v) for t, v in zip(rows["target"], rows["value"], strict=True)}, split


def probe_weights_by_latent(table: pd.DataFrame, aucs: dict[str, float]) -> dict[int, list[dict[str, Any]]]:
    """latent -> its non-zero probe weights, largest ``|weight|`` first, each with its rank in its probe column."""
    if table.empty:
        return {}
    t = table.copy()
    t["magnitude"] = t["weight"].abs()
    column = t.groupby(["target", "column"], sort=False)["magnitude"]
    t["rank"] = column.rank(ascending=False, method="min").astype(np.int64)
    t["n_nonzero"] = column.transform("size").astype(np.int64)
    t = t.sort_values(["latent", "magnitude", "target", "column"], ascending=[True, False, True, True])
    out: dict[int, list[dict[str, Any]]] = {}
    for rec in t.to_dict("records"):
        w = float(rec["weight"])
        binary = bool(rec["negative"])
        if binary:
            towards = rec["positive"] if w > 0 else rec["negative"]
        else:
            towards = f"for {rec['positive']}" if w > 0 else f"against {rec['positive']}"
        target, positive = str(rec["target"]), str(rec["positive"])
        keys = (target, f"{target}={positive}") if binary else (f"{target}={positive}", target)
        auc = next((aucs[k] for k in keys if aucs.get(k) is not None), None)  # a class's own AUC when scored
        out.setdefault(int(rec["latent"]), []).append(
            {
                "target": target.replace("=", ": "),
                "towards": towards,
                "weight": w,
                "rank": int(rec["rank"]),
                "n_nonzero": int(rec["n_nonzero"]),
                "auc": None if auc is None or not np.isfinite(auc) else float(auc),
            }
        )
    return out


@dataclass
class LatentExtras:
    """Neighbours and probe weights of every latent of one experiment, or why each is missing."""

    decoder: Neighbours | None = None
    coactivation: Neighbours | None = None
    probes: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    probe_split: str | None = None
    notes: dict[str, str] = field(default_factory=dict)  # panel -> why it is empty
    texts: dict[int, str] = field(default_factory=dict)  # latent -> headline explanation
    pages: set[int] = field(default_factory=set)  # latents with a page

    @classmethod
    def gather(
        cls,
        train_dir: str | None,
        codes: sp.spmatrix | None,
        evaluate_dir: str | None,
        texts: dict[int, str],
        pages: set[int],
        metrics: pd.DataFrame | None = None,
        k: int = N_NEIGHBOURS,
    ) -> LatentExtras:
        """Compute every panel; a missing or unreadable input becomes a note for that panel only.

        ``metrics``: the experiment's registry metrics rows, where the probes' AUCs are read.
        """
        out = cls(texts=texts, pages=pages)
        if train_dir and Path(train_dir).is_dir():
            try:
                out.decoder = decoder_neighbours(decoder_rows(train_dir), k)
            except MedsaeError as exc:
                out.notes["decoder"] = f"decoder neighbours unavailable: {exc}"
        else:
            out.notes["decoder"] = "decoder neighbours unavailable: no trained SAE (train stage artifact) found"
        if codes is not None:
            out.coactivation = coactivation_neighbours(codes, k)
        else:
            out.notes["coactivation"] = "co-activation neighbours unavailable: no sparse codes (encode stage) found"
        out._gather_probes(evaluate_dir, metrics)
        return out

    def _gather_probes(self, evaluate_dir: str | None, metrics: pd.DataFrame | None) -> None:
        from medsae.eval.probe_weights import FILE, read_weights

        if not evaluate_dir or not Path(evaluate_dir).is_dir():
            self.notes["probes"] = "no evaluate stage output: run `medsae exp run SPEC` to fit the probes"
            return
        aucs, self.probe_split = probe_aucs(metrics)
        table = read_weights(Path(evaluate_dir))
        if table is None:
            if aucs:
                self.notes["probes"] = (
                    f"this evaluate run predates stored probe weights ({FILE}); rerun it with "
                    "`medsae exp run SPEC --force evaluate` (its metrics stay the same)"
                )
            else:
                self.notes["probes"] = "the evaluate stage fitted no sparse-code probes (eval.probes off)"
            return
        self.probes = probe_weights_by_latent(table, aucs)

    def _rows(self, found: Neighbours | None, latent: int) -> list[dict[str, Any]]:
        if found is None or latent >= len(found.index):
            return []
        rows = []
        for r, (j, v) in enumerate(zip(found.index[latent], found.value[latent], strict=True)):
            if j < 0:
                continue
            row = {
                "latent": int(j),
                "value": float(v),
                "text": self.texts.get(int(j)),
                "link": int(j) in self.pages,
            }
            row.update({name: values[latent, r].item() for name, values in found.extra.items() if values.ndim == 2})
            rows.append(row)
        return rows

    def page(self, latent: int) -> dict[str, Any]:
        """What one latent page shows: neighbour rows, probe rows and the notes of missing panels."""
        co = self.coactivation
        fires = int(co.extra["fires"][latent]) if co is not None and latent < len(co.extra["fires"]) else None
        return {
            "decoder": self._rows(self.decoder, latent),
            "coactivation": self._rows(co, latent),
            "fires": fires,
            "probes": self.probes.get(latent, []),
            "probe_split": self.probe_split,
            "notes": self.notes,
            "decoder_measure": DECODER_MEASURE,
            "coactivation_measure": COACTIVATION_MEASURE,
        }
