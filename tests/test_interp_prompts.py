"""Templates (hash, strictness, messages), metadata lines, and the offline baseline's rules."""

from __future__ import annotations

import hashlib
import shutil

import jinja2
import numpy as np
import pandas as pd
import pytest

from medsae.errors import MissingInputError
from medsae.interp.explainer import explain_examples, render_explainer
from medsae.interp.llm import rule_model as bp
from medsae.interp.metadata import Term, format_lines, legend_lines, mentioned, parse_line, slice_attributes
from medsae.interp.prompts import load_template, prompts_dir, split_messages


def test_template_hash_covers_included_files(tmp_path, monkeypatch):
    for f in prompts_dir().glob("*.j2"):
        shutil.copy(f, tmp_path / f.name)
    monkeypatch.setenv("MEDSAE_PROMPTS", str(tmp_path))
    before = load_template("explainer_metadata_v1")
    source = (tmp_path / "explainer_metadata_v1.j2").read_text()
    fewshot = (tmp_path / "_explainer_fewshot.j2").read_text()
    expected = hashlib.sha256(f"=== (template)\n{source}\n=== _explainer_fewshot.j2\n{fewshot}".encode()).hexdigest()
    assert before.hash == expected
    (tmp_path / "_explainer_fewshot.j2").write_text(fewshot.replace("Coronal CT slices", "Coronal CT images"))
    after = load_template("explainer_metadata_v1")
    assert after.hash != before.hash  # editing a few-shot fixture changes the template's identity
    assert load_template("simulator_metadata_v1").hash == load_template("simulator_metadata_v1").hash
    copy = tmp_path / "mine.j2"
    copy.write_text(source)
    assert load_template(str(copy)).hash == after.hash  # same content, same hash, wherever it lives


def test_rendering_is_strict_and_split_into_roles():
    tpl = load_template("explainer_metadata_v1")
    with pytest.raises(jinja2.UndefinedError):
        tpl.render()
    messages = tpl.render(examples=[{"id": "E01", "strength": 10, "line": "CT; axial"}])
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert messages[0]["content"].startswith("Task: explain a feature.")
    assert messages[-1]["content"].endswith("E01 | 10 | CT; axial")
    with pytest.raises(MissingInputError):
        split_messages("[[system]]\nonly a system message")
    with pytest.raises(MissingInputError):
        load_template("no_such_template")


def test_vision_variant_attaches_one_montage():
    tpl = load_template("explainer_vlm_v1")
    examples = [{"id": "E01", "strength": 10, "line": "CT; axial"}]
    messages = render_explainer(tpl, examples, montage_png=b"\x89PNG fake")
    assert "montage of thumbnails" in messages[0]["content"]
    parts = messages[-1]["content"]
    assert parts[0]["type"] == "text" and parts[1]["image_url"]["url"].startswith("data:image/png;base64,")


@pytest.fixture
def tiny():
    slices = pd.DataFrame(
        {
            "slice_id": [0, 1, 2],
            "modality": ["ct", "mri", "ct"],
            "plane": ["axial", "coronal", "axial"],
            "body_region": ["abdomen", None, "pelvis"],
            "position": [0.5, 0.25, np.nan],
            "sex": ["f", "m", None],
            "age_bin": ["60-80", None, "<40"],
            "study_type": [None, "mri abdomen", None],
            "pathology": ["none", "tumor; large", None],
            "manufacturer": ["siemens", None, "ge"],
            "institute": ["B", "C", "A"],
        }
    ).set_index("slice_id", drop=False)
    structures = pd.DataFrame(
        {
            "slice_id": [0, 0, 0, 2],
            "structure": ["liver", "kidney_left", "spleen", "urinary_bladder"],
            "pixels": [600, 300, 100, 50],
        }
    )
    return slices, structures


