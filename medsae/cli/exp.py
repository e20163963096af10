"""`medsae exp ...`: validate, schema, plan, run, list, show (thin: parse, call, print)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from medsae.cli.common import RegistryOption, console, open_registry
from medsae.report.names import listed_metrics

app = typer.Typer(
    help="Experiments: validate, plan and run specs; list and show results.", no_args_is_help=True
)

#: Metrics shown by `exp list` (first match per name, val split preferred): the scalar key metrics.
KEY_METRICS = listed_metrics()

SetOption = Annotated[
    list[str] | None,  # noqa: UP007 - typer needs Optional on Python 3.10
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
    """Check a spec: unknown keys, wrong types and bad values are reported as file:field: message.

    Writes nothing. A data folder that does not exist yet is a warning (on stderr), not an error.
    """
    import sys

    from rich.markup import escape

    from medsae.spec import load_specs, spec_warnings

    specs = load_specs(spec, sets or ())
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
    force: list[str] = typer.Option([], "--force", help="Rerun this stage even if done (repeatable)."),
    only: list[str] = typer.Option([], "--only", help="Run only these stages (repeatable)."),
    sets: SetOption = None,
    registry: RegistryOption = None,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Run every missing stage of the spec's experiments; a rerun resumes where it stopped."""
    import time

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

    def show(event) -> None:  # type: ignore[no-untyped-def]
        names = ", ".join(event.experiments[:3]) + (" ..." if len(event.experiments) > 3 else "")
        if event.action == "ran":
            out.print(f"[green]ran[/]   {event.kind:<10} {event.key[:12]}  {event.seconds:8.1f}s  {names}")
        elif event.action == "waiting":
            out.print(f"[yellow]wait[/]  {event.kind:<10} {event.key[:12]}  (another medsae process is building it)")
        else:
            out.print(f"[dim]done[/]  {event.kind:<10} {event.key[:12]}  (already {event.action})  {names}")

    outcomes = run_plans(
        plans,
        reg,
        force=set(force),
        only=set(only) or None,
        quiet=quiet,
        spec_path=str(spec),
        sweep=sweep,
        on_event=show,
    )
    ran = sum(o.action == "ran" for o in outcomes)
    out.print(
        f"[bold]{len(specs)} experiment(s), {ran} stage(s) run, {len(outcomes) - ran} already done, "
        f"{time.perf_counter() - t0:.1f}s[/] — registry {reg.path}"
    )


def _key_metric_rows(reg, experiment_id: str) -> dict[str, float]:  # type: ignore[no-untyped-def]
    rows = reg.query(
        """SELECT m.name, m.split, m.value FROM experiment_stages es JOIN metrics m ON m.stage_key = es.stage_key
           WHERE es.experiment_id = ? AND es.kind = 'evaluate' AND m.target IS NULL AND m.n_features IS NULL""",
        [experiment_id],
    )
    best: dict[str, tuple[int, float]] = {}
    rank = {"val": 0, "test": 1, "all": 2, "train": 3}
    for r in rows:
        score = rank.get(r["split"] or "all", 4)
        if r["value"] is not None and (r["name"] not in best or score < best[r["name"]][0]):
            best[r["name"]] = (score, r["value"])
    return {k: v for k, (_, v) in best.items()}


@app.command("list")
def list_(registry: RegistryOption = None) -> None:
    """One line per experiment: stages done and key metrics."""
    reg = open_registry(registry)
    rows = reg.query(
        """SELECT e.experiment_id, e.name, e.created_at,
                  count(s.stage_key) AS done, count(es.kind) AS stages
           FROM experiments e JOIN experiment_stages es USING (experiment_id)
           LEFT JOIN stages s ON s.stage_key = es.stage_key AND s.status = 'done'
           GROUP BY ALL ORDER BY e.created_at"""
    )
    from medsae.registry.maintenance import labels

    tags = labels(reg)
    table = Table(title=f"experiments in {reg.path}")
    for col in ("name", "created", "stages", *(k.column for k in KEY_METRICS), "tags"):
        table.add_column(col)
    for r in rows:
        metrics = _key_metric_rows(reg, r["experiment_id"])
        table.add_row(
            r["name"],
            str(r["created_at"])[:19],
            f"{r['done']}/{r['stages']}",
            *(f"{metrics[k.name]:.4g}" if k.name in metrics else "" for k in KEY_METRICS),
            ", ".join(tags.get(r["experiment_id"], {}).get("tags", [])),
        )
    console().print(table)


