"""Context budget: prompts are fitted to the model's context window, never cut.

The budget of a model is the smaller of litellm's input window for it (``max_input_tokens``, else
``max_tokens`` minus the answer budget; known for hosted models, offline with
``LITELLM_LOCAL_MODEL_COST_MAP=True``) and the ``interpret.max_prompt_tokens`` setting. A model
litellm does not know (a local server under a custom name) and no setting: no budget, with one
warning that prompts are not checked.

The explainer prompt is fitted by showing **fewer examples** (evenly spread over the firing ones,
strongest kept, and over the contrasts, in their original proportion, at least one contrast
kept), never by cutting the
system prompt; the number shown is recorded with the explanation. A prompt that does not fit
even with one example, or a simulator batch that does not fit, is a one-line error before any
call.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

from medsae.errors import MedsaeError

log = logging.getLogger("medsae")

Messages = list[dict]


def model_window(model: str, answer_tokens: int) -> int | None:
    """Prompt tokens litellm says ``model`` accepts (None when litellm does not know the model)."""
    if model.startswith("medsae/"):
        return None
    try:
        import litellm

        info = litellm.get_model_info(model)
    except Exception:
        return None
    window = info.get("max_input_tokens")
    if not window and info.get("max_tokens"):
        window = int(info["max_tokens"]) - int(answer_tokens)
    return int(window) if window and window > 0 else None


def prompt_budget(model: str, answer_tokens: int, max_prompt_tokens: int | None, role: str) -> int | None:
    """The prompt budget of ``model`` (see the module docstring); warns once when there is none."""
    known = model_window(model, answer_tokens)
    limits = [x for x in (known, max_prompt_tokens) if x]
    if not limits:
        if not model.startswith("medsae/"):
            log.warning(
                "%s %s: context window unknown to litellm; prompts are not checked against it "
                "(set interpret.max_prompt_tokens to fit them)",
                role,
                model,
            )
        return None
    return int(min(limits))


def _text_of(messages: Messages) -> str:
    parts = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts += [p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"]
    return "\n".join(parts)


def _has_images(messages: Messages) -> bool:
    return any(
        isinstance(m.get("content"), list) and any(p.get("type") == "image_url" for p in m["content"]) for m in messages
    )


def count_tokens(model: str, messages: Messages) -> int:
    """Prompt tokens of ``messages`` for ``model`` (litellm's counter; a chars/3 estimate if it fails)."""
    try:
        import litellm

        return int(litellm.token_counter(model=model, messages=messages))
    except Exception:
        return len(_text_of(messages)) // 3 + 8 * len(messages)


def fits(model: str, messages: Messages, budget: int | None) -> bool:
    """Whether ``messages`` fit ``budget`` tokens (ASCII text no longer than the budget always does)."""
    if budget is None:
        return True
    text = _text_of(messages)
    if text.isascii() and len(text) + 8 * len(messages) <= budget and not _has_images(messages):
        return True  # a token is at least one character: no need to count
    return count_tokens(model, messages) <= budget


def spread(n_total: int, k: int) -> list[int]:
    """``k`` indices evenly spread over ``range(n_total)``, the first one always included."""
    if k <= 0 or n_total <= 0:
        return []
    if k >= n_total:
        return list(range(n_total))
    return sorted({int(round(x)) for x in np.linspace(0, n_total - 1, k)})


def subset_examples(examples: list[dict], n: int) -> list[dict]:
    """``n`` examples: firing and contrasts in their proportion, each evenly spread, ids renumbered."""
    firing = [e for e in examples if e["strength"] > 0]
    contrasts = [e for e in examples if e["strength"] == 0]
    n = max(1, min(n, len(examples)))
    n_fire = min(len(firing), max(1 if firing else 0, round(n * len(firing) / max(len(examples), 1))))
    if contrasts and n >= 2:
        n_fire = min(n_fire, n - 1)  # keep at least one contrast: it says what the feature is not
    n_contrast = min(len(contrasts), n - n_fire)
    chosen = [firing[i] for i in spread(len(firing), n_fire)]
    chosen += [contrasts[i] for i in spread(len(contrasts), n_contrast)]
    return [e | {"id": f"E{i:02d}"} for i, e in enumerate(chosen, start=1)]


def fit_examples(
    render: Callable[[list[dict]], Messages],
    examples: list[dict],
    model: str,
    budget: int | None,
) -> tuple[Messages, list[dict]]:
    """The messages for as many examples as fit ``budget`` (all when they do), and the examples shown."""
    messages = render(examples)
    if fits(model, messages, budget):
        return messages, examples
    lo, hi = 1, len(examples) - 1  # find the largest n that fits
    best: tuple[Messages, list[dict]] | None = None
    while lo <= hi:
        mid = (lo + hi) // 2
        shown = subset_examples(examples, mid)
        candidate = render(shown)
        if fits(model, candidate, budget):
            best, lo = (candidate, shown), mid + 1
        else:
            hi = mid - 1
    if best is None:
        need = count_tokens(model, render(subset_examples(examples, 1)))
        raise MedsaeError(
            f"explainer {model}: the prompt needs {need} tokens with a single example, more than the "
            f"{budget} the model's context allows; use a model with a larger window or raise "
            "interpret.max_prompt_tokens"
        )
    return best


def check_batch_prompt(model: str, messages: Messages, budget: int | None, batch_size: int) -> None:
    """One-line error when a simulator batch prompt does not fit the scorer's window."""
    if budget is None or fits(model, messages, budget):
        return
    need = count_tokens(model, messages)
    raise MedsaeError(
        f"scorer {model}: a batch of {batch_size} slices needs about {need} prompt tokens, more than the "
        f"{budget} its context allows; lower interpret.simulate_batch (or raise interpret.max_prompt_tokens)"
    )
