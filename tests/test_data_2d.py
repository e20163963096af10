"""2-D images with a manifest: 16-bit grey PNGs (label-image masks), 8-bit RGB and JPEG pictures; one slice
each, no plane, windowing off; manifest metadata lands in slices.parquet, SQL and the explainer's line."""

from __future__ import annotations

import duckdb
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from medsae.data.index import load_slices, load_structures
from medsae.data.render import render_slice

H, W = 24, 30  # crop: the central 24 x 24 square, columns 3..26


def _grey16(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 200, (H, W)) + np.arange(W) * 900 + seed * 1000).astype(np.uint16)


def _labels(seed: int) -> np.ndarray:
    out = np.zeros((H, W), dtype=np.uint8)
    out[4 : 10 + seed, 2:20] = 1  # 'lung', partly outside the crop (columns 2 and 27+)
    out[12:20, 10 + seed : 29] = 2  # 'heart'
    return out


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    root = tmp_path_factory.mktemp("xr")
    (root / "img").mkdir()
    (root / "seg").mkdir()
    rows = []
    for k in range(3):
        Image.fromarray(_grey16(k)).save(root / "img" / f"cxr{k}.png")
        Image.fromarray(_labels(k)).save(root / "seg" / f"cxr{k}.png")
        rows.append({"image": f"img/cxr{k}.png", "mask": f"seg/cxr{k}.png", "modality": "XR", "site": "B",
                     "sex": "F", "age": 50 + k, "pathology": "pneumonia" if k else "", "view": "PA"})  # fmt: skip
    rgb = np.zeros((H, W, 3), dtype=np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, np.arange(W, dtype=np.uint8)[None, :] * 8, 30
    Image.fromarray(rgb).save(root / "img" / "tile.png")
    rows.append({"image": "img/tile.png", "modality": "pathology", "id": "tile-1", "view": "HE"})
    Image.fromarray(np.tile(np.arange(W, dtype=np.uint8) * 8, (H, 1))).save(root / "img" / "photo.jpg", quality=95)
    rows.append({"image": "img/photo.jpg", "modality": "photo", "view": ""})
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    (root / "labels.yaml").write_text("lung: 1\nheart: 2\n")
    return root


@pytest.fixture(scope="module")
def ingested(collection, tmp_path_factory):
    from medsae.cli.data import ingest

    out = tmp_path_factory.mktemp("xr_out")
    summary = ingest(collection, {"format": "manifest", "labels": "labels.yaml", "size": 24}, out / "o",
                     out / "r.duckdb")  # fmt: skip
    return out / "o", out / "r.duckdb", summary


def test_one_flat_slice_per_image_with_areas_in_the_crop(ingested):
    out, _, summary = ingested
    s = load_slices(out).set_index("image_id")
    assert summary["skipped"] == 0 and len(s) == 5
    assert summary["slices_by_modality_plane"] == {"pathology/image": 1, "photo/image": 1, "xr/image": 3}
    assert s["plane"].isna().all() and (s["idx"] == 0).all() and (s["position"] == 0).all()
    assert s.loc["cxr1", "slice_uid"] == "xr/cxr1/image/0" and s.loc["tile-1", "modality"] == "pathology"
    st = load_structures(out).set_index(["slice_id", "structure"])["pixels"]
    for k in range(3):
        crop = _labels(k)[:, 3:27]
        sid = int(s.loc[f"cxr{k}", "slice_id"])
        assert st.get((sid, "lung"), 0) == (crop == 1).sum() and st.get((sid, "heart"), 0) == (crop == 2).sum()
    assert s.loc["photo", "n_structures"] == 0  # no mask: kept, nothing present


def test_windowing_off(collection, ingested):
    """16-bit: stretched from the image's min to max; 8-bit (RGB as grey): values unchanged."""
    out, _, _ = ingested
    s = load_slices(out).set_index("image_id")
    image = _grey16(2).astype(np.float64)
    expected = np.floor((image - image.min()) / (image.max() - image.min()) * 255)[:, 3:27]
    got = render_slice(out, int(s.loc["cxr2", "slice_id"]))
    assert got.shape == (24, 24) and np.abs(got.astype(int) - expected).max() <= 1
    grey = np.asarray(Image.open(collection / "img" / "tile.png").convert("L"))[:, 3:27]
    np.testing.assert_array_equal(render_slice(out, int(s.loc["tile-1", "slice_id"])), grey)
    photo = np.asarray(Image.open(collection / "img" / "photo.jpg").convert("L"))[:, 3:27]
    np.testing.assert_array_equal(render_slice(out, int(s.loc["photo", "slice_id"])), photo)


def test_manifest_metadata_reaches_sql_and_the_explainer_line(ingested):
    from medsae.interp.metadata import format_lines

    out, registry, _ = ingested
    s = load_slices(out).set_index("slice_id", drop=False)
    row = s[s["image_id"] == "cxr1"].iloc[0]
    assert (row["institute"], row["sex"], row["age"], row["age_bin"], row["pathology"], row["view"]) == (
        "B", "f", 51.0, "40-60", "pneumonia", "PA")  # fmt: skip
    with duckdb.connect(str(registry), read_only=True) as con:
        sql = con.execute(
            "SELECT image_id, institute, sex, age, pathology FROM slices WHERE modality = 'xr' ORDER BY image_id"
        ).fetchall()
    assert sql == [("cxr0", "B", "f", 50.0, None), ("cxr1", "B", "f", 51.0, "pneumonia"),
                   ("cxr2", "B", "f", 52.0, "pneumonia")]  # fmt: skip
    line = format_lines(s, load_structures(out), [int(row["slice_id"])])[int(row["slice_id"])]
    assert line.startswith("XR; thorax; pos 0.00; female; age 40-60; ")  # thorax: from the heart mask
    assert "pathology: pneumonia" in line and "site: b" in line.lower() and "heart" in line
