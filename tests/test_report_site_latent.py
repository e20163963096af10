"""The latent pages' neighbour and probe panels, on a small real experiment.

The experiment runs through the real CLI (slices, embed, train, encode, evaluate, summarize) on a
tiny phantom into a real registry file; the explorer is built from it. Expectations come from the
artifact files read with numpy / safetensors / pandas / scikit-learn only: decoder cosines from
``sae.safetensors``, co-firing counts from the CSR code arrays, probe logits from
``probe_weights.parquet`` with labels from ``slices.parquet``, and the AUCs the evaluate stage wrote.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import yaml
from chromium import CHROMIUM, devtools_port, open_page, screenshot_dir  # sibling test module
from safetensors.numpy import load_file
from sklearn.metrics import roc_auc_score

from medsae.registry import Registry
from medsae.report.site.build import build_site
from medsae.report.site.latent_extras import LatentExtras, Neighbours, decoder_neighbours, top_k

PWN = '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2">'
STAGES = ("slices", "embed", "train", "encode", "evaluate", "summarize")


def spec(tmp: Path) -> dict:
    """~170 phantom slices with both sexes in train; a 48-latent TopK SAE; probes only in evaluate."""
    return {
        "name": "demo",
        "seed": 0,
        "artifacts": str(tmp / "artifacts"),
        "data": {
            "root": str(tmp / "phantom"),
            "phantom": {"subjects": 8, "seed": 3, "shape": [24, 24, 32]},
            "size": 32,
            "stride": 2,
            "test_institutes": [],
            "val_fraction": 0.3,
        },
        "embed": {"source": "efficientnet_lite0", "input_size": 32, "batch_size": 64, "pretrained": False},
        "sae": {"arch": "topk", "d_sae": 48, "k": 4, "batch_size": 64, "epochs": 5, "lr": 0.001, "warmup_steps": 2},
        "eval": {
            "probe_max_train": 300,
            "probe_min_positives": 5,
            "probe_C": 20.0,
            "probe_max_iter": 200,
            "recovery": False,
            "monosemanticity": False,
            "retrieval": False,
            "plots": False,
        },
    }


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("latent")
    (tmp / "demo.yaml").write_text(yaml.safe_dump(spec(tmp)))
    registry = tmp / "registry.duckdb"
    only = [a for kind in STAGES for a in ("--only", kind)]
    proc = subprocess.run(
        [sys.executable, "-m", "medsae.cli.main", "exp", "run", "demo.yaml", *only, "--registry", str(registry)],
        cwd=tmp,
        env=dict(os.environ, MEDSAE_QUIET="1"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with duckdb.connect(str(registry), read_only=True) as con:
        dirs = {kind: tmp / d for kind, d in con.execute("SELECT kind, artifact_dir FROM stages").fetchall()}
    summary = build_site(Registry(registry), "demo", tmp / "site")
    pages = sorted(int(p.stem) for p in (summary.path / "latents").glob("*.html"))
    return {"tmp": tmp, "registry": registry, "dirs": dirs, "site": summary.path, "pages": pages}


class _Tables(HTMLParser):
    """Every table with an id: rows of (cell texts, first link of the row); <script> tags seen."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[tuple[list[str], str | None]]] = {}
        self.table: str | None = None
        self.cells: list[str] | None = None
        self.link: str | None = None
        self.header = False
        self.scripts = 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "script":
            self.scripts += 1
        if tag == "table" and a.get("id"):
            self.table = a["id"]
            self.tables[self.table] = []
        elif self.table and tag == "tr":
            self.cells, self.link, self.header = [], None, False
        elif self.table and tag == "th":
            self.header = True
        elif self.table and tag == "td" and self.cells is not None:
            self.cells.append("")
        elif self.table and tag == "a" and self.link is None:
            self.link = a.get("href")

    def handle_endtag(self, tag):
        if tag == "table":
            self.table = None
        elif self.table and tag == "tr" and self.cells is not None:
            if not self.header:
                self.tables[self.table].append((self.cells, self.link))
            self.cells = None

    def handle_data(self, data):
        if self.table and self.cells:
            self.cells[-1] += data


