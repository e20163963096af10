"""The one door to language models: every LLM call of medsae goes through :class:`LLMGateway`.

Why a gateway: auto-interpretation makes thousands of calls whose answers become scores. The
gateway makes that reproducible and cheap to rerun:

* **litellm only** — any provider litellm knows (``openai/...``, ``anthropic/...``, ``ollama/...``,
  an OpenAI-compatible server via ``api_base``) plus the offline ``medsae/<name>`` provider
  (:mod:`medsae.interp.offline`). litellm is imported lazily (it costs seconds).
* **Identity** — :func:`request_hash` is sha256 over canonical JSON of the model, the API base
  (never the key), every sampling parameter, the messages with inline images replaced by the
  sha256 of their bytes, and the prompt template hash.
* **Cache** — one JSON file per answered request under ``cache_dir/<hash[:2]>/<hash>.json``,
  written atomically, so a rerun makes zero calls. Modes: ``live`` and ``record`` read and write
  the cache; ``replay`` only reads it and a miss is a :class:`MedsaeError` naming the request.
* **Robustness** — a concurrency limit (asyncio semaphore), timeouts, retries with exponential
  backoff and jitter (at least the provider's ``Retry-After``) on rate limits (429), timeouts,
  connection and server (5xx) errors and malformed answers (invalid JSON, no ``choices``), never
  on other 4xx. A provider failure that survives the retries comes back as an
  :class:`LLMResponse` with ``error`` set; only user errors (unknown provider, missing API key,
  rejected key) raise. Every answer shape is read without exceptions: ``None`` content, missing
  or partial logprobs and a provider that ignores ``logprobs`` give an answer with ``problem`` set
  (cached like any answer, so a rerun replays it), never a crash.
* **Accounting** — every call (cached or not) becomes a row of the registry table ``llm_calls``
  with tokens, cost (litellm's price table; 0 for unpriced or offline models), latency and
  error; so does every failed attempt that was retried (its error says which attempt and how long
  the gateway waited). ``max_cost_usd`` stops new calls once the summed cost exceeds it ("budget
  exceeded").

API keys are read by litellm from the environment; they never enter a request, the cache or a row.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import queue
import random
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, TypeVar

from medsae.errors import MedsaeError

T = TypeVar("T")

Mode = Literal["live", "record", "replay"]
MODES: tuple[str, ...] = ("live", "record", "replay")
OFFLINE_PREFIX = "medsae/"
CACHE_FORMAT = "medsae-llm-cache/1"
HASH_VERSION = "1"  # bump when the canonical request layout changes (invalidates every cache entry)
BUDGET_EXCEEDED = "budget exceeded"


# --------------------------------------------------------------------------- data types


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
        "offline_version": _offline_version(req.model),
    }


def _offline_version(model: str) -> str | None:
    from medsae.interp.offline import handler_version

    return handler_version(model)


def canonical_json(obj: Any) -> str:
    """Sorted keys, no whitespace, floats as Python's shortest repr: stable across runs."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def request_hash(req: LLMRequest) -> str:
    """sha256 (hex) of the canonical JSON of ``req``."""
    return hashlib.sha256(canonical_json(canonical_request(req)).encode()).hexdigest()


# --------------------------------------------------------------------------- response cache


