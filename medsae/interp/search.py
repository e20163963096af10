"""Language-driven retrieval (docs/method.md#language-retrieval), measured instead of eyeballed.

1. Candidate latents: the experiment's explanations (kind ``explanation``, status ``ok``: never a
   too long, repetitive or unparsed one) whose headline score is at least ``min_score`` (the study
   used "ranked first or second"), degenerate scores not counted; the best explanation per latent.
2. An LLM (template ``search_v1``) picks ``n_latents`` descriptions that match the query; the
   descriptions are numbered 1..M so latent ids never appear in the prompt.
3. Query fingerprint: zeros except the chosen latents' mean firing activation; slices (of the
   ``test`` split, else every slice) ranked by cosine similarity of their codes on those latents,
   one slice per scan, top ``k``.
4. Precision@k against metadata: a query's criteria (kind -> accepted values) say which slices
   are right answers; precision is the share of returned slices that are (fewer than k are
   returned when the split has fewer scans; ``n`` records how many). The built-in
   :data:`QUERIES` are the study's twelve with criteria; for any other query the criteria are the
   legend values it names. Stored as ``metrics`` rows.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from medsae.errors import MedsaeError
from medsae.interp.experiment import experiment_inputs, interpret_spec
from medsae.interp.inputs import load_slice_tables
from medsae.interp.llm import LLMGateway, LLMRequest
from medsae.interp.llm.cache import cache_dir_for
from medsae.interp.metadata import legend_lines, mentioned, parse_legend, slice_attributes
from medsae.interp.prompts import load_template


@dataclass(frozen=True)
class Query:
    """A query and what a right answer looks like (kind -> accepted values)."""

    name: str
    text: str
    criteria: dict[str, tuple[str, ...]]


QUERIES: tuple[Query, ...] = (
    Query(
        "ct_thorax_coronal",
        "Coronal CT of the thorax and rib cage",
        {"modality": ("ct",), "plane": ("coronal",), "region": ("thorax",)},
    ),
    Query(
        "ct_spine_sagittal",
        "Sagittal CT of the thoracolumbar spine and spinal canal",
        {"modality": ("ct",), "plane": ("sagittal",)},
    ),
    Query(
        "ct_lumbar_axial",
        "Axial CT of the lumbar spine and spinal canal",
        {"modality": ("ct",), "plane": ("axial",)},
    ),
    Query(
        "ct_pelvis_coronal",
        "Coronal CT of the bony pelvis and lumbar spine",
        {"modality": ("ct",), "plane": ("coronal",), "region": ("pelvis",)},
    ),
    Query(
        "ct_abdomen_pelvis_coronal",
        "Coronal CT of the abdomen and pelvis",
        {"modality": ("ct",), "plane": ("coronal",), "region": ("abdomen", "pelvis")},
    ),
    Query(
        "ct_skull_axial",
        "Axial CT of the skull and brain",
        {"modality": ("ct",), "plane": ("axial",), "region": ("head",)},
    ),
    Query(
        "ct_female_pelvis",
        "Axial CT of the female pelvis",
        {"modality": ("ct",), "plane": ("axial",), "region": ("pelvis",), "sex": ("female",)},
    ),
    Query(
        "ct_male_pelvis",
        "Axial CT of the male pelvis",
        {"modality": ("ct",), "plane": ("axial",), "region": ("pelvis",), "sex": ("male",)},
    ),
    Query(
        "ct_thorax_female",
        "Axial CT of the thorax and mediastinum in a female patient",
        {"modality": ("ct",), "plane": ("axial",), "region": ("thorax",), "sex": ("female",)},
    ),
    Query(
        "ct_thorax_male",
        "Axial CT of the thorax and mediastinum in a male patient",
        {"modality": ("ct",), "plane": ("axial",), "region": ("thorax",), "sex": ("male",)},
    ),
    Query(
        "ct_abdomen_elderly",
        "Axial CT of the abdomen and retroperitoneum in an elderly patient",
        {"modality": ("ct",), "plane": ("axial",), "region": ("abdomen",), "age": ("60-80", ">=80")},
    ),
    Query(
        "mri_pelvis",
        "Axial MRI of the pelvis",
        {"modality": ("mri",), "plane": ("axial",), "region": ("pelvis",)},
    ),
)


def criteria_from_text(text: str, legend: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """Criteria of an ad-hoc query: the legend values it names, grouped by kind."""
    out: dict[str, list[str]] = {}
    for term in mentioned(text, parse_legend("\n".join(legend))):
        out.setdefault(term.kind, []).append(term.value)
    return {k: tuple(v) for k, v in out.items()}


def candidate_explanations(
    registry: Any, summarize_key: str, min_score: float, explainer: str | None = None
) -> pd.DataFrame:
    """Best ok explanation per latent with headline score >= ``min_score`` (columns latent, text, score).

    A degenerate score (its predictions ignore the explanation) does not qualify an explanation.
    """
    rows = registry.query(
        """SELECT e.latent, e.text, e.explainer_model, max(s.value) AS score
           FROM explanations e JOIN explanation_scores s USING (explanation_id)
           WHERE e.stage_key = ? AND e.kind = 'explanation' AND e.status = 'ok'
             AND s.method = 'pearson' AND s.value >= ? AND (? IS NULL OR e.explainer_model = ?)
             AND coalesce(s.extra_json, '') NOT LIKE '%"degenerate":%'
           GROUP BY ALL ORDER BY e.latent, score DESC""",
        [summarize_key, min_score, explainer, explainer],
    )
    frame = pd.DataFrame(rows, columns=["latent", "text", "explainer_model", "score"])
    return frame.drop_duplicates("latent").reset_index(drop=True)


def parse_indices(text: str | None, n_candidates: int, n: int) -> list[int] | None:
    """1-based numbers from ``{"feature_indices": [...]}``; None unless exactly ``n`` distinct valid ones."""
    if not text:
        return None
    m = re.search(r"\{.*\}", text, re.DOTALL)
    try:
        data = json.loads(m.group(0)) if m else None
    except json.JSONDecodeError:
        return None
    values = data.get("feature_indices") if isinstance(data, dict) else None
    if not isinstance(values, list) or len(values) != n:
        return None
    if not all(isinstance(v, int) and 1 <= v <= n_candidates for v in values) or len(set(values)) != n:
        return None
    return [int(v) for v in values]


def match_latents(
    gateway: Any,
    model: str,
    template: Any,
    legend: list[str],
    query: str,
    candidates: pd.DataFrame,
    n: int,
    attempts: int = 3,
    api_base: str | None = None,
) -> list[int]:
    """The latents an LLM picks for ``query`` (up to ``attempts`` deterministic tries)."""
    descriptions = [{"number": i + 1, "text": t} for i, t in enumerate(candidates["text"])]
    messages = template.render(query=query, descriptions=descriptions, legend=legend, n=n)
    for attempt in range(attempts):
        req = LLMRequest(
            model=model,
            messages=messages,
            temperature=0.1 if attempt == 0 else 0.0,
            max_tokens=300,
            seed=attempt,
            template_hash=template.hash,
            api_base=api_base,
        )
        resp = gateway.complete_many([req])[0]
        if resp.error:
            raise MedsaeError(f"search: the LLM call failed: {resp.error}")
        picked = parse_indices(resp.text, len(candidates), n)
        if picked is not None:
            return [int(candidates["latent"].iloc[i - 1]) for i in picked]
    raise MedsaeError(f"search: {model} gave no valid answer with {n} description numbers in {attempts} tries")


def rank_slices(
    codes: sp.csr_matrix,
    code_slice_ids: np.ndarray,
    slices: pd.DataFrame,
    latents: list[int],
    weights: np.ndarray,
    k: int,
    split: str = "test",
) -> pd.DataFrame:
    """Top ``k`` slices (one per scan) by cosine similarity of their codes on ``latents`` to ``weights``."""
    meta = slices.set_index("slice_id", drop=False).loc[np.asarray(code_slice_ids)]
    rows = np.flatnonzero(meta["split"].to_numpy() == split)
    if len(rows) == 0:
        rows = np.arange(len(meta))
    sub = np.asarray(sp.csr_matrix(codes)[rows][:, latents].todense(), dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    norms = np.linalg.norm(sub, axis=1) * np.linalg.norm(w)
    with np.errstate(invalid="ignore", divide="ignore"):
        sim = np.where(norms > 0, sub @ w / norms, -1.0)
    found = meta.iloc[rows].reset_index(drop=True).assign(similarity=sim)
    found = found.sort_values(["similarity", "slice_id"], ascending=[False, True], kind="stable")
    scan = found["modality"].astype(str) + "/" + found["image_id"].astype(str)
    found = found[~scan.duplicated()]
    return found[found["similarity"] > 0].head(k)


def precision(
    found: pd.DataFrame, structures: pd.DataFrame, criteria: dict[str, tuple[str, ...]]
) -> dict[str, float | None]:
    """Share of the returned slices meeting every criterion (``all``) and each criterion kind.

    The denominator is the number returned (at most k; fewer when the split has fewer scans, since
    one slice per scan is returned), which the metric rows record as ``n``.
    """
    if not criteria or len(found) == 0:
        return {"all": None}
    attrs = slice_attributes(found)
    ok_all = np.ones(len(found), dtype=bool)
    out: dict[str, float | None] = {}
    for kind, values in criteria.items():
        if kind == "structure":
            wanted = structures["structure"].str.lower().isin([v.lower() for v in values])
            hit = found["slice_id"].isin(structures.loc[wanted, "slice_id"]).to_numpy()
        else:
            hit = attrs[kind].isin(list(values)).to_numpy()
        out[kind] = float(hit.mean())
        ok_all &= hit
    out["all"] = float(ok_all.mean())
    return out


def run_search(
    registry: Any,
    name: str,
    query: str,
    model: str | None = None,
    k: int = 10,
    n_latents: int = 3,
    min_score: float = 0.3,
    explainer: str | None = None,
    criteria: dict[str, tuple[str, ...]] | None = None,
    gateway: Any = None,
) -> dict[str, Any]:
    """Answer one query for experiment ``name``; returns chosen latents, slices and precision@k."""
    from medsae.sae.codes import load_codes

    exp = experiment_inputs(registry, name)
    spec = interpret_spec(exp)
    model = model or spec.scorer_model
    if gateway is None:
        gateway = LLMGateway(cache_dir_for(exp.summarize_dir.parent.parent), mode=spec.llm_mode)
    gateway.check_model(model)  # fail fast: unknown provider or missing key, before any work
    candidates = candidate_explanations(registry, exp.summarize_key, min_score, explainer)
    if len(candidates) < n_latents:
        raise MedsaeError(
            f"search: {len(candidates)} explanation(s) of '{name}' score >= {min_score}; need {n_latents} "
            "(run `medsae explain run` or lower --min-score)"
        )
    slices, structures, vocab = load_slice_tables(exp.slices_dir)
    legend = legend_lines(slice_attributes(slices), vocab)
    template = load_template("search_v1")
    latents = match_latents(gateway, model, template, legend, query, candidates, n_latents)
    stats = pd.read_parquet(exp.summarize_dir / "latents.parquet").set_index("latent")
    weights = stats.loc[latents, "mean_act"].to_numpy(dtype=float)
    encode_dir = _stage_dir(registry, exp.experiment_id, name, "encode")
    codes, code_ids = load_codes(encode_dir)
    found = rank_slices(codes, code_ids, slices.reset_index(drop=True), latents, weights, k)
    crit = dict(criteria) if criteria is not None else criteria_from_text(query, legend)
    prec = precision(found, structures, crit)
    chosen = candidates.set_index("latent").loc[latents]
    return {
        "query": query,
        "model": model,
        "latents": [
            {"latent": int(lat), "text": chosen.loc[lat, "text"], "score": float(chosen.loc[lat, "score"])}
            for lat in latents
        ],
        "slices": found[["slice_id", "slice_uid", "modality", "plane", "body_region", "sex", "similarity"]].to_dict(
            "records"
        ),
        "criteria": {key: list(v) for key, v in crit.items()},
        "precision": prec,
        "k": k,
        "n_found": len(found),
        "summarize_key": exp.summarize_key,
    }


def _stage_dir(registry: Any, experiment_id: str, name: str, kind: str) -> Any:
    from medsae.registry import queries

    return queries.stage_folder(registry, {"experiment_id": experiment_id, "name": name}, kind)


def metric_rows(result: dict[str, Any], name: str) -> list[dict[str, Any]]:
    """``metrics`` rows (stage_key = the summarize stage) for one query's precision@k."""
    rows = []
    for kind, value in result["precision"].items():
        if value is None:
            continue
        metric = "search_precision" if kind == "all" else f"search_precision_{kind}"
        rows.append(
            {
                "stage_key": result["summarize_key"],
                "split": "test",
                "name": metric,
                "value": value,
                "n": result["n_found"],
                "target": name,
                "n_features": len(result["latents"]),
                "extra_json": json.dumps(
                    {
                        "model": result["model"],
                        "query": result["query"],
                        "latents": [x["latent"] for x in result["latents"]],
                    },
                    sort_keys=True,
                ),
            }
        )
    return rows


def store_metrics(registry: Any, rows: list[dict[str, Any]]) -> int:
    """Insert metric rows not already present (same stage, name, target, extra, value, n).

    A rerun with the same outcome adds nothing; a changed outcome adds a row beside the old one.
    """
    from medsae.registry.db import insert_rows

    new = []
    with registry.write() as con:
        for r in rows:
            exists = con.execute(
                "SELECT count(*) FROM metrics WHERE stage_key = ? AND name = ? AND target = ? "
                "AND extra_json = ? AND value = ? AND n = ?",
                [r["stage_key"], r["name"], r["target"], r["extra_json"], r["value"], r["n"]],
            ).fetchall()[0][0]
            if not exists:
                new.append(r)
        insert_rows(con, "metrics", new)
    return len(new)


__all__ = ["QUERIES", "Query", "criteria_from_text", "precision", "rank_slices", "run_search"]
