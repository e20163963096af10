"""``embed.tokens_per_slice``: a sample of spatial tokens per slice stored as bf16 shards beside the pooled ones.

The embed stage runs for real on a tiny phantom (EfficientNet-Lite0 at 96 px: a 3 x 3 grid of
1280-d tokens) through the planner. Checks: the spec keys of old specs are unchanged, the pooled
shards are those of a run without tokens, the stored tokens are the slice's grid tokens at the
stored positions (recomputed from the rendered slice), the positions are the documented draw, and
foreground sampling picks tokens over more foreground than uniform sampling.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_ground_stage import small_spec

from medsae.data.render import render_slice
from medsae.embed.backbones import load_backbone
from medsae.embed.store import open_embeddings
from medsae.embed.token_store import from_bf16_bits, open_tokens
from medsae.errors import MedsaeError
from medsae.plan import plan_experiment, run_plans
from medsae.registry.db import Registry
from medsae.spec import parse_specs

K = 4
SHARD = 96  # several shards, the last one short


def _spec(tmp, **embed) -> dict:
    raw = small_spec(tmp)
    raw.pop("ground")
    raw["data"]["phantom"]["subjects"] = 2
    raw["embed"].update(shard_size=SHARD, **embed)
    return raw


def test_token_fields_at_their_default_keep_old_keys(tmp_path):
    def keys(**embed):
        plan = plan_experiment(parse_specs(_spec(tmp_path, **embed))[0], prepare_data=False)
        return plan.experiment_id, plan.nodes["embed"].key

    old = keys()
    assert keys(tokens_per_slice=0, token_sampling="uniform", token_seed=0) == old
    for changed in ({"tokens_per_slice": K}, {"tokens_per_slice": K, "token_sampling": "foreground"}):
        exp_id, embed_key = keys(**changed)
        assert exp_id != old[0] and embed_key != old[1]
    assert "tokens_per_slice" not in json.dumps(parse_specs(_spec(tmp_path))[0].model_dump(mode="json"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tokens")
    registry = Registry(tmp / "registry.duckdb")
    plans = {}
    for name, embed in (
        ("uniform", {"tokens_per_slice": K}),
        ("foreground", {"tokens_per_slice": K, "token_sampling": "foreground", "token_seed": 7}),
    ):
        plans[name] = plan_experiment(parse_specs(_spec(tmp, **embed))[0])
    run_plans(list(plans.values()), registry, only={"slices", "embed"}, quiet=True)
    return {name: plan.nodes["embed"].final_dir for name, plan in plans.items()}, plans


def test_a_folder_without_tokens_is_one_line(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"n": 0, "shards": []}))
    with pytest.raises(MedsaeError, match="no stored tokens"):
        open_tokens(tmp_path)


def test_pooled_vectors_and_tokens_are_those_of_the_slice(runs):
    dirs, plans = runs
    with_tokens = open_embeddings(dirs["uniform"])
    store = open_tokens(dirs["uniform"])
    assert store.per_slice == K and store.grid == (3, 3) and len(store) == len(with_tokens.manifest["shards"])
    slices_dir = plans["uniform"].nodes["slices"].final_dir
    backbone = load_backbone(plans["uniform"].spec.embed, device="cpu")
    rows = 0
    for s in range(len(store)):
        tokens, pos = store.shard(s)
        assert tokens.shape[:2] == pos.shape == (with_tokens.manifest["shards"][s]["rows"], K)
        ids = with_tokens.slice_ids[rows : rows + len(pos)]
        for i, sid in enumerate(ids):
            draw = np.sort(np.random.default_rng([0, int(sid)]).choice(9, size=K, replace=False))
            assert np.array_equal(pos[i], draw)
        for i in (0, len(ids) - 1):  # recompute two slices of each shard from their pixels
            feats = backbone.embed_tokens(render_slice(slices_dir, int(ids[i]))[None])
            grid = feats.spatial[0].reshape(9, -1).numpy()
            expected = grid[pos[i].astype(int)]
            np.testing.assert_allclose(tokens[i], expected, rtol=2**-8, atol=2**-8 * np.abs(expected).max())
            # the pooled vector stored beside them is the mean of every grid token (mean pooling)
            pooled = with_tokens.load(np.asarray([rows + i]))[0]
            np.testing.assert_allclose(pooled, grid.mean(axis=0), rtol=1e-4, atol=1e-5 * np.abs(pooled).max())
        rows += len(ids)
    assert rows == len(with_tokens.slice_ids)


def test_bf16_round_trip_and_foreground_sampling(runs):
    dirs, plans = runs
    x = np.array([1.0, -2.5, 3.14159, 1e-3, 65504.0], dtype=np.float32)
    import torch

    from medsae.embed.token_store import to_bf16_bits

    back = from_bf16_bits(to_bf16_bits(torch.from_numpy(x)))
    np.testing.assert_allclose(back, x, rtol=2**-8)
    assert back[0] == 1.0 and back[1] == -2.5
    # foreground sampling: the chosen tokens lie over more non-zero pixels than the grid's average
    slices_dir = plans["foreground"].nodes["slices"].final_dir
    store, emb = open_tokens(dirs["foreground"]), open_embeddings(dirs["foreground"])
    _, pos = store.shard(0)
    chosen, overall = [], []
    for sid, p in zip(emb.slice_ids[: len(pos)], pos, strict=True):
        image = render_slice(slices_dir, int(sid))
        cell = image.shape[0] // 3
        share = (image[: cell * 3, : cell * 3] > 0).reshape(3, cell, 3, cell).mean(axis=(1, 3)).ravel()
        chosen.append(share[p.astype(int)].mean())
        overall.append(share.mean())
    assert np.mean(chosen) > np.mean(overall) + 0.05
    manifest = json.loads((dirs["foreground"] / "manifest.json").read_text())
    per_1000 = manifest["tokens"]["bytes"] / manifest["n"] * 1000
    print(f"token shards: {per_1000 / 1e6:.2f} MB per 1,000 slices (k={K}, d={manifest['d']}, bf16)")
    assert per_1000 == pytest.approx(1000 * K * (manifest["d"] * 2 + 2), rel=0.05)
