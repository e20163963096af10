"""The whole agent on synthetic "puzzle" latents (activation = a metadata rule), offline provider.

summarize -> interpret run as stages on real files (parquet slices, CSR codes), LLM calls go
through litellm to the offline ``medsae/baseline`` provider, rows go into a real DuckDB registry,
and the CLI commands read them back.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import interp_fixtures as synthetic
import pandas as pd
import pytest
import typer
from typer.testing import CliRunner

from medsae.interp.agent import Agent, AgentInputs
from medsae.interp.config import InterpretSpec
from medsae.interp.journal import insert_results
from medsae.interp.llm.offline import register_offline_model
from medsae.interp.stage import run_interpret, run_summarize
from medsae.registry import Registry
from medsae.sae.codes import write_codes
from medsae.stage import StageContext

#: words the right explanation of each puzzle latent must contain
PUZZLE_WORDS = ["liver", "ct axial", "female", "brain", "pelvis", "coronal", "kidney left", "site b"]

PARAMS = InterpretSpec(
    pool_splits=["val"],
    simulate_per_decile=10,
    simulate_random=100,
    max_per_volume_score=4,
    simulate_batch=20,
    shuffled_fraction=1.0,
    bootstrap=200,
    permutations=200,
).model_dump(mode="json")


def _ctx(kind: str, root: Path, inputs: dict[str, Path], params: dict) -> StageContext:
    out = root / kind / f"{kind}-key"
    return StageContext(
        kind=kind,
        key=f"{kind}-key",
        spec=InterpretSpec.model_validate(params),
        out_dir=out,
        work_dir=root / ".work" / kind,
        inputs=inputs,
        input_keys={k: f"{k}-key" for k in inputs},
        seed=0,
        quiet=True,
    )


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("interp")
    mp = pytest.MonkeyPatch()
    mp.setenv("MEDSAE_LLM_CACHE", str(root / "llm_cache"))
    mp.setenv("MEDSAE_QUIET", "1")
    slices, structures = synthetic.make_slices(n_scans=100, slices_per_scan=24, seed=0, split="val")
    slices_dir = synthetic.write_slices_dir(root / "slices" / "slices-key", slices, structures)
    codes = synthetic.puzzle_codes(slices, structures)
    encode_dir = write_codes(root / "encode" / "encode-key", codes, slices["slice_id"].to_numpy())
    train_dir = root / "train" / "train-key"
    train_dir.mkdir(parents=True)
    summ = run_summarize(
        _ctx("summarize", root, {"encode": encode_dir, "slices": slices_dir, "train": train_dir}, PARAMS)
    )
    inputs = {"summarize": root / "summarize" / "summarize-key", "encode": encode_dir, "slices": slices_dir}
    interp = run_interpret(_ctx("interpret", root, inputs, PARAMS))
    yield {
        "root": root,
        "slices": slices,
        "codes": codes,
        "summarize": summ,
        "interpret": interp,
        "inputs": inputs,
    }
    mp.undo()


def _scores(tables: dict) -> pd.DataFrame:
    expl = pd.DataFrame(tables["explanations"])
    scores = pd.DataFrame(tables["explanation_scores"])
    return scores.merge(expl[["explanation_id", "latent", "kind", "text", "status"]], on="explanation_id")


def test_summarize_outputs(workspace):
    result = workspace["summarize"]
    latents = result.tables["latents"].to_pandas()
    assert latents["status"].tolist()[-1] == "dead"
    assert set(latents["status"][:8]) <= {"live", "dense"}
    folder = workspace["inputs"]["summarize"]
    assert (folder / "latents.parquet").is_file() and (folder / "example_sets.parquet").is_file()
    pool = json.loads((folder / "pool.json").read_text())
    assert pool["explain_scans"] + pool["score_scans"] == 100 and not pool["widened"]


def test_puzzles_right_explanation_high_random_one_near_zero(workspace):
    tables = workspace["interpret"].tables
    m = _scores(tables)
    pearson = m[m["method"] == "pearson"]
    real = pearson[pearson["kind"] == "explanation"].set_index("latent")
    shuffled = pearson[pearson["kind"] == "shuffled"].set_index("latent")
    assert sorted(real.index) == list(range(8)) and sorted(shuffled.index) == list(range(8))
    for latent, word in enumerate(PUZZLE_WORDS):
        assert word in real.loc[latent, "text"].lower(), real.loc[latent, "text"]
        assert real.loc[latent, "value"] >= 0.8, (latent, real.loc[latent, "text"], real.loc[latent, "value"])
        assert abs(shuffled.loc[latent, "value"]) <= 0.2, (latent, shuffled.loc[latent, "value"])
        assert real.loc[latent, "ci_low"] > shuffled.loc[latent, "ci_high"]
        assert real.loc[latent, "p_value"] < 0.01
    # the simulation set is firing across deciles + random, 1:1, and predictions were all read
    assert (real["n"] >= 100).all() and (real["n_missing"] == 0).all()
    detection = m[(m["method"] == "detection_bacc") & (m["kind"] == "explanation")]
    assert len(detection) == 8 and (detection["value"] >= 0.8).all()
    ranking = m[m["method"] == "ranking_top2"]
    assert len(ranking) == 8 and ranking["value"].mean() >= 0.75 and (ranking["chance"] == 0.4).all()
    best = m[(m["kind"] == "best_attribute") & (m["method"] == "pearson")]
    assert len(best) == 8
    prompts = {p["name"] for p in tables["prompts"]}
    assert {"explainer_metadata_v1", "simulator_metadata_v1", "detector_metadata_v1", "ranking_v1"} <= prompts
    assert all(r["cached"] is False for r in tables["llm_calls"]) and tables["llm_calls"]


def test_rerun_inserts_nothing_and_a_new_model_adds_rows(workspace, tmp_path):
    registry = Registry(tmp_path / "registry.duckdb")
    first = insert_results(registry, workspace["interpret"].tables)
    assert first["explanations"] == len(workspace["interpret"].tables["explanations"]) > 0
    counts = {
        t: registry.query(f"SELECT count(*) AS n FROM {t}")[0]["n"] for t in ("explanations", "explanation_scores")
    }

    inputs = workspace["inputs"]
    agent_inputs = AgentInputs(inputs["summarize"], inputs["slices"], "train-key", "summarize-key")
    again = Agent(agent_inputs, InterpretSpec.model_validate(PARAMS), workspace["root"] / "llm_cache").run()
    assert again.summary["llm_calls"] == 0 and again.summary["cache_hits"] > 0
    new = insert_results(registry, again.tables)
    assert new["explanations"] == 0 and new["explanation_scores"] == 0 and new["prompts"] == 0
    assert new["llm_calls"] == 0  # cache hits are not calls
    for table, n in counts.items():
        assert registry.query(f"SELECT count(*) AS n FROM {table}")[0]["n"] == n

    from medsae.interp.llm import rule_model

    register_offline_model("baseline_twin", rule_model.handle)
    twin_spec = InterpretSpec.model_validate(PARAMS | {"explainer_model": "medsae/baseline_twin"})
    twin = Agent(agent_inputs, twin_spec, workspace["root"] / "llm_cache")
    added = insert_results(registry, twin.run().tables)
    assert added["explanations"] == 8 + 8  # 8 explanations + 8 shuffled controls of the new explainer
    rows = registry.query(
        "SELECT explainer_model, count(*) AS n FROM explanations WHERE kind = 'explanation' GROUP BY 1"
    )
    assert {r["explainer_model"]: r["n"] for r in rows} == {"medsae/baseline": 8, "medsae/baseline_twin": 8}


def test_parse_failures_are_recorded_without_text(workspace):
    register_offline_model("mute", lambda messages, params: "I would rather not say.")
    inputs = workspace["inputs"]
    agent = Agent(
        AgentInputs(inputs["summarize"], inputs["slices"], "train-key", "summarize-key"),
        InterpretSpec.model_validate(PARAMS | {"explainer_model": "medsae/mute", "max_latents": 3}),
        workspace["root"] / "llm_cache",
    )
    result = agent.run()
    expl = [r for r in result.tables["explanations"] if r["kind"] == "explanation"]
    assert len(expl) == 3 and all(r["status"] == "parse_failed" and r["text"] is None for r in expl)
    scored = {s["explanation_id"] for s in result.tables["explanation_scores"]}
    assert not scored & {r["explanation_id"] for r in expl}
    assert result.summary["parse_failed"] == 3


def _register_experiment(registry: Registry, workspace) -> None:
    root = workspace["root"]
    spec = {"name": "puzzles", "interpret": PARAMS}
    registry.insert(
        "experiments",
        [{"experiment_id": "exp-1", "name": "puzzles", "spec_json": json.dumps(spec), "spec_hash": "h"}],
    )
    stages = {
        "slices": root / "slices" / "slices-key",
        "encode": root / "encode" / "encode-key",
        "summarize": root / "summarize" / "summarize-key",
        "train": root / "train" / "train-key",
    }
    registry.insert(
        "experiment_stages", [{"experiment_id": "exp-1", "kind": k, "stage_key": f"{k}-key"} for k in stages]
    )
    registry.insert(
        "stages",
        [
            {
                "stage_key": f"{k}-key",
                "kind": k,
                "code_version": "1",
                "params_json": "{}",
                "status": "done",
                "artifact_dir": str(d),
            }
            for k, d in stages.items()
        ],
    )


def test_cli_explain_run_compare_show_and_search(workspace, tmp_path, monkeypatch):
    from medsae.cli.explain import app
    from medsae.cli.search import search_command

    monkeypatch.setenv("COLUMNS", "250")  # rich tables are not truncated
    registry = Registry(tmp_path / "registry.duckdb")
    _register_experiment(registry, workspace)
    runner = CliRunner()
    reg = ["--registry", str(registry.path)]
    res = runner.invoke(app, ["run", "puzzles", "--model", "medsae/baseline", "--latents", "0-2,5", *reg])
    assert res.exit_code == 0, res.output
    assert "4/4 latents explained" in res.output and "0 LLM calls" in res.output  # all cached
    assert re.search(r"new rows: explanations 1[0-9]", res.output)
    again = runner.invoke(app, ["run", "puzzles", "--model", "medsae/baseline", "--latents", "0-2,5", *reg])
    assert "new rows: explanations 0, explanation_scores 0" in again.output

    res = runner.invoke(app, ["compare", "puzzles", *reg])
    assert res.exit_code == 0 and "shuffled" in res.output and "best_attribute" in res.output
    res = runner.invoke(app, ["show", "puzzles", "0", *reg])
    assert res.exit_code == 0 and "Slices showing liver" in res.output and "contrast_matched" in res.output
    bad = runner.invoke(app, ["run", "nope", "--model", "medsae/baseline", *reg])
    assert bad.exit_code != 0

    search = typer.Typer()
    search.command()(search_command)
    res = runner.invoke(search, ["puzzles", "CT axial slices", "--latents", "1", "--k", "10", *reg])
    assert res.exit_code == 0, res.output
    rows = registry.query("SELECT name, value, target FROM metrics WHERE name LIKE 'search_precision%'")
    values = {r["name"]: r["value"] for r in rows}
    assert values["search_precision"] == 1.0 and values["search_precision_modality"] == 1.0
    res = runner.invoke(search, ["puzzles", "CT axial slices", "--latents", "1", *reg])
    assert "0 new metric row(s) stored" in res.output
