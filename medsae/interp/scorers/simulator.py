"""The simulator: predict each held-out slice's strength from an explanation (docs/method.md#simulator).

* **Batches**: a job's slices are shuffled with a seeded generator and cut into batches of
  ``simulate_batch``; every call relabels its slices ``X01``, ``X02``... so neither position nor
  id carries a signal, and answers are joined by id, never by order.
* **Modes** (part of the scorer's identity, never mixed in one comparison):
  ``logprob_ev`` — at the token carrying each answer integer, renormalise the probability mass of
  the alternatives that are integers 0..scale written in ASCII digits (look-alikes such as
  ``'³'``, ``'٣'`` or ``'３'`` never count) and take the expected value (a value whose token is
  not a single integer token, or an answer without logprobs, falls back to the parsed integer and
  is counted);
  ``parsed_int`` — strict integer parsing only.
* **Strict parsing**: a line ``Xnn: k`` (ASCII digits) per slice; an id given twice, an id not in
  the batch, a value outside 0..scale and any other text are ignored; a slice without exactly
  one valid line is *missing*.
* **Repair**: a batch with missing slices gets one deterministic re-ask (the answer plus a user
  message naming the missing ids); slices still missing stay missing (NaN), never zero. How many
  predictions came from the re-ask is counted per job (``n_repaired``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medsae.interp.llm import LLMRequest, LLMResponse, TokenLogprob, request_hash
from medsae.interp.prompts import Template

LOGPROB_EV, PARSED_INT, RULE = "logprob_ev", "parsed_int", "rule"
_LINE = re.compile(r"^[ \t]*(X[0-9]{2,3})[ \t]*[:=][ \t]*([0-9]+)[ \t]*$", re.MULTILINE)
_ASCII_INT = re.compile(r"[0-9]{1,3}")


def labels(n: int) -> list[str]:
    """Fresh per-call ids ``X01``... (three digits beyond 99)."""
    width = 2 if n <= 99 else 3
    return [f"X{i:0{width}d}" for i in range(1, n + 1)]


def resolve_mode(model: str, wanted: str) -> str:
    """``auto`` -> ``logprob_ev`` when litellm says the model returns logprobs, else ``parsed_int``."""
    if wanted != "auto":
        return wanted
    if model.startswith("medsae/"):
        return PARSED_INT
    try:
        import litellm

        supported = litellm.get_supported_openai_params(model=model) or []
    except Exception:
        supported = []
    return LOGPROB_EV if "logprobs" in supported else PARSED_INT


# --------------------------------------------------------------------------- parsing


def parse_values(text: str | None, ids: Sequence[str], scale: int) -> dict[str, int]:
    """Strictly parsed ``id -> integer``: each id exactly once, value in 0..scale."""
    if not text:
        return {}
    wanted = set(ids)
    seen: dict[str, list[int]] = {}
    for m in _LINE.finditer(text):
        seen.setdefault(m.group(1), []).append(int(m.group(2)))
    return {k: v[0] for k, v in seen.items() if k in wanted and len(v) == 1 and 0 <= v[0] <= scale}


def expected_values(
    tokens: list[TokenLogprob] | None, ids: Sequence[str], scale: int
) -> tuple[dict[str, float], set[str]]:
    """Expected value per id from the logprobs of the token carrying its integer.

    Returns ``(values, fallback)``: ids whose value token is not one integer token (e.g. "10" split
    into "1" + "0", or glued to the colon) are left out of ``values`` and listed in ``fallback``.
    """
    if not tokens:
        return {}, set(ids)
    text = "".join(t.token for t in tokens)
    ends = np.cumsum([len(t.token) for t in tokens])
    parsed = parse_values(text, ids, scale)
    out: dict[str, float] = {}
    fallback: set[str] = set()
    for m in _LINE.finditer(text):
        key = m.group(1)
        if key not in parsed or key in out:
            continue
        start = m.start(2)
        k = int(np.searchsorted(ends, start, side="right"))
        tok = tokens[k] if k < len(tokens) else None
        if tok is None or tok.token.strip() != m.group(2) or not tok.token.rstrip().endswith(m.group(2)):
            fallback.add(key)
            continue
        mass: dict[int, float] = {}
        for alt, logprob in [*tok.top, (tok.token, tok.logprob)]:
            s = alt.strip()
            if not _ASCII_INT.fullmatch(s) or not math.isfinite(logprob) or logprob > 1e-9:
                continue  # look-alike digits ('³', '٣', '３'), words, and impossible log-probabilities
            if int(s) <= scale and int(s) not in mass:
                mass[int(s)] = math.exp(logprob)
        total = sum(mass.values())
        if not math.isfinite(total) or total <= 0:
            fallback.add(key)
            continue
        out[key] = sum(v * p for v, p in mass.items()) / total
    return out, fallback


# --------------------------------------------------------------------------- jobs and batches


@dataclass
class SimJob:
    """Predict ``slice_ids`` from ``explanation`` with one scorer (model + template + mode)."""

    key: Any  # caller's handle
    explanation: str
    slice_ids: np.ndarray
    order_seed: int  # seeds the shuffle (same for every explanation of a latent: comparable batches)
    values: np.ndarray = field(init=False)  # NaN = missing
    n_fallback: int = 0
    n_repaired: int = 0
    n_no_logprobs: int = 0  # answers of a logprob_ev scorer that came back without logprobs
    errors: list[str] = field(default_factory=list)
    request_hashes: list[str] = field(default_factory=list)  # of the first-round batches, in order
    batch_positions: list[np.ndarray] = field(default_factory=list)  # positions per batch, prompt order

    def __post_init__(self) -> None:
        self.slice_ids = np.asarray(self.slice_ids, dtype=np.int64)
        self.values = np.full(len(self.slice_ids), np.nan)


@dataclass
class _Batch:
    job: SimJob
    positions: np.ndarray  # positions in job.slice_ids, in prompt order
    ids: list[str]
    request: LLMRequest


@dataclass
class Simulator:
    """One scorer: model, template, mode, scale, batch size, sampling settings."""

    model: str
    template: Template
    mode: str
    scale: int = 10
    batch_size: int = 10
    temperature: float = 0.0
    top_logprobs: int = 20
    legend: list[str] = field(default_factory=list)
    api_base: str | None = None

    def identity(self) -> dict[str, Any]:
        """What defines this scorer (enters every score id)."""
        return {
            "model": self.model,
            "api_base": self.api_base,
            "template_hash": self.template.hash,
            "mode": self.mode,
            "scale": self.scale,
            "batch_size": self.batch_size,
            "temperature": self.temperature,
            "top_logprobs": self.top_logprobs if self.mode == LOGPROB_EV else None,
        }

    def _request(self, messages: list[dict], n: int) -> LLMRequest:
        ev = self.mode == LOGPROB_EV
        return LLMRequest(
            model=self.model,
            messages=messages,
            temperature=self.temperature,
            max_tokens=8 * n + 16,
            logprobs=ev,
            top_logprobs=self.top_logprobs if ev else None,
            seed=0,
            template_hash=self.template.hash,
            api_base=self.api_base,
        )

    def batches(self, job: SimJob, lines: dict[int, str]) -> list[_Batch]:
        """The job's calls: seeded shuffle, ``batch_size`` slices each, ids relabelled per call."""
        job.request_hashes.clear()
        job.batch_positions.clear()
        rng = np.random.default_rng(job.order_seed)
        order = rng.permutation(len(job.slice_ids))
        out = []
        for start in range(0, len(order), self.batch_size):
            pos = order[start : start + self.batch_size]
            ids = labels(len(pos))
            rows = [{"id": i, "line": lines[int(job.slice_ids[p])]} for i, p in zip(ids, pos, strict=True)]
            messages = self.template.render(explanation=job.explanation, slices=rows, legend=self.legend)
            request = self._request(messages, len(pos))
            job.request_hashes.append(request_hash(request))
            job.batch_positions.append(pos)
            out.append(_Batch(job, pos, ids, request))
        return out

    def read(self, batch: _Batch, response: LLMResponse) -> list[str]:
        """Store the batch's values in its job; returns the ids still missing."""
        if response.error:
            batch.job.errors.append(response.error)
            return []
        parsed = parse_values(response.text, batch.ids, self.scale)
        values: dict[str, float] = {k: float(v) for k, v in parsed.items()}
        if self.mode == LOGPROB_EV:
            if response.logprobs is None and response.text:
                batch.job.n_no_logprobs += 1  # the provider ignored logprobs: parsed integers
            ev, _ = expected_values(response.logprobs, batch.ids, self.scale)
            ev = {k: v for k, v in ev.items() if k in parsed}
            values.update(ev)
            batch.job.n_fallback += len(set(parsed) - set(ev))
        for i, key in enumerate(batch.ids):
            if key in values and np.isnan(batch.job.values[batch.positions[i]]):
                batch.job.values[batch.positions[i]] = values[key]
        return [k for i, k in enumerate(batch.ids) if np.isnan(batch.job.values[batch.positions[i]])]

    def repair(self, batch: _Batch, response: LLMResponse, missing: list[str]) -> LLMRequest:
        """The one deterministic re-ask for a malformed batch."""
        expected = ", ".join(batch.ids)
        note = (
            f"Your answer could not be read for {', '.join(missing)}. Answer again with exactly one line "
            f'"ID: integer" (0 to {self.scale}) for each of {expected}, in that order, and nothing else.'
        )
        messages = [
            *batch.request.messages,
            {"role": "assistant", "content": response.text or ""},
            {"role": "user", "content": note},
        ]
        return self._request(messages, len(batch.ids))


