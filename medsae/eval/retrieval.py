"""Retrieval (docs/method.md#retrieval): find slices like a reference slice, and judge what was found.

Methods (each returns, per reference, the rows of the ``top`` = 5 most similar slices, at most one
per scan, never from the reference's own scan):

* **sparse fingerprint** (the study's): the reference's K strongest latents (latents firing on
  every slice of the split excluded); similarity = cosine between the reference's K values and
  each slice's values on the same K latents (0 for a zero vector); K = 1 uses the study's
  ``1 / (1 + |a_ref - a_i|)``. When a reference fires on fewer than K latents, its fingerprint is
  those latents only; the study's protocol (:func:`study_sparse_fingerprint_retrieval`) pads it with
  zero-valued latents as the study did;
* **dense fingerprint** (the study's baseline): the K embedding dimensions of largest ``|value|``,
  signed values, cosine (for K = 1 this is the sign agreement);
* **dense**: cosine over the whole embedding (the reference method).

Quality measures:

* :func:`dense_space_quality` - the study's: mean cosine, in the dense embedding space, between
  the reference and its retrievals. Dense retrieval is by construction its optimum, and a
  random-weights model scores 0.998 on it (docs/method.md#problem-28): it cannot tell real features from
  random ones;
* :func:`label_agreement` / :func:`structure_jaccard` - label-based precision@k: the fraction of
  retrievals with the reference's modality / plane / body region, and the mean Jaccard overlap
  of their structure sets; :func:`chance_label_agreement` / :func:`chance_structure_jaccard` give
  what random retrieval scores, so a representation's precision can be read against chance.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp

from medsae.eval.metrics import FIRE_EPS

TOP = 5


@dataclass
class ScanIndex:
    """Rows grouped by scan, for "best slice per scan" selection."""

    scan: np.ndarray  # [n] scan code 0..S-1
    order: np.ndarray  # rows sorted by scan (stable)
    starts: np.ndarray  # [S] segment starts in ``order``

    @classmethod
    def build(cls, scan: Sequence) -> ScanIndex:
        codes = pd.factorize(pd.Series(np.asarray(scan)), sort=True)[0].astype(np.int64)
        order = np.argsort(codes, kind="stable")
        starts = np.searchsorted(codes[order], np.arange(codes.max() + 1 if len(codes) else 0))
        return cls(codes, order, starts)

    def best_per_scan(self, scores: np.ndarray, own_scan: np.ndarray, top: int = TOP) -> np.ndarray:
        """``scores [R, n]`` -> rows ``[R, top]`` of the ``top`` scans with the highest best score
        (excluding ``own_scan[r]``), each represented by its best row; -1 where there are fewer
        scans. Ties: lower scan code first, then lower row."""
        r_count = scores.shape[0]
        s = scores[:, self.order]
        seg_max = np.maximum.reduceat(s, self.starts, axis=1)
        seg_max[np.arange(r_count), own_scan] = -np.inf
        chosen = np.argsort(-seg_max, axis=1, kind="stable")[:, :top]
        n = s.shape[1]
        seg_of_pos = np.repeat(np.arange(len(self.starts)), np.diff(np.append(self.starts, n)))
        is_max = s == seg_max[:, seg_of_pos]
        first = n - np.maximum.reduceat(np.where(is_max, n - np.arange(n)[None, :], 0), self.starts, axis=1)
        rows = self.order[np.minimum(np.take_along_axis(first, chosen, axis=1), n - 1)]
        valid = np.isfinite(np.take_along_axis(seg_max, chosen, axis=1))
        out = np.where(valid, rows, -1)
        if out.shape[1] < top:
            out = np.pad(out, ((0, 0), (0, top - out.shape[1])), constant_values=-1)
        return out


def reference_rows(n: int, n_refs: int, seed: int) -> np.ndarray:
    """``n_refs`` distinct random rows (all rows, in order, when there are fewer)."""
    if n <= n_refs:
        return np.arange(n)
    return np.random.default_rng(seed).choice(n, size=n_refs, replace=False)


def always_active(codes: sp.spmatrix) -> np.ndarray:
    """Latents firing on every row (the study masks them out of fingerprints)."""
    codes = sp.csr_matrix(codes)
    counts = np.bincount(codes.indices[codes.data > FIRE_EPS], minlength=codes.shape[1])
    return counts >= codes.shape[0]


def _cosine_prefixes(values_t: np.ndarray, ref: np.ndarray, ks: Sequence[int]) -> np.ndarray:
    """Cosine of ``ref[:K]`` with ``values_t[:K, i]`` for every row ``i`` and each K.

    ``values_t [Kmax, n]`` holds the fingerprint dimensions as rows, so the per-K dot products
    and norms are two small matrix products (no ``[n, Kmax]`` cumulative sums).
    """
    kmax, n = values_t.shape
    ks = [min(k, kmax) for k in ks]
    prefix = (np.arange(kmax)[:, None] < np.asarray(ks)[None, :]).astype(values_t.dtype)  # [Kmax, len(ks)]
    dots = (prefix * ref[:, None]).T @ values_t
    sq = prefix.T @ (values_t * values_t)
    ref_sq = prefix.T @ (ref * ref)
    denom = np.sqrt(np.maximum(sq, 0) * ref_sq[:, None]).astype(np.float64)
    return np.divide(dots, denom, out=np.zeros((len(ks), n)), where=denom > 0)


def sparse_fingerprint_scores(
    codes_csc: sp.csc_matrix, ref: np.ndarray, ks: Sequence[int], masked: np.ndarray
) -> np.ndarray:
    """Similarity of every row to a reference code vector ``ref [d_sae]``, one row per K."""
    acts = np.where(masked, 0.0, ref)
    active = np.flatnonzero(acts > FIRE_EPS)
    latents = active[np.argsort(-acts[active], kind="stable")][: max(ks)]
    n = codes_csc.shape[0]
    out = np.zeros((len(ks), n))
    if len(latents) == 0:
        return out
    sub = codes_csc[:, latents]  # [n, Kmax] sparse, columns in rank order
    for i, k in enumerate(ks):
        if k == 1:
            col = np.asarray(sub[:, 0].todense()).ravel()
            out[i] = 1.0 / (1.0 + np.abs(acts[latents[0]] - col))
    multi = [i for i, k in enumerate(ks) if k > 1]
    if multi:
        out[multi] = _sparse_prefix_cosine(sub, acts[latents], [ks[i] for i in multi])
    return out


def _sparse_prefix_cosine(sub: sp.csc_matrix, ref: np.ndarray, ks: Sequence[int]) -> np.ndarray:
    sub = sp.csc_matrix(sub)
    n, kmax = sub.shape
    dot, sq = np.zeros(n), np.zeros(n)
    out = np.zeros((len(ks), n))
    done = 0
    ref_sq = np.cumsum(ref * ref)
    for i, k in sorted(enumerate(ks), key=lambda p: p[1]):
        k = min(k, kmax)
        lo, hi = sub.indptr[done], sub.indptr[k]
        if hi > lo:
            rows, vals = sub.indices[lo:hi], sub.data[lo:hi].astype(np.float64)
            col = np.repeat(np.arange(done, k), np.diff(sub.indptr[done : k + 1]))
            dot += np.bincount(rows, weights=vals * ref[col], minlength=n)
            sq += np.bincount(rows, weights=vals * vals, minlength=n)
        done = k
        denom = np.sqrt(sq * ref_sq[k - 1])
        out[i] = np.divide(dot, denom, out=np.zeros(n), where=denom > 0)
    return out


def sparse_fingerprint_retrieval(
    codes: sp.spmatrix, refs: np.ndarray, scans: ScanIndex, ks: Sequence[int], top: int = TOP
) -> dict[int, np.ndarray]:
    """The study's sparse fingerprint retrieval: ``{K: rows [R, top]}``."""
    codes = sp.csr_matrix(codes)
    csc = sp.csc_matrix(codes)
    masked = always_active(codes)
    out = {k: np.full((len(refs), top), -1, dtype=np.int64) for k in ks}
    for r, row in enumerate(refs):
        ref = np.asarray(codes[row].todense()).ravel().astype(np.float64)
        if not (ref[~masked] > FIRE_EPS).any():
            continue  # no fingerprint: nothing retrieved
        scores = sparse_fingerprint_scores(csc, ref, ks, masked)
        found = scans.best_per_scan(scores, np.full(len(ks), scans.scan[row]), top)
        for i, k in enumerate(ks):
            out[k][r] = found[i]
    return out


