"""The auto-interpretation agent: explain, simulate, score and version every eligible latent.

Orchestration only; each step lives in its own module. Two phases of LLM calls, each sent
concurrently through the gateway (:mod:`medsae.interp.llm`: cached, retried, logged):

1. **explain** — one call per latent with its explain set (:mod:`medsae.interp.explainer`), each
   prompt fitted to the model's context window. Every parsed explanation gets a hygiene status
   (:mod:`medsae.interp.hygiene`); only ``ok`` ones go on.
2. **score**, latent by latent (:mod:`medsae.interp.pipeline`) — simulation batches of the
   held-out set for the explanation and for the shuffled baseline, detection batches
   (:mod:`medsae.interp.scorers.simulator`) and the study's 5-way ranking
   (:mod:`medsae.interp.scorers.ranking`), then one repair re-ask per malformed batch. Each
   finished latent is scored (:mod:`medsae.interp.scorers.metrics`), checked for degenerate
   predictions (:mod:`medsae.interp.scorers.sanity`), gets its best-attribute baseline
   (:mod:`medsae.interp.baselines`) and its rows go to a sink at once (:mod:`medsae.interp.journal`):
   the registry for ``explain run``, the stage's work folder for the ``interpret`` stage.

Rows are content-addressed (:mod:`medsae.interp.rows`): a rerun yields the same ids and adds
nothing, a new explainer or scorer adds rows beside the old ones. Calls that failed (provider
errors, budget) produce no explanation or score row, only ``llm_calls`` rows with the error, so
a later run can fill them in; an answer that could not be used (parse failure, rejected
explanation, missing predictions) is deterministic and is stored as such.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medsae.errors import MedsaeError
from medsae.interp import explainer, hygiene
from medsae.interp.agent_base import AgentBase
from medsae.interp.baselines.best_attribute import best_attribute_tables
from medsae.interp.baselines.shuffled import shuffled_donor, shuffled_targets
from medsae.interp.config import InterpretSpec
from medsae.interp.inputs import AgentData, AgentInputs, load_agent_data, pool_note, read_summary, select_latents
from medsae.interp.journal import RowSink, Tables, deduplicated, empty_tables
from medsae.interp.llm import LLMResponse, budget
from medsae.interp.pipeline import LatentWork, run_latents
from medsae.interp.prompts import Template
from medsae.interp.rows import EXPLANATION, explanation_row, score_row, shuffled_row
from medsae.interp.run_stats import run_metrics, run_summary
from medsae.interp.sampling import DETECT, EXPLAIN, SIMULATE, ExampleSet, purpose_seed, sha256_json
from medsae.interp.scorers import metrics, sanity
from medsae.interp.scorers.ranking import Ranker, RankingQuestion, ranking_score
from medsae.interp.scorers.simulator import SimJob, Simulator, labels, resolve_mode
from medsae.stage import Metric

log = logging.getLogger("medsae")

__all__ = ["Agent", "AgentInputs", "AgentResult", "make_agent"]


@dataclass
class AgentResult:
    """Registry rows and figures of one agent run."""

    tables: dict[str, list[dict[str, Any]]]
    summary: dict[str, Any]
    metrics: list[Metric] = field(default_factory=list)
    files: dict[str, Any] = field(default_factory=dict)  # file name -> JSON content for the stage folder


@dataclass
class _Scorers:
    """What every latent's scoring calls share: the scorers and the explanations fit to be scored."""

    sim: Simulator
    det: Simulator
    ranker: Ranker | None  # None: ranking off (or no latent to rank)
    ok: dict[int, dict]  # latent -> its explanation row with status ok (donors and distractors)
    shuffled: set[int]  # the latents that get the shuffled baseline


@dataclass
class _LatentPlan:
    """The scoring calls of one latent (a :class:`LatentWork`'s context)."""

    explanation: dict
    roles: list[str] = field(default_factory=list)  # per job, in order: simulate, detect, shuffled
    shuffled: dict | None = None  # the shuffled baseline's explanation row
    ranking: RankingQuestion | None = None


