"""Listing commands' output, NAME@HASH, choices and the "no registry" message, on a real registry file.

The registry is filled with rows written here (two registrations of one name, metrics on three
splits, explanations with a baseline), and every check compares what a command prints or writes
(table, csv, json) with values computed here from those rows. Commands run in-process through
typer's test runner, whose stdout is not a terminal: the pipe case.
"""

from __future__ import annotations

import csv
import io
import json
import re

import pandas as pd
import pytest
import typer
import yaml
from typer.main import get_command_name
from typer.testing import CliRunner

from medsae.cli.common import ArgumentError
from medsae.cli.main import app
from medsae.cli.output import number
from medsae.errors import MedsaeError
from medsae.registry import Registry
from medsae.registry.db import RegistryMissingError

LONG_NAME = "a_rather_long_experiment_name_that_must_never_be_cut"
OLD_ID = "0a1b2c3d4e5f" + "0" * 52
NEW_ID = "0a1b99999999" + "1" * 52
LONG_ID = "f00d" * 16
SPLITS = ("test", "val", "train")  # inserted out of reading order
METRICS = [f"metric_{i:02d}" for i in range(70)] + ["dead_fraction", "fvu"]


def _value(experiment: str, split: str, metric: str) -> float:
    """A distinct value per (experiment, split, metric), with more digits than 4 significant ones."""
    h = sum(ord(c) * (i + 1) for i, c in enumerate(f"{experiment}/{split}/{metric}"))
    return (h % 9973) / 7.0 + 1e-6


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> Registry:
    reg = Registry(tmp_path_factory.mktemp("cli_output") / "registry.duckdb")
    experiments = [(OLD_ID, "demo", "2025-01-01"), (NEW_ID, "demo", "2025-02-01"), (LONG_ID, LONG_NAME, "2025-03-01")]
    reg.insert(
        "experiments",
        [
            {"experiment_id": i, "name": n, "spec_json": "{}", "spec_hash": i, "created_at": t}
            for i, n, t in experiments
        ],
    )
    links, stages, metrics = [], [], []
    for eid, _, _ in experiments:
        for kind in ("train", "evaluate", "summarize"):
            key = f"{kind}-{eid[:8]}"
            links.append({"experiment_id": eid, "kind": kind, "stage_key": key})
            stages.append(
                {
                    "stage_key": key,
                    "kind": kind,
                    "code_version": "1",
                    "params_json": "{}",
                    "status": "done",
                    "seconds": 1.25,
                    "summary_json": json.dumps({"n": 3, "fvu": 0.123456789, "nested": {"a": 1}}),
                }
            )
        for split in SPLITS:
            kind = "train" if split == "train" else "evaluate"
            for metric in METRICS:
                metrics.append(
                    {
                        "stage_key": f"{kind}-{eid[:8]}",
                        "split": split,
                        "name": metric,
                        "value": _value(eid, split, metric),
                        "n": 10,
                    }
                )
    art = reg.path.parent / "artifacts"
    for kind in ("summarize", "slices"):  # what `explain compare` reads beside the registry
        key = f"{kind}-{NEW_ID[:8]}"
        (art / key).mkdir(parents=True)
        if kind == "slices":
            links.append({"experiment_id": NEW_ID, "kind": kind, "stage_key": key})
            stages.append({"stage_key": key, "kind": kind, "code_version": "1", "params_json": "{}", "status": "done"})
        next(s for s in stages if s["stage_key"] == key)["artifact_dir"] = str(art / key)
    pd.DataFrame({"latent": [0, 1], "sae_key": [f"train-{NEW_ID[:8]}"] * 2}).to_parquet(
        art / f"summarize-{NEW_ID[:8]}" / "latents.parquet"
    )
    reg.insert("experiment_stages", links)
    reg.insert("stages", stages)
    reg.insert("metrics", metrics)
    # explanations of the newest 'demo': two LLM explanations and a baseline with a much higher score
    summarize = f"summarize-{NEW_ID[:8]}"
    expl = [
        {
            "explanation_id": f"x{i}",
            "stage_key": summarize,
            "sae_key": f"train-{NEW_ID[:8]}",
            "latent": i,
            "explainer_model": model,
            "template_hash": "t",
            "text": "t",
            "status": "ok",
            "kind": kind,
        }
        for i, (model, kind) in enumerate(
            [("medsae/baseline", "explanation"), ("medsae/baseline", "explanation"), ("rule", "best_attribute")]
        )
    ]
    reg.insert("explanations", expl)
    reg.insert(
        "explanation_scores",
        [
            {"score_id": f"s{i}", "explanation_id": f"x{i}", "method": "pearson", "scorer_model": "m", "value": v}
            for i, v in enumerate([0.2, 0.5, 0.99])
        ],
    )
    return reg


def invoke(*args: str, reg: Registry | None = None, columns: int = 80, stdin: str | None = None):
    registry = ["--registry", str(reg.path)] if reg is not None else []
    return CliRunner().invoke(app, [*args, *registry], env={"COLUMNS": str(columns)}, input=stdin)


