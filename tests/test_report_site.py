"""The latent explorer (``medsae report EXP -o folder/``) built from the fabricated registry of test_report_html.

Expectations are recomputed with SQL on the registry file (duckdb) and hashlib on the written files;
the browser part opens the folder from ``file://`` in headless Chromium (DevTools protocol) and
sorts, filters and reads it the way a researcher would.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import duckdb
import pytest
from chromium import CHROMIUM, devtools_port, open_page  # sibling test modules
from test_report_html import DEAD, N_LATENTS, PWN, PWN_IMG, fabricate
from typer.testing import CliRunner

from medsae.cli.main import app
from medsae.errors import MedsaeError
from medsae.report.site.build import MARKER, build_site

EXP = "demo@k=8"


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("site")
    fab = fabricate(root / "fab")
    summary = build_site(fab["registry"], EXP, root / "site")
    return fab | {"root": root, "site": summary.path, "summary": summary}


def _sql(fab: dict, sql: str, params: list | None = None) -> list[tuple]:
    with duckdb.connect(str(fab["registry"].path), read_only=True) as con:
        return con.execute(sql, params or []).fetchall()


class _Page(HTMLParser):
    """Scripts, image sources, element counts inside #headline-text, and that element's text."""

    def __init__(self) -> None:
        super().__init__()
        self.scripts: list[dict] = []
        self.images: list[str] = []
        self.csp: str | None = None
        self.depth = 0  # > 0 while inside #headline-text
        self.headline = ""
        self.headline_children = 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if self.depth:
            self.depth += 1
            self.headline_children += 1
        if tag == "script":
            self.scripts.append(a)
        if tag == "img":
            self.images.append(a["src"])
        if tag == "meta" and a.get("http-equiv") == "Content-Security-Policy":
            self.csp = a["content"]
        if a.get("id") == "headline-text":
            self.depth = 1

    def handle_endtag(self, tag):
        if self.depth:
            self.depth -= 1

    def handle_data(self, data):
        if self.depth:
            self.headline += data


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


def test_every_latent_has_a_page_with_neighbour_links(site):
    expected = sorted(
        r[0] for r in _sql(site, "SELECT latent FROM latents WHERE stage_key = ?", [site["keys"]["summarize"]])
    )
    pages = sorted(int(p.stem) for p in (site["site"] / "latents").glob("*.html"))
    assert pages == expected == list(range(N_LATENTS))
    middle = (site["site"] / "latents" / "5.html").read_text()
    assert 'href="4.html"' in middle and 'href="6.html"' in middle
    assert 'id="prev"' not in (site["site"] / "latents" / "0.html").read_text()
    assert 'id="next"' not in (site["site"] / "latents" / f"{N_LATENTS - 1}.html").read_text()


def test_index_rows_equal_the_registry(site):
    data = json.loads((site["site"] / "latents.json").read_text())
    js = (site["site"] / "latents.js").read_text()
    assert js.startswith("window.MEDSAE_LATENTS = ") and json.loads(js.split("=", 1)[1].rstrip(";\n")) == data
    expected = _sql(
        site,
        """WITH best AS (
             SELECT e.latent, arg_max(e.text, s.value) AS text, max(s.value) AS score
             FROM explanations e JOIN explanation_scores s USING (explanation_id)
             WHERE e.stage_key = ? AND e.kind = 'explanation' AND s.method = 'pearson' GROUP BY e.latent)
           SELECT l.latent, l.frequency, l.n_active, l.n_patients, l.max_act, l.status, best.score, best.text
           FROM latents l LEFT JOIN best USING (latent) WHERE l.stage_key = ? ORDER BY l.latent""",
        [site["keys"]["summarize"]] * 2,
    )
    rows = data["rows"]
    assert [r["latent"] for r in rows] == [e[0] for e in expected]
    for row, (latent, freq, n_active, n_patients, max_act, status, score, text) in zip(rows, expected, strict=True):
        assert row["frequency"] == pytest.approx(freq, rel=1e-12)
        assert (row["n_active"], row["n_patients"], row["status"]) == (n_active, n_patients, status)
        assert row["max_act"] == pytest.approx(max_act, rel=1e-12)
        if latent in DEAD:
            assert row["score"] is None and row["explanation"] is None
        else:
            assert row["score"] == pytest.approx(score, rel=1e-12)
            assert row["explanation"] == text
        assert row["structure"] is None  # no ground stage in this registry


