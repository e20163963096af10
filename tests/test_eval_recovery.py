"""Performance recovery: ranking, curve, ratios and the study's summaries."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from sklearn.metrics import roc_auc_score

from medsae.eval import probes, recovery
from medsae.eval.rows import recovery_rows


def test_ranking_binary_and_multiclass():
    coef = np.array([[0.1], [-2.0], [0.0], [0.5]])
    np.testing.assert_array_equal(recovery.study_ranking(coef, top=3), [1, 3, 0])
    multi = np.array([[1.0, -1.0, 0.0], [0.0, 0.0, 3.0], [0.2, 0.2, 0.2]])  # mean |coef|: .667, 1, .2
    np.testing.assert_array_equal(recovery.study_ranking(multi), [1, 0, 2])


def test_ratios_thresholds_and_the_ranking_quantity():
    assert recovery.recovery_ratio(0.8, 0.9) == pytest.approx(0.8 / 0.9)
    assert recovery.recovery_chance_adjusted(0.5, 0.9) == 0.0
    assert recovery.recovery_chance_adjusted(0.9, 0.9) == 1.0
    ns, ratios = [1, 2, 5, 10], [0.55, 0.72, 0.95, 0.99]
    assert recovery.n_to_reach(ns, ratios, 0.7) == 2
    assert recovery.n_to_reach(ns, ratios, 0.5) == 1
    assert np.isnan(recovery.n_to_reach(ns, ratios, 1.0))
    table = np.array([[1, 2, np.nan], [1, np.nan, np.nan], [3, 5, np.nan]], dtype=float)
    frame = pd.DataFrame(table)
    filled = frame.apply(lambda c: c.fillna(c.max() + 1) if c.notna().any() else c.fillna(100.0))
    assert recovery.mean_n_features_study(table) == pytest.approx(filled.to_numpy().mean())
    assert recovery.curve_ns([1, 5, 100], n_nonzero=7, available=50) == [1, 5, 7, 50]
    assert recovery.curve_ns([1, 5, 10], n_nonzero=300, available=50) == [1, 5, 10]


def test_curve_finds_the_informative_latent():
    rng = np.random.default_rng(0)
    n, d = 1200, 30
    y = (rng.random(n) < 0.4).astype(np.int64)
    codes = rng.random((n, d)) * (rng.random((n, d)) < 0.2)
    codes[:, 7] = np.where(y == 1, rng.random(n) + 0.3, rng.random(n) * 0.6)  # informative
    codes[:, 11] = np.where(y == 1, rng.random(n) * 0.4 + 0.2, rng.random(n) * 0.5)  # weaker
    train, val = np.arange(800), np.arange(800, n)
    x = sp.csr_matrix(codes)
    target = probes.Target("t", "x", ["neg", "pos"], y)
    settings = probes.ProbeSettings(max_train=600, max_iter=300, device="cpu", seed=0)
    res = probes.run_probes([target], train, {"val": val}, {"sparse": x}, settings)
    ranking = recovery.study_ranking(res[0].coef)
    assert ranking[0] == 7
    dense_auc = {"val": {"t": 0.95}}
    curves = recovery.run_recovery(res, dense_auc, train, {"val": val}, x, settings, ns=[1, 2, 5, 30])
    (curve,) = curves
    assert curve.ns[0] == 1 and curve.ns[-1] == 30
    # a one-feature logistic probe ranks slices by that feature: its AUC is the feature's AUC
    assert curve.auc["val"][0] == pytest.approx(roc_auc_score(y[val], codes[val, 7]), abs=1e-9)
    assert curve.ratios("val")[0] == pytest.approx(curve.auc["val"][0] / 0.95)
    # below the dense-AUC filter nothing is fitted
    assert recovery.run_recovery(res, {"val": {"t": 0.52}}, train, {"val": val}, x, settings) == []
    rows = recovery_rows(curves, ["val"], [0.5, 0.9, 1.0])
    by = {(r.name, r.target, r.n_features): r.value for r in rows}
    assert by["recovery", "t", 1] == pytest.approx(curve.auc["val"][0] / 0.95)
    assert by["recovery_n_features_50pct", "t", None] == 1
    assert by["recovery_mean", None, 1] == pytest.approx(by["recovery", "t", 1])
    assert ("recovery_mean_n_features", None, None) in by
