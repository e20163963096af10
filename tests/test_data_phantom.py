"""The phantom dataset: TotalSegmentator layout, plausible anatomy, distinct intensities, idempotence."""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from medsae.data.phantom import ORGANS, write_phantom
from medsae.errors import MedsaeError

CT_COLUMNS = (
    "image_id;age;gender;institute;study_type;split;manufacturer;scanner_model;kvp;pathology;pathology_location"
)
MRI_COLUMNS = (
    "image_id;age;gender;institute;study_type;split;manufacturer;scanner_model;magnetic_field_strength;"
    "scanning_sequence;echo_time;repetition_time;slice_thickness;source"
)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    return write_phantom(tmp_path_factory.mktemp("ph") / "ts", subjects=12, seed=3, shape=(32, 32, 40))


def _scans(root):
    for name, vol in (("CT_Dataset_v201", "ct.nii.gz"), ("MRI_Dataset_v200", "mri.nii.gz")):
        meta = pd.read_csv(root / name / "meta.csv", sep=";", dtype=str)
        for image_id in meta["image_id"]:
            yield name, image_id, root / name / image_id / vol, root / name / image_id / "segmentations"


def test_layout_matches_totalsegmentator(phantom):
    assert (phantom / "CT_Dataset_v201" / "meta.csv").read_text().splitlines()[0] == CT_COLUMNS
    assert (phantom / "MRI_Dataset_v200" / "meta.csv").read_text().splitlines()[0] == MRI_COLUMNS
    ct = pd.read_csv(phantom / "CT_Dataset_v201" / "meta.csv", sep=";", dtype=str)
    mri = pd.read_csv(phantom / "MRI_Dataset_v200" / "meta.csv", sep=";", dtype=str)
    assert len(ct) + len(mri) == 12 and len(mri) == round(12 * 0.34)
    assert set(ct["image_id"]) & set(mri["image_id"]), "image ids must repeat across modalities"
    meta = pd.concat([ct, mri])
    assert {"A", "D", "E"} <= set(meta["institute"]) and len(set(meta["institute"])) >= 5
    assert set(meta["gender"]) == {"m", "f"}
    ages = meta["age"].astype(float)
    bins = pd.cut(ages, [0, 40, 60, 80, np.inf]).nunique()
    assert bins >= 3
    names_by_modality = {}
    for dataset, _, volume, seg in _scans(phantom):
        assert volume.is_file(), volume
        names = sorted(p.name[: -len(".nii.gz")] for p in seg.glob("*.nii.gz"))
        names_by_modality.setdefault(dataset, set()).add(tuple(names))
    ct_names = names_by_modality["CT_Dataset_v201"]
    mri_names = names_by_modality["MRI_Dataset_v200"]
    assert len(ct_names) == 1 and len(mri_names) == 1, "every scan of a modality has every mask"
    ct_names, mri_names = set(next(iter(ct_names))), set(next(iter(mri_names)))
    assert len(ct_names) >= 12 and len(mri_names) >= 12
    organs = {"brain", "heart", "aorta", "liver", "spleen", "kidney_left", "kidney_right", "urinary_bladder"}
    assert organs <= ct_names
    assert {"vertebrae_L1", "vertebrae_L5", "femur_left", "femur_right"} <= ct_names
    assert {"vertebrae", "lung_left", "lung_right"} <= mri_names and "vertebrae_L1" not in mri_names


def test_orientations_spacings_and_coverage(phantom):
    codes, spacings, z_ranges = set(), set(), []
    for _, _, volume, _ in _scans(phantom):
        img = nib.load(volume)
        codes.add("".join(nib.aff2axcodes(img.affine)))
        spacings.add(tuple(np.round(img.header.get_zooms()[:3], 2)))
        corners = np.array([[0, 0, 0], np.array(img.shape) - 1])
        z = nib.affines.apply_affine(img.affine, corners)[:, 2]
        z_ranges.append((z.min(), z.max()))
    assert {"RAS", "LPS"} <= codes and len(codes) >= 3  # one MRI is stored with permuted axes
    assert len(spacings) >= 5
    assert any(not np.isclose(s[0], s[1]) for s in spacings), "some MRI is anisotropic in-plane"
    lows = sorted(lo for lo, _ in z_ranges)
    assert lows[-1] - lows[0] > 400, "subjects cover different body ranges"


