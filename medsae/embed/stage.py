"""The embed stage: every slice of a slices artifact -> one vector, written as resumable shards.

Pipeline: the rows (slices in ``slice_id`` order, one scan's slices contiguous) are cut into work
items at shard boundaries and scan boundaries, so a DataLoader worker renders one scan with one
volume read (:func:`medsae.data.render.iter_scan_images`). Images travel in pinned memory, are
copied to the device without blocking, and are batched there; batches never straddle a shard, so
a shard's bytes depend only on its own rows. Each finished shard is written atomically into
``ctx.work_dir`` and recorded in ``shards.jsonl``; a killed run resumes at the shards it lacks (the
recorded ones need not be contiguous: the Ray executor records shards as they finish) and produces
byte-identical files. At the end the shards are linked into ``ctx.out_dir``
beside ``slice_ids.npy`` and ``manifest.json`` (see :mod:`medsae.embed.store`).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from medsae.data.index import load_slices
from medsae.data.render import iter_scan_images
from medsae.embed.backbones import Backbone, load_backbone
from medsae.embed.config import EmbedSpec
from medsae.embed.loader import RenderFn, item_rows, loader_workers, make_loader
from medsae.embed.loader import render_rows as render_rows  # re-exported: tests and callers import it here
from medsae.embed.store import sha256_file, shard_name, write_manifest, write_shard
from medsae.embed.token_store import sample_tokens, write_token_shard
from medsae.errors import MedsaeError
from medsae.progress import task
from medsae.stage import Metric, StageContext, StageResult

CODE_VERSION = "1"

_STATE = "state.json"
_RECORD = "shards.jsonl"


def run_embed(ctx: StageContext) -> StageResult:
    """Stage entry point: embed every slice of ``ctx.inputs['slices']`` with the spec's backbone."""
    slices_dir = Path(ctx.inputs["slices"])
    return embed_stage(ctx, load_slices(slices_dir), render=iter_scan_images)


