"""The Python API (`medsae.open`) on a registry made by a real tiny run, and `export --format parquet`.

The README's Python example is executed verbatim; what it computes is checked against independent
reads: the encode stage's CSR files with scipy, the slices stage's Parquet files with pyarrow, and
direct SQL on the registry file.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp
import torch
import yaml

import medsae
from medsae.errors import MedsaeError

ROOT = Path(__file__).resolve().parents[1]


def small_spec(tmp: Path) -> dict:
    """The smallest complete experiment: ~170 phantom slices, a 64-latent TopK SAE, offline explainer."""
    return {
        "name": "demo",
        "seed": 0,
        "artifacts": str(tmp / "artifacts"),
        "data": {
            "root": str(tmp / "phantom"),
            "phantom": {"subjects": 6, "seed": 3, "shape": [32, 32, 40]},
            "size": 32,
            "stride": 2,
        },
        "embed": {
            "source": "efficientnet_lite0",
            "model": "efficientnet_lite0",
            "pooling": "mean",
            "input_size": 32,
            "batch_size": 64,
        },
        "sae": {"arch": "topk", "d_sae": 64, "k": 4, "batch_size": 64, "epochs": 5, "lr": 0.001, "warmup_steps": 2},
        "eval": {
            "probe_max_train": 200,
            "recovery_max_train": 100,
            "recovery_ns": [1, 5],
            "retrieval_refs": 20,
            "mono_null_draws": 10,
            "plots": False,
        },
        "interpret": {"min_active": 3, "min_patients": 2, "max_latents": 6},
    }


def medsae_cli(*args: str, registry: Path, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, MEDSAE_REGISTRY=str(registry), MEDSAE_QUIET="1")
    proc = subprocess.run(
        [sys.executable, "-m", "medsae.cli.main", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"medsae {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """One finished run of the small spec: (folder, registry file, kind -> stage folder)."""
    tmp = tmp_path_factory.mktemp("api")
    spec = tmp / "demo.yaml"
    spec.write_text(yaml.safe_dump(small_spec(tmp)))
    registry = tmp / "registry.duckdb"
    medsae_cli("exp", "run", str(spec), registry=registry, cwd=tmp)
    con = duckdb.connect(str(registry), read_only=True)
    try:
        # stored relative to the registry's folder (tmp) when under it
        dirs = {kind: tmp / d for kind, d in con.execute("SELECT kind, artifact_dir FROM stages").fetchall()}
    finally:
        con.close()
    return tmp, registry, dirs


def sql(registry: Path, query: str, params=None) -> list[tuple]:
    con = duckdb.connect(str(registry), read_only=True)
    try:
        return con.execute(query, params or []).fetchall()
    finally:
        con.close()


def csr_from_files(encode_dir: Path) -> tuple[sp.csr_matrix, np.ndarray]:
    """The encode stage's codes read with numpy + scipy only."""
    indptr, indices, values, ids = (
        np.load(encode_dir / f) for f in ("codes_indptr.npy", "codes_indices.npy", "codes_values.npy", "slice_ids.npy")
    )
    d_sae = int(pd.read_json(encode_dir / "meta.json", typ="series")["d_sae"])
    return sp.csr_matrix((values, indices, indptr), shape=(len(indptr) - 1, d_sae)), ids


def readme_example() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Python API", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_readme_example_runs_and_matches_independent_reads(project, monkeypatch, capsys):
    tmp, registry, dirs = project
    monkeypatch.chdir(tmp)
    monkeypatch.delenv("MEDSAE_REGISTRY", raising=False)
    before = sha256(registry)
    ns: dict = {}
    exec(compile(readme_example(), "README.md:python-api", "exec"), ns)  # the documented example
    printed = capsys.readouterr().out
    assert "demo" in printed
    assert sha256(registry) == before, "the API must never write the registry"

    ref, ref_ids = csr_from_files(dirs["encode"])
    codes, slices = ns["codes"], ns["slices"]
    assert sp.issparse(codes) and codes.shape == ref.shape and (codes != ref).nnz == 0
    # slice metadata row i describes code row i: compare with the slices stage's own file
    assert slices["slice_id"].tolist() == ref_ids.tolist()
    stage_slices = pq.read_table(dirs["slices"] / "slices.parquet").to_pandas().set_index("slice_id")
    assert slices["slice_uid"].tolist() == stage_slices.loc[ref_ids, "slice_uid"].tolist()
    assert slices["split"].tolist() == stage_slices.loc[ref_ids, "split"].tolist()

    latent = ns["latent"]
    assert latent == int(np.argmax(np.bincount(ref.indices, minlength=ref.shape[1])))
    column = ref[:, latent].toarray().ravel()
    assert np.allclose(sorted(ns["top"]["value"], reverse=True), np.sort(column)[::-1][:5])

    metrics = ns["metrics"]
    direct = sql(
        registry,
        """SELECT es.kind, m.split, m.name, m.target, m.n_features, m.value FROM experiments e
           JOIN experiment_stages es USING (experiment_id) JOIN metrics m ON m.stage_key = es.stage_key
           WHERE e.name = 'demo'""",
    )
    columns = ["stage", "split", "metric", "target", "n_features", "value"]
    want = pd.DataFrame(direct, columns=columns).astype({"n_features": float})
    got = metrics[columns].astype({"n_features": float})
    order = columns  # (duplicate keys, if any, are ordered by value)
    pd.testing.assert_frame_equal(
        got.sort_values(order, ignore_index=True), want.sort_values(order, ignore_index=True), check_dtype=False
    )
    assert len(got) > 20

    summarize_key = sql(registry, "SELECT stage_key FROM stages WHERE kind = 'summarize'")[0][0]
    n_expl = sql(registry, "SELECT count(*) FROM explanations WHERE stage_key = ?", [summarize_key])[0][0]
    assert len(ns["explanations"]) == n_expl > 0
    n_scores = sql(
        registry,
        "SELECT count(*) FROM explanation_scores JOIN explanations USING (explanation_id) WHERE stage_key = ?",
        [summarize_key],
    )[0][0]
    assert len(ns["scores"]) == n_scores > 0
    assert len(ns["latents"]) == sql(registry, "SELECT count(*) FROM latents")[0][0] > 0

    # the SAE and the memory-mapped embeddings reproduce the stored codes of the first slices
    emb = ns["emb"]
    assert isinstance(emb.shard(0), np.memmap)
    recomputed = ns["sae"].encode(ns["sae"].normalize(ns["x"])).numpy()
    assert np.allclose(recomputed, ref[:4].toarray(), atol=1e-4)

    # SQL over the codes view: the same top slices, with the organs of the slices stage
    organs = ns["organs"]
    top5 = np.sort(column[column > 0])[::-1][:5]
    assert np.allclose(organs["value"], top5)  # the 5 largest values (slices may tie)
    row_of = {int(s): i for i, s in enumerate(ref_ids)}
    assert np.allclose([column[row_of[s]] for s in organs["slice_id"]], organs["value"])
    assert organs["slice_id"].is_unique
    structures = pq.read_table(dirs["slices"] / "slice_structures.parquet").to_pandas()
    for slice_id, names in zip(organs["slice_id"], organs["organs"], strict=True):
        want = sorted(structures.loc[structures["slice_id"] == slice_id, "structure"])
        assert (sorted(names.split(", ")) if names else []) == want


