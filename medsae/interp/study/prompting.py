"""The study's two calls, as requests: the explainer (one concept per latent) and the judge (5-way ranking).

Both show a latent's diverse samples (:mod:`medsae.interp.study.samples`) as the study did: the
images first, then the prompt text with every sample's metadata block
(:mod:`medsae.interp.study.blocks`). Sampling as the study's: the explainer at temperature 0.3 with
at most 100 new tokens, the judge at temperature 0.2 with at most 50. The explainer's answer is
post-processed as the study's (:func:`clean_description`): surrounding quotes and a boilerplate
opening ("These images show ...", "The scans demonstrate ...", "Consistently, ...") removed, the first
letter capitalised.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from medsae.interp.llm import LLMRequest
from medsae.interp.prompts import Template
from medsae.interp.study.blocks import Sample, blocks

EXPLAINER_TEMPERATURE, EXPLAINER_MAX_TOKENS = 0.3, 100
JUDGE_TEMPERATURE, JUDGE_MAX_TOKENS = 0.2, 50

_VERB = r"(?:show|demonstrate|depict|feature|present)\s+"
_ADVERB = r"(?:consistently |predominantly )?"
#: Openings removed from a description, tried in this order (each at most once, at the start).
OPENINGS: tuple[re.Pattern[str], ...] = tuple(
    re.compile(p, re.IGNORECASE)
    for p in (
        rf"^These (?:axial |coronal |sagittal )?(?:CT |MRI |images? )?{_ADVERB}{_VERB}",
        rf"^The (?:images? |scans? )?{_ADVERB}{_VERB}",
        rf"^All (?:images? |scans? )?{_ADVERB}{_VERB}",
        r"^(?:Consistently|Predominantly),?\s+",
    )
)


def clean_description(text: str | None) -> str:
    """The study's post-processing of an explainer answer ("" for no answer)."""
    cleaned = (text or "").strip().strip("\"'")
    for pattern in OPENINGS:
        cleaned = pattern.sub("", cleaned, count=1)
    if cleaned and cleaned[0].islower():
        cleaned = cleaned[0].upper() + cleaned[1:]
    return cleaned.strip()


def image_part(png: bytes) -> dict:
    """An OpenAI-style image content part holding ``png`` inline."""
    return {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(png).decode()}}


@dataclass
class StudyPrompter:
    """One of the two calls: model, template, sampling, and where images come from (None: text only)."""

    model: str
    template: Template
    temperature: float
    max_tokens: int
    api_base: str | None = None
    slices_dir: Path | None = None  # set when the samples' images go with the prompt
    image_size: int = 1024

    def images(self, slice_ids: Sequence[int]) -> list[bytes]:
        """PNG bytes of each slice (rendered from its volume, cached on disk), or none without images."""
        if self.slices_dir is None:
            return []
        from medsae.data.render import thumbnail

        return [thumbnail(self.slices_dir, int(s), size=self.image_size) for s in slice_ids]

    def request(self, samples: Sequence[Sample], slice_ids: Sequence[int], **context: object) -> LLMRequest:
        """The call showing ``samples`` (their images first, then the text) with extra template ``context``."""
        messages = self.template.render(n=len(samples), metadata=blocks(samples), **context)
        pngs = self.images(slice_ids)
        if pngs:
            last = messages[-1]
            last["content"] = [image_part(p) for p in pngs] + [{"type": "text", "text": last["content"]}]
        return LLMRequest(
            model=self.model,
            messages=messages,
            temperature=self.temperature,
            max_tokens=self.max_tokens,
            seed=0,
            template_hash=self.template.hash,
            api_base=self.api_base,
        )
