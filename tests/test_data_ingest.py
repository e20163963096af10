"""Ingest end to end on small phantoms: areas, planes, filter, splits, rendering, robustness, resume."""

from __future__ import annotations

import gzip
import io
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from medsae.data.build import run_ingest
from medsae.data.config import DataSpec, PhantomSpec
from medsae.data.index import load_skipped, load_slices, load_structures, presence_matrix
from medsae.data.phantom import write_phantom
from medsae.data.render import iter_scan_images, render_slice, thumbnail, thumbnail_path
from medsae.data.splits import assign_splits, load_or_create_splits
from medsae.data.stage import run_slices
from medsae.data.totalsegmentator import dataset_manifest
from medsae.errors import MissingInputError
from medsae.stage import StageContext

SHAPE = (32, 32, 40)
PLANE = {"L": "sagittal", "R": "sagittal", "A": "coronal", "P": "coronal", "S": "axial", "I": "axial"}
DATASET = {"ct": "CT_Dataset_v201", "mri": "MRI_Dataset_v200"}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_phantom(tmp_path_factory.mktemp("data") / "ts", subjects=12, seed=5, shape=SHAPE)


@pytest.fixture(scope="module")
def index(dataset, tmp_path_factory):
    base = tmp_path_factory.mktemp("ingest")
    run_ingest(dataset, {"root": str(dataset), "size": 32, "workers": 2}, base / "out", base / "work")
    return base / "out"


def _ingest(root, base: Path, **params):
    params = {"root": str(root), "size": 32, **params}
    return run_ingest(root, params, base / "out", base / "work")


def _direct_counts(mask: np.ndarray, axis: int) -> np.ndarray:
    """Pixels per slice along ``axis`` inside the central square crop, straight from numpy."""
    moved = np.moveaxis(mask, axis, 0)
    rows, cols = moved.shape[1:]
    side = min(rows, cols)
    r0, c0 = (rows - side) // 2, (cols - side) // 2
    return (moved[:, r0 : r0 + side, c0 : c0 + side] > 0).reshape(len(moved), -1).sum(axis=1)


def test_index_layout_and_order(index):
    s = load_slices(index)
    assert s["slice_id"].tolist() == list(range(len(s)))
    key = s[["modality", "image_id", "plane", "idx"]]
    assert key.equals(key.sort_values(["modality", "image_id", "plane", "idx"]).reset_index(drop=True))
    assert (s["slice_uid"] == s["modality"] + "/" + s["image_id"] + "/" + s["plane"] + "/" + s["idx"].astype(str)).all()
    assert set(s["modality"]) == {"ct", "mri"}
    ct_planes = s[s["modality"] == "ct"].groupby("image_id")["plane"].nunique()
    assert (ct_planes == 3).all()
    assert (s[s["modality"] == "mri"].groupby("image_id")["plane"].nunique() == 1).all()
    np.testing.assert_allclose(s["position"], s["idx"] / (s["n_along"] - 1))
    assert s["age_bin"].isin(["<40", "40-60", "60-80", ">=80"]).all()
    assert s["sex"].isin(["m", "f"]).all()


def test_structure_pixels_equal_direct_numpy_count(dataset, index):
    """Every (slice, structure) area equals a count made here from the mask files; planes follow affines.

    The default radiological display slices every volume on its closest-RAS grid, so the files are
    brought to RAS here with nibabel (``as_closest_canonical``) before counting."""
    s = load_slices(index)
    st = load_structures(index)
    vocab = sorted(set(st["structure"]))
    areas = np.zeros((len(s), len(vocab)), dtype=np.int64)
    areas[st["slice_id"].to_numpy(), [vocab.index(x) for x in st["structure"]]] = st["pixels"].to_numpy()
    checked = 0
    for (modality, image_id), scan in s.groupby(["modality", "image_id"]):
        folder = dataset / DATASET[modality] / image_id
        img = nib.as_closest_canonical(nib.load(folder / f"{modality}.nii.gz"))
        zooms = img.header.get_zooms()
        codes = nib.aff2axcodes(img.affine)
        for axis, rows in scan.groupby("axis"):
            assert (rows["plane"] == PLANE[codes[axis]]).all(), (modality, image_id, axis)
        if modality == "mri":
            inplane = [zooms[a] for a in range(3) if a != scan["axis"].iloc[0]]
            if abs(inplane[0] - inplane[1]) > 1e-3:
                continue  # resampled in-plane: covered by test_data_slicing
        for path in sorted((folder / "segmentations").glob("*.nii.gz")):
            name = path.name[:-7]
            mask = np.asanyarray(nib.as_closest_canonical(nib.load(path)).dataobj)
            for axis, rows in scan.groupby("axis"):
                direct = _direct_counts(mask, int(axis))
                col = areas[:, vocab.index(name)] if name in vocab else np.zeros(len(s), dtype=np.int64)
                got = col[rows["slice_id"].to_numpy()]
                np.testing.assert_array_equal(got, direct[rows["idx"].to_numpy()])
                # slices dropped by the anatomy filter hold no structure at all in this scan
                checked += int((got > 0).sum())
    assert checked > 1000