# -- the study's protocol ------------------------------------------------------------------------

#: Seed of the study's reference draw (``np.random.seed(0)``, then ``np.random.choice``).
STUDY_REFERENCE_SEED = 0


def study_reference_rows(n: int, n_refs: int) -> np.ndarray:
    """The study's references: ``n_refs`` rows drawn by numpy's legacy generator seeded with 0 (the
    same rows as the study's draw when the rows are in its order); all rows when there are fewer."""
    if n <= n_refs:
        return np.arange(n)
    return np.random.RandomState(STUDY_REFERENCE_SEED).choice(n, size=n_refs, replace=False)


def study_always_active(codes: sp.spmatrix) -> np.ndarray:
    """The study's always-active latents: minimum activation over the rows above 0."""
    codes = sp.csr_matrix(codes)
    counts = np.bincount(codes.indices[codes.data > 0], minlength=codes.shape[1])
    return counts >= codes.shape[0]


def study_fingerprint(ref: np.ndarray, k: int, masked: np.ndarray) -> np.ndarray:
    """The study's top-K latents of a reference code ``ref [d_sae]``: always-active latents set to
    -inf, an ascending sort, its last K reversed. A reference firing on fewer than K latents is thus
    padded with zero-valued latents, the highest indices first (ties as a stable sort orders them;
    the study's unstable sort leaves their order to the algorithm)."""
    acts = np.where(masked, -np.inf, np.asarray(ref, dtype=np.float64))
    return np.argsort(acts, kind="stable")[::-1][:k]


