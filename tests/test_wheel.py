"""The wheel works on its own: build it, install it into a fresh venv, run a tiny experiment through
the offline explainer, with the source tree out of reach.

The fresh venv gets only the wheel (``pip install --no-deps``); the third-party packages (torch,
timm, duckdb, ...) come from this test's own environment through a ``.pth`` line, which makes them
importable without running that environment's ``.pth`` files, so the editable install of medsae
there stays inactive. Everything runs from a folder outside the repository with ``PYTHONPATH``
unset, and the test checks that ``medsae`` is imported from the new install.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import duckdb
import pytest
import yaml

import medsae
from medsae.interp.prompts import load_template

ROOT = Path(__file__).resolve().parents[1]
#: What a build needs from the checkout (tests, bench and local state stay behind).
SOURCE_ENTRIES = ("medsae", "prompts", "experiments", "pyproject.toml", "setup.py", "MANIFEST.in", "README.md")

pytestmark = pytest.mark.slow


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: int = 300) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{tail}")
    return proc.stdout


def _tiny_spec(tmp: Path) -> dict:
    """A very small experiment that reaches the interpret stage: 4 phantom subjects, evaluation parts off."""
    return {
        "name": "wheel",
        "seed": 0,
        "artifacts": str(tmp / "artifacts"),
        "data": {
            "root": str(tmp / "phantom"),
            "phantom": {"subjects": 4, "seed": 5, "shape": [24, 24, 32]},
            "size": 24,
        },
        "embed": {
            "source": "efficientnet_lite0",
            "model": "efficientnet_lite0",
            "pooling": "mean",
            "input_size": 32,
            "batch_size": 64,
        },
        "sae": {"arch": "topk", "d_sae": 32, "k": 4, "batch_size": 64, "epochs": 10, "lr": 0.002, "warmup_steps": 2},
        "eval": {"probes": False, "recovery": False, "monosemanticity": False, "retrieval": False, "plots": False},
        "interpret": {
            "explainer_model": "medsae/baseline",
            "scorer_model": "medsae/baseline",
            "min_active": 2,
            "min_patients": 1,
            "min_pool_scans": 2,
            "max_latents": 4,
            "bootstrap": 50,
            "permutations": 50,
        },
    }


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict[str, Path]:
    """A wheel built from a copy of the checkout, installed into a fresh venv."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    caches = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    # generated state that may sit next to the specs (a run's data or artifacts folder) is not source
    beside_specs = shutil.ignore_patterns("__pycache__", "data", "artifacts", "*.duckdb*")
    for name in SOURCE_ENTRIES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=caches if name == "medsae" else beside_specs)
        else:
            shutil.copy2(path, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    _run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(tmp / "dist"), str(src)], tmp)
    (wheel,) = (tmp / "dist").glob("medsae-*.whl")

    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp)
    python = venv / "bin" / "python"
    _run([*pip, "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)], tmp)
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp).strip())
    # third-party packages of this environment, appended after the venv's own site-packages
    (site / "zz_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    work = tmp / "work"  # outside the repository: nothing there to import by accident
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MEDSAE_PROMPTS", "VIRTUAL_ENV")}
    env.update(MEDSAE_REGISTRY=str(work / "registry.duckdb"), MEDSAE_QUIET="1", HF_HUB_OFFLINE="1")
    env["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
    return {"wheel": wheel, "venv": venv, "python": python, "site": site, "work": work, "env": env}


def test_wheel_carries_prompts_and_example_specs(installed):
    import zipfile

    names = set(zipfile.ZipFile(installed["wheel"]).namelist())
    for folder, pattern in (("prompts", "*.j2"), ("experiments", "*.yaml")):
        expected = {f"medsae/{folder}/{p.name}" for p in (ROOT / folder).glob(pattern)}
        assert expected and expected <= names
    assert not any(n.startswith(("tests/", "bench/", "prompts/", "experiments/")) for n in names)


def test_installed_package_is_the_wheel_not_the_checkout(installed):
    probe = (
        "import json, sys, importlib.metadata as md, medsae, medsae.resources as r, medsae.interp.prompts as p\n"
        "print(json.dumps({'file': medsae.__file__, 'path': sys.path, 'version': medsae.__version__,"
        " 'dist': md.version('medsae'), 'prompts': str(p.prompts_dir()), 'demo': str(r.example_spec('demo'))}))"
    )
    out = json.loads(_run([str(installed["python"]), "-c", probe], installed["work"], installed["env"]))
    site = installed["site"].resolve()
    assert Path(out["file"]).resolve().is_relative_to(site)
    # the checkout is not on the path, and the wheel is the only place a `medsae` package could come from
    entries = [(installed["work"] / e).resolve() for e in out["path"]]  # '' is the cwd of the probe
    assert ROOT not in entries
    assert [e for e in entries if (e / "medsae" / "__init__.py").is_file()] == [site]
    assert out["version"] == out["dist"] == medsae.__version__
    # the packaged copies, byte for byte the repository's folders
    assert Path(out["prompts"]).resolve() == site / "medsae" / "prompts"
    for template in (ROOT / "prompts").glob("*.j2"):
        assert (site / "medsae" / "prompts" / template.name).read_bytes() == template.read_bytes()
    assert Path(out["demo"]).read_bytes() == (ROOT / "experiments" / "demo.yaml").read_bytes()

    version = _run([str(installed["venv"] / "bin" / "medsae"), "--version"], installed["work"], installed["env"])
    assert version.strip() == f"medsae {medsae.__version__}"


def test_installed_cli_runs_a_tiny_experiment_with_offline_explanations(installed):
    work, env = installed["work"], installed["env"]
    spec = work / "wheel.yaml"
    spec.write_text(yaml.safe_dump(_tiny_spec(work)))
    out = _run([str(installed["venv"] / "bin" / "medsae"), "exp", "run", str(spec)], work, env, timeout=600)
    assert "7 stage(s) run" in out

    con = duckdb.connect(str(work / "registry.duckdb"), read_only=True)
    try:
        n_explained = con.execute(
            "SELECT count(*) FROM explanations WHERE kind = 'explanation' AND explainer_model = 'medsae/baseline'"
        ).fetchone()[0]
        hashes = {row[0] for row in con.execute("SELECT template_hash FROM prompts").fetchall()}
        n_scores = con.execute("SELECT count(*) FROM explanation_scores").fetchone()[0]
    finally:
        con.close()
    assert 1 <= n_explained <= 4  # max_latents
    assert n_scores > 0
    # the installed copy of the explainer template is the repository's: same content hash
    assert load_template("explainer_metadata_v1").hash in hashes


def test_installed_cli_builds_the_explorer_from_its_own_templates(installed):
    """`medsae report EXP -o FOLDER` from the wheel: its page templates, CSS and script are package data."""
    work, env = installed["work"], installed["env"]
    spec = work / "wheel.yaml"
    spec.write_text(yaml.safe_dump(_tiny_spec(work)))
    medsae_cli = str(installed["venv"] / "bin" / "medsae")
    _run([medsae_cli, "exp", "run", str(spec)], work, env, timeout=600)  # done already when run after the test above
    _run([medsae_cli, "report", "wheel", "-o", str(work / "site")], work, env, timeout=600)

    site = work / "site"
    assert "Headline metrics" in (site / "index.html").read_text()
    assert (site / "site.css").stat().st_size > 0 and (site / "explorer.js").stat().st_size > 0
    rows = json.loads((site / "latents.json").read_text())["rows"]
    pages = {p.stem for p in (site / "latents").glob("*.html")}
    assert rows and len(pages) == len(rows)
