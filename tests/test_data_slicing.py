"""Slicing maths: plane names from affines, windows, MRI percentiles, resampling, masks on other grids."""

from __future__ import annotations

import numpy as np
import pytest
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, ornt_transform

from medsae.data.intensity import CT_WINDOWS, ct_map, ct_window, mri_map
from medsae.data.slicing import crop_bounds, mask_to_grid, planes_of, resample_axes, take_slices, to_display
from medsae.data.volume import SliceOptions, prepare

# the study's CT window table (docs/method.md#ct-windows), typed in independently of medsae.data.intensity
APPENDIX_A = """
ct thorax-abdomen-pelvis -100 1400|ct neck-thorax-abdomen-pelvis -100 1400|ct abdomen-pelvis 50 1000
ct thorax-neck -200 1400|ct polytrauma -50 1400|ct thorax-abdomen -100 1400|ct whole body -50 1400
ct pelvis 80 1400|ct thorax-chest -200 1400|ct thorax -200 1400|ct chest -200 1400|ct abdomen 50 1000
ct neck 50 1000|ct head 40 400|ct polytrauma head 40 400|ct orbita 60 1000|ct headbasis-felsenleg 120 1200
ct gesichtshead 120 1200|ct angiography neck-thx-abd-pelvis-leg 120 1000|ct angiography head 100 900
ct angiography pelvis-leg 120 1000|ct angiography thorax-abdomen-pelvis 120 1000
ct angiography abdomen-pelvis-leg 120 1000|ct angiography abdomen-pelvis 120 1000
ct angiography thorax 100 1000|ct angiography neck 100 900|ct heart-thorakale aorta 120 1000
ct aortic valve 120 1000|ct heart 120 1000|ct left artrium 120 1000|ct coronary arteries 120 1000
ct spine 200 2000|ct upper leg left 200 2000|ct hip right 200 2000|ct upper limb both 200 2000
ct lower limb left 200 2000|ct intervention 50 1000|ct operation 50 1000
"""


def _appendix() -> dict[str, tuple[float, float]]:
    out = {}
    for item in APPENDIX_A.replace("\n", "|").split("|"):
        if item.strip():
            *name, c, w = item.split()
            out[" ".join(name)] = (float(c), float(w))
    return out


def _affine(codes: str, shape=(6, 7, 8), spacing=(1.0, 2.0, 3.0)):
    """A RAS grid re-stored in another orientation: (shape, affine, orientation transform)."""
    ras = np.diag([*spacing, 1.0])
    ornt = ornt_transform(axcodes2ornt("RAS"), axcodes2ornt(tuple(codes)))
    stored_shape = tuple(np.array(shape)[ornt[:, 0].astype(int)].tolist())
    return stored_shape, ras @ inv_ornt_aff(ornt, shape), ornt


def test_window_table_matches_appendix_a():
    table = _appendix()
    assert len(table) == 38 and table == {k: tuple(map(float, v)) for k, v in CT_WINDOWS.items()}
    for name, (c, w) in table.items():
        messy = "  " + name.upper().replace(" ", "   ") + " "
        assert ct_window(messy, (0, 1)) == (c, w, "table")
    assert ct_window("ct knee", (40, 400)) == (40.0, 400.0, "default")
    assert ct_window(None, (10, 20)) == (10.0, 20.0, "default")


@pytest.mark.parametrize("scaling", ["volume", "window"])
def test_ct_windowing_matches_direct_computation(scaling):
    rng = np.random.default_rng(0)
    vol = rng.normal(0, 300, size=(20, 20, 10)).astype(np.float32)
    c, w, _ = ct_window("CT Thorax", (0, 0))  # (-200, 1400): [-900, 500]
    u8 = ct_map(vol, c, w, scaling).apply(vol)
    clipped = np.clip(vol.astype(np.float64), c - w / 2, c + w / 2)
    lo, hi = (clipped.min(), clipped.max()) if scaling == "volume" else (c - w / 2, c + w / 2)
    expected = np.floor((clipped - lo) / (hi - lo) * 255).astype(np.uint8)
    assert u8.dtype == np.uint8
    assert np.abs(u8.astype(int) - expected).max() <= 1
    assert (u8 == expected).mean() > 0.999


def test_mri_percentile_mapping():
    rng = np.random.default_rng(1)
    vol = np.abs(rng.normal(200, 80, size=(30, 30, 6))).astype(np.float32)
    vol[:5] = 0  # background
    imap = mri_map(vol)
    p1, p99 = np.percentile(vol[vol > 0], [1, 99])
    assert np.isclose(imap.clip_lo, p1) and np.isclose(imap.clip_hi, p99)
    u8 = imap.apply(vol)
    assert u8[:5].max() == 0 and u8.max() == 255
    inside = (vol > p1) & (vol < p99)
    expected = np.floor((vol[inside] - p1) / (p99 - p1) * 255)
    assert np.abs(u8[inside] - expected).max() <= 1


