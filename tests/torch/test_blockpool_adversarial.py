"""Adversarial tests of the row-block kernel's worker threads (issue 16): torch's numbers
(float64 references) and the bits of the kernel with workers off, for every option, dtype,
layout and shape class; concurrent callers, thread-count changes, DataLoader workers (fork
and spawn), inference mode, autocast, the linear head; every multi-thread/process test
under a timeout so that a hang fails."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch
import torch.nn.functional as F

import crossent.torch as xt
from crossent.torch import _blockpool, _rowblock

pytestmark = [
    pytest.mark.skipif(not _blockpool.workers_enabled(),
                       reason="torch without the OpenMP backend: blocks run inline"),
    pytest.mark.timeout(120),
]



@pytest.fixture
def small_blocks(workers, monkeypatch):
    """16-row blocks at the public entries: small inputs still go through the pool."""
    monkeypatch.setattr(_rowblock, "block_rows", lambda num_classes, device="cpu": 16)


def _both(fn):
    """``fn()`` with workers off, then on."""
    _blockpool.set_block_workers(False)
    try:
        off = fn()
    finally:
        _blockpool.set_block_workers(True)
    return off, fn()


def _same(a, b):
    if isinstance(a, (tuple, list)):
        for x, y in zip(a, b, strict=True):
            _same(x, y)
    elif a is None:
        assert b is None
    else:
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a.nan_to_num(7.0, 8.0, 9.0), b.nan_to_num(7.0, 8.0, 9.0))
        assert torch.equal(a.isnan(), b.isnan())


def _tol(dtype):
    return {torch.float64: (1e-10, 1e-12), torch.float32: (2e-5, 2e-6),
            torch.bfloat16: (2e-2, 2e-2), torch.float16: (4e-3, 4e-3)}[dtype]


def _inputs(n, c, dtype, prob, seed=0, ignore=True):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(n, c, generator=g, dtype=torch.float64) * 3).to(dtype)
    if prob:
        t = torch.softmax(torch.randn(n, c, generator=g, dtype=torch.float64) * 2, 1)
        t = t.to(dtype if dtype != torch.float16 else torch.float32).to(dtype)
    else:
        t = torch.randint(0, c, (n,), generator=g)
        if ignore and n:
            t[::5] = -100
    return z, t


def _reference(z, t, weight=None, reduction="mean", label_smoothing=0.0, softcap=None,
               num_items=None, z_loss=0.0):
    """float64 torch: F.cross_entropy of the (softcapped) logits, num_items dividing the sum,
    z_loss (no weight) as z_loss * logsumexp^2 per counted row."""
    zd = z.detach().double().requires_grad_()
    zz = zd if softcap is None else softcap * torch.tanh(zd / softcap)
    wd = None if weight is None else weight.double()
    td = t.double() if t.is_floating_point() else t
    red = "sum" if num_items is not None else reduction
    per_row = F.cross_entropy(zz, td, wd, reduction="none", label_smoothing=label_smoothing)
    if z_loss:
        lse = torch.logsumexp(zz, 1)
        counted = torch.ones_like(lse) if t.is_floating_point() else (t != -100).double()
        per_row = per_row + z_loss * lse.square() * counted
    if red == "none":
        out = per_row
    elif red == "sum":
        out = per_row.sum()
    elif t.is_floating_point():
        out = per_row.sum() / z.shape[0]
    else:
        valid = t != -100
        w_y = (torch.ones(z.shape[1], dtype=torch.float64) if wd is None
               else wd)[t.clamp(min=0)] * valid
        out = per_row.sum() / w_y.sum()
    if num_items is not None:
        out = out / num_items
    (out.sum() if red == "none" else out).backward()
    return out.detach(), zd.grad


OPTIONS = [
    dict(),
    dict(weight=True),
    dict(label_smoothing=0.15),
    dict(label_smoothing=0.1, weight=True),
    dict(softcap=4.0),
    dict(z_loss=1e-2),
    dict(num_items=37),
]


def _call(z, t, opt, reduction, dtype, inplace=False, backend="rowblock"):
    opt = dict(opt)
    weight = None
    if opt.pop("weight", False):
        weight = (torch.linspace(0.5, 2.0, z.shape[1], dtype=torch.float64)).to(dtype)
    if "num_items" in opt and reduction == "none":
        reduction = "sum"
    a = z.detach().clone().requires_grad_()
    loss = xt.cross_entropy(a if not inplace else a * 1, t, weight, reduction=reduction,
                            backend=backend, inplace_backward=inplace, **opt)
    loss.sum().backward()
    return loss.detach(), a.grad, weight, reduction, opt


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("prob", [False, True], ids=["index", "prob"])
@pytest.mark.parametrize("opt", OPTIONS, ids=lambda o: ",".join(o) or "plain")
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_every_option_is_torchs_and_the_bits_of_one_thread(small_blocks, dtype, prob, opt,
                                                          reduction):
    z, t = _inputs(83, 29, dtype, prob, seed=len(opt))
    z[4, 7] = float("-inf")
    if not prob:
        z[6, t[6]] = -1e4  # the target probability underflows
    off, on = _both(lambda: _call(z, t, opt, reduction, dtype))
    _same(off[:2], on[:2])
    loss, grad, weight, reduction, rest = on
    want, want_grad = _reference(z, t, weight, reduction, **rest)
    rtol, atol = _tol(dtype)
    scale = 1.0 if reduction != "mean" and "num_items" not in rest else 1.0 / 83
    torch.testing.assert_close(loss.double(), want, rtol=rtol, atol=atol * 30)
    torch.testing.assert_close(grad.double(), want_grad, rtol=rtol, atol=atol * scale * 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("layout", ["transposed", "strided", "inplace"])
def test_views_and_inplace_backward(small_blocks, dtype, layout):
    g = torch.Generator().manual_seed(1)
    base = (torch.randn(61, 70, generator=g) * 3).to(dtype)
    z = {"transposed": base.t(), "strided": base[:, ::2], "inplace": base[:35]}[layout]
    t = torch.randint(0, z.shape[1], (z.shape[0],), generator=g)
    t[3] = -100
    off, on = _both(lambda: _call(z, t, {}, "mean", dtype, inplace=layout == "inplace"))
    _same(off[:2], on[:2])
    want, want_grad = _reference(z, t)
    rtol, atol = _tol(dtype)
    torch.testing.assert_close(on[0].double(), want, rtol=rtol, atol=atol)
    torch.testing.assert_close(on[1].double(), want_grad, rtol=rtol, atol=atol / 10)


@pytest.mark.parametrize("shape", [(3, 100003), (10000, 2), (0, 50), (1, 1), (17, 1)])
def test_shape_extremes_default_blocks(workers, shape):
    n, c = shape
    z, t = _inputs(n, c, torch.float32, False, seed=2)
    for reduction in ("mean", "sum", "none"):
        off, on = _both(lambda r=reduction: _call(z, t, {}, r, torch.float32))
        _same(off[:2], on[:2])
        want, want_grad = _reference(z, t, reduction=reduction)
        torch.testing.assert_close(on[0].double(), want, rtol=2e-5, atol=2e-6, equal_nan=True)
        torch.testing.assert_close(on[1].double(), want_grad, rtol=2e-5, atol=1e-6,
                                   equal_nan=True)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_all_rows_ignored(small_blocks, reduction):
    z = torch.randn(50, 9)
    t = torch.full((50,), -100)
    off, on = _both(lambda: _call(z, t, {}, reduction, torch.float32))
    _same(off[:2], on[:2])
    want = F.cross_entropy(z.double(), t, reduction=reduction)  # mean: NaN, sum: 0
    torch.testing.assert_close(on[0].double(), want, equal_nan=True)
    assert bool((on[1] == 0).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("prob", [False, True], ids=["index", "prob"])
def test_nan_and_inf_stay_in_their_rows(small_blocks, dtype, prob):
    z, t = _inputs(70, 13, dtype, prob, seed=5, ignore=False)
    z[10, 2] = float("nan")
    z[40, 0] = float("inf")
    z[41, :] = float("-inf")
    z[55, 5] = float("-inf")
    if not prob:
        t[55] = 5  # -inf at the target: loss +inf, torch's too
    off, on = _both(lambda: _call(z, t, {}, "none", dtype))
    _same(off[:2], on[:2])
    want, _ = _reference(z, t, reduction="none")
    rtol, atol = _tol(dtype)
    torch.testing.assert_close(on[0].double(), want, rtol=rtol, atol=atol, equal_nan=True)
    bad = {10, 40, 41} | ({55} if not prob else set())
    for row in range(70):
        finite = bool(torch.isfinite(on[1][row]).all())
        assert finite == (row not in bad) or row == 55, row
    assert bool(torch.isfinite(on[0][[r for r in range(70) if r not in bad | {55}]]).all())


def test_statistics_see_the_same_blocks(small_blocks):
    z, t = _inputs(90, 31, torch.float32, False, seed=9)

    def run():
        loss, stats = xt.cross_entropy(z, t, backend="rowblock", reduction="none",
                                       statistics=("entropy", "lse"))
        return (loss, *(getattr(stats, name) for name in ("entropy", "lse")))

    off, on = _both(run)
    _same(off, on)
    valid = t != -100
    torch.testing.assert_close(on[2][valid].double(), torch.logsumexp(z.double(), 1)[valid])


# ---- threads and processes


def _run_threads(targets, timeout=60):
    errors: list = []

    def guard(fn):
        def run():
            try:
                fn()
            except BaseException as e:  # pragma: no cover - reported below
                errors.append(e)
        return run

    threads = [threading.Thread(target=guard(fn), daemon=True) for fn in targets]
    for th in threads:
        th.start()
    deadline = time.monotonic() + timeout
    for th in threads:
        th.join(max(0.0, deadline - time.monotonic()))
    assert not any(th.is_alive() for th in threads), "a caller hung"
    assert not errors, errors


def test_many_concurrent_callers_with_different_shapes_and_dtypes(small_blocks):
    cases = []
    for k, (n, c, dtype, prob) in enumerate([(150, 40, torch.float32, False),
                                             (90, 77, torch.bfloat16, False),
                                             (64, 33, torch.float64, True),
                                             (200, 5, torch.float32, True),
                                             (33, 300, torch.float16, False),
                                             (120, 64, torch.float32, False)]):
        z, t = _inputs(n, c, dtype, prob, seed=10 + k)
        _blockpool.set_block_workers(False)
        want = _call(z, t, {"label_smoothing": 0.05 * (k % 2)}, "none", dtype)[:2]
        _blockpool.set_block_workers(True)
        cases.append((z, t, k, dtype, want))

    def caller(z, t, k, dtype, want):
        def run():
            for _ in range(4):
                got = _call(z, t, {"label_smoothing": 0.05 * (k % 2)}, "none", dtype)[:2]
                _same(want, got)
        return run

    _run_threads([caller(*case) for case in cases])


def test_thread_counts_changing_between_calls(small_blocks):
    z, t = _inputs(100, 50, torch.float32, False, seed=3)
    _blockpool.set_block_workers(False)
    want = _call(z, t, {}, "none", torch.float32)[:2]
    _blockpool.set_block_workers(True)
    for n in (1, 3, 2, 3, 1, 2):
        torch.set_num_threads(n)
        _same(want, _call(z, t, {}, "none", torch.float32)[:2])
        assert torch.get_num_threads() == n
        seen: list = []
        fresh = threading.Thread(target=lambda out=seen: out.append(torch.get_num_threads()))
        fresh.start()
        fresh.join(10)
        assert seen == [n]
    deadline = time.monotonic() + 10  # the replaced pools' threads have exited
    while time.monotonic() < deadline:
        names = [th.name for th in threading.enumerate() if th.name == "crossent-rowblock"]
        if len(names) <= torch.get_num_threads():
            break
        time.sleep(0.01)
    assert len(names) <= torch.get_num_threads()


def test_main_thread_count_and_new_threads_keep_their_count(small_blocks):
    before = torch.get_num_threads()
    xt.cross_entropy(torch.randn(64, 50), torch.randint(0, 50, (64,)), backend="rowblock")
    assert torch.get_num_threads() == before
    seen: list = []
    fresh = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    fresh.start()
    fresh.join(10)
    assert seen == [before]


def test_a_rebuild_leaves_the_global_default_alone(small_blocks):
    torch.set_num_threads(2)
    z, t = torch.randn(64, 50), torch.randint(0, 50, (64,))

    def other():  # another thread sets 3 (torch: for itself and as the global default)
        torch.set_num_threads(3)
        xt.cross_entropy(z, t, backend="rowblock")

    _run_threads([other])
    seen: list = []
    probe = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    probe.start()
    probe.join(10)
    assert seen == [3]
    xt.cross_entropy(z, t, backend="rowblock")  # main thread (2): the pool is rebuilt
    assert torch.get_num_threads() == 2
    seen.clear()
    probe = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    probe.start()
    probe.join(10)
    assert seen == [3]  # got 2: the rebuild "restored" the caller's count as the default


def test_a_rebuild_by_another_thread_does_not_strand_a_caller(workers):
    """Caller A (2 threads) is running a job when caller B (3 threads) needs a pool of
    another size: A's pool must not be stopped under it (it is retired and stopped by A
    afterwards), and both jobs complete."""
    torch.set_num_threads(2)
    inside, b_done = threading.Event(), threading.Event()
    out = torch.zeros(6)

    def fill(i, j):
        inside.set()
        b_done.wait(10)  # A's job is still running while B replaces the pool
        out[i:j] = 1.0

    def a():
        _blockpool.run_blocks(fill, [(0, 2), (2, 4), (4, 6)])

    other = torch.zeros(4)

    def b():
        inside.wait(10)
        torch.set_num_threads(3)

        def mark(i, j):
            other[i:j] = 1.0

        _blockpool.run_blocks(mark, [(0, 2), (2, 4)])
        b_done.set()

    ta = threading.Thread(target=a, name="A", daemon=True)
    tb = threading.Thread(target=b, name="B", daemon=True)
    ta.start()
    tb.start()
    tb.join(15)
    ta.join(15)
    assert not ta.is_alive() and not tb.is_alive(), "a caller hangs"
    assert bool((out == 1).all()) and bool((other == 1).all())
    pool = _blockpool._pool
    assert pool is not None and pool.size == 3 and not pool.busy.locked()


def test_sigint_in_the_caller_waits_for_the_workers(workers):
    """^C while the workers run: KeyboardInterrupt in the caller, no block written after."""
    torch.randn(1000, 1000).exp_()  # the main thread has run a parallel region
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals go to the main thread")
    written: list = []
    main = threading.main_thread().ident

    def block(i, j):
        if i == 0:  # ^C as the kernel delivers it to a sleeping main thread
            signal.pthread_kill(main, signal.SIGINT)
        time.sleep(0.01)
        written.append(i)

    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            _blockpool.run_blocks(block, [(i, i + 1) for i in range(100)])
            time.sleep(1.0)  # the signal may arrive just after the call
    finally:
        signal.signal(signal.SIGINT, old)
    count = len(written)
    time.sleep(0.1)
    # the workers stopped before the caller raised (how soon varies: after a parallel torch
    # operation in the main thread the signal may only be seen once every block is done)
    assert len(written) == count
    out = torch.zeros(4)
    _blockpool.run_blocks(lambda i, j: out.__setitem__(slice(i, j), 1.0), [(0, 2), (2, 4)])
    assert bool((out == 1).all())  # the pool still works


def test_inference_mode_and_inference_tensors(small_blocks):
    z, t = _inputs(80, 20, torch.float32, False, seed=4)
    want = F.cross_entropy(z.double(), t, reduction="none")
    with torch.inference_mode():
        zi = z.clone()
        off, on = _both(lambda: xt.cross_entropy(zi, t, backend="rowblock", reduction="none"))
    _same(off, on)
    torch.testing.assert_close(on.double(), want, rtol=2e-5, atol=2e-6)
    # an inference tensor used outside inference mode (no grad needed): read only
    off, on = _both(lambda: xt.cross_entropy(zi, t, backend="rowblock", reduction="none"))
    _same(off, on)
    torch.testing.assert_close(on.double(), want, rtol=2e-5, atol=2e-6)


def test_autocast_bfloat16(small_blocks):
    g = torch.Generator().manual_seed(8)
    x, w = torch.randn(70, 16, generator=g), torch.randn(40, 16, generator=g)
    t = torch.randint(0, 40, (70,), generator=g)

    def run():
        xa = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = xa @ w.t()
            loss = xt.cross_entropy(logits, t, backend="rowblock")
            ref = F.cross_entropy(logits.float().detach(), t)
        loss.backward()
        return loss.detach(), xa.grad, ref

    off, on = _both(run)
    _same(off[:2], on[:2])
    assert on[0].dtype == torch.float32  # autocast runs cross_entropy in float32
    torch.testing.assert_close(on[0], on[2], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reduction", ["none", "sum"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_head_options_bitwise(small_blocks, reduction, dtype):
    g = torch.Generator().manual_seed(13)
    x = torch.randn(200, 24, generator=g).to(dtype)
    w = (torch.randn(129, 24, generator=g) / 4).to(dtype)
    t = torch.randint(0, 129, (200,), generator=g)
    t[::7] = -100
    upstream = torch.rand(200, generator=g).to(dtype)

    def run():
        xa, wa = x.clone().requires_grad_(), w.clone().requires_grad_()
        loss = xt.linear_cross_entropy(xa, wa, t, ignore_index=-100, chunk_size=32,
                                       z_loss=1e-3, softcap=6.0, reduction=reduction)
        (loss * upstream).sum().backward() if reduction == "none" else loss.backward()
        return loss.detach(), xa.grad, wa.grad

    _same(*_both(run))


@pytest.mark.parametrize("autocast", [False, True])
def test_linear_head(small_blocks, autocast):
    g = torch.Generator().manual_seed(6)
    x, w = torch.randn(300, 32, generator=g), torch.randn(257, 32, generator=g) / 4
    t = torch.randint(0, 257, (300,), generator=g)
    t[::9] = -100

    def run():
        xa, wa = x.clone().requires_grad_(), w.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = xt.linear_cross_entropy(xa, wa, t, ignore_index=-100, chunk_size=64,
                                           label_smoothing=0.1)
        loss.backward()
        return loss.detach(), xa.grad, wa.grad

    off, on = _both(run)
    _same(off, on)
    if not autocast:
        xd, wd = x.double().requires_grad_(), w.double().requires_grad_()
        ref = F.cross_entropy(xd @ wd.t(), t, label_smoothing=0.1)
        ref.backward()
        torch.testing.assert_close(on[0].double(), ref.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(on[1].double(), xd.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(on[2].double(), wd.grad, rtol=1e-4, atol=1e-6)


_DATALOADER_SCRIPT = textwrap.dedent("""
    import functools
    import torch
    import torch.nn.functional as F
    import crossent.torch as xt
    from crossent.torch import _rowblock

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return 4
        def __getitem__(self, k):
            _rowblock.block_rows = lambda c, device="cpu": 16  # the pool's path in the worker
            g = torch.Generator().manual_seed(k)
            z = torch.randn(100, 30, generator=g, dtype=torch.float64)
            t = torch.randint(0, 30, (100,), generator=g)
            got = xt.cross_entropy(z, t, backend="rowblock", reduction="none")
            want = F.cross_entropy(z, t, reduction="none")
            return float((got - want).abs().max()), torch.get_num_threads()

    def threads(method, _):
        if method == "spawn":
            torch.set_num_threads(2)  # a fresh process: the pool runs with 2 workers

    if __name__ == "__main__":
        _rowblock.block_rows = lambda c, device="cpu": 16
        torch.set_num_threads(2)
        xt.cross_entropy(torch.randn(100, 30), torch.randint(0, 30, (100,)),
                         backend="rowblock")  # the parent's pool exists before the fork
        for method in ("fork", "spawn"):
            loader = torch.utils.data.DataLoader(
                Data(), batch_size=None, num_workers=2, multiprocessing_context=method,
                worker_init_fn=functools.partial(threads, method), timeout=60)
            results = list(loader)
            assert len(results) == 4, results
            assert max(r[0] for r in results) < 1e-13, results
            if method == "spawn":
                assert all(r[1] == 2 for r in results), results
            print("ok", method, results)