def test_hostile_explanation_stays_text(site):
    pwned = site["pwned_latent"]
    row = next(r for r in json.loads((site["site"] / "latents.json").read_text())["rows"] if r["latent"] == pwned)
    assert row["explanation"] == f"liver {PWN} {PWN_IMG}"  # the hostile version scored best (seeded fixture)
    page = _parse(site["site"] / "latents" / f"{pwned}.html")
    raw = (site["site"] / "latents" / f"{pwned}.html").read_text()
    assert PWN in page.headline and PWN_IMG in page.headline and page.headline_children == 0  # text, not markup
    assert "<script>window.__pwned" not in raw and 'onerror="' not in raw
    assert page.scripts == []  # latent pages run no script at all
    assert "script-src 'none'" in page.csp
    index = _parse(site["site"] / "index.html")
    assert [s["src"] for s in index.scripts] == ["latents.js", "explorer.js"]  # same-folder files only
    assert "script-src 'self'" in index.csp and "'unsafe-inline'" not in index.csp


def test_images_are_content_addressed_files(site):
    folder = site["site"]
    referenced = set()
    for page in [folder / "index.html", *sorted((folder / "latents").glob("*.html"))]:
        parsed = _parse(page)
        assert parsed.csp and "default-src 'none'" in parsed.csp and "img-src 'self'" in parsed.csp
        for src in parsed.images:
            assert not src.startswith("data:")
            path = (page.parent / src).resolve()
            assert re.fullmatch(r"[0-9a-f]{64}\.png", path.name) and path.parent == (folder / "thumbs").resolve()
            referenced.add(path)
    files = set((folder / "thumbs").glob("*.png"))
    assert referenced == {p.resolve() for p in files}
    for path in files:
        assert hashlib.sha256(path.read_bytes()).hexdigest() == path.stem
    # every live latent page shows its explain set: 8 top examples, 2 non-firing contrasts, one histogram
    page = (folder / "latents" / f"{site['pwned_latent']}.html").read_text()
    assert "top examples (8)" in page and "non-firing contrasts (2)" in page and 'id="legend"' in page
    assert len(_parse(folder / "latents" / f"{site['pwned_latent']}.html").images) == 8 + 2 + 1


def test_slices_beyond_the_shown_ones_are_listed_with_their_activation(site, tmp_path):
    latent = site["pwned_latent"]
    (ids, acts, roles), *_ = _sql(
        site,
        "SELECT slice_ids, activations, roles FROM example_sets WHERE latent = ? AND purpose = 'explain'",
        [latent],
    )
    top = sorted(((a, i) for i, a, r in zip(ids, acts, roles, strict=True) if r == "top"), reverse=True)
    folder = build_site(site["registry"], EXP, tmp_path / "few", n_slices=3).path
    page = (folder / "latents" / f"{latent}.html").read_text()
    assert f"top examples (3 of {len(top)} shown)" in page
    listed = re.search(r"not shown \(slice: activation\):(.*?)</p>", page, re.S).group(1)
    pairs = [(int(i), float(a)) for i, a in re.findall(r"(\d+): ([-\d.e]+)", listed)]
    assert [i for i, _ in pairs] == [i for _, i in top[3:]]
    assert [a for _, a in pairs] == pytest.approx([a for a, _ in top[3:]], rel=1e-2)


