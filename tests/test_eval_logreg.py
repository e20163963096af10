"""The torch elastic-net logistic regression against scikit-learn's saga (the study's solver)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.linear_model import LogisticRegression
from sklearn.utils.class_weight import compute_sample_weight

from medsae.eval import logreg


def sk_fit(x, y, **kw):
    model = LogisticRegression(
        C=1.0,
        l1_ratio=0.5,
        solver="saga",
        class_weight="balanced",
        max_iter=20_000,
        tol=1e-7,
        random_state=0,
        **kw,
    )
    return model.fit(x, y)


def sk_objective(coef, intercept, x, y):
    """scikit-learn's objective C Σ s_i ℓ_i + (1-ρ)/2 ‖W‖² + ρ ‖W‖₁ (C = 1, ρ = 0.5), written out."""
    s = compute_sample_weight("balanced", y)
    z = x @ coef + intercept
    if coef.shape[1] == 1:
        loss = np.logaddexp(0, z[:, 0]) - y * z[:, 0]
    else:
        loss = -(z[np.arange(len(y)), y] - np.log(np.exp(z).sum(axis=1)))
    return np.sum(s * loss) + 0.25 * np.sum(coef**2) + 0.5 * np.abs(coef).sum()


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 12)) * rng.uniform(0.5, 2, size=12) + rng.normal(size=12) * 3
    logit = x[:, 0] - 0.7 * x[:, 3] + 0.5 * rng.normal(size=400) - 2
    y = (logit > np.quantile(logit, 0.7)).astype(int)  # imbalanced: balanced weights matter
    y3 = np.digitize(x[:, 1] + 0.5 * x[:, 2] + 0.3 * rng.normal(size=400), np.quantile(x[:, 1], [0.3, 0.6]))
    return x, y, y3


def test_balanced_weights_match_sklearn(data):
    _, y, y3 = data
    np.testing.assert_allclose(logreg.balanced_weights(y, 2), compute_sample_weight("balanced", y))
    np.testing.assert_allclose(logreg.balanced_weights(y3, 3), compute_sample_weight("balanced", y3))
    w = logreg.balanced_weights(np.array([0, 0, 1, -1]), 2)
    assert w[3] == 0 and w[:3].sum() == pytest.approx(3)


def test_binary_matches_sklearn_optimum(data):
    x, y, _ = data
    ref = sk_fit(x, y)
    fit = logreg.fit_binary(x, y, max_iter=5000, tol=1e-6, device="cpu")
    ours = sk_objective(fit.coef, fit.intercept, x, y)
    theirs = sk_objective(ref.coef_.T, ref.intercept_, x, y)
    assert ours == pytest.approx(theirs, rel=1e-4)
    np.testing.assert_allclose(fit.coef[:, 0], ref.coef_[0], atol=5e-3)
    assert fit.intercept[0] == pytest.approx(ref.intercept_[0], rel=2e-3)  # large offsets: flat direction


def test_multinomial_matches_sklearn_optimum(data):
    x, _, y3 = data
    ref = sk_fit(x, y3)
    fit = logreg.fit_multinomial(x, y3, 3, max_iter=5000, tol=1e-6, device="cpu")
    ours = sk_objective(fit.coef, fit.intercept, x, y3)
    theirs = sk_objective(ref.coef_.T, ref.intercept_, x, y3)
    assert ours == pytest.approx(theirs, rel=1e-4)
    np.testing.assert_allclose(fit.predict_proba(x), ref.predict_proba(x), atol=5e-3)


def test_sparse_input_batched_columns_masks_and_unlabelled_rows(data):
    x, y, y3 = data
    y2 = (y3 == 2).astype(int)
    both = logreg.fit_binary(x, np.stack([y, y2], axis=1), max_iter=5000, tol=1e-6, device="cpu")
    alone = logreg.fit_binary(x, y2, max_iter=5000, tol=1e-6, device="cpu")
    np.testing.assert_allclose(both.coef[:, 1], alone.coef[:, 0], atol=1e-3)
    # sparse CSR input: same problem, same answer
    xs = x.copy()
    xs[np.abs(xs) < 1.0] = 0
    dense_fit = logreg.fit_binary(xs, y, max_iter=5000, tol=1e-6, device="cpu")
    sparse_fit = logreg.fit_binary(sp.csr_matrix(xs), y, max_iter=5000, tol=1e-6, device="cpu")
    np.testing.assert_allclose(sparse_fit.coef, dense_fit.coef, atol=1e-3)
    # a feature mask equals fitting on the kept columns only
    mask = np.zeros(12, bool)
    mask[[0, 3, 5]] = True
    masked = logreg.fit_binary(x, y, feature_mask=mask, max_iter=5000, tol=1e-6, device="cpu")
    sub = logreg.fit_binary(x[:, mask], y, max_iter=5000, tol=1e-6, device="cpu")
    assert np.all(masked.coef[~mask] == 0)
    np.testing.assert_allclose(masked.coef[mask, 0], sub.coef[:, 0], atol=1e-3)
    # rows labelled -1 are ignored
    y_missing = y.copy()
    y_missing[:100] = -1
    partial = logreg.fit_binary(x, y_missing, max_iter=5000, tol=1e-6, device="cpu")
    subset = logreg.fit_binary(x[100:], y[100:], max_iter=5000, tol=1e-6, device="cpu")
    np.testing.assert_allclose(partial.coef, subset.coef, atol=1e-3)


def test_sklearn_backend_is_the_study_classifier(data):
    x, y, _ = data
    fit = logreg.fit_binary(x, y, backend="sklearn", max_iter=20_000, tol=1e-7, seed=0)
    ref = sk_fit(x, y)
    np.testing.assert_allclose(fit.coef[:, 0], ref.coef_[0], atol=1e-9)
    with pytest.raises(ValueError):
        logreg.fit_binary(x, y, backend="nope")
