"""The study's 5-way ranking: can the scorer pick a latent's explanation out of five? (docs/method.md#scoring)

One call per latent: the latent's strongest firing slices of its simulation set (up to
``N_RANKING_SAMPLES``) and five candidate explanations — its own and those of ``N_DISTRACTORS``
seeded-random other latents, in a seeded order under the letters A-E. The scorer answers with the
letters in ranked order; the score ``ranking_top2`` is 1 when the true explanation is ranked first
or second (chance 0.4), NULL when the answer names the five letters other than exactly once each.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medsae.interp.llm import LLMRequest
from medsae.interp.prompts import Template
from medsae.interp.sampling import ExampleSet, purpose_rng, purpose_seed
from medsae.interp.scorers.metrics import Score

RANKING = "ranking"  # the scorer mode of ranking scores
N_RANKING_SAMPLES, N_DISTRACTORS = 5, 4
LETTERS = "ABCDE"
_LETTER = re.compile(r"\b([A-E])\b")


def distractors(latent: int, candidates: Sequence[int], k: int, seed: int, sae_key: str) -> list[int]:
    """``k`` seeded-random other latents (the study's ranking distractors); fewer if not enough."""
    others = sorted(int(c) for c in candidates if int(c) != int(latent))
    if len(others) < k:
        return []
    rng = purpose_rng(seed, sae_key, latent, "ranking-distractors")
    return sorted(int(x) for x in rng.choice(others, size=k, replace=False))


@dataclass
class RankingQuestion:
    """One latent's ranking call and what its answer is checked against."""

    request: LLMRequest
    truth: str  # the letter of the latent's own explanation
    distractors: list[int]  # the latents whose explanations are the other four candidates


@dataclass
class Ranker:
    """The ranking scorer: model, template and sampling settings (its identity enters every score id)."""

    model: str
    template: Template
    temperature: float = 0.0
    legend: list[str] = field(default_factory=list)
    api_base: str | None = None

    def identity(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "mode": RANKING,
            "api_base": self.api_base,
            "template_hash": self.template.hash,
            "temperature": self.temperature,
        }

    def question(
        self,
        latent: int,
        explanation: str,
        candidates: dict[int, str],
        eset: ExampleSet,
        lines: dict[int, str],
        seed: int,
        sae_key: str,
    ) -> RankingQuestion | None:
        """The call for ``latent`` (simulation set ``eset``); ``candidates``: latent -> explanation of
        the latents that may be distractors. None when there are fewer than ``N_DISTRACTORS`` others."""
        others = distractors(latent, list(candidates), N_DISTRACTORS, seed, sae_key)
        if not others:
            return None
        top = np.argsort(-eset.activations, kind="stable")[:N_RANKING_SAMPLES]
        top = top[eset.activations[top] > 0]
        samples = [{"id": f"X{i + 1:02d}", "line": lines[int(eset.slice_ids[j])]} for i, j in enumerate(top)]
        texts = [explanation] + [candidates[o] for o in others]
        order = np.random.default_rng(purpose_seed(seed, sae_key, latent, "ranking-order")).permutation(5)
        shown = [{"letter": LETTERS[i], "text": texts[k]} for i, k in enumerate(order)]
        truth = LETTERS[int(np.flatnonzero(order == 0)[0])]
        messages = self.template.render(samples=samples, candidates=shown, legend=self.legend)
        request = LLMRequest(
            model=self.model,
            messages=messages,
            temperature=self.temperature,
            max_tokens=50,
            seed=0,
            template_hash=self.template.hash,
            api_base=self.api_base,
        )
        return RankingQuestion(request, truth, others)


def parse_ranking(text: str | None) -> list[str] | None:
    """The five letters A-E in ranked order: the first line naming each exactly once (text before or
    after it, e.g. a justification, is ignored), else the whole answer if it does; otherwise None."""
    lines = (text or "").upper().splitlines()
    for chunk in [*lines, " ".join(lines)]:
        found = _LETTER.findall(chunk)
        if len(found) == 5 and len(set(found)) == 5:
            return found
    return None


def ranking_score(text: str | None, truth: str, others: list[int]) -> Score:
    """The study's score: 1 when the true explanation is ranked first or second of five."""
    ranking = parse_ranking(text) or []
    ok = len(ranking) == 5
    rank = ranking.index(truth) + 1 if ok else None
    return Score(
        "ranking_top2",
        None if rank is None else float(rank <= 2),
        1 if ok else 0,
        0 if ok else 1,
        extra={"rank": rank, "distractors": others} | ({} if ok else {"reason": "parse_failed"}),
    )
