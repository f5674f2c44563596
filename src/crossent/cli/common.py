"""Shared pieces of the command line: units, parsing of number lists, number formatting.

Parsing and formatting only: every number the CLI shows is computed by the library.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

from rich.console import Console


class Base(str, Enum):
    """The logarithm bases the CLI offers (``--base``)."""

    two = "2"
    e = "e"
    ten = "10"


@dataclass(frozen=True)
class Unit:
    name: str  # bits, nats, hartleys
    base: float
    log: str  # how the log is written in a formula: log2, ln, log10


UNITS = {
    Base.two: Unit("bits", 2.0, "log2"),
    Base.e: Unit("nats", math.e, "ln"),
    Base.ten: Unit("hartleys", 10.0, "log10"),
}
BITS, NATS = UNITS[Base.two], UNITS[Base.e]


def units(base: Base) -> tuple[Unit, Unit]:
    """The chosen unit and the one shown beside it (nats beside bits and hartleys, bits
    beside nats)."""
    primary = UNITS[Base(base)]
    return primary, (BITS if primary is NATS else NATS)


def parse_numbers(text: str, option: str) -> list[float]:
    """``"0.1, 0.2,0.7"`` -> ``[0.1, 0.2, 0.7]``; a ``ValueError`` naming ``option`` otherwise."""
    items = [item.strip() for item in text.split(",")]
    if not any(items):
        raise ValueError(f"{option} is empty; give comma-separated numbers such as 0.1,0.2,0.7")
    out = []
    for item in items:
        try:
            value = float(item)
        except ValueError:
            raise ValueError(f"{option}: {item!r} is not a number") from None
        if math.isnan(value):
            raise ValueError(f"{option}: {item!r} is not a number")
        out.append(value)
    return out


def parse_target(text: str) -> int | list[float]:
    """A class index (``"2"``) or a comma-separated probability vector (``"0,0,1"``)."""
    stripped = text.strip()
    if "," not in stripped and stripped.lstrip("-").isdigit():
        return int(stripped)
    return parse_numbers(text, "--target")


def fmt(x: float) -> str:
    """A number as the CLI prints it: 6 decimals (the article's precision)."""
    return f"{float(x):.6f}"


def short(x: float) -> str:
    """A number as typed in a formula: 0.7, 0.001, 1."""
    return f"{float(x):g}"


def vector(values: object) -> str:
    """``[0.1, 0.2, 0.7]``, each entry with :func:`short`."""
    return "[" + ", ".join(short(v) for v in values) + "]"  # type: ignore[attr-defined]


def console() -> Console:
    """A console on the current stdout (so test runners can capture it)."""
    return Console(highlight=False, soft_wrap=False)
