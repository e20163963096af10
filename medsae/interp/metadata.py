"""Slice metadata as the agent sees it: terms, compact prompt lines, and the attribute matrix.

Everything the explainer and simulator know about a slice comes from the slices stage (never from
an LLM) and is rendered here, in one fixed format, so that prompts, the offline baseline provider
(which parses the lines back) and the metadata baselines agree on what a "term" is.

A *term* is ``kind=value`` (``modality=ct``, ``plane=axial``, ``region=abdomen``,
``structure=liver``, ``sex=female``, ``age=60-80`` ...). A slice's prompt line is::

    CT; axial; abdomen; pos 0.42; female; age 60-80; liver 34%, stomach 12%; pathology: tumor; site: B

Structure percentages are the structure's share of the slice's segmented area (the index stores
pixel counts, not the crop size). Patient identifiers (image_id) are never rendered.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp

#: Term kinds in the order they appear in a prompt line (structures after demographics).
KINDS: tuple[str, ...] = (
    "modality",
    "plane",
    "region",
    "sex",
    "age",
    "structure",
    "study",
    "pathology",
    "scanner",
    "site",
)
#: Categorical kinds and the slices.parquet column each comes from.
CATEGORICAL: dict[str, str] = {
    "modality": "modality",
    "plane": "plane",
    "region": "body_region",
    "sex": "sex",
    "age": "age_bin",
    "study": "study_type",
    "pathology": "pathology",
    "scanner": "manufacturer",
    "site": "institute",
}
LABELLED = ("study", "pathology", "scanner", "site")  # rendered as "kind: value"
PLANES = ("axial", "coronal", "sagittal")
MAX_STRUCTURES = 5
_NULLS = {"", "nan", "none", "null", "unknown", "na", "n/a", "no pathology", "healthy"}
_SEX = {"m": "male", "f": "female", "male": "male", "female": "female"}
_BAD = re.compile(r"[;,|\n\r\t]+")


def clean_value(value: object) -> str | None:
    """A metadata value as a prompt-safe lower-case string, or None when missing or 'none'."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    text = " ".join(_BAD.sub(" ", str(value)).split()).lower()
    return None if text in _NULLS else text


def normalise(text: str) -> str:
    """Lower case, underscores as spaces, single spaces: the form terms are matched in."""
    return " ".join(text.lower().replace("_", " ").split())


@dataclass(frozen=True)
class Term:
    """One metadata fact a slice can have (and an explanation can name)."""

    kind: str
    value: str

    @property
    def key(self) -> str:
        return f"{self.kind}={self.value}"

    @property
    def phrase(self) -> str:
        """The words an explanation uses to name this term (matched on word boundaries)."""
        if self.kind == "site":
            return normalise(f"site {self.value}")
        return normalise(self.value)

    @property
    def display(self) -> str:
        """How the term is written in a prompt line or legend."""
        if self.kind == "modality":
            return self.value.upper()
        return self.value

    @staticmethod
    def from_key(key: str) -> Term:
        kind, _, value = key.partition("=")
        return Term(kind, value)


def phrase_pattern(phrase: str) -> re.Pattern[str]:
    """Regex finding ``phrase`` as whole words in normalised text."""
    return re.compile(r"(?<![a-z0-9])" + re.escape(phrase) + r"(?![a-z0-9])")


def mentioned(text: str, terms: Iterable[Term]) -> list[Term]:
    """The terms whose phrase occurs in ``text`` (a longer phrase hides the shorter ones it contains)."""
    norm = normalise(text)
    found: list[Term] = []
    spans: list[tuple[int, int]] = []
    for term in sorted(set(terms), key=lambda t: (-len(t.phrase), t.key)):
        if not term.phrase:
            continue
        for m in phrase_pattern(term.phrase).finditer(norm):
            if not any(a <= m.start() and m.end() <= b for a, b in spans):
                found.append(term)
                spans.append((m.start(), m.end()))
                break
    return sorted(found, key=lambda t: (KINDS.index(t.kind) if t.kind in KINDS else 99, t.value))


# --------------------------------------------------------------------------- per-slice attributes


def slice_attributes(slices: pd.DataFrame) -> pd.DataFrame:
    """One column per categorical kind (clean strings or None), indexed like ``slices``."""
    out = pd.DataFrame(index=slices.index)
    for kind, column in CATEGORICAL.items():
        if column not in slices.columns:
            out[kind] = pd.Series([None] * len(slices), index=slices.index, dtype=object)
            continue
        col = slices[column]
        mapping = {}
        for v in col.dropna().unique():
            c = clean_value(v)
            mapping[v] = _SEX.get(c, c) if kind == "sex" and c is not None else c
        mapped = col.map(mapping)
        out[kind] = mapped.astype(object).where(mapped.notna(), None)
    return out


