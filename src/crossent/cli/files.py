"""Output files of the ``crossent`` command: checked before the work starts, written
atomically. The functions live in :mod:`crossent._files` (shared with
:mod:`crossent.torch.bench`, which must not import the CLI); this module re-exports them."""

from .._files import (
    check_file_apart,
    check_files_in,
    check_output_path,
    figure_bytes,
    save_figure,
    write_atomic,
)

__all__ = ["check_file_apart", "check_files_in", "check_output_path", "figure_bytes",
           "save_figure", "write_atomic"]
