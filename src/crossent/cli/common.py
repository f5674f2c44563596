"""Shared pieces of the command line: units, parsing of number lists, number formatting,
and the standard streams (plain ASCII where they cannot encode Unicode).

Parsing and formatting only: every number the CLI shows is computed by the library.
"""

from __future__ import annotations

import codecs
import contextlib
import math
import os
import shutil
import sys
from collections.abc import Callable
from enum import Enum

from rich.console import Console

try:  # typer >= 0.20 ships its own copy of click
    from typer._click import exceptions as clickx
except ImportError:  # pragma: no cover - older typer runs on click itself
    from click import exceptions as clickx  # type: ignore[no-redef]

from .._checks import ascii_integer, ascii_number
from ..errors import InputError
from ..teaching.content import UNITS as TEACHING_UNITS
from ..teaching.content import Unit, unit_beside
from ..teaching.formula import short as short  # re-exported: the CLI formats as the tour does
from ..teaching.formula import vector as vector


class Base(str, Enum):
    """The logarithm bases the CLI offers (``--base``)."""

    two = "2"
    e = "e"
    ten = "10"


UNITS = {
    Base.two: TEACHING_UNITS["bits"],
    Base.e: TEACHING_UNITS["nats"],
    Base.ten: TEACHING_UNITS["hartleys"],
}
BITS, NATS = UNITS[Base.two], UNITS[Base.e]


def units(base: Base) -> tuple[Unit, Unit]:
    """The chosen unit and the one shown beside it (nats beside bits and hartleys, bits
    beside nats)."""
    primary = UNITS[Base(base)]
    return primary, unit_beside(primary)


def parse_numbers(text: str, option: str) -> list[float]:
    """``"0.1, 0.2,0.7"`` -> ``[0.1, 0.2, 0.7]``; an :class:`InputError` naming ``option``
    for an empty list, an entry that is not a number, or one that is not finite."""
    items = [item.strip() for item in text.split(",")]
    if not any(items):
        raise InputError(f"{option} is empty; give comma-separated numbers such as 0.1,0.2,0.7")
    out = []
    for item in items:
        try:
            value = ascii_number(item)
        except ValueError:
            raise InputError(f"{option}: {item!r} is not a number") from None
        if not math.isfinite(value):
            raise InputError(f"{option}: {item!r} is not a finite number")
        out.append(value)
    return out


def integer(min: int | None = None) -> Callable[[str], int]:
    """A typer ``parser=`` for an integer option of at least ``min``: ASCII digits only
    (:func:`crossent._checks.ascii_integer`); click reports a refusal as its own bad-value
    line, naming the option."""
    def parse(text: str) -> int:
        try:
            value = ascii_integer(text)
        except ValueError as err:
            raise clickx.BadParameter(f"{err}.") from None
        if min is not None and value < min:
            raise clickx.BadParameter(f"{value} is not in the range x>={min}.")
        return value
    return parse


def number(text: str) -> float:
    """A typer ``parser=`` for a float option: a number as written in ASCII
    (:func:`crossent._checks.ascii_number`)."""
    try:
        return ascii_number(text)
    except ValueError as err:
        raise clickx.BadParameter(f"{err}.") from None


def parse_target(text: str) -> int | list[float]:
    """A class index (``"2"``) or a comma-separated probability vector (``"0,0,1"``)."""
    try:
        return ascii_integer(text)
    except ValueError:
        return parse_numbers(text, "--target")


def fmt(x: float) -> str:
    """A number as the CLI prints it: 6 decimals (the article's precision); from 1e15 on in
    scientific notation (a logit of 1e308 is not 309 digits wide), and so below 1e-3, with
    6 significant digits (a probability of 1e-7 is not 0.000000 beside its finite
    ``ln(1/q)``: review H96-2). ``-0.0`` prints as 0. (:func:`crossent.teaching.formula.fmt`
    prints the tour's own numbers, none of them huge or tiny.)

    >>> fmt(0.5), fmt(1e-7), fmt(-0.0), fmt(2e300)
    ('0.500000', '1.00000e-07', '0.000000', '2.000000e+300')
    """
    value = float(x) + 0.0  # -0.0 + 0.0 is 0.0
    if math.isfinite(value) and abs(value) >= 1e15:
        return f"{value:.6e}"
    if value != 0.0 and abs(value) < 1e-3:
        return f"{value:.5e}"
    return f"{value:.6f}"