def test_rebuild_replaces_an_explorer_and_refuses_other_folders(site, tmp_path):
    reg = site["registry"]
    target = tmp_path / "out"
    build_site(reg, EXP, target)
    (target / "stale.txt").write_text("from an older build")
    again = build_site(reg, EXP, target)
    assert again.n_pages == N_LATENTS and not (target / "stale.txt").exists() and (target / MARKER).is_file()
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(MedsaeError, match="not a medsae explorer"):
        build_site(reg, EXP, foreign)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no half-built folder left


def test_cli_writes_a_folder_for_a_non_html_target(site, tmp_path):
    result = CliRunner().invoke(
        app, ["report", EXP, "-o", str(tmp_path / "explorer"), "--registry", str(site["registry"].path)]
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "explorer" / "index.html").is_file() and "latent pages" in result.output
    # the one-file report's card options are refused for a folder, in one line, before any work
    refused = CliRunner().invoke(
        app,
        ["report", EXP, "-o", str(tmp_path / "other"), "--sort-by", "score", "--registry", str(site["registry"].path)],
    )
    assert refused.exit_code != 0 and "--sort-by: applies to the one-file report" in str(refused.exception)
    assert not (tmp_path / "other").exists()


# -- headless Chromium ------------------------------------------------------------------------------------


async def _browse(port: int, folder: Path, pwned: int) -> dict[str, Any]:
    async with open_page(port, folder / "index.html") as page:
        rows = "Array.from(document.querySelectorAll('#latent-rows tr')).map(r => Number(r.dataset.latent))"
        out: dict[str, Any] = {"initial": await page.eval(rows)}
        click = "document.querySelector('th[data-key=frequency] button').click()"
        await page.eval(click)
        out["freq_desc"] = await page.eval(rows)
        await page.eval(click)
        out["freq_asc"] = await page.eval(rows)
        out["filtered"] = await page.eval(
            "(() => { const i = document.getElementById('text-filter'); i.value = '<script>';"
            f" i.dispatchEvent(new Event('input')); return {rows}; }})()"
        )
        out["count"] = await page.eval("document.getElementById('latent-count').textContent")
        out["cell_children"] = await page.eval("document.querySelectorAll('#latent-rows td.text *').length")
        out["cell_text"] = await page.eval(
            "Array.from(document.querySelectorAll('#latent-rows td.text')).map(e => e.textContent).join('')"
        )
        out["min_score"] = await page.eval(
            "(() => { document.getElementById('text-filter').value = '';"
            " const m = document.getElementById('min-score'); m.value = '0.5';"
            f" m.dispatchEvent(new Event('input')); return {rows}; }})()"
        )
        await page.screenshot("body", folder.parent / "index.png")
        await page.send("Page.navigate", url=(folder / "latents" / f"{pwned}.html").resolve().as_uri())
        await asyncio.sleep(0.2)
        await page.wait_event("Page.frameStoppedLoading")
        out["latent_title"] = await page.eval("document.title")
        out["headline"] = await page.eval("document.getElementById('headline-text').textContent")
        out["images"] = await page.eval(
            "Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight])"
        )
        out["pwned"] = await page.eval("typeof window.__pwned")
        out["errors"] = page.console_errors()
        out["requests"] = [u for u in page.requests() if not u.startswith("file:")]
        return out


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed (apt-get install -y chromium)")
def test_explorer_in_headless_chromium(site, tmp_path):
    with devtools_port(tmp_path / "profile") as port:
        result = asyncio.run(_browse(port, site["site"], site["pwned_latent"]))

    latents = {r["latent"]: r for r in site["latents"]}
    firing = [j for j in range(N_LATENTS) if j not in DEAD]
    assert result["errors"] == [] and result["requests"] == []
    assert result["initial"] == firing  # dead latents hidden until asked for, ascending id
    by_freq = sorted(firing, key=lambda j: (-latents[j]["frequency"], j))
    assert result["freq_desc"] == by_freq
    assert result["freq_asc"] == sorted(firing, key=lambda j: (latents[j]["frequency"], j))
    assert result["filtered"] == [site["pwned_latent"]] and result["count"] == f"1 of {N_LATENTS} latents shown"
    assert result["cell_children"] == 0 and PWN in result["cell_text"]  # shown as text, never parsed
    best = {}
    for s in site["scores"]:
        e = next(x for x in site["explanations"] if x["explanation_id"] == s["explanation_id"])
        if s["method"] == "pearson" and e["kind"] == "explanation":
            best[e["latent"]] = max(best.get(e["latent"], -1), s["value"])
    # still sorted by ascending frequency: the filter keeps the order
    assert result["min_score"] == sorted(
        (j for j, v in best.items() if v >= 0.5), key=lambda j: (latents[j]["frequency"], j)
    )
    assert result["pwned"] == "undefined" and result["latent_title"] == f"latent {site['pwned_latent']} · {EXP}"
    assert result["headline"].strip()
    assert len(result["images"]) == 11 and all(c and w > 0 and h > 0 for c, w, h in result["images"])


