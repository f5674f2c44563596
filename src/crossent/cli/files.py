"""Output files of the ``crossent`` command: checked before the work starts, written atomically.

Every file the CLI writes goes through :func:`write_atomic` (or :func:`save_figure`): the
bytes go to a temporary file in the same directory, which then replaces the target in one
``os.replace``, so a failed write never leaves a truncated file in place of a good one.
:func:`check_output_path` runs before any long computation, so that ``train``, ``bench`` and
``tour`` fail in their first second, not at the end.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any

from ..errors import InputError


def check_output_path(path: Path | str, option: str, *, directory: bool = False) -> Path:
    """``path`` can be written (a file, or with ``directory=True`` a directory to create files
    in); raises :class:`~crossent.errors.InputError` naming ``option`` otherwise.

    Directories that do not exist are not created here: the caller decides (and documents)
    whether it creates them.
    """
    text = os.fspath(path)
    if not text:
        raise InputError(f"{option}: the path is empty")
    p = Path(text)
    try:
        if directory:
            if p.exists() and not p.is_dir():
                raise InputError(f"{option} {text}: exists and is not a directory")
            probe = p if p.exists() else _existing_parent(p, option)
        else:
            if p.is_dir():
                raise InputError(f"{option} {text}: is a directory, expected a file")
            probe = _existing_parent(p, option)
        if not os.access(probe, os.W_OK | os.X_OK):
            raise InputError(f"{option} {text}: {probe} is not writable")
    except OSError as err:  # name too long, permission denied on stat...
        raise InputError(f"{option} {text}: {err.strerror or err}") from None
    return p


def _existing_parent(p: Path, option: str) -> Path:
    """The nearest existing ancestor directory of ``p`` (a file in the way is an error)."""
    parent = p.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(f"{option} {p}: {parent} is a file, not a directory")
    return parent


def write_atomic(path: Path | str, data: str | bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and ``os.replace``.

    Text is written as UTF-8. The temporary file is removed if anything fails.
    """
    target = Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def save_figure(fig: Any, path: Path | str, **savefig_kwargs: Any) -> None:
    """``fig.savefig`` to ``path`` atomically (format from the suffix, as matplotlib does)."""
    import io

    target = Path(path)
    buf = io.BytesIO()
    fmt = target.suffix.lstrip(".").lower() or None
    fig.savefig(buf, format=fmt, **savefig_kwargs)
    write_atomic(target, buf.getvalue())
