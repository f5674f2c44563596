"""Adversarial review (H16) of ff27ddd: the calling thread of ``_blockpool.run_blocks``
takes blocks too (its OpenMP count set to 1 and put back, its blocks under ``no_grad``,
autocast off) and waits only for the workers still inside a block.

Attacks: the caller's OpenMP count, grad / inference / autocast modes after a normal
return and after an exception (its own block's, a worker's, ``KeyboardInterrupt``,
``SystemExit``, ``GeneratorExit``, a real SIGINT); nested calls from the caller's and from
a worker's block; concurrent callers and ``torch.set_num_threads`` from another thread
during a call; one thread; a non-main caller; zero, one and 10^5 blocks; the closure's
tensors after the call; the bits of ``backend="rowblock"`` with the workers off; the
compiled kernel against float64 torch.

Three findings failed before their fixes: a block that raised kept its closure's tensors
alive until the garbage collector ran (a reference cycle through the raised error), a ^C at
the first Python call after the blocks left the pool busy for good, and a signal handler
calling ``run_blocks`` while the pool was being built deadlocked on its lock. The attacks
that held are the other tests. Every test that starts threads, signals or processes runs
under a timeout."""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import weakref

import pytest
import torch
import torch.nn.functional as F

import crossent
import crossent.torch as xt
from crossent.torch import _blockpool, _inductor, _rowblock

pytestmark = [
    pytest.mark.skipif(not _blockpool.workers_enabled(),
                       reason="torch without the OpenMP backend: blocks run inline"),
    pytest.mark.timeout(60),
]


def _in_thread(fn):
    """``fn()`` in a new thread (joined with a timeout); its result."""
    out: list = []
    th = threading.Thread(target=lambda: out.append(fn()))
    th.start()
    th.join(20)
    assert not th.is_alive(), "the thread hung"
    return out[0]


def _state():
    return (torch.get_num_threads(), torch.is_grad_enabled(), torch.is_inference_mode_enabled(),
            torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"))


def _warm():
    """The pool built (so that a test sees a job handed to running workers)."""
    _blockpool.run_blocks(lambda i: None, [(0,), (1,)])
    pool = _blockpool._pool
    assert pool is not None and pool.caller_works


MODES = {
    "plain": lambda: torch.enable_grad(),
    "no_grad": lambda: torch.no_grad(),
    "enable_grad_in_no_grad": lambda: _nested(torch.no_grad(), torch.enable_grad()),
    "inference": lambda: torch.inference_mode(),
    "autocast_bf16": lambda: torch.autocast("cpu", dtype=torch.bfloat16),
}


@contextlib.contextmanager
def _nested(*cms):
    """The context managers ``cms`` entered in order (the last innermost)."""
    with contextlib.ExitStack() as stack:
        for cm in cms:
            stack.enter_context(cm)
        yield


OUTCOMES = {
    "normal": (None, None),
    "caller_ValueError": ("caller", ValueError),
    "worker_ValueError": ("worker", ValueError),
    "caller_KeyboardInterrupt": ("caller", KeyboardInterrupt),
    "worker_KeyboardInterrupt": ("worker", KeyboardInterrupt),
    "caller_SystemExit": ("caller", SystemExit),
    "worker_GeneratorExit": ("worker", GeneratorExit),
}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("outcome", list(OUTCOMES))
def test_callers_state_after_every_outcome(workers, mode, outcome):
    """Whatever a block does, the caller's OpenMP count and modes are what they were, every
    block ran with one thread and without grad, and a new thread gets torch's default."""
    _warm()
    where, error = OUTCOMES[outcome]
    caller = threading.get_ident()
    entered = threading.Event()
    inside: list = []

    def block(i):
        me = threading.get_ident() == caller
        inside.append((me, torch.get_num_threads(), torch.is_grad_enabled(),
                       torch.is_autocast_enabled("cpu")))
        if me:
            entered.wait(5)  # a worker is inside a block (and raises there, or finishes)
        else:
            entered.set()
        if where == ("caller" if me else "worker"):
            raise error("H16")
        time.sleep(0.002)

    with MODES[mode]():
        before = _state()
        if error is None:
            _blockpool.run_blocks(block, [(i,) for i in range(12)])
        else:
            with pytest.raises(error, match="H16"):
                _blockpool.run_blocks(block, [(i,) for i in range(12)])
        assert _state() == before
    assert {s[1:] for s in inside} == {(1, False, False)}
    assert any(s[0] for s in inside) and not all(s[0] for s in inside)
    assert _in_thread(torch.get_num_threads) == torch.get_num_threads()


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(),
                    reason="signals go to the main thread")
