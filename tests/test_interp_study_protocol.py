"""``interpret.protocol: study``: each rule of the study's auto-interpretation against an independent computation.

Unit rules (selection order, diverse samples, distractor eligibility, parsing and rank, the explainer's
post-processing, the metadata block) are checked against computations written here; the vision path
runs through the local OpenAI-compatible server on a real phantom (images and sampling settings as
sent); the whole protocol runs as stages on real files with the offline ``medsae/baseline`` provider,
and its rows are read back through the registry query ``medsae study-table`` uses.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import math
import re
import shutil
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from PIL import Image

from medsae.interp.config import LLM_ONLY_FIELDS, InterpretSpec
from medsae.interp.study import judge, samples, selection
from medsae.interp.study.blocks import Sample, block
from medsae.interp.study.prompting import clean_description

sys.path.insert(0, str(Path(__file__).parent))
import interp_fixtures as synthetic
from llm_server import llm_server_fixture  # noqa: F401

# --------------------------------------------------------------------------- independent computations


def expected_selection(
    mono: dict[int, float], tables: dict[str, list[int]], always: set[int], n: int
) -> tuple[list[int], dict[int, float]]:
    """The study's selection written out with plain Python sorts: (latents, combined rank per latent)."""
    by_mono = sorted(mono, key=lambda lat: (math.isnan(mono[lat]), -(0 if math.isnan(mono[lat]) else mono[lat]), lat))
    mono_rank = {lat: i + 1 for i, lat in enumerate(by_mono)}
    ranks: dict[int, list[int]] = defaultdict(list)
    for latents in tables.values():
        for i, lat in enumerate(latents):
            ranks[lat].append(i + 1)
    avg = {lat: sum(r) / len(r) for lat, r in ranks.items()}
    coeff_rank = {lat: i + 1 for i, lat in enumerate(sorted(avg, key=lambda lat: (avg[lat], lat)))}
    fill = max(max(mono_rank.values()), max(coeff_rank.values())) + 1
    latents = set(mono_rank) | set(coeff_rank)
    combined = {lat: (mono_rank.get(lat, fill) + coeff_rank.get(lat, fill)) / 2 for lat in latents}
    order = sorted(latents, key=lambda lat: (combined[lat], lat))
    return [lat for lat in order if lat not in always][:n], combined


def brute_force_diverse(vectors: np.ndarray, values: np.ndarray, image: list[str], n_cand: int, n_pick: int):
    """Rows by descending value (ties: later row first), first per image, then greedy max-min cosine."""
    order = sorted(range(len(values)), key=lambda r: (-values[r], -r))
    seen, cands = set(), []
    for r in order:
        if image[r] not in seen:
            seen.add(image[r])
            cands.append(r)
        if len(cands) == n_cand:
            break

    def cos(a, b):
        na, nb = np.linalg.norm(a), np.linalg.norm(b)
        return 0.0 if na == 0 or nb == 0 else float(a @ b / (na * nb))

    picked = [0]
    while len(picked) < min(n_pick, len(cands)):
        scores = {i: min(1 - cos(vectors[cands[i]], vectors[cands[j]]) for j in picked) for i in range(len(cands))}
        best = max((i for i in scores if i not in picked), key=lambda i: (scores[i], -i))
        picked.append(best)
    return [cands[i] for i in picked]


# --------------------------------------------------------------------------- selection


MONO = {3: 0.9, 5: 0.9, 2: 0.7, 1: 0.5, 9: 0.1, 8: float("nan")}
TABLES = {"g/a": [5, 1, 7, 3], "g/b": [7, 6, 5], "h/c": [1, 7]}


def _frames(mono: dict[int, float], tables: dict[str, list[int]]) -> tuple[pd.DataFrame, pd.DataFrame]:
    m = pd.DataFrame({"latent": list(mono), "mono_50": list(mono.values())})
    c = pd.DataFrame(
        [{"table": t, "rank": i + 1, "latent": lat} for t, lats in tables.items() for i, lat in enumerate(lats)]
    )
    return m, c


