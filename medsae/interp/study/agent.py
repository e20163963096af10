"""The interpret stage under ``interpret.protocol: study``: describe the study's latents and rank them 5-way.

Per selected latent (best first, from the summarize stage's ``study_selection.parquet``):

1. **describe** — the explainer model names one concept from the latent's 5 diverse train samples
   (``study_explain`` set), and from each of its 4 distractors' own train samples. A latent is described
   once per run however many latents draw it as a distractor, and identical requests are answered from
   the LLM cache, so a distractor's description equals its own explanation when it is selected too.
2. **rank** — the judge (``scorer_model``; the study used one vision-language model for both roles)
   ranks the five descriptions on the latent's 5 diverse val samples (``study_judge`` set).

Rows: the latent's description is an ``explanations`` row (kind ``explanation``, status by
:mod:`medsae.interp.hygiene`, informational: every non-empty description is ranked, as in the study);
its rank a score row (method ``ranking_study_top2``, the rank and parse outcome in ``extra_json``).
Distractor descriptions are no rows of their own; they are named in the score's ``extra_json`` and
all descriptions go to ``study_concepts.json`` (the study's ``concept_cache.json``). A latent whose
explainer, distractor or judge call failed is not finished: a rerun asks again (finished calls come
from the cache). Latents are worked in batches whose rows reach the sink as each batch finishes.
medsae's simulation scoring does not run under this protocol (the study has none); run the medsae
protocol on the same SAE for it.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medsae.errors import MedsaeError
from medsae.interp import hygiene
from medsae.interp.agent_base import AgentBase
from medsae.interp.config import InterpretSpec
from medsae.interp.explainer import supports_vision
from medsae.interp.inputs import AgentInputs, Sets, load_slice_tables, read_summary
from medsae.interp.journal import RowSink, Tables, deduplicated, empty_tables
from medsae.interp.llm import LLMRequest, LLMResponse
from medsae.interp.llm.offline import OFFLINE_PREFIX
from medsae.interp.rows import EXPLANATION, explanation_row, score_row
from medsae.interp.run_stats import run_metrics, run_summary
from medsae.interp.study import judge
from medsae.interp.study.blocks import Sample, sample_of
from medsae.interp.study.prompting import (
    EXPLAINER_MAX_TOKENS,
    EXPLAINER_TEMPERATURE,
    JUDGE_MAX_TOKENS,
    JUDGE_TEMPERATURE,
    StudyPrompter,
    clean_description,
)
from medsae.interp.study.summarize import STUDY_EXPLAIN, STUDY_JUDGE, read_selection
from medsae.stage import Metric

log = logging.getLogger("medsae")

#: Latents worked per batch (their rows reach the sink when the batch is done): a multiple of the concurrency.
BATCH_PER_CALL_SLOT = 4
CONCEPTS_FILE = "study_concepts.json"


class StudyAgent(AgentBase):
    """One run of the study's auto-interpretation (same interface as :class:`medsae.interp.agent.Agent`)."""

    def __init__(self, inputs: AgentInputs, spec: InterpretSpec, cache_dir: Path, progress: Callable | None = None):
        super().__init__(inputs, spec, cache_dir, progress)
        self.concepts: dict[int, str] = {}  # latent -> its description (targets and distractors)
        self._responses: dict[int, LLMResponse] = {}  # latent -> its explainer answer

    # ---------------------------------------------------------------- setup

    def _prompter(self, model: str, api_base: str | None, template: str, temperature: float, max_tokens: int):
        images = bool(self.spec.study_images) and not model.startswith(OFFLINE_PREFIX)
        if images and not supports_vision(model):
            log.warning(
                "interpret.protocol study sends images, and litellm does not list %s as accepting them; "
                "use a vision-language model (or study_images: false)",
                model,
            )
        return StudyPrompter(
            model=model,
            template=self._template(template),
            temperature=temperature,
            max_tokens=max_tokens,
            api_base=api_base,
            slices_dir=self.inputs.slices_dir if images else None,
            image_size=int(self.spec.study_image_size),
        )

    # ---------------------------------------------------------------- main

    def run(self, latents_wanted: Sequence[int] | None = None, sink: RowSink | None = None) -> Any:
        """Describe and rank the selected latents (``latents_wanted``: only these of them)."""
        from medsae.interp.agent import AgentResult

        t0 = time.perf_counter()
        spec = self.spec
        self._tables, self._finished, self._sink = empty_tables(), set(), sink or RowSink()
        self.gateway.check_model(spec.explainer_model, spec.explainer_api_base)
        self.gateway.check_model(spec.scorer_model, spec.scorer_api_base)
        chosen_frame = read_selection(self.inputs.summarize_dir)
        chosen = [int(x) for x in chosen_frame["latent"]]
        if latents_wanted is not None:
            wanted = [int(x) for x in latents_wanted]
            skipped = [x for x in wanted if x not in set(chosen)]
            if skipped:
                log.warning("latents not among the study's selected latents: %s", skipped)
            chosen = [x for x in wanted if x in set(chosen)]
        if not chosen:
            raise MedsaeError(f"{self.inputs.summarize_dir}: no latent selected for the study's protocol")
        distractors = dict(zip(chosen_frame["latent"].astype(int), chosen_frame["distractors"], strict=True))
        _, sets = read_summary(self.inputs.summarize_dir)
        try:
            self._run(chosen, distractors, sets)
        finally:
            self._emit({})
            self._sink.flush()
        tables = deduplicated(self._tables)
        ranking = ranking_outcome(tables, chosen)
        summary = (
            {"protocol": "study", "explainer_model": spec.explainer_model, "scorer_model": spec.scorer_model}
            | run_summary(tables, chosen, self._finished, self.gateway, 0)
            | {"study_ranking": ranking, "seconds": round(time.perf_counter() - t0, 2)}
        )
        metrics = run_metrics(tables, int(spec.seed)) + ranking_metrics(ranking)
        files = {CONCEPTS_FILE: {str(k): v for k, v in sorted(self.concepts.items())}}
        return AgentResult(tables=tables, summary=summary, metrics=metrics, files=files)

    def prefetch(self, part: Sequence[int], phase: str) -> None:
        """Ask the questions of the latents ``part`` so that their answers are in the LLM cache (the Ray
        executor's split of a stage; see :meth:`medsae.interp.agent.Agent.prefetch`). Each question here
        depends on one latent only (distractors are fixed by the summarize stage), so the ``"explain"``
        phase asks them all and the ``"score"`` phase has nothing left to ask."""
        if phase not in ("explain", "score"):
            raise ValueError(f"prefetch phase {phase!r}: 'explain' or 'score'")
        if phase == "explain":
            self.run(latents_wanted=part)

    def _run(self, chosen: list[int], distractors: dict[int, list[int]], sets: Sets) -> None:
        spec = self.spec
        done, earlier = self._sink.finished()
        done &= set(chosen)
        if done:
            log.warning("resuming: %d of %d latents were finished by an interrupted run", len(done), len(chosen))
            for table, rows in earlier.items():
                self._tables.setdefault(table, []).extend(rows)
            self._finished |= done
            self._recall_concepts(earlier)
        todo = [lat for lat in chosen if lat not in done]
        describer = self._prompter(
            spec.explainer_model,
            spec.explainer_api_base,
            spec.study_explainer_template,
            EXPLAINER_TEMPERATURE,
            EXPLAINER_MAX_TOKENS,
        )
        judge_prompter = self._prompter(
            spec.scorer_model, spec.scorer_api_base, spec.study_judge_template, JUDGE_TEMPERATURE, JUDGE_MAX_TOKENS
        )
        needed = [s for lat in todo for s in (sets[(lat, STUDY_EXPLAIN)], sets[(lat, STUDY_JUDGE)])]
        needed += [sets[(d, STUDY_EXPLAIN)] for lat in todo for d in distractors[lat]]
        samples = SampleSource(self.inputs.slices_dir, np.unique(np.concatenate([s.slice_ids for s in needed] or [[]])))
        size = max(8, BATCH_PER_CALL_SLOT * int(spec.concurrency))
        batches = [todo[i : i + size] for i in range(0, len(todo), size)]
        if self.progress is not None and batches:
            batches = self.progress(batches, len(batches), "study: describe + rank")
        for batch in batches:
            self._describe(sorted({x for lat in batch for x in (lat, *distractors[lat])}), describer, sets, samples)
            self._rank(batch, distractors, judge_prompter, sets, samples)
            self._emit_prompts()

    def _recall_concepts(self, earlier: Tables) -> None:
        """Descriptions of an interrupted run's finished latents and their distractors (for the concepts file)."""
        for row in earlier.get("explanations", []):
            if row["kind"] == EXPLANATION:
                self.concepts.setdefault(int(row["latent"]), row["text"] or "")
        for row in earlier.get("explanation_scores", []):
            if row["method"] == judge.METHOD:
                extra = json.loads(row["extra_json"] or "{}")
                for latent, text in zip(extra.get("distractors", []), extra.get("distractor_texts", []), strict=False):
                    self.concepts.setdefault(int(latent), text)

    # ---------------------------------------------------------------- describe

    def _describe(self, latents: list[int], prompter: StudyPrompter, sets: Sets, samples: SampleSource) -> None:
        """Explainer answers of the ``latents`` not described yet in this run."""
        new = [lat for lat in latents if lat not in self._responses]
        requests = []
        for lat in new:
            eset = sets[(lat, STUDY_EXPLAIN)]
            requests.append(prompter.request(samples.of(eset), eset.slice_ids))
        for lat, response in zip(new, self.gateway.complete_many(requests), strict=True):
            if response.error:
                continue  # no answer: a later run asks again (the failure is an llm_calls row)
            self._responses[lat] = response
            self.concepts[lat] = clean_description(response.text)

    def _explanation(self, latent: int, sets: Sets) -> dict:
        spec, response = self.spec, self._responses[latent]
        text = self.concepts[latent]
        eset = sets[(latent, STUDY_EXPLAIN)]
        settings = {
            "protocol": "study",
            "temperature": EXPLAINER_TEMPERATURE,
            "max_tokens": EXPLAINER_MAX_TOKENS,
            "images": bool(spec.study_images) and not spec.explainer_model.startswith(OFFLINE_PREFIX),
            "image_size": int(spec.study_image_size),
        }
        return explanation_row(
            latent=latent,
            sae_key=self.sae_key,
            summarize_key=self.inputs.summarize_key,
            model=spec.explainer_model,
            api_base=spec.explainer_api_base,
            template_hash=self._template(spec.study_explainer_template).hash,
            settings=settings,
            set_id=eset.set_id,
            request_hash=response.request_hash,
            text=text or None,
            status=hygiene.explanation_status(text, int(spec.explanation_max_words), int(spec.explanation_max_chars)),
            n_examples=len(eset.slice_ids),
        )

    # ---------------------------------------------------------------- rank

    def _rank(
        self,
        batch: list[int],
        distractors: dict[int, list[int]],
        prompter: StudyPrompter,
        sets: Sets,
        samples: SampleSource,
    ) -> None:
        """Judge every latent of ``batch`` whose five descriptions exist; emit each latent's rows."""
        questions: list[tuple[int, list[int], LLMRequest]] = []
        for lat in batch:
            if lat not in self._responses:
                continue  # its explainer call failed: no row, a rerun asks again
            others = distractors[lat]
            if not others:  # too few eligible distractors: described, not ranked (as the study)
                self._emit({"explanations": [self._explanation(lat, sets)]}, lat)
                continue
            if any(d not in self.concepts for d in others):
                self._emit({"explanations": [self._explanation(lat, sets)]})  # a distractor's call failed
                continue
            order = judge.candidate_order(int(self.spec.seed), self.sae_key, lat)
            texts = [self.concepts[lat]] + [self.concepts[d] for d in others]
            shown = [{"letter": judge.LETTERS[i], "text": texts[k]} for i, k in enumerate(order)]
            jset = sets[(lat, STUDY_JUDGE)]
            request = prompter.request(samples.of(jset), jset.slice_ids, candidates=shown)
            questions.append((lat, order, request))
        answers = self.gateway.complete_many([q[2] for q in questions])
        for (lat, order, _), answer in zip(questions, answers, strict=True):
            expl = self._explanation(lat, sets)
            if answer.error:
                self._emit({"explanations": [expl]})
                continue
            score = judge.ranking_score(answer.text, order, distractors[lat])
            score.extra["distractor_texts"] = [self.concepts[d] for d in distractors[lat]]
            scorer = {
                "model": prompter.model,
                "mode": judge.SCORER_MODE,
                "api_base": prompter.api_base,
                "template_hash": prompter.template.hash,
                "temperature": prompter.temperature,
                "images": prompter.slices_dir is not None,
            }
            set_id = sets[(lat, STUDY_JUDGE)].set_id
            row = score_row(expl["explanation_id"], set_id, score, scorer, self.spec, None, answer.request_hash)
            self._emit({"explanations": [expl], "explanation_scores": [row]}, lat)


