"""Worker threads that share out a CPU kernel's row blocks, one single-threaded block each.

Why: torch parallelises each operation over its threads and ends it with a barrier. The
row-block kernel runs about ten operations per block, so a 4096 x 32000 batch meets some
six hundred barriers; when another process takes a core, every barrier waits for the
descheduled thread and the kernel ran slower than torch's own (issue 16: 0.16x torch's
time idle, 1.5x at load 4 on 2 cores). Here each of ``torch.get_num_threads()`` threads,
the calling thread and ``torch.get_num_threads() - 1`` workers, takes the next block from a
shared counter and runs all of its operations with one thread: no barrier inside a call,
and a descheduled thread's blocks are taken by the others. The operations release the GIL,
so the threads run in parallel. The caller works rather than sleeping until the workers
are done: a call then costs one hand-off (to the workers), not two, and the caller waits
only for workers inside a block, not for one still waking up (2 threads, measured with
``benchmarks/blockpool_latency.py``: 2 to 16 no-op blocks 14 us a call instead of 65-90 us).

How the workers get one thread each: OpenMP's thread count is per thread (its
``nthreads-var`` is a per-thread setting), so after torch's per-thread initialisation a
worker calls the OpenMP runtime's own ``omp_set_num_threads(1)`` (through ``ctypes``, in the
runtime torch loaded), which changes nothing for any other thread. The caller does the same
for its own blocks and puts its count back afterwards, also when a block raises. Only where
that runtime cannot be found does a worker call ``torch.set_num_threads(1)``, which also
sets torch's global default; the default read before is then put back at once from a
short-lived thread, and the caller does not work (``torch.get_num_threads()`` workers do).
With another parallel backend than OpenMP (a global thread pool), one thread, one block, or
a Python dispatch or function mode active in the caller (modes are per thread: the workers
would bypass a ``FlopCounterMode``), the blocks run in the calling thread as before. A
second thread calling while the workers are busy runs its blocks itself. The pool is
rebuilt after ``fork`` (threads do not survive it) and when ``torch.set_num_threads``
changes the count; a pool still in use is retired by its caller, never stopped under it.

Autograd mode is per thread: every block runs under ``torch.no_grad()`` (the kernels write
with ``out=`` into buffers autograd must not see), in the caller's inference mode, without
autocast (the caller's own modes are put back after its blocks). An exception in a block
(the caller's or a worker's) stops the others after their current block and is raised in
the caller once no worker writes any more; so is ``KeyboardInterrupt`` in the caller,
inside one of its blocks or not.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import itertools
import os
import queue
import re
import threading
from collections.abc import Callable, Sequence
from typing import Any

# the first torch import of crossent.torch (its __init__ imports this module first): a
# missing torch is named with its extra, and keeps name='torch' (the command maps that name)
from ..errors import InputError, missing_extra

try:
    import torch
except ModuleNotFoundError as err:
    missing_extra(err, "torch", "crossent.torch needs PyTorch: pip install 'crossent[torch]'")

__all__ = ["run_blocks", "run_row_blocks", "set_block_workers", "workers_enabled"]


def _openmp() -> bool:
    return "parallel backend: OpenMP" in torch.__config__.parallel_info()


@functools.cache  # looked up when the first pool is built, not at import
def _omp_set_num_threads() -> Callable[[int], Any] | None:
    """``omp_set_num_threads`` of the OpenMP runtime torch loaded (its own copy first), or
    None: another copy would set another runtime's count (checked by the workers). Called
    keeping the GIL (``PyDLL``): it only stores a number, and a caller that released the
    GIL just after handing out its blocks would wait for it while a worker takes them."""
    paths: list[str] = []
    try:
        with open("/proc/self/maps") as maps:
            paths = sorted(set(re.findall(r"(/\S*lib[gi]omp\S*\.so[.\d]*)", maps.read())))
    except OSError:
        pass
    here = os.path.dirname(torch.__file__)
    for path in sorted(paths, key=lambda p: not p.startswith(here)):
        try:
            return ctypes.PyDLL(path).omp_set_num_threads
        except (OSError, AttributeError):
            continue
    try:
        return ctypes.PyDLL(None).omp_set_num_threads
    except (OSError, AttributeError):
        return None


_OPENMP = _openmp()
_enabled = True


def _one_openmp_thread() -> bool:
    """Set this thread's OpenMP count to 1 without touching torch's global default."""
    setter = _omp_set_num_threads()
    if setter is None:
        return False
    setter(1)
    return torch.get_num_threads() == 1  # torch reads omp_get_max_threads: the same runtime


def _modes_active() -> bool:
    """A Python dispatch or function mode is active in this thread (they are per thread)."""
    return bool(torch._C._len_torch_dispatch_stack() or torch._C._len_torch_function_stack())


class _Job:
    """One call's blocks. The workers it was handed to, and the caller where it works too,
    take block indices from one counter until none are left or a block raised. ``active``
    counts the workers inside a block: the caller waits for those only, not for workers
    that have not woken up yet (they find the job over and return)."""

    __slots__ = ("active", "blocks", "error", "fn", "idle", "inference", "lock", "next",
                 "over")

    def __init__(self, fn: Callable[..., None], blocks: Sequence[tuple]) -> None:
        self.fn: Callable[..., None] | None = fn
        self.blocks: Sequence[tuple] = blocks
        # the caller's inference mode: tensors it made there can only be written inside it
        self.inference = torch.is_inference_mode_enabled()
        self.next = itertools.count()  # next() is atomic: the caller takes blocks lock-free
        self.active = 0  # workers inside a block (the caller is not counted)
        self.over = False  # no block is handed out any more
        self.idle = threading.Event()  # over, and no worker inside a block
        self.error: BaseException | None = None
        self.lock = threading.Lock()

    def _claim(self) -> tuple[Callable[..., None], tuple] | None:
        """A worker's next block, counted in ``active``; None once the job is over."""
        with self.lock:
            if not self.over and self.error is None:
                k = next(self.next)
                if k < len(self.blocks):
                    self.active += 1
                    assert self.fn is not None
                    return self.fn, self.blocks[k]
            self.over = True
            if self.active == 0:
                self.idle.set()
            return None

    def work(self) -> None:
        """A worker's share: blocks until none are left, under ``torch.no_grad()`` and in
        the caller's inference mode."""
        # inference_mode(False) would turn grad mode on: enter it only when it is on
        with (torch.inference_mode() if self.inference else contextlib.nullcontext()), \
                torch.no_grad():
            while (claimed := self._claim()) is not None:
                try:
                    claimed[0](*claimed[1])
                except BaseException as error:  # handed to the caller, who raises it
                    self.error = self.error or error
                finally:
                    claimed = None  # the caller's closure is not kept once it returns
                    with self.lock:
                        self.active -= 1
                        if self.over and self.active == 0:
                            self.idle.set()

    def work_in_caller(self, threads: int) -> None:
        """The caller's share, with one OpenMP thread (its count ``threads`` put back after,
        whatever happens) and under ``torch.no_grad()``, as a worker's. Not counted in
        ``active``: an interrupt anywhere here cannot leave the count wrong."""
        setter = _omp_set_num_threads()
        assert setter is not None
        blocks, fn = self.blocks, self.fn
        assert fn is not None
        # autocast is per thread too: the workers run without it
        cast = (torch.autocast("cpu", enabled=False) if torch.is_autocast_enabled("cpu")
                else contextlib.nullcontext())
        try:
            setter(1)
            with torch.no_grad(), cast:
                while self.error is None:
                    k = next(self.next)
                    if k >= len(blocks):
                        break
                    fn(*blocks[k])
        except BaseException as error:  # ^C in the caller's block too: stop, then raise
            self.error = self.error or error
        finally:
            setter(threads)

    def close(self) -> None:
        """No block is handed out any more; ``idle`` is set once no worker is in one."""
        with self.lock:
            self.over = True
            if self.active == 0:
                self.idle.set()

    def wait_idle(self) -> None:
        """Wait until no worker is inside a block (timed waits: ^C is seen at once)."""
        while not self.idle.wait(0.05):
            pass

    def release(self) -> None:
        """Drop the caller's closure (no worker reads it once the job is over and idle):
        a worker that has not woken up yet keeps no tensors alive."""
        self.fn, self.blocks = None, ()


