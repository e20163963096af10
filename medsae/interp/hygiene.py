"""Explanation hygiene: which parsed explanations are fit to be scored, reused and searched.

The explainer prompt asks for at most 30 words. Weak models answer with run-on text ("CT head;
CT head; CT head; ...", "retrospective retrospective ...") that a simulator may still score, and
that would then come back as a ranking distractor or a search candidate. Every explanation gets
one status:

* ``parse_failed`` — no ``EXPLANATION:`` line (no text);
* ``repetitive`` — the same word three times in a row, a phrase of 2-6 words (with at least one
  content word) three or more times, or, from 8 words on, fewer than half of the words distinct;
* ``too_long`` — more than ``max_words`` words or ``max_chars`` characters;
* ``ok`` — everything else. Only ``ok`` explanations are scored, used as shuffled donors or
  ranking distractors, and offered to search.
"""

from __future__ import annotations

import re
from collections import Counter

OK, TOO_LONG, REPETITIVE, PARSE_FAILED = "ok", "too_long", "repetitive", "parse_failed"

_WORD = re.compile(r"[^\W_]+(?:['’-][^\W_]+)*", re.UNICODE)
_STOPWORDS = frozenset(
    "a an and are as at be by for from in into is it its of on or the to with without not no".split()
)
MIN_WORDS_FOR_RATIO = 8
MIN_DISTINCT_RATIO = 0.5
MAX_PHRASE = 6
MAX_REPEATS = 2  # a phrase may occur twice ("CT of the liver ... CT of the kidney"), not three times


def words(text: str) -> list[str]:
    """Lower-case words (letters and digits; hyphenated and apostrophe words stay one word)."""
    return [w.lower() for w in _WORD.findall(text)]


def is_repetitive(text: str) -> bool:
    """Whether ``text`` repeats itself (see the module docstring for the three rules)."""
    toks = words(text)
    if any(toks[i] == toks[i + 1] == toks[i + 2] for i in range(len(toks) - 2)):
        return True
    if len(toks) >= MIN_WORDS_FOR_RATIO and len(set(toks)) < MIN_DISTINCT_RATIO * len(toks):
        return True
    for n in range(2, MAX_PHRASE + 1):
        grams = Counter(tuple(toks[i : i + n]) for i in range(len(toks) - n + 1))
        for gram, count in grams.items():
            if count > MAX_REPEATS and any(w not in _STOPWORDS and len(w) > 1 for w in gram):
                return True
    return False


def explanation_status(text: str | None, max_words: int, max_chars: int) -> str:
    """``ok``, ``repetitive``, ``too_long`` or ``parse_failed`` for one parsed explanation."""
    if not text or not text.strip():
        return PARSE_FAILED
    if is_repetitive(text):
        return REPETITIVE
    if len(words(text)) > max_words or len(text) > max_chars:
        return TOO_LONG
    return OK