def test_masks_disjoint_with_distinct_intensities(phantom):
    """Each structure's CT voxels carry its own HU value: the ground truth later tests rely on."""
    expected = {o.name: o.ct for o in ORGANS if o.modality in ("ct", "both")}
    means: dict[str, list[float]] = {}
    for dataset, _, volume, seg in _scans(phantom):
        if dataset != "CT_Dataset_v201":
            continue
        ct = np.asanyarray(nib.load(volume).dataobj).astype(np.float64)
        union = np.zeros(ct.shape, dtype=np.int32)
        for path in seg.glob("*.nii.gz"):
            mask = np.asanyarray(nib.load(path).dataobj) > 0
            union += mask
            if mask.sum() >= 20:
                means.setdefault(path.name[:-7], []).append(float(ct[mask].mean()))
        assert union.max() <= 1, "masks overlap"
    assert len(means) >= 12
    for name, values in means.items():
        assert abs(np.mean(values) - expected[name]) < 15, (name, np.mean(values), expected[name])
    organs = ["liver", "spleen", "kidney_left", "heart", "aorta", "urinary_bladder", "brain", "femur_left"]
    organ_means = sorted(np.mean(means[o]) for o in organs if o in means)
    assert min(np.diff(organ_means)) > 10


def test_anatomy_ordered_along_body_axis(phantom):
    """World z of structure centroids: head above thorax above abdomen above pelvis above thighs."""
    z_of: dict[str, list[float]] = {}
    names = ("brain", "heart", "liver", "kidney_left", "urinary_bladder", "femur_left")
    for _, _, _, seg in _scans(phantom):
        for name in names:
            path = seg / f"{name}.nii.gz"
            if not path.is_file():
                continue
            img = nib.load(path)
            vox = np.argwhere(np.asanyarray(img.dataobj) > 0)
            if len(vox) > 10:
                z_of.setdefault(name, []).append(nib.affines.apply_affine(img.affine, vox)[:, 2].mean())
    order = [np.mean(z_of[n]) for n in names]
    assert order == sorted(order, reverse=True), order


def test_idempotent_and_regenerates_on_new_parameters(tmp_path):
    root = write_phantom(tmp_path / "p", subjects=3, seed=1, shape=(16, 16, 20))
    volume = next(root.glob("CT_Dataset_v201/*/ct.nii.gz"))
    stamp = os.stat(volume).st_mtime_ns
    write_phantom(root, subjects=3, seed=1, shape=(16, 16, 20))
    assert os.stat(volume).st_mtime_ns == stamp
    before = nib.load(volume).get_fdata()
    write_phantom(root, subjects=3, seed=2, shape=(16, 16, 20))
    after = nib.load(next(root.glob("CT_Dataset_v201/*/ct.nii.gz"))).get_fdata()
    assert before.shape == after.shape and not np.array_equal(before, after)


def test_refuses_to_overwrite_foreign_data(tmp_path):
    (tmp_path / "CT_Dataset_v201").mkdir()
    with pytest.raises(MedsaeError, match="not written by"):
        write_phantom(tmp_path, subjects=2)


def test_cli_phantom(tmp_path):
    from medsae.cli.data import app

    args = ["phantom", str(tmp_path / "x"), "--subjects", "3", "--shape", "16,16,20"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "2 CT and 1 MRI" in result.output
    assert len(list((tmp_path / "x").glob("*/s*/segmentations"))) == 3
