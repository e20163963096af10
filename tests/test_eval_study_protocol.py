"""``eval.protocol: study``: each rule of the study's protocol against a computation written here.

Probe targets (groups, 2-class tasks, negatives, institutes kept) on a hand-made slice table; the
study's per-target scoring (probability column i) and its group coefficient tables for recovery,
replayed with scikit-learn as the study's scripts do; the orientation order of the R² batches;
fingerprint padding; the reference draw; the top-50 configuration ranking; the spec rules.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
import yaml
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import r2_score, roc_auc_score
from sklearn.model_selection import train_test_split
from test_eval_stage import write_artifacts

from medsae.errors import SpecError
from medsae.eval import retrieval as R
from medsae.eval.config import STUDY_PROBE_TARGETS, EvalSpec, ProbeTargetDef
from medsae.eval.probes import ProbeSettings
from medsae.eval.rows import study_probe_rows
from medsae.eval.stage import run_evaluate
from medsae.eval.study_probes import group_training_rows, run_group_probes, study_subsample
from medsae.eval.study_recovery import run_study_recovery, study_ns
from medsae.eval.study_table import Run, rank_runs
from medsae.eval.targets import StudyGroup, medsae_targets, skip_line, study_groups, study_order
from medsae.spec import load_specs, parse_specs
from medsae.stage import StageContext

ROOT = Path(__file__).resolve().parents[1]
STUDY_DEFS = [ProbeTargetDef(**t) for t in STUDY_PROBE_TARGETS]
SKLEARN = dict(backend="sklearn", device="cpu", seed=42, threads=1)


# -- probe targets ---------------------------------------------------------------------------------


def _metadata() -> tuple[pd.DataFrame, sp.csr_matrix, list[str], np.ndarray]:
    """Twelve slices: 8 train, 4 val, with every case the study's labels distinguish."""
    rows = [
        # modality, plane, sex, age_bin, kvp, institute, manufacturer, scanner_model, pathology, split
        ("ct", "axial", "f", "<40", "80", "B", "siemens", "Skyra", "tumor", "train"),
        ("ct", "coronal", "m", ">=80", "120.0", "C", "ge", None, "no_pathology", "train"),
        ("ct", "sagittal", "m", "40-60", "100", "B", "philips", None, "trauma", "train"),
        ("ct", "axial", "f", "<40", "120", "C", "siemens", None, "inflammation", "train"),
        ("mri", "axial", "f", ">=80", None, "B", "siemens", "Skyra", None, "train"),
        ("mri", "sagittal", "m", "60-80", None, "C", None, None, None, "train"),
        ("ct", "coronal", None, None, "80.0", "F", "ge", None, "tumor", "train"),
        ("mri", "coronal", "m", "<40", None, "F", "philips", None, None, "train"),
        ("ct", "axial", "m", ">=80", "120", "A", "siemens", None, "tumor", "val"),
        ("mri", "axial", "f", "<40", None, "B", "ge", None, None, "val"),
        ("ct", "sagittal", "f", "40-60", "80", "D", "philips", None, "trauma", "val"),
        ("ct", "coronal", "m", "<40", "140", "C", None, None, "no_pathology", "val"),
    ]
    cols = ["modality", "plane", "sex", "age_bin", "kvp", "institute", "manufacturer", "scanner_model", "pathology"]
    frame = pd.DataFrame([r[:-1] for r in rows], columns=cols)
    frame["split"] = [r[-1] for r in rows]
    vocab = ["brain", "gallbladder", "heart", "kidney_left", "liver", "spleen"]
    pres = np.zeros((len(rows), len(vocab)), dtype=np.int32)
    pres[[0, 1, 3, 8], vocab.index("liver")] = 1
    pres[[2, 4, 9], vocab.index("brain")] = 1
    pres[[0, 5, 6, 10], vocab.index("heart")] = 1
    pres[[1, 7], vocab.index("spleen")] = 1
    pres[[3], vocab.index("gallbladder")] = 1
    pres[[6, 11], vocab.index("kidney_left")] = 1
    return frame, sp.csr_matrix(pres), vocab, np.flatnonzero(frame["split"] == "train")


