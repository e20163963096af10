"""Per-latent statistics over the interpretation pool (registry table ``latents``), vectorised.

For every latent: how often it fires (frequency, n_active, n_patients = scans), how strongly
(mean / max / quantiles of firing activations), its status (docs/method.md#eligibility:
``dead`` never fires in the pool,
``too_rare`` fires on fewer than ``min_active`` slices or ``min_patients`` scans, ``dense`` fires
on more than ``dense_frequency`` of slices, else ``live``) and an enrichment summary: the
metadata terms most over-represented among its firing slices, and the best single attribute
(the term whose indicator correlates most with the activation on the explain partition; the
"label lookup" baseline an explanation must beat).

Everything is computed over the CSC code matrix and a sparse attribute matrix with array
operations; no Python loop touches individual slices.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from medsae.interp.config import InterpretSpec
from medsae.interp.sampling import Pool

TOP_TERMS = 5
LATENT_BLOCK = 4096


def positive_csc(codes: sp.spmatrix) -> sp.csc_matrix:
    """CSC copy holding only strictly positive activations (firing = value > 0)."""
    csc = sp.csc_matrix(codes, dtype=np.float32, copy=True)
    csc.data[csc.data < 0] = 0
    csc.eliminate_zeros()
    csc.sort_indices()
    return csc


def _column_of_nnz(csc: sp.csc_matrix) -> np.ndarray:
    return np.repeat(np.arange(csc.shape[1]), np.diff(csc.indptr))


def activation_stats(csc: sp.csc_matrix, scan: np.ndarray) -> pd.DataFrame:
    """n_active, n_patients, mean/max and q50/q90/q99 of firing values for every column."""
    d = csc.shape[1]
    n_active = np.diff(csc.indptr).astype(np.int64)
    col = _column_of_nnz(csc)
    n_scans = int(scan.max()) + 1 if len(scan) else 1
    pairs = np.unique(col.astype(np.int64) * n_scans + scan[csc.indices])
    n_patients = np.bincount(pairs // n_scans, minlength=d)
    order = np.lexsort((csc.data, col))
    values = csc.data[order].astype(np.float64)
    sums = np.bincount(col, weights=csc.data.astype(np.float64), minlength=d)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(n_active > 0, sums / np.maximum(n_active, 1), np.nan)
    out = {"n_active": n_active, "n_patients": n_patients, "mean_act": mean}
    start = csc.indptr[:-1]
    has = n_active > 0
    for name, q in (("max_act", 1.0), ("q50", 0.5), ("q90", 0.9), ("q99", 0.99)):
        pos = q * np.maximum(n_active - 1, 0)
        lo = np.floor(pos).astype(np.int64)
        hi = np.minimum(lo + 1, np.maximum(n_active - 1, 0))
        frac = pos - lo
        safe_lo = np.where(has, start + lo, 0)
        safe_hi = np.where(has, start + hi, 0)
        v = values[safe_lo] * (1 - frac) + values[safe_hi] * frac if len(values) else np.zeros(d)
        out[name] = np.where(has, v, np.nan)
    return pd.DataFrame(out)


def statuses(stats: pd.DataFrame, n_pool: int, spec: InterpretSpec) -> np.ndarray:
    """live / dead / dense / too_rare per latent (docs/method.md#eligibility)."""
    n_active = stats["n_active"].to_numpy()
    freq = n_active / max(n_pool, 1)
    status = np.full(len(stats), "live", dtype=object)
    status[freq > float(spec.dense_frequency)] = "dense"
    rare = (n_active < int(spec.min_active)) | (stats["n_patients"].to_numpy() < int(spec.min_patients))
    status[rare] = "too_rare"
    status[n_active == 0] = "dead"
    return status


def enrichment(csc: sp.csc_matrix, attrs: sp.csr_matrix, names: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top over-represented terms per latent: (term index [d, k], share among firing, base share)."""
    d = csc.shape[1]
    k = min(TOP_TERMS, attrs.shape[1])
    base = np.asarray(attrs.mean(axis=0)).ravel()
    n_active = np.maximum(np.diff(csc.indptr), 1)
    fires = sp.csc_matrix((np.ones_like(csc.data), csc.indices, csc.indptr), shape=csc.shape)
    idx = np.zeros((d, k), dtype=np.int64)
    share = np.zeros((d, k))
    attrs_f = sp.csr_matrix(attrs, dtype=np.float32)
    for lo in range(0, d, LATENT_BLOCK):
        hi = min(d, lo + LATENT_BLOCK)
        counts = np.asarray((fires[:, lo:hi].T @ attrs_f).todense())
        s = counts / n_active[lo:hi, None]
        lift = s - base[None, :]
        top = np.argsort(-lift, axis=1, kind="stable")[:, :k]
        idx[lo:hi] = top
        share[lo:hi] = np.take_along_axis(s, top, axis=1)
    return idx, share, base


def best_attribute(csc: sp.csc_matrix, attrs: sp.csr_matrix, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per latent, the term whose indicator has the highest Pearson r with the activation on ``rows``."""
    d = csc.shape[1]
    x = sp.csr_matrix(attrs[rows], dtype=np.float64)
    a = sp.csc_matrix(sp.csr_matrix(csc)[rows], dtype=np.float64)
    n = max(len(rows), 1)
    sum_x = np.asarray(x.sum(axis=0)).ravel()
    var_x = sum_x / n - (sum_x / n) ** 2
    sum_a = np.asarray(a.sum(axis=0)).ravel()
    sum_a2 = np.asarray(a.multiply(a).sum(axis=0)).ravel()
    var_a = sum_a2 / n - (sum_a / n) ** 2
    best = np.full(d, -1, dtype=np.int64)
    best_r = np.full(d, np.nan)
    for lo in range(0, d, LATENT_BLOCK):
        hi = min(d, lo + LATENT_BLOCK)
        cross = np.asarray((a[:, lo:hi].T @ x).todense()) / n
        cov = cross - (sum_a[lo:hi, None] / n) * (sum_x[None, :] / n)
        denom = np.sqrt(np.maximum(var_a[lo:hi, None], 0) * np.maximum(var_x[None, :], 0))
        with np.errstate(invalid="ignore", divide="ignore"):
            r = np.where(denom > 1e-12, cov / denom, np.nan)
        filled = np.nan_to_num(r, nan=-np.inf)
        arg = np.argmax(filled, axis=1)
        top = filled[np.arange(hi - lo), arg]
        ok = np.isfinite(top)
        best[lo:hi] = np.where(ok, arg, -1)
        best_r[lo:hi] = np.where(ok, top, np.nan)
    return best, best_r


def latent_table(
    csc_pool: sp.csc_matrix,
    pool: Pool,
    attrs: sp.csr_matrix,
    names: list[str],
    spec: InterpretSpec,
    sae_key: str,
) -> pd.DataFrame:
    """Rows of registry table ``latents`` (without stage_key) for every latent of the SAE."""
    stats = activation_stats(csc_pool, pool.scan)
    status = statuses(stats, pool.n, spec)
    top_idx, top_share, base = enrichment(csc_pool, attrs, names)
    best, best_r = best_attribute(csc_pool, attrs, pool.e_rows)
    summaries = []
    for j in range(csc_pool.shape[1]):
        if stats["n_active"].iat[j] == 0:
            summaries.append(None)
            continue
        terms = [
            {"term": names[t], "fire": round(float(s), 4), "base": round(float(base[t]), 4)}
            for t, s in zip(top_idx[j], top_share[j], strict=True)
            if s > base[t]
        ]
        entry: dict[str, Any] = {"enriched": terms}
        if best[j] >= 0:
            entry["best_attribute"] = {"term": names[best[j]], "r_explain": round(float(best_r[j]), 4)}
        summaries.append(json.dumps(entry, sort_keys=True))
    return pd.DataFrame(
        {
            "sae_key": sae_key,
            "latent": np.arange(csc_pool.shape[1], dtype=np.int32),
            "frequency": stats["n_active"].to_numpy() / max(pool.n, 1),
            "n_active": stats["n_active"].to_numpy(dtype=np.int64),
            "n_patients": stats["n_patients"].to_numpy(dtype=np.int32),
            "mean_act": stats["mean_act"].to_numpy(),
            "max_act": stats["max_act"].to_numpy(),
            "q50": stats["q50"].to_numpy(),
            "q90": stats["q90"].to_numpy(),
            "q99": stats["q99"].to_numpy(),
            "status": status.astype(str),
            "top_structures": summaries,
        }
    )