def columns(rows: list[list[str]], *, left: int | None = 0) -> list[str]:
    """Rows of cells as lines: column ``left`` left-aligned (None: none), the others
    right-aligned, two spaces between columns however wide the cells are."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) if i == left else cell.rjust(w)
                      for i, (cell, w) in enumerate(zip(row, widths, strict=True))).rstrip()
            for row in rows]


def console() -> Console:
    """A console on the current stdout (so test runners can capture it). No emoji codes:
    ``:smile:`` in a path or an answer is printed as typed (escape() does not stop them)."""
    return Console(highlight=False, soft_wrap=False, emoji=False,
                   width=_width_unless_columns_unusable())


def _width_unless_columns_unusable() -> int | None:
    """``None`` (rich's own reading), unless ``COLUMNS`` is 0 or negative: a serial console or
    ``docker exec`` without a tty reports 0, which rich takes as zero columns and then prints
    nothing; the terminal's size (or 80) as :func:`shutil.get_terminal_size` reads it then."""
    try:
        unusable = int(os.environ.get("COLUMNS", "")) <= 0
    except ValueError:
        return None
    return shutil.get_terminal_size().columns if unusable else None


# --------------------------------------------------------------------------------------------
# The standard streams
# --------------------------------------------------------------------------------------------

ASCII = {
    "\u00b7": "*", "\u2265": ">=", "\u2264": "<=", "\u2260": "!=", "\u2248": "~",
    "\u00b2": "^2", "\u00d7": "x", "\u2212": "-", "\u2013": "-", "\u2014": "--",
    "\u2192": "->", "\u2026": "...", "\u2018": "'", "\u2019": "'", "\u201c": '"',
    "\u201d": '"', "\u221e": "inf", "\u03b1": "alpha", "\u03a3": "sum", "\u2211": "sum",
}
"""Plain-ASCII stand-ins for the characters the CLI's own text uses. Any other character comes
from the user (a path, an option's value) and is shown escaped, ``\\xe9`` for ``é``: folded to
``e`` it would name another file, or quote a value the user did not type."""


def _to_ascii(err: UnicodeError) -> tuple[str, int]:
    if not isinstance(err, UnicodeEncodeError):
        raise err
    chunk = err.object[err.start:err.end]
    return "".join(ASCII.get(c) or _escape(c) for c in chunk), err.end


def _escape(c: str) -> str:
    return c.encode("ascii", "backslashreplace").decode("ascii")


codecs.register_error("crossent-ascii", _to_ascii)


def plain_text_streams() -> None:
    """Make stdout and stderr write plain ASCII stand-ins (``·`` -> ``*``, ``≥`` -> ``>=``)
    for what their encoding cannot hold (a C locale, ``PYTHONIOENCODING=ascii``, latin-1)
    instead of failing with ``UnicodeEncodeError``. A strict UTF-8 stream
    (``PYTHONIOENCODING=utf-8``, a UTF-8 locale) writes what UTF-8 cannot hold, the lone
    surrogates of a file name that is not UTF-8 (``$'\\xe9.html'``), as ``\\udce9``."""
    for stream in (sys.stdout, sys.stderr):
        encoding = getattr(stream, "encoding", None) or "ascii"
        errors = "crossent-ascii"
        with contextlib.suppress(LookupError):
            if codecs.lookup(encoding).name.startswith("utf"):
                if getattr(stream, "errors", None) != "strict":
                    continue  # surrogateescape (C.UTF-8) already writes the name's bytes
                errors = "backslashreplace"
        with contextlib.suppress(AttributeError, ValueError, OSError):
            stream.reconfigure(errors=errors)  # type: ignore[union-attr]


def open_closed_streams() -> bool:
    """Give a standard stream that was closed when the command started (``<&-``, ``2>&-``,
    which Python shows as ``sys.stdin = None``) an ``os.devnull`` in its place: a closed stdin
    reads as empty, a closed stderr swallows the error lines (the exit code still tells).
    Returns False when stdout is closed: nothing can be printed, a failure to report."""
    for name, mode in (("stdin", "r"), ("stderr", "w")):
        if getattr(sys, name) is None:
            with contextlib.suppress(OSError):
                setattr(sys, name, open(os.devnull, mode))  # open until the process ends
    return sys.stdout is not None


def silence_stdout() -> None:
    """Point stdout's descriptor at /dev/null: after a write to it failed (a closed pipe, a
    full disk), the interpreter's last flush must not fail again with a second message."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # not a real file (a test runner's buffer)
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)
