"""Training data for the SAE trainer: the train split's embeddings, on the device, in seeded order.

The train rows are loaded once and kept on the device when they fit (``max_bytes``); otherwise they
are streamed from the memory-mapped shards in large chunks of the epoch's permutation (each chunk's
rows are read in sorted order, then put back in permutation order). Both modes yield exactly the
same batches for the same seed, so a streamed run equals a resident one.

Orders are a pure function of ``(seed, epoch)`` (a fresh ``torch.Generator`` per epoch, on the CPU
so every device sees the same order): a resumed run regenerates the order of its epoch instead of
carrying RNG state around.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from medsae.embed.token_store import TokenStore, from_bf16_bits
from medsae.errors import MedsaeError, MissingInputError


class Store(Protocol):
    """What the trainer needs of an embedding store (``medsae.embed.store.EmbeddingStore``)."""

    n: int
    d: int
    slice_ids: np.ndarray

    def load(self, rows: np.ndarray | None = None) -> np.ndarray: ...


class ArrayStore:
    """An in-memory embedding store with the ``EmbeddingStore`` reading interface."""

    def __init__(self, x: np.ndarray, slice_ids: np.ndarray | None = None):
        self.x = np.ascontiguousarray(x, dtype=np.float32)
        self.n, self.d = self.x.shape
        self.slice_ids = np.arange(self.n, dtype=np.int64) if slice_ids is None else np.asarray(slice_ids)

    def load(self, rows: np.ndarray | None = None) -> np.ndarray:
        return self.x.copy() if rows is None else self.x[np.asarray(rows, dtype=np.int64)]

    def iter_chunks(self, chunk_rows: int) -> Iterator[tuple[int, np.ndarray]]:
        for start in range(0, self.n, chunk_rows):
            yield start, self.x[start : start + chunk_rows]


class TokenSamples:
    """The embed stage's stored tokens as a store of samples: row ``r·k + j`` is token ``j`` of slice row ``r``.

    ``slice_ids`` repeats each slice's id ``k`` times, so :func:`train_rows` picks every token of the
    train slices. Reads only the rows asked from the memory-mapped bf16 token shards (float32 out).
    """

    def __init__(self, tokens: TokenStore, pooled: Store):
        self.tokens = tokens
        self.k = tokens.per_slice
        self.d = int(pooled.d)
        self.n = int(pooled.n) * self.k
        self.slice_ids = np.repeat(np.asarray(pooled.slice_ids, dtype=np.int64), self.k)
        rows = np.array([int(e["rows"]) for e in tokens.meta["shards"]], dtype=np.int64)
        if rows.sum() != pooled.n:
            raise MedsaeError(f"train: token shards of {tokens.folder} hold {rows.sum()} slices, embeddings {pooled.n}")
        self._starts = np.concatenate([[0], np.cumsum(rows)])
        self._maps: dict[int, np.ndarray] = {}

    def load(self, rows: np.ndarray | None = None) -> np.ndarray:
        """float32 ``[len(rows), d]`` (every token when ``rows`` is None), in the order asked."""
        flat = np.arange(self.n, dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64).reshape(-1)
        slice_row, token = np.divmod(flat, self.k)
        shard_of = np.searchsorted(self._starts, slice_row, side="right") - 1
        out = np.empty((flat.size, self.d), dtype=np.float32)
        for s in np.unique(shard_of):
            pick = np.flatnonzero(shard_of == s)
            bits = self._bits(int(s))
            out[pick] = from_bf16_bits(bits[slice_row[pick] - self._starts[s], token[pick]])
        return out

    def _bits(self, index: int) -> np.ndarray:
        """Memory-mapped uint16 bf16 bits ``[rows, k, d]`` of token shard ``index``."""
        if index not in self._maps:
            path = self.tokens.folder / self.tokens.meta["shards"][index]["tokens_file"]
            if not path.is_file():
                raise MissingInputError(f"train: token shard {path} is missing")
            self._maps[index] = np.load(path, mmap_mode="r")
        return self._maps[index]


def train_rows(store: Store, slices_dir: str | Path) -> np.ndarray:
    """Store rows whose slice is in the 'train' split (``slices.parquet`` of the slices stage)."""
    from medsae.data.index import load_slices

    slices = load_slices(slices_dir, columns=["slice_id", "split"])
    split = np.full(int(slices["slice_id"].max()) + 1 if len(slices) else 0, "", dtype=object)
    split[slices["slice_id"].to_numpy(np.int64)] = slices["split"].to_numpy(object)
    ids = np.asarray(store.slice_ids, dtype=np.int64)
    if ids.size and ids.max() >= len(split):
        raise MedsaeError(f"train: embeddings reference slice ids missing from {slices_dir}")
    rows = np.flatnonzero(split[ids] == "train")
    if rows.size == 0:
        raise MedsaeError(f"train: no slice of the 'train' split among the embeddings (slices: {slices_dir})")
    return rows


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The permutation of ``0..n-1`` used in ``epoch`` (CPU, int64)."""
    gen = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % (2**63))
    return torch.randperm(n, generator=gen)


