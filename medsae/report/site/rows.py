"""What the explorer shows, computed from frames read out of the registry (no rendering here).

* :func:`index_rows` - one row per latent for the index table (``latents.json``).
* :func:`headline` - the explanation a latent page leads with: the LLM explanation with the best
  headline score, with its CI and chance level.
* :func:`headline_metrics` - the experiment's key metrics with a better/worse hint each.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from medsae.report.names import EXPLANATION_KIND, HEADLINE_SCORE, KEY_METRICS

#: Columns of the index table, in order (also the keys of every ``latents.json`` row).
INDEX_COLUMNS = (
    "latent",
    "frequency",
    "n_active",
    "n_patients",
    "max_act",
    "status",
    "score",
    "structure",
    "explanation",
    "explainer",
)

#: Which way is better for each key metric column (``medsae.report.names.KEY_METRICS``); absent: no hint.
BETTER: dict[str, str] = {
    "fvu": "lower",
    "r2_study": "higher",
    "dead_fraction": "lower",
    "probe_auc_dense": "higher",
    "probe_auc_sparse": "higher",
    "recovery_10": "higher",
    "mono_config": "higher",
    "retrieval_precision": "higher",
    "explanation_score": "higher",
}
#: Hints for metrics where neither direction is simply better.
NEUTRAL: dict[str, str] = {"l0": "a sparsity budget: lower is sparser, higher reconstructs better"}


def clean(value: Any) -> Any:
    """JSON-safe scalar: numpy to Python, NaN to None."""
    if value is None:
        return None
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def headline_scores(scores: pd.DataFrame) -> pd.DataFrame:
    """The best headline-method score row per latent over LLM explanations (baselines excluded)."""
    if scores.empty:
        return pd.DataFrame(columns=["latent", "explanation_id", "value", "ci_low", "ci_high", "chance"])
    sel = scores[(scores["method"] == HEADLINE_SCORE) & (scores["kind"] == EXPLANATION_KIND)].dropna(subset=["value"])
    sel = sel.sort_values(["latent", "value", "explanation_id"], ascending=[True, False, True])
    return sel.drop_duplicates("latent", keep="first").set_index("latent", drop=False)


def headline_texts(explanations: pd.DataFrame, best: pd.DataFrame) -> dict[int, tuple[str, str, str]]:
    """latent -> (explanation_id, text, explainer model) of the explanation a page leads with.

    The best-scored LLM explanation; unscored latents fall back to their latest LLM explanation.
    """
    if explanations.empty:
        return {}
    llm = explanations[(explanations["kind"].fillna(EXPLANATION_KIND) == EXPLANATION_KIND)]
    llm = llm[llm["text"].notna()]
    by_id = {
        eid: (text, model)
        for eid, text, model in zip(llm["explanation_id"], llm["text"], llm["explainer_model"], strict=True)
    }
    out: dict[int, tuple[str, str, str]] = {}
    for latent, eid in zip(llm["latent"], llm["explanation_id"], strict=True):  # by created_at: the latest wins
        out[int(latent)] = (eid, *by_id[eid])
    for latent, eid in zip(best.get("latent", []), best.get("explanation_id", []), strict=True):
        if eid in by_id:
            out[int(latent)] = (eid, *by_id[eid])
    return out


def headlines(explanations: pd.DataFrame, scores: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    """:func:`headline_scores` and :func:`headline_texts` (computed once per build, read by every view)."""
    best = headline_scores(scores)
    return best, headline_texts(explanations, best)


def index_rows(
    latents: pd.DataFrame, best: pd.DataFrame, texts: dict[int, tuple[str, str, str]], structures: dict[int, str]
) -> list[dict[str, Any]]:
    """One row per latent of the ``latents`` table (ascending id), keyed by :data:`INDEX_COLUMNS`; ``best``
    and ``texts``: the experiment's :func:`headlines`."""
    if latents.empty:
        return []
    rows = []
    for rec in latents.to_dict("records"):
        latent = int(rec["latent"])
        _, text, model = texts.get(latent, (None, None, None))
        rows.append(
            {
                "latent": latent,
                "frequency": clean(rec.get("frequency")),
                "n_active": clean(rec.get("n_active")),
                "n_patients": clean(rec.get("n_patients")),
                "max_act": clean(rec.get("max_act")),
                "status": clean(rec.get("status")),
                "score": clean(best.loc[latent, "value"]) if latent in best.index else None,
                "structure": structures.get(latent),
                "explanation": text,
                "explainer": model,
            }
        )
    return rows


def headline(best: pd.DataFrame, texts: dict[int, tuple[str, str, str]], latent: int) -> dict[str, Any] | None:
    """The latent's lead explanation: text, model, score, CI and chance (None without an LLM explanation).

    ``best`` and ``texts`` are :func:`headline_scores` and :func:`headline_texts` of the whole experiment.
    """
    if latent not in texts:
        return None
    eid, text, model = texts[latent]
    out: dict[str, Any] = {"text": text, "model": model, "method": HEADLINE_SCORE, "score": None}
    if latent in best.index and best.loc[latent, "explanation_id"] == eid:
        row = best.loc[latent]
        out.update(
            score=clean(row["value"]),
            ci_low=clean(row.get("ci_low")),
            ci_high=clean(row.get("ci_high")),
            chance=clean(row.get("chance")),
        )
    return out


def headline_metrics(compare_row: dict[str, Any], labels: dict[str, str]) -> list[dict[str, Any]]:
    """The key metrics present in ``compare_row`` (one ``compare_experiments`` row), each with its hint."""
    out = []
    for k in KEY_METRICS:
        value = clean(compare_row.get(k.column))
        if value is None:
            continue
        direction = BETTER.get(k.column)
        hint = f"{direction} is better" if direction else NEUTRAL.get(k.column, "")
        out.append(
            {
                "column": k.column,
                "label": labels.get(k.column, k.label or k.column),
                "value": value,
                "hint": hint,
                "split": k.split or "",
            }
        )
    return out
