"""A synthetic dataset in the exact TotalSegmentator v2 layout, with known ground truth.

``write_phantom(out_dir)`` writes ``CT_Dataset_v201/`` and ``MRI_Dataset_v200/`` with ';'-separated
``meta.csv`` files (the real column names), ``sNNNN/ct.nii.gz`` / ``sNNNN/mri.nii.gz`` and one
``sNNNN/segmentations/<structure>.nii.gz`` per structure (every structure of the modality, empty
masks included, as in the real data).

Anatomy is a set of ellipsoids in world (RAS, mm) coordinates placed along the body axis: head
(skull, brain), neck (thyroid, trachea), thorax (lungs, heart, aorta, thoracic vertebrae), abdomen
(liver, spleen, stomach, pancreas, gallbladder, kidneys, lumbar vertebrae), pelvis (sacrum, hips,
bladder, prostate in males) and thighs (femurs). Labels are painted into one label map so masks
never overlap and each structure has its own intensity: CT in Hounsfield units (int16), MRI a
T1-like contrast with a bias field (float32). Each subject covers part of the body (the range of
its study type), has its own voxel spacing, institute, sex and age, and is stored either RAS or
LPS (one MRI with permuted axes), so readers must use the affine.

Voxel sizes are given for the nominal 64 x 64 x 80 grid and scale with ``shape``, so a smaller
grid is a coarser image of the same fields of view. The generator is idempotent:
``medsae_phantom.json`` in ``out_dir`` records the parameters; a call with the same parameters
returns at once, other parameters regenerate the dataset.

Safe under concurrent calls: generation runs under the file lock ``out_dir/.phantom.lock`` into a
folder private to the process, which is renamed into place only when complete; a second process
waits for the lock, then finds the marker complete and reuses the dataset.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, ornt_transform

from medsae.errors import MedsaeError

PHANTOM_VERSION = 1
MARKER = "medsae_phantom.json"
LOCK = ".phantom.lock"
TMP_PREFIX = ".phantom-tmp-"
CT_DIR, MRI_DIR = "CT_Dataset_v201", "MRI_Dataset_v200"
CT_COLUMNS = [
    "image_id", "age", "gender", "institute", "study_type", "split", "manufacturer",
    "scanner_model", "kvp", "pathology", "pathology_location",
]  # fmt: skip
MRI_COLUMNS = [
    "image_id", "age", "gender", "institute", "study_type", "split", "manufacturer",
    "scanner_model", "magnetic_field_strength", "scanning_sequence", "echo_time",
    "repetition_time", "slice_thickness", "source",
]  # fmt: skip

#: institutes cycled over subjects; A, D and E (the study's test institutes) appear in any 6
INSTITUTES = ["B", "A", "C", "D", "B", "E", "C", "F", "B", "C", "A", "F"]


@dataclass(frozen=True)
class Organ:
    """One labelled ellipsoid: centre and radii in mm (RAS), CT value (HU), MRI value."""

    name: str
    centre: tuple[float, float, float]
    radii: tuple[float, float, float]
    ct: float
    mri: float
    modality: str = "both"  # 'ct', 'mri' or 'both'
    z_range: tuple[float, float] | None = None  # keep only this z slab (lung lobes)
    sex: str | None = None  # 'm' -> male subjects only


def _vertebrae() -> list[Organ]:
    out = []
    levels = [f"L{i}" for i in range(5, 0, -1)] + [f"T{i}" for i in range(12, 0, -1)]
    for n, level in enumerate(levels):
        z = 155.0 + 35.0 * n
        hu = 520.0 if level.startswith("L") else 450.0
        out.append(Organ(f"vertebrae_{level}", (0, -45, z), (22, 18, 15), hu, 650, "ct"))
        out.append(Organ("vertebrae", (0, -45, z), (22, 18, 15), hu, 650, "mri"))
    return out


#: painting order: later organs overwrite earlier ones where ellipsoids overlap
ORGANS: list[Organ] = [
    Organ("skull", (0, 0, 915), (80, 95, 88), 1000, 60, "ct"),
    Organ("brain", (0, 0, 918), (66, 81, 72), 30, 450),
    Organ("thyroid_gland", (0, 35, 770), (25, 12, 20), 100, 300, "ct"),
    Organ("trachea", (0, 25, 700), (10, 10, 80), -950, 20, "ct"),
    Organ("lung_upper_lobe_left", (-80, 0, 600), (55, 75, 120), -880, 40, "ct", (600, 1e9)),
    Organ("lung_lower_lobe_left", (-80, 0, 600), (55, 75, 120), -820, 40, "ct", (-1e9, 600)),
    Organ("lung_upper_lobe_right", (80, 0, 600), (55, 75, 120), -900, 40, "ct", (640, 1e9)),
    Organ("lung_middle_lobe_right", (80, 0, 600), (55, 75, 120), -850, 40, "ct", (580, 640)),
    Organ("lung_lower_lobe_right", (80, 0, 600), (55, 75, 120), -800, 40, "ct", (-1e9, 580)),
    Organ("lung_left", (-80, 0, 600), (55, 75, 120), -850, 40, "mri"),
    Organ("lung_right", (80, 0, 600), (55, 75, 120), -850, 40, "mri"),
    Organ("heart", (-15, 25, 530), (55, 50, 55), 130, 200),
    Organ("liver", (65, 10, 420), (80, 70, 75), 60, 520),
    Organ("gallbladder", (55, 50, 370), (15, 15, 25), 0, 150),
    Organ("spleen", (-80, -25, 410), (35, 35, 45), 110, 380),
    Organ("stomach", (-45, 35, 430), (40, 30, 40), -40, 250),
    Organ("pancreas", (0, 10, 330), (55, 15, 15), 150, 600),
    Organ("kidney_left", (-65, -35, 270), (28, 25, 50), 200, 420),
    Organ("kidney_right", (65, -35, 255), (28, 25, 50), 200, 420),
    Organ("aorta", (-30, -25, 420), (12, 12, 250), 280, 120),
    *_vertebrae(),
    Organ("sacrum", (0, -60, 80), (35, 25, 50), 600, 700),
    Organ("hip_left", (-95, -10, 40), (45, 60, 70), 650, 680),
    Organ("hip_right", (95, -10, 40), (45, 60, 70), 650, 680),
    Organ("urinary_bladder", (0, 50, 30), (40, 35, 35), 15, 90),
    Organ("prostate", (0, 40, -20), (18, 15, 15), 45, 330, sex="m"),
    Organ("femur_left", (-90, 0, -150), (25, 25, 150), 750, 720),
    Organ("femur_right", (90, 0, -150), (25, 25, 150), 750, 720),
]

#: (study type, centre z (mm), iso spacing or (in-plane, through-plane), pathology_location)
CT_STUDIES = [
    ("ct head", 915.0, 3.0, "head"),
    ("ct thorax", 600.0, 5.5, "thorax"),
    ("ct abdomen", 360.0, 5.0, "abdomen"),
    ("ct pelvis", 60.0, 5.0, "pelvis"),
    ("CT Thorax-Abdomen", 470.0, 6.0, "thorax,abdomen"),
    ("ct abdomen-pelvis", 220.0, (6.0, 6.5), "abdomen"),
    ("ct  thorax-abdomen-pelvis ", 340.0, (6.0, 9.0), "thorax,abdomen"),
    ("ct lumbar spine", 260.0, 4.5, "bones"),  # not in the window table: default window
]
#: (study type, centre z, thin axis (RAS), spacing (x, y, z), grid as fractions of the CT shape, storage)
MRI_STUDIES = [
    ("mri abdomen", 380.0, 2, (6.0, 7.0, 12.0), (1.0, 0.86, 0.3), "LPS"),  # anisotropic in-plane
    ("mri thorax", 520.0, 1, (6.0, 12.0, 6.0), (1.0, 0.25, 1.0), "RAS"),  # coronal
    ("mri pelvis", 50.0, 2, (6.0, 6.0, 10.0), (1.0, 1.0, 0.3), "RAS"),
    ("mri spine", 300.0, 0, (10.0, 5.0, 6.0), (0.25, 0.75, 1.0), "PIR"),  # sagittal, permuted axes
    ("mri head", 915.0, 2, (3.5, 3.5, 8.0), (1.0, 1.0, 0.3), "LPS"),
]
PATHOLOGIES = ["no_pathology", "tumor", "inflammation", "trauma", "vascular", "bleeding", "other", "unclear"]
CT_SCANNERS = [("siemens", "SOMATOM Definition AS"), ("ge", "Revolution CT"), ("philips", "iCT 256")]
MRI_SCANNERS = [("siemens", "MAGNETOM Skyra"), ("philips", "Ingenia"), ("ge", "SIGNA Artist")]


def structures_for(modality: str) -> list[str]:
    """Sorted mask names the phantom writes for a modality."""
    return sorted({o.name for o in ORGANS if o.modality in (modality, "both")})


@dataclass(frozen=True)
class _Recipe:
    """What a phantom is generated from; recorded in the marker file to tell a reusable dataset."""

    subjects: int
    seed: int
    mri_fraction: float
    shape: tuple[int, int, int]

    @classmethod
    def of(cls, subjects: int, seed: int, mri_fraction: float, shape: tuple[int, int, int]) -> _Recipe:
        return cls(int(subjects), int(seed), float(mri_fraction), (int(shape[0]), int(shape[1]), int(shape[2])))

    def marker(self) -> dict:
        """The ``params`` entry of the marker file."""
        return {"subjects": self.subjects, "seed": self.seed, "mri_fraction": self.mri_fraction,
                "shape": list(self.shape), "version": PHANTOM_VERSION}  # fmt: skip


def write_phantom(
    out_dir: str | Path,
    subjects: int = 12,
    seed: int = 0,
    mri_fraction: float = 0.34,
    shape: tuple[int, int, int] = (64, 64, 80),
) -> Path:
    """Write (or reuse) a phantom TotalSegmentator dataset in ``out_dir``; returns ``out_dir``."""
    out = Path(out_dir)
    if subjects < 1:
        raise MedsaeError(f"{out}: a phantom needs at least one subject (got {subjects})")
    if len(shape) != 3 or min(shape) < 8:
        raise MedsaeError(f"{out}: phantom shape must be three sizes >= 8 (got {tuple(shape)})")
    recipe = _Recipe.of(subjects, seed, mri_fraction, tuple(shape))
    if _is_complete(out, recipe):
        return out
    from medsae.stage import check_writable_folder, exclusive

    check_writable_folder(out, "the phantom data folder")
    out.mkdir(parents=True, exist_ok=True)
    with exclusive(out / LOCK, f"phantom dataset {out}", on_wait=lambda: _say_waiting(out)):
        if _is_complete(out, recipe):  # written by the process we waited for
            return out
        _write_locked(out, recipe)
    return out


def phantom_is_complete(
    out_dir: str | Path,
    subjects: int = 12,
    seed: int = 0,
    mri_fraction: float = 0.34,
    shape: tuple[int, int, int] = (64, 64, 80),
) -> bool:
    """Whether ``out_dir`` holds a complete phantom written with these parameters."""
    return _is_complete(Path(out_dir), _Recipe.of(subjects, seed, mri_fraction, tuple(shape)))


def _is_complete(out: Path, recipe: _Recipe) -> bool:
    existing = _read_marker(out / MARKER)
    return existing is not None and existing.get("params") == recipe.marker() and bool(existing.get("complete"))


def _say_waiting(out: Path) -> None:
    if os.environ.get("MEDSAE_QUIET", "") in ("", "0"):
        print(f"waiting for another medsae process writing the phantom at {out}", file=sys.stderr)


def _write_locked(out: Path, recipe: _Recipe) -> None:
    """Generate into a private folder, then swap it in (the caller holds the lock)."""
    marker = out / MARKER
    existing = _read_marker(marker)
    owned = [out / CT_DIR, out / MRI_DIR, out / ".medsae"]
    if existing is None and any(p.exists() for p in owned[:2]):
        raise MedsaeError(f"{out}: holds a dataset not written by `medsae data phantom`; refusing to overwrite it")
    for stale in out.glob(f"{TMP_PREFIX}*"):  # left by a killed run: nobody else holds the lock
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=out))
    try:
        _generate(tmp, recipe)
        _write_marker(marker, recipe, complete=False)
        for p in owned:
            shutil.rmtree(p, ignore_errors=True)
        for name in (CT_DIR, MRI_DIR):
            if (tmp / name).exists():
                (tmp / name).rename(out / name)
        _write_marker(marker, recipe, complete=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _read_marker(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_marker(path: Path, recipe: _Recipe, complete: bool) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"generator": "medsae.data.phantom", "params": recipe.marker(), "complete": complete}))
    tmp.replace(path)


def _modalities(subjects: int, mri_fraction: float) -> list[str]:
    n_mri = int(round(subjects * mri_fraction))
    mri = {min(subjects - 1, int(round((k + 0.5) * subjects / n_mri))) for k in range(n_mri)} if n_mri else set()
    return ["mri" if i in mri else "ct" for i in range(subjects)]


def _generate(root: Path, recipe: _Recipe) -> None:
    rng = np.random.default_rng(recipe.seed)
    shape = recipe.shape
    modalities = _modalities(recipe.subjects, recipe.mri_fraction)
    sexes = np.where(rng.permutation(recipe.subjects) % 2 == 0, "m", "f")
    bins = [(18, 40), (41, 60), (61, 80), (81, 94)]
    rows: dict[str, list[dict]] = {"ct": [], "mri": []}
    counters = {"ct": 0, "mri": 0}
    for i, modality in enumerate(modalities):
        n = counters[modality]
        counters[modality] += 1
        image_id = f"s{n:04d}"
        lo, hi = bins[(i + int(rng.integers(0, 2))) % 4]
        meta = {
            "image_id": image_id,
            "age": int(rng.integers(lo, hi + 1)),
            "gender": str(sexes[i]),
            "institute": INSTITUTES[i % len(INSTITUTES)],
            "split": str(rng.choice(["train", "train", "train", "val", "test"])),
        }
        folder = root / (CT_DIR if modality == "ct" else MRI_DIR) / image_id
        if modality == "ct":
            study = CT_STUDIES[n % len(CT_STUDIES)]
            manufacturer, model = CT_SCANNERS[n % len(CT_SCANNERS)]
            pathology = PATHOLOGIES[int(rng.integers(0, len(PATHOLOGIES)))]
            meta.update(
                study_type=study[0],
                manufacturer=manufacturer,
                scanner_model=model,
                kvp=int(rng.choice([100, 120, 140])),
                pathology=pathology,
                pathology_location="no_location" if pathology == "no_pathology" else study[3],
            )
            inplane, through = study[2] if isinstance(study[2], tuple) else (study[2], study[2])
            spacing = _scaled((inplane, inplane, through), shape)
            storage = "RAS" if n % 2 == 0 else "LPS"
            _write_subject(folder, "ct", meta["gender"], shape, spacing, study[1], storage, rng)
        else:
            study = MRI_STUDIES[n % len(MRI_STUDIES)]
            manufacturer, model = MRI_SCANNERS[n % len(MRI_SCANNERS)]
            thin, frac, storage = study[2], study[4], study[5]
            spacing = _scaled(study[3], shape)
            grid = [max(8, int(round(size * f))) for size, f in zip(shape, frac, strict=True)]
            meta.update(
                study_type=study[0],
                manufacturer=manufacturer,
                scanner_model=model,
                magnetic_field_strength=float(rng.choice([1.5, 3.0])),
                scanning_sequence=str(rng.choice(["GR", "SE", "SE\\IR"])),
                echo_time=round(float(rng.uniform(2.0, 90.0)), 2),
                repetition_time=round(float(rng.uniform(4.0, 5000.0)), 1),
                slice_thickness=spacing[thin],
                source="clinical",
            )
            _write_subject(folder, "mri", meta["gender"], tuple(grid), spacing, study[1], storage, rng)
        rows[modality].append(meta)
    for modality, columns, name in (("ct", CT_COLUMNS, CT_DIR), ("mri", MRI_COLUMNS, MRI_DIR)):
        if rows[modality]:
            pd.DataFrame(rows[modality], columns=columns).to_csv(root / name / "meta.csv", sep=";", index=False)


def _scaled(spacing: tuple[float, ...], shape: tuple[int, ...]) -> tuple[float, float, float]:
    """Voxel size for a grid other than the nominal 64 x 64 x 80, keeping the field of view."""
    nominal = (64, 64, 80)
    return tuple(round(s * n / m, 4) for s, n, m in zip(spacing, nominal, shape, strict=True))


def _axes(shape: tuple[int, ...], spacing: tuple[float, ...], z_centre: float) -> list[np.ndarray]:
    centres = (0.0, 0.0, z_centre)
    return [centres[a] + (np.arange(shape[a]) - (shape[a] - 1) / 2.0) * spacing[a] for a in range(3)]


def _label_map(coords: list[np.ndarray], names: list[str], organs: list[Organ], rng: np.random.Generator) -> np.ndarray:
    """Paint ellipsoids (jittered per subject) into a uint8 label map; label = index in names + 1."""
    x, y, z = coords
    labels = np.zeros((len(x), len(y), len(z)), dtype=np.uint8)
    shift = rng.normal(0, 5.0, size=3)
    scale = rng.uniform(0.92, 1.08)
    for organ in organs:
        c = np.asarray(organ.centre) + shift
        r = np.asarray(organ.radii) * scale
        sel = []
        for axis_coords, ci, ri in zip((x, y, z), c, r, strict=True):
            idx = np.nonzero(np.abs(axis_coords - ci) <= ri)[0]
            sel.append(idx)
        if any(len(s) == 0 for s in sel):
            continue
        gx = ((x[sel[0]] - c[0]) / r[0])[:, None, None] ** 2
        gy = ((y[sel[1]] - c[1]) / r[1])[None, :, None] ** 2
        gz = ((z[sel[2]] - c[2]) / r[2])[None, None, :] ** 2
        inside = (gx + gy + gz) <= 1.0
        if organ.z_range is not None:
            zc = z[sel[2]] - shift[2]
            inside &= ((zc >= organ.z_range[0]) & (zc < organ.z_range[1]))[None, None, :]
        block = labels[np.ix_(*sel)]
        block[inside] = names.index(organ.name) + 1
        labels[np.ix_(*sel)] = block
    return labels


def _body(coords: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(body, inner) boolean volumes: the skin outline and everything under the fat layer."""
    x = coords[0][:, None, None]
    y = coords[1][None, :, None]
    z = coords[2][None, None, :]

    def ellipse(rx: float, ry: float, cx: float = 0.0) -> np.ndarray:
        return ((x - cx) / rx) ** 2 + (y / ry) ** 2 <= 1.0

    torso_z = (z > -80) & (z <= 760)
    neck_z = (z > 760) & (z <= 830)
    head = (x / 82) ** 2 + (y / 97) ** 2 + ((z - 915) / 100) ** 2 <= 1.0
    legs_z = z <= -80
    body = (ellipse(140, 95) & torso_z) | (ellipse(55, 55) & neck_z) | head
    body |= (ellipse(75, 75, -85) | ellipse(75, 75, 85)) & legs_z
    inner = (ellipse(122, 77) & torso_z) | (ellipse(45, 45) & neck_z)
    inner |= (x / 74) ** 2 + (y / 89) ** 2 + ((z - 915) / 92) ** 2 <= 1.0
    inner |= (ellipse(60, 60, -85) | ellipse(60, 60, 85)) & legs_z
    return body, inner & body


