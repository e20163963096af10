"""The LLM gateway over the real HTTP path: gateway -> litellm -> local OpenAI-compatible server.

The server (tests/llm_server.py) runs on 127.0.0.1 in a thread; litellm talks to it as the
``openai`` provider via ``api_base`` with a dummy key. ``openai/gpt-4o-mini`` is used where a
price matters (litellm's bundled price table), ``openai/test-model`` (unpriced) elsewhere.
"""

from __future__ import annotations

import json
import math
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from llm_server import (  # noqa: F401  (llm_server_fixture provides the llm_server fixture)
    GARBAGE,
    ScriptedLLMServer,
    completion_json,
    fail_first,
    garbage_handler,
    int_logprobs,
    llm_server_fixture,
    logprob_handler,
    raw_garbage_handler,
    text_handler,
)

from medsae.errors import MedsaeError
from medsae.interp.llm import LLMGateway, LLMRequest

DUMMY_KEY = "sk-medsae-test-dummy-key"  # what the llm_server fixture puts in OPENAI_API_KEY


def ask(server: ScriptedLLMServer, text: str = "hello", model: str = "openai/test-model", **kw) -> LLMRequest:
    return LLMRequest(model=model, messages=[{"role": "user", "content": text}], api_base=server.url, **kw)


def gateway(tmp_path: Path, **kw) -> LLMGateway:
    kw.setdefault("backoff_s", 0.01)
    kw.setdefault("timeout_s", 10)
    return LLMGateway(tmp_path / "llm_cache", **kw)


# A hand-made distribution over "0".."10" for each integer the server emits (not the default shape).
HAND_DISTRIBUTIONS = {
    7: {"7": 0.5, "6": 0.2, "8": 0.2, "10": 0.05, "0": 0.05},
    2: {"2": 0.6, "0": 0.3, "3": 0.1},
}


def test_logprobs_are_parsed_from_the_provider(tmp_path, llm_server):
    answer = "X01: 7\nX02: 2"
    llm_server.set_handler(logprob_handler(answer, distribution=lambda v: HAND_DISTRIBUTIONS[v]))
    gw = gateway(tmp_path)
    resp = gw.complete(ask(llm_server, logprobs=True, top_logprobs=20))

    assert resp.error is None and resp.text == answer
    sent = llm_server.requests[-1]
    assert sent["logprobs"] is True and sent["top_logprobs"] == 20
    assert [t.token for t in resp.logprobs] == ["X01", ":", " ", "7", "\n", "X02", ":", " ", "2"]
    # Expected value per integer token, recomputed here from the hand-made distributions.
    for token, value in ((resp.logprobs[3], 7), (resp.logprobs[8], 2)):
        truth = HAND_DISTRIBUTIONS[value]
        parsed = {t: math.exp(lp) for t, lp in token.top}
        assert parsed.keys() == truth.keys()
        for t, p in truth.items():
            assert parsed[t] == pytest.approx(p, rel=1e-9)
        assert token.logprob == pytest.approx(math.log(truth[token.token]))
        ks = np.array([int(t) for t in truth])
        ps = np.array(list(truth.values()))
        ev_truth = float((ks * ps).sum() / ps.sum())
        ev_parsed = sum(int(t) * p for t, p in parsed.items()) / sum(parsed.values())
        assert ev_parsed == pytest.approx(ev_truth, abs=1e-9)


def test_plain_text_without_logprobs(tmp_path, llm_server):
    llm_server.set_handler(logprob_handler("X01: 4"))  # only adds logprobs when asked
    resp = gateway(tmp_path).complete(ask(llm_server))
    assert resp.text == "X01: 4" and resp.logprobs is None and resp.error is None
    assert "logprobs" not in llm_server.requests[-1]


def test_rate_limit_then_success_is_retried(tmp_path, llm_server):
    llm_server.set_handler(fail_first(2, text_handler("finally"), status=429))
    gw = gateway(tmp_path)
    resp = gw.complete(ask(llm_server))
    assert resp.text == "finally" and resp.error is None
    assert resp.attempts == 3 and llm_server.n_requests == 3
    assert gw.n_calls == 1 and gw.n_attempts == 3 and gw.n_retries == 2


