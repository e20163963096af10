"""The sparse-code probes' non-zero weights, kept in the evaluate artifact (``probe_weights.parquet``).

The evaluate stage fits an elastic-net probe per target on the SAE codes (:mod:`medsae.eval.probes`,
:mod:`medsae.eval.study_probes`); the latent explorer shows, per latent, the targets where it carries
weight. One row per non-zero weight:

===============  =================================================================================
``target``       the probe target as the metrics name it (``sex``, ``structure=liver``; study: group)
``column``       the column of the fitted weight matrix (one per binary problem or softmax class)
``positive``     the class a positive weight points to (binary: the positive class)
``negative``     the class a negative weight points to (binary problems); empty for a softmax class
                 or a one-vs-rest label, where a negative weight points away from ``positive``
``multinomial``  whether the target's columns form one softmax (logits compared across columns)
``latent``       the SAE latent (feature index)
``weight``       its coefficient on the raw code value (no feature scaling)
``intercept``    the column's intercept (repeated per row), so the logits can be recomputed:
                 ``z[:, column] = codes @ weight + intercept``
===============  =================================================================================

Writing the table changes no metric: it is read off the fits the stage already made. So the stage's
code version stays as it was (new code versions would re-run every evaluate and what depends on it for
identical numbers); an evaluate artifact made before this file existed simply lacks it, and the explorer
says to rerun that stage (``medsae exp run SPEC --force evaluate``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from medsae.eval.logreg import LogRegFit
from medsae.eval.probes import ProbeResult
from medsae.eval.study_probes import GroupProbe

#: File name inside the evaluate artifact folder.
FILE = "probe_weights.parquet"
COLUMNS = ("target", "column", "positive", "negative", "multinomial", "latent", "weight", "intercept")
_DTYPES = ("object", "int32", "object", "object", "bool", "int32", "float64", "float64")


def _medsae_columns(r: ProbeResult) -> Iterator[tuple[str, int, str, str]]:
    """(target, column of r.coef, positive class, negative class) of one medsae-protocol probe."""
    t = r.target
    if t.multiclass:
        for k, c in enumerate(t.classes):
            yield t.name, k, c, ""
    else:
        yield t.name, 0, t.classes[1], t.classes[0]


def _study_columns(p: GroupProbe) -> Iterator[tuple[str, int, str, str]]:
    """The same for a study-protocol group probe (classes as the group's fit saw them)."""
    g = p.group
    if g.multilabel:
        for i, c in enumerate(g.classes):
            yield g.group, i, c, ""
    elif len(p.present) == 2:
        yield g.group, 0, g.classes[int(p.present[1])], g.classes[int(p.present[0])]
    else:
        for k, c in enumerate(p.present):
            yield g.group, k, g.classes[int(c)], ""


def _frame(coef: np.ndarray, intercept: np.ndarray, fit: LogRegFit, columns: Iterator) -> list[pd.DataFrame]:
    frames = []
    for target, col, positive, negative in columns:
        latents = np.flatnonzero(coef[:, col])
        frames.append(
            pd.DataFrame(
                {
                    "target": target,
                    "column": np.int32(col),
                    "positive": positive,
                    "negative": negative,
                    "multinomial": bool(fit.multinomial),
                    "latent": latents.astype(np.int32),
                    "weight": coef[latents, col].astype(np.float64),
                    "intercept": float(intercept[col]),
                }
            )
        )
    return frames


def weights_table(results: Sequence[ProbeResult] = (), groups: Sequence[GroupProbe] = ()) -> pd.DataFrame:
    """The non-zero weights of the sparse-code probes in ``results`` (medsae protocol) and ``groups`` (study)."""
    frames: list[pd.DataFrame] = []
    for r in results:
        if r.features == "sparse":
            frames += _frame(np.asarray(r.coef), np.asarray(r.intercept), r.fit, _medsae_columns(r))
    for p in groups:
        if p.features == "sparse":
            frames += _frame(np.asarray(p.fit.coef), np.asarray(p.fit.intercept), p.fit, _study_columns(p))
    frames = [f for f in frames if len(f)]
    if not frames:
        return pd.DataFrame({c: pd.Series(dtype=t) for c, t in zip(COLUMNS, _DTYPES, strict=True)})
    return pd.concat(frames, ignore_index=True)[list(COLUMNS)]


def write_weights(table: pd.DataFrame, out_dir: str | Path) -> Path:
    """Write ``table`` as ``out_dir/probe_weights.parquet``."""
    path = Path(out_dir) / FILE
    table.to_parquet(path, index=False)
    return path


def read_weights(evaluate_dir: str | Path) -> pd.DataFrame | None:
    """The table of an evaluate folder; None when the folder has none (probes off, or an older run)."""
    path = Path(evaluate_dir) / FILE
    if not path.is_file():
        return None
    return pd.read_parquet(path)
