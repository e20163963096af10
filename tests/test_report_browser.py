"""Open the report in headless Chromium and check what a researcher would see.

Chromium is driven over the DevTools protocol (aiohttp's websocket client): no console errors, no
network request, the expected number of latent cards, every image decoded, the explanation that
carries a ``<script>`` shown as text and never run, and the text filter working. Screenshots of a
latent card and of the plots go to ``$MEDSAE_SCREENSHOTS`` (default ``.cache/report-screenshots``).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from test_report_html import DEAD, N_LATENTS, fabricate  # a sibling test module

from medsae.report.build import build_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="headless Chromium not installed (apt-get install -y chromium; .ci/run does it)"
)
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-extensions",
    "--mute-audio",
    "--remote-debugging-port=0",
]


def screenshot_dir() -> Path:
    root = Path(__file__).resolve().parents[1]
    folder = Path(os.environ.get("MEDSAE_SCREENSHOTS") or root / ".cache" / "report-screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


class Page:
    """The smallest DevTools client: send a command, await its reply, keep every event."""

    def __init__(self, ws) -> None:
        self.ws = ws
        self.next_id = 0
        self.pending: dict[int, asyncio.Future] = {}
        self.events: list[dict[str, Any]] = []
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for msg in self.ws:
            data = json.loads(msg.data)
            if "id" in data and data["id"] in self.pending:
                self.pending.pop(data["id"]).set_result(data)
            elif "method" in data:
                self.events.append(data)

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        fut = asyncio.get_running_loop().create_future()
        self.pending[self.next_id] = fut
        await self.ws.send_str(json.dumps({"id": self.next_id, "method": method, "params": params}))
        reply = await asyncio.wait_for(fut, 30)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    async def eval(self, expression: str) -> Any:
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression[:60]}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_event(self, method: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not any(e["method"] == method for e in self.events):
            if time.monotonic() > deadline:
                raise TimeoutError(method)
            await asyncio.sleep(0.05)

    async def screenshot(self, selector: str, path: Path) -> None:
        rect = await self.eval(
            f"(() => {{ const r = document.querySelector({json.dumps(selector)}).getBoundingClientRect();"
            " return [r.left + window.scrollX, r.top + window.scrollY, r.width, r.height]; })()"
        )
        x, y, w, h = rect
        shot = await self.send(
            "Page.captureScreenshot",
            format="png",
            captureBeyondViewport=True,
            clip={"x": x, "y": y, "width": w, "height": h, "scale": 1},
        )
        path.write_bytes(base64.b64decode(shot["data"]))

    def console_errors(self) -> list[str]:
        errors = []
        for e in self.events:
            p = e.get("params", {})
            if e["method"] == "Runtime.exceptionThrown":
                errors.append(json.dumps(p["exceptionDetails"])[:300])
            elif e["method"] == "Runtime.consoleAPICalled" and p.get("type") in (
                "error",
                "assert",
                "warning",
            ):
                errors.append(json.dumps(p.get("args"))[:300])
            elif e["method"] == "Log.entryAdded" and p["entry"]["level"] in ("error", "warning"):
                errors.append(p["entry"]["text"][:300])
        return errors

    def requests(self) -> list[str]:
        return [e["params"]["request"]["url"][:80] for e in self.events if e["method"] == "Network.requestWillBeSent"]


async def _inspect(port: int, html_path: Path, shots: Path, pwned_latent: int) -> dict[str, Any]:
    import aiohttp

    async with aiohttp.ClientSession() as session:
        page_ws = None
        for _ in range(100):  # the first tab may appear a moment after the endpoint
            async with session.get(f"http://127.0.0.1:{port}/json/list") as resp:
                targets = await resp.json()
            page_ws = next((t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page"), None)
            if page_ws:
                break
            await asyncio.sleep(0.1)
        assert page_ws, f"no page target in {targets}"
        async with session.ws_connect(page_ws, max_msg_size=0) as ws:
            page = Page(ws)
            for domain in ("Runtime", "Log", "Network", "Page"):
                await page.send(f"{domain}.enable")
            await page.send(
                "Emulation.setDeviceMetricsOverride",
                width=1400,
                height=1000,
                deviceScaleFactor=1,
                mobile=False,
            )
            await page.send("Page.navigate", url=html_path.resolve().as_uri())
            await page.wait_event("Page.loadEventFired")
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
                "pwn_elements": await page.eval(
                    f"document.querySelectorAll('#latent-{pwned_latent} .expl-text *').length"
                ),
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
            page.reader.cancel()
            return out


def _open_in_chromium(html_path: Path, profile: Path, shots: Path, pwned_latent: int) -> dict[str, Any]:
    proc = subprocess.Popen(
        [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text().strip()):
            if proc.poll() is not None or time.monotonic() > deadline:
                err = proc.stderr.read().decode(errors="replace")[-2000:] if proc.poll() is not None else ""
                pytest.fail(f"chromium did not start its DevTools endpoint: {err}")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        return asyncio.run(_inspect(port, html_path, shots, pwned_latent))
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


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
