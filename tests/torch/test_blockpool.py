"""The row-block kernel's worker threads (issue 16): the same bits as one thread, torch's
thread settings left as they were, errors raised in the caller, fork, inference mode and
concurrent callers."""

from __future__ import annotations

import multiprocessing as mp
import threading

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
