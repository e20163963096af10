"""A small scriptable OpenAI-compatible chat server on 127.0.0.1, for tests and benches.

Serves ``POST /v1/chat/completions`` (and ``/chat/completions``) from a thread per request
(stdlib ``http.server``), so concurrent clients really overlap. What it answers is a Python
callable, ``handler(request_json) -> (status, body)`` or ``(status, body, headers)`` where
``body`` is a dict (sent as JSON) or str/bytes (sent raw, e.g. garbage). Ready-made handlers and
builders below cover plain text, token log-probabilities over "0".."10", a 429 (or 5xx) before
success, garbage, the offline baseline's answers (:func:`baseline_handler`) and a by-turn script
of every failure a real provider shows (:class:`TurnScript`, :func:`failure_script`).

Bounded: the server stops by itself after ``lifetime_s`` seconds or ``max_requests`` requests
(answering 503 past the limit), and every thread is a daemon.

Use it in a test through the ``llm_server`` fixture (import its function into the test module:
``from llm_server import llm_server_fixture  # noqa: F401``), or directly::

    with ScriptedLLMServer(text_handler("hello"), latency_s=0.2) as server:
        ...  # litellm model "openai/test-model", api_base=server.url, OPENAI_API_KEY set to anything
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

Body = dict | str | bytes
Handler = Callable[[dict], tuple]  # -> (status, body) or (status, body, headers)


# --------------------------------------------------------------------------- response builders


def words(text: str) -> int:
    return len(text.split())


def prompt_words(request: dict) -> int:
    """Rough prompt token count: whitespace-separated words of every text part."""
    total = 0
    for message in request.get("messages", []):
        content = message.get("content")
        if isinstance(content, str):
            total += words(content)
        elif isinstance(content, list):
            total += sum(words(p.get("text", "")) for p in content if isinstance(p, dict))
    return total


def completion_json(
    request: dict,
    text: str,
    logprobs: list[dict] | None = None,
    prompt_tokens: int | None = None,
    completion_tokens: int | None = None,
) -> dict:
    """An OpenAI chat.completion body answering ``request`` with ``text`` (and token logprobs)."""
    p = prompt_words(request) if prompt_tokens is None else prompt_tokens
    c = words(text) if completion_tokens is None else completion_tokens
    choice: dict[str, Any] = {
        "index": 0,
        "message": {"role": "assistant", "content": text},
        "finish_reason": "stop",
        "logprobs": None if logprobs is None else {"content": logprobs},
    }
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:16]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": request.get("model", "test-model"),
        "system_fingerprint": "fp_test",
        "choices": [choice],
        "usage": {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c},
    }


def error_json(status: int, message: str) -> dict:
    kind = {429: "rate_limit_exceeded", 401: "invalid_api_key"}.get(status, "server_error")
    return {"error": {"message": message, "type": kind, "code": kind}}


def token_entry(token: str, probs: dict[str, float] | None = None) -> dict:
    """One ``logprobs.content`` item. ``probs``: the top alternatives (token -> probability).

    Without ``probs`` the token is certain (logprob 0) and is its own only alternative.
    """
    if probs is None:
        probs = {token: 1.0}
    top = [
        {"token": t, "logprob": math.log(p) if p > 0 else -1e4, "bytes": list(t.encode())}
        for t, p in sorted(probs.items(), key=lambda kv: -kv[1])
    ]
    chosen = probs.get(token, 0.0)
    return {
        "token": token,
        "logprob": math.log(chosen) if chosen > 0 else -1e4,
        "bytes": list(token.encode()),
        "top_logprobs": top,
    }


_TOKEN = re.compile(r"[A-Za-z_]\w*|\d+|\s+|[^\w\s]+")
_INT_TOKEN = re.compile(r"(?:[0-9]|10)")


def tokenize(text: str) -> list[str]:
    """A crude tokenizer: identifiers ("X01"), digit runs, whitespace runs, punctuation runs."""
    return _TOKEN.findall(text)


def int_logprobs(text: str, distribution: Callable[[int], dict[str, float]]) -> list[dict]:
    """Logprobs for ``text``: each token "0".."10" gets ``distribution(value)`` as its top list."""
    entries = []
    for tok in tokenize(text):
        if _INT_TOKEN.fullmatch(tok):
            entries.append(token_entry(tok, distribution(int(tok))))
        else:
            entries.append(token_entry(tok))
    return entries


def peaked(value: int, spread: float = 1.0) -> dict[str, float]:
    """A distribution over "0".."10" peaked at ``value``: p(k) ∝ exp(-|k - value| / spread)."""
    weights = [math.exp(-abs(k - value) / spread) for k in range(11)]
    z = sum(weights)
    return {str(k): w / z for k, w in enumerate(weights)}


# --------------------------------------------------------------------------- ready-made handlers


def text_handler(text: str | Callable[[dict], str]) -> Handler:
    """Answer every request with ``text`` (or ``text(request)``), no logprobs."""

    def handle(request: dict) -> tuple[int, Body]:
        answer = text(request) if callable(text) else text
        return 200, completion_json(request, answer)

    return handle


def logprob_handler(
    text: str | Callable[[dict], str], distribution: Callable[[int], dict[str, float]] = peaked
) -> Handler:
    """Answer with ``text`` plus token logprobs when the request asks for them (``logprobs: true``)."""

    def handle(request: dict) -> tuple[int, Body]:
        answer = text(request) if callable(text) else text
        lp = int_logprobs(answer, distribution) if request.get("logprobs") else None
        return 200, completion_json(request, answer, logprobs=lp)

    return handle


def fail_first(n: int, then: Handler, status: int = 429) -> Handler:
    """Answer the first ``n`` requests with ``status`` (429 rate limit by default), then delegate."""
    lock = threading.Lock()
    count = [0]

    def handle(request: dict) -> tuple[int, Body]:
        with lock:
            count[0] += 1
            failing = count[0] <= n
        if failing:
            return status, error_json(status, f"scripted failure {count[0]} of {n}")
        return then(request)

    return handle


GARBAGE = "~~ ### <<<>>> lorem ipsum ?? not-a-number ¿¿ }{"


def garbage_handler() -> Handler:
    """A well-formed completion whose text is unparseable garbage."""
    return text_handler(GARBAGE)


def raw_garbage_handler() -> Handler:
    """A 200 whose body is not JSON at all."""
    return lambda request: (200, "this is not json {{{")


def baseline_handler(distribution: Callable[[int], dict[str, float]] = peaked) -> Handler:
    """The offline ``medsae/baseline`` rules served over HTTP (with logprobs when asked for)."""
    from medsae.interp.llm import rule_model

    return logprob_handler(lambda request: rule_model.handle(request["messages"], {}), distribution)


# --------------------------------------------------------------------------- answering by turn


def task_of(request: dict) -> str:
    """The ``Task: ...`` line of the request's system message, lower case ('' if none)."""
    for message in request.get("messages", []):
        content = message.get("content")
        if message.get("role") == "system" and isinstance(content, str):
            m = re.search(r"^\s*Task:\s*(.+?)\.?\s*$", content, re.MULTILINE)
            if m:
                return m.group(1).strip().lower()
    return ""


