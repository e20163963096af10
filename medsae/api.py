"""The Python API: one registry, its experiments, and each experiment's results as DataFrames.

    import medsae
    db = medsae.open("registry.duckdb")
    exp = db.experiment("demo")
    exp.metrics(), exp.latents(), exp.explanations(), exp.scores()   # pandas, built from Arrow
    codes, slices = exp.codes()                                      # scipy CSR + slice metadata
    exp.sae(), exp.embeddings()                                      # torch module, memory-mapped store

Everything is read-only: tables come from read-only DuckDB connections (each call opens and closes
one, so a running ``medsae exp run`` can still write), files from the stage folders the registry
names. Experiments are found the way the CLI finds them (:func:`medsae.plan.find_experiment`,
:func:`medsae.plan.experiment_stage_dirs`): a name means its latest registration.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import pandas as pd
import pyarrow as pa

from medsae.errors import MedsaeError, MissingInputError
from medsae.registry.db import Registry

if TYPE_CHECKING:
    import duckdb
    import scipy.sparse as sp
    import torch

    from medsae.embed.store import EmbeddingStore


def _arrow(con: duckdb.DuckDBPyConnection, sql: str, params: Sequence[Any] | None = None) -> pa.Table:
    """Run ``sql`` and fetch the result as an Arrow table (DuckDB 1.x and 2.x spellings)."""
    relation = con.sql(sql, params=list(params) if params else None)
    if relation is None:  # a statement without a result (SET, PRAGMA ...)
        return pa.table({})
    fetch = getattr(relation, "to_arrow_table", None) or relation.arrow
    return fetch()


class Codes(NamedTuple):
    """An experiment's sparse codes: ``matrix`` [slices, latents] and ``slices`` (row i = matrix row i)."""

    matrix: sp.csr_matrix
    slices: pd.DataFrame


class Project:
    """A registry file opened for reading (see :func:`open`)."""

    def __init__(self, registry: str | Path | None = None) -> None:
        self.registry = Registry(registry)
        with self.registry.read():  # fails now, with the registry's one-line message, if there is none
            pass

    def __repr__(self) -> str:
        return f"medsae.Project({str(self.registry.path)!r})"

    def table(self, sql: str, params: Sequence[Any] | None = None) -> pa.Table:
        """A read-only query as an Arrow table; the views ``codes`` and ``experiment_codes`` are available."""
        import duckdb

        from medsae.registry.codes_view import register_code_views

        with self.registry.read() as con:
            register_code_views(con, self.registry.path)
            try:
                return _arrow(con, sql, params)
            except duckdb.Error as exc:
                raise MedsaeError(f"sql: {str(exc).strip().splitlines()[0]}") from None

    def sql(self, sql: str, params: Sequence[Any] | None = None) -> pd.DataFrame:
        """A read-only query as a DataFrame (same tables and views as ``medsae sql``)."""
        return self.table(sql, params).to_pandas()

    def experiments(self) -> pd.DataFrame:
        """One row per registered experiment: name, ids, sweep, creation time, stages done."""
        return self.sql(
            """SELECT e.name, e.experiment_id, e.spec_hash, e.sweep_name, e.created_at,
                      count(s.stage_key) AS stages_done, count(es.kind) AS stages
               FROM experiments e JOIN experiment_stages es USING (experiment_id)
               LEFT JOIN stages s ON s.stage_key = es.stage_key AND s.status = 'done'
               GROUP BY ALL ORDER BY e.created_at, e.name"""
        )

    def experiment(self, name: str) -> Experiment:
        """The experiment ``name`` (its latest registration); one-line error if unknown."""
        from medsae.plan import experiment_stage_dirs, find_experiment

        row = find_experiment(self.registry, name)
        keys = self.registry.query(
            "SELECT kind, stage_key FROM experiment_stages WHERE experiment_id = ?", [row["experiment_id"]]
        )
        return Experiment(
            project=self,
            name=row["name"],
            experiment_id=row["experiment_id"],
            spec=json.loads(row["spec_json"]),
            stage_keys={r["kind"]: r["stage_key"] for r in keys},
            stage_dirs=experiment_stage_dirs(self.registry, name),
        )


