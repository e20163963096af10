"""Files medsae ships besides its code: the prompt templates and the example experiment specs.

Both folders live at the repository's top level (``prompts/``, ``experiments/``). A wheel carries
copies inside the package (``medsae/prompts``, ``medsae/experiments``, placed there by ``setup.py``
at build time) and they are found with :mod:`importlib.resources`; an editable install or a source
checkout has no such copies, so the top-level folders are used instead.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from medsae.errors import MissingInputError


def _folder(name: str) -> Path:
    """The packaged copy of ``name`` if the install has one, else the repository's top-level folder."""
    packaged = resources.files("medsae").joinpath(name)
    if isinstance(packaged, Path) and packaged.is_dir():
        return packaged
    checkout = Path(__file__).resolve().parents[1] / name
    if checkout.is_dir():
        return checkout
    raise MissingInputError(
        f"medsae installation: folder '{name}' not found (looked in {packaged} and {checkout}); reinstall medsae"
    )


def prompts_dir() -> Path:
    """The built-in prompt templates (``*.j2``)."""
    return _folder("prompts")


def examples_dir() -> Path:
    """The example experiment specs (``demo.yaml``, ``dinov3_k10.yaml``, the study grids)."""
    return _folder("experiments")


def example_spec(name: str) -> Path:
    """The path of example spec ``name`` (``demo`` or ``demo.yaml``); one-line error listing the others."""
    folder = examples_dir()
    path = folder / (name if name.endswith((".yaml", ".yml")) else f"{name}.yaml")
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in folder.glob("*.yaml")))
        raise MissingInputError(f"example spec '{name}' not found (shipped: {known})")
    return path
