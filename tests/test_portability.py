"""A project folder (registry + artifacts + data + spec) that is copied or moved keeps working.

The tiny e2e pipeline runs once per test session into a project folder whose spec names its data
and artifacts with relative paths (``tiny_project`` builds it; ``test_gc`` reuses it). Each test
copies that folder with ``shutil.copytree`` and drives the real ``medsae`` command (the Typer app,
in this process, against the real DuckDB file and artifacts; nothing of medsae is mocked).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import duckdb
import numpy as np
import yaml
from test_e2e import tiny_spec
from typer.testing import CliRunner

from medsae.cli.main import app
from medsae.plan import STAGES, experiment_stage_dirs, plan_experiment
from medsae.registry import Registry
from medsae.spec import load_specs

#: Every stage but the optional grounding stage, which this spec leaves off.
ALWAYS_PLANNED = [kind for kind in STAGES if kind != "ground"]

SPEC = "tiny.yaml"


def micro_spec() -> dict:
    """The e2e tiny spec, smaller still, with paths relative to the spec file's folder."""
    spec = tiny_spec(Path("/unused"))
    spec["artifacts"] = "artifacts"
    spec["data"].update(root="phantom", phantom={"subjects": 6, "seed": 3, "shape": [24, 24, 32]}, size=32, stride=2)
    spec["embed"].update(input_size=32, pretrained=False)
    spec["sae"].update(d_sae=64, k=4, epochs=4)
    spec["eval"].update(recovery_ns=[1, 5], retrieval_refs=20, mono_null_draws=10, plots=False)
    spec["interpret"].update(
        max_latents=4, detect=False, ranking=False, bootstrap=20, permutations=20, simulate_random=4, shuffled_min=2
    )
    return spec


def cli(*args: str, ok: bool = True, input: str | None = None):
    """Run `medsae ARGS` (the real Typer app) in this process; fail the test on a non-zero exit if ``ok``."""
    result = CliRunner().invoke(app, list(args), input=input)
    if ok and result.exit_code != 0:
        raise AssertionError(
            f"medsae {' '.join(args)} exited {result.exit_code}:\n{result.output}\n{result.exception!r}"
        )
    return result


def tiny_project(tmp_path_factory, monkeypatch) -> Path:
    """A finished tiny project folder, built once per session (later calls return the same folder).

    Built with the current directory somewhere else, so relative spec paths can only resolve
    against the spec file's folder.
    """
    base = tmp_path_factory.getbasetemp() / "tiny-project-template"
    project = base / "project"
    if (base / "built").is_file():
        return project
    project.mkdir(parents=True, exist_ok=True)
    (project / SPEC).write_text(yaml.safe_dump(micro_spec()))
    elsewhere = base / "cwd"
    elsewhere.mkdir(exist_ok=True)
    with monkeypatch.context() as m:
        m.chdir(elsewhere)
        out = cli("exp", "run", str(project / SPEC), "--registry", str(project / "registry.duckdb")).output
    assert "7 stage(s) run" in out, out
    assert list(elsewhere.iterdir()) == []  # nothing landed in the current directory
    (base / "built").write_text("ok")
    return project


def copy_project(template: Path, dest: Path) -> Path:
    shutil.copytree(template, dest, symlinks=True)
    return dest


def plan_statuses(project: Path) -> list[str]:
    """The status column of `medsae exp plan` for the project's spec, one entry per stage row."""
    out = cli("exp", "plan", str(project / SPEC), "--registry", str(project / "registry.duckdb")).output
    return re.findall(r"\b(done|pending|blocked)\b", out)


def run_summary(project: Path) -> str:
    out = cli("exp", "run", str(project / SPEC), "--registry", str(project / "registry.duckdb")).output
    return out.strip().splitlines()[-1]


def test_moved_project_plans_every_stage_done_and_runs_nothing(tmp_path_factory, tmp_path, monkeypatch):
    template = tiny_project(tmp_path_factory, monkeypatch)
    original = copy_project(template, tmp_path / "disk-a" / "project")
    monkeypatch.chdir(tmp_path)  # neither project folder

    # the registry stores folders and the spec path relative to its own folder
    con = duckdb.connect(str(original / "registry.duckdb"), read_only=True)
    try:
        stored = dict(con.execute("SELECT kind, artifact_dir FROM stages").fetchall())
        spec_paths = [r[0] for r in con.execute("SELECT spec_path FROM experiments").fetchall()]
    finally:
        con.close()
    assert sorted(stored) == sorted(ALWAYS_PLANNED)
    for kind, folder in stored.items():
        assert not Path(folder).is_absolute() and folder.startswith(f"artifacts/{kind}/"), folder
    assert spec_paths == [SPEC]

    moved = copy_project(original, tmp_path / "disk-b" / "moved")
    assert plan_statuses(moved) == ["done"] * 7
    assert "0 stage(s) run, 7 already done" in run_summary(moved)

    shutil.rmtree(tmp_path / "disk-a")  # the original is gone: the copy needs nothing from it
    assert plan_statuses(moved) == ["done"] * 7
    assert "0 stage(s) run, 7 already done" in run_summary(moved)

    # readers find the copy's folders (the same files the run wrote, byte for byte)
    dirs = experiment_stage_dirs(Registry(moved / "registry.duckdb"), "tiny")
    assert sorted(dirs) == sorted(ALWAYS_PLANNED)
    for kind, folder in dirs.items():
        assert folder.resolve() == (moved / stored[kind]).resolve() and folder.is_dir()
    con = duckdb.connect(str(moved / "registry.duckdb"), read_only=True)
    try:
        files = con.execute("SELECT s.artifact_dir, a.path, a.bytes FROM artifacts a JOIN stages s USING (stage_key)")
        rows = files.fetchall()
    finally:
        con.close()
    assert rows
    for folder, rel, size in rows:
        assert (moved / folder / rel).stat().st_size == size
    # a query through the codes view reads the copy's encode folder
    sql = cli(
        "sql", "SELECT count(*) AS n FROM codes WHERE experiment = 'tiny'", "--format", "csv",
        "--registry", str(moved / "registry.duckdb"),
    )  # fmt: skip
    n_codes = int(sql.output.strip().splitlines()[-1])
    assert n_codes > 0 and n_codes == np.count_nonzero(np.load(dirs["encode"] / "codes_values.npy"))

    # slices render from the copy's data folder (the original dataset is gone with disk-a)
    from medsae.data.render import render_index, render_slice

    monkeypatch.delenv("MEDSAE_DATA_ROOT", raising=False)
    index = render_index(dirs["slices"])
    assert index.root.resolve() == (moved / "phantom").resolve()
    image = render_slice(dirs["slices"], 0)
    assert image.ndim >= 2 and image.size > 0 and float(image.std()) > 0


