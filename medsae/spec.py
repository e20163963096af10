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
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, field_validator

from medsae.data.config import DataSpec
from medsae.embed.config import EmbedSpec
from medsae.errors import MissingInputError, SpecError
from medsae.eval.config import EvalSpec
from medsae.interp.config import InterpretSpec
from medsae.sae.config import SAESpec
from medsae.specbase import Section


class SweepSpec(Section):
    """Lists of values per dotted field path; their cartesian product gives the experiments."""

    grid: dict[str, list[Any]] = Field(..., description="Dotted path (e.g. 'sae.k') -> values.")
    skip_invalid: bool = Field(
        False,
        description="Drop grid points that fail validation (e.g. k larger than a level) instead of failing.",
    )


class ExperimentSpec(Section):
    """One experiment: every stage's settings."""

    name: str = Field(
        ..., pattern=r"^[A-Za-z0-9_.\-@=,\[\]]+$", description="Experiment name (unique in a registry)."
    )
    description: str = Field("", description="Free text shown by `medsae exp show`.")
    seed: int = Field(0, description="Base seed; stages derive their own seeds from it.")
    artifacts: str = Field("artifacts", description="Folder holding stage outputs (relative to the cwd).")
    data: DataSpec
    embed: EmbedSpec = Field(default_factory=EmbedSpec)
    sae: SAESpec = Field(default_factory=SAESpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    interpret: InterpretSpec = Field(default_factory=InterpretSpec)
    sweep: SweepSpec | None = Field(None, description="Expand into a grid of experiments.")

    @field_validator("name")
    @classmethod
    def _no_spaces(cls, v: str) -> str:
        return v.strip()

    def canonical_json(self) -> str:
        """Canonical JSON of the resolved spec (sorted keys, compact, defaults included)."""
        return canonical_json(self.model_dump(mode="json"))

    def spec_hash(self) -> str:
        return sha256_text(self.canonical_json())


def canonical_json(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _format_error(source: str, err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "missing":
            msg = "required field is missing"
        lines.append(f"{source}:{loc}: {msg}" if loc else f"{source}: {msg}")
    return "\n".join(lines)


def _set_dotted(data: dict[str, Any], path: str, value: Any) -> None:
    parts = path.split(".")
    node = data
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise SpecError(f"sweep.grid.{path}: '{p}' is not a section")
    node[parts[-1]] = value


def _point_name(base: str, assignment: dict[str, Any]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, list | tuple):
            return "-".join(fmt(x) for x in v)
        return str(v)

    return base + "@" + ",".join(f"{k.split('.')[-1]}={fmt(v)}" for k, v in assignment.items())


def parse_specs(raw: Any, source: str = "<spec>") -> list[ExperimentSpec]:
    """Validate raw YAML data into one spec, or one per sweep point."""
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
            raise SpecError(f"{source}:sweep.grid.{path}: unknown section '{root}'")
        if not isinstance(grid[path], list) or not grid[path]:
            raise SpecError(f"{source}:sweep.grid.{path}: must be a non-empty list")
    specs: list[ExperimentSpec] = []
    keys = list(grid)
    for values in itertools.product(*(grid[k] for k in keys)):
        assignment = dict(zip(keys, values, strict=False))
        point = copy.deepcopy(raw)
        point.pop("sweep", None)
        for path, value in assignment.items():
            _set_dotted(point, path, value)
        point["name"] = _point_name(base.name, assignment)
        try:
            specs.append(ExperimentSpec.model_validate(point))
        except ValidationError as err:
            if base.sweep.skip_invalid:
                continue
            raise SpecError(_format_error(f"{source}[{point['name']}]", err)) from None
    if not specs:
        raise SpecError(f"{source}:sweep: every grid point is invalid")
    return specs


def load_specs(path: str | Path) -> list[ExperimentSpec]:
    """Read a YAML spec file; raises SpecError / MissingInputError with one-line messages."""
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"{path}: spec file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise SpecError(f"{where}: invalid YAML: {getattr(exc, 'problem', exc)}") from None
    return parse_specs(raw, str(path))


def json_schema() -> dict[str, Any]:
    """JSON Schema of an experiment spec (for editors)."""
    return ExperimentSpec.model_json_schema()
