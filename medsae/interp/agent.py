"""The auto-interpretation agent: explain, simulate, score and version every eligible latent.

Three rounds of LLM calls, each sent concurrently through the gateway (cached, retried, logged):

1. **explain** — one call per latent with its explain set (explainer model);
2. **score** — simulation batches of the held-out set for every explanation and for the shuffled
   baseline, detection batches, and the study's 5-way ranking (all with the reference scorer);
3. **repair** — one re-ask for each malformed batch.

Every row is content-addressed: an explanation's id hashes (latent, SAE key, explainer model, API
base, template hash, explainer params, example set); a score's id hashes (explanation id, method,
the scorer's identity: model, template hash, mode, scale, batch size ... and the example set). So
a rerun yields the same ids (inserted with INSERT OR IGNORE: nothing new), and a new explainer or
scorer adds rows beside the old ones. Calls that failed (provider errors, budget) produce no row,
so a later run can fill them in; a parse failure is deterministic and is stored as such.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medsae.errors import MedsaeError, MissingInputError
from medsae.interp import baselines, explainer, scoring, simulator
from medsae.interp.metadata import Term, format_lines, legend_lines, slice_attributes
from medsae.interp.prompts import Template, load_template
from medsae.interp.sampling import DETECT, EXPLAIN, SIMULATE, purpose_seed, sha256_json
from medsae.stage import Metric

log = logging.getLogger("medsae")

EXPLANATION, SHUFFLED, BEST_ATTRIBUTE = "explanation", "shuffled", "best_attribute"
N_RANKING_SAMPLES, N_DISTRACTORS = 5, 4
_LETTER = re.compile(r"\b([A-E])\b")


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


def _json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


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
            log.warning(
                "latents not eligible for explanation (dead, too rare or no example sets): %s", skipped
            )
        chosen = [x for x in wanted if x in eligible]
    if max_latents is not None:
        chosen = chosen[:max_latents]
    return chosen


def load_slice_tables(slices_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """(slices indexed by slice_id, structure areas, structure vocabulary) of a slices folder."""
    from medsae.data.index import load_slices, load_structures, load_vocab

    slices = load_slices(slices_dir).set_index("slice_id", drop=False)
    return slices, load_structures(slices_dir), load_vocab(slices_dir)


# --------------------------------------------------------------------------- the run


class Agent:
    """One run: an explainer model, the reference scorer, the sets of the summarize stage."""

    def __init__(
        self,
        inputs: AgentInputs,
        params: dict[str, Any],
        cache_dir: Path,
        progress: Callable | None = None,
    ):
        import medsae.interp.baseline_provider  # noqa: F401  registers medsae/baseline
        from medsae.interp.llm import LLMGateway

        self.inputs, self.params = inputs, params
        self.seed = int(params["seed"])
        self.sae_key = inputs.sae_key
        self.explainer_model = str(params["explainer_model"])
        self.scorer_model = str(params["scorer_model"])
        self.explainer_api_base = params.get("explainer_api_base") or None
        self.scorer_api_base = params.get("scorer_api_base") or None
        self.gateway = LLMGateway(
            cache_dir,
            mode=params.get("llm_mode", "record"),
            concurrency=int(params.get("concurrency", 8)),
            max_retries=int(params.get("max_retries", 4)),
            timeout_s=float(params.get("timeout_s", 120.0)),
            max_cost_usd=params.get("max_cost_usd"),
        )
        self.progress = progress
        self.templates: dict[str, Template] = {}

    # ---------------------------------------------------------------- helpers

    def _template(self, name: str) -> Template:
        if name not in self.templates:
            self.templates[name] = load_template(name)
        return self.templates[name]

    def _describe(self, text: str) -> str | None:
        quiet = os.environ.get("MEDSAE_QUIET", "") not in ("", "0")
        return None if quiet else text

    # ---------------------------------------------------------------- main

    def run(self, latents_wanted: Sequence[int] | None = None) -> AgentResult:
        t0 = time.perf_counter()
        p = self.params
        if self.explainer_model == self.scorer_model and not self.scorer_model.startswith("medsae/"):
            log.warning(
                "explainer and reference scorer are the same model (%s): scores may be self-consistent "
                "rather than faithful; choose --scorer",
                self.scorer_model,
            )
        latents_df, sets = _read_summary(self.inputs.summarize_dir)
        chosen = select_latents(latents_df, sets, latents_wanted, p.get("max_latents"))
        if not chosen:
            raise MedsaeError(f"{self.inputs.summarize_dir}: no latent is eligible for explanation")
        slices, structures, vocab = load_slice_tables(self.inputs.slices_dir)
        attrs = slice_attributes(slices)
        legend = legend_lines(attrs, vocab)
        chosen_set = set(chosen)
        needed = np.unique(
            np.concatenate([s["slice_ids"] for (lat, _), s in sets.items() if lat in chosen_set])
        )
        lines = format_lines(slices, structures, needed)

        rows_expl, rows_score = [], []
        explanations = self._explain(chosen, sets, lines, rows_expl)
        self._score(
            chosen, sets, lines, legend, explanations, latents_df, attrs, structures, rows_expl, rows_score
        )

        call_rows = [r for r in self.gateway.drain_call_rows() if not r.get("cached")]
        prompts = [t.prompt_row() for t in self.templates.values()]
        summary = self._summary(chosen, rows_expl, rows_score, time.perf_counter() - t0)
        return AgentResult(
            tables={
                "explanations": rows_expl,
                "explanation_scores": rows_score,
                "llm_calls": call_rows,
                "prompts": prompts,
            },
            summary=summary,
            metrics=self._metrics(rows_expl, rows_score),
        )

    # ---------------------------------------------------------------- round 1: explain

    def _explain(
        self, chosen: list[int], sets: dict, lines: dict[int, str], rows: list[dict]
    ) -> dict[int, dict]:
        from medsae.interp.llm import LLMRequest

        p = self.params
        vision = bool(p["vision"]) and explainer.supports_vision(self.explainer_model)
        if bool(p["vision"]) and not vision:
            log.warning(
                "vision is on but %s does not accept images: using the text explainer", self.explainer_model
            )
        template = self._template(p["vision_template"] if vision else p["explainer_template"])
        settings = explainer.request_params(p) | {"vision": vision}
        requests, meta = [], []
        for latent in chosen:
            eset = sets[(latent, EXPLAIN)]
            examples = explainer.explain_examples(eset["slice_ids"], eset["activations"], lines)
            image = explainer.montage(self.inputs.slices_dir, examples) if vision else None
            messages = explainer.render_explainer(template, examples, image)
            requests.append(
                LLMRequest(
                    model=self.explainer_model,
                    messages=messages,
                    temperature=float(p["temperature"]),
                    max_tokens=int(p["explainer_max_tokens"]),
                    seed=0,
                    template_hash=template.hash,
                    api_base=self.explainer_api_base,
                )
            )
            meta.append((latent, eset["set_id"]))
        responses = self.gateway.complete_many(requests, description=self._describe("explain"))
        out: dict[int, dict] = {}
        for (latent, set_id), resp in zip(meta, responses, strict=True):
            if resp.error:
                continue  # no row: a later run can fill it in
            text = explainer.parse_explanation(resp.text)
            ident = {
                "latent": latent,
                "sae_key": self.sae_key,
                "explainer_model": self.explainer_model,
                "api_base": self.explainer_api_base,
                "template_hash": template.hash,
                "params": settings,
                "example_set_id": set_id,
                "candidate": 0,
                "request_hash": resp.request_hash,  # everything the request held, incl. rendered examples
            }
            row = {
                "explanation_id": sha256_json(ident),
                "stage_key": self.inputs.summarize_key,
                "sae_key": self.sae_key,
                "latent": latent,
                "explainer_model": self.explainer_model,
                "template_hash": template.hash,
                "params_json": _json(settings | {"api_base": self.explainer_api_base}),
                "example_set_id": set_id,
                "text": text,
                "status": "ok" if text else "parse_failed",
                "kind": EXPLANATION,
                "request_hash": resp.request_hash,
            }
            rows.append(row)
            out[latent] = row
        return out

    # ---------------------------------------------------------------- round 2+3: score

    def _simulators(self, legend: list[str]) -> tuple[simulator.Simulator, simulator.Simulator]:
        p = self.params
        mode = simulator.resolve_mode(self.scorer_model, str(p["simulation_mode"]))
        common = {
            "model": self.scorer_model,
            "mode": mode,
            "batch_size": int(p["simulate_batch"]),
            "temperature": float(p["temperature"]),
            "top_logprobs": int(p["top_logprobs"]),
            "legend": legend,
            "api_base": self.scorer_api_base,
        }
        sim = simulator.Simulator(template=self._template(p["simulator_template"]), scale=10, **common)
        det = simulator.Simulator(template=self._template(p["detector_template"]), scale=1, **common)
        return sim, det

    def _score(
        self,
        chosen: list[int],
        sets: dict,
        lines: dict[int, str],
        legend: list[str],
        explanations: dict[int, dict],
        latents_df: pd.DataFrame,
        attrs: pd.DataFrame,
        structures: pd.DataFrame,
        rows_expl: list[dict],
        rows_score: list[dict],
    ) -> None:
        p = self.params
        sim, det = self._simulators(legend)
        ok = {lat: e for lat, e in explanations.items() if e["status"] == "ok"}
        sim_jobs, det_jobs = [], []
        for latent, expl in ok.items():
            sim_jobs.append(self._job(latent, expl, sets[(latent, SIMULATE)], SIMULATE))
            if p["detect"] and (latent, DETECT) in sets:
                det_jobs.append(self._job(latent, expl, sets[(latent, DETECT)], DETECT))
        targets = baselines.shuffled_targets(
            list(ok), float(p["shuffled_fraction"]), int(p["shuffled_min"]), self.seed, self.sae_key
        )
        for latent in targets:
            donor = baselines.shuffled_donor(latent, list(ok), self.seed, self.sae_key)
            if donor is None:
                continue
            row = self._shuffled_row(latent, ok[donor], donor)
            rows_expl.append(row)
            sim_jobs.append(self._job(latent, row, sets[(latent, SIMULATE)], SIMULATE))
        rank_reqs, rank_meta = self._ranking_requests(ok, sets, lines, legend) if p["ranking"] else ([], [])

        # one concurrent round for everything, then one round of repairs
        rank_responses = simulator.run_jobs(
            self.gateway, [(sim, sim_jobs), (det, det_jobs)], lines, rank_reqs, self._describe("score")
        )
        for job in sim_jobs:
            self._score_rows(job, sim, sets, rows_score, detection=False)
        for job in det_jobs:
            self._score_rows(job, det, sets, rows_score, detection=True)
        for (latent, expl, truth_letter), resp in zip(rank_meta, rank_responses, strict=True):
            if resp.error:
                continue
            rows_score.append(self._ranking_row(latent, expl, truth_letter, resp, sets))
        self._best_attribute(chosen, sets, latents_df, attrs, structures, rows_expl, rows_score)

    def _job(self, latent: int, expl: dict, eset: dict, purpose: str) -> simulator.SimJob:
        order_seed = purpose_seed(self.seed, self.sae_key, latent, f"{purpose}-order")
        return simulator.SimJob(
            key=(latent, expl["explanation_id"], eset["set_id"], purpose),
            explanation=expl["text"],
            slice_ids=eset["slice_ids"],
            order_seed=order_seed,
        )

    def _shuffled_row(self, latent: int, donor_row: dict, donor: int) -> dict:
        ident = {
            "kind": SHUFFLED,
            "latent": latent,
            "sae_key": self.sae_key,
            "donor": donor_row["explanation_id"],
        }
        return {
            "explanation_id": sha256_json(ident),
            "stage_key": self.inputs.summarize_key,
            "sae_key": self.sae_key,
            "latent": latent,
            "explainer_model": donor_row["explainer_model"],
            "template_hash": donor_row["template_hash"],
            "params_json": _json(
                {"donor_latent": donor, "donor_explanation_id": donor_row["explanation_id"]}
            ),
            "example_set_id": donor_row["example_set_id"],
            "text": donor_row["text"],
            "status": "baseline",
            "kind": SHUFFLED,
            "request_hash": donor_row["request_hash"],
        }

    def _score_row(
        self, expl_id: str, set_id: str, score: scoring.Score, scorer: dict, extra: dict, requests: str = ""
    ) -> dict:
        ident = {
            "requests": requests,  # digest of the scorer's request hashes (empty for rule scores)
            "explanation_id": expl_id,
            "method": score.method,
            "scorer": scorer,
            "example_set_id": set_id,
            "bootstrap": int(self.params["bootstrap"]),
            "permutations": int(self.params["permutations"]),
        }
        return {
            "score_id": sha256_json(ident),
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
            "extra_json": _json(score.extra | extra) if (score.extra or extra) else None,
        }

    def _score_rows(
        self, job: simulator.SimJob, sim: simulator.Simulator, sets: dict, rows: list[dict], detection: bool
    ) -> None:
        latent, expl_id, set_id, purpose = job.key
        if job.errors:
            log.warning(
                "latent %d: %d %s call(s) failed (%s); not scored",
                latent,
                len(job.errors),
                purpose,
                job.errors[0],
            )
            return
        truth = sets[(latent, purpose)]["activations"]
        if detection:
            scores = scoring.score_detection(job.values, truth, scale=sim.scale)
        else:
            seed = purpose_seed(self.seed, self.sae_key, latent, "bootstrap")
            scores = scoring.score_simulation(
                job.values, truth, int(self.params["bootstrap"]), int(self.params["permutations"]), seed
            )
        extra = (
            {"n_repaired": job.n_repaired, "n_ev_fallback": job.n_fallback}
            if (job.n_repaired or job.n_fallback)
            else {}
        )
        digest = sha256_json(job.request_hashes)
        for score in scores:
            rows.append(self._score_row(expl_id, set_id, score, sim.identity(), extra, digest))

    # ---------------------------------------------------------------- ranking (study 7.4)

    def _ranking_requests(
        self, ok: dict[int, dict], sets: dict, lines: dict[int, str], legend: list[str]
    ) -> tuple[list, list]:
        from medsae.interp.llm import LLMRequest

        template = self._template(self.params["ranking_template"])
        requests, meta = [], []
        for latent, expl in ok.items():
            others = baselines.distractors(latent, list(ok), N_DISTRACTORS, self.seed, self.sae_key)
            if not others:
                continue
            eset = sets[(latent, SIMULATE)]
            top = np.argsort(-eset["activations"], kind="stable")[:N_RANKING_SAMPLES]
            top = top[eset["activations"][top] > 0]
            samples = [
                {"id": f"X{i + 1:02d}", "line": lines[int(eset["slice_ids"][j])]} for i, j in enumerate(top)
            ]
            texts = [expl["text"]] + [ok[o]["text"] for o in others]
            order = np.random.default_rng(
                purpose_seed(self.seed, self.sae_key, latent, "ranking-order")
            ).permutation(5)
            letters = "ABCDE"
            candidates = [{"letter": letters[i], "text": texts[k]} for i, k in enumerate(order)]
            truth = letters[int(np.flatnonzero(order == 0)[0])]
            messages = template.render(samples=samples, candidates=candidates, legend=legend)
            requests.append(
                LLMRequest(
                    model=self.scorer_model,
                    messages=messages,
                    temperature=float(self.params["temperature"]),
                    max_tokens=50,
                    seed=0,
                    template_hash=template.hash,
                    api_base=self.scorer_api_base,
                )
            )
            meta.append((latent, expl | {"_distractors": others}, truth))
        self._ranking_template = template
        return requests, meta

    def _ranking_row(self, latent: int, expl: dict, truth: str, resp: Any, sets: dict) -> dict:
        """The study's score: 1 when the true explanation is ranked first or second of five."""
        text = resp.text
        found = _LETTER.findall((text or "").upper())
        ranking = list(dict.fromkeys(found))
        ok = len(found) == 5 and len(ranking) == 5
        rank = ranking.index(truth) + 1 if ok else None
        score = scoring.Score(
            "ranking_top2",
            None if rank is None else float(rank <= 2),
            1 if ok else 0,
            0 if ok else 1,
            extra={"rank": rank, "distractors": expl["_distractors"]}
            | ({} if ok else {"reason": "parse_failed"}),
        )
        scorer = {
            "model": self.scorer_model,
            "mode": "ranking",
            "api_base": self.scorer_api_base,
            "template_hash": self._ranking_template.hash,
            "temperature": float(self.params["temperature"]),
        }
        set_id = sets[(latent, SIMULATE)]["set_id"]
        return self._score_row(expl["explanation_id"], set_id, score, scorer, {}, resp.request_hash)

    # ---------------------------------------------------------------- best single attribute

    def _best_attribute(
        self,
        chosen: list[int],
        sets: dict,
        latents_df: pd.DataFrame,
        attrs: pd.DataFrame,
        structures: pd.DataFrame,
        rows_expl: list[dict],
        rows_score: list[dict],
    ) -> None:
        summaries = dict(zip(latents_df["latent"].astype(int), latents_df["top_structures"], strict=True))
        scorer = {
            "model": baselines.RULE_MODEL,
            "mode": simulator.RULE,
            "template_hash": baselines.RULE_TEMPLATE,
        }
        for latent in chosen:
            info = json.loads(summaries.get(latent) or "{}").get("best_attribute")
            if not info:
                continue
            term = Term.from_key(info["term"])
            eset = sets[(latent, SIMULATE)]
            ident = {
                "kind": BEST_ATTRIBUTE,
                "latent": latent,
                "sae_key": self.sae_key,
                "term": term.key,
                "example_set_id": sets[(latent, EXPLAIN)]["set_id"],
            }
            expl_id = sha256_json(ident)
            rows_expl.append(
                {
                    "explanation_id": expl_id,
                    "stage_key": self.inputs.summarize_key,
                    "sae_key": self.sae_key,
                    "latent": latent,
                    "explainer_model": baselines.RULE_MODEL,
                    "template_hash": baselines.RULE_TEMPLATE,
                    "params_json": _json({"term": term.key, "r_explain": info.get("r_explain")}),
                    "example_set_id": sets[(latent, EXPLAIN)]["set_id"],
                    "text": term.key,
                    "status": "baseline",
                    "kind": BEST_ATTRIBUTE,
                    "request_hash": None,
                }
            )
            pred = baselines.rule_predictions(term, eset["slice_ids"], attrs, structures)
            seed = purpose_seed(self.seed, self.sae_key, latent, "bootstrap")
            for score in scoring.score_simulation(
                pred,
                eset["activations"],
                int(self.params["bootstrap"]),
                int(self.params["permutations"]),
                seed,
            ):
                rows_score.append(self._score_row(expl_id, eset["set_id"], score, scorer, {}))

    # ---------------------------------------------------------------- reporting

    def _summary(
        self, chosen: list[int], rows_expl: list[dict], rows_score: list[dict], seconds: float
    ) -> dict:
        kinds = {r["explanation_id"]: r["kind"] for r in rows_expl}
        by_kind: dict[str, list[float | None]] = {}
        for r in rows_score:
            if r["method"] == "pearson":
                by_kind.setdefault(kinds.get(r["explanation_id"], "?"), []).append(r["value"])
        explained = [r for r in rows_expl if r["kind"] == EXPLANATION]
        return {
            "explainer_model": self.explainer_model,
            "scorer_model": self.scorer_model,
            "latents": len(chosen),
            "explained": sum(r["status"] == "ok" for r in explained),
            "parse_failed": sum(r["status"] == "parse_failed" for r in explained),
            "call_failures": len(chosen) - len(explained),
            "llm_calls": self.gateway.n_calls,
            "cache_hits": self.gateway.n_cache_hits,
            "cost_usd": round(self.gateway.total_cost_usd, 6),
            "pearson": {
                k: scoring.summarize_values(np.array(v, dtype=float)) for k, v in sorted(by_kind.items())
            },
            "seconds": round(seconds, 2),
        }

    def _metrics(self, rows_expl: list[dict], rows_score: list[dict]) -> list[Metric]:
        kinds = {r["explanation_id"]: (r["kind"], r["explainer_model"]) for r in rows_expl}
        groups: dict[tuple[str, str, str], list[float | None]] = {}
        for r in rows_score:
            kind, model = kinds.get(r["explanation_id"], ("?", "?"))
            groups.setdefault((r["method"], kind, model), []).append(r["value"])
        out = []
        for (method, kind, model), values in sorted(groups.items()):
            agg = scoring.summarize_values(np.array(values, dtype=float))
            out.append(
                Metric(
                    name=f"explanation_{method}_mean",
                    value=agg["mean"],
                    n=agg["n"],
                    target=f"{kind}:{model}",
                    extra={k: v for k, v in agg.items() if k not in ("mean", "n")},
                )
            )
        return out
