"""The summarize stage under ``interpret.protocol: study``: the study's latents, distractors and samples.

Reads the evaluate stage's per-latent monosemanticity on val (``mono_latents_val.parquet``) and its
per-target sparse-probe coefficient tables (``coefficients_sparse.parquet``, written under
``eval.protocol: study``), selects the latents (:mod:`medsae.interp.study.selection`), draws each one's
4 distractors, and realises the example sets the LLM part shows:

* ``study_explain`` — 5 diverse top **train** samples, for every selected latent and every distractor
  (distractor descriptions come from the same procedure on their own train samples);
* ``study_judge`` — 5 diverse top **val** samples of every selected latent.

Writes ``study_selection.parquet`` (one row per selected latent, best first, with its ranks and
distractors) and ``study.json`` (counts) next to the stage's usual outputs; the sets join
``example_sets.parquet``. No LLM.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from medsae.errors import MissingInputError
from medsae.interp.config import InterpretSpec
from medsae.interp.sampling import ExampleSet, sha256_json
from medsae.interp.study import samples, selection

STUDY_EXPLAIN, STUDY_JUDGE = "study_explain", "study_judge"
SELECTION_FILE, INFO_FILE = "study_selection.parquet", "study.json"
MONO_FILE, COEFFICIENTS_FILE = "mono_latents_val.parquet", "coefficients_sparse.parquet"


@dataclass
class SplitCodes:
    """One split's code rows in the study's table order."""

    rows: np.ndarray  # rows of the full code matrix
    codes: sp.csr_matrix  # those rows
    codes_csc: sp.csc_matrix
    image: np.ndarray  # integer image code per row (image_id alone)

    @property
    def n(self) -> int:
        return len(self.rows)


@dataclass
class StudySummary:
    """What the summarize stage adds under the study's protocol."""

    selection: pd.DataFrame  # selection.SELECTION_COLUMNS + distractors (list of latents)
    sets: list[ExampleSet] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)


