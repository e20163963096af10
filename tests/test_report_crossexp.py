"""Cross-experiment views of the explorer: latents matched by decoder cosine (``--compare``), explainers side by side.

Real experiments on the small grounded phantom of tests/test_report_grounding.py (its slices, embed,
train and encode stages are shared: later builds resume them): ``xa`` (explained by the offline
``medsae/baseline``), ``xb`` (the same but a different SAE seed: only train onwards run again) and
``xa-twin`` (``xa`` explained by a second model, served by the local OpenAI-compatible server of
tests/llm_server.py, which also slips markup into one explanation). Expectations are recomputed
independently: decoder rows read with ``safetensors.numpy`` and numpy, per-model means with SQL.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pandas as pd
import pytest
from llm_server import ScriptedLLMServer, logprob_handler, task_of
from safetensors.numpy import load_file
from scipy.optimize import linear_sum_assignment
from test_ground_stage import small_spec
from test_report_grounding import grounded_run

from medsae.errors import MedsaeError
from medsae.plan import plan_experiment, run_plans
from medsae.registry import Registry
from medsae.report.site.build import build_site
from medsae.report.site.crossexp import match_latents
from medsae.spec import parse_specs

RUN = {"slices", "embed", "train", "encode", "summarize", "interpret"}
HOSTILE = "<img src=x onerror=alert(1)>"


def twin_answer(request: dict) -> str:
    """A second explainer: the baseline's rules naming only the most enriched term, plus a hostile tag."""
    from medsae.interp.llm import rule_model

    messages = request["messages"]
    if not task_of(request).startswith("explain"):
        return rule_model.handle(messages, {})
    examples = [
        (int(m.group(2)), rule_model.parse_line(m.group(3))["terms"])
        for m in rule_model._EXAMPLE.finditer(rule_model._last_user(messages))
    ]
    chosen = rule_model.enriched_terms(examples)[:1]
    if not chosen:
        return "EXPLANATION: nothing fires here."
    return f"EXPLANATION: {rule_model.sentence([chosen[0][0]])} {HOSTILE}"


def _spec(tmp: Path, name: str, **interpret: Any) -> dict:
    raw = small_spec(tmp)  # the grounded run's spec: same slices/embed/train/encode/ground keys
    raw["name"] = name
    raw["interpret"] = {"min_active": 3, "min_patients": 2, "max_latents": 8, "shuffled_fraction": 0.0, **interpret}
    return raw


def _run(raw: dict, registry: Registry) -> None:
    run_plans([plan_experiment(parse_specs(raw)[0])], registry, only=RUN, quiet=True)


