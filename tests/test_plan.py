"""Stage keys: what changes them and what does not."""

from __future__ import annotations

from medsae.plan import STAGES, plan_experiment
from medsae.spec import parse_specs


def _plan(tmp_path, **sections):
    raw = {"name": "p", "artifacts": str(tmp_path / "artifacts"), "data": {"root": str(tmp_path / "nodata")}}
    raw.update(sections)
    return plan_experiment(parse_specs(raw)[0])


def test_every_stage_gets_a_distinct_key(tmp_path):
    plan = _plan(tmp_path, ground={"enabled": True})  # the optional stage too
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
    assert [a.nodes[k].key for k in a.nodes] == [b.nodes[k].key for k in b.nodes]


def test_explainer_model_only_changes_interpret(tmp_path):
    a = _plan(tmp_path, interpret={"explainer_model": "medsae/baseline"})
    b = _plan(tmp_path, interpret={"explainer_model": "openai/gpt-4o-mini"})
    assert a.nodes["summarize"].key == b.nodes["summarize"].key
    assert a.nodes["interpret"].key != b.nodes["interpret"].key


def test_missing_data_blocks_the_chain(tmp_path):
    plan = _plan(tmp_path)
    assert plan.nodes["slices"].inputs_missing and str(tmp_path / "nodata") in plan.nodes["slices"].inputs_missing
    assert plan.nodes["interpret"].inputs_missing


def test_experiment_stages_follow_the_current_plan(tmp_path):
    """A later plan of the same spec with new keys (the data changed) repoints the experiment."""
    from medsae.plan import register_experiment
    from medsae.registry import Registry

    scan = tmp_path / "data" / "CT_Dataset_v201" / "s0000"
    scan.mkdir(parents=True)
    (scan / "ct.nii.gz").write_bytes(b"first version")
    raw = {"name": "p", "artifacts": str(tmp_path / "artifacts"), "data": {"root": str(tmp_path / "data")}}
    registry = Registry(tmp_path / "r.duckdb")
    old = plan_experiment(parse_specs(raw)[0])
    register_experiment(registry, old, None, None)
    (scan / "ct.nii.gz").write_bytes(b"second, longer version")
    new = plan_experiment(parse_specs(raw)[0])
    assert new.experiment_id == old.experiment_id
    assert all(new.nodes[k].key != old.nodes[k].key for k in new.nodes)
    register_experiment(registry, new, None, None)
    rows = registry.query("SELECT kind, stage_key FROM experiment_stages WHERE experiment_id = ?", [new.experiment_id])
    assert {r["kind"]: r["stage_key"] for r in rows} == {k: n.key for k, n in new.nodes.items()}
    assert registry.query("SELECT count(*) AS n FROM experiments")[0]["n"] == 1


# -- the stage table keeps every key: the payload recomputed as plan.py's docstring states it ----------

#: The planner's wiring before the stage table (plan.py's STAGES/UPSTREAM/IMPLEMENTATION and the
#: section dict of stage_params), written out here so the keys are recomputed without the table.
_OLD_STAGES = {
    "slices": ((), "medsae.data.stage", "data"),
    "embed": (("slices",), "medsae.embed.stage", "embed"),
    "train": (("embed", "slices"), "medsae.sae.stage", "sae"),
    "encode": (("train", "embed"), "medsae.sae.stage", None),
    "evaluate": (("encode", "embed", "slices", "train"), "medsae.eval.stage", "eval"),
    "ground": (("encode", "embed", "slices", "train"), "medsae.ground.stage", "ground"),  # when enabled
    # evaluate joined summarize's upstream with the study protocol (it selects latents by evaluate's tables)
    "summarize": (("encode", "slices", "train", "evaluate"), "medsae.interp.stage", "interpret"),
    "interpret": (("summarize", "encode", "slices"), "medsae.interp.stage", "interpret"),
}
#: Stages that enter a key only when the experiment has them (interpret checks explanations against ground).
_OPTIONAL_UPSTREAM = {"interpret": ("ground",)}


def _old_keys(spec, manifest: str) -> dict[str, str]:
    """key = sha256(canonical_json({kind, code_version, params, seed, upstream: {kind: key}, inputs}))."""
    import hashlib
    import importlib
    import json

    from medsae.interp.config import LLM_ONLY_FIELDS
    from medsae.specbase import key_params

    keys: dict[str, str] = {}
    for kind, (upstream, module, section) in _OLD_STAGES.items():
        if kind == "ground" and not spec.ground.enabled:
            continue
        params = key_params(getattr(spec, section)) if section else {}
        if kind == "slices":
            params.pop("phantom", None)
        if kind == "summarize":
            params = {k: v for k, v in params.items() if k not in LLM_ONLY_FIELDS}
        payload = {
            "kind": kind,
            "code_version": str(importlib.import_module(module).CODE_VERSION),
            "params": params,
            "seed": spec.seed,
            "upstream": {up: keys[up] for up in upstream + _OPTIONAL_UPSTREAM.get(kind, ()) if up in keys},
            "inputs": {"dataset": manifest} if kind == "slices" else {},
        }
        text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        keys[kind] = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return keys


def test_stage_table_keeps_the_keys_of_the_e2e_and_demo_specs(tmp_path):
    import sys
    from pathlib import Path

    from medsae.data.totalsegmentator import dataset_manifest
    from medsae.spec import load_specs

    sys.path.insert(0, str(Path(__file__).parent))
    from test_e2e import tiny_spec

    tiny = parse_specs(tiny_spec(tmp_path))[0]
    planned = plan_experiment(tiny)  # writes the tiny phantom, digests it
    manifest = dataset_manifest(tmp_path / "phantom")
    assert {k: n.key for k, n in planned.nodes.items()} == _old_keys(tiny, manifest)
    offline = plan_experiment(tiny, prepare_data=False)
    assert {k: n.key for k, n in offline.nodes.items()} == _old_keys(tiny, "unknown")
    assert len({n.key for n in offline.nodes.values()} | {n.key for n in planned.nodes.values()}) == 14
    demo = load_specs(Path(__file__).parents[1] / "experiments" / "demo.yaml")[0]
    assert {k: n.key for k, n in plan_experiment(demo, prepare_data=False).nodes.items()} == _old_keys(demo, "unknown")