def _page(site: Path, latent: int) -> tuple[_Tables, str]:
    raw = (site / "latents" / f"{latent}.html").read_text(encoding="utf-8")
    parsed = _Tables()
    parsed.feed(raw)
    return parsed, raw


def _section_text(raw: str, section: str) -> str:
    body = raw.split(f'id="{section}"', 1)[1].split("</section>", 1)[0]
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", body))


def _codes(encode_dir: Path) -> tuple[sp.csr_matrix, np.ndarray]:
    """The encode stage's codes read with numpy + scipy only (rows in file order) and the slice id per row."""
    indptr, indices, values, ids = (
        np.load(encode_dir / f) for f in ("codes_indptr.npy", "codes_indices.npy", "codes_values.npy", "slice_ids.npy")
    )
    d_sae = json.loads((encode_dir / "meta.json").read_text())["d_sae"]
    return sp.csr_matrix((values, indices, indptr), shape=(len(indptr) - 1, d_sae)), ids


SHOWN = dict(rel=5e-3, abs=1e-3)  # numbers on the page carry 3 significant digits


def test_decoder_neighbours_equal_numpy_cosines(built):
    w = load_file(str(built["dirs"]["train"] / "sae.safetensors"))["W_dec"].astype(np.float64)  # [d_sae, d_in]
    unit = w / np.linalg.norm(w, axis=1, keepdims=True)
    cos = unit @ unit.T
    np.fill_diagonal(cos, -np.inf)
    assert built["pages"] == list(range(w.shape[0]))
    found = decoder_neighbours(w.astype(np.float32), k=8)
    for i in range(w.shape[0]):
        expected = np.sort(cos[i])[::-1][:8]
        assert found.value[i] == pytest.approx(expected, abs=1e-5)
        assert cos[i, found.index[i]] == pytest.approx(found.value[i], abs=1e-5)
        rows = _page(built["site"], i)[0].tables["decoder-neighbours"]
        shown = [int(cells[0]) for cells, _ in rows]
        assert [float(cells[1]) for cells, _ in rows] == pytest.approx(expected, **SHOWN)
        assert cos[i, shown] == pytest.approx(expected, **SHOWN)
        assert [link for _, link in rows] == [f"{j}.html" for j in shown]  # every latent has a page here


def test_coactivation_neighbours_equal_direct_counts(built):
    codes, _ = _codes(built["dirs"]["encode"])
    fires = (codes.toarray() > 1e-8).astype(np.int64)
    both = fires.T @ fires
    count = np.diag(both).copy()
    for i in built["pages"]:
        partners = [j for j in range(len(count)) if j != i and both[i, j] > 0]
        jac = {j: both[i, j] / (count[i] + count[j] - both[i, j]) for j in partners}
        expected = sorted(partners, key=lambda j: (-jac[j], j))[:8]
        parsed, raw = _page(built["site"], i)
        rows = parsed.tables.get("coactivation-neighbours", [])
        assert [int(cells[0]) for cells, _ in rows] == expected
        for (cells, _), j in zip(rows, expected, strict=True):
            assert float(cells[1]) == pytest.approx(jac[j], **SHOWN)
            assert float(cells[2]) == pytest.approx(both[i, j] / count[i], **SHOWN)
            assert int(cells[3]) == both[i, j]
        text = _section_text(raw, "neighbours")
        if count[i] == 0:
            assert "fires on none of the encoded slices" in text
        else:
            assert f"this latent fires on {count[i]} slices" in text
    assert len(built["pages"]) == len(count)