class TrainData:
    """Train embeddings (raw, float32) and batches of them in a seeded order."""

    def __init__(
        self,
        store: Store,
        rows: np.ndarray,
        device: torch.device,
        max_bytes: float,
        chunk_rows: int | None = None,
    ):
        self.store = store
        self.rows = np.sort(np.asarray(rows, dtype=np.int64))
        self.n, self.d = len(self.rows), int(store.d)
        self.device = device
        self.resident = chunk_rows is None and self.n * self.d * 4 <= max_bytes
        self.chunk_rows = chunk_rows or max(1, int(max_bytes // (2 * self.d * 4)))
        self.x = torch.from_numpy(store.load(self.rows)).to(device) if self.resident else None

    def batches(self, order: torch.Tensor, batch_size: int, start_batch: int = 0) -> Iterator[torch.Tensor]:
        """Batches ``x[order[i·B:(i+1)·B]]`` for ``i >= start_batch``, on the device."""
        n_batches = -(-len(order) // batch_size)
        if self.resident:
            order_dev = order.to(self.device)
            for i in range(start_batch, n_batches):
                yield self.x[order_dev[i * batch_size : (i + 1) * batch_size]]
            return
        per_chunk = max(1, self.chunk_rows // batch_size)
        for c0 in range(start_batch - start_batch % per_chunk, n_batches, per_chunk):
            c1 = min(c0 + per_chunk, n_batches)
            chunk = self._load(order[c0 * batch_size : c1 * batch_size])
            for i in range(max(c0, start_batch), c1):
                yield chunk[(i - c0) * batch_size : (i - c0 + 1) * batch_size]

    def _load(self, positions: torch.Tensor) -> torch.Tensor:
        """Rows ``positions`` (of the train matrix), read from the store in sorted order."""
        pos = positions.numpy()
        sort = np.argsort(pos, kind="stable")
        block = np.empty((len(pos), self.d), dtype=np.float32)
        block[sort] = self.store.load(self.rows[pos[sort]])
        return torch.from_numpy(block).to(self.device)

    def chunks(self, chunk_rows: int) -> Iterator[torch.Tensor]:
        """Every train row in stored order, in chunks, on the device."""
        for start in range(0, self.n, chunk_rows):
            if self.resident:
                yield self.x[start : start + chunk_rows]
            else:
                yield self._load(torch.arange(start, min(start + chunk_rows, self.n)))

    def sample(self, n_max: int, seed: int) -> torch.Tensor:
        """Up to ``n_max`` random train rows (seeded), on the device."""
        if self.n <= n_max:
            return self.x if self.resident else self._load(torch.arange(self.n))
        pick = torch.randperm(self.n, generator=torch.Generator().manual_seed(seed))[:n_max]
        return self.x[pick.to(self.device)] if self.resident else self._load(pick)