class TurnScript:
    """Answers by turn: each request gets the first scripted item not yet used that applies to it
    (``when``; None applies to any request), else ``then``. ``served`` lists ``(name, request)``
    in the order the items were used."""

    def __init__(self, items: list[tuple[str, Handler, Callable[[dict], bool] | None]], then: Handler):
        self.items = list(items)
        self.then = then
        self.served: list[tuple[str, dict]] = []
        self._lock = threading.Lock()

    @property
    def finished(self) -> bool:
        with self._lock:
            return not self.items

    def __call__(self, request: dict) -> tuple:
        with self._lock:
            item = next((it for it in self.items if it[2] is None or it[2](request)), None)
            if item is not None:
                self.items.remove(item)
                self.served.append((item[0], request))
        return item[1](request) if item is not None else self.then(request)


def odd_digit_distribution(value: int) -> dict[str, float]:
    """Mostly mass on look-alike digits ('³' superscript, '٣' Arabic-Indic, '３' full-width) beside ``value``."""
    return {str(value): 0.4, "³": 0.3, "٣": 0.2, "３": 0.1}


RUN_ON = (
    "CT head slices with brain and skull and scalp and orbits and sinuses and ventricles and "
    "cortex and white matter"
)  # 20 words


def failure_script(valid: Handler, stall_s: float, retry_after_s: int = 1) -> TurnScript:
    """One of each failure a provider shows, by turn, between valid answers (``valid``):

    valid, HTTP 500, 429 with ``Retry-After``, invalid JSON, empty ``choices``, ``None`` content,
    logprobs with look-alike digits among the top tokens (the first request asking for logprobs),
    a 20-word run-on explanation repeated 30 times (the first explain request), a stall of
    ``stall_s`` seconds (past the client's timeout).
    """

    def server_error(request: dict) -> tuple:
        return 500, error_json(500, "scripted internal error")

    def rate_limited(request: dict) -> tuple:
        return 429, error_json(429, "scripted rate limit"), {"Retry-After": str(retry_after_s)}

    def invalid_json(request: dict) -> tuple:
        return 200, "{not json at all"

    def empty_choices(request: dict) -> tuple:
        status, body = valid(request)[:2]
        return status, {**body, "choices": []}

    def none_content(request: dict) -> tuple:
        status, body = valid(request)[:2]
        choice = {**body["choices"][0], "message": {"role": "assistant", "content": None}, "logprobs": None}
        return status, {**body, "choices": [choice]}

    def odd_digits(request: dict) -> tuple:
        status, body = valid(request)[:2]
        text = body["choices"][0]["message"]["content"]
        choice = {**body["choices"][0], "logprobs": {"content": int_logprobs(text, odd_digit_distribution)}}
        return status, {**body, "choices": [choice]}

    def run_on(request: dict) -> tuple:
        return 200, completion_json(request, "EXPLANATION: " + " ".join([RUN_ON] * 30))

    def stall(request: dict) -> tuple:
        time.sleep(stall_s)
        return valid(request)

    items: list[tuple[str, Handler, Callable[[dict], bool] | None]] = [
        ("valid", valid, None),
        ("http_500", server_error, None),
        ("rate_limit", rate_limited, None),
        ("invalid_json", invalid_json, None),
        ("empty_choices", empty_choices, None),
        ("none_content", none_content, None),
        ("odd_digit_logprobs", odd_digits, lambda r: bool(r.get("logprobs"))),
        ("run_on_explanation", run_on, lambda r: task_of(r).startswith("explain")),
        ("stall", stall, None),
    ]
    return TurnScript(items, valid)


