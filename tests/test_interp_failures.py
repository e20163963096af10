"""Real LLMs, real failures: every answer shape a provider sends is a parsed value or a recorded failure.

The big test drives ``medsae explain run`` through the real litellm HTTP path against the local
OpenAI-compatible server (tests/llm_server.py), which answers, by turn: a valid answer, HTTP 500,
429 with Retry-After, invalid JSON, empty ``choices``, ``None`` content, logprobs with look-alike
digits among the top tokens, a 20-word run-on explanation repeated 30 times, and a stall past the
client's timeout. Everything else is answered with the offline baseline's rules.
"""

from __future__ import annotations

import json
import math
import re

import pytest
from interp_fixtures import PUZZLE_PARAMS, puzzle_experiment
from llm_server import (  # noqa: F401  (llm_server_fixture provides the llm_server fixture)
    RUN_ON,
    baseline_handler,
    completion_json,
    failure_script,
    llm_server_fixture,
)
from typer.testing import CliRunner

from medsae.interp.config import InterpretSpec
from medsae.interp.llm import MalformedAnswer, TokenLogprob, parse_logprobs, read_answer
from medsae.interp.scorers.simulator import expected_values, parse_values
from medsae.registry import Registry

# --------------------------------------------------------------------------- answer shapes, no server


def test_look_alike_digits_never_count():
    """The crash of the issue: '³' passes str.isdigit() but not int()."""
    tokens = [
        TokenLogprob("X01", -0.1, []),
        TokenLogprob(":", -0.1, []),
        TokenLogprob(" 3", -0.5, [(" 3", -0.5), ("³", -3.0)]),
    ]
    ev, fallback = expected_values(tokens, ["X01"], 10)
    assert ev == {"X01": pytest.approx(3.0)} and not fallback
    # mass on '٣' (Arabic-Indic) and '３' (full-width) is dropped too; ASCII alternatives are renormalised
    top = [(" 3", math.log(0.4)), ("٣", math.log(0.3)), ("３", math.log(0.2)), (" 5", math.log(0.1))]
    ev, _ = expected_values(
        [TokenLogprob("X01", 0, []), TokenLogprob(":", 0, []), TokenLogprob(" 3", math.log(0.4), top)], ["X01"], 10
    )
    assert ev["X01"] == pytest.approx((0.4 * 3 + 0.1 * 5) / 0.5)
    # and an answer written in look-alike digits is not a value at all
    assert parse_values("X01: ٣\nX02: ３\nX03: 4", ["X01", "X02", "X03"], 10) == {"X03": 4}


