"""The explorer's index page: quality metrics before timings, the study's figures, plots as PNG files.

Built by ``build_site`` from the fabricated registry of test_report_html (real DuckDB file, real slices
stage on a phantom), to which this module adds what an index page reads: dead-latent counts of three
stages, timings, and a second experiment evaluated under the study's protocol on the study's selected
DINOv3 configuration. Expectations come from SQL on the registry file, from numpy, and (the study's
figures) from the table in docs/method.md.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pytest
from PIL import Image
from test_report_html import fabricate  # sibling test module

from medsae.report.site.build import build_site
from medsae.report.site.index_page import NO_HISTORY, read_history

ROOT = Path(__file__).resolve().parents[1]
EXP = "demo@k=8"
STUDY_EXP = "study@dinov3"
SHARING_EXP = "other@k=32"  # not in EXP's sweep, but trained on EXP's embeddings
POOL = "test+val"
#: Dead / alive rows added for EXP: (stage kind, metric, split, value).
DEAD_ROWS = (
    ("train", "dead_fraction", "train", 0.125),
    ("evaluate", "dead_fraction", "val", 0.25),
    ("evaluate", "dead_fraction", "test", 0.275),
    ("summarize", "latents_dead", POOL, 0.075),
    ("evaluate", "alive_per_batch_study", "val", 31.0),
)
TIMINGS = (("evaluate", "seconds_probes", 12.5), ("evaluate", "seconds_total", 20.5), ("embed", "images_per_s", 80.0))


def _add_index_rows(fab: dict) -> None:
    """Dead counts of three stages and timings for EXP; an experiment evaluated under the study's protocol;
    one outside EXP's sweep that shares its embeddings (:data:`SHARING_EXP`)."""
    reg, keys = fab["registry"], fab["keys"]
    rows = [{"stage_key": keys[kind], "split": split, "name": name, "value": v} for kind, name, split, v in DEAD_ROWS]
    rows += [{"stage_key": keys[kind], "split": None, "name": name, "value": v} for kind, name, v in TIMINGS]
    study_keys = {kind: f"study-{kind}-key" for kind in ("embed", "train", "evaluate")}
    rows += [
        {"stage_key": study_keys["evaluate"], "split": "val", "name": name, "value": v}
        for name, v in (("r2_scalar_mean_study", 0.70), ("l0_mean", 40.0), ("alive_per_batch_study", 2400.0))
    ]
    rows += [
        {"stage_key": "sharing-evaluate-key", "split": "val", "name": name, "value": v}
        for name, v in (("fvu", 0.01), ("r2_scalar_mean_study", 0.99), ("l0_mean", 32.0))
    ]
    reg.insert("metrics", rows, ignore_conflicts=False)
    params = {
        "embed": {"source": "transformers", "model": "facebook/dinov3-vitl16-pretrain-lvd1689m", "pretrained": True},
        "train": {"arch": "matryoshka", "levels": [128, 512, 2048, 8192], "level_k": [5, 10, 20, 40]},
        "evaluate": {"protocol": "study"},
    }
    reg.insert(
        "experiments",
        [
            {"experiment_id": eid, "name": name, "spec_json": "{}", "spec_hash": eid, "git_commit": "c"}
            for eid, name in (("exp-study", STUDY_EXP), ("exp-sharing", SHARING_EXP))
        ],
    )
    reg.insert(
        "experiment_stages",
        [{"experiment_id": "exp-study", "kind": k, "stage_key": v} for k, v in study_keys.items()]
        + [
            {"experiment_id": "exp-sharing", "kind": "embed", "stage_key": keys["embed"]},
            {"experiment_id": "exp-sharing", "kind": "evaluate", "stage_key": "sharing-evaluate-key"},
        ],
    )
    reg.insert(
        "stages",
        [
            {"stage_key": v, "kind": k, "code_version": "1", "params_json": json.dumps(params[k]), "status": "done"}
            for k, v in [*study_keys.items(), ("evaluate", "sharing-evaluate-key")]
        ],
    )


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("index")
    fab = fabricate(root / "fab")
    _add_index_rows(fab)
    demo = build_site(fab["registry"], EXP, root / "demo").path
    study = build_site(fab["registry"], STUDY_EXP, root / "study").path
    return fab | {"root": root, "demo": demo, "study": study}


def _sql(fab: dict, sql: str, params: list | None = None) -> list[tuple]:
    with duckdb.connect(str(fab["registry"].path), read_only=True) as con:
        return con.execute(sql, params or []).fetchall()


class Node:
    def __init__(self, tag: str, attrs: dict[str, str | None], parent: Node | None) -> None:
        self.tag, self.attrs, self.parent = tag, attrs, parent
        self.children: list[Node] = []
        self.text = ""

    def all(self, tag: str | None = None, **attrs: str) -> list[Node]:
        """Descendants in document order with ``tag`` and these attribute values (``class_`` for class)."""
        out = []
        for child in self.children:
            want = {k.rstrip("_"): v for k, v in attrs.items()}
            if (tag is None or child.tag == tag) and all(child.attrs.get(k) == v for k, v in want.items()):
                out.append(child)
            out += child.all(tag, **attrs)
        return out

    def find(self, tag: str | None = None, **attrs: str) -> Node:
        found = self.all(tag, **attrs)
        assert found, f"no <{tag} {attrs}>"
        return found[0]

    def texts(self) -> str:
        return " ".join((self.text + " " + " ".join(c.texts() for c in self.children)).split())


