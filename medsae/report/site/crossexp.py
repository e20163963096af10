"""Cross-experiment views of the explorer: latents of two SAEs matched by decoder cosine, two explainers side by side.

* :func:`match_latents` - one-to-one matching of A's latents to B's by the cosine of their decoder
  directions (Hungarian assignment via ``scipy.optimize.linear_sum_assignment``; above
  :data:`HUNGARIAN_MAX_CELLS` a greedy matching, see there), plus each A latent's best match in B.
* :func:`load_other` / :func:`compare_experiment` - what ``medsae report A -o site/ --compare B`` writes
  into ``compare/<B>.html``: both SAEs loaded through :func:`medsae.sae.checkpoint.load_sae`, refused in
  one line when they do not read the same embedding space (:data:`SPACE_FIELDS` of the embed stage's
  recorded parameters) and dimension.
* :func:`explainer_comparison` - ``explainers.html`` when two or more explainer models explained the
  same latents: each model's headline explanation and score per latent, mean scores, paired difference
  and score correlation.

Nothing here renders except :func:`write_pages`; pages are autoescaped and carry no script.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medsae.errors import MedsaeError
from medsae.report import gather
from medsae.report.names import EXPLANATION_KIND
from medsae.report.site import rows as rowlib
from medsae.report.site.latent_extras import decoder_rows

#: Rows of A multiplied with B's decoder at once (float32): 1024 x 8192 floats = 32 MB per chunk.
CHUNK = 1024
#: Largest cosine matrix (cells) solved exactly. Measured on 2 shared CPU cores: 4096 x 4096 in ~3 s
#: (partly shared directions); 8192 x 8192 in 15 s (shared directions) to 73 s (unrelated SAEs), so
#: the study's width takes the greedy matching, which finishes in seconds at any width.
HUNGARIAN_MAX_CELLS = 4096 * 4096
#: Greedy matching: each A latent's candidates are its most similar B latents, this many.
GREEDY_CANDIDATES = 8
#: Cosine levels the summary counts pairs above.
LEVELS = (0.9, 0.7, 0.5)
#: Fields of the embed stage (:class:`medsae.embed.config.EmbedSpec`) that define the embedding space:
#: two SAEs are compared only when these agree. ``INIT_FIELDS`` join them for a random-init backbone.
SPACE_FIELDS = ("source", "model", "model_kwargs", "pretrained", "weights", "pooling", "input_size")
INIT_FIELDS = ("init", "init_seed")


@dataclass
class Matching:
    """A one-to-one matching of A's latents (rows) to B's (columns) and each A latent's best match."""

    pairs_a: np.ndarray  # A latent of each matched pair
    pairs_b: np.ndarray  # its B latent
    pairs_cos: np.ndarray  # their decoder cosine
    best_b: np.ndarray  # [n_a] B latent of highest cosine for every A latent
    best_cos: np.ndarray  # [n_a] that cosine
    method: str  # how the pairs were found, in words (shown on the page)
    seconds: float


def unit_rows(w: np.ndarray) -> np.ndarray:
    """float32 copy of ``w`` with rows scaled to unit length (a zero row stays zero)."""
    w = np.asarray(w, dtype=np.float32)
    norm = np.linalg.norm(w, axis=1, keepdims=True)
    return w / np.where(norm > 0, norm, 1.0)


