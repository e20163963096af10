"""The Python API: one registry, its experiments, and each experiment's results as DataFrames.

    import medsae
    db = medsae.open("registry.duckdb")
    exp = db.experiment("demo")
    exp.metrics(), exp.latents(), exp.explanations(), exp.scores()   # pandas, built from Arrow
    codes, slices = exp.codes()                                      # scipy CSR + slice metadata
    exp.sae(), exp.embeddings()                                      # torch module, memory-mapped store

Everything is read-only: tables come from read-only DuckDB connections (each call opens and closes
one, so a running ``medsae exp run`` can still write), files from the stage folders the registry
names. Experiments are found the way the CLI finds them (:func:`medsae.registry.queries.find_experiment`):
a name means its latest registration, ``NAME@HASH`` one registration.
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
    from medsae.sae.checkpoint import FeatureDensity


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
        """The experiment ``name`` (its latest registration) or ``NAME@HASH``; one-line error if unknown."""
        from medsae.registry import queries

        row = queries.find_experiment(self.registry, name)
        stages = queries.experiment_stages(self.registry, row["experiment_id"])
        return Experiment(
            project=self,
            name=row["name"],
            experiment_id=row["experiment_id"],
            spec=json.loads(row["spec_json"]),
            stage_keys={r["kind"]: r["stage_key"] for r in stages},
            stage_dirs={r["kind"]: r["folder"] for r in stages if r["folder"] is not None},
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


# -- SAELens export of a registered experiment ------------------------------------------------------
#
# Here, not in medsae.sae: it reads the registry, the evaluation's firing rule and the report's
# metric definitions, which the sae package (a layer below them) must not import.


def _existing(dirs: dict[str, Path], kind: str, experiment: str, registry: Registry) -> Path:
    what = "trained SAE" if kind == "train" else f"'{kind}' stage"
    if kind not in dirs:
        raise MedsaeError(f"{registry.path}: no {what} for experiment '{experiment}' (run `medsae exp run` first)")
    if not dirs[kind].is_dir():
        raise MissingInputError(f"{dirs[kind]}: {kind} folder of '{experiment}' is missing")
    return dirs[kind]


def train_density(encode_dir: Path, slices_dir: Path, experiment: str, split: str = "train") -> FeatureDensity:
    """Firing frequency of each latent on one split of the experiment's slices (from the encode stage's codes)."""
    import numpy as np

    from medsae.eval.metrics import latent_frequencies  # the evaluation's own firing rule
    from medsae.sae.checkpoint import FeatureDensity
    from medsae.sae.codes import load_codes

    codes, slice_ids = load_codes(encode_dir)
    path = slices_dir / "slices.parquet"
    if not path.is_file():
        raise MissingInputError(f"{path}: slice table not found")
    splits = pd.read_parquet(path, columns=["slice_id", "split"]).set_index("slice_id")["split"]
    rows = np.flatnonzero(splits.reindex(slice_ids).to_numpy() == split)
    if rows.size == 0:
        raise MedsaeError(f"{encode_dir}: no '{split}' slices among the codes of '{experiment}'")
    return FeatureDensity(
        latent_frequencies(codes[rows]), int(rows.size), f"the {split} split of experiment '{experiment}'"
    )


def _embedding_facts(spec_json: str | None) -> tuple[str | None, str | None]:
    """``(backbone id, "source, pooling, input size")`` from an experiment's resolved spec."""
    try:
        embed = json.loads(spec_json or "{}").get("embed") or {}
    except json.JSONDecodeError:
        return None, None
    parts = [
        str(embed["source"]) if embed.get("source") not in (None, embed.get("model")) else None,
        f"{embed['pooling']} pooling" if embed.get("pooling") else None,
        f"{embed['input_size']} px input" if embed.get("input_size") else None,
    ]
    return embed.get("model"), ", ".join(p for p in parts if p) or None


def _card_metrics(registry: Registry, experiment_id: str) -> tuple[tuple[str, str, str, float], ...]:
    """The train and evaluate stages' reconstruction and dead-latent rows, with their definitions."""
    from medsae.registry import queries
    from medsae.report.names import CARD_METRICS, SPLIT_ORDER, metric_definition

    values: dict[tuple[str, str], list[float]] = {}
    for m in queries.scalar_metrics(registry, experiment_id):
        if m["metric"] in CARD_METRICS and m["value"] is not None:
            values.setdefault((m["metric"], m["split"]), []).append(m["value"])
    order = {s: i for i, s in enumerate(SPLIT_ORDER)}
    keys = sorted(values, key=lambda k: (CARD_METRICS.index(k[0]), order.get(k[1], len(order)), k[1] or ""))
    return tuple(
        (name, split, metric_definition(name), sum(values[name, split]) / len(values[name, split]))
        for name, split in keys
    )


def export_experiment_saelens(
    experiment: str, out_dir: str | Path, registry_path: str | Path | None = None, l2: str = "rescale"
) -> Path:
    """:func:`medsae.sae.checkpoint.export_saelens` of a registered experiment (NAME or NAME@HASH),
    with its train-split feature density and a model card naming its embeddings and metrics."""
    from medsae.registry import queries
    from medsae.sae.checkpoint import L2_EXPORTS, CardFacts, export_saelens

    if l2 not in L2_EXPORTS:
        raise MedsaeError(f"--l2: expected one of {', '.join(L2_EXPORTS)}, got '{l2}'")
    registry = Registry(registry_path)
    row = queries.find_experiment(registry, experiment)
    dirs = queries.stage_folders(registry, row["experiment_id"])
    train_dir = _existing(dirs, "train", experiment, registry)
    density = train_density(
        _existing(dirs, "encode", experiment, registry), _existing(dirs, "slices", experiment, registry), experiment
    )
    model, embedding = _embedding_facts(row.get("spec_json"))
    facts = CardFacts(
        experiment=row["name"],
        embedding_model=model,
        embedding=embedding,
        metrics=_card_metrics(registry, row["experiment_id"]),
    )
    return export_saelens(train_dir, out_dir, density=density, l2=l2, facts=facts)


def open(registry: str | Path | None = None) -> Project:  # shadows the builtin: the public name is medsae.open
    """Open a registry for reading: ``registry`` path, else ``$MEDSAE_REGISTRY``, else ``./registry.duckdb``."""
    return Project(registry)


__all__ = ["Codes", "Experiment", "Project", "export_experiment_saelens", "open", "train_density"]