def test_reoriented_and_strided_index(dataset, tmp_path):
    """reorient=True: axis 0/1/2 are sagittal/coronal/axial everywhere; areas match nibabel's RAS copy."""
    result = _ingest(dataset, tmp_path, reorient=True, stride=2, modalities=["ct"])
    s, st = result.slices, result.structures
    assert (s["plane"] == s["axis"].map({0: "sagittal", 1: "coronal", 2: "axial"})).all()
    assert (s["idx"] % 2 == 0).all()
    table = st.set_index(["slice_id", "structure"])["pixels"]
    seen = 0
    for image_id in ("s0001", "s0004"):  # thorax CTs, one stored LPS, one RAS
        scan = s[s["image_id"] == image_id]
        mask = np.asanyarray(nib.as_closest_canonical(nib.load(
            dataset / "CT_Dataset_v201" / image_id / "segmentations" / "heart.nii.gz")).dataobj)  # fmt: skip
        for axis, rows in scan.groupby("axis"):
            got = np.array([table.get((sid, "heart"), 0) for sid in rows["slice_id"]])
            np.testing.assert_array_equal(got, _direct_counts(mask, int(axis))[rows["idx"].to_numpy()])
            seen += got.sum()
    assert seen > 0


def test_anatomy_filter_keeps_the_contiguous_range(dataset, index, tmp_path):
    s = load_slices(index)
    for _, view in s.groupby(["modality", "image_id", "plane"]):
        idx = np.sort(view["idx"].to_numpy())
        assert (np.diff(idx) == 1).all()
        ends = view.set_index("idx").loc[[idx[0], idx[-1]], "n_structures"]
        assert (ends > 0).all()
    full = load_slices(_ingest(dataset, tmp_path, anatomy_filter=False).out_dir)
    assert len(full) > len(s)
    kept = full.merge(s[["slice_uid"]], on="slice_uid", how="left", indicator=True)
    dropped = kept[kept["_merge"] == "left_only"]
    assert (dropped["n_structures"] == 0).all()


def test_presence_matrix_and_body_regions(index):
    s = load_slices(index)
    st = load_structures(index)
    present, vocab = presence_matrix(index, threshold=3)
    assert present.shape == (len(s), len(vocab)) and present.dtype == bool
    direct = np.zeros(present.shape, dtype=bool)
    keep = st[st["pixels"] > 3]
    direct[keep["slice_id"].to_numpy(), [vocab.index(x) for x in keep["structure"]]] = True
    np.testing.assert_array_equal(present.toarray(), direct)
    count0 = st.groupby("slice_id").size().reindex(s["slice_id"], fill_value=0).to_numpy()
    np.testing.assert_array_equal(s["n_structures"].to_numpy(), count0)
    with_brain = set(st.loc[st["structure"] == "brain", "slice_id"])
    only_brain_or_skull = st.groupby("slice_id")["structure"].agg(set).map(lambda x: x <= {"brain", "skull"})
    head = [sid for sid, flag in only_brain_or_skull.items() if flag and sid in with_brain]
    assert head and (s.loc[head, "body_region"] == "head").all()
    femur_only = st.groupby("slice_id")["structure"].agg(set).map(lambda x: x <= {"femur_left", "femur_right"})
    assert (s.loc[femur_only[femur_only].index, "body_region"] == "extremities").all()


def test_splits_hold_out_institutes_and_are_stable(dataset, index, tmp_path):
    s = load_slices(index)
    per_scan = s.groupby(["modality", "image_id"])["split"].nunique()
    assert (per_scan == 1).all(), "a scan in two splits"
    scans = s.drop_duplicates(["modality", "image_id"])
    assert (scans.loc[scans["institute"].isin(["A", "D", "E"]), "split"] == "test").all()
    assert (scans.loc[~scans["institute"].isin(["A", "D", "E"]), "split"] != "test").all()
    assert {"train", "val", "test"} <= set(scans["split"])
    stored = list((dataset / ".medsae" / "splits").glob("*.parquet"))
    assert len(stored) == 1
    again = load_slices(_ingest(dataset, tmp_path, modalities=["ct"]).out_dir)
    merged = again.drop_duplicates("image_id").merge(scans, on=["modality", "image_id"], suffixes=("", "_0"))
    assert len(merged) == (scans["modality"] == "ct").sum()
    assert (merged["split"] == merged["split_0"]).all()


