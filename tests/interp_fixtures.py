"""Synthetic slices and "puzzle" latents whose activation is a known metadata rule (docs/method.md#offline-agent).

Used by the tests and the bench to run the whole agent with a known answer: a latent defined
as "liver present" must be explained as such and score high; another latent's explanation must
score near zero. Attributes are drawn independently, so an unrelated rule predicts nothing.

:func:`make_slices` builds a slices table in the layout of the slices stage (and
:func:`write_slices_dir` writes it as an artifact folder), :func:`puzzle_codes` the code matrix,
:func:`puzzle_experiment` a registered experiment ready for ``medsae explain run``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

VOCAB = ["liver", "spleen", "kidney_left", "kidney_right", "heart", "lung_left", "urinary_bladder", "brain"]
REGIONS = ["head", "thorax", "abdomen", "pelvis"]


def make_slices(
    n_scans: int = 80, slices_per_scan: int = 24, seed: int = 0, split: str | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(slices, slice_structures) with independent random attributes; ``split`` forces one split."""
    rng = np.random.default_rng(seed)
    scans = pd.DataFrame(
        {
            "modality": rng.choice(["ct", "mri"], n_scans),
            "image_id": [f"s{i:04d}" for i in range(n_scans)],
            "sex": rng.choice(["m", "f"], n_scans),
            "age_bin": rng.choice(["<40", "40-60", "60-80", ">=80"], n_scans),
            "institute": rng.choice(list("ABCD"), n_scans),
            "manufacturer": rng.choice(["siemens", "ge", "philips"], n_scans),
            "split": split if split else rng.choice(["train", "val", "test"], n_scans, p=[0.4, 0.4, 0.2]),
        }
    )
    scans = scans.sort_values(["modality", "image_id"]).reset_index(drop=True)
    rows = scans.loc[np.repeat(np.arange(n_scans), slices_per_scan)].reset_index(drop=True)
    n = len(rows)
    rows["plane"] = rng.choice(["axial", "coronal", "sagittal"], n)
    rows["axis"] = rows["plane"].map({"sagittal": 0, "coronal": 1, "axial": 2})
    rows = rows.sort_values(["modality", "image_id", "plane"], kind="stable").reset_index(drop=True)
    rows["idx"] = rows.groupby(["modality", "image_id", "plane"]).cumcount() * 4
    rows["position"] = rng.random(n).round(3)
    rows["body_region"] = rng.choice(REGIONS, n)
    rows["age"] = rows["age_bin"].map({"<40": 30.0, "40-60": 50.0, "60-80": 70.0, ">=80": 85.0})
    rows["dataset"] = "synthetic"
    rows["study_type"] = None
    rows["pathology"] = None
    rows["pathology_location"] = None
    rows["scanner_model"] = None
    rows["slice_id"] = np.arange(n, dtype=np.int64)
    rows["slice_uid"] = rows["modality"] + "/" + rows["image_id"] + "/" + rows["plane"] + "/" + rows["idx"].astype(str)
    present = rng.random((n, len(VOCAB))) < 0.3
    pixels = rng.integers(50, 2000, size=(n, len(VOCAB)))
    sid, col = np.nonzero(present)
    structures = pd.DataFrame(
        {
            "slice_id": sid.astype(np.int64),
            "structure": np.array(VOCAB)[col],
            "pixels": pixels[sid, col].astype(np.int32),
        }
    )
    rows["n_structures"] = present.sum(axis=1)
    return rows, structures


def write_slices_dir(out: Path, slices: pd.DataFrame, structures: pd.DataFrame) -> Path:
    """Write the files of a slices artifact folder that the agent reads."""
    out.mkdir(parents=True, exist_ok=True)
    slices.to_parquet(out / "slices.parquet", index=False)
    structures.to_parquet(out / "slice_structures.parquet", index=False)
    (out / "structures.json").write_text(json.dumps(sorted(VOCAB)))
    return out


@dataclass(frozen=True)
class Puzzle:
    """A latent defined by a rule over metadata; ``strength`` grades firing slices."""

    name: str
    rule: Callable[[pd.DataFrame, pd.DataFrame], np.ndarray]


def _has(structures: pd.DataFrame, n: int, name: str) -> np.ndarray:
    out = np.zeros(n, dtype=bool)
    out[structures.loc[structures["structure"] == name, "slice_id"].to_numpy()] = True
    return out


