"""`medsae import sail`: the study's Lightning checkpoints become medsae SAEs with the study's codes.

Checkpoints are built here in the study's exact layout (``MatryoshkaSAELightning`` of pwesp/sail:
its state-dict names and shapes, its ``hyper_parameters``, and the rest of a Lightning checkpoint:
optimizer and scheduler states, loops, callbacks), with random weights, saved with ``torch.save``
as Lightning does. The study's inference is re-implemented below from its code, independently of
medsae: one sample at a time, ``F.normalize``, ``F.linear``, θ = sum / count, ``clamp(z - θ, 0)``.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import duckdb
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from test_e2e import medsae, tiny_spec

from medsae.sae.checkpoint import load_sae, save_sae
from medsae.sae.sail import SailCheckpointError, file_sha256, read_sail_checkpoint

#: EfficientNet-Lite0 mean-pooled features (the tiny phantom experiment's embeddings) are 1280 wide.
TINY_WIDTH = 1280


def study_checkpoint(
    path: Path,
    d: int,
    sizes: list[int],
    ks: list[int] | None,
    theta: float,
    *,
    seed: int = 0,
    tied: bool = True,
    count: int = 4900,
    encoder_shape: tuple[int, int] | None = None,
) -> Path:
    """A checkpoint as the study's training writes it (epoch 100's ``last.ckpt``), random weights."""
    gen = torch.Generator().manual_seed(seed)
    n = sizes[-1]
    w = torch.empty(*(encoder_shape or (n, d)))
    torch.nn.init.xavier_uniform_(w, generator=gen)
    w = w / (w.norm(dim=1, keepdim=True) + 1e-8)  # the study's row scaling at init
    params = OrderedDict(
        [
            ("model.bias", torch.randn(d, generator=gen) * 0.01),
            ("model.encoder.weight", w),
            ("model.encoder.bias", torch.randn(n, generator=gen) * 0.01),
        ]
    )
    if not tied:
        params["model.decoder.weight"] = torch.randn(d, n, generator=gen) / d**0.5
    total = torch.tensor(theta * count, dtype=torch.float32)
    state = OrderedDict(
        [
            ("model.bias", params["model.bias"]),
            ("model.inference_threshold", total / count if count else torch.tensor(0.0)),
            ("model._threshold_sum", total),
            ("model._threshold_count", torch.tensor(count)),
            *((k, v) for k, v in params.items() if k != "model.bias"),
        ]
    )
    leaves = [torch.nn.Parameter(v.clone()) for v in params.values()]
    opt = torch.optim.Adam(leaves, lr=1e-4)
    for p in leaves:
        p.grad = torch.randn(p.shape, generator=gen)
    opt.step()
    warm, steps = 490, 4900
    sched = torch.optim.lr_scheduler.SequentialLR(
        opt,
        [
            torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, end_factor=1.0, total_iters=warm),
            torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps - warm, eta_min=1e-6),
        ],
        milestones=[warm],
    )
    checkpoint = {
        "epoch": 99,
        "global_step": steps,
        "pytorch-lightning_version": "2.5.5",
        "state_dict": state,
        "loops": {
            "fit_loop": {
                "state_dict": {},
                "epoch_loop.state_dict": {"_batches_that_stepped": steps},
                "epoch_progress": {"total": {"ready": 100, "started": 100, "processed": 100, "completed": 99}},
            }
        },
        "callbacks": {
            "ModelCheckpoint{'monitor': None, 'mode': 'min', 'every_n_train_steps': 0, 'every_n_epochs': 10, "
            "'train_time_interval': None}": {
                "monitor": None,
                "best_model_score": None,
                "best_model_path": "lightning_logs/x/checkpoints/matryoshka-sae-epoch=99.ckpt",
                "current_score": None,
                "dirpath": "lightning_logs/x/checkpoints",
                "best_k_models": {},
                "kth_best_model_path": "",
                "kth_value": torch.tensor(float("inf")),
                "last_model_path": "lightning_logs/x/checkpoints/last.ckpt",
            }
        },
        "optimizer_states": [opt.state_dict()],
        "lr_schedulers": [sched.state_dict()],
        "hparams_name": "kwargs",
        "hyper_parameters": {
            "input_dim": d,
            "dictionary_sizes": sizes,
            "tied_weights": tied,
            "normalize_decoder": True,
            "l1_coefficient": 0.0,
            "diversity_coefficient": 0.0,
            "learning_rate": 0.0001,
            "k_values": ks,
            "correlation_sample_batches": 20,
        },
    }
    torch.save(checkpoint, path)
    return path


def study_forward(path: Path, x_raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The study's eval-mode codes (largest level) and reconstructions, one sample at a time."""
    sd = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    hp = torch.load(path, map_location="cpu", weights_only=True)["hyper_parameters"]
    weight, b_enc, bias = sd["model.encoder.weight"], sd["model.encoder.bias"], sd["model.bias"]
    decoder = weight.t() if hp["tied_weights"] else sd["model.decoder.weight"]  # get_decoder_weight()
    theta = (sd["model._threshold_sum"] / sd["model._threshold_count"]).item()  # calculate_threshold()
    codes, recons = [], []
    for row in x_raw:
        x = F.normalize(torch.from_numpy(row), p=2, dim=0).unsqueeze(0)  # the dataset's item getter
        z = F.linear(x - bias, weight, b_enc)
        a = torch.clamp(z - theta, min=0.0)
        codes.append(a[0].numpy())
        recons.append((F.linear(a, decoder) + bias)[0].numpy())
    return np.stack(codes), np.stack(recons)


