"""`medsae exp ...`: validate, schema, plan, run, list, show (thin: parse, call, print)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from medsae.cli.common import (
    FormatOption,
    RegistryOption,
    choice,
    console,
    name_help,
    open_registry,
    stage_choice,
    stage_help,
)
from medsae.cli.output import Column, Listing, cell, columns, render
from medsae.executor.base import EXECUTORS
from medsae.registry import Registry, queries
from medsae.report.names import DEAD_ALIVE_DEFINITIONS, SPLIT_ORDER, listed_metrics, metric_definition
from medsae.stages import STAGES

app = typer.Typer(help="Experiments: validate, plan and run specs; list and show results.", no_args_is_help=True)

#: Metrics shown by `exp list` (val split, as `exp compare`): the scalar key metrics.
KEY_METRICS = listed_metrics()

SetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        metavar="FIELD=VALUE",
        help="Override a spec field, e.g. --set sae.k=16 (repeatable; the value is read as YAML and "
        "checked like the file; it enters the resolved spec, so the experiment hash changes).",
        show_default=False,
    ),
]


@app.command()
def validate(spec: Path = typer.Argument(..., help="Experiment YAML file."), sets: SetOption = None) -> None:
    """Check a spec: every unknown key, wrong type and bad value, one file:field: message line each.

    Writes nothing. A data folder that does not exist yet is a warning (on stderr), not an error.
    """
    import sys

    from rich.markup import escape

    from medsae.errors import SpecError
    from medsae.spec import load_specs, spec_warnings

    try:
        specs = load_specs(spec, sets or ())
    except SpecError as exc:  # every problem, not only the first (other commands print one line)
        for line in str(exc).strip().splitlines():
            print(f"error: {line}", file=sys.stderr)
        raise typer.Exit(exc.exit_code) from None
    for line in spec_warnings(specs, str(spec)):
        print(f"warning: {line}", file=sys.stderr)
    names = ", ".join(s.name for s in specs[:5]) + (" ..." if len(specs) > 5 else "")
    console().print(f"[green]ok[/] {escape(str(spec))}: {len(specs)} experiment(s): {escape(names)}")


@app.command()
def schema() -> None:
    """Print the JSON Schema of an experiment spec (point your editor's YAML plugin at it)."""
    from medsae.spec import json_schema

    print(json.dumps(json_schema(), indent=2))


@app.command()
def plan(
    spec: Path = typer.Argument(..., help="Experiment YAML file."),
    sets: SetOption = None,
    registry: RegistryOption = None,
) -> None:
    """Show every stage of the spec's experiments with its key and whether it is done."""
    from medsae.plan import plan_experiment, stage_status
    from medsae.spec import load_specs

    reg = open_registry(registry)
    table = Table(title=f"plan of {spec}")
    for col in ("experiment", "stage", "key", "status"):
        table.add_column(col)
    for s in load_specs(spec, sets or ()):
        p = plan_experiment(s)
        status = stage_status(reg, p)
        for kind, node in p.nodes.items():
            colour = {"done": "green", "pending": "yellow"}.get(status[kind], "red")
            table.add_row(s.name, kind, node.key[:12], f"[{colour}]{status[kind]}[/]")
    console().print(table)


@app.command()
def run(
    spec: Path = typer.Argument(..., help="Experiment YAML file."),
    force: list[str] = typer.Option(
        [], "--force", help=stage_help("Rerun this stage even if done (repeatable)."), **stage_choice("--force")
    ),
    only: list[str] = typer.Option(
        [], "--only", help=stage_help("Run only these stages (repeatable)."), **stage_choice("--only")
    ),
    sets: SetOption = None,
    registry: RegistryOption = None,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
    executor: str | None = typer.Option(
        None,
        "--executor",
        help="Where stage functions run: local (this process, the default) or ray (a Ray cluster; "
        "`pip install medsae[ray]`; every worker must see the artifacts folder). Overrides the spec's executor.",
        show_default=False,
        **choice("--executor", "executor", EXECUTORS),
    ),
    address: str | None = typer.Option(
        None,
        "--address",
        help="Ray cluster of --executor ray: auto (started by `ray start` on this machine) or HOST:PORT; "
        "default: the spec's ray_address, else RAY_ADDRESS, else a new local cluster.",
        show_default=False,
    ),
) -> None:
    """Run every missing stage of the spec's experiments; a rerun resumes where it stopped."""
    import time

    from medsae.executor.base import make_executor
    from medsae.plan import check_write_places, plan_experiment, run_plans
    from medsae.progress import set_quiet
    from medsae.spec import load_specs

    if quiet:
        set_quiet(True)
    out = console()
    t0 = time.perf_counter()
    specs = load_specs(spec, sets or ())
    reg = open_registry(registry)
    check_write_places(specs, reg)  # a read-only folder is one line before any work
    plans = [plan_experiment(s) for s in specs]
    sweep = specs[0].name.split("@")[0] if len(specs) > 1 else None

    def show(event) -> None:
        names = ", ".join(event.experiments[:3]) + (" ..." if len(event.experiments) > 3 else "")
        if event.action == "ran":
            out.print(f"[green]ran[/]   {event.kind:<10} {event.key[:12]}  {event.seconds:8.1f}s  {names}")
        elif event.action == "waiting":
            out.print(f"[yellow]wait[/]  {event.kind:<10} {event.key[:12]}  (another medsae process is building it)")
        else:
            out.print(f"[dim]done[/]  {event.kind:<10} {event.key[:12]}  (already {event.action})  {names}")

    runner = make_executor(*_executor_choice(specs, executor, address))
    try:
        outcomes = run_plans(
            plans,
            reg,
            force=set(force),
            only=set(only) or None,
            quiet=quiet,
            spec_path=str(spec),
            sweep=sweep,
            on_event=show,
            executor=runner,
        )
    finally:
        runner.close()
    ran = sum(o.action == "ran" for o in outcomes)
    out.print(
        f"[bold]{len(specs)} experiment(s), {ran} stage(s) run, {len(outcomes) - ran} already done, "
        f"{time.perf_counter() - t0:.1f}s[/] — registry {reg.path}"
    )


def _executor_choice(specs: list, executor: str | None, address: str | None) -> tuple[str, str | None]:
    """(executor, Ray address): the command line's, else the spec's (the experiments of a sweep must agree)."""
    from medsae.errors import MedsaeError

    chosen = {(s.executor, s.ray_address) for s in specs}
    if len(chosen) > 1 and (executor is None or (executor == "ray" and address is None)):
        raise MedsaeError("exp run: the sweep's experiments name different executors; give --executor (and --address)")
    spec_executor, spec_address = sorted(chosen, key=str)[0]
    name = executor or spec_executor
    return name, address or (spec_address if name == "ray" else None)


@app.command("list")
def list_(registry: RegistryOption = None, format: FormatOption = "table") -> None:
    """One line per experiment: name, hash, stages done, key metrics (val split), tags.

    NAME@HASH (a prefix of the hash shown) names one registration where a name has several.
    """
    reg = open_registry(registry)
    experiments = queries.list_experiments(reg)
    values = queries.key_metrics(reg, [e["experiment_id"] for e in experiments], [k.name for k in KEY_METRICS])
    tags = queries.tags_by_experiment(reg)
    rows = [
        {
            "name": e["name"],
            "hash": e["experiment_id"][:12],
            "created": e["created_at"],
            "stages": f"{e['stages_done']}/{e['stages']}",
            **{k.column: values.get(e["experiment_id"], {}).get(k.name) for k in KEY_METRICS},
            "tags": tags.get(e["experiment_id"], []),
        }
        for e in experiments
    ]
    dead_alive = [k for k in KEY_METRICS if k.name in DEAD_ALIVE_DEFINITIONS]  # labelled with split and definition
    label = {k.column: k.label or k.column for k in KEY_METRICS}
    cols = [Column("name"), Column("hash"), Column("created"), Column("stages")]
    cols += [Column(k.column, label[k.column]) for k in KEY_METRICS]
    if queries.has_table(reg, "experiment_tags"):
        cols.append(Column("tags"))
    notes = [f"{label[k.column]}: {metric_definition(k.name, k.split)}" for k in dead_alive]
    if not rows:
        notes.append("no experiments yet: `medsae exp run SPEC` registers one")
    render(Listing(cols, rows, title=f"experiments in {reg.path}", notes=notes), format)


def _summary_text(summary_json: str | None, full: bool, fields: int = 6) -> str:
    """A stage's summary: the whole JSON (``full``), else its first scalar fields as ``key=value``
    (floats rounded) and how many fields were left out."""
    if full or not summary_json:
        return summary_json or ""
    summary = json.loads(summary_json)
    scalars = [f"{k}={'null' if v is None else cell(v)}" for k, v in summary.items() if not isinstance(v, dict | list)]
    more = len(summary) - min(len(scalars), fields)
    return ", ".join(scalars[:fields]) + (f" (+{more} more: --format json)" if more else "")


def _split_order(split: str | None) -> tuple[int, str]:
    """Reading order of splits: train, val, test, all, then any other (e.g. an explanation pool)."""
    name = split or ""
    return (SPLIT_ORDER.index(name) if name in SPLIT_ORDER else len(SPLIT_ORDER), name)


def _metric_pivot(metrics: list[dict], limit: int, name: str) -> Listing:
    """Scalar metrics as one row per metric and one column per split (train, val, test, ...)."""
    splits = sorted({m["split"] or "(no split)" for m in metrics}, key=_split_order)
    table: dict[str, dict[str, object]] = {}
    for m in sorted(metrics, key=lambda m: m["stage"] != "evaluate"):  # the evaluate stage's row wins a tie
        table.setdefault(m["metric"], {"metric": m["metric"]}).setdefault(m["split"] or "(no split)", m["value"])
    ordered = [table[k] for k in sorted(table)]
    shown = ordered[:limit] if limit else ordered
    notes = [f"{k}: {metric_definition(k)}" for k in DEAD_ALIVE_DEFINITIONS if k in table]
    if len(shown) < len(ordered):
        notes.append(
            f"{len(ordered) - len(shown)} more metric(s) not shown: `medsae exp show {name} --limit 0` shows "
            "them all (--format csv or json prints every row)"
        )
    title = "metrics of the train and evaluate stages, one column per split (registry table `metrics`)"
    return Listing([Column("metric"), *(Column(s) for s in splits)], shown, title=title, key="metrics", notes=notes)


def _show_preamble(exp: dict, label: dict | None) -> list[str]:
    """The lines above `exp show`'s tables: identity, spec summary, tags and note."""
    spec = json.loads(exp["spec_json"])
    embed, sae, data = spec.get("embed") or {}, spec.get("sae") or {}, spec.get("data") or {}
    lines = [
        f"{exp['name']}@{exp['experiment_id'][:12]}  created {str(exp['created_at'])[:19]}"
        f"  spec {exp.get('spec_path') or '-'}",
        *([spec["description"]] if spec.get("description") else []),
        f"backbone {embed.get('source')}:{embed.get('model')} (pretrained={embed.get('pretrained')})"
        f"  SAE {sae.get('arch')} k={sae.get('k')}  data {data.get('root')}",
    ]
    if label and label["tags"]:
        lines.append(f"tags: {', '.join(label['tags'])}")
    if label and label["note"]:
        lines.append(f"note: {label['note']}")
    return lines


def _stage_rows(reg: Registry, experiment_id: str, full_keys: bool) -> list[dict]:
    order = {kind: i for i, kind in enumerate(STAGES)}
    stages = sorted(queries.experiment_stages(reg, experiment_id), key=lambda r: order.get(r["kind"], len(order)))
    return [
        {
            "stage": r["kind"],
            "key": r["stage_key"] if full_keys else r["stage_key"][:12],
            "status": r["status"],
            "seconds": round(r["seconds"], 1) if r["seconds"] is not None else None,
            "device": r["device"],
            "summary": _summary_text(r["summary_json"], full_keys),
        }
        for r in stages
    ]


@app.command()
def show(
    name: str = typer.Argument(..., help=name_help()),
    registry: RegistryOption = None,
    format: FormatOption = "table",
    limit: int = typer.Option(
        60, "--limit", min=0, help="Metrics shown in table format (0: all; csv and json print every row)."
    ),
) -> None:
    """Stages, keys, timings, every split's metrics and the explanations of one experiment."""
    from medsae.registry.maintenance import labels

    reg = open_registry(registry)
    exp = queries.find_experiment(reg, name)
    eid = exp["experiment_id"]
    label = labels(reg, [eid]).get(eid)
    stages = Listing(
        columns("stage", "key", "status", "seconds", "device", "summary"),
        _stage_rows(reg, eid, full_keys=format != "table"),
        title="stages",
        key="stages",
    )
    metrics = sorted(
        queries.scalar_metrics(reg, eid), key=lambda m: (_split_order(m["split"]), m["metric"], m["stage"])
    )
    if format == "table":
        metric_listing = _metric_pivot(metrics, limit, name)
    else:
        metric_listing = Listing(columns("stage", "split", "metric", "value", "n"), metrics, key="metrics")
    explainers = Listing(
        columns("explainer", "latents", ("mean_pearson", "mean pearson")),
        [
            {"explainer": r["explainer_model"], "latents": r["latents"], "mean_pearson": r["mean_score"]}
            for r in queries.explainer_summary(reg, eid)
        ],
        title="explanations: mean pearson r of each explainer's latest explanations "
        "(baselines and degenerate scores left out)",
        key="explanations",
    )
    meta = {
        "experiment": exp["name"],
        "experiment_id": eid,
        "created_at": exp["created_at"],
        "spec_path": exp.get("spec_path"),
        "tags": (label or {}).get("tags", []),
        "note": (label or {}).get("note"),
    }
    render([stages, metric_listing, explainers], format, preamble=_show_preamble(exp, label), meta=meta)


@app.command()
def tag(
    name: str = typer.Argument(..., help="Experiment name (its latest registration) or NAME@HASH-PREFIX."),
    tags: list[str] = typer.Argument(None, help="Tags to add.", show_default=False, metavar="TAG..."),
    remove: list[str] = typer.Option([], "--remove", help="Tag to remove (repeatable).", metavar="TAG"),
    note: str | None = typer.Option(
        None, "--note", help="Free-text note (replaces the old one; '' clears it).", show_default=False
    ),
    registry: RegistryOption = None,
) -> None:
    """Tag an experiment and keep a note on it; `exp list` and `exp show` show both."""
    from rich.markup import escape

    from medsae.errors import MedsaeError
    from medsae.registry.maintenance import labels, registrations
    from medsae.registry.maintenance import tag as set_tags

    reg = open_registry(registry)
    exp = registrations(reg, name)[0]
    clean = [t.strip() for t in tags or [] if t.strip()]
    if not clean and not remove and note is None:
        raise MedsaeError("exp tag: nothing to do (give tags to add, --remove TAG or --note TEXT)")
    set_tags(reg, exp["experiment_id"], clean, [t.strip() for t in remove], note)
    now = labels(reg, [exp["experiment_id"]]).get(exp["experiment_id"], {"tags": [], "note": None})
    line = f"{exp['name']} {exp['experiment_id'][:12]}: tags {', '.join(now['tags']) or '(none)'}"
    console().print(escape(line + (f"; note: {now['note']}" if now["note"] else "")))
