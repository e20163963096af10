"""The study's 5-way ranking: its candidates, the parsing of the judge's answer, the rank and the summary.

* Candidates: the latent's own description and its 4 distractors' descriptions, shown in a shuffled
  order under the letters A-E (:func:`candidate_order`; seeded per latent, the study's shuffle was not).
* Parsing (:func:`parse_ranking`): every letter A-E of the upper-cased answer, in order; the answer
  counts only when that gives exactly five distinct letters. Otherwise the shuffled order itself is
  the ranking (a random rank) and the parse failure is counted.
* Per latent: the true description's rank 1-5; success = rank <= 2 (chance 2/5).
* Summary (:func:`ranking_summary`, the study's ``evaluation_metrics.json``): success rate, top-1 rate,
  mean and median rank, the count of each rank, latents evaluated and parse failures; chance 0.40 and 3.0.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from medsae.interp.sampling import purpose_seed
from medsae.interp.scorers.metrics import Score

LETTERS = "ABCDE"
#: Score method of the study's ranking (``explanation_scores.method``): 1 when ranked first or second.
METHOD = "ranking_study_top2"
SCORER_MODE = "ranking_study"
CHANCE_SUCCESS, CHANCE_MEAN_RANK = 0.4, 3.0
_LETTER = re.compile(r"[A-E]")


def candidate_order(seed: int, sae_key: str, latent: int) -> list[int]:
    """``order[i]``: the candidate (0 = the latent's own description, 1-4 its distractors) under letter i."""
    rng = np.random.default_rng(purpose_seed(seed, sae_key, int(latent), "study-ranking-order"))
    return [int(x) for x in rng.permutation(len(LETTERS))]


def parse_ranking(text: str | None) -> list[str] | None:
    """The letters A-E of the upper-cased answer when they are exactly five distinct ones, else None."""
    letters = _LETTER.findall((text or "").upper())
    return letters if len(letters) == len(LETTERS) and len(set(letters)) == len(LETTERS) else None


def true_rank(text: str | None, order: Sequence[int]) -> tuple[int, bool]:
    """(rank 1-5 of candidate 0, whether the answer parsed); an unparsed answer ranks by ``order``."""
    letters = parse_ranking(text)
    ranking = [order[LETTERS.index(x)] for x in letters] if letters else list(order)
    return ranking.index(0) + 1, letters is not None


def ranking_score(text: str | None, order: Sequence[int], distractors: Sequence[int]) -> Score:
    """The score row's content: 1.0 when the latent's description ranks first or second."""
    rank, parsed = true_rank(text, order)
    extra: dict[str, Any] = {
        "rank": rank,
        "parse_success": parsed,
        "truth": LETTERS[list(order).index(0)],
        "order": list(order),
        "distractors": [int(d) for d in distractors],
        "answer": (text or "")[:500],
    }
    return Score(METHOD, float(rank <= 2), 1, 0, extra=extra)


def ranking_summary(ranks: Sequence[int], parsed: Sequence[bool]) -> dict[str, Any]:
    """The study's evaluation metrics over latents with a rank (values None when there is none)."""
    r = np.asarray(ranks, dtype=np.float64)
    n = len(r)
    return {
        "n_evaluated": n,
        "success_rate": float(np.mean(r <= 2)) if n else None,
        "top1_rate": float(np.mean(r == 1)) if n else None,
        "mean_rank": float(r.mean()) if n else None,
        "median_rank": float(np.median(r)) if n else None,
        "rank_distribution": {str(k): int((r == k).sum()) for k in range(1, len(LETTERS) + 1)},
        "n_parse_failures": int(sum(not p for p in parsed)),
        "chance_success_rate": CHANCE_SUCCESS,
        "chance_mean_rank": CHANCE_MEAN_RANK,
    }
