"""The figures of one agent run: its counts (``summary.json``), its stage metrics and its closing line.

Degenerate scores (:mod:`medsae.interp.scorers.sanity`) are counted but left out of every mean.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pandas as pd

from medsae.interp import hygiene
from medsae.interp.journal import Tables
from medsae.interp.llm import LLMGateway
from medsae.interp.rows import EXPLANATION
from medsae.interp.scorers.metrics import summarize_values
from medsae.interp.scorers.sanity import scorer_gaps
from medsae.interp.scorers.simulator import RULE
from medsae.stage import Metric

_JOB_METHODS = ("pearson", "detection_bacc")  # one row per simulation / detection job


def run_summary(
    tables: Tables, chosen: list[int], done: set[int], gateway: LLMGateway, n_repairs: int
) -> dict[str, Any]:
    """Counts of a run over the ``chosen`` latents (``done``: those finished): explanations by status,
    failed calls, missing, repaired and degenerate predictions, calls, cost, pearson per kind."""
    kinds = {r["explanation_id"]: r["kind"] for r in tables["explanations"]}
    by_kind: dict[str, list[float | None]] = {}
    jobs = [r for r in tables["explanation_scores"] if r["method"] in _JOB_METHODS and r["scorer_mode"] != RULE]
    for r in tables["explanation_scores"]:
        if r["method"] == "pearson" and not r.get("degenerate"):
            by_kind.setdefault(kinds.get(r["explanation_id"], "?"), []).append(r["value"])
    wanted = set(chosen)
    explained = [r for r in tables["explanations"] if r["kind"] == EXPLANATION and r["latent"] in wanted]
    status = [r["status"] for r in explained]
    return {
        "latents": len(chosen),
        "done": len(done & wanted),
        "explained": status.count(hygiene.OK),
        "parse_failed": status.count(hygiene.PARSE_FAILED),
        "too_long": status.count(hygiene.TOO_LONG),
        "repetitive": status.count(hygiene.REPETITIVE),
        "call_failures": len(chosen) - len(explained),  # latents whose explain call failed
        "failed_calls": gateway.n_failed,
        "failed_attempts": gateway.n_failed_attempts,
        "missing_predictions": int(sum(r["n_missing"] or 0 for r in jobs)),
        "repaired_predictions": int(sum(r.get("n_repaired") or 0 for r in jobs)),
        "repair_calls": n_repairs,
        "degenerate_scores": int(sum(bool(r.get("degenerate")) for r in jobs)),
        "no_logprobs_batches": int(sum(json.loads(r["extra_json"] or "{}").get("n_no_logprobs", 0) for r in jobs)),
        "scores": len(jobs),
        "llm_calls": gateway.n_calls,
        "cache_hits": gateway.n_cache_hits,
        "cost_usd": round(gateway.total_cost_usd, 6),
        "pearson": {k: summarize_values(np.array(v, dtype=float)) for k, v in sorted(by_kind.items())},
    }


def run_metrics(tables: Tables, seed: int) -> list[Metric]:
    """Mean of every score method per (kind, explainer), and the real-vs-shuffled gap per scorer."""
    kinds = {r["explanation_id"]: (r["kind"], r["explainer_model"]) for r in tables["explanations"]}
    groups: dict[tuple[str, str, str], list[float | None]] = {}
    degenerate: dict[tuple[str, str, str], int] = {}
    for r in tables["explanation_scores"]:
        kind, model = kinds.get(r["explanation_id"], ("?", "?"))
        key = (r["method"], kind, model)
        groups.setdefault(key, [])
        if r.get("degenerate"):
            degenerate[key] = degenerate.get(key, 0) + 1  # left out of the headline mean
        else:
            groups[key].append(r["value"])
    out = []
    for (method, kind, model), values in sorted(groups.items()):
        agg = summarize_values(np.array(values, dtype=float))
        extra = {k: v for k, v in agg.items() if k not in ("mean", "n")}
        extra["n_degenerate"] = degenerate.get((method, kind, model), 0)
        out.append(
            Metric(
                name=f"explanation_{method}_mean",
                value=agg["mean"],
                n=agg["n"],
                target=f"{kind}:{model}",
                extra=extra,
            )
        )
    for gap in scorer_gaps(_score_frame(tables), seed=seed):
        out.append(
            Metric(
                name="shuffled_gap_pearson",
                value=gap["gap"],
                n=gap["n_latents"],
                target=f"{gap['scorer']}:{gap['explainer']}",
                extra={k: gap[k] for k in ("ci_low", "ci_high", "n_degenerate", "tells_apart", "words")},
            )
        )
    return out


def summary_line(summary: dict[str, Any]) -> str:
    """The closing line of a run: what finished and what went wrong, in counts."""
    rejected = summary.get("too_long", 0) + summary.get("repetitive", 0)
    return (
        f"latents done {summary.get('done', 0)}/{summary['latents']} · parse failures {summary['parse_failed']} · "
        f"rejected explanations {rejected} · failed calls {summary.get('failed_calls', 0)} "
        f"(retried attempts {summary.get('failed_attempts', 0)}) · missing predictions "
        f"{summary.get('missing_predictions', 0)} · degenerate scores {summary.get('degenerate_scores', 0)}"
        f"/{summary.get('scores', 0)}"
    )


def _score_frame(tables: Tables) -> pd.DataFrame:
    """Score rows joined with their explanation's latent, kind and model (for :func:`scorer_gaps`)."""
    expl = {r["explanation_id"]: r for r in tables["explanations"]}
    rows = []
    for s in tables["explanation_scores"]:
        e = expl.get(s["explanation_id"])
        if e is None:
            continue
        rows.append(
            {
                "latent": e["latent"],
                "explainer_model": e["explainer_model"],
                "kind": e["kind"],
                "scorer_model": s["scorer_model"],
                "scorer_mode": s["scorer_mode"],
                "method": s["method"],
                "value": s["value"],
                "degenerate": bool(s.get("degenerate")),
            }
        )
    return pd.DataFrame(rows)
