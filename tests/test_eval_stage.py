"""The evaluate stage on small artifacts written in the real formats (parquet index, embedding
shards, safetensors SAE, CSR codes), checked against direct computations."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from sklearn.metrics import r2_score

from medsae.embed.store import write_manifest, write_shard
from medsae.eval.config import EvalSpec
from medsae.eval.stage import run_evaluate
from medsae.sae.checkpoint import save_sae
from medsae.sae.codes import write_codes
from medsae.sae.config import SAESpec
from medsae.sae.models import SAE, SAEConfig
from medsae.stage import StageContext

VOCAB = ["heart", "kidney_left", "liver", "lung", "spleen"]


def write_artifacts(tmp_path, n_scans: int = 24, per_scan: int = 12, d: int = 16):
    rng = np.random.default_rng(0)
    rows = []
    for s in range(n_scans):
        modality = "ct" if s % 3 else "mri"
        split = ["train", "train", "val", "test"][s % 4]
        for i in range(per_scan):
            rows.append(
                {
                    "modality": modality,
                    "image_id": f"s{s:04d}",
                    "plane": ["axial", "coronal", "sagittal"][i % 3],
                    "idx": i,
                    "split": split,
                    "sex": "mf"[s % 2],
                    "age_bin": ["<40", ">=80", "40-60"][s % 3],
                    "institute": "BCF"[s % 3],
                    "pathology": ["tumor", "trauma", None][s % 3],
                    "body_region": "thorax" if i < per_scan // 2 else "abdomen",
                }
            )
    slices = pd.DataFrame(rows).sort_values(["modality", "image_id", "plane", "idx"]).reset_index(drop=True)
    slices.insert(0, "slice_id", np.arange(len(slices), dtype=np.int64))
    n = len(slices)
    pres = np.zeros((n, len(VOCAB)), bool)
    pres[:, 0] = slices["body_region"] == "thorax"
    pres[:, 3] = (slices["body_region"] == "thorax") & (rng.random(n) < 0.8)
    pres[:, 2] = slices["body_region"] == "abdomen"
    pres[:, 4] = (slices["body_region"] == "abdomen") & (rng.random(n) < 0.5)
    pres[:, 1] = rng.random(n) < 0.3
    sdir = tmp_path / "slices"
    sdir.mkdir()
    slices.to_parquet(sdir / "slices.parquet", index=False)
    sid, col = np.nonzero(pres)
    pd.DataFrame(
        {"slice_id": sid, "structure": np.array(VOCAB)[col], "pixels": rng.integers(1, 500, len(sid))}
    ).to_parquet(sdir / "slice_structures.parquet", index=False)
    (sdir / "structures.json").write_text(json.dumps(VOCAB))

    x = rng.normal(size=(n, d)).astype(np.float32) + 2.0
    x[:, 0] += 3 * (slices["modality"] == "mri").to_numpy()
    x[:, 1:4] += 2 * pres[:, [0, 2, 4]]
    edir = tmp_path / "embed"
    edir.mkdir()
    order = rng.permutation(n)  # embedding rows in another order than slice ids
    shards = [write_shard(edir, i, x[order[i * 100 : (i + 1) * 100]]) for i in range((n + 99) // 100)]
    write_manifest(edir, shards=shards, slice_ids=order, d=d, dtype="float32", shard_size=100)

    cfg = SAEConfig.from_spec(SAESpec(arch="topk", d_sae=40, k=5), d)
    sae = SAE(cfg, generator=torch.Generator().manual_seed(0)).eval()
    save_sae(sae, tmp_path / "train")
    with torch.no_grad():
        codes = sae.encode(sae.normalize(torch.from_numpy(x))).numpy()
    code_order = rng.permutation(n)
    write_codes(tmp_path / "encode", sp.csr_matrix(codes[code_order]), code_order)
    return slices, x, codes, sae


def test_stage_metrics_match_direct_computations(tmp_path):
    slices, x, codes, sae = write_artifacts(tmp_path)
    spec = EvalSpec(
        probe_max_train=200,
        probe_max_iter=200,
        recovery_ns=[1, 2, 5],
        retrieval_refs=20,
        retrieval_ks=[1, 3],
        mono_min_images=3,
        mono_top_ns=[3, 5],
        mono_null_draws=20,
        probe_min_positives=5,
        study_batch=64,
        plots=True,
    )
    out = tmp_path / "out"
    out.mkdir()
    ctx = StageContext(
        kind="evaluate",
        key="k" * 64,
        out_dir=out,
        work_dir=tmp_path / "work",
        inputs={k: tmp_path / k for k in ("slices", "embed", "train", "encode")},
        input_keys={},
        seed=0,
        quiet=True,
        spec=spec,
    )
    result = run_evaluate(ctx)
    by = {(m.split, m.name, m.target, m.n_features): m.value for m in result.metrics}

    val = np.flatnonzero(slices["split"] == "val")
    with torch.no_grad():
        x_in = sae.normalize(torch.from_numpy(x[val])).numpy().astype(np.float64)
        x_hat = sae.decode(torch.from_numpy(codes[val])).numpy().astype(np.float64)
    assert by["val", "fvu", None, None] == pytest.approx(
        1 - r2_score(x_in, x_hat, multioutput="variance_weighted"), rel=1e-5
    )
    batches = [(s, min(s + 64, len(val))) for s in range(0, len(val), 64)]
    study = np.average(
        [r2_score(x_in[a:b].ravel(), x_hat[a:b].ravel()) for a, b in batches],
        weights=[b - a for a, b in batches],
    )
    assert by["val", "r2_scalar_mean_study", None, None] == pytest.approx(study, rel=1e-5)
    assert by["val", "l0_mean", None, None] == pytest.approx((codes[val] > 1e-8).sum(axis=1).mean())
    assert by["val", "dead_fraction", None, None] == pytest.approx(np.mean((codes[val] > 1e-8).sum(axis=0) == 0))
    assert by["val", "n_slices", None, None] == len(val)
    # probes on readable labels are good; every AUC is a probability
    assert by["val", "probe_auc_dense", "modality", None] > 0.9
    aucs = [v for (s, name, _, _), v in by.items() if name.startswith("probe_auc") and v is not None]
    assert aucs and all(0 <= a <= 1 for a in aucs)
    assert any(name == "recovery" for (_, name, _, _) in by)
    assert ("val", "retrieval_precision_sparse", "plane", 3) in by
    assert ("test", "mono_config_top10", None, None) in by
    assert by[None, "seconds_total", None, None] > 0
    saved = json.loads((out / "metrics.json").read_text())
    assert len(saved) == len(result.metrics)
    assert (out / "plots" / "latent_frequency_val.png").is_file()
    assert (out / "recovery_curves.csv").is_file() and (out / "mono_latents_val.parquet").is_file()
