"""Retrieval: selection, similarities and precision against brute-force computations and a known toy."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from sklearn.metrics.pairwise import cosine_similarity

from medsae.eval import retrieval as R


def brute_best_per_scan(scores: np.ndarray, scan: np.ndarray, own: str, top: int) -> list[int]:
    frame = pd.DataFrame({"score": scores, "scan": scan, "row": np.arange(len(scores))})
    frame = frame[frame["scan"] != own].sort_values(["score", "row"], ascending=[False, True])
    best = frame.drop_duplicates("scan")
    return best["row"].tolist()[:top]


def test_best_per_scan_matches_brute_force():
    rng = np.random.default_rng(0)
    scan = rng.choice([f"s{i}" for i in range(9)], 60)
    index = R.ScanIndex.build(scan)
    scores = rng.random((4, 60))
    own_rows = [0, 5, 10, 20]
    got = index.best_per_scan(scores, index.scan[own_rows], top=5)
    for r, row in enumerate(own_rows):
        assert got[r].tolist() == brute_best_per_scan(scores[r], scan, scan[row], 5)
    # more requested than available scans: padded with -1
    few = R.ScanIndex.build(np.array(["a", "a", "b"]))
    out = few.best_per_scan(np.array([[0.1, 0.9, 0.3]]), np.array([0]), top=3)
    assert out.tolist() == [[2, -1, -1]]


@pytest.fixture(scope="module")
def random_codes():
    rng = np.random.default_rng(1)
    dense = rng.random((80, 30)) * (rng.random((80, 30)) < 0.3)
    dense[:, 4] = rng.random(80) + 0.1  # always active: masked out of fingerprints
    return dense


def test_sparse_fingerprint_scores_match_direct_cosine(random_codes):
    dense = random_codes
    masked = R.always_active(sp.csr_matrix(dense))
    assert masked.tolist() == [j == 4 for j in range(30)]
    ref = dense[7].copy()
    ks = [1, 2, 3, 5]
    got = R.sparse_fingerprint_scores(sp.csc_matrix(dense), ref, ks, masked)
    acts = np.where(masked, 0, ref)
    order = np.argsort(-acts, kind="stable")
    for i, k in enumerate(ks):
        cols = order[:k]
        if k == 1:
            expected = 1 / (1 + np.abs(acts[cols[0]] - dense[:, cols[0]]))
        else:
            expected = cosine_similarity(dense[:, cols], acts[cols][None, :]).ravel()
        np.testing.assert_allclose(got[i], expected, atol=1e-12)


def test_dense_methods_match_direct_cosine():
    rng = np.random.default_rng(2)
    emb = rng.normal(size=(50, 12))
    scan = np.repeat([f"s{i}" for i in range(10)], 5)
    index = R.ScanIndex.build(scan)
    refs = np.array([3, 17, 40])
    got = R.dense_retrieval(emb, refs, index, top=4)
    sims = cosine_similarity(emb[refs], emb)
    for r, row in enumerate(refs):
        assert got[r].tolist() == brute_best_per_scan(sims[r], scan, scan[row], 4)
    fp = R.dense_fingerprint_retrieval(emb, refs, index, ks=[3], top=4)[3]
    for r, row in enumerate(refs):
        dims = np.argsort(-np.abs(emb[row]))[:3]
        s = cosine_similarity(emb[:, dims], emb[row, dims][None, :]).ravel()
        assert fp[r].tolist() == brute_best_per_scan(s, scan, scan[row], 4)
    quality = R.dense_space_quality(emb, refs, got)
    assert quality[1] == pytest.approx(sims[1, got[1]].mean())
    partial = got.copy()
    partial[0, 2:] = -1
    partial[2, :] = -1
    q = R.dense_space_quality(emb, refs, partial)
    assert q[0] == pytest.approx(sims[0, got[0, :2]].mean()) and np.isnan(q[2])


def toy_clusters(seed: int):
    """Two groups of 5 scans (4 slices each); each group fires on its own latents."""
    rng = np.random.default_rng(seed)
    scan = np.repeat([f"s{i}" for i in range(10)], 4)
    group = (np.arange(40) // 20).astype(int)
    codes = np.zeros((40, 16))
    for row in range(40):
        own = np.arange(4) + 4 * group[row]
        codes[row, own] = rng.random(4) + 0.5
        codes[row, 8 + rng.integers(0, 8)] = rng.random() * 0.2  # weak noise latent
    pres = np.zeros((40, 6), bool)
    pres[group == 0, :3] = True
    pres[group == 1, 3:5] = True
    return scan, group, codes, pres


def test_fingerprints_find_the_right_group_and_precision_separates_real_from_random():
    scan, group, codes, pres = toy_clusters(3)
    index = R.ScanIndex.build(scan)
    refs = np.arange(40)
    real = R.sparse_fingerprint_retrieval(sp.csr_matrix(codes), refs, index, ks=[1, 3], top=4)
    for k in (1, 3):
        rows = real[k]
        assert np.all(scan[rows] != scan[refs][:, None])  # never the reference's own scan
        assert all(len(set(scan[r])) == 4 for r in rows)  # one slice per scan
    assert np.all(group[real[3]] == group[refs][:, None])  # K=3: always the reference's group
    precision_real = R.label_agreement(group, refs, real[3])
    assert np.all(precision_real == 1.0)
    assert np.all(R.structure_jaccard(pres, refs, real[3]) == 1.0)
    # random codes of the same sparsity: precision near chance (4 of 9 other scans share the group)
    rng = np.random.default_rng(4)
    random_codes = sp.csr_matrix(rng.random((40, 16)) * (rng.random((40, 16)) < 0.3))
    rand = R.sparse_fingerprint_retrieval(random_codes, refs, index, ks=[3], top=4)[3]
    chance = R.chance_label_agreement(group, refs, index)
    assert chance == pytest.approx(np.full(40, 4 / 9))  # 4 of the 9 other scans are of the same group
    assert np.nanmean(R.label_agreement(group, refs, rand)) < 0.75


def test_label_measures_against_loops():
    rng = np.random.default_rng(5)
    labels = rng.integers(-1, 3, 30)
    scan = np.repeat([f"s{i}" for i in range(6)], [2, 3, 4, 5, 7, 9])  # unequal scans
    index = R.ScanIndex.build(scan)
    refs = np.array([0, 7, 14, 29])
    got = rng.integers(0, 30, (4, 3))
    got[1, 2] = -1
    prec = R.label_agreement(labels, refs, got)
    chance = R.chance_label_agreement(labels, refs, index)
    for r, row in enumerate(refs):
        if labels[row] < 0:
            assert np.isnan(prec[r]) and np.isnan(chance[r])
            continue
        valid = [g for g in got[r] if g >= 0]
        assert prec[r] == pytest.approx(np.mean([labels[g] == labels[row] for g in valid]))
        # a random retrieval takes one slice of a random other scan
        per_scan = [np.mean(labels[scan == s] == labels[row]) for s in np.unique(scan) if s != scan[row]]
        assert chance[r] == pytest.approx(np.mean(per_scan))
    pres = rng.random((30, 4)) < 0.5
    jac = R.structure_jaccard(pres, refs, got)
    a = set(np.flatnonzero(pres[refs[0]]))
    expected = [
        len(a & set(np.flatnonzero(pres[g]))) / max(len(a | set(np.flatnonzero(pres[g]))), 1)
        if (a | set(np.flatnonzero(pres[g])))
        else 1.0
        for g in got[0]
    ]
    assert jac[0] == pytest.approx(np.mean(expected))
    estimate = R.chance_structure_jaccard(pres, refs, index, samples=20_000)
    for r, row in enumerate(refs):
        a = set(np.flatnonzero(pres[row]))
        per_scan = []
        for s in np.unique(scan):
            if s == scan[row]:
                continue
            sets = [set(np.flatnonzero(pres[i])) for i in np.flatnonzero(scan == s)]
            per_scan.append(np.mean([len(a & b) / len(a | b) if a | b else 1.0 for b in sets]))
        assert estimate[r] == pytest.approx(np.mean(per_scan), abs=0.01)
