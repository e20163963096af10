"""``sae.input: tokens``: an SAE trained on the embed stage's stored tokens, its slice codes and its grounding route.

* planted data: tokens made of known atoms, stored as real bf16 token shards; the token SAE trained on
  them with the ordinary trainer recovers the atoms, far above random directions (numpy check);
* a spec asking for tokens that the embed stage did not store fails in one line and writes no train stage;
* a tiny phantom run (``embed.tokens_per_slice: 4``) through the planner: the encode stage's slice codes
  are the maximum of the stored tokens' codes (recomputed here from the shards read with numpy), and
  the ground stage writes ``latent_grounding`` rows with route ``token_sae``;
* a spec without the field keeps its keys (the field is an ``added_field``).
"""

from __future__ import annotations

import json
import os

import duckdb
import numpy as np
import pytest
import torch
from test_ground_stage import UP_TO_GROUND, small_spec

from medsae.embed.store import write_manifest, write_shard
from medsae.embed.token_store import write_token_shard
from medsae.errors import MedsaeError
from medsae.plan import plan_experiment, run_plans
from medsae.registry.db import Registry
from medsae.sae.checkpoint import load_sae
from medsae.sae.codes import load_codes
from medsae.sae.config import SAESpec
from medsae.sae.data import TrainData
from medsae.sae.stage import train_store
from medsae.sae.train import TrainJob, train_many
from medsae.spec import parse_specs

D_IN, N_ATOMS, PER_TOKEN, K_TOKENS, N_SLICES = 32, 48, 2, 4, 1024


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _planted_folder(folder, seed: int = 0) -> np.ndarray:
    """An embed folder whose slices have K_TOKENS tokens of PER_TOKEN atoms each; returns the atoms."""
    rng = np.random.default_rng(seed)
    atoms = rng.normal(size=(N_ATOMS, D_IN))
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    n_tok = N_SLICES * K_TOKENS
    idx = np.argsort(rng.random((n_tok, N_ATOMS)), axis=1)[:, :PER_TOKEN]
    coef = rng.uniform(0.5, 1.5, size=(n_tok, PER_TOKEN))
    tokens = np.einsum("nk,nkd->nd", coef, atoms[idx]).astype(np.float32).reshape(N_SLICES, K_TOKENS, D_IN)
    bits = torch.from_numpy(tokens).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    positions = np.tile(np.arange(K_TOKENS, dtype=np.int16), (N_SLICES, 1))
    half = N_SLICES // 2  # two shards, so reads cross a shard boundary
    shards = []
    for i, rows in enumerate((slice(0, half), slice(half, N_SLICES))):
        entry = write_shard(folder, i, tokens[rows].mean(1))
        entry.update(write_token_shard(folder, i, bits[rows], positions[rows]))
        shards.append(entry)
    tokens_meta = {"per_slice": K_TOKENS, "grid": [2, 2], "sampling": "uniform", "seed": 0, "dtype": "bfloat16"}
    tokens_meta["shards"] = [{k: e[k] for k in ("tokens_file", "pos_file", "rows")} for e in shards]
    write_manifest(
        folder,
        shards=shards,
        slice_ids=np.arange(N_SLICES),
        d=D_IN,
        dtype="float32",
        shard_size=half,
        tokens=tokens_meta,
    )
    return atoms