class TreeParser(HTMLParser):
    VOID = {"meta", "link", "img", "br", "input", "hr"}

    def __init__(self) -> None:
        super().__init__()
        self.root = self.at = Node("#root", {}, None)

    def handle_starttag(self, tag, attrs):
        node = Node(tag, dict(attrs), self.at)
        self.at.children.append(node)
        if tag not in self.VOID:
            self.at = node

    def handle_endtag(self, tag):
        node = self.at
        while node is not None and node.tag != tag:
            node = node.parent
        if node is not None and node.parent is not None:
            self.at = node.parent

    def handle_data(self, data):
        self.at.text += data


def _tree(folder: Path) -> Node:
    parser = TreeParser()
    parser.feed((folder / "index.html").read_text(encoding="utf-8"))
    return parser.root


def _quality(tree: Node) -> dict[tuple[str, str], list[str]]:
    """(column, split) -> cell texts of the quality table (a column repeats per split)."""
    rows = tree.find("table", id="quality").all("tr")
    return {
        (r.attrs["data-column"], r.attrs["data-split"]): [c.texts() for c in r.all("td")]
        for r in rows
        if "data-column" in r.attrs
    }


def _value(cell: str) -> float:
    return float(cell.replace(",", ""))


def test_quality_metrics_come_first_and_timings_are_folded(built):
    tree = _tree(built["demo"])
    order = [s.attrs["id"] for s in tree.all("section")]
    assert order[:2] == ["headline-metrics", "plots"] and order.index("plots") < order.index("latents")
    assert order.index("timings") < order.index("provenance") == len(order) - 1
    for folded in ("timings", "provenance"):
        assert tree.find("section", id=folded).find("details")
    quality = _quality(tree)
    # timings never enter the quality table; they are in the folded timings table, with their values
    assert not any(re.search(r"seconds|per_s", col) for col, _ in quality)
    assert not re.search(r"seconds|images|stage total", tree.find("table", id="quality").texts())
    timings = {
        (r[0], r[1]): _value(r[2])
        for r in ([c.texts() for c in tr.all("td")] for tr in tree.find("section", id="timings").all("tr"))
        if r
    }
    for kind, name, value in TIMINGS:
        part = name.removeprefix("seconds_").removesuffix("_per_s")
        assert timings[(kind, part)] == pytest.approx(value, rel=1e-3)
    stage_seconds = dict(_sql(built, "SELECT kind, seconds FROM stages WHERE stage_key LIKE '%-key-0000000000'"))
    for kind, seconds in stage_seconds.items():
        assert timings[(kind, "stage total")] == pytest.approx(seconds, rel=1e-3)
    # every dead / alive figure is its own row, named by its split, with the registry's value
    for _kind, name, split, value in DEAD_ROWS:
        column = "alive_per_batch" if name == "alive_per_batch_study" else "dead_fraction"
        label, shown_split, shown, *_ = quality[(column, split)]
        assert shown_split == split and _value(shown) == pytest.approx(value, rel=1e-3)
        assert split in label or (split == POOL and "explanation pool" in label) or column == "alive_per_batch"
    labels = [quality[(c, s)][0] for c, s in quality if c == "dead_fraction"]
    assert len(labels) == len(set(labels)) == 4
    fvu = _sql(
        built,
        "SELECT value FROM metrics WHERE stage_key = ? AND name = 'fvu' AND split = 'val'",
        [built["keys"]["evaluate"]],
    )[0][0]
    assert _value(quality[("fvu", "val")][2]) == pytest.approx(fvu, rel=1e-3)
    assert "lower is better" in quality[("fvu", "val")][-1]


def _study_headline() -> dict[str, str]:
    """The DINOv3 column of the study's headline table in docs/method.md (metric -> cell text)."""
    text = (ROOT / "docs" / "method.md").read_text(encoding="utf-8")
    table = text[text.index('<a id="headline-numbers"></a>') :].split("\n\n")[2]
    return {
        cells[0]: cells[1] for cells in ([c.strip() for c in line.strip("|").split("|")] for line in table.splitlines())
    }


