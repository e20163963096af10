"""The study's per-sample metadata block, the text its explainer and judge read beside each image.

One block per sample, fields in the study's order, each only when known::

    Sample 2:
      Modality: CT
      Orientation: Axial (z)
      Sex: F
      Age: 63.0 years
      Anatomical structures and organs (3 total): aorta, liver, stomach
      Anatomical regions: abdominal vasculature, liver, stomach
      Pathology: tumor
      Activation: 1.234

Structures are those present in the slice, sorted by name; regions come from
:mod:`medsae.interp.study.regions`; a pathology of none / nan is left out (``no_pathology`` is shown,
as in the study). Deviation: the study's structure list also held the literal words ``age``,
``gender`` and ``pathology`` (its list took every truthy metadata column outside a skip-list); medsae
lists structures only, so the count is three lower.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from medsae.interp.study.regions import regions_of

ORIENTATION = {"sagittal": "Sagittal (x)", "coronal": "Coronal (y)", "axial": "Axial (z)"}
_SEX = {"m": "M", "male": "M", "f": "F", "female": "F"}


@dataclass(frozen=True)
class Sample:
    """What the study shows of one slice."""

    modality: str | None
    plane: str | None
    sex: str | None
    age: float | None
    structures: tuple[str, ...]
    pathology: str | None
    activation: float


def _text(value: object) -> str | None:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    text = str(value).strip()
    return text or None


def sample_of(row: pd.Series, structures: Sequence[str], activation: float) -> Sample:
    """A :class:`Sample` from a slices-table row and the names of the structures present in the slice."""
    age = row.get("age")
    age = None if age is None or pd.isna(age) else float(age)
    return Sample(
        modality=_text(row.get("modality")),
        plane=_text(row.get("plane")),
        sex=_text(row.get("sex")),
        age=age,
        structures=tuple(sorted(structures)),
        pathology=_text(row.get("pathology")),
        activation=float(activation),
    )


def block(number: int, s: Sample) -> str:
    """The metadata block of sample ``number`` (1-based)."""
    lines = [f"Sample {number}:"]
    if s.modality:
        lines.append(f"  Modality: {s.modality.upper()}")
    if s.plane:
        lines.append(f"  Orientation: {ORIENTATION.get(s.plane.lower(), s.plane)}")
    if s.sex:
        lines.append(f"  Sex: {_SEX.get(s.sex.lower(), s.sex.upper())}")
    if s.age is not None:
        lines.append(f"  Age: {s.age} years")
    if s.structures:
        lines.append(f"  Anatomical structures and organs ({len(s.structures)} total): {', '.join(s.structures)}")
        regions = regions_of(s.structures)
        if regions:
            lines.append(f"  Anatomical regions: {', '.join(regions)}")
    if s.pathology and s.pathology.lower() not in ("none", "nan"):
        lines.append(f"  Pathology: {s.pathology}")
    lines.append(f"  Activation: {s.activation:.3f}")
    return "\n".join(lines)


def blocks(samples: Sequence[Sample]) -> str:
    """Every sample's block, separated by a blank line (the study's ``Sample metadata`` text)."""
    return "\n\n".join(block(i, s) for i, s in enumerate(samples, start=1))
