"""`medsae import sail CKPT --name NAME [--embeddings EXP]`: run the study's published SAEs through medsae.

The command writes an ordinary spec, ``NAME.yaml``, whose ``sae:`` section names the checkpoint
and pins its sha256 (``sae.checkpoint``, ``sae.checkpoint_sha256``), then runs it like
``medsae exp run``: the train stage imports the file instead of training (:mod:`medsae.sae.sail`),
and encode, evaluate, summarize and interpret follow; ``report`` and ``export`` then work on NAME.
The file's sha256 is part of the train key, so the same checkpoint is imported once and a changed
one is a new stage. Rerunning the command resumes (the spec it writes is the same).

Where the data and backbone come from:

* ``--embeddings EXP``: experiment EXP's spec from the registry (its data, embed, eval and
  interpret sections and seed, as written), so its slices and embeddings are reused. NAME.yaml is
  written next to EXP's spec file, where EXP's relative paths point to the same folders.
* without it: the study's own setting for the checkpoint's input width, taken from the shipped
  study grids (1024: DINOv3 ViT-L/16, ``study_grid_dinov3.yaml``; 1536: BiomedParse,
  ``study_grid_biomedparse.yaml``) on ``data/TotalSegmentator``; NAME.yaml goes to the current folder.

Everything is checked before anything is written: a file that is not a study checkpoint, or one
whose input width differs from EXP's embeddings, is one line and leaves no spec and no registry row.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from medsae.cli.common import RegistryOption, console, name_help, open_registry, stage_choice, stage_help
from medsae.errors import MedsaeError

if TYPE_CHECKING:
    from medsae.sae.sail import SailCheckpoint

app = typer.Typer(help="Import SAEs trained elsewhere and run medsae's stages on them.", no_args_is_help=True)

#: The study's backbone for each input width of its published SAEs: the shipped spec holding its setting.
STUDY_SPECS = {1024: "study_grid_dinov3", 1536: "study_grid_biomedparse"}
#: Sections (and top-level fields) an imported experiment takes over from the spec it derives from.
TAKEN = ("seed", "artifacts", "data", "embed", "eval", "interpret")


def _from_experiment(experiment: str, registry: Path | None, ckpt: SailCheckpoint) -> tuple[dict[str, Any], Path, str]:
    """(EXP's spec, the folder its relative paths start from, a description); one line on a width mismatch."""
    from medsae.embed.store import open_embeddings
    from medsae.paths import resolve_stored
    from medsae.registry import queries
    from medsae.sae.sail import check_width

    reg = open_registry(registry)
    exp = queries.find_experiment(reg, experiment)
    source = f"the embeddings of '{exp['name']}'"
    check_width(ckpt, open_embeddings(queries.stage_folder(reg, exp, "embed")).d, source)
    folder = resolve_stored(exp["spec_path"], reg.path).parent if exp.get("spec_path") else Path.cwd()
    return json.loads(exp["spec_json"]), folder, source


def _from_study(width: int, checkpoint: Path) -> tuple[dict[str, Any], Path, str]:
    """The shipped study spec of the backbone with this input width; one line for any other width."""
    from medsae.resources import example_spec
    from medsae.spec import load_yaml, read_spec_text

    if width not in STUDY_SPECS:
        known = ", ".join(f"{w} ({name})" for w, name in STUDY_SPECS.items())
        raise MedsaeError(
            f"{checkpoint}: input width {width} is none of the study's backbones ({known}); "
            "give --embeddings EXP, an experiment whose embeddings are that wide"
        )
    path = example_spec(STUDY_SPECS[width])
    return load_yaml(read_spec_text(path), str(path)), Path.cwd(), f"the study's setting ({path.name})"


def _spec_path_text(path: Path, folder: Path) -> str:
    """How the spec names ``path``: relative to the spec's folder when it lies under it, else absolute."""
    target = path.resolve()
    try:
        return target.relative_to(folder.resolve()).as_posix()
    except ValueError:
        return str(target)


def _write_once(path: Path, text: str) -> bool:
    """Write ``path`` atomically; a file already holding ``text`` is kept (rerun), any other is an error."""
    if path.exists():
        if path.is_file() and path.read_text(encoding="utf-8") == text:
            return False
        raise MedsaeError(f"{path}: exists with other content; choose another --name or move the file")
    tmp = path.with_name(f".{path.name}.part")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return True


@app.command("sail")
def sail_command(
    checkpoint: Path = typer.Argument(
        ..., help="The study's Lightning .ckpt (e.g. dinov3_sae.ckpt or biomedparse_sae.ckpt from pwesp/sail)."
    ),
    name: str = typer.Option(..., "--name", help="Name of the experiment to create (and of NAME.yaml)."),
    embeddings: str | None = typer.Option(
        None,
        "--embeddings",
        help=name_help("Experiment whose data, embeddings and eval/interpret settings to use")
        + " Default: the study's backbone for the checkpoint's input width (1024 DINOv3, 1536 BiomedParse).",
        show_default=False,
    ),
    only: list[str] = typer.Option(
        [],
        "--only",
        help=stage_help("Run only these stages (repeatable), e.g. up to evaluate."),
        **stage_choice("--only"),
    ),
    registry: RegistryOption = None,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Import one of the study's SAE checkpoints as experiment NAME and run its stages.

    Writes NAME.yaml (next to EXP's spec with --embeddings, else in the current folder) whose
    sae.checkpoint names the file, then runs it as `medsae exp run NAME.yaml` would.
    """
    import yaml

    from medsae.cli import exp as exp_cli
    from medsae.sae.sail import file_sha256, read_sail_checkpoint
    from medsae.spec import parse_specs

    ckpt = read_sail_checkpoint(checkpoint)
    width = ckpt.config.d_in
    if embeddings is not None:
        base, folder, source = _from_experiment(embeddings, registry, ckpt)
        if base.get("name") == name:
            raise MedsaeError(f"--name: '{name}' is the experiment the embeddings come from; choose another name")
    else:
        base, folder, source = _from_study(width, checkpoint)
    spec: dict[str, Any] = {
        "name": name,
        "description": f"The study's SAE {ckpt.config_name} imported from {checkpoint.name}, on {source}.",
        **{key: base[key] for key in TAKEN if key in base},
        "sae": {
            "preset": "study",
            "levels": ckpt.config.levels,
            "level_k": ckpt.config.level_k,
            "checkpoint": _spec_path_text(checkpoint, folder),
            "checkpoint_sha256": file_sha256(checkpoint),
        },
    }
    target = folder / f"{name}.yaml"
    parse_specs(spec, str(target))  # a bad --name or section is one line, before anything is written
    header = f"# Written by `medsae import sail`: {spec['description']}\n"
    wrote = _write_once(target, header + yaml.safe_dump(spec, sort_keys=False, allow_unicode=True))
    console().print(
        f"{'wrote' if wrote else 'kept'} {target}: {ckpt.config_name}, input width {width}, "
        f"θ = {ckpt.theta:.6g}, from {source}",
        markup=False,
    )
    exp_cli.run(
        spec=target, force=[], only=only, sets=None, registry=registry, quiet=quiet, executor=None, address=None
    )
