"""Fault suite, spec part: hostile spec files give one `file: message` line and exit 2, never a traceback.

* the issue's cases one by one (huge sizes, inf, device paths, duplicate keys, binary, UTF-16, deep
  nesting, oversized files, a 5,000-digit integer...);
* every numeric field has a documented range in `medsae exp schema`, and the range is enforced;
* property-based fuzzing (hypothesis): mutations of a valid spec through the real CLI entry point.

Each CLI call runs `medsae.cli.main.main` in this process (argv patched, output captured) from an
empty working folder; the folder listing before and after must be equal (`exp validate` writes
nothing, and `exp run` writes nothing for an invalid spec). typer rebuilds its click command from
the function signatures on every `app()` call (~50 ms), so the tests build it once
(:class:`BuiltOnce`); `main()` runs that same command with its own error handling.
"""

from __future__ import annotations

import io
import json
import os
import random
import sys
import tempfile
import traceback
from collections import Counter
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

import medsae.cli.main as cli_main
from medsae.cli.main import main
from medsae.errors import SpecError
from medsae.spec import json_schema, parse_specs

# hypothesis caches data in ./.hypothesis; keep the repository clean (CI may still set its own folder)
if not os.environ.get("HYPOTHESIS_STORAGE_DIRECTORY"):
    set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "medsae-hypothesis")

#: A valid spec (the tiny end-to-end one); every fuzzed spec is a mutation of it.
BASE: dict[str, Any] = {
    "name": "tiny",
    "seed": 0,
    "artifacts": "artifacts",
    "data": {"root": "phantom", "phantom": {"subjects": 8, "seed": 3, "shape": [40, 40, 48]}, "size": 48},
    "embed": {"source": "efficientnet_lite0", "model": "efficientnet_lite0", "pooling": "mean", "input_size": 64},
    "sae": {"arch": "topk", "d_sae": 256, "k": 6, "batch_size": 64, "epochs": 60, "lr": 0.001},
    "eval": {"probe_max_train": 500, "recovery_ns": [1, 5, 10], "retrieval_refs": 50},
    "interpret": {"min_active": 3, "min_patients": 2, "max_latents": 40},
}


class BuiltOnce:
    """medsae's typer app with its click command built once (what ``app()`` builds on every call)."""

    def __init__(self, app: typer.Typer):
        self.command = typer.main.get_command(app)

    def __call__(self) -> Any:
        return self.command.main(prog_name="medsae")


@pytest.fixture(autouse=True)
def built_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli_main, "app", BuiltOnce(cli_main.app))


def run_cli(*args: str) -> tuple[int, str, str]:
    """`medsae ARGS` in this process: (exit code, stdout, stderr); an escaping exception is a traceback."""
    out, err = io.StringIO(), io.StringIO()
    argv = sys.argv
    sys.argv = ["medsae", *args]
    try:
        with redirect_stdout(out), redirect_stderr(err):
            try:
                main()
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
            except Exception:  # what a user would see as a traceback
                traceback.print_exc()
                code = 1
    finally:
        sys.argv = argv
    return code, out.getvalue(), err.getvalue()


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


class Place:
    """An empty working folder (the cwd of every call) and a separate folder for spec files."""

    def __init__(self, root: Path):
        self.work = root / "work"
        self.specs = root / "specs"
        self.work.mkdir()
        self.specs.mkdir()
        self.n = 0

    def write(self, content: bytes) -> Path:
        self.n += 1
        path = self.specs / f"spec{self.n}.yaml"
        path.write_bytes(content)
        return path

    def check(self, content: bytes) -> tuple[bool, int]:
        """Validate (and, if invalid, run) one spec file: (valid?, files written). Asserts the contract."""
        path = self.write(content)
        code, out, err = run_cli("exp", "validate", str(path))
        assert "Traceback" not in out + err, err
        assert code in (0, 2), (code, err)
        errors = [line for line in err.splitlines() if not line.startswith("warning: ")]
        if code == 0:
            assert errors == [] and out.startswith("ok "), err
        else:
            # validate lists every problem (one file:field line each); run stops at one line
            assert errors and all(e.startswith(f"error: {path}") for e in errors), err
            code, out, err = run_cli("exp", "run", str(path), "--registry", str(self.work / "registry.duckdb"))
            assert code == 2 and "Traceback" not in out + err, err
            assert len(err.strip().splitlines()) == 1 and err.startswith(f"error: {path}"), err
        written = len(listing(self.work)) + len(listing(self.specs)) - 1
        path.unlink()
        return code == 0, written