def match_latents(
    a: np.ndarray, b: np.ndarray, chunk: int = CHUNK, hungarian_max_cells: int = HUNGARIAN_MAX_CELLS
) -> Matching:
    """Match rows of ``a`` [n_a, d] to rows of ``b`` [n_b, d] (decoder directions) by cosine.

    Up to ``hungarian_max_cells`` cells the matching maximises the summed cosine exactly; above, pairs
    are taken greedily in order of decreasing cosine among each A latent's :data:`GREEDY_CANDIDATES`
    best B latents, each latent at most once (so every mutual best pair is kept), and the A latents
    whose candidates were all taken are then assigned exactly among the B latents left (when that
    remainder is within ``hungarian_max_cells``; else they stay unmatched). The cosine matrix is
    built ``chunk`` rows at a time and never held whole above the exact size.
    """
    started = time.perf_counter()
    ua, ub = unit_rows(a), unit_rows(b)
    n_a, n_b = len(ua), len(ub)
    best_b = np.zeros(n_a, dtype=np.int64)
    best_cos = np.zeros(n_a, dtype=np.float32)
    exact = n_a * n_b <= hungarian_max_cells
    full = np.empty((n_a, n_b), dtype=np.float32) if exact else None
    m = min(GREEDY_CANDIDATES, n_b)
    cand_a, cand_b, cand_cos = [], [], []
    for start in range(0, n_a, chunk):
        block = ua[start : start + chunk] @ ub.T
        rows = np.arange(len(block))
        best_b[start : start + len(block)] = block.argmax(axis=1)
        best_cos[start : start + len(block)] = block[rows, best_b[start : start + len(block)]]
        if full is not None:
            full[start : start + len(block)] = block
        else:
            top = np.argpartition(-block, m - 1, axis=1)[:, :m]
            cand_a.append(np.repeat(rows + start, m))
            cand_b.append(top.ravel())
            cand_cos.append(block[rows[:, None], top].ravel())
    if full is not None:
        from scipy.optimize import linear_sum_assignment

        pa, pb = linear_sum_assignment(full, maximize=True)
        pc = full[pa, pb]
        method = "one-to-one assignment maximising the summed cosine (Hungarian, scipy linear_sum_assignment)"
    else:
        pa, pb, pc = _greedy(np.concatenate(cand_a), np.concatenate(cand_b), np.concatenate(cand_cos))
        method = (
            f"greedy one-to-one matching ({n_a} x {n_b} is too large for the exact assignment in about a minute): "
            f"pairs taken in order of decreasing cosine among each latent's {m} most similar, each latent once"
        )
        left_a = np.setdiff1d(np.arange(n_a), pa)
        left_b = np.setdiff1d(np.arange(n_b), pb)
        if len(left_a) and len(left_b) and len(left_a) * len(left_b) <= hungarian_max_cells:
            from scipy.optimize import linear_sum_assignment

            rest = ua[left_a] @ ub[left_b].T
            ra, rb = linear_sum_assignment(rest, maximize=True)
            pa, pb, pc = (
                np.concatenate([pa, left_a[ra]]),
                np.concatenate([pb, left_b[rb]]),
                np.concatenate([pc, rest[ra, rb]]),
            )
            method += f"; the {len(ra)} latents left then assigned exactly among the B latents left"
    seconds = time.perf_counter() - started
    return Matching(pa.astype(np.int64), pb.astype(np.int64), pc.astype(np.float32), best_b, best_cos, method, seconds)