def test_metadata_lines_round_trip(tiny):
    slices, structures = tiny
    lines = format_lines(slices, structures, [2, 0, 1])
    assert (
        lines[0] == "CT; axial; abdomen; pos 0.50; female; age 60-80; liver 60%, kidney_left 30%, spleen 10%; "
        "scanner: siemens; site: b"
    )
    assert (
        lines[1] == "MRI; coronal; pos 0.25; male; no structures; study: mri abdomen; pathology: tumor large; site: c"
    )
    parsed = parse_line(lines[0])
    assert parsed["terms"] == {
        Term("modality", "ct"),
        Term("plane", "axial"),
        Term("region", "abdomen"),
        Term("sex", "female"),
        Term("age", "60-80"),
        Term("structure", "liver"),
        Term("structure", "kidney_left"),
        Term("structure", "spleen"),
        Term("scanner", "siemens"),
        Term("site", "b"),
    }
    assert parsed["areas"]["liver"] == pytest.approx(0.6)
    assert "image_id" not in lines[0] and "s0" not in lines[0]  # no patient identifiers
    legend = legend_lines(slice_attributes(slices), ["kidney_left", "liver", "spleen", "urinary_bladder"])
    assert legend[0] == "modality: CT, MRI" and "structure: kidney_left, liver, spleen, urinary_bladder" in legend


def test_mentioned_uses_whole_words_and_longest_phrase():
    terms = [
        Term("sex", "male"),
        Term("sex", "female"),
        Term("structure", "kidney_left"),
        Term("structure", "kidney"),
        Term("modality", "ct"),
        Term("site", "b"),
    ]
    found = mentioned("Axial CT of the left kidney_left in female patients from site B", terms)
    assert set(found) == {
        Term("modality", "ct"),
        Term("structure", "kidney_left"),
        Term("sex", "female"),
        Term("site", "b"),
    }
    assert mentioned("the affected organ", terms) == []  # "ct" inside "affected" is not a mention


def test_baseline_explains_by_enrichment_and_simulates_by_terms():
    examples = explain_examples(
        [10, 11, 12, 13, 14, 15],
        [5.0, 4.0, 3.0, 0.0, 0.0, 0.0],
        {
            10: "CT; axial; abdomen; male; liver 60%, spleen 40%",
            11: "CT; axial; abdomen; female; liver 50%, kidney_left 50%",
            12: "CT; coronal; abdomen; male; liver 70%, stomach 30%",
            13: "CT; axial; abdomen; male; spleen 100%",
            14: "MRI; axial; abdomen; female; liver 100%",
            15: "CT; axial; thorax; male; lung_left 100%",
        },
    )
    messages = render_explainer(load_template("explainer_metadata_v1"), examples)
    answer = bp.handle(messages, {})
    # liver 3/3 firing vs 1/3 contrasts, abdomen 3/3 vs 2/3 (lift 0.33 >= 0.2); axial 2/3 vs 3/3;
    # CT 3/3 vs 2/3 is a scan-level term (lift 0.33 < 0.4), male 2/3 vs 2/3
    assert answer.splitlines()[-1] == "EXPLANATION: Slices of the abdomen showing liver."
    legend = [
        "modality: CT, MRI",
        "plane: axial, coronal",
        "structure: kidney_left, liver, lung_left, spleen",
    ]
    sim = load_template("simulator_metadata_v1").render(
        explanation="Axial CT slices showing liver, not the spleen.",
        legend=legend,
        slices=[
            {"id": "X01", "line": "CT; axial; liver 60%"},
            {"id": "X02", "line": "CT; coronal; liver 60%"},
            {"id": "X03", "line": "MRI; coronal; lung_left 9%"},
            {"id": "X04", "line": "CT; axial; liver 5%, spleen 4%"},
        ],
    )
    # required terms ct, axial, liver; "spleen" follows a negation and excludes
    assert bp.handle(sim, {}) == "X01: 10\nX02: 4\nX03: 0\nX04: 0"
    assert bp.handle([{"role": "user", "content": "hi"}], {}) == "I do not know this task."
    no_firing = render_explainer(load_template("explainer_metadata_v1"), examples[3:])
    assert "EXPLANATION:" not in bp.handle(no_firing, {})  # nothing to explain: a parse failure downstream