@pytest.fixture()
def place(tmp_path, monkeypatch) -> Place:
    p = Place(tmp_path)
    monkeypatch.chdir(p.work)
    return p


def dump(data: Any) -> bytes:
    return yaml.safe_dump(data, sort_keys=False).encode()


def with_value(path: str, value: Any) -> dict[str, Any]:
    data = json.loads(json.dumps(BASE))
    node = data
    *parents, last = path.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[last] = value
    return data


def test_base_spec_is_valid(place):
    assert place.check(dump(BASE)) == (True, 0)


ISSUE_CASES: list[tuple[str, bytes, str]] = [
    ("subjects 1e9", dump(with_value("data.phantom.subjects", 1_000_000_000)), "data.phantom.subjects"),
    ("stride 1e30", dump(with_value("data.stride", 1e30)), "data.stride"),
    ("embed batch 1e30", dump(with_value("embed.batch_size", 1e30)), "embed.batch_size"),
    ("sae batch 1e30", dump(with_value("sae.batch_size", 1e30)), "sae.batch_size"),
    ("lr 1e30", dump(with_value("sae.lr", 1e30)), "sae.lr"),
    ("epochs 1e30", dump(with_value("sae.epochs", 1e30)), "sae.epochs"),
    ("epochs inf", dump(with_value("sae.epochs", float("inf"))), "sae.epochs"),
    ("lr nan", dump(with_value("sae.lr", float("nan"))), "sae.lr"),
    ("window -inf", dump(with_value("data.ct_default_window", [float("-inf"), 400])), "data.ct_default_window"),
    ("seed 2^64", dump(with_value("seed", 2**64)), "seed"),
    ("negative seed", dump(with_value("sae.seed", -1)), "sae.seed"),
    ("root /dev/zero", dump(with_value("data.root", "/dev/zero")), "data.root"),
    ("root /etc/passwd", dump(with_value("data.root", "/etc/passwd")), "data.root"),
    ("root under a file", dump(with_value("data.root", "/etc/passwd/data")), "data.root"),
    ("root ''", dump(with_value("data.root", "")), "data.root"),
    ("root NUL", dump(with_value("data.root", "da\x00ta")), "data.root"),
    ("artifacts /dev/zero", dump(with_value("artifacts", "/dev/zero")), "artifacts"),
    ("artifacts /etc/passwd", dump(with_value("artifacts", "/etc/passwd")), "artifacts"),
    ("artifacts ''", dump(with_value("artifacts", "")), "artifacts"),
    ("duplicate top key", dump(BASE) + b"name: other\n", "duplicate key 'name'"),
    ("duplicate nested key", dump(BASE).replace(b"  k: 6\n", b"  k: 6\n  k: 7\n"), "duplicate key 'k'"),
    ("duplicate deep key", dump(BASE).replace(b"    seed: 3\n", b"    seed: 3\n    seed: 4\n"), "duplicate key"),
    ("duplicate flow key", b"name: x\ndata: {root: d, stride: 2, stride: 3}\n", "duplicate key 'stride'"),
    ("binary", bytes(random.Random(0).randrange(256) for _ in range(4096)) + b"\xff", "not UTF-8"),
    ("UTF-16", yaml.safe_dump(BASE).encode("utf-16"), "UTF-16"),
    ("UTF-16 without BOM", yaml.safe_dump(BASE).encode("utf-16-le"), "invalid YAML"),
    ("[ x 5000", b"[" * 5000, "nested deeper"),
    ("{a: x 5000", b"{a: " * 5000, "nested deeper"),
    ("oversized", dump(BASE) + b"#" * 1_000_001 + b"\n", "larger than"),
    (
        "5000-digit int",
        dump(BASE) + b"description: x\nsae_seed_: 1\n".replace(b"sae_seed_: 1", b"seed: " + b"9" * 5000),
        "",
    ),
    (
        "5000-digit int alone",
        dump({k: v for k, v in BASE.items() if k != "seed"}) + b"seed: " + b"7" * 5000 + b"\n",
        "integer of 5000",
    ),
    (
        "alias bomb",
        b"a: &a [1,1,1,1,1,1,1,1,1,1]\n"
        + b"".join(
            f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 10)}]\n".encode() for i in range(6)
        ),
        "aliases",
    ),
    ("recursive alias", b"name: &n [*n]\n", "alias"),
    ("month 13", dump(BASE) + b"description: 2024-13-40\n", ""),
    ("empty file", b"", "empty"),
    ("a list", b"- 1\n- 2\n", "mapping"),
    (
        "sweep too big",
        dump({**BASE, "sweep": {"grid": {"sae.k": list(range(1, 101)), "sae.seed": list(range(100))}}}),
        "grid points",
    ),
    ("phantom too big", dump(with_value("data.phantom", {"subjects": 1000, "shape": [512, 512, 512]})), "voxels"),
    ("sae step too big", dump(with_value("sae", {"d_sae": 65_536, "batch_size": 1_048_576})), "batch_size x latents"),
    ("model_kwargs inf", dump(with_value("embed.model_kwargs", {"depth": float("inf")})), "model_kwargs"),
]


