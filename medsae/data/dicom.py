"""DICOM series: find them under a folder, check that each assembles into a volume, read them.

Discovery (:func:`find_series`) reads headers only (pydicom, stopping before the pixel data) of
every file under a folder, groups the images by SeriesInstanceUID and sorts each series along its
slice normal (the cross product of ImageOrientationPatient's row and column directions). A series
is kept as a volume when its images share one orientation, size and pixel spacing, sit at distinct
positions evenly spaced along the normal, are single-frame grey images, and their transfer syntax
has a decoder; otherwise every problem found is recorded as the series' skip reason (missing
slices show as a gap of more than 1.5 slice spacings). A series of one single-frame image is a 2-D
image (a radiograph): no planes, windowing off. Files that are not DICOM, and DICOM objects without
pixels (reports, presentation states, segmentations), are counted and left alone.

Reading (:func:`load_series`) decodes each image with pydicom, falling back to SimpleITK (GDCM:
JPEG lossless and JPEG-LS among others) for a transfer syntax pydicom has no plugin for, applies
each image's RescaleSlope / RescaleIntercept (Hounsfield units for CT) and builds the NIfTI-style
RAS affine from ImagePositionPatient, ImageOrientationPatient and PixelSpacing (DICOM's patient
space is LPS: x and y change sign). Array axis 0 runs along a row (column index), axis 1 down the
columns (row index), axis 2 through the slices, as ITK and dcm2niix order them.

Identifiers (PatientID, UIDs) are used only to group and are turned into keyed pseudonyms by the
caller (:mod:`medsae.data.pseudonym`); no header value other than :data:`META_TAGS` is kept.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medsae.data.config import modality_name
from medsae.data.splits import normalise_sex
from medsae.data.volume import ScanError
from medsae.errors import MedsaeError

#: header fields read at discovery (everything else is skipped while parsing)
HEADER_TAGS = [
    "SOPClassUID", "Modality", "SeriesInstanceUID", "StudyInstanceUID", "PatientID", "Rows", "Columns",
    "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "NumberOfFrames", "SamplesPerPixel",
    "PhotometricInterpretation", "Manufacturer", "ManufacturerModelName", "KVP", "SliceThickness",
    "BodyPartExamined", "PatientSex", "PatientAge", "StudyDescription",
]  # fmt: skip
#: header field -> metadata column of the slice index (docs/method.md#dicom)
META_TAGS = {
    "Manufacturer": "manufacturer",
    "ManufacturerModelName": "scanner_model",
    "KVP": "kvp",
    "SliceThickness": "slice_thickness",
    "BodyPartExamined": "body_part",
    "PatientSex": "sex",
    "PatientAge": "age",
    "StudyDescription": "study_type",
}
#: transfer syntaxes GDCM (inside SimpleITK) decodes when pydicom has no plugin for them
GDCM_SYNTAXES = {
    "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70",
    "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91",
    "1.2.840.10008.1.2.5",
}  # fmt: skip
_GAP = 1.5  # a step larger than this many slice spacings means missing slices
_UNEVEN = 0.1  # steps differing from the median by more than this share are uneven


def pydicom_module() -> Any:
    """pydicom, or a one-line error saying how to install it."""
    try:
        import pydicom
    except ImportError:
        raise MedsaeError("DICOM needs pydicom: pip install 'medsae[dicom]'") from None
    return pydicom


@dataclass
class DicomSeries:
    """One series found on disk: its files in slice order and what is wrong with it."""

    key: str  # SeriesInstanceUID (or the folder when missing); never leaves the ingest
    patient: str | None  # PatientID (or StudyInstanceUID); never leaves the ingest
    folder: str  # folder of the first file, relative to the root
    files: list[str]  # relative to the root, in slice order
    header: Any  # the first image's header (pydicom Dataset)
    flat: bool = False  # one single-frame image: a 2-D picture
    problems: list[str] = field(default_factory=list)

    @property
    def modality(self) -> str:
        return modality_name(self.header.get("Modality") or "unknown")


@dataclass
class FolderNotes:
    """What discovery saw besides the series: files it could not use."""

    files: int = 0
    not_dicom: int = 0
    no_pixels: int = 0
    unreadable: list[str] = field(default_factory=list)  # 'path: reason', first ones


def walk_files(root: Path) -> Iterator[Path]:
    """Visible files under ``root`` in name order (links to folders are not followed)."""
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith("."):
                yield Path(folder) / name


def read_header(path: Path) -> Any:
    """The discovery header of one file; ``InvalidDicomError`` for a file that is not DICOM."""
    pydicom = pydicom_module()
    return pydicom.dcmread(path, stop_before_pixels=True, specific_tags=HEADER_TAGS)


def find_series(root: str | Path, paths: list[Path] | None = None) -> tuple[list[DicomSeries], FolderNotes]:
    """Every image series under ``root`` (or among ``paths``), checked, sorted by folder and key."""
    pydicom = pydicom_module()
    root = Path(root)
    notes = FolderNotes()
    groups: dict[str, list[tuple[str, Any]]] = {}
    for path in paths if paths is not None else walk_files(root):
        notes.files += 1
        rel = os.path.relpath(path, root)
        try:
            ds = read_header(path)
        except pydicom.errors.InvalidDicomError:
            notes.not_dicom += 1
            continue
        except Exception as exc:
            if len(notes.unreadable) < 20:
                notes.unreadable.append(f"{rel}: {type(exc).__name__}: {str(exc).strip()[:120]}")
            continue
        if "Rows" not in ds or "Columns" not in ds:
            notes.no_pixels += 1
            continue
        key = str(ds.get("SeriesInstanceUID") or "") or f"folder:{Path(rel).parent.as_posix()}"
        groups.setdefault(key, []).append((rel, ds))
    series = [_check(key, members) for key, members in groups.items()]
    series.sort(key=lambda s: (s.folder, s.files[0]))
    return series, notes


def _floats(ds: Any, name: str, n: int) -> np.ndarray | None:
    value = ds.get(name)
    try:
        out = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return out if out.shape == (n,) and np.isfinite(out).all() else None


def _check(key: str, members: list[tuple[str, Any]]) -> DicomSeries:
    """A series with its files in slice order and every assembly problem found."""
    members.sort(key=lambda m: m[0])
    first = members[0][1]
    patient = str(first.get("PatientID") or first.get("StudyInstanceUID") or "") or None
    series = DicomSeries(key, patient, Path(members[0][0]).parent.as_posix(), [m[0] for m in members], first)
    problems = series.problems
    frames = {int(ds.get("NumberOfFrames") or 1) for _, ds in members}
    if max(frames) > 1:
        problems.append(f"multi-frame images ({max(frames)} frames in one file): not supported")
    samples = {int(ds.get("SamplesPerPixel") or 1) for _, ds in members}
    if samples != {1}:
        problems.append("colour images (SamplesPerPixel 3): grey series expected")
    syntax = _syntax_problem(members)
    if syntax:
        problems.append(syntax)
    if len(members) == 1 and not problems:
        series.flat = True
        return series
    sizes = {(int(ds.Rows), int(ds.Columns)) for _, ds in members}
    if len(sizes) > 1:
        problems.append(f"mixed image sizes ({len(sizes)} different)")
    orient = [_floats(ds, "ImageOrientationPatient", 6) for _, ds in members]
    pos = [_floats(ds, "ImagePositionPatient", 3) for _, ds in members]
    spacing = [_floats(ds, "PixelSpacing", 2) for _, ds in members]
    if any(o is None for o in orient) or any(p is None for p in pos) or any(s is None for s in spacing):
        problems.append("images without position, orientation or pixel spacing: cannot build a volume")
        return series
    distinct = _distinct(orient, 1e-4)
    if distinct > 1:
        problems.append(f"mixed orientations ({distinct} different image orientations)")
        return series
    if _distinct(spacing, 1e-4) > 1:
        problems.append("mixed pixel spacings")
    normal = np.cross(orient[0][:3], orient[0][3:])
    along = np.asarray([float(p @ normal) for p in pos])
    order = np.argsort(along, kind="stable")
    series.files = [members[i][0] for i in order]
    series.header = members[int(order[0])][1]
    steps = np.diff(along[order])
    problems.extend(_spacing_problems(steps))
    return series


def _distinct(vectors: list[np.ndarray], tol: float) -> int:
    kinds: list[np.ndarray] = []
    for v in vectors:
        if not any(np.abs(v - k).max() <= tol for k in kinds):
            kinds.append(v)
    return len(kinds)


def _spacing_problems(steps: np.ndarray) -> list[str]:
    """Duplicate positions, missing slices or uneven spacing among sorted slice positions (mm)."""
    same = int((steps < 1e-3).sum())
    if same:
        return [f"{same + 1} images share a position (several echoes, phases or acquisitions in one series)"]
    median = float(np.median(steps))
    gaps = np.flatnonzero(steps > _GAP * median)
    if gaps.size:
        k = int(gaps[0])
        more = f" (+{gaps.size - 1} more)" if gaps.size > 1 else ""
        return [
            f"missing slices: a gap of {steps[k]:.2f} mm after slice {k + 1} where slices are "
            f"{median:.2f} mm apart{more}"
        ]
    if np.abs(steps - median).max() > _UNEVEN * median:
        return [f"uneven slice spacing ({steps.min():.2f}-{steps.max():.2f} mm)"]
    return []


def _syntax_problem(members: list[tuple[str, Any]]) -> str | None:
    """Why the series' pixel data cannot be decoded here, or None."""
    syntaxes = {str(getattr(ds, "file_meta", {}).get("TransferSyntaxUID", "") or "") for _, ds in members}
    for uid in sorted(syntaxes):
        reason = decoder_problem(uid)
        if reason:
            return reason
    return None


