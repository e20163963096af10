"""The explainer: one prompt per latent from its explain set, one parsed sentence back (docs/method.md#explainer).

Each example is one compact metadata line (:mod:`medsae.interp.metadata`) with the latent's
strength 0-10 = floor(10 * activation / max activation of the set), at least 1 for a firing slice;
contrasts (non-firing) come last with strength 0. IDs are opaque (``E01``...) and carry no slice
id. The vision variant attaches one montage of thumbnails (rendered from the volumes by
:func:`medsae.data.render.thumbnail`) captioned with ID and strength. A prompt too long for the
model's context window shows fewer examples (:mod:`medsae.interp.llm.budget`).

The answer's last line starting with ``EXPLANATION:`` is the explanation. When there is none the
explanation is recorded with status ``parse_failed`` and no text: a placeholder could be scored as
if it were an explanation.
"""

from __future__ import annotations

import base64
import io
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medsae.interp.config import InterpretSpec
from medsae.interp.llm import LLMRequest
from medsae.interp.llm.budget import fit_examples
from medsae.interp.prompts import Template

MAX_THUMBNAILS = 16
_EXPLANATION = re.compile(r"^[\s>*_#`\-]*explanation\s*[*_]*\s*:\s*[*_]*\s*(.*)$", re.IGNORECASE)


def strengths(activations: np.ndarray) -> np.ndarray:
    """0-10 integers: floor(10 a / max a), at least 1 where a > 0, 0 where a <= 0."""
    acts = np.asarray(activations, dtype=np.float64)
    top = acts.max() if len(acts) and acts.max() > 0 else 1.0
    s = np.floor(10 * acts / top).astype(int)
    return np.where(acts > 0, np.clip(s, 1, 10), 0)


def explain_examples(slice_ids: Sequence[int], activations: Sequence[float], lines: dict[int, str]) -> list[dict]:
    """Prompt rows ``{id, strength, line, slice_id, activation}``, strongest first, contrasts last."""
    acts = np.asarray(activations, dtype=np.float64)
    order = np.lexsort((np.arange(len(acts)), -acts))
    strength = strengths(acts)
    rows = []
    for n, i in enumerate(order, start=1):
        sid = int(slice_ids[i])
        rows.append(
            {
                "id": f"E{n:02d}",
                "strength": int(strength[i]),
                "line": lines[sid],
                "slice_id": sid,
                "activation": float(acts[i]),
            }
        )
    return rows


def render_explainer(template: Template, examples: list[dict], montage_png: bytes | None = None) -> list[dict]:
    """Chat messages for one latent; the montage (if any) is attached to the last user message."""
    messages = template.render(examples=[{k: e[k] for k in ("id", "strength", "line")} for e in examples])
    if montage_png is not None:
        last = messages[-1]
        url = "data:image/png;base64," + base64.b64encode(montage_png).decode()
        last["content"] = [
            {"type": "text", "text": last["content"]},
            {"type": "image_url", "image_url": {"url": url}},
        ]
    return messages


def parse_explanation(text: str | None) -> str | None:
    """The text after the last ``EXPLANATION:`` marker line (or on the next line), else None."""
    if not text:
        return None
    lines = text.strip().splitlines()
    for i in range(len(lines) - 1, -1, -1):
        m = _EXPLANATION.match(lines[i])
        if not m:
            continue
        found = m.group(1).strip()
        if not found:
            found = next((ln.strip() for ln in lines[i + 1 :] if ln.strip()), "")
        found = found.strip().strip("*_`").strip().strip("\"'“”").strip()
        return found or None
    return None


def supports_vision(model: str) -> bool:
    """Whether litellm knows ``model`` to accept images (offline ``medsae/`` models do not)."""
    if model.startswith("medsae/"):
        return False
    try:
        import litellm

        return bool(litellm.supports_vision(model=model))
    except Exception:
        return False


def montage(slices_dir: Path, examples: list[dict], size: int = 128, columns: int = 4) -> bytes:
    """One PNG grid of up to 16 thumbnails (firing first, up to 4 contrasts), captioned ID / strength."""
    from PIL import Image, ImageDraw

    from medsae.data.render import thumbnail

    firing = [e for e in examples if e["strength"] > 0]
    contrasts = [e for e in examples if e["strength"] == 0]
    n_contrast = min(len(contrasts), 4, max(0, MAX_THUMBNAILS - min(len(firing), MAX_THUMBNAILS - 4)))
    chosen = firing[: MAX_THUMBNAILS - n_contrast] + contrasts[:n_contrast]
    rows = max(1, -(-len(chosen) // columns))
    grid = Image.new("L", (columns * size, rows * size), color=0)
    draw = ImageDraw.Draw(grid)
    for k, ex in enumerate(chosen):
        tile = Image.open(io.BytesIO(thumbnail(slices_dir, ex["slice_id"], size=size))).convert("L")
        tile = tile.resize((size, size))
        x, y = (k % columns) * size, (k // columns) * size
        grid.paste(tile, (x, y))
        caption = f"{ex['id']} s={ex['strength']}"
        draw.rectangle([x, y, x + 7 * len(caption) + 4, y + 12], fill=0)
        draw.text((x + 2, y + 1), caption, fill=255)
    buf = io.BytesIO()
    grid.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def request_params(spec: InterpretSpec) -> dict[str, Any]:
    """Explainer parameters that change its answer (they enter the explanation id)."""
    return {
        "temperature": float(spec.temperature),
        "max_tokens": int(spec.explainer_max_tokens),
        "vision": bool(spec.vision),
    }


@dataclass
class Explainer:
    """One explainer: model, template, sampling settings, prompt budget and (vision) the slices folder."""

    model: str
    template: Template
    temperature: float
    max_tokens: int
    api_base: str | None = None
    budget: int | None = None  # prompt tokens the model accepts (None: not checked)
    slices_dir: Path | None = None  # set when a montage of the examples goes with the prompt

    def request(self, examples: list[dict]) -> tuple[LLMRequest, int]:
        """The call for one latent's examples, fitted to the budget (fewer shown when they do not fit),
        and how many examples it shows."""

        def render(shown: list[dict]) -> list[dict]:
            image = montage(self.slices_dir, shown) if self.slices_dir is not None else None
            return render_explainer(self.template, shown, image)

        messages, shown = fit_examples(render, examples, self.model, self.budget)
        request = LLMRequest(
            model=self.model,
            messages=messages,
            temperature=self.temperature,
            max_tokens=self.max_tokens,
            seed=0,
            template_hash=self.template.hash,
            api_base=self.api_base,
        )
        return request, len(shown)