def _ranks(table: pd.DataFrame) -> pd.Series:
    """Rank of each weight by magnitude within its probe column, 1 = largest, computed row by row."""
    out = {}
    for _, g in table.groupby(["target", "column"]):
        mags = g["weight"].abs().to_numpy()
        for idx, m in zip(g.index, mags, strict=True):
            out[idx] = 1 + int((mags > m).sum())
    return pd.Series(out)


def test_probe_weights_on_pages_equal_the_persisted_table(built):
    table = pd.read_parquet(built["dirs"]["evaluate"] / "probe_weights.parquet")
    assert len(table) and (table["weight"] != 0).all()
    table["rank"] = _ranks(table)
    table["n"] = table.groupby(["target", "column"])["weight"].transform("size")
    metrics = json.loads((built["dirs"]["evaluate"] / "metrics.json").read_text())
    auc = {m["target"]: m["value"] for m in metrics if m["name"] == "probe_auc_sparse" and m["split"] == "val"}
    seen = 0
    for i in built["pages"]:
        mine = table[table["latent"] == i]
        mine = mine.iloc[np.argsort(-mine["weight"].abs().to_numpy(), kind="stable")]
        parsed, raw = _page(built["site"], i)
        rows = parsed.tables.get("probe-weights", [])
        assert [cells[0] for cells, _ in rows] == [t.replace("=", ": ") for t in mine["target"]]
        for (cells, _), rec in zip(rows, mine.to_dict("records"), strict=True):
            assert float(cells[1]) == pytest.approx(rec["weight"], **SHOWN)
            assert cells[1].startswith("+") == (rec["weight"] > 0)
            if rec["negative"]:  # binary: the class the sign argues for
                assert cells[2] == (rec["positive"] if rec["weight"] > 0 else rec["negative"])
            else:
                assert cells[2] == ("for " if rec["weight"] > 0 else "against ") + rec["positive"]
            assert cells[3] == f"{rec['rank']} of {rec['n']}"
            # the probe's val AUC: a binary target's own, a softmax column's class AUC
            key = rec["target"] if rec["negative"] else f"{rec['target']}={rec['positive']}"
            if auc.get(key) is None:
                assert cells[4] == "—"
            else:
                assert float(cells[4]) == pytest.approx(auc[key], **SHOWN)
        if not rows:
            assert "no sparse-code probe gives this latent a non-zero weight" in _section_text(raw, "probes")
        seen += len(rows)
    assert seen == len(table)  # every persisted weight appears on exactly one page


def test_persisted_weights_reproduce_the_stage_aucs(built):
    dirs = built["dirs"]
    table = pd.read_parquet(dirs["evaluate"] / "probe_weights.parquet")
    metrics = json.loads((dirs["evaluate"] / "metrics.json").read_text())
    auc = {m["target"]: m["value"] for m in metrics if m["name"] == "probe_auc_sparse" and m["split"] == "val"}
    slices = pd.read_parquet(dirs["slices"] / "slices.parquet").set_index("slice_id")
    present = pd.read_parquet(dirs["slices"] / "slice_structures.parquet")
    present = present[present["pixels"] > 0]
    codes, ids = _codes(dirs["encode"])
    val = np.flatnonzero(slices.loc[ids, "split"].to_numpy() == "val")
    x = codes[val]
    val_ids = ids[val]

    def logits(target: str) -> np.ndarray:
        rows = table[table["target"] == target]
        n_cols = int(rows["column"].max()) + 1
        coef = np.zeros((x.shape[1], n_cols))
        coef[rows["latent"], rows["column"]] = rows["weight"]
        intercept = rows.groupby("column")["intercept"].first().sort_index().to_numpy()
        return np.asarray(x @ coef) + intercept

    checked = []
    for target in sorted(set(table["target"])):
        first = table[table["target"] == target].iloc[0]
        if target == "sex":
            labelled = slices.loc[val_ids, "sex"].isin([first["positive"], first["negative"]]).to_numpy()
            y = slices.loc[val_ids, "sex"].to_numpy()[labelled] == first["positive"]
        elif target.startswith("structure="):
            name = target.split("=", 1)[1]
            labelled = np.ones(len(val_ids), bool)
            y = np.isin(val_ids, present.loc[present["structure"] == name, "slice_id"])
        elif target == "plane":
            z = logits(target)
            proba = np.exp(z - z.max(axis=1, keepdims=True))
            proba /= proba.sum(axis=1, keepdims=True)
            classes = table[table["target"] == target].groupby("column")["positive"].first().sort_index().tolist()
            y = np.array([classes.index(p) for p in slices.loc[val_ids, "plane"]])
            assert roc_auc_score(y, proba, multi_class="ovr") == pytest.approx(auc["plane"], abs=1e-9)
            for k, c in enumerate(classes):
                assert roc_auc_score(y == k, proba[:, k]) == pytest.approx(auc[f"plane={c}"], abs=1e-9)
            checked.append(target)
            continue
        else:
            continue
        if y.all() or not y.any():
            continue  # no AUC on val for this target
        assert roc_auc_score(y, logits(target)[labelled, 0]) == pytest.approx(auc[target], abs=1e-9), target
        checked.append(target)
    assert "sex" in checked and "plane" in checked and sum(t.startswith("structure=") for t in checked) >= 5


