"""The ground stage on a tiny phantom, through the planner, with a DuckDB registry on disk.

Checks against independent sources: the rendered slices are the ones ``medsae.data.render``
makes, the re-embedded pooled vectors are the stored embeddings, the rendered masks cover the
areas the ingest counted, and the registry rows are those of the stage's own parquet.
"""

from __future__ import annotations

import json
import shutil

import duckdb
import numpy as np
import pandas as pd
import pytest
from byod_fixtures import phantom_manifest
from test_e2e import tiny_spec

from medsae.data.build import run_ingest
from medsae.data.index import load_slices, load_structures
from medsae.data.render import render_slice
from medsae.ground.render import iter_rendered
from medsae.ground.stage import run_ground
from medsae.plan import plan_experiment, run_plans
from medsae.registry.db import Registry
from medsae.spec import parse_specs
from medsae.stage import StageContext

UP_TO_GROUND = {"slices", "embed", "train", "encode", "ground"}


def small_spec(tmp, **ground) -> dict:
    raw = tiny_spec(tmp)
    raw.pop("interpret")
    raw["data"]["phantom"] = {"subjects": 4, "seed": 3, "shape": [32, 32, 40]}
    raw["embed"]["input_size"] = 96  # a 3 x 3 feature map
    raw["sae"].update(d_sae=64, epochs=10)
    raw["ground"] = {"enabled": True, "top_slices": 8, "score_size": 32, **ground}
    return raw