def decoder_problem(uid: str) -> str | None:
    """None when pydicom or SimpleITK can decode transfer syntax ``uid``, else the reason (one line)."""
    pydicom = pydicom_module()
    from pydicom.pixels import get_decoder

    if not uid:
        return None  # no file meta: pydicom assumes implicit VR little endian
    name = pydicom.uid.UID(uid).name
    try:
        if get_decoder(pydicom.uid.UID(uid)).is_available:
            return None
    except NotImplementedError:
        pass
    if uid in GDCM_SYNTAXES and _simpleitk() is not None:
        return None
    return f"transfer syntax {name} ({uid}): no decoder installed for it"


def _simpleitk() -> Any:
    try:
        import SimpleITK
    except ImportError:
        return None
    return SimpleITK


def parse_age(value: object) -> float | None:
    """DICOM PatientAge ('065Y', '018M', '003W', '010D') in years, or None."""
    text = str(value or "").strip().upper()
    if len(text) < 2 or not text[:-1].isdigit():
        return None
    per_year = {"Y": 1.0, "M": 12.0, "W": 365.25 / 7, "D": 365.25}.get(text[-1])
    return None if per_year is None else round(int(text[:-1]) / per_year, 3)


def series_meta(ds: Any) -> dict[str, Any]:
    """The metadata columns of a series (:data:`META_TAGS`), cleaned; no identifier among them."""
    out: dict[str, Any] = {}
    for tag, column in META_TAGS.items():
        value = ds.get(tag)
        text = " ".join(str(value).split()) if value not in (None, "") else ""
        out[column] = text or None
    out["sex"] = normalise_sex(out["sex"])
    out["age"] = parse_age(out["age"])
    return out


