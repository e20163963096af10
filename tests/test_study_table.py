"""End to end: the tiny phantom run under the study's protocol (evaluation and interpretation) and
evaluated under medsae's, and ``medsae study-table`` on it.

The study-protocol run must name the targets the phantom cannot support (no kvp contrast, none of
the study's scanner models) in one warning line and finish; the table's numbers must be the
registry's, read here with duckdb directly.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import yaml
from test_e2e import medsae, query, tiny_spec
from typer.testing import CliRunner

from medsae.cli.main import app
from medsae.registry import Registry

STUDY_SPEC = Path(__file__).parents[1] / "experiments" / "study_reproduce.yaml"


def _spec(tmp, protocol: str) -> dict:
    """The tiny phantom; under the study's protocol with the eval and interpret sections of
    experiments/study_reproduce.yaml (phantom-sized budgets and 20 latents on top)."""
    spec = tiny_spec(tmp)
    spec["name"] = f"tiny_{protocol}"
    if protocol == "study":
        reproduce = yaml.safe_load(STUDY_SPEC.read_text())
        spec["eval"].update(reproduce["eval"])
        spec["interpret"] = {**reproduce["interpret"], "study_latents": 20}
    # a val split with several scans (no held-out institute), a short training and small probe budgets
    spec["data"].update(test_institutes=["J"], val_fraction=0.4, size=32, stride=2)
    spec["data"]["phantom"].update(shape=[32, 32, 40])
    spec["embed"].update(input_size=32)
    spec["sae"].update(epochs=8, checkpoint_every=1000)
    spec["eval"].update(
        protocol=protocol,
        plots=False,
        probe_max_iter=100,
        recovery_max_iter=50,
        mono_top_ns=[3, 5, 50],  # the study selects latents by monosemanticity-50
        mono_min_images=2,
        mono_null_draws=10,
        retrieval_refs=30,
        retrieval_ks=[1, 5, 20],
    )
    return spec


@pytest.fixture(scope="module")
def two_protocols(tmp_path_factory):
    """The tiny phantom run end to end under the study's protocol, then medsae's evaluate on the same SAE."""
    tmp = tmp_path_factory.mktemp("study_table")
    registry = tmp / "registry.duckdb"
    for protocol in ("study", "medsae"):
        (tmp / f"{protocol}.yaml").write_text(yaml.safe_dump(_spec(tmp, protocol)))
    study = medsae("exp", "run", str(tmp / "study.yaml"), registry=registry, cwd=tmp)
    medsae("exp", "run", str(tmp / "medsae.yaml"), "--only", "evaluate", registry=registry, cwd=tmp)
    return tmp, registry, study


def study_table(registry, *args: str) -> str:
    """``medsae study-table ARGS`` in this process (the exit path of an error is tested through a subprocess)."""
    result = CliRunner().invoke(app, ["study-table", *args, "--registry", str(registry)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, (result.output, result.exception)
    return result.stdout


def _metric(registry, experiment: str, name: str, n_features: int | None = None, column: str = "value"):
    found = query(
        registry,
        f"""SELECT m.{column} FROM experiments e JOIN experiment_stages es USING (experiment_id)
            JOIN metrics m ON m.stage_key = es.stage_key
            WHERE e.name = ? AND es.kind = 'evaluate' AND m.split = 'val' AND m.name = ?
              AND m.target IS NULL AND m.n_features IS NOT DISTINCT FROM ?""",
        [experiment, name, n_features],
    )
    assert len(found) <= 1
    return found[0][0] if found else None


def test_study_protocol_names_the_skipped_targets_in_one_line(two_protocols):
    _, registry, study = two_protocols
    lines = [line for line in study.stderr.splitlines() if "skipped probe targets" in line]
    assert len(lines) == 1
    assert lines[0].startswith("evaluate (study protocol): skipped probe targets: ")
    assert "kvp (1 of 2 classes on the train split" in lines[0]
    assert "scanner_model=Achieva" in lines[0] and "organs_thoracic=sternum" in lines[0]
    summary = json.loads(
        query(registry, "SELECT summary_json FROM stages WHERE kind = 'evaluate' AND summary_json LIKE '%study%'")[0][0]
    )
    assert summary["protocol"] == "study" and summary["skipped_probe_targets"] == lines[0]
    targets = {t for (t,) in query(registry, "SELECT DISTINCT target FROM metrics WHERE name = 'probe_auc_dense'")}
    assert {"modality=mri", "modality=ct", "slice_orientation=x"} <= targets  # the study's target names
    assert "structure=liver" in targets  # medsae's protocol, same registry


def test_study_table_values_are_the_registry_metrics(two_protocols):
    _, registry, _ = two_protocols
    payload = json.loads(study_table(registry, "tiny_study", "tiny_medsae", "--format", "json"))
    assert payload["protocols"] == ["study", "medsae"]
    (row,) = payload["configurations"]
    assert (row["config"], row["experiment"], row["experiment_medsae"]) == (
        "topk D_256_K_6",
        "tiny_study",
        "tiny_medsae",
    )
    columns = {
        "l0": ("l0_mean", None),
        "r2": ("r2_scalar_mean_study", None),
        "alive": ("alive_per_batch_study", None),
        "m10": ("mono_config_top10", None),
        "m50": ("monosemanticity_top50_mean", None),
        "dense_auc": ("probe_auc_dense_mean", None),
        "sparse_auc": ("probe_auc_sparse_mean", None),
        "auc10": ("recovery_auc_mean", 10),
        "mean_n": ("recovery_mean_n_features", None),
        "fp_sparse": ("fingerprint_quality_sparse", 5),
        "fp_dense_fp": ("fingerprint_quality_dense_fp", 5),
        "fp_dense": ("fingerprint_quality_dense", None),
        "fp_relative": ("fingerprint_relative_sparse", 5),
    }
    checked = 0
    for key, (name, k) in columns.items():
        for suffix, experiment in (("", "tiny_study"), ("_medsae", "tiny_medsae")):
            expected = _metric(registry, experiment, name, k)
            if expected is None:
                assert row[key + suffix] is None, key + suffix
            else:
                assert row[key + suffix] == pytest.approx(expected, rel=1e-12), key + suffix
                checked += 1
    assert checked >= 20
    auc10, dense = (
        _metric(registry, "tiny_study", "recovery_auc_mean", 10),
        _metric(registry, "tiny_study", "probe_auc_dense_mean"),
    )
    assert row["rec10"] == pytest.approx(auc10 / dense)
    assert row["n_targets"] == _metric(registry, "tiny_study", "recovery_mean_n_features", column="n")
    # one configuration per embedding: rank 1 wherever both ranking scores exist
    assert row["final_rank"] == 1 and row["rank_mono"] == 1 and row["rank_perf"] == 1
    # the 5-way ranking of the study protocol's interpretation, counted here from the score rows
    ranks = [
        json.loads(extra)["rank"]
        for (extra,) in query(
            registry,
            """SELECT s.extra_json FROM explanation_scores s JOIN explanations x USING (explanation_id)
               JOIN experiment_stages es ON es.stage_key = x.stage_key  -- explanations carry summarize's key
               JOIN experiments e USING (experiment_id)
               WHERE e.name = 'tiny_study' AND s.method = 'ranking_study_top2'""",
        )
    ]
    assert len(ranks) >= 5 and set(ranks) <= {1, 2, 3, 4, 5}
    assert row["top1"] == pytest.approx(sum(r == 1 for r in ranks) / len(ranks))
    assert row["top2"] == pytest.approx(sum(r <= 2 for r in ranks) / len(ranks))
    ks = [r["k"] for r in payload["fingerprint"]]
    assert ks == [1, 5, 20, "dense"]
    for r in payload["fingerprint"][:-1]:
        assert r["sparse"] == pytest.approx(_metric(registry, "tiny_study", "fingerprint_quality_sparse", r["k"]))
        assert r["dense_fp_medsae"] == pytest.approx(
            _metric(registry, "tiny_medsae", "fingerprint_quality_dense_fp", r["k"])
        )
    # the study's padding and reference draw change the sparse numbers, not the dense baseline's definition
    assert not math.isclose(row["fp_sparse"], row["fp_sparse_medsae"], rel_tol=1e-9) or not math.isclose(
        row["r2"], row["r2_medsae"], rel_tol=1e-9
    )


def test_study_table_prints_rows_and_missing_marks(two_protocols):
    tmp, registry, _ = two_protocols
    table = study_table(registry)
    assert "tiny_study" in table and "tiny_medsae" in table and "R² (medsae)" in table
    assert "–" in table  # the 5-way ranking did not run
    csv = study_table(registry, "tiny_study", "--format", "csv")
    header = csv.splitlines()[1]
    assert header.startswith("backbone,config,experiment,l0,r2,") and "_medsae" not in header
    bad = medsae("study-table", "nope", registry=registry, cwd=tmp, check=False)
    assert bad.returncode != 0 and len(bad.stderr.strip().splitlines()) == 1
    assert bad.stderr.startswith("error: ") and "nope" in bad.stderr


def test_study_table_reads_the_five_way_ranking(two_protocols, tmp_path):
    _, registry, _ = two_protocols
    copy = tmp_path / "registry.duckdb"
    shutil.copy(registry, copy)
    reg = Registry(copy)
    with reg.write() as con:  # only the rows below: the real run's ranking is checked above
        con.execute("DELETE FROM explanation_scores WHERE method LIKE 'ranking%'")
    (summarize,) = query(
        copy,
        """SELECT es.stage_key FROM experiments e JOIN experiment_stages es USING (experiment_id)
           WHERE e.name = 'tiny_study' AND es.kind = 'summarize'""",
    )[0]
    ranks = [1, 2, 3, 1, None, 5]  # None: a ranking the judge's answer did not give
    reg.insert(
        "explanations",
        [
            {"explanation_id": f"x{i}", "stage_key": summarize, "sae_key": "sae", "latent": i,
             "explainer_model": "m", "template_hash": "t", "status": "ok", "kind": "explanation", "text": "e"}
            for i in range(len(ranks))
        ],
    )  # fmt: skip
    reg.insert(
        "explanation_scores",
        [
            {"score_id": f"s{i}", "explanation_id": f"x{i}", "method": "ranking_top2", "scorer_model": "m",
             "value": None if r is None else float(r <= 2), "extra_json": json.dumps({"rank": r})}
            for i, r in enumerate(ranks)
        ],
    )  # fmt: skip
    (row,) = json.loads(study_table(copy, "tiny_study", "--format", "json"))["configurations"]
    ranked = [r for r in ranks if r is not None]
    assert row["top1"] == pytest.approx(sum(r == 1 for r in ranked) / len(ranked))
    assert row["top2"] == pytest.approx(sum(r <= 2 for r in ranked) / len(ranked))


def test_two_protocols_on_one_sae_keep_their_own_rankings(tmp_path):
    """Explanations of one SAE's latent from two summarize stages (e.g. both protocols) count per stage."""
    from medsae.registry import queries

    reg = Registry(tmp_path / "registry.duckdb")
    ranks = {"stage_a": [1, 4], "stage_b": [2, 3]}  # latents 0 and 1 in each stage, same SAE and model
    reg.insert(
        "explanations",
        [
            {"explanation_id": f"{k}{i}", "stage_key": k, "sae_key": "sae", "latent": i, "explainer_model": "m",
             "template_hash": "t", "status": "ok", "kind": "explanation", "text": "e"}
            for k, rs in ranks.items() for i in range(len(rs))
        ],
    )  # fmt: skip
    reg.insert(
        "explanation_scores",
        [
            {"score_id": f"s{k}{i}", "explanation_id": f"{k}{i}", "method": "ranking_study_top2", "scorer_model": "m",
             "value": float(r <= 2), "extra_json": json.dumps({"rank": r})}
            for k, rs in ranks.items() for i, r in enumerate(rs)
        ],
    )  # fmt: skip
    got = {r["summarize_key"]: r for r in queries.ranking_outcomes(reg, list(ranks))}
    for key, rs in ranks.items():
        assert got[key]["n_ranked"] == len(rs)
        assert got[key]["top1"] == pytest.approx(sum(r == 1 for r in rs) / len(rs))
        assert got[key]["top2"] == pytest.approx(sum(r <= 2 for r in rs) / len(rs))