def test_grounded_latents_show_their_structure_and_panel(tmp_path):
    """A ground stage (latent_grounding rows + a stored map) adds the structure column and the panel."""
    import numpy as np

    from medsae.registry.queries import GROUND_MAPS_FILE

    fab = fabricate(tmp_path / "fab")
    reg, keys = fab["registry"], fab["keys"]
    folder = tmp_path / "fab" / "artifacts" / "ground" / "ground-key"
    folder.mkdir(parents=True)
    reg.insert("experiment_stages", [{"experiment_id": "exp0", "kind": "ground", "stage_key": "ground-key"}])
    reg.insert(
        "stages",
        [
            {
                "stage_key": "ground-key",
                "kind": "ground",
                "code_version": "1",
                "params_json": "{}",
                "status": "done",
                "artifact_dir": str(folder),
            }
        ],
    )
    structures = fab["structures"]
    liver = sorted(int(s) for s in structures.loc[structures["structure"] == "liver", "slice_id"])[:2]
    grounded = {1: "liver", 2: "spleen"}
    reg.insert(
        "latent_grounding",
        [
            {
                "stage_key": "ground-key",
                "sae_key": keys["train"],
                "latent": lat,
                "structure": st,
                "n_slices": 2,
                "n_present": 2,
                "lift": 2.0,
                "iou": 0.3,
                "lift_shuffled": 1.0,
                "iou_shuffled": 0.1,
                "exact": True,
            }
            for lat, st in grounded.items()
        ],
    )
    maps = np.zeros((1, 2, 4, 4), dtype=np.float32)
    maps[0, :, 1:3, 1:3] = 1.0
    np.savez(folder / GROUND_MAPS_FILE, latents=np.array([1]), slice_ids=np.array([liver]), maps=maps)
    site = build_site(reg, EXP, tmp_path / "site").path

    rows = {r["latent"]: r["structure"] for r in json.loads((site / "latents.json").read_text())["rows"]}
    expected = dict(_sql(fab, "SELECT latent, structure FROM latent_grounding WHERE stage_key = 'ground-key'"))
    assert {lat: s for lat, s in rows.items() if s is not None} == expected == grounded
    with_map = (site / "latents" / "1.html").read_text()
    assert 'id="grounding"' in with_map and "activation map on slice" in with_map
    panel = _parse(site / "latents" / "1.html")
    # 10 examples + histogram + overlay, colour bar and outline, all files in the store
    assert len(panel.images) == 10 + 1 + 3 and all((site / "latents" / src).resolve().is_file() for src in panel.images)
    without_map = (site / "latents" / "2.html").read_text()
    assert 'id="grounding"' in without_map and "no stored activation map" in without_map
    assert 'id="grounding"' not in (site / "latents" / "4.html").read_text()
