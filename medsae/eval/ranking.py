"""The study's configuration ranking (docs/method.md#ranking): see :mod:`medsae.registry.ranking`.

The ranking is SQL over the registry and the registry's ``config_ranking`` view is built from it,
so it lives in the registry layer; this module keeps the evaluation-side name.
"""

from __future__ import annotations

from medsae.registry.ranking import MONO_METRICS, PERF_METRIC, RANKING_VIEW, ranking_sql

__all__ = ["MONO_METRICS", "PERF_METRIC", "RANKING_VIEW", "ranking_sql"]
