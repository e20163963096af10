"""Train / val / test assignment of scans (docs/method.md#splits), stored once per dataset and reused.

* test = every scan from a held-out institute (A, D, E by default);
* the other scans with known sex and age: 80/20 train/val, stratified by
  ``modality-sex-age_bin``; the val count is ``n - floor((1 - val_fraction) * n)`` as in
  scikit-learn's ``StratifiedShuffleSplit(train_size=0.8)``, distributed over strata by largest
  remainder (ties broken by the seeded generator), so tiny strata never make it fail;
* scans with missing sex or age: shuffled with the seed, the first ``int((1 - val_fraction) * n)``
  go to train.

Scans of one patient stay together: when the scans carry a ``subject`` (DICOM series and manifest
rows do, as pseudonyms), each subject is split once, by its first scan in (modality, image_id)
order, and every scan of it follows; a subject with a scan from a held-out institute is test. Without
subjects (TotalSegmentator: one scan per patient) every scan is its own subject.

The table ``(modality, image_id, split)`` is computed over every scan of the dataset (every
modality, whatever an experiment reads) and stored in ``<root>/.medsae/splits/<hash>.parquet``
(``hash`` over the split parameters), falling back to ``~/.cache/medsae/splits/`` when the data
folder is read-only. Later runs reuse the stored assignment; scans added to the dataset later are
assigned among themselves and appended, so earlier assignments never move.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd

SPLIT_ALGORITHM = 1
AGE_BINS = ("<40", "40-60", "60-80", ">=80")


def age_bin(age: pd.Series) -> pd.Series:
    """Study age bins, right-closed: [0, 40] -> '<40', (40, 60], (60, 80], > 80 -> '>=80'."""
    values = pd.to_numeric(age, errors="coerce")
    return pd.cut(values, [0, 40, 60, 80, math.inf], labels=list(AGE_BINS), include_lowest=True).astype(object)


def normalise_sex(value: object) -> str | None:
    """'m' / 'f' / None from the meta.csv gender column."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    text = str(value).strip().lower()
    if text in ("m", "male", "man"):
        return "m"
    if text in ("f", "female", "w", "woman"):
        return "f"
    return None


def _subjects(scans: pd.DataFrame) -> pd.Series | None:
    """Each scan's subject (its own key when it has none), or None when no scan names one."""
    if "subject" not in scans.columns or not scans["subject"].notna().any():
        return None
    own = "\x00" + scans["modality"].astype(str) + "/" + scans["image_id"].astype(str)
    return scans["subject"].astype(object).where(scans["subject"].notna(), own)


def assign_splits(
    scans: pd.DataFrame, test_institutes: list[str], val_fraction: float = 0.2, seed: int = 42
) -> pd.DataFrame:
    """Split scans; ``scans`` has columns modality, image_id, institute, sex, age (and optionally subject).

    Returns ``(modality, image_id, split)`` in the input's (modality, image_id) order.
    """
    subjects = _subjects(scans)
    if subjects is not None:
        return _assign_by_subject(scans.assign(subject=subjects), test_institutes, val_fraction, seed)
    frame = scans[["modality", "image_id", "institute", "sex", "age"]].copy()
    frame = frame.sort_values(["modality", "image_id"], kind="stable").reset_index(drop=True)
    held = {str(i).strip().upper() for i in test_institutes}
    institute = frame["institute"].astype(object).where(frame["institute"].notna(), "")
    is_test = institute.map(lambda v: str(v).strip().upper() in held).to_numpy(bool)
    split = np.where(is_test, "test", "").astype(object)
    rng = np.random.default_rng(seed)
    sex = frame["sex"].map(normalise_sex)
    bins = age_bin(frame["age"])
    complete = ~is_test & sex.notna().to_numpy() & bins.notna().to_numpy()
    idx = np.nonzero(complete)[0]
    if len(idx):
        strata = (frame["modality"].astype(str) + "-" + sex.astype(str) + "-" + bins.astype(str)).to_numpy()
        n = len(idx)
        n_val = n - math.floor((1.0 - val_fraction) * n)
        names, inverse = np.unique(strata[idx], return_inverse=True)
        sizes = np.bincount(inverse, minlength=len(names))
        expected = sizes * n_val / n
        quota = np.floor(expected).astype(int)
        left = n_val - int(quota.sum())
        if left > 0:
            tiebreak = rng.random(len(names))
            order = np.lexsort((tiebreak, -(expected - quota)))
            quota[order[:left]] += 1
        for s in range(len(names)):
            members = idx[inverse == s]
            members = members[rng.permutation(len(members))]
            split[members[: quota[s]]] = "val"
            split[members[quota[s] :]] = "train"
    rest = np.nonzero(~is_test & ~complete)[0]
    if len(rest):
        rest = rest[rng.permutation(len(rest))]
        n_train = int((1.0 - val_fraction) * len(rest))
        split[rest[:n_train]] = "train"
        split[rest[n_train:]] = "val"
    return pd.DataFrame({"modality": frame["modality"], "image_id": frame["image_id"], "split": split})