class _Pool:
    """``size`` threads for the blocks: ``size - 1`` workers and the caller, or ``size``
    workers where the caller cannot set its own OpenMP count alone (``torch.set_num_threads``
    would set torch's global default too)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.busy = threading.Lock()  # held by the one caller whose job runs
        self.retired = False  # replaced while busy: its caller stops it when done
        self.inboxes: list[queue.SimpleQueue] = []
        self.caller_works = _omp_set_num_threads() is not None
        default = _global_default_threads()
        if self._start(size - 1 if self.caller_works else size):
            if self.caller_works:  # the runtime found is not the one torch uses
                self.caller_works = False
                self._start(1)
            # torch.set_num_threads(1) in a worker set the global default too
            _in_fresh_thread(lambda: torch.set_num_threads(default))

    def _start(self, count: int) -> bool:
        """Start ``count`` workers; whether one had to call ``torch.set_num_threads(1)``."""
        fallback: list[bool] = []
        started = threading.Barrier(count + 1)
        for _ in range(count):
            inbox: queue.SimpleQueue = queue.SimpleQueue()
            self.inboxes.append(inbox)
            threading.Thread(target=self._serve, args=(inbox, started, fallback), daemon=True,
                             name="crossent-rowblock").start()
        started.wait()
        return bool(fallback)

    @staticmethod
    def _serve(inbox: queue.SimpleQueue, started: threading.Barrier,
               fallback: list[bool] | None = None) -> None:
        torch.get_num_threads()  # torch's per-thread lazy initialisation first ...
        if not _one_openmp_thread():  # ... then this thread's OpenMP count
            torch.set_num_threads(1)
            if fallback is not None:
                fallback.append(True)
        started.wait()
        while (job := inbox.get()) is not None:
            job.work()
            del job  # an idle worker keeps no caller's tensors alive

    def stop(self) -> None:
        for inbox in self.inboxes:
            inbox.put(None)

    def run(self, fn: Callable[..., None], blocks: Sequence[tuple], threads: int) -> None:
        """The blocks on the workers and, where it can, the caller (its OpenMP count
        ``threads`` put back after); raises the first error once nothing writes."""
        job = _Job(fn, blocks)
        try:
            for inbox in self.inboxes:
                inbox.put(job)
            if self.caller_works:
                job.work_in_caller(threads)
                job.close()  # the caller has taken the last block (or one raised)
            job.wait_idle()
        except BaseException as interrupt:  # ^C: no more blocks are handed out ...
            job.error = job.error or interrupt
            job.close()
            job.idle.wait()  # ... and nothing writes once the caller raises
        job.release()
        failure, job.error = job.error, None
        if failure is not None:
            # raised from a local that is then deleted: the traceback would hold this frame,
            # the frame the job, the job the error (a cycle keeping the block's tensors alive
            # until the garbage collector runs, past the caller's ``except``)
            try:
                raise failure
            finally:
                del failure


def _in_fresh_thread(fn: Callable[[], Any]) -> Any:
    """``fn()`` in a new thread (torch's per-thread settings start from the defaults)."""
    out: list = []
    thread = threading.Thread(target=lambda: out.append(fn()))
    thread.start()
    thread.join()
    return out[0] if out else None


def _global_default_threads() -> int:
    """torch's global default thread count: what a new thread starts with."""
    return int(_in_fresh_thread(torch.get_num_threads))


_pool: _Pool | None = None
_pool_lock = threading.Lock()


def _forget_pool() -> None:  # in a forked child: the workers did not come along
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_pool)