def test_server_error_retried_but_client_error_not(tmp_path, llm_server):
    gw = gateway(tmp_path, max_retries=2)
    llm_server.set_handler(fail_first(1, text_handler("recovered"), status=503))
    assert gw.complete(ask(llm_server, "a")).text == "recovered"
    assert llm_server.n_requests == 2

    llm_server.reset()
    llm_server.set_handler(fail_first(10, text_handler("never"), status=400))
    resp = gw.complete(ask(llm_server, "b"))
    assert resp.text is None and "400" in resp.error and resp.attempts == 1
    assert llm_server.n_requests == 1

    llm_server.reset()
    llm_server.set_handler(fail_first(10, text_handler("never"), status=500))
    resp = gw.complete(ask(llm_server, "c"))  # retries exhausted: an error response, no exception
    assert resp.text is None and resp.error and resp.attempts == 3
    assert llm_server.n_requests == 3


def test_garbage_text_is_returned_as_text_and_garbage_body_as_error(tmp_path, llm_server):
    gw = gateway(tmp_path, max_retries=1)
    llm_server.set_handler(garbage_handler())
    resp = gw.complete(ask(llm_server, "g1", logprobs=True, top_logprobs=5))
    assert resp.text == GARBAGE and resp.error is None

    llm_server.set_handler(raw_garbage_handler())
    bad = gw.complete(ask(llm_server, "g2"))
    assert bad.text is None and bad.error
    # Errors are not cached: the same request goes to the provider again.
    before = llm_server.n_requests
    llm_server.set_handler(text_handler("fixed"))
    assert gw.complete(ask(llm_server, "g2")).text == "fixed"
    assert llm_server.n_requests == before + 1


def test_rerun_hits_the_cache_and_makes_zero_calls(tmp_path, llm_server):
    llm_server.set_handler(logprob_handler(lambda req: f"echo {req['messages'][-1]['content']}"))
    reqs = [ask(llm_server, f"q{i}", logprobs=True, top_logprobs=11) for i in range(6)]
    first = gateway(tmp_path).complete_many(reqs)
    assert llm_server.n_requests == 6

    second_gw = gateway(tmp_path)  # a fresh process would see only the files
    second = second_gw.complete_many(reqs)
    assert llm_server.n_requests == 6 and second_gw.n_calls == 0
    assert [r.text for r in second] == [f"echo q{i}" for i in range(6)]
    assert all(r.cached and r.cost_usd == 0 for r in second)
    for a, b in zip(first, second, strict=True):
        assert a.request_hash == b.request_hash and a.logprobs == b.logprobs

    replay = gateway(tmp_path, mode="replay").complete_many(reqs)
    assert [r.text for r in replay] == [r.text for r in first]

    # One JSON file per response; the key is nowhere on disk.
    files = sorted((tmp_path / "llm_cache").rglob("*.json"))
    assert len(files) == 6
    for f in files:
        entry = json.loads(f.read_text())
        assert f.stem == entry["request_hash"]
        assert DUMMY_KEY not in f.read_text()
    assert all(h.endswith(DUMMY_KEY) for h in llm_server.auth_headers)  # the key did reach the server


def test_replay_miss_names_the_request(tmp_path, llm_server):
    gw = gateway(tmp_path, mode="replay")
    req = ask(llm_server, "never recorded", template_hash="tmpl123")
    with pytest.raises(MedsaeError) as err:
        gw.complete(req)
    message = str(err.value)
    assert gw.request_hash(req) in message and "openai/test-model" in message and "tmpl123" in message
    assert "\n" not in message and llm_server.n_requests == 0


def test_call_rows_carry_cost_tokens_and_latency(tmp_path, llm_server):
    import litellm

    from medsae.registry.db import Registry

    llm_server.set_handler(
        lambda req: (200, completion_json(req, "priced answer", prompt_tokens=1200, completion_tokens=80)),
        latency_s=0.05,
    )
    gw = gateway(tmp_path)
    resp = gw.complete(ask(llm_server, model="openai/gpt-4o-mini", template_hash="t1"))
    price = litellm.model_cost["gpt-4o-mini"]
    expected = 1200 * price["input_cost_per_token"] + 80 * price["output_cost_per_token"]
    assert expected > 0 and resp.cost_usd == pytest.approx(expected, rel=1e-9)
    assert resp.tokens_in == 1200 and resp.tokens_out == 80 and resp.latency_s >= 0.05

    gw.complete(ask(llm_server, model="openai/gpt-4o-mini", template_hash="t1"))  # cache hit
    unpriced = gw.complete(ask(llm_server, "x", model="openai/test-model"))  # litellm has no price: 0
    assert unpriced.cost_usd == 0.0 and unpriced.error is None

    rows = gw.drain_call_rows()
    assert gw.drain_call_rows() == []
    assert [r["cached"] for r in rows] == [False, True, False]
    assert rows[0]["cost_usd"] == pytest.approx(expected) and rows[1]["cost_usd"] == 0.0
    assert rows[0]["template_hash"] == "t1" and rows[0]["latency_s"] >= 0.05
    assert json.loads(rows[0]["response_json"])["text"] == "priced answer"
    assert not any(DUMMY_KEY in json.dumps(r) for r in rows)

    registry = Registry(tmp_path / "registry.duckdb")  # the rows fit the registry table as they are
    registry.insert("llm_calls", rows, ignore_conflicts=False)  # llm_calls has no key to conflict on
    stored = registry.query("SELECT sum(cost_usd) AS cost, sum(tokens_in) AS tin, count(*) AS n FROM llm_calls")
    assert stored[0]["n"] == 3 and stored[0]["tin"] == 1200 * 2 + unpriced.tokens_in
    assert stored[0]["cost"] == pytest.approx(expected)


