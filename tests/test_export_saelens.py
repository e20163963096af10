"""`medsae export NAME DIR` (SAELens layout) on real stage folders and a real registry file.

The files are checked against independent computations: SAELens' documented inference formulas
written in numpy on the exported weights, and feature densities counted from the SAE's own codes of
the train-split embeddings.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.numpy import load_file
from typer.testing import CliRunner

from medsae.api import export_experiment_saelens
from medsae.errors import MedsaeError
from medsae.sae.checkpoint import export_saelens, load_sae, save_sae
from medsae.sae.config import SAESpec
from medsae.sae.data import ArrayStore, TrainData
from medsae.sae.train import TrainJob, train_many

EXPECTED_FILES = {"cfg.json", "sae_weights.safetensors", "sparsity.safetensors", "README.md"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _x(n: int, d: int = 16, seed: int = 0) -> np.ndarray:
    """Sparse combinations of 40 atoms plus an offset (raw embeddings with very different norms)."""
    rng = np.random.default_rng(seed)
    atoms = rng.normal(size=(40, d))
    idx = np.argsort(rng.random((n, 40)), axis=1)[:, :3]
    scale = rng.uniform(0.5, 4.0, (n, 1))  # per-sample norms vary: L2 normalisation matters
    return ((np.einsum("nk,nkd->nd", rng.uniform(0.5, 1.5, (n, 3)), atoms[idx]) + 1.0) * scale).astype(np.float32)


def _train(x: np.ndarray, **spec) -> torch.nn.Module:
    params = SAESpec(**{"batch_size": 50, "epochs": 4, "lr": 3e-3, **spec}).model_dump(mode="json")
    data = TrainData(ArrayStore(x), np.arange(len(x)), torch.device("cpu"), 1e9)
    return train_many([TrainJob(params, seed=1)], data, torch.device("cpu"))[0].sae


def _strings(value):
    """Every string inside a JSON value (keys included)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield k
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


# -- L2-normalised SAEs: the two export modes ----------------------------------------------------


def test_unit_export_decodes_on_its_own(tmp_path: Path):
    x = _x(300)
    sae = _train(x, arch="topk", d_sae=32, k=4, normalize="l2")
    save_sae(sae, tmp_path / "train")
    out = export_saelens(tmp_path / "train", tmp_path / "unit", l2="unit")
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["normalize_activations"] == "none"
    w = {k: v.astype(np.float64) for k, v in load_file(str(out / "sae_weights.safetensors")).items()}

    # SAELens with normalize_activations "none": stateless encode and decode (written from its formulas)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    hidden = (unit - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    top = np.argsort(-hidden, axis=1)[:, : cfg["k"]]
    codes = np.zeros_like(hidden)
    np.put_along_axis(codes, top, np.maximum(np.take_along_axis(hidden, top, 1), 0), 1)
    with torch.no_grad():
        ref_codes = sae.encode(sae.normalize(torch.from_numpy(x))).double().numpy()
    np.testing.assert_allclose(codes, ref_codes, atol=1e-5)

    # a lone decode of codes that never went through encode (a single latent's direction)
    one_hot = np.zeros((1, cfg["d_sae"]))
    one_hot[0, 3] = 2.0
    lone = one_hot @ w["W_dec"] + w["b_dec"]
    with torch.no_grad():
        expected = sae.decode(torch.from_numpy(one_hot).float()).double().numpy()
    np.testing.assert_allclose(lone, expected, rtol=1e-5, atol=1e-6)
    card = (out / "README.md").read_text()
    assert "unit-norm" in card and "--l2 unit" in card


def test_rescale_export_documents_the_stateful_decode(tmp_path: Path):
    sae = _train(_x(300), arch="topk", d_sae=32, k=4, normalize="l2")
    save_sae(sae, tmp_path / "train")
    out = export_saelens(tmp_path / "train", tmp_path / "rescale")
    assert json.loads((out / "cfg.json").read_text())["normalize_activations"] == "constant_norm_rescale"
    card = (out / "README.md").read_text()
    assert "x_norm_coeff" in card and "--l2 unit" in card
    with pytest.raises(MedsaeError, match="--l2: expected one of rescale, unit"):
        export_saelens(tmp_path / "train", tmp_path / "bad", l2="fold")
    assert not (tmp_path / "bad").exists()


# -- a registered experiment through the CLI -----------------------------------------------------


