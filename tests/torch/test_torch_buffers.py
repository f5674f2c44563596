"""Reused CPU gradient buffers: reused when free, never while anything still holds them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from fused_testing import close, pooled_grad
from hypothesis import given, settings
from hypothesis import strategies as st

import crossent.torch as xt
from crossent.torch import _buffers

pytestmark = pytest.mark.usefixtures("fresh_pool")


def test_consumed_gradient_buffer_is_reused_by_the_next_call():
    z, y = torch.randn(16, 7), torch.randint(0, 7, (16,))
    first = pooled_grad(z, y)
    ptr = first.data_ptr()
    del first  # the caller is done with it: the buffer is free again
    second = pooled_grad(z, y)
    assert second.data_ptr() == ptr


def test_kept_gradient_is_never_overwritten_by_a_later_call():
    y = torch.randint(0, 7, (16,))
    z1, z2 = torch.randn(16, 7), torch.randn(16, 7) * 3
    kept = pooled_grad(z1, y)
    snapshot = kept.clone()
    other = pooled_grad(z2, y)
    assert other.data_ptr() != kept.data_ptr()
    torch.testing.assert_close(kept, snapshot, rtol=0, atol=0)


def test_leaf_grad_accumulates_correctly_across_steps_without_zero_grad():
    torch.manual_seed(0)
    x, y = torch.randn(32, 6), torch.randint(0, 40, (32,))
    w_ours = (torch.randn(40, 6) / 3).requires_grad_()
    w_ref = w_ours.detach().clone().requires_grad_()
    for scale in (1.0, 2.0, 0.5):
        xt.linear_cross_entropy(x * scale, w_ours, y).backward()
        F.cross_entropy((x * scale) @ w_ref.T, y).backward()
    close(w_ours.grad, w_ref.grad)


def test_view_of_a_gradient_keeps_its_buffer_busy():
    z, y = torch.randn(16, 7), torch.randint(0, 7, (16,))
    view = pooled_grad(z, y)[3:]  # the full gradient tensor is gone, a view of it is not
    snapshot = view.clone()
    pooled_grad(z * 3, y)
    torch.testing.assert_close(view, snapshot, rtol=0, atol=0)


def test_k_dimensional_gradients_stay_correct_across_steps():
    z, y = torch.randn(2, 5, 3), torch.randint(0, 5, (2, 3))  # (N, C, d)
    leaves = [(z * s).detach().requires_grad_() for s in (1, 2, 3)]
    for leaf in leaves:
        xt.cross_entropy(leaf, y).backward()
    for s, leaf in zip((1, 2, 3), leaves, strict=True):
        ref = (z * s).detach().requires_grad_()
        F.cross_entropy(ref, y).backward()
        close(leaf.grad, ref.grad)


def test_two_losses_in_one_step_get_separate_buffers():
    z, y = torch.randn(16, 7), torch.randint(0, 7, (16,))
    a, b = z.detach().requires_grad_(), (2 * z).detach().requires_grad_()
    (xt.cross_entropy(a, y) + xt.cross_entropy(b, y, reduction="sum")).backward()
    ra, rb = z.detach().requires_grad_(), (2 * z).detach().requires_grad_()
    (F.cross_entropy(ra, y) + F.cross_entropy(rb, y, reduction="sum")).backward()
    close(a.grad, ra.grad)
    close(b.grad, rb.grad)


def test_growing_sizes_do_not_pile_up_in_the_pool():
    y = torch.randint(0, 7, (64,))
    for n in (8, 16, 32, 64):
        pooled_grad(torch.randn(n, 7), y[:n])
    assert len(_buffers._pool) == 1
    assert _buffers._pool[0].nbytes == 64 * 7 * 4


def test_disabled_reuse_keeps_nothing_and_empty_cache_releases():
    z, y = torch.randn(16, 7), torch.randint(0, 7, (16,))
    pooled_grad(z, y)
    assert _buffers._pool  # CPU: kept for the next step
    xt.empty_cache()
    assert not _buffers._pool
    assert xt.set_buffer_reuse(False) is True
    close(pooled_grad(z, y), torch.autograd.grad(
        F.cross_entropy(leaf := z.detach().requires_grad_(), y), leaf)[0])
    assert not _buffers._pool


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([(8, 5), (4, 5), (8, 9)]), st.booleans()),
                min_size=1, max_size=8), st.integers(0, 2**16))
def test_any_sequence_of_calls_and_kept_gradients_stays_correct(calls, seed):
    """Random shapes; some gradients are kept (as a user's .grad would be), others dropped.
    Every kept gradient must still equal torch's at the end."""
    g = torch.Generator().manual_seed(seed)
    kept = []
    for (n, c), keep in calls:
        z = torch.randn(n, c, generator=g) * 4
        y = torch.randint(0, c, (n,), generator=g)
        got = pooled_grad(z, y)
        if keep:
            kept.append((got, z, y))
    for got, z, y in kept:
        leaf = z.detach().requires_grad_()
        (want,) = torch.autograd.grad(F.cross_entropy(leaf, y), leaf)
        close(got, want)


def test_kept_storage_object_keeps_its_buffer_busy():
    z, y = torch.randn(16, 7), torch.randint(0, 7, (16,))
    storage = pooled_grad(z, y).untyped_storage()  # the gradient tensor is gone, its storage not
    snapshot = torch.frombuffer(bytearray(bytes(storage)), dtype=torch.float32).clone()
    pooled_grad(z * 5, y)
    now = torch.frombuffer(bytearray(bytes(storage)), dtype=torch.float32)
    torch.testing.assert_close(now, snapshot, rtol=0, atol=0)


def test_small_gradient_does_not_pin_a_much_larger_buffer():
    y = torch.randint(0, 7, (64,))
    pooled_grad(torch.randn(64, 7), y)  # leaves a free 64 x 7 buffer in the pool
    small = pooled_grad(torch.randn(8, 7), y[:8])
    assert small.untyped_storage().nbytes() == 8 * 7 * 4


def test_concurrent_calls_from_threads_get_their_own_buffers():
    import threading

    # large enough that the threads overlap inside empty() (smaller sizes rarely race)
    y = torch.randint(0, 1000, (256,))
    inputs = [torch.randn(256, 1000) * (k + 1) for k in range(4)]
    wants = []
    for z in inputs:
        leaf = z.clone().requires_grad_()
        wants.append(torch.autograd.grad(F.cross_entropy(leaf, y), leaf)[0])
    errors = []
    start = threading.Barrier(4)  # every call starts together: they race for the pool

    def work(k):
        for _ in range(50):
            start.wait()
            got = pooled_grad(inputs[k], y)
            if not torch.allclose(got, wants[k], rtol=1e-5, atol=1e-7):
                errors.append(k)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
