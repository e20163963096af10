"""The one door to language models: every LLM call of medsae goes through :class:`LLMGateway`.

Why a gateway: auto-interpretation makes thousands of calls whose answers become scores. The
gateway makes that reproducible and cheap to rerun:

* **litellm only** — any provider litellm knows (``openai/...``, ``anthropic/...``, ``ollama/...``,
  an OpenAI-compatible server via ``api_base``) plus the offline ``medsae/<name>`` provider
  (:mod:`medsae.interp.llm.offline`). litellm is imported lazily (it costs seconds).
* **Identity** — every request is named by its hash (:func:`medsae.interp.llm.messages.request_hash`).
* **Cache** — every answer is stored under that name (:mod:`medsae.interp.llm.cache`), so a rerun
  makes zero calls. Modes: ``live`` and ``record`` read and write the cache; ``replay`` only reads
  it and a miss is a :class:`MedsaeError` naming the request.
* **Robustness** — a concurrency limit (asyncio semaphore), timeouts, retries with exponential
  backoff and jitter (at least the provider's ``Retry-After``) on rate limits (429), timeouts,
  connection and server (5xx) errors and malformed answers (invalid JSON, no ``choices``), never
  on other 4xx. A provider failure that survives the retries comes back as an
  :class:`LLMResponse` with ``error`` set; only user errors (unknown provider, missing API key,
  rejected key) raise. Every answer shape is read without exceptions
  (:func:`medsae.interp.llm.messages.read_answer`); an odd one is cached like any answer, so a
  rerun replays it, never a crash.
* **Accounting** — every call (cached or not) becomes a row of the registry table ``llm_calls``
  with tokens, cost (litellm's price table; 0 for unpriced or offline models), latency and
  error; so does every failed attempt that was retried (its error says which attempt and how long
  the gateway waited). ``max_cost_usd`` stops new calls once the summed cost exceeds it ("budget
  exceeded").

API keys are read by litellm from the environment; they never enter a request, the cache or a row.
"""

from __future__ import annotations

import asyncio
import json
import queue
import random
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from medsae.errors import MedsaeError
from medsae.interp.llm.cache import ResponseCache
from medsae.interp.llm.messages import (
    LLMRequest,
    LLMResponse,
    MalformedAnswer,
    ProviderAnswer,
    canonical_request,
    get_field,
    logprobs_from_json,
    logprobs_to_json,
    read_answer,
    request_hash,
    token_count,
)
from medsae.interp.llm.offline import OFFLINE_PREFIX, ensure_offline_provider, offline_model_names

if TYPE_CHECKING:
    from medsae.interp.config import InterpretSpec

T = TypeVar("T")

Mode = Literal["live", "record", "replay"]
MODES: tuple[str, ...] = ("live", "record", "replay")
BUDGET_EXCEEDED = "budget exceeded"


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
    headers = get_field(getattr(exc, "response", None), "headers")
    try:
        value = headers.get("retry-after") if headers is not None else None
        return float(value) if value is not None else None
    except (TypeError, ValueError, AttributeError):
        return None


# --------------------------------------------------------------------------- event loop for sync callers

_LOOP: asyncio.AbstractEventLoop | None = None
_LOOP_LOCK = threading.Lock()


def background_loop() -> asyncio.AbstractEventLoop:
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
    future = asyncio.run_coroutine_threadsafe(coro, background_loop())
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

    @classmethod
    def for_spec(cls, cache_dir: Path, spec: InterpretSpec) -> LLMGateway:
        """A gateway with the ``interpret:`` section's mode, concurrency, retries, timeout and budget."""
        return cls(
            cache_dir,
            mode=spec.llm_mode,
            concurrency=int(spec.concurrency),
            max_retries=int(spec.max_retries),
            timeout_s=float(spec.timeout_s),
            max_cost_usd=spec.max_cost_usd,
            backoff_s=float(spec.retry_backoff_s),
        )

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

        future = asyncio.run_coroutine_threadsafe(gather(), background_loop())
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
            logprobs = logprobs_from_json(stored.get("logprobs"))
        except (TypeError, ValueError):  # a hand-edited or foreign entry: read it without logprobs
            logprobs = None
        response = LLMResponse(
            request_hash=key,
            text=stored.get("text"),
            logprobs=logprobs,
            tokens_in=token_count(stored.get("tokens_in")),
            tokens_out=token_count(stored.get("tokens_out")),
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
                raise MedsaeError(f"model {req.model}: API key missing; set the environment variable {names}{hint}")
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
        start = time.perf_counter()
        raw, answer, error, attempts = await self._attempts(key, req)
        latency = time.perf_counter() - start
        if error is not None or answer is None:
            with self._lock:
                self.n_failed += 1
            response = LLMResponse(key, None, None, 0, 0, 0.0, latency, False, error or "no answer", attempts)
            self._log(req, response, None)
            return response
        return self._answered(key, req, raw, answer, latency, attempts)

    async def _attempts(self, key: str, req: LLMRequest) -> tuple[Any, ProviderAnswer | None, str | None, int]:
        """Ask the provider until it answers or the error is final: (raw, answer, error, attempts)."""
        import litellm

        kwargs = self._litellm_kwargs(req)
        attempts = 0
        error: str | None = None
        raw: Any = None
        answer: ProviderAnswer | None = None
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
        return raw, answer, error, attempts

    def _answered(
        self, key: str, req: LLMRequest, raw: Any, answer: ProviderAnswer, latency: float, attempts: int
    ) -> LLMResponse:
        """The response to a provider's answer, counted, cached and logged."""
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
            "logprobs": logprobs_to_json(response.logprobs),
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
        self.cache.store(key, canonical_request(req), stored)
        self._log(req, response, stored)
        return response

    def _log_attempt(self, key: str, req: LLMRequest, error: str, attempt: int, seconds: float, wait_s: float) -> None:
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
