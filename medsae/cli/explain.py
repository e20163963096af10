"""`medsae explain run|compare|show`: explain latents with any litellm model, compare, inspect."""

from __future__ import annotations

from pathlib import Path

import typer

from medsae.cli.common import FormatOption, RegistryOption, choice, console, name_help, open_registry
from medsae.cli.output import Listing, cell, columns, render

#: LLM cache modes (medsae.interp.llm.MODES, not imported here: the CLI starts without asyncio).
LLM_MODES: tuple[str, ...] = ("live", "record", "replay")

app = typer.Typer(help="Explain latents with an LLM, compare explainers, show one latent.", no_args_is_help=True)


def _fmt(value: object, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


@app.command("run")
def run_command(
    experiment: str = typer.Argument(..., help=name_help()),
    model: str = typer.Option(..., "--model", help="litellm model id of the explainer, e.g. openai/gpt-4o-mini."),
    scorer: str | None = typer.Option(
        None, "--scorer", help="Simulator model (default: the experiment's reference scorer)."
    ),
    latents: str | None = typer.Option(None, "--latents", help="Only these latents, e.g. 1,2,10-20."),
    template: Path | None = typer.Option(None, "--template", help="Explainer prompt template (.j2 file)."),
    concurrency: int | None = typer.Option(None, "--concurrency", help="LLM calls in flight."),
    max_cost: float | None = typer.Option(None, "--max-cost", help="Stop calling above this cost (USD)."),
    api_base: str | None = typer.Option(None, "--api-base", help="Explainer API base URL."),
    scorer_api_base: str | None = typer.Option(None, "--scorer-api-base", help="Scorer API base URL."),
    mode: str | None = typer.Option(
        None, "--mode", help="LLM cache mode (default: the spec's).", **choice("--mode", "mode", LLM_MODES)
    ),
    timeout: float | None = typer.Option(None, "--timeout", help="Seconds one LLM call may take."),
    max_retries: int | None = typer.Option(
        None, "--max-retries", help="Retries per LLM call (rate limits, timeouts, server errors)."
    ),
    registry: RegistryOption = None,
) -> None:
    """Explain and score the experiment's latents with MODEL; rows are added beside earlier ones.

    Rows are written as latents finish: a run stopped halfway keeps them, and the same command
    resumes (answers already received come from the cache, with no new LLM call).
    """
    from medsae.interp.experiment import explain_experiment, parse_latents
    from medsae.interp.run_stats import summary_line

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
        out.print(f"  pearson r ({kind}): mean {_fmt(agg['mean'])}, median {_fmt(agg['median'])} (n={agg['n']})")
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
    experiment: str = typer.Argument(..., help=name_help()),
    registry: RegistryOption = None,
    format: FormatOption = "table",
) -> None:
    """Models x score summary: every explainer and baseline, per scorer and method.

    Degenerate scores (predictions that do not depend on the explanation) are counted and left out
    of the means; below the table, one line per scorer says whether it tells a real explanation
    from a shuffled one (the real - shuffled pearson gap with its 95% CI).
    """
    from medsae.interp.experiment import compare, scorer_gaps

    reg = open_registry(registry)
    frame = compare(reg, experiment)
    rows = [] if frame.empty else frame.to_dict("records")
    gaps = scorer_gaps(reg, experiment) if rows else []
    notes = [gap["words"] for gap in gaps]
    if not rows:
        notes = [f"{experiment}: no explanation scores yet (run `medsae explain run` or `exp run`)"]
    elif not gaps:
        notes = ["no shuffled baseline scored yet: nothing says whether the scorer can tell explanations apart"]
    cols = columns(
        "method",
        "explainer",
        "kind",
        "scorer",
        "mode",
        "n",
        ("n_null", "null"),
        "mean",
        "median",
        ("share_ge_0.5", "≥0.5"),
        "chance",
        ("n_degenerate", "degenerate"),
    )
    listing = Listing(cols, rows, title=f"explanation scores of {experiment}", notes=notes)
    meta = {"scorer_gaps": [gap["words"] for gap in gaps]} if format == "json" else None
    render(listing, format, meta=meta)


def _score_text(sc: dict) -> str:
    ci = f" [{cell(sc['ci_low'])}, {cell(sc['ci_high'])}]" if sc["ci_low"] is not None else ""
    flag = " DEGENERATE" if sc.get("degenerate") else ""
    repaired = f", {sc['n_repaired']} repaired" if sc.get("n_repaired") else ""
    return f"{sc['method']}={cell(sc['value'])}{ci} ({sc['scorer_model']}{repaired}){flag}"


@app.command("show")
def show_command(
    experiment: str = typer.Argument(..., help=name_help()),
    latent: int = typer.Argument(..., help="Latent index."),
    registry: RegistryOption = None,
    format: FormatOption = "table",
) -> None:
    """One latent: statistics, every explanation version with its scores, the slices shown."""
    from medsae.interp.experiment import show

    info = show(open_registry(registry), experiment, latent)
    s = info["latent"]
    stats = (
        f"latent {latent}: status {s.get('status')}, frequency {cell(s.get('frequency'))}, "
        f"n_active {s.get('n_active')}, scans {s.get('n_patients')}, mean {cell(s.get('mean_act'))}, "
        f"max {cell(s.get('max_act'))}"
    )
    explanations = Listing(
        columns("explainer", "kind", "status", "examples", "text", "scores"),
        [
            {
                "explainer": e["explainer_model"],
                "kind": e["kind"],
                "status": e["status"],
                "examples": e.get("n_examples"),
                "text": e["text"],
                "scores": [_score_text(sc) for sc in e["scores"]] if format == "table" else e["scores"],
            }
            for e in info["explanations"]
        ],
        title="explanations (all versions)",
        key="explanations",
    )
    shown = Listing(
        columns("id", "strength", "role", ("slice_uid", "slice"), ("line", "metadata")),
        info["examples"],
        title="slices shown to the explainer",
        key="examples",
    )
    latent_stats = {k: v for k, v in s.items() if k not in ("stage_key", "sae_key")}
    render([explanations, shown], format, preamble=[stats], meta={"latent": latent_stats})