def test_study_figures_stand_beside_only_when_the_study_protocol_ran(built):
    demo = _tree(built["demo"])
    assert not demo.all("th", class_="num study") and not demo.all(id="study-note")
    assert all(len(cells) == 4 for cells in _quality(demo).values())  # label, split, value, hint
    tree = _tree(built["study"])
    assert tree.find(id="study-note") and "D_128_512_2048_8192_K_5_10_20_40" in tree.find(id="study-note").texts()
    quality = _quality(tree)
    study = _study_headline()
    assert _value(quality[("r2_study", "val")][3]) == pytest.approx(float(study["R² (study definition)"]), abs=6e-4)
    assert _value(quality[("l0", "val")][3]) == pytest.approx(float(study["L0"]), abs=0.05)
    alive = study["alive latents per 2,048-batch"].split(" of ")[0]
    assert _value(quality[("alive_per_batch", "val")][3]) == pytest.approx(_value(alive))
    # medsae's own values stay in their column
    assert _value(quality[("r2_study", "val")][2]) == pytest.approx(0.70)
    # a single experiment: no one-dot sweep plot, a sentence instead
    sweep = tree.find("figure", id="plot-sweep")
    assert not sweep.all("img") and "only this experiment" in sweep.texts()


def test_plots_are_png_files_in_the_store(built):
    folder = built["demo"]
    tree = _tree(folder)
    drawn = {}
    for fig in tree.find("section", id="plots").all("figure"):
        img = fig.all("img")
        if img:
            path = folder / img[0].attrs["src"]
            assert path.parent == folder / "thumbs" and hashlib.sha256(path.read_bytes()).hexdigest() == path.stem
            with Image.open(io.BytesIO(path.read_bytes())) as im:
                im.load()
                assert im.format == "PNG" and im.width > 300 and im.height > 200
            drawn[fig.attrs["id"]] = im.size
    assert set(drawn) == {"plot-sweep", "plot-recovery", "plot-frequency", "plot-scores"}
    # the sweep holds the three experiments of the fabricated sweep and the one sharing EXP's embeddings
    points = tree.find("figure", id="plot-sweep").find("details").all("tr")[1:]
    shown = {cells[0]: _value(cells[2]) for cells in ([c.texts() for c in tr.all("td")] for tr in points)}
    expected = _sql(
        built,
        "SELECT e.name, m.value FROM experiments e JOIN experiment_stages es USING (experiment_id) "
        "JOIN metrics m USING (stage_key) WHERE (e.sweep_name = 'demo' OR e.name = ?) AND m.name = 'l0_mean' "
        "AND m.split = 'val'",
        [SHARING_EXP],
    )
    assert len(expected) == 4
    assert shown == pytest.approx(dict(expected))


def test_frequency_histogram_counts_equal_the_latents_table(built):
    freq, dense = zip(
        *_sql(
            built, "SELECT frequency, status = 'dense' FROM latents WHERE stage_key = ?", [built["keys"]["summarize"]]
        ),
        strict=True,
    )
    freq = np.asarray(freq, dtype=float)
    alive = np.log10(freq[freq > 0])
    counts, _ = np.histogram(alive, bins=np.linspace(alive.min() - 0.05, alive.max() + 0.05, 31))
    fig = _tree(built["demo"]).find("figure", id="plot-frequency")
    summary = fig.find("details").find("p").texts()
    assert summary == f"{freq.size} latents: {alive.size} fire, {int((freq == 0).sum())} never, {sum(dense)} dense"
    rows = [[c.texts() for c in tr.all("td")] for tr in fig.find("table").all("tr")[1:]]
    assert [int(r[2]) for r in rows] == [int(c) for c in counts if c]
    assert sum(int(r[2]) for r in rows) == alive.size


def test_training_curves_from_history_json_or_a_fallback(built):
    training = _tree(built["demo"]).find("figure", id="plot-training")
    assert not training.all("img") and NO_HISTORY in training.texts()
    assert "rerun train with --force" in NO_HISTORY
    train_dir = Path(_sql(built, "SELECT artifact_dir FROM stages WHERE stage_key = ?", [built["keys"]["train"]])[0][0])
    rows = [
        {
            "epoch": e,
            "step": 10 * (e * 4 + i),
            "samples": 640 * (e * 4 + i + 1),
            "loss": 2.0 / (e * 4 + i + 1),
            "fvu": 0.9 / (1 + 0.2 * (e * 4 + i)),
        }
        for e in range(3)
        for i in range(4)
    ]
    (train_dir / "history.json").write_text(json.dumps({"version": 1, "rows": rows}))
    try:
        folder = build_site(built["registry"], EXP, built["root"] / "with-history").path
    finally:
        (train_dir / "history.json").unlink()
    training = _tree(folder).find("figure", id="plot-training")
    assert NO_HISTORY not in training.texts()
    path = folder / training.find("img").attrs["src"]
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width > 2 * im.height  # two panels side by side: loss and FVU
    # an unusable history is named, not drawn (the build goes on with the sentence in place of the plot)
    for text, why in (
        (json.dumps({"version": 99, "rows": rows}), "not a version-1 training history"),
        ("{not json", "unreadable training history"),
        (json.dumps({"version": 1, "rows": [{"epoch": 0, "loss": 1.0}]}), "needs a number of samples"),
    ):
        (train_dir / "history.json").write_text(text)
        try:
            assert read_history(str(train_dir))[0] is None and why in read_history(str(train_dir))[1]
        finally:
            (train_dir / "history.json").unlink()
