"""A registered experiment's interpretation: explain it again, compare explainers, show one latent.

These are the library side of ``medsae explain run|compare|show``: they find an experiment's
summarize / slices stage folders through the registry's read layer (:mod:`medsae.registry.queries`),
run the agent with another explainer or scorer, and write the rows straight into the registry
as latents finish (small batches, one short transaction each), so a killed run keeps what it
finished. Ids are content hashes, so rows that exist already are skipped
(INSERT OR IGNORE): a rerun adds nothing and makes no LLM call for what is in the cache, a new
model adds its own rows. On an experiment with a ground stage, ``explain run`` also scores every
explanation of the experiment against the masks (``mask_match``, :mod:`medsae.interp.mask_match`).

``compare`` and ``show`` read the rows of the experiment's own summarize stage (its example
sets), not those of other experiments that happen to share the SAE. Degenerate scores (see
:mod:`medsae.interp.scorers.sanity`) stay visible but are left out of the means.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medsae.errors import MedsaeError, MissingInputError
from medsae.interp.agent import make_agent
from medsae.interp.config import InterpretSpec
from medsae.interp.explainer import explain_examples
from medsae.interp.inputs import AgentInputs, load_slice_tables
from medsae.interp.journal import RegistrySink, insert_results
from medsae.interp.llm.cache import cache_dir_for
from medsae.interp.mask_match import Grounding, mask_match_rows, mask_match_summary
from medsae.interp.metadata import format_lines
from medsae.interp.scorers import sanity
from medsae.interp.scorers.metrics import summarize_values
from medsae.registry import queries
from medsae.registry.db import Registry

HEADLINE_METHODS = (
    "pearson",
    "spearman",
    "auroc",
    "detection_bacc",
    "ranking_top2",
    "ranking_study_top2",
    "mask_match",  # the explanation names the latent's best-grounded structure (experiments with ground)
)


@dataclass
class ExperimentInputs:
    """Where one experiment's agent inputs are."""

    name: str
    experiment_id: str
    summarize_dir: Path
    slices_dir: Path
    summarize_key: str
    sae_key: str
    interpret_section: dict[str, Any]  # the stored spec's interpret section, as written
    ground_key: str | None = None  # the experiment's ground stage (None: no ground stage)


def experiment_inputs(registry: Registry, name: str) -> ExperimentInputs:
    """Locate the summarize and slices stages of experiment ``name`` (one-line errors if absent)."""
    exp = queries.find_experiment(registry, name)
    stages = {r["kind"]: r for r in queries.experiment_stages(registry, exp["experiment_id"])}
    dirs = {kind: queries.stage_folder(registry, exp, kind) for kind in ("summarize", "slices")}
    spec = json.loads(exp["spec_json"])
    latents = pd.read_parquet(dirs["summarize"] / "latents.parquet", columns=["sae_key"])
    sae_key = str(latents["sae_key"].iloc[0]) if len(latents) else stages.get("train", {}).get("stage_key", "")
    return ExperimentInputs(
        name=name,
        experiment_id=exp["experiment_id"],
        summarize_dir=dirs["summarize"],
        slices_dir=dirs["slices"],
        summarize_key=stages["summarize"]["stage_key"],
        sae_key=sae_key,
        interpret_section=dict(spec.get("interpret") or {}),
        ground_key=stages.get("ground", {}).get("stage_key"),
    )


def interpret_spec(exp: ExperimentInputs, overrides: dict[str, Any] | None = None) -> InterpretSpec:
    """The experiment's interpret section with defaults filled and ``overrides`` applied.

    One-line error when the stored section no longer validates or an override is out of range.
    """
    from pydantic import ValidationError

    try:
        return InterpretSpec.model_validate(exp.interpret_section | (overrides or {}))
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise MedsaeError(f"experiment '{exp.name}': interpret section invalid at {where}: {first['msg']}") from None


def parse_latents(text: str | None) -> list[int] | None:
    """``"1,2,5-7"`` -> [1, 2, 5, 6, 7]; None stays None."""
    if text is None or not text.strip():
        return None
    out: list[int] = []
    try:
        for part in text.split(","):
            part = part.strip()
            if "-" in part:
                lo, hi = part.split("-", 1)
                out.extend(range(int(lo), int(hi) + 1))
            elif part:
                out.append(int(part))
    except ValueError:
        raise MedsaeError(f"--latents {text!r}: expected comma-separated integers or ranges like 3-7") from None
    return out


