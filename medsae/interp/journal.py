"""Where finished latents go while the agent is still running, so a kill loses (almost) nothing.

The agent hands every finished latent's rows to a :class:`RowSink`, which writes them in small
batches (every ``flush_latents`` latents or after an interval, and at the end, also when the run
fails). The interval adapts to what a write costs: 20 times the last write's duration, between
``MIN_INTERVAL_S`` and ``MAX_INTERVAL_S``, so writing takes about 5 % of the run at most and a
kill loses at most the last few seconds of work:

* :class:`RowSink` itself keeps nothing (the agent keeps every row in memory anyway);
* :class:`WorkDirJournal` — the ``interpret`` stage: one JSON part file per batch in the stage's
  ``work_dir`` (written atomically); a rerun of the stage reads the parts back and skips the
  latents they finished. Stages never write the registry (the planner does, at the end).
* :class:`RegistrySink` — ``medsae explain run``: each batch is one short registry transaction
  (:func:`insert_results`; ids are content hashes, INSERT OR IGNORE: nothing is written twice). A
  rerun recomputes the finished latents from the LLM cache (no new call) and adds no row.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from medsae.registry.db import Registry, insert_rows

TABLES = ("explanations", "explanation_scores", "llm_calls", "prompts")
#: Registry table -> its id column (None: no id; rows are appended).
ID_COLUMNS = {
    "explanations": "explanation_id",
    "explanation_scores": "score_id",
    "prompts": "template_hash",
    "llm_calls": None,
}
MIN_INTERVAL_S, MAX_INTERVAL_S, COST_FACTOR = 1.0, 10.0, 20.0
Tables = dict[str, list[dict[str, Any]]]


def empty_tables() -> Tables:
    return {t: [] for t in TABLES}


def _latent_order(row: dict[str, Any]) -> tuple[bool, int]:
    latent = row.get("latent")
    return latent is None, int(latent) if latent is not None else 0


def deduplicated(tables: Tables) -> Tables:
    """Rows with an id once (a resumed run re-emits some), in an order that does not depend on the order
    latents finished in (by latent, then id: same files and same float sums whatever the scheduling);
    other rows as they are."""
    out: Tables = {}
    for table, rows in tables.items():
        column = ID_COLUMNS.get(table)
        if column is None:
            out[table] = list(rows)
            continue
        seen: dict[Any, dict] = {}
        for row in rows:
            seen.setdefault(row[column], row)
        out[table] = sorted(seen.values(), key=lambda r, c=column: (_latent_order(r), str(r[c])))
    return out


def insert_results(registry: Registry, tables: Tables) -> dict[str, int]:
    """Insert agent rows in one transaction; returns how many rows per table were new."""
    new: dict[str, int] = {}
    with registry.write() as con:
        for table, rows in tables.items():
            if not rows:
                new[table] = 0
                continue
            column = ID_COLUMNS.get(table)
            if column:
                ids = [r[column] for r in rows]
                existing = {
                    r[0]
                    for r in con.execute(
                        f"SELECT {column} FROM {table} WHERE list_contains(?, {column})", [ids]
                    ).fetchall()
                }
                fresh = {i for i in ids if i not in existing}
                new[table] = len(fresh)
            else:
                new[table] = len(rows)
            insert_rows(con, table, rows)
    return new


class RowSink:
    """Batches rows of finished latents and writes them with :meth:`_write` (here: nowhere)."""

    def __init__(self, flush_latents: int = 100):
        self.interval_s = MIN_INTERVAL_S
        self.flush_latents = int(flush_latents)
        self._pending: Tables = empty_tables()
        self._pending_latents: list[int] = []
        self._last = time.monotonic()
        self.n_flushes = 0

    # -- resume

    def finished(self) -> tuple[set[int], Tables]:
        """Latents finished by an earlier, interrupted run, and their rows (none here)."""
        return set(), empty_tables()

    # -- writing

    def add(self, tables: Tables, latent: int | None = None) -> None:
        """Rows to write; ``latent``: the latent these rows finish (None: rows of no single latent)."""
        for table, rows in tables.items():
            if rows:
                self._pending.setdefault(table, []).extend(rows)
        if latent is not None:
            self._pending_latents.append(int(latent))
        if len(self._pending_latents) >= self.flush_latents or time.monotonic() - self._last >= self.interval_s:
            self.flush()

    def flush(self) -> None:
        """Write what is pending (one batch)."""
        start = self._last = time.monotonic()
        if not any(self._pending.values()) and not self._pending_latents:
            return
        tables, latents = self._pending, self._pending_latents
        self._pending, self._pending_latents = empty_tables(), []
        self._write(tables, latents)
        self.n_flushes += 1
        self._last = time.monotonic()
        self.interval_s = min(MAX_INTERVAL_S, max(MIN_INTERVAL_S, COST_FACTOR * (self._last - start)))

    def _write(self, tables: Tables, latents: list[int]) -> None:
        """Persist one batch (subclasses)."""


class WorkDirJournal(RowSink):
    """Part files ``part-NNNNNN.json`` in a folder that survives a killed stage."""

    def __init__(self, folder: Path, flush_latents: int = 100):
        super().__init__(flush_latents)
        self.folder = Path(folder)

    def _parts(self) -> list[Path]:
        return sorted(self.folder.glob("part-*.json")) if self.folder.is_dir() else []

    def finished(self) -> tuple[set[int], Tables]:
        done: set[int] = set()
        tables = empty_tables()
        for part in self._parts():
            try:
                data = json.loads(part.read_text())
            except (OSError, ValueError):  # a torn part cannot exist (atomic rename); skip anything odd
                continue
            done.update(int(x) for x in data.get("latents", []))
            for table, rows in (data.get("tables") or {}).items():
                tables.setdefault(table, []).extend(rows)
        return done, tables

    def _write(self, tables: Tables, latents: list[int]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        parts = self._parts()
        number = int(parts[-1].stem.split("-")[1]) + 1 if parts else 1
        target = self.folder / f"part-{number:06d}.json"
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"latents": latents, "tables": tables}, default=str))
        os.replace(tmp, target)


class RegistrySink(RowSink):
    """Each batch is one registry transaction; counts the rows that were new."""

    def __init__(self, registry: Registry, flush_latents: int = 100):
        super().__init__(flush_latents)
        self.registry = registry
        self.new_rows: dict[str, int] = dict.fromkeys(TABLES, 0)

    def _write(self, tables: Tables, latents: list[int]) -> None:
        for table, n in insert_results(self.registry, tables).items():
            self.new_rows[table] = self.new_rows.get(table, 0) + n