@dataclass(frozen=True, eq=False)
class Experiment:
    """One registered experiment: its tables as DataFrames, its files as arrays and modules."""

    project: Project
    name: str
    experiment_id: str
    spec: dict[str, Any]  # the resolved spec
    stage_keys: dict[str, str]  # kind -> stage key (planned, done or not)
    stage_dirs: dict[str, Path]  # kind -> artifact folder of the stages that are done

    def __repr__(self) -> str:
        done = ", ".join(k for k in self.stage_keys if k in self.stage_dirs)
        return f"medsae.Experiment({self.name!r}, {self.experiment_id[:12]}, done: {done})"

    def _key(self, kind: str) -> str:
        return self.stage_keys.get(kind, "")

    def _dir(self, kind: str) -> Path:
        folder = self.stage_dirs.get(kind)
        if folder is None:
            raise MissingInputError(f"experiment '{self.name}': stage '{kind}' has not run (run `medsae exp run`)")
        if not folder.is_dir():
            raise MissingInputError(f"experiment '{self.name}': {kind} folder {folder} is missing")
        return folder

    # -- registry tables ---------------------------------------------------------------------

    def metrics(self) -> pd.DataFrame:
        """Every metric of every stage: stage, split, metric, target, n_features, value, n."""
        return self.project.sql(
            """SELECT es.kind AS stage, m.split, m.name AS metric, m.target, m.n_features, m.value, m.n
               FROM experiment_stages es JOIN metrics m ON m.stage_key = es.stage_key
               WHERE es.experiment_id = ?
               ORDER BY es.kind, m.split, m.name, m.target, m.n_features""",
            [self.experiment_id],
        )

    def latents(self) -> pd.DataFrame:
        """Per-latent statistics of the summarize stage (frequency, quantiles, status, top structures)."""
        return self.project.sql(
            "SELECT * EXCLUDE (stage_key) FROM latents WHERE stage_key = ? ORDER BY latent", [self._key("summarize")]
        )

    def explanations(self, latest: bool = False) -> pd.DataFrame:
        """Explanations of this SAE's latents, every explainer and version (``latest``: newest per model/kind)."""
        table = "latest_explanations" if latest else "explanations"
        return self.project.sql(
            f"""SELECT * FROM {table} WHERE stage_key = ? OR sae_key = ?
                ORDER BY latent, explainer_model, kind, created_at""",
            [self._key("summarize"), self._key("train")],
        )

    def scores(self) -> pd.DataFrame:
        """Scores of those explanations, with the explanation's latent, explainer and kind."""
        return self.project.sql(
            """SELECT e.latent, e.explainer_model, e.kind, s.*
               FROM explanation_scores s JOIN explanations e USING (explanation_id)
               WHERE e.stage_key = ? OR e.sae_key = ?
               ORDER BY e.latent, e.explainer_model, e.kind, s.method, s.scorer_model""",
            [self._key("summarize"), self._key("train")],
        )

    def slices(self) -> pd.DataFrame:
        """Slice metadata of the slices stage, indexed by ``slice_id``."""
        frame = self.project.sql(
            "SELECT * EXCLUDE (slices_key) FROM slices WHERE slices_key = ? ORDER BY slice_id", [self._key("slices")]
        )
        return frame.set_index("slice_id", drop=False).rename_axis(None)

    def structures(self) -> pd.DataFrame:
        """Pixels of each structure on each slice (``slice_id, structure, pixels``)."""
        return self.project.sql(
            """SELECT slice_id, structure, pixels FROM slice_structures
               WHERE slices_key = ? ORDER BY slice_id, structure""",
            [self._key("slices")],
        )

    # -- files ------------------------------------------------------------------------------------

    def codes(self) -> Codes:
        """The encode stage's codes (scipy CSR, float32) and the metadata of each row's slice."""
        from medsae.sae.codes import load_codes

        matrix, slice_ids = load_codes(self._dir("encode"))
        meta = self.slices()
        missing = pd.Index(slice_ids).difference(meta.index)
        if len(missing):
            raise MedsaeError(
                f"experiment '{self.name}': {len(missing)} coded slices have no metadata "
                f"(first slice_id {int(missing[0])}); registry and artifacts disagree"
            )
        return Codes(matrix, meta.loc[slice_ids].reset_index(drop=True))

    def sae(self, device: str | torch.device = "cpu") -> torch.nn.Module:
        """The trained SAE (eval mode, frozen), rebuilt from the train folder alone."""
        from medsae.sae.checkpoint import load_sae

        return load_sae(self._dir("train"), device)

    def embeddings(self) -> EmbeddingStore:
        """The embedding store: shards memory-mapped (``.shard(i)``), ``.load(rows)``, ``.slice_ids``."""
        from medsae.embed.store import open_embeddings

        return open_embeddings(self._dir("embed"))

    def codes_table(self) -> Path:
        """The encode stage's long Parquet table (``slice_id, latent, value``, sorted by latent)."""
        from medsae.sae.codes_table import CODES_TABLE

        path = self._dir("encode") / CODES_TABLE
        if not path.is_file():
            raise MissingInputError(
                f"experiment '{self.name}': {path} not found (encoded by an older medsae; "
                "rerun with `medsae exp run SPEC --force encode`)"
            )
        return path

    def export_parquet(self, out_dir: str | Path) -> list[Path]:
        """Write ``codes.parquet`` (long table), ``slices.parquet`` and ``slice_structures.parquet`` to ``out_dir``.

        Files hold no absolute path (slices are named by ``slice_uid``), are written to ``.part``
        and renamed, and are readable by everyone (0644).
        """
        import pyarrow.parquet as pq

        from medsae.sae.codes import load_codes
        from medsae.sae.codes_table import CODES_TABLE, write_codes_table

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        encode_dir = self._dir("encode")
        meta = {"medsae.experiment": self.name, "medsae.experiment_id": self.experiment_id}
        written = []
        source = encode_dir / CODES_TABLE
        if source.is_file():
            tmp = out / (CODES_TABLE + ".part")
            shutil.copyfile(source, tmp)
            os.replace(tmp, out / CODES_TABLE)
        else:  # encoded before codes.parquet existed: build it from the CSR arrays
            matrix, slice_ids = load_codes(encode_dir)
            write_codes_table(out, matrix, slice_ids)
        written.append(out / CODES_TABLE)
        for name, frame in (("slices.parquet", self.slices()), ("slice_structures.parquet", self.structures())):
            tmp = out / (name + ".part")
            table = pa.Table.from_pandas(frame, preserve_index=False)
            table = table.replace_schema_metadata(meta)
            pq.write_table(table, tmp, compression="zstd")
            os.replace(tmp, out / name)
            written.append(out / name)
        for path in written:
            path.chmod(0o644)
        return written


def open(registry: str | Path | None = None) -> Project:  # noqa: A001 - the public name is medsae.open
    """Open a registry for reading: ``registry`` path, else ``$MEDSAE_REGISTRY``, else ``./registry.duckdb``."""
    return Project(registry)


__all__ = ["Codes", "Experiment", "Project", "open"]