def _assign_by_subject(scans: pd.DataFrame, test_institutes: list[str], val_fraction: float, seed: int) -> pd.DataFrame:
    """Split each subject once (its first scan decides, a held-out institute anywhere makes it test)."""
    frame = scans.sort_values(["modality", "image_id"], kind="stable").reset_index(drop=True)
    first = frame.drop_duplicates("subject", keep="first")
    split_of = dict(zip(first["subject"], assign_splits(first.drop(columns="subject"), test_institutes,
                                                         val_fraction, seed)["split"], strict=True))  # fmt: skip
    held = {str(i).strip().upper() for i in test_institutes}
    tested = frame.loc[frame["institute"].map(lambda v: isinstance(v, str) and v.strip().upper() in held), "subject"]
    split = frame["subject"].map(split_of).where(~frame["subject"].isin(set(tested)), "test")
    return pd.DataFrame({"modality": frame["modality"], "image_id": frame["image_id"], "split": split})


def split_params_hash(test_institutes: list[str], val_fraction: float, seed: int) -> str:
    """Short digest of the split parameters (names the stored split file)."""
    payload = {
        "algorithm": SPLIT_ALGORITHM,
        "test_institutes": sorted(str(i).strip().upper() for i in test_institutes),
        "val_fraction": round(float(val_fraction), 9),
        "seed": int(seed),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def default_split_path(root: Path, test_institutes: list[str], val_fraction: float, seed: int) -> Path:
    """Where the split table of a dataset lives (next to the data when writable)."""
    name = f"{split_params_hash(test_institutes, val_fraction, seed)}.parquet"
    local = root / ".medsae" / "splits"
    if os.access(root, os.W_OK) or os.access(local, os.W_OK):
        return local / name
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "medsae" / "splits"
    digest = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16]
    return cache / digest / name


def load_or_create_splits(
    path: Path, scans: pd.DataFrame, test_institutes: list[str], val_fraction: float, seed: int
) -> pd.DataFrame:
    """The stored assignment for ``scans`` (modality, image_id, institute, sex, age[, subject]); new scans added.

    A new scan of a subject already split joins its subject. A scan from a held-out institute is
    always test (with every scan of its subject), even if an older table says otherwise.
    """
    stored = (
        pd.read_parquet(path)
        if path.is_file()
        else pd.DataFrame({c: pd.Series(dtype="str") for c in ("modality", "image_id", "split")})
    )  # typed empty columns: a first run writes the same column types as a run that reads the table back
    key = ["modality", "image_id"]
    subjects = _subjects(scans)
    if subjects is not None:
        scans = scans.assign(subject=subjects)
    new = scans.merge(stored[key], on=key, how="left", indicator=True)
    new = new[new["_merge"] == "left_only"].drop(columns="_merge")
    if len(new):
        added = _split_new(new, stored, test_institutes, val_fraction, seed)
        stored = pd.concat([stored, added], ignore_index=True).sort_values(key, kind="stable")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        stored.reset_index(drop=True).to_parquet(tmp, index=False)
        os.replace(tmp, path)
    out = scans[key + ["institute"]].merge(stored[key + ["split"]], on=key, how="left")
    held = {str(i).strip().upper() for i in test_institutes}
    forced = out["institute"].map(lambda v: isinstance(v, str) and v.strip().upper() in held)
    if subjects is not None:
        forced = subjects.isin(set(subjects[forced.to_numpy()])).to_numpy()
    out.loc[forced, "split"] = "test"
    return out[key + ["split"]]


def _split_new(
    new: pd.DataFrame, stored: pd.DataFrame, test_institutes: list[str], val_fraction: float, seed: int
) -> pd.DataFrame:
    """Rows to append to the stored table for scans it lacks (subject column kept when there is one)."""
    if "subject" not in new.columns:
        return assign_splits(new, test_institutes, val_fraction, seed)
    known = {}
    if "subject" in stored.columns:
        known = dict(zip(stored["subject"], stored["split"], strict=True))
    joins = new[new["subject"].isin(set(known))]
    fresh = new[~new["subject"].isin(set(known))]
    parts = [joins[["modality", "image_id", "subject"]].assign(split=joins["subject"].map(known))]
    if len(fresh):
        assigned = assign_splits(fresh, test_institutes, val_fraction, seed)
        parts.append(assigned.merge(fresh[["modality", "image_id", "subject"]], on=["modality", "image_id"]))
    return pd.concat(parts, ignore_index=True)[["modality", "image_id", "split", "subject"]]
