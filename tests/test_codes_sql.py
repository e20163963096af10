"""Activations in SQL: the long codes table and the TEMP views over it, on real files and a real registry.

Codes are random CSR matrices; every expected answer is computed from them with numpy / pandas,
independently of the Parquet writer and of DuckDB.
"""

from __future__ import annotations

import duckdb
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp

from medsae.registry import Registry
from medsae.registry.codes_view import allowed_dirs, register_code_views
from medsae.sae.codes_table import CODES_TABLE, write_codes_table

STRUCTURES = ["liver", "spleen", "kidney_left", "kidney_right", "lung_upper_lobe_left", "heart"]


def random_codes(n: int, d_sae: int, k: int, seed: int) -> sp.csr_matrix:
    """k distinct active latents per row, distinct positive values (no ties in a top-k)."""
    rng = np.random.default_rng(seed)
    indices = np.stack([rng.choice(d_sae, size=k, replace=False) for _ in range(n)]).ravel()
    values = rng.permutation(n * k).astype(np.float32) / (n * k) + 0.01
    return sp.csr_matrix((values, indices, np.arange(0, n * k + 1, k)), shape=(n, d_sae))


def triples(csr: sp.csr_matrix, slice_ids: np.ndarray) -> pd.DataFrame:
    coo = csr.tocoo()
    frame = pd.DataFrame({"slice_id": slice_ids[coo.row], "latent": coo.col, "value": coo.data})
    return frame.sort_values(["latent", "slice_id"], ignore_index=True)


def test_long_table_holds_every_code_sorted_by_latent_in_small_row_groups(tmp_path):
    csr = random_codes(3000, 300, 7, seed=1)
    slice_ids = np.random.default_rng(2).permutation(10_000)[:3000].astype(np.int64)  # not in row order
    path = write_codes_table(tmp_path, csr, slice_ids, row_group_rows=1000)
    assert path == tmp_path / CODES_TABLE and not list(tmp_path.glob("*.part"))

    table = pq.read_table(path)
    assert [str(t) for t in table.schema.types] == ["int64", "int32", "float"]
    got = table.to_pandas()
    want = triples(csr, slice_ids)
    pd.testing.assert_frame_equal(got, want, check_dtype=False)  # same rows, in (latent, slice_id) order

    meta = pq.read_metadata(path)
    assert meta.num_rows == csr.nnz == 21_000 and meta.num_row_groups == 21
    bounds = []
    for i in range(meta.num_row_groups):
        group = meta.row_group(i)
        assert group.num_rows <= 1000
        column = group.column(1)
        assert column.compression == "ZSTD"
        bounds.append((column.statistics.min, column.statistics.max))
    # row groups cover increasing latent ranges: a latent filter can skip all others
    assert all(a[1] <= b[0] for a, b in zip(bounds, bounds[1:], strict=False))
    assert int(meta.schema.to_arrow_schema().metadata[b"medsae.d_sae"]) == 300


def test_empty_codes_write_an_empty_typed_table(tmp_path):
    path = write_codes_table(tmp_path, sp.csr_matrix((5, 16), dtype=np.float32), np.arange(5))
    table = pq.read_table(path)
    assert table.num_rows == 0 and table.column_names == ["slice_id", "latent", "value"]


def _register(reg: Registry, exp_id: str, name: str, encode_dir, slices_key: str, created: str) -> None:
    encode_key = f"enc-{exp_id}"
    reg.insert(
        "experiments",
        [{"experiment_id": exp_id, "name": name, "spec_json": "{}", "spec_hash": exp_id, "created_at": created}],
    )
    reg.insert(
        "experiment_stages",
        [
            {"experiment_id": exp_id, "kind": "encode", "stage_key": encode_key},
            {"experiment_id": exp_id, "kind": "slices", "stage_key": slices_key},
        ],
    )
    reg.insert(
        "stages",
        [
            {
                "stage_key": encode_key,
                "kind": "encode",
                "code_version": "1",
                "params_json": "{}",
                "status": "done",
                "artifact_dir": str(encode_dir),
            }
        ],
    )


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """'demo' registered twice (old and new SAE), 'other' once; codes tables on disk; slice structures."""
    root = tmp_path_factory.mktemp("codes_sql")
    n = 800
    slice_ids = np.arange(1000, 1000 + n, dtype=np.int64)
    codes = {
        "old": random_codes(n, 64, 5, seed=10),
        "new": random_codes(n, 64, 5, seed=11),
        "other": random_codes(n, 64, 5, seed=12),
    }
    reg = Registry(root / "registry.duckdb")
    for exp_id, name, created in (
        ("old", "demo", "2025-01-01 00:00:00+00"),
        ("new", "demo", "2025-02-01 00:00:00+00"),
        ("other", "other", "2025-01-15 00:00:00+00"),
    ):
        folder = root / "artifacts" / "encode" / f"enc-{exp_id}"
        write_codes_table(folder, codes[exp_id], slice_ids, row_group_rows=256)
        _register(reg, exp_id, name, folder, "sk", created)
    # an experiment whose encode stage predates codes.parquet: not in the views, no error
    old_folder = root / "artifacts" / "encode" / "enc-legacy"
    old_folder.mkdir(parents=True)
    _register(reg, "legacy", "legacy", old_folder, "sk", "2025-01-20 00:00:00+00")
    rng = np.random.default_rng(3)
    structures = pd.DataFrame(
        [
            {"slices_key": "sk", "slice_id": int(s), "structure": st, "pixels": int(rng.integers(1, 900))}
            for s in slice_ids
            for st in rng.choice(STRUCTURES, size=int(rng.integers(1, 4)), replace=False)
        ]
    )
    reg.insert("slice_structures", structures.to_dict("records"))
    return {"reg": reg, "root": root, "codes": codes, "slice_ids": slice_ids, "structures": structures}


