"""``build_report``: one self-contained HTML file about one experiment.

The file embeds everything (CSS, a few lines of JS, PNG plots and thumbnails as data URLs) and
loads nothing from the network: a Content-Security-Policy allows only data: images and our own
nonce-tagged style and script. Text from the registry, LLM explanations above all, is untrusted:
the jinja2 environment autoescapes every value and the template never marks data ``|safe``.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import secrets
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medsae import plots
from medsae.errors import MedsaeError
from medsae.registry import Registry
from medsae.report import cards as cardlib
from medsae.report import gather
from medsae.report.names import DEAD_ALIVE_DEFINITIONS, EXPLANATION_KIND, PREFERRED_SPLITS, SCORE_METHOD_ORDER
from medsae.stages import STAGES

STAGE_ORDER = STAGES  # sections follow the stage table
#: Per-target and curve tables longer than this start collapsed (scalar metrics are always open).
_COLLAPSE_ROWS = 24
SCALAR_TITLE = "Scalar metrics"
#: Spec settings summarised at the top of the report (section -> fields; the rest is in the JSON).
_SUMMARY_FIELDS: dict[str, tuple[str, ...]] = {
    "data": ("root", "modalities", "size", "stride"),
    "embed": ("source", "model", "pretrained", "pooling", "input_size"),
    "sae": ("arch", "d_sae", "expansion", "k", "epochs", "lr"),
    "interpret": ("explainer_model", "scorer_model"),
}


def _environment():
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("medsae.report", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["num"] = format_number
    env.filters["time"] = format_time
    return env


def format_number(value: Any, digits: int = 4) -> str:
    """Numbers for tables: ``digits`` significant digits, integers as-is, missing as empty."""
    if value is None:
        return ""
    if isinstance(value, bool | np.bool_):
        return str(bool(value))
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating):
        v = float(value)
        if math.isnan(v):
            return ""
        if v.is_integer() and abs(v) < 1e15:
            return str(int(v))
        return f"{v:.{digits}g}"
    return str(value)


def metric_tables(metrics: pd.DataFrame) -> list[dict[str, Any]]:
    """The experiment's metric rows as three pivots (splits as columns): scalars, per target, curves."""
    if metrics.empty:
        return []
    m = metrics.assign(split=metrics["split"].fillna("—"))
    known = ("train", "val", "test", "all")
    splits = sorted(m["split"].unique(), key=lambda s: (known.index(s) if s in known else len(known), s))
    groups = (
        (SCALAR_TITLE, m[m["target"].isna() & m["n_features"].isna()], ["stage", "name"]),
        ("Per-target metrics", m[m["target"].notna() & m["n_features"].isna()], ["stage", "name", "target"]),
        (
            "Curves over the number of latents",
            m[m["n_features"].notna()],
            ["stage", "name", "target", "n_features"],
        ),
    )
    tables = []
    for title, frame, keys in groups:
        if frame.empty:
            continue
        frame = frame.assign(**{k: frame[k].fillna("") for k in keys if k != "n_features"})
        if "n_features" in keys:
            frame = frame.assign(n_features=frame["n_features"].astype(int))
        pivot = frame.pivot_table(index=keys, columns="split", values="value", aggfunc="mean", sort=True)
        cols = [s for s in splits if s in pivot.columns]
        pivot = pivot[cols]
        rows = [
            _with_definition(list(idx if isinstance(idx, tuple) else (idx,)), keys) + [row[c] for c in cols]
            for idx, row in pivot.iterrows()
        ]
        tables.append(
            {
                "title": title,
                "columns": keys + cols,
                "rows": rows,
                "n_keys": len(keys),
                "collapsed": title != SCALAR_TITLE and len(rows) > _COLLAPSE_ROWS,
            }
        )
    return tables


def _with_definition(key_values: list[Any], keys: list[str]) -> list[Any]:
    """Dead/alive metric names carry their definition (the split is the column): several differ."""
    at = keys.index("name")
    name = key_values[at]
    if name in DEAD_ALIVE_DEFINITIONS:
        key_values[at] = f"{name}: {DEAD_ALIVE_DEFINITIONS[name]}"
    return key_values