def embed_stage(
    ctx: StageContext, table: pd.DataFrame, render: RenderFn, backbone: Backbone | None = None
) -> StageResult:
    """:func:`run_embed` with the slice table and renderer given (tests pass their own)."""
    spec = ctx.section(EmbedSpec)
    slices_dir = Path(ctx.inputs["slices"])
    slice_ids, items = _rows(table, spec.shard_size, slices_dir)
    work = Path(ctx.work_dir)
    done = _resume(work, n=len(slice_ids), shard_size=spec.shard_size, slice_ids=slice_ids)
    t_load = time.perf_counter()
    backbone = backbone if backbone is not None else load_backbone(spec)
    load_seconds = time.perf_counter() - t_load
    todo = [(start, stop) for start, stop in items if start // spec.shard_size not in done]
    n_todo = int(sum(stop - start for start, stop in todo))
    runner = _ShardRunner(backbone, work, spec, slice_ids, done)
    workers = loader_workers(spec.num_workers, backbone.device)  # sized to the CPUs we may use
    rows = item_rows(spec.input_size, spec.batch_size)  # bounds the memory rendered items take
    loader = make_loader(slices_dir, slice_ids, todo, render, workers, backbone.device, rows)
    with task(f"embed {backbone.name}", total=n_todo, unit="img", quiet=ctx.quiet) as advance:
        for n_images in runner.run(loader):
            advance(n_images)

    return _finish(ctx, spec, describe(backbone, load_seconds), slice_ids, done, n_new=runner.n_written)


def _rows(table: pd.DataFrame, shard_size: int, slices_dir: Path) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """The slice ids in embedding order (ascending) and their work items (cut at shards and scans)."""
    table = table.sort_values("slice_id", kind="stable")
    slice_ids = table["slice_id"].to_numpy(np.int64)
    if slice_ids.size == 0:
        raise MedsaeError(f"embed: no slices to embed in {slices_dir}")
    scans = pd.factorize(table["modality"].astype(str) + "/" + table["image_id"].astype(str))[0]
    return slice_ids, work_items(scans, shard_size)


def describe(backbone: Backbone, load_seconds: float) -> dict[str, Any]:
    """What the manifest and the report say of the backbone that embedded the shards."""
    info = backbone.describe() if hasattr(backbone, "describe") else {"model": backbone.name}
    return {"name": backbone.name, "device": str(backbone.device), "info": info, "load_seconds": load_seconds}


def _finish(
    ctx: StageContext,
    spec: EmbedSpec,
    described: dict[str, Any],
    slice_ids: np.ndarray,
    done: dict[int, dict[str, Any]],
    *,
    n_new: int,
) -> StageResult:
    """Link the finished shards into ``ctx.out_dir``, write the manifest, and report (``described``: the
    backbone's :func:`describe`)."""
    n_shards = -(-len(slice_ids) // spec.shard_size)
    shards = [done[s] for s in range(n_shards) if s in done]  # in shard order, whatever order they finished in
    if len(shards) != n_shards:
        raise MedsaeError(f"embed: {len(shards)} of {n_shards} shards finished in {ctx.work_dir}")
    seconds = float(sum(s["seconds"] for s in shards))  # over every run that wrote a shard
    rate = len(slice_ids) / seconds if seconds > 0 else float("nan")
    d = int(shards[0]["d"])
    info, device, load_seconds = described["info"], described["device"], float(described["load_seconds"])
    for entry in shards:
        for key in ("file", "tokens_file", "pos_file"):
            if key in entry:
                _link(Path(ctx.work_dir) / entry[key], Path(ctx.out_dir) / entry[key])
    tokens = _tokens_manifest(spec, shards)
    write_manifest(
        Path(ctx.out_dir),
        shards=[{k: e[k] for k in ("file", "rows", "sha256")} for e in shards],
        slice_ids=slice_ids,
        d=d,
        dtype=spec.dtype,
        shard_size=spec.shard_size,
        images_per_s=rate,
        seconds=seconds,
        batch_size=spec.batch_size,
        num_workers=spec.num_workers,
        **({"tokens": tokens} if tokens else {}),
        **{"source": spec.source, **info, "device": device},
    )
    extra = {
        "device": device,
        "precision": spec.precision,
        "batch_size": spec.batch_size,
        "num_workers": spec.num_workers,
        "input_size": spec.input_size,
    }
    n = len(slice_ids)
    return StageResult(
        metrics=[
            Metric("images_per_s", rate, n=n, extra=extra),
            Metric("embed_seconds", seconds, n=n, extra={"device": device}),
            Metric("embedding_dim", float(d), n=n),
        ],
        summary={
            "n": n,
            "d": d,
            "dtype": spec.dtype,
            "shards": len(shards),
            "resumed_shards": len(shards) - n_new,
            "model": info.get("model"),
            "pooling": spec.pooling,
            "device": device,
            "images_per_s": round(rate, 2),
            "load_seconds": round(load_seconds, 2),
            **({"tokens_per_slice": tokens["per_slice"], "token_bytes": tokens["bytes"]} if tokens else {}),
        },
        device=device,
    )


def _tokens_manifest(spec: EmbedSpec, shards: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The manifest's ``tokens`` entry (:mod:`medsae.embed.token_store`), None when no tokens are stored."""
    if not spec.tokens_per_slice:
        return None
    keys = ("tokens_file", "tokens_sha256", "pos_file", "pos_sha256", "rows")
    return {
        "per_slice": int(shards[0]["token_k"]),
        "grid": shards[0]["token_grid"],
        "sampling": spec.token_sampling,
        "seed": spec.token_seed,
        "dtype": "bfloat16",
        "bytes": int(sum(s["token_bytes"] for s in shards)),
        "shards": [{k: s[k] for k in keys} for s in shards],
    }


def work_items(scans: np.ndarray, shard_size: int) -> list[tuple[int, int]]:
    """Row ranges [start, stop) that never cross a scan boundary nor a shard boundary, in row order."""
    n = len(scans)
    scan_cuts = np.flatnonzero(np.diff(scans) != 0) + 1
    cuts = np.union1d(np.union1d(scan_cuts, np.arange(0, n, shard_size)), [0, n])
    return [(int(a), int(b)) for a, b in zip(cuts[:-1], cuts[1:], strict=True)]


# --------------------------------------------------------------------------------------------
# shard by shard: the Ray executor (medsae.executor.ray) embeds each shard in a task of its own, the
# driver moves the shard into ``ctx.work_dir``, records it (it alone writes shards.jsonl) and finishes


def _stage_rows(ctx: StageContext) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """The slice ids in embedding order and their work items, as :func:`embed_stage` computes them."""
    slices_dir = Path(ctx.inputs["slices"])
    return _rows(load_slices(slices_dir), ctx.section(EmbedSpec).shard_size, slices_dir)


def pending_shards(ctx: StageContext) -> tuple[list[int], dict[int, dict[str, Any]]]:
    """The shards still to embed, and the finished ones recorded in ``ctx.work_dir`` (by a killed run)."""
    spec = ctx.section(EmbedSpec)
    slice_ids, _ = _stage_rows(ctx)
    done = _resume(Path(ctx.work_dir), n=len(slice_ids), shard_size=spec.shard_size, slice_ids=slice_ids)
    n_shards = -(-len(slice_ids) // spec.shard_size)
    return [s for s in range(n_shards) if s not in done], done


def embed_shards(
    ctx: StageContext, shards: list[int], folder: Path, backbone: Backbone | None = None
) -> tuple[dict[int, dict[str, Any]], dict]:
    """Embed only ``shards`` into ``folder`` (the caller's own) with ``backbone`` (None: the spec's, loaded
    here): their record entries, and the backbone's description with its load time. The bytes are
    :func:`embed_stage`'s: batches never straddle a shard."""
    spec = ctx.section(EmbedSpec)
    slices_dir = Path(ctx.inputs["slices"])
    slice_ids, items = _stage_rows(ctx)
    wanted = set(shards)
    todo = [(start, stop) for start, stop in items if start // spec.shard_size in wanted]
    if folder.exists():
        shutil.rmtree(folder)  # a retried task starts clean
    folder.mkdir(parents=True)
    t_load = time.perf_counter()
    backbone = backbone if backbone is not None else load_backbone(spec)
    load_seconds = time.perf_counter() - t_load
    done: dict[int, dict[str, Any]] = {}
    runner = _ShardRunner(backbone, folder, spec, slice_ids, done)
    workers = loader_workers(spec.num_workers, backbone.device)
    rows = item_rows(spec.input_size, spec.batch_size)
    for _ in runner.run(make_loader(slices_dir, slice_ids, todo, iter_scan_images, workers, backbone.device, rows)):
        pass
    return done, describe(backbone, load_seconds)


def adopt_shards(ctx: StageContext, folder: Path, entries: dict[int, dict[str, Any]]) -> None:
    """Move shards :func:`embed_shards` wrote in ``folder`` into ``ctx.work_dir`` and record them there."""
    work = Path(ctx.work_dir)
    for _, entry in sorted(entries.items()):
        for key in ("file", "tokens_file", "pos_file"):
            if key in entry:
                os.replace(folder / entry[key], work / entry[key])
        _append_record(work, entry)
    shutil.rmtree(folder, ignore_errors=True)


def _append_record(work: Path, entry: dict[str, Any]) -> None:
    """Record a finished shard in ``work``'s ``shards.jsonl`` (flushed to disk before the call returns)."""
    with open(work / _RECORD, "a") as fh:
        fh.write(json.dumps(entry) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def finish_embed(ctx: StageContext, described: dict[str, Any], n_new: int) -> StageResult:
    """:func:`embed_stage`'s end once every shard is recorded in ``ctx.work_dir``: link, manifest, report."""
    spec = ctx.section(EmbedSpec)
    slice_ids, _ = _stage_rows(ctx)
    done = _resume(Path(ctx.work_dir), n=len(slice_ids), shard_size=spec.shard_size, slice_ids=slice_ids)
    return _finish(ctx, spec, described, slice_ids, done, n_new=n_new)


# --------------------------------------------------------------------------------------------
# resumable state


def _resume(work: Path, *, n: int, shard_size: int, slice_ids: np.ndarray) -> dict[int, dict[str, Any]]:
    """Finished shards recorded in ``work`` (verified by sha256), by index and in any order (gaps allowed),
    or a clean slate if the plan changed."""
    work.mkdir(parents=True, exist_ok=True)
    plan = {"n": n, "shard_size": shard_size, "slice_ids_sha256": _array_sha(slice_ids), "code": CODE_VERSION}
    state_path, record = work / _STATE, work / _RECORD
    if state_path.is_file() and json.loads(state_path.read_text() or "{}") != plan:
        for p in work.iterdir():
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    if not state_path.is_file():
        tmp = state_path.with_suffix(".part")
        tmp.write_text(json.dumps(plan))
        os.replace(tmp, state_path)
    n_shards = -(-n // shard_size)
    done: dict[int, dict[str, Any]] = {}
    if record.is_file():
        for line in record.read_text().splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            files = [(entry["file"], entry["sha256"])]
            if "tokens_file" in entry:
                files += [(entry["tokens_file"], entry["tokens_sha256"]), (entry["pos_file"], entry["pos_sha256"])]
            if 0 <= int(entry["index"]) < n_shards and all(
                (work / f).is_file() and sha256_file(work / f) == sha for f, sha in files
            ):
                done[int(entry["index"])] = entry
    # every whole shard counts, gaps allowed: the Ray executor records shards in the order they finish
    return dict(sorted(done.items()))


def _array_sha(a: np.ndarray) -> str:
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def _link(src: Path, dst: Path) -> None:
    """Hard-link a finished shard into the output folder (copy across file systems)."""
    if dst.exists():
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


# --------------------------------------------------------------------------------------------
# batching


class _ShardRunner:
    """Batches rows on the device, embeds them and writes each shard the moment it is complete."""

    def __init__(
        self,
        backbone: Backbone,
        work: Path,
        spec: EmbedSpec,
        slice_ids: np.ndarray,
        done: dict[int, dict[str, Any]],
    ) -> None:
        self.backbone = backbone
        self.work = work
        self.spec = spec
        self.n = len(slice_ids)
        self.slice_ids = slice_ids
        self.done = done
        self.n_written = 0
        self._grid: tuple[int, int] = (0, 0)
        # vectors stay on the device until the shard is complete: no host sync after every batch
        self._embed = getattr(backbone, "embed_on_device", backbone.embed)

    def _shard_stop(self, shard: int) -> int:
        return min((shard + 1) * self.spec.shard_size, self.n)

    def run(self, loader: Iterable[tuple[int, torch.Tensor]]) -> Iterator[int]:
        """Consume work items in order; yield the number of images after each forward pass."""
        batch = self.spec.batch_size
        pending: list[torch.Tensor] = []
        n_pending = 0
        outputs: list[torch.Tensor] = []
        tokens: list[tuple[np.ndarray, np.ndarray]] = []
        row0 = 0  # row of the first pending image
        shard = -1
        clock = time.perf_counter()
        for start, images in loader:
            start = int(start)
            if start // self.spec.shard_size != shard:
                shard = start // self.spec.shard_size
            if not n_pending:
                row0 = start
            pending.append(images.to(self.backbone.device, non_blocking=True))
            n_pending += images.shape[0]
            shard_complete = start + images.shape[0] == self._shard_stop(shard)
            while n_pending >= batch or (shard_complete and n_pending):
                rows = torch.cat(pending) if len(pending) > 1 else pending[0]
                take = min(batch, n_pending)
                if self.spec.tokens_per_slice:
                    pooled, sample = self._embed_with_tokens(rows[:take], self.slice_ids[row0 : row0 + take])
                    outputs.append(pooled)
                    tokens.append(sample)
                else:
                    outputs.append(self._embed(rows[:take]))
                row0 += take
                pending = [rows[take:]] if take < n_pending else []
                n_pending -= take
                yield take
            if shard_complete:
                vectors = torch.cat(outputs).cpu().numpy()
                outputs = []
                sample = None
                if tokens:
                    sample = (np.concatenate([t for t, _ in tokens]), np.concatenate([p for _, p in tokens]))
                tokens = []
                now = time.perf_counter()
                self._record(shard, vectors, seconds=now - clock, tokens=sample)
                clock = now

    @torch.inference_mode()
    def _embed_with_tokens(self, images: torch.Tensor, slice_ids: np.ndarray) -> tuple[torch.Tensor, tuple]:
        """Pooled vectors (as :meth:`embed_on_device` computes them) and the stored token sample of a batch."""
        if not hasattr(self.backbone, "embed_tokens"):
            raise MedsaeError(f"embed: backbone {self.backbone.name} gives no spatial tokens (set tokens_per_slice: 0)")
        feats = self.backbone.embed_tokens(images)
        self._grid = feats.grid
        sample = sample_tokens(
            feats.spatial, images, slice_ids, self.spec.tokens_per_slice, self.spec.token_sampling, self.spec.token_seed
        )
        return feats.pooled.float(), sample

    def _record(
        self, shard: int, vectors: np.ndarray, seconds: float, tokens: tuple[np.ndarray, np.ndarray] | None = None
    ) -> None:
        expected = self._shard_stop(shard) - shard * self.spec.shard_size
        if vectors.shape[0] != expected:
            raise MedsaeError(f"embed: shard {shard} got {vectors.shape[0]} rows, expected {expected}")
        entry = write_shard(self.work, shard, vectors, self.spec.dtype)
        entry.update(index=shard, d=int(vectors.shape[1]), seconds=seconds, device=str(self.backbone.device))
        if tokens is not None:
            bits, positions = tokens
            if bits.shape[0] != expected:
                raise MedsaeError(f"embed: token shard {shard} got {bits.shape[0]} rows, expected {expected}")
            entry.update(write_token_shard(self.work, shard, bits, positions))
            size = sum(os.path.getsize(self.work / entry[k]) for k in ("tokens_file", "pos_file"))
            entry.update(token_k=int(bits.shape[1]), token_grid=list(self._grid), token_bytes=int(size))
        _append_record(self.work, entry)
        self.done[shard] = entry
        self.n_written += 1
        assert entry["file"] == shard_name(shard)
