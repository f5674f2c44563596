"""Run a function on a gloo process group of ``world`` CPU processes, bounded in time.

``run_group(fn, world, *args)`` starts ``world`` processes (``torch.multiprocessing``,
start method ``forkserver``: a server process that has imported torch and crossent once
forks each child, 0.1 s a group where ``spawn``'s fresh interpreters took 5-7 s on 2 cores
and were half the suite's distributed time; the children see the environment the server
started with, and none of the tests varies it) that join ``tcp://127.0.0.1:PORT`` (a free
port from a socket bound to port 0), call ``fn(rank, world, *args)`` and destroy the group.
A child's exception is re-raised in the parent
(``torch.multiprocessing.ProcessRaisedException``, whose message holds the child's
traceback). Past ``timeout`` seconds every child is killed and the test fails with
``TimeoutError``; collectives themselves time out after ``COLLECTIVE_TIMEOUT``.
"""

from __future__ import annotations

import datetime
import multiprocessing
import os
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

COLLECTIVE_TIMEOUT = 30.0

# imported once, in the forkserver, before it forks any child
_PRELOAD = ["torch", "torch.distributed", "crossent.torch", "crossent.torch.distributed"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, fn, args):
    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT),
    )
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def run_group(fn, world: int, *args, timeout: float = 120.0) -> None:
    multiprocessing.set_forkserver_preload(_PRELOAD)  # no effect once the server runs
    ctx = mp.start_processes(_entry, args=(world, free_port(), fn, args), nprocs=world,
                             join=False, start_method="forkserver")
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=max(0.05, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{fn.__name__} on {world} gloo processes did not finish "
                                   f"within {timeout:.0f} s; the children were killed")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
            p.join(5)


def gather_probes(rank: int, world: int, path: str, probes: dict, hang_s: float) -> None:
    """Run each of ``probes`` (name: ``probe(rank, world, group)``, returning something
    JSON can hold) on a fresh subgroup whose collectives time out after ``hang_s``
    seconds, timed; every rank's ``(outcome, value, seconds)`` (outcome ``"returned"`` or
    ``"<Exception>: <message>"``) is gathered, and rank 0 writes ``{name: [per rank]}`` to
    ``path`` as JSON. A probe that leaves a rank waiting shows as a gloo timeout there and
    as a slow probe."""
    import json

    results = {}
    for name, probe in probes.items():
        group = dist.new_group(list(range(world)), timeout=datetime.timedelta(seconds=hang_s))
        start = time.monotonic()
        try:
            result = ("returned", probe(rank, world, group))
        except Exception as error:
            result = (f"{type(error).__name__}: {error}", None)
        seen: list = [None] * world
        dist.all_gather_object(seen, (*result, time.monotonic() - start))
        results[name] = seen
        dist.barrier()
    if rank == 0:
        with open(path, "w") as f:
            json.dump(results, f)


def gather_results(rank: int, world: int, path: str, cases: dict) -> None:
    """Run each of ``cases`` (name: a callable of no arguments returning something JSON can
    hold) on every rank; its value, or ``"<Exception>: <message>"``, is gathered, and rank 0
    writes ``{name: [per rank]}`` to ``path`` as JSON (for :func:`run_and_load`)."""
    import json

    results = {}
    for name, case in cases.items():
        try:
            got = case()
        except Exception as error:  # recorded, gathered, asserted in the parent
            got = f"{type(error).__name__}: {str(error)[:300]}"
        seen: list = [None] * world
        dist.all_gather_object(seen, got)
        results[name] = seen
    if rank == 0:
        with open(path, "w") as f:
            json.dump(results, f)


def run_and_load(fn, world: int, directory, timeout: float = 60.0) -> dict:
    """``run_group(fn, world, path)`` for a ``fn`` that writes its results to ``path`` (a
    file in ``directory``) as JSON (:func:`gather_results`); the results."""
    import json

    path = str(directory / "out.json")
    run_group(fn, world, path, timeout=timeout)
    with open(path) as f:
        return json.load(f)


class CollectiveCounter:
    """Wraps ``torch.distributed.all_reduce`` (inside a child) and records every call as
    ``(op name, numel, bytes)``."""

    def __init__(self):
        self.calls: list[tuple[str, int, int]] = []
        self._orig = None

    def __enter__(self):
        self._orig = orig = dist.all_reduce

        def counted(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
            name = "MAX" if op == dist.ReduceOp.MAX else "SUM" if op == dist.ReduceOp.SUM \
                else str(op)
            self.calls.append((name, tensor.numel(), tensor.numel() * tensor.element_size()))
            return orig(tensor, op=op, group=group, async_op=async_op)

        dist.all_reduce = counted
        return self

    def __exit__(self, *exc):
        dist.all_reduce = self._orig

    def take(self) -> list[tuple[str, int, int]]:
        calls, self.calls = self.calls, []
        return calls


def torch_reference(z, t, weight=None, label_smoothing=0.0, z_loss=0.0, softcap=None,
                    reduction="mean", ignore_index=-100):
    """Single-process cross-entropy, independent of crossent (use float64 inputs): torch's
    ``F.cross_entropy`` on the capped logits ``c tanh(z / c)``, plus ``z_loss lse^2`` on
    counted rows, reduced with torch's denominators (``sum_n w[y_n]`` over counted rows)."""
    import torch.nn.functional as F

    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    valid = t != ignore_index
    per = F.cross_entropy(z, t, weight=weight, ignore_index=ignore_index,
                          label_smoothing=label_smoothing, reduction="none")
    if z_loss:
        per = per + torch.where(valid, z_loss * torch.logsumexp(z, 1) ** 2, 0.0)
    if reduction == "none":
        return per
    if reduction == "sum":
        return per.sum()
    denom = weight[t[valid]].sum() if weight is not None else valid.sum()
    return per.sum() / denom


def outcome(fn, message_chars: int = 0) -> str:
    """How ``fn()`` ended on this rank: ``"returned"``, crossent's error class name (and
    the first ``message_chars`` of its message), or ``"OTHER ..."`` for any other exception
    (reported to every rank by :func:`agree`, so the test fails on all of them)."""
    from crossent.errors import InputError, UnsupportedError

    try:
        fn()
    except (InputError, UnsupportedError) as error:
        name = type(error).__name__
        return name + ": " + str(error)[:message_chars] if message_chars else name
    except Exception as error:
        return f"OTHER {type(error).__name__}: {error}"
    return "returned"


def agree(seen_here: str, expected: str, name, world: int, prefix: bool = False) -> None:
    """Every rank's :func:`outcome` equals ``expected`` (starts with it, with ``prefix``);
    a collective: all ranks call it."""
    seen: list = [None] * world
    dist.all_gather_object(seen, seen_here)
    ok = all(s.startswith(expected) if prefix else s == expected for s in seen)
    assert ok, (name, seen)
