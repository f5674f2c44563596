"""The tour's content model: sections of prose, worked examples, tables, figures.

:mod:`crossent.teaching.tour` fills it with the article's chain of ideas (every number
computed by the library); ``crossent tour`` prints it in a terminal
(:mod:`crossent.cli.tour`) and writes it as a web page (:mod:`crossent.cli.html`). Nothing
here computes or formats: it is the shape both renderers agree on.

Formulas are plain text in the grammar of :mod:`crossent.teaching.formula`; in prose they are
quoted with backticks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Unit:
    """A unit of information: its name, the log base, and how its log is written."""

    name: str  # bits, nats, hartleys
    base: float
    log: str  # log2, ln, log10


UNITS: dict[str, Unit] = {
    "bits": Unit("bits", 2.0, "log2"),
    "nats": Unit("nats", math.e, "ln"),
    "hartleys": Unit("hartleys", 10.0, "log10"),
}


def unit_beside(unit: Unit) -> Unit:
    """The unit shown beside ``unit``: nats beside bits and hartleys, bits beside nats."""
    return UNITS["bits"] if unit.name == "nats" else UNITS["nats"]


@dataclass(frozen=True)
class Worked:
    """One worked example: formula, the numbers substituted, the result in two units."""

    label: str
    formula: str
    substituted: str
    value: float
    beside: float  # the same number in the unit shown beside


@dataclass(frozen=True)
class Table:
    title: str
    headers: list[str]
    rows: list[list[str]]


@dataclass
class Section:
    """One chapter. ``figures`` name the static figures (:mod:`crossent.cli.plots`);
    ``widgets`` name the page's interactive figures (:mod:`crossent.cli.html`)."""

    title: str
    text: list[str]
    worked: list[Worked] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    figures: list[str] = field(default_factory=list)
    widgets: list[str] = field(default_factory=list)

    @property
    def anchor(self) -> str:
        """An id for the section: its title's words, lower case, joined by dashes."""
        words = "".join(c if c.isalnum() else " " for c in self.title.lower()).split()
        return "-".join(w for w in words if not w.isdigit())


@dataclass
class Tour:
    unit: Unit
    beside: Unit
    sections: list[Section]
