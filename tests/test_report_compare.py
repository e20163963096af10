"""`compare_experiments` against a direct Python computation over the rows inserted, and its CLI."""

from __future__ import annotations

import json

import duckdb
import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from medsae.cli.report import compare_command
from medsae.errors import MedsaeError
from medsae.registry import Registry
from medsae.report.compare import compare_experiments
from medsae.report.names import ANY, KEY_METRICS

TARGETS = ("modality", "plane", "liver")


def _fill(rows: list[dict]) -> list[dict]:
    cols = list(dict.fromkeys(k for r in rows for k in r))
    return [{c: r.get(c) for c in cols} for r in rows]


@pytest.fixture()
def registry(tmp_path):
    """Three experiments (one name registered twice, the older one must be ignored) with decoy rows."""
    rng = np.random.default_rng(3)
    reg = Registry(tmp_path / "registry.duckdb")
    exps = [
        ("old-a", "A", "2024-01-01"),
        ("a", "A", "2025-01-01"),
        ("b", "B", "2025-01-02"),
        ("c", "C", "2025-01-03"),
    ]
    reg.insert(
        "experiments",
        [{"experiment_id": i, "name": n, "spec_json": "{}", "spec_hash": i, "created_at": t} for i, n, t in exps],
    )
    stages, metrics, expl, scores = [], [], [], []
    for eid, _, _ in exps:
        stages += [{"experiment_id": eid, "kind": k, "stage_key": f"{k}-{eid}"} for k in ("evaluate", "train")]
        for k in KEY_METRICS:
            if k.source != "metrics":
                continue
            for split in ("val", "test", None):
                if k.target == ANY:
                    targets = TARGETS
                elif isinstance(k.target, tuple):
                    targets = [*k.target, "structures", None]  # rows outside the tuple are decoys
                else:
                    targets = [k.target, "decoy"]
                for target in targets:
                    for nf in (None, 5, 10, 20):
                        metrics.append(
                            {
                                "stage_key": f"evaluate-{eid}",
                                "split": split,
                                "name": k.name,
                                "target": target,
                                "n_features": nf,
                                "value": float(rng.normal()),
                            }
                        )
        for j in range(6):
            for kind in ("explanation", "explanation", "other_latent"):
                x = f"{eid}-{j}-{len(expl)}"
                expl.append(
                    {
                        "explanation_id": x,
                        "stage_key": f"summ-{eid}",
                        "sae_key": f"train-{eid}",
                        "latent": j,
                        "explainer_model": "m",
                        "template_hash": "t",
                        "kind": kind,
                    }
                )
                for method in ("pearson", "auroc"):
                    scores.append(
                        {
                            "score_id": f"{x}-{method}",
                            "explanation_id": x,
                            "method": method,
                            "value": float(rng.uniform(-1, 1)),
                        }
                    )
    reg.insert("experiment_stages", stages)
    reg.insert("metrics", _fill(metrics), ignore_conflicts=False)
    reg.insert("explanations", expl)
    reg.insert("explanation_scores", scores)
    return reg, {"metrics": metrics, "explanations": expl, "scores": scores}


def _matches(value, wanted) -> bool:
    if wanted == ANY:
        return True
    if isinstance(wanted, tuple):
        return value in wanted
    return value == wanted


def _expected(data: dict, eid: str) -> dict[str, float]:
    """Each key metric recomputed in plain Python from the inserted rows."""
    out = {}
    for k in KEY_METRICS:
        if k.source == "explanations":
            llm = {
                e["explanation_id"]
                for e in data["explanations"]
                if e["sae_key"] == f"train-{eid}" and e["kind"] == "explanation"
            }
            vals = [s["value"] for s in data["scores"] if s["explanation_id"] in llm and s["method"] == k.name]
        else:
            vals = [
                m["value"]
                for m in data["metrics"]
                if m["stage_key"] == f"evaluate-{eid}"
                and m["name"] == k.name
                and m["split"] == k.split
                and _matches(m["target"], k.target)
                and (k.n_features == "*" or m["n_features"] == k.n_features)
            ]
        assert vals, k.column
        out[k.column] = float(np.mean(vals))
    return out


def test_compare_matches_direct_computation(registry):
    reg, data = registry
    sql, rows = compare_experiments(reg, ["C", "A"])
    assert [r["experiment"] for r in rows] == ["C", "A"]
    for row, eid in zip(rows, ("c", "a"), strict=True):  # id 'a' is the newer of the two experiments named A
        expected = _expected(data, eid)
        for column, value in expected.items():
            assert row[column] == pytest.approx(value, abs=1e-9), column
    # the printed SQL is plain text that reruns as is
    con = duckdb.connect(str(reg.path), read_only=True)
    try:
        assert len(con.execute(sql).fetchall()) == 2
    finally:
        con.close()


def test_compare_unknown_experiment(registry):
    reg, _ = registry
    with pytest.raises(MedsaeError, match="no experiment named 'zzz'"):
        compare_experiments(reg, ["A", "zzz"])


def test_compare_cli_prints_sql_and_table(registry):
    reg, data = registry
    app = typer.Typer()
    app.command("compare")(compare_command)
    app.command("other")(lambda: None)  # a second command so typer keeps the sub-command name
    runner = CliRunner()
    result = runner.invoke(app, ["compare", "A", "B", "--registry", str(reg.path)], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert "FVU" in result.output and "--show-sql" in result.output  # the table says how to get its SQL
    result = runner.invoke(app, ["compare", "A", "B", "--registry", str(reg.path), "--show-sql"])
    assert result.exit_code == 0 and result.output.startswith("WITH wanted(name, ord)")
    result = runner.invoke(app, ["compare", "A", "B", "--registry", str(reg.path), "--format", "json"])
    payload = json.loads(result.output)
    assert [r["experiment"] for r in payload["rows"]] == ["A", "B"]
    assert payload["rows"][1]["fvu"] == pytest.approx(_expected(data, "b")["fvu"])
