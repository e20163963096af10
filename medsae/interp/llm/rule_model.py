"""``medsae/baseline``: a deterministic rule-based "LLM" — the baseline every real model must beat.

Registered as the offline litellm model ``medsae/baseline`` (:mod:`medsae.interp.llm.offline`), so it
runs through exactly the same gateway, cache and parsing path as a real model. It reads only the
prompt (the last user message plus the system message's legend of metadata values) and answers
the task named on the system message's first line (``Task: ...``):

* **explain**: enrichment. For every metadata term of the example lines (modality, plane,
  region, structure, sex, age band, study, pathology, scanner, site) it compares the share of
  firing examples (strength > 0) that have it with the share of contrasts (strength 0). Terms
  present in at least ``MIN_SHARE`` of firing examples and over-represented by at least
  ``MIN_LIFT`` are named (one per kind, up to three structures), most enriched first, in one
  sentence on a final ``EXPLANATION:`` line. Scan-level terms (modality, sex, age, study,
  pathology, scanner, site) need stronger evidence, and at most one besides the modality is
  named: a handful of scans makes any of their attributes look enriched. No firing example: no
  marker (a parse failure).
* **simulate** / **detect**: the explanation's terms are the legend values it mentions (a
  negation word just before a term makes it an excluded term). A slice's prediction is
  ``round(scale * f**2)``, f = share of the explanation's terms the slice has; 0 when it has an
  excluded term. Detection answers 1 when f >= 0.75.
* **rank explanations**: candidates ranked by their mean simulated value on the sample slices.
* **match a query**: descriptions ranked by overlap of named terms with the query (modality and
  plane weigh most; naming a different modality or plane is penalised).
* **describe a feature's concept** (the study's explainer, ``Sample N:`` metadata blocks): one phrase
  naming what every sample shares: orientation and modality, up to two regions (else up to three
  structures), the sex, e.g. "Axial CT of the liver in a female patient".
* **judge concepts** (the study's 5-way ranking): candidates ranked by the mean share of their named
  terms (modality, orientation, sex, region, structure) that each sample has; ties by letter.
"""

from __future__ import annotations

import json
import re
from collections import Counter

import numpy as np

from medsae.interp.llm.offline import message_text, register_offline_model
from medsae.interp.metadata import Term, mentioned, normalise, parse_legend, parse_line, phrase_pattern

MODEL = "baseline"
MIN_SHARE = 0.6
MIN_LIFT = 0.2
#: Terms that describe a whole scan (modality, patient, acquisition): examples come from a few scans,
#: so any of them can look enriched by chance. They need stronger evidence, and at most one besides
#: the modality is named, after the image terms.
SCAN_LEVEL = ("modality", "sex", "age", "study", "pathology", "scanner", "site")
SCAN_MIN_SHARE = 0.95
SCAN_MIN_LIFT = 0.4
MAX_SCAN_TERMS = 1
MAX_STRUCTURES = 3
MAX_TERMS = 5
DETECT_SHARE = 0.75
_NEGATIONS = ("not", "no", "without", "absent", "except", "excluding", "never", "non")
_EXAMPLE = re.compile(r"^\s*(E\d+)\s*\|\s*(\d+)\s*\|\s*(.*)$", re.MULTILINE)
_SLICE = re.compile(r"^\s*(X\d+)\s*\|\s*(.*)$", re.MULTILINE)
_CANDIDATE = re.compile(r"^\s*([A-E])\s*:\s*(.+)$", re.MULTILINE)
_DESCRIPTION = re.compile(r"^\s*(\d+)\.\s+(.+)$", re.MULTILINE)
_TASK = re.compile(r"^\s*Task:\s*(.+?)\.?\s*$", re.MULTILINE)


def _task(messages: list[dict]) -> str:
    system = "\n".join(message_text(m) for m in messages if m.get("role") == "system")
    m = _TASK.search(system)
    return m.group(1).strip().lower() if m else ""


def _last_user(messages: list[dict]) -> str:
    users = [m for m in messages if m.get("role") == "user"]
    return message_text(users[-1]) if users else ""


def _legend(messages: list[dict]) -> list[Term]:
    system = "\n".join(message_text(m) for m in messages if m.get("role") == "system")
    return parse_legend(system)


# --------------------------------------------------------------------------- explain