def test_split_ratios_strata_and_reuse(tmp_path):
    rng = np.random.default_rng(0)
    n = 2000
    scans = pd.DataFrame(
        {
            "modality": rng.choice(["ct", "mri"], n, p=[0.66, 0.34]),
            "image_id": [f"s{i:04d}" for i in range(n)],
            "institute": rng.choice(list("ABCDEFGHIJ"), n),
            "sex": rng.choice(["m", "f", None], n, p=[0.48, 0.48, 0.04]),
            "age": np.where(rng.random(n) < 0.03, np.nan, rng.uniform(18, 95, n)),
        }
    )
    out = assign_splits(scans, ["A", "D", "E"], 0.2, seed=42)
    merged = scans.merge(out, on=["modality", "image_id"])
    assert len(out) == n and not out.duplicated(["modality", "image_id"]).any()
    assert (merged.loc[merged["institute"].isin(list("ADE")), "split"] == "test").all()
    rest = merged[~merged["institute"].isin(list("ADE"))]
    assert set(rest["split"]) == {"train", "val"}
    assert abs((rest["split"] == "val").mean() - 0.2) < 0.01
    complete = rest.dropna(subset=["sex", "age"])
    bins = pd.cut(complete["age"], [0, 40, 60, 80, np.inf], include_lowest=True)
    for _, group in complete.groupby([complete["modality"], complete["sex"], bins], observed=True):
        if len(group) >= 40:
            assert abs((group["split"] == "val").mean() - 0.2) < 0.05
    assert out.equals(assign_splits(scans, ["A", "D", "E"], 0.2, seed=42))
    assert not out.equals(assign_splits(scans, ["A", "D", "E"], 0.2, seed=7))

    path = tmp_path / "splits.parquet"
    first = load_or_create_splits(path, scans.iloc[:1500], ["A", "D", "E"], 0.2, 42)
    grown = load_or_create_splits(path, scans, ["A", "D", "E"], 0.2, 42)
    pd.testing.assert_frame_equal(first, grown.iloc[:1500].reset_index(drop=True), check_dtype=False)
    assert len(pd.read_parquet(path)) == n
    # The run that creates the table and a run that reads it back return the same column types, so
    # the slices stage writes byte-identical split files on a first and a later run.
    fresh = load_or_create_splits(tmp_path / "other.parquet", scans, ["A", "D", "E"], 0.2, 42)
    again = load_or_create_splits(tmp_path / "other.parquet", scans, ["A", "D", "E"], 0.2, 42)
    assert fresh.dtypes.to_dict() == again.dtypes.to_dict()
    pd.testing.assert_frame_equal(fresh, again)


def test_rendering_matches_direct_windowing(dataset, index):
    """A CT slice image = window by study type, rescale by the clipped volume's min/max, crop, rotate/flip."""
    s = load_slices(index)
    row = s[(s["modality"] == "ct") & (s["plane"] == "coronal")].iloc[5]
    img = nib.load(dataset / "CT_Dataset_v201" / row["image_id"] / "ct.nii.gz")
    meta = pd.read_csv(dataset / "CT_Dataset_v201" / "meta.csv", sep=";", dtype=str).set_index("image_id")
    windows = {"ct thorax": (-200, 1400), "ct abdomen": (50, 1000), "ct head": (40, 400)}
    windows.update({"ct pelvis": (80, 1400), "ct thorax-abdomen": (-100, 1400), "ct abdomen-pelvis": (50, 1000)})
    windows["ct thorax-abdomen-pelvis"] = (-100, 1400)
    study = " ".join(meta.loc[row["image_id"], "study_type"].lower().split())
    c, w = windows.get(study, (40, 400))
    vol = np.clip(img.get_fdata(), c - w / 2, c + w / 2)
    u8 = np.floor((vol - vol.min()) / (vol.max() - vol.min()) * 255)
    sl = np.take(u8, row["idx"], axis=row["axis"])
    side = min(sl.shape)
    r0, c0 = (sl.shape[0] - side) // 2, (sl.shape[1] - side) // 2
    expected = np.fliplr(np.rot90(sl[r0 : r0 + side, c0 : c0 + side]))
    got = render_slice(index, int(row["slice_id"]))
    assert got.shape == (32, 32) and got.dtype == np.uint8
    assert np.abs(got.astype(int) - expected).max() <= 1