@pytest.mark.parametrize(("case", "content", "fragment"), ISSUE_CASES, ids=[c[0] for c in ISSUE_CASES])
def test_issue_case_is_one_line_exit_2_nothing_written(place, case, content, fragment):
    path = place.write(content)
    for args in (("exp", "validate", str(path)), ("exp", "run", str(path), "--registry", "registry.duckdb")):
        code, out, err = run_cli(*args)
        lines = err.strip().splitlines()
        assert code == 2 and "Traceback" not in out + err, err
        assert len(lines) == 1 and lines[0].startswith(f"error: {path}"), err
        assert fragment in lines[0], lines[0]
    assert listing(place.work) == [] and listing(place.specs) == [path.name]


def test_missing_data_root_is_a_warning_not_an_error(place):
    data = {**BASE, "data": {"root": "not/here/yet"}}
    path = place.write(dump(data))
    code, out, err = run_cli("exp", "validate", str(path))
    assert code == 0 and out.startswith("ok ")
    where = path.parent / "not" / "here" / "yet"  # relative paths are taken from the spec file's folder
    assert err.strip().splitlines() == [
        f"warning: {path}:data.root: 'not/here/yet' ({where}) does not exist yet; `medsae exp run` needs the data there"
    ]
    (place.work / "not" / "here" / "yet").mkdir(parents=True)  # the current directory does not count
    assert run_cli("exp", "validate", str(path))[2] != ""
    where.mkdir(parents=True)
    assert run_cli("exp", "validate", str(path))[2] == ""


def test_shipped_specs_still_validate():
    root = Path(__file__).resolve().parents[1] / "experiments"
    for path in sorted(root.glob("*.yaml")):
        code, out, err = run_cli("exp", "validate", str(path))
        assert code == 0 and "Traceback" not in err, (path, err)


# -- every numeric field has a documented, enforced range ---------------------------------------


