"""DICOM folders: series written with pydicom are assembled, rescaled, oriented, described and pseudonymised;
broken series are recorded skips; `medsae data check` lists them without writing anything."""

from __future__ import annotations

import json

import duckdb
import numpy as np
import pandas as pd
import pytest
from byod_fixtures import write_radiograph, write_series
from typer.testing import CliRunner

from medsae.data.index import load_skipped, load_slices
from medsae.data.readers import load_scan
from medsae.data.render import render_slice

SLOPE, INTERCEPT = 2.0, -1024.0
N, ROWS, COLS = 12, 20, 24
SPACING = (0.8, 0.7, 2.5)  # column spacing (x), row spacing (y), slice spacing (mm)
ORIGIN = (-20.0, -15.0, 100.0)  # LPS position of the first slice's first pixel


def _ct_volume() -> np.ndarray:
    """Stored values [slice, row, col]: soft tissue, a left-anterior rod and a superior blob (HU 56/1000/300)."""
    stored = np.full((N, ROWS, COLS), 540, dtype=np.int16)  # 540 * 2 - 1024 = 56 HU
    stored[:, :6, 18:] = 1012  # columns run to the patient's left (LPS x), rows to posterior: left anterior
    stored[9:, 8:12, 8:12] = 662  # top slices only (LPS z = superior): 300 HU
    return stored


@pytest.fixture(scope="module")
def dicom_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("dicom") / "export"
    tags = dict(Manufacturer="ACME", ManufacturerModelName="Scan 9", KVP="120", BodyPartExamined="CHEST",
                PatientSex="F", PatientAge="063Y", StudyDescription="CT Thorax")  # fmt: skip
    _, uid = write_series(root / "good", _ct_volume(), slope=SLOPE, intercept=INTERCEPT, spacing=SPACING,
                          origin=ORIGIN, tags=tags)  # fmt: skip
    small = np.full((6, 8, 8), 100, dtype=np.int16)
    write_series(root / "gap", small, skip=(2,), patient_id="PAT-0003")
    write_series(root / "tilted" / "a", small[:3], series_uid="1.2.3.4.5.6.7", patient_id="PAT-0004")
    write_series(root / "tilted" / "b", small[:3], series_uid="1.2.3.4.5.6.7", patient_id="PAT-0004",
                 orientation=(1, 0, 0, 0, 0, -1), origin=(0.0, 50.0, 0.0))  # fmt: skip
    write_series(root / "private", small[:4], syntax="1.2.826.0.1.3680043.9.9999.1", patient_id="PAT-0005")
    xray = (np.arange(16 * 20).reshape(16, 20) * 7 % 4000 + 50).astype(np.uint16)
    write_radiograph(root / "dx" / "chest.dcm", xray)
    (root / "README.txt").write_text("exported by a PACS")
    return root, uid, xray


@pytest.fixture(scope="module")
def ingested(dicom_root, tmp_path_factory):
    from medsae.cli.data import ingest

    root, _, _ = dicom_root
    base = tmp_path_factory.mktemp("dicom_out")
    summary = ingest(root, {"format": "dicom", "size": 20}, base / "out", base / "r.duckdb")
    return base / "out", base / "r.duckdb", summary


def test_series_pixels_are_rescaled_and_placed_in_ras(dicom_root):
    """load_scan of the good series = stored x slope + intercept on [col, row, slice]; the affine maps
    voxel (0, 0, 0) to the first slice's position, in RAS (DICOM LPS x and y negated)."""
    from medsae.data.dicom import find_series

    root, uid, _ = dicom_root
    series, _ = find_series(root)
    good = next(s for s in series if s.key == uid)
    assert good.problems == [] and len(good.files) == N
    array, affine = load_scan(root, "dicom", good.folder, good.files)
    expected = _ct_volume().astype(np.float32) * SLOPE + INTERCEPT
    np.testing.assert_array_equal(array, expected.transpose(2, 1, 0))
    np.testing.assert_allclose(affine @ [0, 0, 0, 1], [-ORIGIN[0], -ORIGIN[1], ORIGIN[2], 1])
    np.testing.assert_allclose(affine @ [1, 1, 1, 1], [-ORIGIN[0] - SPACING[0], -ORIGIN[1] - SPACING[1],
                                                       ORIGIN[2] + SPACING[2], 1])  # fmt: skip


def test_ingest_planes_metadata_and_skips(dicom_root, ingested):
    out, _, summary = ingested
    s = load_slices(out)
    scans = pd.read_parquet(out / "scans.parquet")
    ct = s[s["modality"] == "ct"]
    assert ct["image_id"].nunique() == 1
    assert ct.groupby("plane").size().to_dict() == {"axial": N, "coronal": ROWS, "sagittal": COLS}  # no masks: all
    row = scans[scans["modality"] == "ct"].iloc[0]
    assert row["axis_codes"] == "LPS" and json.loads(row["planes"]) == ["sagittal", "coronal", "axial"]
    assert (row["window_source"], row["window_center"], row["window_width"]) == ("table", -200.0, 1400.0)
    # clip to [-900, 500] HU, then rescale by the clipped volume's range (56 .. 500 HU)
    assert (row["clip_lo"], row["clip_hi"], row["out_lo"], row["out_hi"]) == (-900.0, 500.0, 56.0, 500.0)
    first = ct.iloc[0]
    assert (first["manufacturer"], first["scanner_model"], first["kvp"], first["slice_thickness"]) == (
        "ACME", "Scan 9", "120", "2.5")  # fmt: skip
    assert (first["body_part"], first["sex"], first["age"], first["age_bin"], first["study_type"]) == (
        "CHEST", "f", 63.0, "60-80", "CT Thorax")  # fmt: skip
    assert first["subject"].startswith("sub-") and len(first["subject"]) == 20 and len(first["image_id"]) == 16
    skipped = load_skipped(out)
    reasons = sorted(skipped["reason"])
    assert len(reasons) == 3 and summary["skipped"] == 3
    assert any(r.startswith("missing slices: a gap of 5.00 mm after slice 2") for r in reasons)
    assert any("mixed orientations" in r for r in reasons)
    assert any("no decoder installed" in r for r in reasons)


