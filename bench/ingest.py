"""Ingest throughput: volumes/s, slices/s and peak memory, with 1 and 2 workers.

    .venv/bin/python bench/ingest.py            # demo phantom + a study-sized CT, ~1 minute
    .venv/bin/python bench/ingest.py --quick    # demo phantom only

Cases (each run in a fresh process so peak memory is that run's own):

* ``demo``: the demo phantom (12 subjects, 64 x 64 x 80 CT, output size 64), 1 and 2 workers;
* ``study-ct``: CT volumes of 256 x 256 x 200 voxels with 10 masks each, every slice kept (no
  anatomy filter) as the study's script did; compared with the study's 8.8 slices/s per process
  (docs/method.md#throughput; its script on this kind of machine, 76 % of the time encoding 1024² PNGs);
* ``render``: rendering those CT slices on demand (what the embed stage reads) at 224² and 1024².

Peak memory = max RSS of the ingest process plus the largest worker (``ru_maxrss``).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STUDY_SLICES_PER_S = 8.8


def _dataset(base: Path, case: str) -> Path:
    from medsae.data.phantom import write_phantom

    if case == "demo":
        return write_phantom(base / "demo", subjects=12, seed=0, shape=(64, 64, 80))
    root = write_phantom(base / "study", subjects=2, seed=0, mri_fraction=0.0, shape=(256, 256, 200))
    for seg in (root / "CT_Dataset_v201").glob("s*/segmentations"):
        keep = {"heart", "aorta", "liver", "spleen", "kidney_left", "kidney_right", "stomach", "pancreas",
                "lung_lower_lobe_left", "vertebrae_T12"}  # fmt: skip
        for path in seg.glob("*.nii.gz"):
            if path.name[:-7] not in keep:
                path.unlink()
    return root


def _one(base: Path, case: str, workers: int) -> dict:
    """Run one ingest (in this process) and report its figures."""
    from medsae.data.build import run_ingest

    root = _dataset(base, case)
    params = {"root": str(root), "workers": workers, "size": 64 if case == "demo" else 1024}
    if case != "demo":
        params["anatomy_filter"] = False
    out = base / f"out-{case}-{workers}"
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    result = run_ingest(root, params, out / "index", out / "work")
    seconds = time.perf_counter() - start
    self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    child_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    row = {
        "case": case,
        "workers": workers,
        "volumes": result.volumes_indexed,
        "slices": len(result.slices),
        "seconds": seconds,
        "volumes_per_s": result.volumes_indexed / seconds,
        "slices_per_s": len(result.slices) / seconds,
        "peak_mb": (self_kb + child_kb) / 1024,
    }
    if case != "demo" and workers == 1:
        from medsae.data.render import iter_scan_images

        for size in (224, 1024):
            t = time.perf_counter()
            n = sum(len(ids) for ids, _ in iter_scan_images(out / "index", size=size))
            row[f"render_{size}_per_s"] = n / (time.perf_counter() - t)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="demo phantom only")
    parser.add_argument("--one", nargs=3, metavar=("BASE", "CASE", "WORKERS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(_one(Path(args.one[0]), args.one[1], int(args.one[2]))))
        return
    cases = [("demo", 1), ("demo", 2)] + ([] if args.quick else [("study-ct", 1), ("study-ct", 2)])
    rows = []
    with tempfile.TemporaryDirectory(prefix="medsae-bench-") as tmp:
        for case, workers in cases:
            _dataset(Path(tmp), case)  # generate outside the timed process
            out = subprocess.run(
                [sys.executable, __file__, "--one", tmp, case, str(workers)], capture_output=True, text=True
            )
            if out.returncode != 0:
                sys.exit(out.stderr)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"{'case':<10} {'workers':>7} {'volumes':>7} {'slices':>7} {'seconds':>8} {'vol/s':>7} "
          f"{'slices/s':>9} {'peak MB':>8}")  # fmt: skip
    for r in rows:
        print(f"{r['case']:<10} {r['workers']:>7} {r['volumes']:>7} {r['slices']:>7} {r['seconds']:>8.2f} "
              f"{r['volumes_per_s']:>7.2f} {r['slices_per_s']:>9.0f} {r['peak_mb']:>8.0f}")  # fmt: skip
    study = [r for r in rows if r["case"] == "study-ct" and r["workers"] == 1]
    if study:
        r = study[0]
        print(f"\nstudy-sized CT (256x256x200, 10 masks, all slices), one process: "
              f"{r['slices_per_s']:.0f} slices/s = {r['slices_per_s'] / STUDY_SLICES_PER_S:.0f}x "
              f"the study's {STUDY_SLICES_PER_S} slices/s")  # fmt: skip
        print(f"on-demand rendering of those slices: {r['render_224_per_s']:.0f} slices/s at 224², "
              f"{r['render_1024_per_s']:.0f} slices/s at 1024² (Lanczos)")  # fmt: skip


if __name__ == "__main__":
    main()