def _write_subject(
    folder: Path,
    modality: str,
    sex: str,
    shape: tuple[int, ...],
    spacing: tuple[float, ...],
    z_centre: float,
    storage: str,
    rng: np.random.Generator,
) -> None:
    coords = _axes(shape, spacing, z_centre)
    names = structures_for(modality)
    organs = [o for o in ORGANS if o.modality in (modality, "both") and (o.sex is None or o.sex == sex)]
    labels = _label_map(coords, names, organs, rng)
    body, inner = _body(coords)
    lut = np.zeros(len(names) + 1, dtype=np.float32)
    value = {o.name: (o.ct if modality == "ct" else o.mri) for o in organs}
    for k, name in enumerate(names, 1):
        lut[k] = value.get(name, 0.0)
    if modality == "ct":
        image = np.where(inner, 40.0, np.where(body, -100.0, -1000.0)).astype(np.float32)
        image = np.where(labels > 0, lut[labels], image)
        image += rng.normal(0, 12.0, size=image.shape).astype(np.float32)
        data = np.clip(np.rint(image), -1024, 3071).astype(np.int16)
    else:
        image = np.where(inner, 300.0, np.where(body, 850.0, 0.0)).astype(np.float32)
        image = np.where(labels > 0, lut[labels], image)
        z = (coords[2] - coords[2].mean()) / max(np.ptp(coords[2]), 1.0)
        x = (coords[0] - coords[0].mean()) / max(np.ptp(coords[0]), 1.0)
        bias = 1.0 + 0.25 * x[:, None, None] + 0.2 * z[None, None, :]
        noise = rng.normal(0, 15.0, size=(2, *image.shape)).astype(np.float32)
        data = np.sqrt((image * bias + noise[0]) ** 2 + noise[1] ** 2).astype(np.float32)  # Rician
    origin = [c[0] for c in coords]
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = origin
    ornt = ornt_transform(axcodes2ornt("RAS"), axcodes2ornt(tuple(storage)))
    stored_affine = affine @ inv_ornt_aff(ornt, shape)
    (folder / "segmentations").mkdir(parents=True, exist_ok=True)
    _save(apply_orientation(data, ornt), stored_affine, folder / f"{modality}.nii.gz")
    for k, name in enumerate(names, 1):
        mask = (labels == k).astype(np.uint8)
        _save(apply_orientation(mask, ornt), stored_affine, folder / "segmentations" / f"{name}.nii.gz")


def _save(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    img = nib.Nifti1Image(np.ascontiguousarray(array), affine)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))