def test_study_targets_groups_two_class_tasks_negatives_and_institutes():
    frame, pres, vocab, train = _metadata()
    groups, skipped = study_groups(STUDY_DEFS, frame, pres, vocab, train)
    got = {g.group: g for g in groups}

    def first_match(value, classes, numeric=False):  # the study's multiclass label
        for i, c in enumerate(classes):
            if not pd.isna(value) and (float(value) == float(c) if numeric else value == c):
                return i
        return -1

    expect = {
        "modality": [first_match(v, ["mri", "ct"]) for v in frame["modality"]],
        "sex": [first_match(v, ["f", "m"]) for v in frame["sex"]],
        "slice_orientation": [
            first_match({"sagittal": "x", "coronal": "y", "axial": "z"}[p], ["x", "y", "z"]) for p in frame["plane"]
        ],
        "age_group": [first_match(v, ["<40", ">=80"]) for v in frame["age_bin"]],
        "kvp": [first_match(v, ["80.0", "120.0"], numeric=True) for v in frame["kvp"]],
        "institute": [first_match(v, list("ABCDEFGHIJ")) for v in frame["institute"]],
    }
    for name, labels in expect.items():
        assert got[name].kind == "multiclass"
        np.testing.assert_array_equal(got[name].y, labels, err_msg=name)
    # two-class groups keep both mirror targets; institutes absent from train (A, D) stay targets
    assert got["modality"].target_names() == ["modality=mri", "modality=ct"]
    assert got["institute"].classes == list("ABCDEFGHIJ")
    assert (got["institute"].y[train] != 0).all() and (got["institute"].y == 0).sum() == 1  # A only in val
    # multilabel: 0/1 on every slice, a missing value is a negative (MRI has no pathology record)
    manufacturer = [[int(v == c) for c in ("ge", "philips", "siemens")] for v in frame["manufacturer"]]
    np.testing.assert_array_equal(got["manufacturer"].y, manufacturer)
    pathology = [[int(v == c) for c in ("inflammation", "tumor", "trauma")] for v in frame["pathology"]]
    np.testing.assert_array_equal(got["pathology"].y, pathology)
    np.testing.assert_array_equal(got["organs_head_and_neck"].y[:, 0], pres[:, vocab.index("brain")].toarray().ravel())
    # scanner models: only Skyra has train positives; prostate and the thoracic bones are not in the data
    assert got["scanner_model"].classes == ["Skyra"]
    assert got["organs_abdominal"].classes == ["gallbladder", "kidney_left", "liver", "spleen"]
    assert got["organs_thoracic"].classes == ["heart"]
    named = {s.target: s.reason for s in skipped}
    assert named["scanner_model=Achieva"] == named["scanner_model=Avanto_fit"] == "no train positives"
    assert named["organs_abdominal=prostate"] == "not in the structure vocabulary"
    assert set(named) == {
        "scanner_model=Achieva",
        "scanner_model=Avanto_fit",
        "organs_abdominal=prostate",
        "organs_thoracic=sternum",
        "organs_thoracic=clavicula_left",
        "organs_thoracic=clavicula_right",
    }
    line = skip_line(skipped, "study")
    assert "\n" not in line and all(name in line for name in named)

    # the same pathology definition read by medsae's protocol: negatives = another recorded pathology
    targets, _ = medsae_targets([STUDY_DEFS[-1]], frame, pres, vocab)
    tumor = next(t for t in targets if t.name == "pathology=tumor")
    expected = [-1 if pd.isna(v) else int(v == "tumor") for v in frame["pathology"]]
    np.testing.assert_array_equal(tumor.y, expected)


def test_a_group_with_one_train_class_or_no_column_is_named_not_fatal():
    frame, pres, vocab, train = _metadata()
    frame = frame.drop(columns=["manufacturer"])
    frame.loc[frame["split"] == "train", "kvp"] = "120"  # one kvp class on the train split
    groups, skipped = study_groups(STUDY_DEFS, frame, pres, vocab, train)
    assert {"kvp", "manufacturer"}.isdisjoint(g.group for g in groups)
    named = {s.target: s.reason for s in skipped}
    assert named["kvp"] == "1 of 2 classes on the train split: 120.0"
    assert named["manufacturer"] == "no column 'manufacturer' in the slice table"


# -- probes and recovery, replayed with scikit-learn ---------------------------------------------------


