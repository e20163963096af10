"""The one plotting module: each figure draws the numbers it is given, and nothing when there are none.

Drawn data is read back from the figure's lines and compared with values computed here
independently; files and data URLs are decoded as PNGs of the expected size.
"""

from __future__ import annotations

import base64
import io

import numpy as np
import pandas as pd
from PIL import Image

from medsae import plots
from medsae.eval.recovery import RecoveryCurve
from medsae.eval.rows import recovery_rows
from medsae.registry.db import Registry


def size_of(source) -> tuple[int, int]:
    with Image.open(source) as im:
        assert im.format == "PNG"
        return im.size


def sweep_frame() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "experiment": [f"e{k}" for k in (16, 4, 8)],
            "l0_mean": [16.0, 4.0, 8.0],
            "fvu": [1 / 16, 1 / 4, 1 / 8],
            "r2_scalar_mean_study": [1 - 0.5 / 16, 1 - 0.5 / 4, 1 - 0.5 / 8],
        }
    )


def test_figures_write_pngs_of_the_expected_size(tmp_path):
    assert size_of(plots.save_png(plots.reconstruction_vs_l0(sweep_frame()), tmp_path / "sweep.png")) == (900, 360)
    curve = RecoveryCurve("t", [1, 5, 10], np.arange(10), {"val": 0.9}, {"val": np.array([0.7, 0.8, 0.88])})
    recovery = plots.recovery_curves(recovery_rows([curve], ["val"], [0.9]), ["val"])
    assert size_of(plots.save_png(recovery, tmp_path / "rec.png")) == (900, 360)
    freq = np.concatenate([np.zeros(5), np.logspace(-4, -0.5, 50)])
    assert size_of(plots.save_png(plots.latent_frequency(freq, 0.1), tmp_path / "freq.png")) == (600, 360)
    table = pd.DataFrame({"target": ["a", "b"], "dense": [0.9, 0.8], "sparse": [0.85, 0.7]})
    assert plots.save_png(plots.probe_aucs(table), tmp_path / "auc.png").is_file()
    url = plots.data_url(plots.score_distributions({"pearson": {"m": [0.1, 0.5], "baseline: x": [0.0]}}))
    assert url.startswith("data:image/png;base64,")
    assert size_of(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))) == (480, 380)


def test_nothing_to_draw(tmp_path):
    empty_sweep = pd.DataFrame(columns=["experiment", "l0_mean", "fvu", "r2_scalar_mean_study"])
    assert plots.reconstruction_vs_l0(empty_sweep) is None
    assert plots.recovery_curves([], ["val"]) is None
    assert plots.latent_frequency(np.array([])) is None
    assert plots.probe_aucs(pd.DataFrame(columns=["target", "dense", "sparse"])) is None
    assert plots.score_distributions({"pearson": {"m": []}}) is None
    assert plots.save_png(None, tmp_path / "a.png") is None and plots.data_url(None) is None
    assert not any(tmp_path.iterdir())


def test_sweep_points_are_drawn_in_order_of_l0():
    fig = plots.reconstruction_vs_l0(sweep_frame())
    fvu_axis, r2_axis = fig.axes
    (line,) = fvu_axis.lines
    np.testing.assert_allclose(line.get_xdata(), [4, 8, 16])
    np.testing.assert_allclose(line.get_ydata(), [1 / 4, 1 / 8, 1 / 16])
    np.testing.assert_allclose(r2_axis.lines[0].get_ydata(), [1 - 0.5 / 4, 1 - 0.5 / 8, 1 - 0.5 / 16])
    assert sorted(t.get_text() for t in fvu_axis.texts) == ["e16", "e4", "e8"]