class SampleSource:
    """The study's view of the slices a run shows: metadata and structures, read once."""

    def __init__(self, slices_dir: Path, slice_ids: np.ndarray):
        slices, structures, _ = load_slice_tables(slices_dir)
        ids = np.asarray(slice_ids, dtype=np.int64)
        self.rows = slices.loc[ids]
        present = structures[structures["slice_id"].isin(ids) & (structures["pixels"] > 0)]
        self.structures: dict[int, list[str]] = {int(k): list(v) for k, v in present.groupby("slice_id")["structure"]}

    def of(self, eset: Any) -> list[Sample]:
        """The samples of an example set, in its order, with their activations."""
        return [
            sample_of(self.rows.loc[int(s)], self.structures.get(int(s), []), float(a))
            for s, a in zip(eset.slice_ids, eset.activations, strict=True)
        ]


def ranking_outcome(tables: Tables, chosen: Sequence[int]) -> dict[str, Any]:
    """The study's evaluation metrics over the ranked latents of ``chosen`` (one score per latent)."""
    latent_of = {r["explanation_id"]: r["latent"] for r in tables["explanations"] if r["kind"] == EXPLANATION}
    wanted = set(chosen)
    ranks, parsed = [], []
    for r in tables["explanation_scores"]:
        if r["method"] == judge.METHOD and latent_of.get(r["explanation_id"]) in wanted:
            extra = json.loads(r["extra_json"] or "{}")
            ranks.append(int(extra["rank"]))
            parsed.append(bool(extra["parse_success"]))
    return judge.ranking_summary(ranks, parsed)


def ranking_metrics(outcome: dict[str, Any]) -> list[Metric]:
    """Stage metrics of the study's ranking (split val: the judge's samples), named ``ranking_study_*``."""
    n = int(outcome["n_evaluated"])
    extra = {"rank_distribution": outcome["rank_distribution"]}
    return [
        Metric("ranking_study_success_rate", outcome["success_rate"], "val", n, extra={"chance": judge.CHANCE_SUCCESS}),
        Metric("ranking_study_top1_rate", outcome["top1_rate"], "val", n, extra={"chance": 0.2}),
        Metric("ranking_study_mean_rank", outcome["mean_rank"], "val", n, extra={"chance": judge.CHANCE_MEAN_RANK}),
        Metric("ranking_study_median_rank", outcome["median_rank"], "val", n, extra=extra),
        Metric("ranking_study_parse_failures", float(outcome["n_parse_failures"]), "val", n),
    ]