def _probe_data(seed: int = 0):
    """600 slices, 8 sparse-ish features; institute-like labels with A and D absent from train."""
    rng = np.random.default_rng(seed)
    n, d = 600, 8
    split = np.where(np.arange(n) % 3 == 0, "val", "train")
    institute = rng.choice(list("BCE"), n)
    institute[(split == "val") & (rng.random(n) < 0.2)] = "A"
    x = rng.random((n, d)) * (rng.random((n, d)) < 0.6)
    x[:, 0] += 1.5 * (institute == "B")
    x[:, 1] += 1.0 * (institute == "C")
    a = rng.random(n) < 0.4
    b = rng.random(n) < 0.3
    x[:, 2] += 0.6 * a  # label a: a weak latent
    x[:, 5] += 4.0 * b  # label b: a strong one, which tops the group's table
    frame = pd.DataFrame({"institute": institute, "split": split, "plane": "axial"})
    frame["a"] = np.where(a, "yes", "no")
    frame["b"] = np.where(b, "yes", "no")
    return frame, x.astype(np.float64), np.flatnonzero(split == "train"), np.flatnonzero(split == "val")


def _study_fit(x, y):
    model = LogisticRegression(
        C=1.0, l1_ratio=0.5, solver="saga", class_weight="balanced", max_iter=1000, tol=1e-4, random_state=42
    )
    return model.fit(x, y)


def test_group_probes_score_probability_column_i_as_the_study():
    frame, x, train, val = _probe_data()
    defs = [
        ProbeTargetDef(group="institute", kind="multiclass", column="institute", classes=list("ABCDE")),
        ProbeTargetDef(group="labels", kind="multilabel", column="a", classes=["yes"]),
    ]
    groups, _ = study_groups(defs, frame, None, None, train)
    settings = ProbeSettings(max_train=10_000, **SKLEARN)
    probes = run_group_probes(groups, train, {"val": val}, {"sparse": x}, settings)
    inst = probes[0]
    # the study: labelled train rows, classes_ = those present (B, C, E), AUC of target i on column i
    y = groups[0].y
    model = _study_fit(x[train], y[train])
    proba = model.predict_proba(x[val])
    assert list(model.classes_) == [1, 2, 4]
    for i, name in enumerate(groups[0].target_names()):
        truth = y[val] == i
        if i < proba.shape[1] and 0 < truth.sum() < len(truth):
            assert inst.aucs["val"][name] == pytest.approx(roc_auc_score(truth, proba[:, i]), abs=1e-6), name
        else:
            assert np.isnan(inst.aucs["val"][name]), name
    # target B is scored on C's column (the study's indexing), so it is far from B's own quality
    own = roc_auc_score(y[val] == 1, proba[:, 0])
    assert own > 0.9 and inst.aucs["val"]["institute=B"] < 0.7
    # the group's coefficient table: mean |coef| over classes, ties to the higher index
    score = np.abs(model.coef_).mean(axis=0)
    np.testing.assert_allclose(inst.importance(), score, atol=1e-6)
    assert inst.ranking(4).tolist() == np.argsort(score, kind="stable")[::-1][:4].tolist()


def test_two_class_groups_count_twice_in_the_means():
    frame, x, train, val = _probe_data(1)
    frame["sex"] = np.where(x[:, 0] > 0.9, "f", "m")
    defs = [
        ProbeTargetDef(group="sex", kind="multiclass", column="sex", classes=["f", "m"]),
        ProbeTargetDef(group="labels", kind="multilabel", column="a", classes=["yes"]),
    ]
    groups, _ = study_groups(defs, frame, None, None, train)
    settings = ProbeSettings(max_train=10_000, **SKLEARN)
    probes = run_group_probes(groups, train, {"val": val}, {"dense": x, "sparse": x[:, :4]}, settings)
    dense = {k: v for p in probes if p.features == "dense" for k, v in p.aucs["val"].items()}
    assert dense["sex=f"] == pytest.approx(dense["sex=m"], abs=1e-12)  # mirror targets
    rows = {(m.name, m.target): m for m in study_probe_rows(probes, ["val"], 0.6)}
    kept = [a for a in dense.values() if a >= 0.6]
    assert rows["probe_auc_dense_mean", None].value == pytest.approx(np.mean(kept))
    assert rows["probe_auc_dense_mean", None].n == len(kept) == 3  # sex twice, the label once