def test_selection_follows_the_combined_rank_with_ties_missing_ranks_and_always_active():
    mono, coef = _frames(MONO, TABLES)
    chosen = selection.select_latents(mono, coef, always_active=[2], n=5)
    # by hand: mono ranks 3:1 5:2 2:3 1:4 9:5 8:6 (the 0.9 tie: lower latent first; NaN last);
    # mean table ranks 1:1.5 5:2 6:2 7:2 3:4 -> ranks 1:1 5:2 6:3 7:4 3:5; a missing rank is 6 + 1 = 7
    assert chosen["latent"].tolist() == [5, 1, 3, 6, 7]
    assert chosen["combined_rank"].tolist() == [2.0, 2.5, 3.0, 5.0, 5.5]
    assert chosen["order"].tolist() == [1, 2, 3, 4, 5]
    expected, combined = expected_selection(MONO, TABLES, {2}, 5)
    assert chosen["latent"].tolist() == expected
    assert np.allclose(chosen["combined_rank"], [combined[x] for x in expected])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_selection_matches_plain_python_on_random_tables(seed):
    rng = np.random.default_rng(seed)
    mono = {int(x): float(rng.choice([0.1, 0.2, 0.3, np.nan])) for x in rng.choice(60, 30, replace=False)}
    tables = {f"t{i}": [int(x) for x in rng.choice(60, rng.integers(5, 20), replace=False)] for i in range(6)}
    always = {int(x) for x in rng.choice(60, 5, replace=False)}
    m, c = _frames(mono, tables)
    chosen = selection.select_latents(m, c, always_active=always, n=25)
    expected, combined = expected_selection(mono, tables, always, 25)
    assert chosen["latent"].tolist() == expected
    assert np.allclose(chosen["combined_rank"], [combined[x] for x in expected])


def test_always_active_and_distractor_eligibility():
    n_rows = 30
    fires = {0: 15, 1: 9, 2: 10, 3: 11, 4: 30, 5: 20, 6: 12}  # train slices each latent fires on
    dense = np.zeros((n_rows, len(fires)), dtype=np.float32)
    for lat, k in fires.items():
        dense[:k, lat] = 1.0
    val = np.zeros((5, len(fires)), dtype=np.float32)
    val[:, 4] = 0.3  # latent 4 fires on every val slice; latent 0 on all but one
    val[:4, 0] = 1.0
    active = selection.always_active(sp.csr_matrix(val))
    assert active.tolist() == [4]
    pool = selection.distractor_pool(selection.firing_counts(sp.csr_matrix(dense)), active)
    assert pool.tolist() == [lat for lat, k in fires.items() if k >= 10 and lat != 4]  # 0, 2, 3, 5, 6
    drawn = selection.draw_distractors(0, pool, seed=0, sae_key="sae")
    assert sorted(drawn) == [2, 3, 5, 6] and drawn == selection.draw_distractors(0, pool, seed=0, sae_key="sae")
    for target in (2, 3, 5, 6):
        got = selection.draw_distractors(target, pool, seed=7, sae_key="sae")
        assert len(set(got)) == 4 and target not in got and set(got) <= set(pool.tolist())
    assert selection.draw_distractors(0, np.array([0, 2, 3, 5]), seed=0, sae_key="sae") == []  # 3 others only


# --------------------------------------------------------------------------- diverse samples


