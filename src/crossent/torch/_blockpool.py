"""Worker threads that share out a CPU kernel's row blocks, one single-threaded block each.

Why: torch parallelises each operation over its threads and ends it with a barrier. The
row-block kernel runs about ten operations per block, so a 4096 x 32000 batch meets some
six hundred barriers; when another process takes a core, every barrier waits for the
descheduled thread and the kernel ran slower than torch's own (issue 16: 0.16x torch's
time idle, 1.5x at load 4 on 2 cores). Here each of ``torch.get_num_threads()`` worker
threads takes the next block from a shared counter and runs all of its operations with one
thread: no barrier inside a call, and a descheduled worker's blocks are taken by the others.
The operations release the GIL, so the workers run in parallel.

How the workers get one thread each: OpenMP's thread count is per thread (its
``nthreads-var`` is a per-thread setting), so a worker calls ``torch.set_num_threads(1)``
for itself after torch's per-thread initialisation. That call also sets torch's global
default, which only threads created afterwards read; the caller restores it at once (checked
in the tests: the calling thread and new threads keep their thread count). With another
parallel backend than OpenMP (a global thread pool), or one thread, or one block, the blocks
run in the calling thread as before. A second thread calling while the workers are busy
runs its blocks itself. The pool is rebuilt after ``fork`` (threads do not survive it) and
when ``torch.set_num_threads`` changes the count.

Autograd mode is per thread: the workers run under ``torch.no_grad()`` (the kernels write
with ``out=`` into buffers autograd must not see), in the caller's inference mode. An
exception in a block stops the other workers after their current block and is raised in
the caller; so is ``KeyboardInterrupt`` in the caller, once the workers have stopped
writing.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import queue
import threading
from collections.abc import Callable, Sequence

import torch

from ..errors import InputError

__all__ = ["run_blocks", "set_block_workers", "workers_enabled"]


def _openmp() -> bool:
    return "parallel backend: OpenMP" in torch.__config__.parallel_info()


_OPENMP = _openmp()
_enabled = True


class _Job:
    """One call's blocks, handed to every worker; each pulls indices until none are left."""

    __slots__ = ("blocks", "done", "error", "fn", "inference", "left", "lock", "next")

    def __init__(self, fn: Callable[..., None], blocks: Sequence[tuple], workers: int) -> None:
        self.fn, self.blocks, self.left = fn, blocks, workers
        # the caller's inference mode: tensors it made there can only be written inside it
        self.inference = torch.is_inference_mode_enabled()
        self.next = itertools.count()
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.lock = threading.Lock()

    def work(self) -> None:
        try:
            # inference_mode(False) would turn grad mode on: enter it only when it is on
            with (torch.inference_mode() if self.inference else contextlib.nullcontext()), \
                    torch.no_grad():
                while self.error is None:
                    k = next(self.next)
                    if k >= len(self.blocks):
                        break
                    self.fn(*self.blocks[k])
        except BaseException as error:  # handed to the caller, who raises it
            self.error = error
        with self.lock:
            self.left -= 1
            if self.left == 0:
                self.done.set()


class _Pool:
    def __init__(self, size: int) -> None:
        self.size = size
        self.busy = threading.Lock()
        self.inboxes: list[queue.SimpleQueue] = []
        started = threading.Barrier(size + 1)
        for _ in range(size):
            inbox: queue.SimpleQueue = queue.SimpleQueue()
            self.inboxes.append(inbox)
            threading.Thread(target=self._serve, args=(inbox, started), daemon=True,
                             name="crossent-rowblock").start()
        started.wait()

    @staticmethod
    def _serve(inbox: queue.SimpleQueue, started: threading.Barrier) -> None:
        torch.get_num_threads()  # torch's per-thread lazy initialisation first ...
        torch.set_num_threads(1)  # ... then this thread's OpenMP count
        started.wait()
        while (job := inbox.get()) is not None:
            job.work()

    def stop(self) -> None:
        for inbox in self.inboxes:
            inbox.put(None)

    def run(self, fn: Callable[..., None], blocks: Sequence[tuple]) -> None:
        job = _Job(fn, blocks, self.size)
        for inbox in self.inboxes:
            inbox.put(job)
        try:
            job.done.wait()
        except BaseException as error:  # ^C: stop handing out blocks, wait for the writers
            job.error = job.error or error
            job.done.wait()
        if job.error is not None:
            raise job.error


_pool: _Pool | None = None
_pool_lock = threading.Lock()


def _forget_pool() -> None:  # in a forked child: the workers did not come along
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_pool)


def _get_pool(threads: int) -> _Pool:
    global _pool
    with _pool_lock:
        if _pool is None or _pool.size != threads:
            if _pool is not None:
                _pool.stop()
            _pool = _Pool(threads)
            torch.set_num_threads(threads)  # undo the workers' change of the global default
        return _pool


def set_block_workers(enabled: bool) -> None:
    """Share the CPU kernels' row blocks out to worker threads (``True``, the default, on
    OpenMP builds of torch) or run every block in the calling thread with torch's own
    threading for each operation (``False``: the kernel as it was before; slower when
    other processes compete for the cores). Public as ``crossent.torch.set_block_workers``."""
    global _enabled
    if not isinstance(enabled, bool):
        raise InputError(f"set_block_workers(enabled={enabled!r}): enabled must be True or "
                         f"False")
    _enabled = enabled


def workers_enabled(enabled: bool | None = None) -> bool:
    """Whether blocks go to the worker threads (the setting and an OpenMP build);
    ``enabled`` sets it first, as :func:`set_block_workers`."""
    if enabled is not None:
        set_block_workers(bool(enabled))
    return _enabled and _OPENMP


def run_blocks(fn: Callable[..., None], blocks: Sequence[tuple]) -> None:
    """``fn(*block)`` for every block, on the worker threads when that can help (the blocks
    must write disjoint outputs), else in order in the calling thread."""
    threads = torch.get_num_threads()
    if threads > 1 and len(blocks) > 1 and workers_enabled():
        pool = _get_pool(threads)
        if pool.busy.acquire(blocking=False):
            try:
                pool.run(fn, blocks)
            finally:
                pool.busy.release()
            return
    for block in blocks:
        fn(*block)
