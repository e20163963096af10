"""Sparse codes as a long Parquet table ``(slice_id, latent, value)``, sorted by latent.

The encode stage writes ``codes.parquet`` next to its CSR arrays (:mod:`medsae.sae.codes`) so that
SQL can reach activations: "the 20 strongest slices of latent 123" reads only the row groups whose
``latent`` statistics contain 123. Rows are ordered by ``(latent, slice_id)``; row groups hold
:data:`ROW_GROUP_ROWS` rows (zstd), small enough that a latent filter skips almost all of a
909,873-slice table. Only stage-independent columns are stored: which experiment a file belongs to
comes from the registry (``experiment_stages``), since several experiments may share one encode stage.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import scipy.sparse as sp

from medsae.errors import MedsaeError
from medsae.registry.codes_view import CODES_TABLE  # the file name the registry's views read

ROW_GROUP_ROWS = 128 * 1024
SCHEMA = pa.schema(
    [
        pa.field("slice_id", pa.int64(), nullable=False),
        pa.field("latent", pa.int32(), nullable=False),
        pa.field("value", pa.float32(), nullable=False),
    ]
)


def long_batches(
    csr: sp.csr_matrix, slice_ids: np.ndarray, rows_per_batch: int = ROW_GROUP_ROWS
) -> Iterator[pa.RecordBatch]:
    """The non-zeros of ``csr`` as record batches ordered by (latent, slice_id); no full copy of the table."""
    slice_ids = np.asarray(slice_ids, dtype=np.int64)
    if slice_ids.size > 1 and np.any(np.diff(slice_ids) < 0):  # make row order = slice_id order
        order = np.argsort(slice_ids, kind="stable")
        csr, slice_ids = sp.csr_matrix(csr)[order], slice_ids[order]
    csc = sp.csc_matrix(csr)
    csc.sort_indices()  # within a latent: rows, hence slice ids, ascending
    indptr = csc.indptr.astype(np.int64, copy=False)
    for start in range(0, int(csc.nnz), rows_per_batch):
        stop = min(start + rows_per_batch, int(csc.nnz))
        first = int(np.searchsorted(indptr, start, side="right")) - 1
        last = int(np.searchsorted(indptr, stop, side="left"))
        # latent of every entry in [start, stop): repeat each column id over its span inside the window
        spans = np.clip(indptr[first : last + 1], start, stop)
        latent = np.repeat(np.arange(first, last, dtype=np.int32), np.diff(spans))
        yield pa.RecordBatch.from_arrays(
            [
                pa.array(slice_ids[csc.indices[start:stop]], pa.int64()),
                pa.array(latent, pa.int32()),
                pa.array(csc.data[start:stop].astype(np.float32, copy=False), pa.float32()),
            ],
            schema=SCHEMA,
        )


def write_codes_table(
    out_dir: str | Path,
    csr: sp.csr_matrix,
    slice_ids: np.ndarray,
    *,
    name: str = CODES_TABLE,
    row_group_rows: int = ROW_GROUP_ROWS,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write ``out_dir/name`` (written to ``.part`` and renamed, so a killed write leaves no table)."""
    csr = sp.csr_matrix(csr)
    if csr.shape[0] != len(slice_ids):
        raise MedsaeError(f"encode: {csr.shape[0]} code rows but {len(slice_ids)} slice ids")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    tmp = path.with_name(path.name + ".part")
    meta = {"d_sae": str(csr.shape[1]), "n_slices": str(csr.shape[0]), **(metadata or {})}
    schema = SCHEMA.with_metadata({f"medsae.{k}": v for k, v in meta.items()})
    sorting = [pq.SortingColumn(1), pq.SortingColumn(0)]  # latent, then slice_id
    with pq.ParquetWriter(tmp, schema, compression="zstd", sorting_columns=sorting) as writer:
        for batch in long_batches(csr, slice_ids, row_group_rows):
            writer.write_batch(batch, row_group_size=row_group_rows)
        if csr.nnz == 0:
            writer.write_table(schema.empty_table())
    os.replace(tmp, path)
    return path


__all__ = ["CODES_TABLE", "ROW_GROUP_ROWS", "SCHEMA", "long_batches", "write_codes_table"]
