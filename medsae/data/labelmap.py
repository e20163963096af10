"""Multi-label maps: a label table (structure -> label values) and per-slice structure areas from one map.

A label table is a small YAML or JSON file (README "Bring your own data") in either direction::

    liver: 1                  # structure: value (or a list of values: a region of several labels)
    spleen: 2
    # or value: structure, as in the Medical Segmentation Decathlon's and AMOS's dataset.json:
    # {"labels": {"0": "background", "1": "spleen", "2": "kidney_right"}}

A top-level ``labels`` entry is read when present (nnU-Net / Decathlon ``dataset.json``). Value 0
and the name 'background' are dropped. Structures may share values (nnU-Net regions): each
structure's area counts every voxel holding one of its values, exactly as a binary mask
``isin(map, values)`` would, so a label map and the equivalent per-structure mask files give the
same areas (tests/test_data_labelmap.py).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from medsae.data.slicing import crop_bounds, inplane_axes

LABEL_TABLE_SUFFIXES = (".yaml", ".yml", ".json")
MAX_LABEL_VALUE = 2**31 - 1
_LUT_LIMIT = 1 << 24  # label values up to this are mapped with a lookup table


class LabelTableError(ValueError):
    """A label table that cannot be used; the message says why (one line)."""


def _as_value(raw: object, where: str) -> int:
    if isinstance(raw, bool) or not isinstance(raw, (int, float, str)):
        raise LabelTableError(f"{where}: label value {raw!r} is not an integer")
    text = str(raw).strip()
    if not re.fullmatch(r"[0-9]+(\.0*)?", text):
        raise LabelTableError(f"{where}: label value {raw!r} is not a non-negative integer")
    value = int(float(text))
    if value > MAX_LABEL_VALUE:
        raise LabelTableError(f"{where}: label value {value} is too large")
    return value


def _is_value_key(key: object) -> bool:
    return isinstance(key, int) and not isinstance(key, bool) or (isinstance(key, str) and key.strip().isdigit())


def parse_label_table(raw: object, source: str = "label table") -> dict[str, list[int]]:
    """``{structure: sorted label values}`` of a parsed YAML/JSON label table (background dropped)."""
    if isinstance(raw, dict) and isinstance(raw.get("labels"), dict):
        raw = raw["labels"]
    if not isinstance(raw, dict) or not raw:
        raise LabelTableError(f"{source}: expected a mapping of structure names to label values")
    table: dict[str, set[int]] = {}
    by_value = all(_is_value_key(k) for k in raw)
    for key, item in raw.items():
        if by_value:
            name, values = item, [_as_value(key, source)]
        else:
            name, items = key, item if isinstance(item, list) else [item]
            values = [_as_value(v, f"{source}: {key}") for v in items]
        if not isinstance(name, str) or not name.strip():
            raise LabelTableError(f"{source}: structure name {name!r} is not a text")
        name = name.strip()
        if name.lower() == "background":
            continue
        values = [v for v in values if v != 0]
        if not values:
            continue
        if by_value and name in table:
            table[name].update(values)  # two values named alike: one structure
        elif name in table:
            raise LabelTableError(f"{source}: structure {name!r} is listed twice")
        else:
            table[name] = set(values)
    if not table:
        raise LabelTableError(f"{source}: no structure besides background")
    return {name: sorted(values) for name, values in sorted(table.items())}


def read_label_table(path: Path) -> dict[str, list[int]]:
    """The label table in a YAML or JSON file; :class:`LabelTableError` names the file and the problem."""
    if not path.name.lower().endswith(LABEL_TABLE_SUFFIXES):
        raise LabelTableError(f"label table {path.name}: expected a .yaml, .yml or .json file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise LabelTableError(f"label table {path.name}: cannot read it ({type(exc).__name__})") from None
    try:
        if path.name.lower().endswith(".json"):
            raw = json.loads(text)
        else:
            import yaml

            raw = yaml.safe_load(text)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0]
        kind = path.suffix[1:].upper()
        raise LabelTableError(f"label table {path.name}: not valid {kind}: {first}") from None
    return parse_label_table(raw, f"label table {path.name}")


def _value_codes(labels: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Each voxel's index into ``values`` plus one (0: background or a value not in the table)."""
    if labels.dtype.kind == "f":
        labels = np.rint(labels)
    labels = labels.astype(np.int64, copy=False) if labels.dtype.kind not in "iu" else labels
    top = int(labels.max()) if labels.size else 0
    if 0 <= top < _LUT_LIMIT:
        lut = np.zeros(max(top, int(values.max())) + 1, dtype=np.int32)
        lut[values] = np.arange(1, len(values) + 1, dtype=np.int32)
        return lut[np.clip(labels, 0, None)] if labels.dtype.kind == "i" else lut[labels]
    pos = np.searchsorted(values, labels)
    pos = np.clip(pos, 0, len(values) - 1)
    return np.where(values[pos] == labels, pos + 1, 0).astype(np.int32)


def structure_mask(labels: np.ndarray, values: list[int]) -> np.ndarray:
    """The boolean mask of one structure of a label map: the voxels holding one of ``values``.

    The voxels :func:`label_areas` counts for it (float maps rounded), for rendering a label map's masks.
    """
    return _value_codes(labels, np.asarray(sorted(set(values)), dtype=np.int64)) > 0


def label_areas(
    labels: np.ndarray, table: dict[str, list[int]], axes: tuple[int, ...], crop: str
) -> tuple[list[str], dict[int, np.ndarray]]:
    """Structure pixels inside each slice's in-plane crop, per sliced axis, from one label map.

    Returns the structure names (sorted) and, per axis, an int64 matrix ``[n_slices_along_axis,
    n_structures]``: the same numbers per-structure binary masks give (``structure_counts``).
    """
    names = sorted(table)
    values = np.asarray(sorted({v for vs in table.values() for v in vs}), dtype=np.int64)
    member = np.zeros((len(values) + 1, len(names)), dtype=np.int64)  # row 0: unlisted values
    for j, name in enumerate(names):
        member[np.searchsorted(values, table[name]) + 1, j] = 1
    codes = _value_codes(labels, values)
    out: dict[int, np.ndarray] = {}
    for a in axes:
        b, c = inplane_axes(a)
        cb, cc = crop_bounds(codes.shape[b], codes.shape[c], crop)
        index = [slice(None)] * 3
        index[b], index[c] = cb, cc
        block = np.moveaxis(codes[tuple(index)], a, 0)
        per_value = np.empty((block.shape[0], len(values) + 1), dtype=np.int64)
        for i in range(block.shape[0]):
            per_value[i] = np.bincount(block[i].ravel(), minlength=len(values) + 1)
        out[a] = per_value @ member
    return names, out


def unlisted_values(labels: np.ndarray, table: dict[str, list[int]], limit: int = 20) -> list[int]:
    """Non-zero label values present in the map but missing from the table (at most ``limit``)."""
    listed = {v for vs in table.values() for v in vs}
    if labels.dtype.kind in "fb":
        labels = np.rint(labels).astype(np.int64)
    if labels.size and labels.min() >= 0 and labels.max() < _LUT_LIMIT:
        present = np.flatnonzero(np.bincount(labels.ravel()))  # one pass, no sort
    else:
        present = np.unique(labels)
    return [int(v) for v in present if v != 0 and int(v) not in listed][:limit]
