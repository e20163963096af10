"""The stage table: one row per stage kind, read by the planner, the CLI and the report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medsae.errors import MedsaeError
from medsae.spec import ExperimentSpec, parse_specs
from medsae.specbase import Section
from medsae.stage import StageContext
from medsae.stages import STAGE_TABLE, STAGES, stage_def


def test_rows_are_ordered_and_wired_to_real_code_and_spec_fields():
    """Every name a row holds resolves: a renamed function, section or field fails here, not at run time."""
    assert len(set(STAGES)) == len(STAGES) == len(STAGE_TABLE)
    seen: set[str] = set()
    for d in STAGE_TABLE:
        assert set(d.upstream) <= seen, f"{d.kind} reads a stage that runs after it"
        seen.add(d.kind)
        assert callable(d.load()) and d.code_version()
        assert (d.run_many is None) == (d.load_many() is None) == (d.batch_by is None)
        assert d.batch_by is None or d.batch_by in d.upstream
        if d.section is None:
            assert not d.key_exclude and d.resolve is None
            continue
        section_type = ExperimentSpec.model_fields[d.section].annotation
        assert isinstance(section_type, type) and issubclass(section_type, Section), d.kind
        assert set(d.key_exclude) <= set(section_type.model_fields), (
            d.kind,
            set(d.key_exclude) - set(section_type.model_fields),
        )


def test_planner_cli_and_report_read_the_table():
    from medsae import plan
    from medsae.report import build

    assert plan.STAGES == STAGES == build.STAGE_ORDER == tuple(d.kind for d in STAGE_TABLE)
    with pytest.raises(MedsaeError, match="unknown stage 'trian'") as err:
        plan.run_plans([], None, force={"trian"})  # rejected before any registry use
    assert ", ".join(STAGES) in str(err.value)


def test_key_metrics_have_one_definition():
    from medsae.cli import exp
    from medsae.report import names

    assert exp.KEY_METRICS and all(any(k is m for m in names.KEY_METRICS) for k in exp.KEY_METRICS)
    assert {k.name for k in exp.KEY_METRICS} >= {names.FVU, names.R2, names.L0, "dead_fraction"}


def test_each_stage_gets_its_typed_section(tmp_path, monkeypatch):
    """The planner hands sections, not dicts; the slices stage's paths are resolved, its key keeps them as written."""
    from medsae.data.config import DataSpec
    from medsae.plan import plan_experiment

    monkeypatch.chdir(tmp_path)
    raw = {"name": "typed", "data": {"root": "data/here"}, "sae": {"k": 7}, "ground": {"enabled": True}}
    spec = parse_specs(raw)[0]
    plan = plan_experiment(spec, prepare_data=False)
    for d in STAGE_TABLE:
        node = plan.nodes[d.kind]
        if d.section is None:
            assert node.spec is None and node.params == {}
        else:
            assert isinstance(node.spec, type(getattr(spec, d.section))), d.kind
    assert isinstance(plan.nodes["slices"].spec, DataSpec)
    assert plan.nodes["slices"].spec.root == str(tmp_path / "data" / "here")
    assert plan.nodes["slices"].params["root"] == "data/here" and "phantom" not in plan.nodes["slices"].params
    assert plan.nodes["train"].spec is spec.sae and plan.nodes["train"].spec.k == 7
    summarize, interpret = plan.nodes["summarize"].params, plan.nodes["interpret"].params
    assert "explainer_model" in interpret and "explainer_model" not in summarize


def test_context_section_is_checked(tmp_path):
    from medsae.eval.config import EvalSpec
    from medsae.sae.config import SAESpec

    def ctx(**kw):
        return StageContext("train", "k", tmp_path, tmp_path, {}, {}, 0, **kw)

    typed = SAESpec(k=5)
    assert ctx(spec=typed).section(SAESpec) is typed
    with pytest.raises(MedsaeError, match="expected the EvalSpec section, got SAESpec") as err:
        ctx(spec=typed).section(EvalSpec)
    assert "\n" not in str(err.value)
    with pytest.raises(MedsaeError, match="expected the SAESpec section, got none") as err:
        ctx().section(SAESpec)
    assert "\n" not in str(err.value)


def test_train_stages_on_one_embedding_are_built_in_one_pass(tmp_path):
    """A sweep over sae.k: the table's run_many/batch_by hands both train stages to one trainer call."""
    from medsae.plan import plan_experiment, run_plans
    from medsae.registry import Registry

    raw = {
        "name": "pass",
        "artifacts": str(tmp_path / "artifacts"),
        "data": {"root": str(tmp_path / "data"), "phantom": {"subjects": 3, "shape": [16, 16, 20]}, "size": 32,
                 "stride": 2},
        "embed": {"source": "timm", "model": "vit_small_patch16_dinov3", "pretrained": False, "input_size": 32,
                  "model_kwargs": {"embed_dim": 16, "depth": 1, "num_heads": 2, "img_size": 32}, "device": "cpu"},
        "sae": {"d_sae": 32, "k": 4, "batch_size": 32, "epochs": 2, "device": "cpu"},
        "sweep": {"grid": {"sae.k": [2, 4]}},
    }  # fmt: skip
    plans = [plan_experiment(s) for s in parse_specs(raw)]
    registry = Registry(tmp_path / "r.duckdb")
    outcomes = run_plans(plans, registry, only={"slices", "embed", "train"}, quiet=True)
    assert [(o.kind, o.action) for o in outcomes] == [
        ("slices", "ran"),
        ("embed", "ran"),
        ("train", "ran"),
        ("train", "ran"),
    ]
    rows = registry.query("SELECT stage_key, summary_json FROM stages WHERE kind = 'train'")
    assert {r["stage_key"] for r in rows} == {p.nodes["train"].key for p in plans}
    assert [json.loads(r["summary_json"])["configs_in_pass"] for r in rows] == [2, 2]
    for p in plans:
        node = p.nodes["train"]
        assert node.inputs == {"embed": p.nodes["embed"].final_dir, "slices": p.nodes["slices"].final_dir}
        logged = json.loads((node.final_dir / "train_log.json").read_text())["params"]
        assert (
            logged == p.spec.sae.model_dump(mode="json")
            and Path(node.final_dir).parent == tmp_path / "artifacts" / "train"
        )
    assert stage_def("train").batch_by == "embed"


def test_registry_maintenance_knows_every_stage_and_stage_table():
    """gc and `exp rm` keep their own (import-light) lists: they must name every stage and stage-owned table."""
    from medsae.plan import _KEY_COLUMN
    from medsae.registry.maintenance import STAGE_KINDS, STAGE_TABLES

    assert STAGE_KINDS == tuple(STAGES)
    # explanations and their scores are removed together by a query of their own
    owned = {table for table, column in _KEY_COLUMN.items() if column and table != "explanations"}
    assert owned <= set(STAGE_TABLES)
