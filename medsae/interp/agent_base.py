"""What every auto-interpretation agent shares: its gateway, its prompt templates, and how finished
rows reach the sink (medsae's agent, :mod:`medsae.interp.agent`; the study's, :mod:`medsae.interp.study.agent`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from medsae.interp.config import InterpretSpec
from medsae.interp.inputs import AgentInputs
from medsae.interp.journal import RowSink, Tables, empty_tables
from medsae.interp.llm import LLMGateway
from medsae.interp.prompts import Template, load_template


class AgentBase:
    """One run over the latents of one summarize stage, emitting rows as latents finish."""

    def __init__(self, inputs: AgentInputs, spec: InterpretSpec, cache_dir: Path, progress: Callable | None = None):
        self.inputs, self.spec = inputs, spec
        self.sae_key = inputs.sae_key
        self.gateway = LLMGateway.for_spec(cache_dir, spec)
        self.progress = progress
        self.templates: dict[str, Template] = {}
        self._tables: Tables = empty_tables()
        self._sink = RowSink()
        self._finished: set[int] = set()

    def _template(self, name: str) -> Template:
        if name not in self.templates:
            self.templates[name] = load_template(name)
        return self.templates[name]

    def _emit(self, tables: Tables, latent: int | None = None) -> None:
        """Keep ``tables`` (plus the calls made since the last emit) and hand them to the sink.

        ``latent``: the latent these rows finish (it is then skipped by a resumed stage).
        """
        calls = [r for r in self.gateway.drain_call_rows() if not r.get("cached")]
        tables = {**tables, "llm_calls": list(tables.get("llm_calls", [])) + calls}
        for table, rows in tables.items():
            self._tables.setdefault(table, []).extend(rows)
        if latent is not None:
            self._finished.add(int(latent))
        self._sink.add(tables, latent)

    def _emit_prompts(self) -> None:
        """The templates used so far that were not emitted yet (registry table ``prompts``)."""
        emitted = {r["template_hash"] for r in self._tables.get("prompts", [])}
        new = [t.prompt_row() for t in self.templates.values() if t.hash not in emitted]
        if new:
            self._emit({"prompts": new})