def _fabricate(tmp: Path, registry: Registry, name: str, spec: dict, d_in: int, embed: dict | None = None) -> None:
    """A registered experiment ``name`` whose only stage is a trained (untrained-weight) SAE reading ``d_in``.

    ``embed``: also an embed stage row with these parameters (what the registry records as resolved).
    """
    from medsae.sae.checkpoint import save_sae
    from medsae.sae.config import SAESpec
    from medsae.sae.models import SAE, SAEConfig

    folder = save_sae(SAE(SAEConfig.from_spec(SAESpec(d_sae=32, k=4), d_in=d_in)), tmp / f"{name}-train")
    registry.insert(
        "experiments",
        [{"experiment_id": f"{name}-id", "name": name, "spec_json": json.dumps(spec), "spec_hash": name}],
    )
    registry.insert("experiment_stages", [{"experiment_id": f"{name}-id", "kind": "train", "stage_key": f"{name}-t"}])
    registry.insert(
        "stages",
        [
            {
                "stage_key": f"{name}-t",
                "kind": "train",
                "code_version": "test",
                "params_json": "{}",
                "status": "done",
                "artifact_dir": str(folder),
            }
        ],
    )
    if embed is not None:
        registry.insert(
            "experiment_stages", [{"experiment_id": f"{name}-id", "kind": "embed", "stage_key": f"{name}-e"}]
        )
        params = json.dumps(embed)
        row = {
            "stage_key": f"{name}-e",
            "kind": "embed",
            "code_version": "test",
            "params_json": params,
            "status": "done",
        }
        registry.insert("stages", [row])


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Any]:
    tmp, _, registry = grounded_run(tmp_path_factory)
    _run(_spec(tmp, "xa"), registry)
    other_seed = _spec(tmp, "xb")
    other_seed["sae"]["seed"] = 1
    other_seed["ground"]["enabled"] = False  # its own SAE would need its own ground stage: not needed here
    _run(other_seed, registry)
    with ScriptedLLMServer(logprob_handler(twin_answer), lifetime_s=1800.0) as server:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("OPENAI_API_KEY", "sk-medsae-test-dummy-key")
            _run(_spec(tmp, "xa-twin", explainer_model="openai/twin", explainer_api_base=server.url), registry)
    _fabricate(tmp, registry, "xwide", _spec(tmp, "xwide"), d_in=16)  # same backbone name, other dimension
    other_backbone = _spec(tmp, "xvit")
    other_backbone["embed"].update(source="transformers", model="facebook/dinov2-small")
    _fabricate(tmp, registry, "xvit", other_backbone, d_in=1280)  # same dimension, another backbone
    out = tmp_path_factory.mktemp("crossexp") / "site"
    summary = build_site(registry, "xa", out, n_slices=2, compare_with=["xb", "xa"])
    return {"tmp": tmp, "registry": registry, "site": summary.path}


def _sql(registry: Registry, sql: str, params: list | None = None) -> list[tuple]:
    with duckdb.connect(str(registry.path), read_only=True) as con:
        return con.execute(sql, params or []).fetchall()


def _stage(registry: Registry, name: str, kind: str) -> tuple[str, str]:
    """(stage_key, artifact_dir) of the experiment's stage."""
    return _sql(
        registry,
        """SELECT s.stage_key, s.artifact_dir FROM experiments e JOIN experiment_stages es USING (experiment_id)
           JOIN stages s ON s.stage_key = es.stage_key WHERE e.name = ? AND es.kind = ?""",
        [name, kind],
    )[0]


def _unit_decoder(registry: Registry, name: str) -> np.ndarray:
    folder = Path(_stage(registry, name, "train")[1])
    if not folder.is_absolute():
        folder = registry.path.parent / folder
    w = load_file(str(folder / "sae.safetensors"))["W_dec"].astype(np.float64)  # [d_sae, d_in], SAELens layout
    return w / np.linalg.norm(w, axis=1, keepdims=True)


class _Tables(HTMLParser):
    """Rows (cell texts, and the hrefs and data-value attributes inside them) of each table, by section id."""

    def __init__(self) -> None:
        super().__init__()
        self.section: str | None = None
        self.rows: dict[str, list[dict]] = {}
        self.row: dict | None = None
        self.cell: list[str] | None = None
        self.scripts = 0
        self.csp = ""
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "section":
            self.section = a.get("id")
        elif tag == "tr":
            self.row = {"cells": [], "hrefs": [], "values": []}
        elif tag == "td" and self.row is not None:
            self.cell = []
            if "data-value" in a:
                self.row["values"].append(float(a["data-value"]))
        elif tag == "a":
            self.links.append(a["href"])
            if self.row is not None:
                self.row["hrefs"].append(a["href"])
        elif tag == "script":
            self.scripts += 1
        elif tag == "meta" and a.get("http-equiv") == "Content-Security-Policy":
            self.csp = a["content"]
        elif self.cell is not None:  # markup inside a cell: hostile text must never get here
            self.cell.append(f"<{tag}>")

    def handle_endtag(self, tag):
        if tag == "td" and self.row is not None and self.cell is not None:
            self.row["cells"].append("".join(self.cell).strip())
            self.cell = None
        elif tag == "tr" and self.row is not None:
            if self.row["cells"]:
                self.rows.setdefault(self.section or "", []).append(self.row)
            self.row = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell.append(data)


