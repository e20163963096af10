"""The vision explainer on a real (tiny) phantom slices artifact: a thumbnail montage over HTTP."""

from __future__ import annotations

import base64
import io
import sys
from pathlib import Path

import numpy as np
import scipy.sparse as sp
from PIL import Image

from medsae.data.build import run_ingest
from medsae.data.config import DataSpec
from medsae.data.index import load_slices, load_structures, presence_matrix
from medsae.data.phantom import write_phantom
from medsae.interp.agent import Agent, AgentInputs
from medsae.interp.config import InterpretSpec
from medsae.interp.stage import summarize, write_summary

sys.path.insert(0, str(Path(__file__).parent))
from llm_server import (
    llm_server_fixture,  # noqa: F401
    text_handler,
)


def test_vision_explainer_sends_a_montage(tmp_path, llm_server):
    root = write_phantom(tmp_path / "phantom", subjects=6, seed=1, shape=(24, 24, 32))
    params = DataSpec(root=str(root), size=32, ct_planes=["axial"]).model_dump(mode="json")
    slices_dir = tmp_path / "slices"
    run_ingest(root, params, slices_dir, tmp_path / "work")
    slices, structures = load_slices(slices_dir), load_structures(slices_dir)
    liver = np.zeros(len(slices))
    liver_ids = structures.loc[structures["structure"] == "liver", "slice_id"].to_numpy()
    liver[liver_ids] = 1.0 + np.arange(len(liver_ids)) % 3
    codes = sp.csr_matrix(np.stack([liver, np.zeros(len(slices))], axis=1).astype(np.float32))
    presence, vocab = presence_matrix(slices_dir)
    p = InterpretSpec(
        explainer_model="openai/gpt-4o",
        explainer_api_base=llm_server.url,
        vision=True,
        min_active=2,
        min_patients=2,
        min_pool_scans=2,
        ranking=False,
        detect=False,
    )
    result = summarize(slices, presence, vocab, codes, slices["slice_id"].to_numpy(), p, "sae")
    out = tmp_path / "summarize"
    write_summary(out, result)

    llm_server.set_handler(text_handler("The liver is visible.\nEXPLANATION: Slices showing liver."))
    run = Agent(AgentInputs(out, slices_dir, "sae", "summ"), p, tmp_path / "cache").run()
    expl = [r for r in run.tables["explanations"] if r["kind"] == "explanation"]
    assert [r["text"] for r in expl] == ["Slices showing liver."]
    assert {t["name"] for t in run.tables["prompts"]} >= {"explainer_vlm_v1"}
    request = llm_server.requests[0]
    parts = request["messages"][-1]["content"]
    assert parts[0]["type"] == "text" and "E01 |" in parts[0]["text"]
    url = parts[1]["image_url"]["url"]
    image = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    n_tiles = min(16, len(result.sets[0].slice_ids))
    assert image.size == (4 * 128, 128 * -(-n_tiles // 4))
    # the scorer (offline baseline) then simulated the held-out slices from that explanation
    pearson = [s for s in run.tables["explanation_scores"] if s["method"] == "pearson"]
    assert pearson and all(s["scorer_model"] in ("medsae/baseline", "rule") for s in pearson)