@app.command()
def show(name: str = typer.Argument(..., help="Experiment name."), registry: RegistryOption = None) -> None:
    """Stages, keys, timings and the key metrics of one experiment."""
    from medsae.plan import find_experiment

    reg = open_registry(registry)
    exp = find_experiment(reg, name)
    out: Console = console()
    spec = json.loads(exp["spec_json"])
    out.print(f"[bold]{exp['name']}[/]  spec {exp['spec_hash'][:12]}  created {str(exp['created_at'])[:19]}")
    if spec.get("description"):
        out.print(spec["description"])
    out.print(
        f"backbone {spec['embed']['source']}:{spec['embed']['model']} (pretrained={spec['embed']['pretrained']})"
        f"  SAE {spec['sae']['arch']} k={spec['sae']['k']}  data {spec['data']['root']}"
    )
    from rich.markup import escape

    from medsae.registry.maintenance import labels

    label = labels(reg, [exp["experiment_id"]]).get(exp["experiment_id"])
    if label and label["tags"]:
        out.print(f"tags: {escape(', '.join(label['tags']))}")
    if label and label["note"]:
        out.print(f"note: {escape(label['note'])}")
    stages = reg.query(
        """SELECT es.kind, es.stage_key, s.status, s.seconds, s.device, s.summary_json
           FROM experiment_stages es LEFT JOIN stages s ON s.stage_key = es.stage_key
           WHERE es.experiment_id = ?""",
        [exp["experiment_id"]],
    )
    from medsae.stages import STAGES

    order = list(STAGES)
    stages.sort(key=lambda r: order.index(r["kind"]) if r["kind"] in order else 99)
    table = Table(title="stages")
    for col in ("stage", "key", "status", "seconds", "device", "summary"):
        table.add_column(col)
    for r in stages:
        summary = json.loads(r["summary_json"]) if r["summary_json"] else {}
        brief = ", ".join(f"{k}={v}" for k, v in list(summary.items())[:4] if not isinstance(v, dict | list))
        table.add_row(
            r["kind"],
            r["stage_key"][:12],
            r["status"] or "pending",
            f"{r['seconds']:.1f}" if r["seconds"] is not None else "",
            r["device"] or "",
            brief[:80],
        )
    out.print(table)
    metrics = reg.query(
        """SELECT m.split, m.name, m.value, m.n FROM experiment_stages es JOIN metrics m ON m.stage_key = es.stage_key
           WHERE es.experiment_id = ? AND es.kind IN ('evaluate', 'train') AND m.target IS NULL
             AND m.n_features IS NULL AND m.name NOT LIKE 'seconds%'
           ORDER BY m.split, m.name""",
        [exp["experiment_id"]],
    )
    if metrics:
        mt = Table(title="key metrics (registry table `metrics`; more with `medsae sql`)")
        for col in ("split", "metric", "value", "n"):
            mt.add_column(col)
        for r in metrics[:60]:
            mt.add_row(
                r["split"] or "",
                r["name"],
                f"{r['value']:.4g}" if r["value"] is not None else "NULL",
                str(r["n"] or ""),
            )
        out.print(mt)
    expl = reg.query(
        """SELECT e.explainer_model, count(DISTINCT e.latent) AS latents,
                  avg(s.value) FILTER (
                    WHERE s.method = 'pearson' AND coalesce(s.extra_json, '') NOT LIKE '%"degenerate":%'
                  ) AS mean_pearson
           FROM explanations e LEFT JOIN explanation_scores s USING (explanation_id)
           WHERE e.kind = 'explanation'  -- baselines (shuffled, best attribute) are not an explainer's score
             AND e.sae_key = (SELECT stage_key FROM experiment_stages WHERE experiment_id = ? AND kind = 'train')
           GROUP BY ALL""",
        [exp["experiment_id"]],
    )
    if expl:
        et = Table(title="explanations")
        for col in ("explainer", "latents", "mean pearson"):
            et.add_column(col)
        for r in expl:
            mp = r["mean_pearson"]
            et.add_row(r["explainer_model"], str(r["latents"]), f"{mp:.3f}" if mp is not None else "")
        out.print(et)


@app.command()
def tag(
    name: str = typer.Argument(..., help="Experiment name (its latest registration) or NAME@HASH-PREFIX."),
    tags: list[str] = typer.Argument(None, help="Tags to add.", show_default=False),  # noqa: B008
    remove: list[str] = typer.Option([], "--remove", help="Tag to remove (repeatable)."),  # noqa: B008
    note: str | None = typer.Option(  # noqa: UP007
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
