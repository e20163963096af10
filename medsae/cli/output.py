"""One renderer for every listing command: ``--format table|csv|json``.

A command builds :class:`Listing` objects (a title, columns, dict rows) and hands them to
:func:`render`:

* ``table``: rich tables whose cells wrap (``overflow="fold"``) and are never cut with "…".
  On a terminal they fit its width; when stdout is not a terminal (a pipe, a file) every table
  is printed at its full natural width, whatever ``COLUMNS`` says, so each row stays one line
  that ``grep`` and ``cut`` can use and no number or name is ever folded. Floats show 4
  significant digits.
* ``csv``: one header line and the rows, values unrounded. Several listings (``exp show``) are
  printed one after the other, each after a ``# title`` line and a blank line.
* ``json``: the rows as a list of objects (unrounded; NaN becomes null); several listings as one
  object keyed by each listing's ``key``, with the command's ``meta`` fields beside them.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import math
import numbers
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from medsae.cli.common import FORMATS, console


@dataclass
class Column:
    """One column: ``key`` in the row dicts, ``label`` in the table header (csv/json use ``key``)."""

    key: str
    label: str | None = None

    @property
    def header(self) -> str:
        return self.label or self.key


@dataclass
class Listing:
    """One table of a command's output."""

    columns: list[Column]
    rows: list[dict[str, Any]]
    title: str | None = None
    #: Name of this listing in json output when a command prints several (e.g. ``metrics``).
    key: str = "rows"
    #: Lines printed under the table in table format only (definitions, "N more rows: use ...").
    notes: list[str] = field(default_factory=list)


def columns(*specs: str | tuple[str, str]) -> list[Column]:
    """``columns("name", ("created_at", "created"))``: keys, or (key, header label) pairs."""
    return [Column(s) if isinstance(s, str) else Column(*s) for s in specs]


#: A width no table reaches (for measuring a table's natural width).
_UNLIMITED = 100_000


def number(value: float) -> str:
    """A float for reading: 4 significant digits, integers without a decimal point, no exponent for
    magnitudes from 1e-4 to 1e15 (``0.3677``, ``12350``, ``6``, ``1.526e-05``)."""
    if math.isnan(value) or math.isinf(value):
        return str(value)
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    text = f"{value:.4g}"
    if "e" in text and 1e4 <= abs(value) < 1e15:
        return f"{float(text):.0f}"
    return text


def cell(value: Any) -> str:
    """A value as a table cell: None and NaN -> empty, floats rounded (:func:`number`), lists comma-joined,
    timestamps to the minute."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        return number(float(value))
    if isinstance(value, list | tuple):
        return ", ".join(cell(v) for v in value)
    if isinstance(value, dt.datetime):
        return value.strftime("%Y-%m-%d %H:%M")
    return str(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def rich_table(listing: Listing) -> Table:
    """The listing as a rich table: numeric columns right-aligned, every cell folds, nothing is cut."""
    table = Table(title=listing.title, title_justify="left")
    for col in listing.columns:
        values = [r.get(col.key) for r in listing.rows if r.get(col.key) is not None]
        numeric = bool(values) and all(_is_number(v) for v in values)
        table.add_column(Text(col.header), justify="right" if numeric else "left", overflow="fold", no_wrap=False)
    for r in listing.rows:
        # Text: names, explanations and values are never read as rich markup
        table.add_row(*(Text(cell(r.get(col.key))) for col in listing.columns))
    return table


def print_table(table: Table, out: Console | None = None) -> None:
    """Print ``table``: to a terminal at its width (cells wrap); elsewhere at the table's full width."""
    out = out or console()
    if out.is_terminal:
        out.print(table)
        return
    natural = Measurement.get(out, out.options.update(width=_UNLIMITED), table).maximum
    if natural <= out.width:
        out.print(table)
        return
    wide = Console(width=natural, highlight=False, soft_wrap=True, color_system=None, file=out.file)
    wide.print(table)


def _json_value(value: Any) -> Any:
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        value = float(value)
        return None if math.isnan(value) or math.isinf(value) else value
    if isinstance(value, Mapping):
        return {str(k): _json_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_value(v) for v in value]
    if isinstance(value, str):
        return value
    return str(value)  # timestamps, paths


def _json_rows(listing: Listing) -> list[dict[str, Any]]:
    return [{c.key: _json_value(r.get(c.key)) for c in listing.columns} for r in listing.rows]


def _csv_value(value: Any) -> Any:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, list | tuple):
        return ";".join(str(v) for v in value)
    return value


def _write_csv(listing: Listing) -> None:
    writer = csv.writer(sys.stdout, lineterminator="\n")
    writer.writerow([c.key for c in listing.columns])
    writer.writerows([_csv_value(r.get(c.key)) for c in listing.columns] for r in listing.rows)


def render(
    listings: Listing | Sequence[Listing],
    fmt: str,
    *,
    preamble: Sequence[str] = (),
    meta: Mapping[str, Any] | None = None,
) -> None:
    """Print ``listings`` in ``fmt`` (see the module docstring).

    ``preamble``: lines before the tables (table format; in csv, ``#`` comment lines when there are
    several listings). ``meta``: fields put beside the listings in json (several listings only).
    """
    many = not isinstance(listings, Listing)
    items = [listings] if isinstance(listings, Listing) else list(listings)
    if fmt == "json":
        if many or meta:
            payload: dict[str, Any] = {k: _json_value(v) for k, v in (meta or {}).items()}
            payload.update({item.key: _json_rows(item) for item in items})
            print(json.dumps(payload, indent=1, ensure_ascii=False))
        else:
            print(json.dumps(_json_rows(items[0]), indent=1, ensure_ascii=False))
        return
    if fmt == "csv":
        for i, item in enumerate(items):
            if many:
                if i == 0:
                    for line in preamble:
                        print(f"# {line}")
                print(("\n" if i or preamble else "") + f"# {item.title or item.key}")
            _write_csv(item)
        return
    out = console()
    for line in preamble:
        out.print(Text(line))
    for item in items:
        print_table(rich_table(item), out)
        for note in item.notes:
            out.print(Text(note))


__all__ = ["FORMATS", "Column", "Listing", "cell", "columns", "number", "print_table", "render", "rich_table"]