def test_encode_writes_the_long_codes_table(project):
    _, _, dirs = project
    ref, ids = csr_from_files(dirs["encode"])
    table = pq.read_table(dirs["encode"] / "codes.parquet").to_pandas()
    coo = ref.tocoo()
    want = pd.DataFrame({"slice_id": ids[coo.row], "latent": coo.col, "value": coo.data})
    want = want.sort_values(["latent", "slice_id"], ignore_index=True)
    pd.testing.assert_frame_equal(table, want, check_dtype=False)


def run_main(*args: str, capsys) -> tuple[int, str, str]:
    """The `medsae` entry point in this process (exit code, stdout, stderr)."""
    from medsae.cli.main import main

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", ["medsae", *args])
        with pytest.raises(SystemExit) as exit_:
            main()
    out = capsys.readouterr()
    return int(exit_.value.code or 0), out.out, out.err


def check_export(out: Path, tmp: Path, registry: Path, encode_dir: Path) -> None:
    """The three files, 0644, no path inside; contents equal the CSR files and the registry tables."""
    assert sorted(p.name for p in out.iterdir()) == ["codes.parquet", "slice_structures.parquet", "slices.parquet"]
    for path in out.iterdir():
        assert path.stat().st_mode & 0o777 == 0o644, path
        raw = path.read_bytes()
        assert str(tmp).encode() not in raw and b"/artifacts/" not in raw, path
    ref, ids = csr_from_files(encode_dir)
    codes = pq.read_table(out / "codes.parquet").to_pandas()
    row_of = pd.Series(np.arange(len(ids)), index=ids)
    rebuilt = sp.csr_matrix((codes["value"], (row_of[codes["slice_id"]].to_numpy(), codes["latent"])), shape=ref.shape)
    assert len(codes) == ref.nnz and (rebuilt != ref).nnz == 0
    slices = pq.read_table(out / "slices.parquet").to_pandas()
    assert sorted(slices["slice_id"]) == sorted(r[0] for r in sql(registry, "SELECT slice_id FROM slices"))
    assert set(ids) <= set(slices["slice_id"]) and "slices_key" not in slices.columns
    n_structures = sql(registry, "SELECT count(*) FROM slice_structures")[0][0]
    assert len(pq.read_table(out / "slice_structures.parquet")) == n_structures


def test_export_parquet_writes_codes_and_slices_without_paths(project, capsys):
    tmp, registry, dirs = project
    out = tmp / "exported"
    code, stdout, _ = run_main(
        "export", "demo", str(out), "--format", "parquet", "--registry", str(registry), capsys=capsys
    )
    assert code == 0 and "parquet" in stdout
    check_export(out, tmp, registry, dirs["encode"])

    # an experiment encoded before codes.parquet existed: the table is rebuilt from the CSR files
    table = dirs["encode"] / "codes.parquet"
    table.rename(table.with_suffix(".hidden"))
    try:
        medsae.open(registry).experiment("demo").export_parquet(tmp / "exported_legacy")
    finally:
        table.with_suffix(".hidden").rename(table)
    check_export(tmp / "exported_legacy", tmp, registry, dirs["encode"])

    args = ("export", "demo", str(tmp / "x"), "--format", "feather", "--registry", str(registry))
    code, _, stderr = run_main(*args, capsys=capsys)
    assert code != 0 and len(stderr.strip().splitlines()) == 1 and "--format" in stderr
    assert not (tmp / "x").exists()


def test_unknown_experiment_or_registry_is_one_line_error(project, tmp_path):
    _, registry, _ = project
    db = medsae.open(registry)
    assert list(db.experiments()["name"]) == ["demo"]
    with pytest.raises(MedsaeError, match="no experiment named 'nope'") as err:
        db.experiment("nope")
    assert "\n" not in str(err.value)
    with pytest.raises(MedsaeError, match="no registry") as err:
        medsae.open(tmp_path / "missing.duckdb")
    assert not (tmp_path / "missing.duckdb").exists()
    with pytest.raises(MedsaeError, match="^sql: "):
        db.sql("SELECT nope FROM experiments")
    assert isinstance(db.experiment("demo").sae(), torch.nn.Module)