def test_a_real_sigint_inside_the_callers_block(workers):
    """SIGINT delivered while the caller runs Python code in its own block: raised once the
    worker inside a block has written, the count put back, the pool usable."""
    _warm()
    before = torch.get_num_threads()
    caller = threading.get_ident()
    entered = threading.Event()
    written: list = []

    def block(i):
        if threading.get_ident() == caller:
            entered.wait(5)
            signal.raise_signal(signal.SIGINT)  # the handler runs at the next bytecode check
            for _ in range(1000):
                time.sleep(0.001)
            return
        entered.set()
        time.sleep(0.05)
        written.append(i)

    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            _blockpool.run_blocks(block, [(i,) for i in range(30)])
        count = len(written)
        assert count >= 1
        time.sleep(0.1)
        assert len(written) == count < 29  # nothing written after the caller raised
    finally:
        signal.signal(signal.SIGINT, old)
    assert torch.get_num_threads() == before and torch.is_grad_enabled()
    out = torch.zeros(6)
    _blockpool.run_blocks(lambda i: out.__setitem__(i, 1.0), [(i,) for i in range(6)])
    assert bool((out == 1).all())


@pytest.mark.parametrize("outer_in", ["caller", "worker", "every"])
def test_a_block_that_calls_run_blocks(workers, outer_in):
    """Re-entrancy: an inner call from a block (the caller's, a worker's, every one) runs
    inline there with one thread: every inner block once, no hang, the count put back."""
    _warm()
    before = torch.get_num_threads()
    caller = threading.get_ident()
    out = torch.zeros(8, 5)
    inner_threads: list = []

    def inner(i, k):
        inner_threads.append(torch.get_num_threads())
        out[i, k] += 1.0

    def outer(i):
        me = threading.get_ident() == caller
        if outer_in == "every" or (outer_in == "caller") == me:
            _blockpool.run_blocks(inner, [(i, k) for k in range(5)])
        else:
            out[i, 0] += 1.0
        time.sleep(0.002)

    _blockpool.run_blocks(outer, [(i,) for i in range(8)])
    plain, inner_row = torch.tensor([1.0, 0, 0, 0, 0]), torch.ones(5)
    assert all(torch.equal(row, plain) or torch.equal(row, inner_row) for row in out)
    assert set(inner_threads) <= {1}
    assert len(inner_threads) == 5 * int((out[:, 1] == 1).sum())
    if outer_in != "worker":
        assert inner_threads, "no inner call ran"
    assert torch.get_num_threads() == before


def test_two_callers_and_a_thread_count_changed_during_the_call(workers):
    """Two Python threads call at once while a third calls ``torch.set_num_threads(3)``
    mid-call: every block of each call runs once, each caller keeps its own count."""
    _warm()
    start = threading.Barrier(3)
    inside = threading.Event()
    results: dict = {}
    errors: list = []

    def caller(name):
        try:
            torch.set_num_threads(2)
            # torch reads its global default at a thread's first get_num_threads (its lazy
            # init), not at set_num_threads: read it now, before the changer's new default
            assert torch.get_num_threads() == 2
            start.wait(10)
            out = torch.zeros(40)
            for _ in range(3):
                def block(i):
                    inside.set()
                    time.sleep(0.001)
                    out[i] += 1.0
                _blockpool.run_blocks(block, [(i,) for i in range(40)])
            results[name] = (out.clone(), torch.get_num_threads())
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    def changer():
        start.wait(10)
        inside.wait(10)
        torch.set_num_threads(3)
        results["changer"] = torch.get_num_threads()

    threads = [threading.Thread(target=caller, args=(n,)) for n in "ab"]
    threads.append(threading.Thread(target=changer))
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    assert not any(th.is_alive() for th in threads) and not errors
    for name in "ab":
        out, count = results[name]
        assert torch.equal(out, torch.full((40,), 3.0)) and count == 2
    assert results["changer"] == 3
    assert _in_thread(torch.get_num_threads) == 3  # torch's new global default


