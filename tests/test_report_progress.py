"""The shared progress helper: items pass through unchanged, plain lines, quiet, nested rich bars."""

from __future__ import annotations

import re

import pytest

from medsae import progress


@pytest.fixture()
def loud(monkeypatch):
    monkeypatch.setenv("MEDSAE_QUIET", "")
    monkeypatch.setenv("MEDSAE_PROGRESS_INTERVAL", "0")


@pytest.mark.usefixtures("loud")
def test_plain_lines_with_rate_and_eta(monkeypatch, capsys):
    monkeypatch.setenv("MEDSAE_PROGRESS", "plain")
    items = list(progress.track(range(5), description="encode", unit="slices"))
    assert items == [0, 1, 2, 3, 4]
    err = capsys.readouterr()
    assert err.out == ""  # stdout stays clean for the command's own output
    lines = err.err.strip().splitlines()
    assert len(lines) == 6  # one per item (interval 0) and the final line
    assert re.fullmatch(r"\[encode\] 3/5 \([\d,.]+ (slices/s|s/slices), ETA \d+s\)", lines[2])
    assert lines[-1].startswith("[encode] 5 done in ")


def test_quiet_prints_nothing(monkeypatch, capsys):
    monkeypatch.setenv("MEDSAE_QUIET", "1")
    monkeypatch.setenv("MEDSAE_PROGRESS", "plain")
    assert sum(progress.track(range(100), description="x")) == 4950
    with progress.task("y", total=3) as advance:
        advance(3)
    assert capsys.readouterr().err == ""


@pytest.mark.usefixtures("loud")
def test_nested_rich_bars_share_one_display(monkeypatch, capsys):
    monkeypatch.setenv("MEDSAE_PROGRESS", "rich")
    seen = []
    for i in progress.track(range(3), description="latents"):
        for j in progress.track(range(4), description="llm calls"):  # rich allows one live display
            seen.append((i, j))
    assert len(seen) == 12
    assert progress._live is None and progress._depth == 0
    err = capsys.readouterr().err
    assert "latents" in err and "3/3" in err


@pytest.mark.usefixtures("loud")
def test_early_break_closes_the_display(monkeypatch):
    monkeypatch.setenv("MEDSAE_PROGRESS", "rich")
    gen = progress.track(range(10), description="x")
    for i in gen:
        if i == 2:
            break
    gen.close()
    assert progress._live is None and progress._depth == 0


def test_format_rate():
    assert progress.format_rate(10, 2, "it") == "5.0 it/s"
    assert progress.format_rate(1, 4, "epoch") == "4.0 s/epoch"
    assert progress.format_rate(0, 1, "it") == ""
