"""Specs: strict validation with file:field messages, sweeps, canonical hashing."""

from __future__ import annotations

import json

import pytest
import yaml

from medsae.errors import SpecError
from medsae.spec import ExperimentSpec, load_specs, parse_specs


def _write(tmp_path, data, name="spec.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def test_unknown_key_names_file_and_field(tmp_path):
    path = _write(tmp_path, {"name": "x", "data": {"root": "d", "strid": 2}})
    with pytest.raises(SpecError) as err:
        load_specs(path)
    assert str(err.value) == f"{path}:data.strid: unknown key (did you mean 'stride'?)"


def test_unknown_keys_are_all_listed_with_the_closest_field(tmp_path):
    """Every problem is a line; a close field name of the same section is suggested, a far one is not."""
    path = _write(
        tmp_path,
        {"name": "x", "data": {"root": "d"}, "sae": {"expanson": 4, "k": 0}, "embed": {"zzzz": 1}},
    )
    with pytest.raises(SpecError) as err:
        load_specs(path)
    lines = sorted(str(err.value).splitlines())
    assert lines == [
        f"{path}:embed.zzzz: unknown key",
        f"{path}:sae.expanson: unknown key (did you mean 'expansion'?)",
        f"{path}:sae.k: Input should be greater than or equal to 1",
    ]


def test_wrong_type_names_field(tmp_path):
    path = _write(tmp_path, {"name": "x", "data": {"root": "d"}, "sae": {"k": "ten"}})
    with pytest.raises(SpecError) as err:
        load_specs(path)
    assert str(err.value).startswith(f"{path}:sae.k: ")


def test_invalid_yaml_reports_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\ndata: {root: d\n")
    with pytest.raises(SpecError) as err:
        load_specs(path)
    assert str(err.value).startswith(f"{path}:")


def test_defaults_are_filled_and_hash_is_canonical():
    a = parse_specs({"name": "x", "data": {"root": "d"}})[0]
    b = parse_specs({"data": {"root": "d"}, "name": "x", "sae": {"k": 10}})[0]  # k=10 is the default
    assert a.spec_hash() == b.spec_hash()
    resolved = json.loads(a.canonical_json())
    assert resolved["sae"]["k"] == 10 and resolved["data"]["stride"] == 1
    c = parse_specs({"name": "x", "data": {"root": "d"}, "sae": {"k": 11}})[0]
    assert c.spec_hash() != a.spec_hash()


def test_sweep_expands_to_grid_with_names():
    raw = {"name": "s", "data": {"root": "d"}, "sweep": {"grid": {"sae.k": [4, 8], "sae.expansion": [2, 4]}}}
    specs = parse_specs(raw)
    assert len(specs) == 4
    assert {(s.sae.k, s.sae.expansion) for s in specs} == {(4, 2), (4, 4), (8, 2), (8, 4)}
    assert len({s.name for s in specs}) == 4 and all(s.name.startswith("s@") for s in specs)
    assert all(s.sweep is None for s in specs)


def test_sweep_skip_invalid_drops_impossible_points():
    raw = {
        "name": "g",
        "data": {"root": "d"},
        "sae": {"arch": "matryoshka", "levels": [4, 16], "level_k": [2, 2]},
        "sweep": {"grid": {"sae.level_k": [[2, 2], [8, 8]]}, "skip_invalid": True},
    }
    assert len(parse_specs(raw)) == 1
    raw["sweep"]["skip_invalid"] = False
    with pytest.raises(SpecError, match="level budget"):
        parse_specs(raw)


def test_sweep_unknown_section_is_an_error():
    with pytest.raises(SpecError, match="sweep.grid.saee.k"):
        parse_specs({"name": "s", "data": {"root": "d"}, "sweep": {"grid": {"saee.k": [1]}}})


def test_shipped_specs_validate():
    for path in ("experiments/demo.yaml", "experiments/dinov3_k10.yaml"):
        specs = load_specs(path)
        assert specs and all(isinstance(s, ExperimentSpec) for s in specs)


def test_yaml_merge_keys_may_be_overridden_but_plain_duplicates_may_not(tmp_path):
    path = tmp_path / "merge.yaml"
    path.write_text("base: &b {k: 4, expansion: 2}\nname: x\ndata: {root: d}\nsae:\n  <<: *b\n  k: 8\n")
    with pytest.raises(SpecError, match="base: unknown key"):  # the anchor holder is not a section...
        load_specs(path)
    path.write_text("name: x\ndata: &d {root: d}\nsae:\n  <<: {k: 4, expansion: 2}\n  k: 8\n")
    spec = load_specs(path)[0]  # ...but an explicit key overriding a merged one is fine
    assert (spec.sae.k, spec.sae.expansion) == (8, 2)
    path.write_text("name: x\ndata: {root: d}\nsae:\n  k: 4\n  expansion: 2\n  k: 8\n")
    with pytest.raises(SpecError) as err:
        load_specs(path)
    assert str(err.value) == f"{path}:6: invalid YAML: duplicate key 'k' (first on line 4)"


def test_utf8_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "bom.yaml"
    path.write_bytes(b"\xef\xbb\xbfname: x\ndata: {root: d}\n")
    assert load_specs(path)[0].name == "x"


def test_bounds_are_in_the_schema():
    from medsae.spec import json_schema

    defs = json_schema()["$defs"]
    epochs = defs["SAESpec"]["properties"]["epochs"]
    assert (epochs["exclusiveMinimum"], epochs["maximum"]) == (0, 10_000)
    subjects = defs["PhantomSpec"]["properties"]["subjects"]
    assert (subjects["minimum"], subjects["maximum"]) == (2, 1000)
    assert defs["DataSpec"]["properties"]["root"]["minLength"] == 1
