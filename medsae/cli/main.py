"""The `medsae` command: mounts each command group and turns user errors into one line."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer

from medsae.cli import exp
from medsae.cli.sql import sql_command
from medsae.errors import MedsaeError, SpecError
from medsae.threads import apply_thread_limits

# litellm would otherwise try to download its price table at import (slow, and offline it retries).
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

app = typer.Typer(
    name="medsae",
    help="Sparse autoencoders on medical image embeddings: slice, embed, train, evaluate, explain.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,  # --install-completion / --show-completion: commands, options, stage names, formats
    rich_markup_mode=None,  # plain help: option types as readable metavars, no <bool> on flags
)


def _print_version(value: bool) -> None:
    if value:
        from medsae import __version__

        print(f"medsae {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    registry: Path | None = typer.Option(
        None,
        "--registry",
        help="Registry file for every command (also $MEDSAE_REGISTRY).",
        show_default=False,
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
    version: bool = typer.Option(
        False, "--version", help="Print medsae's version and exit.", is_eager=True, callback=_print_version
    ),
) -> None:
    if registry is not None:
        os.environ["MEDSAE_REGISTRY"] = str(registry)
    if quiet:
        os.environ["MEDSAE_QUIET"] = "1"


app.add_typer(exp.app, name="exp")
app.command("sql")(sql_command)


def _mount_optional() -> None:
    """Command groups that live in other modules (each cheap to import: heavy imports are lazy)."""
    from medsae.cli import data, explain, export, gc, maps, report, search
    from medsae.cli import eval as eval_cli
    from medsae.cli import imports as imports_cli
    from medsae.cli import study as study_cli

    app.add_typer(data.app, name="data", help="Datasets: phantoms, ingest (TotalSegmentator, manifest, DICOM, 2-D).")
    app.add_typer(eval_cli.app, name="eval", help="Rank SAE configurations, plot sweeps.")
    app.add_typer(explain.app, name="explain", help="Explain latents with an LLM, compare explainers.")
    app.command("search")(search.search_command)
    app.command("report")(report.report_command)
    app.command("export")(export.export_command)
    exp.app.command("compare")(report.compare_command)
    exp.app.command("rm")(gc.rm_command)
    app.command("gc")(gc.gc_command)
    app.command("study-table")(study_cli.study_table_command)
    app.add_typer(imports_cli.app, name="import", help="Import SAEs trained elsewhere (the study's checkpoints).")
    app.add_typer(maps.app, name="latent", help="One latent on one slice: its activation map as a picture.")


_mount_optional()


def main() -> None:
    """Entry point: run the app; a MedsaeError becomes `error: <one line>` and its exit code."""
    try:
        apply_thread_limits()  # env only (torch not imported yet): torch, BLAS and workers read it
        app()
    except MedsaeError as exc:
        lines = str(exc).strip().splitlines() or ["error"]
        extra = f" (+{len(lines) - 1} more)" if len(lines) > 1 else ""
        if len(lines) > 1 and isinstance(exc, SpecError):
            extra = f" (+{len(lines) - 1} more: `medsae exp validate SPEC` lists every problem)"
        print(f"error: {lines[0]}{extra}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume", file=sys.stderr)
        sys.exit(130)
    except OSError as exc:  # the file system refused (permissions, full disk...): name the path, no traceback
        if exc.filename is None:
            raise
        print(f"error: {exc.filename}: {exc.strerror or exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