PUZZLES: list[Puzzle] = [
    Puzzle("liver", lambda s, st: _has(st, len(s), "liver")),
    Puzzle("axial CT", lambda s, st: (s["modality"].to_numpy() == "ct") & (s["plane"].to_numpy() == "axial")),
    Puzzle("female", lambda s, st: s["sex"].to_numpy() == "f"),
    Puzzle("brain on MRI", lambda s, st: _has(st, len(s), "brain") & (s["modality"].to_numpy() == "mri")),
    Puzzle("pelvis", lambda s, st: s["body_region"].to_numpy() == "pelvis"),
    Puzzle("coronal", lambda s, st: s["plane"].to_numpy() == "coronal"),
    Puzzle("kidney_left", lambda s, st: _has(st, len(s), "kidney_left")),
    Puzzle("site B", lambda s, st: s["institute"].to_numpy() == "B"),
]


def puzzle_codes(
    slices: pd.DataFrame,
    structures: pd.DataFrame,
    puzzles: list[Puzzle] = PUZZLES,
    seed: int = 0,
    n_dead: int = 1,
) -> sp.csr_matrix:
    """Codes [n, len(puzzles) + n_dead]: latent i fires with strength U(1, 5) where rule i holds."""
    rng = np.random.default_rng(seed + 1)
    cols = []
    for p in puzzles:
        mask = p.rule(slices, structures)
        cols.append(np.where(mask, rng.uniform(1.0, 5.0, len(slices)), 0.0))
    cols += [np.zeros(len(slices))] * n_dead
    return sp.csr_matrix(np.stack(cols, axis=1).astype(np.float32))


def puzzle_experiment(
    root: Path,
    registry: Any,
    params: dict[str, Any],
    name: str = "puzzles",
    n_scans: int = 60,
    slices_per_scan: int = 16,
    seed: int = 0,
    summarize_key: str = "summarize-key",
) -> dict[str, Path]:
    """A registered experiment whose summarize stage ran on puzzle latents (for ``explain run``).

    Writes the slices, encode, train and summarize folders under ``root`` (the summarize stage
    computed by :func:`medsae.interp.stage.summarize` with ``params``) and the ``experiments``,
    ``experiment_stages`` and ``stages`` rows that ``medsae explain run NAME`` looks up.
    Stage keys are ``<kind>-key`` (``summarize_key`` for summarize): two experiments built with
    different ``summarize_key`` share the SAE (``train-key``) but not their example sets.
    Returns the stage folders by kind.
    """
    from medsae.data.index import presence_matrix
    from medsae.interp.config import InterpretSpec
    from medsae.interp.stage import summarize, write_summary
    from medsae.sae.codes import write_codes

    slices, structures = make_slices(n_scans=n_scans, slices_per_scan=slices_per_scan, seed=seed, split="val")
    dirs = {"slices": write_slices_dir(root / "slices" / "slices-key", slices, structures)}
    codes = puzzle_codes(slices, structures, seed=seed)
    dirs["encode"] = write_codes(root / "encode" / "encode-key", codes, slices["slice_id"].to_numpy())
    dirs["train"] = root / "train" / "train-key"
    dirs["train"].mkdir(parents=True, exist_ok=True)
    presence, vocab = presence_matrix(dirs["slices"])
    spec = InterpretSpec.model_validate(params)
    result = summarize(slices, presence, list(vocab), codes, slices["slice_id"].to_numpy(), spec, "train-key")
    dirs["summarize"] = root / "summarize" / summarize_key
    write_summary(dirs["summarize"], result)
    keys = {k: f"{k}-key" for k in dirs} | {"summarize": summarize_key}
    experiment_id = f"exp-{name}"
    spec = {
        "name": name,
        "description": "puzzle latents: each fires where a metadata rule holds (tests/interp_fixtures.py)",
        "data": {"root": str(dirs["slices"])},
        "embed": {"source": "synthetic", "model": "puzzle-rules", "pretrained": False},
        "sae": {"arch": "rules", "k": len(PUZZLES)},
        "interpret": params,
    }
    registry.insert(
        "experiments",
        [{"experiment_id": experiment_id, "name": name, "spec_json": json.dumps(spec), "spec_hash": name}],
    )
    registry.insert(
        "experiment_stages",
        [{"experiment_id": experiment_id, "kind": k, "stage_key": keys[k]} for k in dirs],
    )
    registry.insert(
        "stages",
        [
            {
                "stage_key": keys[k],
                "kind": k,
                "code_version": "1",
                "params_json": "{}",
                "status": "done",
                "artifact_dir": str(d),
            }
            for k, d in dirs.items()
        ],
    )
    return dirs


#: Interpretation settings small enough for a puzzle experiment of a few scans (tests only).
PUZZLE_PARAMS: dict = {
    "pool_splits": ["val"],
    "min_pool_scans": 2,
    "min_active": 5,
    "simulate_per_decile": 2,
    "simulate_random": 20,
    "detect": False,
    "ranking": False,
    "shuffled_fraction": 1.0,
    "bootstrap": 100,
    "permutations": 100,
}