@pytest.mark.parametrize(
    "codes, planes",
    [
        ("RAS", ("sagittal", "coronal", "axial")),
        ("LPS", ("sagittal", "coronal", "axial")),
        ("LAS", ("sagittal", "coronal", "axial")),
        ("PIR", ("coronal", "axial", "sagittal")),
        ("SRA", ("axial", "sagittal", "coronal")),
    ],
)
def test_plane_names_follow_the_affine(codes, planes):
    _, affine, _ = _affine(codes)
    assert planes_of(affine) == planes


def test_reorient_gives_the_same_grid_for_any_storage():
    rng = np.random.default_rng(2)
    ras = rng.normal(size=(6, 7, 8)).astype(np.float32)
    for codes in ("LPS", "PIR", "SRA"):
        _, affine, ornt = _affine(codes)
        stored = apply_orientation(ras, ornt)
        prep = prepare(stored, affine, "ct", SliceOptions(reorient=True))
        np.testing.assert_array_equal(prep.array, ras)
        assert prep.planes == ("sagittal", "coronal", "axial")


def test_mri_slices_the_thinnest_axis_and_resamples_in_plane():
    _, affine, _ = _affine("RAS", spacing=(2.0, 3.0, 6.0))
    vol = np.arange(10 * 12 * 4, dtype=np.float32).reshape(10, 12, 4)
    prep = prepare(vol, affine, "mri", SliceOptions())
    assert prep.axes == (2,) and prep.planes[2] == "axial"
    # in-plane spacings 2 and 3 -> both 2 mm: axis 1 grows from 12 to round(12 * 3 / 2) = 18
    assert prep.array.shape == (10, 18, 4)
    # linear interpolation along axis 1 at coordinates k * 2/3 (independent: np.interp per line)
    expected = np.apply_along_axis(lambda line: np.interp(np.arange(18) * 2 / 3, np.arange(12), line), 1, vol)
    np.testing.assert_allclose(prep.array, expected, rtol=1e-5)
    same = prepare(vol, affine, "mri", SliceOptions(resample_mri=False))
    assert same.array.shape == vol.shape


def test_nearest_resampling_of_masks():
    mask = np.zeros((4, 6, 2), dtype=bool)
    mask[:, 3:, :] = True
    out = resample_axes(mask, np.array([1.0, 3.0, 1.0]), (1,), 1.0, order=0)
    assert out.shape == (4, 18, 2)
    expected = np.zeros(18, dtype=bool)
    expected[np.rint(np.arange(18) / 3).clip(0, 5).astype(int) >= 3] = True
    np.testing.assert_array_equal(out[0, :, 0], expected)


def test_mask_on_a_finer_grid_is_resampled_nearest():
    image_affine = np.diag([2.0, 2.0, 2.0, 1.0])
    image_affine[:3, 3] = [10.0, -4.0, 0.0]
    fine_affine = np.diag([1.0, 1.0, 1.0, 1.0])
    fine_affine[:3, 3] = image_affine[:3, 3] - 0.5  # same field of view, voxel centres shifted
    rng = np.random.default_rng(3)
    fine = rng.random((8, 10, 12)) > 0.5
    out = mask_to_grid(fine, fine_affine, (4, 5, 6), image_affine)
    assert out is not None and out.shape == (4, 5, 6)
    # image voxel (i, j, k) sits at fine index 2 * i + 0.5 -> rounds to 2 * i (numpy rounds half to even)
    expected = fine[np.ix_(*(np.rint(2 * np.arange(n) + 0.5).astype(int).clip(0, m - 1) for n, m in
                            zip((4, 5, 6), (8, 10, 12), strict=True)))]  # fmt: skip
    np.testing.assert_array_equal(out, expected)
    # a mask covering a different field of view is rejected
    assert mask_to_grid(fine[:4], fine_affine, (4, 5, 6), image_affine) is None


def test_crop_and_display_orientation():
    assert crop_bounds(10, 6) == (slice(2, 8), slice(0, 6))
    assert crop_bounds(5, 9) == (slice(0, 5), slice(2, 7))
    vol = np.arange(3 * 4 * 5).reshape(3, 4, 5)
    cropped = take_slices(vol, 0, np.array([1]), "center_square")  # rows = axis 1 (4), cols = axis 2 (5) -> 4x4
    np.testing.assert_array_equal(cropped[0], vol[1, :, 0:4])
    img = np.array([[[1, 2], [3, 4]]])
    # study: rotate 90 deg counter-clockwise; slices along axes 0 and 1 are mirrored left-right too
    np.testing.assert_array_equal(to_display(img, 2)[0], [[2, 4], [1, 3]])
    np.testing.assert_array_equal(to_display(img, 0)[0], [[4, 2], [3, 1]])
