"""Sparse building blocks of the SAE step: selections, sparse encoder gradients, sparse decoding.

A TopK-family step only needs gradients at the few selected pre-activations. Autograd through a
dense ``z = (x - b_dec) @ W_encᵀ + b_enc`` would compute two more full-size matmuls in the
backward pass (``∂L/∂W_enc = Gᵀ x`` with a dense ``G`` and ``∂L/∂x`` for ``b_dec``). Here:

* :func:`gather_encode` returns ``z[rows, cols]`` with a backward that scatters the gradient into
  ``W_enc`` as a sparse ``[d_sae, batch]`` CSR matrix times ``x`` (cost ``nnz · d``), into ``b_enc``
  by index-add, and into ``b_dec`` as ``-(Σ_b g_b) @ W_enc`` (one vector-matrix product instead of
  the full input gradient).
* :func:`columns_encode` is the same for a dense block of columns (AuxK's dead latents, or every
  latent for ReLU SAEs).
* :func:`sparse_decode` is ``Σ_j a_j W_dec[j]`` through ``embedding_bag`` (gathers only the active rows).
* :func:`select_rows` is ``w[rows]`` for unique rows with a copying (not accumulating) backward.

With ``grad_dtype`` (bf16 for the study's ``bf16-mixed``) the encode backward passes work as a bf16
matmul does: the incoming gradient, ``x`` and ``W_enc`` rounded to ``grad_dtype``, products summed in
fp32, and the ``W_enc`` and ``b_enc`` gradients rounded to ``grad_dtype`` (stored in fp32 weights).

Selections are returned as CSR-like triples ``(rows, cols, offsets)`` grouped by row.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Selection:
    """Selected entries of a ``[batch, width]`` block, grouped by row (``offsets`` = start of each row)."""

    rows: torch.Tensor  # int64 [nnz]
    cols: torch.Tensor  # int64 [nnz]
    offsets: torch.Tensor  # int64 [batch]: start of each row's entries (embedding_bag offsets)
    batch: int

    @property
    def nnz(self) -> int:
        return int(self.rows.numel())


def _offsets(rows: torch.Tensor, batch: int) -> torch.Tensor:
    counts = torch.bincount(rows, minlength=batch)
    return torch.cumsum(counts, 0) - counts


def _sorted_selection(rows: torch.Tensor, cols: torch.Tensor, batch: int, width: int) -> Selection:
    order = torch.argsort(rows * width + cols)
    rows, cols = rows[order], cols[order]
    return Selection(rows, cols, _offsets(rows, batch), batch)


def topk_select(z: torch.Tensor, k: int) -> Selection:
    """Per-sample top-k of each row of ``z`` [batch, width] (grouped by row; no sort needed)."""
    batch, width = z.shape
    k = min(k, width)
    idx = torch.topk(z, k, dim=1, sorted=False).indices
    rows = torch.arange(batch, device=z.device).repeat_interleave(k)
    offsets = torch.arange(batch, device=z.device) * k
    return Selection(rows, idx.reshape(-1), offsets, batch)


def batch_topk_select(z: torch.Tensor, k_total: int) -> Selection:
    """The ``k_total`` largest entries of the whole block ``z`` [batch, width] (BatchTopK).

    Two stages, exact: a per-row top-``m`` gives candidates, the global top-``k_total`` is taken
    among them; if some row's m-th candidate is above the resulting cut-off, that row may hold more
    winners than ``m`` and the search is repeated with a larger ``m``.
    """
    batch, width = z.shape
    k_total = min(k_total, batch * width)
    m = min(width, max(8, 4 * -(-k_total // batch)))
    while True:
        cand_v, cand_i = torch.topk(z, m, dim=1, sorted=True)
        flat_v, flat_pos = torch.topk(cand_v.reshape(-1), k_total, sorted=False)
        if m == width:
            break
        cut = flat_v.min()
        if not bool((cand_v[:, -1] > cut).any()):
            break
        m = min(width, 4 * m)
    rows = torch.div(flat_pos, m, rounding_mode="floor")
    cols = cand_i.reshape(-1)[flat_pos]
    return _sorted_selection(rows, cols, batch, width)


def scatter_rows(
    dst: torch.Tensor, src_rows: torch.Tensor, weights: torch.Tensor, src: torch.Tensor, n_dst: int
) -> torch.Tensor:
    """``out[i] = Σ_{t: dst[t] = i} weights[t] · src[src_rows[t]]`` as a CSR [n_dst, n_src] @ src."""
    if dst.numel() == 0:
        return src.new_zeros(n_dst, src.shape[1])
    order = torch.argsort(dst, stable=True)
    counts = torch.bincount(dst, minlength=n_dst)
    crow = torch.zeros(n_dst + 1, dtype=torch.int64, device=dst.device)
    crow[1:] = torch.cumsum(counts, 0)
    with warnings.catch_warnings():  # torch calls sparse CSR "beta"; CSR @ dense is long-standing
        warnings.simplefilter("ignore")
        mat = torch.sparse_csr_tensor(
            crow,
            src_rows[order],
            weights[order].to(src.dtype),
            size=(n_dst, src.shape[0]),
            check_invariants=False,
        )
    return mat @ src


def _rounded(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """``t`` rounded to ``dtype`` and back to fp32 (unchanged when ``dtype`` is None)."""
    return t.float() if dtype is None else t.to(dtype).float()


def _encode_grads(ctx, grad_w_fn, g_sum_per_col, cols, w_enc):
    """Shared tail of the encode backward passes: (grad W_enc, grad b_enc, grad b_dec)."""
    d_sae = w_enc.shape[0]
    low = ctx.grad_dtype
    need_w, need_be, need_bd = ctx.needs_input_grad[1], ctx.needs_input_grad[2], ctx.needs_input_grad[3]
    grad_w = _rounded(grad_w_fn(), low).to(w_enc.dtype) if need_w else None
    gb = None
    if need_be or need_bd:
        gb = torch.zeros(d_sae, dtype=torch.float32, device=w_enc.device).index_add_(0, cols, g_sum_per_col)
        gb = _rounded(gb, low)
    grad_be = gb if need_be else None
    grad_bd = -(gb.to(w_enc.dtype) @ _rounded(w_enc, low).to(w_enc.dtype)) if need_bd else None
    return grad_w, grad_be, grad_bd


class _GatherEncode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_c, w_enc, b_enc, b_dec, z, rows, cols, grad_dtype):  # b_enc, b_dec: for their gradients
        ctx.save_for_backward(x_c, w_enc, rows, cols)
        ctx.grad_dtype = grad_dtype
        return z[rows, cols].float()

    @staticmethod
    def backward(ctx, g):
        x_c, w_enc, rows, cols = ctx.saved_tensors
        g = _rounded(g, ctx.grad_dtype)
        x_c = _rounded(x_c, ctx.grad_dtype)
        grads = _encode_grads(ctx, lambda: scatter_rows(cols, rows, g, x_c, w_enc.shape[0]), g, cols, w_enc)
        return None, *grads, None, None, None, None


def gather_encode(
    x_c: torch.Tensor,
    w_enc: torch.Tensor,
    b_enc: torch.Tensor,
    b_dec: torch.Tensor,
    z: torch.Tensor,
    sel: Selection,
    grad_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``z[sel.rows, sel.cols]`` (float32) where ``z = x_c @ W_encᵀ + b_enc`` and ``x_c = x - b_dec``.

    ``z`` is the precomputed (no-grad) pre-activation; gradients reach ``W_enc``, ``b_enc`` and
    ``b_dec`` through a sparse backward, in ``grad_dtype`` precision when given (module docstring).
    """
    return _GatherEncode.apply(x_c, w_enc, b_enc, b_dec, z, sel.rows, sel.cols, grad_dtype)


