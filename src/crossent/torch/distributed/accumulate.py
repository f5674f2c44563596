"""Counting the targets of a whole step across data-parallel ranks and micro-batches."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from ...errors import InputError

__all__ = ["global_num_items"]


def global_num_items(
    target: torch.Tensor | Sequence[torch.Tensor],
    ignore_index: int = -100,
    group=None,
) -> torch.Tensor:
    """The number of non-ignored targets summed over ``group`` (one ``all_reduce(SUM)`` of
    one int64): the ``num_items`` that makes ``reduction="sum"`` a full-batch mean.

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

    Returns a 0-d int64 tensor on the targets' device (no host synchronisation). Without an
    initialized ``torch.distributed`` (and ``group=None``) it is the local count.

    >>> import torch
    >>> int(global_num_items([torch.tensor([1, -100, 2]), torch.tensor([0])]))
    3
    """
    targets = [target] if isinstance(target, torch.Tensor) else list(target)
    if not targets:
        raise InputError("target is an empty list")
    counts = [(t != ignore_index).sum() for t in targets]
    # Start from the first count, not 0: the sum stays a tensor (typed so) on its device.
    count = sum(counts[1:], start=counts[0]).to(torch.int64)
    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size(group) > 1:
            count = count.clone()
            dist.all_reduce(count, op=dist.ReduceOp.SUM, group=group)
    elif group is not None:
        raise InputError("a group was given but torch.distributed is not initialized")
    return count