def test_one_thread_runs_in_order_in_the_caller(workers):
    torch.set_num_threads(1)
    seen: list = []
    with torch.enable_grad():
        _blockpool.run_blocks(lambda i: seen.append((i, threading.get_ident(),
                                                     torch.is_grad_enabled())),
                              [(i,) for i in range(6)])
    assert seen == [(i, threading.get_ident(), True) for i in range(6)]
    assert torch.get_num_threads() == 1


def test_a_non_main_caller_thread(workers):
    """A caller that is not the main thread works, takes blocks, and keeps its count."""
    _warm()

    def call():
        me = threading.get_ident()
        torch.set_num_threads(2)
        who: list = []

        def block(i):
            who.append((threading.get_ident(), torch.get_num_threads()))
            time.sleep(0.002)

        _blockpool.run_blocks(block, [(i,) for i in range(10)])
        return me in {w[0] for w in who}, {w[1] for w in who}, torch.get_num_threads(), len(who)

    assert _in_thread(call) == (True, {1}, 2, 10)


def test_zero_and_one_block(workers):
    calls: list = []
    _blockpool.run_blocks(lambda i: calls.append(i), [])
    assert calls == []
    _blockpool.run_blocks(lambda i: calls.append((i, threading.get_ident())), [(7,)])
    assert calls == [(7, threading.get_ident())]


def test_a_hundred_thousand_tiny_blocks(workers):
    """Every block once, no hang, no quadratic cost (0.1 s measured)."""
    _warm()
    hits = bytearray(100_000)

    def block(i):
        hits[i] += 1

    t0 = time.perf_counter()
    _blockpool.run_blocks(block, [(i,) for i in range(100_000)])
    assert time.perf_counter() - t0 < 15
    assert hits == bytearray([1]) * 100_000


def _holder(where, caller):
    """A block that captures a tensor (returned as a weak reference) and raises in
    ``where`` (``None``: never)."""
    t = torch.zeros(1000)
    ref = weakref.ref(t)

    def block(i):
        t.add_(0.0)
        me = threading.get_ident() == caller
        if where is not None and (where == "caller") == me:
            raise ValueError("H16")
        time.sleep(0.005)

    return block, ref


def _survives(where) -> bool:
    """Whether the captured tensor is still alive after the call returned or raised (the
    exception caught and dropped), without the cyclic garbage collector."""
    _warm()
    gc.collect()
    gc.disable()
    try:
        block, ref = _holder(where, threading.get_ident())
        try:
            _blockpool.run_blocks(block, [(i,) for i in range(8)])
        except ValueError:
            pass
        del block
        time.sleep(0.05)  # the workers are back at their inboxes
        return ref() is not None
    finally:
        gc.enable()
        gc.collect()


def test_the_closure_dies_after_a_normal_call(workers):
    assert not _survives(None)


def test_the_closure_dies_after_a_raising_inline_call(workers):
    _blockpool.set_block_workers(False)
    assert not _survives("caller")


@pytest.mark.parametrize("where", ["caller", "worker"])
def test_the_closure_dies_after_a_raising_call(workers, where):
    assert not _survives(where)