def attribute_matrix(
    attrs: pd.DataFrame, presence: sp.csr_matrix, vocab: Sequence[str]
) -> tuple[sp.csr_matrix, list[str]]:
    """Binary slices x terms matrix (one-hot categorical kinds + structure presence) and term keys."""
    blocks = []
    names: list[str] = []
    n = len(attrs)
    for kind in CATEGORICAL:
        values = attrs[kind].to_numpy(dtype=object)
        present = np.array([v is not None for v in values], dtype=bool)
        if not present.any():
            continue
        cats, codes = np.unique(values[present].astype(str), return_inverse=True)
        rows = np.flatnonzero(present)
        blocks.append(sp.csr_matrix((np.ones(len(rows), dtype=bool), (rows, codes)), shape=(n, len(cats))))
        names.extend(f"{kind}={c}" for c in cats)
    blocks.append(sp.csr_matrix(presence, dtype=bool))
    names.extend(f"structure={s}" for s in vocab)
    return sp.hstack(blocks, format="csr").astype(bool), names


def top_structures(structures: pd.DataFrame, slice_ids: np.ndarray, k: int = MAX_STRUCTURES) -> dict[int, str]:
    """``"liver 34%, stomach 12%"`` per slice id (largest first, share of segmented area)."""
    sub = structures[structures["slice_id"].isin(slice_ids)]
    if sub.empty:
        return {}
    sub = sub.assign(total=sub.groupby("slice_id")["pixels"].transform("sum"))
    sub = sub.sort_values(["slice_id", "pixels", "structure"], ascending=[True, False, True])
    sub = sub.groupby("slice_id", sort=False).head(k)
    share = np.maximum(1, np.round(100 * sub["pixels"].to_numpy() / sub["total"].to_numpy())).astype(int)
    text = [f"{s} {p}%" for s, p in zip(sub["structure"].to_numpy(), share, strict=True)]
    return pd.Series(text, index=sub["slice_id"].to_numpy()).groupby(level=0).agg(", ".join).to_dict()


def format_lines(slices: pd.DataFrame, structures: pd.DataFrame, slice_ids: Sequence[int]) -> dict[int, str]:
    """The compact prompt line of each slice id (``slices`` indexed by slice_id)."""
    ids = np.asarray(sorted({int(s) for s in slice_ids}), dtype=np.int64)
    if len(ids) == 0:
        return {}
    rows = slices.loc[ids]
    attrs = slice_attributes(rows)
    structs = top_structures(structures, ids)
    position = rows["position"].to_numpy(dtype=float) if "position" in rows.columns else np.full(len(ids), np.nan)

    def column(kind: str, fmt: str = "{}") -> list[str | None]:
        return [None if v is None else fmt.format(v) for v in attrs[kind].to_numpy(dtype=object)]

    segments = [
        [None if v is None else v.upper() for v in attrs["modality"].to_numpy(dtype=object)],
        column("plane"),
        column("region"),
        [f"pos {p:.2f}" if np.isfinite(p) else None for p in position],
        column("sex"),
        column("age", "age {}"),
        [structs.get(int(sid), "no structures") for sid in ids],
        *(column(kind, kind + ": {}") for kind in LABELLED),
    ]
    rows_of_parts = zip(*segments, strict=True)
    return {int(sid): "; ".join(filter(None, parts)) for sid, parts in zip(ids, rows_of_parts, strict=True)}


# --------------------------------------------------------------------------- parsing lines back


def parse_line(body: str) -> dict[str, object]:
    """Terms and structure shares of one prompt line (inverse of :func:`format_lines`).

    Returns ``{"terms": set[Term], "areas": {structure: share 0-1}}``.
    """
    terms: set[Term] = set()
    areas: dict[str, float] = {}
    for seg in (s.strip() for s in body.split(";")):
        if not seg or seg.startswith("pos ") or seg == "no structures":
            continue
        low = seg.lower()
        label, sep, value = low.partition(": ")
        if sep and label in LABELLED:
            terms.add(Term(label, value.strip()))
        elif low in ("ct", "mri"):
            terms.add(Term("modality", low))
        elif low in PLANES:
            terms.add(Term("plane", low))
        elif low in ("male", "female"):
            terms.add(Term("sex", low))
        elif low.startswith("age "):
            terms.add(Term("age", low[4:].strip()))
        elif "%" in seg:
            for item in seg.split(","):
                name, _, pct = item.strip().rpartition(" ")
                name = name.strip().lower()
                if name:
                    terms.add(Term("structure", name))
                    try:
                        areas[name] = float(pct.rstrip("%")) / 100
                    except ValueError:
                        areas[name] = 0.0
        else:
            terms.add(Term("region", low))
    return {"terms": terms, "areas": areas}


# --------------------------------------------------------------------------- legend


def legend_lines(attrs: pd.DataFrame, vocab: Sequence[str]) -> list[str]:
    """``kind: v1, v2, ...`` for every kind present in the dataset (fixed vocabulary for simulators)."""
    lines = []
    for kind in KINDS:
        if kind == "structure":
            values = sorted(vocab)
        else:
            values = sorted({v for v in attrs[kind] if v is not None}) if kind in attrs.columns else []
        if values:
            lines.append(f"{kind}: " + ", ".join(Term(kind, v).display for v in values))
    return lines


def parse_legend(text: str) -> list[Term]:
    """Terms listed by :func:`legend_lines` inside ``text`` (lines ``kind: a, b, c``)."""
    terms: list[Term] = []
    for line in text.splitlines():
        label, sep, rest = line.strip().partition(": ")
        if sep and label in KINDS:
            terms.extend(Term(label, v.strip().lower()) for v in rest.split(",") if v.strip())
    return terms