def test_concurrent_calls_overlap_within_the_limit(tmp_path, llm_server):
    lock = threading.Lock()
    state = {"now": 0, "peak": 0}

    def slow(req):
        with lock:
            state["now"] += 1
            state["peak"] = max(state["peak"], state["now"])
        time.sleep(0.2)
        with lock:
            state["now"] -= 1
        return 200, completion_json(req, req["messages"][-1]["content"].upper())

    llm_server.set_handler(slow)
    gw = gateway(tmp_path, concurrency=8)
    reqs = [ask(llm_server, f"item {i}") for i in range(24)]
    start = time.perf_counter()
    out = gw.complete_many(reqs)
    elapsed = time.perf_counter() - start
    assert [r.text for r in out] == [f"ITEM {i}" for i in range(24)]  # order preserved
    assert state["peak"] == 8  # the limit is reached and never passed
    assert 0.6 <= elapsed < 24 * 0.2 / 2  # 3 waves of 200 ms; serial would take 4.8 s


def test_identical_requests_in_flight_make_one_call(tmp_path, llm_server):
    llm_server.set_handler(text_handler("same"), latency_s=0.1)
    out = gateway(tmp_path).complete_many([ask(llm_server, "dup")] * 5)
    assert [r.text for r in out] == ["same"] * 5 and llm_server.n_requests == 1


def test_budget_exceeded_stops_new_calls(tmp_path, llm_server):
    llm_server.set_handler(lambda req: (200, completion_json(req, "ok", prompt_tokens=100, completion_tokens=10)))
    gw = gateway(tmp_path, concurrency=1, max_cost_usd=0.0)
    out = gw.complete_many([ask(llm_server, f"b{i}", model="openai/gpt-4o-mini") for i in range(3)])
    assert out[0].error is None and out[0].cost_usd > 0
    assert [r.error for r in out[1:]] == ["budget exceeded", "budget exceeded"]
    assert llm_server.n_requests == 1 and gw.n_calls == 1
    # Cache hits are free and still served.
    assert gw.complete(ask(llm_server, "b0", model="openai/gpt-4o-mini")).text == "ok"


def test_timeout_is_retried_then_reported(tmp_path, llm_server):
    llm_server.set_handler(text_handler("late"), latency_s=1.0)
    gw = gateway(tmp_path, timeout_s=0.3, max_retries=1)
    start = time.perf_counter()
    resp = gw.complete(ask(llm_server, "slow"))
    assert resp.text is None and resp.error and resp.attempts == 2
    assert time.perf_counter() - start < 1.5


def test_user_errors_raise_one_line(tmp_path, llm_server, monkeypatch):
    gw = gateway(tmp_path)
    monkeypatch.delenv("OPENAI_API_KEY")
    with pytest.raises(MedsaeError, match="OPENAI_API_KEY") as err:
        gw.complete(ask(llm_server))
    assert "openai/test-model" in str(err.value) and "\n" not in str(err.value)

    with pytest.raises(MedsaeError, match="unknown LLM provider"):
        gw.complete(ask(llm_server, model="nosuchprovider/some-model"))

    monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong")
    llm_server.set_handler(fail_first(5, text_handler("never"), status=401))
    with pytest.raises(MedsaeError, match="rejected the API key; check OPENAI_API_KEY"):
        gw.complete(ask(llm_server, "auth"))
    assert llm_server.n_requests == 1

    with pytest.raises(MedsaeError, match="unknown mode"):
        LLMGateway(tmp_path, mode="offline")


def test_int_logprobs_builder_marks_only_integer_tokens():
    entries = int_logprobs("X10: 10\nX02: 0", lambda v: {str(v): 1.0})
    marked = [e["token"] for e in entries if len(e["top_logprobs"]) and e["top_logprobs"][0]["token"].isdigit()]
    assert marked == ["10", "0"]