# --------------------------------------------------------------------------- the server


class ScriptedLLMServer:
    """OpenAI-compatible chat server whose answers come from a Python handler (see module doc)."""

    def __init__(
        self,
        handler: Handler | None = None,
        latency_s: float = 0.0,
        max_requests: int = 100_000,
        lifetime_s: float = 3600.0,  # a safety net only: a loaded CI machine can take minutes per test
    ):
        self.handler: Handler = handler or text_handler("ok")
        self.latency_s = latency_s
        self.max_requests = max_requests
        self.lifetime_s = lifetime_s
        self.requests: list[dict] = []  # request bodies, in arrival order (bounded by max_requests)
        self.auth_headers: list[str] = []
        self.handler_errors: list[Exception] = []  # exceptions raised by the handler
        self._count = 0
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._timer: threading.Timer | None = None

    # -- control

    @property
    def n_requests(self) -> int:
        with self._lock:
            return self._count

    @property
    def url(self) -> str:
        """The ``api_base`` for litellm (``.../v1``)."""
        assert self._httpd is not None, "server not started"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def set_handler(self, handler: Handler, latency_s: float | None = None) -> None:
        self.handler = handler
        if latency_s is not None:
            self.latency_s = latency_s

    def reset(self) -> None:
        """Forget counted requests (the handler and latency stay)."""
        with self._lock:
            self._count = 0
            self.requests.clear()
            self.auth_headers.clear()

    def start(self) -> ScriptedLLMServer:
        server = self

        class RequestHandler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
                pass

            def do_POST(self) -> None:  # http.server's naming
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                answer = server._answer(self.path, raw, self.headers.get("Authorization", ""))
                status, body = answer[0], answer[1]
                headers = dict(answer[2]) if len(answer) > 2 else {}
                if status == 429:
                    headers.setdefault("Retry-After", "0")
                if isinstance(body, dict):
                    payload, ctype = json.dumps(body).encode(), "application/json"
                else:
                    payload = body.encode() if isinstance(body, str) else body
                    ctype = "text/plain"
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", ctype)
                    self.send_header("Content-Length", str(len(payload)))
                    for name, value in headers.items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
                    pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 256

        self._httpd = Server(("127.0.0.1", 0), RequestHandler)
        threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        self._timer = threading.Timer(self.lifetime_s, self.stop)
        self._timer.daemon = True
        self._timer.start()
        return self

    def stop(self) -> None:
        httpd, self._httpd = self._httpd, None
        if self._timer is not None:
            self._timer.cancel()
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()

    def __enter__(self) -> ScriptedLLMServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- serving

    def _answer(self, path: str, raw: bytes, auth: str) -> tuple:
        with self._lock:
            self._count += 1
            over = self._count > self.max_requests
        if over:
            return 503, error_json(503, "test server request limit reached")
        if not path.rstrip("/").endswith("/chat/completions"):
            return 404, error_json(404, f"unknown path {path}")
        try:
            request = json.loads(raw)
        except json.JSONDecodeError:
            return 400, error_json(400, "request body is not JSON")
        with self._lock:
            self.requests.append(request)
            self.auth_headers.append(auth)
        if self.latency_s > 0:
            time.sleep(self.latency_s)
        try:
            return self.handler(request)
        except Exception as exc:  # a bug in a scripted handler: answer 500 and keep it for the test
            with self._lock:
                self.handler_errors.append(exc)
            return 500, error_json(500, f"handler raised {type(exc).__name__}: {exc}")


@pytest.fixture(name="llm_server")
def llm_server_fixture(monkeypatch: pytest.MonkeyPatch) -> Iterator[ScriptedLLMServer]:
    """A started :class:`ScriptedLLMServer` (plain "ok" answers) with a dummy OPENAI_API_KEY set."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-medsae-test-dummy-key")
    with ScriptedLLMServer(lifetime_s=1800.0) as server:  # long enough for a loaded machine
        yield server
