"""Simulator parsing, logprob expected values, repair and missing-not-zero; explanation parsing."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

from medsae.interp.explainer import parse_explanation, strengths
from medsae.interp.llm import LLMGateway, TokenLogprob
from medsae.interp.llm.offline import register_offline_model
from medsae.interp.prompts import load_template
from medsae.interp.scorers.simulator import (
    LOGPROB_EV,
    PARSED_INT,
    SimJob,
    Simulator,
    expected_values,
    labels,
    parse_values,
    run_jobs,
)

sys.path.insert(0, str(Path(__file__).parent))
from llm_server import (
    llm_server_fixture,  # noqa: F401
    logprob_handler,
    peaked,
    text_handler,
)

# --------------------------------------------------------------------------- strict parsing


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("X01: 3\nX02: 10\nX03: 0", {"X01": 3, "X02": 10, "X03": 0}),
        ("X01: 3\nX03: 1", {"X01": 3, "X03": 1}),  # X02 missing
        ("X01: 3\nX01: 4\nX02: 2\nX03: 5", {"X02": 2, "X03": 5}),  # duplicate id -> missing
        ("X01: 11\nX02: 7\nX03: -1", {"X02": 7}),  # out of range, negative
        ("Sure! Here are my predictions:\nX01: 2\nX02 is probably 5\nX03: 4 (liver)\n", {"X01": 2}),  # prose
        ("X01: 2\nX09: 5\nX02: 1\nX03: 3", {"X01": 2, "X02": 1, "X03": 3}),  # id not in the batch
        ("X01=6\n  X02 : 8  \nX03: 7.5", {"X01": 6, "X02": 8}),  # '=' and spaces accepted, decimals not
        ("", {}),
        (None, {}),
    ],
)
def test_parse_values(text, expected):
    assert parse_values(text, ["X01", "X02", "X03"], 10) == expected


def test_labels_are_fresh_per_call():
    assert labels(3) == ["X01", "X02", "X03"]
    assert labels(100)[-1] == "X100"


# --------------------------------------------------------------------------- logprob expected values


def tok(token: str, alternatives: dict[str, float] | None = None) -> TokenLogprob:
    alts = alternatives or {token: 1.0}
    return TokenLogprob(token, math.log(alts.get(token, 1e-9)), [(t, math.log(p)) for t, p in alts.items()])


def test_expected_value_from_hand_made_distributions():
    tokens = [
        tok("X01"),
        tok(":"),
        tok(" "),
        tok("7", {"7": 0.6, "8": 0.3, "hello": 0.1}),
        tok("\n"),
        tok("X02"),
        tok(": "),
        tok("0", {"0": 0.5, "10": 0.25, "2": 0.25}),
        tok("\n"),
        tok("X03"),
        tok(":"),
        tok(" 4", {" 4": 0.7, " 5": 0.2, "11": 0.1}),
    ]
    ev, fallback = expected_values(tokens, ["X01", "X02", "X03"], 10)
    # renormalised over integer tokens 0..10 only ("hello" and "11" are dropped)
    assert ev["X01"] == pytest.approx((0.6 * 7 + 0.3 * 8) / 0.9)
    assert ev["X02"] == pytest.approx(0.5 * 0 + 0.25 * 10 + 0.25 * 2)
    assert ev["X03"] == pytest.approx((0.7 * 4 + 0.2 * 5) / 0.9)
    assert not fallback


def test_expected_value_falls_back_when_the_number_spans_tokens():
    tokens = [
        tok("X01"),
        tok(": "),
        tok("1", {"1": 0.9, "2": 0.1}),
        tok("0"),
        tok("\n"),
        tok("X02"),
        tok(":"),
        tok(" 3", {" 3": 1.0}),
    ]
    ev, fallback = expected_values(tokens, ["X01", "X02"], 10)
    assert fallback == {"X01"} and ev == {"X02": pytest.approx(3.0)}
    ev, fallback = expected_values(None, ["X01"], 10)
    assert ev == {} and fallback == {"X01"}


# --------------------------------------------------------------------------- explanation parsing


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "thinking...\nEXPLANATION: Axial CT slices through the liver.",
            "Axial CT slices through the liver.",
        ),
        ("**Explanation:** coronal MRI of the pelvis", "coronal MRI of the pelvis"),
        ("EXPLANATION: first\nmore\nEXPLANATION: second one", "second one"),
        ("EXPLANATION:\n  Sagittal slices of the spine", "Sagittal slices of the spine"),
        ('explanation: "liver present"', "liver present"),
        ("The feature likes livers.", None),
        ("EXPLANATION:   ", None),
        ("", None),
    ],
)
def test_parse_explanation(text, expected):
    assert parse_explanation(text) == expected


def test_strengths_floor_and_minimum_one():
    acts = np.array([4.0, 3.99, 0.2, 0.0, 2.0])
    assert strengths(acts).tolist() == [10, 9, 1, 0, 5]


# --------------------------------------------------------------------------- through the gateway


def _sim(model: str, mode: str = PARSED_INT, batch: int = 5) -> Simulator:
    return Simulator(
        model=model,
        template=load_template("simulator_metadata_v1"),
        mode=mode,
        batch_size=batch,
        legend=["modality: CT, MRI"],
    )


def _lines(n: int) -> dict[int, str]:
    return {i: f"CT; axial; abdomen; pos 0.{i % 10}0; liver {10 + i}%" for i in range(n)}


def _ids_in(messages: list[dict]) -> list[str]:
    import re

    return re.findall(
        r"^(X\d+) \|",
        messages[-1]["content"] if isinstance(messages[-1]["content"], str) else "",
        re.MULTILINE,
    )


def test_missing_predictions_stay_missing_after_one_repair(tmp_path):
    calls = {"first": 0, "repair": 0}

    def drops_second(messages, params):
        if messages[-1]["content"].startswith("Your answer could not be read"):
            calls["repair"] += 1
            return "I still refuse to answer for the second slice."
        calls["first"] += 1
        ids = _ids_in(messages)
        return "\n".join(f"{i}: 4" for i in ids if i != "X02")

    register_offline_model("test_drops_second", drops_second)
    gw = LLMGateway(tmp_path / "cache", mode="record")
    sim = _sim("medsae/test_drops_second")
    job = SimJob("j", "liver", np.arange(10), order_seed=3)
    run_jobs(gw, [(sim, [job])], _lines(10))
    assert calls == {"first": 2, "repair": 2}  # one repair per malformed batch, never more
    assert np.isnan(job.values).sum() == 2  # X02 of each batch: missing, not zero
    assert (job.values[np.isfinite(job.values)] == 4).all()


def test_repair_fills_what_the_first_answer_missed(tmp_path):
    def repairs(messages, params):
        if messages[-1]["content"].startswith("Your answer could not be read"):
            ids = _ids_in(messages[:-2])
            return "\n".join(f"{i}: 7" for i in ids)
        return "X01: 1\nX01: 2\nnonsense"

    register_offline_model("test_repairs", repairs)
    gw = LLMGateway(tmp_path / "cache", mode="record")
    job = SimJob("j", "liver", np.arange(4), order_seed=0)
    run_jobs(gw, [(_sim("medsae/test_repairs", batch=4), [job])], _lines(4))
    assert job.values.tolist() == [7.0] * 4 and job.n_repaired == 4


def test_shuffled_batches_join_by_id_not_position(tmp_path):
    """The answer repeats each slice's liver share; values must land on the right slice ids."""
    import re

    def echo_share(messages, params):
        rows = re.findall(r"^(X\d+) \| .*liver (\d+)%", messages[-1]["content"], re.MULTILINE)
        return "\n".join(f"{i}: {int(s) % 11}" for i, s in reversed(rows))  # reversed order on purpose

    register_offline_model("test_echo_share", echo_share)
    gw = LLMGateway(tmp_path / "cache", mode="record")
    ids = np.arange(20)
    job = SimJob("j", "liver", ids, order_seed=11)
    run_jobs(gw, [(_sim("medsae/test_echo_share", batch=6), [job])], _lines(20))
    np.testing.assert_array_equal(job.values, (10 + ids) % 11)


