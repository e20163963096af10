"""Time each part of the evaluation on synthetic data and extrapolate to the study's 909,873 slices.

    .venv/bin/python bench/eval.py                 # demo size and a larger size, plus the estimate
    .venv/bin/python bench/eval.py --sizes 3000 60000 --solvers   # also sklearn saga vs torch

The synthetic data has the study's shapes: d = 1024 raw embeddings (offset, anisotropic, with
structure-dependent directions), d_sae = 8192 codes with L0 = 40, ~120 slices per scan, 3 planes,
splits by scan (70 / 15 / 15 %). Each part runs the library functions the evaluate stage calls.

Extrapolation: every part is timed at two sizes and fitted as ``t = a + b · n_eval`` (``n_eval`` =
rows of the evaluated splits, val + test); the study's val + test is >= 230,585 of 909,873 slices
(docs/method.md#dataset-size; val >= 137,700, test >= 92,885). Probe and recovery *fits* use fixed
sub-samples (10,000 / 5,000 train rows) and so cost the same at any dataset size; their scoring,
monosemanticity and retrieval grow with the evaluated rows.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medsae.eval import metrics as M
from medsae.eval import mono, probes, recovery, retrieval
from medsae.eval.logreg import fit_binary

FULL_SLICES = 909_873
FULL_EVAL = 137_700 + 92_885  # val + test lower bounds


@dataclasses.dataclass
class Synthetic:
    slices: pd.DataFrame
    presence: sp.csr_matrix
    vocab: list[str]
    emb: np.ndarray
    codes: sp.csr_matrix
    w_dec: np.ndarray
    scan: np.ndarray


def synthetic(n: int, d: int = 1024, d_sae: int = 8192, k: int = 40, n_struct: int = 60, seed: int = 0) -> Synthetic:
    rng = np.random.default_rng(seed)
    per_scan = 120
    n_scans = max(6, n // per_scan)
    scan_id = np.sort(rng.integers(0, n_scans, n))
    modality = np.where(rng.random(n_scans) < 0.67, "ct", "mri")[scan_id]
    split = rng.choice(["train", "val", "test"], n_scans, p=[0.7, 0.15, 0.15])[scan_id]
    institute = rng.choice(list("ABCDEFGHIJ"), n_scans)[scan_id]
    sex = rng.choice(["m", "f"], n_scans)[scan_id]
    age_bin = rng.choice(["<40", "40-60", "60-80", ">=80"], n_scans)[scan_id]
    pathology = rng.choice(["tumor", "trauma", "inflammation", "no_pathology"], n_scans)[scan_id]
    plane = rng.choice(["axial", "coronal", "sagittal"], n)
    position = rng.random(n)
    # structures: each occupies a band of positions
    centre, width = rng.random(n_struct), rng.uniform(0.05, 0.3, n_struct)
    pres = (np.abs(position[:, None] - centre[None, :]) < width[None, :]) & (rng.random((n, n_struct)) < 0.9)
    a = rng.normal(size=(n_struct, d)).astype(np.float32)
    emb = (
        pres.astype(np.float32) @ a
        + rng.normal(size=(n, d)).astype(np.float32)
        + 3.0 * rng.normal(size=d).astype(np.float32)
    )
    emb[:, :3] += np.eye(3, dtype=np.float32)[pd.Series(plane).map({"axial": 0, "coronal": 1, "sagittal": 2})] * 4
    emb[:, 3] += (modality == "mri") * 5
    # codes: half of the k latents tied to present structures, half random
    struct_latents = rng.integers(0, d_sae, size=(n_struct, 8))
    first = np.argmax(pres, axis=1)
    tied = struct_latents[first][:, : k // 2] if n_struct else np.zeros((n, 0), int)
    rand = rng.integers(0, d_sae, size=(n, k - tied.shape[1]))
    cols = np.concatenate([tied, rand], axis=1)
    rows = np.repeat(np.arange(n), k)
    codes = sp.csr_matrix((rng.random(n * k).astype(np.float32) + 0.05, (rows, cols.ravel())), shape=(n, d_sae))
    codes.sum_duplicates()
    slices = pd.DataFrame(
        {
            "slice_id": np.arange(n),
            "modality": modality,
            "plane": plane,
            "split": split,
            "institute": institute,
            "sex": sex,
            "age_bin": age_bin,
            "pathology": pathology,
            "body_region": np.where(position < 0.33, "pelvis", np.where(position < 0.66, "abdomen", "thorax")),
        }
    )
    w_dec = (rng.normal(size=(d_sae, d)) / np.sqrt(d)).astype(np.float32)
    return Synthetic(
        slices,
        sp.csr_matrix(pres),
        [f"s{i}" for i in range(n_struct)],
        emb,
        codes,
        w_dec,
        (pd.Series(modality) + "/" + pd.Series(scan_id).astype(str)).to_numpy(),
    )


def run_parts(data: Synthetic, refs: int = 1000, ks=(1, 2, 3, 5, 10, 20, 50, 100)) -> dict[str, float]:
    """Seconds per part, as the evaluate stage runs them. ``*_fit`` parts use fixed-size train
    sub-samples; every other part grows with the evaluated rows."""
    import torch

    times: dict[str, float] = {}
    split = data.slices["split"].to_numpy()
    evals = {s: np.flatnonzero(split == s) for s in ("val", "test")}
    train = np.flatnonzero(split == "train")

    t = time.perf_counter()
    for rows in evals.values():
        stats = M.ReconstructionStats()
        for start in range(0, len(rows), 16384):
            part = rows[start : start + 16384]
            x = torch.from_numpy(data.emb[part])
            x_in = x / x.norm(dim=1, keepdim=True)
            x_hat = torch.from_numpy(np.asarray(data.codes[part] @ data.w_dec))  # sparse decode
            stats.update(x_in.numpy(), x_hat.numpy())
        stats.result()
    times["reconstruction"] = time.perf_counter() - t

    t = time.perf_counter()
    for rows in evals.values():
        c = data.codes[rows]
        M.l0_summary(M.l0_per_sample(c))
        M.dead_fraction(M.latent_fire_counts(c))
        M.alive_per_batch_study(c)
    times["sparsity"] = time.perf_counter() - t

    t = time.perf_counter()
    targets = probes.select_targets(
        probes.build_targets(data.slices, probes.GROUPS, data.presence, data.vocab), train, 20
    )
    strata = pd.factorize(data.slices["modality"] + data.slices["plane"])[0]
    settings = probes.ProbeSettings(device="cpu")
    sources = {"dense": data.emb, "sparse": data.codes}
    results = probes.run_probes(targets, train, evals, sources, settings, strata)
    probes_total = time.perf_counter() - t
    t = time.perf_counter()  # scoring alone (as run_probes does it: one product per fit), to split the total
    for features, source in sources.items():
        x_eval = {name: probes.take_rows(source, rows) for name, rows in evals.items()}
        fits: dict[int, dict[str, np.ndarray]] = {}
        for res in (r for r in results if r.features == features):
            if id(res.fit) not in fits:
                fits[id(res.fit)] = {n: res.fit.decision(x) for n, x in x_eval.items()}
            logits = fits[id(res.fit)]
            for name, rows in evals.items():
                z = logits[name] if res.column is None else logits[name][:, [res.column]]
                probes.score_logits(res, z, res.target.y[rows], name)
    times["probes_scoring"] = time.perf_counter() - t
    times["probes_fit"] = max(probes_total - times["probes_scoring"], 0.0)

    t = time.perf_counter()
    dense_auc = {s: probes.dense_auc_table(results, s) for s in evals}
    rec = dataclasses.replace(settings, max_iter=200, max_train=5000)
    sparse = [r for r in results if r.features == "sparse"]
    curves = recovery.run_recovery(sparse, dense_auc, train, evals, data.codes, rec)
    recovery_total = time.perf_counter() - t
    t = time.perf_counter()
    tasks = {task: y for r in sparse for task, y in r.target.leaves()}
    for c in curves:
        for name, rows in evals.items():
            recovery.score_curve(c, data.codes[rows][:, c.ranking[: max(c.ns)]], tasks[c.task][rows], name)
    times["recovery_scoring"] = time.perf_counter() - t
    times["recovery_fit"] = max(recovery_total - times["recovery_scoring"], 0.0)
    times["n_probe_targets"] = len(targets)
    times["n_recovery_tasks"] = len(curves)

    t = time.perf_counter()
    for rows in evals.values():
        mono.latent_scores(data.codes[rows], data.presence[rows], data.scan[rows])
    times["monosemanticity"] = time.perf_counter() - t

    t = time.perf_counter()
    for rows in evals.values():
        scans = retrieval.ScanIndex.build(data.scan[rows])
        r = retrieval.reference_rows(len(rows), refs, 0)
        codes, emb = data.codes[rows], data.emb[rows]
        found = retrieval.sparse_fingerprint_retrieval(codes, r, scans, list(ks))
        found[0] = retrieval.dense_retrieval(emb, r, scans)
        for got in found.values():
            retrieval.dense_space_quality(emb, r, got)
            retrieval.label_agreement(pd.factorize(data.slices["plane"].to_numpy()[rows])[0], r, got)
            retrieval.structure_jaccard(data.presence[rows].toarray(), r, got)
    times["retrieval"] = time.perf_counter() - t
    t = time.perf_counter()
    for rows in evals.values():
        scans = retrieval.ScanIndex.build(data.scan[rows])
        r = retrieval.reference_rows(len(rows), refs, 0)
        retrieval.dense_fingerprint_retrieval(data.emb[rows], r, scans, list(ks))
    times["retrieval_dense_fp"] = time.perf_counter() - t
    return times


def solver_comparison(n: int = 10_000, d: int = 1024, d_sae: int = 8192) -> list[tuple[str, float, str]]:
    """One binary probe fit (study settings, max_iter 1000) with sklearn saga and with torch FISTA."""
    from sklearn.metrics import roc_auc_score

    data = synthetic(n + 5000, d=d, d_sae=d_sae, seed=1)
    y = (data.presence[:, 0].toarray().ravel()).astype(int)
    out = []
    for name, x in (("dense 10k x 1024", data.emb), ("sparse 10k x 8192 (L0 40)", data.codes)):
        for backend in ("torch", "sklearn"):
            t = time.perf_counter()
            fit = fit_binary(x[:n], y[:n], max_iter=1000, backend=backend, device="cpu")
            dt = time.perf_counter() - t
            auc = roc_auc_score(y[n:], np.asarray(x[n:] @ fit.coef)[:, 0])
            out.append(
                (
                    f"{name} {backend}",
                    dt,
                    f"held-out AUC {auc:.4f}, iters {fit.n_iter}, converged {fit.converged}",
                )
            )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs=2, default=[1400, 60_000], help="Demo size and a larger size.")
    ap.add_argument("--refs", type=int, default=1000, help="Retrieval references (study: 1,000).")
    ap.add_argument("--solvers", action="store_true", help="Also time sklearn saga vs torch on one probe.")
    args = ap.parse_args()

    measured = {}
    for n in args.sizes:
        data = synthetic(n)
        n_eval = int(np.isin(data.slices["split"], ["val", "test"]).sum())
        print(f"size {n:,} slices ({n_eval:,} evaluated), codes nnz {data.codes.nnz:,} ...", flush=True)
        measured[n] = (n_eval, run_parts(data, refs=args.refs))

    (n1, (e1, t1)), (n2, (e2, t2)) = measured.items()
    parts = [p for p in t1 if not p.startswith("n_")]
    scale = FULL_EVAL / e2
    print()
    print(
        f"{'part':<20}{'n=' + format(n1, ','):>12}{'n=' + format(n2, ','):>12}{'s per 1k eval rows':>20}"
        f"{'909,873 est. (s)':>18}"
    )
    total = 0.0
    for p in parts:
        fixed = p.endswith("_fit")  # fixed-size train sub-samples: same cost at any dataset size
        est = t2[p] if fixed else t2[p] * scale
        total += est
        rate = "fixed" if fixed else f"{t2[p] / e2 * 1000:.3f}"
        print(f"{p:<20}{t1[p]:>12.2f}{t2[p]:>12.2f}{rate:>20}{est:>18.0f}")
    sum1, sum2 = sum(t1[p] for p in parts), sum(t2[p] for p in parts)
    print(f"{'total':<20}{sum1:>12.2f}{sum2:>12.2f}{'':>20}{total:>18.0f}")
    print(
        f"\nevaluated rows (val + test): {e1:,} / {e2:,}; estimate for {FULL_EVAL:,} (val + test of "
        f"{FULL_SLICES:,} slices) = fit parts as measured at n={n2:,} + other parts x {scale:.1f}.\n"
        f"probe targets {t2['n_probe_targets']}, recovery tasks {t2['n_recovery_tasks']} (n={n2:,}); "
        f"CPU only, torch solver on 1 thread."
    )

    if args.solvers:
        print("\nprobe solver, one binary target, 10,000 train rows, max_iter 1000 (study settings):")
        for name, sec, note in solver_comparison():
            print(f"  {name:<38}{sec:>9.1f} s   {note}")


if __name__ == "__main__":
    main()