def study_fingerprint_scores(
    codes_csc: sp.csc_matrix, ref: np.ndarray, latents: np.ndarray, ks: Sequence[int]
) -> np.ndarray:
    """Similarity of every row to the reference on each prefix ``latents[:K]`` (padded latents
    included, with the reference's value 0): cosine, or ``1 / (1 + |a_ref - a_i|)`` for K = 1."""
    n = codes_csc.shape[0]
    sub = sp.csc_matrix(codes_csc[:, latents])
    ref_values = np.asarray(ref, dtype=np.float64)[latents]
    out = np.zeros((len(ks), n))
    for i, k in enumerate(ks):
        if k == 1:
            col = np.asarray(sub[:, 0].todense()).ravel()
            out[i] = 1.0 / (1.0 + np.abs(ref_values[0] - col))
    multi = [i for i, k in enumerate(ks) if k > 1]
    if multi:
        out[multi] = _sparse_prefix_cosine(sub, ref_values, [ks[i] for i in multi])
    return out


def study_sparse_fingerprint_retrieval(
    codes: sp.spmatrix, refs: np.ndarray, scans: ScanIndex, ks: Sequence[int], top: int = TOP
) -> dict[int, np.ndarray]:
    """The study's sparse fingerprint retrieval with its padding (:func:`study_fingerprint`):
    ``{K: rows [R, top]}``; every reference retrieves, even one firing on no latent."""
    codes = sp.csr_matrix(codes)
    csc = sp.csc_matrix(codes)
    masked = study_always_active(codes)
    out = {k: np.full((len(refs), top), -1, dtype=np.int64) for k in ks}
    for r, row in enumerate(refs):
        ref = np.asarray(codes[row].todense()).ravel()
        latents = study_fingerprint(ref, max(ks), masked)
        scores = study_fingerprint_scores(csc, ref, latents, ks)
        found = scans.best_per_scan(scores, np.full(len(ks), scans.scan[row]), top)
        for i, k in enumerate(ks):
            out[k][r] = found[i]
    return out


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


def dense_retrieval(emb: np.ndarray, refs: np.ndarray, scans: ScanIndex, top: int = TOP, chunk: int = 64) -> np.ndarray:
    """Cosine over the whole embedding: rows ``[R, top]``."""
    unit = _unit(emb)
    out = np.empty((len(refs), top), dtype=np.int64)
    for start in range(0, len(refs), chunk):
        part = refs[start : start + chunk]
        scores = (unit[part] @ unit.T).astype(np.float64)
        out[start : start + chunk] = scans.best_per_scan(scores, scans.scan[part], top)
    return out


def dense_fingerprint_retrieval(
    emb: np.ndarray, refs: np.ndarray, scans: ScanIndex, ks: Sequence[int], top: int = TOP, study_ties: bool = False
) -> dict[int, np.ndarray]:
    """The study's dense-fingerprint baseline: ``{K: rows [R, top]}``. Equal magnitudes go to the lower
    dimension first, or with ``study_ties`` to the higher one (the study's reversed ascending sort)."""
    emb = np.asarray(emb, dtype=np.float32)
    emb_t = np.ascontiguousarray(emb.T)  # dimensions as rows: a fingerprint's columns are contiguous
    kmax = min(max(ks), emb.shape[1])
    out = {k: np.empty((len(refs), top), dtype=np.int64) for k in ks}
    for r, row in enumerate(refs):
        if study_ties:
            dims = np.argsort(np.abs(emb[row]), kind="stable")[::-1][:kmax]
        else:
            dims = np.argsort(-np.abs(emb[row]), kind="stable")[:kmax]
        scores = _cosine_prefixes(emb_t[dims], emb[row, dims], ks)
        found = scans.best_per_scan(scores, np.full(len(ks), scans.scan[row]), top)
        for i, k in enumerate(ks):
            out[k][r] = found[i]
    return out