class _ColumnsEncode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_c, w_enc, b_enc, b_dec, z, cols, grad_dtype):
        ctx.save_for_backward(x_c, w_enc, cols)
        ctx.grad_dtype = grad_dtype
        return z[:, cols].float()

    @staticmethod
    def backward(ctx, g):
        x_c, w_enc, cols = ctx.saved_tensors
        g = _rounded(g, ctx.grad_dtype)
        x_c = _rounded(x_c, ctx.grad_dtype)

        def grad_w():  # cols are unique: a copy, not an accumulation
            return torch.zeros_like(w_enc).index_copy_(0, cols, (g.t() @ x_c).to(w_enc.dtype))

        grads = _encode_grads(ctx, grad_w, g.sum(0), cols, w_enc)
        return None, *grads, None, None, None


def columns_encode(
    x_c: torch.Tensor,
    w_enc: torch.Tensor,
    b_enc: torch.Tensor,
    b_dec: torch.Tensor,
    z: torch.Tensor,
    cols: torch.Tensor,
    grad_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``z[:, cols]`` (float32) with a backward into ``W_enc[cols]``, ``b_enc[cols]`` and ``b_dec``."""
    return _ColumnsEncode.apply(x_c, w_enc, b_enc, b_dec, z, cols, grad_dtype)


class _SelectRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, rows):
        ctx.save_for_backward(rows)
        ctx.shape = w.shape
        return w.index_select(0, rows)

    @staticmethod
    def backward(ctx, g):
        (rows,) = ctx.saved_tensors
        return g.new_zeros(ctx.shape).index_copy_(0, rows, g), None


def select_rows(w: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``w[rows]`` for UNIQUE ``rows``; the backward copies instead of accumulating (much faster on CPU)."""
    return _SelectRows.apply(w, rows)


def sparse_decode(sel: Selection, values: torch.Tensor, w_dec: torch.Tensor) -> torch.Tensor:
    """``x̂_b = Σ_{t in row b} values[t] · W_dec[cols[t]]`` (no bias), gathering only active rows."""
    if sel.nnz == 0:
        return w_dec.new_zeros(sel.batch, w_dec.shape[1]) + 0 * values.sum()
    return F.embedding_bag(sel.cols, w_dec, sel.offsets, mode="sum", per_sample_weights=values.to(w_dec.dtype))


def dense_codes(sel: Selection, values: torch.Tensor, width: int) -> torch.Tensor:
    """The selection as a dense ``[batch, width]`` tensor (differentiable in ``values``)."""
    out = values.new_zeros(sel.batch, width)
    return out.index_put((sel.rows, sel.cols), values)
