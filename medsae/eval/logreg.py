"""Elastic-net logistic regression, the study's probe classifier, with two interchangeable backends.

Objective (identical to scikit-learn's ``LogisticRegression(C, l1_ratio, class_weight='balanced')``
divided by the constant ``C·n``)::

    F(W, b) = (1/n) Σ_i s_i ℓ_i(W, b) + α [ (1-ρ)/2 ‖W‖²_F + ρ ‖W‖_1 ],   α = 1 / (C n),  ρ = l1_ratio

over the ``n`` labelled training rows, with balanced weights ``s_i = n / (K · n_{y_i})`` and the
intercept ``b`` unpenalised. ``ℓ_i`` is the binary cross-entropy of ``sigmoid(x_i w + b)`` for a
binary problem and the softmax cross-entropy for a multinomial one (scikit-learn's multinomial
``saga`` fit of the study, docs/method.md#probes).

* ``backend="torch"``: full-batch FISTA (accelerated proximal gradient) with adaptive restart, the
  prox of the L1 part being soft-thresholding. Many binary problems sharing one design matrix (all
  structure targets, all top-N subsets of a recovery curve) are solved together as the columns of
  one weight matrix; each column has its own step size (``1/L``, ``L`` from power iteration on the
  weighted Gram matrix) and restart. The features are centred *implicitly* (``x - μ`` with the
  intercept absorbing ``μ·w``): this leaves the optimisation problem unchanged (the intercept is
  free) but removes the huge mean direction of raw, unscaled embeddings from the curvature, which
  is what makes plain gradient steps slow there. Dense or sparse (CSR) inputs; runs on the GPU when
  asked. Stops when ``max |ΔW| <= tol · max |W|`` per problem (scikit-learn's saga criterion, per
  FISTA step) or after ``max_iter`` steps.
* ``backend="sklearn"``: scikit-learn's ``saga``, the study's solver, one problem at a time.

Measured (``bench/eval.py --solvers``, 2 shared CPU cores, one binary target, 10,000 train rows,
``max_iter`` 1000 as the study): dense raw 1024-d embeddings, torch 23.6 s vs saga 264.5 s (neither
reaches the tolerance: the problem is nearly separable and barely regularised, ``α = 1e-4``; both
give held-out AUC 1.000); sparse 8192-d codes with L0 40, torch 1.1 s (converged at 250 steps)
vs saga 21.0 s. So the torch solver is the default; a full probe run (68 targets, dense and
sparse, structures batched) takes about 4 minutes on this CPU and is a few seconds' work on a GPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from medsae.sparse import torch_csr

Matrix = np.ndarray | sp.spmatrix

#: torch CPU threads of a fit (None = torch's setting). One thread by default: the fits are many
#: small matrix products, and with two or more threads they slowed down 2-6x whenever other
#: processes competed for the cores (measured on the 2-core machine: 10,000 x 1,024 x 32 problems,
#: 40 ms per step on one thread vs 235 ms on two under load). Raise it on a dedicated machine.
DEFAULT_THREADS: int | None = 1


@dataclass
class LogRegFit:
    """Fitted weights. ``coef[:, t]`` / ``intercept[t]``: column ``t`` is one binary problem
    (``multinomial=False``) or one class of a softmax (``multinomial=True``)."""

    coef: np.ndarray  # [d, T]
    intercept: np.ndarray  # [T]
    multinomial: bool
    n_iter: int
    converged: bool

    def decision(self, x: Matrix) -> np.ndarray:
        """Logits ``x @ coef + intercept`` ``[n, T]`` (float64)."""
        out = x @ self.coef.astype(np.float64)
        return np.asarray(out) + self.intercept[None, :]

    def predict_proba(self, x: Matrix) -> np.ndarray:
        """Sigmoid per column (binary problems) or softmax over columns (multinomial)."""
        z = self.decision(x)
        if self.multinomial:
            z = z - z.max(axis=1, keepdims=True)
            e = np.exp(z)
            return e / e.sum(axis=1, keepdims=True)
        return 1.0 / (1.0 + np.exp(-z))

    @property
    def n_nonzero(self) -> int:
        """Features with a non-zero coefficient in any column (the study's ``n_nonzero``)."""
        return int(np.count_nonzero(np.any(self.coef != 0, axis=1)))


def balanced_weights(y: np.ndarray, n_classes: int) -> np.ndarray:
    """``s_i = n / (K · n_{y_i})`` over rows with ``y_i >= 0`` (scikit-learn's ``'balanced'``);
    0 for unlabelled rows (``y_i < 0``) and for classes absent from ``y``."""
    y = np.asarray(y)
    lab = y >= 0
    counts = np.bincount(y[lab], minlength=n_classes).astype(np.float64)
    present = counts > 0
    w = np.zeros(len(y), dtype=np.float64)
    if lab.any():
        per_class = np.zeros(n_classes)
        per_class[present] = lab.sum() / (present.sum() * counts[present])
        w[lab] = per_class[y[lab]]
    return w


def resolve_device(device: str = "auto") -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# -- public entry points -----------------------------------------------------------------------


def fit_binary(
    x: Matrix,
    y: np.ndarray,
    *,
    C: float = 1.0,
    l1_ratio: float = 0.5,
    max_iter: int = 1000,
    tol: float = 1e-4,
    feature_mask: np.ndarray | None = None,
    backend: str = "torch",
    device: str = "auto",
    seed: int = 42,
    threads: int | None = DEFAULT_THREADS,
) -> LogRegFit:
    """Fit ``T`` independent binary problems sharing ``x [n, d]``.

    ``y [n, T]`` (or ``[n]``) holds 1 / 0 / -1 (unlabelled: weight 0). ``feature_mask [d, T]``
    restricts column ``t`` to the features where it is true (other coefficients stay 0).
    """
    y = np.asarray(y)
    if y.ndim == 1:
        y = y[:, None]
    if feature_mask is not None and feature_mask.ndim == 1:
        feature_mask = feature_mask[:, None]
    weights = np.stack([balanced_weights(y[:, t], 2) for t in range(y.shape[1])], axis=1)
    if backend == "sklearn":
        return _sklearn_binary(x, y, C, l1_ratio, max_iter, tol, feature_mask, seed)
    if backend != "torch":
        raise ValueError(f"unknown probe backend {backend!r} (torch or sklearn)")
    target = np.where(y > 0, 1.0, 0.0)
    return _torch_fit(
        x, target, weights, False, C, l1_ratio, max_iter, tol, feature_mask, resolve_device(device), threads
    )


def fit_multinomial(
    x: Matrix,
    y: np.ndarray,
    n_classes: int,
    *,
    C: float = 1.0,
    l1_ratio: float = 0.5,
    max_iter: int = 1000,
    tol: float = 1e-4,
    backend: str = "torch",
    device: str = "auto",
    seed: int = 42,
    threads: int | None = DEFAULT_THREADS,
) -> LogRegFit:
    """Fit one softmax problem over ``n_classes`` (>= 3) classes; ``y`` in ``0..K-1`` or -1."""
    y = np.asarray(y)
    if backend == "sklearn":
        return _sklearn_multinomial(x, y, n_classes, C, l1_ratio, max_iter, tol, seed)
    if backend != "torch":
        raise ValueError(f"unknown probe backend {backend!r} (torch or sklearn)")
    weights = balanced_weights(y, n_classes)
    onehot = np.zeros((len(y), n_classes))
    lab = y >= 0
    onehot[np.flatnonzero(lab), y[lab]] = 1.0
    return _torch_fit(
        x, onehot, weights[:, None], True, C, l1_ratio, max_iter, tol, None, resolve_device(device), threads
    )


# -- torch FISTA -----------------------------------------------------------------------------------


class _Design:
    """``A = x - 1 μᵀ`` applied implicitly (keeps sparse inputs sparse).

    Problems are rows (``W [T, d]``, logits ``[T, n]``) so every dense product is a short matrix
    times a contiguous long one; products with a transposed view of ``x`` were measured 5-50x
    slower on CPU for a handful of columns.
    """

    def __init__(self, x: Matrix, device: str):
        import torch

        self.torch = torch
        if sp.issparse(x):
            x = sp.csr_matrix(x, dtype=np.float32)
            self.mu = torch.from_numpy(np.asarray(x.mean(axis=0)).ravel().astype(np.float32)).to(device)
            self.x = torch_csr(x, device)
            self.xt = torch_csr(sp.csr_matrix(x.T), device)
            self.sparse = True
        else:
            xd = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(device)
            self.mu = xd.mean(dim=0)
            self.x = xd
            self.xt = xd.T.contiguous()
            self.sparse = False
        self.n, self.d = x.shape

    def forward(self, w):  # [T, d] -> [T, n]
        z = (self.x @ w.T).T if self.sparse else w @ self.xt
        return z - (w @ self.mu)[:, None]

    def backward(self, r):  # [T, n] -> [T, d]
        g = (self.xt @ r.T).T if self.sparse else r @ self.x
        return g - r.sum(dim=1)[:, None] * self.mu[None, :]


def _lipschitz(design: _Design, s, curvature: float, iters: int = 30):
    """Per-problem ``curvature · λ_max([A 1]ᵀ diag(s_t) [A 1]) / n_t`` by power iteration (x 1.1 margin).

    ``s [T, n]``: the sample weights of each problem (one row for a multinomial problem).
    """
    torch = design.torch
    gen = torch.Generator(device="cpu").manual_seed(0)
    t = s.shape[0]
    vw = torch.randn(t, design.d, generator=gen).to(s.device)
    vb = torch.randn(t, generator=gen).to(s.device)
    lam = torch.ones(t, device=s.device)
    for _ in range(iters):
        u = (design.forward(vw) + vb[:, None]) * s
        vw, vb = design.backward(u), u.sum(dim=1)
        lam = torch.sqrt((vw * vw).sum(dim=1) + vb * vb)
        vw, vb = vw / lam.clamp_min(1e-30)[:, None], vb / lam.clamp_min(1e-30)
    n_t = (s > 0).sum(dim=1).clamp_min(1)
    return 1.1 * curvature * lam / n_t


def _torch_fit(
    x: Matrix,
    target: np.ndarray,
    weights: np.ndarray,
    multinomial: bool,
    C: float,
    l1_ratio: float,
    max_iter: int,
    tol: float,
    feature_mask: np.ndarray | None,
    device: str,
    threads: int | None,
) -> LogRegFit:
    with _cpu_threads(threads if device == "cpu" else None):
        return _torch_fista(x, target, weights, multinomial, C, l1_ratio, max_iter, tol, feature_mask, device)


@contextlib.contextmanager
def _cpu_threads(n: int | None) -> Iterator[None]:
    """Run with ``n`` torch CPU threads (None: leave torch's setting)."""
    import torch

    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _torch_fista(
    x: Matrix,
    target: np.ndarray,
    weights: np.ndarray,
    multinomial: bool,
    C: float,
    l1_ratio: float,
    max_iter: int,
    tol: float,
    feature_mask: np.ndarray | None,
    device: str,
) -> LogRegFit:
    """FISTA over problems-as-rows: ``target [n, T]``, ``weights [n, T]`` (``[n, 1]`` multinomial)."""
    import torch

    design = _Design(x, device)
    t_rows = target.shape[1]
    yt = torch.from_numpy(np.ascontiguousarray(target.T, dtype=np.float32)).to(device)  # [T, n]
    s = torch.from_numpy(np.ascontiguousarray(weights.T, dtype=np.float32)).to(device)  # [T or 1, n]
    n_t = (s > 0).sum(dim=1).clamp_min(1).float()  # labelled rows per problem
    alpha = 1.0 / (C * n_t)
    big_l = _lipschitz(design, s, 0.5 if multinomial else 0.25) + alpha * (1 - l1_ratio)
    if multinomial:  # one problem: shared step, shared restart and stopping decision
        n_t, alpha, big_l = n_t.expand(t_rows), alpha.expand(t_rows), big_l.expand(t_rows)
    step, l2 = (1.0 / big_l)[:, None], (alpha * (1 - l1_ratio))[:, None]
    thresh = step * (alpha * l1_ratio)[:, None]
    scale_r = (s / n_t[:, None]) if not multinomial else s / n_t[0]
    mask = (
        None
        if feature_mask is None
        else torch.from_numpy(np.ascontiguousarray(feature_mask.T, dtype=np.float32)).to(device)
    )

    def grad(w, b):
        z = design.forward(w) + b[:, None]
        p = torch.softmax(z, dim=0) if multinomial else torch.sigmoid(z)
        r = scale_r * (p - yt)
        return design.backward(r) + l2 * w, r.sum(dim=1)

    def reduce(v):  # per-row quantity -> one value per problem, broadcast to its rows
        return v.max().expand(t_rows) if multinomial else v

    w = torch.zeros(t_rows, design.d, device=device)
    b = torch.zeros(t_rows, device=device)
    zw, zb = w, b
    tk = torch.ones(t_rows, device=device)
    n_iter, converged = 0, False
    for n_iter in range(1, max_iter + 1):  # n_iter is reported after the loop
        gw, gb = grad(zw, zb)
        vw = zw - step * gw
        wn = torch.sign(vw) * torch.clamp(vw.abs() - thresh, min=0.0)
        if mask is not None:
            wn = wn * mask
        bn = zb - step[:, 0] * gb
        dw, db = wn - w, bn - b
        restart = (((zw - wn) * dw).sum(dim=1) + (zb - bn) * db) > 0
        if multinomial:
            restart = restart.any().expand(t_rows)
        tn = torch.where(restart, torch.ones_like(tk), (1 + torch.sqrt(1 + 4 * tk * tk)) / 2)
        beta = torch.where(restart, torch.zeros_like(tk), (tk - 1) / tn)
        zw, zb = wn + beta[:, None] * dw, bn + beta * db
        change = torch.maximum(dw.abs().amax(dim=1), db.abs())
        scale = torch.maximum(wn.abs().amax(dim=1), bn.abs())
        w, b, tk = wn, bn, tn
        if n_iter % 10 == 0 and bool((reduce(change) <= tol * reduce(scale).clamp_min(1e-12)).all()):
            converged = True
            break
    coef = w.double().T.contiguous().cpu().numpy()
    intercept = (b.double() - w.double() @ design.mu.double()).cpu().numpy()  # undo the implicit centring
    return LogRegFit(coef=coef, intercept=intercept, multinomial=multinomial, n_iter=n_iter, converged=converged)


# -- scikit-learn saga (the study's solver) --------------------------------------------------------


def _sklearn_model(C: float, l1_ratio: float, max_iter: int, tol: float, seed: int):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(
        C=C,
        l1_ratio=l1_ratio,
        solver="saga",
        class_weight="balanced",
        max_iter=max_iter,
        tol=tol,
        random_state=seed,
    )


def _quiet_fit(model, x: Matrix, y: np.ndarray):
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(x, y)
    return model


def _sklearn_binary(x, y, C, l1_ratio, max_iter, tol, feature_mask, seed) -> LogRegFit:
    d, t_cols = x.shape[1], y.shape[1]
    coef, intercept = np.zeros((d, t_cols)), np.zeros(t_cols)
    n_iter, converged = 0, True
    x = sp.csr_matrix(x) if sp.issparse(x) else np.asarray(x)
    for t in range(t_cols):
        rows = np.flatnonzero(y[:, t] >= 0)
        cols = np.arange(d) if feature_mask is None else np.flatnonzero(feature_mask[:, t])
        if len(cols) == 0 or len(np.unique(y[rows, t])) < 2:
            continue
        xt = x[rows][:, cols]
        model = _quiet_fit(_sklearn_model(C, l1_ratio, max_iter, tol, seed), xt, y[rows, t] > 0)
        coef[cols, t] = model.coef_[0]
        intercept[t] = model.intercept_[0]
        it = int(np.max(model.n_iter_))
        n_iter, converged = max(n_iter, it), converged and it < max_iter
    return LogRegFit(coef=coef, intercept=intercept, multinomial=False, n_iter=n_iter, converged=converged)


def _sklearn_multinomial(x, y, n_classes, C, l1_ratio, max_iter, tol, seed) -> LogRegFit:
    rows = np.flatnonzero(y >= 0)
    x = sp.csr_matrix(x) if sp.issparse(x) else np.asarray(x)
    model = _quiet_fit(_sklearn_model(C, l1_ratio, max_iter, tol, seed), x[rows], y[rows])
    coef, intercept = np.zeros((x.shape[1], n_classes)), np.full(n_classes, -np.inf)
    coef[:, model.classes_] = model.coef_.T
    intercept[model.classes_] = model.intercept_
    it = int(np.max(model.n_iter_))
    return LogRegFit(coef=coef, intercept=intercept, multinomial=True, n_iter=it, converged=it < max_iter)
