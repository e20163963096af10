"""The stage table: every stage of an experiment, in execution order, in one place.

The planner (keys, upstream folders, what runs, what runs together), the CLI (stage names and
order) and the report (section order) all read :data:`STAGE_TABLE`. Adding a stage is one
:class:`StageDef` row here plus the package that implements it: a module with a ``CODE_VERSION``
string and a function ``run(ctx: StageContext) -> StageResult`` that reads its typed spec section
from ``ctx.spec``.

Stage functions are named as ``"module:function"`` strings and imported only when a stage is
planned or run, so reading the table (``medsae exp list``, the report) never imports torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from medsae.ground.config import GroundRun
from medsae.interp.config import LLM_ONLY_FIELDS
from medsae.specbase import Section, key_params

if TYPE_CHECKING:
    from medsae.spec import ExperimentSpec
    from medsae.stage import StageContext, StageResult


@dataclass(frozen=True)
class StageDef:
    """One stage kind: where it sits in the graph, what it reads from the spec, what implements it."""

    kind: str
    #: Stages whose completed folders this one reads (``ctx.inputs``); their keys enter its key.
    upstream: tuple[str, ...]
    #: ``"module:function"`` running one stage; the module also holds the stage's ``CODE_VERSION``.
    run: str
    #: The :class:`~medsae.spec.ExperimentSpec` field handed to the stage as ``ctx.spec``; None = none.
    section: str | None
    #: Section fields left out of the key, besides the execution-only ones (see ``specbase.execution_only``).
    key_exclude: tuple[str, ...] = ()
    #: External content entering the key, by name (``"dataset"``: the dataset manifest digest).
    inputs: tuple[str, ...] = ()
    #: ``"module:function"`` building several stages of this kind in one call (one pass over shared data).
    run_many: str | None = None
    #: Upstream kind whose key groups the stages handed to ``run_many`` together.
    batch_by: str | None = None
    #: The section as the stage receives it, when that differs from the keyed one (paths resolved).
    resolve: Callable[[ExperimentSpec], Section] | None = None
    #: An optional stage: part of an experiment only when this says so (None: always). Other stages
    #: read an optional one only as an ``optional_upstream``.
    when: Callable[[ExperimentSpec], bool] | None = None
    #: Optional stages this one reads when the experiment has them: then in ``ctx.inputs`` and in the
    #: key like ``upstream``; absent, the key is what it was without them.
    optional_upstream: tuple[str, ...] = ()

    def reads(self) -> tuple[str, ...]:
        """Every stage this one may read: its upstream, then its optional upstream."""
        return self.upstream + self.optional_upstream

    def planned(self, spec: ExperimentSpec) -> bool:
        """Whether ``spec``'s experiment has this stage."""
        return self.when is None or self.when(spec)

    def load(self) -> Callable[[StageContext], StageResult]:
        """The function running one stage."""
        return _function(self.run)

    def load_many(self) -> Callable[[list[StageContext]], list[StageResult]] | None:
        """The function running several stages together, if the kind has one."""
        return _function(self.run_many) if self.run_many else None

    def code_version(self) -> str:
        """The implementing module's ``CODE_VERSION`` (part of every key of this kind)."""
        module = importlib.import_module(self.run.split(":")[0])
        return str(getattr(module, "CODE_VERSION", "1"))

    def spec_section(self, spec: ExperimentSpec) -> Section | None:
        """The typed section of ``spec`` that enters this stage's key (paths as written)."""
        return None if self.section is None else getattr(spec, self.section)

    def run_section(self, spec: ExperimentSpec) -> Section | None:
        """The typed section handed to the stage (``ctx.spec``)."""
        return self.resolve(spec) if self.resolve is not None else self.spec_section(spec)

    def key_params(self, section: Section | None) -> dict[str, Any]:
        """The section as it enters the key: plain data without execution-only and excluded fields."""
        if section is None:
            return {}
        keyed = key_params(section)
        for name in self.key_exclude:
            keyed.pop(name, None)
        return keyed


def _function(ref: str) -> Any:
    module_name, name = ref.split(":")
    return getattr(importlib.import_module(module_name), name)


#: Every stage kind, in execution order (a stage's upstream stages come before it).
STAGE_TABLE: tuple[StageDef, ...] = (
    # the dataset manifest identifies the data, not how the phantom that wrote it was made
    StageDef(
        "slices",
        (),
        "medsae.data.stage:run_slices",
        "data",
        key_exclude=("phantom",),
        inputs=("dataset",),
        resolve=lambda spec: spec.resolved_data(),  # paths made absolute; the key keeps them as written
    ),
    StageDef("embed", ("slices",), "medsae.embed.stage:run_embed", "embed"),
    StageDef(
        "train",
        ("embed", "slices"),
        "medsae.sae.stage:run_train",
        "sae",
        run_many="medsae.sae.stage:run_train_many",
        batch_by="embed",  # SAEs on one embedding train in one pass over it
        resolve=lambda spec: spec.sae.with_resolved_checkpoint(spec.resolve_path),  # an imported SAE's file
    ),
    StageDef("encode", ("train", "embed"), "medsae.sae.stage:run_encode", None),
    # the stage also gets the embed section (to rebuild the backbone); its key has it through embed's key
    StageDef(
        "ground",
        ("encode", "embed", "slices", "train"),
        "medsae.ground.stage:run_ground",
        "ground",
        resolve=lambda spec: GroundRun.model_validate({**spec.ground.model_dump(), "embed": spec.embed}),
        when=lambda spec: spec.ground.enabled,  # costly on the full data set: opt-in
    ),
    StageDef("evaluate", ("encode", "embed", "slices", "train"), "medsae.eval.stage:run_evaluate", "eval"),
    # statistics and example sets only: the LLM settings do not change what summarize computes;
    # evaluate: interpret.protocol study selects latents by its monosemanticity and coefficient tables
    StageDef(
        "summarize",
        ("encode", "slices", "train", "evaluate"),
        "medsae.interp.stage:run_summarize",
        "interpret",
        key_exclude=LLM_ONLY_FIELDS,
    ),
    # ground (when enabled): explanations are checked against each latent's best-grounded structure
    StageDef(
        "interpret",
        ("summarize", "encode", "slices"),
        "medsae.interp.stage:run_interpret",
        "interpret",
        optional_upstream=("ground",),
    ),
)

#: Stage kinds in execution order.
STAGES: tuple[str, ...] = tuple(d.kind for d in STAGE_TABLE)

_BY_KIND: dict[str, StageDef] = {d.kind: d for d in STAGE_TABLE}


def stage_def(kind: str) -> StageDef:
    """The table row of ``kind`` (a KeyError names an unknown kind)."""
    return _BY_KIND[kind]


__all__ = ["STAGES", "STAGE_TABLE", "StageDef", "stage_def"]
