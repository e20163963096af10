"""End to end through the CLI on a tiny phantom: run, rerun, kill and resume, bad specs, offline study spec.

These tests run the real `medsae` command in subprocesses against a real registry file and real
artifacts; nothing of medsae is mocked.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def tiny_spec(tmp: Path, artifacts: str = "artifacts") -> dict:
    return {
        "name": "tiny",
        "seed": 0,
        "artifacts": str(tmp / artifacts),
        "data": {
            "root": str(tmp / "phantom"),
            "phantom": {"subjects": 8, "seed": 3, "shape": [40, 40, 48]},
            "size": 48,
        },
        "embed": {
            "source": "efficientnet_lite0",
            "model": "efficientnet_lite0",
            "pooling": "mean",
            "input_size": 64,
            "batch_size": 64,
        },
        "sae": {
            "arch": "topk",
            "d_sae": 256,
            "k": 6,
            "batch_size": 64,
            "epochs": 60,
            "lr": 0.001,
            "warmup_steps": 10,
            "checkpoint_every": 5,
        },
        "eval": {
            "probe_max_train": 500,
            "recovery_max_train": 300,
            "recovery_ns": [1, 5, 10],
            "retrieval_refs": 50,
        },
        # every latent also gets a shuffled explanation, so the explanations are compared pairwise
        "interpret": {"min_active": 3, "min_patients": 2, "max_latents": 40, "shuffled_fraction": 1.0},
    }


def medsae(*args: str, registry: Path, cwd: Path, check: bool = True, timeout: int = 600):
    env = dict(os.environ, MEDSAE_REGISTRY=str(registry), MEDSAE_QUIET="1")
    proc = subprocess.run(
        [sys.executable, "-m", "medsae.cli.main", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"medsae {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def query(registry: Path, sql: str, params=None):
    con = duckdb.connect(str(registry), read_only=True)
    try:
        return con.execute(sql, params or []).fetchall()
    finally:
        con.close()


def eval_metrics(registry: Path) -> dict[tuple, float]:
    rows = query(
        registry,
        """SELECT m.split, m.name, coalesce(m.target, ''), coalesce(m.n_features, -1), m.value
           FROM experiments e JOIN experiment_stages es USING (experiment_id)
           JOIN metrics m ON m.stage_key = es.stage_key
           WHERE e.name = 'tiny' AND es.kind = 'evaluate' AND m.name NOT LIKE 'seconds%'""",
    )
    return {tuple(r[:4]): r[4] for r in rows}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One uninterrupted run of the tiny spec (shared by the tests of this module)."""
    tmp = tmp_path_factory.mktemp("e2e")
    spec_path = tmp / "tiny.yaml"
    spec_path.write_text(yaml.safe_dump(tiny_spec(tmp)))
    registry = tmp / "registry.duckdb"
    proc = medsae("exp", "run", str(spec_path), registry=registry, cwd=tmp)
    return tmp, spec_path, registry, proc


def test_run_records_every_stage_and_explanations(finished_run):
    tmp, _, registry, proc = finished_run
    assert "7 stage(s) run" in proc.stdout
    stages = dict(query(registry, "SELECT kind, status FROM stages"))
    assert set(stages) == {"slices", "embed", "train", "encode", "evaluate", "summarize", "interpret"}
    assert set(stages.values()) == {"done"}
    n_expl = query(registry, "SELECT count(*) FROM explanations WHERE kind = 'explanation'")[0][0]
    assert n_expl > 0
    metrics = eval_metrics(registry)
    names = {k[1] for k in metrics}
    assert {"fvu", "l0_mean", "dead_fraction"} <= names
    # every artifact folder exists where the registry says (relative to its folder), with the files it lists
    for stage_key, path, size in query(
        registry,
        "SELECT a.stage_key, s.artifact_dir || '/' || a.path, a.bytes FROM artifacts a JOIN stages s USING (stage_key)",
    ):
        assert (registry.parent / path).stat().st_size == size, (stage_key, path)
    # the sql command answers, read-only
    out = medsae("sql", "SELECT count(*) AS n FROM explanations", "--format", "csv", registry=registry, cwd=tmp)
    assert int(out.stdout.strip().splitlines()[1]) == query(registry, "SELECT count(*) FROM explanations")[0][0]


def test_rerun_does_no_work(finished_run):
    tmp, spec_path, registry, _ = finished_run
    before = query(registry, "SELECT count(*) FROM metrics")[0][0]
    t0 = time.perf_counter()
    proc = medsae("exp", "run", str(spec_path), registry=registry, cwd=tmp)
    assert "0 stage(s) run, 7 already done" in proc.stdout
    assert time.perf_counter() - t0 < 60
    assert query(registry, "SELECT count(*) FROM metrics")[0][0] == before
    plan = medsae("exp", "plan", str(spec_path), registry=registry, cwd=tmp)
    assert plan.stdout.count("done") >= 7 and "pending" not in plan.stdout


