"""The ``interpret:`` section: which latents get explained, by which LLMs, scored how."""

from __future__ import annotations

from pydantic import Field

from medsae.specbase import Section, execution_only


class InterpretSpec(Section):
    """Sampling, explainer and scorer settings of the auto-interpretation agent."""

    explainer_model: str = Field("medsae/baseline", description="litellm model id of the explainer.")
    scorer_model: str = Field("medsae/baseline", description="litellm model id of the reference simulator.")
    max_latents: int | None = Field(None, ge=1, description="Explain at most this many latents (most frequent first).")
    min_active: int = Field(10, ge=1, description="Eligibility: fires on at least this many slices.")
    min_patients: int = Field(3, ge=1, description="Eligibility: fires in at least this many scans.")
    dense_frequency: float = Field(0.3, gt=0, le=1, description="Latents firing more often are flagged dense.")
    explain_top: int = Field(12, ge=1, description="Strongest explain-partition slices shown to the explainer.")
    explain_per_decile: int = Field(2, ge=0, description="Extra explain slices per activation decile.")
    explain_negatives: int = Field(6, ge=0, description="Non-firing contrast slices in the explain set.")
    simulate_per_decile: int = Field(2, ge=1, description="Firing held-out slices per decile.")
    simulate_random: int = Field(20, ge=0, description="Uniform held-out slices in the simulation set.")
    max_per_volume: int = Field(2, ge=1, description="Near-duplicate control: slices per volume per set.")
    min_slice_gap: int = Field(3, ge=0, description="Minimum index gap between slices of one volume.")
    explain_fraction: float = Field(0.5, gt=0, lt=1, description="Share of scans hashed into the explain partition.")
    vision: bool = Field(False, description="Add a thumbnail montage for vision-capable explainers.")
    temperature: float = Field(0.0, ge=0, description="Sampling temperature of explainer and simulator.")
    seed: int = Field(0, description="Seed of every sampler (combined per latent and purpose).")
    concurrency: int = execution_only(8, "LLM calls in flight at once.", ge=1)
    max_cost_usd: float | None = execution_only(None, "Stop when the summed cost of LLM calls exceeds this.")
