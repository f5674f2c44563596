"""The ``crossent`` command line (needs the ``cli`` extra: typer, rich, matplotlib).

``crossent tour`` walks through the article; ``crossent explain`` breaks one loss into its
terms; ``crossent quiz`` asks the article's questions; ``crossent plot`` draws a figure;
``crossent train`` compares the losses on the digits; ``crossent bench`` times
``crossent.torch`` against torch.

The ``crossent`` console script is installed with the package even without the extra: then
:func:`main` says which extra to install (one line on stderr, exit code 1), but for
``crossent --version``, which needs none.
"""

from __future__ import annotations

import sys

_missing: str | None = None
try:
    from .app import app
except ModuleNotFoundError as err:  # the cli extra is not installed
    if err.name not in ("typer", "rich", "click"):
        raise
    _missing = err.name


def main() -> None:
    """Entry point of the ``crossent`` console script."""
    if _missing is not None:
        if sys.argv[1:] == ["--version"]:  # a version needs no extra (review H98-4)
            from .. import __version__

            print(f"crossent {__version__}")
            return
        sys.stderr.write(f"crossent: the command line needs the cli extra ({_missing} is "
                         "missing): pip install 'crossent[cli]'\n")
        sys.exit(1)
    app()


__all__ = ["app", "main"]