def test_diverse_samples_by_hand():
    #          target latent 0 | other latents
    rows = [
        ("A", [5.0, 1, 0, 0]),  # r0: image A, not its strongest slice
        ("A", [6.0, 0, 0, 0]),  # r1: the top candidate
        ("B", [4.0, 0, 0, 0]),  # r2: parallel to r1 (dissimilarity 0)
        ("C", [3.0, 0, 3, 0]),  # r3: 45 degrees from r1
        ("D", [2.0, 0, 0, 8]),  # r4: mostly latent 3
        ("E", [0.0, 1, 0, 0]),  # r5: not firing, image E (an earlier row than r7)
        ("F", [0.0, 0, 1, 0]),  # r6: not firing
        ("E", [0.0, 0, 0, 1]),  # r7: not firing, image E's later row
    ]
    codes = sp.csr_matrix(np.array([v for _, v in rows], dtype=np.float32))
    image = np.unique([i for i, _ in rows], return_inverse=True)[1]
    assert samples.candidate_rows(sp.csc_matrix(codes)[:, [0]], image).tolist() == [1, 2, 3, 4, 7, 6]
    picked = samples.diverse_samples(codes, sp.csc_matrix(codes), image, 0)
    # by hand: r1 first; r7 and r6 are orthogonal to r1 (1.0; r7 comes first); then r3 (0.29) over
    # r4 (0.03 from r7) and r2 (0.0); then r4
    assert picked.tolist() == [1, 7, 6, 3, 4]


@pytest.mark.parametrize("seed", [0, 1])
def test_diverse_samples_match_brute_force(seed):
    rng = np.random.default_rng(seed)
    n, d = 300, 12
    dense = np.where(rng.random((n, d)) < 0.3, rng.integers(1, 6, (n, d)), 0).astype(np.float32)
    images = [f"s{int(i):03d}" for i in rng.integers(0, 40, n)]
    codes = sp.csr_matrix(dense)
    image = np.unique(images, return_inverse=True)[1]
    for latent in range(d):
        got = samples.diverse_samples(codes, sp.csc_matrix(codes), image, latent)
        assert got.tolist() == brute_force_diverse(dense, dense[:, latent], images, 20, 5)


# --------------------------------------------------------------------------- judge answer, post-processing, block


def test_parse_failure_ranks_by_the_shuffled_order_and_is_counted():
    order = [2, 0, 1, 3, 4]  # A: distractor 2, B: the latent's own description, ...
    assert judge.true_rank("B, A, C, D, E", order) == (1, True)
    assert judge.true_rank("C, D, E, A, B", order) == (5, True)
    assert judge.true_rank("e d c b a", order) == (4, True)  # upper-cased before the letters are read
    for bad in ("A, C, D, E", "Ranking: B, A, C, D, E", "B, B, A, C, D", "", None):  # 'RANKING' holds an A
        assert judge.true_rank(bad, order) == (2, False)  # B's place in the shuffled order
    score = judge.ranking_score("A, C, D, E", order, [7, 8, 9, 10])
    assert score.value == 1.0 and score.extra["rank"] == 2 and score.extra["parse_success"] is False
    summary = judge.ranking_summary([2, 1, 5, 3], [False, True, True, True])
    assert summary["n_parse_failures"] == 1 and summary["n_evaluated"] == 4
    assert summary["success_rate"] == 0.5 and summary["top1_rate"] == 0.25
    assert summary["mean_rank"] == 2.75 and summary["median_rank"] == 2.5
    assert summary["rank_distribution"] == {"1": 1, "2": 1, "3": 1, "4": 0, "5": 1}
    assert (summary["chance_success_rate"], summary["chance_mean_rank"]) == (0.4, 3.0)


def test_candidate_order_is_a_seeded_permutation():
    orders = {tuple(judge.candidate_order(0, "sae", lat)) for lat in range(40)}
    assert all(sorted(o) == [0, 1, 2, 3, 4] for o in orders) and len(orders) > 10
    assert judge.candidate_order(0, "sae", 3) == judge.candidate_order(0, "sae", 3)


@pytest.mark.parametrize(
    "raw, cleaned",
    [
        ('"These images show axial CT of the liver"', "Axial CT of the liver"),
        ("These axial CT consistently demonstrate the thoracic spine", "The thoracic spine"),
        ("The scans predominantly depict  coronal MRI of the pelvis", "Coronal MRI of the pelvis"),
        ("All images show sagittal CT", "Sagittal CT"),
        ("Consistently, CT of the skull", "CT of the skull"),
        ("These CT images show the lungs", "These CT images show the lungs"),  # one of CT / images only
        ("  'lumbar spine'  ", "Lumbar spine"),
        (None, ""),
    ],
)
def test_description_post_processing(raw, cleaned):
    assert clean_description(raw) == cleaned