def test_migration_makes_old_absolute_folders_relative(tmp_path_factory, tmp_path, monkeypatch):
    """A registry written before relative paths (absolute folders, schema version 2) is converted on open."""
    template = tiny_project(tmp_path_factory, monkeypatch)
    project = copy_project(template, tmp_path / "old")
    registry = project / "registry.duckdb"
    con = duckdb.connect(str(registry))
    try:
        relative = dict(con.execute("SELECT stage_key, artifact_dir FROM stages").fetchall())
        base = str(project.resolve())
        con.execute("UPDATE stages SET artifact_dir = ? || '/' || artifact_dir", [base])
        con.execute("UPDATE experiments SET spec_path = ? || '/' || spec_path", [base])
        con.execute(
            "INSERT INTO stages (stage_key, kind, code_version, params_json, status, artifact_dir) "
            "VALUES ('elsewhere', 'train', '1', '{}', 'done', '/somewhere/else/train/x')"
        )
        con.execute("DELETE FROM schema_version WHERE version > 2")
        con.execute("DROP TABLE IF EXISTS experiment_tags")
        con.execute("DROP TABLE IF EXISTS experiment_notes")
    finally:
        con.close()

    Registry(registry).ensure()  # the first write applies the pending migrations

    con = duckdb.connect(str(registry), read_only=True)
    try:
        after = dict(con.execute("SELECT stage_key, artifact_dir FROM stages").fetchall())
        spec_path = con.execute("SELECT spec_path FROM experiments").fetchone()[0]
        tables = {r[0] for r in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
    finally:
        con.close()
    assert after.pop("elsewhere") == "/somewhere/else/train/x"  # not under the registry's folder: kept
    assert after == relative
    assert spec_path == SPEC
    assert {"experiment_tags", "experiment_notes"} <= tables
    moved = copy_project(project, tmp_path / "new")
    shutil.rmtree(project)
    assert plan_statuses(moved) == ["done"] * 7


def test_spec_paths_resolve_against_the_spec_folder_and_keep_the_keys(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    body = micro_spec()
    body["data"]["split_file"] = "splits/table.parquet"
    places = [tmp_path / "one", tmp_path / "two" / "deeper"]
    specs = []
    for folder in places:
        folder.mkdir(parents=True)
        (folder / SPEC).write_text(yaml.safe_dump(body))
        specs.append(load_specs(folder / SPEC)[0])
    for folder, spec in zip(places, specs, strict=True):
        assert spec.artifacts_dir == folder / "artifacts"
        assert spec.data_root == folder / "phantom"
        data = spec.resolved_data()
        assert (data.root, data.split_file) == (str(folder / "phantom"), str(folder / "splits" / "table.parquet"))
        assert (spec.data.root, spec.artifacts) == ("phantom", "artifacts")  # the spec keeps what was written
        assert json.loads(spec.canonical_json())["data"]["root"] == "phantom"
    assert specs[0].spec_hash() == specs[1].spec_hash()
    keys = [{k: n.key for k, n in plan_experiment(s, prepare_data=False).nodes.items()} for s in specs]
    assert keys[0] == keys[1]
    # the stage gets the resolved folder; its key does not
    node = plan_experiment(specs[1], prepare_data=False).nodes["slices"]
    assert node.spec.root == str(places[1] / "phantom") and node.params["root"] == "phantom"
    assert node.final_dir.parent.parent == places[1] / "artifacts"
    # absolute paths and ~ are taken as they are
    body["data"]["root"] = str(tmp_path / "abs-data")
    body["artifacts"] = "~/medsae-artifacts"
    (places[0] / SPEC).write_text(yaml.safe_dump(body))
    spec = load_specs(places[0] / SPEC)[0]
    assert spec.data_root == tmp_path / "abs-data"
    assert spec.artifacts_dir == Path.home() / "medsae-artifacts"
