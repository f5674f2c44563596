"""The CPU gradient-buffer pool never hands out memory someone else can see: shared memory
(torch.multiprocessing pickling, share_memory()), resized or re-pointed storages.

Before the rule, a gradient sent through an ``mp.Queue`` changed in the receiver at the
sender's next step, and Hogwild training with ``share_memory()`` mixed the workers'
gradients. Multi-process tests fork small problems (no OpenMP regions in the children)
and fail on a timeout instead of hanging.
"""

from __future__ import annotations

import io

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from fused_testing import close, pooled_grad

import crossent.torch as xt
from crossent.torch import _buffers

TIMEOUT = 20  # seconds for any child process

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("fresh_pool")]




def _torch_grad(z, y):
    leaf = z.detach().requires_grad_()
    (g,) = torch.autograd.grad(F.cross_entropy(leaf, y), leaf)
    return g


def _pooled_ptrs():
    return {e.storage.data_ptr() for e in _buffers._pool}


def test_shared_gradient_is_never_reused_in_process():
    z, y = torch.randn(16, 7), torch.randint(0, 7, (16,))
    g = pooled_grad(z, y)
    g.share_memory_()  # what mp pickling and Module.share_memory() do, in place
    ptr = g.data_ptr()
    snapshot = g.clone()
    shared = g.untyped_storage()  # as a peer process would still map it
    del g
    other = pooled_grad(z * 3, y)
    assert other.data_ptr() != ptr
    now = torch.empty(0).set_(shared, 0, snapshot.shape, snapshot.stride())
    torch.testing.assert_close(now, snapshot, rtol=0, atol=0)
    assert ptr not in _pooled_ptrs()  # forgotten for good


def test_resized_storage_is_never_reused():
    z, y = torch.randn(16, 7), torch.randint(0, 7, (16,))
    g = pooled_grad(z, y)
    storage = g.untyped_storage()
    storage.resize_(storage.nbytes() * 2)  # no longer the buffer the pool allocated
    del g, storage
    before = len(_buffers._pool)
    pooled_grad(z, y)
    assert all(e.storage.nbytes() == e.nbytes for e in _buffers._pool)
    assert len(_buffers._pool) <= before


def test_pool_still_reuses_private_buffers_after_dropping_shared_ones():
    z, y = torch.randn(16, 7), torch.randint(0, 7, (16,))
    shared = pooled_grad(z, y).share_memory_()
    first = pooled_grad(z, y)
    ptr = first.data_ptr()
    del first
    assert pooled_grad(z, y).data_ptr() == ptr  # the private one is reused as before
    del shared


def test_torch_save_of_a_gradient_loads_torchs_values_after_later_steps():
    z, y = torch.randn(16, 7), torch.randint(0, 7, (16,))
    file = io.BytesIO()
    torch.save(pooled_grad(z, y), file)
    for k in range(3):  # later steps reuse the buffer the saved gradient came from
        pooled_grad(z * (k + 2), y)
    file.seek(0)
    close(torch.load(file), _torch_grad(z, y))


def _receiver(queue, ack, go, result):
    torch.set_num_threads(1)
    received = queue.get(timeout=TIMEOUT)
    snapshot = received.clone()
    ack.put(True)
    go.get(timeout=TIMEOUT)  # the sender has taken more steps meanwhile
    result.put(float((received - snapshot).abs().max()))


def test_gradient_sent_through_mp_queue_is_not_changed_by_the_senders_next_steps():
    ctx = mp.get_context("fork")
    queue, ack, go, result = ctx.Queue(), ctx.Queue(), ctx.Queue(), ctx.Queue()
    child = ctx.Process(target=_receiver, args=(queue, ack, go, result))
    child.start()
    try:
        z, y = torch.randn(32, 9), torch.randint(0, 9, (32,))
        g = pooled_grad(z, y)
        queue.put(g)
        assert ack.get(timeout=TIMEOUT)
        del g  # the sender is done with it: the use count is 1 again
        for k in range(3):
            pooled_grad(z * (k + 2), y)
        go.put(True)
        assert result.get(timeout=TIMEOUT) == 0.0
    finally:
        child.join(TIMEOUT)
        if child.is_alive():
            child.kill()
    assert child.exitcode == 0


def _hogwild_worker(head, x, y, barrier, result):
    """One worker of a shared-parameter loop: drop the gradient, compute a new one,
    wait until every worker has written its own, then compare with torch."""
    torch.set_num_threads(1)  # no OpenMP region in a forked child (it could hang)
    errors = []
    for _ in range(3):
        head.linear.weight.grad = None  # zero_grad(set_to_none=True)
        head(x, y).backward()
        barrier.wait(TIMEOUT)  # every worker has written its gradient
        w = head.linear.weight.detach().clone().requires_grad_()
        F.cross_entropy(x @ w.T, y).backward()
        errors.append(float((head.linear.weight.grad - w.grad).abs().max()
                            / w.grad.abs().max()))
        barrier.wait(TIMEOUT)
    result.put(max(errors))


def test_hogwild_share_memory_workers_get_their_own_gradients():
    ctx = mp.get_context("fork")
    torch.manual_seed(0)
    head = xt.LinearCrossEntropyLoss(8, 40, chunk_size=16)
    xs = [torch.randn(32, 8) * (k + 1) for k in range(2)]
    ys = [torch.randint(0, 40, (32,)) for _ in range(2)]
    head(xs[0], ys[0]).backward()  # W.grad comes from the pool
    head.share_memory()  # parameters and their gradients move into shared memory
    barrier, result = ctx.Barrier(2), ctx.Queue()
    workers = [ctx.Process(target=_hogwild_worker, args=(head, xs[k], ys[k], barrier, result))
               for k in range(2)]
    for w in workers:
        w.start()
    try:
        errors = [result.get(timeout=TIMEOUT) for _ in workers]
    finally:
        for w in workers:
            w.join(TIMEOUT)
        for w in workers:
            if w.is_alive():
                w.kill()
    assert max(errors) < 1e-5, errors
    assert all(w.exitcode == 0 for w in workers)
