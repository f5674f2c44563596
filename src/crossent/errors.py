"""crossent's exception types: one for bad input, so that callers (and the ``crossent``
command) can tell a caller's mistake from a bug in the library.

>>> import crossent as xe
>>> try:
...     xe.surprisal(0.5, base=-1)
... except xe.InputError as e:
...     print(type(e).__name__, isinstance(e, ValueError))
InputError True
"""

from __future__ import annotations

from typing import NoReturn


class InputError(ValueError):
    """Bad input to a crossent function: the message names the argument and what was wrong.

    A subclass of ``ValueError`` (so ``except ValueError`` keeps working); raised by every
    argument check of the core, ``crossent.torch``, ``crossent.torch.distributed`` and the CLI.
    Anything else raised from crossent is a bug (or an unsupported feature, which says so).
    """


class UnsupportedError(NotImplementedError):
    """A feature the reference supports and crossent does not (yet): the message names it.

    Raised instead of returning a number that could differ from the reference.
    """


def missing_extra(err: ModuleNotFoundError, package: str, message: str) -> NoReturn:
    """Re-raise ``err`` (from importing ``package``) as a ``ModuleNotFoundError`` whose
    message names the extra to install, keeping ``name=package`` (the ``crossent`` command
    maps that name to its one-line message); a package that is there but fails to import
    one of its own modules keeps its own error."""
    if err.name != package:
        raise err
    raise ModuleNotFoundError(message, name=package) from None