def test_an_interrupt_at_the_release_leaves_the_pool_usable(workers):
    _warm()
    pool = _blockpool._pool
    done = []  # set when _Pool.run has returned: the blocks are over

    def on_return(frame, event, arg):
        if event == "return":
            done.append(True)
        return on_return

    def tracer(frame, event, arg):
        # the pending SIGINT's handler, at the first Python call run_blocks makes after
        # the blocks (whatever it is)
        if event != "call":
            return None
        if frame.f_code is _blockpool._Pool.run.__code__:
            return on_return
        if done and frame.f_back is not None and (
                frame.f_back.f_code is _blockpool.run_blocks.__code__):
            sys.settrace(None)
            raise KeyboardInterrupt
        return None

    try:
        sys.settrace(tracer)
        try:
            _blockpool.run_blocks(lambda i: None, [(0,), (1,)])
        except KeyboardInterrupt:
            pass
        finally:
            sys.settrace(None)
        who: set = set()

        def block(i):
            who.add(threading.get_ident())
            time.sleep(0.002)

        _blockpool.run_blocks(block, [(i,) for i in range(20)])
        assert len(who) >= 2, "the workers are never used again"
    finally:
        if pool is not None and pool.busy.locked():  # put back for the other tests
            pool.busy.release()


_HANDLER_SCRIPT = textwrap.dedent("""
    import os, signal, threading, time, torch
    from crossent.torch import _blockpool as bp
    torch.set_num_threads(2)
    bp.run_blocks(lambda i: None, [(0,), (1,)])
    main = threading.get_ident()
    got = []
    signal.signal(signal.SIGUSR1,
                  lambda s, f: bp.run_blocks(lambda i: got.append(i), [(0,), (1,)]))
    def watchdog():  # the deadlocked main thread cannot report: this thread does
        time.sleep(3)
        print("deadlock", flush=True)
        os._exit(3)
    threading.Thread(target=watchdog, daemon=True).start()
    serve = bp._Pool._serve
    def late(*a):  # a signal while the caller builds a pool (holding _pool_lock)
        signal.pthread_kill(main, signal.SIGUSR1)
        return serve(*a)
    bp._Pool._serve = staticmethod(late)
    torch.set_num_threads(3)
    bp.run_blocks(lambda i: None, [(0,), (1,)])
    print("ok", sorted(set(got)))  # one handler call per worker started
""")


