"""``build_site``: the latent explorer of one experiment as a static folder.

Layout: ``index.html`` (headline metrics, then a sortable, filterable table of every latent, drawn
by ``explorer.js`` from ``latents.js``; ``latents.json`` holds the same rows for other tools),
``latents/<n>.html`` (one page per latent, no script at all), ``thumbs/<sha256>.png`` (every
picture, once), ``site.css``. Chromium blocks ``fetch`` of ``file://`` URLs, so the index data
travels as a script assigning it (``latents.js``). Every page's CSP allows same-folder files only.

The folder is built beside the target and swapped in at the end: an interrupted build leaves the
previous explorer (or nothing), never half a folder. A target that exists and is not an explorer
is refused.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medsae.errors import MedsaeError
from medsae.progress import track
from medsae.registry import Registry, queries
from medsae.report import gather
from medsae.report.build import format_number, format_time
from medsae.report.cards import _caption, explanation_views, scorer_gap_words
from medsae.report.compare import column_labels, compare_experiments
from medsae.report.site import crossexp, index_page
from medsae.report.site import rows as rowlib
from medsae.report.site.images import ImageStore, histogram_png
from medsae.report.site.latent_extras import LatentExtras
from medsae.report.site.thumbcache import ThumbCache

log = logging.getLogger("medsae")

#: File whose presence marks a folder as a medsae explorer (so a rebuild may replace it).
MARKER = ".medsae-site"
#: Index rows the table draws at once (the rest after refining the filters); keeps 8k-latent pages quick.
ROW_LIMIT = 2000
#: How a caption reads (the legend printed under the thumbnails).
CAPTION_LEGEND = (
    "modality · plane · body region",
    "sex · age bin · pathology (when any)",
    "largest structures on the slice",
)


@dataclass
class SiteSummary:
    """What ``build_site`` wrote."""

    path: Path
    n_pages: int
    n_images: int
    n_bytes: int
    seconds: float
    notes: list[str] = field(default_factory=list)


def _environment():
    from medsae.report.build import _environment as report_environment

    return report_environment()


def _role_group(role: str, activation: float) -> str:
    if role == "top":
        return "top examples"
    if role.startswith("decile_"):
        return "quantile bands"
    if role.startswith(("contrast", "negative")) or activation <= 0:
        return "non-firing contrasts"
    return "other examples"


GROUP_ORDER = ("top examples", "quantile bands", "other examples", "non-firing contrasts")


def _check_target(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise MedsaeError(f"{out_dir}: exists and is not a folder; the explorer is a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / MARKER).is_file():
        raise MedsaeError(f"{out_dir}: folder exists and is not a medsae explorer; choose a new or empty folder")


def _load_codes(encode_dir: str | None) -> Any:
    if not encode_dir or not Path(encode_dir).is_dir():
        return None
    try:
        from medsae.sae.codes import load_codes

        csr, _ = load_codes(Path(encode_dir))
        return csr.tocsc()
    except (ImportError, MedsaeError):
        return None


def _histogram(latent: int, codes: Any, sets: dict[int, dict]) -> tuple[bytes, dict] | None:
    """Firing activations of the latent over all encoded slices, else over its explain set."""
    if codes is not None and latent < codes.shape[1]:
        values = codes.data[codes.indptr[latent] : codes.indptr[latent + 1]]
        source = "every encoded slice where it fires"
    elif latent in sets and sets[latent]["activations"] is not None:
        values = np.asarray(sets[latent]["activations"], dtype=float)
        values = values[values > 0]
        source = "its explain example set only (no encode codes found)"
    else:
        return None
    if values.size == 0:
        return None
    png, facts = histogram_png(values)
    return png, facts | {"source": source}


def _thumbnails(
    slices_dir: str | None, ids: list[int], size: int, store: ImageStore
) -> tuple[dict[int, str], str | None]:
    """slice_id -> ``thumbs/<sha256>.png`` for ``ids``, from the thumbnail cache (rendering what it lacks).

    Where the cache cannot be written (a read-only artifacts folder) the missing thumbnails are
    rendered into a scratch folder of this build and dropped after linking.
    """
    if not ids:
        return {}, None
    if not slices_dir or not Path(slices_dir).is_dir():
        return {}, f"thumbnails unavailable: slices artifact folder {slices_dir or '(none)'} not found"
    cache = ThumbCache(slices_dir, size)
    paths: dict[int, str] = {}
    missing = []
    for sid in ids:
        png = cache.read(sid)
        if png is None:
            missing.append(sid)
        else:
            paths[sid] = store.put_file(cache.path(sid), png)
    cache.stats.reused = len(paths)
    scratch = store.folder.parent / ".thumb-render"
    try:
        if missing:
            try:
                cache.render(missing)
            except OSError as exc:
                log.warning("report: thumbnail cache %s not writable (%s); rendering for this build", cache.folder, exc)
                cache.folder = scratch
                cache.render(missing)
            for sid in missing:
                png = cache.read(sid)
                if png is not None:
                    paths[sid] = store.put_file(cache.path(sid), png)
    except MedsaeError as exc:  # e.g. an incomplete slices artifact: the pages say so, the build goes on
        cache.stats.failed.update({sid: str(exc) for sid in missing if sid not in paths})
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    stats = cache.stats
    log.info(
        "report: thumbnails %d from the cache, %d rendered, %d cache files rejected (%s)",
        stats.reused,
        stats.rendered,
        stats.rejected,
        cache.folder,
    )
    if len(paths) < len(ids):
        sid = next(s for s in ids if s not in paths)
        failure = f"slice {sid}: {stats.failed.get(sid, 'not rendered')}"
        log.warning("report: some thumbnails failed (%s)", failure)
        return paths, f"{len(ids) - len(paths)} thumbnail(s) could not be rendered ({failure})"
    return paths, None


def shown_slice_ids(sets: dict[int, dict], n_slices: int) -> list[int]:
    """The slices latent pages show (at most ``n_slices`` per example group): the thumbnails a build needs."""
    no_caption = lambda sid: ([], "")  # noqa: E731 - the groups only, captions are not needed here
    return sorted(
        {s["slice_id"] for lat in sets for g in _slice_groups(lat, sets, n_slices, no_caption, {}) for s in g["slices"]}
    )


class SliceCaptions:
    """slice_id -> (caption lines, tooltip) as the report's cards write them, each computed once.

    ``cards._caption`` reads ``meta.empty``, ``sid in meta.index`` and ``meta.loc[sid].get(field)``;
    plain dicts of the rows answer those as well as a DataFrame, about a hundred times faster, which
    matters for 8,192 pages of 30 slices.
    """

    def __init__(self, meta: pd.DataFrame) -> None:
        self.rows: dict[int, dict[str, Any]] = meta.to_dict("index") if not meta.empty else {}
        self.empty = not self.rows
        self.index = self.loc = self.rows
        self.cache: dict[int, tuple[list[str], str]] = {}

    def __call__(self, sid: int) -> tuple[list[str], str]:
        if sid not in self.cache:
            self.cache[sid] = _caption(self, sid)  # type: ignore[arg-type]
        return self.cache[sid]


def _slice_groups(
    latent: int, sets: dict[int, dict], n_slices: int, captions: SliceCaptions, thumbs: dict[int, str]
) -> list[dict[str, Any]]:
    """The latent's explain set as groups (top, quantile bands, contrasts), strongest first in each."""
    row = sets.get(latent)
    if not row or not row["slice_ids"]:
        return []
    ids = [int(s) for s in row["slice_ids"]]
    acts = list(row["activations"]) if row["activations"] is not None else [0.0] * len(ids)
    roles = list(row["roles"]) if row["roles"] is not None else ["example"] * len(ids)
    groups: dict[str, list[dict[str, Any]]] = {}
    for sid, act, role in sorted(zip(ids, acts, roles, strict=True), key=lambda t: -float(t[1])):
        caption, title = captions(sid)
        groups.setdefault(_role_group(str(role), float(act)), []).append(
            {
                "slice_id": sid,
                "activation": float(act),
                "role": str(role),
                "caption": caption,
                "title": title,
                "img": thumbs.get(sid),
            }
        )
    return [
        {"name": g, "slices": groups[g][:n_slices], "more": groups[g][n_slices:]} for g in GROUP_ORDER if g in groups
    ]


