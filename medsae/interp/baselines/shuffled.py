"""The shuffled-explanation control: a latent simulated with another latent's explanation.

It runs for a stable, seeded share of latents (``shuffled_fraction``, at least ``shuffled_min``),
because it costs as many calls as the real simulation; the donor is a seeded-random other latent
with an explanation fit to score. The explanation row itself is :func:`medsae.interp.rows.shuffled_row`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from medsae.interp.sampling import purpose_rng, purpose_seed


def shuffled_targets(latents: Sequence[int], fraction: float, minimum: int, seed: int, sae_key: str) -> list[int]:
    """The latents that get the shuffled baseline: a seeded, order-independent selection."""
    latents = [int(x) for x in latents]
    if not latents:
        return []
    n = min(len(latents), max(int(math.ceil(fraction * len(latents))), minimum))
    ranked = sorted(latents, key=lambda x: purpose_seed(seed, sae_key, x, "shuffled-select"))
    return sorted(ranked[:n])


def shuffled_donor(latent: int, candidates: Sequence[int], seed: int, sae_key: str) -> int | None:
    """A seeded-random other latent among ``candidates`` (None when there is no other)."""
    others = sorted(int(c) for c in candidates if int(c) != int(latent))
    if not others:
        return None
    return others[int(purpose_rng(seed, sae_key, latent, "shuffled-donor").integers(len(others)))]
