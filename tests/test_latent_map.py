"""`medsae latent map`: any latent's activation map on any slice, against the stage outputs it must agree with.

Uses the small grounded phantom run of tests/test_report_grounding.py (resumed, not rebuilt, when
that module ran first). Independent checks: the encode stage's sparse code of the slice, the
ground stage's stored map, PIL's bilinear resize for the upsampling.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
from PIL import Image
from test_report_grounding import grounded_run

from medsae.cli.main import main
from medsae.ground.latent_map import latent_map
from medsae.sae.codes import load_codes


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return grounded_run(tmp_path_factory)


def _stored(plan):
    data = np.load(plan.nodes["ground"].final_dir / "activation_maps.npz")
    return data["latents"], data["slice_ids"], data["maps"]


def test_map_agrees_with_the_codes_and_the_ground_stage(run):
    _, plan, registry = run
    latents, ids, maps = _stored(plan)
    latent, sid, stored_map = int(latents[0]), int(ids[0, 0]), maps[0, 0].astype(np.float32)
    m = latent_map(registry, plan.spec.name, latent, sid)
    # mean pooling: the token pre-activations average to the pooled one, which is the encoded code
    assert m.exact and m.token_mean_pre_act == pytest.approx(m.pooled_pre_act, rel=1e-5, abs=1e-6)
    codes, code_ids = load_codes(plan.nodes["encode"].final_dir)
    code = codes[int(np.flatnonzero(code_ids == sid)[0])].toarray()[0, latent]
    assert code > 0 and m.pooled_pre_act == pytest.approx(code, rel=1e-4)
    # the same map the ground stage stored for this latent's strongest slice (float16 there)
    np.testing.assert_allclose(m.token_map, stored_map, rtol=2e-3, atol=2e-3 * float(stored_map.max()))
    size = m.image.shape[0]
    up = np.maximum(np.asarray(Image.fromarray(m.token_map, mode="F").resize((size, size), Image.BILINEAR)), 0)
    np.testing.assert_allclose(m.pixels, up, atol=1e-4 * max(float(up.max()), 1e-6))


def _cli(monkeypatch, capsys, registry, *args: str) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["medsae", "--registry", str(registry.path), "-q", "latent", "map", *args])
    with pytest.raises(SystemExit) as exc:
        main()
    return int(exc.value.code or 0), capsys.readouterr().err


def test_cli_writes_a_png_and_rejects_unknown_inputs_in_one_line(run, tmp_path, monkeypatch, capsys):
    _, plan, registry = run
    latents, ids, _ = _stored(plan)
    name, latent, sid = plan.spec.name, int(latents[-1]), int(ids[-1, 0])
    out = tmp_path / "maps" / "map.png"
    code, err = _cli(monkeypatch, capsys, registry, name, str(latent), str(sid), "-o", str(out))
    assert code == 0, err
    with Image.open(out) as png:
        assert png.format == "PNG" and min(png.size) > 100
    d_sae = plan.spec.sae.d_sae
    bad = tmp_path / "bad.png"
    for args, start in (
        ((name, str(d_sae), str(sid)), f"error: latent {d_sae}: experiment '{name}' has latents 0..{d_sae - 1}"),
        ((name, str(latent), "99999999"), "error: slice 99999999: experiment"),
        (("no-such-exp", str(latent), str(sid)), f"error: {registry.path}: no experiment named 'no-such-exp'"),
    ):
        code, err = _cli(monkeypatch, capsys, registry, *args, "-o", str(bad))
        assert code != 0 and err.startswith(start) and err.count("\n") == 1, err
        assert "Traceback" not in err
    assert not bad.exists() and not list(tmp_path.glob(".map-*"))