def test_recovery_uses_the_group_table_and_the_group_subsample():
    frame, x, train, val = _probe_data(2)
    presence = sp.csr_matrix(np.stack([frame["a"] == "yes", frame["b"] == "yes"], axis=1).astype(np.int32))
    defs = [ProbeTargetDef(group="labels", kind="multilabel", column="structure", classes=["a", "b"])]
    groups, _ = study_groups(defs, frame, presence, ["a", "b"], train)
    settings = ProbeSettings(max_train=300, max_iter=1000, **SKLEARN)
    probes = run_group_probes(groups, train, {"val": val}, {"sparse": x}, settings)
    rec_settings = ProbeSettings(max_train=250, max_iter=200, **SKLEARN)
    curves, inexact = run_study_recovery(
        probes, {"val": probes[0].aucs["val"]}, train, {"val": val}, x, rec_settings, [1, 2, 5], 0.55, "val", top=6
    )
    assert not inexact
    # the study, replayed: group sub-samples by label combination, MultiOutputClassifier, mean |coef| table
    y = groups[0].y
    combos = np.array(["".join(map(str, r)) for r in y[train]])
    fit_rows = train[
        np.sort(train_test_split(np.arange(len(train)), train_size=300, stratify=combos, random_state=42)[0])
    ]
    coefs = np.stack([_study_fit(x[fit_rows], y[fit_rows, j]).coef_[0] for j in range(2)])
    table = np.argsort(np.abs(coefs).mean(axis=0), kind="stable")[::-1][:6]
    nnz = int(np.any(coefs != 0, axis=0).sum())
    rec_rows = train[
        np.sort(train_test_split(np.arange(len(train)), train_size=250, stratify=combos, random_state=42)[0])
    ]
    by_task = {c.task: c for c in curves}
    assert set(by_task) == {"labels=a", "labels=b"}
    for j, task in enumerate(["labels=a", "labels=b"]):
        curve = by_task[task]
        assert curve.ns == sorted({1, 2, 5, nnz} & set(range(0, 7)))
        for n, auc in zip(curve.ns, curve.auc["val"], strict=True):
            cols = table[:n]
            if n == 0:
                continue
            model = _study_fit(x[rec_rows][:, cols], y[rec_rows, j])
            model.max_iter = 200
            model.fit(x[rec_rows][:, cols], y[rec_rows, j])
            expected = roc_auc_score(y[val, j], model.predict_proba(x[val][:, cols])[:, 1])
            assert auc == pytest.approx(expected, abs=1e-6), (task, n)
    # with one latent, the label whose own best latent is not the table's first gets the other's: near
    # chance, though its own latent alone reads it (medsae's per-target tables would use that one)
    own = np.abs(coefs).argmax(axis=1)
    j = int(np.flatnonzero(own != table[0])[0])
    assert by_task[["labels=a", "labels=b"][j]].auc["val"][0] < 0.6
    assert roc_auc_score(y[val, j], x[val, own[j]]) > 0.65


def test_study_ns_and_subsample():
    assert study_ns([1, 2, 3, 5, 10], n_nonzero=4, available=6) == [1, 2, 3, 4, 5]
    assert study_ns([1, 2, 3, 5, 10], n_nonzero=0, available=100) == [0, 1, 2, 3, 5, 10]
    assert study_ns([1, 2, 100], n_nonzero=150, available=100) == [1, 2, 100]
    strata = np.repeat([0, 1, 2], [50, 30, 20])
    got, exact = study_subsample(strata, 40, 42)
    assert exact
    np.testing.assert_array_equal(
        got, np.sort(train_test_split(np.arange(100), train_size=40, stratify=strata, random_state=42)[0])
    )
    _, exact = study_subsample(np.array([0] * 50 + [1]), 20, 42)  # a class of one: the study's split fails
    assert not exact
    # a multilabel group stratifies by its label combination, which the study wrote as text
    rng = np.random.default_rng(0)
    labels = (rng.random((400, 3)) < [0.5, 0.3, 0.6]).astype(np.int64)
    group = StudyGroup("g", "multilabel", ["a", "b", "c"], labels)
    rows = np.arange(400)
    text = np.array(["".join(map(str, r)) for r in labels])
    study_rows = np.sort(train_test_split(rows, train_size=150, stratify=text, random_state=42)[0])
    np.testing.assert_array_equal(group_training_rows(group, rows, 150, 42)[0], study_rows)


