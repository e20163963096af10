"""Fault suite, file systems: symbolic-link traps in a dataset, and places medsae cannot write to.

The link cases run the real ingest on a phantom copy with the traps planted; the write cases run
the real `medsae` command in subprocesses. Running as root, a folder's permission bits do not
stop the process, so the commands then run without the capability that overrides them
(``setpriv``), which is exactly the situation of a normal user.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from medsae.data.index import load_skipped, load_slices
from medsae.data.phantom import write_phantom
from medsae.data.totalsegmentator import dataset_manifest, ensure_dataset
from medsae.errors import MissingInputError

SHAPE = (16, 16, 20)
CT, MRI = "CT_Dataset_v201", "MRI_Dataset_v200"


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    """10 scans: CT s0000-s0006, MRI s0000-s0002."""
    return write_phantom(tmp_path_factory.mktemp("fs") / "clean", subjects=10, seed=1, shape=SHAPE)


def _plant_link_traps(root: Path, outside: Path) -> dict[str, list[str]]:
    """Plant one trap per CT scan; returns image_id -> texts its skip reason must contain."""
    ct = root / CT
    liver = ct / "s0000" / "segmentations" / "liver.nii.gz"
    liver.unlink()
    liver.symlink_to("liver.nii.gz")  # a mask that links to itself
    shutil.rmtree(ct / "s0001" / "segmentations")
    (ct / "s0001" / "segmentations").symlink_to(".")  # folder loop: segmentations/segmentations/...
    (ct / "s0002" / "segmentations" / "again").symlink_to("..")  # a loop nothing reads: scan stays usable
    volume = ct / "s0003" / "ct.nii.gz"  # two problems at once: truncated CT and a missing mask
    volume.write_bytes(volume.read_bytes()[: volume.stat().st_size // 2])
    (ct / "s0003" / "segmentations" / "heart.nii.gz").unlink()
    (ct / "s0004" / "ct.nii.gz").unlink()
    (ct / "s0004" / "ct.nii.gz").symlink_to(outside / "ct.nii.gz")  # dangling volume link
    (ct / "s9000").symlink_to(".")  # dataset loop: a "scan" that is the dataset folder itself
    (ct / "s9001").symlink_to(outside / "s9001")  # dangling scan link
    return {
        "s0000": ["mask liver.nii.gz: symlink loop"],
        "s0001": ["segmentations folder: symlink loop (points to its own folder s0001)"],
        "s0003": ["cannot read volume ct.nii.gz", "missing masks: heart"],
        "s0004": ["volume ct.nii.gz: dangling symlink"],
        "s9000": [f"scan folder s9000: symlink loop (points to its own folder {CT})"],
        "s9001": ["scan folder s9001: dangling symlink"],
    }


def test_symlink_traps_become_recorded_skips(phantom, tmp_path):
    from medsae.cli.data import ingest

    root = tmp_path / "trapped"
    shutil.copytree(phantom, root, symlinks=True, ignore=shutil.ignore_patterns(".medsae"))
    expected = _plant_link_traps(root, tmp_path / "nowhere")

    manifest = dataset_manifest(root)  # ends, does not raise, and is stable
    assert manifest == dataset_manifest(root) != dataset_manifest(phantom)

    registry = tmp_path / "r.duckdb"
    summary = ingest(root, {"root": str(root), "size": 32}, tmp_path / "out", registry)
    skipped = {i: r for m, i, r in load_skipped(tmp_path / "out").itertuples(index=False) if m == "ct"}
    assert set(skipped) == set(expected), skipped
    for image_id, texts in expected.items():
        for text in texts:
            assert text in skipped[image_id], (image_id, skipped[image_id])
    assert summary["skipped"] == len(expected)
    indexed = set(map(tuple, load_slices(tmp_path / "out")[["modality", "image_id"]].drop_duplicates().values))
    assert indexed == {("ct", "s0002"), ("ct", "s0005"), ("ct", "s0006"), ("mri", "s0000"), ("mri", "s0001"),
                       ("mri", "s0002")}  # fmt: skip
    import duckdb

    with duckdb.connect(str(registry), read_only=True) as con:
        rows = dict(con.execute("SELECT image_id, reason FROM ingest_skips WHERE modality = 'ct'").fetchall())
    assert rows == skipped


def test_a_looping_dataset_folder_is_one_line(phantom, tmp_path):
    root = tmp_path / "loop"
    shutil.copytree(phantom, root, symlinks=True, ignore=shutil.ignore_patterns(".medsae", MRI))
    (root / MRI).symlink_to(".")  # the MRI dataset folder is the data root itself
    assert len(dataset_manifest(root)) == 64
    with pytest.raises(MissingInputError) as err:
        ensure_dataset({"root": str(root), "modalities": ["ct", "mri"]})
    message = str(err.value)
    assert "\n" not in message and str(root / MRI) in message and "symlink loop" in message
    assert ensure_dataset({"root": str(root), "modalities": ["ct"]}) == root  # CT alone is still usable


# -- places medsae cannot write to -----------------------------------------------------------------


def _unprivileged() -> list[str]:
    """Command prefix under which permission bits apply (empty unless running as root)."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv (util-linux): permission bits cannot be enforced")
    caps = "-dac_override,-dac_read_search"
    return [setpriv, f"--bounding-set={caps}", f"--inh-caps={caps}"]