def numeric_fields(schema: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Dotted field path -> the numeric JSON-schema nodes that constrain it (items of lists and tuples too,
    marked with ``"item": True``)."""
    defs = schema.get("$defs", {})

    def resolve(node: dict[str, Any]) -> dict[str, Any]:
        while "$ref" in node:
            node = defs[node["$ref"].split("/")[-1]]
        return node

    found: dict[str, list[dict[str, Any]]] = {}

    def leaves(node: dict[str, Any], item: bool = False) -> list[dict[str, Any]]:
        node = resolve(node)
        if node.get("type") in ("integer", "number"):
            return [{**node, "item": item}]
        out = []
        for key in ("anyOf", "oneOf", "allOf"):
            for sub in node.get(key, []):
                out += leaves(sub, item)
        for sub in node.get("prefixItems", []):
            out += leaves(sub, True)
        if isinstance(node.get("items"), dict):
            out += leaves(node["items"], True)
        return out

    def walk(node: dict[str, Any], prefix: str) -> None:
        node = resolve(node)
        for name, sub in node.get("properties", {}).items():
            path = f"{prefix}{name}"
            for option in [sub, *sub.get("anyOf", [])]:
                option = resolve(option)
                if "properties" in option:
                    walk(option, path + ".")
            numbers = leaves(sub)
            if numbers:
                found[path] = numbers

    walk(schema, "")
    return found


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    code, out, err = run_cli("exp", "schema")
    assert code == 0, err
    return json.loads(out)


def test_schema_documents_a_range_for_every_number(schema):
    fields = numeric_fields(schema)
    assert len(fields) > 80 and "sae.epochs" in fields and "data.phantom.subjects" in fields
    unbounded = [
        path
        for path, nodes in fields.items()
        for node in nodes
        if not ({"minimum", "exclusiveMinimum"} & node.keys() and {"maximum", "exclusiveMaximum"} & node.keys())
    ]
    assert unbounded == []


def _beyond(node: dict[str, Any], side: str) -> float:
    """A value just outside the node's range on ``side`` ('max' or 'min')."""
    integer = node["type"] == "integer"
    if side == "max":
        if "exclusiveMaximum" in node:
            return node["exclusiveMaximum"]
        return node["maximum"] + 1 if integer else node["maximum"] * 1.5 + 1
    if "exclusiveMinimum" in node:
        return node["exclusiveMinimum"]
    return node["minimum"] - 1 if integer else node["minimum"] - abs(node["minimum"]) * 0.5 - 1


def _errors(data: dict[str, Any]) -> list[str]:
    try:
        parse_specs(data)
    except SpecError as err:
        return str(err).splitlines()
    return []


def test_ranges_in_the_schema_are_enforced(schema):
    """For each scalar numeric field: the field accepts its bounds; a value just outside fails naming the field.

    (At a bound, a check across fields, e.g. k <= d_sae, may still object: that error names the section.)
    """
    checked = 0
    for path, nodes in numeric_fields(schema).items():
        if len(nodes) != 1 or nodes[0]["item"]:
            continue  # lists and tuples: their items are covered by the fuzzing below
        node = nodes[0]
        for side in ("min", "max"):
            bound = node.get("minimum" if side == "min" else "maximum")
            if bound is not None:
                assert not [e for e in _errors(with_value(path, bound)) if e.startswith(f"<spec>:{path}: ")]
            errors = _errors(with_value(path, _beyond(node, side)))
            assert errors and errors[0].startswith(f"<spec>:{path}: "), (path, side, errors)
            checked += 1
    assert checked > 150


# -- property-based fuzzing ---------------------------------------------------------------------


class Raw:
    """A YAML literal written as-is (for integers too long for Python's int -> str)."""

    def __init__(self, text: str):
        self.text = text


def _paths(data: Any, prefix: str = "") -> list[str]:
    if not isinstance(data, dict):
        return [prefix[:-1]]
    out = [prefix[:-1]] if prefix else []
    for key, value in data.items():
        out += _paths(value, f"{prefix}{key}.")
    return out


#: Every field of the resolved base spec (defaults included), sections too.
PATHS = sorted(_paths(parse_specs(BASE)[0].model_dump(mode="json")))

NUMBERS = st.one_of(
    st.integers(),
    st.integers(min_value=-(10**40), max_value=10**40),
    st.floats(),
    st.sampled_from([float("inf"), float("-inf"), float("nan"), 1e30, -1e30, 1e308, 0, -1, 2**31, 2**63]),
    st.integers(min_value=41, max_value=6000).map(lambda n: Raw("9" * n)),
)
VALUES = st.one_of(
    NUMBERS,
    st.none(),
    st.booleans(),
    st.text(max_size=20),
    st.sampled_from(["", "/dev/zero", "/etc/passwd", "/etc/passwd/x", "/dev", "a\x00b", "x" * 300, "[red]"]),
    st.lists(NUMBERS, max_size=6),
    st.dictionaries(st.text(max_size=6), NUMBERS, max_size=3),
)


def _emit(data: Any) -> bytes:
    raws: list[str] = []

    def swap(node: Any) -> Any:
        if isinstance(node, Raw):
            raws.append(node.text)
            return f"@@RAW{len(raws) - 1}@@"
        if isinstance(node, dict):
            return {k: swap(v) for k, v in node.items()}
        if isinstance(node, list):
            return [swap(v) for v in node]
        return node

    text = yaml.safe_dump(swap(data), sort_keys=False, allow_unicode=True)
    for i, raw in enumerate(raws):
        text = text.replace(f"'@@RAW{i}@@'", raw).replace(f"@@RAW{i}@@", raw)
    return text.encode()


@st.composite
def field_mutation(draw: st.DrawFn) -> bytes:
    """1-3 fields set to hostile values, or deleted, or unknown keys added."""
    data = json.loads(json.dumps(BASE))
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(PATHS)).split(".")
        node = data
        for p in path[:-1]:
            child = node.get(p)
            if not isinstance(child, dict):
                child = node[p] = {}
            node = child
        action = draw(st.sampled_from(["set", "set", "set", "delete", "unknown"]))
        if action == "set":
            node[path[-1]] = draw(VALUES)
        elif action == "delete":
            node.pop(path[-1], None)
        else:
            node[draw(st.text(min_size=1, max_size=12))] = draw(VALUES)
    return _emit(data)