def _greedy(ca: np.ndarray, cb: np.ndarray, cc: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    order = np.argsort(-cc, kind="stable")
    used_a: set[int] = set()
    used_b: set[int] = set()
    keep = []
    for i in order:
        x, y = int(ca[i]), int(cb[i])
        if x not in used_a and y not in used_b:
            used_a.add(x)
            used_b.add(y)
            keep.append(i)
    keep_idx = np.asarray(keep, dtype=np.int64)
    return ca[keep_idx], cb[keep_idx], cc[keep_idx]


# --------------------------------------------------------------------------- experiments


@dataclass
class Side:
    """One experiment of a comparison: its headline explanation and frequency per latent, its SAE folder."""

    name: str
    embed: dict[str, Any]  # the embed stage's parameters (:func:`embed_params`)
    train_dir: str | None
    texts: dict[int, tuple[str, str, str]] = field(default_factory=dict)  # latent -> (id, text, model)
    scores: dict[int, float] = field(default_factory=dict)  # latent -> headline score
    frequency: dict[int, float] = field(default_factory=dict)
    pages: set[int] = field(default_factory=set)  # latents with a page in this explorer (A only)

    @classmethod
    def from_frames(
        cls, exp: gather.ExperimentRecord, latents: pd.DataFrame, best: pd.DataFrame, texts: dict[int, tuple]
    ) -> Side:
        """The side of ``exp`` from its latents table and :func:`~medsae.report.site.rows.headlines`."""
        freq = {}
        if not latents.empty:
            freq = {int(k): rowlib.clean(v) for k, v in zip(latents["latent"], latents["frequency"], strict=True)}
        return cls(
            name=exp.name,
            embed=embed_params(exp),
            train_dir=exp.artifact_dir("train"),
            texts=texts,
            scores={int(k): float(v) for k, v in zip(best.get("latent", []), best.get("value", []), strict=True)},
            frequency=freq,
        )


def load_other(con: Any, name: str) -> Side:
    """The experiment ``name`` read for a comparison (one-line error when it is unknown)."""
    exp = gather.load_experiment(con, name)
    best, texts = rowlib.headlines(gather.explanations_frame(con, exp), gather.scores_frame(con, exp))
    return Side.from_frames(exp, gather.latents_frame(con, exp), best, texts)


def embed_params(exp: gather.ExperimentRecord) -> dict[str, Any]:
    """The experiment's embed parameters as resolved when its embed stage was keyed (the stage's ``params_json``
    in the registry: defaults filled in); without a recorded embed stage, the spec's ``embed`` section
    resolved the same way (:class:`~medsae.embed.config.EmbedSpec`), or as written if it does not validate."""
    recorded = gather._loads((exp.stages.get("embed") or {}).get("params_json"))
    if recorded:
        return recorded
    written = gather._loads(exp.row.get("spec_json")).get("embed")
    written = written if isinstance(written, dict) else {}
    from medsae.embed.config import EmbedSpec
    from medsae.specbase import key_params

    try:
        return key_params(EmbedSpec.model_validate(written))
    except ValueError:  # pydantic's ValidationError
        return dict(written)


def embedding_space(embed: dict[str, Any]) -> dict[str, Any]:
    """The fields of ``embed`` that define its embedding space (a field not recorded: EmbedSpec's default)."""
    from medsae.embed.config import EmbedSpec

    def value(name: str) -> Any:
        return embed[name] if name in embed else EmbedSpec.model_fields[name].get_default(call_default_factory=True)

    fields = SPACE_FIELDS if value("pretrained") else SPACE_FIELDS + INIT_FIELDS
    return {name: value(name) for name in fields}


def _backbone(side: Side) -> str:
    embed = side.embed
    name = str(embed.get("model") or embed.get("source") or "unknown backbone")
    return name if embed.get("pretrained", True) else f"{name} (random init)"


def decoder_directions(side: Side) -> np.ndarray:
    """The decoder rows [d_sae, d_in] of the side's trained SAE, loaded with medsae's own checkpoint code."""
    if not side.train_dir or not Path(side.train_dir).is_dir():
        raise MedsaeError(f"{side.name}: no trained SAE to compare (train stage not run or its folder is gone)")
    return decoder_rows(side.train_dir)


def check_same_space(a: Side, b: Side, wa: np.ndarray, wb: np.ndarray) -> None:
    """Refuse, in one line, SAEs whose decoder directions do not live in the same embedding space."""
    if wa.shape[1] != wb.shape[1]:
        raise MedsaeError(
            f"compare {a.name} with {b.name}: their SAEs embed different dimensions ({wa.shape[1]} vs "
            f"{wb.shape[1]}), so decoder directions cannot be matched"
        )
    space_a, space_b = embedding_space(a.embed), embedding_space(b.embed)
    if space_a != space_b:
        differ = [k for k in space_a if k in space_b and space_a[k] != space_b[k]]  # pretrained, if it differs
        what = "; ".join(f"{k}: {_shown(space_a[k])} vs {_shown(space_b[k])}" for k in differ)
        raise MedsaeError(
            f"compare {a.name} with {b.name}: their SAEs read different backbones ({what}), "
            "so decoder directions cannot be matched"
        )


def _shown(value: Any) -> str:
    """A parameter value in one line."""
    return " ".join(repr(value).split())


@dataclass
class Comparison:
    """Everything ``compare/<B>.html`` shows."""

    a: Side
    b: Side
    matching: Matching
    d_in: int
    shape: tuple[int, int]


def compare_experiment(a: Side, b: Side) -> Comparison:
    """Load both SAEs, check they share a space, match their latents."""
    wa, wb = decoder_directions(a), decoder_directions(b)
    check_same_space(a, b, wa, wb)
    return Comparison(a, b, match_latents(wa, wb), wa.shape[1], (len(wa), len(wb)))


def safe_filename(name: str, taken: set[str]) -> str:
    """``name`` as a file stem of letters, digits, ``._-`` (unique among ``taken``, which it joins)."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "experiment"
    out, n = stem, 1
    while out.lower() in taken:
        n += 1
        out = f"{stem}-{n}"
    taken.add(out.lower())
    return out


def comparison_view(cmp: Comparison) -> dict[str, Any]:
    """Template variables of one comparison page: summary and pair rows sorted by cosine, highest first."""
    m = cmp.matching
    rows = []
    for i in np.argsort(-m.pairs_cos, kind="stable"):
        la, lb = int(m.pairs_a[i]), int(m.pairs_b[i])
        best = int(m.best_b[la])
        rows.append(
            {
                "cosine": float(m.pairs_cos[i]),
                "a": _latent_view(cmp.a, la),
                "b": _latent_view(cmp.b, lb),
                "best_b": best if best != lb else None,
                "best_cos": float(m.best_cos[la]),
            }
        )
    unmatched = sorted(set(range(cmp.shape[0])) - {int(x) for x in m.pairs_a})
    cos = m.pairs_cos.astype(np.float64)
    summary = {
        "n_pairs": len(cos),
        "levels": [{"level": lv, "n": int((cos >= lv).sum())} for lv in LEVELS],
        "median": float(np.median(cos)) if len(cos) else None,
        "median_best": float(np.median(m.best_cos)) if len(m.best_cos) else None,
        "method": m.method,
        "seconds": m.seconds,
        "shape": cmp.shape,
        "d_in": cmp.d_in,
        "backbone": _backbone(cmp.a),
        "n_unmatched": len(unmatched),
    }
    extra = [
        {"a": _latent_view(cmp.a, la), "best_b": int(m.best_b[la]), "best_cos": float(m.best_cos[la])}
        for la in unmatched
    ]
    return {"a_name": cmp.a.name, "b_name": cmp.b.name, "summary": summary, "pairs": rows, "unmatched": extra}


def _latent_view(side: Side, latent: int) -> dict[str, Any]:
    text = side.texts.get(latent)
    return {
        "latent": latent,
        "text": text[1] if text else None,
        "score": side.scores.get(latent),
        "frequency": side.frequency.get(latent),
        "page": latent in side.pages,
    }


# --------------------------------------------------------------------------- explainers


def explainer_comparison(explanations: pd.DataFrame, scores: pd.DataFrame) -> dict[str, Any] | None:
    """Each explainer model's headline explanation per latent, side by side; None below two models.

    Per (latent, model): the model's LLM explanation with the best headline score (as a latent page
    leads with), else its latest. Summary per model: mean headline score over the latents it scored;
    per pair of models, over latents both scored: mean difference (first minus second) with a normal
    95% interval, Pearson correlation of the scores, and how often the first scores higher (or the same).
    """
    if explanations.empty:
        return None
    llm = explanations[
        (explanations["kind"].fillna(EXPLANATION_KIND) == EXPLANATION_KIND) & explanations["text"].notna()
    ]
    models = sorted({str(m) for m in llm["explainer_model"].dropna()})
    if len(models) < 2:
        return None
    per_model: dict[str, tuple[dict[int, tuple[str, str, str]], dict[int, float]]] = {}
    for model in models:
        own = llm[llm["explainer_model"] == model]
        own_scores = scores[scores["explainer_model"] == model] if not scores.empty else scores
        best, texts = rowlib.headlines(own, own_scores)
        chosen = {
            int(lat): float(v)
            for lat, eid, v in zip(
                best.get("latent", []), best.get("explanation_id", []), best.get("value", []), strict=True
            )
            if int(lat) in texts and texts[int(lat)][0] == eid
        }
        per_model[model] = (texts, chosen)
    latents = sorted({lat for texts, _ in per_model.values() for lat in texts})
    shared = [lat for lat in latents if sum(lat in per_model[m][0] for m in models) >= 2]
    if not shared:
        return None
    rows = [
        {
            "latent": lat,
            "cells": [
                {"text": per_model[m][0][lat][1] if lat in per_model[m][0] else None, "score": per_model[m][1].get(lat)}
                for m in models
            ],
        }
        for lat in shared
    ]
    means = []
    for m in models:
        vals = np.array(list(per_model[m][1].values()), dtype=float)
        means.append({"model": m, "n": len(vals), "mean": float(vals.mean()) if len(vals) else None})
    pairs = []
    for i, m1 in enumerate(models):
        for m2 in models[i + 1 :]:
            both = sorted(set(per_model[m1][1]) & set(per_model[m2][1]))
            x = np.array([per_model[m1][1][lat] for lat in both], dtype=float)
            y = np.array([per_model[m2][1][lat] for lat in both], dtype=float)
            pairs.append({"first": m1, "second": m2, **paired_stats(x, y)})
    return {"models": models, "rows": rows, "means": means, "pairs": pairs}


def paired_stats(x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """n, mean of x - y with a normal 95% interval, Pearson r of x and y, shares where x > y and x == y."""
    n = len(x)
    out: dict[str, Any] = {"n": n, "diff": None, "ci_low": None, "ci_high": None, "r": None}
    out |= {"first_higher": None, "tied": None}
    if n == 0:
        return out
    d = x - y
    out["diff"] = float(d.mean())
    out["first_higher"] = float((d > 0).mean())
    out["tied"] = float((d == 0).mean())
    if n > 1:
        half = 1.96 * float(d.std(ddof=1)) / math.sqrt(n)
        out["ci_low"], out["ci_high"] = out["diff"] - half, out["diff"] + half
        if x.std() > 0 and y.std() > 0:
            out["r"] = float(np.corrcoef(x, y)[0, 1])
    return out


# --------------------------------------------------------------------------- pages


def write_pages(
    folder: Path,
    env: Any,
    common: dict[str, Any],
    comparisons: list[Comparison],
    explainers: dict[str, Any] | None,
    pages: set[int],
) -> list[dict[str, str]]:
    """Write ``compare/<B>.html`` per comparison and ``explainers.html``; the index's links to them."""
    links: list[dict[str, str]] = []
    taken: set[str] = set()
    if comparisons:
        (folder / "compare").mkdir()
        page = env.get_template("site_compare.html.j2")
        for cmp in comparisons:
            cmp.a.pages = pages
            href = f"compare/{safe_filename(cmp.b.name, taken)}.html"
            (folder / href).write_text(page.render(**common, **comparison_view(cmp)), encoding="utf-8")
            links.append({"title": f"latents matched with {cmp.b.name} (decoder cosine)", "href": href})
    if explainers:
        text = env.get_template("site_compare_explainers.html.j2").render(**common, **explainers, pages=pages)
        (folder / "explainers.html").write_text(text, encoding="utf-8")
        links.append(
            {"title": f"explainer models side by side ({', '.join(explainers['models'])})", "href": "explainers.html"}
        )
    return links