def _tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_unwritable_places_fail_before_any_work_with_one_line(tmp_path):
    from test_fault_concurrency import micro_spec

    prefix = _unprivileged()
    ro = tmp_path / "ro"
    ro.mkdir()
    locked_artifacts = tmp_path / "locked_artifacts"
    locked_artifacts.mkdir()
    (tmp_path / "afile").write_text("a file, not a folder\n")

    def spec(name: str, artifacts: Path, data: Path) -> str:
        body = micro_spec(tmp_path, "unused", data)
        body["artifacts"] = str(artifacts)
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(body))
        return str(path)

    run = ("exp", "run")
    cases = {  # name: (command, path the message must name, what it must say)
        "artifacts not creatable": (
            (*run, spec("a", ro / "artifacts", tmp_path / "data_a"), "--registry", str(tmp_path / "a.duckdb")),
            ro / "artifacts", f"cannot create the artifacts folder: {ro} is not writable (permission denied)",
        ),
        "artifacts not writable": (
            (*run, spec("b", locked_artifacts, tmp_path / "data_b"), "--registry", str(tmp_path / "b.duckdb")),
            locked_artifacts, "the artifacts folder is not writable (permission denied)",
        ),
        "data folder not writable": (
            (*run, spec("c", tmp_path / "art_c", ro / "data"), "--registry", str(tmp_path / "c.duckdb")),
            ro / "data", f"cannot create the phantom data folder: {ro} is not writable (permission denied)",
        ),
        "registry under a file": (
            (*run, spec("d", tmp_path / "art_d", tmp_path / "data_d"), "--registry", str(tmp_path / "afile" / "r.db")),
            tmp_path / "afile" / "r.db", f"cannot write the registry: {tmp_path / 'afile'} is a file, not a folder",
        ),
        "registry folder not writable": (
            (*run, spec("e", tmp_path / "art_e", tmp_path / "data_e"), "--registry", str(ro / "r.duckdb")),
            ro / "r.duckdb", f"cannot write the registry: {ro} is not writable (permission denied)",
        ),
        "report into an unwritable folder": (
            ("report", "tiny", "-o", str(ro / "report.html"), "--registry", str(tmp_path / "f.duckdb")),
            ro / "report.html", f"cannot write the report: {ro} is not writable (permission denied)",
        ),
        "phantom into an unwritable folder": (
            ("data", "phantom", str(ro / "ph"), "--subjects", "3", "--shape", "16,16,20"),
            ro / "ph", f"cannot create the phantom data folder: {ro} is not writable (permission denied)",
        ),
    }  # fmt: skip
    os.chmod(ro, 0o555)
    os.chmod(locked_artifacts, 0o555)
    before = _tree(tmp_path)
    env = dict(os.environ, MEDSAE_QUIET="1")
    try:
        procs = {
            name: subprocess.Popen(
                [*prefix, sys.executable, "-m", "medsae.cli.main", *command],
                cwd=tmp_path,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )  # fmt: skip
            for name, (command, _, _) in cases.items()
        }
        outputs = {name: p.communicate(timeout=300) for name, p in procs.items()}
        results = {name: (procs[name].returncode, *outputs[name]) for name in cases}
    finally:
        os.chmod(ro, 0o755)
        os.chmod(locked_artifacts, 0o755)
    for name, (_, path, text) in cases.items():
        rc, _, err = results[name]
        lines = err.strip().splitlines()
        assert rc != 0 and len(lines) == 1, (name, rc, err)
        assert lines[0] == f"error: {path}: {text}", (name, lines[0])
        print(f"{name}: {lines[0]}")
    assert _tree(tmp_path) == before, "a refused command wrote something"