def test_iter_scan_images_reads_each_scan_once_and_matches_render_slice(index):
    s = load_slices(index)
    ids = np.sort(np.random.default_rng(0).choice(len(s), 60, replace=False))
    groups = list(iter_scan_images(index, ids[::-1]))
    got_ids = np.concatenate([g for g, _ in groups])
    np.testing.assert_array_equal(got_ids, ids)
    assert len(groups) == s.loc[ids, ["modality", "image_id"]].drop_duplicates().shape[0]
    for group, images in groups:
        assert images.shape == (len(group), 32, 32) and images.dtype == np.uint8
        assert s.loc[group, ["modality", "image_id"]].drop_duplicates().shape[0] == 1
        for sid, image in zip(group[:3], images[:3], strict=True):
            np.testing.assert_array_equal(image, render_slice(index, int(sid)))
    parallel = list(iter_scan_images(index, ids, workers=2))
    for (a, x), (b, y) in zip(groups, parallel, strict=True):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(x, y)


def test_thumbnail_is_cached_png(index):
    png = thumbnail(index, 7, size=48)
    path = thumbnail_path(index, 7, size=48)
    assert path.is_file() and path.read_bytes() == png
    assert not path.is_relative_to(index), "the cache lives outside the artifact folder"
    decoded = np.asarray(Image.open(io.BytesIO(png)))
    np.testing.assert_array_equal(decoded, render_slice(index, 7, size=48))
    assert thumbnail(index, 7, size=48) == png


