"""``crossent tour``: the article's chain of ideas printed in a terminal.

The content (sections, worked examples, tables, figure names) is built by
:mod:`crossent.teaching.tour`; this module only prints it with rich, and
:mod:`crossent.cli.html` writes the same content as a web page.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table as RichTable
from rich.text import Text

from ..teaching import tour as content
from ..teaching.content import Section, Table, Tour, Worked
from ..teaching.formula import fmt, plain
from .common import UNITS, Base

__all__ = ["Section", "Table", "Tour", "Worked", "build_tour", "render"]


def build_tour(base: Base = Base.two) -> Tour:
    """The tour's content in the unit of ``base`` (bits by default) with a second unit beside."""
    return content.build_tour(UNITS[Base(base)])


def _rich_table(t: Table) -> RichTable:
    table = RichTable(title=escape(t.title))
    for h in t.headers:
        table.add_column(escape(h), justify="right")
    for row in t.rows:
        table.add_row(*(escape(c) for c in row))
    return table


LABEL = "  numbers: "


def _field(label: str, value: str, width: int) -> str:
    """``label value``, wrapped to ``width`` with a hanging indent under the value."""
    return textwrap.fill(value, width=max(width, len(LABEL) + 20),
                         initial_indent=f"  {label:<8} ", subsequent_indent=" " * len(LABEL),
                         break_on_hyphens=False)


def _worked(w: Worked, tour: Tour, con: Console) -> None:
    con.print(f"\n[bold]{escape(w.label)}[/]")
    for label, value in (("formula:", w.formula), ("numbers:", w.substituted)):
        con.print(Text(_field(label, value, con.width)), soft_wrap=True)
    con.print(f"  result:  [bold]{fmt(w.value)} {tour.unit.name}[/]   "
              f"({fmt(w.beside)} {tour.beside.name})")


def render(tour: Tour, con: Console, figures: dict[str, Path] | None = None) -> None:
    """Print the tour; ``figures`` maps figure names to the files written for them."""
    con.print(f"[bold]crossent tour[/]: results in {tour.unit.name} with {tour.beside.name} "
              "beside (the article's numbers are bits)")
    for s in tour.sections:
        con.rule(escape(s.title))
        for para in s.text:
            con.print(escape(plain(para)))
        for w in s.worked:
            _worked(w, tour, con)
        for t in s.tables:
            con.print(_rich_table(t))
        for name in s.figures:
            if figures and name in figures:
                con.print(f"  figure: {escape(str(figures[name]))}")
