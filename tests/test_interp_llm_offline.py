"""The offline ``medsae/<name>`` provider through litellm, and the request identity (hash)."""

from __future__ import annotations

import base64
import hashlib
import json

import pytest

from medsae.errors import MedsaeError
from medsae.interp.llm import LLMGateway, LLMRequest, canonical_request, request_hash
from medsae.interp.llm.offline import ensure_offline_provider, offline_model_names, register_offline_model

SEEN: list[tuple[list[dict], dict]] = []


def _shout(messages: list[dict], params: dict) -> str:
    SEEN.append((messages, params))
    return messages[-1]["content"].upper() + f" t={params.get('temperature')} s={params.get('seed')}"


def test_offline_models_dispatch_through_litellm(tmp_path):
    import litellm

    register_offline_model("shout", _shout)
    ensure_offline_provider()
    ensure_offline_provider()  # idempotent
    assert sum(item["provider"] == "medsae" for item in litellm.custom_provider_map) == 1
    assert {"echo", "shout"} <= set(offline_model_names())

    gw = LLMGateway(tmp_path / "cache")
    msgs = [{"role": "system", "content": "be loud"}, {"role": "user", "content": "three little words"}]
    resp = gw.complete(LLMRequest("medsae/shout", msgs, temperature=0.0, seed=5))
    assert resp.error is None and resp.text == "THREE LITTLE WORDS t=0.0 s=5"
    assert SEEN[-1][0] == msgs
    assert resp.tokens_in == 5 and resp.tokens_out == 5  # rough: words in, words out
    assert resp.cost_usd == 0.0 and gw.n_calls == 1

    # Plain litellm, sync and async entry points, reach the same handler.
    direct = litellm.completion(model="medsae/echo", messages=[{"role": "user", "content": "ping"}])
    assert direct.choices[0].message.content == "ping"

    out = gw.complete_many([LLMRequest("medsae/echo", [{"role": "user", "content": f"m{i}"}]) for i in range(20)])
    assert [r.text for r in out] == [f"m{i}" for i in range(20)]
    rows = gw.drain_call_rows()
    assert len(rows) == 21 and {r["model"] for r in rows} == {"medsae/shout", "medsae/echo"}

    again = LLMGateway(tmp_path / "cache").complete(LLMRequest("medsae/shout", msgs, temperature=0.0, seed=5))
    assert again.cached and len(SEEN) == 1  # answered from the cache, handler not called


def test_offline_errors(tmp_path):
    gw = LLMGateway(tmp_path / "cache", backoff_s=0.01)
    with pytest.raises(MedsaeError, match="medsae/nope"):
        gw.complete(LLMRequest("medsae/nope", [{"role": "user", "content": "x"}]))

    def broken(messages, params):
        raise ValueError("rule table empty")

    register_offline_model("broken", broken)
    resp = gw.complete(LLMRequest("medsae/broken", [{"role": "user", "content": "x"}]))
    assert resp.text is None and "rule table empty" in resp.error and resp.attempts == 1
    with pytest.raises(MedsaeError):
        register_offline_model("a/b", broken)


PNG_A = base64.b64encode(b"\x89PNG fake image A").decode()
PNG_B = base64.b64encode(b"\x89PNG fake image B").decode()


def _vision(png: str, **kw) -> LLMRequest:
    parts = [
        {"type": "text", "text": "describe"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}},
    ]
    return LLMRequest("openai/gpt-4o", [{"role": "user", "content": parts}], **kw)


def test_request_hash_identity():
    base = _vision(PNG_A)
    assert request_hash(base) == request_hash(_vision(PNG_A))
    assert len(request_hash(base)) == 64
    canon = canonical_request(base)
    stored_url = canon["messages"][0]["content"][1]["image_url"]["url"]
    assert stored_url == "sha256:" + hashlib.sha256(base64.b64decode(PNG_A)).hexdigest()
    assert PNG_A not in json.dumps(canon)
    assert base.messages[0]["content"][1]["image_url"]["url"].endswith(PNG_A)  # the request is untouched

    variants = [
        _vision(PNG_B),
        _vision(PNG_A, temperature=0.5),
        _vision(PNG_A, max_tokens=100),
        _vision(PNG_A, logprobs=True),
        _vision(PNG_A, logprobs=True, top_logprobs=20),
        _vision(PNG_A, seed=1),
        _vision(PNG_A, seed=None),
        _vision(PNG_A, template_hash="abc"),
        _vision(PNG_A, api_base="http://127.0.0.1:1/v1"),
        LLMRequest("openai/gpt-4o-mini", base.messages),
    ]
    hashes = {request_hash(v) for v in variants} | {request_hash(base)}
    assert len(hashes) == len(variants) + 1
    assert request_hash(_vision(PNG_A, temperature=0)) == request_hash(base)  # 0 and 0.0 are one value
