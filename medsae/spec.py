"""Experiment specs: YAML -> Pydantic, sweeps -> a grid of experiments, canonical JSON -> hash.

A spec file names one experiment, or a sweep of them::

    name: demo
    data: {root: data/phantom, phantom: {subjects: 12}}
    embed: {source: timm, model: vit_tiny_patch16_224, pretrained: false}
    sae: {arch: topk, k: 8}
    sweep:
      grid: {sae.k: [4, 8]}

Errors are reported as ``file:field.path: message`` (one line per problem, the first one raised
as :class:`~medsae.errors.SpecError`). The resolved spec (every default filled in) is dumped to
canonical JSON (sorted keys, no whitespace) and hashed with sha256.

Paths in a spec (``data.root``, ``data.split_file``, ``artifacts``) are relative to the folder of
the spec file, not to the current directory: a spec names its data and artifacts the same way
wherever it is run from, and a project folder keeps working when it moves. The spec keeps the
path as written (the stage keys and the experiment hash use that string, so moving a project
changes no key); :meth:`ExperimentSpec.artifacts_dir` and :meth:`ExperimentSpec.resolved_data`
give the resolved paths that runs use.

``--set FIELD=VALUE`` overrides (:func:`apply_overrides`) are applied to the parsed YAML before
validation, so they are checked like the file and recorded in the resolved spec (and its hash).

Reading is defensive, since a spec may come from anywhere: the file is at most
:data:`MAX_SPEC_BYTES`, UTF-8, and parsed by a YAML loader that refuses duplicate keys, nesting
deeper than :data:`MAX_DEPTH`, integers longer than :data:`MAX_INT_CHARS` characters and alias
expansions beyond :data:`MAX_NODES` nodes; every such problem is one ``file: message`` line.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import itertools
import json
import math
import stat
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, PrivateAttr, ValidationError, field_validator, model_validator
from yaml.composer import ComposerError
from yaml.constructor import ConstructorError
from yaml.nodes import MappingNode

from medsae.data.config import DataSpec
from medsae.embed.config import EmbedSpec
from medsae.errors import MissingInputError, SpecError
from medsae.eval.config import EvalSpec
from medsae.ground.config import GroundSpec
from medsae.interp.config import InterpretSpec
from medsae.paths import resolve_spec_path
from medsae.sae.config import SAESpec
from medsae.specbase import PathStr, Section, added_field, execution_only, key_params, seed_field

#: Largest spec file read (real specs are a few kB).
MAX_SPEC_BYTES = 1_000_000
#: Deepest nesting of YAML collections (real specs nest 3-4 levels).
MAX_DEPTH = 50
#: Longest integer literal: every numeric field's bound has far fewer digits.
MAX_INT_CHARS = 40
#: Most nodes after expanding YAML aliases (stops "billion laughs" alias bombs).
MAX_NODES = 100_000
#: Most experiments one sweep may expand into.
MAX_SWEEP_POINTS = 4096
#: Most values copied while expanding a sweep (grid points x values in the spec).
MAX_SWEEP_VALUES = 10_000_000


class SweepSpec(Section):
    """Lists of values per dotted field path; their cartesian product gives the experiments."""

    grid: dict[str, list[Any]] = Field(
        ...,
        min_length=1,
        description=f"Dotted path (e.g. 'sae.k') -> values; at most {MAX_SWEEP_POINTS} points in all.",
    )
    skip_invalid: bool = Field(
        False,
        description="Drop grid points that fail validation (e.g. k larger than a level) instead of failing.",
    )


class ExperimentSpec(Section):
    """One experiment: every stage's settings."""

    name: str = Field(
        ...,
        max_length=256,
        pattern=r"^[A-Za-z0-9_.\-@=,\[\]]+$",
        description="Experiment name (unique in a registry).",
    )
    description: str = Field("", description="Free text shown by `medsae exp show`.")
    seed: int = seed_field(0, "Base seed; stages derive their own seeds from it.")
    artifacts: PathStr = Field(
        "artifacts", description="Folder holding stage outputs (a relative path is taken from the spec file's folder)."
    )
    data: DataSpec
    embed: EmbedSpec = Field(default_factory=EmbedSpec)
    sae: SAESpec = Field(default_factory=SAESpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    interpret: InterpretSpec = Field(default_factory=InterpretSpec)
    ground: GroundSpec = added_field(
        default_factory=GroundSpec, description="Grounding of latents in the structure masks (opt-in stage)."
    )
    sweep: SweepSpec | None = Field(None, description="Expand into a grid of experiments.")
    executor: Literal["local", "ray"] = execution_only(
        "local",
        "Where stage functions run: local (this process) or ray (a Ray cluster; `pip install medsae[ray]`; "
        "every worker must see the artifacts folder). Overridden by `exp run --executor`.",
        added=True,
    )
    ray_address: str | None = execution_only(
        None,
        "The Ray cluster of the ray executor: 'auto' (the one started on this machine by `ray start`), "
        "HOST:PORT, or none (RAY_ADDRESS, else a new local cluster). Overridden by `exp run --address`.",
        added=True,
        max_length=1024,
    )

    #: Folder of the spec file relative paths are taken from (None: not read from a file -> the cwd).
    _spec_folder: Path | None = PrivateAttr(None)

    @field_validator("name")
    @classmethod
    def _no_spaces(cls, v: str) -> str:
        return v.strip()

    @model_validator(mode="after")
    def _study_interpretation_needs_study_evaluation(self) -> ExperimentSpec:
        if self.interpret.protocol == "study" and self.eval.protocol != "study":
            raise ValueError(
                "interpret.protocol study selects latents by the study's evaluation tables: "
                "set eval.protocol: study as well"
            )
        return self

    @model_validator(mode="after")
    def _token_sae_needs_stored_tokens(self) -> ExperimentSpec:
        if self.sae.input == "tokens" and self.embed.tokens_per_slice == 0:
            raise ValueError("sae.input tokens trains on stored tokens: set embed.tokens_per_slice > 0")
        return self

    def canonical_json(self) -> str:
        """Canonical JSON of the resolved spec (sorted keys, compact, defaults included except those
        of fields added later, see ``specbase.added_field``). The experiment-wide execution-only fields
        (``executor``, ``ray_address``) are left out: where an experiment runs does not make it another."""
        return canonical_json(key_params(self))

    def spec_hash(self) -> str:
        return sha256_text(self.canonical_json())

    @property
    def spec_folder(self) -> Path | None:
        """The folder relative paths of this spec are taken from (None: the current directory)."""
        return self._spec_folder

    def resolve_path(self, value: str) -> Path:
        """A path written in this spec, made absolute against the spec file's folder."""
        return resolve_spec_path(value, self._spec_folder)

    @property
    def artifacts_dir(self) -> Path:
        """The artifacts folder, resolved."""
        return self.resolve_path(self.artifacts)

    @property
    def data_root(self) -> Path:
        """The dataset folder, resolved."""
        return self.resolve_path(self.data.root)

    def resolved_data(self) -> DataSpec:
        """The data section as the slices stage and the dataset helpers get it: paths made absolute.

        Stage keys hash :func:`~medsae.specbase.key_params` of ``self.data`` instead, which keeps
        the paths as written (so a moved project keeps its keys).
        """
        update: dict[str, Any] = {"root": str(self.data_root)}
        if self.data.split_file:
            update["split_file"] = str(self.resolve_path(self.data.split_file))
        return self.data.model_copy(update=update)


def canonical_json(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# -- one-line messages -----------------------------------------------------------------------------


def _printable(text: str, limit: int = 200) -> str:
    """``text`` on one line: control characters escaped, cut at ``limit`` characters."""
    out = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return out if len(out) <= limit else out[: limit - 1] + "…"


def _section_fields(loc: tuple[Any, ...]) -> list[str]:
    """Field names of the spec section at ``loc`` (e.g. ``("sae",)`` -> SAESpec's fields); [] if unknown."""
    model: Any = ExperimentSpec
    for part in loc:
        field = model.model_fields.get(str(part)) if isinstance(model, type) else None
        if field is None:
            return []
        sections = [t for t in (field.annotation, *typing.get_args(field.annotation)) if isinstance(t, type)]
        model = next((t for t in sections if issubclass(t, Section)), None)
    return list(model.model_fields) if isinstance(model, type) else []


def _unknown_key(loc: tuple[Any, ...]) -> str:
    """``unknown key``, with the closest field name of its section when one is close."""
    close = difflib.get_close_matches(str(loc[-1]), _section_fields(loc[:-1]), n=1, cutoff=0.6) if loc else []
    return f"unknown key (did you mean '{close[0]}'?)" if close else "unknown key"


def _format_error(source: str, err: ValidationError) -> str:
    """Every problem of ``err``, one ``file:field: message`` line each."""
    lines = []
    for e in err.errors():
        loc = ".".join(_printable(str(p), 60) for p in e["loc"])
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = _unknown_key(tuple(e["loc"]))
        elif e["type"] == "missing":
            msg = "required field is missing"
        elif e["type"] == "value_error":
            msg = msg.removeprefix("Value error, ")
        lines.append(_printable(f"{source}:{loc}: {msg}" if loc else f"{source}: {msg}", 400))
    return "\n".join(lines)


# -- reading YAML safely ---------------------------------------------------------------------------


class _SpecLoader(yaml.SafeLoader):
    """PyYAML's safe loader with limits: nesting depth, duplicate keys, integer length."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise ComposerError(None, None, f"nested deeper than {MAX_DEPTH} levels", mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        if isinstance(node, MappingNode):
            first_line: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<: *base` may be overridden by explicit keys
                key = self.construct_object(key_node, deep=True)
                try:
                    seen = first_line.get(key)
                except TypeError:
                    continue  # unhashable: the base class reports it
                if seen is not None:
                    raise ConstructorError(
                        None,
                        None,
                        f"duplicate key {_printable(repr(key), 60)} (first on line {seen})",
                        key_node.start_mark,
                    )
                first_line[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)

    def construct_object(self, node: Any, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep=deep)
        except (ValueError, OverflowError, TypeError) as exc:  # e.g. a timestamp with month 13
            raise ConstructorError(None, None, f"cannot read value: {exc}", node.start_mark) from None


def _construct_int(loader: _SpecLoader, node: Any) -> int:
    if len(node.value) > MAX_INT_CHARS:
        raise ConstructorError(
            None, None, f"integer of {len(node.value)} characters is out of range for every field", node.start_mark
        )
    return loader.construct_yaml_int(node)


_SpecLoader.add_constructor("tag:yaml.org,2002:int", _construct_int)


def read_spec_text(path: Path) -> str:
    """The spec file as text: at most MAX_SPEC_BYTES, UTF-8 (a UTF-8 byte-order mark is allowed)."""
    try:
        with path.open("rb") as fh:
            data = fh.read(MAX_SPEC_BYTES + 1)
    except OSError as exc:
        raise SpecError(f"{path}: cannot read the spec: {exc.strerror or exc}") from None
    if len(data) > MAX_SPEC_BYTES:
        raise SpecError(f"{path}: spec file is larger than {MAX_SPEC_BYTES:,} bytes (specs are a few kB)")
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise SpecError(f"{path}: spec file is UTF-16 text; save it as UTF-8")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise SpecError(
            f"{path}: spec file is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
            "save it as UTF-8"
        ) from None


def _yaml_error(source: str, exc: yaml.YAMLError) -> SpecError:
    if isinstance(exc, yaml.reader.ReaderError):
        return SpecError(
            f"{source}: invalid YAML: unacceptable character #x{exc.character:04x} at offset {exc.position}"
        )
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = getattr(exc, "problem", None) or getattr(exc, "context", None) or str(exc)
    where = f"{source}:{mark.line + 1}" if mark else source
    return SpecError(_printable(f"{where}: invalid YAML: {problem}", 400))


def _check_expansion(raw: Any, source: str) -> int:
    """Refuse alias bombs and recursive aliases: at most MAX_NODES nodes and MAX_DEPTH levels once expanded.

    Returns the number of values once expanded.
    """
    memo: dict[int, tuple[int, int]] = {}
    active: set[int] = set()

    def measure(obj: Any, depth: int) -> tuple[int, int]:
        if not isinstance(obj, dict | list):
            return 1, 0
        key = id(obj)
        if key in memo:
            size, height = memo[key]
        else:
            if key in active:
                raise SpecError(f"{source}: invalid YAML: an alias refers to a collection that contains it")
            if depth > MAX_DEPTH:
                raise SpecError(f"{source}: invalid YAML: nested deeper than {MAX_DEPTH} levels (through aliases)")
            active.add(key)
            size, height = 1, 0
            for child in obj.values() if isinstance(obj, dict) else obj:
                child_size, child_height = measure(child, depth + 1)
                size, height = size + child_size, max(height, child_height + 1)
                if size > MAX_NODES:
                    raise SpecError(f"{source}: invalid YAML: more than {MAX_NODES:,} values once aliases are expanded")
            active.discard(key)
            memo[key] = (size, height)
        if depth + height > MAX_DEPTH:
            raise SpecError(f"{source}: invalid YAML: nested deeper than {MAX_DEPTH} levels (through aliases)")
        return size, height

    return measure(raw, 0)[0]


def load_yaml(text: str, source: str = "<spec>") -> Any:
    """Parse spec text with :class:`_SpecLoader`; every problem is one SpecError line."""
    try:
        raw = yaml.load(text, Loader=_SpecLoader)  # a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise _yaml_error(source, exc) from None
    except RecursionError:  # e.g. a long chain of merge keys
        raise SpecError(f"{source}: invalid YAML: nested too deeply") from None
    _check_expansion(raw, source)
    return raw


# -- validation ------------------------------------------------------------------------------------


def _set_dotted(data: dict[str, Any], path: str, value: Any, source: str) -> None:
    parts = path.split(".")
    node = data
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise SpecError(_printable(f"{source}:sweep.grid.{path}: '{p}' is not a section"))
    node[parts[-1]] = value


def _point_name(base: str, assignment: dict[str, Any]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, list | tuple):
            return "-".join(fmt(x) for x in v)
        return str(v)

    return base + "@" + ",".join(f"{k.split('.')[-1]}={fmt(v)}" for k, v in assignment.items())


def parse_specs(raw: Any, source: str = "<spec>") -> list[ExperimentSpec]:
    """Validate raw YAML data into one spec, or one per sweep point."""
    if raw is None:
        raise SpecError(f"{source}: the spec is empty (it needs at least `name` and `data.root`)")
    if not isinstance(raw, dict):
        raise SpecError(f"{source}: a spec must be a mapping of sections, got {type(raw).__name__}")
    try:
        base = ExperimentSpec.model_validate(raw)
    except ValidationError as err:
        raise SpecError(_format_error(source, err)) from None
    if base.sweep is None:
        return [base]
    grid = base.sweep.grid
    for path in grid:
        root = path.split(".")[0]
        if root not in ExperimentSpec.model_fields or root in ("name", "sweep"):
            raise SpecError(_printable(f"{source}:sweep.grid.{path}: unknown section '{root}'"))
        if not isinstance(grid[path], list) or not grid[path]:
            raise SpecError(_printable(f"{source}:sweep.grid.{path}: must be a non-empty list"))
    points = math.prod(len(values) for values in grid.values())
    if points > MAX_SWEEP_POINTS:
        raise SpecError(f"{source}:sweep.grid: {points:,} grid points, more than the limit of {MAX_SWEEP_POINTS:,}")
    size = _check_expansion(raw, source)
    if points * size > MAX_SWEEP_VALUES:
        raise SpecError(
            f"{source}:sweep.grid: {points:,} grid points x {size:,} values in the spec is more than "
            f"{MAX_SWEEP_VALUES:,} to expand; shorten the spec or the grid"
        )
    specs: list[ExperimentSpec] = []
    keys = list(grid)
    for values in itertools.product(*(grid[k] for k in keys)):
        assignment = dict(zip(keys, values, strict=False))
        point = copy.deepcopy(raw)
        point.pop("sweep", None)
        for path, value in assignment.items():
            _set_dotted(point, path, value, source)
        point["name"] = _point_name(base.name, assignment)
        try:
            specs.append(ExperimentSpec.model_validate(point))
        except ValidationError as err:
            if base.sweep.skip_invalid:
                continue
            raise SpecError(_format_error(_printable(f"{source}[{point['name']}]", 120), err)) from None
    if not specs:
        raise SpecError(f"{source}:sweep: every grid point is invalid")
    return specs


# -- the file system -------------------------------------------------------------------------------


def _kind(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "a file"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISFIFO(mode):
        return "a pipe"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a folder"


def folder_problem(path: str) -> str | None:
    """Why ``path`` cannot be (or become) a folder: it, or its nearest existing ancestor, is not one."""
    target = Path(path)
    for candidate in (target, *target.parents):
        try:
            mode = candidate.stat().st_mode
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError:
            return None  # unreadable or a link loop: the stage that writes there reports it
        if stat.S_ISDIR(mode):
            return None
        if candidate == target:
            return f"'{path}' is {_kind(mode)}, not a folder"
        return f"'{path}' cannot be a folder: '{candidate}' is {_kind(mode)}"
    return None


def check_paths(specs: list[ExperimentSpec], source: str) -> None:
    """Folders the specs name must be folders (or creatable ones): one SpecError line if not."""
    for spec in specs:
        checks = [("data.root", spec.data_root), ("artifacts", spec.artifacts_dir)]
        if spec.data.split_file:
            checks.append(("data.split_file", spec.resolve_path(spec.data.split_file).parent))
        for field, path in checks:
            problem = folder_problem(str(path))
            if problem:
                raise SpecError(_printable(f"{source}:{field}: {problem}", 400))


def spec_warnings(specs: list[ExperimentSpec], source: str) -> list[str]:
    """Problems that are not errors: a data folder that does not exist yet (data may arrive later)."""
    warnings = []
    roots = {s.data_root: s.data.root for s in specs if s.data.phantom is None}
    for root, written in roots.items():
        try:
            missing = not root.exists()
        except OSError:  # e.g. a name too long for the file system: the run reports it
            missing = True
        if missing:
            where = f"'{written}'" if Path(written) == root else f"'{written}' ({root})"
            warnings.append(
                _printable(
                    f"{source}:data.root: {where} does not exist yet; `medsae exp run` needs the data there", 400
                )
            )
    return warnings


def parse_override(item: str) -> tuple[str, Any]:
    """``"sae.k=16"`` -> ``("sae.k", 16)``: the value is read as YAML (``true``, ``[ct]``, ``1e-3``...)."""
    field, sep, text = item.partition("=")
    field = field.strip()
    if not sep or not field:
        raise SpecError(_printable(f"--set {item}: expected FIELD=VALUE, e.g. --set sae.k=16"))
    if any(not part.strip() for part in field.split(".")):
        raise SpecError(_printable(f"--set {item}: '{field}' is not a dotted field path like sae.k"))
    return field, load_yaml(text, _printable(f"--set {field}", 120))


def apply_overrides(raw: Any, overrides: list[str] | tuple[str, ...], source: str) -> Any:
    """A copy of the parsed spec ``raw`` with each ``FIELD=VALUE`` override set (later ones win).

    A field the sweep grid varies cannot be overridden (the grid would overwrite it): edit the grid.
    """
    if not overrides:
        return raw
    if not isinstance(raw, dict):
        return raw  # parse_specs reports what is wrong with the file
    out = copy.deepcopy(raw)
    grid = (out.get("sweep") or {}).get("grid") if isinstance(out.get("sweep"), dict) else None
    for item in overrides:
        field, value = parse_override(item)
        if field.split(".")[0] == "sweep":
            raise SpecError(_printable(f"--set {field}: the sweep block cannot be overridden; edit {source}"))
        if isinstance(grid, dict) and field in grid:
            raise SpecError(_printable(f"--set {field}: {source}'s sweep grid varies this field; edit sweep.grid"))
        parts = field.split(".")
        node = out
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                where = ".".join(parts[: i + 1])
                raise SpecError(_printable(f"--set {field}: '{where}' is not a section in {source}"))
            node = child
        node[parts[-1]] = value
    return out


def _mark_overrides(message: str, overrides: list[str] | tuple[str, ...]) -> str:
    """Append ``(from --set FIELD)`` to error lines about a field an override set."""
    fields = [item.partition("=")[0].strip() for item in overrides]
    lines = []
    for line in message.splitlines():
        hit = next((f for f in fields if f":{f}:" in line or f":{f}." in line), None)
        message, sep, hint = line.partition(" (did you mean ")  # the marker goes before a did-you-mean hint
        lines.append(f"{message} (from --set {hit})" + sep + hint if hit else line)
    return "\n".join(lines)


def load_specs(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> list[ExperimentSpec]:
    """Read a YAML spec file, apply ``--set`` overrides; SpecError / MissingInputError with one-line messages.

    Every spec remembers the file's folder: its relative paths are resolved against it.
    """
    path = Path(path)
    if not path.is_file():
        if path.exists():
            raise SpecError(f"{path}: not a regular file (a spec is a YAML file)")
        raise MissingInputError(f"{path}: spec file not found")
    raw = apply_overrides(load_yaml(read_spec_text(path), str(path)), overrides, str(path))
    try:
        specs = parse_specs(raw, str(path))
    except SpecError as exc:
        if not overrides:
            raise
        raise SpecError(_mark_overrides(str(exc), overrides)) from None
    folder = path.absolute().parent
    for spec in specs:
        spec._spec_folder = folder
    check_paths(specs, str(path))
    return specs


def json_schema() -> dict[str, Any]:
    """JSON Schema of an experiment spec (for editors)."""
    return ExperimentSpec.model_json_schema()