def test_recovery_draws_each_task_and_the_recorded_mean_of_the_chosen_split():
    ns = [1, 5, 10]
    good = RecoveryCurve("liver", ns, np.arange(10), {"val": 0.9}, {"val": np.array([0.6, 0.8, 0.85])})
    other = RecoveryCurve("spleen", ns, np.arange(10), {"val": 0.8}, {"val": np.array([0.7, 0.7, 0.76])})
    weak = RecoveryCurve("weak", ns, np.arange(10), {"val": 0.55}, {"val": np.array([0.5, 0.52, 0.55])})
    fig = plots.recovery_curves(recovery_rows([good, other, weak], ["val"], [0.9]), ["test", "val"])
    ratio_axis, adjusted_axis = fig.axes
    grey, bold = ratio_axis.lines[:3], ratio_axis.lines[3]
    assert len(grey) == 3 and "(val)" in ratio_axis.get_title()
    # the mean line is the evaluate stage's recovery_mean: tasks with a dense AUC above 0.6 only
    expected = (np.array([0.6, 0.8, 0.85]) / 0.9 + np.array([0.7, 0.7, 0.76]) / 0.8) / 2
    np.testing.assert_allclose(bold.get_xdata(), ns)
    np.testing.assert_allclose(bold.get_ydata(), expected)
    expected_adjusted = ((np.array([0.6, 0.8, 0.85]) - 0.5) / 0.4 + (np.array([0.7, 0.7, 0.76]) - 0.5) / 0.3) / 2
    np.testing.assert_allclose(adjusted_axis.lines[3].get_ydata(), expected_adjusted)
    assert plots.recovery_curves(recovery_rows([good], ["val"], [0.9]), ["test"]) is None


def test_frequency_title_counts_dead_and_dense_latents():
    freq = np.array([0, 0, 0, 1e-3, 0.05, 0.2, 0.5])
    title = plots.latent_frequency(freq, dense_threshold=0.1, title="val:").axes[0].get_title()
    assert title == "val: 7 latents: 4 fire, 3 never, 2 dense"
    assert plots.latent_frequency(freq, n_dense=1).axes[0].get_title().endswith("3 never, 1 dense")


def make_registry(path) -> Registry:
    """Three evaluated experiments, plus rows the sweep must ignore (another split, a per-target row)."""
    reg = Registry(path)
    ks = (4, 8, 32)
    reg.insert(
        "experiments",
        [{"experiment_id": f"id{k}", "name": f"k{k}", "spec_json": "{}", "spec_hash": f"h{k}"} for k in ks],
    )
    reg.insert(
        "experiment_stages", [{"experiment_id": f"id{k}", "kind": "evaluate", "stage_key": f"ev{k}"} for k in ks]
    )
    rows = []
    for k in ks:
        for name, value in (("l0_mean", k), ("fvu", 1 / k), ("r2_scalar_mean_study", 1 - 1 / k)):
            rows.append({"stage_key": f"ev{k}", "split": "val", "name": name, "value": float(value), "target": None})
            rows.append({"stage_key": f"ev{k}", "split": "test", "name": name, "value": -1.0, "target": None})
        rows.append({"stage_key": f"ev{k}", "split": "val", "name": "fvu", "value": 9.0, "target": "liver"})
    reg.insert("metrics", rows)
    return reg


def test_sweep_points_are_read_through_the_registry_layer_and_plotted(tmp_path):
    from typer.testing import CliRunner

    from medsae.cli.eval import app, sweep_points

    reg = make_registry(tmp_path / "registry.duckdb")
    points = pd.DataFrame(sweep_points(reg, ["k4", "k32", "missing"], "val")).set_index("experiment")
    assert list(points.index) == ["k32", "k4"]
    np.testing.assert_allclose(points["l0_mean"], [32, 4])
    np.testing.assert_allclose(points["fvu"], [1 / 32, 1 / 4])
    np.testing.assert_allclose(points["r2_scalar_mean_study"], [1 - 1 / 32, 1 - 1 / 4])

    out = tmp_path / "sweep.png"
    result = CliRunner().invoke(app, ["plot-sweep", "--out", str(out), "--registry", str(tmp_path / "registry.duckdb")])
    assert result.exit_code == 0, result.output
    assert size_of(out) == (900, 360)
    args = ["plot-sweep", "--split", "train", "--out", str(tmp_path / "none.png")]
    none = CliRunner().invoke(app, [*args, "--registry", str(tmp_path / "registry.duckdb")])
    assert none.exit_code != 0 and "no evaluated experiment with L0 on split 'train'" in str(none.exception)
    assert not (tmp_path / "none.png").exists()
