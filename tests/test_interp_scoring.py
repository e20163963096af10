"""Score formulas against scipy / sklearn and direct loops; missing and undefined cases."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from medsae.interp.scorers import metrics as scoring


@pytest.fixture
def pairs():
    rng = np.random.default_rng(0)
    true = np.where(rng.random(60) < 0.5, 0.0, rng.uniform(0.5, 4, 60))
    pred = np.clip(np.round(2 * true + rng.normal(0, 2, 60)), 0, 10)
    return pred, true


def test_correlations_and_auroc_match_scipy_sklearn(pairs):
    pred, true = pairs
    assert scoring.pearson(pred, true) == pytest.approx(stats.pearsonr(pred, true)[0], abs=1e-12)
    assert scoring.spearman(pred, true) == pytest.approx(stats.spearmanr(pred, true)[0], abs=1e-12)
    assert scoring.auroc(pred, true > 0) == pytest.approx(roc_auc_score(true > 0, pred), abs=1e-12)
    predicted = pred >= 5
    assert scoring.balanced_accuracy(predicted, true > 0) == pytest.approx(
        balanced_accuracy_score(true > 0, predicted), abs=1e-12
    )


def test_undefined_values_are_none():
    assert scoring.pearson(np.ones(10), np.arange(10)) is None
    assert scoring.pearson(np.arange(10), np.zeros(10)) is None
    assert scoring.pearson(np.arange(2), np.arange(2)) is None
    assert scoring.auroc(np.arange(5), np.ones(5, bool)) is None
    assert scoring.balanced_accuracy(np.ones(4, bool), np.zeros(4, bool)) is None


def test_bootstrap_and_permutation_match_direct_loops(pairs):
    pred, true = pairs
    lo, hi = scoring.bootstrap_ci(pred, true, 300, seed=5)
    rng = np.random.default_rng(5)
    idx = rng.integers(0, len(pred), size=(300, len(pred)))
    rs = [stats.pearsonr(pred[i], true[i])[0] for i in idx if np.ptp(pred[i]) > 0 and np.ptp(true[i]) > 0]
    assert (lo, hi) == pytest.approx(tuple(np.percentile(rs, [2.5, 97.5])), abs=1e-9)
    r = scoring.pearson(pred, true)
    assert lo < r < hi
    p = scoring.permutation_p(pred, true, r, 400, seed=9)
    rng = np.random.default_rng(9)
    shuffled = rng.permuted(np.tile(true, (400, 1)), axis=1)
    perm = np.array([stats.pearsonr(pred, s)[0] for s in shuffled])
    assert p == pytest.approx((1 + np.sum(perm >= r - 1e-12)) / 401)
    assert p < 0.01
    null = scoring.permutation_p(np.random.default_rng(1).permutation(pred), true, 0.0, 400, seed=2)
    assert null > 0.1


def test_missing_predictions_are_excluded_not_zero(pairs):
    pred, true = pairs
    holes = pred.copy()
    holes[:6] = np.nan  # 10 % missing
    scores = {s.method: s for s in scoring.score_simulation(holes, true, 100, 100, seed=0)}
    assert scores["pearson"].n == 54 and scores["pearson"].n_missing == 6
    assert scores["pearson"].value == pytest.approx(stats.pearsonr(pred[6:], true[6:])[0])
    zeros = np.nan_to_num(holes)
    assert scores["pearson"].value != pytest.approx(stats.pearsonr(zeros, true)[0])
    holes[:20] = np.nan  # 33 % missing: NULL with a reason
    scores = {s.method: s for s in scoring.score_simulation(holes, true, 100, 100, seed=0)}
    assert scores["pearson"].value is None and "parse_failed" in scores["pearson"].extra["reason"]
    assert scores["pearson"].chance == 0.0 and scores["auroc"].chance == 0.5


def test_detection_scores(pairs):
    pred, true = pairs
    prob = np.clip(pred / 10, 0, 1)
    bacc, auc = scoring.score_detection(prob, true, scale=1)
    assert bacc.value == pytest.approx(balanced_accuracy_score(true > 0, prob >= 0.5))
    assert auc.value == pytest.approx(roc_auc_score(true > 0, prob))
    assert bacc.chance == 0.5


def test_aggregate_reports_null_both_ways():
    agg = scoring.summarize_values(np.array([0.9, np.nan, 0.3, 0.6]))
    assert agg["n"] == 4 and agg["n_null"] == 1
    assert agg["mean"] == pytest.approx(0.6) and agg["mean_null_as_0"] == pytest.approx(0.45)
    assert agg["share_ge_0.5"] == pytest.approx(2 / 3)
