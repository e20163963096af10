"""Reading a slices artifact: the slice index, structure areas, presence matrix.

These are the functions every later stage uses to learn what a slice is (embed, eval, interp,
report); they read only the parquet/json files of ``artifacts/slices/<key>/``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from medsae.errors import MissingInputError


def _file(slices_dir: str | Path, name: str) -> Path:
    path = Path(slices_dir) / name
    if not path.is_file():
        raise MissingInputError(f"{path}: not found (is {slices_dir} a completed slices artifact?)")
    return path


def load_slices(slices_dir: str | Path, columns: list[str] | None = None) -> pd.DataFrame:
    """The slice index (``slices.parquet``): one row per slice, ``slice_id`` = row number."""
    return pd.read_parquet(_file(slices_dir, "slices.parquet"), columns=columns)


def load_structures(slices_dir: str | Path) -> pd.DataFrame:
    """Long table of structure areas: slice_id, structure, pixels (only pixels > 0)."""
    frame = pd.read_parquet(_file(slices_dir, "slice_structures.parquet"))
    frame["structure"] = frame["structure"].astype(str)
    return frame


def load_vocab(slices_dir: str | Path) -> list[str]:
    """Sorted structure vocabulary of the index."""
    return list(json.loads(_file(slices_dir, "structures.json").read_text()))


def load_skipped(slices_dir: str | Path) -> pd.DataFrame:
    """Scans skipped by the ingest: modality, image_id, reason."""
    return pd.read_parquet(_file(slices_dir, "skipped.parquet"))


def area_matrix(slices_dir: str | Path) -> tuple[sp.csr_matrix, list[str]]:
    """Structure pixel areas as a CSR int32 matrix ``[n_slices, n_vocab]`` and the vocabulary."""
    vocab = load_vocab(slices_dir)
    n = pq_rows(_file(slices_dir, "slices.parquet"))
    frame = pd.read_parquet(_file(slices_dir, "slice_structures.parquet"))
    codes = pd.Categorical(frame["structure"].astype(str), categories=vocab).codes
    matrix = sp.csr_matrix(
        (frame["pixels"].to_numpy(np.int32), (frame["slice_id"].to_numpy(np.int64), codes)),
        shape=(n, len(vocab)),
    )
    return matrix, vocab


def presence_matrix(slices_dir: str | Path, threshold: int = 0) -> tuple[sp.csr_matrix, list[str]]:
    """Boolean CSR ``[n_slices, n_vocab]``: structure present in the slice (pixels > threshold)."""
    areas, vocab = area_matrix(slices_dir)
    present = areas > threshold if threshold > 0 else areas.astype(bool)
    present = sp.csr_matrix(present, dtype=bool)
    present.eliminate_zeros()
    return present, vocab


def pq_rows(path: Path) -> int:
    """Row count of a parquet file from its footer."""
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows
