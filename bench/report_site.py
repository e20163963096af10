"""Time the latent explorer (``medsae report EXP -o FOLDER``) cold and warm, and its first paint in Chromium.

    python bench/report_site.py [--project DIR] [--latents 8192] [--slices 200000] [--per-group 12]
                                [--skip-demo] [--skip-synthetic] [--keep DIR]

* **demo**: the explorer of the ``demo`` experiment in the project DIR (its ``registry.duckdb``; the
  thumbnail cache is written under its artifacts). Without ``--project`` the demo
  (``experiments/demo.yaml``) is run first in a temporary project (about 15 minutes on 2 CPUs).
* **synthetic**: bench/report.py's registry (``--slices`` slices, ``--latents`` latents) with a real
  slices artifact behind it: the slices stage on a 3-subject phantom, its scans repeated until there
  are ``--slices`` slices, each copy its own volume file (shifted a few voxels, intensities offset),
  so every thumbnail is a real render of its own picture. Explain sets are shaped like the
  sampler's: 12 top, 2 per activation decile, 6 non-firing contrasts per latent.

Each explorer is built twice: cold (its thumbnail cache removed first) and warm (the same folder
again). Columns: build seconds; latent pages; image files in ``thumbs/`` and MB of the whole folder;
thumbnails rendered (cache files written during the build, from their modification times) and
slices the pages show with a thumbnail ("needed"; fewer image files when pictures repeat);
first-contentful-paint of ``index.html`` and of one latent page opened from ``file://`` in headless
Chromium (the Performance API's paint entry; median of 3 fresh tabs), when Chromium is installed.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

os.environ.setdefault("MEDSAE_QUIET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from medsae.registry import Registry
from medsae.report.site.build import build_site
from medsae.report.site.thumbcache import cache_folder

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
SIZE = 128
REPEATS = 3


# -- the demo -------------------------------------------------------------------------------------


def demo_project(project: Path | None, scratch: Path) -> Path:
    """The folder of a project where the demo has run (runs it in ``scratch`` when none is given)."""
    if project is not None:
        return project
    folder = scratch / "demo"
    folder.mkdir()
    shutil.copy(REPO / "experiments" / "demo.yaml", folder / "demo.yaml")
    cli = [str(Path(sys.executable).with_name("medsae")), "exp", "run", str(folder / "demo.yaml"), "-q"]
    subprocess.run([*cli, "--registry", str(folder / "registry.duckdb")], check=True)
    return folder


# -- the synthetic registry -----------------------------------------------------------------------


def _bench_report():
    spec = importlib.util.spec_from_file_location("bench_report", Path(__file__).with_name("report.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiled_slices_artifact(root: Path, out_dir: Path, n_slices: int) -> None:
    """A slices artifact of ``n_slices`` slices: the slices stage on a small phantom, its scans repeated."""
    from medsae.data.config import DataSpec, PhantomSpec
    from medsae.data.stage import run_slices
    from medsae.stage import StageContext

    spec = DataSpec(root=str(root / "phantom"), phantom=PhantomSpec(subjects=3, shape=(32, 32, 40)), size=64)
    out_dir.mkdir(parents=True)
    (root / "work").mkdir()
    ctx = StageContext(
        kind="slices",
        key=out_dir.name,
        spec=spec,
        out_dir=out_dir,
        work_dir=root / "work",
        inputs={},
        input_keys={},
        seed=0,
        quiet=True,
    )
    run_slices(ctx)
    scans = pd.read_parquet(out_dir / "scans.parquet")
    slices = pd.read_parquet(out_dir / "slices.parquet")
    copies = -(-n_slices // len(slices))
    scan_parts, slice_parts = [], []
    for c in range(copies):
        tag = f"c{c:05d}"
        volumes = [_volume_copy(root / "phantom", v, c, tag) for v in scans["volume"]]
        scan_parts.append(scans.assign(image_id=f"{tag}-" + scans["image_id"], volume=volumes))
        slice_parts.append(slices.assign(image_id=f"{tag}-" + slices["image_id"]))
    tiled = pd.concat(slice_parts, ignore_index=True).iloc[:n_slices]
    tiled["slice_id"] = np.arange(n_slices)
    pd.concat(scan_parts, ignore_index=True).to_parquet(out_dir / "scans.parquet")
    tiled.to_parquet(out_dir / "slices.parquet")


def _volume_copy(data_root: Path, volume: str, c: int, tag: str) -> str:
    """A copy of a phantom volume that renders differently (shifted a few voxels, intensities offset):
    the copies' thumbnails are distinct files, as real scans' are."""
    import nibabel as nib

    image = nib.load(data_root / volume)
    array = np.asarray(image.dataobj, dtype=np.float32)
    shifted = np.roll(array, (c % 5, (c // 5) % 5), axis=(0, 1)) + ((c // 25) % 50 - 25) * 0.01 * float(array.std())
    target = Path("copies") / tag / volume
    (data_root / target).parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(shifted, image.affine), data_root / target)
    return target.as_posix()


def explain_sets(n_slices: int, n_latents: int, stage_key: str) -> pa.Table:
    """Explain sets shaped like the sampler's: 12 top, 2 per decile, 6 non-firing contrasts."""
    rng = np.random.default_rng(1)
    roles = ["top"] * 12 + [f"decile_{d}" for d in range(10) for _ in range(2)] + ["contrast_random"] * 6
    ids, acts = [], []
    for _ in range(n_latents):
        ids.append(rng.choice(n_slices, len(roles), replace=False).tolist())
        top = np.sort(rng.uniform(3, 5, 12))[::-1]
        deciles = np.repeat(np.linspace(3, 0.3, 10), 2) * rng.uniform(0.9, 1.0, 20)
        acts.append([*top.tolist(), *deciles.tolist(), *[0.0] * 6])
    return pa.table(
        {
            "set_id": [f"x{j}" for j in range(n_latents)],
            "stage_key": [stage_key] * n_latents,
            "latent": np.arange(n_latents, dtype=np.int32),
            "purpose": ["explain"] * n_latents,
            "slice_ids": ids,
            "activations": acts,
            "roles": [roles] * n_latents,
        }
    )


def synthetic_project(root: Path, n_slices: int, n_latents: int) -> Registry:
    reg = _bench_report().fabricate(root, n_slices, n_latents)  # slices key 'slices', summarize key 'summarize0'
    art = root / "artifacts" / "slices" / "slices"
    tiled_slices_artifact(root, art, n_slices)
    with reg.write() as con:
        con.execute("DELETE FROM example_sets")
    reg.insert("example_sets", explain_sets(n_slices, n_latents, "summarize0"))
    reg.insert(
        "stages",
        [
            {
                "stage_key": "slices",
                "kind": "slices",
                "code_version": "1",
                "params_json": "{}",
                "status": "done",
                "artifact_dir": str(art),
            }
        ],
    )
    return reg


# -- measuring ------------------------------------------------------------------------------------


def slices_dir_of(reg: Registry, experiment: str) -> Path | None:
    from medsae.report import gather

    with reg.read() as con:
        folder = gather.load_experiment(con, experiment).artifact_dir("slices")
    return Path(folder) if folder else None


def build(reg: Registry, experiment: str, out: Path, per_group: int, cache: Path | None) -> dict:
    started = time.time()
    summary = build_site(reg, experiment, out, n_slices=per_group, thumb_size=SIZE)
    rendered = sum(1 for p in cache.glob("*.png") if p.stat().st_mtime >= started) if cache and cache.is_dir() else 0
    needed = len({n for p in (out / "latents").glob("*.html") for n in _shown_slices(p)})
    return {
        "seconds": summary.seconds,
        "pages": summary.n_pages,
        "images": sum(1 for _ in (out / "thumbs").iterdir()),
        "mb": summary.n_bytes / 1e6,
        "rendered": rendered,
        "needed": needed,
        "fcp": first_paint(out),
    }


def _shown_slices(page: Path) -> set[int]:
    import re

    return {int(n) for n in re.findall(r'<img src="\.\./thumbs/[0-9a-f]{64}\.png" alt="slice (\d+)"', page.read_text())}


async def _paint(port: int, pages: list[Path]) -> list[float | None]:
    import aiohttp

    out = []
    async with aiohttp.ClientSession() as session:
        for page in pages:
            async with session.put(f"http://127.0.0.1:{port}/json/new?about:blank") as resp:
                target = await resp.json()
            async with session.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                await ws.send_str(json.dumps({"id": 1, "method": "Page.enable"}))
                await ws.send_str(json.dumps({"id": 2, "method": "Page.navigate", "params": {"url": page.as_uri()}}))
                async for msg in ws:  # wait for the load event
                    if json.loads(msg.data).get("method") == "Page.loadEventFired":
                        break
                expr = (
                    "Promise.race([new Promise(done => new PerformanceObserver((list, obs) => {"
                    " const e = list.getEntriesByName('first-contentful-paint')[0];"
                    " if (e) { obs.disconnect(); done(e.startTime); } }).observe({type: 'paint', buffered: true})),"
                    " new Promise(done => setTimeout(() => done(null), 10000))])"
                )
                params = {"expression": expr, "returnByValue": True, "awaitPromise": True}
                await ws.send_str(json.dumps({"id": 3, "method": "Runtime.evaluate", "params": params}))
                async for msg in ws:
                    data = json.loads(msg.data)
                    if data.get("id") == 3:
                        out.append(data["result"]["result"].get("value"))
                        break
    return out


