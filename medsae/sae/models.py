"""The SAE family behind one interface: TopK, BatchTopK, Matryoshka (over either) and ReLU + L1.

One :class:`SAE` module covers every family; :class:`SAEConfig` (saved in the checkpoint) says
which. With ``x_in = sae.normalize(x_raw)``::

    z     = W_enc (x_in - b_dec) + b_enc                     pre-activations, [n, d_sae]
    codes = sae.encode(x_in)                                 inference activation (below)
    x_hat = sae.decode(codes) = codes @ W_dec + b_dec         same space as x_in

Every family is a list of *levels* ``(D_l, k_l)``: a plain TopK/BatchTopK SAE has one level
``(d_sae, k)``; a Matryoshka SAE has nested prefixes ``D_1 < ... < D_L = d_sae``. In training,
each level selects independently from its prefix ``z[:, :D_l]``:

* ``topk``: the ``k_l`` largest entries of each row;
* ``batchtopk``: the ``k_l · batch`` largest entries of the whole block (k_l per sample on average);

then keeps those values (through a ReLU when ``topk_relu``) and reconstructs
``x̂_l = A_l W_dec[:D_l] + b_dec``. The loss is the mean over levels of ``MSE(x̂_l, x_in)``
(mean over batch and dimensions), plus AuxK and L1 terms when enabled.

Inference (:meth:`SAE.encode`): ``topk`` keeps the top ``k_L`` of each row; ``batchtopk`` applies
one scalar threshold θ learned in training (the smallest positive kept value at the largest level,
averaged), as JumpReLU ``z·[z > θ]`` or as the study's shifted ReLU ``max(0, z - θ)``, falling back
to per-sample top-``k_L`` until θ is estimated; ``relu`` is ``max(0, z)``.

AuxK (TopK family): with ``e = stopgrad(x_in - x̂_L)`` and ``D`` the dead latents (no firing for
``dead_after`` samples), ``ê = TopK_{k_aux}(z[:, D]) W_dec[D]`` (no bias) and the loss adds
``aux_coeff · MSE(ê, e)``.

Precision (:meth:`SAE.training_forward`): ``dtype`` is the encoder matmul's, ``decoder_dtype`` the
decoder's. bf16 for both is the study's Lightning ``bf16-mixed``: operands cast to bf16, products
rounded to bf16, weights, biases and losses in fp32, and the backward passes of both matmuls in bf16
too (autograd through the casts for the decoder, :func:`ops.gather_encode`'s ``grad_dtype`` for the
encoder). Inference (:meth:`SAE.encode`) is fp32.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from medsae.sae import ops
from medsae.sae.config import Arch, Normalize, SAESpec, ThresholdInference, ThresholdMode

#: Activation above which a latent counts as firing (the study's alive threshold; eval uses the same).
FIRE_EPS = 1e-8


#: Per-level selection of an SAE: TopK, BatchTopK, or a plain ReLU (``relu_l1``).
Inner = Literal["topk", "batchtopk", "relu"]
_INNER_OF_ARCH: dict[str, Inner] = {"topk": "topk", "batchtopk": "batchtopk", "relu_l1": "relu"}


@dataclass
class SAEConfig:
    """Everything needed to rebuild an SAE's computation (stored in the checkpoint's cfg.json)."""

    d_in: int
    d_sae: int
    arch: Arch = "topk"
    levels: list[int] = dataclasses.field(default_factory=list)  # prefix sizes, last = d_sae
    level_k: list[int] = dataclasses.field(default_factory=list)  # budget of each level
    inner: Inner = "topk"  # per-level selection
    topk_relu: bool = True
    tied: bool = False
    tied_detached: bool = False
    unit_norm_decoder: bool = True
    normalize: Normalize = "l2"
    threshold_mode: ThresholdMode = "ema"
    threshold_decay: float = 0.99
    threshold_warmup: int = 100
    threshold_inference: ThresholdInference = "jumprelu"
    l1_coeff: float = 0.0
    auxk: bool = False
    k_aux: int = 0
    aux_coeff: float = 1 / 32
    dead_after: int = 20_000

    @classmethod
    def from_spec(cls, spec: SAESpec, d_in: int) -> SAEConfig:
        """Resolve an ``sae:`` spec section for inputs of width ``d_in``."""
        if spec.arch == "matryoshka":
            # the spec validator guarantees both lists for matryoshka
            levels, level_k = list(spec.levels or []), list(spec.level_k or [])
            inner: Inner = spec.matryoshka_inner
        else:
            d_sae = spec.d_sae or max(1, int(round(spec.expansion * d_in)))
            levels, level_k = [d_sae], [min(spec.k, d_sae)]
            inner = _INNER_OF_ARCH[spec.arch]
        topk_family = inner in ("topk", "batchtopk")
        return cls(
            d_in=d_in,
            d_sae=levels[-1],
            arch=spec.arch,
            levels=levels,
            level_k=level_k,
            inner=inner,
            topk_relu=spec.topk_relu,
            tied=spec.tied,
            tied_detached=spec.tied_detached,
            unit_norm_decoder=spec.unit_norm_decoder,
            normalize=spec.normalize,
            threshold_mode=spec.threshold_mode,
            threshold_decay=spec.threshold_decay,
            threshold_warmup=spec.threshold_warmup,
            threshold_inference=spec.threshold_inference,
            l1_coeff=spec.l1_coeff if spec.arch == "relu_l1" else 0.0,
            auxk=spec.auxk and topk_family,
            k_aux=spec.k_aux or max(1, d_in // 2),
            aux_coeff=spec.aux_coeff,
            dead_after=spec.dead_after,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SAEConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class TrainOutput:
    """One training forward: the loss to minimise and what the trainer logs."""

    loss: torch.Tensor  # scalar with grad
    recon: torch.Tensor  # mean over levels of the reconstruction MSE (detached)
    aux: torch.Tensor  # AuxK loss (detached, 0 when off)
    x_hat: torch.Tensor  # largest level's reconstruction (detached)
    fired: torch.Tensor  # int64 latent ids that fired in this batch (any level, repeats allowed)
    l0: torch.Tensor  # active latents per sample at the largest level
    min_kept: torch.Tensor | None  # smallest positive kept value at the largest level (BatchTopK), inf if none


class SAE(nn.Module):
    """A sparse autoencoder of any family (see the module docstring)."""

    def __init__(self, cfg: SAEConfig, generator: torch.Generator | None = None):
        super().__init__()
        self.cfg = cfg
        d, n = cfg.d_in, cfg.d_sae
        w = self._init_rows(n, d, generator)
        self.W_enc = nn.Parameter(w)  # [d_sae, d_in]: row j = latent j's encoder direction
        # [d_sae, d_in]; None when tied (the decoder is then W_enc itself)
        self.register_parameter("W_dec", None if cfg.tied else nn.Parameter(w.clone()))
        self.b_enc = nn.Parameter(torch.zeros(n))
        self.b_dec = nn.Parameter(torch.zeros(d))
        self.register_buffer("norm_mean", torch.zeros(d))
        self.register_buffer("norm_scale", torch.ones(()))
        self.register_buffer("threshold", torch.zeros(()))
        self.register_buffer("threshold_sum", torch.zeros((), dtype=torch.float64))
        self.register_buffer("threshold_count", torch.zeros((), dtype=torch.int64))

    @staticmethod
    def _init_rows(n: int, d: int, generator: torch.Generator | None) -> torch.Tensor:
        w = torch.rand(n, d, generator=generator) * 2 - 1
        return w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)

    # -- interface -----------------------------------------------------------------------------

    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    @property
    def decoder_weight(self) -> torch.Tensor:
        """``W_dec`` [d_sae, d_in] (the encoder weight when tied)."""
        return self.W_enc if self.W_dec is None else self.W_dec

    def normalize(self, x_raw: torch.Tensor) -> torch.Tensor:
        """The stored input normalisation: raw embeddings -> SAE inputs."""
        x = x_raw.float()
        if self.cfg.normalize == "l2":
            return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        if self.cfg.normalize == "center_scale":
            return (x - self.norm_mean) / self.norm_scale
        return x

    def pre_acts(self, x_in: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``z = W_enc (x_in - b_dec) + b_enc``, the matmul in ``dtype``."""
        x_c = x_in.float() - self.b_dec
        return torch.addmm(self.b_enc.to(dtype), x_c.to(dtype), self.W_enc.to(dtype).t()).float()

    def threshold_ready(self) -> bool:
        return int(self.threshold_count) >= self.cfg.threshold_warmup

    def encode(self, x_in: torch.Tensor) -> torch.Tensor:
        """Inference-mode codes [n, d_sae] (see the module docstring)."""
        z = self.pre_acts(x_in)
        cfg = self.cfg
        if cfg.inner == "relu":
            return torch.relu(z)
        if cfg.inner == "batchtopk" and self.threshold_ready():
            theta = self.threshold.float()
            if cfg.threshold_inference == "shifted_relu":
                return torch.relu(z - theta)
            return z * (z > theta)
        vals, idx = torch.topk(z, cfg.level_k[-1], dim=1)
        if cfg.topk_relu:
            vals = torch.relu(vals)
        return torch.zeros_like(z).scatter_(1, idx, vals)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """``codes @ W_dec + b_dec`` (dense or torch-sparse codes)."""
        if codes.layout != torch.strided:
            return codes @ self.decoder_weight + self.b_dec
        return codes.float() @ self.decoder_weight + self.b_dec

    def forward(self, x_in: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x_in))

    # -- training ------------------------------------------------------------------------------

    def _train_decoder(self) -> torch.Tensor:
        if self.cfg.tied_detached:
            return self.W_enc.detach()
        return self.decoder_weight

    def _select(self, z_prefix: torch.Tensor, k: int) -> ops.Selection:
        if self.cfg.inner == "batchtopk":
            return ops.batch_topk_select(z_prefix, k * z_prefix.shape[0])
        return ops.topk_select(z_prefix, k)

    @staticmethod
    def _use_sparse(width: int, k: int, decoder_impl: str) -> bool:
        if decoder_impl != "auto":
            return decoder_impl == "sparse"
        # measured on CPU: one gathered row costs about as much as 32 dense matmul columns
        return k * 32 <= width

    def training_forward(
        self,
        x_in: torch.Tensor,
        dead_mask: torch.Tensor | None = None,
        dtype: torch.dtype = torch.float32,
        decoder_impl: str = "auto",
        decoder_dtype: torch.dtype = torch.float32,
        z: torch.Tensor | None = None,
    ) -> TrainOutput:
        """Loss and statistics of one training batch of normalised inputs ``x_in`` [batch, d_in].

        ``dtype`` / ``decoder_dtype``: precision of the encoder / decoder matmul (module docstring).
        ``z``: the pre-activations ``(x_in - b_dec) W_encᵀ + b_enc`` in ``dtype`` when the caller
        computed them already (a sweep's batched GEMM); gradients flow the same way either way.
        """
        cfg = self.cfg
        x_in = x_in.float()
        x_c = (x_in - self.b_dec).detach()
        w_enc_low = self.W_enc.detach().to(dtype)
        if z is None:
            with torch.no_grad():  # gradients come from ops.gather_encode / ops.columns_encode
                z = torch.addmm(self.b_enc.detach().to(dtype), x_c.to(dtype), w_enc_low.t())
        grad_dtype = None if dtype == torch.float32 else dtype
        if cfg.inner == "relu":
            return self._relu_forward(x_in, x_c, z, decoder_dtype)
        w_dec = self._train_decoder()
        if decoder_dtype != torch.float32:  # a detached tied decoder reuses the encoder's cast copy
            w_dec = w_enc_low if cfg.tied_detached and dtype == decoder_dtype else w_dec.to(decoder_dtype)
        batch = x_in.shape[0]
        recons: list[torch.Tensor] = []
        fired: list[torch.Tensor] = []
        x_hat = min_kept = l0 = None
        for li, (width, k) in enumerate(zip(cfg.levels, cfg.level_k, strict=True)):
            sel = self._select(z[:, :width], k)
            vals = ops.gather_encode(x_c, self.W_enc, self.b_enc, self.b_dec, z, sel, grad_dtype)
            act = torch.relu(vals) if cfg.topk_relu else vals
            if self._use_sparse(width, k, decoder_impl):
                out = ops.sparse_decode(sel, act, w_dec)
            else:
                out = ops.dense_codes(sel, act.to(w_dec.dtype), width) @ w_dec[:width]
            level_hat = out.float() + self.b_dec
            recons.append(((level_hat - x_in) ** 2).mean())
            fired.append(sel.cols[act.detach().abs() > FIRE_EPS])
            if li == len(cfg.levels) - 1:
                x_hat = level_hat
                l0 = (act.detach().abs() > FIRE_EPS).sum().float() / batch
                if cfg.inner == "batchtopk":
                    kept = act.detach()
                    min_kept = torch.where(kept > 0, kept, torch.full_like(kept, math.inf)).min()
        recon = torch.stack(recons).mean()
        loss = recon
        aux = torch.zeros((), device=x_in.device)
        if cfg.auxk and cfg.aux_coeff > 0 and dead_mask is not None:
            dead = torch.nonzero(dead_mask).squeeze(1)
            if dead.numel() > 0:
                aux = self._aux_loss(x_in, x_c, z, x_hat.detach(), dead, w_dec, grad_dtype)
                loss = loss + cfg.aux_coeff * aux
        return TrainOutput(loss, recon.detach(), aux.detach(), x_hat.detach(), torch.cat(fired), l0, min_kept)

    def _aux_loss(self, x_in, x_c, z, x_hat, dead, w_dec, grad_dtype) -> torch.Tensor:
        """``MSE(TopK_{k_aux}(z[:, dead]) @ W_dec[dead], stopgrad(x_in - x_hat))`` (no bias)."""
        z_dead = ops.columns_encode(x_c, self.W_enc, self.b_enc, self.b_dec, z, dead, grad_dtype)
        k_aux = min(self.cfg.k_aux, dead.numel())
        vals, idx = torch.topk(z_dead, k_aux, dim=1, sorted=False)
        if self.cfg.topk_relu:
            vals = torch.relu(vals)
        codes = torch.zeros_like(z_dead).scatter(1, idx, vals)
        e_hat = (codes.to(w_dec.dtype) @ ops.select_rows(w_dec, dead)).float()
        return ((e_hat - (x_in - x_hat)) ** 2).mean()

    def _relu_forward(self, x_in, x_c, z, decoder_dtype) -> TrainOutput:
        all_cols = torch.arange(self.cfg.d_sae, device=x_in.device)
        grad_dtype = None if z.dtype == torch.float32 else z.dtype
        act = torch.relu(ops.columns_encode(x_c, self.W_enc, self.b_enc, self.b_dec, z, all_cols, grad_dtype))
        w_dec = self._train_decoder()
        x_hat = (act.to(decoder_dtype) @ w_dec.to(decoder_dtype)).float() + self.b_dec
        recon = ((x_hat - x_in) ** 2).mean()
        loss = recon
        if self.cfg.l1_coeff > 0:
            loss = loss + self.cfg.l1_coeff * (act * w_dec.norm(dim=1)).sum(1).mean()
        firing = act.detach() > FIRE_EPS
        fired = torch.nonzero(firing.any(0)).squeeze(1)
        l0 = firing.sum().float() / x_in.shape[0]
        zero = torch.zeros((), device=x_in.device)
        return TrainOutput(loss, recon.detach(), zero, x_hat.detach(), fired, l0, None)

    # -- bookkeeping between steps -----------------------------------------------------------

    @torch.no_grad()
    def observe_threshold(self, min_kept: torch.Tensor) -> None:
        """Fold one batch's smallest positive kept value into θ (no host sync)."""
        has = torch.isfinite(min_kept)
        value = torch.where(has, min_kept, torch.zeros_like(min_kept)).double()
        if self.cfg.threshold_mode == "running_mean":
            self.threshold_sum += value
            self.threshold_count += has.long()
            mean = self.threshold_sum / self.threshold_count.clamp_min(1)
            self.threshold.copy_(mean.float())
        else:
            first = self.threshold_count == 0
            decay = self.cfg.threshold_decay
            ema = torch.where(first, value.float(), decay * self.threshold + (1 - decay) * value.float())
            self.threshold.copy_(torch.where(has, ema, self.threshold))
            self.threshold_count += has.long()

    @torch.no_grad()
    def project_decoder_grad(self) -> None:
        """Remove the gradient component parallel to each (unit-norm) decoder row."""
        w = self.decoder_weight
        if w.grad is not None:
            w.grad -= (w.grad * w).sum(1, keepdim=True) * w

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        w = self.decoder_weight
        w /= w.norm(dim=1, keepdim=True).clamp_min(1e-12)

    @torch.no_grad()
    def set_normalization(self, mean: torch.Tensor, scale: float) -> None:
        self.norm_mean.copy_(mean)
        self.norm_scale.fill_(scale)
