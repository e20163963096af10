"""The best-single-attribute control: a metadata term applied as a rule, scored like an explanation.

The summarize stage finds, per latent, the term whose indicator correlates most with the latent's
activation on the explain partition (:func:`medsae.interp.summary.best_attribute`). Here it is
applied to the held-out simulation set — prediction 10 where the slice has the term, else 0 — and
scored with the same metrics as an LLM's explanation, without any LLM call.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from medsae.interp.config import InterpretSpec
from medsae.interp.inputs import AgentData
from medsae.interp.journal import Tables
from medsae.interp.metadata import Term
from medsae.interp.rows import RULE_MODEL, RULE_TEMPLATE, best_attribute_row, score_row
from medsae.interp.sampling import EXPLAIN, SIMULATE, purpose_seed
from medsae.interp.scorers.metrics import score_simulation
from medsae.interp.scorers.simulator import RULE


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


def best_attribute_tables(
    latent: int, data: AgentData, spec: InterpretSpec, sae_key: str, summarize_key: str
) -> Tables:
    """The best-attribute baseline of one latent: its explanation row and its scores (none without a term)."""
    rows: Tables = {"explanations": [], "explanation_scores": []}
    info = json.loads(data.summaries.get(latent) or "{}").get("best_attribute")
    if not info:
        return rows
    term = Term.from_key(info["term"])
    eset = data.sets[(latent, SIMULATE)]
    explain_set_id = data.sets[(latent, EXPLAIN)].set_id
    row = best_attribute_row(latent, term.key, info.get("r_explain"), explain_set_id, sae_key, summarize_key)
    rows["explanations"].append(row)
    scorer = {"model": RULE_MODEL, "mode": RULE, "template_hash": RULE_TEMPLATE}
    pred = rule_predictions(term, eset.slice_ids, data.attrs, data.structures)
    seed = purpose_seed(int(spec.seed), sae_key, latent, "bootstrap")
    for score in score_simulation(pred, eset.activations, int(spec.bootstrap), int(spec.permutations), seed):
        rows["explanation_scores"].append(score_row(row["explanation_id"], eset.set_id, score, scorer, spec))
    return rows
