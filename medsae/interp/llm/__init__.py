"""The one door to language models (litellm), as its own package: every LLM call of medsae goes through it.

* :mod:`~medsae.interp.llm.messages` — request and answer types, the request's identity (hash),
  reading a provider's answer of any shape;
* :mod:`~medsae.interp.llm.cache` — the response cache (one JSON file per answered request);
* :mod:`~medsae.interp.llm.gateway` — :class:`LLMGateway`: concurrency, retries, cost, the
  background event loop for synchronous callers;
* :mod:`~medsae.interp.llm.budget` — prompts fitted to a model's context window;
* :mod:`~medsae.interp.llm.offline` — the offline ``medsae/<name>`` litellm provider, and
  :mod:`~medsae.interp.llm.rule_model` — its deterministic rule-based ``medsae/baseline`` model.
"""

from medsae.interp.llm.gateway import BUDGET_EXCEEDED, MODES, LLMGateway, is_retryable, run_sync
from medsae.interp.llm.messages import (
    LLMRequest,
    LLMResponse,
    MalformedAnswer,
    TokenLogprob,
    canonical_request,
    parse_logprobs,
    read_answer,
    request_hash,
)

__all__ = [
    "BUDGET_EXCEEDED",
    "MODES",
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
