"""mask_match: explanations checked against each latent's best-grounded structure (issue 16, item 4).

A hand-made set of explanations and groundings gives the rows written out below; on a small grounded
phantom the interpret stage stores one row per usable explanation of a grounded latent, whose value
is ``mask_match_score`` recomputed here from the registry's texts and best structures; ``explain run``'s
path rebuilds the same rows from the registry; ``explain compare`` lists the method; an experiment
without ground keeps its keys and gets no mask_match row.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import shutil

import pandas as pd
import pytest
from typer.testing import CliRunner

from medsae.ground.names import mask_match_score
from medsae.interp.experiment import experiment_inputs, explain_experiment, score_against_masks
from medsae.interp.journal import insert_results
from medsae.interp.mask_match import Grounding, mask_match_rows
from medsae.plan import plan_experiment, run_plans
from medsae.registry.db import Registry
from medsae.spec import parse_specs
from medsae.specbase import key_params

GROUND_KEY = "g" * 64


def _expl(ident: str, latent: int, kind: str, status: str, text: str | None) -> dict:
    return {"explanation_id": ident, "latent": latent, "kind": kind, "status": status, "text": text,
            "example_set_id": f"set-{latent}"}  # fmt: skip


#: (explanation, expected value, expected phrase) — None value: no row.
HAND_MADE = [
    (_expl("a", 1, "explanation", "ok", "Axial slices through the left kidney"), 1.0, "through the left kidney"),
    (_expl("b", 1, "shuffled", "baseline", "Only the right kidney is visible"), 0.0, None),  # opposite side
    (_expl("c", 1, "best_attribute", "baseline", "structure=kidney_left"), 1.0, "structure kidney left"),
    (_expl("d", 2, "explanation", "ok", "Hepatic parenchyma near the dome"), 1.0, "Hepatic parenchyma near the"),
    (_expl("e", 2, "shuffled", "baseline", "The spleen and the stomach"), 0.0, None),
    (_expl("f", 3, "explanation", "ok", "The left kidney"), None, None),  # latent 3 is not grounded
    (_expl("g", 4, "explanation", "too_long", "Both lungs " * 20), None, None),  # rejected: not scored
    (_expl("h", 4, "explanation", "parse_failed", None), None, None),
    (_expl("i", 4, "explanation", "ok", "Both lungs, upper lobes"), 1.0, "Both lungs upper lobes"),
    (_expl("j", 5, "explanation", "ok", "Kidneys on coronal slices"), 1.0, "Kidneys on coronal slices"),
    (_expl("k", 5, "shuffled", "baseline", "Left renal pelvis"), 0.0, None),  # kidney_right, left side only
]
STRUCTURES = {1: "kidney_left", 2: "liver", 4: "lung_upper_lobe_right", 5: "kidney_right"}


def test_hand_made_rows_equal_the_expectation(tmp_path):
    grounding = Grounding(GROUND_KEY, STRUCTURES)
    rows = mask_match_rows([e for e, _, _ in HAND_MADE], grounding)
    expected = {e["explanation_id"]: (value, phrase) for e, value, phrase in HAND_MADE if value is not None}
    got = {r["explanation_id"]: (r["value"], json.loads(r["extra_json"])["phrase"]) for r in rows}
    assert got == expected
    latent_of = {e["explanation_id"]: e["latent"] for e, _, _ in HAND_MADE}
    for r in rows:
        extra = json.loads(r["extra_json"])
        assert extra["structure"] == STRUCTURES[latent_of[r["explanation_id"]]] and extra["ground_key"] == GROUND_KEY
        assert (r["method"], r["scorer_model"], r["scorer_mode"], r["n"]) == ("mask_match", "rule", "rule", 1)
        assert r["example_set_id"] == f"set-{latent_of[r['explanation_id']]}" and not r["degenerate"]
    assert len({r["score_id"] for r in rows}) == len(rows)
    assert [r["score_id"] for r in mask_match_rows([e for e, _, _ in HAND_MADE], grounding)] == [
        r["score_id"] for r in rows
    ]  # content-addressed: a rerun adds nothing
    moved = mask_match_rows([HAND_MADE[0][0]], Grounding(GROUND_KEY, {1: "kidney_right"}))
    assert moved[0]["value"] == 0.0 and moved[0]["score_id"] not in {r["score_id"] for r in rows}
    # the rows fit the registry table (DuckDB file on disk); a second insert adds nothing
    registry = Registry(tmp_path / "r.duckdb")
    registry.ensure()
    assert insert_results(registry, {"explanation_scores": rows})["explanation_scores"] == len(rows)
    assert insert_results(registry, {"explanation_scores": rows})["explanation_scores"] == 0


# -- a small grounded phantom through the planner ------------------------------------------------------------


def grounded_spec(tmp, ground: bool = True) -> dict:
    """A tiny random-init ViT (3 x 3 token grid) on a 4-subject phantom: every stage in seconds."""
    return {
        "name": "grounded" if ground else "ungrounded",
        "seed": 0,
        "artifacts": str(tmp / "artifacts"),
        "data": {"root": str(tmp / "phantom"), "phantom": {"subjects": 4, "seed": 3, "shape": [24, 24, 28]},
                 "size": 32},
        "embed": {"source": "timm", "model": "vit_small_patch16_dinov3", "pretrained": False, "input_size": 48,
                  "model_kwargs": {"embed_dim": 32, "depth": 1, "num_heads": 2, "img_size": 48}, "device": "cpu",
                  "pooling": "mean"},
        "sae": {"arch": "topk", "d_sae": 48, "k": 4, "batch_size": 64, "epochs": 10, "lr": 0.001, "warmup_steps": 5,
                "device": "cpu"},
        "eval": {"probe_max_train": 200, "recovery_max_train": 100, "recovery_ns": [1, 5], "retrieval_refs": 20},
        "ground": {"enabled": ground, "top_slices": 6, "score_size": 32},
        "interpret": {"min_active": 3, "min_patients": 2, "max_latents": 12, "shuffled_fraction": 1.0},
    }  # fmt: skip


@pytest.fixture(scope="module")
def grounded(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mask_match")
    plan = plan_experiment(parse_specs(grounded_spec(tmp))[0])
    registry = Registry(tmp / "registry.duckdb")
    run_plans([plan], registry, quiet=True)
    return tmp, plan, registry


def _stage_rows(registry: Registry, plan) -> tuple[pd.DataFrame, dict[int, str]]:
    explanations = pd.DataFrame(
        registry.query("SELECT * FROM explanations WHERE stage_key = ?", [plan.nodes["summarize"].key])
    )
    ground_key = plan.nodes["ground"].key
    best = registry.query("SELECT latent, structure FROM latent_grounding WHERE stage_key = ?", [ground_key])
    return explanations, {int(r["latent"]): r["structure"] for r in best}


def _mask_rows(registry: Registry, plan) -> pd.DataFrame:
    return pd.DataFrame(
        registry.query(
            """SELECT s.*, e.kind FROM explanation_scores s JOIN explanations e USING (explanation_id)
               WHERE s.method = 'mask_match' AND e.stage_key = ?""",
            [plan.nodes["summarize"].key],
        )
    )


def test_interpret_stage_scores_every_explanation_against_the_masks(grounded):
    _, plan, registry = grounded
    assert plan.nodes["interpret"].upstream["ground"] == plan.nodes["ground"].key
    assert plan.nodes["interpret"].inputs["ground"] == plan.nodes["ground"].final_dir
    explanations, best = _stage_rows(registry, plan)
    assert best, "the phantom grounds some latents"
    usable = explanations[explanations["status"].isin(["ok", "baseline"]) & explanations["text"].notna()]
    expected = {
        r.explanation_id: mask_match_score(r.text, best[int(r.latent)])
        for r in usable.itertuples()
        if int(r.latent) in best
    }
    rows = _mask_rows(registry, plan)
    assert dict(zip(rows["explanation_id"], rows["value"], strict=True)) == expected
    assert set(rows["kind"]) == {"explanation", "shuffled", "best_attribute"}  # real ones and their baselines
    structure_of = {r.explanation_id: best[int(r.latent)] for r in explanations.itertuples() if int(r.latent) in best}
    assert all(json.loads(x)["structure"] == structure_of[i] for i, x in zip(rows["explanation_id"], rows["extra_json"],
                                                                             strict=True))  # fmt: skip
    ungrounded = set(explanations.loc[~explanations["latent"].isin(list(best)), "explanation_id"])
    assert not ungrounded & set(rows["explanation_id"])
    summary = json.loads(
        registry.query("SELECT summary_json FROM stages WHERE stage_key = ?", [plan.nodes["interpret"].key])[0][
            "summary_json"
        ]
    )["mask_match"]
    means = rows.groupby("kind")["value"].agg(["mean", "size"])
    for kind, r in means.iterrows():
        assert summary[kind]["n"] == r["size"] and summary[kind]["mean"] == pytest.approx(r["mean"], abs=1e-4)
    print("\nmask_match on the grounded phantom (kind: mean, n):", means.round(3).to_dict("index"))


def test_explain_run_path_rebuilds_the_same_rows_from_the_registry(grounded):
    tmp, plan, registry = grounded
    copy = Registry(tmp / "copy.duckdb")  # same folder: stage folders resolve as for the original
    shutil.copy(registry.path, copy.path)
    before = _mask_rows(copy, plan)
    exp = experiment_inputs(copy, "grounded")
    assert exp.ground_key == plan.nodes["ground"].key
    assert score_against_masks(copy, exp)["new_rows"] == 0  # the stage's rows, same ids
    with copy.write() as con:
        con.execute("DELETE FROM explanation_scores WHERE method = 'mask_match'")
    summary = explain_experiment(copy, "grounded", "medsae/baseline", scorer="medsae/baseline")
    assert summary["new_rows"]["explanation_scores"] >= len(before)
    after = _mask_rows(copy, plan)
    merged = before.merge(after, on="score_id", suffixes=("", "_again"))
    assert len(merged) == len(before) == len(after)
    assert (merged["value"] == merged["value_again"]).all()
    assert summary["mask_match"]["explanation"]["n"] == (after["kind"] == "explanation").sum()


def test_explain_compare_shows_mask_match_per_explainer_and_baseline(grounded):
    from medsae.cli.explain import app

    _, plan, registry = grounded
    res = CliRunner().invoke(app, ["compare", "grounded", "--registry", str(registry.path), "--format", "json"])
    assert res.exit_code == 0, res.output
    shown = [r for r in json.loads(res.output)["rows"] if r["method"] == "mask_match"]
    rows = _mask_rows(registry, plan)
    assert {(r["kind"], r["explainer"]) for r in shown} >= {("explanation", "medsae/baseline"),
                                                             ("best_attribute", "rule")}  # fmt: skip
    for r in shown:
        values = rows.loc[rows["kind"] == r["kind"], "value"]
        assert r["n"] == len(values) and r["mean"] == pytest.approx(values.mean())
    table = CliRunner().invoke(app, ["compare", "grounded", "--registry", str(registry.path)], env={"COLUMNS": "200"})
    assert table.exit_code == 0 and "mask_match" in table.output


def _key(kind: str, module: str, params: dict, seed: int, upstream: dict[str, str]) -> str:
    """key = sha256(canonical_json({kind, code_version, params, seed, upstream, inputs})), as plan.py states."""
    payload = {"kind": kind, "code_version": str(importlib.import_module(module).CODE_VERSION), "params": params,
               "seed": seed, "upstream": upstream, "inputs": {}}  # fmt: skip
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def test_without_ground_keys_are_unchanged_and_no_row_is_made(grounded):
    tmp, plan, registry = grounded
    spec = parse_specs(grounded_spec(tmp, ground=False))[0]
    bare = plan_experiment(spec)
    assert "ground" not in bare.nodes and "ground" not in bare.nodes["interpret"].upstream
    for kind in ("slices", "embed", "train", "encode", "evaluate", "summarize"):
        assert bare.nodes[kind].key == plan.nodes[kind].key
    ups = {k: bare.nodes[k].key for k in ("summarize", "encode", "slices")}
    params = key_params(spec.interpret)
    assert bare.nodes["interpret"].key == _key("interpret", "medsae.interp.stage", params, spec.seed, ups)
    with_ground = ups | {"ground": plan.nodes["ground"].key}
    assert plan.nodes["interpret"].key == _key("interpret", "medsae.interp.stage", params, spec.seed, with_ground)
    run_plans([bare], registry, only={"interpret"}, quiet=True)
    scores = pd.read_parquet(bare.nodes["interpret"].final_dir / "_registry" / "explanation_scores.parquet")
    assert len(scores) and "pearson" in set(scores["method"]) and "mask_match" not in set(scores["method"])
    assert score_against_masks(registry, experiment_inputs(registry, "ungrounded")) == {"new_rows": 0}