def test_metadata_block_by_hand():
    s = Sample("ct", "axial", "f", 63.0, ("aorta", "liver", "vertebrae_L1"), "tumor", 1.23456)
    assert block(2, s) == (
        "Sample 2:\n  Modality: CT\n  Orientation: Axial (z)\n  Sex: F\n  Age: 63.0 years\n"
        "  Anatomical structures and organs (3 total): aorta, liver, vertebrae_L1\n"
        "  Anatomical regions: abdominal vasculature, liver, lumbar spine\n  Pathology: tumor\n  Activation: 1.235"
    )
    bare = Sample("mri", "sagittal", None, None, (), None, 0.0)
    assert block(1, bare) == "Sample 1:\n  Modality: MRI\n  Orientation: Sagittal (x)\n  Activation: 0.000"


def test_medsae_protocol_keeps_its_dump_and_study_fields_stay_out_of_summarize_keys():
    default = InterpretSpec().model_dump(mode="json")
    assert "protocol" not in default and not any(k.startswith("study_") for k in default)
    study = InterpretSpec(protocol="study", study_latents=10).model_dump(mode="json")
    assert study["protocol"] == "study" and study["study_latents"] == 10
    assert {"study_explainer_template", "study_judge_template", "study_images", "study_image_size"} <= set(
        LLM_ONLY_FIELDS
    )
    assert "study_latents" not in LLM_ONLY_FIELDS  # the selection is summarize's


# --------------------------------------------------------------------------- stages, offline provider


def _ctx(kind: str, root: Path, inputs: dict[str, Path], spec: InterpretSpec):
    from medsae.stage import StageContext

    return StageContext(
        kind=kind,
        key=f"{kind}-key",
        spec=spec,
        out_dir=root / kind / f"{kind}-key",
        work_dir=root / ".work" / kind,
        inputs=inputs,
        input_keys={k: f"{k}-key" for k in inputs},
        seed=0,
        quiet=True,
    )


def _evaluate_outputs(root: Path, slices: pd.DataFrame, codes: sp.csr_matrix, slices_dir: Path) -> Path:
    """The evaluate stage's two inputs of the selection, computed by the evaluate code on these codes."""
    from medsae.data.index import presence_matrix
    from medsae.eval import mono, study_probes
    from medsae.eval.config import ProbeTargetDef
    from medsae.eval.probes import ProbeSettings
    from medsae.eval.targets import study_groups, study_order

    presence, vocab = presence_matrix(slices_dir)
    split = slices["split"].to_numpy()
    val = study_order(slices, np.flatnonzero(split == "val"))
    train = study_order(slices, np.flatnonzero(split == "train"))
    frame, _ = mono.latent_scores(
        codes[val], presence[val], slices["image_id"].to_numpy()[val], mono.MonoSettings(min_images=3)
    )
    definitions = [
        ProbeTargetDef(group="modality", kind="multiclass", column="modality", classes=["mri", "ct"]),
        ProbeTargetDef(group="organs", kind="multilabel", column="structure", classes=["liver", "kidney_left"]),
    ]
    groups, _ = study_groups(definitions, slices, presence, vocab, train)
    settings = ProbeSettings(max_iter=100, max_train=400, backend="sklearn", device="cpu")
    probes = study_probes.run_group_probes(groups, train, {"val": val}, {"sparse": codes}, settings)
    out = root / "evaluate" / "evaluate-key"
    out.mkdir(parents=True)
    frame.to_parquet(out / "mono_latents_val.parquet", index=False)
    study_probes.coefficient_tables(probes).to_parquet(out / "coefficients_sparse.parquet", index=False)
    return out