def test_a_class_without_train_rows_gets_no_recovery_curve():
    frame, x, train, val = _probe_data(3)
    frame.loc[val[:40], "institute"] = "D"  # D only on val
    defs = [ProbeTargetDef(group="institute", kind="multiclass", column="institute", classes=list("BCDE"))]
    groups, _ = study_groups(defs, frame, None, None, train)
    rows, _ = group_training_rows(groups[0], train, 10_000, 42)
    assert set(groups[0].y[rows]) == {0, 1, 3}
    settings = ProbeSettings(max_train=10_000, **SKLEARN)
    probes = run_group_probes(groups, train, {"val": val}, {"sparse": x}, settings)
    base = {"val": {name: 0.9 for name in groups[0].target_names()}}  # every target passes the AUC filter
    curves, _ = run_study_recovery(probes, base, train, {"val": val}, x, settings, [1, 2], 0.55, "val", top=4)
    assert [c.task for c in curves] == ["institute=B", "institute=C", "institute=E"]


# -- row order, fingerprints, references, ranking ---------------------------------------------------


def test_r2_batches_follow_the_study_orientation_order(tmp_path):
    slices, x, codes, sae = write_artifacts(tmp_path, n_scans=12, per_scan=12)
    val = np.flatnonzero(slices["split"] == "val")
    letter = {"sagittal": "x", "coronal": "y", "axial": "z"}
    order = sorted(
        val,
        key=lambda i: (
            slices.at[i, "modality"],
            slices.at[i, "image_id"],
            letter[slices.at[i, "plane"]],
            slices.at[i, "idx"],
        ),
    )
    np.testing.assert_array_equal(study_order(slices, val), order)
    common = dict(probes=False, recovery=False, monosemanticity=False, retrieval=False, plots=False, study_batch=16)
    by = {}
    for protocol in ("medsae", "study"):
        out = tmp_path / f"out_{protocol}"
        out.mkdir()
        ctx = StageContext(
            kind="evaluate",
            key="k" * 64,
            out_dir=out,
            work_dir=tmp_path / f"work_{protocol}",
            inputs={k: tmp_path / k for k in ("slices", "embed", "train", "encode")},
            input_keys={},
            seed=0,
            quiet=True,
            spec=EvalSpec(protocol=protocol, **common),
        )
        result = run_evaluate(ctx)
        by[protocol] = {m.name: m.value for m in result.metrics if m.split == "val" and m.target is None}

    def study_r2(rows):
        with torch.no_grad():
            x_in = sae.normalize(torch.from_numpy(x[rows])).numpy().astype(np.float64)
            x_hat = sae.decode(torch.from_numpy(codes[rows])).numpy().astype(np.float64)
        batches = [(s, min(s + 16, len(rows))) for s in range(0, len(rows), 16)]
        return np.average(
            [r2_score(x_in[a:b].ravel(), x_hat[a:b].ravel()) for a, b in batches], weights=[b - a for a, b in batches]
        )

    assert by["study"]["r2_scalar_mean_study"] == pytest.approx(study_r2(np.array(order)), rel=1e-6)
    assert by["medsae"]["r2_scalar_mean_study"] == pytest.approx(study_r2(val), rel=1e-6)
    assert abs(by["study"]["r2_scalar_mean_study"] - by["medsae"]["r2_scalar_mean_study"]) > 1e-6
    alive = [(codes[np.array(order)][s : s + 16] > 1e-8).any(axis=0).sum() for s in range(0, len(order), 16)]
    sizes = [min(16, len(order) - s) for s in range(0, len(order), 16)]
    assert by["study"]["alive_per_batch_study"] == pytest.approx(np.average(alive, weights=sizes))
    assert by["study"]["fvu"] == pytest.approx(by["medsae"]["fvu"], rel=1e-9)  # order-free metrics agree


