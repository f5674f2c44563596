"""The row-block kernel's worker threads (issue 16): the same bits as one thread, torch's
thread settings left as they were, errors raised in the caller, fork, inference mode and
concurrent callers."""

from __future__ import annotations

import multiprocessing as mp
import threading
import time

import pytest
import torch
import torch.nn.functional as F

import crossent.torch as xt
from crossent.torch import _blockpool
from crossent.torch._rowblock import cross_entropy_rows
from crossent.torch._rules import Options, compute_dtype, prepare_rows

pytestmark = pytest.mark.skipif(not _blockpool.workers_enabled(),
                                reason="torch without the OpenMP backend: blocks run inline")



def _kernel(z, t, opts, block, grad=True):
    rows = prepare_rows(t, *z.shape, opts, compute_dtype(z.dtype))
    g = torch.empty_like(z) if grad else None
    losses = cross_entropy_rows(z, t, rows, opts, g, block=block)
    return losses, g


CASES = [
    dict(),
    dict(label_smoothing=0.1),
    dict(z_loss=1e-3),
    dict(softcap=5.0),
    dict(label_smoothing=0.2, weight=True),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("prob", [False, True])
@pytest.mark.parametrize("case", CASES, ids=lambda c: ",".join(c) or "plain")
def test_workers_give_the_bits_of_one_thread(workers, dtype, prob, case):
    g = torch.Generator().manual_seed(7)
    n, c = 203, 97  # ragged: the last block is short
    z = (torch.randn(n, c, generator=g) * 4).to(dtype)
    z[5, 3] = float("-inf")
    z[9, :] = -1e4  # p_y may underflow: the lazy-max repair runs inside a worker
    if prob:
        t = torch.softmax(torch.randn(n, c, generator=g), 1).to(dtype)
    else:
        t = torch.randint(0, c, (n,), generator=g)
        t[::11] = -100
    weight = torch.rand(c, generator=g, dtype=torch.float32) + 0.5 if case.get("weight") else None
    opts = Options(weight, -100, case.get("label_smoothing", 0.0), case.get("z_loss", 0.0),
                   case.get("softcap"), "mean")
    _blockpool.set_block_workers(False)
    want_loss, want_grad = _kernel(z, t, opts, block=16)
    _blockpool.set_block_workers(True)
    got_loss, got_grad = _kernel(z, t, opts, block=16)
    assert torch.equal(got_loss, want_loss) or torch.allclose(got_loss, want_loss, equal_nan=True,
                                                              rtol=0, atol=0)
    assert torch.equal(got_grad, want_grad)


def test_public_entry_matches_torch_with_many_blocks(workers):
    """Enough rows for several default blocks: values and gradients are torch's."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(600, 4096, generator=g, dtype=torch.float64)
    t = torch.randint(0, 4096, (600,), generator=g)
    t[::7] = -100
    a, b = z.clone().requires_grad_(), z.clone().requires_grad_()
    loss = xt.cross_entropy(a, t, backend="rowblock")
    ref = F.cross_entropy(b, t)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-13, atol=0)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-17)


def test_thread_settings_are_left_as_they_were(workers):
    before = torch.get_num_threads()
    _kernel(torch.randn(64, 50), torch.randint(0, 50, (64,)),
            Options(None, -100, 0.0, 0.0, None, "mean"), block=16)
    assert torch.get_num_threads() == before
    seen = []
    fresh = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    fresh.start()
    fresh.join()
    assert seen == [before]  # a thread created afterwards gets torch's default, not 1


def test_a_new_thread_count_rebuilds_the_pool(workers):
    z, t = torch.randn(64, 50), torch.randint(0, 50, (64,))
    opts = Options(None, -100, 0.0, 0.0, None, "mean")
    want = _kernel(z, t, opts, block=64)[1]
    torch.set_num_threads(3)
    got = _kernel(z, t, opts, block=16)[1]
    assert _blockpool._pool is not None and _blockpool._pool.size == 3
    assert torch.get_num_threads() == 3
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_an_error_in_a_block_is_raised_in_the_caller_and_the_pool_survives(workers):
    done = []

    def block(i, j):
        if i == 32:
            raise ZeroDivisionError("block 32")
        done.append(i)

    with pytest.raises(ZeroDivisionError, match="block 32"):
        _blockpool.run_blocks(block, [(i, i + 16) for i in range(0, 160, 16)])
    out = torch.zeros(8)

    def fill(i, j):
        out[i:j] = 1.0

    _blockpool.run_blocks(fill, [(i, i + 2) for i in range(0, 8, 2)])
    assert bool((out == 1).all())


def test_keyboard_interrupt_in_a_worker_reaches_the_caller(workers):
    def block(i, j):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _blockpool.run_blocks(block, [(0, 1), (1, 2), (2, 3)])


def test_workers_run_under_no_grad_and_in_the_callers_inference_mode(workers):
    z = torch.randn(100, 40, requires_grad=True)
    t = torch.randint(0, 40, (100,))
    with torch.inference_mode():
        zi = torch.randn(100, 40)
        got = xt.cross_entropy(zi, t, backend="rowblock")
        want = F.cross_entropy(zi, t)
    torch.testing.assert_close(got, want)
    opts = Options(None, -100, 0.0, 0.0, None, "mean")
    losses, _ = _kernel(z, t, opts, block=16, grad=False)
    assert not losses.requires_grad


def test_concurrent_callers_get_their_own_numbers(workers):
    g = torch.Generator().manual_seed(3)
    inputs = [(torch.randn(300, 200, generator=g), torch.randint(0, 200, (300,), generator=g))
              for _ in range(4)]
    want = [F.cross_entropy(z, t) for z, t in inputs]
    got: list = [None] * 4
    errors: list = []

    def call(k):
        try:
            for _ in range(5):
                z = inputs[k][0].clone().requires_grad_()
                loss = xt.cross_entropy(z, inputs[k][1], backend="rowblock")
                loss.backward()
            got[k] = loss.detach()
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=call, args=(k,)) for k in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    assert not errors and not any(th.is_alive() for th in threads)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


def _child(queue, z, t, want):
    # A parallel region of torch in a child forked after the parent ran one hangs in GNU
    # OpenMP (torch's own F.cross_entropy does, whatever crossent does), so forked workers
    # run one thread, as torch's DataLoader sets them: the blocks then run inline.
    forgotten = _blockpool._pool is None  # the parent's worker threads did not come along
    torch.set_num_threads(1)
    _, got = _kernel(z, t, Options(None, -100, 0.0, 0.0, None, "mean"), block=16)
    queue.put((float((got - want).abs().max()), forgotten))


def test_a_forked_child_forgets_the_parents_workers(workers):
    _kernel(torch.randn(64, 50), torch.randint(0, 50, (64,)),
            Options(None, -100, 0.0, 0.0, None, "mean"), block=16)
    assert _blockpool._pool is not None  # the parent's workers exist before the fork
    z = torch.randn(300, 500, dtype=torch.float64)
    t = torch.randint(0, 500, (300,))
    b = z.clone().requires_grad_()
    F.cross_entropy(b, t).backward()
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child, args=(queue, z, t, b.grad))
    child.start()
    child.join(timeout=60)
    if child.is_alive():
        child.kill()
        pytest.fail("the forked child hung")
    assert child.exitcode == 0
    error, forgotten = queue.get(timeout=5)
    assert error < 1e-15 and forgotten


@pytest.mark.parametrize("bad", [None, 1, "yes"])
def test_set_block_workers_takes_a_bool(bad):
    from crossent.errors import InputError

    with pytest.raises(InputError, match="enabled"):
        _blockpool.set_block_workers(bad)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("device", ["cpu", "meta"])  # meta: in order, in the caller
@pytest.mark.parametrize(("num_rows", "step", "min_rows", "want"), [
    (7, 3, 1, [(0, 3), (3, 6), (6, 7)]),
    (7, 3, 2, [(0, 3), (3, 7)]),  # a last row alone joins the block before
    (8, 3, 2, [(0, 3), (3, 6), (6, 8)]),
    (9, 3, 3, [(0, 3), (3, 6), (6, 9)]),
    (1, 2, 2, [(0, 1)]),  # one block: nothing to join
    (0, 2, 2, []),
])
def test_row_blocks_of_step_rows_and_a_short_last_one_joined(workers, device, num_rows,
                                                              step, min_rows, want):
    seen: list = []
    _blockpool.run_row_blocks(lambda i, j: seen.append((i, j)), num_rows, step,
                              torch.device(device), min_rows=min_rows)
    assert (sorted(seen) if device == "cpu" else seen) == want


# ---- the calling thread runs blocks too (one OpenMP thread, no_grad, as a worker)


def _record(seen, pause=0.005):
    """A block that records who ran it and the thread's settings inside it."""
    def block(i, j):
        seen.append((threading.get_ident(), torch.get_num_threads(), torch.is_grad_enabled(),
                     torch.is_inference_mode_enabled(), torch.is_autocast_enabled("cpu")))
        time.sleep(pause)  # releases the GIL: the workers take blocks meanwhile
    return block


@pytest.mark.timeout(30)
@pytest.mark.parametrize("inference", [False, True])
def test_the_caller_runs_blocks_as_a_worker_does(workers, inference):
    before = torch.get_num_threads()
    seen: list = []
    cast = torch.autocast("cpu", dtype=torch.bfloat16)
    with torch.inference_mode(inference), cast:
        _blockpool.run_blocks(_record(seen), [(i, i + 1) for i in range(8)])
        assert torch.is_autocast_enabled("cpu")  # the caller's settings are put back
        assert torch.is_grad_enabled() == (not inference)
    assert len(seen) == 8
    assert threading.get_ident() in {s[0] for s in seen}  # the caller took blocks
    assert {s[1:] for s in seen} == {(1, False, inference, False)}  # as every worker
    assert torch.get_num_threads() == before
    pool = _blockpool._pool
    assert pool is not None and pool.caller_works and len(pool.inboxes) == before - 1


@pytest.mark.timeout(30)
@pytest.mark.parametrize("error", [ZeroDivisionError, KeyboardInterrupt])
def test_an_error_in_the_callers_block_waits_for_the_workers_and_restores_it(workers, error):
    """An exception (or ^C) in the caller's own block: no block is handed out any more,
    the worker inside one finishes before the caller raises, and the caller's OpenMP
    count and grad mode are put back."""
    before = torch.get_num_threads()
    caller = threading.get_ident()
    entered = threading.Event()
    written: list = []

    def block(i, j):
        if threading.get_ident() == caller:
            entered.wait(5)  # a worker is inside a block now
            raise error("in the caller's block")
        entered.set()
        time.sleep(0.05)
        written.append(i)

    with pytest.raises(error):
        _blockpool.run_blocks(block, [(i, i + 1) for i in range(40)])
    count = len(written)
    assert count >= 1  # the worker's block finished before the caller raised
    time.sleep(0.15)
    assert len(written) == count < 39  # nothing written after; the rest never handed out
    assert torch.get_num_threads() == before and torch.is_grad_enabled()
    seen: list = []
    fresh = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    fresh.start()
    fresh.join(10)
    assert seen == [before]  # the global default too
    out = torch.zeros(8)
    _blockpool.run_blocks(lambda i, j: out.__setitem__(slice(i, j), 1.0),
                          [(i, i + 2) for i in range(0, 8, 2)])
    assert bool((out == 1).all())  # the pool still works


def test_every_block_is_single_threaded_also_in_the_caller(workers):
    """Sums of 65536 floats: torch splits them over two threads with other bits, so a
    block run with the caller's own thread count would differ from the one-thread sums."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(24, 1 << 16, generator=g)
    want: list = []

    def one_thread():
        torch.get_num_threads()  # torch's per-thread initialisation first (it sets 2)
        _blockpool._omp_set_num_threads()(1)  # this new thread only
        want.append(torch.stack([row.sum() for row in x]))

    probe = threading.Thread(target=one_thread)
    probe.start()
    probe.join(30)
    two = torch.stack([row.sum() for row in x])
    assert not torch.equal(two, want[0]), "the sums do not depend on threads: no check"
    out = torch.empty(24)
    who: list = []

    def block(i, j):
        who.append(threading.get_ident())
        for k in range(i, j):
            torch.sum(x[k], 0, out=out[k])

    _blockpool.run_blocks(block, [(i, i + 1) for i in range(24)])
    assert threading.get_ident() in who
    assert torch.equal(out, want[0])


@pytest.fixture
def own_pool(workers):
    """A pool built in the test (stopped afterwards); the module's pool put back."""
    with _blockpool._pool_lock:
        saved, _blockpool._pool = _blockpool._pool, None
    yield
    with _blockpool._pool_lock:
        if _blockpool._pool is not None:
            _blockpool._pool.stop()
        _blockpool._pool = saved


@pytest.mark.timeout(30)
@pytest.mark.parametrize("how", ["no setter", "setter of another runtime"])
def test_without_a_per_thread_setter_the_caller_only_waits(own_pool, monkeypatch, how):
    """Where workers fall back to torch.set_num_threads(1) (which sets the global default),
    the caller must not: it runs no block, ``threads`` workers do, every count is kept."""
    if how == "no setter":
        monkeypatch.setattr(_blockpool, "_omp_set_num_threads", lambda: None)
    else:
        monkeypatch.setattr(_blockpool, "_one_openmp_thread", lambda: False)
    torch.set_num_threads(2)
    seen: list = []
    _blockpool.run_blocks(_record(seen), [(i, i + 1) for i in range(6)])
    assert len(seen) == 6 and threading.get_ident() not in {s[0] for s in seen}
    assert {s[1:3] for s in seen} == {(1, False)}
    pool = _blockpool._pool
    assert pool is not None and not pool.caller_works and len(pool.inboxes) == 2
    assert torch.get_num_threads() == 2
    fresh: list = []
    probe = threading.Thread(target=lambda: fresh.append(torch.get_num_threads()))
    probe.start()
    probe.join(10)
    assert fresh == [2]  # the global default was put back


@pytest.mark.timeout(30)
def test_an_error_in_a_workers_block_stops_the_caller_after_its_current_block(workers):
    caller = threading.get_ident()
    entered = threading.Event()
    ran: list = []

    def block(i, j):
        if threading.get_ident() != caller:
            entered.wait(5)  # the caller is inside a block now
            raise ZeroDivisionError("in a worker's block")
        entered.set()
        time.sleep(0.02)
        ran.append(i)

    with pytest.raises(ZeroDivisionError, match="worker"):
        _blockpool.run_blocks(block, [(i, i + 1) for i in range(40)])
    assert 1 <= len(ran) <= 10  # got 39: the caller took every other block
    assert torch.get_num_threads() >= 2 and torch.is_grad_enabled()


@pytest.mark.timeout(30)
def test_sigint_while_the_caller_waits_for_a_worker(workers):
    """^C once the caller has run out of blocks and waits for a worker inside one: the
    caller raises only after that worker's block is written."""
    import signal

    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals go to the main thread")
    caller = threading.get_ident()
    entered = threading.Event()
    written: list = []

    def block(i, j):
        if threading.get_ident() == caller:
            entered.wait(5)  # returns once a worker is inside a block
            return
        entered.set()
        time.sleep(0.05)  # the caller is waiting by now
        signal.pthread_kill(caller, signal.SIGINT)
        time.sleep(0.1)
        written.append(i)

    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            _blockpool.run_blocks(block, [(0, 1), (1, 2), (2, 3)])
            time.sleep(1.0)  # the signal may arrive just after the call
        assert len(written) == 1  # got 0: the caller raised while the worker wrote
    finally:
        signal.signal(signal.SIGINT, old)
    assert torch.get_num_threads() >= 2