@pytest.fixture(scope="module")
def grounded(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ground")
    plan = plan_experiment(parse_specs(small_spec(tmp))[0])
    registry = Registry(tmp / "registry.duckdb")
    run_plans([plan], registry, only=UP_TO_GROUND, quiet=True)
    return tmp, plan, registry


def sql(registry: Registry, text: str, params=None) -> pd.DataFrame:
    con = duckdb.connect(str(registry.path), read_only=True)
    try:
        return con.execute(text, params or []).df()
    finally:
        con.close()


def test_rows_summary_and_files(grounded):
    _, plan, registry = grounded
    node = plan.nodes["ground"]
    rows = sql(registry, "SELECT * FROM latent_grounding WHERE stage_key = ?", [node.key])
    summary = json.loads(sql(registry, "SELECT summary_json FROM stages WHERE stage_key = ?", [node.key]).iloc[0, 0])
    assert len(rows) == summary["n_latents"] > 0
    assert summary["exact"] and summary["token_pool_gap"] < 1e-5  # mean pooling: exact
    # re-rendered slices give the stored embeddings (up to summation order: batches differ from embed's)
    assert summary["reembed_gap"] < 1e-4
    assert (rows["sae_key"] == plan.nodes["train"].key).all()
    full = pd.read_parquet(node.final_dir / "grounding.parquet")
    best = full[full["best"]].set_index("latent")
    for r in rows.itertuples():
        assert best.loc[r.latent, "structure"] == r.structure and best.loc[r.latent, "iou"] == pytest.approx(r.iou)
        assert r.iou == pytest.approx(full[full["latent"] == r.latent]["iou"].max())
    assert rows[["iou", "dice", "iou_shuffled", "iou_shuffled_best"]].apply(lambda c: c.between(0, 1)).all().all()
    # the best structure is present on at least one of the latent's top slices (slice_structures)
    maps = np.load(node.final_dir / "activation_maps.npz")
    slices_key = plan.nodes["slices"].key
    for latent, ids in zip(maps["latents"], maps["slice_ids"], strict=True):
        present = sql(
            registry,
            "SELECT DISTINCT structure FROM slice_structures WHERE slices_key = ? AND slice_id IN (SELECT unnest(?))",
            [slices_key, [int(i) for i in ids if i >= 0]],
        )["structure"]
        assert rows.set_index("latent").loc[int(latent), "structure"] in set(present)
    # the maps beat masks shuffled across slices of the same plane, on average
    assert rows["iou"].mean() > rows["iou_shuffled"].mean()


def test_rendered_slices_and_masks_match_the_data_package(grounded):
    _, plan, _ = grounded
    slices_dir = plan.nodes["slices"].final_dir
    structures = load_structures(slices_dir)
    ids = structures.groupby("slice_id")["pixels"].sum().nlargest(5).index.to_numpy()
    size = 48
    for scan in iter_rendered(slices_dir, ids, structures, score_size=size):
        for i, sid in enumerate(scan.slice_ids):
            assert np.array_equal(scan.images[i], render_slice(slices_dir, int(sid)))
            counted = structures[structures["slice_id"] == sid].set_index("structure")["pixels"]
            assert set(scan.masks[i]) == set(counted.index)
            crop = _crop_pixels(slices_dir, int(sid))
            for name, mask in scan.masks[i].items():
                if counted[name] >= 40:  # big enough to survive the resize: same area share within 20 %
                    assert mask.mean() == pytest.approx(counted[name] / crop, rel=0.2), name


def _crop_pixels(slices_dir, sid: int) -> int:
    """Pixels of the slice's in-plane crop at the volume's resolution (the ingest counts masks there)."""
    from medsae.data.render import render_index, scan_volume_u8
    from medsae.data.slicing import take_slices

    index = render_index(slices_dir)
    volume = scan_volume_u8(index, int(index.scan_of_slice[sid]))
    return take_slices(volume, int(index.axis[sid]), [int(index.idx[sid])], index.options.crop)[0].size


def test_rerun_is_done_and_force_replaces_rows(grounded):
    _, plan, registry = grounded
    again = run_plans([plan], registry, only=UP_TO_GROUND, quiet=True)
    assert {o.kind: o.action for o in again}["ground"] == "done"
    before = sql(registry, "SELECT count(*) AS n FROM latent_grounding")["n"][0]
    run_plans([plan], registry, only=UP_TO_GROUND, force={"ground"}, quiet=True)
    assert sql(registry, "SELECT count(*) AS n FROM latent_grounding")["n"][0] == before


def test_disabled_ground_is_not_part_of_the_experiment(grounded, tmp_path):
    tmp, _, _ = grounded
    raw = small_spec(tmp, enabled=False)
    plan = plan_experiment(parse_specs(raw)[0])
    assert "ground" not in plan.nodes and "evaluate" in plan.nodes
    registry = Registry(tmp_path / "registry.duckdb")
    run_plans([plan], registry, only=UP_TO_GROUND, quiet=True)
    assert sql(registry, "SELECT count(*) AS n FROM latent_grounding")["n"][0] == 0


def test_the_stage_table_runs_ground_after_encode_with_the_embed_section():
    from medsae.ground.config import GroundRun
    from medsae.ground.stage import run_ground
    from medsae.stages import STAGES, stage_def

    d = stage_def("ground")
    assert d.load() is run_ground and STAGES.index("ground") == STAGES.index("encode") + 1
    spec = parse_specs({"name": "g", "data": {"root": "x"}, "ground": {"enabled": True}, "embed": {"input_size": 64}})[
        0
    ]
    section = d.run_section(spec)
    assert isinstance(section, GroundRun) and section.embed == spec.embed and section.enabled
    assert "embed" not in d.key_params(d.spec_section(spec))  # the backbone enters the key through embed's key


def test_grounding_on_a_label_map_copy_gives_the_layouts_rows(grounded, tmp_path):
    """The fixture's phantom as a manifest of copied volumes with one label map each (no mask files, no
    segmentations folder beside the volumes): the ground stage, on that slices artifact and the fixture's
    embed / train / encode stages, gives the same best structures and scores as on the TotalSegmentator layout."""
    tmp, plan, registry = grounded
    maps = tmp_path / "maps"
    manifest = pd.read_csv(phantom_manifest(tmp / "phantom", maps / "manifest.csv", masks="labelmap"))
    (maps / "images").mkdir()
    for i, rel in enumerate(manifest["image"]):
        copied = maps / "images" / f"{i}.nii.gz"
        shutil.copyfile(maps / rel, copied)
        manifest.loc[i, "image"] = copied.relative_to(maps).as_posix()
    manifest.to_csv(maps / "manifest.csv", index=False)
    data = {k: v for k, v in small_spec(tmp)["data"].items() if k != "phantom"}
    ingest = run_ingest(maps, {**data, "root": str(maps), "format": "manifest"}, tmp_path / "slices", tmp_path / "w")
    layout = load_slices(plan.nodes["slices"].final_dir)
    pd.testing.assert_frame_equal(ingest.slices[["slice_uid", "split"]], layout[["slice_uid", "split"]])
    scans = pd.read_parquet(ingest.out_dir / "scans.parquet")
    assert scans["label_map"].str.startswith("labelmaps/").all() and (scans["masks"] == "{}").all()

    node = plan.nodes["ground"]
    inputs = {**node.inputs, "slices": ingest.out_dir}
    ctx = StageContext("ground", "labelmap", tmp_path / "o", tmp_path / "w", inputs, dict(node.upstream), node.seed,
                       quiet=True, spec=node.spec)  # fmt: skip
    got = pd.DataFrame(run_ground(ctx).tables["latent_grounding"]).sort_values("latent").reset_index(drop=True)
    want = sql(registry, "SELECT * FROM latent_grounding WHERE stage_key = ? ORDER BY latent", [node.key])
    assert len(want) > 0
    assert got["latent"].tolist() == want["latent"].tolist()
    assert got["structure"].tolist() == want["structure"].tolist()
    for column in ("iou", "dice", "lift", "pointing", "iou_shuffled", "n_present"):
        np.testing.assert_allclose(got[column].astype(float), want[column].astype(float), rtol=1e-6, err_msg=column)