def test_target_definitions_under_medsae_protocol(tmp_path, caplog):
    write_artifacts(tmp_path, n_scans=12, per_scan=12)
    same_as_modality = {"group": "mod2", "kind": "multiclass", "column": "modality", "classes": ["ct", "mri"]}
    targets = [
        "modality",
        same_as_modality,
        {"group": "inst", "kind": "multiclass", "column": "institute", "classes": ["B", "C", "F"]},
        {"group": "kv", "kind": "multilabel", "column": "kvp", "classes": ["120"]},
    ]
    out = tmp_path / "out"
    out.mkdir()
    spec = EvalSpec(
        probe_targets=targets,
        recovery=False,
        monosemanticity=False,
        retrieval=False,
        plots=False,
        probe_min_positives=5,
        probe_max_iter=200,
    )
    ctx = StageContext(
        kind="evaluate",
        key="k" * 64,
        out_dir=out,
        work_dir=tmp_path / "work",
        inputs={k: tmp_path / k for k in ("slices", "embed", "train", "encode")},
        input_keys={},
        seed=0,
        quiet=True,
        spec=spec,
    )
    with caplog.at_level("WARNING", logger="medsae"):
        result = run_evaluate(ctx)
    auc = {(m.name, m.target): m.value for m in result.metrics if m.split == "val"}
    # a definition reading the same column with the same classes is the built-in target, number for number
    assert auc["probe_auc_dense", "mod2"] == auc["probe_auc_dense", "modality"]
    assert auc["probe_auc_sparse", "mod2"] == auc["probe_auc_sparse", "modality"]
    assert {("probe_auc_dense", f"inst={c}") for c in "BCF"} <= set(auc)
    lines = [r.getMessage() for r in caplog.records if "skipped probe targets" in r.getMessage()]
    assert lines == ["evaluate (medsae protocol): skipped probe targets: kv (no column 'kvp' in the slice table)"]
    assert result.summary["skipped_probe_targets"] == lines[0]


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    return 0.0 if na == 0 or nb == 0 else float(a @ b / (na * nb))


def test_padded_fingerprint_cosine_for_k_above_the_active_latents():
    rng = np.random.default_rng(0)
    n, d = 30, 10
    codes = rng.random((n, d)) * (rng.random((n, d)) < 0.4)
    codes[:, 1] = 0.5 + rng.random(n)  # always active: never in a fingerprint
    ref = np.zeros(d)
    ref[[1, 3, 6]] = [2.0, 0.9, 0.4]  # fires on 2 usable latents
    codes[0] = ref
    masked = R.study_always_active(sp.csr_matrix(codes))
    assert masked.tolist() == [j == 1 for j in range(d)]
    latents = R.study_fingerprint(ref, 5, masked)
    # the study: active latents by value, then zero-valued ones from the highest index down
    assert latents.tolist() == [3, 6, 9, 8, 7]
    scores = R.study_fingerprint_scores(sp.csc_matrix(codes), ref, latents, [1, 2, 5])
    for i in range(n):
        assert scores[0, i] == pytest.approx(1 / (1 + abs(0.9 - codes[i, 3])))
        assert scores[1, i] == pytest.approx(_cos(ref[[3, 6]], codes[i, [3, 6]]))
        assert scores[2, i] == pytest.approx(_cos(ref[[3, 6, 9, 8, 7]], codes[i, [3, 6, 9, 8, 7]]))
    # padding matters: a slice firing on a padded latent is less similar than without padding
    hit = next(i for i in range(1, n) if codes[i, [3, 6]].any() and codes[i, [7, 8, 9]].any())
    assert scores[2, hit] < _cos(ref[[3, 6]], codes[hit, [3, 6]]) - 1e-6
    # retrieval: the 3 best scans by the padded cosine, brute force
    scan = np.array([f"s{i // 3}" for i in range(n)])
    index = R.ScanIndex.build(scan)
    got = R.study_sparse_fingerprint_retrieval(sp.csr_matrix(codes), np.array([0]), index, [5], top=3)[5][0]
    best: dict[str, tuple[float, int]] = {}
    for i in range(3, n):
        s = _cos(ref[latents], codes[i, latents])
        if scan[i] not in best or s > best[scan[i]][0]:
            best[scan[i]] = (s, i)
    expected = [i for _, i in sorted(best.values(), key=lambda t: (-t[0], scan[t[1]]))[:3]]
    assert got.tolist() == expected


