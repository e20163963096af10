"""The explorer's neighbour panels at the study's scale: decoder cosines and co-activation of 8,192 latents.

    .venv/bin/python bench/latent_extras.py                      # 8,192 latents, 200,000 slices, L0 64
    .venv/bin/python bench/latent_extras.py --slices 50000 --l0 32

Synthetic inputs of the study's shape: a random decoder ``[d_sae, d_in]`` (float32) and sparse codes
``[slices, d_sae]`` with ``--l0`` firing latents per slice drawn from a skewed (power-law) latent
frequency, so some latents fire on a large share of slices as in trained SAEs. Times
:func:`~medsae.report.site.latent_extras.decoder_neighbours` (chunked GEMM),
:func:`~medsae.report.site.latent_extras.coactivation_neighbours` (chunked sparse products) and the
per-page lookup of every latent; prints wall and CPU seconds and peak memory.
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import scipy.sparse as sp

from medsae.report.site.latent_extras import LatentExtras, coactivation_neighbours, decoder_neighbours


def synthetic_codes(n: int, d: int, l0: int, seed: int = 0) -> sp.csr_matrix:
    """``n x d`` codes, ``l0`` draws per row from a power-law latent frequency (duplicates merged)."""
    rng = np.random.default_rng(seed)
    cols = np.minimum((d * rng.random((n, l0)) ** 2).astype(np.int64), d - 1)  # skewed towards low ids
    cols = rng.permutation(d)[cols]  # spread the frequent latents over the id range
    rows = np.repeat(np.arange(n), l0)
    codes = sp.csr_matrix((rng.random(n * l0, dtype=np.float32) + 0.01, (rows, cols.ravel())), shape=(n, d))
    codes.sum_duplicates()
    return codes


def timed(label: str, fn, table: list) -> object:
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    table.append((label, time.perf_counter() - wall, time.process_time() - cpu))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latents", type=int, default=8192)
    parser.add_argument("--d-in", type=int, default=1024)
    parser.add_argument("--slices", type=int, default=200_000)
    parser.add_argument("--l0", type=int, default=64)
    args = parser.parse_args()
    rng = np.random.default_rng(1)
    decoder = rng.standard_normal((args.latents, args.d_in), dtype=np.float32)
    codes = synthetic_codes(args.slices, args.latents, args.l0).tocsc()
    table: list[tuple[str, float, float]] = []
    dec = timed("decoder cosine neighbours", lambda: decoder_neighbours(decoder), table)
    co = timed("co-activation neighbours", lambda: coactivation_neighbours(codes), table)
    extras = LatentExtras(decoder=dec, coactivation=co, pages=set(range(args.latents)))  # type: ignore[arg-type]
    timed("page() of every latent", lambda: [extras.page(i) for i in range(args.latents)], table)
    fires = np.diff(codes.indptr)
    print(
        f"{args.latents} latents, d_in {args.d_in}, {args.slices} slices, mean L0 {codes.nnz / args.slices:.1f}, "
        f"busiest latent fires on {fires.max() / args.slices:.1%} of slices"
    )
    print(f"{'step':<28}{'wall s':>10}{'CPU s':>10}")
    for label, wall, cpu in table:
        print(f"{label:<28}{wall:>10.2f}{cpu:>10.2f}")
    print(f"peak memory {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
