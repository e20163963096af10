"""Time activations in SQL at study size: ``python bench/codes_sql.py [--slices N] [--k K] [--d-sae D]``.

Builds a synthetic encode output of N slices (default 909,873, the study's) x K active latents
(default 40) over D latents (default 8,192; latent frequencies follow a Zipf-like law so some
latents are far more frequent than others), writes it with the encode stage's writer
(``codes.parquet``, sorted by latent, 128k-row zstd row groups), registers it as experiment
``demo`` in a registry on disk (plus ~6 ``slice_structures`` rows per slice) and times, through
the same TEMP views ``medsae sql`` uses, on a read-only connection:

* the top-20 query of the issue: ``SELECT slice_id, value FROM codes WHERE experiment='demo' AND
  latent=123 ORDER BY value DESC LIMIT 20``;
* the same for the most frequent latent;
* the top-20 joined to ``slice_structures`` (organs), and a co-activation count of two latents.

Cold = a new DuckDB connection per run (views registered on it; the OS file cache stays warm);
warm = one connection, after one unmeasured run. Median of ``--repeats`` (default 5). Needs about
1 GB in the temporary folder (``--dir``; removed at the end unless ``--keep``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import scipy.sparse as sp

from medsae.registry import Registry
from medsae.registry.codes_view import register_code_views
from medsae.sae.codes_table import CODES_TABLE, write_codes_table

ENCODE_KEY = "e" * 64
SLICES_KEY = "s" * 64
STRUCTURES = [f"structure_{i:03d}" for i in range(117)]


def synthetic_codes(n: int, k: int, d_sae: int, seed: int = 0, chunk: int = 65_536) -> sp.csr_matrix:
    """n x d_sae CSR with exactly k distinct active latents per row, Zipf-like latent frequencies."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / (np.arange(d_sae) + 50.0)
    cdf = np.cumsum(rng.permutation(weights))
    cdf /= cdf[-1]
    draws = k + k // 2
    indices = np.empty(n * k, dtype=np.int32)
    for start in range(0, n, chunk):
        rows = min(chunk, n - start)
        picked = np.empty((rows, k), dtype=np.int32)
        todo = np.arange(rows)
        while todo.size:  # rows whose candidates hold fewer than k distinct latents are drawn again
            cand = np.sort(np.searchsorted(cdf, rng.random((todo.size, draws))), axis=1)
            unique = np.ones(cand.shape, bool)
            unique[:, 1:] = cand[:, 1:] != cand[:, :-1]
            ok = unique.sum(axis=1) >= k
            priority = np.where(unique, rng.random(cand.shape), -1.0)[ok]
            choice = np.argpartition(-priority, k - 1, axis=1)[:, :k]
            picked[todo[ok]] = np.sort(np.take_along_axis(cand[ok], choice, axis=1), axis=1)
            todo = todo[~ok]
        indices[start * k : (start + rows) * k] = picked.ravel()
    values = rng.gamma(2.0, 0.5, size=n * k).astype(np.float32) + np.float32(1e-3)
    indptr = np.arange(0, n * k + 1, k, dtype=np.int64)
    return sp.csr_matrix((values, indices, indptr), shape=(n, d_sae))


def make_registry(root: Path, encode_dir: Path, n: int, seed: int = 0) -> Registry:
    """Experiment 'demo' whose encode stage is ``encode_dir``, with synthetic slice structures."""
    reg = Registry(root / "registry.duckdb")
    reg.insert(
        "experiments",
        [{"experiment_id": "x" * 64, "name": "demo", "spec_json": "{}", "spec_hash": "x" * 64}],
    )
    reg.insert(
        "experiment_stages",
        [
            {"experiment_id": "x" * 64, "kind": "encode", "stage_key": ENCODE_KEY},
            {"experiment_id": "x" * 64, "kind": "slices", "stage_key": SLICES_KEY},
        ],
    )
    reg.insert(
        "stages",
        [
            {
                "stage_key": ENCODE_KEY,
                "kind": "encode",
                "code_version": "1",
                "params_json": "{}",
                "status": "done",
                "artifact_dir": str(encode_dir),
            }
        ],
    )
    rng = np.random.default_rng(seed)
    per_slice = rng.integers(3, 10, size=n)
    slice_id = np.repeat(np.arange(n, dtype=np.int64), per_slice)
    structures = pa.table(
        {
            "slices_key": pa.array(np.full(slice_id.size, SLICES_KEY)),
            "slice_id": slice_id,
            "structure": pa.array(np.asarray(STRUCTURES)[rng.integers(0, len(STRUCTURES), slice_id.size)]),
            "pixels": rng.integers(1, 5000, slice_id.size).astype(np.int32),
        }
    )
    reg.insert("slice_structures", structures)
    return reg


