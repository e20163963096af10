"""Executors: where the planner's stage functions run (:mod:`medsae.executor.base` says what one does).

``local`` (:mod:`medsae.executor.local`, the default) runs them in the calling process; ``ray``
(:mod:`medsae.executor.ray`, ``pip install medsae[ray]``) sends them to a Ray cluster.
"""

from medsae.executor.base import EXECUTORS, Executor, make_executor

__all__ = ["EXECUTORS", "Executor", "make_executor"]