# -- quality measures ------------------------------------------------------------------------------


def dense_space_quality(emb: np.ndarray, refs: np.ndarray, retrieved: np.ndarray) -> np.ndarray:
    """The study's quality: per reference, the mean cosine (dense space) to its retrievals; NaN if none."""
    unit = _unit(emb)
    valid = retrieved >= 0
    cos = np.einsum("rd,rkd->rk", unit[refs], unit[np.where(valid, retrieved, 0)])
    count = valid.sum(axis=1)
    total = np.where(valid, cos, 0.0).sum(axis=1)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def label_agreement(labels: np.ndarray, refs: np.ndarray, retrieved: np.ndarray) -> np.ndarray:
    """Label precision@k: per reference, the fraction of retrievals sharing its label
    (``labels`` integer codes, -1 = missing). NaN when the reference's label is missing or
    nothing was retrieved; a retrieval with a missing label counts as a miss."""
    labels = np.asarray(labels)
    valid = retrieved >= 0
    same = (labels[np.where(valid, retrieved, 0)] == labels[refs][:, None]) & valid
    out = same.sum(axis=1) / np.maximum(valid.sum(axis=1), 1)
    return np.where((labels[refs] >= 0) & valid.any(axis=1), out, np.nan)


def _jaccard_rows(pres: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Jaccard between the structure sets of rows ``a`` and ``b`` (same shape); 1 when both empty."""
    pa, pb = pres[a], pres[b]
    inter = np.sum(pa & pb, axis=-1)
    union = np.sum(pa | pb, axis=-1)
    return np.divide(inter, union, out=np.ones(inter.shape), where=union > 0)


def structure_jaccard(presence: np.ndarray, refs: np.ndarray, retrieved: np.ndarray) -> np.ndarray:
    """Per reference, the mean Jaccard overlap of its structure set with each retrieval's."""
    pres = np.asarray(presence) > 0
    valid = retrieved >= 0
    jac = _jaccard_rows(pres, np.repeat(refs[:, None], retrieved.shape[1], axis=1), np.where(valid, retrieved, 0))
    total = np.where(valid, jac, 0.0).sum(axis=1)
    return np.where(valid.any(axis=1), total / np.maximum(valid.sum(axis=1), 1), np.nan)


def _other_scan_weights(scans: ScanIndex, refs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows' scan sizes and the number of other scans per reference."""
    sizes = np.bincount(scans.scan)
    return sizes, np.full(len(refs), len(sizes) - 1)


def chance_label_agreement(labels: np.ndarray, refs: np.ndarray, scans: ScanIndex) -> np.ndarray:
    """Expected :func:`label_agreement` of a random retrieval made like the real ones (one slice
    per scan): per reference, the mean over the other scans of the fraction of that scan's rows
    sharing its label (NaN for a missing label or when there is no other scan)."""
    labels = np.asarray(labels)
    n_labels = labels.max() + 1 if len(labels) else 0
    lab = np.where(labels >= 0, labels, n_labels)
    sizes, others = _other_scan_weights(scans, refs)
    per_scan = np.zeros((len(sizes), n_labels + 1))
    np.add.at(per_scan, (scans.scan, lab), 1)
    frac = per_scan / np.maximum(sizes, 1)[:, None]
    own = scans.scan[refs]
    same = frac[:, lab[refs]].sum(axis=0) - frac[own, lab[refs]]
    out = np.divide(same, others, out=np.full(len(refs), np.nan), where=others > 0)
    return np.where(labels[refs] >= 0, out, np.nan)


def chance_structure_jaccard(
    presence: np.ndarray, refs: np.ndarray, scans: ScanIndex, samples: int = 100, seed: int = 0
) -> np.ndarray:
    """Expected :func:`structure_jaccard` of a random one-slice-per-scan retrieval, estimated with
    ``samples`` draws per reference (a random other scan, then a random slice of it)."""
    pres = np.asarray(presence) > 0
    rng = np.random.default_rng(seed)
    sizes, _ = _other_scan_weights(scans, refs)
    n_scans = len(sizes)
    if n_scans < 2:
        return np.full(len(refs), np.nan)
    own = scans.scan[refs][:, None]
    pick = rng.integers(0, n_scans - 1, size=(len(refs), samples))
    pick = pick + (pick >= own)  # uniform over the other scans
    draws = scans.order[scans.starts[pick] + (rng.random(pick.shape) * sizes[pick]).astype(np.int64)]
    jac = _jaccard_rows(pres, np.repeat(refs[:, None], samples, axis=1), draws)
    return jac.mean(axis=1)
