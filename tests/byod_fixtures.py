"""Builders of bring-your-own-data inputs for the data tests: manifests, label maps, DICOM series, 2-D images.

Everything is written with the libraries a researcher would use (nibabel, pydicom, Pillow), into a
temporary folder, so that the tests read real files.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from medsae.data.phantom import CT_DIR, MRI_DIR

#: meta.csv columns of the phantom copied into its manifest (``gender`` stays: an alias of ``sex``)
PHANTOM_META = [
    "age", "gender", "institute", "study_type", "manufacturer", "scanner_model", "kvp", "pathology",
    "pathology_location", "magnetic_field_strength", "scanning_sequence", "echo_time", "repetition_time",
    "slice_thickness", "source",
]  # fmt: skip


def phantom_manifest(phantom: Path, path: Path, masks: str = "folder") -> Path:
    """A manifest describing a TotalSegmentator-layout phantom (paths relative to the manifest).

    ``masks='folder'`` points each row at its ``segmentations/`` folder; ``'labelmap'`` writes one
    label map per scan (value = 1 + index of the structure in the sorted mask names) and a label table.
    """
    rows = []
    for modality, folder in (("ct", CT_DIR), ("mri", MRI_DIR)):
        meta = pd.read_csv(phantom / folder / "meta.csv", sep=";", dtype=str, keep_default_na=False)
        for record in meta.to_dict("records"):
            scan = phantom / folder / record["image_id"]
            mask: Path = scan / "segmentations"
            row = {"image": _rel(scan / f"{modality}.nii.gz", path.parent), "modality": modality.upper(),
                   "id": record["image_id"]}  # fmt: skip
            if masks == "labelmap":
                out = path.parent / "labelmaps" / f"{modality}_{record['image_id']}.nii.gz"
                mask, table = write_label_map(mask, out)
                row["labels"] = _rel(table, path.parent)
            row["mask"] = _rel(mask, path.parent)
            row.update({k: record.get(k, "") for k in PHANTOM_META})
            rows.append(row)
    frame = pd.DataFrame(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False)
    return path


def _rel(target: Path, base: Path) -> str:
    import os

    return os.path.relpath(target, base)


def write_label_map(mask_folder: Path, out: Path) -> tuple[Path, Path]:
    """Combine a folder of binary NIfTI masks into one label map and a JSON label table (value -> name)."""
    import json

    files = sorted(mask_folder.glob("*.nii.gz"))
    first = nib.load(files[0])
    labels = np.zeros(first.shape, dtype=np.uint16)
    table = {}
    for value, path in enumerate(files, start=1):
        mask = np.asanyarray(nib.load(path).dataobj) > 0
        labels[mask] = value
        table[str(value)] = path.name[: -len(".nii.gz")]
    out.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(labels, first.affine), out)
    table_path = out.with_name(out.name.replace(".nii.gz", ".json"))
    table_path.write_text(json.dumps({"labels": {"0": "background", **table}}))
    return out, table_path


CT_UID = "1.2.840.10008.5.1.4.1.1.2"


def _dataset(sop_class: str, syntax: str, tags: dict) -> object:
    """A pydicom Dataset with its file meta and ``tags`` (keyword -> value)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import UID, generate_uid

    meta = FileMetaDataset()
    instance = generate_uid()
    for key, value in (("MediaStorageSOPClassUID", sop_class), ("MediaStorageSOPInstanceUID", instance),
                       ("TransferSyntaxUID", UID(syntax))):  # fmt: skip
        setattr(meta, key, value)
    ds = Dataset()
    ds.file_meta = meta
    for key, value in {"SOPClassUID": sop_class, "SOPInstanceUID": instance, **tags}.items():
        setattr(ds, key, value)
    return ds


def write_series(
    folder: Path,
    stored: np.ndarray,
    *,
    slope: float = 1.0,
    intercept: float = 0.0,
    spacing: tuple[float, float, float] = (0.8, 0.7, 2.5),
    origin: tuple[float, float, float] = (-20.0, -15.0, 100.0),
    orientation: tuple[float, ...] = (1, 0, 0, 0, 1, 0),
    patient_id: str = "PAT-0001",
    series_uid: str | None = None,
    syntax: str = "1.2.840.10008.1.2.1",
    skip: tuple[int, ...] = (),
    tags: dict | None = None,
) -> tuple[Path, str]:
    """Write ``stored`` (int16 ``[slices, rows, cols]``) as one CT series of single-frame files with pydicom.

    Slice k sits at ``origin + k * spacing[2] * normal`` (normal = row x column direction); files are
    named in reverse slice order so that the reader has to sort them. ``skip`` leaves slices out (a
    broken series); ``syntax`` is only written into the file meta (pixel data stays uncompressed).
    Returns the folder and the SeriesInstanceUID.
    """
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    study_uid = generate_uid()
    normal = np.cross(np.asarray(orientation[:3], float), np.asarray(orientation[3:], float))
    n = stored.shape[0]
    for k in range(n):
        if k in skip:
            continue
        header = {
            "Modality": "CT",
            "PatientID": patient_id,
            "PatientName": "Doe^Jane",
            "StudyInstanceUID": study_uid,
            "SeriesInstanceUID": series_uid,
            "Rows": stored.shape[1],
            "Columns": stored.shape[2],
            "BitsAllocated": 16,
            "BitsStored": 16,
            "HighBit": 15,
            "PixelRepresentation": 1,
            "SamplesPerPixel": 1,
            "PhotometricInterpretation": "MONOCHROME2",
            "PixelSpacing": [spacing[1], spacing[0]],
            "SliceThickness": spacing[2],
            "ImageOrientationPatient": list(orientation),
            "ImagePositionPatient": [float(v) for v in np.asarray(origin) + k * spacing[2] * normal],
            "RescaleSlope": slope,
            "RescaleIntercept": intercept,
            "InstanceNumber": k + 1,
            **(tags or {}),
            "PixelData": np.ascontiguousarray(stored[k], dtype="<i2").tobytes(),
        }  # fmt: skip  (row spacing first in PixelSpacing)
        ds = _dataset(CT_UID, syntax, header)
        # the encoding is given: a private transfer syntax tells pydicom nothing about it
        ds.save_as(folder / f"IM{n - k:04d}.dcm", implicit_vr=False, little_endian=True, enforce_file_format=True)
    return folder, series_uid


def write_radiograph(path: Path, stored: np.ndarray, patient_id: str = "PAT-0002") -> Path:
    """One single-image DX file (uint16, 12 bits stored, MONOCHROME1: white is low) with pydicom."""
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    header = {
        "Modality": "DX", "PatientID": patient_id, "PatientSex": "M", "StudyInstanceUID": generate_uid(),
        "SeriesInstanceUID": generate_uid(), "Rows": stored.shape[0], "Columns": stored.shape[1],
        "BitsAllocated": 16, "BitsStored": 12, "HighBit": 11, "PixelRepresentation": 0, "SamplesPerPixel": 1,
        "PhotometricInterpretation": "MONOCHROME1", "PixelData": np.ascontiguousarray(stored, dtype="<u2").tobytes(),
    }  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    _dataset("1.2.840.10008.5.1.4.1.1.1.1", ExplicitVRLittleEndian, header).save_as(path, enforce_file_format=True)
    return path