def _top(csr: sp.csr_matrix, slice_ids: np.ndarray, latent: int, k: int) -> list[tuple[int, float]]:
    column = csr[:, latent].toarray().ravel()
    order = np.argsort(-column)[:k]
    return [(int(slice_ids[i]), float(column[i])) for i in order if column[i] > 0]


def test_top20_query_reads_the_latest_experiment_of_the_name_on_a_read_only_connection(registry):
    reg, codes, ids = registry["reg"], registry["codes"], registry["slice_ids"]
    latent = int(np.argmax(codes["new"].getnnz(axis=0)))
    with reg.read() as con:  # read_only=True
        sources = register_code_views(con, reg.path)
        assert sorted(s.experiment_id for s in sources) == ["new", "old", "other"]
        got = con.execute(
            "SELECT slice_id, value FROM codes WHERE experiment = 'demo' AND latent = ? ORDER BY value DESC LIMIT 20",
            [latent],
        ).fetchall()
        assert [(s, pytest.approx(v)) for s, v in _top(codes["new"], ids, latent, 20)] == got
        # experiment_codes keeps every registration; codes only the newest per name
        counts = dict(con.execute("SELECT experiment_id, count(*) FROM experiment_codes GROUP BY 1").fetchall())
        assert counts == {k: codes[k].nnz for k in ("old", "new", "other")}
        per_name = dict(con.execute("SELECT experiment, count(*) FROM codes GROUP BY 1").fetchall())
        assert per_name == {"demo": codes["new"].nnz, "other": codes["other"].nnz}
        assert con.execute("SELECT count(*) FROM codes WHERE experiment = 'legacy'").fetchone() == (0,)


def test_join_to_structures_and_co_activation_match_numpy(registry):
    reg, ids, structures = registry["reg"], registry["slice_ids"], registry["structures"]
    csr = registry["codes"]["other"]
    freq = csr.getnnz(axis=0)
    a, b = (int(x) for x in np.argsort(-freq)[:2])
    with reg.read() as con:
        register_code_views(con, reg.path)
        organs = con.execute(
            """WITH top AS (SELECT slices_key, slice_id, value FROM codes
                            WHERE experiment = 'other' AND latent = ? ORDER BY value DESC LIMIT 10)
               SELECT t.slice_id, list_sort(list(s.structure)) FROM top t
               JOIN slice_structures s USING (slices_key, slice_id) GROUP BY ALL ORDER BY max(t.value) DESC""",
            [a],
        ).fetchall()
        together = con.execute(
            """SELECT count(*) FROM codes x JOIN codes y USING (experiment, slice_id)
               WHERE x.experiment = 'other' AND x.latent = ? AND y.latent = ?""",
            [a, b],
        ).fetchone()[0]
    by_slice = structures.groupby("slice_id")["structure"].apply(sorted)
    assert organs == [(s, by_slice[s]) for s, _ in _top(csr, ids, a, 10)]
    active = (csr[:, [a, b]] != 0).toarray()
    assert together == int(np.sum(active[:, 0] & active[:, 1])) > 0


def test_views_work_in_a_sandbox_that_allows_only_their_folders(registry):
    reg, root = registry["reg"], registry["root"]
    con = duckdb.connect(str(reg.path), read_only=True)
    try:
        dirs = allowed_dirs(con, reg.path)
        assert dirs == sorted(
            str((root / "artifacts" / "encode" / f"enc-{e}").resolve()) + "/" for e in ("new", "old", "other")
        )
        con.execute("SET allowed_directories = ?", [dirs])
        con.execute("SET enable_external_access = false")
        register_code_views(con, reg.path)
        assert con.execute("SELECT count(*) FROM codes WHERE experiment = 'demo'").fetchone()[0] == (
            registry["codes"]["new"].nnz
        )
        outside = root / "outside.parquet"
        pq.write_table(pq.read_table(root / "artifacts" / "encode" / "enc-new" / CODES_TABLE), outside)
        with pytest.raises(duckdb.Error, match="(?i)disabled|permission"):
            con.execute(f"SELECT count(*) FROM read_parquet('{outside}')").fetchall()
    finally:
        con.close()


def test_views_exist_and_are_empty_without_any_codes_table(tmp_path):
    reg = Registry(tmp_path / "registry.duckdb")
    reg.ensure()
    with reg.read() as con:
        assert register_code_views(con, reg.path) == []
        cur = con.execute("SELECT * FROM codes WHERE latent = 1")
        assert [d[0] for d in cur.description] == [
            "experiment",
            "experiment_id",
            "slice_id",
            "latent",
            "value",
            "slices_key",
            "encode_key",
        ]
        assert cur.fetchall() == []
        assert con.execute("SELECT count(*) FROM experiment_codes").fetchone() == (0,)