def test_force_reruns_one_stage_and_replaces_its_rows(finished_run):
    tmp, spec_path, registry, _ = finished_run
    before = eval_metrics(registry)
    n_rows = query(registry, "SELECT count(*) FROM metrics")[0][0]
    proc = medsae("exp", "run", str(spec_path), "--force", "evaluate", registry=registry, cwd=tmp)
    assert "1 stage(s) run, 6 already done" in proc.stdout
    assert query(registry, "SELECT count(*) FROM metrics")[0][0] == n_rows  # replaced, not duplicated
    after = eval_metrics(registry)
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert after[key] == pytest.approx(value, rel=1e-6, abs=1e-9) if value is not None else after[key] is None
    bad = medsae("exp", "run", str(spec_path), "--force", "trian", registry=registry, cwd=tmp, check=False)
    assert bad.returncode != 0 and "unknown stage 'trian'" in bad.stderr


def test_show_and_list(finished_run):
    tmp, _, registry, _ = finished_run
    show = medsae("exp", "show", "tiny", registry=registry, cwd=tmp)
    assert "evaluate" in show.stdout and "fvu" in show.stdout
    listing = medsae("exp", "list", registry=registry, cwd=tmp)
    assert "tiny" in listing.stdout and "7/7" in listing.stdout
    missing = medsae("exp", "show", "nope", registry=registry, cwd=tmp, check=False)
    assert missing.returncode != 0 and len(missing.stderr.strip().splitlines()) == 1


def test_sigkill_during_training_resumes_to_the_same_metrics(finished_run):
    tmp, _, registry_a, _ = finished_run
    spec = tiny_spec(tmp, artifacts="artifacts_killed")
    spec_path = tmp / "tiny_killed.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    registry = tmp / "killed.duckdb"
    # the same stage keys as the finished run (artifacts folders are not part of keys)
    medsae("exp", "run", str(spec_path), "--only", "slices", "--only", "embed", registry=registry, cwd=tmp)
    env = dict(os.environ, MEDSAE_REGISTRY=str(registry), MEDSAE_QUIET="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "medsae.cli.main", "exp", "run", str(spec_path)],
        cwd=tmp,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    work = tmp / "artifacts_killed" / "train" / ".work"
    deadline = time.time() + 300
    try:
        while time.time() < deadline:
            if work.exists() and any(p.is_file() for p in work.rglob("*")):
                break
            assert proc.poll() is None, "run finished before a training checkpoint appeared"
            time.sleep(0.05)
        else:
            pytest.fail("no training checkpoint appeared")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    finished = [p for p in (tmp / "artifacts_killed" / "train").iterdir() if not p.name.startswith(".")]
    assert finished == [], "a killed training stage must not leave a completed folder"
    assert query(registry, "SELECT count(*) FROM stages WHERE kind = 'train'")[0][0] == 0
    medsae("exp", "run", str(spec_path), registry=registry, cwd=tmp)
    a, b = eval_metrics(registry_a), eval_metrics(registry)
    assert a.keys() == b.keys() and a
    for key in a:
        if a[key] is None:
            assert b[key] is None, key
        else:
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key


def test_bad_spec_exits_2_with_one_line_and_writes_nothing(tmp_path):
    registry = tmp_path / "registry.duckdb"
    for body, field in (
        ({"name": "x", "data": {"root": "d", "stridee": 2}}, "data.stridee"),
        ({"name": "x", "data": {"root": "d"}, "sae": {"k": "ten"}}, "sae.k"),
    ):
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump(body))
        for command in (("exp", "validate"), ("exp", "run")):
            proc = medsae(*command, str(path), registry=registry, cwd=tmp_path, check=False)
            assert proc.returncode == 2, proc.stderr
            lines = proc.stderr.strip().splitlines()
            assert len(lines) == 1 and str(path) in lines[0] and field in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]


def test_study_spec_validates_plans_and_fails_early_offline(tmp_path):
    spec = ROOT / "experiments" / "dinov3_k10.yaml"
    registry = tmp_path / "registry.duckdb"
    assert medsae("exp", "validate", str(spec), registry=registry, cwd=tmp_path).returncode == 0
    plan = medsae("exp", "plan", str(spec), registry=registry, cwd=tmp_path)
    assert "blocked" in plan.stdout
    proc = medsae("exp", "run", str(spec), registry=registry, cwd=tmp_path, check=False)
    assert proc.returncode != 0  # before any stage: the one line names the missing data, no stage ran
    assert "ran " not in proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "data/TotalSegmentator" in lines[0]