def test_any_answer_shape_is_read_without_an_exception():
    request = {"model": "m", "messages": [{"role": "user", "content": "q"}]}
    body = completion_json(request, "EXPLANATION: liver")
    with pytest.raises(MalformedAnswer):
        read_answer({**body, "choices": []}, wants_logprobs=False)
    with pytest.raises(MalformedAnswer):
        read_answer({k: v for k, v in body.items() if k != "choices"}, wants_logprobs=False)
    none = {
        **body,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": None}, "finish_reason": "length"}],
    }
    answer = read_answer(none, wants_logprobs=False)
    assert answer.text is None and answer.problem == "no content (finish_reason=length)"
    ignored = read_answer(body, wants_logprobs=True)  # a provider that ignores logprobs
    assert ignored.text == "EXPLANATION: liver" and ignored.problem == "no logprobs"
    parts = {
        **body,
        "choices": [{"message": {"content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}}],
    }
    assert read_answer(parts, wants_logprobs=False).text == "ab"
    assert read_answer({**body, "usage": {"prompt_tokens": "x"}}, wants_logprobs=False).tokens_in == 0
    # partial / odd logprobs: bad entries are skipped, never an exception
    odd = {
        "content": [
            {"token": "X01", "logprob": None},
            {"token": 7, "logprob": -1},
            {
                "token": " 3",
                "logprob": -0.2,
                "top_logprobs": [{"token": " 3", "logprob": "nan"}, {"token": " 4", "logprob": -2}],
            },
        ]
    }
    parsed = parse_logprobs(odd)
    assert [(t.token, t.top) for t in parsed] == [(" 3", [(" 4", -2.0)])]
    assert parse_logprobs({"content": "garbage"}) is None and parse_logprobs({"content": [{}]}) is None


# --------------------------------------------------------------------------- the HTTP path, by turn

PARAMS = InterpretSpec.model_validate(PUZZLE_PARAMS | {"simulate_batch": 10, "retry_backoff_s": 0.05}).model_dump(
    mode="json"
)

TIMEOUT_S = 2.0


def warm_up_litellm(tmp_path, server) -> None:
    """One request through litellm (not counted by the server afterwards)."""
    from medsae.interp.llm import LLMGateway, LLMRequest

    request = LLMRequest("openai/warm-up", [{"role": "user", "content": "hello"}], api_base=server.url)
    assert LLMGateway(tmp_path / "warm-up-cache").complete(request).error is None
    server.reset()


def test_every_failure_is_a_recorded_row_and_the_rerun_makes_no_call(tmp_path, llm_server, monkeypatch):
    from medsae.cli.explain import app

    monkeypatch.setenv("MEDSAE_LLM_CACHE", str(tmp_path / "llm_cache"))
    monkeypatch.setenv("COLUMNS", "250")
    registry = Registry(tmp_path / "registry.duckdb")
    puzzle_experiment(tmp_path / "artifacts", registry, PARAMS)
    warm_up_litellm(tmp_path, llm_server)  # its first call imports for seconds: not inside a timed call
    script = failure_script(baseline_handler(), stall_s=TIMEOUT_S + 1.5, retry_after_s=1)
    llm_server.set_handler(script)
    url = llm_server.url
    command = [
        "run", "puzzles", "--model", "openai/test-explainer", "--api-base", url,
        "--scorer", "openai/test-scorer", "--scorer-api-base", url,
        "--concurrency", "1", "--timeout", str(TIMEOUT_S), "--max-retries", "4", "--registry", str(registry.path),
    ]  # fmt: skip
    runner = CliRunner()
    res = runner.invoke(app, command)
    assert res.exit_code == 0, res.output
    assert script.finished, [name for name, *_ in script.items]  # every scripted answer was served
    served = [name for name, _ in script.served]
    assert served == [
        "valid", "http_500", "rate_limit", "invalid_json", "empty_choices", "none_content",
        "run_on_explanation", "stall", "odd_digit_logprobs",
    ]  # fmt: skip
    assert not llm_server.handler_errors

    # every failed attempt is an llm_calls row naming what happened (all five were retried; litellm
    # reports the invalid JSON body as a 500 too)
    errors = [r["error"] for r in registry.query("SELECT error FROM llm_calls WHERE error IS NOT NULL")]
    assert len(errors) == 5, errors
    for needle in ("(500)", "(429)", "invalid response", "no choices", "within the timeout"):
        assert sum(needle in e for e in errors) == (2 if needle == "(500)" else 1), (needle, errors)
    assert all(e.startswith("attempt ") and "retried after" in e for e in errors)
    assert "retried after 1.00s" in next(e for e in errors if "(429)" in e)  # Retry-After was honoured

    # the None content and the run-on explanation are recorded explanations, not crashes
    expl = registry.query("SELECT latent, status, text, n_examples FROM explanations WHERE kind = 'explanation'")
    by_status = {}
    for r in expl:
        by_status.setdefault(r["status"], []).append(r)
    assert len(expl) == 8 and {s: len(v) for s, v in by_status.items()} == {"ok": 6, "parse_failed": 1, "repetitive": 1}
    assert by_status["parse_failed"][0]["text"] is None
    assert by_status["repetitive"][0]["text"] == " ".join([RUN_ON] * 30)
    assert all(r["n_examples"] > 0 for r in expl)
    no_content = registry.query("SELECT response_json FROM llm_calls WHERE response_json LIKE '%no content%'")
    assert len(no_content) == 1 and json.loads(no_content[0]["response_json"])["text"] is None

    # only ok explanations are scored or lent as shuffled baselines; no score is 0 because of a failure
    scores = registry.query(
        """SELECT e.latent, e.kind, e.status, e.text, s.method, s.value, s.n, s.n_missing, s.degenerate
           FROM explanation_scores s JOIN explanations e USING (explanation_id) WHERE s.scorer_model <> 'rule'"""
    )
    assert {r["status"] for r in scores} == {"ok", "baseline"}
    assert not any(r["text"] and RUN_ON in r["text"] for r in scores)
    pearson = [r for r in scores if r["method"] == "pearson"]
    assert len([r for r in pearson if r["kind"] == "explanation"]) == 6
    assert all(r["n_missing"] == 0 and r["value"] is not None and not r["degenerate"] for r in pearson)
    real = [r["value"] for r in pearson if r["kind"] == "explanation"]
    shuffled = [r["value"] for r in pearson if r["kind"] == "shuffled"]
    assert min(real) > 0.3 and sum(real) / len(real) - sum(shuffled) / len(shuffled) > 0.5

    # the look-alike digits reached the simulator (a logprob_ev batch) and were read, not crashed on
    odd_request = next(req for name, req in script.served if name == "odd_digit_logprobs")
    assert odd_request["logprobs"] is True and "Task: simulate" in odd_request["messages"][0]["content"]
    answers = [json.loads(r["response_json"]) for r in registry.query("SELECT response_json FROM llm_calls")
               if r["response_json"]]  # fmt: skip
    alternatives = {alt for a in answers for _, _, top in a["logprobs"] or [] for alt, _ in top}
    assert {"³", "٣", "３"} <= alternatives

    # the run ends with the summary line, with the counts recorded above
    line = re.search(r"latents done .*", res.output).group(0)
    assert line.startswith(
        "latents done 8/8 · parse failures 1 · rejected explanations 1 · failed calls 0 "
        "(retried attempts 5) · missing predictions 0 · degenerate scores 0/"
    ), line

    print(
        f"figures: {line}; failed attempts recorded: {len(errors)}; explanations by status: "
        f"{ {k: len(v) for k, v in by_status.items()} }"
    )
    # the rerun makes no new call and adds no row
    llm_server.reset()
    again = runner.invoke(app, command)
    assert again.exit_code == 0, again.output
    assert llm_server.n_requests == 0
    assert "new rows: explanations 0, explanation_scores 0, llm_calls 0, prompts 0" in again.output
    assert "latents done 8/8" in again.output


def test_missing_key_fails_before_any_work(tmp_path, llm_server, monkeypatch):
    from medsae.cli.explain import app

    monkeypatch.setenv("MEDSAE_LLM_CACHE", str(tmp_path / "llm_cache"))
    registry = Registry(tmp_path / "registry.duckdb")
    puzzle_experiment(tmp_path / "artifacts", registry, PARAMS, n_scans=30)
    monkeypatch.delenv("OPENAI_API_KEY")
    res = CliRunner().invoke(
        app, ["run", "puzzles", "--model", "openai/x", "--api-base", llm_server.url, "--registry", str(registry.path)]
    )
    assert res.exit_code != 0 and "OPENAI_API_KEY" in str(res.exception)
    assert llm_server.n_requests == 0 and not (tmp_path / "llm_cache").exists()
    assert registry.query("SELECT count(*) AS n FROM explanations")[0]["n"] == 0


def test_provider_without_logprobs_falls_back_to_parsed_values(tmp_path, llm_server):
    """A logprob_ev scorer whose server ignores ``logprobs``: parsed integers, and the score says so."""
    from llm_server import text_handler

    from medsae.interp.agent import Agent, AgentInputs
    from medsae.interp.llm import rule_model

    registry = Registry(tmp_path / "registry.duckdb")
    dirs = puzzle_experiment(tmp_path / "artifacts", registry, PARAMS, n_scans=30)
    llm_server.set_handler(text_handler(lambda r: rule_model.handle(r["messages"], {})))
    params = PARAMS | {
        "scorer_model": "openai/no-logprobs", "scorer_api_base": llm_server.url,
        "simulation_mode": "logprob_ev", "max_latents": 2, "shuffled_min": 0, "shuffled_fraction": 0.0,
    }  # fmt: skip
    inputs = AgentInputs(dirs["summarize"], dirs["slices"], "train-key", "summarize-key")
    result = Agent(inputs, InterpretSpec.model_validate(params), tmp_path / "cache").run()
    rows = [r for r in result.tables["explanation_scores"] if r["method"] == "pearson" and r["scorer_model"] != "rule"]
    assert len(rows) == 2
    for r in rows:
        extra = json.loads(r["extra_json"])
        n_batches = math.ceil(r["n"] / 10)
        assert extra["n_no_logprobs"] == n_batches and extra["n_ev_fallback"] == r["n"]
        assert r["scorer_mode"] == "logprob_ev" and r["value"] is not None
    assert llm_server.requests and all(req.get("logprobs") is True for req in llm_server.requests)
    assert result.summary["missing_predictions"] == 0


def test_a_widened_pool_and_an_empty_split_are_said():
    import scipy.sparse as sp
    from interp_fixtures import VOCAB, make_slices

    from medsae.interp.sampling import build_pool
    from medsae.interp.stage import pool_warnings

    slices, _ = make_slices(n_scans=12, slices_per_scan=4, seed=0, split="train")
    presence = sp.csr_matrix((len(slices), len(VOCAB)), dtype=bool)
    params = {"pool_splits": ["val"], "min_pool_scans": 10, "explain_fraction": 0.5, "seed": 0}
    pool = build_pool(slices, slices["slice_id"].to_numpy(), presence, InterpretSpec.model_validate(params))
    lines = pool_warnings(pool, ["val"], slices)
    assert lines[0] == "interpretation pool: split(s) val hold no slice"
    assert lines[1].startswith("interpretation pool widened from val to train (12 scans)")
    assert "includes the SAE's training split" in lines[1] and len(lines) == 2


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("B, A, C, D, E", list("BACDE")),
        ("Ranking: B, A, C, D, E\nB names the liver, as does A; the others do not.", list("BACDE")),  # text after
        ("I compared them.\nC > A > E > B > D", list("CAEBD")),
        ("A, B, C", None),
        ("A, A, B, C, D", None),
        (None, None),
    ],
)
def test_ranking_answers_with_text_around_them(text, expected):
    from medsae.interp.scorers.ranking import parse_ranking

    assert parse_ranking(text) == expected
