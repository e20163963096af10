"""`medsae data check`: a dry run listing what an ingest would read and every problem, writing nothing;
the problems it finds are the skips the ingest then records."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from medsae.cli.data import app
from medsae.data.build import run_ingest


def _nifti(path, shape=(10, 12, 8), affine=None, dtype=np.float32):
    data = (np.arange(np.prod(shape)).reshape(shape) % 7).astype(dtype)
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 3.0, 1.0]) if affine is None else affine), path)


@pytest.fixture()
def messy(tmp_path):
    root = tmp_path / "messy"
    (root / "ok_masks").mkdir(parents=True)
    _nifti(root / "ok.nii.gz")
    _nifti(root / "ok_masks" / "liver.nii.gz", dtype=np.uint8)
    _nifti(root / "seg.nii.gz", dtype=np.uint8)
    _nifti(root / "small_seg.nii.gz", shape=(5, 5, 5), affine=np.diag([9.0, 9.0, 9.0, 1.0]), dtype=np.uint8)
    (root / "bad.yaml").write_text("liver: one\n")
    Image.fromarray(np.zeros((20, 30), np.uint16)).save(root / "xr.png")
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(root / "xr_mask.png")
    (root / "notes.txt").write_text("not an image")
    rows = [
        ("ok.nii.gz", "ok_masks", "", "ct", "good"),
        ("gone.nii.gz", "", "", "ct", "gone"),
        ("ok.nii.gz", "no_such_masks", "", "ct", "maskless"),
        ("ok.nii.gz", "seg.nii.gz", "", "mri", "untabled"),
        ("ok.nii.gz", "seg.nii.gz", "bad.yaml", "mri", "badtable"),
        ("ok.nii.gz", "small_seg.nii.gz", "tables.yaml", "ct", "smallmask"),
        ("ok.nii.gz", "", "", "ct", "good"),
        ("xr.png", "xr_mask.png", "tables.yaml", "xr", "xray"),
        ("notes.txt", "", "", "ct", "notes"),
        ("ok.nii.gz", "", "", "", "nomodality"),
    ]
    pd.DataFrame(rows, columns=["image", "mask", "labels", "modality", "id"]).to_csv(root / "manifest.csv", index=False)
    (root / "tables.yaml").write_text("liver: 1\n")
    return root


EXPECTED = {
    ("ct", "gone"): "image missing: gone.nii.gz",
    ("ct", "maskless"): "mask missing: no_such_masks",
    ("mri", "untabled"): "mask seg.nii.gz is a label map but no label table is given",
    ("mri", "badtable"): "label table bad.yaml: liver: label value 'one' is not a non-negative integer",
    ("ct", "smallmask"): "mask label map has shape (5, 5, 5), image has (10, 12, 8)",
    ("ct", "good"): "repeats the id of row 1",
    ("xr", "xray"): "mask label map has shape (1, 10, 10), image has (1, 20, 30)",
    ("ct", "notes"): "image notes.txt: not a NIfTI volume, DICOM series or PNG/JPEG/TIFF image",
    ("unknown", "nomodality"): "no modality",
}


def test_check_lists_every_problem_and_writes_nothing(messy):
    before = sorted(p.relative_to(messy) for p in messy.rglob("*"))
    result = CliRunner().invoke(app, ["check", str(messy / "manifest.csv")])
    assert result.exit_code == 1, result.output
    out = " ".join(result.output.split())
    assert "(manifest); nothing written" in out and "manifest.csv: 10 rows" in out
    for (modality, ident), text in EXPECTED.items():
        assert f"problem {modality}/{ident}: " in out and text in out, (modality, ident, text)
    assert out.count("problem ") == len(EXPECTED)
    assert sorted(p.relative_to(messy) for p in messy.rglob("*")) == before


def test_ingest_skips_what_the_check_found(messy, tmp_path):
    result = run_ingest(messy, {"root": str(messy), "format": "manifest", "size": 16}, tmp_path / "o", tmp_path / "w")
    got = {}
    for skip in result.skips:
        got.setdefault((skip["modality"], skip["image_id"]), []).append(skip["reason"])
    assert set(got) == set(EXPECTED)
    for key, text in EXPECTED.items():
        assert any(text in reason for reason in got[key]), (key, got[key])
    assert set(result.slices["image_id"]) == {"good"}


def test_totalsegmentator_phantom_checks_clean(tmp_path):
    from medsae.data.phantom import write_phantom

    root = write_phantom(tmp_path / "ts", subjects=3, seed=1, shape=(12, 12, 16))
    result = CliRunner().invoke(app, ["check", str(root)])
    assert result.exit_code == 0, result.output
    assert "(totalsegmentator); nothing written" in result.output and "no problems found" in result.output
    assert not (root / ".medsae").exists()
