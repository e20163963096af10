"""`medsae gc` and `medsae exp rm`: free disk space, remove experiments (thin: parse, call, print).

The work is in :mod:`medsae.registry.maintenance`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.markup import escape

from medsae.cli.common import RegistryOption, console, open_registry


def _shown(path: Path, base: Path) -> str:
    """``path`` relative to ``base`` when under it (shorter lines), else as is."""
    try:
        return path.relative_to(base).as_posix()
    except ValueError:
        return str(path)


def gc_command(
    delete: bool = typer.Option(False, "--delete", help="Delete what is listed (default: a dry run)."),
    artifacts: list[Path] = typer.Option(
        [],
        "--artifacts",
        metavar="DIR",
        help="Also look in this artifacts folder (repeatable; the registry's own folders are always looked at).",
        show_default=False,
    ),
    llm_cache: list[Path] = typer.Option(
        [],
        "--llm-cache",
        metavar="DIR",
        help="Also collect this LLM cache folder, e.g. $MEDSAE_LLM_CACHE (only if no other registry uses it).",
        show_default=False,
    ),
    keep_recent: float = typer.Option(
        60.0,
        "--keep-recent",
        min=0,
        metavar="MINUTES",
        help="Minutes: LLM cache entries younger than this stay (a running `explain run` may not have "
        "registered them yet).",
    ),
    registry: RegistryOption = None,
) -> None:
    """List (or with --delete, delete) what no registered stage needs: orphaned stage folders,
    .tmp/.work/.old leftovers of killed runs, render caches of unregistered stages, LLM cache
    entries that no llm_calls row references. Prints the bytes it would free."""
    from medsae.paths import registry_folder
    from medsae.registry.maintenance import delete_garbage, find_garbage, human_bytes

    reg = open_registry(registry)
    report = find_garbage(reg, artifacts, llm_cache, keep_recent_s=keep_recent * 60)
    out = console()
    base = registry_folder(reg.path)
    looked = ", ".join(_shown(p, base) for p in report.roots) or "none found"
    out.print(f"registry {escape(str(reg.path))}; artifacts folders: {escape(looked)}")
    for item in report.items:
        out.print(f"{human_bytes(item.bytes):>9}  {item.what:<28} {escape(_shown(item.path, base))}")
    for line in report.skipped:
        out.print(f"[yellow]skipped[/]  {escape(line)}")
    total = human_bytes(report.bytes)
    if not delete:
        if report.items:
            out.print(f"[bold]would free {total} in {len(report.items)} item(s)[/] (dry run: `medsae gc --delete`)")
        else:
            out.print("[bold]nothing to free[/]")
        return
    deleted, freed, problems = delete_garbage(report)
    for line in problems:
        print(f"warning: {line}", file=sys.stderr)
    out.print(f"[bold]freed {human_bytes(freed)} in {deleted} item(s)[/]")


def rm_command(
    name: str = typer.Argument(..., help="Experiment name (every registration of it), or NAME@HASH-PREFIX."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
    registry: RegistryOption = None,
) -> None:
    """Remove an experiment's rows from the registry; stages other experiments use stay.

    Stage folders stay on disk: `medsae gc` lists them afterwards and `medsae gc --delete` frees them.
    """
    from medsae.registry.maintenance import human_bytes, plan_removal, remove, tree_bytes

    reg = open_registry(registry)
    removal = plan_removal(reg, name)
    out = console()
    for e in removal.experiments:
        out.print(f"experiment {escape(e['name'])}  {e['experiment_id'][:12]}  created {str(e['created_at'])[:19]}")
    kinds = ", ".join(s["kind"] for s in removal.removed_stages) or "none"
    folders = [s["folder"] for s in removal.removed_stages if s["folder"] is not None and s["folder"].is_dir()]
    size = human_bytes(sum(tree_bytes(f) for f in folders))
    out.print(f"stages removed: {len(removal.removed_stages)} ({kinds}); their folders hold {size}")
    if removal.kept_stages:
        users = sorted({n for names in removal.kept_stages.values() for n in names})
        shown = ", ".join(users[:5]) + (" ..." if len(users) > 5 else "")
        out.print(f"stages kept (other experiments use them): {len(removal.kept_stages)} ({escape(shown)})")
    if not yes and not typer.confirm(f"Remove {len(removal.experiments)} registration(s) of '{name}'?"):
        print("nothing removed", file=sys.stderr)
        raise typer.Exit(1)
    remove(reg, removal)
    hint = f"; `medsae gc --delete` frees {size}" if folders else ""
    out.print(f"[bold]removed {len(removal.experiments)} experiment registration(s)[/]{hint}")