def test_a_signal_handler_calling_run_blocks_during_a_rebuild():
    try:
        src = os.path.dirname(os.path.dirname(crossent.__file__))  # this checkout's crossent
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
        done = subprocess.run([sys.executable, "-c", _HANDLER_SCRIPT], capture_output=True,
                              text=True, timeout=50, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail("the child hung")
    assert "deadlock" not in done.stdout, "the handler waits for _pool_lock its thread holds"
    assert done.returncode == 0, done.stderr[-2000:]
    assert "ok [0, 1]" in done.stdout


# ---- the kernels through the public entry: the bits of the workers-off kernel


SIZES = [(n, c) for n in (1, 2, 3, 63, 64, 65, 1000) for c in (1, 7, 1000, 32001)
         if n * c <= 1000 * 1000]


def _rowblock_call(z, t, inplace):
    a = z.detach().clone().requires_grad_()
    loss = xt.cross_entropy(a * 1 if inplace else a, t, backend="rowblock",
                            inplace_backward=inplace)
    loss.backward()
    return loss.detach(), a.grad


@pytest.mark.parametrize("inplace", [False, True], ids=["copy", "inplace"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_rowblock_bits_equal_the_workers_off_kernel(workers, monkeypatch, dtype, inplace):
    """Every size class, blocks of about a third of the rows (the pool, caller included,
    runs every multi-row batch): the same bits as ``set_block_workers(False)``, and
    torch's float64 values."""
    _warm()
    for n, c in SIZES:
        step = max(1, n // 3)
        monkeypatch.setattr(_rowblock, "block_rows",
                            lambda num_classes, device="cpu", step=step: step)
        g = torch.Generator().manual_seed(n * 7 + c)
        z = (torch.randn(n, c, generator=g) * 3).to(dtype)
        t = torch.randint(0, c, (n,), generator=g)
        if n > 2:
            t[::3] = -100
        _blockpool.set_block_workers(False)
        try:
            off = _rowblock_call(z, t, inplace)
        finally:
            _blockpool.set_block_workers(True)
        on = _rowblock_call(z, t, inplace)
        for a, b in zip(off, on, strict=True):
            assert torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0)), (n, c)
        zd = z.double().requires_grad_()
        ref = F.cross_entropy(zd, t)
        ref.backward()
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(on[0].double(), ref.detach(), rtol=tol, atol=tol,
                                   equal_nan=True)
        torch.testing.assert_close(on[1].double(), zd.grad, rtol=tol, atol=tol / max(c, 1))


@pytest.mark.timeout(300)  # the first call per dtype may compile (5-25 s, once a machine)
@pytest.mark.skipif(not _inductor.available(), reason="no C++ compiler")
@pytest.mark.parametrize("inplace", [False, True], ids=["copy", "inplace"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_compiled_kernel_matches_float64_torch(workers, dtype, inplace):
    """The compiled kernel's direct calls share blocks with the caller too: torch's float64
    values (one rounding to the dtype) for row counts around the per-thread split."""
    previous = xt.set_compiled_kernel(True)
    try:
        for n, c in [(2, 7), (3, 1000), (63, 1000), (64, 32001), (65, 7), (1000, 1000)]:
            g = torch.Generator().manual_seed(n + c)
            z = (torch.randn(n, c, generator=g) * 3).to(dtype)
            t = torch.randint(0, c, (n,), generator=g)
            loss, grad = _rowblock_call(z, t, inplace)
            zd = z.double().requires_grad_()
            ref = F.cross_entropy(zd, t)
            ref.backward()
            rel = 2.0 ** -7 if dtype == torch.bfloat16 else 1e-5
            torch.testing.assert_close(loss.double(), ref.detach(), rtol=rel, atol=0)
            torch.testing.assert_close(grad.double(), zd.grad, rtol=rel,
                                       atol=rel / c)
    finally:
        xt.set_compiled_kernel(previous)


@pytest.mark.parametrize("opts", [dict(), dict(label_smoothing=0.1, softcap=5.0, z_loss=1e-3)],
                         ids=["plain", "smooth_cap_z"])
def test_vocab_parallel_local_work_bits_equal_the_workers_off_kernel(workers, monkeypatch,
                                                                     opts):
    """The vocab-parallel local work (single process: no group) through the pool, caller
    included: the bits of the workers-off run, and torch's float64 values."""
    from crossent.torch.distributed import _local, vocab_parallel_cross_entropy

    _warm()
    monkeypatch.setattr(_local, "block_rows", lambda cols: 7)
    g = torch.Generator().manual_seed(21)
    z = torch.randn(65, 300, generator=g) * 3
    t = torch.randint(0, 300, (65,), generator=g)
    t[::4] = -100

    def run():
        a = z.clone().requires_grad_()
        loss = vocab_parallel_cross_entropy(a, t, backend="rowblock", **opts)
        loss.backward()
        return loss.detach(), a.grad

    _blockpool.set_block_workers(False)
    try:
        off = run()
    finally:
        _blockpool.set_block_workers(True)
    on = run()
    assert torch.equal(off[0], on[0]) and torch.equal(off[1], on[1])
    zd = z.double().requires_grad_()
    zz = zd if "softcap" not in opts else 5.0 * torch.tanh(zd / 5.0)
    per_row = F.cross_entropy(zz, t, reduction="none",
                              label_smoothing=opts.get("label_smoothing", 0.0))
    if "z_loss" in opts:
        per_row = per_row + 1e-3 * torch.logsumexp(zz, 1).square() * (t != -100)
    ref = per_row.sum() / (t != -100).sum()
    ref.backward()
    torch.testing.assert_close(on[0].double(), ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(on[1].double(), zd.grad, rtol=1e-4, atol=1e-7)