def _write(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")


def build_site(
    registry: Registry,
    experiment: str,
    out_dir: Path,
    n_slices: int = 12,
    thumb_size: int = 128,
    compare_with: list[str] | None = None,
) -> SiteSummary:
    """Write the explorer of ``experiment`` into the folder ``out_dir`` (replacing an earlier explorer there).

    Each latent page shows at most ``n_slices`` slices per example group, as ``thumb_size`` px thumbnails.
    Each experiment of ``compare_with`` gets a page of latents matched by decoder cosine (``compare/``).
    """
    started = time.perf_counter()
    out_dir = Path(out_dir)
    _check_target(out_dir)
    with registry.read() as con:
        exp = gather.load_experiment(con, experiment)
        latents = gather.latents_frame(con, exp)
        explanations = gather.explanations_frame(con, exp)
        scores = gather.scores_frame(con, exp)
        ids = [int(x) for x in latents["latent"]] if not latents.empty else []
        sets = gather.explain_sets(con, exp, ids)
        ground = gather.grounding(con, exp, ids)
        slice_ids = sorted({int(s) for r in sets.values() for s in (r["slice_ids"] or [])})
        meta = gather.slice_metadata(con, exp, slice_ids)
        stages = queries.experiment_stages(con, exp.experiment_id)
        index_data = index_page.gather_index(con, exp)
        others = [crossexp.load_other(con, name) for name in compare_with or []]
    _, compare = compare_experiments(registry, [experiment])
    best, texts = rowlib.headlines(explanations, scores)
    own = crossexp.Side.from_frames(exp, latents, best, texts)
    comparisons = [crossexp.compare_experiment(own, other) for other in others]  # before any file is written
    explainers = crossexp.explainer_comparison(explanations, scores)
    labels = column_labels()
    structures = {lat: str(r["structure"]) for lat, r in ground.rows.items()}
    index = rowlib.index_rows(latents, best, texts, structures)
    notes = [] if ids else ["no latent statistics yet: run the summarize stage to get latent pages"]

    tmp = out_dir.parent / f".{out_dir.name}.building-{secrets.token_hex(4)}"
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except OSError as exc:
        raise MedsaeError(f"{out_dir}: cannot write the explorer: {exc.strerror or exc}") from None
    try:
        (tmp / "latents").mkdir()
        store = ImageStore(tmp)
        shown_ids = shown_slice_ids(sets, n_slices)
        thumbs, thumb_note = _thumbnails(exp.artifact_dir("slices"), shown_ids, thumb_size, store)
        if thumb_note:
            notes.append(thumb_note)
        views = {}
        if ground.rows:
            from medsae.report.grounding import grounding_views

            views = grounding_views(ground, exp.artifact_dir("slices"))
            for v in views.values():
                v.overlay, v.outline, v.bar = (store.put_data_url(u) for u in (v.overlay, v.outline, v.bar))
        codes = _load_codes(exp.artifact_dir("encode"))
        versions = explanation_views(explanations, scores, ids)
        extras = LatentExtras.gather(
            exp.artifact_dir("train"),
            codes,
            exp.artifact_dir("evaluate"),
            {lat: t[1] for lat, t in texts.items()},
            set(ids),
            metrics=index_data.metrics,
        )
        gap_words = scorer_gap_words(scores)
        env = _environment()
        captions = SliceCaptions(meta)
        page = env.get_template("site_latent.html.j2")
        common = {"exp": exp.row, "fmt": format_number}
        for at, latent in enumerate(track(ids, description="latent pages", unit="latents")):
            hist = _histogram(latent, codes, sets)
            shown = {s["scorer_model"] for v in versions.get(latent, []) for s in v.scores}
            _write(
                tmp / "latents" / f"{latent}.html",
                page.render(
                    **common,
                    row=index[at],
                    headline=rowlib.headline(best, texts, latent),
                    versions=versions.get(latent, []),
                    groups=_slice_groups(latent, sets, n_slices, captions, thumbs),
                    legend=CAPTION_LEGEND,
                    hist_img=store.put(hist[0]) if hist else None,
                    hist=hist[1] if hist else None,
                    grounding=views.get(latent),
                    gap_words=[w for sc in sorted(shown, key=str) for w in gap_words.get(sc, [])],
                    prev=ids[at - 1] if at > 0 else None,
                    next=ids[at + 1] if at + 1 < len(ids) else None,
                    thumb_note=thumb_note,
                    extras=extras.page(latent),
                ),
            )
        data = {"experiment": exp.name, "columns": list(rowlib.INDEX_COLUMNS), "rows": index}
        text = json.dumps(data, ensure_ascii=True, allow_nan=False)
        _write(tmp / "latents.json", text)
        _write(tmp / "latents.js", f"window.MEDSAE_LATENTS = {text};\n")
        _write(tmp / "explorer.js", env.get_template("site_explorer.js.j2").render(row_limit=ROW_LIMIT))
        _write(tmp / "site.css", env.get_template("site.css.j2").render())
        extra_pages = crossexp.write_pages(tmp, env, common, comparisons, explainers, set(ids))
        _write(
            tmp / "index.html",
            env.get_template("site_index.html.j2").render(
                **common,
                **index_page.index_vars(
                    index_data, compare[0] if compare else {}, labels, latents, scores, store, exp.name
                ),
                n_latents=len(index),
                n_firing=sum(1 for r in index if (r["frequency"] or 0) > 0),
                n_explained=sum(1 for r in index if r["explanation"] is not None),
                stages=[s for s in stages if s.get("status")],
                notes=notes,
                built_at=time.strftime("%Y-%m-%d %H:%M %Z"),
                format_time=format_time,
                extra_pages=extra_pages,
            ),
        )
        _write(tmp / MARKER, f"medsae latent explorer of {exp.name}\n")
        _swap(tmp, out_dir)
    except OSError as exc:  # disk full, permissions: one line, and no half-built folder left behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise MedsaeError(f"{out_dir}: cannot write the explorer: {exc.strerror or exc}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    size = sum(f.stat().st_size for f in out_dir.rglob("*") if f.is_file())
    return SiteSummary(out_dir, len(ids), len(store.written), size, time.perf_counter() - started, notes)


def _swap(tmp: Path, out_dir: Path) -> None:
    """Put the finished folder ``tmp`` at ``out_dir``; an earlier explorer there is removed after the swap."""
    old = None
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{secrets.token_hex(4)}"
        os.replace(out_dir, old)
    try:
        os.replace(tmp, out_dir)
    except OSError as exc:
        if old is not None:
            os.replace(old, out_dir)
        raise MedsaeError(f"{out_dir}: cannot write the explorer: {exc.strerror or exc}") from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
