"""The configuration-ranking SQL on a real DuckDB registry against a pandas computation."""

from __future__ import annotations

import numpy as np
import pandas as pd

from medsae.eval.ranking import RANKING_VIEW, ranking_sql
from medsae.registry.db import Registry

# experiment -> (embed stage, mono_config_top10, monosemanticity_top50_mean, recovery_mean_n_features)
EXPERIMENTS = {
    "d_a": ("emb1", 0.80, 0.50, 12.0),
    "d_b": ("emb1", 0.90, 0.40, 20.0),
    "d_c": ("emb1", 0.70, 0.60, 12.0),
    "d_d": ("emb1", 0.90, 0.55, 30.0),
    "r_a": ("emb2", 0.30, 0.20, 3.0),
    "r_b": ("emb2", 0.20, 0.25, 2.0),
}


def make_registry(path) -> Registry:
    reg = Registry(path)
    exps, links, metrics = [], [], []
    for name, (embed, m10, m50, perf) in EXPERIMENTS.items():
        exps.append({"experiment_id": f"id_{name}", "name": name, "spec_json": "{}", "spec_hash": name})
        links += [
            {"experiment_id": f"id_{name}", "kind": "embed", "stage_key": embed},
            {"experiment_id": f"id_{name}", "kind": "evaluate", "stage_key": f"ev_{name}"},
        ]
        for metric, value in (
            ("mono_config_top10", m10),
            ("monosemanticity_top50_mean", m50),
            ("recovery_mean_n_features", perf),
        ):
            metrics.append({"stage_key": f"ev_{name}", "split": "val", "name": metric, "value": value, "n": 7})
            # rows that must be ignored: another split, and a per-target row
            metrics.append({"stage_key": f"ev_{name}", "split": "test", "name": metric, "value": -value})
        metrics.append(
            {
                "stage_key": f"ev_{name}",
                "split": "val",
                "name": "recovery_mean_n_features",
                "value": 999.0,
                "target": "liver",
            }
        )
    reg.insert("experiments", exps)
    reg.insert("experiment_stages", links)
    # every row with the same keys (pyarrow takes the columns from the first row)
    reg.insert("metrics", [{"target": None, "n": None, **m} for m in metrics])
    return reg


def expected_ranking(names, mono_col: int, per_embedding: bool = True) -> pd.DataFrame:
    frame = pd.DataFrame(
        [(n, EXPERIMENTS[n][0], EXPERIMENTS[n][mono_col], EXPERIMENTS[n][3]) for n in names],
        columns=["experiment", "embed_key", "mono", "perf"],
    )
    groups = frame.groupby("embed_key") if per_embedding else frame.groupby(np.zeros(len(frame)))
    frame["rank_mono"] = groups["mono"].rank(ascending=False, method="min")
    frame["rank_perf"] = groups["perf"].rank(ascending=True, method="min")
    frame["rank_combined"] = (frame["rank_mono"] + frame["rank_perf"]) / 2
    groups = frame.groupby("embed_key") if per_embedding else frame.groupby(np.zeros(len(frame)))
    frame["final_rank"] = groups["rank_combined"].rank(method="min")
    return frame.set_index("experiment")


def check(rows, expected: pd.DataFrame) -> None:
    got = pd.DataFrame(rows).set_index("experiment")
    assert sorted(got.index) == sorted(expected.index)
    for col in ("rank_mono", "rank_perf", "rank_combined", "final_rank"):
        np.testing.assert_allclose(got.loc[expected.index, col].astype(float), expected[col], err_msg=col)


def test_view_ranks_within_each_embedding(tmp_path):
    reg = make_registry(tmp_path / "registry.duckdb")
    with reg.write() as con:
        con.execute(RANKING_VIEW)
    rows = reg.query("SELECT * FROM config_ranking")
    check(rows, expected_ranking(list(EXPERIMENTS), mono_col=1))
    by = {r["experiment"]: r for r in rows}
    assert by["d_a"]["mean_n_features"] == 12.0 and by["d_a"]["n_targets"] == 7


def test_subset_top50_and_global_ranking(tmp_path):
    reg = make_registry(tmp_path / "registry.duckdb")
    subset = ["d_a", "d_b", "d_c"]
    rows = reg.query(ranking_sql(subset, mono_metric="monosemanticity_top50_mean"))
    check(rows, expected_ranking(subset, mono_col=2))
    rows = reg.query(ranking_sql(per_embedding=False))
    check(rows, expected_ranking(list(EXPERIMENTS), mono_col=1, per_embedding=False))
    assert reg.query(ranking_sql(["nope"])) == []


def test_cli_rank_prints_the_ranking(tmp_path):
    from typer.testing import CliRunner

    from medsae.cli.eval import app

    make_registry(tmp_path / "registry.duckdb")
    out = CliRunner().invoke(app, ["rank", "d_a", "d_b", "--registry", str(tmp_path / "registry.duckdb")])
    assert out.exit_code == 0, out.output
    assert "d_a" in out.output and "d_b" in out.output and "r_a" not in out.output
    bad = CliRunner().invoke(app, ["rank", "--mono", "nope", "--registry", str(tmp_path / "registry.duckdb")])
    assert bad.exit_code != 0
