"""The ``summarize`` and ``interpret`` stages (see medsae/stage.py for the contract).

``summarize`` (inputs: encode, slices, train, evaluate): per-latent statistics and example sets over
the interpretation pool -> ``latents.parquet``, ``example_sets.parquet``, ``pool.json`` and rows for
the registry tables ``latents`` and ``example_sets``. No LLM. Under ``interpret.protocol: study`` also
the study's selection and sample sets (:mod:`medsae.interp.study.summarize`), from the evaluate stage's
monosemanticity and coefficient tables.

``interpret`` (inputs: summarize, slices, encode; ground when the experiment has one): the agent of the spec's protocol
(:func:`medsae.interp.agent.make_agent`: medsae's, or the study's :mod:`medsae.interp.study.agent`) with
the spec's explainer and reference scorer -> ``explanations.parquet``, ``scores.parquet``,
``summary.json`` and rows for ``explanations``, ``explanation_scores``, ``llm_calls``, ``prompts``.
With a ground stage, every explanation also gets its ``mask_match`` score (:mod:`medsae.interp.mask_match`).
Finished latents are journalled in the stage's ``work_dir`` as they finish, so a killed stage
resumes with the latents it had not finished (the planner still writes every row at the end).
LLM answers are cached in ``$MEDSAE_LLM_CACHE`` if set, else ``<artifacts root>/llm_cache``
(the root is two levels above the summarize stage's folder ``<root>/summarize/<key>``), so that
`medsae explain run` and a forced rerun reuse every answer.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import scipy.sparse as sp

from medsae.interp.config import InterpretSpec
from medsae.interp.metadata import attribute_matrix, slice_attributes
from medsae.interp.sampling import ExampleSet, Pool, build_pool, sample_all
from medsae.interp.summary import latent_table, positive_csc
from medsae.stage import Metric, StageContext, StageResult

if TYPE_CHECKING:
    from medsae.interp.agent import AgentResult
    from medsae.interp.mask_match import Grounding

CODE_VERSION = "1"
log = logging.getLogger("medsae")


@dataclass
class SummarizeResult:
    """What the summarize stage computes (in memory; the stage writes it out)."""

    latents: pd.DataFrame
    sets: list[ExampleSet]
    pool: Pool


def summarize(
    slices: pd.DataFrame,
    presence: sp.csr_matrix,
    vocab: list[str],
    codes: sp.csr_matrix,
    code_slice_ids: np.ndarray,
    spec: InterpretSpec,
    sae_key: str,
    progress: Any = None,
) -> SummarizeResult:
    """Statistics and example sets of every latent over the interpretation pool."""
    pool = build_pool(slices, code_slice_ids, presence, spec)
    csc = positive_csc(sp.csr_matrix(codes)[pool.rows])
    meta = slices.set_index("slice_id", drop=False).loc[pool.slice_ids]
    attrs, names = attribute_matrix(slice_attributes(meta), pool.presence, vocab)
    latents = latent_table(csc, pool, attrs, names, spec, sae_key)
    eligible = latents.loc[latents["status"].isin(["live", "dense"]), "latent"].to_numpy()
    sets = sample_all(csc, pool, eligible, spec, sae_key, progress=progress)
    return SummarizeResult(latents, sets, pool)


def pool_info(pool: Pool) -> dict[str, Any]:
    return {
        "splits": pool.splits,
        "widened": pool.widened,
        "slices": int(pool.n),
        "scans": int(len(pool.scan_names)),
        "explain_scans": int(len(np.unique(pool.scan[pool.explain]))),
        "score_scans": int(len(np.unique(pool.scan[~pool.explain]))),
        "explain_slices": int(pool.explain.sum()),
        "score_slices": int((~pool.explain).sum()),
    }


def pool_warnings(pool: Pool, wanted: list[str], slices: pd.DataFrame) -> list[str]:
    """Sentences for a widened pool, an empty wanted split and an empty explain or score partition."""
    out = []
    present = set(slices["split"].dropna().astype(str)) if "split" in slices else set()
    empty = [s for s in wanted if s not in present]
    if empty:
        out.append(f"interpretation pool: split(s) {', '.join(empty)} hold no slice")
    if pool.widened:
        info = pool_info(pool)
        out.append(
            f"interpretation pool widened from {'+'.join(wanted)} to {'+'.join(pool.splits)} "
            f"({info['scans']} scans): fewer than min_pool_scans scans in {'+'.join(wanted)}"
            + (" (the pool now includes the SAE's training split)" if "train" in pool.splits else "")
        )
    info = pool_info(pool)
    for part in ("explain", "score"):
        if info[f"{part}_slices"] == 0:
            out.append(f"interpretation pool: the {part} partition is empty ({info['scans']} scan(s) in the pool)")
    return out


def write_summary(out_dir: Path, result: SummarizeResult) -> tuple[pa.Table, pa.Table]:
    """``latents.parquet``, ``example_sets.parquet``, ``partition.parquet`` and ``pool.json``."""
    import pyarrow.parquet as pq

    out_dir.mkdir(parents=True, exist_ok=True)
    latents = pa.Table.from_pandas(result.latents, preserve_index=False)
    sets = pa.Table.from_pylist([s.row() for s in result.sets], schema=SETS_SCHEMA)
    pq.write_table(latents, out_dir / "latents.parquet")
    pq.write_table(sets, out_dir / "example_sets.parquet")
    pool = result.pool
    explain_scans = np.unique(pool.scan[pool.explain])
    partition = pd.DataFrame(
        {
            "scan": pool.scan_names,
            "partition": np.where(np.isin(np.arange(len(pool.scan_names)), explain_scans), "explain", "score"),
        }
    )
    partition.to_parquet(out_dir / "partition.parquet", index=False)
    (out_dir / "pool.json").write_text(json.dumps(pool_info(pool), indent=2))
    return latents, sets


def run_summarize(ctx: StageContext) -> StageResult:
    from medsae.data.index import load_slices, presence_matrix
    from medsae.sae.codes import load_codes

    slices_dir, encode_dir = Path(ctx.inputs["slices"]), Path(ctx.inputs["encode"])
    sae_key = ctx.input_keys.get("train", ctx.input_keys.get("encode", ""))
    slices = load_slices(slices_dir)
    presence, vocab = presence_matrix(slices_dir)
    codes, code_ids = load_codes(encode_dir)
    spec = ctx.section(InterpretSpec)
    result = summarize(slices, presence, list(vocab), codes, code_ids, spec, sae_key, ctx.progress)
    for line in pool_warnings(result.pool, list(spec.pool_splits), slices):
        log.warning("%s", line)
    study = _summarize_study(ctx, slices, codes, code_ids, spec, sae_key) if spec.protocol == "study" else None
    if study is not None:
        result.sets.extend(study.sets)

    latents, sets = write_summary(ctx.out_dir, result)
    status = result.latents["status"].value_counts()
    split = "+".join(result.pool.splits)
    d = len(result.latents)
    metrics = [
        Metric(f"latents_{s}", float(status.get(s, 0)) / max(d, 1), split=split, n=d)
        for s in ("live", "dense", "too_rare", "dead")
    ]
    summary = {
        "pool": pool_info(result.pool),
        "latents": {s: int(status.get(s, 0)) for s in ("live", "dense", "too_rare", "dead")},
        "example_sets": len(result.sets),
    }
    if study is not None:
        from medsae.interp.study.summarize import write_study

        write_study(ctx.out_dir, study)
        summary["study"] = study.info
    return StageResult(metrics=metrics, tables={"latents": latents, "example_sets": sets}, summary=summary)


def _summarize_study(
    ctx: StageContext, slices: pd.DataFrame, codes: Any, code_ids: np.ndarray, spec: InterpretSpec, sae_key: str
) -> Any:
    """The study's selection, distractors and sample sets (``interpret.protocol: study``)."""
    from medsae.errors import MissingInputError
    from medsae.interp.study.summarize import read_evaluate_outputs, summarize_study

    if "evaluate" not in ctx.inputs:
        raise MissingInputError(f"summarize stage {ctx.key[:12]}: interpret.protocol study needs the evaluate stage")
    mono, coefficients = read_evaluate_outputs(Path(ctx.inputs["evaluate"]))
    return summarize_study(slices, codes, code_ids, mono, coefficients, spec, sae_key, ctx.progress)