def _parse(path: Path) -> _Tables:
    page = _Tables()
    page.feed(path.read_text(encoding="utf-8"))
    return page


def test_an_experiment_compared_with_itself_matches_every_latent_to_itself(runs):
    page = _parse(runs["site"] / "compare" / "xa.html")
    pairs = page.rows["pairs"]
    d_sae = len(_unit_decoder(runs["registry"], "xa"))
    assert len(pairs) == d_sae
    assert sorted(int(r["cells"][1]) for r in pairs) == list(range(d_sae))
    for r in pairs:
        assert int(r["cells"][1]) == int(r["cells"][4])  # A latent == B latent
        assert r["values"][0] == pytest.approx(1.0, abs=1e-5)


def test_pair_cosines_equal_numpy_on_the_checkpoints(runs):
    reg = runs["registry"]
    a, b = _unit_decoder(reg, "xa"), _unit_decoder(reg, "xb")
    cos = a @ b.T
    page = _parse(runs["site"] / "compare" / "xb.html")
    pairs = page.rows["pairs"]
    got = [(int(r["cells"][1]), int(r["cells"][4]), r["values"][0]) for r in pairs]
    assert len(got) == min(cos.shape) and len({x for x, _, _ in got}) == len({y for _, y, _ in got}) == len(got)
    for x, y, value in got:
        assert value == pytest.approx(cos[x, y], abs=1e-5)
    assert [v for _, _, v in got] == sorted((v for _, _, v in got), reverse=True)  # highest cosine first
    rows, cols = linear_sum_assignment(-cos)  # the optimum one-to-one total
    assert sum(v for _, _, v in got) == pytest.approx(cos[rows, cols].sum(), abs=1e-4)
    assert 0.0 < np.median(cos[rows, cols]) < 0.999  # another seed: related, not the same SAE
    # summary: pairs above each level, median
    text = (runs["site"] / "compare" / "xb.html").read_text()
    values = np.array([v for _, _, v in got])
    for level in (0.9, 0.7, 0.5):
        assert f'data-level="{level}" data-value="{int((values >= level).sum())}"' in text
    assert f'id="median-cosine" data-value="{float(np.median(values))!r}"' in text
    # links go to A's latent pages; frequencies and explanations are each experiment's own
    b_key = _stage(reg, "xb", "summarize")[0]
    freq_b = dict(_sql(reg, "SELECT latent, frequency FROM latents WHERE stage_key = ?", [b_key]))
    for r in pairs:
        assert r["hrefs"][0] == f"../latents/{int(r['cells'][1])}.html"
        shown, expected = r["cells"][5], freq_b.get(int(r["cells"][4]))
        assert (shown == "") if expected is None else float(shown) == pytest.approx(expected, rel=6e-3, abs=1e-12)
    texts_b = dict(  # B's headline: its best-scored LLM explanation (one per latent in this run)
        _sql(
            reg,
            """SELECT e.latent, arg_max(e.text, s.value)
               FROM explanations e JOIN explanation_scores s USING (explanation_id)
               WHERE e.stage_key = ? AND e.kind = 'explanation' AND e.text IS NOT NULL
                 AND s.method = 'pearson' AND s.value IS NOT NULL
               GROUP BY e.latent""",
            [b_key],
        )
    )
    shown_b = {int(r["cells"][4]): r["cells"][6] for r in pairs}
    assert texts_b and all(shown_b[latent].startswith(text) for latent, text in texts_b.items())