def _theta_for(path_free_seed: int, d: int, n: int, share: float) -> float:
    """A threshold at which about ``share`` of the pre-activations of random unit inputs fire."""
    gen = torch.Generator().manual_seed(path_free_seed + 1)
    w = torch.nn.init.xavier_uniform_(torch.empty(n, d), generator=gen)
    z = F.normalize(torch.randn(256, d, generator=gen), dim=1) @ (w / w.norm(dim=1, keepdim=True)).t()
    return float(torch.quantile(z.flatten(), 1 - share))


# -- the reader ----------------------------------------------------------------------------------


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_codes_equal_the_study_forward(tmp_path: Path, tied: bool):
    d, sizes, ks = 48, [16, 64, 256], [2, 4, 8]
    path = study_checkpoint(tmp_path / "last.ckpt", d, sizes, ks, theta=0.12, seed=3, tied=tied)
    ckpt = read_sail_checkpoint(path)
    cfg = ckpt.config
    assert (cfg.d_in, cfg.d_sae, cfg.levels, cfg.level_k, cfg.tied) == (d, 256, sizes, ks, tied)
    assert ckpt.theta == pytest.approx(0.12, rel=1e-6)
    assert ckpt.config_name == "D_16_64_256_K_2_4_8"
    # through a train folder, as the stages read it
    sae = load_sae(save_sae(ckpt.to_sae(), tmp_path / "train"))
    x = (np.random.default_rng(0).normal(size=(300, d)) + 0.3).astype(np.float32)
    want, want_recon = study_forward(path, x)
    with torch.no_grad():
        got = sae.encode(sae.normalize(torch.from_numpy(x)))
        recon = sae.decode(got).numpy()
    got = got.numpy()
    diff = float(np.abs(got - want).max())
    print(f"max |codes(medsae) - codes(study forward)| = {diff:.3g} ({'tied' if tied else 'untied'})")
    assert diff <= 1e-6
    assert 0.01 < (want > 0).mean() < 0.5  # the comparison covers firing and silent latents
    assert np.array_equal(got > 1e-6, want > 1e-6)
    assert float(np.abs(recon - want_recon).max()) <= 1e-5


def test_missing_k_values_use_the_study_default(tmp_path: Path):
    path = study_checkpoint(tmp_path / "k.ckpt", 8, [40, 200], None, theta=0.1)
    assert read_sail_checkpoint(path).config.level_k == [2, 10]  # max(1, int(0.05 * size))