SETS_SCHEMA = pa.schema(
    [
        ("set_id", pa.string()),
        ("latent", pa.int32()),
        ("purpose", pa.string()),
        ("slice_ids", pa.list_(pa.int64())),
        ("activations", pa.list_(pa.float64())),
        ("roles", pa.list_(pa.string())),
    ]
)


def stage_agent(ctx: StageContext) -> Any:
    """The agent of an interpret stage; its LLM cache is the artifacts root's (shared by every worker
    of the Ray executor, which splits the latents' calls across them before the stage runs)."""
    from medsae.interp.agent import AgentInputs, make_agent
    from medsae.interp.llm.cache import cache_dir_for

    summarize_dir = Path(ctx.inputs["summarize"])
    inputs = AgentInputs(
        summarize_dir=summarize_dir,
        slices_dir=Path(ctx.inputs["slices"]),
        sae_key=_sae_key(summarize_dir, ctx),
        summarize_key=ctx.input_keys["summarize"],
    )
    spec = ctx.section(InterpretSpec)
    return make_agent(inputs, spec, cache_dir_for(summarize_dir.parent.parent), progress=ctx.progress)


def run_interpret(ctx: StageContext) -> StageResult:
    from medsae.interp.journal import WorkDirJournal
    from medsae.interp.run_stats import summary_line

    spec = ctx.section(InterpretSpec)
    agent = stage_agent(ctx)
    result = agent.run(sink=WorkDirJournal(Path(ctx.work_dir) / "finished"))
    grounding = _grounding(ctx)
    if grounding is not None:
        add_mask_match(result, grounding, int(spec.seed))
    s = result.summary
    if s["parse_failed"] + s["too_long"] + s["repetitive"] + s["failed_calls"] + s["degenerate_scores"]:
        log.warning("interpret: %s", summary_line(s))  # say it during `exp run`, not only in exp show
    if s["failed_calls"]:
        log.warning(
            "interpret: latents whose calls failed have no scores; `medsae explain run` (or `exp run --force "
            "interpret`) asks again for them only, the other answers come from the cache"
        )
    write_outputs(ctx.out_dir, result.tables, result.summary, result.files)
    return StageResult(metrics=result.metrics, tables=result.tables, summary=result.summary)


