"""Open the report in headless Chromium and check what a researcher would see.

Chromium is driven over the DevTools protocol (aiohttp's websocket client): no console errors, no
network request, the expected number of latent cards, every image decoded, the explanation that
carries a ``<script>`` shown as text and never run, and the text filter working. Screenshots of a
latent card and of the plots go to ``$MEDSAE_SCREENSHOTS`` (default ``.cache/report-screenshots``).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from chromium import CHROMIUM, devtools_port, open_page, screenshot_dir  # sibling test modules
from test_report_html import DEAD, N_LATENTS, fabricate

from medsae.report.build import build_report

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="headless Chromium not installed (apt-get install -y chromium; .ci/run does it)"
)


async def _inspect(port: int, html_path: Path, shots: Path, pwned_latent: int) -> dict[str, Any]:
    async with open_page(port, html_path) as page:
        out = {
            "title": await page.eval("document.title"),
            "pwned": await page.eval("typeof window.__pwned"),
            "cards": await page.eval("document.querySelectorAll('.latent-card').length"),
            "scripts": await page.eval("document.scripts.length"),
            "images": await page.eval(
                "Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight])"
            ),
            "pwn_text": await page.eval(
                f"Array.from(document.querySelectorAll('#latent-{pwned_latent} .expl-text'))"
                ".map(e => e.textContent).join('\\n')"
            ),
            "pwn_elements": await page.eval(f"document.querySelectorAll('#latent-{pwned_latent} .expl-text *').length"),
        }
        await page.screenshot(f"#latent-{pwned_latent}", shots / "latent_card.png")
        for plot in ("sweep", "recovery", "frequency", "scores"):
            await page.screenshot(f"#plot-{plot}", shots / f"plot_{plot}.png")
        await page.screenshot("#plots", shots / "plots.png")
        filtered = await page.eval(
            "(() => { const i = document.getElementById('filter'); i.value = '<script>';"
            " i.dispatchEvent(new Event('input'));"
            " return [Array.from(document.querySelectorAll('.latent-card:not([hidden])'))"
            ".map(c => c.dataset.latent), document.getElementById('filter-count').textContent]; })()"
        )
        out["filtered"] = filtered
        await page.screenshot("#latents", shots / "filtered.png")
        out["errors"] = page.console_errors()
        out["requests"] = [u for u in page.requests() if not u.startswith(("file:", "data:"))]
        return out


def _open_in_chromium(html_path: Path, profile: Path, shots: Path, pwned_latent: int) -> dict[str, Any]:
    with devtools_port(profile) as port:
        return asyncio.run(_inspect(port, html_path, shots, pwned_latent))


def test_report_in_headless_chromium(tmp_path):
    fab = fabricate(tmp_path / "fab")
    html_path = build_report(fab["registry"], "demo@k=8", tmp_path / "report.html", n_latents=30)
    shots = screenshot_dir()
    result = _open_in_chromium(html_path, tmp_path / "profile", shots, fab["pwned_latent"])

    assert result["errors"] == []
    assert result["requests"] == []
    assert result["cards"] == min(30, N_LATENTS - len(DEAD))
    # the injected script is text: not run, not an element, and the title is ours
    assert result["pwned"] == "undefined"
    assert result["title"] == "medsae report: demo@k=8"
    assert result["scripts"] == 1
    assert "<script>window.__pwned = 1;" in result["pwn_text"]
    assert '<img src=x onerror="window.__pwned = 2">' in result["pwn_text"]
    assert result["pwn_elements"] == 0
    # every image (plots; thumbnails when rendered) decoded
    assert len(result["images"]) >= 4
    assert all(complete and w > 0 and h > 0 for complete, w, h in result["images"])
    # the filter searches explanation text: '<script>' appears in one latent's explanation only
    shown, count = result["filtered"]
    assert shown == [str(fab["pwned_latent"])]
    assert count == f"1 of {result['cards']} latents shown"
    for name in ("latent_card.png", "plots.png", "plot_sweep.png", "filtered.png"):
        assert (shots / name).stat().st_size > 1000
