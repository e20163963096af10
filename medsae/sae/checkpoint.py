"""SAE checkpoints: ``sae.safetensors`` + ``cfg.json`` (SAELens layout), loadable without the spec.

A train folder holds:

* ``sae.safetensors``: ``W_enc`` [d_in, d_sae], ``W_dec`` [d_sae, d_in], ``b_enc`` [d_sae],
  ``b_dec`` [d_in] (SAELens names and orientations; a tied SAE stores W_dec = W_encᵀ too), plus
  medsae's buffers: ``norm_mean``, ``norm_scale`` (input normalisation), ``threshold``,
  ``threshold_sum``, ``threshold_count`` (BatchTopK inference threshold).
* ``cfg.json``: SAELens' config fields (architecture, d_in, d_sae, dtype, ...) and a ``medsae``
  block with the full :class:`~medsae.sae.models.SAEConfig`, which is what :func:`load_sae` uses.

:func:`export_saelens` writes a folder that SAELens' ``SAE.load_from_disk`` reads
(``cfg.json`` + ``sae_weights.safetensors``) and that computes the same codes: BatchTopK with
JumpReLU inference becomes ``jumprelu`` (θ per latent), the study's shifted ReLU
``max(0, z - θ)`` becomes ``standard`` with ``b_enc - θ``, dataset-level centring + scaling is
folded into the weights completely, and per-sample L2 inputs become either
``constant_norm_rescale`` (the √d_in factor folded into the weights; SAELens then decodes only
right after an encode) or, with ``l2="unit"``, no normalisation at all (unit-norm inputs expected;
decode is stateless). Next to them go ``sparsity.safetensors`` (log10 firing frequency on the train
split, SAELens' convention) and a ``README.md`` model card. Files are written atomically with
umask-respecting modes, and no absolute path of this machine is written into them.
:func:`medsae.api.export_experiment_saelens` gathers all of that for a registered experiment.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from safetensors.torch import save as save_tensors

from medsae import __version__
from medsae.errors import MedsaeError, MissingInputError
from medsae.sae.models import SAE, SAEConfig

WEIGHTS = "sae.safetensors"
CONFIG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
SAELENS_SPARSITY = "sparsity.safetensors"
SAELENS_CARD = "README.md"
#: Added to the firing frequency before log10, as SAELens does: a latent that never fires gets -10.
DENSITY_EPS = 1e-10
#: Ways to export an L2-normalised SAE (see :func:`export_saelens`).
L2_EXPORTS = ("rescale", "unit")
FORMAT_VERSION = 1
_BUFFERS = ("norm_mean", "norm_scale", "threshold", "threshold_sum", "threshold_count")


def _saelens_cfg(cfg: SAEConfig, architecture: str, normalize: str, **extra: Any) -> dict[str, Any]:
    return {
        "architecture": architecture,
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": normalize,
        "reshape_activations": "none",
        **extra,
        "metadata": {"hook_name": "embedding", "model_name": None},
    }


def save_sae(sae: SAE, out_dir: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write ``sae.safetensors`` and ``cfg.json`` into ``out_dir``; returns the folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = sae.cfg
    tensors = {
        "W_enc": sae.W_enc.detach().t(),
        "W_dec": sae.decoder_weight.detach(),
        "b_enc": sae.b_enc.detach(),
        "b_dec": sae.b_dec.detach(),
        **{name: getattr(sae, name).detach() for name in _BUFFERS},
    }
    save_file({k: v.cpu().contiguous().clone() for k, v in tensors.items()}, str(out / WEIGHTS))
    arch = {"topk": "topk", "batchtopk": "batchtopk", "relu": "standard"}[cfg.inner]
    body = _saelens_cfg(cfg, arch, "none", k=cfg.level_k[-1])
    body["medsae"] = {"format_version": FORMAT_VERSION, "config": cfg.to_dict(), **(extra or {})}
    (out / CONFIG).write_text(json.dumps(body, indent=1, sort_keys=True))
    return out


def read_config(train_dir: str | Path) -> dict[str, Any]:
    """The ``cfg.json`` of a train folder (one-line errors when missing or not medsae's)."""
    path = Path(train_dir) / CONFIG
    if not path.is_file():
        raise MissingInputError(f"{path}: SAE config not found (not a completed train folder)")
    try:
        body = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise MedsaeError(f"{path}: invalid JSON ({err})") from None
    if "medsae" not in body or "config" not in body["medsae"]:
        raise MedsaeError(f"{path}: no 'medsae' block; not written by medsae")
    return body


def load_sae(train_dir: str | Path, device: str | torch.device = "cpu") -> SAE:
    """Rebuild the SAE of a train folder from its own files (no spec needed), in eval mode, frozen."""
    train_dir = Path(train_dir)
    cfg = SAEConfig.from_dict(read_config(train_dir)["medsae"]["config"])
    path = train_dir / WEIGHTS
    if not path.is_file():
        raise MissingInputError(f"{path}: SAE weights not found")
    tensors = load_file(str(path))
    sae = SAE(cfg)
    state = {"W_enc": tensors["W_enc"].t(), "b_enc": tensors["b_enc"], "b_dec": tensors["b_dec"]}
    if not cfg.tied:
        state["W_dec"] = tensors["W_dec"]
    state.update({name: tensors[name] for name in _BUFFERS})
    try:
        sae.load_state_dict(state)
    except RuntimeError as err:
        raise MedsaeError(f"{path}: weights do not match cfg.json ({str(err).splitlines()[0]})") from None
    return sae.requires_grad_(False).to(device).eval()


@dataclass(frozen=True)
class FeatureDensity:
    """How often each latent fires on a set of slices; ``sparsity.safetensors`` stores its log10.

    ``frequency[j]`` = share of the ``n_rows`` slices on which latent ``j`` is ``> FIRE_EPS``.
    """

    frequency: np.ndarray
    n_rows: int
    source: str  # what the slices are, for the model card ("the train split of 'demo'")

    def log10(self) -> np.ndarray:
        """SAELens' ``sparsity`` tensor: ``log10(frequency + 1e-10)`` (a never-firing latent gets -10)."""
        return np.log10(self.frequency.astype(np.float64) + DENSITY_EPS).astype(np.float32)

    @property
    def n_dead(self) -> int:
        return int(np.sum(self.frequency == 0))


@dataclass(frozen=True)
class CardFacts:
    """What the model card says beyond the SAE's own config (all optional)."""

    experiment: str | None = None
    embedding_model: str | None = None  # the backbone id, e.g. "efficientnet_lite0"
    embedding: str | None = None  # how its embeddings were taken, e.g. "timm, mean pooling, 160 px"
    #: ``(metric, split, definition, value)`` rows for the card's metric table.
    metrics: tuple[tuple[str, str, str, float], ...] = ()


def write_shareable(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically, with the usual permissions (0666 minus the umask).

    ``safetensors.save_file`` creates its files 0600 whatever the umask, which hides exported
    weights from colleagues on shared storage; serialising to bytes and writing them here does not.
    """
    tmp = path.with_name(f".{path.name}.part")
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """``safetensors`` file written like any other file (umask-respecting mode, atomic rename)."""
    write_shareable(path, save_tensors({k: v.float().contiguous().cpu() for k, v in tensors.items()}))


@torch.no_grad()
def export_saelens(
    train_dir: str | Path,
    out_dir: str | Path,
    *,
    density: FeatureDensity | None = None,
    l2: str = "rescale",
    facts: CardFacts | None = None,
) -> Path:
    """Write the SAE of ``train_dir`` as a SAELens folder; returns the folder.

    Files: ``cfg.json``, ``sae_weights.safetensors``, ``sparsity.safetensors`` (when ``density`` is
    given) and ``README.md`` (a model card). ``l2`` chooses how an L2-normalised SAE is exported:
    ``"rescale"`` = SAELens' ``constant_norm_rescale`` (raw embeddings in and out, but SAELens keeps
    the per-sample norm between ``encode`` and ``decode``, so a lone ``decode`` fails), ``"unit"`` =
    no normalisation in the export (inputs must be unit-norm, ``x / ‖x‖``; ``decode`` works on its own
    and returns unit-norm reconstructions). Nothing in the folder names a path of this machine.
    """
    if l2 not in L2_EXPORTS:
        raise MedsaeError(f"--l2: expected one of {', '.join(L2_EXPORTS)}, got '{l2}'")
    sae = load_sae(train_dir)
    cfg = sae.cfg
    if density is not None and density.frequency.shape != (cfg.d_sae,):
        raise MedsaeError(f"{train_dir}: feature density has {density.frequency.size} latents, the SAE {cfg.d_sae}")
    w_enc = sae.W_enc.t().clone()  # [d_in, d_sae]
    w_dec = sae.decoder_weight.clone()
    b_enc, b_dec = sae.b_enc.clone(), sae.b_dec.clone()
    extra: dict[str, Any] = {}
    tensors: dict[str, torch.Tensor] = {}
    if cfg.inner == "relu":
        arch = "standard"
    elif cfg.inner == "batchtopk" and sae.threshold_ready():
        theta = float(sae.threshold)
        if cfg.threshold_inference == "shifted_relu":
            arch, b_enc = "standard", b_enc - theta
        else:
            arch = "jumprelu"
            tensors["threshold"] = torch.full((cfg.d_sae,), theta)
    else:
        if not cfg.topk_relu:
            raise MedsaeError(f"{train_dir}: a TopK SAE without ReLU has no SAELens equivalent")
        arch, extra = "topk", {"k": cfg.level_k[-1]}
    if cfg.normalize == "l2" and l2 == "rescale":
        normalize, root = "constant_norm_rescale", math.sqrt(cfg.d_in)
        w_enc, w_dec, b_dec = w_enc / root, w_dec * root, b_dec * root
    elif cfg.normalize == "center_scale":
        normalize, mean, scale = "none", sae.norm_mean.clone(), float(sae.norm_scale)
        w_enc, w_dec, b_dec = w_enc / scale, w_dec * scale, mean + scale * b_dec
    else:
        normalize = "none"
    tensors.update(W_enc=w_enc, W_dec=w_dec, b_enc=b_enc, b_dec=b_dec)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(tensors, out / SAELENS_WEIGHTS)
    if density is not None:
        write_safetensors({"sparsity": torch.from_numpy(density.log10())}, out / SAELENS_SPARSITY)
    elif (out / SAELENS_SPARSITY).exists():
        (out / SAELENS_SPARSITY).unlink()  # a stale file from an earlier export would describe another SAE
    body = _saelens_cfg(cfg, arch, normalize, **extra)
    facts = facts or CardFacts()
    body["metadata"]["model_name"] = facts.embedding_model
    body["medsae_source"] = {
        "medsae_version": __version__,
        "experiment": facts.experiment,
        "train_stage_key": Path(train_dir).name,
        "l2_export": l2 if cfg.normalize == "l2" else None,
        "config": cfg.to_dict(),
    }
    cfg_text = json.dumps(body, indent=1, sort_keys=True)
    write_shareable(out / CONFIG, cfg_text.encode())
    card = model_card(body, Path(train_dir).name, density, facts)
    write_shareable(out / SAELENS_CARD, card.encode())
    return out


_ARCH_TEXT = {
    "topk": "TopK: the k largest pre-activations of each input, through a ReLU",
    "jumprelu": "JumpReLU: z·[z > θ] with one threshold θ for every latent (medsae's BatchTopK at inference)",
    "standard": "ReLU: max(0, z)",
}


def _normalisation_text(normalize: str, medsae_normalize: str, l2: str, d_in: int) -> list[str]:
    """The card's paragraph on what goes in and comes out, by input normalisation and export mode."""
    if medsae_normalize == "l2" and l2 == "rescale":
        return [
            f"The SAE was trained on L2-normalised embeddings. This export uses SAELens' "
            f"`normalize_activations: constant_norm_rescale`: `encode(x)` takes raw embeddings, rescales "
            f"each to norm √d_in = {math.sqrt(d_in):.4g} and **remembers that per-sample factor**; `decode` "
            "divides by it again, so `sae(x)` (or `encode` followed by `decode` of the same batch) "
            "reconstructs raw embeddings.",
            "",
            "A lone `decode(codes)` (codes from a file, steering, a latent's decoder direction) fails in "
            "SAELens with `AttributeError: ... 'x_norm_coeff'`: the per-sample norm is not known then. "
            "For that use, export with `medsae export NAME DIR --l2 unit`: no normalisation in the file, "
            "inputs must be unit-norm (`x / x.norm(dim=-1, keepdim=True)`), and `decode` works on its own "
            "and returns unit-norm reconstructions (multiply by `‖x‖` for the raw scale).",
        ]
    if medsae_normalize == "l2":
        return [
            "The SAE was trained on L2-normalised embeddings and this export (`--l2 unit`) leaves the "
            "normalisation to you: **feed unit-norm inputs** (`x / x.norm(dim=-1, keepdim=True)`). "
            "`encode` and `decode` are then stateless (`normalize_activations: none`), `decode` works on its "
            "own, and reconstructions are unit-norm (multiply by `‖x‖` for the raw scale).",
        ]
    if medsae_normalize == "center_scale":
        return [
            "medsae's dataset-level centring and scaling are folded into the weights: raw embeddings in, "
            "raw reconstructions out, `encode` and `decode` are stateless (`normalize_activations: none`).",
        ]
    return ["No input normalisation: raw embeddings in, raw reconstructions out; `encode` and `decode` are stateless."]


def model_card(body: dict[str, Any], train_key: str, density: FeatureDensity | None, facts: CardFacts) -> str:
    """The export's ``README.md``: a Hugging Face style model card written from ``cfg.json`` and ``facts``."""
    src = body["medsae_source"]
    config = src["config"]
    name = facts.experiment or train_key
    arch = body["architecture"]
    lines = [
        "---",
        "library_name: saelens",
        "tags:",
        "- sparse-autoencoder",
        "- saelens",
        "- medsae",
        "- medical-imaging",
        "---",
        "",
        f"# Sparse autoencoder `{name}`: {body['d_sae']} latents on {body['d_in']}-dimensional embeddings",
        "",
        f"Exported by medsae {src['medsae_version']} from its train stage `{train_key}`"
        + (f" of experiment `{facts.experiment}`." if facts.experiment else "."),
    ]
    if facts.embedding_model:
        detail = f" ({facts.embedding})" if facts.embedding else ""
        lines.append(f"Inputs: one embedding per image slice from `{facts.embedding_model}`{detail}.")
    lines += [
        "",
        "## Files",
        "",
        "| file | content |",
        "|---|---|",
        "| `cfg.json` | SAELens config (`architecture`, `d_in`, `d_sae`, `normalize_activations`, ...); "
        "`medsae_source` holds medsae's full SAE config |",
        "| `sae_weights.safetensors` | `W_enc` [d_in, d_sae], `W_dec` [d_sae, d_in], `b_enc` [d_sae], `b_dec` [d_in]"
        + (", `threshold` [d_sae]" if arch == "jumprelu" else "")
        + " |",
    ]
    if density is not None:
        lines.append(
            "| `sparsity.safetensors` | `sparsity` [d_sae]: log10 of each latent's firing frequency "
            "(`log10(f + 1e-10)`, so a latent that never fires has -10) |"
        )
    lines += [
        "| `README.md` | this card |",
        "",
        "## Architecture",
        "",
        f"* medsae architecture `{config['arch']}`"
        + (f", k = {config['level_k'][-1]}" if config["inner"] != "relu" else "")
        + f"; SAELens `architecture: {arch}` — {_ARCH_TEXT[arch]}.",
        "* Encode: `z = (x - b_dec) @ W_enc + b_enc`, then the activation above; decode: "
        "`x̂ = codes @ W_dec + b_dec`. A latent *fires* when its activation is > 1e-8.",
        "",
        "## Inputs and normalisation",
        "",
        *_normalisation_text(body["normalize_activations"], config["normalize"], src["l2_export"] or "", body["d_in"]),
        "",
        "## Loading",
        "",
        "```python",
        "from safetensors.torch import load_file",
        "from sae_lens import SAE",
        "",
        'sae = SAE.load_from_disk("THIS_FOLDER", device="cpu")',
        "codes = sae.encode(x)          # x: [n, d_in] embeddings (see above)",
        "x_hat = sae.decode(codes)",
    ]
    if density is not None:
        lines.append('log_density = load_file("THIS_FOLDER/sparsity.safetensors")["sparsity"]')
    lines += ["```", ""]
    if density is not None:
        freq = density.frequency
        alive = freq[freq > 0]
        lines += [
            "## Feature density",
            "",
            f"Measured on {density.source} ({density.n_rows:,} slices): "
            f"{alive.size} of {freq.size} latents fire at least once, "
            f"**{density.n_dead} never fire** (dead on that set, {density.n_dead / max(freq.size, 1):.1%}).",
        ]
        if alive.size:
            q = np.quantile(alive, [0.1, 0.5, 0.9])
            lines.append(
                f"Firing frequency of the latents that fire: 10 % / median / 90 % = "
                f"{q[0]:.3g} / {q[1]:.3g} / {q[2]:.3g} (share of slices)."
            )
        lines.append("")
    if facts.metrics:
        lines += [
            "## Metrics (from the medsae registry)",
            "",
            "| metric | split | definition | value |",
            "|---|---|---|---|",
            *(f"| `{m}` | {split} | {text} | {value:.4g} |" for m, split, text, value in facts.metrics),
            "",
        ]
    return "\n".join(lines).rstrip() + "\n"
