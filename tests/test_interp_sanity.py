"""Scorer sanity, explanation hygiene and the context budget.

* A scorer that ignores the explanation (it answers by slot in the batch) gets every score marked
  degenerate, left out of the means, and ``explain compare`` says it cannot tell a real
  explanation from a shuffled one; the honest offline scorer does not.
* The degenerate rules and the real-vs-shuffled gap are checked against independent
  computations (least squares on slot indicators, a direct bootstrap loop).
* Hygiene statuses on the run-on explanations seen with small models; prompts fitted to a budget.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
from interp_fixtures import puzzle_experiment
from typer.testing import CliRunner

from medsae.errors import MedsaeError
from medsae.interp import hygiene
from medsae.interp.config import InterpretSpec
from medsae.interp.llm import budget
from medsae.interp.llm.offline import message_text, register_offline_model
from medsae.interp.scorers import sanity
from medsae.registry import Registry

PARAMS = InterpretSpec(
    pool_splits=["val"],
    min_pool_scans=2,
    min_active=5,
    simulate_per_decile=2,
    simulate_random=20,
    detect_per_decile=2,
    detect_negatives=20,
    ranking=False,
    shuffled_fraction=1.0,
    bootstrap=100,
    permutations=100,
).model_dump(mode="json")

SLOT_PATTERN = [0, 3, 7, 1, 9, 2, 8, 4, 6, 5]


def by_position(messages: list[dict], params: dict) -> str:
    """A scorer that ignores the explanation: the value depends only on the slot X01, X02, ..."""
    from medsae.interp.llm import rule_model

    system = "\n".join(message_text(m) for m in messages if m["role"] == "system")
    if "Task: simulate" not in system and "Task: detect" not in system:
        return rule_model.handle(messages, params)
    simulate = "Task: simulate" in system
    ids = re.findall(r"^(X\d+) \|", message_text(messages[-1]), re.MULTILINE)
    values = [SLOT_PATTERN[k % 10] if simulate else int(SLOT_PATTERN[k % 10] >= 5) for k in range(len(ids))]
    return "\n".join(f"{x}: {v}" for x, v in zip(ids, values, strict=True))


@pytest.fixture
def experiment(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDSAE_LLM_CACHE", str(tmp_path / "llm_cache"))
    monkeypatch.setenv("COLUMNS", "300")
    registry = Registry(tmp_path / "registry.duckdb")
    puzzle_experiment(tmp_path / "artifacts", registry, PARAMS)
    register_offline_model("by_position", by_position)
    return registry


def test_a_scorer_that_ignores_the_explanation_is_degenerate(experiment):
    from medsae.cli.explain import app

    runner = CliRunner()
    reg = ["--registry", str(experiment.path)]
    res = runner.invoke(app, ["run", "puzzles", "--model", "medsae/baseline", "--scorer", "medsae/by_position", *reg])
    assert res.exit_code == 0, res.output
    rows = experiment.query(
        """SELECT e.kind, s.method, s.value, s.degenerate, s.extra_json FROM explanation_scores s
           JOIN explanations e USING (explanation_id) WHERE s.scorer_model = 'medsae/by_position'"""
    )
    jobs = [r for r in rows if r["method"] in ("pearson", "detection_bacc")]
    assert len(jobs) == 8 + 8 + 8  # simulation, shuffled baseline and detection of 8 latents
    assert all(r["degenerate"] for r in rows)
    assert all("slot in the batch" in json.loads(r["extra_json"])["degenerate"] for r in rows)
    assert re.search(rf"degenerate scores {len(jobs)}/{len(jobs)}", res.output)

    res = runner.invoke(app, ["run", "puzzles", "--model", "medsae/baseline", *reg])  # the honest scorer
    assert res.exit_code == 0 and "degenerate scores 0/" in res.output

    res = runner.invoke(app, ["compare", "puzzles", *reg])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "scorer medsae/by_position (parsed_int) cannot tell a real explanation from a shuffled one" in text
    assert "16 of 16 scores are degenerate" in text  # pearson rows: 8 real + 8 shuffled
    honest = re.search(r"scorer medsae/baseline \(parsed_int\) on medsae/baseline's explanations: real − shuffled "
                       r"pearson \+(\d\.\d\d), 95% CI \+(\d\.\d\d) to \+(\d\.\d\d), 8 latents", text)  # fmt: skip
    assert honest, text
    gap, lo, hi = map(float, honest.groups())
    assert 0 < lo <= gap <= hi
    # the table leaves degenerate scores out of the means: by_position has no mean at all
    res = runner.invoke(app, ["compare", "puzzles", "--format", "json", *reg])
    assert res.exit_code == 0, res.output
    payload = json.loads(res.output)
    row = next(
        r
        for r in payload["rows"]
        if r["method"] == "pearson" and r["scorer"] == "medsae/by_position" and r["kind"] == "explanation"
    )
    assert row["n_degenerate"] == 8 and row["n"] == 0 and row["mean"] is None
    honest_row = next(
        r
        for r in payload["rows"]
        if r["method"] == "pearson" and r["scorer"] == "medsae/baseline" and r["kind"] == "explanation"
    )
    assert honest_row["n_degenerate"] == 0 and honest_row["n"] == 8 and honest_row["mean"] > 0.5
    assert any("cannot tell" in w and "by_position" in w for w in payload["scorer_gaps"])

    # explain show flags them
    res = runner.invoke(app, ["show", "puzzles", "0", *reg])
    assert res.exit_code == 0 and "DEGENERATE" in res.output


def test_slot_r2_matches_least_squares_on_slot_indicators():
    rng = np.random.default_rng(0)
    values = rng.integers(0, 11, 47).astype(float)
    values[[3, 20]] = np.nan
    order = rng.permutation(47)
    batches = [order[i : i + 10] for i in range(0, 47, 10)]  # 4 full batches and one of 7
    r2 = sanity.position_r2(values, batches)
    full = [b for b in batches if len(b) == 10]
    y = np.concatenate([values[b] for b in full])
    slot = np.tile(np.arange(10), len(full))
    ok = np.isfinite(y)
    design = np.eye(10)[slot[ok]]
    fitted = design @ np.linalg.lstsq(design, y[ok], rcond=None)[0]
    truth = 1 - ((y[ok] - fitted) ** 2).sum() / ((y[ok] - y[ok].mean()) ** 2).sum()
    assert r2 == pytest.approx(truth, abs=1e-12) and r2 < sanity.POSITION_R2

    by_slot = np.zeros(47)
    for b in batches:
        by_slot[b] = np.array(SLOT_PATTERN, dtype=float)[: len(b)]
    reason, r2 = sanity.degenerate_reason(by_slot, batches)
    assert r2 == pytest.approx(1.0) and "slot" in reason
    assert sanity.position_r2(values, batches[:2]) is None  # too few batches to tell
    assert sanity.position_r2(np.ones(47), batches) is None  # constant


def test_identical_predictions_for_two_explanations():
    a = np.array([0, 3, 7, np.nan, 10, 0.0])
    assert sanity.identical_predictions(a, a.copy())
    assert not sanity.identical_predictions(a, a + 1e-9)
    assert not sanity.identical_predictions(np.zeros(6), np.zeros(6))  # constant: no signal to compare
    reason, _ = sanity.degenerate_reason(a, [np.arange(6)], twin=a.copy())
    assert reason.startswith("identical predictions")


def test_scorer_gap_against_a_direct_bootstrap():
    rng = np.random.default_rng(3)
    latents = np.arange(12)
    real = 0.6 + 0.1 * rng.standard_normal(12)
    shuffled = 0.05 * rng.standard_normal(12)
    rows = [
        {"latent": lat, "explainer_model": "m", "kind": k, "scorer_model": "s", "scorer_mode": "parsed_int",
         "method": "pearson", "value": v, "degenerate": False}
        for lat, r, sh in zip(latents, real, shuffled, strict=True) for k, v in (("explanation", r), ("shuffled", sh))
    ]  # fmt: skip
    (gap,) = sanity.scorer_gaps(pd.DataFrame(rows), seed=7)
    diffs = real - shuffled
    boot = np.random.default_rng(7)
    means = [diffs[boot.integers(0, 12, 12)].mean() for _ in range(sanity.GAP_BOOTSTRAP)]
    assert gap["gap"] == pytest.approx(diffs.mean())
    assert (gap["ci_low"], gap["ci_high"]) == pytest.approx(tuple(np.percentile(means, [2.5, 97.5])))
    assert gap["tells_apart"] and "cannot tell" not in gap["words"]

    noise = 0.01 * rng.standard_normal(12)
    same = [dict(r, value=real[r["latent"]] + (noise[r["latent"]] if r["kind"] == "shuffled" else 0.0)) for r in rows]
    (blind,) = sanity.scorer_gaps(pd.DataFrame(same), seed=7)
    assert blind["ci_low"] < 0 < blind["ci_high"] and not blind["tells_apart"]
    assert "cannot tell a real explanation from a shuffled one" in blind["words"]


# --------------------------------------------------------------------------- hygiene


@pytest.mark.parametrize(
    ("text", "status"),
    [
        ("Axial CT slices of the abdomen showing liver and kidney left in female patients.", "ok"),
        ("CT of the liver at the level of the portal vein, and CT of the kidney at the level of the hilum", "ok"),
        ("; ".join(["CT head"] * 48), "repetitive"),  # 435 characters of "CT head; CT head; ..."
        (" ".join(["retrospective"] * 160), "repetitive"),
        ("Slices of the brain. " + " ".join(f"word{i}" for i in range(70)), "too_long"),
        ("x" * 401, "too_long"),
        (None, "parse_failed"),
        ("   ", "parse_failed"),
    ],
)
def test_explanation_status(text, status):
    assert hygiene.explanation_status(text, max_words=60, max_chars=400) == status


def test_run_on_explanation_is_repetitive():
    from llm_server import RUN_ON

    assert len(RUN_ON.split()) == 20
    assert hygiene.explanation_status(" ".join([RUN_ON] * 30), 60, 400) == "repetitive"
    assert hygiene.explanation_status(RUN_ON, 60, 400) == "ok"


# --------------------------------------------------------------------------- context budget


def test_prompt_budget_comes_from_litellm_or_the_setting():
    import litellm

    info = litellm.get_model_info("openai/gpt-4o-mini")
    assert budget.model_window("openai/gpt-4o-mini", 400) == info["max_input_tokens"]
    assert budget.prompt_budget("openai/gpt-4o-mini", 400, 1000, "explainer") == 1000
    assert budget.prompt_budget("openai/a-local-model", 400, None, "explainer") is None
    assert budget.prompt_budget("openai/a-local-model", 400, 900, "explainer") == 900


def test_fewer_examples_rather_than_a_cut_prompt(tmp_path, monkeypatch):
    from medsae.interp.agent import Agent, AgentInputs

    monkeypatch.setenv("MEDSAE_QUIET", "1")
    registry = Registry(tmp_path / "registry.duckdb")
    dirs = puzzle_experiment(tmp_path / "artifacts", registry, PARAMS, n_scans=30)
    shown: list[list[str]] = []

    def counting(messages: list[dict], params: dict) -> str:
        from medsae.interp.llm import rule_model

        if "Task: explain" in message_text(messages[0]):
            shown.append(re.findall(r"^E\d+ \| (\d+) \|", message_text(messages[-1]), re.MULTILINE))
        return rule_model.handle(messages, params)

    register_offline_model("counting", counting)
    params = PARAMS | {"explainer_model": "medsae/counting", "max_latents": 3, "detect": False}
    inputs = AgentInputs(dirs["summarize"], dirs["slices"], "train-key", "summarize-key")
    full = Agent(inputs, InterpretSpec.model_validate(params), tmp_path / "cache").run()
    n_full = [r["n_examples"] for r in full.tables["explanations"] if r["kind"] == "explanation"]
    shown_full = list(shown)

    limit = 1600  # explainer prompts need 2,200-2,600 tokens here, simulator batches about 1,100
    shown.clear()
    fitted_spec = InterpretSpec.model_validate(params | {"max_prompt_tokens": limit})
    fitted = Agent(inputs, fitted_spec, tmp_path / "cache").run()
    rows = [r for r in fitted.tables["explanations"] if r["kind"] == "explanation"]
    n_fitted = [r["n_examples"] for r in rows]  # rows come sorted by latent, as n_full; calls in any order
    assert sorted(n_fitted) == sorted(len(s) for s in shown)
    assert all(1 <= f < n for f, n in zip(n_fitted, n_full, strict=True))
    assert all(s[0] == "10" and s[-1] == "0" for s in shown)  # the strongest example and a contrast stay
    assert sorted(len(s) for s in shown_full) == sorted(n_full)  # unfitted prompts show every example
    with pytest.raises(MedsaeError, match="a single example"):
        Agent(inputs, InterpretSpec.model_validate(params | {"max_prompt_tokens": 64}), tmp_path / "cache2").run()
    assert not (tmp_path / "cache2").exists()  # failed before any call


def test_fit_examples_keeps_the_largest_set_that_fits():
    from medsae.interp.explainer import render_explainer
    from medsae.interp.prompts import load_template

    template = load_template("explainer_metadata_v1")
    examples = [
        {"id": f"E{i:02d}", "strength": s, "line": f"CT; axial; abdomen; pos 0.{i % 10}; liver {i}%; spleen {i + 1}%"}
        for i, s in enumerate([10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 0, 0, 0, 0, 0], start=1)
    ]
    model = "openai/gpt-4o-mini"
    full = budget.count_tokens(model, render_explainer(template, examples))
    limit = full - 60
    messages, shown = budget.fit_examples(lambda ex: render_explainer(template, ex), examples, model, limit)
    assert budget.count_tokens(model, messages) <= limit < full
    bigger = budget.subset_examples(examples, len(shown) + 1)
    assert budget.count_tokens(model, render_explainer(template, bigger)) > limit
    assert messages[0] == render_explainer(template, examples)[0]  # the system prompt is never cut
    assert [e["id"] for e in shown] == [f"E{i:02d}" for i in range(1, len(shown) + 1)]