@pytest.fixture(scope="module")
def study_run(tmp_path_factory):
    from medsae.interp.stage import run_interpret, run_summarize
    from medsae.sae.codes import write_codes

    root = tmp_path_factory.mktemp("study")
    mp = pytest.MonkeyPatch()
    mp.setenv("MEDSAE_LLM_CACHE", str(root / "llm_cache"))
    mp.setenv("MEDSAE_QUIET", "1")
    slices, structures = synthetic.make_slices(n_scans=120, slices_per_scan=12, seed=0)
    slices_dir = synthetic.write_slices_dir(root / "slices" / "slices-key", slices, structures)
    codes = synthetic.puzzle_codes(slices, structures, n_dead=1)
    always_on = sp.csr_matrix(np.full((len(slices), 1), 0.5, dtype=np.float32))
    codes = sp.hstack([codes, always_on]).tocsr()  # latent 9 fires on every slice
    encode_dir = write_codes(root / "encode" / "encode-key", codes, slices["slice_id"].to_numpy())
    train_dir = root / "train" / "train-key"
    train_dir.mkdir(parents=True)
    evaluate_dir = _evaluate_outputs(root, slices, codes, slices_dir)
    spec = InterpretSpec(protocol="study", study_latents=6, min_pool_scans=2, min_active=3, min_patients=2)
    upstream = {"encode": encode_dir, "slices": slices_dir, "train": train_dir, "evaluate": evaluate_dir}
    summ = run_summarize(_ctx("summarize", root, upstream, spec))
    inputs = {"summarize": root / "summarize" / "summarize-key", "encode": encode_dir, "slices": slices_dir}
    interp = run_interpret(_ctx("interpret", root, inputs, spec))
    yield {
        "root": root,
        "slices": slices,
        "codes": codes,
        "evaluate": evaluate_dir,
        "inputs": inputs,
        "summarize": summ,
        "interpret": interp,
        "interpret_files": json.loads((root / "interpret" / "interpret-key" / "study_concepts.json").read_text()),
    }
    mp.undo()


def test_study_run_selects_and_samples_as_the_study(study_run):
    slices, codes = study_run["slices"], study_run["codes"]
    summ_dir = study_run["inputs"]["summarize"]
    chosen = pd.read_parquet(summ_dir / "study_selection.parquet")
    mono = pd.read_parquet(study_run["evaluate"] / "mono_latents_val.parquet")
    coef = pd.read_parquet(study_run["evaluate"] / "coefficients_sparse.parquet")
    split = slices["split"].to_numpy()
    val_counts = np.asarray((codes[split == "val"] > 0).sum(axis=0)).ravel()
    always = {int(x) for x in np.flatnonzero(val_counts == (split == "val").sum())}
    assert always == {9}
    tables: dict[str, list[int]] = defaultdict(list)
    for row in coef.sort_values(["group", "target", "rank"]).itertuples():
        tables[f"{row.group}/{row.target}"].append(int(row.latent))
    expected, _ = expected_selection(dict(zip(mono["latent"], mono["mono_50"], strict=True)), tables, always, 6)
    assert chosen["latent"].tolist() == expected
    train_counts = np.asarray((codes[split == "train"] > 0).sum(axis=0)).ravel()
    for target, drawn in zip(chosen["latent"], chosen["distractors"], strict=True):
        assert len(set(drawn)) == 4 and target not in drawn
        assert all(train_counts[d] >= 10 and d not in always for d in drawn)
    sets = pd.read_parquet(summ_dir / "example_sets.parquet")
    study_sets = sets[sets["purpose"].str.startswith("study_")]
    described = set(chosen["latent"]) | {int(d) for ds in chosen["distractors"] for d in ds}
    assert set(study_sets.loc[study_sets["purpose"] == "study_explain", "latent"]) == described
    assert set(study_sets.loc[study_sets["purpose"] == "study_judge", "latent"]) == set(chosen["latent"])
    meta = slices.set_index("slice_id")
    for row in study_sets.itertuples():
        wanted = "train" if row.purpose == "study_explain" else "val"
        ids = np.asarray(row.slice_ids)
        assert 1 <= len(ids) <= 5 and set(meta.loc[ids, "split"]) == {wanted}
        assert meta.loc[ids, "image_id"].is_unique  # one slice per image
        assert np.allclose(row.activations, codes[ids][:, [row.latent]].toarray().ravel())


