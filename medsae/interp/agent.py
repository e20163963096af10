"""The auto-interpretation agent: explain, simulate, score and version every eligible latent.

Two phases of LLM calls, each sent concurrently through the gateway (cached, retried, logged):

1. **explain** — one call per latent with its explain set (explainer model), each prompt fitted
   to the model's context window (:mod:`medsae.interp.budget`). Every parsed explanation gets a
   hygiene status (:mod:`medsae.interp.hygiene`); only ``ok`` ones go on.
2. **score**, latent by latent (:mod:`medsae.interp.pipeline`) — simulation batches of the
   held-out set for the explanation and for the shuffled baseline, detection batches and the
   study's 5-way ranking (reference scorer), then one repair re-ask per malformed batch. Each
   finished latent is scored (:mod:`medsae.interp.scoring`), checked for degenerate predictions
   (:mod:`medsae.interp.sanity`) and its rows go to a sink at once (:mod:`medsae.interp.journal`):
   the registry for ``explain run``, the stage's work folder for the ``interpret`` stage.

Rows are content-addressed (:mod:`medsae.interp.rows`): a rerun yields the same ids and adds
nothing, a new explainer or scorer adds rows beside the old ones. Calls that failed (provider
errors, budget) produce no explanation or score row, only ``llm_calls`` rows with the error, so
a later run can fill them in; an answer that could not be used (parse failure, rejected
explanation, missing predictions) is deterministic and is stored as such.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medsae.errors import MedsaeError, MissingInputError
from medsae.interp import baselines, budget, explainer, hygiene, sanity, scoring, simulator
from medsae.interp.config import InterpretSpec
from medsae.interp.journal import RowSink, Tables, empty_tables
from medsae.interp.metadata import Term, format_lines, legend_lines, slice_attributes
from medsae.interp.pipeline import LatentWork, run_latents
from medsae.interp.prompts import Template, load_template
from medsae.interp.rows import (
    BEST_ATTRIBUTE,
    EXPLANATION,
    SHUFFLED,
    best_attribute_row,
    explanation_row,
    ranking_score,
    score_row,
    shuffled_row,
)
from medsae.interp.sampling import DETECT, EXPLAIN, SIMULATE, purpose_seed, sha256_json
from medsae.stage import Metric

log = logging.getLogger("medsae")

__all__ = ["BEST_ATTRIBUTE", "EXPLANATION", "SHUFFLED", "Agent", "AgentInputs", "AgentResult"]

N_RANKING_SAMPLES, N_DISTRACTORS = 5, 4
#: Id columns used to drop duplicates when rows of an interrupted run are merged back.
_ID_COLUMNS = {"explanations": "explanation_id", "explanation_scores": "score_id", "prompts": "template_hash"}
_JOB_METHODS = ("pearson", "detection_bacc")  # one row per simulation / detection job


@dataclass
class AgentInputs:
    """Where the agent reads from (completed stage folders) and the keys that identify them."""

    summarize_dir: Path
    slices_dir: Path
    sae_key: str
    summarize_key: str


@dataclass
class AgentResult:
    """Registry rows and figures of one agent run."""

    tables: dict[str, list[dict[str, Any]]]
    summary: dict[str, Any]
    metrics: list[Metric] = field(default_factory=list)


def cache_dir_for(artifacts_root: Path | None) -> Path:
    """``$MEDSAE_LLM_CACHE`` if set, else ``<artifacts root>/llm_cache``."""
    env = os.environ.get("MEDSAE_LLM_CACHE")
    if env:
        return Path(env)
    if artifacts_root is None:
        raise MedsaeError("no LLM cache folder: set MEDSAE_LLM_CACHE")
    return Path(artifacts_root) / "llm_cache"


# --------------------------------------------------------------------------- inputs


def _read_summary(summarize_dir: Path) -> tuple[pd.DataFrame, dict[tuple[int, str], dict]]:
    lat_path, sets_path = summarize_dir / "latents.parquet", summarize_dir / "example_sets.parquet"
    for path in (lat_path, sets_path):
        if not path.is_file():
            raise MissingInputError(f"{path}: summarize output missing (run the summarize stage first)")
    latents = pd.read_parquet(lat_path)
    sets: dict[tuple[int, str], dict] = {}
    for row in pd.read_parquet(sets_path).to_dict("records"):
        sets[(int(row["latent"]), str(row["purpose"]))] = {
            "set_id": row["set_id"],
            "slice_ids": np.asarray(row["slice_ids"], dtype=np.int64),
            "activations": np.asarray(row["activations"], dtype=np.float64),
            "roles": list(row["roles"]),
        }
    return latents, sets


def select_latents(
    latents: pd.DataFrame,
    sets: dict[tuple[int, str], dict],
    wanted: Sequence[int] | None,
    max_latents: int | None,
) -> list[int]:
    """Eligible latents (live or dense, with explain and simulate sets), most frequent first."""
    ok = latents[latents["status"].isin(["live", "dense"])].copy()
    has_sets = [
        (int(x), EXPLAIN) in sets
        and (int(x), SIMULATE) in sets
        and (sets[(int(x), EXPLAIN)]["activations"] > 0).any()
        and (sets[(int(x), SIMULATE)]["activations"] > 0).any()
        for x in ok["latent"]
    ]
    ok = ok[np.asarray(has_sets, dtype=bool)] if len(ok) else ok
    ok = ok.sort_values(["frequency", "latent"], ascending=[False, True])
    chosen = [int(x) for x in ok["latent"]]
    if wanted is not None:
        wanted = [int(x) for x in wanted]
        eligible = set(chosen)
        skipped = [x for x in wanted if x not in eligible]
        if skipped:
            log.warning("latents not eligible for explanation (dead, too rare or no example sets): %s", skipped)
        chosen = [x for x in wanted if x in eligible]
    if max_latents is not None:
        chosen = chosen[:max_latents]
    return chosen


def load_slice_tables(slices_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """(slices indexed by slice_id, structure areas, structure vocabulary) of a slices folder."""
    from medsae.data.index import load_slices, load_structures, load_vocab

    slices = load_slices(slices_dir).set_index("slice_id", drop=False)
    return slices, load_structures(slices_dir), load_vocab(slices_dir)


def pool_note(summarize_dir: Path) -> str | None:
    """A sentence when the summarize stage had to widen the interpretation pool (else None)."""
    try:
        info = json.loads((summarize_dir / "pool.json").read_text())
    except (OSError, ValueError):
        return None
    if not info.get("widened"):
        return None
    return (
        f"the interpretation pool was widened to the split(s) {'+'.join(info.get('splits') or [])} "
        f"({info.get('scans')} scans): too few scans in the splits the spec names"
    )


# --------------------------------------------------------------------------- the run


class Agent:
    """One run: an explainer model, the reference scorer, the sets of the summarize stage."""

    def __init__(
        self,
        inputs: AgentInputs,
        spec: InterpretSpec,
        cache_dir: Path,
        progress: Callable | None = None,
    ):
        import medsae.interp.baseline_provider  # noqa: F401  registers medsae/baseline
        from medsae.interp.llm import LLMGateway

        self.inputs, self.spec = inputs, spec
        self.seed = int(spec.seed)
        self.sae_key = inputs.sae_key
        self.explainer_model = str(spec.explainer_model)
        self.scorer_model = str(spec.scorer_model)
        self.explainer_api_base = spec.explainer_api_base or None
        self.scorer_api_base = spec.scorer_api_base or None
        self.concurrency = int(spec.concurrency)
        self.gateway = LLMGateway(
            cache_dir,
            mode=spec.llm_mode,
            concurrency=self.concurrency,
            max_retries=int(spec.max_retries),
            timeout_s=float(spec.timeout_s),
            max_cost_usd=spec.max_cost_usd,
            backoff_s=float(spec.retry_backoff_s),
        )
        self.progress = progress
        self.templates: dict[str, Template] = {}
        self._tables: Tables = empty_tables()
        self._sink = RowSink()
        self._finished: set[int] = set()
        self._n_repairs = 0

    # ---------------------------------------------------------------- helpers

    def _template(self, name: str) -> Template:
        if name not in self.templates:
            self.templates[name] = load_template(name)
        return self.templates[name]

    def _describe(self, text: str) -> str | None:
        quiet = os.environ.get("MEDSAE_QUIET", "") not in ("", "0")
        return None if quiet else text

    def _emit(self, tables: Tables, latent: int | None = None) -> None:
        """Keep ``tables`` (plus the calls made since the last emit) and hand them to the sink.

        ``latent``: the latent these rows finish (it is then skipped by a resumed stage).
        """
        calls = [r for r in self.gateway.drain_call_rows() if not r.get("cached")]
        tables = {**tables, "llm_calls": list(tables.get("llm_calls", [])) + calls}
        for table, rows in tables.items():
            self._tables.setdefault(table, []).extend(rows)
        if latent is not None:
            self._finished.add(int(latent))
        self._sink.add(tables, latent)

    def _check_models(self) -> None:
        """Fail fast: unknown provider, unregistered offline model or missing key, before any work."""
        self.gateway.check_model(self.explainer_model, self.explainer_api_base)
        self.gateway.check_model(self.scorer_model, self.scorer_api_base)
        if self.explainer_model == self.scorer_model and not self.scorer_model.startswith("medsae/"):
            log.warning(
                "explainer and reference scorer are the same model (%s): scores may be self-consistent "
                "rather than faithful; choose --scorer",
                self.scorer_model,
            )

    # ---------------------------------------------------------------- main

    def run(self, latents_wanted: Sequence[int] | None = None, sink: RowSink | None = None) -> AgentResult:
        """Explain and score; finished latents go to ``sink`` as they finish (and are skipped when the
        sink already holds them from an interrupted run)."""
        t0 = time.perf_counter()
        self._tables, self._finished, self._n_repairs = empty_tables(), set(), 0
        self._sink = sink or RowSink()
        self._check_models()
        latents_df, sets = _read_summary(self.inputs.summarize_dir)
        chosen = select_latents(latents_df, sets, latents_wanted, self.spec.max_latents)
        if not chosen:
            raise MedsaeError(f"{self.inputs.summarize_dir}: no latent is eligible for explanation")
        note = pool_note(self.inputs.summarize_dir)
        if note:
            log.warning("%s", note)
        try:
            self._run(chosen, sets, latents_df)
        finally:
            self._emit({})
            self._sink.flush()
        tables = _deduplicated(self._tables)
        summary = self._summary(chosen, tables, time.perf_counter() - t0) | {"pool_note": note}
        return AgentResult(tables=tables, summary=summary, metrics=self._metrics(tables))

    def _run(self, chosen: list[int], sets: dict, latents_df: pd.DataFrame) -> None:
        slices, structures, vocab = load_slice_tables(self.inputs.slices_dir)
        attrs = slice_attributes(slices)
        legend = legend_lines(attrs, vocab)
        chosen_set = set(chosen)
        needed = np.unique(np.concatenate([s["slice_ids"] for (lat, _), s in sets.items() if lat in chosen_set]))
        lines = format_lines(slices, structures, needed)
        done, earlier = self._sink.finished()
        done &= chosen_set
        if done:
            log.warning("resuming: %d of %d latents were finished by an interrupted run", len(done), len(chosen))
            for table, rows in earlier.items():
                self._tables.setdefault(table, []).extend(rows)
            self._finished |= done
        explanations = {
            int(r["latent"]): r for r in earlier["explanations"] if r["kind"] == EXPLANATION and r["latent"] in done
        }
        todo = [lat for lat in chosen if lat not in done]
        explanations |= self._explain(todo, sets, lines)

        sim, det = self._simulators(legend)
        self._check_scorer_prompts(sim, det, lines, needed)
        ok = {lat: e for lat, e in explanations.items() if e["status"] == hygiene.OK}
        summaries = dict(zip(latents_df["latent"].astype(int), latents_df["top_structures"], strict=True))
        context = {"sets": sets, "attrs": attrs, "structures": structures, "summaries": summaries}
        works = []
        for latent in todo:
            expl = explanations.get(latent)
            if expl is not None and expl["status"] == hygiene.OK:
                works.append(self._work(latent, expl, ok, sets, lines, legend, sim, det))
                continue
            rows = self._best_attribute(latent, context)
            if expl is not None:  # rejected or unparsed: finished; no row (failed call): a rerun retries
                rows["explanations"].insert(0, expl)
            self._emit(rows, latent if expl is not None else None)
        self._emit_prompts()

        description = self._describe("score")
        finished = run_latents(
            self.gateway, works, lines, workers=max(2, self.concurrency), finish=lambda w: self._latent_rows(w, context)
        )
        if description is not None:
            from medsae.progress import track

            finished = track(finished, total=len(works), description=description, unit="latent")
        for work in finished:
            self._n_repairs += work.n_repairs
            if work.failure:  # one latent's failure never stops the others
                log.warning("latent %d: %s; not scored", work.latent, work.failure)
                rows, complete = {"explanations": [work.context["explanation"]]}, False
            else:
                rows, complete = work.result
            self._emit(rows, work.latent if complete else None)
        self._emit_prompts()

    def _emit_prompts(self) -> None:
        """The templates used so far that were not emitted yet (registry table ``prompts``)."""
        emitted = {r["template_hash"] for r in self._tables.get("prompts", [])}
        new = [t.prompt_row() for t in self.templates.values() if t.hash not in emitted]
        if new:
            self._emit({"prompts": new})

    # ---------------------------------------------------------------- phase 1: explain

    def _explain(self, todo: list[int], sets: dict, lines: dict[int, str]) -> dict[int, dict]:
        from medsae.interp.llm import LLMRequest

        p = self.spec
        vision = bool(p.vision) and explainer.supports_vision(self.explainer_model)
        if bool(p.vision) and not vision:
            log.warning("vision is on but %s does not accept images: using the text explainer", self.explainer_model)
        template = self._template(p.vision_template if vision else p.explainer_template)
        if not todo:
            return {}
        settings = explainer.request_params(p) | {"vision": vision}
        limit = budget.prompt_budget(
            self.explainer_model, int(p.explainer_max_tokens), p.max_prompt_tokens, "explainer"
        )
        requests, meta = [], []
        n_fewer = 0
        for latent in todo:
            eset = sets[(latent, EXPLAIN)]
            examples = explainer.explain_examples(eset["slice_ids"], eset["activations"], lines)

            def render(shown: list[dict]) -> list[dict]:
                image = explainer.montage(self.inputs.slices_dir, shown) if vision else None
                return explainer.render_explainer(template, shown, image)

            messages, shown = budget.fit_examples(render, examples, self.explainer_model, limit)
            n_fewer += len(shown) < len(examples)
            requests.append(
                LLMRequest(
                    model=self.explainer_model,
                    messages=messages,
                    temperature=float(p.temperature),
                    max_tokens=int(p.explainer_max_tokens),
                    seed=0,
                    template_hash=template.hash,
                    api_base=self.explainer_api_base,
                )
            )
            meta.append((latent, eset["set_id"], len(shown)))
        if n_fewer:
            log.warning(
                "%d of %d explainer prompts show fewer examples to fit %s's context (%d tokens)",
                n_fewer,
                len(todo),
                self.explainer_model,
                limit,
            )
        responses = self.gateway.complete_many(requests, description=self._describe("explain"))
        out: dict[int, dict] = {}
        for (latent, set_id, n_shown), resp in zip(meta, responses, strict=True):
            if resp.error:
                continue  # no row: a later run can fill it in (the failure is an llm_calls row)
            text = explainer.parse_explanation(resp.text)
            status = hygiene.explanation_status(text, int(p.explanation_max_words), int(p.explanation_max_chars))
            out[latent] = explanation_row(
                latent=latent,
                sae_key=self.sae_key,
                summarize_key=self.inputs.summarize_key,
                model=self.explainer_model,
                api_base=self.explainer_api_base,
                template_hash=template.hash,
                settings=settings,
                set_id=set_id,
                request_hash=resp.request_hash,
                text=text,
                status=status,
                n_examples=n_shown,
            )
        return out

    # ---------------------------------------------------------------- phase 2: score

    def _simulators(self, legend: list[str]) -> tuple[simulator.Simulator, simulator.Simulator]:
        p = self.spec
        mode = simulator.resolve_mode(self.scorer_model, str(p.simulation_mode))
        common = {
            "model": self.scorer_model,
            "mode": mode,
            "batch_size": int(p.simulate_batch),
            "temperature": float(p.temperature),
            "top_logprobs": int(p.top_logprobs),
            "legend": legend,
            "api_base": self.scorer_api_base,
        }
        sim = simulator.Simulator(template=self._template(p.simulator_template), scale=10, **common)
        det = simulator.Simulator(template=self._template(p.detector_template), scale=1, **common)
        return sim, det

    def _check_scorer_prompts(
        self, sim: simulator.Simulator, det: simulator.Simulator, lines: dict[int, str], needed: np.ndarray
    ) -> None:
        """One-line error before any scoring call when a batch of the longest lines cannot fit."""
        n = int(self.spec.simulate_batch)
        limit = budget.prompt_budget(self.scorer_model, 8 * n + 16, self.spec.max_prompt_tokens, "scorer")
        if limit is None:
            return
        longest = sorted((lines[int(s)] for s in needed), key=len, reverse=True)[:n]
        rows = [{"id": i, "line": line} for i, line in zip(simulator.labels(len(longest)), longest, strict=True)]
        words = "x" * int(self.spec.explanation_max_chars)
        for s in (sim, det):
            messages = s.template.render(explanation=words, slices=rows, legend=s.legend)
            budget.check_batch_prompt(self.scorer_model, messages, limit, n)

    def _job(self, latent: int, expl: dict, eset: dict, purpose: str) -> simulator.SimJob:
        order_seed = purpose_seed(self.seed, self.sae_key, latent, f"{purpose}-order")
        return simulator.SimJob(
            key=(latent, expl["explanation_id"], eset["set_id"], purpose),
            explanation=expl["text"],
            slice_ids=eset["slice_ids"],
            order_seed=order_seed,
        )

    def _work(
        self,
        latent: int,
        expl: dict,
        ok: dict[int, dict],
        sets: dict,
        lines: dict[int, str],
        legend: list[str],
        sim: simulator.Simulator,
        det: simulator.Simulator,
    ) -> LatentWork:
        """Every scoring call of one latent (explanation, shuffled baseline, detection, ranking)."""
        p = self.spec
        work = LatentWork(latent, context={"explanation": expl, "roles": []})
        work.jobs.append((sim, self._job(latent, expl, sets[(latent, SIMULATE)], SIMULATE)))
        work.context["roles"].append("simulate")
        if p.detect and (latent, DETECT) in sets:
            work.jobs.append((det, self._job(latent, expl, sets[(latent, DETECT)], DETECT)))
            work.context["roles"].append("detect")
        targets = self._shuffled_targets(ok)
        if latent in targets:
            donor = baselines.shuffled_donor(latent, list(ok), self.seed, self.sae_key)
            if donor is not None:
                row = shuffled_row(latent, ok[donor], donor, self.sae_key, self.inputs.summarize_key)
                work.context["shuffled"] = row
                work.jobs.append((sim, self._job(latent, row, sets[(latent, SIMULATE)], SIMULATE)))
                work.context["roles"].append("shuffled")
        if p.ranking:
            ranking = self._ranking_request(latent, expl, ok, sets, lines, legend)
            if ranking is not None:
                request, truth, others = ranking
                work.extra.append(request)
                work.context["ranking"] = (truth, others)
        return work

    def _shuffled_targets(self, ok: dict[int, dict]) -> set[int]:
        key = tuple(sorted(ok))
        if getattr(self, "_targets_key", None) != key:
            p = self.spec
            self._targets = set(
                baselines.shuffled_targets(
                    list(ok), float(p.shuffled_fraction), int(p.shuffled_min), self.seed, self.sae_key
                )
            )
            self._targets_key = key
        return self._targets

    def _ranking_request(
        self, latent: int, expl: dict, ok: dict[int, dict], sets: dict, lines: dict[int, str], legend: list[str]
    ) -> tuple[Any, str, list[int]] | None:
        from medsae.interp.llm import LLMRequest

        template = self._template(self.spec.ranking_template)
        others = baselines.distractors(latent, list(ok), N_DISTRACTORS, self.seed, self.sae_key)
        if not others:
            return None
        eset = sets[(latent, SIMULATE)]
        top = np.argsort(-eset["activations"], kind="stable")[:N_RANKING_SAMPLES]
        top = top[eset["activations"][top] > 0]
        samples = [{"id": f"X{i + 1:02d}", "line": lines[int(eset["slice_ids"][j])]} for i, j in enumerate(top)]
        texts = [expl["text"]] + [ok[o]["text"] for o in others]
        order = np.random.default_rng(purpose_seed(self.seed, self.sae_key, latent, "ranking-order")).permutation(5)
        letters = "ABCDE"
        candidates = [{"letter": letters[i], "text": texts[k]} for i, k in enumerate(order)]
        truth = letters[int(np.flatnonzero(order == 0)[0])]
        messages = template.render(samples=samples, candidates=candidates, legend=legend)
        request = LLMRequest(
            model=self.scorer_model,
            messages=messages,
            temperature=float(self.spec.temperature),
            max_tokens=50,
            seed=0,
            template_hash=template.hash,
            api_base=self.scorer_api_base,
        )
        return request, truth, others

    def _latent_rows(self, work: LatentWork, context: dict) -> tuple[Tables, bool]:
        """Rows of one finished latent, and whether it is complete (no failed call, no error)."""
        latent, expl = work.latent, work.context["explanation"]
        rows = self._best_attribute(latent, context)
        rows["explanations"].insert(0, expl)
        complete = True
        shuffled = work.context.get("shuffled")
        if shuffled is not None:
            rows["explanations"].append(shuffled)
        by_role = dict(zip(work.context["roles"], work.jobs, strict=True))
        twins: dict[str, np.ndarray | None] = {"simulate": None, "shuffled": None}
        if shuffled is not None and _norm(shuffled["text"]) != _norm(expl["text"]):
            twins = {"simulate": by_role["shuffled"][1].values, "shuffled": by_role["simulate"][1].values}
        for role, (sim, job) in by_role.items():
            if job.errors:
                log.warning(
                    "latent %d: %d %s call(s) failed (%s); not scored", latent, len(job.errors), role, job.errors[0]
                )
                complete = False
                continue
            rows["explanation_scores"] += self._job_scores(job, sim, context["sets"], role, twins.get(role))
        if "ranking" in work.context:
            response = work.extra_responses[0]
            if response.error:
                complete = False
            else:
                truth, others = work.context["ranking"]
                rows["explanation_scores"].append(self._ranking_row(latent, expl, truth, others, response, context))
        return rows, complete

    def _job_scores(
        self, job: simulator.SimJob, sim: simulator.Simulator, sets: dict, role: str, twin: np.ndarray | None
    ) -> list[dict]:
        latent, expl_id, set_id, purpose = job.key
        truth = sets[(latent, purpose)]["activations"]
        if role == "detect":
            scores = scoring.score_detection(job.values, truth, scale=sim.scale)
        else:
            seed = purpose_seed(self.seed, self.sae_key, latent, "bootstrap")
            scores = scoring.score_simulation(
                job.values, truth, int(self.spec.bootstrap), int(self.spec.permutations), seed
            )
        reason, r2 = sanity.degenerate_reason(job.values, job.batch_positions, twin)
        extra: dict[str, Any] = {}
        if job.n_repaired or job.n_fallback:
            extra |= {"n_repaired": job.n_repaired, "n_ev_fallback": job.n_fallback}
        if job.n_no_logprobs:
            extra["n_no_logprobs"] = job.n_no_logprobs  # logprobs ignored: parsed integers instead
        if reason:
            extra["degenerate"] = reason
        digest = sha256_json(job.request_hashes)
        return [
            score_row(
                expl_id,
                set_id,
                score,
                sim.identity(),
                self.spec,
                extra,
                digest,
                n_repaired=job.n_repaired,
                degenerate=reason is not None,
            )
            for score in scores
        ]

    def _ranking_row(self, latent: int, expl: dict, truth: str, others: list[int], resp: Any, context: dict) -> dict:
        scorer = {
            "model": self.scorer_model,
            "mode": "ranking",
            "api_base": self.scorer_api_base,
            "template_hash": self._template(self.spec.ranking_template).hash,
            "temperature": float(self.spec.temperature),
        }
        set_id = context["sets"][(latent, SIMULATE)]["set_id"]
        score = ranking_score(resp.text, truth, others)
        return score_row(expl["explanation_id"], set_id, score, scorer, self.spec, None, resp.request_hash)

    # ---------------------------------------------------------------- best single attribute

    def _best_attribute(self, latent: int, context: dict) -> Tables:
        """The best-attribute baseline of one latent (explanation row and its scores; no LLM)."""
        rows: Tables = {"explanations": [], "explanation_scores": []}
        info = json.loads(context["summaries"].get(latent) or "{}").get("best_attribute")
        if not info:
            return rows
        sets = context["sets"]
        term = Term.from_key(info["term"])
        eset = sets[(latent, SIMULATE)]
        row = best_attribute_row(
            latent,
            term.key,
            info.get("r_explain"),
            sets[(latent, EXPLAIN)]["set_id"],
            self.sae_key,
            self.inputs.summarize_key,
        )
        rows["explanations"].append(row)
        scorer = {"model": baselines.RULE_MODEL, "mode": simulator.RULE, "template_hash": baselines.RULE_TEMPLATE}
        pred = baselines.rule_predictions(term, eset["slice_ids"], context["attrs"], context["structures"])
        seed = purpose_seed(self.seed, self.sae_key, latent, "bootstrap")
        for score in scoring.score_simulation(
            pred, eset["activations"], int(self.spec.bootstrap), int(self.spec.permutations), seed
        ):
            rows["explanation_scores"].append(
                score_row(row["explanation_id"], eset["set_id"], score, scorer, self.spec)
            )
        return rows

    # ---------------------------------------------------------------- reporting

    def _summary(self, chosen: list[int], tables: Tables, seconds: float) -> dict:
        kinds = {r["explanation_id"]: r["kind"] for r in tables["explanations"]}
        by_kind: dict[str, list[float | None]] = {}
        jobs = [
            r
            for r in tables["explanation_scores"]
            if r["method"] in _JOB_METHODS and r["scorer_mode"] != simulator.RULE
        ]
        for r in tables["explanation_scores"]:
            if r["method"] == "pearson" and not r.get("degenerate"):
                by_kind.setdefault(kinds.get(r["explanation_id"], "?"), []).append(r["value"])
        wanted = set(chosen)
        explained = [r for r in tables["explanations"] if r["kind"] == EXPLANATION and r["latent"] in wanted]
        status = [r["status"] for r in explained]
        return {
            "explainer_model": self.explainer_model,
            "scorer_model": self.scorer_model,
            "latents": len(chosen),
            "done": len(self._finished & wanted),
            "explained": status.count(hygiene.OK),
            "parse_failed": status.count(hygiene.PARSE_FAILED),
            "too_long": status.count(hygiene.TOO_LONG),
            "repetitive": status.count(hygiene.REPETITIVE),
            "call_failures": len(chosen) - len(explained),  # latents whose explain call failed
            "failed_calls": self.gateway.n_failed,
            "failed_attempts": self.gateway.n_failed_attempts,
            "missing_predictions": int(sum(r["n_missing"] or 0 for r in jobs)),
            "repaired_predictions": int(sum(r.get("n_repaired") or 0 for r in jobs)),
            "repair_calls": self._n_repairs,
            "degenerate_scores": int(sum(bool(r.get("degenerate")) for r in jobs)),
            "no_logprobs_batches": int(sum(json.loads(r["extra_json"] or "{}").get("n_no_logprobs", 0) for r in jobs)),
            "scores": len(jobs),
            "llm_calls": self.gateway.n_calls,
            "cache_hits": self.gateway.n_cache_hits,
            "cost_usd": round(self.gateway.total_cost_usd, 6),
            "pearson": {k: scoring.summarize_values(np.array(v, dtype=float)) for k, v in sorted(by_kind.items())},
            "seconds": round(seconds, 2),
        }

    def _metrics(self, tables: Tables) -> list[Metric]:
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
            agg = scoring.summarize_values(np.array(values, dtype=float))
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
        for gap in sanity.scorer_gaps(_score_frame(tables), seed=self.seed):
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


def _norm(text: str | None) -> str:
    return " ".join((text or "").lower().split())


def _deduplicated(tables: Tables) -> Tables:
    """Rows with an id once (a resumed run re-emits some), other rows as they are."""
    out: Tables = {}
    for table, rows in tables.items():
        column = _ID_COLUMNS.get(table)
        if column is None:
            out[table] = list(rows)
            continue
        seen: dict[Any, dict] = {}
        for row in rows:
            seen.setdefault(row[column], row)
        out[table] = list(seen.values())
    return out


def _score_frame(tables: Tables) -> pd.DataFrame:
    """Score rows joined with their explanation's latent, kind and model (for :func:`sanity.scorer_gaps`)."""
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