def test_explainers_page_means_equal_sql(runs):
    reg = runs["registry"]
    key = _stage(reg, "xa", "summarize")[0]
    per = _sql(
        reg,
        """SELECT e.explainer_model, e.latent, max(s.value) AS v
           FROM explanations e JOIN explanation_scores s USING (explanation_id)
           WHERE e.stage_key = ? AND e.kind = 'explanation' AND e.text IS NOT NULL
                 AND s.method = 'pearson' AND s.value IS NOT NULL
             AND s.value IS NOT NULL AND coalesce(s.extra_json, '') NOT LIKE '%"degenerate":%'
           GROUP BY ALL""",
        [key],
    )
    scores: dict[str, dict[int, float]] = {}
    for model, latent, v in per:
        scores.setdefault(model, {})[latent] = v
    assert sorted(scores) == ["medsae/baseline", "openai/twin"]
    page = _parse(runs["site"] / "explainers.html")
    summary = page.rows["explainer-summary"]
    means = {r["cells"][0]: (int(r["cells"][1]), r["values"][0]) for r in summary if len(r["cells"]) == 3}
    for model, by_latent in scores.items():
        assert means[model][0] == len(by_latent)
        assert means[model][1] == pytest.approx(np.mean(list(by_latent.values())), abs=1e-12)
    both = sorted(set(scores["medsae/baseline"]) & set(scores["openai/twin"]))
    x = np.array([scores["medsae/baseline"][lat] for lat in both])
    y = np.array([scores["openai/twin"][lat] for lat in both])
    pair = next(r for r in summary if len(r["cells"]) == 8)
    assert (pair["cells"][0], pair["cells"][1], int(pair["cells"][2])) == ("medsae/baseline", "openai/twin", len(both))
    diff, r_value = pair["values"]
    assert diff == pytest.approx((x - y).mean(), abs=1e-12)
    assert r_value == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-9)
    assert float(pair["cells"][6].rstrip("%")) == pytest.approx(100 * (x > y).mean(), abs=0.5)
    assert float(pair["cells"][7].rstrip("%")) == pytest.approx(100 * (x == y).mean(), abs=0.5)
    rows = page.rows["explainer-rows"]
    assert set(both) <= {int(r["cells"][0]) for r in rows}
    assert all(r["hrefs"] == [f"latents/{int(r['cells'][0])}.html"] for r in rows)


def test_index_links_the_views_and_pages_stay_script_free(runs):
    site = runs["site"]
    index = _parse(site / "index.html")
    assert {"compare/xb.html", "compare/xa.html", "explainers.html"} <= set(index.links)
    for path in (site / "explainers.html", site / "compare" / "xb.html"):
        page = _parse(path)
        assert page.scripts == 0 and "script-src 'none'" in page.csp and "default-src 'none'" in page.csp
        raw = path.read_text(encoding="utf-8")
        assert "<img src=x" not in raw
    twin_cells = [c for r in _parse(site / "explainers.html").rows["explainer-rows"] for c in r["cells"]]
    assert any(HOSTILE in c for c in twin_cells)  # shown as text, no element parsed inside the cell
    assert not any("<img>" in c for c in twin_cells)


def test_greedy_matching_recovers_a_permutation():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((300, 24))
    perm = rng.permutation(300)
    b = a[perm] + 0.01 * rng.standard_normal((300, 24))  # B latent j is A latent perm[j]
    inverse = np.argsort(perm)
    for cells in (10**9, 0):  # exact assignment, then the greedy matching
        m = match_latents(a, b, chunk=64, hungarian_max_cells=cells)
        assert len(m.pairs_a) == 300 and (m.pairs_b == inverse[m.pairs_a]).all()
        assert ("greedy" in m.method) == (cells == 0)
        assert (m.best_b == inverse).all()
    wide = match_latents(a[:40], b, chunk=16)  # rectangular: every A latent gets a partner
    assert sorted(wide.pairs_a.tolist()) == list(range(40)) and (wide.pairs_b == inverse[wide.pairs_a]).all()
    # unrelated directions in 8 dimensions: the greedy pass leaves latents whose 8 candidates were taken,
    # which are then assigned exactly among the rest: still one-to-one and complete, never above the optimum
    x, y = rng.standard_normal((60, 8)), rng.standard_normal((60, 8))
    m = match_latents(x, y, chunk=16, hungarian_max_cells=60 * 60 - 1)
    assert "left then assigned" in m.method
    assert sorted(m.pairs_a.tolist()) == sorted(m.pairs_b.tolist()) == list(range(60))
    cos = (x / np.linalg.norm(x, axis=1, keepdims=True)) @ (y / np.linalg.norm(y, axis=1, keepdims=True)).T
    assert np.allclose(m.pairs_cos, cos[m.pairs_a, m.pairs_b], atol=1e-5)
    rows, cols = linear_sum_assignment(-cos)
    assert m.pairs_cos.sum() <= cos[rows, cols].sum() + 1e-4


