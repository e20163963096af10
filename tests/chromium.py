"""Headless Chromium for the report tests: start it, open a page over DevTools, drive the page.

A sibling helper module (like ``llm_server.py``): import what a test needs, e.g.
``from chromium import CHROMIUM, devtools_port, open_page``. Chromium is Debian's ``chromium``
(``.ci/run`` installs it); ``CHROMIUM`` is None without it, and tests skip::

    with devtools_port(tmp_path / "profile") as port:
        result = asyncio.run(drive(port))      # drive: async with open_page(port, path) as page: ...
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
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


@contextmanager
def devtools_port(profile: Path) -> Iterator[int]:
    """Start headless Chromium with its own profile folder; yield its DevTools port; stop it after."""
    log = profile.with_name(profile.name + ".log")  # stderr to a file: a pipe nobody reads can fill and block
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "about:blank"], stdout=subprocess.DEVNULL, stderr=err
        )
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text().strip()):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text(errors="replace")[-2000:] if proc.poll() is not None else ""
                pytest.fail(f"chromium did not start its DevTools endpoint: {tail}")
            time.sleep(0.1)
        yield int(port_file.read_text().split()[0])
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


@asynccontextmanager
async def open_page(port: int, path: Path) -> AsyncIterator[Page]:
    """The browser's tab, its events recorded from the start, at 1400 x 1000 px, on ``path`` once loaded."""
    import aiohttp

    async with aiohttp.ClientSession() as session:
        page_ws, targets = None, []
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
                "Emulation.setDeviceMetricsOverride", width=1400, height=1000, deviceScaleFactor=1, mobile=False
            )
            await page.send("Page.navigate", url=path.resolve().as_uri())
            await page.wait_event("Page.loadEventFired")
            try:
                yield page
            finally:
                page.reader.cancel()