def _acquire_pool(threads: int) -> _Pool | None:
    """A pool of ``threads`` workers with its ``busy`` lock held, or None when another
    caller is using it. A pool of another size is replaced: stopped when idle, retired
    (stopped by its caller afterwards) when busy."""
    global _pool
    # not blocking: a signal handler calling a kernel while this thread builds a pool (the
    # lock held across the workers' start) would wait for itself; it runs inline instead
    if not _pool_lock.acquire(blocking=False):
        return None
    try:
        if _pool is not None and _pool.size != threads:
            old, _pool = _pool, None
            if old.busy.acquire(blocking=False):
                old.stop()
            else:
                old.retired = True
        if _pool is None:
            _pool = _Pool(threads)
        return _pool if _pool.busy.acquire(blocking=False) else None
    finally:
        _pool_lock.release()


def _stop_if_retired(pool: _Pool) -> None:
    """After its caller released ``pool.busy``: stop it if it was replaced while busy (a
    caller replacing it later finds it idle and stops it itself)."""
    with _pool_lock:
        if pool.retired:
            pool.stop()


def _release_pool(pool: _Pool) -> None:
    """What :func:`run_blocks` does after its call (for the tests that hold a pool)."""
    pool.busy.release()
    _stop_if_retired(pool)


def set_block_workers(enabled: bool) -> None:
    """Share the CPU kernels' row blocks out to worker threads (``True``, the default, on
    OpenMP builds of torch) or run every block in the calling thread with torch's own
    threading for each operation (``False``: the kernel as it was before; slower when
    other processes compete for the cores). Public as ``crossent.torch.set_block_workers``.
    The numbers are the same either way: each block's rows are computed alike.

    >>> import torch, crossent.torch as xt
    >>> z, y = torch.randn(600, 1000), torch.randint(0, 1000, (600,))  # the row-block kernel
    >>> xt.set_block_workers(False)
    >>> alone = xt.cross_entropy(z, y)
    >>> xt.set_block_workers(True)
    >>> torch.equal(alone, xt.cross_entropy(z, y))
    True
    """
    global _enabled
    if not isinstance(enabled, bool):
        raise InputError(f"set_block_workers(enabled={enabled!r}): enabled must be True or "
                         f"False")
    _enabled = enabled


