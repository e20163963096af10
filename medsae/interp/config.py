"""The ``interpret:`` section: which latents get explained, by which LLMs, scored how.

The same section parameterises two stages: ``summarize`` (statistics and example sets, no LLM)
and ``interpret`` (explain + simulate + score through the LLM gateway). Defaults follow the
recipe in ``docs/method.md#autointerp``, scaled down where the phantom demo needs it.

``protocol: medsae`` (the default) is medsae's agent; ``protocol: study`` runs the study's
auto-interpretation exactly (docs/method.md#interpret-study-protocol, :mod:`medsae.interp.study`): its
250-latent selection, explanations from 5 diverse top train images with their metadata, and its
5-way ranking on 5 diverse val images. The ``study_*`` fields only matter under ``protocol: study``;
at their defaults they are left out of the dump, so specs written before the protocol keep their keys.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from medsae.specbase import Section, added_field, execution_only


class InterpretSpec(Section):
    """Sampling, explainer and scorer settings of the auto-interpretation agent."""

    protocol: Literal["medsae", "study"] = added_field(
        "medsae",
        description="medsae = medsae's agent (held-out simulation, stratified sets); study = the study's "
        "auto-interpretation exactly (docs/method.md#interpret-study-protocol); needs eval.protocol study.",
    )
    # -- the study's protocol (protocol: study) -------------------------------------------------
    study_latents: int = added_field(
        250, ge=1, le=2**20, description="protocol study: latents explained, by the study's combined rank."
    )
    study_explainer_template: str = added_field(
        "study_explainer", description="protocol study: the explainer prompt (5 diverse train samples)."
    )
    study_judge_template: str = added_field(
        "study_judge", description="protocol study: the 5-way ranking prompt (5 diverse val samples)."
    )
    study_images: bool = added_field(
        True,
        description="protocol study: attach the samples' images, as the study (offline medsae/ models "
        "read text only and never get images).",
    )
    study_image_size: int = added_field(
        1024, ge=16, le=4096, description="protocol study: image side in pixels (the study: 1024)."
    )

    # -- models and prompts ---------------------------------------------------------------------
    explainer_model: str = Field("medsae/baseline", description="litellm model id of the explainer.")
    scorer_model: str = Field(
        "medsae/baseline",
        description="litellm model id of the reference simulator (one per experiment; keep it fixed).",
    )
    explainer_api_base: str | None = Field(
        None,
        description="API base URL of the explainer (an OpenAI-compatible or local server); None = default.",
    )
    scorer_api_base: str | None = Field(None, description="API base URL of the reference scorer.")
    explainer_template: str = Field(
        "explainer_metadata_v1",
        description="Explainer prompt: a name in prompts/ (without .j2) or a file path.",
    )
    vision_template: str = Field(
        "explainer_vlm_v1",
        description="Explainer prompt used when vision is on and the model accepts images.",
    )
    simulator_template: str = Field("simulator_metadata_v1", description="Simulator prompt (predict 0-10 per slice).")
    detector_template: str = Field("detector_metadata_v1", description="Detection prompt (fires or not per slice).")
    ranking_template: str = Field("ranking_v1", description="The study's 5-way ranking prompt.")
    vision: bool = Field(False, description="Add a thumbnail montage for vision-capable explainers.")
    temperature: float = Field(0.0, ge=0, le=2, description="Sampling temperature of explainer and simulator.")
    explainer_max_tokens: int = Field(400, ge=16, le=100_000, description="Token budget of one explanation answer.")
    simulation_mode: Literal["auto", "logprob_ev", "parsed_int"] = Field(
        "auto",
        description="How predictions are read: expected value over token logprobs, or parsed integers "
        "('auto' = logprob_ev where litellm says the model returns logprobs). Part of the scorer identity.",
    )
    top_logprobs: int = Field(20, ge=1, le=20, description="Alternatives requested per token in logprob_ev mode.")
    explanation_max_words: int = Field(
        60, ge=1, le=10_000, description="Explanations longer than this many words get status too_long (not scored)."
    )
    explanation_max_chars: int = Field(
        400, ge=1, le=100_000, description="Explanations longer than this many characters get status too_long."
    )
    max_prompt_tokens: int | None = Field(
        None,
        ge=64,
        le=100_000_000,
        description="Prompt budget in tokens (the smaller of this and litellm's context window of the model "
        "wins); explainer prompts show fewer examples to fit. None: litellm's window when known.",
    )

    # -- which latents ---------------------------------------------------------------------------
    max_latents: int | None = Field(
        None,
        ge=1,
        le=2**20,
        description="Explain at most this many latents (most frequent first; protocol study: study_latents).",
    )
    min_active: int = Field(10, ge=1, le=10**9, description="Eligibility: fires on at least this many pool slices.")
    min_patients: int = Field(
        3, ge=1, le=10**7, description="Eligibility: fires in at least this many scans of the pool."
    )
    dense_frequency: float = Field(0.3, gt=0, le=1, description="Latents firing more often are flagged dense.")
    pool_splits: list[str] = Field(
        ["val"], description="Interpretation pool: splits not used to train the SAE (widened when too small)."
    )
    min_pool_scans: int = Field(
        10, ge=2, le=10**7, description="Widen the pool (to val+test, then every split) below this many scans."
    )

    # -- sampling (docs/method.md#example-sets) --------------------------------------------------
    explain_fraction: float = Field(0.5, gt=0, lt=1, description="Share of scans hashed into the explain partition.")
    explain_top: int = Field(
        12, ge=1, le=1000, description="Strongest explain-partition slices shown to the explainer."
    )
    explain_per_decile: int = Field(2, ge=0, le=100, description="Extra explain slices per activation decile.")
    explain_negatives: int = Field(6, ge=0, le=1000, description="Non-firing contrast slices in the explain set.")
    matched_fraction: float = Field(
        0.5, ge=0, le=1, description="Share of contrasts matched to top slices on body region and structures."
    )
    simulate_per_decile: int = Field(2, ge=1, le=100, description="Firing held-out slices per decile.")
    simulate_random: int = Field(20, ge=0, le=10_000, description="Uniform held-out slices in the simulation set.")
    detect: bool = Field(True, description="Also score detection (balanced accuracy) on a balanced set.")
    detect_per_decile: int = Field(3, ge=1, le=100, description="Firing slices per decile in the detection set.")
    detect_negatives: int = Field(
        30, ge=2, le=10_000, description="Non-firing slices in the detection set (half matched)."
    )
    max_per_volume: int = Field(
        2, ge=1, le=1000, description="Near-duplicate control: slices per volume in an explain set."
    )
    max_per_volume_score: int = Field(
        3, ge=1, le=1000, description="Near-duplicate control: slices per volume per score set."
    )
    min_slice_gap: int = Field(
        3, ge=0, le=100_000, description="Minimum index gap between chosen slices of one volume and plane."
    )
    seed: int = Field(
        0, ge=0, le=2**32 - 1, description="Seed of every sampler (combined per SAE, latent and purpose)."
    )

    # -- scoring (docs/method.md#scoring) --------------------------------------------------------
    simulate_batch: int = Field(10, ge=1, le=99, description="Held-out slices per simulator call.")
    shuffled_fraction: float = Field(
        0.2, ge=0, le=1, description="Share of latents also scored with a random other latent's explanation."
    )
    shuffled_min: int = Field(10, ge=0, le=10**7, description="At least this many latents get the shuffled baseline.")
    ranking: bool = Field(True, description="Also run the study's 5-way ranking against 4 distractor explanations.")
    bootstrap: int = Field(1000, ge=0, le=1_000_000, description="Bootstrap resamples for the 95% interval.")
    permutations: int = Field(1000, ge=0, le=1_000_000, description="Permutations for the p-value of r.")

    # -- execution -------------------------------------------------------------------------------
    concurrency: int = execution_only(8, "LLM calls in flight at once.", ge=1, le=1024)
    max_cost_usd: float | None = execution_only(
        None, "Stop when the summed cost of LLM calls exceeds this.", ge=0, le=1e9
    )
    llm_mode: str = execution_only(
        "record", "Gateway mode: live, record (live + cache), replay (cache only; a miss is an error)."
    )
    max_retries: int = execution_only(
        4, "Retries per LLM call on rate limits, timeouts and server errors.", ge=0, le=100
    )
    timeout_s: float = execution_only(120.0, "Timeout of one LLM call (seconds).", gt=0, le=86_400)
    retry_backoff_s: float = execution_only(
        0.5, "First wait before a retry (s); doubles per attempt, jittered, at least the Retry-After.", gt=0, le=600
    )


#: Fields that only matter to the LLM part (``interpret``), not to ``summarize`` (statistics and
#: example sets): the planner leaves them out of the summarize stage's key.
LLM_ONLY_FIELDS: tuple[str, ...] = (
    "explainer_model",
    "scorer_model",
    "explainer_api_base",
    "scorer_api_base",
    "explainer_template",
    "vision_template",
    "simulator_template",
    "detector_template",
    "ranking_template",
    "study_explainer_template",
    "study_judge_template",
    "study_images",
    "study_image_size",
    "vision",
    "temperature",
    "explainer_max_tokens",
    "simulation_mode",
    "top_logprobs",
    "explanation_max_words",
    "explanation_max_chars",
    "max_prompt_tokens",
    "max_latents",
    "simulate_batch",
    "shuffled_fraction",
    "shuffled_min",
    "ranking",
    "bootstrap",
    "permutations",
)
