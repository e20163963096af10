"""Monosemanticity on hand-built examples whose answers are known."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from scipy.stats import entropy

from medsae.eval import mono


def jaccard(a: set, b: set) -> float:
    return 1.0 if not a and not b else len(a & b) / len(a | b)


def test_pairwise_jaccard_and_specificity_against_loops():
    rng = np.random.default_rng(0)
    sets = rng.random((4, 7, 6)) < 0.35
    got = mono.mean_pairwise_jaccard(sets)
    for f in range(4):
        rows = [set(np.flatnonzero(r)) for r in sets[f]]
        expected = np.mean([jaccard(a, b) for a, b in itertools.combinations(rows, 2)])
        assert got[f] == pytest.approx(expected, rel=1e-6)
        counts = sets[f].sum(axis=0)
        assert mono.specificity(sets[f], 6) == pytest.approx(1 - entropy(counts) / math.log(6))
    assert mono.specificity(np.zeros((5, 6)), 6) == 0.0
    assert mono.mean_pairwise_jaccard(np.zeros((3, 5, 6)))[0] == 1.0  # all empty -> J = 1


def test_null_baseline_estimates_the_population_mean_jaccard():
    rng = np.random.default_rng(1)
    pres = rng.random((40, 5)) < 0.4
    rows = [set(np.flatnonzero(r)) for r in pres]
    population = np.mean([jaccard(a, b) for a, b in itertools.combinations(rows, 2)])
    assert mono.null_coherence(pres, 10, draws=3000, seed=0) == pytest.approx(population, abs=0.01)
    assert mono.null_coherence(np.ones((20, 5), bool), 10) == 1.0


@pytest.fixture
def handmade():
    """30 scans x 2 slices; structures a b c d e (columns 0..4)."""
    n_scans = 30
    scan = np.repeat([f"ct/s{i:02d}" for i in range(n_scans)], 2)
    n = len(scan)
    pres = np.zeros((n, 5), bool)
    codes = np.zeros((n, 4))
    strong, weak = np.arange(0, n, 2), np.arange(1, n, 2)
    # latent 0: strongest slice of 12 scans shows only 'a'; the scans' weaker slices show only 'e'
    for i, (s, w) in enumerate(zip(strong[:12], weak[:12], strict=True)):
        codes[s, 0], codes[w, 0] = 5.0 + i, 4.0 + i
        pres[s, 0] = True
        pres[w, 4] = True
    # latent 3: ten scans, alternately {a, b} and {c}
    for i, s in enumerate(strong[12:22]):
        codes[s, 3] = 1.0 + i
        pres[s, [0, 1] if i % 2 == 0 else [2]] = True
    codes[:, 1] = 0.5  # fires everywhere: excluded
    codes[strong[22:27], 2] = 1.0  # only 5 scans: too few images
    pres[strong[22:], 3] = True
    return sp.csr_matrix(codes), pres, scan, strong


def test_top_slices_take_the_strongest_slice_per_scan(handmade):
    codes, _, scan, strong = handmade
    rows, found = mono.top_slices_per_latent(codes, scan, top=10)
    np.testing.assert_array_equal(found, [10, 10, 5, 10])
    np.testing.assert_array_equal(rows[0], strong[:12][::-1][:10])  # descending activation, one per scan
    frame = pd.DataFrame({"scan": scan, "act": codes[:, 3].toarray().ravel()})
    expected = frame[frame["act"] > 0].sort_values("act", ascending=False).drop_duplicates("scan").index[:10]
    np.testing.assert_array_equal(rows[3], expected)


def test_latent_scores_on_the_handmade_case(handmade):
    codes, pres, scan, _ = handmade
    frame, nulls = mono.latent_scores(codes, pres, scan, mono.MonoSettings(top_ns=(10,), min_images=10))
    assert list(frame["latent"]) == [0, 3]  # 1 fires everywhere, 2 has too few scans
    by = frame.set_index("latent")
    assert by.loc[0, "coherence_10"] == pytest.approx(1.0)
    assert by.loc[0, "specificity_10"] == pytest.approx(1.0)  # one structure only: zero entropy
    assert by.loc[0, "mono_10"] == pytest.approx(1.0 - nulls[10])
    assert by.loc[3, "coherence_10"] == pytest.approx(20 / 45)  # 2 x C(5,2) identical pairs of 45
    assert by.loc[3, "specificity_10"] == pytest.approx(1 - math.log(3) / math.log(5))
    assert by.loc[3, "mono_10"] == pytest.approx(max(0, 20 / 45 - nulls[10]) * (1 - math.log(3) / math.log(5)))
    scores = mono.config_scores(frame, nulls)
    assert scores["mono_config_top10"] == pytest.approx(frame["mono_10"].mean())
    assert scores["n_features_scored"] == 2
    assert scores["n_features_above_null"] == int((frame["coherence_10"] > nulls[10]).sum())


def test_config_score_is_the_mean_of_the_largest():
    frame = pd.DataFrame(
        {"latent": range(60), "mono_10": np.linspace(0, 1, 60), "coherence_10": 0.5, "specificity_10": 0.5}
    )
    scores = mono.config_scores(frame, {10: 0.1})
    assert scores["mono_config_top10"] == pytest.approx(np.sort(frame["mono_10"])[-10:].mean())
    assert scores["monosemanticity_top50_mean"] == pytest.approx(np.sort(frame["mono_10"])[-50:].mean())
    assert scores["coherence_score"] == pytest.approx(0.4)
