"""The ``ground:`` section: which latents are grounded against the structure masks, and how."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from medsae.embed.config import EmbedSpec
from medsae.specbase import Section, execution_only, seed_field


class GroundSpec(Section):
    """Grounding of latents in structure masks (docs/method.md#grounding).

    Off by default: on the full data set it re-embeds the top slices of every live latent and reads
    every structure mask of their scans, which costs hours over a grid of configurations.
    """

    enabled: bool = Field(False, description="Give the experiment a grounding stage (false: it has none).")
    splits: list[Literal["train", "val", "test"]] = Field(
        ["val", "test"], min_length=1, max_length=3, description="Splits the top slices are taken from (held out)."
    )
    top_slices: int = Field(20, ge=1, le=1000, description="Top slices (highest pooled code) per latent.")
    min_active: int = Field(5, ge=1, le=1_000_000, description="A latent needs this many firing slices to be grounded.")
    max_latents: int | None = Field(
        None, ge=1, le=10_000_000, description="Ground at most this many latents (the most frequent); None = all."
    )
    score_size: int = Field(
        64, ge=8, le=1024, description="Side of the pixel grid scores are computed on (maps upsampled, masks resized)."
    )
    thresholds: int = Field(
        19, ge=1, le=200, description="Thresholds tried for the best-threshold IoU (fractions of the latent's maximum)."
    )
    shuffle_seed: int = seed_field(0, "Seed of the shuffled-mask baseline (masks swapped within modality/plane).")
    device: str = execution_only("auto", "auto = cuda, then mps, then cpu; or an explicit torch device.")
    batch_size: int = execution_only(32, "Slices per forward pass.", ge=1, le=4096)


class GroundRun(GroundSpec):
    """What the stage receives: its section plus the ``embed:`` section (to rebuild the backbone).

    Only :class:`GroundSpec` enters the stage key; the backbone is already in it through the
    embed stage's key upstream.
    """

    embed: Annotated[EmbedSpec, Field(description="The experiment's embed section.")]