# -- reading pixels ----------------------------------------------------------------------------------


def _pixels(path: Path) -> tuple[np.ndarray, tuple[float, float], Any]:
    """One image's stored pixel values ``[rows, cols]``, its (slope, intercept) and its header.

    pydicom first; SimpleITK when pydicom has no decoder (its values come rescaled: (1, 0) then).
    """
    pydicom = pydicom_module()
    try:
        ds = pydicom.dcmread(path)
    except Exception as exc:
        text = str(exc).strip()[:160]
        raise ScanError(f"cannot read DICOM file {path.name}: {type(exc).__name__}: {text}") from None
    try:
        array = _native_pixels(ds)
        if array is None:
            array = ds.pixel_array
    except Exception as exc:
        sitk = _simpleitk()
        if sitk is None:
            raise ScanError(f"cannot decode {path.name}: {str(exc).strip().splitlines()[0][:200]}") from None
        try:
            decoded = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
        except Exception as exc2:
            lines = str(exc2).strip().splitlines()
            raise ScanError(f"cannot decode {path.name}: {lines[-1][:200] if lines else type(exc2).__name__}") from None
        return np.asarray(decoded).reshape(decoded.shape[-2:]), (1.0, 0.0), ds
    if array.ndim != 2:
        raise ScanError(f"DICOM file {path.name} holds {array.shape} pixels (one grey frame expected)")
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    slope = float(slope) if slope not in (None, "") else 1.0
    intercept = float(intercept) if intercept not in (None, "") else 0.0
    return array, (slope, intercept), ds