@pytest.fixture
def experiment(tmp_path: Path):
    """Slices, embed, train and encode stage folders of one experiment, registered in a registry file."""
    from medsae.embed.store import write_manifest, write_shard
    from medsae.registry import Registry
    from medsae.sae.stage import run_encode, run_train
    from medsae.stage import StageContext

    n, d = 400, 16
    x = _x(n, d, seed=4)
    art = tmp_path / "artifacts"
    slices_dir, embed_dir = art / "slices" / "s1", art / "embed" / "m1"
    slices_dir.mkdir(parents=True)
    embed_dir.mkdir(parents=True)
    split = np.array(["train", "train", "val", "test", "train"])[np.arange(n) % 5]
    pd.DataFrame({"slice_id": np.arange(n, dtype=np.int64), "split": split}).to_parquet(slices_dir / "slices.parquet")
    order = np.random.default_rng(0).permutation(n)  # embed rows need not follow slice order
    shards = [write_shard(embed_dir, i, x[order[s : s + 128]]) for i, s in enumerate(range(0, n, 128))]
    write_manifest(embed_dir, shards=shards, slice_ids=order, d=d, dtype="float32", shard_size=128)

    def ctx(kind: str, key: str, spec: SAESpec | None, inputs: dict) -> StageContext:
        out = art / kind / key
        out.mkdir(parents=True)
        return StageContext(kind, key, out, tmp_path / "work" / key, inputs, {}, 0, "demo", True, spec=spec)

    sae = SAESpec(arch="topk", d_sae=48, k=3, batch_size=50, epochs=3, lr=3e-3)
    train = ctx("train", "t1", sae, {"slices": slices_dir, "embed": embed_dir})
    run_train(train)
    run_encode(ctx("encode", "e1", None, {"train": train.out_dir, "embed": embed_dir}))

    reg = Registry(tmp_path / "registry.duckdb")
    spec = {"embed": {"source": "timm", "model": "resnet18", "pooling": "mean", "input_size": 224}}
    row = {"experiment_id": "x1", "name": "demo", "spec_json": json.dumps(spec), "spec_hash": "h"}
    reg.insert("experiments", [row])
    stages = {"slices": "s1", "embed": "m1", "train": "t1", "encode": "e1"}
    reg.insert("experiment_stages", [{"experiment_id": "x1", "kind": k, "stage_key": v} for k, v in stages.items()])
    reg.insert(
        "stages",
        [
            {
                "stage_key": key,
                "kind": kind,
                "code_version": "1",
                "params_json": "{}",
                "status": "done",
                "artifact_dir": str(art / kind / key),
            }
            for kind, key in stages.items()
        ],
    )
    reg.insert(
        "metrics",
        [
            {"stage_key": "t1", "split": "train", "name": "dead_fraction", "value": 0.125, "n": 240},
            {"stage_key": "t1", "split": "train", "name": "fvu", "value": 0.5, "n": 240},
        ],
    )
    train_rows = np.flatnonzero(split[order] == "train")  # embed rows of train slices
    return {"registry": reg.path, "x_train": x[order][train_rows], "train_dir": train.out_dir, "tmp": tmp_path}


def _cli(*args: str) -> tuple[int, str]:
    from medsae.cli.main import app

    result = CliRunner().invoke(app, list(args))
    if isinstance(result.exception, MedsaeError):
        return 2, str(result.exception)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


def test_export_writes_a_complete_shareable_folder(experiment):
    tmp = experiment["tmp"]
    out = tmp / "export"
    old = os.umask(0o022)
    try:
        code, text = _cli("export", "demo", str(out), "--registry", str(experiment["registry"]))
    finally:
        os.umask(old)
    assert code == 0, text
    assert {p.name for p in out.iterdir()} == EXPECTED_FILES  # no temporary files left behind
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {0o644}

    # sparsity: log10 of the firing frequency on the train split, counted from the SAE's own codes
    sae = load_sae(experiment["train_dir"])
    with torch.no_grad():
        codes = sae.encode(sae.normalize(torch.from_numpy(experiment["x_train"]))).numpy()
    freq = (np.abs(codes) > 1e-8).mean(axis=0)
    log_density = load_file(str(out / "sparsity.safetensors"))["sparsity"]
    assert log_density.shape == (48,)
    np.testing.assert_allclose(log_density, np.log10(freq + 1e-10), rtol=1e-6, atol=1e-6)

    # nothing in the folder names a path of this machine
    cfg = json.loads((out / "cfg.json").read_text())
    card = (out / "README.md").read_text()
    assert not [s for s in _strings(cfg) if s.startswith("/") or str(tmp) in s]
    assert str(tmp) not in card
    assert cfg["medsae_source"]["experiment"] == "demo" and cfg["metadata"]["model_name"] == "resnet18"

    # the card: density facts and the registry's metrics with their split and definition
    n_dead = int((freq == 0).sum())
    assert f"{48 - n_dead} of 48 latents fire at least once, **{n_dead} never fire**" in card
    assert "| `dead_fraction` | train | share of latents that never fire" in card
    assert "| 0.125 |" in card


def test_export_umask_is_respected(experiment):
    out = experiment["tmp"] / "private"
    old = os.umask(0o027)
    try:
        code, text = _cli("export", "demo", str(out), "--registry", str(experiment["registry"]))
    finally:
        os.umask(old)
    assert code == 0, text
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {0o640}


def test_export_errors_are_one_line_and_write_nothing(experiment):
    reg, tmp = str(experiment["registry"]), experiment["tmp"]
    code, text = _cli("export", "nope", str(tmp / "a"), "--registry", reg)
    assert code == 2 and "no experiment named 'nope'" in text and "\n" not in text.strip()
    code, text = _cli("export", "demo", str(tmp / "b"), "--l2", "fold", "--registry", reg)
    assert code == 2 and "--l2: expected one of rescale, unit" in text
    code, text = _cli("export", "demo", str(tmp / "c"), "--format", "onnx", "--registry", reg)
    assert code == 2 and "--format" in text
    assert not any((tmp / name).exists() for name in ("a", "b", "c"))


def test_export_needs_the_encode_stage(experiment):
    from medsae.registry import Registry

    reg = Registry(experiment["registry"])
    with reg.write() as con:
        con.execute("DELETE FROM experiment_stages WHERE kind = 'encode'")
    with pytest.raises(MedsaeError, match="no 'encode' stage for experiment 'demo'"):
        export_experiment_saelens("demo", experiment["tmp"] / "x", reg.path)
    assert not (experiment["tmp"] / "x").exists()