def ok(*args: str, **kw) -> str:
    result = invoke(*args, **kw)
    assert result.exit_code == 0, (result.output, result.exception)
    return result.stdout


def test_number_keeps_four_significant_digits():
    for value in (0.36773386700543, 12345.678, 6.0, 4.8047991943297374e-05, -0.0847356863408713, 2.91964087532685):
        text = number(value)
        assert "e" not in text or abs(value) < 1e-4
        assert float(text) == pytest.approx(value, rel=5e-4)
        digits = re.sub(r"e.*$", "", text).lstrip("-").replace(".", "").lstrip("0")
        assert len(digits.rstrip("0") if "." not in text else digits) <= 4, text
    assert number(6.0) == "6" and number(12345.678) == "12350"


def test_exp_list_in_a_pipe_cuts_nothing_and_csv_json_match_the_rows(registry):
    table = ok("exp", "list", reg=registry)
    assert "…" not in table
    lines = [ln for ln in table.splitlines() if LONG_NAME in ln]
    assert len(lines) == 1 and LONG_ID[:12] in lines[0]  # the whole row on one line, name and hash intact
    fvu = number(_value(LONG_ID, "val", "fvu"))
    assert re.search(rf"[│ ]{re.escape(fvu)}[│ ]", lines[0])
    assert "dead (never fire on val): share of latents that never fire" in table  # split and definition

    rows = list(csv.DictReader(io.StringIO(ok("exp", "list", "--format", "csv", reg=registry))))
    assert [(r["name"], r["hash"]) for r in rows] == [
        ("demo", OLD_ID[:12]),
        ("demo", NEW_ID[:12]),
        (LONG_NAME, LONG_ID[:12]),
    ]
    for r, eid in zip(rows, (OLD_ID, NEW_ID, LONG_ID), strict=True):
        assert float(r["fvu"]) == pytest.approx(_value(eid, "val", "fvu"), rel=1e-12)  # unrounded, val split
        assert float(r["dead_fraction"]) == pytest.approx(_value(eid, "val", "dead_fraction"), rel=1e-12)
        assert r["stages"] == ("4/4" if eid == NEW_ID else "3/3")  # the newest demo has a slices stage too
    data = json.loads(ok("exp", "list", "-f", "JSON", reg=registry))  # choices ignore case
    assert data[2]["name"] == LONG_NAME and data[2]["fvu"] == pytest.approx(_value(LONG_ID, "val", "fvu"))


def test_exp_show_orders_splits_rounds_and_says_what_it_left_out(registry):
    out = ok("exp", "show", "demo", reg=registry)
    header = next(ln for ln in out.splitlines() if ln.startswith("┃ metric"))
    assert header.index("train") < header.index("val") < header.index("test")
    row = next(ln for ln in out.splitlines() if "metric_00 " in ln)
    cells = [c.strip() for c in row.strip("│ ").split("│")]
    assert cells == ["metric_00", *(number(_value(NEW_ID, s, "metric_00")) for s in ("train", "val", "test"))]
    assert f"{len(METRICS) - 60} more metric(s) not shown" in out and "--limit 0" in out
    assert "summary" in out and "fvu=0.1235" in out  # stage summaries rounded too
    everything = ok("exp", "show", "demo", "--limit", "0", reg=registry)
    assert "more metric(s) not shown" not in everything and "metric_69" in everything

    data = json.loads(ok("exp", "show", "demo", "--format", "json", reg=registry))
    assert data["experiment_id"] == NEW_ID and len(data["metrics"]) == len(METRICS) * len(SPLITS)
    assert [m["split"] for m in data["metrics"][:: len(METRICS)]] == ["train", "val", "test"]
    pearson = data["explanations"]
    assert pearson == [{"explainer": "medsae/baseline", "latents": 2, "mean_pearson": pytest.approx(0.35)}]
    text = ok("exp", "show", "demo", "--format", "csv", reg=registry)
    titles = [ln for ln in text.splitlines() if ln.startswith("# ")]
    assert titles[0].startswith(f"# demo@{NEW_ID[:12]}") and "# stages" in titles and "# metrics" in titles
    tables = text.split("\n\n")[1:]  # three csv tables, each after its title line
    assert [len(list(csv.reader(io.StringIO(t.split("\n", 1)[1])))) - 1 for t in tables] == [4, 216, 1]


