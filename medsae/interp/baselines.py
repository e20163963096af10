"""Controls every explanation score is reported against (docs/method.md#baselines).

* **Shuffled explanation**: latent i is simulated with the explanation of a seeded-random other
  latent through the same scorer. Expect r near 0; the gap to the real explanation is the signal.
  It runs for a stable, seeded share of latents (``shuffled_fraction``, at least
  ``shuffled_min``), because it costs as many calls as the real simulation.
* **Best single attribute**: the metadata term whose indicator correlates most with the latent on
  the explain partition (computed by the summarize stage), applied as a rule to the held-out set
  (prediction 10 where the slice has the term, else 0). An LLM that cannot beat this is a label
  lookup.
* The **permutation p-value** lives with the scores (:mod:`medsae.interp.scoring`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from medsae.interp.metadata import Term
from medsae.interp.sampling import purpose_rng, purpose_seed

RULE_MODEL = "rule"
RULE_TEMPLATE = "rule:best_attribute/v1"


def shuffled_targets(
    latents: Sequence[int], fraction: float, minimum: int, seed: int, sae_key: str
) -> list[int]:
    """The latents that get the shuffled baseline: a seeded, order-independent selection."""
    latents = [int(x) for x in latents]
    if not latents:
        return []
    n = min(len(latents), max(int(math.ceil(fraction * len(latents))), minimum))
    ranked = sorted(latents, key=lambda x: purpose_seed(seed, sae_key, x, "shuffled-select"))
    return sorted(ranked[:n])


def shuffled_donor(latent: int, candidates: Sequence[int], seed: int, sae_key: str) -> int | None:
    """A seeded-random other latent among ``candidates`` (None when there is no other)."""
    others = sorted(int(c) for c in candidates if int(c) != int(latent))
    if not others:
        return None
    return others[int(purpose_rng(seed, sae_key, latent, "shuffled-donor").integers(len(others)))]


def distractors(latent: int, candidates: Sequence[int], k: int, seed: int, sae_key: str) -> list[int]:
    """``k`` seeded-random other latents (the study's ranking distractors); fewer if not enough."""
    others = sorted(int(c) for c in candidates if int(c) != int(latent))
    if len(others) < k:
        return []
    rng = purpose_rng(seed, sae_key, latent, "ranking-distractors")
    return sorted(int(x) for x in rng.choice(others, size=k, replace=False))


def has_term(term: Term, slice_ids: np.ndarray, attrs: pd.DataFrame, structures: pd.DataFrame) -> np.ndarray:
    """Bool per slice id: does the slice have ``term`` (full structure presence, not just the top 5)?"""
    slice_ids = np.asarray(slice_ids, dtype=np.int64)
    if term.kind == "structure":
        sub = structures[structures["structure"].str.lower() == term.value.lower()]
        return np.isin(slice_ids, sub["slice_id"].to_numpy())
    if term.kind not in attrs.columns:
        return np.zeros(len(slice_ids), dtype=bool)
    values = attrs[term.kind].reindex(slice_ids).to_numpy(dtype=object)
    return np.array([v == term.value for v in values], dtype=bool)


def rule_predictions(
    term: Term, slice_ids: np.ndarray, attrs: pd.DataFrame, structures: pd.DataFrame, scale: int = 10
) -> np.ndarray:
    """The best-attribute rule: ``scale`` where the slice has the term, else 0."""
    return has_term(term, slice_ids, attrs, structures).astype(float) * scale
