"""Counting the targets of a whole step across data-parallel ranks and micro-batches."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from ...errors import InputError, UnsupportedError
from .._rules import check_ignore_index, check_index_dtype
from ._common import CODES, header_device, not_dense, raises_together

__all__ = ["global_num_items"]


def _report_unbound_call(args: tuple[Any, ...], kwargs: dict[str, Any], message: str) -> None:
    """A call of :func:`global_num_items` Python could not bind (see
    :func:`._common.raises_together`): its all-reduce with this rank's problem noted."""
    group = kwargs["group"] if "group" in kwargs else args[2] if len(args) > 2 else None
    if not (dist.is_available() and dist.is_initialized()):
        group = None
    tensors = [v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)]
    _count_together(tensors[:1], None, message, TypeError, group)


@raises_together(_report_unbound_call)
def global_num_items(
    target: torch.Tensor | Sequence[torch.Tensor],
    ignore_index: int = -100,
    group=None,
) -> torch.Tensor:
    """The number of non-ignored targets summed over ``group`` (one ``all_reduce(SUM)`` of
    a ``world x 3`` int64 table: each rank's count, bad-argument flag and ``ignore_index``,
    so every rank raises together, also where the ranks' ``ignore_index`` differ): the
    ``num_items`` that makes ``reduction="sum"`` a full-batch mean.

    ``target`` is this rank's targets, or a list of them (all gradient-accumulation
    micro-batches of the step, counted together). Use the **data-parallel** group: ranks of
    one tensor-parallel group hold the same targets and must not be counted twice.

    Why (PITFALLS 11; the 2024 gradient-accumulation bug of several trainers): the mean of
    per-micro-batch means, ``(1/K) sum_k (sum_{n in k} l_n / N_k)``, differs from the
    full-batch mean ``sum_n l_n / sum_k N_k`` whenever the micro-batches hold different
    numbers ``N_k`` of counted tokens. Summing each micro-batch's loss and dividing by the
    global count gives exactly the full-batch gradient once the gradients are **summed**
    over micro-batches and ranks. ``DistributedDataParallel`` *averages* gradients over its
    ``W`` ranks, so with DDP multiply the loss by ``W`` (or divide ``num_items`` by ``W``).

    Returns a 0-d int64 tensor on the targets' device (no host synchronisation in one
    process; on a group one, reading the table back). Without an initialized
    ``torch.distributed`` (and ``group=None``) it is the local count.

    >>> import torch
    >>> int(global_num_items([torch.tensor([1, -100, 2]), torch.tensor([0])]))
    3
    """
    initialized = dist.is_available() and dist.is_initialized()
    if not initialized and group is not None:
        raise InputError("a group was given but torch.distributed is not initialized")
    given, not_a_list = _as_list(target)
    index, problem, kind = _checked(given, not_a_list, ignore_index)
    return _count_together(given, index, problem, kind, group)


def _count_together(given: list, index: int | None, problem: str | None,
                    kind: type[Exception], group) -> torch.Tensor:
    """The count of ``given`` (checked: ``problem`` is None) summed over ``group``, or the
    ``problem`` raised on every rank together."""
    initialized = dist.is_available() and dist.is_initialized()
    # where the count travels, bad argument or not (an NCCL rank's flag on the CPU would
    # fail its all-reduce while the others wait): the first tensor given, else the group's
    device = header_device(group if initialized else None,
                           *[t for t in given if isinstance(t, torch.Tensor)][:1])
    if problem is None:
        # in int64: a uint8/uint16 target compared with -100 in its own dtype would wrap it
        # to 156/65436 and miss that class, which the losses count
        counts = [(t.to(torch.int64) != index).sum() for t in given]
        # Start from the first count, not 0: the sum stays a tensor (typed so) on its device
        count = sum(counts[1:], start=counts[0]).to(torch.int64)
    else:
        count = torch.zeros((), dtype=torch.int64, device=device)
    if initialized and dist.get_world_size(group) > 1:
        # a bad argument on one rank travels with the count: every rank raises together
        # (a rank raising alone would leave the others waiting in the all-reduce), and so
        # does an ignore_index that differs (a count mixing two rules would be wrong)
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        table = torch.zeros((world, 3), dtype=torch.int64, device=device)
        table[rank, 0] = count
        # 0: fine; else 1 + the index of the problem's type in CODES
        table[rank, 1] = 0 if problem is None else 1 + CODES.index(kind)
        table[rank, 2] = 0 if index is None else index
        dist.all_reduce(table, op=dist.ReduceOp.SUM, group=group)
        rows = table.tolist()  # the one host synchronisation
        first = next((flag for _, flag, _ in rows if flag), 0)
        if problem is not None:  # this rank's own message, the first bad rank's type
            raise CODES[first - 1](problem)
        if first:
            raise CODES[first - 1]("global_num_items: another rank of the group passed a "
                                   "bad argument (its error names it); every rank stops")
        if len({ii for _, _, ii in rows}) > 1:
            shown = ", ".join(f"rank {r}: {ii}" for r, (_, _, ii) in enumerate(rows))
            raise InputError(f"ignore_index differs across the ranks of the group ({shown}); "
                             f"every rank must pass the same value")
        count = table[:, 0].sum()
    if problem is not None:
        raise kind(problem)
    return count


def _as_list(target) -> tuple[list, str | None]:
    """``target`` as a list (a tensor: one item), and the problem if it is not iterable
    (one that travels with the flag, as any other)."""
    if isinstance(target, torch.Tensor):
        return [target], None
    try:
        return list(target), None
    except TypeError:
        return [], (f"target must be a tensor of class ids or a list of them; got "
                    f"{type(target).__name__}")


def _checked(targets: list, not_a_list: str | None, ignore_index,
             ) -> tuple[int | None, str | None, type[Exception]]:
    """``ignore_index`` as an int (None if it is bad), the first problem with the arguments
    (None: none) and its type (:data:`._common._KINDS`): an integer ``ignore_index``, a
    list (``not_a_list``: :func:`_as_list`'s problem) of integer class-id tensors."""
    try:
        index = check_ignore_index(ignore_index)
    except UnsupportedError as error:  # a vmapped ignore_index: raised after the reduce
        return None, str(error), UnsupportedError
    except Exception as error:  # also a caller's __index__ failing: never before the reduce
        return None, (str(error) if isinstance(error, InputError)
                      else f"ignore_index={ignore_index!r}: {error}"), InputError
    return index, _list_problem(targets, not_a_list), InputError


def _list_problem(targets: list, not_a_list: str | None) -> str | None:
    if not_a_list is not None:
        return not_a_list
    if not targets:
        return "target is an empty list"
    for t in targets:
        if not isinstance(t, torch.Tensor):
            return (f"target must be a tensor of class ids or a list of them; got a "
                    f"{type(t).__name__} inside")
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            return f"target must hold integer class ids, got {t.dtype}"
        if t.device.type == "meta":
            return "target on the meta device has no class ids to count"
        if (why := not_dense("target", t)) is not None:
            return why
        try:
            check_index_dtype(t)
        except InputError as error:
            return str(error)
    return None