def _one_line_error(path: Path, match: str) -> None:
    with pytest.raises(SailCheckpointError) as err:
        read_sail_checkpoint(path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message and match in message, message


def test_files_that_are_not_study_checkpoints_are_one_line(tmp_path: Path):
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint\n")
    _one_line_error(text, "not a PyTorch checkpoint")
    bare = tmp_path / "bare.pt"
    torch.save({"weight": torch.zeros(3)}, bare)
    _one_line_error(bare, "no 'state_dict'")
    wrong = study_checkpoint(tmp_path / "wrong.ckpt", 48, [16, 64], [2, 4], 0.1, encoder_shape=(64, 47))
    _one_line_error(wrong, "'model.encoder.weight' has shape [64, 47], expected [64, 48]")
    data = torch.load(wrong, weights_only=True)
    data["state_dict"]["model.encoder.weight"] = torch.zeros(64, 48)
    data["state_dict"]["model.W_dec"] = torch.zeros(48, 64)
    torch.save(data, foreign := tmp_path / "foreign.ckpt")
    _one_line_error(foreign, "'model.W_dec', not a key of the study's SAE module")
    del data["state_dict"]["model.W_dec"], data["state_dict"]["model._threshold_sum"]
    torch.save(data, missing := tmp_path / "missing.ckpt")
    _one_line_error(missing, "lacks 'model._threshold_sum'")
    untrained = study_checkpoint(tmp_path / "untrained.ckpt", 8, [16, 32], [2, 4], 0.0, count=0)
    _one_line_error(untrained, "no inference-threshold statistics")
    data = torch.load(untrained, weights_only=True)
    data["hyper_parameters"]["k_values"] = [2, 40]
    torch.save(data, too_big := tmp_path / "k_too_big.ckpt")
    _one_line_error(too_big, "k_values[1]: 40 exceeds its level's size 32")


# -- the command, end to end ---------------------------------------------------------------------


def _query(registry: Path, sql: str, params=None) -> list[tuple]:
    con = duckdb.connect(str(registry), read_only=True)
    try:
        return con.execute(sql, params or []).fetchall()
    finally:
        con.close()


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    """The tiny phantom experiment, sliced and embedded only (its SAE is never trained)."""
    tmp = tmp_path_factory.mktemp("sail")
    spec = tiny_spec(tmp)
    spec["data"]["stride"] = 6  # a sixth of the slices: embedding is most of this module's time
    # the imported experiment takes this section over: its reconstruction metrics suffice here
    spec["eval"] = {**spec["eval"], "probes": False, "recovery": False, "retrieval": False, "plots": False}
    (tmp / "tiny.yaml").write_text(yaml.safe_dump(spec))
    registry = tmp / "registry.duckdb"
    medsae("exp", "run", str(tmp / "tiny.yaml"), "--only", "slices", "--only", "embed", registry=registry, cwd=tmp)
    return tmp, registry


def _nothing_written(tmp: Path, registry: Path, name: str) -> None:
    assert not (tmp / f"{name}.yaml").exists()
    assert _query(registry, "SELECT count(*) FROM experiments WHERE name = ?", [name]) == [(0,)]
    assert not (tmp / "artifacts" / "train").exists()


def test_bad_checkpoints_are_refused_with_one_line_and_nothing_written(embedded):
    tmp, registry = embedded
    garbage = tmp / "garbage.ckpt"
    garbage.write_bytes(b"PK\x03\x04 truncated zip")
    narrow = study_checkpoint(tmp / "narrow.ckpt", 1024, [16, 64], [2, 4], 0.05)
    for path, expect in [
        (garbage, "not a PyTorch checkpoint"),
        (narrow, "takes 1024-wide inputs (hyper_parameters.input_dim), the embeddings of 'tiny' are 1280 wide"),
    ]:
        args = ("import", "sail", str(path), "--name", "bad", "--embeddings", "tiny")
        proc = medsae(*args, registry=registry, cwd=tmp, check=False)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
        assert expect in lines[0], lines[0]
        _nothing_written(tmp, registry, "bad")


def test_import_runs_encode_and_evaluate_on_the_study_codes(embedded):
    tmp, registry = embedded
    theta = _theta_for(5, TINY_WIDTH, 64, 0.08)
    path = study_checkpoint(tmp / "sail_last.ckpt", TINY_WIDTH, [16, 64], [2, 4], theta, seed=5)
    stages = ("--only=train", "--only=encode", "--only=evaluate")  # summarize, interpret: tested elsewhere
    args = ("import", "sail", str(path), "--name", "sail_tiny", "--embeddings", "tiny", *stages)
    proc = medsae(*args, registry=registry, cwd=tmp)
    assert "wrote" in proc.stdout and "D_16_64_K_2_4" in proc.stdout

    spec = yaml.safe_load((tmp / "sail_tiny.yaml").read_text())
    assert spec["sae"]["checkpoint"] == "sail_last.ckpt"  # relative to the spec's folder
    assert spec["sae"]["checkpoint_sha256"] == file_sha256(path)
    done = dict(
        _query(
            registry,
            """SELECT es.kind, s.status FROM experiments e JOIN experiment_stages es USING (experiment_id)
               JOIN stages s USING (stage_key) WHERE e.name = 'sail_tiny'""",
        )
    )
    assert {k: done.get(k) for k in ("slices", "embed", "train", "encode", "evaluate")} == dict.fromkeys(
        ("slices", "embed", "train", "encode", "evaluate"), "done"
    )
    shared = _query(
        registry,
        """SELECT count(DISTINCT es.stage_key) FROM experiments e JOIN experiment_stages es USING (experiment_id)
           WHERE es.kind IN ('slices', 'embed')""",
    )
    assert shared == [(2,)]  # the tiny experiment's slices and embeddings, reused
    metrics = dict(
        _query(
            registry,
            """SELECT m.name, m.value FROM experiments e JOIN experiment_stages es USING (experiment_id)
               JOIN metrics m ON m.stage_key = es.stage_key
               WHERE e.name = 'sail_tiny' AND es.kind = 'evaluate' AND m.split = 'val' AND m.target IS NULL""",
        )
    )
    assert {"fvu", "l0_mean"} <= metrics.keys()

    # the encode stage's codes are the study's forward on the stored embeddings
    folders = dict(
        _query(
            registry,
            """SELECT es.kind, s.artifact_dir FROM experiments e JOIN experiment_stages es USING (experiment_id)
               JOIN stages s USING (stage_key) WHERE e.name = 'sail_tiny'""",
        )
    )
    from medsae.embed.store import open_embeddings
    from medsae.sae.codes import load_codes

    store = open_embeddings(tmp / folders["embed"])
    x = np.concatenate([np.asarray(chunk, np.float32) for _, chunk in store.iter_chunks(4096)])
    want, _ = study_forward(path, x)
    csr, slice_ids = load_codes(tmp / folders["encode"])
    assert np.array_equal(slice_ids, np.asarray(store.slice_ids))  # rows in the store's order
    got = csr.toarray()
    diff = float(np.abs(got - want).max())
    print(f"max |encode-stage codes - study forward| = {diff:.3g} over {x.shape[0]} slices")
    assert diff <= 1e-6 and (want > 0).any()
    assert metrics["l0_mean"] == pytest.approx((want > 1e-8).sum(1).mean(), rel=0.5)  # val only: a loose check
    info = json.loads((tmp / folders["train"] / "train_log.json").read_text())["info"]["imported"]
    assert (info["sha256"], info["config"], info["global_step"]) == (file_sha256(path), "D_16_64_K_2_4", 4900)

    again = medsae(*args, registry=registry, cwd=tmp)  # a rerun resumes: nothing left to do
    assert "kept" in again.stdout and "0 stage(s) run, 3 already done" in again.stdout
