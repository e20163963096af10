"""DICOM ingest speed on a study-sized CT series, in one process: slices/s from the files to the index.

    .venv/bin/python bench/ingest_dicom.py                  # 512 x 512 x 300 CT, ~1 minute
    .venv/bin/python bench/ingest_dicom.py --slices 100     # a shorter series

A synthetic CT series (int16, rescale intercept -1024, LPS axial storage, 0.7 x 0.7 x 1 mm) is
written with pydicom into a temporary folder, one file per slice, in reverse name order. Then, each
timed in this process (workers = 1; the pool runs scans in parallel, not slices):

* ``check``: ``medsae data check``'s work (headers of every file, series assembly; no pixels);
* ``ingest``: the whole slices stage (discovery, pixel decoding with the rescale, reorientation
  to RAS, CT window, slice index of the three planes: 300 + 512 + 512 slices) with the default
  radiological display, then with ``orientation: stored`` (no reorientation);
* ``nifti``: the same volume as one ``.nii.gz``, for comparison with medsae's NIfTI path;
* ``render``: the images the embed stage reads (every 8th slice at 224 px), from DICOM.

Slices/s = slices indexed (or rendered) / wall seconds. Peak RSS of the process is printed last.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


def write_series(folder: Path, n: int, side: int) -> None:
    """A CT series of ``n`` slices of ``side`` x ``side`` (a body-like ellipse with organs) with pydicom."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:side, 0:side]
    body = ((xx - side / 2) / (0.45 * side)) ** 2 + ((yy - side / 2) / (0.35 * side)) ** 2 <= 1
    organ = ((xx - 0.6 * side) / (0.1 * side)) ** 2 + ((yy - 0.45 * side) / (0.08 * side)) ** 2 <= 1
    rng = np.random.default_rng(0)
    series, study = generate_uid(), generate_uid()
    for k in range(n):
        hu = np.where(body, 40, -1000) + np.where(organ & (k > n // 4), 60, 0) + rng.normal(0, 10, (side, side))
        instance = generate_uid()
        meta = FileMetaDataset()
        for key, value in (("MediaStorageSOPClassUID", CTImageStorage), ("MediaStorageSOPInstanceUID", instance),
                           ("TransferSyntaxUID", ExplicitVRLittleEndian)):  # fmt: skip
            setattr(meta, key, value)
        ds = Dataset()
        ds.file_meta = meta
        header = {
            "SOPClassUID": CTImageStorage, "SOPInstanceUID": instance, "Modality": "CT", "PatientID": "BENCH-1",
            "StudyDescription": "CT Abdomen", "StudyInstanceUID": study, "SeriesInstanceUID": series,
            "Rows": side, "Columns": side, "BitsAllocated": 16, "BitsStored": 12, "HighBit": 11,
            "PixelRepresentation": 0, "SamplesPerPixel": 1, "PhotometricInterpretation": "MONOCHROME2",
            "PixelSpacing": [0.7, 0.7], "SliceThickness": 1.0, "ImageOrientationPatient": [1, 0, 0, 0, 1, 0],
            "ImagePositionPatient": [-180.0, -180.0, 1000.0 - k], "RescaleSlope": 1, "RescaleIntercept": -1024,
            "PixelData": np.clip(np.rint(hu + 1024), 0, 4095).astype("<u2").tobytes(),
        }  # fmt: skip
        for key, value in header.items():
            setattr(ds, key, value)
        ds.save_as(folder / f"IM{n - k:05d}.dcm", enforce_file_format=True)


def timed(label: str, fn, count_of) -> dict:
    start = time.perf_counter()
    value = fn()
    seconds = time.perf_counter() - start
    count = count_of(value)
    return {"case": label, "seconds": seconds, "slices": count, "per_s": count / seconds if count else float("nan")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--side", type=int, default=512)
    args = parser.parse_args()

    from medsae.data.build import run_ingest
    from medsae.data.check import check_dataset
    from medsae.data.config import DataSpec
    from medsae.data.readers import load_scan
    from medsae.data.render import iter_scan_images

    base = Path(tempfile.mkdtemp(prefix="medsae-bench-dicom-"))
    try:
        start = time.perf_counter()
        write_series(base / "dicom", args.slices, args.side)
        print(f"wrote {args.slices} x {args.side}^2 series in {time.perf_counter() - start:.1f} s to {base}")
        rows = []
        data = DataSpec(root=str(base / "dicom"), format="dicom", size=224)
        rows.append(timed("check (headers only)", lambda: check_dataset(base / "dicom", data),
                          lambda r: args.slices))  # fmt: skip

        def ingest(name: str, root: Path, **extra) -> object:
            params = {"root": str(root), "size": 224, **extra}
            return run_ingest(root, params, base / name / "out", base / name / "work")

        rows.append(timed("ingest dicom, radiological", lambda: ingest("a", base / "dicom", format="dicom"),
                          lambda r: len(r.slices)))  # fmt: skip
        rows.append(timed("ingest dicom, stored", lambda: ingest("b", base / "dicom", format="dicom",
                          orientation="stored"), lambda r: len(r.slices)))  # fmt: skip
        import nibabel as nib
        import pandas as pd

        series = sorted(p.relative_to(base / "dicom").as_posix() for p in (base / "dicom").glob("*.dcm"))[::-1]
        array, affine = load_scan(base / "dicom", "dicom", ".", series)
        (base / "nifti").mkdir()
        nib.save(nib.Nifti1Image(array.astype(np.int16), affine), base / "nifti" / "ct.nii.gz")
        pd.DataFrame({"image": ["ct.nii.gz"], "modality": ["ct"], "study_type": ["ct abdomen"]}).to_csv(
            base / "nifti" / "manifest.csv", index=False
        )
        rows.append(timed("ingest nifti (same volume), radiological",
                          lambda: ingest("c", base / "nifti", format="manifest"), lambda r: len(r.slices)))  # fmt: skip
        ids = np.arange(0, rows[1]["slices"], 8)

        def render() -> int:
            return sum(len(group) for group, _ in iter_scan_images(base / "a" / "out", ids))

        rows.append(timed("render from dicom, every 8th slice, 224 px", render, lambda n: n))
        print()
        print(f"{'case':<45} {'seconds':>8} {'slices':>7} {'slices/s':>9}")
        for r in rows:
            print(f"{r['case']:<45} {r['seconds']:8.2f} {r['slices']:7d} {r['per_s']:9.1f}")
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"\npeak RSS of this process: {peak:.0f} MiB")
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