def queries(top_latent: int, latent: int) -> dict[str, str]:
    return {
        f"top-20 latent {latent}": (
            f"SELECT slice_id, value FROM codes WHERE experiment = 'demo' AND latent = {latent} "
            "ORDER BY value DESC LIMIT 20"
        ),
        f"top-20 latent {top_latent} (most frequent)": (
            f"SELECT slice_id, value FROM codes WHERE experiment = 'demo' AND latent = {top_latent} "
            "ORDER BY value DESC LIMIT 20"
        ),
        f"top-20 latent {latent} + organs": (
            "WITH top AS (SELECT slices_key, slice_id, value FROM codes WHERE experiment = 'demo' "
            f"AND latent = {latent} ORDER BY value DESC LIMIT 20) "
            "SELECT t.slice_id, t.value, string_agg(s.structure, ', ' ORDER BY s.pixels DESC) AS organs "
            "FROM top t LEFT JOIN slice_structures s USING (slices_key, slice_id) GROUP BY ALL ORDER BY t.value DESC"
        ),
        f"co-activation {latent} & {top_latent}": (
            "SELECT count(*) FROM codes a JOIN codes b USING (experiment, slice_id) "
            f"WHERE a.experiment = 'demo' AND a.latent = {latent} AND b.latent = {top_latent}"
        ),
    }


def _timed(con: duckdb.DuckDBPyConnection, sql: str) -> tuple[float, int]:
    t0 = time.perf_counter()
    rows = con.execute(sql).fetchall()
    return time.perf_counter() - t0, len(rows)


def time_query(registry: Path, sql: str, repeats: int) -> dict[str, float]:
    cold, setup = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        con = duckdb.connect(str(registry), read_only=True)
        register_code_views(con, registry)
        setup.append(time.perf_counter() - t0)
        seconds, n_rows = _timed(con, sql)
        cold.append(seconds)
        con.close()
    con = duckdb.connect(str(registry), read_only=True)
    register_code_views(con, registry)
    _timed(con, sql)
    warm = [_timed(con, sql)[0] for _ in range(repeats)]
    con.close()
    return {
        "setup_ms": 1e3 * statistics.median(setup),
        "cold_ms": 1e3 * statistics.median(cold),
        "warm_ms": 1e3 * statistics.median(warm),
        "rows": n_rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=909_873)
    parser.add_argument("--k", type=int, default=40)
    parser.add_argument("--d-sae", type=int, default=8192)
    parser.add_argument("--latent", type=int, default=123)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", type=Path, default=None, help="Working folder (default: a new temporary one).")
    parser.add_argument("--keep", action="store_true", help="Keep the working folder.")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="medsae_codes_bench_", dir=args.dir))
    try:
        t0 = time.perf_counter()
        csr = synthetic_codes(args.slices, args.k, args.d_sae)
        t_gen = time.perf_counter() - t0
        encode_dir = root / "artifacts" / "encode" / ENCODE_KEY
        t0 = time.perf_counter()
        path = write_codes_table(encode_dir, csr, np.arange(args.slices, dtype=np.int64))
        t_write = time.perf_counter() - t0
        t0 = time.perf_counter()
        reg = make_registry(root, encode_dir, args.slices)
        t_reg = time.perf_counter() - t0
        counts = np.bincount(csr.indices, minlength=args.d_sae)
        top_latent = int(counts.argmax())
        meta = pq.read_metadata(path)
        print(
            f"codes: {args.slices:,} slices x {args.k} latents of {args.d_sae:,} = {meta.num_rows:,} rows, "
            f"{meta.num_row_groups} row groups, {path.stat().st_size / 2**20:.0f} MiB ({CODES_TABLE}); "
            f"latent {args.latent}: {counts[args.latent]:,} rows, latent {top_latent}: {counts[top_latent]:,} rows"
        )
        print(f"generate {t_gen:.1f}s, write {t_write:.1f}s, registry {t_reg:.1f}s; duckdb {duckdb.__version__}")
        print()
        header = f"{'query':<40} {'rows':>5} {'views ms':>9} {'cold ms':>9} {'warm ms':>9}"
        print(header)
        print("-" * len(header))
        results = {}
        for name, sql in queries(top_latent, args.latent).items():
            r = time_query(reg.path, sql, args.repeats)
            results[name] = r
            print(f"{name:<40} {r['rows']:>5} {r['setup_ms']:>9.1f} {r['cold_ms']:>9.1f} {r['warm_ms']:>9.1f}")
        print()
        print(f"median of {args.repeats}; 'views ms' = connect read-only + create the TEMP views; goal top-20 < 100 ms")
        print(json.dumps({"results": results}, default=float))
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