def enriched_terms(examples: list[tuple[int, set[Term]]]) -> list[tuple[Term, float, float]]:
    """``(term, share among firing, share among contrasts)`` of the terms worth naming, best first."""
    firing = [terms for s, terms in examples if s > 0]
    contrast = [terms for s, terms in examples if s == 0]
    if not firing:
        return []
    f_counts = Counter(t for terms in firing for t in terms)
    c_counts = Counter(t for terms in contrast for t in terms)
    rows = []
    for term, count in f_counts.items():
        pf = count / len(firing)
        pc = c_counts.get(term, 0) / len(contrast) if contrast else 0.0
        rows.append((term, pf, pc))
    rows.sort(key=lambda r: (r[0].kind in SCAN_LEVEL, -(r[1] - r[2]), -r[1], r[0].key))
    chosen: list[tuple[Term, float, float]] = []
    per_kind: Counter[str] = Counter()
    n_scan_terms = 0
    for term, pf, pc in rows:
        scan_level = term.kind in SCAN_LEVEL
        limit = MAX_STRUCTURES if term.kind == "structure" else 1
        share, lift = (SCAN_MIN_SHARE, SCAN_MIN_LIFT) if scan_level else (MIN_SHARE, MIN_LIFT)
        counted = scan_level and term.kind != "modality"
        if counted and n_scan_terms >= MAX_SCAN_TERMS:
            continue
        if pf >= share and pf - pc >= lift and per_kind[term.kind] < limit:
            chosen.append((term, pf, pc))
            per_kind[term.kind] += 1
            n_scan_terms += counted
        if len(chosen) == MAX_TERMS:
            break
    if not chosen and rows and rows[0][1] - rows[0][2] > 0:
        chosen = [rows[0]]
    return chosen


def sentence(terms: list[Term]) -> str:
    """One readable sentence naming ``terms`` (each by its phrase, so a simulator can find it)."""
    by_kind: dict[str, list[str]] = {}
    for t in terms:
        by_kind.setdefault(t.kind, []).append(t.display if t.kind == "modality" else t.phrase)
    head = " ".join(by_kind.get("modality", []) + by_kind.get("plane", []))
    text = f"{head} slices" if head else "Slices"
    if "region" in by_kind:
        text += f" of the {by_kind['region'][0]}"
    if "structure" in by_kind:
        text += " showing " + " and ".join(by_kind["structure"])
    if "sex" in by_kind:
        text += f" in {by_kind['sex'][0]} patients"
    if "age" in by_kind:
        text += f" aged {by_kind['age'][0]}"
    if "study" in by_kind:
        text += f" from {by_kind['study'][0]} studies"
    if "pathology" in by_kind:
        text += f" with {by_kind['pathology'][0]}"
    if "scanner" in by_kind:
        text += f" acquired on {by_kind['scanner'][0]} scanners"
    if "site" in by_kind:
        text += f" from {by_kind['site'][0]}"
    return text[0].upper() + text[1:] + "."


def explain(messages: list[dict]) -> str:
    examples = [(int(m.group(2)), parse_line(m.group(3))["terms"]) for m in _EXAMPLE.finditer(_last_user(messages))]
    chosen = enriched_terms(examples)
    if not chosen:
        return "The examples show no firing slice, so there is nothing to explain."
    notes = "; ".join(f"{t.key}: {pf:.0%} of firing vs {pc:.0%} of contrasts" for t, pf, pc in chosen)
    return f"Enrichment: {notes}\nEXPLANATION: {sentence([t for t, _, _ in chosen])}"


# --------------------------------------------------------------------------- simulate / detect / rank


def explanation_terms(explanation: str, vocabulary: list[Term]) -> tuple[list[Term], list[Term]]:
    """(required, excluded) terms of an explanation: legend values it names, split by negation."""
    norm = normalise(explanation)
    required, excluded = [], []
    for term in mentioned(explanation, vocabulary):
        m = phrase_pattern(term.phrase).search(norm)
        before = norm[: m.start()].split()[-3:] if m else []
        (excluded if any(w.strip(",.;:()") in _NEGATIONS for w in before) else required).append(term)
    return required, excluded


def predict(required: list[Term], excluded: list[Term], terms: set[Term], scale: int) -> int:
    """The rule: ``round(scale * f**2)`` with f the share of required terms present; 0 if excluded."""
    if not required or any(t in terms for t in excluded):
        return 0
    f = sum(t in terms for t in required) / len(required)
    if scale == 1:
        return int(f >= DETECT_SHARE)
    return int(round(scale * f * f))


def simulate(messages: list[dict], scale: int) -> str:
    user = _last_user(messages)
    m = re.search(r"^Explanation:\s*(.*)$", user, re.MULTILINE)
    explanation = m.group(1) if m else ""
    slices = [(s.group(1), parse_line(s.group(2))["terms"]) for s in _SLICE.finditer(user)]
    vocabulary = _legend(messages) or sorted({t for _, terms in slices for t in terms}, key=lambda t: t.key)
    required, excluded = explanation_terms(explanation, vocabulary)
    return "\n".join(f"{sid}: {predict(required, excluded, terms, scale)}" for sid, terms in slices)


def rank(messages: list[dict]) -> str:
    user = _last_user(messages)
    head, _, tail = user.partition("Candidate explanations:")
    samples = [parse_line(s.group(2))["terms"] for s in _SLICE.finditer(head)]
    vocabulary = _legend(messages) or sorted({t for terms in samples for t in terms}, key=lambda t: t.key)
    scored = []
    for c in _CANDIDATE.finditer(tail):
        required, excluded = explanation_terms(c.group(2), vocabulary)
        values = [predict(required, excluded, terms, 10) for terms in samples] or [0]
        scored.append((-float(np.mean(values)), c.group(1)))
    return ", ".join(letter for _, letter in sorted(scored))


# --------------------------------------------------------------------------- search

