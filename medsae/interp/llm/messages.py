"""What goes to a language model and what comes back: request and answer types, the request's identity.

* :class:`LLMRequest` holds everything that defines a call; :func:`request_hash` is sha256 over the
  canonical JSON of the model, the API base (never the key), every sampling parameter, the messages
  with inline images replaced by the sha256 of their bytes, the prompt template hash and, for an
  offline ``medsae/<name>`` model, the version of its handler (:func:`medsae.interp.llm.offline.handler_version`).
* :func:`read_answer` reads a provider's chat completion of any shape without exceptions: ``None``
  content, missing or partial logprobs and a provider that ignores ``logprobs`` give an answer with
  ``problem`` set; only an answer with no choice at all raises :class:`MalformedAnswer` (retried).
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from medsae.interp.llm.offline import handler_version

HASH_VERSION = "1"  # bump when the canonical request layout changes (invalidates every cache entry)


@dataclass(frozen=True)
class LLMRequest:
    """One chat completion request. Everything here enters the request hash."""

    model: str  # litellm model id, e.g. "openai/gpt-4o-mini", "medsae/baseline"
    messages: list[dict]  # OpenAI-style; content may be a list of parts incl. image_url data URLs
    temperature: float = 0.0
    max_tokens: int = 512
    logprobs: bool = False
    top_logprobs: int | None = None
    seed: int | None = 0
    template_hash: str = ""
    api_base: str | None = None  # never the key


@dataclass
class TokenLogprob:
    """One generated token with its log-probability and the provider's top alternatives."""

    token: str
    logprob: float
    top: list[tuple[str, float]]


@dataclass
class LLMResponse:
    """The answer to one :class:`LLMRequest` (or why there is none: ``error``).

    ``cost_usd`` is what this call cost now (0 for a cache hit); ``tokens_in``/``tokens_out`` are
    the provider's counts for the answer (also for a cache hit); ``latency_s`` is the wall time of
    this call including retries (a cache hit: the time to read it); ``attempts`` counts provider
    attempts (0 for a cache hit or a call refused by the budget). ``problem`` describes an answer
    that came back in an unusual shape (no content, logprobs asked for but absent or unreadable).
    """

    request_hash: str
    text: str | None
    logprobs: list[TokenLogprob] | None
    tokens_in: int
    tokens_out: int
    cost_usd: float
    latency_s: float
    cached: bool
    error: str | None
    attempts: int = 0
    problem: str | None = None


class MalformedAnswer(Exception):
    """A provider answer that holds no answer at all (no ``choices``): retried like a server error."""


# --------------------------------------------------------------------------- request identity


def _image_ref(url: str) -> str:
    """A data URL becomes the sha256 of its decoded bytes; other URLs are kept as they are."""
    if url.startswith("data:") and "," in url:
        header, payload = url.split(",", 1)
        data = base64.b64decode(payload) if header.endswith(";base64") else payload.encode()
        return "sha256:" + hashlib.sha256(data).hexdigest()
    return url


def _strip_images(value: Any) -> Any:
    """Deep copy of message content with every ``image_url`` replaced by its hash reference."""
    if isinstance(value, list):
        return [_strip_images(v) for v in value]
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if key == "image_url":
                if isinstance(item, str):
                    item = _image_ref(item)
                elif isinstance(item, dict) and isinstance(item.get("url"), str):
                    item = {**item, "url": _image_ref(item["url"])}
            out[key] = _strip_images(item)
        return out
    return value


def canonical_request(req: LLMRequest) -> dict[str, Any]:
    """The JSON-ready identity of a request: what is hashed and stored next to the answer."""
    return {
        "v": HASH_VERSION,
        "model": req.model,
        "api_base": req.api_base,
        "temperature": float(req.temperature),
        "max_tokens": int(req.max_tokens),
        "logprobs": bool(req.logprobs),
        "top_logprobs": None if req.top_logprobs is None else int(req.top_logprobs),
        "seed": None if req.seed is None else int(req.seed),
        "template_hash": req.template_hash,
        "messages": _strip_images(req.messages),
        "offline_version": handler_version(req.model),
    }