def _group_label(kind: str | None, model: str, scorer: str | None) -> str:
    label = model if (kind or EXPLANATION_KIND) == EXPLANATION_KIND else f"baseline: {kind}"
    return f"{label} [{scorer}]" if scorer else label


def score_groups(scores: pd.DataFrame) -> dict[str, dict[str, list[float]]]:
    """method -> {explainer model or 'baseline: kind' -> score values}; headline method first.

    When several scorer models scored the explanations, each label also names its scorer.
    """
    if scores.empty:
        return {}
    s = scores.dropna(subset=["value"])
    several = s["scorer_model"].nunique(dropna=True) > 1
    scorers = s["scorer_model"] if several else [None] * len(s)
    s = s.assign(
        group=[_group_label(k, m, sc) for k, m, sc in zip(s["kind"], s["explainer_model"], scorers, strict=True)]
    )
    order = {m: i for i, m in enumerate(SCORE_METHOD_ORDER)}
    methods = sorted(s["method"].unique(), key=lambda x: (order.get(x, len(order)), x))
    out: dict[str, dict[str, list[float]]] = {}
    for method in methods:
        sel = s[s["method"] == method]
        labels = sorted(sel["group"].unique(), key=lambda g: (g.startswith("baseline:"), g))
        out[method] = {g: sel.loc[sel["group"] == g, "value"].astype(float).tolist() for g in labels}
    return out


def _n_dense(latents: pd.DataFrame) -> int | None:
    """How many latents the summarize stage marked dense (None without a status column)."""
    return int((latents["status"] == "dense").sum()) if "status" in latents else None


def chance_levels(scores: pd.DataFrame) -> dict[str, float]:
    """Median recorded chance level per score method."""
    if scores.empty or "chance" not in scores:
        return {}
    return {str(k): float(v) for k, v in scores.dropna(subset=["chance"]).groupby("method")["chance"].median().items()}


def _score_summary(groups: dict[str, dict[str, list[float]]]) -> list[dict[str, Any]]:
    return [
        {"group": g, "method": method, "n": len(v), "mean": float(np.mean(v)), "median": float(np.median(v))}
        for method, by_group in groups.items()
        for g, v in by_group.items()
        if v
    ]


def _load_codes(encode_dir: str | None) -> tuple[Any, np.ndarray] | None:
    if not encode_dir or not Path(encode_dir).is_dir():
        return None
    try:
        from medsae.sae.codes import load_codes
    except ImportError:
        return None
    return load_codes(Path(encode_dir))


def _json_dict(text: str | None) -> dict[str, Any]:
    try:
        value = json.loads(text) if text else {}
    except ValueError:
        return {"(unparsed)": text}
    return value if isinstance(value, dict) else {"value": value}


def _pretty_spec(text: str | None) -> str:
    try:
        return json.dumps(json.loads(text), indent=2, sort_keys=True) if text else ""
    except ValueError:
        return text or ""


def spec_summary(spec: dict[str, Any]) -> dict[str, str]:
    """section -> ``key=value, ...`` of the settings a reader compares first (``_SUMMARY_FIELDS``)."""
    out = {}
    for section, fields in _SUMMARY_FIELDS.items():
        values = spec.get(section)
        if isinstance(values, dict):
            shown = [f"{f}={values[f]}" for f in fields if values.get(f) is not None]
            if shown:
                out[section] = ", ".join(shown)
    return out


