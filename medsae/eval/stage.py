"""The evaluate stage: every number of the evaluation suite for one trained and encoded SAE.

Inputs (``ctx.inputs``): ``slices`` (labels, splits, structure presence), ``embed`` (raw
embeddings), ``train`` (the SAE: its input normalisation and decoder), ``encode`` (sparse codes of
every slice). Per split in ``eval.splits``: reconstruction (the stored codes decoded, compared with
the normalised embeddings, streamed in chunks), sparsity, probes (fitted on the train split),
performance recovery, monosemanticity and retrieval. Every number is returned as a
:class:`~medsae.stage.Metric` (names: :mod:`medsae.eval.rows`) and written to ``metrics.json``;
plots go to ``plots/*.png``, per-latent and per-task tables to CSV / parquet, the sparse-code probes'
non-zero weights to ``probe_weights.parquet`` (:mod:`medsae.eval.probe_weights`; the latent explorer shows them).

``eval.protocol: study`` runs the same metrics under the study's protocol (docs/method.md#study-protocol):
rows in the study's order (R² and alive batches, sub-samples, the reference draw), scans keyed by
``image_id`` alone, the study's probe groups and group coefficient tables
(:mod:`medsae.eval.study_probes`, :mod:`medsae.eval.study_recovery`) and its padded fingerprints.
Targets the data cannot support are skipped and named in one warning line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from medsae import plots
from medsae.data.index import load_slices, presence_matrix
from medsae.embed.store import open_embeddings
from medsae.errors import MissingInputError
from medsae.eval import metrics as M
from medsae.eval import mono, probe_weights, probes, recovery, retrieval, rows, study_probes, study_recovery
from medsae.eval.config import EvalSpec, ProbeTargetDef
from medsae.eval.logreg import resolve_device
from medsae.eval.targets import Skip, medsae_targets, skip_line, study_groups, study_order
from medsae.sae.checkpoint import load_sae
from medsae.sae.codes import load_codes
from medsae.sae.stage import trained_on
from medsae.sparse import torch_csr
from medsae.stage import Metric, StageContext, StageResult

CODE_VERSION = "1"
log = logging.getLogger("medsae")

RETRIEVAL_LABELS = ("modality", "plane", "body_region")


class _Timer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def part(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def _positions(slice_ids: np.ndarray, n: int, what: str, where: Path) -> np.ndarray:
    """slice_id -> row of an artifact; every slice must be present."""
    pos = np.full(n, -1, dtype=np.int64)
    ids = np.asarray(slice_ids, dtype=np.int64)
    if len(ids) and (ids.min() < 0 or ids.max() >= n):
        raise MissingInputError(f"{where}: {what} holds slice ids outside 0..{n - 1}; was it made from these slices?")
    pos[ids] = np.arange(len(ids))
    missing = int((pos < 0).sum())
    if missing:
        raise MissingInputError(f"{where}: {what} lacks {missing} of {n} slices; rerun that stage")
    return pos


@dataclasses.dataclass
class _Data:
    slices: pd.DataFrame
    presence: sp.csr_matrix
    vocab: list[str]
    store: Any
    emb_pos: np.ndarray
    codes: sp.csr_matrix  # row = slice_id
    sae: Any
    scan: np.ndarray  # scan key per slice ('ct/s0001')


def _load(ctx: StageContext, device: str, study: bool = False) -> _Data:
    for kind in ("slices", "embed", "train", "encode"):
        if kind not in ctx.inputs:
            raise MissingInputError(f"evaluate stage {ctx.key[:12]}: missing upstream input '{kind}'")
    slices = load_slices(ctx.inputs["slices"]).sort_values("slice_id").reset_index(drop=True)
    n = len(slices)
    if not np.array_equal(slices["slice_id"].to_numpy(), np.arange(n)):
        raise MissingInputError(f"{ctx.inputs['slices']}: slice_id is not 0..n-1")
    presence, vocab = presence_matrix(ctx.inputs["slices"])
    store = open_embeddings(ctx.inputs["embed"])
    emb_pos = _positions(store.slice_ids, n, "the embedding store", ctx.inputs["embed"])
    codes, code_ids = load_codes(ctx.inputs["encode"])
    code_pos = _positions(code_ids, n, "the sparse codes", ctx.inputs["encode"])
    codes = sp.csr_matrix(codes, dtype=np.float32)
    if not np.array_equal(code_pos, np.arange(n)):
        codes = codes[code_pos]
    sae = load_sae(ctx.inputs["train"], device=device)
    if study:  # the study keyed scans by image_id alone, which CT and MRI reuse (docs/method.md#problem-24)
        scan = slices["image_id"].astype(str).to_numpy()
    else:
        scan = (slices["modality"].astype(str) + "/" + slices["image_id"].astype(str)).to_numpy()
    return _Data(slices, sp.csr_matrix(presence), list(vocab), store, emb_pos, codes, sae, scan)


def _reconstruction(data: _Data, split_rows: np.ndarray, spec: EvalSpec, device: str) -> dict[str, float]:
    import torch

    stats = M.ReconstructionStats(batch=spec.study_batch)
    chunk = max(1, spec.chunk_rows // spec.study_batch) * spec.study_batch
    with torch.no_grad():
        for start in range(0, len(split_rows), chunk):
            part = split_rows[start : start + chunk]
            x_raw = torch.from_numpy(data.store.load(data.emb_pos[part]).astype(np.float32)).to(device)
            x_in = data.sae.normalize(x_raw)
            x_hat = data.sae.decode(torch_csr(data.codes[part], device))
            stats.update(x_in.float().cpu().numpy(), x_hat.float().cpu().numpy())
    return stats.result()


def _label_codes(values: pd.Series) -> np.ndarray:
    """Integer codes of a label column; -1 for missing values."""
    return pd.factorize(values, sort=True)[0].astype(np.int64)


def _retrieval(data: _Data, split: str, split_rows: np.ndarray, spec: EvalSpec) -> list[Metric]:
    codes = data.codes[split_rows]
    emb = data.store.load(data.emb_pos[split_rows]).astype(np.float32)
    scans = retrieval.ScanIndex.build(data.scan[split_rows])
    ks, top = list(spec.retrieval_ks), spec.retrieval_top
    study = spec.protocol == "study"
    if study:
        refs = retrieval.study_reference_rows(len(split_rows), spec.retrieval_refs)
        sparse = retrieval.study_sparse_fingerprint_retrieval(codes, refs, scans, ks, top)
    else:
        refs = retrieval.reference_rows(len(split_rows), spec.retrieval_refs, spec.seed)
        sparse = retrieval.sparse_fingerprint_retrieval(codes, refs, scans, ks, top)
    found: dict[str, dict] = {"sparse": sparse}
    if spec.retrieval_dense_fp:
        found["dense_fp"] = retrieval.dense_fingerprint_retrieval(emb, refs, scans, ks, top, study_ties=study)
    found["dense"] = {None: retrieval.dense_retrieval(emb, refs, scans, top)}
    sub = data.slices.iloc[split_rows]
    labels = {name: _label_codes(sub[name]) for name in RETRIEVAL_LABELS if name in sub}
    pres = data.presence[split_rows].toarray() > 0
    quality: dict[str, dict] = {}
    precision: dict[str, dict] = {}
    for method, per_k in found.items():
        quality[method] = {k: retrieval.dense_space_quality(emb, refs, got) for k, got in per_k.items()}
        precision[method] = {}
        for k, got in per_k.items():
            for name, lab in labels.items():
                precision[method][(name, k)] = retrieval.label_agreement(lab, refs, got)
            precision[method][("structures", k)] = retrieval.structure_jaccard(pres, refs, got)
    precision["chance"] = {
        (name, None): retrieval.chance_label_agreement(lab, refs, scans) for name, lab in labels.items()
    }
    precision["chance"][("structures", None)] = retrieval.chance_structure_jaccard(pres, refs, scans, seed=spec.seed)
    return rows.retrieval_rows(split, ks, quality, precision, len(refs))


def run_evaluate(ctx: StageContext) -> StageResult:
    """Compute every evaluation metric of one SAE; see the module docstring."""
    spec = ctx.section(EvalSpec)
    study = spec.protocol == "study"
    device = resolve_device(spec.device)
    timer = _Timer()
    with timer.part("load"):
        data = _load(ctx, device, study)
    out_dir = Path(ctx.out_dir)
    plot_dir = out_dir / "plots"
    split_col = data.slices["split"].to_numpy()
    splits = [s for s in spec.splits if (split_col == s).any()]
    split_rows = {s: np.flatnonzero(split_col == s) for s in splits}
    train_rows = np.flatnonzero(split_col == "train")
    if study:  # the study's row order: its R² and alive batches, sub-samples and reference draw follow it
        split_rows = {s: study_order(data.slices, r) for s, r in split_rows.items()}
        train_rows = study_order(data.slices, train_rows)
    notes: dict[str, Any] = {"protocol": "study"} if study else {}
    # a token SAE rebuilds tokens, not the pooled vector: its reconstruction is the train stage's token FVU
    token_sae = trained_on(ctx.inputs["train"]) == "tokens"
    if token_sae:
        notes["reconstruction"] = "skipped: a token SAE (sae.input tokens); see the train stage's token fvu"
    metrics: list[Metric] = [Metric("n_slices", float(len(split_rows.get(s, []))), split=s) for s in spec.splits]
    d_sae = data.codes.shape[1]

    for split, srows in ctx.progress(split_rows.items(), total=len(split_rows), description="evaluate: reconstruction"):
        if not token_sae:
            with timer.part("reconstruction"):
                metrics += rows.scalar_rows(split, _reconstruction(data, srows, spec, device), n=len(srows))
        with timer.part("sparsity"):
            codes = data.codes[srows]
            counts = M.latent_fire_counts(codes)
            values = M.l0_summary(M.l0_per_sample(codes))
            values.update(
                dead_fraction=M.dead_fraction(counts),
                dense_fraction=M.dense_fraction(counts, len(srows), spec.dense_threshold),
                n_dead=float((counts == 0).sum()),
                n_dense=float((counts / len(srows) > spec.dense_threshold).sum()),
                alive_per_batch_study=M.alive_per_batch_study(codes, spec.study_batch),
            )
            metrics += rows.scalar_rows(split, values, n=len(srows))
        if spec.plots:
            with timer.part("plots"):
                figure = plots.latent_frequency(counts / len(srows), spec.dense_threshold, title=f"{split}:")
                plots.save_png(figure, plot_dir / f"latent_frequency_{split}.png")

    settings = probes.ProbeSettings(
        C=spec.probe_C,
        l1_ratio=spec.probe_l1_ratio,
        max_iter=spec.probe_max_iter,
        tol=spec.probe_tol,
        max_train=spec.probe_max_train,
        backend=spec.probe_backend,
        device=device,
        seed=spec.seed,
        threads=spec.threads,
    )
    results: list[probes.ProbeResult] = []
    group_results: list[study_probes.GroupProbe] = []
    curves: list[recovery.RecoveryCurve] = []
    if (spec.probes or spec.recovery) and len(train_rows) and splits:
        sources = {
            "dense": lambda r: data.store.load(data.emb_pos[r]).astype(np.float32),
            "sparse": data.codes,
        }
        definitions = [t for t in spec.probe_targets if isinstance(t, ProbeTargetDef)]
        skipped: list[Skip]
        with timer.part("probes"):
            if study:
                groups, skipped = study_groups(definitions, data.slices, data.presence, data.vocab, train_rows)
                group_results = study_probes.run_group_probes(groups, train_rows, split_rows, sources, settings)
                coef_tables = study_probes.coefficient_tables(group_results)  # interpret.protocol study reads them
                coef_tables.to_parquet(out_dir / "coefficients_sparse.parquet", index=False)
                metrics += rows.study_probe_rows(group_results, splits, spec.mean_min_dense_auc)
                probe_weights.write_weights(probe_weights.weights_table(groups=group_results), out_dir)
            else:
                builtin = [t for t in spec.probe_targets if isinstance(t, str)]
                targets = probes.build_targets(data.slices, builtin, data.presence, data.vocab, spec.probe_structures)
                defined, skipped = medsae_targets(definitions, data.slices, data.presence, data.vocab)
                targets = probes.select_targets(targets + defined, train_rows, spec.probe_min_positives)
                strata = _label_codes(data.slices["modality"].astype(str) + "/" + data.slices["plane"].astype(str))
                results = probes.run_probes(targets, train_rows, split_rows, sources, settings, strata)
                metrics += rows.probe_rows(results, splits, spec.mean_min_dense_auc)
                probe_weights.write_weights(probe_weights.weights_table(results=results), out_dir)
        line = skip_line(skipped, spec.protocol)
        if line:
            log.warning("%s", line)
            notes["skipped_probe_targets"] = line
        if spec.recovery:
            with timer.part("recovery"):
                rec_settings = dataclasses.replace(
                    settings, max_iter=spec.recovery_max_iter, max_train=spec.recovery_max_train
                )
                select = "val" if "val" in splits else splits[0]
                if study:
                    curves, inexact = study_recovery.run_study_recovery(
                        [r for r in group_results if r.features == "sparse"],
                        {s: study_probes.dense_aucs(group_results, s) for s in splits},
                        train_rows,
                        split_rows,
                        data.codes,
                        rec_settings,
                        spec.recovery_ns,
                        spec.recovery_min_dense_auc,
                        select,
                    )
                    inexact += [r.group.group for r in group_results if not r.exact_subsample]
                    if inexact:
                        notes["subsample_not_study"] = sorted(set(inexact))
                        log.warning(
                            "evaluate (study protocol): a stratum too small for the study's sub-sample of %s; "
                            "medsae's stratified sub-sample used",
                            ", ".join(sorted(set(inexact))),
                        )
                else:
                    dense_auc = {s: probes.dense_auc_table(results, s) for s in splits}
                    curves = recovery.run_recovery(
                        [r for r in results if r.features == "sparse"],
                        dense_auc,
                        train_rows,
                        split_rows,
                        data.codes,
                        rec_settings,
                        spec.recovery_ns,
                        spec.recovery_min_dense_auc,
                        select,
                    )
                metrics += rows.recovery_rows(curves, splits, spec.recovery_thresholds, spec.mean_min_dense_auc)
                _write_curves(curves, splits, out_dir / "recovery_curves.csv")
        if spec.plots:
            with timer.part("plots"):
                for split in splits:
                    plots.save_png(plots.recovery_curves(metrics, [split]), plot_dir / f"recovery_{split}.png")
                    table = _study_auc_table(group_results, split) if study else _auc_table(results, split)
                    figure = plots.probe_aucs(table, title=f"linear probes ({split})")
                    plots.save_png(figure, plot_dir / f"probe_auc_{split}.png")

    if spec.monosemanticity:
        with timer.part("monosemanticity"):
            mono_settings = mono.MonoSettings(
                top_ns=tuple(spec.mono_top_ns),
                min_images=spec.mono_min_images,
                null_draws=spec.mono_null_draws,
                seed=spec.seed,
            )
            for split, srows in split_rows.items():
                frame, nulls = mono.latent_scores(
                    data.codes[srows], data.presence[srows], data.scan[srows], mono_settings
                )
                frame.to_parquet(out_dir / f"mono_latents_{split}.parquet", index=False)
                values = mono.config_scores(frame, nulls, base=spec.mono_top_ns[0])
                metrics += rows.scalar_rows(split, values, n=len(srows))

    if spec.retrieval:
        with timer.part("retrieval"):
            for split, srows in split_rows.items():
                metrics += _retrieval(data, split, srows, spec)

    metrics += [Metric(f"seconds_{part}", sec) for part, sec in timer.seconds.items()]
    metrics.append(Metric("seconds_total", sum(timer.seconds.values())))
    _write_json(metrics, out_dir / "metrics.json")
    return StageResult(metrics=metrics, summary=_summary(metrics, d_sae) | notes, device=device)


def _auc_table(results: list[probes.ProbeResult], split: str) -> pd.DataFrame:
    table: dict[str, dict[str, float]] = {}
    for r in results:
        for task, auc in r.leaf_aucs(split).items():
            table.setdefault(task, {})[r.features] = auc
    return pd.DataFrame(
        [{"target": t, "dense": v.get("dense", np.nan), "sparse": v.get("sparse", np.nan)} for t, v in table.items()]
    )


def _study_auc_table(results: list[study_probes.GroupProbe], split: str) -> pd.DataFrame:
    table: dict[str, dict[str, float]] = {}
    for r in results:
        for task, auc in r.aucs.get(split, {}).items():
            table.setdefault(task, {})[r.features] = auc
    return pd.DataFrame(
        [{"target": t, "dense": v.get("dense", np.nan), "sparse": v.get("sparse", np.nan)} for t, v in table.items()]
    )


def _write_curves(curves: list[recovery.RecoveryCurve], splits: list[str], path: Path) -> None:
    records = [
        {
            "task": c.task,
            "split": s,
            "n_features": n,
            "auc": a,
            "dense_auc": c.dense_auc.get(s),
            "recovery": r,
        }
        for c in curves
        for s in splits
        if s in c.auc
        for n, a, r in zip(c.ns, c.auc[s], c.ratios(s), strict=True)
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(records).to_csv(path, index=False)


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _write_json(metrics: list[Metric], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    records = [{k: _clean(v) for k, v in dataclasses.asdict(m).items()} for m in metrics]
    path.write_text(json.dumps(records, indent=1, default=str))


def _summary(metrics: list[Metric], d_sae: int) -> dict[str, Any]:
    wanted = (
        "fvu",
        "r2_scalar_mean_study",
        "l0_mean",
        "dead_fraction",
        "probe_auc_dense_mean",
        "probe_auc_sparse_mean",
        "mono_config_top10",
        "recovery_mean_n_features",
    )
    out: dict[str, Any] = {"d_sae": d_sae}
    for m in metrics:
        if m.name in wanted and m.split == "val" and m.target is None and m.n_features is None:
            out[m.name] = m.value
        if m.name == "seconds_total":
            out["seconds"] = round(m.value, 2)
    return out
