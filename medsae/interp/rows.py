"""Registry rows of the agent: explanations (and baselines) and their scores, content-addressed.

An explanation's id hashes (latent, SAE key, explainer model, API base, template hash, explainer
params, example set, request hash); a score's id hashes (explanation id, method, the scorer's
identity, the example set, the scorer's request hashes, bootstrap and permutation counts). So a
rerun yields the same ids (inserted with INSERT OR IGNORE: nothing new), and a new explainer or
scorer adds rows beside the old ones. Every explanation and score row is built here, nowhere else
(the ``mask_match`` rule's too: its id hashes the explanation and the structure it was checked against).
"""

from __future__ import annotations

import json
from typing import Any

from medsae.interp.config import InterpretSpec
from medsae.interp.sampling import sha256_json
from medsae.interp.scorers.metrics import Score

EXPLANATION, SHUFFLED, BEST_ATTRIBUTE = "explanation", "shuffled", "best_attribute"
#: Explainer (and scorer) name and template of the best-attribute rule (:mod:`medsae.interp.baselines.best_attribute`).
RULE_MODEL = "rule"
RULE_TEMPLATE = "rule:best_attribute/v1"
#: Score method and scorer identity of the check against the masks (no LLM: mode ``rule``).
MASK_MATCH = "mask_match"
MASK_MATCH_SCORER = {"model": RULE_MODEL, "mode": "rule", "rule": "mask_match/v1"}


def as_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def explanation_row(
    *,
    latent: int,
    sae_key: str,
    summarize_key: str,
    model: str,
    api_base: str | None,
    template_hash: str,
    settings: dict[str, Any],
    set_id: str,
    request_hash: str,
    text: str | None,
    status: str,
    n_examples: int,
) -> dict[str, Any]:
    """One LLM explanation (any status: ok, too_long, repetitive, parse_failed)."""
    ident = {
        "latent": latent,
        "sae_key": sae_key,
        "explainer_model": model,
        "api_base": api_base,
        "template_hash": template_hash,
        "params": settings,
        "example_set_id": set_id,
        "candidate": 0,
        "request_hash": request_hash,  # everything the request held, incl. the examples shown
    }
    return {
        "explanation_id": sha256_json(ident),
        "stage_key": summarize_key,
        "sae_key": sae_key,
        "latent": latent,
        "explainer_model": model,
        "template_hash": template_hash,
        "params_json": as_json(settings | {"api_base": api_base}),
        "example_set_id": set_id,
        "text": text,
        "status": status,
        "kind": EXPLANATION,
        "request_hash": request_hash,
        "n_examples": n_examples,
    }


def shuffled_row(latent: int, donor_row: dict, donor: int, sae_key: str, summarize_key: str) -> dict:
    """The shuffled baseline: latent ``latent`` simulated with latent ``donor``'s explanation."""
    ident = {"kind": SHUFFLED, "latent": latent, "sae_key": sae_key, "donor": donor_row["explanation_id"]}
    return {
        "explanation_id": sha256_json(ident),
        "stage_key": summarize_key,
        "sae_key": sae_key,
        "latent": latent,
        "explainer_model": donor_row["explainer_model"],
        "template_hash": donor_row["template_hash"],
        "params_json": as_json({"donor_latent": donor, "donor_explanation_id": donor_row["explanation_id"]}),
        "example_set_id": donor_row["example_set_id"],
        "text": donor_row["text"],
        "status": "baseline",
        "kind": SHUFFLED,
        "request_hash": donor_row["request_hash"],
        "n_examples": None,
    }


def best_attribute_row(latent: int, term_key: str, r_explain: Any, set_id: str, sae_key: str, summarize_key: str):
    """The best single attribute, applied as a rule (no LLM)."""
    ident = {
        "kind": BEST_ATTRIBUTE,
        "latent": latent,
        "sae_key": sae_key,
        "term": term_key,
        "example_set_id": set_id,
    }
    return {
        "explanation_id": sha256_json(ident),
        "stage_key": summarize_key,
        "sae_key": sae_key,
        "latent": latent,
        "explainer_model": RULE_MODEL,
        "template_hash": RULE_TEMPLATE,
        "params_json": as_json({"term": term_key, "r_explain": r_explain}),
        "example_set_id": set_id,
        "text": term_key,
        "status": "baseline",
        "kind": BEST_ATTRIBUTE,
        "request_hash": None,
        "n_examples": None,
    }


def score_row(
    expl_id: str,
    set_id: str,
    score: Score,
    scorer: dict,
    spec: InterpretSpec,
    extra: dict | None = None,
    requests: str = "",
    n_repaired: int | None = None,
    degenerate: bool | None = None,
) -> dict:
    """One row of ``explanation_scores``."""
    ident = {
        "requests": requests,  # digest of the scorer's request hashes (empty for rule scores)
        "explanation_id": expl_id,
        "method": score.method,
        "scorer": scorer,
        "example_set_id": set_id,
        "bootstrap": int(spec.bootstrap),
        "permutations": int(spec.permutations),
    }
    extra = score.extra | (extra or {})
    return _score_fields(sha256_json(ident), expl_id, set_id, score, scorer, extra, n_repaired, degenerate)


def mask_match_row(explanation: dict, value: float, structure: str, phrase: str | None, ground_key: str) -> dict:
    """The ``mask_match`` row of one explanation (:mod:`medsae.interp.mask_match`): a rule, no LLM.

    Its id hashes the explanation, the method, the rule and the structure checked, so a new best
    structure adds a row and the same one adds nothing.
    """
    expl_id = explanation["explanation_id"]
    ident = {"explanation_id": expl_id, "method": MASK_MATCH, "scorer": MASK_MATCH_SCORER, "structure": structure}
    extra = {"structure": structure, "phrase": phrase, "ground_key": ground_key}
    score = Score(MASK_MATCH, value, n=1)
    return _score_fields(sha256_json(ident), expl_id, explanation["example_set_id"], score, MASK_MATCH_SCORER, extra)


def _score_fields(
    score_id: str,
    expl_id: str,
    set_id: str,
    score: Score,
    scorer: dict,
    extra: dict,
    n_repaired: int | None = None,
    degenerate: bool | None = None,
) -> dict:
    return {
        "score_id": score_id,
        "explanation_id": expl_id,
        "method": score.method,
        "scorer_model": scorer["model"],
        "scorer_mode": scorer["mode"],
        "example_set_id": set_id,
        "value": score.value,
        "n": score.n,
        "n_missing": score.n_missing,
        "chance": score.chance,
        "ci_low": score.ci_low,
        "ci_high": score.ci_high,
        "p_value": score.p_value,
        "extra_json": as_json(extra) if extra else None,
        "n_repaired": n_repaired,
        "degenerate": degenerate,
    }