class Agent(AgentBase):
    """One run: an explainer model, the reference scorer, the sets of the summarize stage."""

    def __init__(
        self,
        inputs: AgentInputs,
        spec: InterpretSpec,
        cache_dir: Path,
        progress: Callable | None = None,
    ):
        super().__init__(inputs, spec, cache_dir, progress)
        self.seed = int(spec.seed)
        self.explainer_model = str(spec.explainer_model)
        self.scorer_model = str(spec.scorer_model)
        self.explainer_api_base = spec.explainer_api_base or None
        self.scorer_api_base = spec.scorer_api_base or None
        self.concurrency = int(spec.concurrency)
        self._n_repairs = 0

    # ---------------------------------------------------------------- helpers

    def _describe(self, text: str) -> str | None:
        quiet = os.environ.get("MEDSAE_QUIET", "") not in ("", "0")
        return None if quiet else text

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
        latents, sets = read_summary(self.inputs.summarize_dir)
        chosen = select_latents(latents, sets, latents_wanted, self.spec.max_latents)
        if not chosen:
            raise MedsaeError(f"{self.inputs.summarize_dir}: no latent is eligible for explanation")
        note = pool_note(self.inputs.summarize_dir)
        if note:
            log.warning("%s", note)
        try:
            self._run(chosen, load_agent_data(self.inputs.slices_dir, latents, sets, chosen))
        finally:
            self._emit({})
            self._sink.flush()
        tables = deduplicated(self._tables)
        summary = (
            {"explainer_model": self.explainer_model, "scorer_model": self.scorer_model}
            | run_summary(tables, chosen, self._finished, self.gateway, self._n_repairs)
            | {"seconds": round(time.perf_counter() - t0, 2), "pool_note": note}
        )
        return AgentResult(tables=tables, summary=summary, metrics=run_metrics(tables, self.seed))

    def prefetch(self, part: Sequence[int], phase: str) -> None:
        """Ask the questions a full run asks for the latents ``part`` in ``phase`` (``"explain"``, then
        ``"score"`` once every latent's explanation is in the cache), leaving the answers in the LLM
        cache; no row is kept. Choices that span latents (which latents get a shuffled baseline, each
        one's donor, ranking candidates) are made over the whole run's latents, so a full run later finds
        every answer in the cache: how the Ray executor splits an interpret stage across workers."""
        if phase not in ("explain", "score"):
            raise ValueError(f"prefetch phase {phase!r}: 'explain' or 'score'")
        self._tables, self._finished, self._n_repairs = empty_tables(), set(), 0
        self._sink = RowSink()
        self._check_models()
        latents, sets = read_summary(self.inputs.summarize_dir)
        chosen = select_latents(latents, sets, None, self.spec.max_latents)
        wanted = {int(x) for x in part}
        data = load_agent_data(self.inputs.slices_dir, latents, sets, chosen)
        if phase == "explain":
            self._explain([lat for lat in chosen if lat in wanted], data)
            return
        explanations = self._explain(chosen, data)  # every answer is in the cache after the explain phase
        ok = [lat for lat in chosen if lat in wanted and explanations.get(lat, {}).get("status") == hygiene.OK]
        scorers = self._scorers(data, explanations, bool(ok))
        self._score([self._work(lat, explanations[lat], data, scorers) for lat in ok], data, scorers)

    def _run(self, chosen: list[int], data: AgentData) -> None:
        done, earlier = self._sink.finished()
        done &= set(chosen)
        if done:
            log.warning("resuming: %d of %d latents were finished by an interrupted run", len(done), len(chosen))
            for table, rows in earlier.items():
                self._tables.setdefault(table, []).extend(rows)
            self._finished |= done
        explanations = {
            int(r["latent"]): r for r in earlier["explanations"] if r["kind"] == EXPLANATION and r["latent"] in done
        }
        todo = [lat for lat in chosen if lat not in done]
        explanations |= self._explain(todo, data)

        to_score = [lat for lat in todo if lat in explanations and explanations[lat]["status"] == hygiene.OK]
        scorers = self._scorers(data, explanations, bool(to_score))
        works = [self._work(lat, explanations[lat], data, scorers) for lat in to_score]
        scored = set(to_score)
        for latent in todo:
            if latent in scored:
                continue
            rows = best_attribute_tables(latent, data, self.spec, self.sae_key, self.inputs.summarize_key)
            expl = explanations.get(latent)
            if expl is not None:  # rejected or unparsed: finished; no row (failed call): a rerun retries
                rows["explanations"].insert(0, expl)
            self._emit(rows, latent if expl is not None else None)
        self._emit_prompts()
        self._score(works, data, scorers)
        self._emit_prompts()

    # ---------------------------------------------------------------- phase 1: explain

    def _explain(self, todo: list[int], data: AgentData) -> dict[int, dict]:
        """Latent -> its explanation row (any hygiene status); latents whose call failed have none."""
        p = self.spec
        vision = bool(p.vision) and explainer.supports_vision(self.explainer_model)
        if bool(p.vision) and not vision:
            log.warning("vision is on but %s does not accept images: using the text explainer", self.explainer_model)
        template = self._template(p.vision_template if vision else p.explainer_template)
        if not todo:
            return {}
        limit = budget.prompt_budget(
            self.explainer_model, int(p.explainer_max_tokens), p.max_prompt_tokens, "explainer"
        )
        writer = explainer.Explainer(
            model=self.explainer_model,
            template=template,
            temperature=float(p.temperature),
            max_tokens=int(p.explainer_max_tokens),
            api_base=self.explainer_api_base,
            budget=limit,
            slices_dir=self.inputs.slices_dir if vision else None,
        )
        requests, n_shown, n_fewer = [], [], 0
        for latent in todo:
            eset = data.sets[(latent, EXPLAIN)]
            examples = explainer.explain_examples(eset.slice_ids, eset.activations, data.lines)
            request, n = writer.request(examples)
            requests.append(request)
            n_shown.append(n)
            n_fewer += n < len(examples)
        if n_fewer:
            log.warning(
                "%d of %d explainer prompts show fewer examples to fit %s's context (%d tokens)",
                n_fewer,
                len(todo),
                self.explainer_model,
                limit,
            )
        responses = self.gateway.complete_many(requests, description=self._describe("explain"))
        settings = explainer.request_params(p) | {"vision": vision}
        out: dict[int, dict] = {}
        for latent, n, resp in zip(todo, n_shown, responses, strict=True):
            if resp.error:
                continue  # no row: a later run can fill it in (the failure is an llm_calls row)
            out[latent] = self._explanation(latent, n, resp, template, settings, data)
        return out

    def _explanation(
        self, latent: int, n_shown: int, resp: LLMResponse, template: Template, settings: dict, data: AgentData
    ) -> dict:
        text = explainer.parse_explanation(resp.text)
        p = self.spec
        return explanation_row(
            latent=latent,
            sae_key=self.sae_key,
            summarize_key=self.inputs.summarize_key,
            model=self.explainer_model,
            api_base=self.explainer_api_base,
            template_hash=template.hash,
            settings=settings,
            set_id=data.sets[(latent, EXPLAIN)].set_id,
            request_hash=resp.request_hash,
            text=text,
            status=hygiene.explanation_status(text, int(p.explanation_max_words), int(p.explanation_max_chars)),
            n_examples=n_shown,
        )

    # ---------------------------------------------------------------- phase 2: score

    def _scorers(self, data: AgentData, explanations: dict[int, dict], any_work: bool) -> _Scorers:
        """The run's scorers (checked against the scorer's context before any call)."""
        p = self.spec
        mode = resolve_mode(self.scorer_model, str(p.simulation_mode))
        common = {
            "model": self.scorer_model,
            "mode": mode,
            "batch_size": int(p.simulate_batch),
            "temperature": float(p.temperature),
            "top_logprobs": int(p.top_logprobs),
            "legend": data.legend,
            "api_base": self.scorer_api_base,
        }
        sim = Simulator(template=self._template(p.simulator_template), scale=10, **common)
        det = Simulator(template=self._template(p.detector_template), scale=1, **common)
        self._check_scorer_prompts(sim, det, data)
        ranker = None
        if p.ranking and any_work:
            template = self._template(p.ranking_template)
            ranker = Ranker(self.scorer_model, template, float(p.temperature), data.legend, self.scorer_api_base)
        ok = {lat: e for lat, e in explanations.items() if e["status"] == hygiene.OK}
        targets = shuffled_targets(list(ok), float(p.shuffled_fraction), int(p.shuffled_min), self.seed, self.sae_key)
        return _Scorers(sim, det, ranker, ok, set(targets))

    def _check_scorer_prompts(self, sim: Simulator, det: Simulator, data: AgentData) -> None:
        """One-line error before any scoring call when a batch of the longest lines cannot fit."""
        n = int(self.spec.simulate_batch)
        limit = budget.prompt_budget(self.scorer_model, 8 * n + 16, self.spec.max_prompt_tokens, "scorer")
        if limit is None:
            return
        longest = sorted((data.lines[int(s)] for s in data.needed), key=len, reverse=True)[:n]
        rows = [{"id": i, "line": line} for i, line in zip(labels(len(longest)), longest, strict=True)]
        words = "x" * int(self.spec.explanation_max_chars)
        for s in (sim, det):
            messages = s.template.render(explanation=words, slices=rows, legend=s.legend)
            budget.check_batch_prompt(self.scorer_model, messages, limit, n)

    def _job(self, latent: int, expl: dict, eset: ExampleSet, purpose: str) -> SimJob:
        order_seed = purpose_seed(self.seed, self.sae_key, latent, f"{purpose}-order")
        return SimJob(
            key=(latent, expl["explanation_id"], eset.set_id, purpose),
            explanation=expl["text"],
            slice_ids=eset.slice_ids,
            order_seed=order_seed,
        )

    def _work(self, latent: int, expl: dict, data: AgentData, scorers: _Scorers) -> LatentWork:
        """Every scoring call of one latent (explanation, shuffled baseline, detection, ranking)."""
        plan = _LatentPlan(expl)
        work = LatentWork(latent, context=plan)
        sim_set = data.sets[(latent, SIMULATE)]
        work.jobs.append((scorers.sim, self._job(latent, expl, sim_set, SIMULATE)))
        plan.roles.append("simulate")
        if self.spec.detect and (latent, DETECT) in data.sets:
            work.jobs.append((scorers.det, self._job(latent, expl, data.sets[(latent, DETECT)], DETECT)))
            plan.roles.append("detect")
        if latent in scorers.shuffled:
            donor = shuffled_donor(latent, list(scorers.ok), self.seed, self.sae_key)
            if donor is not None:
                plan.shuffled = shuffled_row(latent, scorers.ok[donor], donor, self.sae_key, self.inputs.summarize_key)
                work.jobs.append((scorers.sim, self._job(latent, plan.shuffled, sim_set, SIMULATE)))
                plan.roles.append("shuffled")
        if scorers.ranker is not None:
            candidates = {lat: e["text"] for lat, e in scorers.ok.items()}
            plan.ranking = scorers.ranker.question(
                latent, expl["text"], candidates, sim_set, data.lines, self.seed, self.sae_key
            )
            if plan.ranking is not None:
                work.extra.append(plan.ranking.request)
        return work

    def _score(self, works: list[LatentWork], data: AgentData, scorers: _Scorers) -> None:
        """Run every latent's scoring calls and emit each latent's rows as it finishes."""
        description = self._describe("score")
        finished = run_latents(
            self.gateway,
            works,
            data.lines,
            workers=max(2, self.concurrency),
            finish=lambda w: self._latent_rows(w, data, scorers),
        )
        if description is not None:
            from medsae.progress import track

            finished = track(finished, total=len(works), description=description, unit="latent")
        for work in finished:
            self._n_repairs += work.n_repairs
            if work.failure:  # one latent's failure never stops the others
                log.warning("latent %d: %s; not scored", work.latent, work.failure)
                rows, complete = {"explanations": [work.context.explanation]}, False
            else:
                rows, complete = work.result
            self._emit(rows, work.latent if complete else None)

    def _latent_rows(self, work: LatentWork, data: AgentData, scorers: _Scorers) -> tuple[Tables, bool]:
        """Rows of one finished latent, and whether it is complete (no failed call, no error)."""
        plan: _LatentPlan = work.context
        latent, expl = work.latent, plan.explanation
        rows = best_attribute_tables(latent, data, self.spec, self.sae_key, self.inputs.summarize_key)
        rows["explanations"].insert(0, expl)
        complete = True
        if plan.shuffled is not None:
            rows["explanations"].append(plan.shuffled)
        by_role = dict(zip(plan.roles, work.jobs, strict=True))
        twins: dict[str, np.ndarray | None] = {"simulate": None, "shuffled": None}
        if plan.shuffled is not None and _norm(plan.shuffled["text"]) != _norm(expl["text"]):
            twins = {"simulate": by_role["shuffled"][1].values, "shuffled": by_role["simulate"][1].values}
        for role, (sim, job) in by_role.items():
            if job.errors:
                log.warning(
                    "latent %d: %d %s call(s) failed (%s); not scored", latent, len(job.errors), role, job.errors[0]
                )
                complete = False
                continue
            rows["explanation_scores"] += self._job_scores(job, sim, data, role, twins.get(role))
        if plan.ranking is not None and scorers.ranker is not None:
            response = work.extra_responses[0]
            if response.error:
                complete = False
            else:
                score = ranking_score(response.text, plan.ranking.truth, plan.ranking.distractors)
                set_id = data.sets[(latent, SIMULATE)].set_id
                scorer = scorers.ranker.identity()
                row = score_row(expl["explanation_id"], set_id, score, scorer, self.spec, None, response.request_hash)
                rows["explanation_scores"].append(row)
        return rows, complete

    def _job_scores(
        self, job: SimJob, sim: Simulator, data: AgentData, role: str, twin: np.ndarray | None
    ) -> list[dict]:
        """Score rows of one simulation or detection job, marked degenerate when the predictions say so."""
        latent, expl_id, set_id, purpose = job.key
        truth = data.sets[(latent, purpose)].activations
        if role == "detect":
            scores = metrics.score_detection(job.values, truth, scale=sim.scale)
        else:
            seed = purpose_seed(self.seed, self.sae_key, latent, "bootstrap")
            scores = metrics.score_simulation(
                job.values, truth, int(self.spec.bootstrap), int(self.spec.permutations), seed
            )
        reason, _ = sanity.degenerate_reason(job.values, job.batch_positions, twin)
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


def _norm(text: str | None) -> str:
    return " ".join((text or "").lower().split())


def make_agent(inputs: AgentInputs, spec: InterpretSpec, cache_dir: Path, progress: Callable | None = None) -> Any:
    """The agent of the spec's protocol: :class:`Agent` (medsae) or the study's
    :class:`~medsae.interp.study.agent.StudyAgent`; both ``run(latents, sink) -> AgentResult``."""
    if spec.protocol == "study":
        from medsae.interp.study.agent import StudyAgent

        return StudyAgent(inputs, spec, cache_dir, progress=progress)
    return Agent(inputs, spec, cache_dir, progress=progress)
