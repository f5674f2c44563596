"""What the Triton launch-variant tests share (imported as ``launch_variants``): the
variants ``(reverse, programs)`` of ``ce_kernel`` (``programs`` 0: one program per row,
grid N; else a persistent grid of that many programs), their test ids, and the
override's programs-per-SM value that launches a given number of programs."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from crossent.torch._triton import ops


def variants(grids: tuple[int, ...]) -> tuple[list[tuple[bool, int]], list[str]]:
    """Every ``(reverse, programs)`` over ``grids``, and an id for each."""
    found = [(rev, programs) for rev in (False, True) for programs in grids]
    ids = [f"{'reverse' if rev else 'forward'}-{f'{p}programs' if p else 'gridN'}"
           for rev, p in found]
    return found, ids


def programs_per_sm(programs: int, device: str) -> float:
    """The override's value that launches ``programs`` programs on ``device``."""
    return programs / ops.sm_count(torch.device(device))


@contextlib.contextmanager
def launched_as(reverse: bool, programs: int, device: str) -> Iterator[None]:
    """Every ``ce_kernel`` launch inside uses this variant; the override in force before
    comes back afterwards (asserted: a leaked override would change every later test's
    launch)."""
    before = ops.ce_launch_override
    with ops.override_ce_launch(reverse=reverse,
                                programs_per_sm=programs_per_sm(programs, device)):
        yield
    assert ops.ce_launch_override is before
