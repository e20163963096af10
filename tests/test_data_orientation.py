"""One display orientation for every source: a volume stored RAS and LPS renders identically (radiological,
the default); the study's 'stored' display rotates axial by 180° and mirrors coronal/sagittal."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, ornt_transform

from medsae.data.build import run_ingest
from medsae.data.config import DataSpec
from medsae.data.render import iter_scan_images
from medsae.data.volume import SliceOptions

N = 16
MARK = (12, 13, 11)  # RAS voxel of a blob to the patient's right, anterior and superior


@pytest.fixture(scope="module")
def stored_twice(tmp_path_factory):
    """One volume with a right-anterior-superior blob, saved RAS and re-stored LPS; a manifest of both."""
    root = tmp_path_factory.mktemp("orient")
    ras = np.zeros((N, N, N), dtype=np.int16)
    x, y, z = MARK
    ras[x - 1 : x + 2, y - 1 : y + 2, z - 1 : z + 2] = 200
    ras[4, 4, 4] = -50  # something else, so the volume's range is not the blob alone
    affine = np.diag([1.5, 1.2, 2.0, 1.0])
    affine[:3, 3] = (-12, -9, 40)
    nib.save(nib.Nifti1Image(ras, affine), root / "ras.nii.gz")
    ornt = ornt_transform(axcodes2ornt("RAS"), axcodes2ornt("LPS"))
    nib.save(nib.Nifti1Image(apply_orientation(ras, ornt), affine @ inv_ornt_aff(ornt, ras.shape)), root / "lps.nii.gz")
    pd.DataFrame({"image": ["ras.nii.gz", "lps.nii.gz"], "modality": ["ct", "ct"]}).to_csv(
        root / "manifest.csv", index=False
    )
    return root


def _images(root, out, orientation):
    data = {"root": str(root), "format": "manifest", "size": N, "orientation": orientation}
    result = run_ingest(root, data, out / "o", out / "w")
    images = np.concatenate([imgs for _, imgs in iter_scan_images(out / "o")])
    s = result.slices
    return {(r.image_id, r.plane, r.idx): images[r.slice_id] for r in s.itertuples()}, s


def test_radiological_display_is_the_same_for_any_storage(stored_twice, tmp_path):
    shown, s = _images(stored_twice, tmp_path, "radiological")
    assert len(s) == 2 * 3 * N
    for (image_id, plane, idx), image in shown.items():
        if image_id == "ras":
            np.testing.assert_array_equal(image, shown[("lps", plane, idx)], err_msg=f"{plane} {idx}")
    x, y, z = MARK

    def blob(image):  # (row, column) of the blob's centre
        rows, cols = np.nonzero(image > 200)
        return rows.mean(), cols.mean()

    r, c = blob(shown[("ras", "axial", z)])  # seen from the feet: anterior up, patient's right on the left
    assert r < N / 2 and c < N / 2
    r, c = blob(shown[("ras", "coronal", y)])  # seen from the front: superior up, patient's right on the left
    assert r < N / 2 and c < N / 2
    r, c = blob(shown[("ras", "sagittal", x)])  # seen from the patient's left: superior up, anterior left
    assert r < N / 2 and c < N / 2


def test_stored_display_depends_on_storage_as_the_study(stored_twice, tmp_path):
    shown, _ = _images(stored_twice, tmp_path, "stored")
    for (image_id, plane, idx), image in shown.items():
        if image_id != "ras":
            continue
        if plane == "axial":
            np.testing.assert_array_equal(shown[("lps", plane, idx)], np.rot90(image, 2))
        else:  # LPS flips x and y: the coronal/sagittal index runs backwards and the picture is mirrored
            np.testing.assert_array_equal(shown[("lps", plane, N - 1 - idx)], image[:, ::-1])


def test_presets_and_old_artifacts():
    assert DataSpec(root="d").orientation == "radiological" and DataSpec(root="d").reoriented
    study = DataSpec(root="d", preset="study")
    assert (study.orientation, study.reoriented) == ("stored", False)
    assert DataSpec(root="d", preset="study", orientation="radiological").orientation == "radiological"
    assert DataSpec.model_validate(study.model_dump()) == study  # a dumped spec validates to itself
    with pytest.raises(ValueError, match="reorient: false needs orientation: stored"):
        DataSpec(root="d", reorient=False)
    assert DataSpec(root="./d/").root == "d"
    old = SliceOptions.from_json({"size": 64, "reorient": False})  # render.json written before the option
    assert (old.orientation, old.reorient) == ("stored", False)