""")


def test_dataloader_workers_fork_and_spawn(tmp_path):
    """num_workers=2 each; forked workers run torch's one thread (inline blocks), spawned
    ones are set to two threads (the pool in the worker)."""
    script = tmp_path / "loader.py"
    script.write_text(_DATALOADER_SCRIPT)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=90)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ok fork" in done.stdout and "ok spawn" in done.stdout


# ---- thread-local state and interrupts at the edges of a call


def test_a_dispatch_mode_sees_every_operation(small_blocks):
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops += 1
            return func(*args, **(kwargs or {}))

    z, t = _inputs(100, 20, torch.float32, False, seed=12)

    def run():
        with Count() as mode:
            loss = xt.cross_entropy(z, t, backend="rowblock")
        return loss, mode.ops

    (want, ops_inline), (got, ops_workers) = _both(run)
    _same(want, got)
    assert ops_workers == ops_inline  # got 47 of 162: the workers' operations bypass the mode


def test_an_interrupt_while_handing_out_the_job_waits_for_the_writers(workers):
    pool = _blockpool._acquire_pool(torch.get_num_threads())
    assert pool is not None
    _blockpool._release_pool(pool)
    real = list(pool.inboxes)

    class Interrupted:  # ^C arrives just after the first worker got the job
        def __init__(self, inbox):
            self.inbox = inbox

        def put(self, item):
            self.inbox.put(item)
            if item is not None:
                raise KeyboardInterrupt

    written: list = []

    def block(i, j):
        time.sleep(0.005)
        written.append(i)

    pool.inboxes[0] = Interrupted(real[0])
    try:
        with pytest.raises(KeyboardInterrupt):
            _blockpool.run_blocks(block, [(i, i + 1) for i in range(60)])
    finally:
        pool.inboxes[:] = real
    count = len(written)
    time.sleep(0.5)
    # the caller had its exception while a worker went on writing
    assert len(written) == count


def test_the_workers_do_not_keep_the_callers_tensors_alive(small_blocks):
    import gc
    import weakref

    t = torch.randint(0, 50, (100,))
    for workers_on in (False, True):
        _blockpool.set_block_workers(workers_on)
        z = torch.randn(100, 50)
        xt.cross_entropy(z, t, backend="rowblock", reduction="none")
        alive = weakref.ref(z)
        del z
        gc.collect()
        assert alive() is None, f"workers {'on' if workers_on else 'off'}: logits still alive"


def test_a_thread_started_while_the_pool_is_built_keeps_the_default(workers, monkeypatch):
    real_serve = _blockpool._Pool._serve
    seen: list = []

    class Started:  # the workers' start barrier, with another thread of the program starting
        def __init__(self, barrier):
            self.barrier = barrier

        def wait(self):
            probe = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
            probe.start()
            probe.join(10)
            return self.barrier.wait()

    def serve(inbox, started, *rest):
        return real_serve(inbox, Started(started), *rest)

    monkeypatch.setattr(_blockpool._Pool, "_serve", staticmethod(serve))
    torch.set_num_threads(3)
    _blockpool._release_pool(_blockpool._acquire_pool(3))  # as run_blocks at 3 threads
    monkeypatch.undo()
    torch.set_num_threads(2)
    _blockpool._release_pool(_blockpool._acquire_pool(2))
    assert seen and all(n == 3 for n in seen), seen  # got 1 in threads started meanwhile