def format_time(value: Any) -> str:
    """Timestamps to the second (``2026-01-31 12:00:05``); anything else as text."""
    if value is None:
        return ""
    if isinstance(value, dt.datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    return str(value)


def _medsae_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("medsae")
    except PackageNotFoundError:
        return "unknown"


def build_report(
    registry: Registry,
    experiment: str,
    out_path: Path,
    n_latents: int = 50,
    sort_by: str = "frequency",
    n_slices: int = 8,
    thumb_size: int = 128,
) -> Path:
    """Write the HTML report of ``experiment`` to ``out_path`` (atomically) and return the path.

    ``n_latents`` cards are shown, largest ``sort_by`` first (see ``cards.SORT_CHOICES``), each
    with its ``n_slices`` strongest slices as ``thumb_size`` px thumbnails.
    """
    if n_latents < 0:
        raise MedsaeError(f"--latents {n_latents}: must be >= 0")
    out_path = Path(out_path)
    with registry.read() as con:
        exp = gather.load_experiment(con, experiment)
        metrics = gather.experiment_metrics(con, exp)
        sweep = gather.sweep_points(con, exp)
        latents = gather.latents_frame(con, exp)
        explanations = gather.explanations_frame(con, exp)
        scores = gather.scores_frame(con, exp)

    codes = _load_codes(exp.artifact_dir("encode")) if latents.empty else None
    table = cardlib.latent_table(latents, codes)
    chosen = cardlib.choose_latents(table, scores, sort_by, n_latents)
    chosen_ids = [int(x) for x in chosen["latent"]] if not chosen.empty else []
    with registry.read() as con:
        sets = gather.explain_sets(con, exp, chosen_ids)
    if codes is None and any(lat not in sets for lat in chosen_ids):
        codes = _load_codes(exp.artifact_dir("encode"))

    def metadata(slice_ids: list[int]) -> pd.DataFrame:
        with registry.read() as con:
            return gather.slice_metadata(con, exp, slice_ids)

    cards = cardlib.build_cards(
        chosen,
        sets,
        codes,
        metadata,
        exp.artifact_dir("slices"),
        explanations,
        scores,
        n_slices=n_slices,
        thumb_size=thumb_size,
    )
    with registry.read() as con:
        ground = gather.grounding(con, exp, chosen_ids)
    if ground.rows:
        from medsae.report.grounding import grounding_views

        views = grounding_views(ground, exp.artifact_dir("slices"))
        for card in cards:
            card.grounding = views.get(card.latent)
    cards_note = None
    if table.empty:
        cards_note = "no latent statistics yet: run the summarize stage (or at least encode) to get latent cards"
    groups = score_groups(scores)
    plot_list = [
        {
            "id": "sweep",
            "title": "FVU and R² vs L0 across the sweep",
            "url": plots.data_url(plots.reconstruction_vs_l0(sweep)),
            "missing": "no FVU / R² / L0 metrics recorded yet",
        },
        {
            "id": "recovery",
            "title": "Performance recovery vs number of latents",
            "url": plots.data_url(plots.recovery_curves(metrics, PREFERRED_SPLITS)),
            "missing": "no performance-recovery rows recorded yet",
        },
        {
            "id": "frequency",
            "title": "Latent firing frequency",
            "url": plots.data_url(plots.latent_frequency(table["frequency"], n_dense=_n_dense(table)))
            if not table.empty
            else None,
            "missing": "no latent statistics yet",
        },
        {
            "id": "scores",
            "title": "Explanation scores per explainer vs baselines",
            "url": plots.data_url(plots.score_distributions(groups, chance_levels(scores))),
            "missing": "no explanation scores yet",
        },
    ]
    stages = [exp.stages[k] for k in STAGE_ORDER if k in exp.stages]
    stages += [s for k, s in sorted(exp.stages.items()) if k not in STAGE_ORDER]
    html = (
        _environment()
        .get_template("report.html.j2")
        .render(
            exp=exp.row | {"description": _json_dict(exp.row.get("spec_json")).get("description", "")},
            versions=_json_dict(exp.row.get("versions_json")),
            host=_json_dict(exp.row.get("host_json")),
            stages=stages,
            spec_pretty=_pretty_spec(exp.row.get("spec_json")),
            spec_summary=spec_summary(_json_dict(exp.row.get("spec_json"))),
            metric_tables=metric_tables(metrics),
            score_summary=_score_summary(groups),
            plots=plot_list,
            cards=cards,
            cards_note=cards_note,
            sort_by=sort_by,
            nonce=secrets.token_urlsafe(18),
            built_at=dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
            medsae_version=_medsae_version(),
            registry_path=str(registry.path),
        )
    )
    _write_atomic(out_path, html)
    return out_path


def _write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename: never a half-written report.

    The file gets the umask's mode (``mkstemp`` alone would make it private); a folder that
    cannot be written is one line naming it.
    """
    from medsae.stage import make_shareable

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".report-", suffix=".html", dir=path.parent)
    except OSError as exc:
        raise MedsaeError(f"{path}: cannot write the report: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        make_shareable(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise MedsaeError(f"{path}: cannot write the report: {exc.strerror or exc}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
