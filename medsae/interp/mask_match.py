"""Explanations checked against the masks: does an explanation name its latent's best-grounded structure?

The ``ground`` stage gives each grounded latent the structure its activation maps overlap best
(registry table ``latent_grounding``). The ``mask_match`` score of an explanation is 1 when its
text names that structure (:func:`medsae.ground.names.mask_match_score`: synonyms, plurals,
laterality) and 0 when not: a check of the LLM's words against voxel ground truth, with no LLM.
Every usable explanation is scored — LLM explanations (status ``ok``) and the baselines (the
shuffled explanation, a chance level; the best single attribute, e.g. ``structure=kidney_left``);
a latent without a grounding row gets no row. The interpret stage (reading its optional ground
upstream) and ``medsae explain run`` (reading the registry) both call :func:`mask_match_rows`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from medsae.ground.names import SYNONYMS, mask_match_score, names_structure, split_name
from medsae.interp.rows import mask_match_row

#: Explanation statuses that are scored (rejected or unparsed explanations get no score of any method).
SCORED_STATUSES = ("ok", "baseline")
_CONTEXT_WORDS = 3  # words kept either side of the mention in the reported phrase


@dataclass(frozen=True)
class Grounding:
    """One ground stage's best structure per latent (of the SAE the explanations describe)."""

    ground_key: str
    structures: Mapping[int, str]


def mask_match_rows(explanations: Iterable[Mapping[str, Any]], grounding: Grounding) -> list[dict[str, Any]]:
    """One ``mask_match`` score row per scored explanation whose latent is grounded."""
    out = []
    for expl in explanations:
        structure = grounding.structures.get(int(expl["latent"]))
        if expl["status"] not in SCORED_STATUSES or structure is None:
            continue
        value = mask_match_score(expl["text"], structure)
        if value is None:  # no text
            continue
        phrase = matched_phrase(expl["text"], structure) if value else None
        out.append(mask_match_row(dict(expl), value, structure, phrase, grounding.ground_key))
    return out


def matched_phrase(text: str, structure: str) -> str | None:
    """The words around the first mention of the structure's organ that names it (for reading the rows)."""
    organ, _ = split_name(structure)
    flat = " ".join(re.findall(r"[A-Za-z0-9]+", text.replace("_", " ")))
    for synonym in SYNONYMS.get(organ, (organ.replace("_", " "),)):
        pattern = r"\b" + r"\s+".join(map(re.escape, synonym.split())) + r"(?:e?s)?\b"
        for m in re.finditer(pattern, flat, re.IGNORECASE):
            before, after = flat[: m.start()].split(), flat[m.end() :].split()
            window = " ".join(before[-_CONTEXT_WORDS:] + [m.group(0)] + after[:_CONTEXT_WORDS])
            if names_structure(window, structure):
                return window
    return None


def mask_match_summary(rows: list[dict[str, Any]], explanations: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Mean and count of the rows per explanation kind (for the stage summary and ``explain run``)."""
    kind_of = {e["explanation_id"]: e["kind"] for e in explanations}
    by_kind: dict[str, list[float]] = {}
    for row in rows:
        by_kind.setdefault(kind_of.get(row["explanation_id"], "?"), []).append(float(row["value"]))
    return {kind: {"n": len(v), "mean": round(sum(v) / len(v), 4)} for kind, v in sorted(by_kind.items())}
