"""Multi-label maps: a label map plus a label table gives the same per-slice structure areas as the
per-structure mask files; label tables in every common shape; unlisted label values are recorded."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from byod_fixtures import phantom_manifest

from medsae.data.build import run_ingest
from medsae.data.labelmap import LabelTableError, label_areas, parse_label_table, read_label_table
from medsae.data.phantom import write_phantom


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    return write_phantom(tmp_path_factory.mktemp("lm") / "ts", subjects=5, seed=2, shape=(24, 24, 30))


def _ingest(root, out, **params):
    return run_ingest(root, {"root": str(root), "size": 32, **params}, out / "out", out / "work")


def test_label_map_areas_equal_mask_file_areas(phantom, tmp_path):
    """The same phantom three ways: TotalSegmentator layout, manifest of mask folders, manifest of label maps."""
    layout = _ingest(phantom, tmp_path / "a")
    folders = tmp_path / "folders"
    phantom_manifest(phantom, folders / "manifest.csv")
    maps = tmp_path / "maps"
    phantom_manifest(phantom, maps / "manifest.csv", masks="labelmap")
    by_folder = _ingest(folders, tmp_path / "b", format="manifest")
    by_map = _ingest(maps, tmp_path / "c", format="manifest")
    assert len(layout.structures) > 500 and not by_map.skips
    pd.testing.assert_frame_equal(by_map.structures, by_folder.structures)
    pd.testing.assert_frame_equal(by_map.structures, layout.structures)
    keys = ["slice_uid", "plane", "idx", "n_structures", "body_region", "split"]
    pd.testing.assert_frame_equal(by_map.slices[keys], layout.slices[keys])
    scans = pd.read_parquet(by_map.out_dir / "scans.parquet")
    assert scans["unlisted_labels"].map(json.loads).map(len).eq(0).all()


def test_areas_match_a_direct_count_with_regions_and_unlisted_values(tmp_path):
    """A label map with a region (two values) and a value missing from the table, counted here with numpy."""
    rng = np.random.default_rng(0)
    labels = rng.choice([0, 0, 0, 1, 2, 3, 7], size=(18, 14, 10)).astype(np.uint8)
    affine = np.diag([1.5, 1.0, 2.0, 1.0])
    nib.save(nib.Nifti1Image(rng.normal(0, 50, labels.shape).astype(np.float32), affine), tmp_path / "img.nii.gz")
    nib.save(nib.Nifti1Image(labels, affine), tmp_path / "seg.nii.gz")
    (tmp_path / "labels.yaml").write_text("liver: 1\nspleen: 2\nabdomen: [1, 2, 3]\n")
    pd.DataFrame([{"image": "img.nii.gz", "mask": "seg.nii.gz", "labels": "labels.yaml", "modality": "ct",
                   "id": "case1"}]).to_csv(tmp_path / "manifest.csv", index=False)  # fmt: skip
    result = _ingest(tmp_path, tmp_path / "o", format="manifest", anatomy_filter=False)
    s, st = result.slices, result.structures.set_index(["slice_id", "structure"])["pixels"]
    table = {"liver": [1], "spleen": [2], "abdomen": [1, 2, 3]}
    for axis, rows in s.groupby("axis"):
        b, c = [a for a in range(3) if a != axis]
        moved = np.moveaxis(labels, axis, 0)  # RAS storage: the index grid is the stored one
        side = min(labels.shape[b], labels.shape[c])
        r0, c0 = (labels.shape[b] - side) // 2, (labels.shape[c] - side) // 2
        crop = moved[:, r0 : r0 + side, c0 : c0 + side]
        for name, values in table.items():
            direct = np.isin(crop, values).sum(axis=(1, 2))
            got = [int(st.get((sid, name), 0)) for sid in rows["slice_id"]]
            np.testing.assert_array_equal(got, direct[rows["idx"].to_numpy()])
    scans = pd.read_parquet(result.out_dir / "scans.parquet")
    assert json.loads(scans["unlisted_labels"].iloc[0]) == [7]
    names, by_axis = label_areas(labels.astype(np.float32), table, (2,), "none")  # float maps are rounded
    assert names == ["abdomen", "liver", "spleen"]
    np.testing.assert_array_equal(by_axis[2][:, 1], (labels == 1).sum(axis=(0, 1)))


def test_label_table_shapes_and_errors(tmp_path):
    assert parse_label_table({"liver": 1, "tumour": [2, 3], "background": 0}) == {"liver": [1], "tumour": [2, 3]}
    decathlon = {"name": "Task03", "labels": {"0": "background", "1": "liver", "2": "cancer"}}
    assert parse_label_table(decathlon) == {"cancer": [2], "liver": [1]}
    assert parse_label_table({1: "kidney", 2: "kidney", 3: "ureter"}) == {"kidney": [1, 2], "ureter": [3]}
    (tmp_path / "t.json").write_text(json.dumps({"labels": {"background": 0, "spleen": 1}}))
    assert read_label_table(tmp_path / "t.json") == {"spleen": [1]}
    bad = [
        ({"liver": "one"}, "not a non-negative integer"),
        ({"liver": -1}, "not a non-negative integer"),
        (["liver"], "expected a mapping"),
        ({"background": 0}, "no structure besides background"),
        ({"1": ""}, "is not a text"),
    ]
    for raw, message in bad:
        with pytest.raises(LabelTableError, match=message) as err:
            parse_label_table(raw)
        assert "\n" not in str(err.value)
    (tmp_path / "broken.yaml").write_text("liver: [1,\n")
    with pytest.raises(LabelTableError, match="label table broken.yaml: not valid YAML"):
        read_label_table(tmp_path / "broken.yaml")
    with pytest.raises(LabelTableError, match="expected a .yaml, .yml or .json file"):
        read_label_table(tmp_path / "labels.csv")