def test_offline_explanations_name_enriched_structures_and_beat_shuffled(finished_run):
    """Issue 2's check on the phantom, computed independently from the registry and the codes."""
    import json
    import re

    import numpy as np
    import pyarrow.parquet as pq
    from scipy import sparse

    tmp, _, registry, _ = finished_run
    dirs = {kind: registry.parent / d for kind, d in query(registry, "SELECT kind, artifact_dir FROM stages")}
    slices_dir, encode_dir = dirs["slices"], dirs["encode"]
    vocab = json.loads((slices_dir / "structures.json").read_text())
    n_slices = pq.read_metadata(slices_dir / "slices.parquet").num_rows
    areas = pq.read_table(slices_dir / "slice_structures.parquet").to_pandas()
    col = {s: i for i, s in enumerate(vocab)}
    presence = np.zeros((n_slices, len(vocab)), bool)
    presence[areas["slice_id"].to_numpy(), areas["structure"].map(col).to_numpy()] = True
    codes = sparse.csr_matrix(
        (
            np.load(encode_dir / "codes_values.npy"),
            np.load(encode_dir / "codes_indices.npy"),
            np.load(encode_dir / "codes_indptr.npy"),
        )
    ).tocsc()
    code_slices = np.load(encode_dir / "slice_ids.npy")
    # the explainer only sees the explain partition of the interpretation pool: judge it there
    summarize_dir = dirs["summarize"]
    pool = json.loads((summarize_dir / "pool.json").read_text())
    partition = pq.read_table(summarize_dir / "partition.parquet").to_pandas()
    explain_scans = set(partition.loc[partition["partition"] == "explain", "scan"])
    meta = pq.read_table(slices_dir / "slices.parquet", columns=["slice_id", "modality", "image_id", "split"])
    meta = meta.to_pandas().set_index("slice_id").loc[code_slices]
    in_explain = (meta["modality"] + "/" + meta["image_id"]).isin(explain_scans) & meta["split"].isin(pool["splits"])
    in_explain = in_explain.to_numpy()
    base_rate = presence[code_slices[in_explain]].mean(axis=0)

    rows = query(
        registry,
        """SELECT l.latent, e.text FROM latents l
           JOIN explanations e ON e.latent = l.latent AND e.kind = 'explanation' AND e.status = 'ok'
           ORDER BY l.frequency DESC LIMIT 20""",
    )
    assert rows
    lifts = []  # (share among the top slices) - (base rate), for every structure an explanation names
    for latent, text in rows:
        words = re.sub(r"[^a-z0-9]+", " ", text.lower())
        named = [s for s in vocab if re.search(rf"(?<![a-z0-9]){re.escape(s.replace('_', ' '))}(?![a-z0-9])", words)]
        if not named:
            continue
        column = np.where(in_explain, codes[:, latent].toarray().ravel(), 0.0)
        top = np.argsort(-column)[: min(12, int((column > 0).sum()))]
        for structure in named:
            share = presence[code_slices[top], col[structure]].mean()
            print(
                f"latent {latent}: '{text}' {structure}: {share:.2f} of top slices vs {base_rate[col[structure]]:.2f}"
            )
            lifts.append(share - base_rate[col[structure]])
    # The explainer sees a sample of the firing slices and the test the top 12, so a single rare
    # structure may miss by chance; most named structures must be enriched, and clearly so on average.
    lifts = np.array(lifts)
    print(f"{(lifts > 0).mean():.0%} of {len(lifts)} named structures enriched, mean lift {lifts.mean():.2f}")
    assert len(lifts) >= 3
    assert (lifts > 0).mean() >= 0.75
    assert lifts.mean() > 0.2

    # Paired on the same latents: a shuffled explanation is scored on the latent it was moved to, so
    # only the per-latent difference is free of how hard each latent is to simulate.
    pairs = np.array(
        query(
            registry,
            """SELECT max(s.value) FILTER (WHERE e.kind = 'explanation'),
                      max(s.value) FILTER (WHERE e.kind LIKE 'shuffled%')
               FROM explanations e JOIN explanation_scores s USING (explanation_id)
               WHERE s.method = 'pearson' GROUP BY e.latent
               HAVING count(*) FILTER (WHERE e.kind = 'explanation') > 0
                  AND count(*) FILTER (WHERE e.kind LIKE 'shuffled%') > 0""",
        ),
        dtype=float,
    )
    pairs = pairs[~np.isnan(pairs).any(axis=1)]  # r is undefined where a simulation was constant
    diff = pairs[:, 0] - pairs[:, 1]
    standard_error = diff.std(ddof=1) / np.sqrt(len(diff))
    print(
        f"simulation r over {len(diff)} latents: real {pairs[:, 0].mean():.3f}, shuffled {pairs[:, 1].mean():.3f}, "
        f"paired difference {diff.mean():.3f} ± {standard_error:.3f} (standard error)"
    )
    assert len(diff) >= 20
    # one-sided paired test at about the 2.5 % level: the real explanation beats its shuffled control
    assert diff.mean() > 2 * standard_error