def workers_enabled() -> bool:
    """Whether blocks go to the worker threads (the setting and an OpenMP build)."""
    return _enabled and _OPENMP


def run_blocks(fn: Callable[..., None], blocks: Sequence[tuple]) -> None:
    """``fn(*block)`` for every block, on the worker threads when that can help (the blocks
    must write disjoint outputs), else in order in the calling thread."""
    threads = torch.get_num_threads()
    if threads > 1 and len(blocks) > 1 and workers_enabled() and not _modes_active():
        pool = _acquire_pool(threads)
        if pool is not None:
            try:
                pool.run(fn, blocks, threads)
            finally:
                # released before any Python call: a pending ^C runs its handler when a
                # function starts, and would leave the pool busy for good
                pool.busy.release()
                _stop_if_retired(pool)
            return
    for block in blocks:
        fn(*block)


def run_row_blocks(fn: Callable[[int, int], None], num_rows: int, step: int,
                   device: torch.device, min_rows: int = 1) -> None:
    """``fn(i, j)`` for the row blocks ``[i, j)`` of ``num_rows`` rows, ``step`` rows each:
    on CPU through :func:`run_blocks` (the blocks must write disjoint rows), elsewhere in
    order in the calling thread (accelerators queue the operations asynchronously: one
    thread is enough). A last block of fewer than ``min_rows`` rows (``<= step``) joins the
    one before, for a kernel that takes ``min_rows`` rows a call at least."""
    blocks = [(i, min(i + step, num_rows)) for i in range(0, num_rows, step)]
    if len(blocks) > 1 and blocks[-1][1] - blocks[-1][0] < min_rows:
        blocks[-2:] = [(blocks[-2][0], num_rows)]
    if device.type == "cpu":
        run_blocks(fn, blocks)
    else:
        for i, j in blocks:
            fn(i, j)