def _apply_repair(sim: Simulator, batch: _Batch, response: LLMResponse) -> None:
    before = int(np.isnan(batch.job.values[batch.positions]).sum())
    sim.read(batch, response)
    batch.job.n_repaired += before - int(np.isnan(batch.job.values[batch.positions]).sum())


def run_jobs(
    gateway: Any,
    work: Sequence[tuple[Simulator, Sequence[SimJob]]],
    lines: dict[int, str],
    extra: Sequence[LLMRequest] = (),
    description: str | None = None,
) -> list[LLMResponse]:
    """Fill every job's ``values``: all batches (and ``extra`` requests) in one concurrent round,
    then one repair round for malformed batches. Returns the responses to ``extra``."""
    batches = [(sim, b) for sim, jobs in work for job in jobs for b in sim.batches(job, lines)]
    responses = gateway.complete_many([b.request for _, b in batches] + list(extra), description=description)
    retry = []
    for (sim, batch), response in zip(batches, responses[: len(batches)], strict=True):
        missing = sim.read(batch, response)
        if missing:
            retry.append((sim, batch, sim.repair(batch, response, missing)))
    if retry:
        label = None if description is None else f"{description}: repair"
        fixed = gateway.complete_many([r for _, _, r in retry], description=label)
        for (sim, batch, _), response in zip(retry, fixed, strict=True):
            _apply_repair(sim, batch, response)
    return list(responses[len(batches) :])


async def arun_jobs(
    gateway: Any,
    work: Sequence[tuple[Simulator, SimJob]],
    lines: dict[int, str],
    extra: Sequence[LLMRequest] = (),
) -> tuple[list[LLMResponse], int]:
    """:func:`run_jobs` for one latent inside the gateway's event loop: its batches and ``extra``
    requests concurrently, then the repairs of its malformed batches.

    Returns (responses to ``extra``, number of repair re-asks).
    """
    import asyncio

    batches = [(sim, b) for sim, job in work for b in sim.batches(job, lines)]
    requests = [b.request for _, b in batches] + list(extra)
    responses = await asyncio.gather(*(gateway.acomplete(r) for r in requests))
    retry = []
    for (sim, batch), response in zip(batches, responses[: len(batches)], strict=True):
        missing = sim.read(batch, response)
        if missing:
            retry.append((sim, batch, sim.repair(batch, response, missing)))
    if retry:
        fixed = await asyncio.gather(*(gateway.acomplete(r) for _, _, r in retry))
        for (sim, batch, _), response in zip(retry, fixed, strict=True):
            _apply_repair(sim, batch, response)
    return list(responses[len(batches) :]), len(retry)
