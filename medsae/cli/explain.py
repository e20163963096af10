"""`medsae explain run|compare|show`: explain latents with any litellm model, compare, inspect."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from medsae.cli.common import RegistryOption, console, open_registry

app = typer.Typer(
    help="Explain latents with an LLM, compare explainers, show one latent.", no_args_is_help=True
)


def _fmt(value: object, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


@app.command("run")
def run_command(
    experiment: str = typer.Argument(..., help="Experiment name (see `medsae exp list`)."),
    model: str = typer.Option(
        ..., "--model", help="litellm model id of the explainer, e.g. openai/gpt-4o-mini."
    ),
    scorer: str | None = typer.Option(  # noqa: UP007
        None, "--scorer", help="Simulator model (default: the experiment's reference scorer)."
    ),
    latents: str | None = typer.Option(None, "--latents", help="Only these latents, e.g. 1,2,10-20."),  # noqa: UP007
    template: Path | None = typer.Option(None, "--template", help="Explainer prompt template (.j2 file)."),  # noqa: UP007
    concurrency: int | None = typer.Option(None, "--concurrency", help="LLM calls in flight."),  # noqa: UP007
    max_cost: float | None = typer.Option(None, "--max-cost", help="Stop calling above this cost (USD)."),  # noqa: UP007
    api_base: str | None = typer.Option(None, "--api-base", help="Explainer API base URL."),  # noqa: UP007
    scorer_api_base: str | None = typer.Option(None, "--scorer-api-base", help="Scorer API base URL."),  # noqa: UP007
    mode: str | None = typer.Option(None, "--mode", help="LLM cache mode: live, record or replay."),  # noqa: UP007
    registry: RegistryOption = None,
) -> None:
    """Explain and score the experiment's latents with MODEL; rows are added beside earlier ones."""
    from medsae.interp.runs import explain_experiment, parse_latents

    summary = explain_experiment(
        open_registry(registry),
        experiment,
        model,
        scorer=scorer,
        latents=parse_latents(latents),
        template=str(template) if template else None,
        concurrency=concurrency,
        max_cost_usd=max_cost,
        api_base=api_base,
        scorer_api_base=scorer_api_base,
        mode=mode,
    )
    out = console()
    out.print(
        f"{experiment}: {summary['explained']}/{summary['latents']} latents explained by "
        f"{summary['explainer_model']} "
        f"(parse failures {summary['parse_failed']}, failed calls {summary['call_failures']}); "
        f"{summary['llm_calls']} LLM calls, {summary['cache_hits']} cached, ${summary['cost_usd']:.4f}, "
        f"{summary['seconds']:.1f}s"
    )
    for kind, agg in summary["pearson"].items():
        out.print(
            f"  pearson r ({kind}): mean {_fmt(agg['mean'])}, median {_fmt(agg['median'])} (n={agg['n']})"
        )
    new = summary["new_rows"]
    out.print("  new rows: " + ", ".join(f"{t} {n}" for t, n in new.items()))


@app.command("compare")
def compare_command(
    experiment: str = typer.Argument(..., help="Experiment name."),
    registry: RegistryOption = None,
) -> None:
    """Models x score summary: every explainer and baseline, per scorer and method."""
    from medsae.interp.runs import compare

    frame = compare(open_registry(registry), experiment)
    if frame.empty:
        console().print(f"{experiment}: no explanation scores yet (run `medsae explain run` or `exp run`)")
        return
    table = Table(title=f"explanation scores of {experiment}")
    for col in (
        "method",
        "explainer",
        "kind",
        "scorer",
        "mode",
        "n",
        "null",
        "mean",
        "median",
        "≥0.5",
        "chance",
    ):
        table.add_column(
            col, justify="right" if col in ("n", "null", "mean", "median", "≥0.5", "chance") else "left"
        )
    for r in frame.to_dict("records"):
        table.add_row(
            r["method"],
            r["explainer"],
            r["kind"],
            str(r["scorer"]),
            str(r["mode"]),
            str(r["n"]),
            str(r["n_null"]),
            _fmt(r["mean"]),
            _fmt(r["median"]),
            _fmt(r["share_ge_0.5"], 2),
            _fmt(r["chance"], 2),
        )
    console().print(table)


@app.command("show")
def show_command(
    experiment: str = typer.Argument(..., help="Experiment name."),
    latent: int = typer.Argument(..., help="Latent index."),
    registry: RegistryOption = None,
) -> None:
    """One latent: statistics, every explanation version with its scores, the slices shown."""
    from medsae.interp.runs import show

    info = show(open_registry(registry), experiment, latent)
    out = console()
    s = info["latent"]
    out.print(
        f"latent {latent}: status {s.get('status')}, frequency {_fmt(s.get('frequency'), 4)}, "
        f"n_active {s.get('n_active')}, scans {s.get('n_patients')}, mean {_fmt(s.get('mean_act'))}, "
        f"max {_fmt(s.get('max_act'))}"
    )
    table = Table(title="explanations (all versions)")
    for col in ("explainer", "kind", "status", "text", "scores"):
        table.add_column(col)
    for e in info["explanations"]:
        parts = []
        for sc in e["scores"]:
            ci = f" [{_fmt(sc['ci_low'], 2)}, {_fmt(sc['ci_high'], 2)}]" if sc["ci_low"] is not None else ""
            parts.append(f"{sc['method']}={_fmt(sc['value'])}{ci} ({sc['scorer_model']})")
        table.add_row(e["explainer_model"], e["kind"], e["status"], e["text"] or "-", "\n".join(parts) or "-")
    out.print(table)
    shown = Table(title="slices shown to the explainer")
    for col in ("id", "strength", "role", "slice", "metadata"):
        shown.add_column(col)
    for ex in info["examples"]:
        shown.add_row(ex["id"], str(ex["strength"]), str(ex["role"]), str(ex["slice_uid"]), ex["line"])
    out.print(shown)
