"""The train and encode stages.

* ``run_train(ctx)`` / ``run_train_many(ctxs)``: train one or several SAE configurations on the
  train split of one embed artifact; configurations that can share a pass over the data (same
  embeddings, batch size, epochs, shuffle, seed, device) are trained together, reading each batch
  once; a spec with ``sae.checkpoint`` imports the study's SAE from that file instead. Writes
  ``sae.safetensors`` + ``cfg.json`` + ``train_log.json`` + ``history.json`` (the training curve,
  :func:`write_history`); returns train-split metrics
  (``train_loss``, ``fvu``, ``mse``, ``l0_mean``, ``dead_fraction``, ``dense_fraction``).
* ``run_encode(ctx)``: the inference-mode codes of EVERY embedded slice, in chunks, as CSR arrays
  (:mod:`medsae.sae.codes`) and as a long ``codes.parquet`` sorted by latent, which the SQL views
  read (:mod:`medsae.sae.codes_table`). Reconstruction metrics are the evaluate stage's job.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from medsae.embed.store import EmbeddingStore, open_embeddings
from medsae.embed.token_store import open_tokens
from medsae.errors import MedsaeError
from medsae.sae.checkpoint import WEIGHTS, load_sae, read_config, save_sae
from medsae.sae.codes import write_codes
from medsae.sae.codes_table import write_codes_table
from medsae.sae.config import SAESpec
from medsae.sae.data import Store, TokenSamples, TrainData, train_rows
from medsae.sae.train import TrainJob, TrainResult, resolve_device, shared_settings, train_many
from medsae.stage import Metric, StageContext, StageResult, make_shareable

CODE_VERSION = "1"
TRAIN_LOG = "train_log.json"
HISTORY = "history.json"
HISTORY_VERSION = 1
ENCODE_CHUNK_ROWS = 8192


def run_train(ctx: StageContext) -> StageResult:
    """Train the SAE of one experiment."""
    return run_train_many([ctx])[0]


def _group_key(ctx: StageContext) -> tuple[Any, ...]:
    spec = ctx.section(SAESpec)
    inputs = (str(ctx.inputs["embed"]), str(ctx.inputs["slices"]), spec.input)
    return (*inputs, ctx.seed, spec.device, shared_settings(spec))


def train_store(embed_dir: str | Path, sae_input: str) -> Store:
    """The samples an SAE trains on: the pooled embeddings, or (``sae.input: tokens``) the stored tokens."""
    store = open_embeddings(embed_dir)
    return store if sae_input == "pooled" else token_samples(embed_dir, store)


def token_samples(embed_dir: str | Path, store: EmbeddingStore) -> TokenSamples:
    """The stored tokens of an embed folder as samples; one line when the embed stage stored none."""
    if not store.manifest.get("tokens"):
        raise MedsaeError(
            f"sae.input: 'tokens' needs the tokens the embed stage stores, and {embed_dir} has none "
            "(set embed.tokens_per_slice > 0)"
        )
    return TokenSamples(open_tokens(embed_dir), store)


def run_train_many(ctxs: list[StageContext]) -> list[StageResult]:
    """Train several SAE configurations, one pass over the data per compatible group.

    A configuration with ``sae.checkpoint`` is imported from that file instead (:mod:`medsae.sae.sail`).
    """
    groups: dict[tuple[Any, ...], list[int]] = {}
    results: list[StageResult | None] = [None] * len(ctxs)
    for i, ctx in enumerate(ctxs):
        if ctx.section(SAESpec).checkpoint is not None:
            from medsae.sae.sail import import_checkpoint

            t0 = time.perf_counter()
            imported = import_checkpoint(ctx)
            results[i] = _write_train(ctx, imported, time.perf_counter() - t0)
        else:
            groups.setdefault(_group_key(ctx), []).append(i)
    for members in groups.values():
        first = ctxs[members[0]]
        first_spec = first.section(SAESpec)
        device = resolve_device(first_spec.device)
        store = train_store(first.inputs["embed"], first_spec.input)
        rows = train_rows(store, first.inputs["slices"])
        data = TrainData(store, rows, device, first_spec.resident_max_gb * 2**30)
        jobs = [
            TrainJob(
                ctxs[i].section(SAESpec),
                ctxs[i].seed,
                ctxs[i].work_dir,
                name=ctxs[i].experiment if len(members) > 1 else "",
            )
            for i in members
        ]
        t0 = time.perf_counter()
        trained = train_many(jobs, data, device, progress=first.progress)
        wall = time.perf_counter() - t0
        for i, result in zip(members, trained, strict=True):
            results[i] = _write_train(ctxs[i], result, wall)
    return [r for r in results if r is not None]


def _write_train(ctx: StageContext, result: TrainResult, wall: float) -> StageResult:
    info = {**result.info, "wall_seconds": wall, "input": ctx.section(SAESpec).input}
    save_sae(result.sae, ctx.out_dir, extra={"train": info})
    make_shareable(Path(ctx.out_dir) / WEIGHTS)  # safetensors writes 0600; colleagues must read it
    params = ctx.section(SAESpec).model_dump(mode="json")
    log = {"info": info, "metrics": result.metrics, "log": result.log, "params": params}
    (Path(ctx.out_dir) / TRAIN_LOG).write_text(json.dumps(log, indent=1))
    write_history(ctx.out_dir, result.history)
    n = int(info["n_train"])
    metrics = [Metric(name, float(value), split="train", n=n) for name, value in result.metrics.items()]
    summary = {
        "d_in": result.sae.d_in,
        "d_sae": result.sae.d_sae,
        "n_train": n,
        "steps": info["steps"],
        "samples_per_s": info["samples_per_s"],
        "configs_in_pass": info["configs_in_pass"],
        **{k: info[k] for k in ("precision", "precision_reason") if k in info},
        **{k: result.metrics[k] for k in ("fvu", "l0_mean", "dead_fraction")},
    }
    return StageResult(metrics=metrics, summary=summary, device=info["device"])


def write_history(out_dir: str | Path, rows: list[dict[str, Any]]) -> Path:
    """``history.json`` beside the checkpoint: ``{"version": 1, "rows": [{"epoch", "step", "samples",
    "loss", "fvu"}, ...]}``, one row at every epoch's end and about every 1 % of the steps, each the
    mean loss and FVU of the training steps since the previous row (an imported SAE has no rows)."""
    keys = ("epoch", "step", "samples", "loss", "fvu")
    clean = [{k: (int(r[k]) if k in ("epoch", "step", "samples") else float(r[k])) for k in keys} for r in rows]
    path = Path(out_dir) / HISTORY
    path.write_text(json.dumps({"version": HISTORY_VERSION, "rows": clean}))
    return path


@torch.no_grad()
def encode_store(sae: torch.nn.Module, chunks, device: torch.device) -> sp.csr_matrix:
    """Inference codes of every chunk ``(start, float32 [rows, d])`` as one CSR matrix."""
    indptr_parts, index_parts, value_parts = [np.zeros(1, dtype=np.int64)], [], []
    nnz = 0
    for _start, chunk in chunks:
        codes = sae.encode(sae.normalize(torch.from_numpy(np.asarray(chunk, dtype=np.float32)).to(device)))
        rows, cols = torch.nonzero(codes, as_tuple=True)
        counts = torch.bincount(rows, minlength=codes.shape[0]).cpu().numpy()
        indptr_parts.append(nnz + np.cumsum(counts))
        nnz += int(counts.sum())
        index_parts.append(cols.to(torch.int32).cpu().numpy())
        value_parts.append(codes[rows, cols].float().cpu().numpy())
    indptr = np.concatenate(indptr_parts)
    indices = np.concatenate(index_parts) if index_parts else np.zeros(0, np.int32)
    values = np.concatenate(value_parts) if value_parts else np.zeros(0, np.float32)
    return sp.csr_matrix((values, indices, indptr), shape=(len(indptr) - 1, sae.d_sae))


def trained_on(train_dir: str | Path) -> str:
    """``sae.input`` of a trained SAE ('pooled' or 'tokens'), from its ``cfg.json``."""
    return str(read_config(train_dir)["medsae"].get("train", {}).get("input", "pooled"))


class _MaxOverTokens(torch.nn.Module):
    """A token SAE seen from the slice: ``encode`` of a slice's ``k`` stored tokens = their codes' maximum."""

    def __init__(self, sae: torch.nn.Module, k: int):
        super().__init__()
        self.sae, self.k, self.d_sae = sae, k, sae.d_sae

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return self.sae.normalize(x)  # per token: each token is one of the SAE's samples

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.sae.encode(x).reshape(-1, self.k, self.d_sae).amax(dim=1)


def _token_chunks(samples: TokenSamples, slices_per_chunk: int):
    """``(first slice row, float32 [slices·k, d])``: every stored token, slice by slice, in store order."""
    n_slices = samples.n // samples.k
    for start in range(0, n_slices, slices_per_chunk):
        stop = min(start + slices_per_chunk, n_slices)
        yield start, samples.load(np.arange(start * samples.k, stop * samples.k))


def run_encode(ctx: StageContext) -> StageResult:
    """Codes of every embedded slice (train, val and test) with the trained SAE.

    A token SAE (``sae.input: tokens``) codes a slice as the maximum, per latent, of the codes of the
    slice's stored tokens (docs/method.md#token-sae).
    """
    device = resolve_device("auto")  # encode has no spec section: the best device present
    sae = load_sae(ctx.inputs["train"], device)
    store = open_embeddings(ctx.inputs["embed"])
    t0 = time.perf_counter()
    if trained_on(ctx.inputs["train"]) == "tokens":
        samples = token_samples(ctx.inputs["embed"], store)
        per_chunk = max(1, ENCODE_CHUNK_ROWS // samples.k)
        chunks = ctx.progress(_token_chunks(samples, per_chunk), -(-store.n // per_chunk), "encode (tokens)")
        csr = encode_store(_MaxOverTokens(sae, samples.k), chunks, device)
    else:
        n_chunks = -(-store.n // ENCODE_CHUNK_ROWS)
        chunks = ctx.progress(store.iter_chunks(ENCODE_CHUNK_ROWS), n_chunks, "encode")
        csr = encode_store(sae, chunks, device)
    seconds = time.perf_counter() - t0
    write_codes(ctx.out_dir, csr, store.slice_ids)
    write_codes_table(ctx.out_dir, csr, store.slice_ids)
    summary = {
        "n": int(csr.shape[0]),
        "d_sae": int(csr.shape[1]),
        "nnz": int(csr.nnz),
        "l0_mean": csr.nnz / max(csr.shape[0], 1),
        "rows_per_s": csr.shape[0] / seconds if seconds > 0 else None,
        "input": trained_on(ctx.inputs["train"]),
    }
    return StageResult(summary=summary, device=str(device))