def test_an_evaluate_run_without_weights_says_how_to_get_them(built):
    path = built["dirs"]["evaluate"] / "probe_weights.parquet"
    aside = built["tmp"] / "probe_weights.parquet.aside"
    shutil.move(path, aside)
    try:
        site = build_site(Registry(built["registry"]), "demo", built["tmp"] / "site-old").path
    finally:
        shutil.move(aside, path)
    for i in built["pages"][:5]:
        parsed, raw = _page(site, i)
        assert "probe-weights" not in parsed.tables
        text = _section_text(raw, "probes")
        assert "predates stored probe weights" in text and "medsae exp run SPEC --force evaluate" in text


def test_a_truncated_metrics_json_does_not_abort_the_build(built):
    """The probes' AUCs come from the registry's metrics rows: a damaged metrics.json leaves the pages as they were."""
    path = built["dirs"]["evaluate"] / "metrics.json"
    original = path.read_text()
    auc = {
        m["target"]: m["value"] for m in json.loads(original) if m["name"] == "probe_auc_sparse" and m["split"] == "val"
    }
    table = pd.read_parquet(built["dirs"]["evaluate"] / "probe_weights.parquet")
    path.write_text(original[: len(original) // 2])
    try:
        site = build_site(Registry(built["registry"]), "demo", built["tmp"] / "site-truncated").path
    finally:
        path.write_text(original)
    shown = 0
    for i in built["pages"]:
        parsed, raw = _page(site, i)
        mine = table[table["latent"] == i]
        mine = mine.iloc[np.argsort(-mine["weight"].abs().to_numpy(), kind="stable")]
        rows = parsed.tables.get("probe-weights", [])
        assert len(rows) == len(mine)
        for (cells, _), rec in zip(rows, mine.to_dict("records"), strict=True):
            key = rec["target"] if rec["negative"] else f"{rec['target']}={rec['positive']}"
            if auc.get(key) is None:
                assert cells[4] == "—"
            else:
                assert float(cells[4]) == pytest.approx(auc[key], **SHOWN)
                shown += 1
        if rows:
            assert "probe AUC (val)" in raw  # the split the AUCs are from
    assert shown > 0  # AUCs are on the pages although the file could not be read


def test_top_k_breaks_ties_by_lower_latent():
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 4, size=(20, 30)).astype(float)  # many ties
    cols, vals = top_k(scores, 6, offset=10)  # rows are latents 10..29
    for r in range(20):
        candidates = [j for j in range(30) if j != 10 + r]
        expected = sorted(candidates, key=lambda j: (-scores[r, j], j))[:6]
        assert cols[r].tolist() == expected
        assert vals[r].tolist() == [scores[r, j] for j in expected]


def test_hostile_neighbour_text_stays_text(built):
    from medsae.report.site.build import _environment

    extras = LatentExtras(
        decoder=Neighbours(np.array([[1, 2]]), np.array([[0.9, 0.5]])),
        texts={1: PWN},
        pages={0, 1},
        notes={"coactivation": "co-activation neighbours unavailable: " + PWN, "probes": PWN},
    )
    row = {"latent": 0, "status": "live", "frequency": 0.1, "n_active": 3, "n_patients": 2, "max_act": 1.0}
    raw = (
        _environment()
        .get_template("site_latent.html.j2")
        .render(
            exp={"name": "demo"},
            fmt=lambda v, d=4: "" if v is None else f"{v:.{d}g}",
            row=row | {"structure": None},
            headline=None,
            versions=[],
            groups=[],
            legend=(),
            hist_img=None,
            hist=None,
            grounding=None,
            gap_words=[],
            prev=None,
            next=1,
            thumb_note=None,
            extras=extras.page(0),
        )
    )
    parsed = _Tables()
    parsed.feed(raw)
    assert parsed.scripts == 0 and "<script>" not in raw and 'onerror="' not in raw
    rows = parsed.tables["decoder-neighbours"]
    assert rows[0][0][2] == PWN and rows[0][1] == "1.html"  # the hostile text is the cell's text
    assert rows[1][1] is None and rows[1][0][0].strip() == "2"  # no page for latent 2: no link
    assert _section_text(raw, "probes").count("window.__pwned") == 2


def test_weights_table_names_each_column_by_the_class_it_scores():
    from medsae.eval.logreg import LogRegFit
    from medsae.eval.probe_weights import weights_table
    from medsae.eval.probes import ProbeResult, Target
    from medsae.eval.study_probes import GroupProbe
    from medsae.eval.targets import StudyGroup

    def fit(coef: list[list[float]], multinomial: bool = False) -> LogRegFit:
        c = np.array(coef, dtype=float)
        return LogRegFit(c, np.arange(c.shape[1], dtype=float) + 0.5, multinomial, 10, True)

    sex = Target("sex", "sex", ["m", "f"], np.zeros(3, np.int64))
    plane = Target("plane", "plane", ["axial", "coronal", "sagittal"], np.zeros(3, np.int64))
    batched = fit([[0.0, 2.0], [-1.0, 0.0], [0.0, 0.0]])  # two binary targets fitted as one batch
    results = [
        ProbeResult(sex, "sparse", batched, 1, 10, 3),
        ProbeResult(plane, "sparse", fit([[1.0, 0.0, -3.0], [0.0, 0.0, 0.0], [0.0, 4.0, 0.0]], True), None, 10, 3),
        ProbeResult(sex, "dense", batched, 1, 10, 3),  # dense features are not latents: left out
    ]
    # study: an institute group whose training rows held classes 0 and 2 only -> one binary column
    inst = StudyGroup("institute", "multiclass", ["A", "B", "C"], np.zeros(3, np.int64))
    groups = [GroupProbe(inst, "sparse", fit([[0.0], [0.0], [-7.0]]), np.array([0, 2]), 10, 3)]
    got = weights_table(results, groups)
    rows = [
        (r.target, r.column, r.positive, r.negative, r.multinomial, r.latent, r.weight, r.intercept)
        for r in got.itertuples()
    ]
    assert rows == [
        ("sex", 0, "f", "m", False, 0, 2.0, 1.5),
        ("plane", 0, "axial", "", True, 0, 1.0, 0.5),
        ("plane", 1, "coronal", "", True, 2, 4.0, 1.5),
        ("plane", 2, "sagittal", "", True, 0, -3.0, 2.5),
        ("institute", 0, "C", "A", False, 2, -7.0, 0.5),
    ]
    assert weights_table().empty and list(weights_table().columns) == list(got.columns)


def test_study_protocol_weights_agree_with_its_coefficient_tables(tmp_path):
    """Under ``eval.protocol: study`` the stage also writes the group tables the study ranks latents by
    (mean |coef| over a group's classes); the persisted weights must give the same numbers."""
    from test_eval_stage import write_artifacts

    from medsae.eval.config import EvalSpec
    from medsae.eval.stage import run_evaluate
    from medsae.stage import StageContext

    write_artifacts(tmp_path, n_scans=12, per_scan=12)
    out = tmp_path / "out"
    out.mkdir()
    off = dict(recovery=False, monosemanticity=False, retrieval=False, plots=False)
    ctx = StageContext(
        kind="evaluate",
        key="k" * 64,
        out_dir=out,
        work_dir=tmp_path / "work",
        inputs={k: tmp_path / k for k in ("slices", "embed", "train", "encode")},
        input_keys={},
        seed=0,
        quiet=True,
        spec=EvalSpec(protocol="study", probe_max_iter=100, **off),
    )
    run_evaluate(ctx)
    weights = pd.read_parquet(out / "probe_weights.parquet")
    tables = pd.read_parquet(out / "coefficients_sparse.parquet")
    assert len(weights) and len(tables)
    for group, table in tables.groupby("group"):
        mine = weights[weights["target"] == group]
        n_columns = mine["column"].nunique()  # every column of these small fits has a non-zero weight
        mean_abs = mine.assign(m=mine["weight"].abs()).groupby("latent")["m"].sum() / n_columns
        for latent, importance in zip(table["latent"], table["importance"], strict=True):
            assert mean_abs.get(latent, 0.0) == pytest.approx(importance, rel=1e-12, abs=1e-15), (group, latent)


async def _click_through(port: int, page_path: Path, shot: Path) -> dict[str, Any]:
    async with open_page(port, page_path) as page:
        cells = (
            "(id) => Array.from(document.querySelectorAll(`#${id} tr`)).slice(1)"
            ".map(r => r.cells[0].textContent.trim())"
        )
        out: dict[str, Any] = {
            name: await page.eval(f"({cells})('{name}')")
            for name in ("decoder-neighbours", "coactivation-neighbours", "probe-weights")
        }
        await page.screenshot("#probes", shot.with_name(shot.stem + "-probes.png"))
        await page.screenshot("#neighbours", shot)
        errors, requests = page.console_errors(), page.requests()
        page.events.clear()
        await page.eval("document.querySelector('#decoder-neighbours a').click()")
        await page.wait_event("Page.loadEventFired")
        out["title"] = await page.eval("document.title")
        out["errors"] = errors + page.console_errors()
        out["requests"] = [u for u in requests + page.requests() if not u.startswith("file:")]
        return out


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed (apt-get install -y chromium)")
def test_panels_in_headless_chromium(built, tmp_path):
    """The panels render under the page's CSP with no console error or request, and a neighbour link opens its page."""
    latent = max(
        built["pages"], key=lambda i: len(_page(built["site"], i)[0].tables.get("coactivation-neighbours", []))
    )
    tables = _page(built["site"], latent)[0].tables
    with devtools_port(tmp_path / "profile") as port:
        shot = screenshot_dir() / "latent-neighbours.png"
        page = built["site"] / "latents" / f"{latent}.html"
        result = asyncio.run(_click_through(port, page, shot))
    assert result["errors"] == [] and result["requests"] == []
    for name in ("decoder-neighbours", "coactivation-neighbours", "probe-weights"):
        assert result[name] == [cells[0].strip() for cells, _ in tables.get(name, [])]
    assert len(result["decoder-neighbours"]) == 8 and result["coactivation-neighbours"]
    assert result["title"] == f"latent {result['decoder-neighbours'][0]} · demo"
