"""history.json: the training curve beside each SAE's checkpoint, from values the loop already computes."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from medsae.sae.checkpoint import WEIGHTS
from medsae.sae.config import SAESpec
from medsae.sae.data import ArrayStore, TrainData
from medsae.sae.stage import HISTORY, _write_train, write_history
from medsae.sae.train import TrainJob, train_many
from medsae.stage import StageContext

N, BATCH, EPOCHS = 300, 64, 3  # 5 steps an epoch, the last batch short (44 rows)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_history_rows_are_epoch_ends_and_means_of_the_logged_steps(tmp_path):
    x = np.random.default_rng(0).normal(size=(N, 12)).astype(np.float32) + 0.5
    spec = SAESpec(arch="topk", d_sae=24, k=2, batch_size=BATCH, epochs=EPOCHS, warmup_steps=2, log_every=1)
    data = TrainData(ArrayStore(x), np.arange(N), torch.device("cpu"), 1e9)
    result = train_many([TrainJob(spec)], data, torch.device("cpu"))[0]
    per_epoch = math.ceil(N / BATCH)
    total = per_epoch * EPOCHS
    rows = result.history
    # 15 steps: fewer than 100, so a row after every step; epoch ends are among them
    assert [r["step"] for r in rows] == list(range(1, total + 1))
    assert [r["epoch"] for r in rows] == [1 + (s - 1) // per_epoch for s in range(1, total + 1)]
    expected_samples = [(s // per_epoch) * N + min((s % per_epoch) * BATCH, N) for s in range(1, total + 1)]
    assert [r["samples"] for r in rows] == expected_samples
    assert rows[-1]["samples"] == N * EPOCHS
    # with log_every=1 each log entry is one step: the history row of that step holds the same loss and FVU
    by_step = {e["step"]: e for e in result.log}
    for r in rows:
        assert r["loss"] == pytest.approx(by_step[r["step"]]["loss"], rel=1e-12)
        assert r["fvu"] == pytest.approx(by_step[r["step"]]["fvu"], rel=1e-12)

    # the train stage writes it beside the SAE's checkpoint, in the format the explorer reads
    out = tmp_path / "train_artifact"
    out.mkdir()
    ctx = StageContext("train", "k", out, tmp_path / "work", {}, {}, 0, spec=spec)
    summary = _write_train(ctx, result, wall=1.0).summary
    assert (out / WEIGHTS).is_file() and (out / HISTORY).is_file()
    written = json.loads((out / HISTORY).read_text())
    assert set(written) == {"version", "rows"} and written["version"] == 1 and written["rows"] == rows
    assert all(set(r) == {"epoch", "step", "samples", "loss", "fvu"} for r in written["rows"])
    assert all(isinstance(r["step"], int) and isinstance(r["loss"], float) for r in written["rows"])
    assert summary["precision"] == "float32" and summary["precision_reason"] == "auto: fp32 on cpu"
    assert write_history(tmp_path, []) == tmp_path / HISTORY  # an imported SAE: no rows
    assert json.loads((tmp_path / HISTORY).read_text()) == {"version": 1, "rows": []}


def test_long_runs_keep_about_a_hundred_rows_averaging_their_steps():
    x = np.random.default_rng(1).normal(size=(64 * 25, 8)).astype(np.float32)
    spec = SAESpec(arch="topk", d_sae=16, k=2, batch_size=64, epochs=10, warmup_steps=2, log_every=1)
    data = TrainData(ArrayStore(x), np.arange(len(x)), torch.device("cpu"), 1e9)
    result = train_many([TrainJob(spec)], data, torch.device("cpu"))[0]
    steps = [r["step"] for r in result.history]  # 250 steps: every 2nd step, plus every 25th (epoch end)
    assert steps == sorted(set(range(2, 251, 2)) | set(range(25, 251, 25)))
    losses = {e["step"]: e["loss"] for e in result.log}
    prev = 0
    for r in result.history:  # each row: the mean loss of the steps since the previous row
        mean = np.mean([losses[s] for s in range(prev + 1, r["step"] + 1)])
        assert r["loss"] == pytest.approx(mean, rel=1e-9)
        prev = r["step"]