def read_evaluate_outputs(evaluate_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(monosemanticity per latent on val, rows of every coefficient table) from an evaluate stage folder."""
    mono_path, coef_path = Path(evaluate_dir) / MONO_FILE, Path(evaluate_dir) / COEFFICIENTS_FILE
    if not mono_path.is_file():
        raise MissingInputError(
            f"{mono_path}: not found; interpret.protocol study ranks latents by their monosemanticity on val "
            "(eval.monosemanticity on, 'val' in eval.splits)"
        )
    if not coef_path.is_file():
        raise MissingInputError(
            f"{coef_path}: not found; interpret.protocol study ranks latents by the study's probe coefficient "
            "tables, which the evaluate stage writes under eval.protocol study (with eval.probes on)"
        )
    mono = pd.read_parquet(mono_path)
    if "mono_50" not in mono:
        raise MissingInputError(f"{mono_path}: no mono_50 column; the study's selection needs 50 in eval.mono_top_ns")
    coefficients = pd.read_parquet(coef_path)
    coefficients["table"] = coefficients["group"].astype(str) + "/" + coefficients["target"].astype(str)
    return mono[["latent", "mono_50"]], coefficients[["table", "rank", "latent"]]


def split_codes(codes: sp.csr_matrix, meta: pd.DataFrame, split: str) -> SplitCodes:
    """The rows of ``split`` (``meta``: the slices-table row of each code row) in the study's order."""
    from medsae.eval.targets import study_order

    rows = study_order(meta, np.flatnonzero(meta["split"].astype(str).to_numpy() == split))
    part = sp.csr_matrix(codes[rows])
    image = np.unique(meta["image_id"].astype(str).to_numpy()[rows], return_inverse=True)[1].astype(np.int64)
    return SplitCodes(rows, part, sp.csc_matrix(part), image)


def _diverse_set(
    split: SplitCodes, code_ids: np.ndarray, latent: int, purpose: str, sae_key: str, name: str
) -> ExampleSet:
    picked = samples.diverse_samples(split.codes, split.codes_csc, split.image, latent)
    acts = split.codes[picked][:, [latent]].toarray().ravel().astype(np.float64)
    ids = np.asarray(code_ids, dtype=np.int64)[split.rows[picked]]
    ident = {
        "protocol": "study",
        "latent": int(latent),
        "purpose": purpose,
        "sae_key": sae_key,
        "split": name,
        "params": {"candidates": samples.N_CANDIDATES, "samples": samples.N_SAMPLES},
        "slice_ids": [int(s) for s in ids],
    }
    return ExampleSet(int(latent), purpose, ids, acts, ["diverse"] * len(ids), set_id=sha256_json(ident))


def summarize_study(
    slices: pd.DataFrame,
    codes: sp.spmatrix,
    code_slice_ids: np.ndarray,
    mono: pd.DataFrame,
    coefficients: pd.DataFrame,
    spec: InterpretSpec,
    sae_key: str,
    progress: Any = None,
) -> StudySummary:
    """The study's selection, distractors and sample sets (see the module docstring)."""
    codes = sp.csr_matrix(codes)
    meta = slices.set_index("slice_id", drop=False).loc[np.asarray(code_slice_ids, dtype=np.int64)]
    meta = meta.reset_index(drop=True)
    val, train = split_codes(codes, meta, "val"), split_codes(codes, meta, "train")
    for name, part in (("val", val), ("train", train)):
        if part.n == 0:
            raise MissingInputError(
                f"interpret.protocol study: the {name} split holds no slice (the study explains from train "
                "and judges on val)"
            )
    active = selection.always_active(val.codes)
    chosen = selection.select_latents(mono, coefficients, active, int(spec.study_latents))
    pool = selection.distractor_pool(selection.firing_counts(train.codes), active)
    chosen["distractors"] = [
        selection.draw_distractors(int(lat), pool, int(spec.seed), sae_key) for lat in chosen["latent"]
    ]
    described = sorted({int(x) for x in chosen["latent"]} | {d for ds in chosen["distractors"] for d in ds})
    ids = np.asarray(code_slice_ids, dtype=np.int64)
    sets: list[ExampleSet] = []
    it = described if progress is None else progress(described, len(described), "study: train samples")
    for latent in it:
        sets.append(_diverse_set(train, ids, latent, STUDY_EXPLAIN, sae_key, "train"))
    for latent in chosen["latent"]:
        sets.append(_diverse_set(val, ids, int(latent), STUDY_JUDGE, sae_key, "val"))
    info = {
        "val_slices": val.n,
        "train_slices": train.n,
        "always_active": int(len(active)),
        "ranked_latents": int(len(set(mono["latent"]) | set(coefficients["latent"]))),
        "selected": int(len(chosen)),
        "distractor_pool": int(len(pool)),
        "without_distractors": int(sum(not d for d in chosen["distractors"])),
        "described": len(described),
    }
    return StudySummary(chosen, sets, info)


def write_study(out_dir: Path, study: StudySummary) -> None:
    """``study_selection.parquet`` and ``study.json`` in the summarize stage folder."""
    out_dir.mkdir(parents=True, exist_ok=True)
    study.selection.to_parquet(out_dir / SELECTION_FILE, index=False)
    (out_dir / INFO_FILE).write_text(json.dumps(study.info, indent=2))


def read_selection(summarize_dir: Path) -> pd.DataFrame:
    """The selected latents (best first) with their distractors, as the summarize stage wrote them."""
    path = Path(summarize_dir) / SELECTION_FILE
    if not path.is_file():
        raise MissingInputError(
            f"{path}: not found; the summarize stage ran without interpret.protocol study (rerun it with it)"
        )
    frame = pd.read_parquet(path)
    frame["distractors"] = [[int(x) for x in d] for d in frame["distractors"]]
    return frame
