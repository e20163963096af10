"""Plots: each writes a PNG of the expected size, or nothing when there is no data."""

from __future__ import annotations

import numpy as np
import pandas as pd
from PIL import Image

from medsae.eval import plots
from medsae.eval.recovery import RecoveryCurve


def size_of(path) -> tuple[int, int]:
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


def test_plots_write_pngs(tmp_path):
    rows = pd.DataFrame(
        [
            (f"e{k}", m, v)
            for k in (4, 8, 16)
            for m, v in (("l0_mean", k), ("fvu", 1 / k), ("r2_scalar_mean_study", 1 - 0.5 / k))
        ],
        columns=["experiment", "metric", "value"],
    )
    assert size_of(plots.plot_reconstruction_vs_l0(rows, tmp_path / "sweep.png")) == (900, 360)
    curve = RecoveryCurve("t", [1, 5, 10], np.arange(10), {"val": 0.9}, {"val": np.array([0.7, 0.8, 0.88])})
    assert size_of(plots.plot_recovery_curves([curve], "val", tmp_path / "rec.png")) == (900, 360)
    freq = np.concatenate([np.zeros(5), np.logspace(-4, -0.5, 50)])
    assert size_of(plots.plot_latent_frequency(freq, tmp_path / "freq.png")) == (600, 360)
    table = pd.DataFrame({"target": ["a", "b"], "dense": [0.9, 0.8], "sparse": [0.85, 0.7]})
    assert plots.plot_probe_aucs(table, tmp_path / "auc.png").is_file()


def test_nothing_to_draw(tmp_path):
    assert (
        plots.plot_reconstruction_vs_l0(pd.DataFrame(columns=["experiment", "metric", "value"]), tmp_path / "a.png")
        is None
    )
    assert plots.plot_recovery_curves([], "val", tmp_path / "b.png") is None
    assert plots.plot_latent_frequency(np.array([]), tmp_path / "c.png") is None
    assert not any(tmp_path.iterdir())