#: Scalar numeric fields and their schema nodes (for mutations that stay within range).
SCALAR_NUMBERS = {
    path: nodes[0] for path, nodes in numeric_fields(json_schema()).items() if len(nodes) == 1 and not nodes[0]["item"]
}


@st.composite
def in_range_mutation(draw: st.DrawFn) -> bytes:
    """1-3 numeric fields set to random values inside their documented ranges (mostly valid specs)."""
    data = json.loads(json.dumps(BASE))
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(sorted(SCALAR_NUMBERS)))
        node = SCALAR_NUMBERS[path]
        low = node.get("minimum", node.get("exclusiveMinimum"))
        high = node.get("maximum", node.get("exclusiveMaximum"))
        if node["type"] == "integer":
            value: Any = draw(
                st.integers(int(low) + ("exclusiveMinimum" in node), int(high) - ("exclusiveMaximum" in node))
            )
        else:
            value = draw(
                st.floats(low, high, exclude_min="exclusiveMinimum" in node, exclude_max="exclusiveMaximum" in node)
            )
        target = data
        *parents, last = path.split(".")
        for p in parents:
            target = target.setdefault(p, {})
        target[last] = value
    return _emit(data)


@st.composite
def duplicate_key(draw: st.DrawFn) -> bytes:
    """A key repeated in the base spec's text, at the top or inside a section."""
    text = dump(BASE).decode()
    lines = text.splitlines(keepends=True)
    i = draw(st.integers(0, len(lines) - 1))
    line = lines[i]
    key = line.strip().split(":")[0]
    indent = line[: len(line) - len(line.lstrip())]
    dup = f"{indent}{key}: {draw(st.sampled_from(['1', 'x', '[]', '{}']))}\n"
    return "".join(lines[: i + 1] + [dup] + lines[i + 1 :]).encode()


@st.composite
def deep_nesting(draw: st.DrawFn) -> bytes:
    n = draw(st.integers(10, 6000))
    opener = draw(st.sampled_from(["[", "{a: ", "- ", "x:\n"]))
    if opener == "- ":
        return "".join("  " * i + "-\n" for i in range(min(n, 400))).encode()
    if opener == "x:\n":
        return "".join(" " * i + "x:\n" for i in range(min(n, 400))).encode()
    return (opener * n).encode()


@st.composite
def text_edit(draw: st.DrawFn) -> bytes:
    """A few characters of the valid text replaced, inserted or deleted."""
    text = bytearray(dump(BASE))
    for _ in range(draw(st.integers(1, 4))):
        pos = draw(st.integers(0, len(text) - 1))
        kind = draw(st.sampled_from(["replace", "insert", "delete"]))
        byte = draw(st.sampled_from(list(b"{}[]:,-&*!|>'\"#%@`\t\n 09ae\x00\xff")))
        if kind == "replace":
            text[pos] = byte
        elif kind == "insert":
            text.insert(pos, byte)
        else:
            del text[pos]
    return bytes(text)


SPECS = st.one_of(
    field_mutation(),
    field_mutation(),
    field_mutation(),
    in_range_mutation(),
    in_range_mutation(),
    duplicate_key(),
    deep_nesting(),
    text_edit(),
    st.binary(max_size=2000),
    st.just(dump(BASE)),
    st.sampled_from(["utf-16", "utf-16-le", "utf-32", "latin-1"]).map(
        lambda enc: yaml.safe_dump({**BASE, "description": "é ü"}, allow_unicode=True).encode(enc)
    ),
    st.just(dump(BASE) + b"#" * 1_000_001),
)


def test_fuzzed_specs_are_valid_or_one_line_and_never_write(tmp_path):
    place = Place(tmp_path)
    counts: Counter[str] = Counter()
    cwd = os.getcwd()
    os.chdir(place.work)
    try:

        @settings(
            max_examples=240,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(SPECS)
        def fuzz(content: bytes) -> None:
            counts["generated"] += 1
            try:
                valid, written = place.check(content)
            except AssertionError:
                counts["failed"] += 1
                raise
            counts["valid" if valid else "invalid"] += 1
            counts["files written"] += written

        fuzz()
    finally:
        os.chdir(cwd)
    print(
        f"\nfuzzed specs: {counts['generated']} generated, {counts['valid']} valid, {counts['invalid']} invalid, "
        f"{counts['failed']} tracebacks or contract failures, {counts['files written']} files written"
    )
    assert counts["generated"] >= 200 and counts["failed"] == 0 and counts["files written"] == 0
    assert counts["valid"] >= 20 and counts["invalid"] >= 100
