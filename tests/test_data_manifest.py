"""Manifests: the demo pipeline on a manifest-described copy of the phantom gives the TotalSegmentator
layout's metrics; `medsae data ingest` builds the slices stage `exp run` then reuses; bad manifests are one line."""

from __future__ import annotations

import copy
from pathlib import Path

import pandas as pd
import pytest
import yaml
from byod_fixtures import phantom_manifest
from test_e2e import tiny_spec
from typer.testing import CliRunner

from medsae.data.index import load_slices
from medsae.errors import MedsaeError

PIPELINE = {"slices", "embed", "train", "encode", "evaluate"}


def _evaluate_metrics(registry, plan) -> dict[tuple, float]:
    rows = registry.query(
        "SELECT split, name, coalesce(target, '') AS t, coalesce(n_features, -1) AS f, value FROM metrics "
        "WHERE stage_key = ? AND name NOT LIKE 'seconds%'",
        [plan.nodes["evaluate"].key],
    )
    return {(r["split"], r["name"], r["t"], r["f"]): r["value"] for r in rows}


@pytest.mark.slow
def test_demo_pipeline_on_a_manifest_copy_gives_the_same_metrics(tmp_path):
    """tests/test_e2e.py's tiny spec, made cheaper (every third slice, 32 px backbone input, 5 SAE epochs,
    no plots), through evaluate: on the phantom as TotalSegmentator layout and as a manifest in another
    folder pointing at the same files."""
    from medsae.plan import plan_experiment, run_plans
    from medsae.registry import Registry
    from medsae.spec import parse_specs

    raw = tiny_spec(tmp_path)
    raw["data"]["stride"] = 3
    raw["embed"]["input_size"] = 32
    raw["sae"]["epochs"] = 5
    raw["eval"].update(plots=False, mono_null_draws=10, probe_max_iter=200)
    layout = parse_specs({**raw, "name": "tiny-layout"})[0]
    registry = Registry(tmp_path / "registry.duckdb")
    plans = [plan_experiment(layout, only={"evaluate"})]  # writes the phantom
    phantom_manifest(tmp_path / "phantom", tmp_path / "byod" / "manifest.csv")
    described = copy.deepcopy(raw)
    same = {k: v for k, v in raw["data"].items() if k not in ("root", "phantom")}
    described["data"] = {**same, "root": str(tmp_path / "byod"), "format": "manifest"}
    plans.append(plan_experiment(parse_specs({**described, "name": "tiny-manifest"})[0], only={"evaluate"}))
    assert plans[0].nodes["slices"].key != plans[1].nodes["slices"].key
    run_plans(plans, registry, only=PIPELINE, quiet=True)
    a, b = (load_slices(p.nodes["slices"].final_dir) for p in plans)
    columns = ["slice_uid", "split", "institute", "sex", "age", "study_type", "pathology", "body_region"]
    pd.testing.assert_frame_equal(a[columns], b[columns])
    first, second = (_evaluate_metrics(registry, p) for p in plans)
    assert len(first) > 20 and {"fvu", "l0_mean"} <= {k[1] for k in first}
    assert second == first


def test_ingest_defaults_are_the_spec_defaults_and_exp_run_reuses_the_stage(tmp_path, monkeypatch):
    """`medsae data ingest ROOT` (no option) and `--spec SPEC` build the stage `exp run` then finds done."""
    from medsae.cli.data import app
    from medsae.data.phantom import write_phantom
    from medsae.plan import plan_experiment, run_plans
    from medsae.registry import Registry
    from medsae.spec import load_specs

    monkeypatch.chdir(tmp_path)
    write_phantom(tmp_path / "data" / "ds", subjects=3, seed=4, shape=(12, 12, 16))
    registry = Registry(tmp_path / "r.duckdb")
    result = CliRunner().invoke(app, ["ingest", "data/ds", "--registry", str(registry.path)])
    assert result.exit_code == 0, result.output
    (tmp_path / "plain.yaml").write_text(yaml.safe_dump({"name": "plain", "data": {"root": "./data/ds/"}}))
    (tmp_path / "small.yaml").write_text(
        yaml.safe_dump({"name": "small", "data": {"root": "data/ds", "size": 32, "stride": 2}})
    )
    result = CliRunner().invoke(app, ["ingest", "--spec", "small.yaml", "--registry", str(registry.path)])
    assert result.exit_code == 0, result.output
    for name in ("plain", "small"):
        plan = plan_experiment(load_specs(tmp_path / f"{name}.yaml")[0], only={"slices"})
        outcomes = run_plans([plan], registry, only={"slices"}, quiet=True)
        assert [(o.kind, o.action) for o in outcomes] == [("slices", "done")], name
    keys = {r["stage_key"] for r in registry.query("SELECT stage_key FROM stages WHERE kind = 'slices'")}
    assert len(keys) == 2
    result = CliRunner().invoke(app, ["ingest", "--spec", "small.yaml", "--size", "64"])
    assert result.exit_code != 0 and "--spec takes every data setting from the spec (--size given)" in str(
        result.exception
    )


def test_bad_manifests_are_one_line(tmp_path):
    from medsae.data.config import DataSpec
    from medsae.data.manifest import collect_manifest

    def run(frame_or_text):
        path = tmp_path / "manifest.csv"
        if isinstance(frame_or_text, str):
            path.write_text(frame_or_text)
        else:
            frame_or_text.to_csv(path, index=False)
        return collect_manifest(tmp_path, DataSpec(root=str(tmp_path), format="manifest"), write=False)

    cases = [
        ("path,modality\na.nii.gz,ct\n", "the manifest has no 'image' column"),
        ("image,split\na.nii.gz,train\n", "column 'split' is reserved"),
        ("image,Sex,gender\na.nii.gz,m,m\n", "column 'sex' appears twice"),
        ("image,modality,2nd\na.nii.gz,ct,x\n", "column '2nd' is no usable name"),
    ]
    for text, message in cases:
        with pytest.raises(MedsaeError, match=message) as err:
            run(text)
        assert "\n" not in str(err.value)
    with pytest.raises(MedsaeError, match="manifest not found"):
        collect_manifest(tmp_path / "nowhere", DataSpec(root=str(tmp_path / "nowhere"), format="manifest"))
    assert Path(tmp_path / ".medsae").exists() is False