def test_study_run_ranks_every_latent_and_sums_up_as_the_study(study_run):
    out = study_run["root"] / "interpret" / "interpret-key"
    chosen = pd.read_parquet(study_run["inputs"]["summarize"] / "study_selection.parquet")
    expl = pd.read_parquet(out / "explanations.parquet")
    scores = pd.read_parquet(out / "scores.parquet").merge(expl[["explanation_id", "latent"]], on="explanation_id")
    concepts = json.loads((out / "study_concepts.json").read_text())
    assert sorted(expl["latent"]) == sorted(chosen["latent"]) and (expl["kind"] == "explanation").all()
    assert all(concepts[str(lat)] == text for lat, text in zip(expl["latent"], expl["text"], strict=True))
    assert set(scores["method"]) == {"ranking_study_top2"} and len(scores) == len(chosen)
    ranks, parsed = [], []
    for row in scores.itertuples():
        extra = json.loads(row.extra_json)
        truth = "ABCDE"[extra["order"].index(0)]
        letters = re.findall("[A-E]", extra["answer"].upper())
        assert len(letters) == 5 and extra["parse_success"]  # the offline judge always answers five letters
        assert extra["rank"] == letters.index(truth) + 1 and row.value == float(extra["rank"] <= 2)
        own = chosen.set_index("latent").loc[row.latent, "distractors"]
        assert extra["distractors"] == list(own)
        assert extra["distractor_texts"] == [concepts[str(d)] for d in own]
        ranks.append(extra["rank"])
        parsed.append(extra["parse_success"])
    summary = json.loads((out / "summary.json").read_text())["study_ranking"]
    assert summary["n_evaluated"] == len(ranks) and summary["n_parse_failures"] == 0
    assert summary["success_rate"] == pytest.approx(np.mean(np.array(ranks) <= 2))
    assert summary["mean_rank"] == pytest.approx(np.mean(ranks))
    assert summary["rank_distribution"] == {str(k): ranks.count(k) for k in range(1, 6)}
    # the rule model names the organ of the organ latents (puzzles 0: liver, 6: kidney_left, 3: brain on MRI)
    texts = dict(zip(expl["latent"], expl["text"], strict=True))
    for latent, word in ((0, "liver"), (6, "kidneys"), (3, "brain")):  # all three are among the selected
        assert word in texts[latent].lower()


def test_study_rows_read_back_as_the_study_table_reads_them(study_run, tmp_path):
    from medsae.interp.journal import insert_results
    from medsae.interp.stage import run_interpret
    from medsae.registry import Registry
    from medsae.registry.queries import ranking_outcomes

    spec = InterpretSpec(protocol="study", study_latents=6, min_pool_scans=2, min_active=3, min_patients=2)
    again = run_interpret(_ctx("interpret", tmp_path, study_run["inputs"], spec))  # a rerun: all from the cache
    assert again.summary["llm_calls"] == 0 and again.summary["cache_hits"] > 0
    registry = Registry(tmp_path / "registry.duckdb")
    insert_results(registry, again.tables)
    ranks = [json.loads(r["extra_json"])["rank"] for r in again.tables["explanation_scores"]]
    (outcome,) = ranking_outcomes(registry, ["summarize-key"])
    assert outcome["n"] == outcome["n_ranked"] == len(ranks)
    assert outcome["top1"] == pytest.approx(np.mean(np.array(ranks) == 1))
    assert outcome["top2"] == pytest.approx(np.mean(np.array(ranks) <= 2))


