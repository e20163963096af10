"""Probe targets, sub-sampling, scoring and the end-to-end probe run against sklearn."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from medsae.eval import probes


def toy_slices(n: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "slice_id": np.arange(n),
            "modality": rng.choice(["ct", "mri"], n, p=[0.7, 0.3]),
            "plane": rng.choice(["axial", "coronal", "sagittal"], n),
            "sex": rng.choice(["m", "f", None], n, p=[0.45, 0.45, 0.1]),
            "age_bin": rng.choice(["<40", "40-60", "60-80", ">=80", None], n),
            "institute": rng.choice(["A", "B", "C", "Z"], n, p=[0.4, 0.3, 0.29, 0.01]),
            "pathology": rng.choice(["tumor", "trauma", "no_pathology", None], n),
            "split": rng.choice(["train", "val", "test"], n, p=[0.6, 0.2, 0.2]),
        }
    )


def test_targets_follow_the_study_labels():
    df = toy_slices(400)
    presence = sp.csr_matrix(np.random.default_rng(1).random((400, 3)) < 0.3)
    targets = {t.name: t for t in probes.build_targets(df, presence=presence, vocab=["a", "b", "liver"])}
    age = targets["age_group"]
    assert age.classes == ["<40", ">=80"]
    expected = df["age_bin"].map({"<40": 0, ">=80": 1}).fillna(-1).to_numpy()
    np.testing.assert_array_equal(age.y, expected)  # 40-80 and missing are unlabelled
    tumor = targets["pathology=tumor"].y
    np.testing.assert_array_equal(tumor == -1, df["pathology"].isna().to_numpy())
    np.testing.assert_array_equal(tumor == 1, (df["pathology"] == "tumor").to_numpy())
    np.testing.assert_array_equal(targets["structure=liver"].y, presence[:, 2].toarray().ravel())
    assert targets["plane"].multiclass and not targets["modality"].multiclass
    # institute Z has too few training rows: dropped from the target, its rows unlabelled
    train = np.flatnonzero(df["split"] == "train")
    selected = {t.name: t for t in probes.select_targets(list(targets.values()), train, min_count=10)}
    inst = selected["institute"]
    assert inst.classes == ["A", "B", "C"]
    np.testing.assert_array_equal(inst.y == -1, (df["institute"] == "Z").to_numpy())
    leaves = [name for name, _ in selected["plane"].leaves()]
    assert leaves == ["plane=axial", "plane=coronal", "plane=sagittal"]


def test_stratified_subsample_keeps_proportions():
    rng = np.random.default_rng(3)
    strata = rng.choice(["a", "b", "c"], 5000, p=[0.6, 0.3, 0.1])
    picked = probes.stratified_subsample(strata, 1000, seed=0)
    assert len(picked) == 1000 and len(np.unique(picked)) == 1000
    for value in "abc":
        share = np.mean(strata == value)
        assert abs(np.sum(strata[picked] == value) - 1000 * share) <= 1
    np.testing.assert_array_equal(picked, probes.stratified_subsample(strata, 1000, seed=0))
    assert len(probes.stratified_subsample(strata[:50], 1000, seed=0)) == 50


def test_macro_ovr_auc_matches_sklearn():
    rng = np.random.default_rng(4)
    y = rng.integers(0, 3, 300)
    logits = rng.normal(size=(300, 3)) + np.eye(3)[y]
    proba = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    macro, per_class = probes.roc_auc_ovr(y, proba)
    assert macro == pytest.approx(roc_auc_score(y, proba, multi_class="ovr", average="macro"), rel=1e-12)
    assert per_class[1] == pytest.approx(roc_auc_score(y == 1, proba[:, 1]))
    assert np.isnan(probes.roc_auc(np.ones(5), np.arange(5)))
    # the rank-based AUC of many columns at once equals sklearn's, ties included
    scores = np.round(rng.normal(size=(300, 4)) + (y == 1)[:, None], 1)
    expected = [roc_auc_score(y == 1, scores[:, c]) for c in range(4)]
    np.testing.assert_allclose(probes.roc_auc_columns(y == 1, scores), expected, rtol=1e-12)


def test_probes_on_readable_and_unreadable_labels_match_sklearn():
    n, d = 900, 24
    rng = np.random.default_rng(5)
    df = toy_slices(n, seed=5)
    x = rng.normal(size=(n, d))
    x[:, 0] += 3.0 * (df["modality"] == "mri").to_numpy()  # modality is linearly readable
    x[:, 1:4] += 2.0 * np.eye(3)[df["plane"].map({"axial": 0, "coronal": 1, "sagittal": 2}).to_numpy()]
    train = np.flatnonzero(df["split"] == "train")
    evals = {"val": np.flatnonzero(df["split"] == "val")}
    targets = probes.select_targets(probes.build_targets(df, ["modality", "plane", "sex"]), train, 10)
    settings = probes.ProbeSettings(max_train=400, device="cpu", seed=0)
    results = probes.run_probes(
        targets, train, evals, {"dense": x, "sparse": sp.csr_matrix(np.maximum(x, 0))}, settings
    )
    by = {(r.features, r.target.name): r for r in results}
    assert by["dense", "modality"].scores["val"]["auc"] > 0.95
    assert by["dense", "plane"].scores["val"]["auc"] > 0.9
    assert 0.35 < by["dense", "sex"].scores["val"]["auc"] < 0.65  # sex is noise here
    # the same probe with the study's sklearn classifier on the same sub-sample gives the same AUC
    res = by["dense", "modality"]
    y = res.target.y
    lab = train[y[train] >= 0]
    rows = lab[probes.stratified_subsample(y[lab], 400, 0)]
    assert res.n_train == len(rows) == 400
    ref = LogisticRegression(
        C=1.0, l1_ratio=0.5, solver="saga", class_weight="balanced", max_iter=5000, random_state=0
    ).fit(x[rows], y[rows])
    val = evals["val"][y[evals["val"]] >= 0]
    expected = roc_auc_score(y[val], ref.decision_function(x[val]))
    assert res.scores["val"]["auc"] == pytest.approx(expected, abs=0.01)
    assert res.scores["val"]["n"] == len(val)
