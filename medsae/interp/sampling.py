"""Which slices the explainer sees and which ones score it (docs/method.md#example-sets).

Leak-proof by construction:

* The **pool** is the slices of splits the SAE was not trained on (``val``; widened to val+test,
  then every split, when it has fewer than ``min_pool_scans`` scans, and recorded as such).
* Scans (modality + image_id; in TotalSegmentator one scan is one patient) are hashed with a
  fixed salt into an **explain partition E** and a disjoint **score partition S**. Everything
  shown to the explainer comes from E, everything scored from S.
* **Near-duplicates**: at most ``max_per_volume`` slices of one scan per explain set
  (``max_per_volume_score`` per score set) and at least ``min_slice_gap`` between chosen slices of
  the same scan and plane (neighbouring slices look alike). A partition with too few scans to fill
  a set under that cap (the phantom demo) raises the cap to ceil(set size / scans).
* Every random choice comes from a generator seeded by sha256(seed, SAE key, latent, purpose), so
  adding, removing or reordering latents changes nobody else's examples.
* Every realised set gets ``set_id`` = sha256 of the sampler parameters, seed, SAE key, latent,
  purpose and chosen slice ids.

Sets per eligible latent:

* ``explain`` (from E): the ``explain_top`` strongest slices, ``explain_per_decile`` per
  equal-count activation decile, and ``explain_negatives`` non-firing contrasts, a
  ``matched_fraction`` of them matched to the top slices on body region and structures present.
* ``simulate`` (from S, Bills-style 1:1): ``simulate_per_decile`` firing slices per decile plus
  ``simulate_random`` uniform slices (mostly non-firing).
* ``detect`` (from S, balanced): ``detect_per_decile`` firing per decile, and as many non-firing
  slices, half uniform and half matched hard negatives.

Work per latent is proportional to its number of firing slices, never to the pool size.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from medsae.errors import MedsaeError
from medsae.interp.config import InterpretSpec

EXPLAIN, SIMULATE, DETECT = "explain", "simulate", "detect"
N_DECILES = 10
MATCH_CANDIDATES = 2000  # non-firing slices considered when matching contrasts
CHUNK = 512  # candidates screened at a time by the near-duplicate picker

#: Fields of the interpret section that shape example sets (they enter every set id).
SAMPLING_FIELDS = (
    "pool_splits",
    "min_pool_scans",
    "explain_fraction",
    "explain_top",
    "explain_per_decile",
    "explain_negatives",
    "matched_fraction",
    "simulate_per_decile",
    "simulate_random",
    "detect",
    "detect_per_decile",
    "detect_negatives",
    "max_per_volume",
    "max_per_volume_score",
    "min_slice_gap",
    "seed",
)


def sha256_json(obj: Any) -> str:
    """sha256 hex of canonical JSON (sorted keys, compact)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def purpose_seed(seed: int, sae_key: str, latent: int, purpose: str) -> int:
    """64-bit seed from sha256(seed, SAE key, latent, purpose)."""
    digest = hashlib.sha256(f"{seed}|{sae_key}|{int(latent)}|{purpose}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def purpose_rng(seed: int, sae_key: str, latent: int, purpose: str) -> np.random.Generator:
    """The generator of one (latent, purpose): independent of every other latent."""
    return np.random.default_rng(purpose_seed(seed, sae_key, latent, purpose))


def sampling_params(spec: InterpretSpec) -> dict[str, Any]:
    """The subset of the interpret section that shapes example sets (it enters every set id)."""
    return spec.model_dump(mode="json", include=set(SAMPLING_FIELDS))


# --------------------------------------------------------------------------- the pool


@dataclass
class Pool:
    """The interpretation pool: code-matrix rows of held-out slices and what sampling needs of them."""

    rows: np.ndarray  # row of each pool slice in the code matrix
    slice_ids: np.ndarray  # its slice id
    scan: np.ndarray  # int scan code (modality + image_id)
    plane: np.ndarray  # int plane code
    idx: np.ndarray  # slice index along its axis
    region: np.ndarray  # int body-region code (-1 = unknown)
    explain: np.ndarray  # bool: scan in the explain partition E
    presence: sp.csr_matrix  # bool [n_pool, n_structures]
    scan_names: np.ndarray  # str per scan code
    splits: list[str]  # splits the pool was drawn from
    widened: bool = False
    e_rows: np.ndarray = field(init=False)  # pool positions in E
    s_rows: np.ndarray = field(init=False)  # pool positions in S
    n_scans_explain: int = field(init=False)
    n_scans_score: int = field(init=False)

    def __post_init__(self) -> None:
        self.e_rows = np.flatnonzero(self.explain)
        self.s_rows = np.flatnonzero(~self.explain)
        self.n_scans_explain = int(len(np.unique(self.scan[self.e_rows])))
        self.n_scans_score = int(len(np.unique(self.scan[self.s_rows])))

    @property
    def n(self) -> int:
        return len(self.rows)


def scan_keys(slices: pd.DataFrame) -> np.ndarray:
    """``modality/image_id`` per slice: the unit of partitioning (one patient per scan)."""
    return (slices["modality"].astype(str) + "/" + slices["image_id"].astype(str)).to_numpy()


def partition_scans(names: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Bool per scan name: True = explain partition. Ranked by sha256(salt, name); both sides non-empty."""
    names = np.asarray(names, dtype=str)
    if len(names) < 2:
        raise MedsaeError(f"interpretation pool has {len(names)} scan(s); need at least 2 to split explain/score")
    digests = np.array(
        [int.from_bytes(hashlib.sha256(f"medsae-partition|{seed}|{n}".encode()).digest()[:8], "big") for n in names],
        dtype=np.uint64,
    )
    order = np.argsort(digests, kind="stable")
    n_explain = int(np.clip(round(fraction * len(names)), 1, len(names) - 1))
    explain = np.zeros(len(names), dtype=bool)
    explain[order[:n_explain]] = True
    return explain


def choose_pool_splits(split_per_scan: pd.Series, wanted: list[str], min_scans: int) -> tuple[list[str], bool]:
    """``wanted`` splits, widened to +test, then every split, until at least ``min_scans`` scans."""
    available = sorted(set(split_per_scan.dropna().astype(str)))
    candidates = [list(wanted), sorted(set(wanted) | {"test"}), available]
    for i, splits in enumerate(candidates):
        if int(split_per_scan.isin(splits).sum()) >= min_scans:
            return splits, i > 0
    return available, True


def build_pool(
    slices: pd.DataFrame,
    code_slice_ids: np.ndarray,
    presence: sp.csr_matrix,
    spec: InterpretSpec,
) -> Pool:
    """Pool rows of the code matrix, partitioned into E and S by scan.

    ``slices`` is the slices table (``slice_id`` column), ``code_slice_ids`` the slice id of each
    code-matrix row, ``presence`` the slices x structures presence matrix indexed by slice_id.
    """
    meta = slices.set_index("slice_id", drop=False)
    code_slice_ids = np.asarray(code_slice_ids, dtype=np.int64)
    missing = ~np.isin(code_slice_ids, meta.index.to_numpy())
    if missing.any():
        raise MedsaeError(f"codes name {int(missing.sum())} slice id(s) absent from the slices table")
    rows_meta = meta.loc[code_slice_ids]
    keys = scan_keys(rows_meta)
    split = rows_meta["split"].astype(str).to_numpy()
    per_scan = pd.Series(split, index=keys).groupby(level=0).first()
    splits, widened = choose_pool_splits(per_scan, list(spec.pool_splits), int(spec.min_pool_scans))
    in_pool = np.isin(split, splits)
    rows = np.flatnonzero(in_pool)
    if len(rows) == 0:
        raise MedsaeError("interpretation pool is empty: no slice in any split")
    scan_names, scan = np.unique(keys[rows], return_inverse=True)
    explain_scan = partition_scans(scan_names, float(spec.explain_fraction), int(spec.seed))
    _, plane = np.unique(rows_meta["plane"].astype(str).to_numpy()[rows], return_inverse=True)
    region_raw = rows_meta["body_region"].to_numpy(dtype=object)[rows] if "body_region" in rows_meta else None
    if region_raw is None:
        region = np.full(len(rows), -1)
    else:
        filled = np.array(["" if r is None or r != r else str(r) for r in region_raw])
        cats, region = np.unique(filled, return_inverse=True)
        region = np.where(filled == "", -1, region)
    return Pool(
        rows=rows,
        slice_ids=code_slice_ids[rows],
        scan=scan.astype(np.int64),
        plane=plane.astype(np.int64),
        idx=rows_meta["idx"].to_numpy(dtype=np.int64)[rows],
        region=np.asarray(region, dtype=np.int64),
        explain=explain_scan[scan],
        presence=sp.csr_matrix(presence[code_slice_ids[rows]], dtype=bool),
        scan_names=scan_names,
        splits=splits,
        widened=widened,
    )


# --------------------------------------------------------------------------- one latent's sets


@dataclass
class ExampleSet:
    """One realised example set (a row of registry table ``example_sets``)."""

    latent: int
    purpose: str
    slice_ids: np.ndarray
    activations: np.ndarray
    roles: list[str]
    set_id: str = ""

    def row(self) -> dict[str, Any]:
        return {
            "set_id": self.set_id,
            "latent": int(self.latent),
            "purpose": self.purpose,
            "slice_ids": [int(s) for s in self.slice_ids],
            "activations": [float(a) for a in self.activations],
            "roles": list(self.roles),
        }


class _Picker:
    """Greedy selection under the near-duplicate rules, shared by the parts of one set."""

    def __init__(self, pool: Pool, cap: int, gap: int):
        self.pool, self.cap, self.gap = pool, cap, gap
        self.per_scan: dict[int, int] = {}
        self.taken: dict[tuple[int, int], list[int]] = {}
        self.chosen: list[int] = []
        self.chosen_set: set[int] = set()

    def ok(self, r: int) -> bool:
        p = self.pool
        s = int(p.scan[r])
        if r in self.chosen_set or self.per_scan.get(s, 0) >= self.cap:
            return False
        near = self.taken.get((s, int(p.plane[r])), ())
        return all(abs(int(p.idx[r]) - i) >= self.gap for i in near)

    def add(self, r: int) -> None:
        p = self.pool
        s = int(p.scan[r])
        self.per_scan[s] = self.per_scan.get(s, 0) + 1
        self.taken.setdefault((s, int(p.plane[r])), []).append(int(p.idx[r]))
        self.chosen.append(int(r))
        self.chosen_set.add(int(r))

    def take(self, candidates: np.ndarray, k: int) -> list[int]:
        """Accept up to ``k`` of ``candidates`` in order."""
        out: list[int] = []
        candidates = np.asarray(candidates, dtype=np.int64)
        for start in range(0, len(candidates) if k > 0 else 0, CHUNK):
            for r in _prefilter(self.pool, candidates[start : start + CHUNK], self.cap):
                if self.ok(int(r)):
                    self.add(int(r))
                    out.append(int(r))
                    if len(out) == k:
                        return out
        return out


def _prefilter(pool: Pool, candidates: np.ndarray, cap: int, factor: int = 8) -> np.ndarray:
    """Drop candidates ranked beyond ``factor * cap`` within their scan (they can never be taken)."""
    candidates = np.asarray(candidates, dtype=np.int64)
    if len(candidates) <= factor * cap:
        return candidates
    scans = pool.scan[candidates]
    order = np.argsort(scans, kind="stable")
    sorted_scans = scans[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_scans)) + 1]
    rank_sorted = np.arange(len(order)) - np.repeat(starts, np.diff(np.r_[starts, len(order)]))
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = rank_sorted
    return candidates[rank < factor * cap]


def volume_cap(configured: int, set_size: int, n_scans: int) -> int:
    """Per-volume cap: the configured one, raised to ceil(set size / scans) when a partition has too
    few scans to fill the set otherwise (tiny pools such as the phantom demo)."""
    return max(int(configured), -(-int(set_size) // max(int(n_scans), 1)))


def _deciles(fire_rows: np.ndarray, fire_acts: np.ndarray) -> list[np.ndarray]:
    """Equal-count activation deciles of the firing rows (lowest first)."""
    order = np.argsort(fire_acts, kind="stable")
    return [fire_rows[chunk] for chunk in np.array_split(order, N_DECILES)]


def _uniform(rng: np.random.Generator, rows: np.ndarray, k: int, exclude: np.ndarray | None = None) -> np.ndarray:
    """About ``3k`` distinct rows drawn uniformly (in draw order), minus ``exclude``."""
    if len(rows) == 0 or k <= 0:
        return np.empty(0, dtype=np.int64)
    if len(rows) <= 20 * k:
        draw = rows[rng.permutation(len(rows))]
    else:
        picks = rng.integers(0, len(rows), size=6 * k)
        _, first = np.unique(picks, return_index=True)
        draw = rows[picks[np.sort(first)]]
    if exclude is not None and len(exclude):
        draw = draw[~np.isin(draw, exclude)]
    return draw


def _matched(
    pool: Pool,
    rng: np.random.Generator,
    targets: list[int],
    candidates: np.ndarray,
    k: int,
    picker: _Picker,
) -> list[int]:
    """Up to ``k`` candidates matched to ``targets`` on body region (+1) and structure Jaccard."""
    if k <= 0 or not targets or len(candidates) == 0:
        return []
    candidates = candidates[:MATCH_CANDIDATES]
    t = np.asarray(targets, dtype=np.int64)[:k]  # target i gets contrast i (cycling when k > targets)
    pt = pool.presence[t].astype(np.float32)
    pc = pool.presence[candidates].astype(np.float32)
    inter = np.asarray((pt @ pc.T).todense())
    size_t = np.asarray(pt.sum(axis=1)).ravel()[:, None]
    size_c = np.asarray(pc.sum(axis=1)).ravel()[None, :]
    union = size_t + size_c - inter
    jaccard = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    same_region = (pool.region[t][:, None] == pool.region[candidates][None, :]) & (pool.region[t][:, None] >= 0)
    score = same_region + jaccard + 1e-6 * rng.random(jaccard.shape)
    out: list[int] = []
    for i in range(k):
        for j in _best_first(score[i % len(t)]):
            r = int(candidates[j])
            if picker.ok(r):
                picker.add(r)
                out.append(r)
                break
        if len(out) < i + 1:  # nothing acceptable left
            break
    return out


def _best_first(row: np.ndarray, head: int = 32) -> Iterator[int]:
    """Indices of ``row`` by decreasing value; only the best ``head`` are sorted unless more are needed."""
    if len(row) <= head:
        yield from np.argsort(-row, kind="stable").tolist()
        return
    top = np.argpartition(-row, head)[:head]
    yield from top[np.argsort(-row[top], kind="stable")].tolist()
    rest = np.setdiff1d(np.arange(len(row)), top, assume_unique=True)
    yield from rest[np.argsort(-row[rest], kind="stable")].tolist()


def sample_latent(
    latent: int,
    fire_rows: np.ndarray,
    fire_acts: np.ndarray,
    pool: Pool,
    spec: InterpretSpec,
    sae_key: str,
) -> list[ExampleSet]:
    """The explain / simulate / detect sets of one latent (``fire_*``: pool positions and values > 0).

    Returns no set when the latent fires in only one partition (nothing to explain or to score).
    """
    fire_rows = np.asarray(fire_rows, dtype=np.int64)
    fire_acts = np.asarray(fire_acts, dtype=np.float64)
    keep = fire_acts > 0
    fire_rows, fire_acts = fire_rows[keep], fire_acts[keep]
    in_e = pool.explain[fire_rows]
    if not in_e.any() or in_e.all():
        return []
    seed = int(spec.seed)
    act_of = dict(zip(fire_rows.tolist(), fire_acts.tolist(), strict=True))
    fire_sorted = np.sort(fire_rows)
    sets: list[ExampleSet] = []

    # explain set (partition E)
    rng = purpose_rng(seed, sae_key, latent, EXPLAIN)
    e_rows, e_acts = fire_rows[in_e], fire_acts[in_e]
    explain_size = int(spec.explain_top) + N_DECILES * int(spec.explain_per_decile)
    explain_size += int(spec.explain_negatives)
    cap = volume_cap(int(spec.max_per_volume), explain_size, pool.n_scans_explain)
    picker = _Picker(pool, cap, int(spec.min_slice_gap))
    roles: list[str] = []
    by_strength = e_rows[np.argsort(-e_acts, kind="stable")]
    top = picker.take(by_strength, int(spec.explain_top))
    roles += ["top"] * len(top)
    for d, chunk in enumerate(_deciles(e_rows, e_acts), start=1):
        got = picker.take(chunk[rng.permutation(len(chunk))], int(spec.explain_per_decile))
        roles += [f"decile_{d}"] * len(got)
    n_neg = int(spec.explain_negatives)
    n_matched = int(round(n_neg * float(spec.matched_fraction)))
    negatives = _uniform(rng, pool.e_rows, max(n_neg, MATCH_CANDIDATES // 6), exclude=fire_sorted)
    got = _matched(pool, rng, top, negatives, n_matched, picker)
    roles += ["contrast_matched"] * len(got)
    got = picker.take(negatives, n_neg - len(got))
    roles += ["contrast_random"] * len(got)
    sets.append(_realise(latent, EXPLAIN, picker.chosen, roles, act_of, pool, spec, sae_key))

    # simulation set (partition S): firing across deciles + uniform, 1:1
    rng = purpose_rng(seed, sae_key, latent, SIMULATE)
    s_rows, s_acts = fire_rows[~in_e], fire_acts[~in_e]
    sim_size = N_DECILES * int(spec.simulate_per_decile) + int(spec.simulate_random)
    cap_score = volume_cap(int(spec.max_per_volume_score), sim_size, pool.n_scans_score)
    picker = _Picker(pool, cap_score, int(spec.min_slice_gap))
    roles = []
    for d, chunk in enumerate(_deciles(s_rows, s_acts), start=1):
        got = picker.take(chunk[rng.permutation(len(chunk))], int(spec.simulate_per_decile))
        roles += [f"decile_{d}"] * len(got)
    got = picker.take(_uniform(rng, pool.s_rows, int(spec.simulate_random)), int(spec.simulate_random))
    roles += ["random"] * len(got)
    sets.append(_realise(latent, SIMULATE, picker.chosen, roles, act_of, pool, spec, sae_key))

    # detection set (partition S): balanced firing / non-firing
    if spec.detect:
        rng = purpose_rng(seed, sae_key, latent, DETECT)
        det_size = N_DECILES * int(spec.detect_per_decile) + int(spec.detect_negatives)
        cap_det = volume_cap(int(spec.max_per_volume_score), det_size, pool.n_scans_score)
        picker = _Picker(pool, cap_det, int(spec.min_slice_gap))
        roles = []
        firing: list[int] = []
        for d, chunk in enumerate(_deciles(s_rows, s_acts), start=1):
            got = picker.take(chunk[rng.permutation(len(chunk))], int(spec.detect_per_decile))
            firing += got
            roles += [f"decile_{d}"] * len(got)
        n_neg = min(int(spec.detect_negatives), max(2, len(firing)))
        negatives = _uniform(rng, pool.s_rows, max(n_neg, MATCH_CANDIDATES // 6), exclude=fire_sorted)
        got = picker.take(negatives, n_neg - n_neg // 2)
        roles += ["negative_random"] * len(got)
        got = _matched(pool, rng, firing, negatives, n_neg - len(got), picker)
        roles += ["negative_matched"] * len(got)
        sets.append(_realise(latent, DETECT, picker.chosen, roles, act_of, pool, spec, sae_key))
    return sets


def _realise(
    latent: int,
    purpose: str,
    chosen: list[int],
    roles: list[str],
    act_of: dict[int, float],
    pool: Pool,
    spec: InterpretSpec,
    sae_key: str,
) -> ExampleSet:
    rows = np.asarray(chosen, dtype=np.int64)
    ids = pool.slice_ids[rows] if len(rows) else np.empty(0, dtype=np.int64)
    acts = np.array([act_of.get(int(r), 0.0) for r in rows], dtype=np.float64)
    ident = {
        "latent": int(latent),
        "purpose": purpose,
        "sae_key": sae_key,
        "params": sampling_params(spec),
        "slice_ids": [int(s) for s in ids],
    }
    return ExampleSet(latent, purpose, ids, acts, roles, set_id=sha256_json(ident))


def sample_all(
    codes_pool: sp.csc_matrix,
    pool: Pool,
    latents: np.ndarray,
    spec: InterpretSpec,
    sae_key: str,
    progress: Any = None,
) -> list[ExampleSet]:
    """Example sets of every latent in ``latents`` (``codes_pool``: pool rows x latents, CSC)."""
    codes_pool = sp.csc_matrix(codes_pool)
    out: list[ExampleSet] = []
    it = latents if progress is None else progress(latents, len(latents), "example sets")
    for latent in it:
        lo, hi = codes_pool.indptr[latent], codes_pool.indptr[latent + 1]
        out.extend(sample_latent(int(latent), codes_pool.indices[lo:hi], codes_pool.data[lo:hi], pool, spec, sae_key))
    return out
