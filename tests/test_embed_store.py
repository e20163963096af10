"""The embedding store: shards + slice ids + manifest, read back by row, in chunks, verified by sha256."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from medsae.embed.store import open_embeddings, write_manifest, write_shard
from medsae.errors import MedsaeError, MissingInputError


def _write_store(folder, x, shard_size, dtype="float32"):
    shards = [write_shard(folder, i, x[s : s + shard_size], dtype) for i, s in enumerate(range(0, len(x), shard_size))]
    ids = np.arange(len(x), dtype=np.int64) * 3 + 1
    write_manifest(
        folder,
        shards=shards,
        slice_ids=ids,
        d=x.shape[1],
        dtype=dtype,
        shard_size=shard_size,
        model="m",
        pooling="cls",
        device="cpu",
        images_per_s=1.0,
    )
    return ids


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_store_round_trip(tmp_path, dtype):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(10, 3)).astype(np.float32)
    ids = _write_store(tmp_path, x, shard_size=4, dtype=dtype)
    expected = x.astype(dtype).astype(np.float32)
    store = open_embeddings(tmp_path)
    assert (store.n, store.d) == (10, 3) and store.slice_ids.dtype == np.int64
    np.testing.assert_array_equal(store.slice_ids, ids)
    assert [s["rows"] for s in store.manifest["shards"]] == [4, 4, 2]
    for entry in store.manifest["shards"]:  # sha256 of each file, computed independently
        assert entry["sha256"] == hashlib.sha256((tmp_path / entry["file"]).read_bytes()).hexdigest()
    whole = store.load()
    assert whole.dtype == np.float32
    np.testing.assert_array_equal(whole, expected)
    rows = np.array([9, 0, 4, 4, 3, 7, 1])
    np.testing.assert_array_equal(store.load(rows), expected[rows])
    assert store.load(np.array([], dtype=np.int64)).shape == (0, 3)
    chunks = list(store.iter_chunks(3))
    assert [start for start, _ in chunks] == [0, 3, 6, 9]
    np.testing.assert_array_equal(np.concatenate([c for _, c in chunks]), expected)
    store.verify()
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["n"] == 10 and manifest["dtype"] == dtype and manifest["pooling"] == "cls"


def test_store_errors_are_one_line(tmp_path):
    with pytest.raises(MissingInputError, match="manifest.json"):
        open_embeddings(tmp_path)
    x = np.ones((5, 2), dtype=np.float32)
    _write_store(tmp_path, x, shard_size=2)
    store = open_embeddings(tmp_path)
    with pytest.raises(MedsaeError, match="out of range"):
        store.load(np.array([5]))
    path = tmp_path / "shard_00001.npy"
    arr = np.load(path)
    arr[0, 0] = 7
    np.save(path, arr)
    with pytest.raises(MedsaeError, match="sha256") as err:
        open_embeddings(tmp_path).verify()
    assert "\n" not in str(err.value)
    with pytest.raises(MedsaeError):
        write_manifest(
            tmp_path,
            shards=[{"file": "a", "rows": 3, "sha256": ""}],
            slice_ids=np.arange(4),
            d=2,
            dtype="float32",
            shard_size=3,
        )