def _best_cos(atoms: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Per atom, the largest |cosine| with any row (numpy)."""
    rows = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    return np.abs(atoms @ rows.T).max(axis=1)


def test_token_sae_recovers_planted_atoms(tmp_path):
    atoms = _planted_folder(tmp_path)
    store = train_store(tmp_path, "tokens")
    assert store.n == N_SLICES * K_TOKENS
    # a token is row slice·k + j; its bf16 value read back equals the planted token rounded to bf16
    probe = np.array([0, 3, K_TOKENS * (N_SLICES // 2) + 1, store.n - 1])
    shard = np.load(tmp_path / "tokens_00001.npy")
    last = (shard[-1, -1].astype(np.uint32) << 16).view(np.float32)
    np.testing.assert_array_equal(store.load(probe)[-1], last)
    data = TrainData(store, np.arange(store.n), torch.device("cpu"), 1e9)
    spec = SAESpec(
        input="tokens",
        arch="topk",
        d_sae=N_ATOMS,
        k=PER_TOKEN,
        batch_size=128,
        epochs=15,
        lr=5e-3,
        warmup_steps=10,
        normalize="none",
        b_dec_init="zeros",
        dead_after=256,
        k_aux=16,
        log_every=10**6,
    )
    os.environ.setdefault("MEDSAE_QUIET", "1")
    (result,) = train_many([TrainJob(spec)], data, torch.device("cpu"))
    learned = _best_cos(atoms, result.sae.decoder_weight.detach().numpy())
    chance = _best_cos(atoms, np.random.default_rng(1).normal(size=(N_ATOMS, D_IN)))
    recovered = float((learned > 0.9).mean())
    print(
        f"\ntoken SAE on planted tokens: atoms recovered (cos > 0.9) {recovered:.3f}; median best |cos| "
        f"{np.median(learned):.3f} vs random rows {np.median(chance):.3f}; train fvu {result.metrics['fvu']:.3f}"
    )
    assert float((chance > 0.9).mean()) == 0.0
    assert recovered >= 0.7  # random directions: 0
    assert np.median(learned) > np.median(chance) + 0.4


def test_tokens_asked_but_not_stored_is_one_spec_error(tmp_path):
    """Caught when the spec is read, before any stage runs (the train stage also refuses such a folder)."""
    raw = small_spec(tmp_path)
    raw["sae"]["input"] = "tokens"
    with pytest.raises(MedsaeError) as err:
        parse_specs(raw)
    message = str(err.value)
    assert "\n" not in message and "sae.input tokens" in message and "tokens_per_slice" in message
    raw["embed"]["tokens_per_slice"] = 4
    assert parse_specs(raw)[0].sae.input == "tokens"
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written


@pytest.fixture(scope="module")
def token_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("token_sae")
    raw = small_spec(tmp)
    raw["data"]["stride"] = 2  # half the slices to embed
    raw["embed"]["tokens_per_slice"] = 4
    raw["sae"].update(input="tokens", epochs=3)  # 4 tokens per slice: 4x the samples of the pooled SAE
    plan = plan_experiment(parse_specs(raw)[0])
    registry = Registry(tmp / "registry.duckdb")
    run_plans([plan], registry, only=UP_TO_GROUND, quiet=True)
    return plan, registry


def test_slice_codes_are_the_max_over_stored_tokens(token_run):
    plan, _ = token_run
    embed_dir, train_dir = plan.nodes["embed"].final_dir, plan.nodes["train"].final_dir
    manifest = json.loads((embed_dir / "manifest.json").read_text())
    bits = np.concatenate([np.load(embed_dir / s["tokens_file"]) for s in manifest["tokens"]["shards"]])
    tokens = (bits.astype(np.uint32) << 16).view(np.float32)  # [slices, k, d]
    n, k, d = tokens.shape
    assert k == 4 and n == int(manifest["n"])
    sae = load_sae(train_dir)
    with torch.no_grad():
        per_token = sae.encode(sae.normalize(torch.from_numpy(tokens.reshape(n * k, d)))).numpy()
    expected = per_token.reshape(n, k, -1).max(axis=1)
    codes, slice_ids = load_codes(plan.nodes["encode"].final_dir)
    np.testing.assert_array_equal(slice_ids, np.load(embed_dir / "slice_ids.npy"))
    np.testing.assert_allclose(codes.toarray(), expected, rtol=1e-5, atol=1e-6)
    info = json.loads((train_dir / "cfg.json").read_text())["medsae"]["train"]
    assert info["input"] == "tokens" and info["n_train"] % k == 0  # every token of the train slices


def test_ground_rows_come_from_the_token_sae(token_run):
    plan, registry = token_run
    node = plan.nodes["ground"]
    con = duckdb.connect(str(registry.path), read_only=True)
    try:
        rows = con.execute("SELECT * FROM latent_grounding WHERE stage_key = ?", [node.key]).df()
        summary = json.loads(
            con.execute("SELECT summary_json FROM stages WHERE stage_key = ?", [node.key]).fetchone()[0]
        )
    finally:
        con.close()
    assert len(rows) == summary["n_latents"] > 0
    assert set(rows["route"]) == {"token_sae"} and summary["route"] == "token_sae"
    assert rows[["iou", "dice"]].apply(lambda c: c.between(0, 1)).all().all()
    print(
        f"\ntoken SAE grounding on the phantom: {len(rows)} latents, median lift {rows['lift'].median():.2f} "
        f"(shuffled {rows['lift_shuffled'].median():.2f}), median IoU {rows['iou'].median():.3f} "
        f"(shuffled {rows['iou_shuffled'].median():.3f})"
    )


def test_specs_without_the_field_keep_their_keys(tmp_path):
    raw = small_spec(tmp_path)
    old = plan_experiment(parse_specs(raw)[0])
    raw["sae"]["input"] = "pooled"
    same = plan_experiment(parse_specs(raw)[0])
    raw["embed"]["tokens_per_slice"] = 4  # a token SAE needs stored tokens
    pooled_on_tokens = plan_experiment(parse_specs(raw)[0])
    raw["sae"]["input"] = "tokens"
    tokens = plan_experiment(parse_specs(raw)[0])
    assert {k: n.key for k, n in old.nodes.items()} == {k: n.key for k, n in same.nodes.items()}
    assert "input" not in parse_specs(small_spec(tmp_path))[0].model_dump(mode="json")["sae"]
    assert tokens.nodes["embed"].key == pooled_on_tokens.nodes["embed"].key
    assert tokens.nodes["train"].key != pooled_on_tokens.nodes["train"].key


def test_latent_map_of_a_token_sae_is_the_ground_stage_map(token_run):
    """``medsae latent map`` follows the SAE's route: a token SAE's own codes, as the ground stage stored them."""
    from medsae.ground.latent_map import latent_map

    plan, registry = token_run
    data = np.load(plan.nodes["ground"].final_dir / "activation_maps.npz")
    latent, sid, stored = int(data["latents"][0]), int(data["slice_ids"][0, 0]), data["maps"][0, 0].astype(np.float32)
    m = latent_map(registry, plan.spec.name, latent, sid)
    assert stored.max() > 0
    np.testing.assert_allclose(m.token_map, stored, rtol=2e-3, atol=2e-3 * float(stored.max()))


def test_evaluate_leaves_out_reconstruction_of_a_token_sae(token_run):
    """A token SAE's slice code (max over tokens) does not rebuild the pooled vector: no fvu/R² rows, a note why."""
    plan, registry = token_run
    run_plans([plan], registry, only={"evaluate"}, quiet=True)
    key = plan.nodes["evaluate"].key
    con = duckdb.connect(str(registry.path), read_only=True)
    try:
        names = {n for (n,) in con.execute("SELECT DISTINCT name FROM metrics WHERE stage_key = ?", [key]).fetchall()}
        (summary,) = con.execute("SELECT summary_json FROM stages WHERE stage_key = ?", [key]).fetchone()
    finally:
        con.close()
    assert "l0_mean" in names and "dead_fraction" in names  # the codes are evaluated
    assert not names & {"fvu", "r2_scalar_mean", "r2_scalar_mean_study", "cosine_sim"}
    assert "token SAE" in json.loads(summary)["reconstruction"]