def first_paint(site: Path) -> tuple[float | None, float | None]:
    """First-contentful-paint (ms) of index.html and of the first latent page, each in a fresh tab."""
    if CHROMIUM is None:
        return None, None
    pages = [site / "index.html", *sorted((site / "latents").glob("*.html"), key=lambda p: int(p.stem))[:1]]
    pages = pages * REPEATS  # each page opened REPEATS times: the median is shown
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as profile:  # Chromium's helpers may still write
        flags = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-extensions",
            "--disable-background-networking",
            "--remote-debugging-port=0",
            f"--user-data-dir={profile}",
        ]
        proc = subprocess.Popen([CHROMIUM, *flags, "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            port_file = Path(profile) / "DevToolsActivePort"
            deadline = time.monotonic() + 30
            while not (port_file.exists() and port_file.read_text().strip()) and time.monotonic() < deadline:
                time.sleep(0.1)
            paints = asyncio.run(_paint(int(port_file.read_text().split()[0]), pages))
        finally:
            proc.terminate()
            proc.wait(10)
    per_page = [[v for v in paints[i :: len(pages) // REPEATS] if v is not None] for i in range(len(pages) // REPEATS)]
    medians = [float(np.median(v)) if v else None for v in per_page]
    return (medians + [None, None])[0], (medians + [None, None])[1]


HEADER = (
    f"{'build':<24} {'seconds':>8} {'pages':>6} {'images':>7} {'MB':>8} {'rendered':>8} {'needed':>7}"
    f" {'FCP index ms':>12} {'FCP latent ms':>13}"
)


def _ms(v: float | None) -> str:
    return f"{v:8.0f}" if v is not None else f"{'-':>8}"


def _line(name: str, r: dict) -> str:
    return (
        f"{name:<24} {r['seconds']:8.1f} {r['pages']:6d} {r['images']:7d} {r['mb']:8.1f} {r['rendered']:8d}"
        f" {r['needed']:7d} {_ms(r['fcp'][0]):>12} {_ms(r['fcp'][1]):>13}"
    )


def bench(name: str, reg: Registry, experiment: str, out: Path, per_group: int) -> list[str]:
    """Table lines of a cold and a warm build of one explorer (each printed as soon as it is measured)."""
    slices_dir = slices_dir_of(reg, experiment)
    cache = cache_folder(slices_dir, SIZE) if slices_dir else None
    if cache is not None:
        shutil.rmtree(cache, ignore_errors=True)
    lines = []
    for kind in ("cold", "warm"):
        lines.append(_line(f"{name}, {kind} cache", build(reg, experiment, out, per_group, cache)))
        print(lines[-1], flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", type=Path, help="A project folder where the demo has run (registry.duckdb).")
    parser.add_argument("--slices", type=int, default=200_000)
    parser.add_argument("--latents", type=int, default=8192)
    parser.add_argument("--per-group", type=int, default=12, help="Slices per example group on a latent page.")
    parser.add_argument("--skip-demo", action="store_true")
    parser.add_argument("--skip-synthetic", action="store_true")
    parser.add_argument(
        "--keep", type=Path, help="Work in this folder (kept; a synthetic registry already there is reused)."
    )
    args = parser.parse_args()
    print(f"per group on a latent page: {args.per_group}; thumbnails {SIZE} px; {os.cpu_count()} CPUs")
    print(HEADER, flush=True)
    lines = []
    with tempfile.TemporaryDirectory(prefix="medsae-site-bench-") as tmp:
        scratch = args.keep or Path(tmp)
        scratch.mkdir(parents=True, exist_ok=True)
        if not args.skip_demo:
            project = demo_project(args.project, scratch)
            lines += bench("demo", Registry(project / "registry.duckdb"), "demo", scratch / "demo-site", args.per_group)
        if not args.skip_synthetic:
            t0 = time.perf_counter()
            folder = scratch / "synthetic"
            if (folder / "registry.duckdb").is_file():
                reg = Registry(folder / "registry.duckdb")
            else:
                reg = synthetic_project(folder, args.slices, args.latents)
            print(
                f"(synthetic registry: {args.latents:,} latents, {args.slices:,} slices, "
                f"{time.perf_counter() - t0:.0f} s to fabricate or open)",
                flush=True,
            )
            lines += bench("synthetic", reg, "bench@k=8", scratch / "synthetic-site", args.per_group)
    print(HEADER, *lines, sep="\n")


if __name__ == "__main__":
    main()