def _grounding(ctx: StageContext) -> Grounding | None:
    """The ground stage's best structure per latent, when the experiment has a ground stage (else None)."""
    from medsae.errors import MissingInputError
    from medsae.interp.mask_match import Grounding
    from medsae.registry.queries import folder_best_structures

    if "ground" not in ctx.inputs:
        return None
    folder = Path(ctx.inputs["ground"])
    if not folder.is_dir():
        raise MissingInputError(f"interpret stage {ctx.key[:12]}: the ground stage is not built ({folder})")
    return Grounding(ctx.input_keys["ground"], folder_best_structures(folder))


def add_mask_match(result: AgentResult, grounding: Grounding, seed: int) -> None:
    """Score every explanation of an agent run against the masks: rows, metrics and summary join ``result``."""
    from medsae.interp.mask_match import mask_match_rows, mask_match_summary
    from medsae.interp.run_stats import run_metrics

    explanations = result.tables.get("explanations", [])
    rows = mask_match_rows(explanations, grounding)
    result.tables.setdefault("explanation_scores", []).extend(rows)
    result.metrics.extend(run_metrics({"explanations": explanations, "explanation_scores": rows}, seed))
    result.summary["mask_match"] = mask_match_summary(rows, explanations) | {"ground_key": grounding.ground_key}


def _sae_key(summarize_dir: Path, ctx: StageContext) -> str:
    """The SAE (train stage) key the summarize stage recorded in its latents table."""
    latents = pd.read_parquet(summarize_dir / "latents.parquet", columns=["sae_key"])
    if len(latents):
        return str(latents["sae_key"].iloc[0])
    return ctx.input_keys.get("train", ctx.input_keys.get("encode", ""))


def write_outputs(
    out_dir: Path, tables: dict[str, list[dict]], summary: dict, files: dict[str, Any] | None = None
) -> None:
    """Explanations, scores, the run summary and the agent's other files (JSON) in the interpret stage folder."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for table, name in (("explanations", "explanations.parquet"), ("explanation_scores", "scores.parquet")):
        rows = tables.get(table) or []
        pd.DataFrame(rows).to_parquet(out_dir / name, index=False)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    for name, content in (files or {}).items():
        (out_dir / name).write_text(json.dumps(content, indent=2, default=str))
