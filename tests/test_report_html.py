"""The HTML report built from a fabricated registry: content, order, escaping, errors.

The registry is a real DuckDB file filled through ``Registry.insert`` with rows shaped like the
stages write them; expectations are recomputed in the test from the inserted rows with numpy.
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from medsae.data.config import DataSpec, PhantomSpec
from medsae.data.stage import run_slices
from medsae.errors import MedsaeError
from medsae.registry import Registry
from medsae.report.build import build_report
from medsae.report.names import FVU, L0, R2
from medsae.stage import StageContext

PWN = "<script>window.__pwned = 1; document.title = 'pwned';</script>"
PWN_IMG = '<img src=x onerror="window.__pwned = 2">'
N_LATENTS = 40
DEAD = {3, 17, 29}


def _same_keys(rows: list[dict]) -> list[dict]:
    """Give every row every column (pyarrow infers the schema from the first row only)."""
    cols = list(dict.fromkeys(k for r in rows for k in r))
    return [{c: r.get(c) for c in cols} for r in rows]


def real_slices(root: Path, out_dir: Path) -> dict:
    """Run the real slices stage on a tiny phantom; returns its registry tables (pyarrow)."""
    spec = DataSpec(root=str(root / "phantom"), phantom=PhantomSpec(subjects=3, shape=(32, 32, 40)), size=64)
    out_dir.mkdir(parents=True, exist_ok=True)
    ctx = StageContext(
        kind="slices",
        key=out_dir.name,
        spec=spec,
        out_dir=out_dir,
        work_dir=root / "work",
        inputs={},
        input_keys={},
        seed=0,
        quiet=True,
    )
    (root / "work").mkdir(parents=True, exist_ok=True)
    return run_slices(ctx).tables


def fabricate(root: Path) -> dict:
    """A registry with a 3-point sweep; the first experiment has every stage's rows.

    The slices (rows and artifact) come from the real slices stage on a tiny phantom; the rest is
    fabricated. Returns what the test needs to recompute expectations.
    """
    rng = np.random.default_rng(7)
    reg = Registry(root / "registry.duckdb")
    art = root / "artifacts"
    keys = {
        k: f"{k}-key-0000000000" for k in ("slices", "embed", "train", "encode", "evaluate", "summarize", "interpret")
    }
    dirs = {k: art / k / key for k, key in keys.items()}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    tables = real_slices(root, dirs["slices"])
    for table in ("slices", "slice_structures"):
        t = tables[table]
        reg.insert(
            table,
            t.append_column("slices_key", pa.array([keys["slices"]] * t.num_rows)),
            ignore_conflicts=False,
        )
    n_slices = tables["slices"].num_rows
    experiments, exp_stages, stage_rows, metric_rows = [], [], [], []
    for i, k in enumerate((8, 4, 16)):
        name = f"demo@k={k}"
        spec = {"name": name, "description": "fabricated <b>demo</b>", "sae": {"arch": "topk", "k": k}}
        experiments.append(
            {
                "experiment_id": f"exp{i}",
                "name": name,
                "spec_json": json.dumps(spec),
                "spec_hash": f"h{i}",
                "sweep_name": "demo",
                "git_commit": "abc123",
                "versions_json": json.dumps({"torch": "2.x"}),
                "host_json": json.dumps({"cpu": "test"}),
            }
        )
        for kind in keys:
            key = keys[kind] if i == 0 else f"{kind}-key-{i}"
            exp_stages.append({"experiment_id": f"exp{i}", "kind": kind, "stage_key": key})
            stage_rows.append(
                {
                    "stage_key": key,
                    "kind": kind,
                    "code_version": "1",
                    "params_json": "{}",
                    "status": "done",
                    "artifact_dir": str(dirs[kind]) if i == 0 else None,
                    "seconds": 1.5 + i,
                    "device": "cpu",
                }
            )
        ev = keys["evaluate"] if i == 0 else f"evaluate-key-{i}"
        for split in ("val", "test"):
            metric_rows += [
                {"stage_key": ev, "split": split, "name": FVU, "value": 0.3 / k},
                {"stage_key": ev, "split": split, "name": R2, "value": 1 - 0.2 / k},
                {"stage_key": ev, "split": split, "name": L0, "value": float(k)},
            ]
            for n in (1, 2, 5, 10):  # a decoy curve over K that is not a recovery curve
                metric_rows.append(
                    {
                        "stage_key": ev,
                        "split": split,
                        "name": "fingerprint_quality_sparse",
                        "n_features": n,
                        "value": 0.1,
                    }
                )
            for target, slope in (("modality", 0.5), ("plane", 0.8)):
                metric_rows.append(
                    {
                        "stage_key": ev,
                        "split": split,
                        "name": "probe_auc_dense",
                        "target": target,
                        "value": 0.9,
                    }
                )
                for n in (1, 2, 5, 10):
                    metric_rows.append(
                        {
                            "stage_key": ev,
                            "split": split,
                            "name": "recovery",
                            "target": target,
                            "n_features": n,
                            "value": 1 - slope / n,
                        }
                    )
            for n in (1, 2, 5, 10):
                metric_rows.append(
                    {
                        "stage_key": ev,
                        "split": split,
                        "name": "recovery_mean",
                        "n_features": n,
                        "value": 1 - 0.65 / n,
                    }
                )
    reg.insert("experiments", experiments)
    reg.insert("experiment_stages", exp_stages)
    reg.insert("stages", stage_rows)
    reg.insert("metrics", _same_keys(metric_rows), ignore_conflicts=False)

    freq = rng.uniform(0.01, 0.4, N_LATENTS)
    freq[list(DEAD)] = 0.0
    latents = [
        {
            "stage_key": keys["summarize"],
            "sae_key": keys["train"],
            "latent": j,
            "frequency": float(freq[j]),
            "n_active": int(freq[j] * n_slices),
            "n_patients": 3,
            "mean_act": float(rng.uniform(1, 2)),
            "max_act": float(rng.uniform(2, 5)),
            "status": "dead" if j in DEAD else "live",
        }
        for j in range(N_LATENTS)
    ]
    reg.insert("latents", latents)
    sets = []
    for j in range(N_LATENTS):
        if j in DEAD:
            continue
        ids = rng.choice(n_slices, size=10, replace=False)
        acts = np.r_[rng.uniform(0.5, 5, 8), 0.0, 0.0]
        sets.append(
            {
                "set_id": f"set{j}",
                "stage_key": keys["summarize"],
                "latent": j,
                "purpose": "explain",
                "slice_ids": ids.tolist(),
                "activations": acts.tolist(),
                "roles": ["top"] * 8 + ["negative"] * 2,
            }
        )
    reg.insert("example_sets", sets)
    explanations, scores = [], []
    live = [j for j in range(N_LATENTS) if j not in DEAD]
    for j in live:
        for model in ("medsae/baseline", "openai/gpt-test"):
            eid = f"e-{j}-{model}"
            text = f"liver slices {j} seen by {model}"
            if j == live[0] and model == "openai/gpt-test":
                text = f"liver {PWN} {PWN_IMG}"
            explanations.append(
                {
                    "explanation_id": eid,
                    "stage_key": keys["summarize"],
                    "sae_key": keys["train"],
                    "latent": j,
                    "explainer_model": model,
                    "template_hash": "t" * 64,
                    "text": text,
                    "status": "ok",
                    "kind": "explanation",
                }
            )
            for method in ("pearson", "auroc"):
                scores.append(
                    {
                        "score_id": f"s-{eid}-{method}",
                        "explanation_id": eid,
                        "method": method,
                        "scorer_model": "medsae/baseline",
                        "value": float(rng.uniform(0, 1)),
                        "n": 40,
                        "chance": 0.0 if method == "pearson" else 0.5,
                        "ci_low": 0.0,
                        "ci_high": 1.0,
                    }
                )
        bid = f"b-{j}"
        explanations.append(
            {
                "explanation_id": bid,
                "stage_key": keys["summarize"],
                "sae_key": keys["train"],
                "latent": j,
                "explainer_model": "baseline",
                "template_hash": "-",
                "text": f"explanation of latent {(j + 1) % N_LATENTS}",
                "status": "baseline",
                "kind": "other_latent",
            }
        )
        scores.append(
            {
                "score_id": f"s-{bid}",
                "explanation_id": bid,
                "method": "pearson",
                "scorer_model": "medsae/baseline",
                "value": float(rng.uniform(-0.2, 0.2)),
                "n": 40,
            }
        )
    reg.insert("explanations", explanations)
    reg.insert("explanation_scores", _same_keys(scores))
    return {
        "registry": reg,
        "latents": latents,
        "explanations": explanations,
        "scores": scores,
        "keys": keys,
        "pwned_latent": live[0],
        "slices": tables["slices"].to_pandas().set_index("slice_id"),
        "structures": tables["slice_structures"].to_pandas(),
        "sets": {r["latent"]: r for r in sets},
    }


class _Cards(HTMLParser):
    """Collect latent cards in document order (with their figures), <script> elements and images."""

    def __init__(self) -> None:
        super().__init__()
        self.cards: list[int] = []
        self.figures: dict[int, list[dict]] = {}
        self.scripts = 0
        self.imgs: list[str] = []
        self._figure: dict | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "article" and "latent-card" in (a.get("class") or ""):
            self.cards.append(int(a["data-latent"]))
            self.figures[self.cards[-1]] = []
        elif tag == "figure" and self.cards and "title" in a:
            self._figure = {"title": a["title"], "src": None, "text": ""}
            self.figures[self.cards[-1]].append(self._figure)
        elif tag == "script":
            self.scripts += 1
        elif tag == "img":
            self.imgs.append(a.get("src") or "")
            if self._figure is not None:
                self._figure["src"] = a.get("src")

    def handle_endtag(self, tag):
        if tag == "figure":
            self._figure = None

    def handle_data(self, data):
        if self._figure is not None:
            self._figure["text"] += data


@pytest.fixture(scope="module")
def fab(tmp_path_factory):
    return fabricate(tmp_path_factory.mktemp("report"))


def _parse(path: Path) -> tuple[str, _Cards]:
    text = path.read_text(encoding="utf-8")
    parser = _Cards()
    parser.feed(text)
    return text, parser


def test_cards_sorted_by_frequency_and_escaped(fab, tmp_path):
    out = build_report(fab["registry"], "demo@k=8", tmp_path / "r.html", n_latents=25)
    text, parsed = _parse(out)
    freq = np.array([r["frequency"] for r in fab["latents"]])
    expected = [int(j) for j in np.argsort(-freq, kind="stable") if freq[j] > 0][:25]
    assert parsed.cards == expected
    # one script (ours); the injected markup is text, escaped, and never raw
    assert parsed.scripts == 1
    assert "window.__pwned = 1" in html.unescape(text)
    assert PWN not in text
    assert "<img src=x" not in text
    assert "&lt;script&gt;window.__pwned = 1;" in text
    # every image is an embedded PNG (no URL that would need a network)
    assert parsed.imgs and all(src.startswith("data:image/png;base64,") for src in parsed.imgs)
    assert "https://" not in text and "http://" not in text


def test_cli_latents_zero_writes_a_report_without_cards(fab, tmp_path):
    """``--latents 0`` is a count like any other (not 'unset'); without --latents / --sort-by: 50 by frequency."""
    from typer.testing import CliRunner

    from medsae.cli.main import app

    freq = np.array([r["frequency"] for r in fab["latents"]])
    by_freq = [int(j) for j in np.argsort(-freq, kind="stable") if freq[j] > 0]
    assert len(by_freq) > 3  # a default would give cards
    for flags, expected in ((["--latents", "0"], []), (["-n", "3"], by_freq[:3]), ([], by_freq[:50])):
        out = tmp_path / f"r{len(expected)}.html"
        args = ["report", "demo@k=8", "-o", str(out), *flags, "--registry", str(fab["registry"].path)]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        assert _parse(out)[1].cards == expected, flags


def test_cards_sorted_by_best_llm_score(fab, tmp_path):
    out = build_report(fab["registry"], "demo@k=8", tmp_path / "r.html", n_latents=10, sort_by="score")
    _, parsed = _parse(out)
    kind = {e["explanation_id"]: e["kind"] for e in fab["explanations"]}
    latent = {e["explanation_id"]: e["latent"] for e in fab["explanations"]}
    best: dict[int, float] = {}
    for s in fab["scores"]:
        if s["method"] == "pearson" and kind[s["explanation_id"]] == "explanation":
            j = latent[s["explanation_id"]]
            best[j] = max(best.get(j, -np.inf), s["value"])
    expected = sorted(best, key=lambda j: (-best[j], j))[:10]
    assert parsed.cards == expected


def test_card_shows_every_explanation_version_and_slice_metadata(fab, tmp_path):
    out = build_report(fab["registry"], "demo@k=8", tmp_path / "r.html", n_latents=N_LATENTS, sort_by="latent")
    text, parsed = _parse(out)
    assert len(parsed.cards) == N_LATENTS - len(DEAD)
    card = text.split('id="latent-5"')[1].split("</article>")[0]
    assert card.count('class="expl-text"') == 3  # two LLM versions + one baseline
    assert "openai/gpt-test" in card and "baseline: other_latent" in card
    # the 8 strongest slices of the explain set, strongest first, with their registry metadata
    ex = fab["sets"][5]
    order = np.argsort(-np.asarray(ex["activations"]), kind="stable")[:8]
    figures = parsed.figures[5]
    assert len(figures) == 8
    slices, st = fab["slices"], fab["structures"]
    for fig, i in zip(figures, order, strict=True):
        sid, act = ex["slice_ids"][i], ex["activations"][i]
        row = slices.loc[sid]
        assert f"slice_uid={row['slice_uid']}" in fig["title"]
        words = " ".join(fig["text"].split())
        assert words.startswith(f"{act:.3g} top"), words
        assert f"{row['modality']} · {row['plane']}" in words
        top3 = st[st["slice_id"] == sid].sort_values(["pixels", "structure"], ascending=[False, True])
        assert ", ".join(top3["structure"].head(3)) in words
        # the thumbnail is the real rendering of the slice: a 128 px PNG
        assert fig["src"].startswith("data:image/png;base64,")
        image = Image.open(io.BytesIO(base64.b64decode(fig["src"].split(",", 1)[1])))
        assert image.size == (128, 128)
    assert "no thumbnail" not in card


def test_plots_and_provenance_present(fab, tmp_path):
    out = build_report(fab["registry"], "demo@k=8", tmp_path / "r.html", n_latents=3)
    text = out.read_text()
    for plot in ("sweep", "recovery", "frequency", "scores"):
        block = text.split(f'id="plot-{plot}"')[1].split("</figure>")[0]
        assert "data:image/png;base64," in block, plot
    assert "abc123" in text and "fabricated &lt;b&gt;demo&lt;/b&gt;" in text
    # metrics tables hold the inserted values (val column), e.g. fvu = 0.3 / 8
    assert re.search(r"<td>fvu</td><td class=\"num\">0\.0375</td>", text.replace("\n", ""))


def test_errors_are_one_line(fab, tmp_path):
    with pytest.raises(MedsaeError, match="not in the registry"):
        build_report(fab["registry"], "nope", tmp_path / "r.html")
    with pytest.raises(MedsaeError, match="--sort-by bogus"):
        build_report(fab["registry"], "demo@k=8", tmp_path / "r.html", sort_by="bogus")
    assert not (tmp_path / "r.html").exists()


def test_experiment_without_latent_stages(fab, tmp_path):
    """A sweep point with metrics only: plots of the sweep, a note instead of cards."""
    out = build_report(fab["registry"], "demo@k=4", tmp_path / "r.html")
    text, parsed = _parse(out)
    assert parsed.cards == []
    assert "no latent statistics yet" in text
    assert "data:image/png;base64," in text.split('id="plot-sweep"')[1].split("</figure>")[0]


def test_top_slices_and_stats_from_codes():
    """Without a summarize stage the cards read the encode codes; compare with dense numpy."""
    import scipy.sparse as sp

    from medsae.report.cards import latent_table, top_slices_from_codes

    rng = np.random.default_rng(0)
    dense = rng.exponential(1.0, (50, 12)) * (rng.random((50, 12)) < 0.3)
    dense[:, 4] = 0.0  # a dead latent
    slice_ids = np.arange(50) * 3 + 100
    codes = (sp.csr_matrix(dense.astype(np.float32)), slice_ids)
    table = latent_table(__import__("pandas").DataFrame(), codes)
    fires = dense > 0
    np.testing.assert_allclose(table["frequency"], fires.mean(axis=0))
    np.testing.assert_allclose(table["max_act"], dense.max(axis=0), rtol=1e-6)
    mean = np.where(fires.any(0), dense.sum(0) / np.maximum(fires.sum(0), 1), 0)
    np.testing.assert_allclose(table["mean_act"], mean, rtol=1e-5)
    assert table.loc[4, "status"] == "dead"
    top = top_slices_from_codes(codes, [0, 4, 7], 5)
    for latent in (0, 7):
        order = np.argsort(-dense[:, latent], kind="stable")[: min(5, fires[:, latent].sum())]
        assert [sid for sid, _, _ in top[latent]] == slice_ids[order].tolist()
        np.testing.assert_allclose([a for _, a, _ in top[latent]], dense[order, latent], rtol=1e-6)
    assert top[4] == []
