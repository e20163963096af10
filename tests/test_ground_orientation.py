"""Grounding masks lie on the structures of the images the backbone saw, in both display orientations.

The phantom plants its structures with known CT values (``medsae.data.phantom.ORGANS``) at known
world positions, half of its CT scans stored LPS. Every mask the ground stage renders is checked
against sources independent of medsae's slicing code: its pixel count is the area the ingest
counted (``slice_structures``); it equals the mask cut from the NIfTI file with nibabel and numpy
by the documented display rule (docs/method.md#orientation); the image pixels it covers hold the
structure's planted value; and in the radiological view the liver (patient's right) lies left of
the spleen on axial and coronal slices.
"""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from medsae.data.build import run_ingest
from medsae.data.index import load_structures
from medsae.data.intensity import IntensityMap
from medsae.data.phantom import ORGANS, write_phantom
from medsae.data.render import render_index, render_slice
from medsae.ground.render import iter_rendered

#: CT value (HU) each structure is painted with
PLANTED_HU = {o.name: o.ct for o in ORGANS if o.modality in ("ct", "both")}


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    folder = tmp_path_factory.mktemp("orient") / "ts"
    return write_phantom(folder, subjects=4, seed=5, mri_fraction=0.0, shape=(28, 28, 36))


def _ingest(phantom, out, orientation: str):
    data = {"root": str(phantom), "size": 32, "modalities": ["ct"], "orientation": orientation}
    return run_ingest(phantom, data, out / "slices", out / "work").out_dir


def _sample(slices_dir) -> np.ndarray:
    """Per scan and sliced axis, the two slices with the most structure pixels."""
    index = render_index(slices_dir)
    area = load_structures(slices_dir).groupby("slice_id")["pixels"].sum()
    frame = pd.DataFrame({"slice_id": area.index, "pixels": area.to_numpy()})
    frame["scan"] = index.scan_of_slice[frame["slice_id"]]
    frame["axis"] = index.axis[frame["slice_id"]]
    top = frame.sort_values("pixels", ascending=False).groupby(["scan", "axis"]).head(2)
    assert set(top["axis"]) == {0, 1, 2}
    return np.sort(top["slice_id"].to_numpy())


def _numpy_mask(phantom, volume: str, name: str, axis: int, idx: int, orientation: str) -> np.ndarray:
    """The slice of a mask file as the documented display rule shows it, with nibabel and numpy only."""
    img = nib.load(phantom / volume.rsplit("/", 1)[0] / "segmentations" / f"{name}.nii.gz")
    if orientation == "radiological":
        img = nib.as_closest_canonical(img)  # RAS axes
    cut = np.take(np.asarray(img.dataobj) > 0, idx, axis=axis)
    side = min(cut.shape)
    r0, c0 = (cut.shape[0] - side) // 2, (cut.shape[1] - side) // 2
    upright = np.rot90(cut[r0 : r0 + side, c0 : c0 + side])  # 90 degrees counter-clockwise
    if orientation == "radiological" or axis in (0, 1):
        upright = upright[:, ::-1]  # then mirrored left-right
    return upright


@pytest.mark.parametrize("orientation", ["radiological", "stored"])
def test_masks_lie_on_the_rendered_structures(phantom, tmp_path, orientation):
    slices_dir = _ingest(phantom, tmp_path, orientation)
    index = render_index(slices_dir)
    structures = load_structures(slices_dir)
    counted = structures.set_index(["slice_id", "structure"])["pixels"]
    checked, planted_checked, sided = 0, 0, 0
    for sid in _sample(slices_dir):
        scan = index.scans.iloc[int(index.scan_of_slice[sid])]
        axis, idx = int(index.axis[sid]), int(index.idx[sid])
        shape = json.loads(scan["shape"])
        side = min(s for a, s in enumerate(shape) if a != axis)  # the crop's own size: no resize
        (rendered,) = list(iter_rendered(slices_dir, np.asarray([sid]), structures, score_size=side))
        masks = rendered.masks[0]
        assert set(masks) == set(structures.loc[structures["slice_id"] == sid, "structure"])
        image = render_slice(slices_dir, int(sid), size=side)  # the data stage's image at the same size
        imap = IntensityMap(scan["clip_lo"], scan["clip_hi"], scan["out_lo"], scan["out_hi"])
        for name, mask in masks.items():
            assert mask.shape == image.shape
            assert int(mask.sum()) == int(counted[(sid, name)]), (sid, name)
            expected = _numpy_mask(phantom, scan["volume"], name, axis, idx, orientation)
            assert np.array_equal(mask, expected), (orientation, sid, name)
            checked += 1
            if mask.sum() >= 8:  # the pixels under the mask hold the planted value (noise: 12 HU)
                planted = int(imap.apply(np.float32([PLANTED_HU[name]]))[0])
                assert abs(float(np.median(image[mask])) - planted) <= 12, (orientation, sid, name)
                planted_checked += 1
        if orientation == "radiological" and axis != 0 and {"liver", "spleen"} <= set(masks):
            columns = {n: np.nonzero(masks[n])[1].mean() for n in ("liver", "spleen")}
            assert columns["liver"] < columns["spleen"]  # the patient's right on the image's left
            sided += 1
    assert checked > 40 and planted_checked > 20
    assert orientation == "stored" or sided >= 1


def test_masks_of_2d_label_images_are_shown_as_stored(tmp_path):
    """16-bit PNGs with label-image masks and a label table: each mask is the label image's central crop."""
    from PIL import Image

    (tmp_path / "img").mkdir()
    (tmp_path / "seg").mkdir()
    rng = np.random.default_rng(0)
    labels, rows = {}, []
    for k in range(2):
        label = np.zeros((24, 30), dtype=np.uint8)
        label[3 : 9 + k, 1:18] = 1  # partly left of the 24-pixel central crop (columns 3..26)
        label[13:21, 12 + k : 29] = 2
        labels[f"xr{k}"] = label
        Image.fromarray(rng.integers(0, 60000, (24, 30)).astype(np.uint16)).save(tmp_path / "img" / f"xr{k}.png")
        Image.fromarray(label).save(tmp_path / "seg" / f"xr{k}.png")
        rows.append({"image": f"img/xr{k}.png", "mask": f"seg/xr{k}.png", "modality": "XR", "id": f"xr{k}"})
    pd.DataFrame(rows).to_csv(tmp_path / "manifest.csv", index=False)
    (tmp_path / "labels.yaml").write_text("lung: 1\nheart: 2\n")
    data = {"root": str(tmp_path), "format": "manifest", "labels": "labels.yaml", "size": 24}
    slices_dir = run_ingest(tmp_path, data, tmp_path / "o", tmp_path / "w").out_dir
    structures = load_structures(slices_dir)
    image_of = dict(enumerate(pd.read_parquet(slices_dir / "slices.parquet")["image_id"]))
    rendered = list(iter_rendered(slices_dir, np.asarray(list(image_of)), structures, score_size=24))
    assert sum(len(scan.slice_ids) for scan in rendered) == 2
    for scan in rendered:
        for sid, image, masks in zip(scan.slice_ids, scan.images, scan.masks, strict=True):
            assert np.array_equal(image, render_slice(slices_dir, int(sid)))
            crop = labels[image_of[int(sid)]][:, 3:27]
            assert set(masks) == {"lung", "heart"}
            assert np.array_equal(masks["lung"], crop == 1) and np.array_equal(masks["heart"], crop == 2)