def test_radiograph_is_one_flat_slice_inverted_and_stretched(dicom_root, ingested):
    """A single-image DX series: one slice, no plane, MONOCHROME1 inverted, windowing off (min-max)."""
    _, _, xray = dicom_root
    out, _, _ = ingested
    s = load_slices(out)
    dx = s[s["modality"] == "dx"]
    assert len(dx) == 1 and dx["plane"].isna().all() and dx["slice_uid"].iloc[0].endswith("/image/0")
    inverted = xray.max() - xray.astype(np.float64)
    expected = np.floor((inverted - inverted.min()) / (inverted.max() - inverted.min()) * 255)[:, 2:18]
    got = render_slice(out, int(dx["slice_id"].iloc[0]), size=16)
    assert np.abs(got.astype(int) - expected).max() <= 1


def test_radiological_display_of_an_lps_series(ingested):
    """Axial: the left-anterior rod is top right (anterior up, patient's left on the image's right);
    coronal and sagittal: the superior blob is in the upper half."""
    out, _, _ = ingested
    s = load_slices(out)
    ct = s[s["modality"] == "ct"].set_index(["plane", "idx"])["slice_id"]
    axial = render_slice(out, int(ct[("axial", 3)])).astype(float)  # 20 x 20 crop, no resize
    assert axial[:5, -3:].mean() > 200 and axial[:5, :3].mean() < 20 and axial[-5:, -3:].mean() < 20
    coronal = render_slice(out, int(ct[("coronal", ROWS // 2)])).astype(float)  # rows 8..12: the blob
    top, bottom = coronal[: coronal.shape[0] // 2], coronal[coronal.shape[0] // 2 :]
    assert top.max() > 100 and bottom.max() < 20


def test_identifiers_never_leave_the_ingest(dicom_root, ingested):
    """No PatientID, name or UID of the export is in the slices artifact or the registry."""
    root, uid, _ = dicom_root
    out, registry, _ = ingested
    secrets = ["PAT-000", "Doe", uid, "1.2.3.4.5.6.7"]
    texts = [pd.read_parquet(p).to_csv() for p in out.glob("*.parquet")]
    texts += [p.read_text() for p in out.glob("*.json")]
    with duckdb.connect(str(registry), read_only=True) as con:
        for (table,) in con.execute("SELECT table_name FROM information_schema.tables").fetchall():
            texts.append(con.execute(f"SELECT * FROM {table}").df().to_csv())
    for text in texts:
        for secret in secrets:
            assert secret not in text
    assert (root / ".medsae" / "pseudonym.key").stat().st_mode & 0o777 == 0o600


def test_check_lists_broken_series_and_writes_nothing(dicom_root, tmp_path):
    import shutil

    from medsae.cli.data import app

    root, _, _ = dicom_root
    copy = tmp_path / "copy"
    shutil.copytree(root, copy, ignore=shutil.ignore_patterns(".medsae"))
    before = sorted(p.relative_to(copy) for p in copy.rglob("*"))
    result = CliRunner().invoke(app, ["check", str(copy)])
    assert result.exit_code == 1, result.output
    assert "(dicom); nothing written" in result.output
    assert result.output.count("problem ct/") == 3 and "missing slices" in result.output
    assert "1 files are not DICOM" in result.output
    assert sorted(p.relative_to(copy) for p in copy.rglob("*")) == before


def test_compressed_series_without_a_pydicom_plugin_is_decoded_by_simpleitk(tmp_path):
    """JPEG Lossless (which pydicom decodes only with extra plugins, absent here) read through GDCM."""
    import pydicom
    import SimpleITK as sitk

    from medsae.data.dicom import find_series

    stored = (np.arange(5 * 8 * 10).reshape(5, 8, 10) * 13 % 3000 - 1000).astype(np.int16)
    write_series(tmp_path / "s", stored, slope=1.0, intercept=-1024.0)
    for path in sorted((tmp_path / "s").glob("*.dcm")):  # re-encode each image's pixels with GDCM
        ds = pydicom.dcmread(path)
        writer = sitk.ImageFileWriter()
        writer.SetUseCompression(True)
        writer.SetCompressor("JPEG")
        writer.SetFileName(str(tmp_path / "enc.dcm"))
        writer.Execute(sitk.GetImageFromArray(ds.pixel_array[None]))
        encoded = pydicom.dcmread(tmp_path / "enc.dcm")
        ds["PixelData"] = pydicom.DataElement(0x7FE00010, "OB", encoded.PixelData)  # encapsulated frames
        ds.file_meta.TransferSyntaxUID = encoded.file_meta.TransferSyntaxUID
        ds.save_as(path, enforce_file_format=True)
    series, _ = find_series(tmp_path / "s")
    assert series[0].header.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.70" and series[0].problems == []
    array, _ = load_scan(tmp_path / "s", "dicom", ".", series[0].files)
    np.testing.assert_array_equal(array, (stored.astype(np.float32) - 1024).transpose(2, 1, 0))