def test_logprob_ev_over_http(llm_server, tmp_path):
    """Real HTTP path: litellm -> local OpenAI-compatible server with logprobs (and a plain-text mode)."""
    import re

    def answer(request):
        rows = re.findall(r"^(X\d+) \|.*liver (\d+)%", request["messages"][-1]["content"], re.MULTILINE)
        return "\n".join(f"{i}: {int(s) % 11}" for i, s in rows)

    llm_server.set_handler(logprob_handler(answer, lambda v: peaked(v, spread=1.0)))
    gw = LLMGateway(tmp_path / "cache", mode="record", concurrency=4)
    sim = _sim("openai/test-sim", mode=LOGPROB_EV, batch=5)
    sim.api_base = llm_server.url
    job = SimJob("j", "liver", np.arange(10), order_seed=5)
    run_jobs(gw, [(sim, [job])], _lines(10))
    expected = []
    for v in (10 + np.arange(10)) % 11:
        dist = peaked(int(v), spread=1.0)
        expected.append(sum(int(k) * p for k, p in dist.items()))
    np.testing.assert_allclose(job.values, expected, rtol=1e-6)
    assert llm_server.requests[0]["logprobs"] is True and llm_server.requests[0]["top_logprobs"] == 20
    # plain text (no logprobs): parsed integers, with the EV fallback counted
    llm_server.set_handler(text_handler(answer))
    job2 = SimJob("j2", "liver", np.arange(10), order_seed=6)
    sim2 = _sim("openai/test-sim-plain", mode=LOGPROB_EV, batch=5)
    sim2.api_base = llm_server.url
    run_jobs(gw, [(sim2, [job2])], _lines(10))
    np.testing.assert_array_equal(job2.values, (10 + np.arange(10)) % 11)
    assert job2.n_fallback == 10
    # rerun: everything from the cache
    n = llm_server.n_requests
    job3 = SimJob("j", "liver", np.arange(10), order_seed=5)
    run_jobs(gw, [(sim, [job3])], _lines(10))
    assert llm_server.n_requests == n and np.allclose(job3.values, job.values)
