"""Where backbone weights come from: the Hugging Face cache, a local file, or a seeded random init.

Hub weights resolve through ``huggingface_hub``: the cache under ``HF_HOME`` (or ``HF_HUB_CACHE``),
``HF_TOKEN`` for gated models such as DINOv3 and BiomedParse, and ``HF_HUB_OFFLINE=1`` to never
touch the network (transformers loads try the cache alone first in any case).

Every failure a user can cause (weights not downloaded, offline, gated model without a token, a
checkpoint that does not fit the architecture) becomes one :class:`~medsae.errors.MedsaeError`
line that names the model, where medsae looked, and what to do about it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from medsae.errors import MedsaeError, MissingInputError

T = TypeVar("T")

#: Errors the hub clients raise when weights cannot be had (not cached, offline, gated, no network).
HUB_ERRORS: tuple[type[BaseException], ...] = (OSError, ConnectionError)


def hf_cache_dir() -> str:
    """The Hugging Face hub cache in use (``HF_HUB_CACHE`` / ``HF_HOME`` / ~/.cache/huggingface/hub)."""
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def hf_offline() -> bool:
    return any(
        os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def missing_weights(model_id: str, *, what: str = "weights") -> MissingInputError:
    """The one-line error for weights that are not available locally."""
    mode = "offline mode" if hf_offline() else "download failed"
    return MissingInputError(
        f"embed: {what} of '{model_id}' not found in the Hugging Face cache {hf_cache_dir()} ({mode}); "
        f"download them with `huggingface-cli download {model_id}` (gated models: set HF_TOKEN first) "
        "or set embed.weights to a local checkpoint file"
    )


def fetch(model_id: str, load: Callable[[], T], *, what: str = "weights") -> T:
    """Run a hub loading call, turning 'cannot get the files' into :func:`missing_weights`."""
    try:
        return load()
    except HUB_ERRORS:
        raise missing_weights(model_id, what=what) from None


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint (safetensors, or a torch state dict possibly wrapped in 'state_dict'/'model')."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise MissingInputError(f"embed.weights: checkpoint file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any unreadable file is the user's input error
        raise MedsaeError(f"embed.weights: cannot read checkpoint {path}: {type(err).__name__}: {err}") from None
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(state, Mapping) and isinstance(state.get(wrapper), Mapping):
            state = state[wrapper]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise MedsaeError(f"embed.weights: {path} does not hold a state dict of tensors")
    return dict(state)


def strip_prefixes(state: Mapping[str, torch.Tensor], prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Remove wrapper prefixes ('module.', 'model.', ...) shared by every key."""
    out = dict(state)
    changed = True
    while changed:
        changed = False
        for prefix in prefixes:
            if out and all(k.startswith(prefix) for k in out):
                out = {k[len(prefix) :]: v for k, v in out.items()}
                changed = True
    return out


def load_into(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    *,
    source: str,
    ignore_unexpected: Callable[[str], bool] = lambda key: False,
    assign: bool = False,
) -> None:
    """Load ``state`` into ``model`` strictly; any missing, surplus or misshapen tensor is one error line.

    ``assign=True`` takes the checkpoint's tensors as the parameters (for a model built on the meta
    device, which skips a pointless random init of every weight).
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own and not ignore_unexpected(k)]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
    if shapes:
        problems.append(f"{len(shapes)} with other shapes (e.g. {'; '.join(shapes[:2])})")
    if problems:
        raise MedsaeError(f"embed.weights: {source} does not fit the architecture: {'; '.join(problems)}")
    model.load_state_dict(
        {k: state[k].float() if state[k].is_floating_point() else state[k] for k in own},
        strict=True,
        assign=assign,
    )


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed torch's CPU generator for a block without disturbing the caller's random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def study_init_(model: nn.Module, seed: int) -> nn.Module:
    """The study's random-init control: Linear/Conv2d weights ~ trunc. normal(std 0.02), biases 0, norms 1/0.

    Other module types keep their constructor defaults (docs/method.md#random-init). The order in
    which modules draw numbers follows ``model.modules()``, seeded by ``seed``.
    """
    from timm.layers import trunc_normal_

    with seeded(seed), torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                if module.weight is not None:
                    nn.init.ones_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
    return model