def _corrupt_copy(src: Path, dst: Path) -> dict[tuple[str, str], str]:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".medsae"))
    ct = dst / "CT_Dataset_v201"
    data = (ct / "s0000" / "ct.nii.gz").read_bytes()
    (ct / "s0000" / "ct.nii.gz").write_bytes(data[: len(data) // 2])  # truncated gzip
    (ct / "s0001" / "ct.nii.gz").write_bytes(b"not a nifti at all")
    (ct / "s0002" / "segmentations" / "liver.nii.gz").unlink()  # missing mask
    wrong = nib.Nifti1Image(np.ones((5, 5, 5), np.uint8), np.diag([9.0, 9.0, 9.0, 1.0]))
    nib.save(wrong, ct / "s0003" / "segmentations" / "heart.nii.gz")  # wrong shape, other field of view
    with (ct / "meta.csv").open("a") as f:
        f.write("s0999;50;m;B;ct thorax;train;ge;x;120;no_pathology;no_location\n")  # row without volume
    with gzip.open(ct / "s0004" / "segmentations" / "spleen.nii.gz", "wb") as f:
        f.write(b"\x00" * 10)  # a mask that is not a NIfTI
    return {
        ("ct", "s0000"): "cannot read volume",
        ("ct", "s0001"): "cannot read volume",
        ("ct", "s0002"): "missing masks: liver",
        ("ct", "s0003"): "mask heart has shape (5, 5, 5)",
        ("ct", "s0004"): "cannot read mask spleen",
        ("ct", "s0999"): "volume missing",
    }


def test_corrupt_inputs_are_skipped_and_recorded(dataset, tmp_path):
    from medsae.cli.data import ingest

    root = tmp_path / "bad"
    expected = _corrupt_copy(dataset, root)
    registry = tmp_path / "r.duckdb"
    summary = ingest(root, {"root": str(root), "size": 32}, tmp_path / "out", registry)
    skipped = load_skipped(tmp_path / "out")
    got = {(m, i): r for m, i, r in skipped.itertuples(index=False)}
    assert set(got) == set(expected)
    for key, text in expected.items():
        assert text in got[key], (key, got[key])
    assert summary["skipped"] == len(expected) and summary["scans_read"] == 12 - 5
    import duckdb

    with duckdb.connect(str(registry), read_only=True) as con:
        rows = con.execute("SELECT modality, image_id FROM ingest_skips ORDER BY image_id").fetchall()
        n_slices = con.execute("SELECT count(*) FROM slices").fetchone()[0]
    assert {tuple(r) for r in rows} == set(expected)
    assert n_slices == len(load_slices(tmp_path / "out"))


def test_stage_writes_phantom_and_missing_root_is_one_line(tmp_path):
    root = tmp_path / "gen"
    data = DataSpec(root=str(root), size=32, phantom=PhantomSpec(subjects=3, seed=0, shape=(16, 16, 20)))
    ctx = StageContext("slices", "k", tmp_path / "o", tmp_path / "w", {}, {}, seed=0, quiet=True, spec=data)
    result = run_slices(ctx)
    n = len(load_slices(tmp_path / "o"))
    assert result.tables["slices"].num_rows == n > 0
    assert result.tables["slice_structures"].num_rows == len(load_structures(tmp_path / "o"))
    assert {m.name for m in result.metrics} >= {"n_scans", "n_slices", "n_skipped"}
    manifest = dataset_manifest(root)
    assert manifest == dataset_manifest(root) and len(manifest) == 64  # split file written beside: unchanged
    ctx.spec = DataSpec(root=str(tmp_path / "absent"), size=32)
    with pytest.raises(MissingInputError, match="absent: data folder not found") as err:
        run_slices(ctx)
    assert "\n" not in str(err.value)


def test_killed_ingest_resumes_to_the_same_index(dataset, tmp_path):
    """SIGKILL mid-way through `medsae data ingest`, rerun: the index equals an uninterrupted one's."""
    from medsae.cli.data import ingest

    out = tmp_path / "killed"
    parts = tmp_path / ".work" / "killed" / "parts"  # the planner's layout: <folder>/../.work/<name>/
    env = {**os.environ, "MEDSAE_INGEST_THROTTLE": "0.4", "MEDSAE_QUIET": "1"}
    cmd = [sys.executable, "-m", "medsae.cli.data", "ingest", str(dataset), "--out", str(out), "--size", "32",
           "--registry", str(tmp_path / "r1.duckdb")]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60

    def committed() -> int:  # part files; ".<name>.<pid>.tmp.npz" is one being written
        return sum(not p.name.startswith(".") for p in parts.glob("*.npz"))

    while time.monotonic() < deadline and committed() < 3:
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = committed()
    assert 3 <= done_before < 12 and not out.exists()

    resumed = ingest(dataset, {"root": str(dataset), "size": 32}, out, tmp_path / "r1.duckdb")
    assert resumed["volumes_resumed"] == done_before
    assert resumed["volumes_indexed"] == 12 - done_before
    clean = tmp_path / "clean"
    ingest(dataset, {"root": str(dataset), "size": 32, "workers": 2}, clean, tmp_path / "r2.duckdb")
    pd.testing.assert_frame_equal(load_slices(out), load_slices(clean))
    pd.testing.assert_frame_equal(load_structures(out), load_structures(clean))
    assert not (tmp_path / ".work" / "killed").exists()


def test_ingest_builds_the_slices_stage_an_experiment_plans(dataset, tmp_path, monkeypatch):
    """`medsae data ingest` is the planner's slices stage: the key, folder and rows an `exp run` of a spec
    with the same data settings uses, so that run finds the stage done; options left out are the spec's defaults."""
    from typer.testing import CliRunner

    from medsae.cli.data import app, ingest
    from medsae.plan import plan_experiment, run_plans
    from medsae.registry import Registry
    from medsae.spec import parse_specs

    monkeypatch.chdir(tmp_path)
    registry = tmp_path / "r.duckdb"
    result = CliRunner().invoke(app, ["ingest", str(dataset), "--size", "32", "--registry", str(registry)])
    assert result.exit_code == 0, result.output
    plan = plan_experiment(
        parse_specs({"name": "same", "data": {"root": str(dataset), "size": 32}})[0], only={"slices"}
    )
    node = plan.nodes["slices"]
    assert node.final_dir == tmp_path / "artifacts" / "slices" / node.key and (node.final_dir / "render.json").is_file()
    assert f"ingest {Path('artifacts') / 'slices' / node.key}" in result.output.replace(str(tmp_path) + "/", "")
    reg = Registry(registry)
    rows = reg.query("SELECT stage_key, kind, status FROM stages")
    assert rows == [{"stage_key": node.key, "kind": "slices", "status": "done"}]
    n_rows = reg.query("SELECT count(*) AS n FROM slices WHERE slices_key = ?", [node.key])[0]["n"]
    assert n_rows == len(load_slices(node.final_dir)) > 0
    assert [(o.kind, o.action) for o in run_plans([plan], reg, only={"slices"}, quiet=True)] == [("slices", "done")]
    again = ingest(dataset, {"root": str(dataset), "size": 32}, None, registry)
    assert again["already_done"] and again["key"] == node.key and again["slices"] == n_rows
    assert reg.query("SELECT count(*) AS n FROM slices")[0]["n"] == n_rows  # reused, not inserted twice