def canonical_json(obj: Any) -> str:
    """Sorted keys, no whitespace, floats as Python's shortest repr: stable across runs."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def request_hash(req: LLMRequest) -> str:
    """sha256 (hex) of the canonical JSON of ``req``."""
    return hashlib.sha256(canonical_json(canonical_request(req)).encode()).hexdigest()


# --------------------------------------------------------------------------- provider answers


def get_field(obj: Any, name: str, default: Any = None) -> Any:
    """Attribute or key access: litellm returns pydantic objects, sometimes plain dicts."""
    if obj is None:
        return default
    if isinstance(obj, dict):
        return obj.get(name, default)
    return getattr(obj, name, default)


def _float(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if out == out else None  # NaN is no log-probability


def parse_logprobs(choice_logprobs: Any) -> list[TokenLogprob] | None:
    """``choices[0].logprobs.content`` (OpenAI format) as a list of :class:`TokenLogprob`.

    Entries without a token string or a numeric log-probability are skipped (alternatives too),
    so a partial or odd logprobs block gives fewer tokens, never an exception.
    """
    content = get_field(choice_logprobs, "content")
    if not content or not isinstance(content, list | tuple):
        return None
    tokens = []
    for item in content:
        token, logprob = get_field(item, "token"), _float(get_field(item, "logprob"))
        if not isinstance(token, str) or logprob is None:
            continue
        top = []
        for alt in get_field(item, "top_logprobs") or []:
            alt_token, alt_logprob = get_field(alt, "token"), _float(get_field(alt, "logprob"))
            if isinstance(alt_token, str) and alt_logprob is not None:
                top.append((alt_token, alt_logprob))
        tokens.append(TokenLogprob(token=token, logprob=logprob, top=top))
    return tokens or None


def _text(content: Any) -> str | None:
    """Message content as text: a string, the text parts of a list of parts, else None."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [get_field(p, "text") for p in content]
        joined = "".join(p for p in parts if isinstance(p, str))
        return joined or None
    return str(content)


def token_count(value: Any) -> int:
    """A provider's token count as a non-negative int (0 when absent or unreadable)."""
    try:
        return max(0, int(value or 0))
    except (TypeError, ValueError):
        return 0


@dataclass
class ProviderAnswer:
    """What one provider answer holds, read defensively (see :func:`read_answer`)."""

    text: str | None
    logprobs: list[TokenLogprob] | None
    tokens_in: int
    tokens_out: int
    problem: str | None
    finish_reason: Any
    model: Any
    fingerprint: Any


def read_answer(raw: Any, wants_logprobs: bool) -> ProviderAnswer:
    """Read a chat completion of any shape; raises :class:`MalformedAnswer` only when it has no choice."""
    choices = get_field(raw, "choices")
    if not choices or not isinstance(choices, list | tuple):
        raise MalformedAnswer("provider answer has no choices")
    choice = choices[0]
    finish = get_field(choice, "finish_reason")
    text = _text(get_field(get_field(choice, "message"), "content"))
    problems = []
    if text is None:
        problems.append(f"no content (finish_reason={finish})")
    logprobs = None
    raw_logprobs = get_field(choice, "logprobs")
    if raw_logprobs is not None:
        try:
            logprobs = parse_logprobs(raw_logprobs)
        except Exception:  # an exotic object: treat as absent
            logprobs = None
    if wants_logprobs and logprobs is None and text is not None:
        problems.append("no logprobs" if raw_logprobs is None else "unreadable logprobs")
    usage = get_field(raw, "usage")
    return ProviderAnswer(
        text=text,
        logprobs=logprobs,
        tokens_in=token_count(get_field(usage, "prompt_tokens", 0)),
        tokens_out=token_count(get_field(usage, "completion_tokens", 0)),
        problem="; ".join(problems) or None,
        finish_reason=finish,
        model=get_field(raw, "model"),
        fingerprint=get_field(raw, "system_fingerprint"),
    )


def logprobs_to_json(tokens: list[TokenLogprob] | None) -> list | None:
    """Logprobs as plain JSON lists (how the response cache stores them)."""
    if tokens is None:
        return None
    return [[t.token, t.logprob, [[a, b] for a, b in t.top]] for t in tokens]


def logprobs_from_json(data: list | None) -> list[TokenLogprob] | None:
    """The inverse of :func:`logprobs_to_json`."""
    if data is None:
        return None
    return [TokenLogprob(token=t, logprob=lp, top=[(a, b) for a, b in top]) for t, lp, top in data]