class ResponseCache:
    """Content-addressed store: one JSON file per answered request, named by the request hash."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        """The stored entry, or None when absent or unreadable (a torn file is treated as a miss)."""
        try:
            entry = json.loads(self.path(key).read_text())
        except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError, UnicodeDecodeError):
            return None
        if not isinstance(entry, dict) or entry.get("request_hash") != key or "response" not in entry:
            return None
        return entry

    def put(self, key: str, entry: dict[str, Any]) -> None:
        """Write atomically (temp file + rename), so readers never see half a file."""
        target = self.path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps(entry, ensure_ascii=False, sort_keys=True))
        os.replace(tmp, target)


# --------------------------------------------------------------------------- provider answers


def _get(obj: Any, name: str, default: Any = None) -> Any:
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
    content = _get(choice_logprobs, "content")
    if not content or not isinstance(content, list | tuple):
        return None
    tokens = []
    for item in content:
        token, logprob = _get(item, "token"), _float(_get(item, "logprob"))
        if not isinstance(token, str) or logprob is None:
            continue
        top = []
        for alt in _get(item, "top_logprobs") or []:
            alt_token, alt_logprob = _get(alt, "token"), _float(_get(alt, "logprob"))
            if isinstance(alt_token, str) and alt_logprob is not None:
                top.append((alt_token, alt_logprob))
        tokens.append(TokenLogprob(token=token, logprob=logprob, top=top))
    return tokens or None


def _text(content: Any) -> str | None:
    """Message content as text: a string, the text parts of a list of parts, else None."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [_get(p, "text") for p in content]
        joined = "".join(p for p in parts if isinstance(p, str))
        return joined or None
    return str(content)


def _int(value: Any) -> int:
    try:
        return max(0, int(value or 0))
    except (TypeError, ValueError):
        return 0


@dataclass
class _Answer:
    """What one provider answer holds, read defensively (see :func:`read_answer`)."""

    text: str | None
    logprobs: list[TokenLogprob] | None
    tokens_in: int
    tokens_out: int
    problem: str | None
    finish_reason: Any
    model: Any
    fingerprint: Any


def read_answer(raw: Any, wants_logprobs: bool) -> _Answer:
    """Read a chat completion of any shape; raises :class:`MalformedAnswer` only when it has no choice."""
    choices = _get(raw, "choices")
    if not choices or not isinstance(choices, list | tuple):
        raise MalformedAnswer("provider answer has no choices")
    choice = choices[0]
    finish = _get(choice, "finish_reason")
    text = _text(_get(_get(choice, "message"), "content"))
    problems = []
    if text is None:
        problems.append(f"no content (finish_reason={finish})")
    logprobs = None
    raw_logprobs = _get(choice, "logprobs")
    if raw_logprobs is not None:
        try:
            logprobs = parse_logprobs(raw_logprobs)
        except Exception:  # an exotic object: treat as absent
            logprobs = None
    if wants_logprobs and logprobs is None and text is not None:
        problems.append("no logprobs" if raw_logprobs is None else "unreadable logprobs")
    usage = _get(raw, "usage")
    return _Answer(
        text=text,
        logprobs=logprobs,
        tokens_in=_int(_get(usage, "prompt_tokens", 0)),
        tokens_out=_int(_get(usage, "completion_tokens", 0)),
        problem="; ".join(problems) or None,
        finish_reason=finish,
        model=_get(raw, "model"),
        fingerprint=_get(raw, "system_fingerprint"),
    )


def _logprobs_to_json(tokens: list[TokenLogprob] | None) -> list | None:
    if tokens is None:
        return None
    return [[t.token, t.logprob, [[a, b] for a, b in t.top]] for t in tokens]


def _logprobs_from_json(data: list | None) -> list[TokenLogprob] | None:
    if data is None:
        return None
    return [TokenLogprob(token=t, logprob=lp, top=[(a, b) for a, b in top]) for t, lp, top in data]


def _cost(response: Any, model: str) -> float:
    """litellm's price for this response; 0 for offline models and models litellm cannot price."""
    if model.startswith(OFFLINE_PREFIX):
        return 0.0
    import litellm

    try:
        return float(litellm.completion_cost(completion_response=response) or 0.0)
    except Exception:  # unknown / custom model: litellm has no price
        return 0.0


def _first_line(text: str, limit: int = 300) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _error_text(exc: BaseException) -> str:
    status = getattr(exc, "status_code", None)
    prefix = f"{type(exc).__name__}" + (f" ({status})" if isinstance(status, int) else "")
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)) and not str(exc):
        return f"{prefix}: no answer within the timeout"
    return _first_line(f"{prefix}: {exc}")


