"""What the agent reads: the summarize stage's latents and example sets, the slices stage's tables.

:func:`read_summary` loads the example sets of every latent, :func:`select_latents` picks the
eligible ones (live or dense, with a firing explain and simulate set), most frequent first, and
:func:`load_agent_data` renders what every latent's work reads (prompt lines, legend, attributes).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from medsae.errors import MissingInputError
from medsae.interp.metadata import format_lines, legend_lines, slice_attributes
from medsae.interp.sampling import EXPLAIN, SIMULATE, ExampleSet

log = logging.getLogger("medsae")

#: (latent, purpose) -> its example set
Sets = dict[tuple[int, str], ExampleSet]


@dataclass
class AgentInputs:
    """Where the agent reads from (completed stage folders) and the keys that identify them."""

    summarize_dir: Path
    slices_dir: Path
    sae_key: str
    summarize_key: str


@dataclass
class AgentData:
    """What every latent's work reads, loaded once per run."""

    sets: Sets
    lines: dict[int, str]  # slice id -> its prompt line (every slice of a chosen latent's sets)
    needed: np.ndarray  # those slice ids, sorted
    legend: list[str]  # the metadata values a prompt may name
    attrs: pd.DataFrame  # slice attributes, indexed by slice id
    structures: pd.DataFrame  # structure areas per slice
    summaries: dict[int, str]  # latent -> its enrichment summary (JSON, with the best attribute)


def read_summary(summarize_dir: Path) -> tuple[pd.DataFrame, Sets]:
    """The latents table and the example sets of a summarize stage folder."""
    lat_path, sets_path = summarize_dir / "latents.parquet", summarize_dir / "example_sets.parquet"
    for path in (lat_path, sets_path):
        if not path.is_file():
            raise MissingInputError(f"{path}: summarize output missing (run the summarize stage first)")
    latents = pd.read_parquet(lat_path)
    sets: Sets = {}
    for row in pd.read_parquet(sets_path).to_dict("records"):
        latent, purpose = int(row["latent"]), str(row["purpose"])
        sets[(latent, purpose)] = ExampleSet(
            latent=latent,
            purpose=purpose,
            slice_ids=np.asarray(row["slice_ids"], dtype=np.int64),
            activations=np.asarray(row["activations"], dtype=np.float64),
            roles=list(row["roles"]),
            set_id=row["set_id"],
        )
    return latents, sets


def select_latents(
    latents: pd.DataFrame,
    sets: Sets,
    wanted: Sequence[int] | None,
    max_latents: int | None,
) -> list[int]:
    """Eligible latents (live or dense, with explain and simulate sets), most frequent first."""
    ok = latents[latents["status"].isin(["live", "dense"])].copy()
    has_sets = [
        (int(x), EXPLAIN) in sets
        and (int(x), SIMULATE) in sets
        and (sets[(int(x), EXPLAIN)].activations > 0).any()
        and (sets[(int(x), SIMULATE)].activations > 0).any()
        for x in ok["latent"]
    ]
    ok = ok[np.asarray(has_sets, dtype=bool)] if len(ok) else ok
    ok = ok.sort_values(["frequency", "latent"], ascending=[False, True])
    chosen = [int(x) for x in ok["latent"]]
    if wanted is not None:
        wanted = [int(x) for x in wanted]
        eligible = set(chosen)
        skipped = [x for x in wanted if x not in eligible]
        if skipped:
            log.warning("latents not eligible for explanation (dead, too rare or no example sets): %s", skipped)
        chosen = [x for x in wanted if x in eligible]
    if max_latents is not None:
        chosen = chosen[:max_latents]
    return chosen


def load_slice_tables(slices_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """(slices indexed by slice_id, structure areas, structure vocabulary) of a slices folder."""
    from medsae.data.index import load_slices, load_structures, load_vocab

    slices = load_slices(slices_dir).set_index("slice_id", drop=False)
    return slices, load_structures(slices_dir), load_vocab(slices_dir)


def load_agent_data(slices_dir: Path, latents: pd.DataFrame, sets: Sets, chosen: list[int]) -> AgentData:
    """Prompt lines of every slice in the sets of the ``chosen`` latents, the legend and attributes."""
    slices, structures, vocab = load_slice_tables(slices_dir)
    attrs = slice_attributes(slices)
    chosen_set = set(chosen)
    needed = np.unique(np.concatenate([s.slice_ids for (lat, _), s in sets.items() if lat in chosen_set]))
    return AgentData(
        sets=sets,
        lines=format_lines(slices, structures, needed),
        needed=needed,
        legend=legend_lines(attrs, vocab),
        attrs=attrs,
        structures=structures,
        summaries=dict(zip(latents["latent"].astype(int), latents["top_structures"], strict=True)),
    )


def pool_note(summarize_dir: Path) -> str | None:
    """A sentence when the summarize stage had to widen the interpretation pool (else None)."""
    try:
        info = json.loads((summarize_dir / "pool.json").read_text())
    except (OSError, ValueError):
        return None
    if not info.get("widened"):
        return None
    return (
        f"the interpretation pool was widened to the split(s) {'+'.join(info.get('splits') or [])} "
        f"({info.get('scans')} scans): too few scans in the splits the spec names"
    )
