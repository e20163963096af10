"""Time the report on a study-sized registry: ``python bench/report.py [--slices N] [--latents K]``.

Fabricates one experiment with N slices (``slices`` + ~20 ``slice_structures`` rows each), K SAE
latents with explain example sets, two explainers + a baseline per latent, and a sweep of 8
experiments; then times ``build_report`` (without thumbnails: no slices artifact) for 50 and 200
cards, and ``compare_experiments``. Prints a table.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from medsae.registry import Registry
from medsae.report.build import build_report
from medsae.report.compare import compare_experiments


def fabricate(root: Path, n_slices: int, n_latents: int) -> Registry:
    rng = np.random.default_rng(0)
    reg = Registry(root / "registry.duckdb")
    names = [f"bench@k={k}" for k in (8, 16, 32, 64, 96, 128, 160, 192)]
    reg.insert(
        "experiments",
        [
            {
                "experiment_id": f"e{i}",
                "name": n,
                "spec_json": json.dumps({"sae": {"arch": "topk"}}),
                "spec_hash": f"e{i}",
                "sweep_name": "bench",
            }
            for i, n in enumerate(names)
        ],
    )
    kinds = ("slices", "train", "encode", "evaluate", "summarize")
    reg.insert(
        "experiment_stages",
        [
            {"experiment_id": f"e{i}", "kind": k, "stage_key": f"{k}{i if k != 'slices' else ''}"}
            for i in range(len(names))
            for k in kinds
        ],
    )
    metrics = []
    for i, n in enumerate(names):
        k = int(n.split("=")[1])
        for split in ("val", "test"):
            metrics += [
                {
                    "stage_key": f"evaluate{i}",
                    "split": split,
                    "name": m,
                    "value": v,
                    "target": None,
                    "n_features": None,
                }
                for m, v in (("fvu", 1 / k), ("r2", 1 - 0.5 / k), ("l0", float(k)))
            ]
            metrics += [
                {
                    "stage_key": f"evaluate{i}",
                    "split": split,
                    "name": "recovery",
                    "value": 1 - 1 / nf,
                    "target": f"structure={t}",
                    "n_features": nf,
                }
                for t in range(30)
                for nf in (1, 5, 10, 50)
            ]
    reg.insert("metrics", metrics)
    ids = np.arange(n_slices)
    reg.insert(
        "slices",
        pa.table(
            {
                "slices_key": ["slices"] * n_slices,
                "slice_id": ids,
                "slice_uid": [f"ct/s{i // 300}/axial/{i % 300}" for i in ids],
                "modality": ["ct"] * n_slices,
                "plane": ["axial"] * n_slices,
            }
        ),
    )
    per = 20
    reg.insert(
        "slice_structures",
        pa.table(
            {
                "slices_key": ["slices"] * (n_slices * per),
                "slice_id": np.repeat(ids, per),
                "structure": np.tile([f"organ_{j}" for j in range(per)], n_slices),
                "pixels": rng.integers(1, 5000, n_slices * per, dtype=np.int32),
            }
        ),
    )
    freq = rng.uniform(0, 0.2, n_latents)
    reg.insert(
        "latents",
        pa.table(
            {
                "stage_key": ["summarize0"] * n_latents,
                "sae_key": ["train0"] * n_latents,
                "latent": np.arange(n_latents, dtype=np.int32),
                "frequency": freq,
                "max_act": rng.uniform(1, 5, n_latents),
                "status": ["live"] * n_latents,
            }
        ),
    )
    reg.insert(
        "example_sets",
        pa.table(
            {
                "set_id": [f"s{j}" for j in range(n_latents)],
                "stage_key": ["summarize0"] * n_latents,
                "latent": np.arange(n_latents, dtype=np.int32),
                "purpose": ["explain"] * n_latents,
                "slice_ids": [rng.choice(n_slices, 30).tolist() for _ in range(n_latents)],
                "activations": [rng.uniform(0, 5, 30).tolist() for _ in range(n_latents)],
                "roles": [["top"] * 30 for _ in range(n_latents)],
            }
        ),
    )
    expl, scores = [], []
    for j in range(n_latents):
        for model, kind in (("a", "explanation"), ("b", "explanation"), ("baseline", "other_latent")):
            eid = f"{j}-{model}"
            expl.append(
                {
                    "explanation_id": eid,
                    "stage_key": "summarize0",
                    "sae_key": "train0",
                    "latent": j,
                    "explainer_model": model,
                    "template_hash": "t",
                    "text": f"text {j}",
                    "kind": kind,
                }
            )
            scores.append(
                {
                    "score_id": eid,
                    "explanation_id": eid,
                    "method": "pearson",
                    "value": float(rng.uniform(-1, 1)),
                }
            )
    reg.insert("explanations", expl)
    reg.insert("explanation_scores", scores)
    return reg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=200_000)
    parser.add_argument("--latents", type=int, default=8192)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        reg = fabricate(Path(tmp), args.slices, args.latents)
        rows = [("fabricate registry", time.perf_counter() - t0, "")]
        for n in (50, 200):
            t0 = time.perf_counter()
            out = build_report(reg, "bench@k=8", Path(tmp) / f"r{n}.html", n_latents=n)
            rows.append((f"build_report, {n} cards", time.perf_counter() - t0, f"{out.stat().st_size / 1e6:.2f} MB"))
        t0 = time.perf_counter()
        _, result = compare_experiments(reg, [f"bench@k={k}" for k in (8, 16, 32, 64, 96, 128, 160, 192)])
        rows.append(("compare_experiments, 8 experiments", time.perf_counter() - t0, f"{len(result)} rows"))
    print(f"slices={args.slices:,} latents={args.latents:,} (no thumbnails: no slices artifact)")
    print(f"{'step':<38} {'seconds':>8}  note")
    for name, sec, note in rows:
        print(f"{name:<38} {sec:8.2f}  {note}")


if __name__ == "__main__":
    main()
