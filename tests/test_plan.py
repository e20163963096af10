"""Stage keys: what changes them and what does not."""

from __future__ import annotations

from medsae.plan import STAGES, plan_experiment
from medsae.spec import parse_specs


def _plan(tmp_path, **sections):
    raw = {"name": "p", "artifacts": str(tmp_path / "artifacts"), "data": {"root": str(tmp_path / "nodata")}}
    raw.update(sections)
    return plan_experiment(parse_specs(raw)[0])


def test_every_stage_gets_a_distinct_key(tmp_path):
    plan = _plan(tmp_path)
    keys = [plan.nodes[k].key for k in STAGES]
    assert len(set(keys)) == len(STAGES)
    assert all(len(k) == 64 for k in keys)


def test_sae_change_keeps_upstream_and_changes_downstream(tmp_path):
    a = _plan(tmp_path, sae={"k": 8})
    b = _plan(tmp_path, sae={"k": 16})
    for kind in ("slices", "embed"):
        assert a.nodes[kind].key == b.nodes[kind].key
    for kind in ("train", "encode", "evaluate", "summarize", "interpret"):
        assert a.nodes[kind].key != b.nodes[kind].key


def test_execution_only_fields_do_not_change_keys(tmp_path):
    a = _plan(tmp_path, embed={"batch_size": 8, "device": "cpu"}, sae={"checkpoint_every": 5})
    b = _plan(tmp_path, embed={"batch_size": 64, "device": "auto"}, sae={"checkpoint_every": 500})
    assert [a.nodes[k].key for k in STAGES] == [b.nodes[k].key for k in STAGES]


def test_explainer_model_only_changes_interpret(tmp_path):
    a = _plan(tmp_path, interpret={"explainer_model": "medsae/baseline"})
    b = _plan(tmp_path, interpret={"explainer_model": "openai/gpt-4o-mini"})
    assert a.nodes["summarize"].key == b.nodes["summarize"].key
    assert a.nodes["interpret"].key != b.nodes["interpret"].key


def test_missing_data_blocks_the_chain(tmp_path):
    plan = _plan(tmp_path)
    assert (
        plan.nodes["slices"].inputs_missing
        and str(tmp_path / "nodata") in plan.nodes["slices"].inputs_missing
    )
    assert plan.nodes["interpret"].inputs_missing
