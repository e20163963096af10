"""Probe labels from target definitions (``eval.probe_targets``), as each protocol reads them.

A :class:`~medsae.eval.config.ProbeTargetDef` names a slice-table column (or ``structure``: the
structure-presence matrix) and the values probed. The two protocols read it differently
(docs/method.md#study-protocol):

* **medsae** (:func:`medsae_targets`): a ``multiclass`` definition is one :class:`~medsae.eval.probes.Target`
  (binary for two classes); a ``multilabel`` one gives a binary target per class whose negatives
  are slices with another *recorded* value (a slice without a value is unlabelled), or slices without
  the structure. Classes without enough training rows are then dropped by ``select_targets``.
* **study** (:func:`study_groups`): one :class:`StudyGroup` per definition. ``multiclass``: a slice's
  label is the index of the class its value equals, -1 when none (unlabelled, left out of fitting and
  scoring); every class stays a target even without training rows (the study kept institutes A, D, E).
  ``multilabel``: a 0/1 column per class over *every* slice, a missing value counting as 0 (the
  study's negatives include MRI slices without a pathology record).

Values are compared as numbers when both the class and the value are numbers (the study's
``kvp == float(target)``: 120 equals "120.0"), else as strings. A target that cannot be probed on the
data (missing column, one class on the train split, no training positives, an unknown structure) is
left out and named in :func:`skip_line`, the stage's one warning line.

Also here: the study's row order (:func:`study_order`) and its orientation letters, which the
study's tables, R² batches, sub-samples and fingerprint references follow.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp

from medsae.eval.config import STRUCTURE_COLUMN, ProbeTargetDef
from medsae.eval.probes import Target

#: The study's orientation letters (its slice file names): sagittal = x, coronal = y, axial = z.
ORIENTATION_LETTER = {"sagittal": "x", "coronal": "y", "axial": "z"}
#: Column added to the slice table holding :data:`ORIENTATION_LETTER` of each slice's plane.
ORIENTATION_COLUMN = "slice_orientation"


def with_derived_columns(slices: pd.DataFrame) -> pd.DataFrame:
    """The slice table plus ``slice_orientation`` (x / y / z from ``plane``), the study's label column."""
    if ORIENTATION_COLUMN in slices or "plane" not in slices:
        return slices
    out = slices.copy()
    out[ORIENTATION_COLUMN] = out["plane"].map(ORIENTATION_LETTER)
    return out


def study_order(slices: pd.DataFrame, rows: np.ndarray) -> np.ndarray:
    """``rows`` in the study's table order: by modality, image_id, orientation (x < y < z), slice index.

    medsae's slice ids sort planes by name (axial < coronal < sagittal, i.e. z < y < x); the study's
    val loader, and so its R² batches, its sub-samples and its reference draw, follow this order.
    """
    rows = np.asarray(rows, dtype=np.int64)
    sub = slices.iloc[rows]
    letter = sub["plane"].map(ORIENTATION_LETTER).fillna("~").astype(str).to_numpy()  # unknown planes last
    keys = (
        sub["idx"].to_numpy(),
        letter,
        sub["image_id"].astype(str).to_numpy(),
        sub["modality"].astype(str).to_numpy(),
    )
    return rows[np.lexsort(keys)]


# -- value matching ------------------------------------------------------------------------------


def _number(value: object) -> float | None:
    try:
        out = float(str(value))
    except ValueError:
        return None
    return out if np.isfinite(out) else None


def recorded(values: pd.Series) -> np.ndarray:
    """Which slices have a value (not null, not an empty string)."""
    return (values.notna() & (values.astype(str).str.strip() != "")).to_numpy()


class ColumnValues:
    """One slice-table column prepared for matching many classes (text and numbers computed once)."""

    def __init__(self, values: pd.Series) -> None:
        self.have = recorded(values)
        self.text = values.astype(str).to_numpy()
        self.numeric = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64)

    def matches(self, cls: str) -> np.ndarray:
        """Which slices' value equals ``cls``: numerically when both are numbers, else as strings."""
        same = self.have & (self.text == cls)
        number = _number(cls)
        if number is not None:
            same |= self.have & (self.numeric == number)
        return same


def _structure_column(presence: sp.spmatrix, vocab: Sequence[str], name: str) -> np.ndarray | None:
    index = {s: j for j, s in enumerate(vocab)}
    if name not in index:
        return None
    return np.asarray(sp.csc_matrix(presence)[:, index[name]].todense()).ravel() > 0


# -- skipped targets -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Skip:
    """A target (``group`` or ``group=class``) left out, and why."""

    target: str
    reason: str


def skip_line(skipped: Sequence[Skip], protocol: str) -> str | None:
    """One warning line naming every skipped target, grouped by reason; None when nothing was skipped."""
    if not skipped:
        return None
    by_reason: dict[str, list[str]] = {}
    for s in skipped:
        by_reason.setdefault(s.reason, []).append(s.target)
    parts = [f"{', '.join(names)} ({reason})" for reason, names in by_reason.items()]
    return f"evaluate ({protocol} protocol): skipped probe targets: " + "; ".join(parts)


def _column_problem(slices: pd.DataFrame, column: str) -> str | None:
    if column not in slices:
        return f"no column '{column}' in the slice table"
    if not recorded(slices[column]).any():
        return f"column '{column}' is empty"
    return None


# -- medsae protocol -----------------------------------------------------------------------------