def test_an_interrupted_study_run_resumes_with_the_latents_it_had_not_finished(study_run, tmp_path):
    from medsae.interp.agent import AgentInputs, make_agent
    from medsae.interp.journal import WorkDirJournal

    spec = InterpretSpec(protocol="study", study_latents=6, min_pool_scans=2, min_active=3, min_patients=2)
    summ_dir, cache = study_run["inputs"]["summarize"], study_run["root"] / "llm_cache"
    inputs = AgentInputs(summ_dir, study_run["inputs"]["slices"], "train-key", "summarize-key")
    selected = pd.read_parquet(summ_dir / "study_selection.parquet")
    chosen = selected["latent"].tolist()
    make_agent(inputs, spec, cache).run(chosen[:2], sink=WorkDirJournal(tmp_path / "finished"))  # "killed" here
    second = make_agent(inputs, spec, cache)
    resumed = second.run(sink=WorkDirJournal(tmp_path / "finished"))
    fresh = study_run["interpret"].tables
    for table, key in (("explanations", "explanation_id"), ("explanation_scores", "score_id")):
        assert sorted(r[key] for r in resumed.tables[table]) == sorted(r[key] for r in fresh[table])
    rest = selected[selected["latent"].isin(chosen[2:])]
    described = set(rest["latent"]) | {d for ds in rest["distractors"] for d in ds}
    assert second.gateway.n_cache_hits == len(described) + len(rest) and second.gateway.n_calls == 0
    assert resumed.summary["done"] == len(chosen)
    assert resumed.files["study_concepts.json"] == study_run["interpret_files"]


def test_study_protocol_needs_the_study_evaluation(study_run, tmp_path):
    from medsae.errors import MissingInputError
    from medsae.interp.stage import run_summarize

    bare = tmp_path / "evaluate"
    bare.mkdir()
    shutil.copy(study_run["evaluate"] / "mono_latents_val.parquet", bare / "mono_latents_val.parquet")
    inputs = {k: study_run["inputs"][k] for k in ("encode", "slices")} | {"train": tmp_path, "evaluate": bare}
    spec = InterpretSpec(protocol="study", min_pool_scans=2)
    with pytest.raises(MissingInputError, match="coefficients_sparse.parquet: not found.*eval.protocol study"):
        run_summarize(_ctx("summarize", tmp_path, inputs, spec))
    assert not (tmp_path / "summarize" / "summarize-key" / "study_selection.parquet").exists()


# --------------------------------------------------------------------------- the vision path over HTTP