#: uncompressed little-endian transfer syntaxes whose pixel data is a plain array
_NATIVE = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"}


def _native_pixels(ds: Any) -> np.ndarray | None:
    """The pixel array of an uncompressed single-frame grey image, read directly (pydicom's general
    path costs as much again per image); None for anything else (pydicom then decodes it).

    Bits above BitsStored are masked off (unsigned) or sign-extended (signed), as pydicom does.
    """
    syntax = str(getattr(ds, "file_meta", {}).get("TransferSyntaxUID", "1.2.840.10008.1.2"))
    allocated, stored = int(ds.get("BitsAllocated") or 0), int(ds.get("BitsStored") or 0)
    if (
        syntax not in _NATIVE
        or allocated not in (8, 16, 32)
        or not 0 < stored <= allocated
        or int(ds.get("SamplesPerPixel") or 1) != 1
        or int(ds.get("NumberOfFrames") or 1) != 1
        or "PixelData" not in ds
    ):
        return None
    signed = int(ds.get("PixelRepresentation") or 0) == 1
    dtype = np.dtype(f"<{'i' if signed else 'u'}{allocated // 8}")
    rows, cols = int(ds.Rows), int(ds.Columns)
    raw = ds.PixelData
    if len(raw) < rows * cols * dtype.itemsize:
        raise ValueError(f"pixel data holds {len(raw)} bytes, {rows * cols * dtype.itemsize} expected")
    array = np.frombuffer(raw, dtype=dtype, count=rows * cols).reshape(rows, cols)
    if stored < allocated:
        shift = allocated - stored
        array = (array << shift) >> shift if signed else array & dtype.type((1 << stored) - 1)
    return array


def load_series(root: Path, files: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """A series (``files`` in slice order, relative to ``root``) as float32 ``[cols, rows, slices]`` and RAS affine."""
    if len(files) < 2:
        raise ScanError("a DICOM volume needs at least two images")
    volume: np.ndarray | None = None
    first = last = None
    for k, rel in enumerate(files):
        path = root / rel
        array, (slope, intercept), ds = _pixels(path)
        if volume is None:
            volume = np.empty((len(files), *array.shape), dtype=np.float32)
            first = ds
        elif array.shape != volume.shape[1:]:
            raise ScanError(f"DICOM file {path.name} is {array.shape}, the series' first image {volume.shape[1:]}")
        volume[k] = array
        if slope != 1.0:
            volume[k] *= np.float32(slope)
        if intercept != 0.0:
            volume[k] += np.float32(intercept)  # each image's own rescale (they may differ within a series)
        last = ds
    affine = series_affine(first, last, len(files))
    return volume.transpose(2, 1, 0), affine  # Fortran order, as NIfTI volumes are read (no copy)


def series_affine(first: Any, last: Any, n: int) -> np.ndarray:
    """RAS voxel-to-world affine of a sorted series from its first and last headers."""
    orient = _floats(first, "ImageOrientationPatient", 6)
    p0, p1 = _floats(first, "ImagePositionPatient", 3), _floats(last, "ImagePositionPatient", 3)
    spacing = _floats(first, "PixelSpacing", 2)
    if orient is None or p0 is None or p1 is None or spacing is None:
        raise ScanError("DICOM images without position, orientation or pixel spacing")
    lps = np.eye(4)
    lps[:3, 0] = orient[:3] * spacing[1]  # along a row: the column index (array axis 0)
    lps[:3, 1] = orient[3:] * spacing[0]  # down a column: the row index (array axis 1)
    lps[:3, 2] = (p1 - p0) / max(n - 1, 1)
    lps[:3, 3] = p0
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def load_flat(root: Path, file: str) -> np.ndarray:
    """A single-image series as a 2-D picture ``[1, rows, cols]`` (MONOCHROME1 inverted)."""
    array, _, ds = _pixels(root / file)  # no rescale: a linear map does not change a min-max stretch
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":  # white is low: flip so bright means dense
        array = array.max() - array
    return np.asarray(array)[None, :, :]
