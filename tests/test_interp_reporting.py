"""What ``exp show``, ``explain show`` and the report show about explanations.

* ``exp show``'s mean pearson per explainer is the mean of that explainer's own (non-baseline)
  scores, recomputed here from the registry.
* ``explain show`` and the report show the rows of the experiment asked for, not those of another
  experiment that shares its SAE.
* The report marks degenerate scores and says in words which scorer cannot tell a real
  explanation from a shuffled one.
"""

from __future__ import annotations

import re

import pytest
from interp_fixtures import PUZZLE_PARAMS, puzzle_experiment
from typer.testing import CliRunner

from medsae.interp.config import InterpretSpec
from medsae.interp.llm import rule_model
from medsae.interp.llm.offline import register_offline_model
from medsae.registry import Registry

PARAMS = InterpretSpec.model_validate(PUZZLE_PARAMS).model_dump(mode="json")


@pytest.fixture(scope="module")
def two_experiments(tmp_path_factory):
    """Experiments A and B share the SAE (train-key), each with its own summarize stage and explainer."""
    from test_interp_sanity import by_position

    from medsae.interp.experiment import explain_experiment

    root = tmp_path_factory.mktemp("reporting")
    mp = pytest.MonkeyPatch()
    mp.setenv("MEDSAE_LLM_CACHE", str(root / "llm_cache"))
    mp.setenv("MEDSAE_QUIET", "1")
    registry = Registry(root / "registry.duckdb")
    puzzle_experiment(root / "a", registry, PARAMS, name="A", n_scans=40)
    puzzle_experiment(
        root / "b", registry, PARAMS | {"simulate_random": 10}, name="B", n_scans=40, summarize_key="summarize-b"
    )
    register_offline_model("twin_b", rule_model.handle)
    register_offline_model("by_position", by_position)
    explain_experiment(registry, "A", "medsae/baseline")
    explain_experiment(registry, "A", "medsae/baseline", scorer="medsae/by_position")
    explain_experiment(registry, "B", "medsae/twin_b")
    yield registry
    mp.undo()


def test_exp_show_mean_pearson_leaves_baselines_out(two_experiments, monkeypatch):
    from medsae.cli.main import app

    monkeypatch.setenv("COLUMNS", "250")
    res = CliRunner().invoke(app, ["exp", "show", "A", "--registry", str(two_experiments.path)])
    assert res.exit_code == 0, res.output
    truth = two_experiments.query(
        """SELECT avg(s.value) AS m FROM explanation_scores s JOIN explanations e USING (explanation_id)
           WHERE e.explainer_model = 'medsae/baseline' AND e.kind = 'explanation' AND s.method = 'pearson'
             AND s.scorer_model = 'medsae/baseline'"""
    )[0]["m"]
    with_baselines = two_experiments.query(
        """SELECT avg(s.value) AS m FROM explanation_scores s JOIN explanations e USING (explanation_id)
           WHERE e.explainer_model = 'medsae/baseline' AND s.method = 'pearson'"""
    )[0]["m"]
    line = next(ln for ln in res.output.splitlines() if re.search(r"medsae/baseline\s", ln) and "│" in ln)
    shown = float(line.split("│")[-2])
    assert shown == pytest.approx(truth, abs=5e-4) and abs(shown - with_baselines) > 0.05
    assert not any(re.search(r"│\s*rule\s*│", ln) for ln in res.output.splitlines())


def test_explain_show_and_report_show_only_the_experiment_asked_for(two_experiments, tmp_path, monkeypatch):
    from medsae.cli.explain import app
    from medsae.report.build import build_report

    monkeypatch.setenv("COLUMNS", "250")
    res = CliRunner().invoke(app, ["show", "A", "0", "--registry", str(two_experiments.path)])
    assert res.exit_code == 0, res.output
    assert "medsae/baseline" in res.output and "twin_b" not in res.output
    res = CliRunner().invoke(app, ["show", "B", "0", "--registry", str(two_experiments.path)])
    assert "twin_b" in res.output and "by_position" not in res.output

    html = build_report(two_experiments, "A", tmp_path / "a.html", n_latents=3).read_text()
    assert "twin_b" not in html
    assert "pearson (degenerate)" in html  # by_position's scores stay visible, marked, out of the means
    assert "scorer medsae/by_position (parsed_int) cannot tell a real explanation from a shuffled one" in html
    assert re.search(r"scorer medsae/baseline \(parsed_int\) on medsae/baseline&#39;s explanations: real − shuffled "
                     r"pearson \+0\.\d\d, 95% CI \+0\.\d\d to \+\d\.\d\d", html)  # fmt: skip
    html_b = build_report(two_experiments, "B", tmp_path / "b.html", n_latents=3).read_text()
    assert "twin_b" in html_b and "by_position" not in html_b


def test_search_candidates_ignore_degenerate_scores(two_experiments):
    from medsae.interp.search import candidate_explanations

    before = candidate_explanations(two_experiments, "summarize-key", min_score=-1.0).set_index("latent")["score"]
    target = two_experiments.query(
        "SELECT explanation_id FROM explanations WHERE stage_key = 'summarize-key' AND kind = 'explanation' "
        "AND status = 'ok' AND latent = ?",
        [int(before.index[0])],
    )[0]["explanation_id"]
    two_experiments.insert(
        "explanation_scores",
        [
            {"score_id": "degenerate-0", "explanation_id": target, "method": "pearson", "value": 0.99,
             "scorer_model": "x", "degenerate": True, "extra_json": '{"degenerate":"slot"}'},
            {"score_id": "honest-0", "explanation_id": target, "method": "pearson", "value": 0.97,
             "scorer_model": "y", "degenerate": False},
        ],
    )  # fmt: skip
    after = candidate_explanations(two_experiments, "summarize-key", min_score=-1.0).set_index("latent")["score"]
    assert after.loc[before.index[0]] == pytest.approx(0.97)
    assert after.drop(before.index[0]).equals(before.drop(before.index[0]))
