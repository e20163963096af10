"""Sparse codes of every slice, stored as CSR arrays (the encode stage's artifact).

Layout of an ``encode/<key>/`` folder: ``codes_indptr.npy`` (int64, n+1), ``codes_indices.npy``
(int32), ``codes_values.npy`` (float32), ``slice_ids.npy`` (int64, row -> slice_id) and
``meta.json`` ``{n, d_sae, nnz}``. Arrays are written to a temporary name and renamed, so a killed
write never leaves a file that looks complete.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from medsae.errors import MedsaeError, MissingInputError

FILES = ("codes_indptr.npy", "codes_indices.npy", "codes_values.npy", "slice_ids.npy")
META = "meta.json"


def _save(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb") as fh:
        np.save(fh, array, allow_pickle=False)
    os.replace(tmp, path)


def write_codes(out_dir: str | Path, csr: sp.csr_matrix, slice_ids: np.ndarray) -> Path:
    """Write ``csr`` [n, d_sae] and the row -> slice_id index into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csr = sp.csr_matrix(csr)
    slice_ids = np.asarray(slice_ids, dtype=np.int64)
    if csr.shape[0] != len(slice_ids):
        raise MedsaeError(f"encode: {csr.shape[0]} code rows but {len(slice_ids)} slice ids")
    _save(out / FILES[0], csr.indptr.astype(np.int64))
    _save(out / FILES[1], csr.indices.astype(np.int32))
    _save(out / FILES[2], csr.data.astype(np.float32))
    _save(out / FILES[3], slice_ids)
    meta = {"n": int(csr.shape[0]), "d_sae": int(csr.shape[1]), "nnz": int(csr.nnz)}
    (out / META).write_text(json.dumps(meta))
    return out


def load_codes(encode_dir: str | Path) -> tuple[sp.csr_matrix, np.ndarray]:
    """``(csr_matrix float32 [n, d_sae], slice_ids int64 [n])`` of an encode folder."""
    folder = Path(encode_dir)
    meta_path = folder / META
    if not meta_path.is_file():
        raise MissingInputError(f"{meta_path}: not found (not a completed encode folder)")
    for name in FILES:
        if not (folder / name).is_file():
            raise MissingInputError(f"{folder / name}: not found")
    meta = json.loads(meta_path.read_text())
    indptr, indices, values, slice_ids = (np.load(folder / name) for name in FILES)
    n, d_sae, nnz = int(meta["n"]), int(meta["d_sae"]), int(meta["nnz"])
    if len(indptr) != n + 1 or len(indices) != nnz or len(values) != nnz or len(slice_ids) != n:
        raise MedsaeError(f"{folder}: code arrays disagree with meta.json (n={n}, nnz={nnz})")
    csr = sp.csr_matrix((values.astype(np.float32, copy=False), indices, indptr), shape=(n, d_sae))
    return csr, slice_ids.astype(np.int64, copy=False)