def test_reference_draw_is_the_studys():
    np.random.seed(0)
    expected = np.random.choice(500, size=40, replace=False)
    np.testing.assert_array_equal(R.study_reference_rows(500, 40), expected)
    np.testing.assert_array_equal(R.study_reference_rows(30, 40), np.arange(30))


def _run(rid: str, embed: str, m10: float | None, m50: float | None, mean_n: float | None) -> Run:
    metrics = {("mono_config_top10", None, None): m10, ("monosemanticity_top50_mean", None, None): m50}
    metrics[("recovery_mean_n_features", None, None)] = mean_n
    return Run(rid, rid, "study", "cfg", "bb", embed, rid, None, metrics)


def test_top50_ranking_order():
    runs = [
        _run("a", "e1", 0.90, 0.40, 12.0),
        _run("b", "e1", 0.80, 0.60, 10.0),
        _run("c", "e1", 0.70, 0.60, 30.0),
        _run("d", "e1", 0.95, 0.20, 8.0),
        _run("e", "e1", 0.85, None, 1.0),  # no top-50 score: not ranked (the study joined both tables)
        _run("f", "e2", 0.10, 0.10, 50.0),  # another embedding: ranked on its own
    ]
    got = rank_runs(runs, "monosemanticity_top50_mean")
    # by hand: mono ranks (desc, ties min) b=1 c=1 a=3 d=4; perf ranks (asc) d=1 b=2 a=3 c=4;
    # combined b=1.5 c=2.5 a=3 d=2.5 -> final b=1, c=2, d=2, a=4
    assert {k: (v["rank_mono"], v["rank_perf"], v["final_rank"]) for k, v in got.items()} == {
        "a": (3, 3, 4),
        "b": (1, 2, 1),
        "c": (1, 4, 2),
        "d": (4, 1, 2),
        "f": (1, 1, 1),
    }
    top10 = rank_runs(runs, "mono_config_top10")
    # by the top-10 mean: mono d=1 a=2 e=3 b=4 c=5, perf e=1 d=2 b=3 a=4 c=5 -> final d=1 e=2 a=3 b=4 c=5
    assert {k: v["final_rank"] for k, v in top10.items()} == {"d": 1, "e": 2, "a": 3, "b": 4, "c": 5, "f": 1}


# -- the spec ----------------------------------------------------------------------------------------


def test_protocol_spec_rules(tmp_path):
    plain = parse_specs({"name": "x", "data": {"root": "d"}})[0]
    assert '"protocol"' not in plain.canonical_json()  # default protocol: keys and hashes as before
    study = parse_specs({"name": "x", "data": {"root": "d"}, "eval": {"protocol": "study"}})[0]
    assert [t.group for t in study.eval.probe_targets] == [t["group"] for t in STUDY_PROBE_TARGETS]
    assert study.spec_hash() != plain.spec_hash()
    path = tmp_path / "bad.yaml"
    path.write_text(
        yaml.safe_dump(
            {"name": "x", "data": {"root": "d"}, "eval": {"protocol": "study", "probe_targets": ["structure"]}}
        )
    )
    with pytest.raises(SpecError) as err:
        load_specs(path)
    assert str(err.value).startswith(f"{path}:eval.probe_targets: protocol study takes target definitions")
    custom = {"group": "kvp", "kind": "multiclass", "column": "kvp", "classes": ["80", "120"]}
    mixed = parse_specs({"name": "x", "data": {"root": "d"}, "eval": {"probe_targets": ["modality", custom]}})[0]
    assert mixed.eval.probe_targets[1] == ProbeTargetDef(**custom)


def test_every_shipped_spec_validates_and_the_study_specs_use_the_study_protocol():
    for path in sorted((ROOT / "experiments").glob("*.yaml")):
        specs = load_specs(path)
        assert specs, path
        if path.stem.startswith("study_"):
            assert all(s.eval.protocol == "study" for s in specs), path
            assert [t.group for t in specs[0].eval.probe_targets] == [t["group"] for t in STUDY_PROBE_TARGETS]
    reproduce = load_specs(ROOT / "experiments" / "study_reproduce.yaml")[0]
    assert (reproduce.sae.levels, reproduce.sae.level_k) == ([128, 512, 2048, 8192], [5, 10, 20, 40])
    assert reproduce.embed.model == "facebook/dinov3-vitl16-pretrain-lvd1689m"