def test_name_at_hash_addresses_one_registration(registry):
    assert json.loads(ok("exp", "show", "demo", "-f", "json", reg=registry))["experiment_id"] == NEW_ID
    assert json.loads(ok("exp", "show", "demo@0a1b2c", "-f", "json", reg=registry))["experiment_id"] == OLD_ID
    ambiguous = invoke("exp", "show", "demo@0a1b", reg=registry).exception
    assert isinstance(ambiguous, MedsaeError) and "matches 2 registrations" in str(ambiguous)
    assert f"demo@{OLD_ID[:12]}" in str(ambiguous) and f"demo@{NEW_ID[:12]}" in str(ambiguous)
    unknown = invoke("exp", "show", "dmeo", reg=registry).exception
    assert "no experiment named 'dmeo'" in str(unknown) and "did you mean 'demo'" in str(unknown)
    assert "\n" not in str(unknown) and "\n" not in str(ambiguous)
    rows = json.loads(ok("exp", "compare", "demo@0a1b2c", "demo", "-f", "json", reg=registry))["rows"]
    assert [r["experiment"] for r in rows] == [f"demo@{OLD_ID[:12]}", "demo"]
    assert [r["fvu"] for r in rows] == pytest.approx([_value(OLD_ID, "val", "fvu"), _value(NEW_ID, "val", "fvu")])


def test_compare_show_sql_runs_as_printed_through_sql_stdin(registry):
    sql = ok("exp", "compare", "demo@0a1b2c", LONG_NAME, "--show-sql", reg=registry)
    assert sql.lstrip().startswith("WITH") and "│" not in sql
    piped = list(csv.DictReader(io.StringIO(ok("sql", "-", "--format", "csv", reg=registry, stdin=sql))))
    expected = json.loads(ok("exp", "compare", "demo@0a1b2c", LONG_NAME, "-f", "json", reg=registry))["rows"]
    assert [r["experiment"] for r in piped] == [r["experiment"] for r in expected]
    assert [float(r["fvu"]) for r in piped] == pytest.approx([r["fvu"] for r in expected], rel=1e-12)


def test_explain_compare_formats(registry):
    out = ok("explain", "compare", "demo", reg=registry)
    assert "no shuffled baseline scored yet" in out and "best_attribute" in out
    rows = list(csv.DictReader(io.StringIO(ok("explain", "compare", "demo", "-f", "csv", reg=registry))))
    means = {(r["method"], r["kind"]): float(r["mean"]) for r in rows}
    assert means == pytest.approx({("pearson", "explanation"): 0.35, ("pearson", "best_attribute"): 0.99})
    data = json.loads(ok("explain", "compare", "demo", "-f", "json", reg=registry))
    assert data["scorer_gaps"] == [] and [r["n"] for r in data["rows"]] == [2, 1]


def test_no_registry_is_one_message_for_every_read_command(tmp_path):
    missing = Registry(tmp_path / "none.duckdb")
    messages = set()
    for args in (
        ("exp", "list"),
        ("exp", "show", "x"),
        ("exp", "compare", "x"),
        ("explain", "compare", "x"),
        ("explain", "show", "x", "0"),
        ("sql", "SELECT 1"),
    ):
        result = invoke(*args, reg=missing)
        assert isinstance(result.exception, RegistryMissingError), (args, result.output)
        messages.add(str(result.exception))
    assert messages == {f"{missing.path}: no registry here yet (run `medsae exp run SPEC` first)"}
    assert not missing.path.exists()


def test_bad_stage_is_refused_before_any_work(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        yaml.safe_dump({"name": "t", "data": {"root": str(tmp_path / "phantom"), "phantom": {"subjects": 2}}})
    )
    result = invoke("exp", "run", str(spec), "--force", "trian", reg=Registry(tmp_path / "registry.duckdb"))
    error = result.exception
    assert isinstance(error, ArgumentError) and error.exit_code == 2
    assert str(error) == (
        "--force: unknown stage 'trian' (expected one of slices, embed, train, encode, ground, evaluate, summarize, "
        "interpret; did you mean 'train'?)"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.yaml"]  # no phantom, no registry
    bad_format = invoke("exp", "list", "--format", "yaml", reg=Registry(tmp_path / "registry.duckdb")).exception
    assert isinstance(bad_format, ArgumentError) and "expected one of table, csv, json" in str(bad_format)


def _commands(group: typer.Typer, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = [prefix + (c.name or get_command_name(c.callback.__name__),) for c in group.registered_commands]
    for sub in group.registered_groups:
        out += _commands(sub.typer_instance, prefix + (sub.name,))
    return out


def test_help_shows_choices_and_no_type_labels_that_look_like_values():
    commands = _commands(app)
    assert len(commands) > 15
    for command in commands:
        text = ok(*command, "--help", columns=200)
        options = text.partition("\nOptions:")[2]  # (typer prints an argument's type after its metavar)
        assert "<bool>" not in text and "list[" not in options, (command, text)
    run_help = " ".join(ok("exp", "run", "--help", columns=200).split())  # help wraps at 80 columns
    assert "slices, embed, train, encode, ground, evaluate, summarize, interpret" in run_help
    assert "[table|csv|json]" in ok("exp", "list", "--help", columns=200)
    assert "[live|record|replay]" in ok("explain", "run", "--help", columns=200)


def test_cli_mode_choices_are_the_gateways():
    from medsae.cli.explain import LLM_MODES
    from medsae.interp.llm import MODES

    assert LLM_MODES == MODES
