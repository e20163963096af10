"""`--set FIELD=VALUE` overrides on `exp validate/plan/run`: YAML values, checked like the file, hashed.

The expected hash of an overridden spec is computed independently, by writing the value into a
copy of the file and loading that.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import yaml
from typer.testing import CliRunner

from medsae.cli.main import app
from medsae.errors import SpecError
from medsae.plan import plan_experiment
from medsae.spec import load_specs

BASE = {
    "name": "ovr",
    "data": {"root": "no-data-here"},
    "sae": {"arch": "topk", "d_sae": 64, "k": 4},
}


@pytest.fixture
def spec_file(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(BASE))
    return path


def written(tmp_path, **sections) -> str:
    """A copy of BASE with ``sections`` merged in, as a file: the independent reference."""
    body = yaml.safe_load(yaml.safe_dump(BASE))
    for section, values in sections.items():
        if isinstance(values, dict):
            body.setdefault(section, {}).update(values)
        else:  # a top-level field
            body[section] = values
    path = tmp_path / f"ref{len(list(tmp_path.glob('ref*')))}.yaml"
    path.write_text(yaml.safe_dump(body))
    return load_specs(path)[0]


def test_values_are_yaml_and_enter_the_hash(spec_file, tmp_path):
    text = spec_file.read_text()
    plain = load_specs(spec_file)[0]
    sets = ["sae.k=16", "data.modalities=[ct]", "embed.pretrained=false", "sae.lr=0.0003", "description=a b=c"]
    spec = load_specs(spec_file, sets)[0]
    assert (spec.sae.k, spec.data.modalities, spec.embed.pretrained, spec.sae.lr) == (16, ["ct"], False, 0.0003)
    assert spec.description == "a b=c"  # only the first '=' separates
    reference = written(
        tmp_path,
        sae={"k": 16, "lr": 0.0003},
        data={"modalities": ["ct"]},
        embed={"pretrained": False},
        description="a b=c",
    )
    assert spec.spec_hash() == reference.spec_hash() != plain.spec_hash()
    assert spec_file.read_text() == text  # the file is not touched
    assert load_specs(spec_file, ["sae.k=8", "sae.k=12"])[0].sae.k == 12  # the last one wins


def test_stage_keys_change_from_the_overridden_stage_on(spec_file):
    plain = plan_experiment(load_specs(spec_file)[0], prepare_data=False).nodes
    over = plan_experiment(load_specs(spec_file, ["sae.k=8"])[0], prepare_data=False).nodes
    for kind in ("slices", "embed"):
        assert over[kind].key == plain[kind].key, kind
    for kind in ("train", "encode", "evaluate", "summarize", "interpret"):
        assert over[kind].key != plain[kind].key, kind


@pytest.mark.parametrize(
    ("item", "fragment"),
    [
        ("sae.k=ten", "sae.k: Input should be a valid integer"),
        ("sae.kk=3", "sae.kk: unknown key (from --set sae.kk)"),
        ("sae.k", "--set sae.k: expected FIELD=VALUE"),
        ("=3", "expected FIELD=VALUE"),
        ("sae..k=3", "is not a dotted field path"),
        ("name.first=x", "--set name.first: 'name' is not a section"),
        ("sweep.skip_invalid=true", "--set sweep.skip_invalid: the sweep block cannot be overridden"),
        ("sae.k=[1, 2", "--set sae.k"),
    ],
)
def test_bad_overrides_are_one_spec_error_naming_the_field(spec_file, item, fragment):
    with pytest.raises(SpecError) as err:
        load_specs(spec_file, [item])
    message = str(err.value)
    assert fragment in message, message
    assert message.count("\n") == 0


def test_value_errors_name_the_override(spec_file):
    with pytest.raises(SpecError) as err:
        load_specs(spec_file, ["sae.k=0"])
    assert str(err.value).startswith(f"{spec_file}:sae.k: ") and str(err.value).endswith("(from --set sae.k)")


def test_sweeps_take_overrides_on_every_point_but_not_on_grid_fields(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({**BASE, "sweep": {"grid": {"sae.k": [2, 4]}}}))
    specs = load_specs(path, ["sae.d_sae=32"])
    assert [(s.sae.k, s.sae.d_sae) for s in specs] == [(2, 32), (4, 32)]
    with pytest.raises(SpecError, match=r"--set sae.k: .*sweep grid varies this field"):
        load_specs(path, ["sae.k=8"])


def test_cli_plan_and_validate_take_set(spec_file):
    runner = CliRunner()

    def keys(*extra: str) -> dict[str, str]:
        result = runner.invoke(
            app, ["exp", "plan", str(spec_file), *extra, "--registry", str(spec_file.parent / "r.db")]
        )
        assert result.exit_code == 0, result.output
        return dict(re.findall(r"(slices|embed|train|encode)\s*│\s*([0-9a-f]{12})", result.output))

    plain, over = keys(), keys("--set", "sae.k=8")
    assert len(plain) == 4 and plain["slices"] == over["slices"] and plain["train"] != over["train"]
    assert not (spec_file.parent / "r.db").exists()  # planning writes no registry

    ok = runner.invoke(app, ["exp", "validate", str(spec_file), "--set", "sae.k=8"])
    assert ok.exit_code == 0 and "1 experiment(s): ovr" in ok.output
    # through the real entry point: exit code 2 and one line on stderr
    proc = subprocess.run(
        [sys.executable, "-m", "medsae.cli.main", "exp", "validate", str(spec_file), "--set", "sae.k=ten"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "sae.k" in lines[0] and "--set sae.k" in lines[0], lines