_WEIGHT = {"modality": 3.0, "plane": 2.0, "region": 1.5, "structure": 1.0}


def match(messages: list[dict]) -> str:
    user = _last_user(messages)
    m = re.search(r"^Query:\s*(.*)$", user, re.MULTILINE)
    query = m.group(1) if m else ""
    n_match = re.search(r"exactly (\d+) description", "\n".join(message_text(x) for x in messages))
    n = int(n_match.group(1)) if n_match else 3
    vocabulary = _legend(messages)
    wanted = set(mentioned(query, vocabulary))
    scored = []
    for d in _DESCRIPTION.finditer(user.partition("Descriptions:")[2]):
        named = set(mentioned(d.group(2), vocabulary))
        score = sum(_WEIGHT.get(t.kind, 0.5) for t in wanted & named)
        for kind in ("modality", "plane", "sex"):
            q = {t for t in wanted if t.kind == kind}
            if q and {t for t in named if t.kind == kind} - q:
                score -= 3.0
        scored.append((-score, int(d.group(1))))
    chosen = [number for _, number in sorted(scored)[:n]]
    return json.dumps({"feature_indices": chosen})


# --------------------------------------------------------------------------- the study's protocol

_SAMPLE_HEAD = re.compile(r"^Sample \d+:\s*$", re.MULTILINE)
_FIELD = re.compile(r"^[ \t]+([A-Za-z ]+?)(?: \(\d+ total\))?:[ \t]*(.*)$", re.MULTILINE)
_OPTION = re.compile(r"^\s*([A-E])\.\s+(.*)$", re.MULTILINE)
_STUDY_SEX = {"m": "male", "f": "female"}
_STUDY_KINDS = ("orientation", "modality", "region", "structure", "sex")


def study_samples(text: str) -> list[dict[str, list[str]]]:
    """Per ``Sample N:`` block of the study's metadata text: kind -> its values (normalised phrases)."""
    starts = [m.end() for m in _SAMPLE_HEAD.finditer(text)]
    ends = [m.start() for m in _SAMPLE_HEAD.finditer(text)][1:] + [len(text)]
    out = []
    for start, end in zip(starts, ends, strict=True):
        fields = {k.strip().lower(): v.strip() for k, v in _FIELD.findall(text[start:end])}
        sample: dict[str, list[str]] = {kind: [] for kind in _STUDY_KINDS}
        if fields.get("modality"):
            sample["modality"] = [fields["modality"].lower()]
        if fields.get("orientation"):
            sample["orientation"] = [fields["orientation"].split()[0].lower()]
        if fields.get("sex"):
            sample["sex"] = [_STUDY_SEX.get(fields["sex"].lower(), fields["sex"].lower())]
        for kind, name in (("region", "anatomical regions"), ("structure", "anatomical structures and organs")):
            sample[kind] = [normalise(v) for v in fields.get(name, "").split(",") if v.strip()]
        out.append(sample)
    return out


def study_describe(messages: list[dict]) -> str:
    """The concept every sample shares, as one phrase (see the module docstring)."""
    samples = study_samples(_last_user(messages))
    if not samples:
        return "No samples"
    common = {k: [v for v in samples[0][k] if all(v in s[k] for s in samples)] for k in _STUDY_KINDS}
    head = " ".join(common["orientation"][:1] + [m.upper() for m in common["modality"][:1]])
    where = common["region"][:2] or common["structure"][:3]
    text = (head or "Slices") + (f" of the {' and '.join(where)}" if where else "")
    if common["sex"]:
        text += f" in a {common['sex'][0]} patient"
    return text[0].upper() + text[1:]


def study_judge(messages: list[dict]) -> str:
    """The letters A-E, best first: by the mean share of a candidate's named terms the samples have."""
    user = _last_user(messages)
    samples = [{v for vs in s.values() for v in vs} for s in study_samples(user)]
    phrases = {"ct", "mri", "axial", "coronal", "sagittal", "male", "female"} | set().union(*samples)
    vocabulary = [Term("term", p) for p in sorted(phrases)]
    scored = []
    for option in _OPTION.finditer(user):
        named = {t.value for t in mentioned(option.group(2), vocabulary)}
        shares = [len(named & s) / len(named) for s in samples] if named and samples else [0.0]
        scored.append((-float(np.mean(shares)), option.group(1)))
    return ", ".join(letter for _, letter in sorted(scored))


# --------------------------------------------------------------------------- dispatch


def handle(messages: list[dict], params: dict) -> str:
    """The ``medsae/baseline`` model: dispatch on the system message's ``Task:`` line."""
    task = _task(messages)
    if task.startswith("describe"):
        return study_describe(messages)
    if task.startswith("judge"):
        return study_judge(messages)
    if task.startswith("explain"):
        return explain(messages)
    if task.startswith("simulate"):
        return simulate(messages, 10)
    if task.startswith("detect"):
        return simulate(messages, 1)
    if task.startswith("rank"):
        return rank(messages)
    if task.startswith("match"):
        return match(messages)
    return "I do not know this task."


register_offline_model(MODEL, handle)
