"""Output files: checked before the work starts, written atomically.

Used by the ``crossent`` command and by :mod:`crossent.torch.bench`, so it imports nothing
from :mod:`crossent.cli`. Every file they write goes through :func:`write_atomic` (or
:func:`save_figure`): the bytes go to a temporary file in the same directory, which then
replaces the target in one ``os.replace``, so a failed write never leaves a truncated file in
place of a good one. :func:`check_output_path` runs before any long computation, so that
``train``, ``bench`` and ``tour`` fail in their first second, not at the end.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .errors import InputError


def check_output_path(path: Path | str, option: str, *, directory: bool = False) -> Path:
    """``path`` can be written (a file, or with ``directory=True`` a directory to create files
    in); raises :class:`~crossent.errors.InputError` naming ``option`` otherwise.

    The test is real: a file (or, where folders are missing, a folder) is created and removed
    in the nearest existing directory. Directories that do not exist are not created here:
    the caller decides (and documents) whether it creates them. Symbolic links are followed
    (:func:`write_atomic` writes through them); a broken one, or a loop, is an error.
    """
    text = os.fspath(path)
    if not text:
        raise InputError(f"{option}: the path is empty")
    if "\0" in text:  # from Python callers (argv has none); pathlib answers "does not exist"
        raise InputError(f"{option} {text!r}: a path cannot hold a NUL character")
    if not directory and _names_a_folder(text):
        raise InputError(f"{option} {text}: a trailing slash names a folder; expected a file")
    p = Path(text)
    try:
        _no_broken_link(p, option, text)
        if directory:
            if p.exists() and not p.is_dir():
                raise InputError(f"{option} {text}: exists and is not a directory")
            probe = p if p.exists() else _existing_parent(p, option)
            folders_to_make = probe != p
        else:
            if p.is_dir():
                raise InputError(f"{option} {text}: is a directory, expected a file")
            if _is_special(p):  # /dev/null, /dev/stdout: written in place, nothing beside
                return p
            real = Path(os.path.realpath(p)) if p.is_symlink() else p  # written through
            probe = _existing_parent(real, option)
            folders_to_make = probe != real.parent
        try:
            _probe(probe, make_directory=folders_to_make)
        except OSError as err:
            raise InputError(f"{option} {text}: cannot write in {probe} "
                             f"({err.strerror or err})") from None
    except OSError as err:  # name too long, permission denied, read-only file system...
        raise InputError(f"{option} {text}: {err.strerror or err}") from None
    return p


def check_files_in(directory: Path, names: Iterable[str], option: str) -> None:
    """The files ``names`` can be written in ``directory`` (checked by
    :func:`check_output_path`): none of them is a folder, or a broken link (or loop), that
    the file could not replace. Raises :class:`~crossent.errors.InputError` naming ``option``
    and the file, before the work that would end in writing them."""
    seen: dict[str, str] = {}
    for name in names:
        p = directory / name
        # a link among the outputs (metrics.json -> accuracy.png) makes two outputs one
        # file: the second write would replace the first after it was reported written
        real = os.path.realpath(p)
        if real in seen:
            raise InputError(f"{option} {directory}: {seen[real]} and {name} there are the "
                             f"same file ({real}); one would replace the other")
        seen[real] = name
        if p.is_dir():
            raise InputError(f"{option} {directory}: {name} there is a folder; the file "
                             f"cannot replace it")
        if p.is_symlink():  # written through: the folder of the link's target must take it
            check_output_path(p, option)
        else:
            _no_broken_link(p, option, os.fspath(p))


def check_file_apart(path: Path, option: str, directory: Path, dir_option: str,
                     names: Iterable[str]) -> None:
    """The file ``path`` is neither the folder ``directory`` nor one of its ancestors (the
    folder would be created where the file goes), nor one of the files ``names`` written
    in it; links followed. Raises :class:`~crossent.errors.InputError` naming both options."""
    file, folder = Path(os.path.realpath(path)), Path(os.path.realpath(directory))
    if file == folder or file in folder.parents:
        raise InputError(f"{option} {path}: the {dir_option} folder {directory} goes there; "
                         f"give them different paths")
    for name in names:
        written = folder / name
        if file == written or written in file.parents:
            raise InputError(f"{option} {path}: {dir_option} {directory} writes its {name} "
                             f"there; give them different paths")


def _names_a_folder(text: str) -> bool:
    """``text`` ends in a separator (``new.svg/``), ``/.`` or ``/..`` (or is ``.`` or
    ``..``): a folder for the system (the shell's ``>`` says "Is a directory"), which
    pathlib would turn into the file ``new.svg``."""
    seps = tuple({os.sep, os.altsep or os.sep})
    dots = tuple(sep + d for sep in seps for d in (".", ".."))
    return text.endswith(seps) or text.endswith(dots) or text in (".", "..")


def _no_broken_link(p: Path, option: str, text: str) -> None:
    """``p`` and the ancestors up to the first that exists are no broken symbolic link (or
    loop of links): ``mkdir`` and ``open`` would fail on them after the work is done."""
    for x in (p, *p.parents):
        if x.exists():
            return
        if x.is_symlink():
            try:
                os.stat(x)
            except OSError as err:
                why = "a loop of symbolic links" if err.errno == errno.ELOOP else (
                    f"a symbolic link to {os.readlink(x)}, which does not exist")
                raise InputError(f"{option} {text}: {x} is {why}") from None


def _probe(directory: Path, *, make_directory: bool) -> None:
    """Create (and remove) a file, or a directory, in ``directory``: the only sure test that
    it can be written (``os.access`` says yes to root on ``/proc`` or a read-only mount)."""
    if make_directory:
        os.rmdir(tempfile.mkdtemp(prefix=".crossent-probe.", dir=directory))
    else:
        fd, name = tempfile.mkstemp(prefix=".crossent-probe.", dir=directory)
        os.close(fd)
        os.unlink(name)


def _existing_parent(p: Path, option: str) -> Path:
    """The nearest existing ancestor directory of ``p`` (a file in the way is an error)."""
    parent = p.parent
    while not parent.exists() and parent != parent.parent:  # "." or "/" ends the walk
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(f"{option} {p}: {parent} is a file, not a directory")
    return parent


def write_atomic(path: Path | str, data: str | bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and ``os.replace``.

    Text is written as UTF-8. A symbolic link is written through (the file it points to is
    replaced, the link stays), as the shell's ``>`` does. The temporary file is removed if
    anything fails, Ctrl-C included. A device or a FIFO (``/dev/null``, ``/dev/stdout``) is
    written in place.
    """
    payload = data.encode("utf-8") if isinstance(data, str) else data
    if _is_special(Path(path)):  # /dev/null, /dev/stdout, a FIFO: never replaced by a file
        try:
            with open(path, "wb") as f:
                f.write(payload)
        except OSError as err:
            if err.filename is None:
                err.filename = os.fspath(path)
            raise
        return
    target = Path(os.path.realpath(path))
    tmp = None
    try:
        # a short fixed prefix, not ".{name}.": with the name, the temporary file is 14 bytes
        # longer than the target, and a legal name of 242..255 bytes fails (ENAMETOOLONG)
        fd, tmp = tempfile.mkstemp(prefix=".crossent.", suffix=".tmp", dir=target.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _mode(target))
        os.replace(tmp, target)
    except BaseException as err:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if isinstance(err, OSError) and (tmp is None or err.filename in (None, tmp)):
            # a failed write() names no file, a failed mkstemp() or replace() the temporary
            # one (tmp None: not made): name the file the caller asked for (same errno,
            # so the same OSError subclass)
            raise OSError(err.errno, err.strerror, os.fspath(path)) from err
        raise


def _is_special(target: Path) -> bool:
    """``target`` exists and is neither a regular file nor a directory: a device, a FIFO, a
    socket. Written in place: ``os.replace`` would put a regular file where ``/dev/null`` was
    (as root, for the whole machine)."""
    try:
        mode = os.stat(target).st_mode
    except OSError:
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def _mode(target: Path) -> int:
    """The permissions of the file written: those of the file replaced, else the usual
    ``0o666`` less the umask (mkstemp's ``0o600`` would hide the file from other users)."""
    try:
        return stat.S_IMODE(os.stat(target).st_mode)
    except OSError:
        umask = os.umask(0o022)
        os.umask(umask)
        return 0o666 & ~umask


def save_figure(fig: Any, path: Path | str, **savefig_kwargs: Any) -> None:
    """``fig.savefig`` to ``path`` atomically (format from the suffix, as matplotlib does)."""
    target = Path(path)
    fmt = target.suffix.lstrip(".").lower() or None
    write_atomic(target, figure_bytes(fig, fmt, **savefig_kwargs))


def figure_bytes(fig: Any, fmt: str | None, **savefig_kwargs: Any) -> bytes:
    """``fig`` saved in memory as ``fmt`` (``"png"``, ``"svg"``; None: matplotlib's default):
    a command draws every figure before it writes the first file."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, **savefig_kwargs)
    return buf.getvalue()