def medsae_targets(
    definitions: Sequence[ProbeTargetDef],
    slices: pd.DataFrame,
    presence: sp.spmatrix | None,
    vocab: Sequence[str] | None,
) -> tuple[list[Target], list[Skip]]:
    """medsae's reading of target definitions (see the module docstring); filter with ``select_targets``."""
    slices = with_derived_columns(slices)
    out: list[Target] = []
    skipped: list[Skip] = []
    for d in definitions:
        if d.column == STRUCTURE_COLUMN:
            for cls in d.classes:
                col = None if presence is None or vocab is None else _structure_column(presence, vocab, cls)
                if col is None:
                    skipped.append(Skip(f"{d.group}={cls}", "not in the structure vocabulary"))
                    continue
                # structures are not exclusive: one binary target each, whatever the kind
                out.append(Target(f"{d.group}={cls}", "structure", ["absent", "present"], col.astype(np.int64)))
            continue
        problem = _column_problem(slices, d.column)
        if problem:
            skipped.append(Skip(d.group, problem))
            continue
        values = ColumnValues(slices[d.column])
        if d.kind == "multiclass":
            y = np.full(len(slices), -1, dtype=np.int64)
            for k in reversed(range(len(d.classes))):  # the first matching class wins
                y[values.matches(d.classes[k])] = k
            out.append(Target(d.group, d.group, list(d.classes), y))
        else:
            for cls in d.classes:
                y = np.where(values.have, values.matches(cls).astype(np.int64), -1)
                out.append(Target(f"{d.group}={cls}", d.group, ["other", cls], y))
    return out, skipped


# -- study protocol ------------------------------------------------------------------------------


@dataclass
class StudyGroup:
    """One of the study's target groups on the slice table.

    ``y``: multiclass ``[n]`` class index or -1; multilabel ``[n, L]`` 0/1 (one column per class).
    """

    group: str
    kind: str  # 'multiclass' | 'multilabel'
    classes: list[str]
    y: np.ndarray

    @property
    def multilabel(self) -> bool:
        return self.kind == "multilabel"

    def target_names(self) -> list[str]:
        """``group=class`` for every target, in the group's order."""
        return [f"{self.group}={c}" for c in self.classes]

    def task_labels(self, i: int) -> np.ndarray:
        """Binary labels of target ``i`` per slice: 1 / 0, -1 for a multiclass group's unlabelled slices."""
        if self.multilabel:
            return self.y[:, i].astype(np.int64)
        return np.where(self.y < 0, -1, (self.y == i).astype(np.int64))

    def strata(self, rows: np.ndarray) -> np.ndarray:
        """The study's stratification labels of ``rows``: the class, or the label combination. The study
        joined the 0/1 labels into text; the combination read as a binary number sorts the same way,
        so a stratified split draws the same rows."""
        if not self.multilabel:
            return self.y[rows]
        bits = np.left_shift(np.int64(1), np.arange(self.y.shape[1] - 1, -1, -1, dtype=np.int64))
        return (self.y[rows].astype(np.int64) * bits).sum(axis=1)

    def labelled(self, rows: np.ndarray) -> np.ndarray:
        """The rows a probe of this group is fitted and scored on (multiclass: labelled ones)."""
        return rows if self.multilabel else rows[self.y[rows] >= 0]


def study_groups(
    definitions: Sequence[ProbeTargetDef],
    slices: pd.DataFrame,
    presence: sp.spmatrix | None,
    vocab: Sequence[str] | None,
    train_rows: np.ndarray,
) -> tuple[list[StudyGroup], list[Skip]]:
    """The study's reading of target definitions (see the module docstring), with what it had to skip."""
    slices = with_derived_columns(slices)
    groups: list[StudyGroup] = []
    skipped: list[Skip] = []
    for d in definitions:
        if d.column == STRUCTURE_COLUMN:
            columns = {
                c: None if presence is None or vocab is None else _structure_column(presence, vocab, c)
                for c in d.classes
            }
            for c, col in columns.items():
                if col is None:
                    skipped.append(Skip(f"{d.group}={c}", "not in the structure vocabulary"))
            found = {c: col for c, col in columns.items() if col is not None}
        else:
            problem = _column_problem(slices, d.column)
            if problem:
                skipped.append(Skip(d.group, problem))
                continue
            values = ColumnValues(slices[d.column])
            found = {c: values.matches(c) for c in d.classes}
        if d.kind == "multiclass":
            y = np.full(len(slices), -1, dtype=np.int64)
            for k in reversed(range(len(d.classes))):  # the first matching class wins, as in the study
                if d.classes[k] in found:
                    y[found[d.classes[k]]] = k
            present = np.unique(y[train_rows][y[train_rows] >= 0])
            if len(present) < 2:
                on_train = ", ".join(d.classes[k] for k in present) or "none"
                skipped.append(
                    Skip(d.group, f"{len(present)} of {len(d.classes)} classes on the train split: {on_train}")
                )
                continue
            groups.append(StudyGroup(d.group, d.kind, list(d.classes), y))
            continue
        kept = []
        for c, col in found.items():
            positives = int(col[train_rows].sum())
            if positives == 0:
                skipped.append(Skip(f"{d.group}={c}", "no train positives"))
            elif positives == len(train_rows):
                skipped.append(Skip(f"{d.group}={c}", "every train slice positive"))
            else:
                kept.append(c)
        if kept:
            y = np.stack([found[c] for c in kept], axis=1).astype(np.int64)
            groups.append(StudyGroup(d.group, d.kind, kept, y))
    return groups, skipped