def test_same_backbone_name_but_another_embedding_space_is_refused(runs, tmp_path):
    """The check reads the embed stage's recorded parameters, not only the model name written in the spec."""
    registry, tmp = runs["registry"], runs["tmp"]
    key = _stage(registry, "xa", "embed")[0]
    recorded = json.loads(_sql(registry, "SELECT params_json FROM stages WHERE stage_key = ?", [key])[0][0])
    assert recorded["pooling"] == "mean" and recorded["pretrained"] is True
    # the spec is xa's own, word for word; only the recorded embed stage pooled otherwise
    _fabricate(tmp, registry, "xpool", _spec(tmp, "xpool"), d_in=1280, embed={**recorded, "pooling": "cls"})
    random_init = _spec(tmp, "xrand")
    random_init["embed"]["pretrained"] = False  # same model name, random weights
    _fabricate(tmp, registry, "xrand", random_init, d_in=1280)
    out = tmp_path / "site"
    for other, why in (("xpool", "pooling: 'mean' vs 'cls'"), ("xrand", "pretrained: True vs False")):
        with pytest.raises(MedsaeError, match=rf"^compare xa with {other}: .*different backbones") as err:
            build_site(registry, "xa", out, compare_with=[other])
        assert "\n" not in str(err.value) and why in str(err.value), str(err.value)
    assert not out.exists()


def test_a_default_model_left_implicit_matches_one_written_out(runs):
    """``source: efficientnet_lite0`` without ``model`` resolves to the model xa names explicitly."""
    from medsae.report import gather
    from medsae.report.site import crossexp

    registry, tmp = runs["registry"], runs["tmp"]
    implicit = _spec(tmp, "ximplicit")
    assert implicit["embed"].pop("model") == "efficientnet_lite0" == implicit["embed"]["source"]
    _fabricate(tmp, registry, "ximplicit", implicit, d_in=1280)
    changed = _spec(tmp, "xsize")
    changed["embed"].pop("model")
    changed["embed"]["input_size"] = 128  # and one that differs in an embedding-space field is refused
    _fabricate(tmp, registry, "xsize", changed, d_in=1280)
    with registry.read() as con:
        a = crossexp.Side.from_frames(gather.load_experiment(con, "xa"), pd.DataFrame(), pd.DataFrame(), {})
        same, other = crossexp.load_other(con, "ximplicit"), crossexp.load_other(con, "xsize")
    w = np.zeros((4, 1280), np.float32)
    crossexp.check_same_space(a, same, w, w)  # no error
    with pytest.raises(MedsaeError, match=r"different backbones \(input_size: 96 vs 128\)"):
        crossexp.check_same_space(a, other, w, w)


def test_mismatched_dimensions_are_one_line_through_the_cli(runs, tmp_path):
    env = dict(os.environ, MEDSAE_QUIET="1")
    out = tmp_path / "site"
    args = [sys.executable, "-m", "medsae.cli.main", "report", "xa", "-o", str(out), "--compare", "xwide"]
    proc = subprocess.run(
        [*args, "--registry", str(runs["registry"].path)], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "different dimensions (1280 vs 16)" in lines[0], proc.stderr
    assert not out.exists() and not list(tmp_path.glob(".site.building-*"))  # nothing half-written
    with pytest.raises(MedsaeError, match=r"^compare xa with xvit: .*different backbones") as err:
        build_site(runs["registry"], "xa", out, compare_with=["xvit"])
    assert "\n" not in str(err.value)
    with pytest.raises(MedsaeError, match="no experiment named 'nope'"):
        build_site(runs["registry"], "xa", out, compare_with=["nope"])
    assert not out.exists()