def explain_experiment(
    registry: Registry,
    name: str,
    model: str,
    scorer: str | None = None,
    latents: Sequence[int] | None = None,
    template: str | None = None,
    concurrency: int | None = None,
    max_cost_usd: float | None = None,
    api_base: str | None = None,
    scorer_api_base: str | None = None,
    mode: str | None = None,
    timeout_s: float | None = None,
    max_retries: int | None = None,
) -> dict[str, Any]:
    """Explain (and score with the reference scorer) the experiment's latents with ``model``.

    Rows reach the registry as latents finish; the returned summary counts the new rows.
    """
    exp = experiment_inputs(registry, name)
    overrides: dict[str, Any] = {"explainer_model": model}
    if scorer:
        overrides["scorer_model"] = scorer
    if template:
        if not Path(template).is_file():
            raise MissingInputError(f"--template {template}: file not found")
        overrides["explainer_template"] = str(Path(template).resolve())
    for key, value in (
        ("concurrency", concurrency),
        ("max_cost_usd", max_cost_usd),
        ("explainer_api_base", api_base),
        ("scorer_api_base", scorer_api_base),
        ("llm_mode", mode),
        ("timeout_s", timeout_s),
        ("max_retries", max_retries),
    ):
        if value is not None:
            overrides[key] = value
    if latents is not None:
        overrides["max_latents"] = None
    spec = interpret_spec(exp, overrides)
    inputs = AgentInputs(exp.summarize_dir, exp.slices_dir, exp.sae_key, exp.summarize_key)
    agent = make_agent(inputs, spec, cache_dir_for(exp.summarize_dir.parent.parent))
    sink = RegistrySink(registry)
    result = agent.run(latents, sink=sink)
    new_rows = dict(sink.new_rows)
    summary = result.summary
    if exp.ground_key:
        matched = score_against_masks(registry, exp)
        new_rows["explanation_scores"] = new_rows.get("explanation_scores", 0) + matched.pop("new_rows")
        summary = summary | {"mask_match": matched}
    return summary | {"new_rows": new_rows}


def score_against_masks(registry: Registry, exp: ExperimentInputs) -> dict[str, Any]:
    """``mask_match`` rows for every explanation of the experiment (any explainer), from the registry's
    ``latent_grounding``; rows that exist are kept. Returns mean and n per kind and ``new_rows``."""
    if not exp.ground_key:
        return {"new_rows": 0}
    grounding = Grounding(exp.ground_key, queries.best_structures(registry, exp.ground_key))
    explanations = queries.stage_explanations(registry, exp.summarize_key)
    rows = mask_match_rows(explanations, grounding)
    new = insert_results(registry, {"explanation_scores": rows}).get("explanation_scores", 0) if rows else 0
    return mask_match_summary(rows, explanations) | {"new_rows": new}


# --------------------------------------------------------------------------- compare / show


def _column(registry: Registry, table: str, column: str, alias: str, default: str = "NULL") -> str:
    """``alias.column``, or ``default`` in a registry written before that column existed."""
    rows = registry.query(
        "SELECT count(*) AS n FROM duckdb_columns() WHERE table_name = ? AND column_name = ?", [table, column]
    )
    return f"{alias}.{column}" if rows and rows[0]["n"] else default


def _scores(registry: Registry, exp: ExperimentInputs) -> pd.DataFrame:
    degenerate = _column(registry, "explanation_scores", "degenerate", "s", "false")
    repaired = _column(registry, "explanation_scores", "n_repaired", "s")
    rows = registry.query(
        f"""SELECT e.latent, e.explainer_model, e.kind, e.status, s.method, s.scorer_model, s.scorer_mode,
                  s.value, s.n, s.chance, s.ci_low, s.ci_high, s.p_value,
                  coalesce({degenerate}, false) AS degenerate, {repaired} AS n_repaired
           FROM explanation_scores s JOIN explanations e USING (explanation_id)
           WHERE e.stage_key = ?""",
        [exp.summarize_key],
    )
    return pd.DataFrame(rows)


def scorer_gaps(registry: Registry, name: str) -> list[dict[str, Any]]:
    """Per scorer (and explainer): real-vs-shuffled pearson gap with its 95% CI, and a sentence."""
    exp = experiment_inputs(registry, name)
    return sanity.scorer_gaps(_scores(registry, exp))