def test_vision_path_sends_images_at_the_study_temperatures(tmp_path, llm_server):
    from llm_server import text_handler

    from medsae.data.build import run_ingest
    from medsae.data.config import DataSpec
    from medsae.data.index import load_slices
    from medsae.data.phantom import write_phantom
    from medsae.interp.agent import AgentInputs, make_agent
    from medsae.interp.stage import summarize, write_summary
    from medsae.interp.study.summarize import summarize_study, write_study

    root = write_phantom(tmp_path / "phantom", subjects=4, seed=1, shape=(24, 24, 32))
    slices_dir = tmp_path / "slices"
    run_ingest(root, DataSpec(root=str(root), size=32).model_dump(mode="json"), slices_dir, tmp_path / "work")
    slices = load_slices(slices_dir)
    images = sorted(slices["image_id"].unique())
    slices["split"] = slices["image_id"].map({im: ("val" if i % 2 else "train") for i, im in enumerate(images)})
    rng = np.random.default_rng(0)
    codes = sp.csr_matrix(np.where(rng.random((len(slices), 8)) < 0.5, rng.random((len(slices), 8)), 0.0))
    mono = pd.DataFrame({"latent": np.arange(8), "mono_50": np.linspace(0.8, 0.1, 8)})
    coef = pd.DataFrame({"table": "g/t", "rank": np.arange(1, 9), "latent": np.arange(8)[::-1]})
    spec = InterpretSpec(
        protocol="study",
        study_latents=3,
        study_image_size=64,
        explainer_model="openai/gpt-4o",
        explainer_api_base=llm_server.url,
        scorer_model="openai/gpt-4o",
        scorer_api_base=llm_server.url,
        min_pool_scans=2,
    )
    from medsae.data.index import presence_matrix

    presence, vocab = presence_matrix(slices_dir)
    result = summarize(slices, presence, vocab, codes, slices["slice_id"].to_numpy(), spec, "sae")
    study = summarize_study(slices, codes, slices["slice_id"].to_numpy(), mono, coef, spec, "sae")
    result.sets.extend(study.sets)
    write_summary(tmp_path / "summarize", result)
    write_study(tmp_path / "summarize", study)

    def answer(request: dict) -> str:
        system = request["messages"][0]["content"]
        if "Task: describe" in system:  # a description unique to the samples shown, with an opening to strip
            text = request["messages"][-1]["content"][-1]["text"]
            return f'"These images show concept {hashlib.sha256(text.encode()).hexdigest()[:10]}"'
        return "B, A, C, D"  # four letters: a parse failure

    llm_server.set_handler(text_handler(answer))
    run = make_agent(AgentInputs(tmp_path / "summarize", slices_dir, "sae", "summ"), spec, tmp_path / "cache").run()

    sets = {(s.latent, s.purpose): s for s in study.sets}
    describe = [r for r in llm_server.requests if "Task: describe" in r["messages"][0]["content"]]
    judged = [r for r in llm_server.requests if "Task: judge" in r["messages"][0]["content"]]
    n_sets = {len(s.slice_ids) for (_, p), s in sets.items() if p == "study_explain"}
    assert len(describe) == len({lat for lat, p in sets if p == "study_explain"}) and len(judged) == 3
    for request, temperature, max_tokens in [(r, 0.3, 100) for r in describe] + [(r, 0.2, 50) for r in judged]:
        assert request["temperature"] == temperature and request["max_tokens"] == max_tokens
        parts = request["messages"][-1]["content"]
        pictures = [p for p in parts if p["type"] == "image_url"]
        assert parts[-1]["type"] == "text" and len(pictures) == len(parts) - 1 >= 1
        png = base64.b64decode(pictures[0]["image_url"]["url"].split(",", 1)[1])
        assert Image.open(io.BytesIO(png)).size == (64, 64)
        assert len(pictures) == len(re.findall(r"^Sample \d+:$", parts[-1]["text"], re.M))  # one per sample
    assert {len([p for p in r["messages"][-1]["content"] if p["type"] == "image_url"]) for r in describe} == n_sets

    concepts = run.files["study_concepts.json"]
    assert all(re.fullmatch(r"Concept [0-9a-f]{10}", t) for t in concepts.values())  # quotes and opening stripped
    chosen = study.selection.set_index("latent")
    shown = [re.findall(r"^([A-E])\. (.*)$", r["messages"][-1]["content"][-1]["text"], re.M) for r in judged]
    scores = run.tables["explanation_scores"]
    latent_of = {e["explanation_id"]: e["latent"] for e in run.tables["explanations"]}
    assert len(scores) == 3
    for s in scores:
        extra = json.loads(s["extra_json"])
        latent = latent_of[s["explanation_id"]]
        texts = [concepts[str(latent)]] + [concepts[str(d)] for d in chosen.loc[latent, "distractors"]]
        sent = [(letter, texts[k]) for letter, k in zip("ABCDE", extra["order"], strict=True)]
        assert sent in shown  # the stored order is the order the judge saw
        (own,) = [letter for letter, text in sent if text == texts[0]]
        assert not extra["parse_success"] and extra["rank"] == "ABCDE".index(own) + 1
    assert run.summary["study_ranking"]["n_parse_failures"] == 3


def test_study_interpretation_without_study_evaluation_is_one_spec_error():
    from medsae.errors import MedsaeError
    from medsae.spec import parse_specs

    raw = {"name": "s", "data": {"root": "x"}, "interpret": {"protocol": "study"}}
    with pytest.raises(MedsaeError, match=r"interpret.protocol study .* set eval.protocol: study"):
        parse_specs(raw)
    assert parse_specs({**raw, "eval": {"protocol": "study"}})[0].interpret.protocol == "study"
