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
    timeout: float | None = typer.Option(None, "--timeout", help="Seconds one LLM call may take."),  # noqa: UP007
    max_retries: int | None = typer.Option(  # noqa: UP007
        None, "--max-retries", help="Retries per LLM call (rate limits, timeouts, server errors)."
    ),
    registry: RegistryOption = None,
) -> None:
    """Explain and score the experiment's latents with MODEL; rows are added beside earlier ones.

    Rows are written as latents finish: a run stopped halfway keeps them, and the same command
    resumes (answers already received come from the cache, with no new LLM call).
    """
    from medsae.interp.agent import summary_line
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
        timeout_s=timeout,
        max_retries=max_retries,
    )
    out = console()
    if summary.get("pool_note"):
        out.print(f"  note: {summary['pool_note']}")
    out.print(
        f"{experiment}: {summary['explained']}/{summary['latents']} latents explained by "
        f"{summary['explainer_model']} "
        f"(parse failures {summary['parse_failed']}, explain calls failed {summary['call_failures']}); "
        f"{summary['llm_calls']} LLM calls, {summary['cache_hits']} cached, ${summary['cost_usd']:.4f}, "
        f"{summary['seconds']:.1f}s"
    )
    for kind, agg in summary["pearson"].items():
        out.print(
            f"  pearson r ({kind}): mean {_fmt(agg['mean'])}, median {_fmt(agg['median'])} (n={agg['n']})"
        )
    new = summary["new_rows"]
    out.print("  new rows: " + ", ".join(f"{t} {n}" for t, n in new.items()))
    if summary.get("no_logprobs_batches"):
        out.print(
            f"  note: the scorer sent no logprobs for {summary['no_logprobs_batches']} batches: their predictions "
            "are parsed integers (n_no_logprobs in the scores' extra_json)"
        )
    out.print(f"{experiment}: {summary_line(summary)}", highlight=False)


@app.command("compare")
def compare_command(
    experiment: str = typer.Argument(..., help="Experiment name."),
    registry: RegistryOption = None,
) -> None:
    """Models x score summary: every explainer and baseline, per scorer and method.

    Degenerate scores (predictions that do not depend on the explanation) are counted and left out
    of the means; below the table, one line per scorer says whether it tells a real explanation
    from a shuffled one (the real - shuffled pearson gap with its 95% CI).
    """
    from medsae.interp.runs import compare, scorer_gaps

    reg = open_registry(registry)
    frame = compare(reg, experiment)
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
        "degenerate",
    ):
        numeric = ("n", "null", "mean", "median", "≥0.5", "chance", "degenerate")
        table.add_column(col, justify="right" if col in numeric else "left")
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
            str(r["n_degenerate"]),
        )
    out = console()
    out.print(table)
    gaps = scorer_gaps(reg, experiment)
    if not gaps:
        out.print("no shuffled baseline scored yet: nothing says whether the scorer can tell explanations apart")
    for gap in gaps:
        out.print(gap["words"], highlight=False, soft_wrap=True)


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
    for col in ("explainer", "kind", "status", "examples", "text", "scores"):
        table.add_column(col)
    for e in info["explanations"]:
        parts = []
        for sc in e["scores"]:
            ci = f" [{_fmt(sc['ci_low'], 2)}, {_fmt(sc['ci_high'], 2)}]" if sc["ci_low"] is not None else ""
            flag = " DEGENERATE" if sc.get("degenerate") else ""
            repaired = f", {sc['n_repaired']} repaired" if sc.get("n_repaired") else ""
            parts.append(f"{sc['method']}={_fmt(sc['value'])}{ci} ({sc['scorer_model']}{repaired}){flag}")
        table.add_row(
            e["explainer_model"],
            e["kind"],
            e["status"],
            _fmt(e.get("n_examples")),
            e["text"] or "-",
            "\n".join(parts) or "-",
        )
    out.print(table)
    shown = Table(title="slices shown to the explainer")
    for col in ("id", "strength", "role", "slice", "metadata"):
        shown.add_column(col)
    for ex in info["examples"]:
        shown.add_row(ex["id"], str(ex["strength"]), str(ex["role"]), str(ex["slice_uid"]), ex["line"])
    out.print(shown)
