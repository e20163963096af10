"""`medsae sql "SELECT ..."`: read-only queries over the registry."""

from __future__ import annotations

import csv
import json
import sys

import typer
from rich.table import Table

from medsae.cli.common import RegistryOption, console, open_registry
from medsae.errors import MedsaeError


def sql_command(
    query: str = typer.Argument(..., help="SQL to run (the registry is opened read-only)."),
    format: str = typer.Option("table", "--format", "-f", help="table, csv or json."),
    limit: int = typer.Option(200, help="Rows shown in table format (csv/json print all)."),
    registry: RegistryOption = None,
) -> None:
    """Run SQL against the registry, read-only; tables: experiments, stages, metrics, latents, explanations..."""
    import duckdb

    if format not in ("table", "csv", "json"):
        raise MedsaeError(f"--format: expected table, csv or json, got '{format}'")
    reg = open_registry(registry)
    with reg.read() as con:
        try:
            cur = con.execute(query)
        except duckdb.Error as exc:
            first = str(exc).strip().splitlines()[0]
            raise MedsaeError(f"sql: {first}") from None
        if cur.description is None:
            return
        columns = [d[0] for d in cur.description]
        rows = cur.fetchall()
    if format == "csv":
        writer = csv.writer(sys.stdout)
        writer.writerow(columns)
        writer.writerows(rows)
    elif format == "json":
        print(json.dumps([dict(zip(columns, r, strict=False)) for r in rows], default=str, indent=1))
    else:
        table = Table(*columns)
        for r in rows[:limit]:
            table.add_row(
                *("NULL" if v is None else f"{v:.6g}" if isinstance(v, float) else str(v) for v in r)
            )
        console().print(table)
        if len(rows) > limit:
            console().print(f"[dim]{len(rows) - limit} more rows (use --limit or --format csv)[/]")