def compare(registry: Registry, name: str, methods: Sequence[str] = HEADLINE_METHODS) -> pd.DataFrame:
    """One row per (explainer, kind, scorer, mode, method): n latents, NULLs, mean, median, shares.

    Degenerate scores are counted (``n_degenerate``) but left out of every aggregate.
    """
    exp = experiment_inputs(registry, name)
    scores = _scores(registry, exp)
    columns = [
        "explainer",
        "kind",
        "scorer",
        "mode",
        "method",
        "n",
        "n_null",
        "mean",
        "median",
        "mean_null_as_0",
        "share_ge_0.5",
        "chance",
        "n_degenerate",
    ]
    if scores.empty:
        return pd.DataFrame(columns=columns)
    scores = scores[scores["method"].isin(methods)]
    out = []
    keys = ["explainer_model", "kind", "scorer_model", "scorer_mode", "method"]
    for (model, kind, scorer, mode, method), group in scores.groupby(keys, dropna=False, sort=True):
        degenerate = group["degenerate"].fillna(False).astype(bool).to_numpy()
        agg = summarize_values(group.loc[~degenerate, "value"].to_numpy(dtype=float))
        out.append(
            {
                "explainer": model,
                "kind": kind,
                "scorer": scorer,
                "mode": mode,
                "method": method,
                "n": agg["n"],
                "n_null": agg["n_null"],
                "mean": agg["mean"],
                "median": agg["median"],
                "mean_null_as_0": agg["mean_null_as_0"],
                "share_ge_0.5": agg["share_ge_0.5"],
                "chance": group["chance"].dropna().iloc[0] if group["chance"].notna().any() else None,
                "n_degenerate": int(degenerate.sum()),
            }
        )
    frame = pd.DataFrame(out, columns=columns)
    order = {"explanation": 0, "best_attribute": 1, "shuffled": 2}
    frame["_o"] = frame["kind"].map(order).fillna(9)
    return frame.sort_values(["method", "_o", "explainer"]).drop(columns="_o").reset_index(drop=True)


def show(registry: Registry, name: str, latent: int) -> dict[str, Any]:
    """Everything about one latent: statistics, every explanation version with its scores, its slices."""
    exp = experiment_inputs(registry, name)
    stats = registry.query("SELECT * FROM latents WHERE stage_key = ? AND latent = ?", [exp.summarize_key, latent])
    if not stats:
        raw = pd.read_parquet(exp.summarize_dir / "latents.parquet")
        stats = raw[raw["latent"] == latent].to_dict("records")
    if not stats:
        raise MedsaeError(f"experiment '{name}': no latent {latent}")
    n_examples = _column(registry, "explanations", "n_examples", "e")
    explanations = registry.query(
        f"""SELECT e.explanation_id, e.explainer_model, e.kind, e.status, e.text, e.template_hash,
                  e.example_set_id, e.created_at, {n_examples} AS n_examples
           FROM explanations e WHERE e.stage_key = ? AND e.latent = ?
           ORDER BY (e.kind = 'explanation') DESC, e.created_at, e.explainer_model""",
        [exp.summarize_key, latent],
    )
    degenerate = _column(registry, "explanation_scores", "degenerate", "s", "false")
    repaired = _column(registry, "explanation_scores", "n_repaired", "s")
    scores = registry.query(
        f"""SELECT s.explanation_id, s.method, s.scorer_model, s.scorer_mode, s.value, s.n, s.n_missing,
                  s.ci_low, s.ci_high, s.p_value, coalesce({degenerate}, false) AS degenerate,
                  {repaired} AS n_repaired
           FROM explanation_scores s JOIN explanations e USING (explanation_id)
           WHERE e.stage_key = ? AND e.latent = ? ORDER BY s.method""",
        [exp.summarize_key, latent],
    )
    by_expl: dict[str, list[dict]] = {}
    for s in scores:
        by_expl.setdefault(s["explanation_id"], []).append(s)
    for e in explanations:
        e["scores"] = by_expl.get(e["explanation_id"], [])
    sets = pd.read_parquet(exp.summarize_dir / "example_sets.parquet")
    sets = sets[sets["latent"] == latent]
    shown: list[dict] = []
    explain_set = sets[sets["purpose"] == "explain"]
    if len(explain_set):
        row = explain_set.iloc[0]
        slices, structures, _ = load_slice_tables(exp.slices_dir)
        ids = np.asarray(row["slice_ids"], dtype=np.int64)
        lines = format_lines(slices, structures, ids)
        roles = dict(zip(ids.tolist(), row["roles"], strict=True))
        for ex in explain_examples(ids, row["activations"], lines):
            shown.append(ex | {"role": roles.get(ex["slice_id"]), "slice_uid": slices.loc[ex["slice_id"], "slice_uid"]})
    return {"latent": stats[0], "explanations": explanations, "examples": shown}
