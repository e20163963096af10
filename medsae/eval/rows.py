"""Evaluation results -> registry ``metrics`` rows. Every metric name the evaluate stage writes is here.

Columns: T = ``target``, N = ``n_features`` ("-" = NULL). All rows carry their ``split``
(timings: NULL).

Dead latents are counted in three places, always as "never fires on any slice of a set", and the
set is the row's ``split``: the train stage's ``dead_fraction`` (split ``train``), this stage's
``dead_fraction`` (``val``, ``test``) and the summarize stage's ``latents_dead`` (the explanation
pool, e.g. ``test+val``). Show them with their split and definition
(``medsae.report.names.metric_definition``).

=================================  ======  ====  ===============================================
name                               T       N     meaning
=================================  ======  ====  ===============================================
n_slices                           -       -     rows of the split
fvu, variance_explained            -       -     per-dimension-mean FVU and 1 - FVU
r2_scalar_mean_study               -       -     the study's R² (scalar mean, per 2048-batch)
mse, cosine_sim                    -       -     reconstruction MSE, mean cosine
l0_mean, l0_std, l0_min, l0_max,   -       -     L0 distribution (pQ: quantile Q %,
l0_p1, l0_p10, l0_p50, l0_p90,                   Q = 1, 10, 50, 90, 99)
l0_p99
dead_fraction, n_dead              -       -     share / number of latents that never fire
                                                 (activation > 1e-8) on any slice of the split
dense_fraction, n_dense            -       -     latents firing on > 10 % of it
alive_per_batch_study              -       -     the study's alive count: latents firing in a
                                                 2048-slice batch, mean over batches (a count,
                                                 not a dead-latent measure)
probe_auc_dense, probe_auc_sparse  target  -     ROC-AUC; multiclass: macro one-vs-rest, and
                                                 ``name=class`` rows per class
probe_auc_{dense,sparse}_mean      -       -     mean over leaf tasks with dense AUC > 0.6
                                                 (protocol study: targets ``group=class``,
                                                 dense AUC >= 0.6, as the study's figure)
probe_n_nonzero_{dense,sparse}     target  -     features used (split 'train')
recovery_auc                       task    N     AUC with the top-N latents
recovery                           task    N     AUC(N) / AUC_dense (the study's)
recovery_chance_adjusted           task    N     (AUC(N) - .5) / (AUC_dense - .5)
recovery_n_features_XXpct          task    -     smallest N reaching XX % (NULL: never)
recovery_auc_mean, recovery_mean,  -       N     means over tasks with dense AUC > 0.6
recovery_chance_adjusted_mean
recovery_mean_n_features_XXpct     -       -     mean N to reach XX % (never -> 100)
recovery_mean_n_features           -       -     the study's ranking quantity (docs/method.md#ranking)
mono_config_top10                  -       -     mean of the 10 largest M_10 (study code)
monosemanticity_top50_mean         -       -     mean of the 50 largest M_10 (shipped ranking)
coherence_score, specificity_score -       -     further aggregates (docs/method.md#monosemanticity)
breadth_score, n_features_scored,  -       -
n_features_above_null,
mono_null_10, mono_null_50
fingerprint_quality_sparse,        -       K     the study's dense-space quality
fingerprint_quality_dense_fp
fingerprint_quality_dense          -       -     the same for dense retrieval
fingerprint_relative_sparse,       -       K     mean per-reference ratio to dense
fingerprint_relative_dense_fp
retrieval_precision_sparse,        label   K     label precision@top: label = modality, plane,
retrieval_precision_dense_fp                     body_region; 'structures' = mean Jaccard of
retrieval_precision_dense          label   -     the structure sets; 'chance' = a random
retrieval_precision_chance         label   -     one-slice-per-scan retrieval
seconds_<part>, seconds_total      -       -     wall time of one part
=================================  ======  ====  ===============================================
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from medsae.eval.probes import MEAN_MIN_DENSE_AUC, ProbeResult
from medsae.eval.recovery import RecoveryCurve, mean_n_features_study
from medsae.eval.study_probes import GroupProbe
from medsae.stage import Metric


def _v(value: float) -> float | None:
    value = float(value)
    return value if np.isfinite(value) else None


def scalar_rows(split: str | None, values: dict[str, float], n: int | None = None) -> list[Metric]:
    """One row per ``name -> value`` (target and n_features NULL)."""
    return [Metric(name=k, value=_v(v), split=split, n=n) for k, v in values.items()]


def probe_rows(
    results: Sequence[ProbeResult], splits: Sequence[str], min_dense_auc: float = MEAN_MIN_DENSE_AUC
) -> list[Metric]:
    out: list[Metric] = []
    for r in results:
        name = f"probe_auc_{r.features}"
        out.append(
            Metric(
                f"probe_n_nonzero_{r.features}",
                float(np.count_nonzero(np.any(r.coef != 0, axis=1))),
                split="train",
                n=r.n_train,
                target=r.target.name,
                extra={"n_iter": r.fit.n_iter, "converged": r.fit.converged, "d": r.n_features},
            )
        )
        for split in splits:
            sc = r.scores.get(split)
            if sc is None:
                continue
            out.append(Metric(name, _v(sc["auc"]), split=split, n=sc["n"], target=r.target.name))
            if r.target.multiclass:
                y_counts = sc.get("n")
                for cls, auc in zip(r.target.classes, sc["per_class"], strict=True):
                    out.append(Metric(name, _v(auc), split=split, n=y_counts, target=f"{r.target.name}={cls}"))
    for split in splits:
        dense = {}
        for r in results:
            if r.features == "dense":
                dense.update(r.leaf_aucs(split))
        keep = {t for t, a in dense.items() if np.isfinite(a) and a > min_dense_auc}
        for features in ("dense", "sparse"):
            values = [
                a
                for r in results
                if r.features == features
                for t, a in r.leaf_aucs(split).items()
                if t in keep and np.isfinite(a)
            ]
            if values:
                out.append(Metric(f"probe_auc_{features}_mean", float(np.mean(values)), split=split, n=len(values)))
    return out


def study_probe_rows(
    probes: Sequence[GroupProbe], splits: Sequence[str], min_dense_auc: float = MEAN_MIN_DENSE_AUC
) -> list[Metric]:
    """The study protocol's probe rows: per group ``probe_n_nonzero_*`` (target = group), per target
    ``probe_auc_*`` (target = ``group=class``), and the means over targets whose dense AUC is at
    least ``min_dense_auc`` (the study's figure keeps dense >= 0.6; a target without an AUC is left
    out), where a two-class group counts twice, as in the study."""
    out: list[Metric] = []
    for p in probes:
        out.append(
            Metric(
                f"probe_n_nonzero_{p.features}",
                float(p.n_nonzero),
                split="train",
                n=p.n_train,
                target=p.group.group,
                extra={"n_iter": p.fit.n_iter, "converged": p.fit.converged, "d": p.n_features},
            )
        )
        for split in splits:
            for name, auc in p.aucs.get(split, {}).items():
                out.append(
                    Metric(f"probe_auc_{p.features}", _v(auc), split=split, n=p.counts[split][name], target=name)
                )
    for split in splits:
        dense = {t: a for p in probes if p.features == "dense" for t, a in p.aucs.get(split, {}).items()}
        keep = {t for t, a in dense.items() if np.isfinite(a) and a >= min_dense_auc}
        for features in ("dense", "sparse"):
            values = [
                a
                for p in probes
                if p.features == features
                for t, a in p.aucs.get(split, {}).items()
                if t in keep and np.isfinite(a)
            ]
            if values:
                out.append(Metric(f"probe_auc_{features}_mean", float(np.mean(values)), split=split, n=len(values)))
    return out


def recovery_rows(
    curves: Sequence[RecoveryCurve],
    splits: Sequence[str],
    thresholds: Sequence[float],
    min_dense_auc: float = MEAN_MIN_DENSE_AUC,
) -> list[Metric]:
    out: list[Metric] = []
    for split in splits:
        have = [c for c in curves if split in c.auc]
        for c in have:
            for n, auc, ratio, adj in zip(c.ns, c.auc[split], c.ratios(split), c.chance_adjusted(split), strict=True):
                out.append(Metric("recovery_auc", _v(auc), split=split, target=c.task, n_features=n, n=c.n_train))
                out.append(Metric("recovery", _v(ratio), split=split, target=c.task, n_features=n))
                out.append(Metric("recovery_chance_adjusted", _v(adj), split=split, target=c.task, n_features=n))
            for thr in thresholds:
                out.append(
                    Metric(
                        f"recovery_n_features_{round(thr * 100)}pct",
                        _v(c.n_to_reach(split, thr)),
                        split=split,
                        target=c.task,
                    )
                )
        kept = [c for c in have if np.isfinite(c.dense_auc.get(split, np.nan)) and c.dense_auc[split] > min_dense_auc]
        if not kept:
            continue
        all_ns = sorted(set.intersection(*(set(c.ns) for c in kept)))  # N of every curve (not n_nonzero)
        for name, getter in (
            ("recovery_auc_mean", lambda c, split=split: c.auc[split]),
            ("recovery_mean", lambda c, split=split: c.ratios(split)),
            ("recovery_chance_adjusted_mean", lambda c, split=split: c.chance_adjusted(split)),
        ):
            for n in all_ns:
                vals = [v for c in kept for cn, v in zip(c.ns, getter(c), strict=True) if cn == n and np.isfinite(v)]
                if vals:
                    out.append(Metric(name, float(np.mean(vals)), split=split, n_features=n, n=len(vals)))
        table = np.array([[c.n_to_reach(split, thr) for thr in thresholds] for c in kept])
        for j, thr in enumerate(thresholds):
            col = np.where(np.isfinite(table[:, j]), table[:, j], 100.0)
            out.append(
                Metric(
                    f"recovery_mean_n_features_{round(thr * 100)}pct",
                    float(col.mean()),
                    split=split,
                    n=len(kept),
                )
            )
        out.append(Metric("recovery_mean_n_features", _v(mean_n_features_study(table)), split=split, n=len(kept)))
    return out


def retrieval_rows(
    split: str, ks: Sequence[int], quality: dict[str, dict], precision: dict[str, dict], n_refs: int
) -> list[Metric]:
    """``quality[method][K or None] -> per-reference array``; ``precision[method][(label, K)] -> array``."""
    out: list[Metric] = []
    dense = quality.get("dense", {}).get(None)
    for method, per_k in quality.items():
        for k, q in per_k.items():
            ok = np.isfinite(q)
            out.append(
                Metric(
                    f"fingerprint_quality_{method}",
                    _v(np.mean(q[ok])) if ok.any() else None,
                    split=split,
                    n_features=k,
                    n=int(ok.sum()),
                    extra={"std": _v(np.std(q[ok])) if ok.any() else None},
                )
            )
            if method != "dense" and dense is not None:
                with np.errstate(invalid="ignore", divide="ignore"):  # references without a dense retrieval: NaN
                    ratio = q / dense
                ok = np.isfinite(ratio)
                out.append(
                    Metric(
                        f"fingerprint_relative_{method}",
                        _v(np.mean(ratio[ok])) if ok.any() else None,
                        split=split,
                        n_features=k,
                        n=int(ok.sum()),
                    )
                )
    for method, per in precision.items():
        for (label, k), p in per.items():
            ok = np.isfinite(p)
            out.append(
                Metric(
                    f"retrieval_precision_{method}",
                    _v(np.mean(p[ok])) if ok.any() else None,
                    split=split,
                    target=label,
                    n_features=k,
                    n=int(ok.sum()),
                )
            )
    return out
