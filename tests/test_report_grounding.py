"""Latent cards of a grounded experiment: the activation map over the slice and the best structure's outline.

One small grounded phantom run (shared with tests/test_latent_map.py: a second build resumes the
finished stages). Expectations are composed independently: the slice from ``medsae.data.render``,
the stored token map upsampled with PIL's bilinear resize, the colours from matplotlib, the rows
and the structures per slice read from DuckDB with plain SQL.
"""

from __future__ import annotations

import base64
import io
import re
from html.parser import HTMLParser
from pathlib import Path

import duckdb
import numpy as np
import pytest
from PIL import Image
from test_ground_stage import UP_TO_GROUND, _crop_pixels, small_spec

from medsae.data.render import render_slice
from medsae.plan import plan_experiment, run_plans
from medsae.registry.db import Registry
from medsae.report.build import build_report
from medsae.spec import parse_specs

MAX_ALPHA = 0.65  # the overlay's documented opacity at the latent's maximum (medsae.ground.picture)
OUTLINE = (0, 255, 255)


def grounded_run(tmp_path_factory) -> tuple[Path, object, Registry]:
    """The small grounded phantom experiment, built once per test session (later calls resume it)."""
    tmp = tmp_path_factory.getbasetemp() / "grounded-run"
    tmp.mkdir(exist_ok=True)
    plan = plan_experiment(parse_specs(small_spec(tmp))[0])
    registry = Registry(tmp / "registry.duckdb")
    run_plans([plan], registry, only=UP_TO_GROUND, quiet=True)
    return tmp, plan, registry


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp, plan, registry = grounded_run(tmp_path_factory)
    out = build_report(registry, plan.spec.name, tmp / "report.html", n_latents=64, sort_by="latent", n_slices=2)
    return plan, registry, out.read_text(encoding="utf-8")


class _Cards(HTMLParser):
    """latent -> {structure, slice, overlay, outline, bar} of each card's grounding panel."""

    def __init__(self) -> None:
        super().__init__()
        self.cards: dict[int, dict] = {}
        self.latent: int | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "article" and "data-latent" in a:
            self.latent = int(a["data-latent"])
            self.cards[self.latent] = {}
        elif self.latent is not None and "data-structure" in a:
            self.cards[self.latent]["structure"] = a["data-structure"]
        elif self.latent is not None and "data-slice" in a:
            self.cards[self.latent]["slice"] = int(a["data-slice"])
        elif self.latent is not None and tag == "img":
            for kind in ("overlay", "outline", "bar"):
                if kind in a.get("class", "").split():
                    self.cards[self.latent][kind] = a["src"]


def _pixels(url: str) -> np.ndarray:
    prefix = "data:image/png;base64,"
    assert url.startswith(prefix)
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url[len(prefix) :]))))


def _query(registry: Registry, sql: str, params: list) -> list[tuple]:
    con = duckdb.connect(str(registry.path), read_only=True)
    try:
        return con.execute(sql, params).fetchall()
    finally:
        con.close()


def test_grounded_cards_show_the_map_over_the_slice_and_the_best_structure(report):
    from matplotlib import colormaps

    plan, registry, html = report
    ground = plan.nodes["ground"]
    best = dict(_query(registry, "SELECT latent, structure FROM latent_grounding WHERE stage_key = ?", [ground.key]))
    parser = _Cards()
    parser.feed(html)
    grounded = {lat: c for lat, c in parser.cards.items() if "structure" in c}
    assert set(grounded) == set(best) & set(parser.cards) and grounded
    assert all(c == {} for lat, c in parser.cards.items() if lat not in best)  # no panel without a ground row
    stored = np.load(ground.final_dir / "activation_maps.npz")
    position = {int(x): i for i, x in enumerate(stored["latents"])}
    slices_dir = plan.nodes["slices"].final_dir
    checked = 0
    for latent, card in sorted(grounded.items())[:3]:
        assert card["structure"] == best[latent]
        ids = [int(s) for s in stored["slice_ids"][position[latent]] if s >= 0]
        having = {
            s
            for (s,) in _query(
                registry,
                "SELECT slice_id FROM slice_structures WHERE slices_key = ? AND structure = ?",
                [plan.nodes["slices"].key, best[latent]],
            )
        }
        # the strongest top slice that contains the best structure
        slot = next(i for i, s in enumerate(ids) if s in having)
        assert card["slice"] == ids[slot]
        image = render_slice(slices_dir, ids[slot]).astype(np.float64)
        size = image.shape[0]
        token_map = stored["maps"][position[latent], slot].astype(np.float32)
        up = np.asarray(Image.fromarray(token_map, mode="F").resize((size, size), Image.BILINEAR))
        up = np.maximum(up, 0)
        overlay = _pixels(card["overlay"]).astype(np.float64)
        assert overlay.shape == (size, size, 3)
        v = up / up.max()
        expected = (1 - MAX_ALPHA * v[..., None]) * image[..., None] + MAX_ALPHA * v[..., None] * colormaps["inferno"](
            v, bytes=True
        )[..., :3]
        assert np.abs(overlay - expected).max() <= 1.0
        # orientation: the upsampled map peaks inside the token cell where the stored map peaks
        cell = size / token_map.shape[0]
        peak_pixel = np.array(np.unravel_index(np.argmax(up), up.shape))
        peak_cell = np.array(np.unravel_index(np.argmax(token_map), token_map.shape))
        assert np.all(np.abs(peak_pixel + 0.5 - (peak_cell + 0.5) * cell) <= cell / 2 + 0.5)
        # the outline: the slice itself except for outline-coloured pixels around the structure's area
        outline = _pixels(card["outline"])
        changed = np.any(outline != image[..., None].astype(np.uint8), axis=-1)
        assert changed.any() and (outline[changed] == OUTLINE).all()
        pixels = dict(
            _query(
                registry,
                "SELECT structure, pixels FROM slice_structures WHERE slices_key = ? AND slice_id = ?",
                [plan.nodes["slices"].key, ids[slot]],
            )
        )[best[latent]]
        if pixels >= 40:
            from scipy.ndimage import binary_fill_holes

            share = binary_fill_holes(changed).mean()
            assert share == pytest.approx(pixels / _crop_pixels(slices_dir, ids[slot]), rel=0.3)
        bar = _pixels(card["bar"])
        assert tuple(bar[0, 0]) == tuple(colormaps["inferno"](1.0, bytes=True)[:3])
        assert tuple(bar[-1, 0]) == tuple(colormaps["inferno"](0.0, bytes=True)[:3])
        checked += 1
    assert checked > 0


def test_grounding_panel_keeps_the_report_self_contained(report):
    _, _, html = report
    panels = re.findall(r'<div class="grounding".*?</table>', html, flags=re.S)
    assert panels
    for panel in panels:
        for src in re.findall(r'src="([^"]*)"', panel):
            assert src.startswith("data:image/png;base64,")
    assert "http://" not in html and "https://" not in html
    assert "default-src 'none'; img-src data:" in html