def is_retryable(exc: BaseException) -> bool:
    """Rate limits, timeouts, connection failures, server errors and empty answers are worth another try."""
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError, ConnectionError, MalformedAnswer)):
        return True
    import litellm

    retry_types = (
        litellm.RateLimitError,
        litellm.Timeout,
        litellm.APIConnectionError,
        litellm.InternalServerError,
        litellm.ServiceUnavailableError,
    )
    if isinstance(exc, retry_types):
        return True
    status = getattr(exc, "status_code", None)
    return isinstance(status, int) and (status in (408, 429) or status >= 500)


def _retry_after(exc: BaseException) -> float | None:
    """Seconds from a ``Retry-After`` header on the provider's answer, when there is one."""
    headers = _get(getattr(exc, "response", None), "headers")
    try:
        value = headers.get("retry-after") if headers is not None else None
        return float(value) if value is not None else None
    except (TypeError, ValueError, AttributeError):
        return None


# --------------------------------------------------------------------------- event loop for sync callers

_LOOP: asyncio.AbstractEventLoop | None = None
_LOOP_LOCK = threading.Lock()


def _background_loop() -> asyncio.AbstractEventLoop:
    """One long-lived event loop in a daemon thread, shared by every gateway's sync entry points.

    litellm caches async HTTP clients per event loop; a fresh ``asyncio.run`` per batch would leave
    those clients bound to closed loops. It also lets sync callers live inside a running loop.
    """
    global _LOOP
    with _LOOP_LOCK:
        if _LOOP is None or _LOOP.is_closed():
            loop = asyncio.new_event_loop()
            thread = threading.Thread(target=loop.run_forever, name="medsae-llm-loop", daemon=True)
            thread.start()
            _LOOP = loop
        return _LOOP


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on the background loop and wait for its result."""
    future = asyncio.run_coroutine_threadsafe(coro, _background_loop())
    try:
        return future.result()
    except BaseException:
        future.cancel()
        raise


# --------------------------------------------------------------------------- the gateway


@dataclass
class _LoopState:
    semaphore: asyncio.Semaphore
    inflight: dict[str, asyncio.Lock] = field(default_factory=dict)


class LLMGateway:
    """Cached, concurrent, retrying, accounted access to any litellm model (see module docstring)."""

    def __init__(
        self,
        cache_dir: Path,
        mode: Mode = "live",
        concurrency: int = 8,
        max_retries: int = 4,
        timeout_s: float = 60,
        max_cost_usd: float | None = None,
        backoff_s: float = 0.5,
        backoff_max_s: float = 30.0,
    ):
        if mode not in MODES:
            raise MedsaeError(f"LLM gateway: unknown mode {mode!r}; use one of {', '.join(MODES)}")
        if concurrency < 1:
            raise MedsaeError(f"LLM gateway: concurrency must be >= 1, got {concurrency}")
        self.cache_dir = Path(cache_dir)
        self.cache = ResponseCache(self.cache_dir)
        self.mode: Mode = mode
        self.concurrency = int(concurrency)
        self.max_retries = int(max_retries)
        self.timeout_s = float(timeout_s)
        self.max_cost_usd = max_cost_usd
        self.backoff_s = float(backoff_s)
        self.backoff_max_s = float(backoff_max_s)
        self.n_calls = 0  # requests sent to a provider (not answered from the cache)
        self.n_attempts = 0  # provider attempts including retries
        self.n_cache_hits = 0
        self.n_failed = 0  # calls that ended without an answer (after their retries, or refused by the budget)
        self.n_failed_attempts = 0  # failed attempts that were retried
        self.total_cost_usd = 0.0
        self._rows: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._loops: dict[int, _LoopState] = {}
        self._checked_models: set[tuple[str, str | None]] = set()
        self._jitter = random.Random()

    @property
    def n_retries(self) -> int:
        return self.n_attempts - self.n_calls

    def request_hash(self, req: LLMRequest) -> str:
        return request_hash(req)

    # ---------------------------------------------------------------- public calls

    async def acomplete(self, req: LLMRequest) -> LLMResponse:
        """Answer one request: from the cache, else from the provider (with retries), then cache it."""
        key = request_hash(req)
        hit = self._from_cache(key, req)
        if hit is not None:
            return hit
        if self.mode == "replay":
            raise MedsaeError(
                f"replay cache miss: request {key} (model {req.model}, template {req.template_hash or '-'}) "
                f"is not in {self.cache_dir}; run in live or record mode first"
            )
        self._check_model(req)
        state = self._loop_state()
        lock = state.inflight.setdefault(key, asyncio.Lock())
        try:
            async with lock:  # identical requests in flight: one provider call, the others read the cache
                hit = self._from_cache(key, req)
                if hit is not None:
                    return hit
                if self._over_budget():
                    return self._refuse(key, req)
                async with state.semaphore:
                    if self._over_budget():
                        return self._refuse(key, req)
                    return await self._call_provider(key, req)
        finally:
            if not lock.locked():
                state.inflight.pop(key, None)

    def complete_many(self, reqs: list[LLMRequest], description: str | None = None) -> list[LLMResponse]:
        """Answer ``reqs`` concurrently (at most ``concurrency`` in flight); results in input order.

        With ``description`` a progress bar (``medsae.progress.track``) counts finished requests.
        """
        if not reqs:
            return []
        done: queue.SimpleQueue[int] = queue.SimpleQueue()

        async def one(req: LLMRequest) -> LLMResponse:
            try:
                return await self.acomplete(req)
            finally:
                done.put(1)

        async def gather() -> list[LLMResponse]:
            return list(await asyncio.gather(*(one(r) for r in reqs)))

        if description is None:
            return run_sync(gather())
        from medsae.progress import track

        future = asyncio.run_coroutine_threadsafe(gather(), _background_loop())
        try:
            ticks = _finished(done, len(reqs), future)
            for _ in track(ticks, total=len(reqs), description=description, unit="call"):
                pass
            return future.result()
        except BaseException:
            future.cancel()
            raise

    def complete(self, req: LLMRequest) -> LLMResponse:
        """Synchronous single request."""
        return run_sync(self.acomplete(req))

    def check_model(self, model: str, api_base: str | None = None) -> None:
        """Fail fast on a user error (unknown provider or offline model, missing API key) before any work.

        Nothing is sent. Replay mode checks nothing: it never calls a provider.
        """
        if self.mode != "replay":
            self._check_model(LLMRequest(model=model, messages=[], api_base=api_base))

    def drain_call_rows(self) -> list[dict[str, Any]]:
        """Rows for registry table ``llm_calls`` logged since the last drain (then forgotten)."""
        with self._lock:
            rows, self._rows = self._rows, []
        return rows

    # ---------------------------------------------------------------- internals

    def _loop_state(self) -> _LoopState:
        loop = asyncio.get_running_loop()
        state = self._loops.get(id(loop))
        if state is None:
            state = _LoopState(semaphore=asyncio.Semaphore(self.concurrency))
            self._loops[id(loop)] = state
        return state

    def _over_budget(self) -> bool:
        return self.max_cost_usd is not None and self.total_cost_usd > self.max_cost_usd

    def _from_cache(self, key: str, req: LLMRequest) -> LLMResponse | None:
        start = time.perf_counter()
        entry = self.cache.get(key)
        if entry is None:
            return None
        stored = entry["response"]
        try:
            logprobs = _logprobs_from_json(stored.get("logprobs"))
        except (TypeError, ValueError):  # a hand-edited or foreign entry: read it without logprobs
            logprobs = None
        response = LLMResponse(
            request_hash=key,
            text=stored.get("text"),
            logprobs=logprobs,
            tokens_in=_int(stored.get("tokens_in")),
            tokens_out=_int(stored.get("tokens_out")),
            cost_usd=0.0,
            latency_s=time.perf_counter() - start,
            cached=True,
            error=None,
            attempts=0,
            problem=stored.get("problem"),
        )
        with self._lock:
            self.n_cache_hits += 1
        self._log(req, response, stored)
        return response

    def _refuse(self, key: str, req: LLMRequest) -> LLMResponse:
        with self._lock:
            self.n_failed += 1  # no answer: a later run asks again
        response = LLMResponse(key, None, None, 0, 0, 0.0, 0.0, False, BUDGET_EXCEEDED, 0)
        self._log(req, response, None)
        return response

    def _check_model(self, req: LLMRequest) -> None:
        """User errors, once per model: unknown provider, unregistered offline model, missing key."""
        ident = (req.model, req.api_base)
        if ident in self._checked_models:
            return
        if req.model.startswith(OFFLINE_PREFIX):
            from medsae.interp.offline import ensure_offline_provider, offline_model_names

            ensure_offline_provider()
            name = req.model[len(OFFLINE_PREFIX) :]
            if name not in offline_model_names():
                known = ", ".join(OFFLINE_PREFIX + n for n in offline_model_names())
                raise MedsaeError(f"model {req.model}: no offline model of that name is registered ({known})")
        else:
            import litellm

            litellm.suppress_debug_info = True
            try:
                litellm.get_llm_provider(model=req.model, api_base=req.api_base)
            except Exception:
                raise MedsaeError(
                    f"model {req.model}: unknown LLM provider; use a litellm model id such as "
                    f"openai/gpt-4o-mini, anthropic/claude-3-5-haiku-20241022 or medsae/baseline"
                ) from None
            env = litellm.validate_environment(model=req.model, api_base=req.api_base)
            missing = env.get("missing_keys") or []
            if missing:
                names = " / ".join(missing)
                hint = " (any value works for a local server that checks no key)" if req.api_base else ""
                raise MedsaeError(
                    f"model {req.model}: API key missing; set the environment variable {names}{hint}"
                )
        self._checked_models.add(ident)

    def _litellm_kwargs(self, req: LLMRequest) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "model": req.model,
            "messages": req.messages,
            "temperature": req.temperature,
            "max_tokens": req.max_tokens,
            "timeout": self.timeout_s,
            "num_retries": 0,  # the gateway retries; litellm and the provider SDK must not
            "max_retries": 0,
            "drop_params": True,  # a provider without logprobs/seed answers without them
        }
        if req.seed is not None:
            kwargs["seed"] = req.seed
        if req.logprobs:
            kwargs["logprobs"] = True
            if req.top_logprobs is not None:
                kwargs["top_logprobs"] = req.top_logprobs
        if req.api_base:
            kwargs["api_base"] = req.api_base
        return kwargs

    async def _call_provider(self, key: str, req: LLMRequest) -> LLMResponse:
        import litellm

        litellm.suppress_debug_info = True
        with self._lock:
            self.n_calls += 1
        kwargs = self._litellm_kwargs(req)
        start = time.perf_counter()
        attempts = 0
        error: str | None = None
        raw: Any = None
        answer: _Answer | None = None
        while True:
            attempts += 1
            with self._lock:
                self.n_attempts += 1
            tried = time.perf_counter()
            try:
                raw = await asyncio.wait_for(litellm.acompletion(**kwargs), timeout=self.timeout_s)
                answer = read_answer(raw, req.logprobs)
                error = None
                break
            except litellm.AuthenticationError as exc:
                raise MedsaeError(
                    f"model {req.model}: the provider rejected the API key; check {_key_variable(req)}"
                ) from exc
            except Exception as exc:
                error = _error_text(exc)
                if attempts > self.max_retries or not is_retryable(exc):
                    break
                delay = min(self.backoff_max_s, self.backoff_s * 2 ** (attempts - 1))
                delay *= 0.5 + 0.5 * self._jitter.random()
                retry_after = _retry_after(exc)
                if retry_after is not None:
                    delay = max(delay, min(retry_after, self.backoff_max_s))
                self._log_attempt(key, req, error, attempts, time.perf_counter() - tried, delay)
                await asyncio.sleep(delay)
        latency = time.perf_counter() - start

        if error is not None or answer is None:
            with self._lock:
                self.n_failed += 1
            response = LLMResponse(key, None, None, 0, 0, 0.0, latency, False, error or "no answer", attempts)
            self._log(req, response, None)
            return response

        cost = _cost(raw, req.model)
        response = LLMResponse(
            request_hash=key,
            text=answer.text,
            logprobs=answer.logprobs,
            tokens_in=answer.tokens_in,
            tokens_out=answer.tokens_out,
            cost_usd=cost,
            latency_s=latency,
            cached=False,
            error=None,
            attempts=attempts,
            problem=answer.problem,
        )
        stored = {
            "text": response.text,
            "logprobs": _logprobs_to_json(response.logprobs),
            "tokens_in": response.tokens_in,
            "tokens_out": response.tokens_out,
            "cost_usd": cost,
            "latency_s": latency,
            "attempts": attempts,
            "model": _plain(answer.model),
            "system_fingerprint": _plain(answer.fingerprint),
            "finish_reason": _plain(answer.finish_reason),
            "problem": answer.problem,
        }
        with self._lock:
            self.total_cost_usd += cost
        self.cache.put(
            key,
            {
                "format": CACHE_FORMAT,
                "request_hash": key,
                "request": canonical_request(req),
                "response": stored,
                "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            },
        )
        self._log(req, response, stored)
        return response

    def _log_attempt(
        self, key: str, req: LLMRequest, error: str, attempt: int, seconds: float, wait_s: float
    ) -> None:
        """An ``llm_calls`` row for a failed attempt that is retried (the final outcome gets its own row)."""
        with self._lock:
            self.n_failed_attempts += 1
        note = f"attempt {attempt} failed, retried after {wait_s:.2f}s: {error}"
        self._log(req, LLMResponse(key, None, None, 0, 0, 0.0, seconds, False, _first_line(note), attempt), None)

    def _log(self, req: LLMRequest, response: LLMResponse, stored: dict[str, Any] | None) -> None:
        row = {
            "request_hash": response.request_hash,
            "model": req.model,
            "template_hash": req.template_hash,
            "response_json": None if stored is None else json.dumps(stored, sort_keys=True),
            "tokens_in": response.tokens_in,
            "tokens_out": response.tokens_out,
            "cost_usd": response.cost_usd,
            "latency_s": response.latency_s,
            "cached": response.cached,
            "error": response.error,
        }
        with self._lock:
            self._rows.append(row)


def _plain(value: Any) -> Any:
    """JSON-safe scalar (a provider may send odd types in metadata fields)."""
    return value if value is None or isinstance(value, str | int | float | bool) else str(value)


def _key_variable(req: LLMRequest) -> str:
    """The environment variable that holds the key of ``req``'s provider (best guess)."""
    import litellm

    try:
        provider = litellm.get_llm_provider(model=req.model, api_base=req.api_base)[1]
    except Exception:
        return "the provider's API key variable"
    return f"{str(provider).upper()}_API_KEY"


def _finished(done: queue.SimpleQueue, total: int, future: Any) -> Any:
    """Yield once per finished request until ``total`` or until the batch fails."""
    seen = 0
    while seen < total:
        try:
            done.get(timeout=0.2)
        except queue.Empty:
            if future.done() and future.exception() is not None:
                return
            continue
        seen += 1
        yield seen


__all__ = [
    "BUDGET_EXCEEDED",
    "LLMGateway",
    "LLMRequest",
    "LLMResponse",
    "MalformedAnswer",
    "TokenLogprob",
    "canonical_request",
    "is_retryable",
    "parse_logprobs",
    "read_answer",
    "request_hash",
    "run_sync",
]
