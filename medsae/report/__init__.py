"""The researcher-facing report: one self-contained HTML file per experiment, and comparisons.

* :func:`medsae.report.build.build_report` - spec and provenance, metric tables, plots and latent
  cards (thumbnails, activations, metadata, every explanation version with its scores).
* :func:`medsae.report.compare.compare_experiments` - key metrics of several experiments in one
  SQL query (the key-metric list is :data:`medsae.report.names.KEY_METRICS`).

Modules: ``gather`` (registry queries), ``cards`` (latent selection, top slices, thumbnails),
``templates/report.html.j2`` (autoescaped jinja2); the figures come from :mod:`medsae.plots`.
"""

from __future__ import annotations

from typing import Any

__all__ = ["build_report", "compare_experiments"]


def __getattr__(name: str) -> Any:  # lazy: keep `import medsae.report` free of pandas/matplotlib
    if name == "build_report":
        from medsae.report.build import build_report

        return build_report
    if name == "compare_experiments":
        from medsae.report.compare import compare_experiments

        return compare_experiments
    raise AttributeError(name)
