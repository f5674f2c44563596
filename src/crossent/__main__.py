"""``python -m crossent``: print the article's worked examples, computed by the library.

Needs only the core (no ``cli`` extra). As with the ``crossent`` command: a reader that goes
away early (``python -m crossent | head -1``) ends it quietly (exit code 1); a stdout that
cannot be written (``> /dev/full``) is one line on stderr (exit code 2); a stdout that cannot
encode Unicode gets ``?`` in place of the characters it lacks; a closed stdout (``>&-``) is
one line on stderr (exit code 2).

With arguments it is the ``crossent`` command (``python -m crossent tour --html page.html``
runs ``crossent tour --html page.html``, for when the console script is not on PATH), which
needs the ``cli`` extra: without it, one line on stderr names the extra (exit code 1).
"""

import os
import sys

from .teaching.article import format_table


def _silence_stdout() -> None:
    """What is left in stdout's buffer goes to /dev/null: the interpreter's last flush is
    quiet."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def main() -> None:
    if sys.argv[1:]:  # never ignored: they are the crossent command's
        from .cli import main as command  # here: the table must not look for typer

        command()
        return
    if sys.stdout is None:  # python -m crossent >&-
        if sys.stderr is not None:
            sys.stderr.write("crossent: error: cannot write standard output: it is closed\n")
        sys.exit(2)
    if not (sys.stdout.encoding or "").lower().startswith("utf"):
        sys.stdout.reconfigure(errors="replace")  # type: ignore[union-attr]
    try:
        print("crossent: the article's worked examples, computed (not typed in)\n")
        print(format_table())
        sys.stdout.flush()
    except BrokenPipeError:
        _silence_stdout()
        sys.exit(1)
    except OSError as err:  # a full disk, /dev/full
        _silence_stdout()
        sys.stderr.write(f"crossent: error: cannot write standard output: {err.strerror}\n")
        sys.exit(2)


if __name__ == "__main__":
    main()
