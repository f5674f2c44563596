"""A ``num_items`` tensor changed in place between forward and backward (review H86-2) in
the vocab-parallel functions: the reference, torch's ``F.cross_entropy(z, t,
reduction="sum") / n`` on the whole logits, raises ("modified by an inplace operation":
``DivBackward`` saves ``n``); the vocab-parallel loss had read the count once in forward
and scaled the gradient by the old value. Every rank changes its count (the count is one
global value, ``global_num_items``), so every rank raises; an unchanged count gives
torch's gradient slice. On 1 (in process), 2 and 3 gloo ranks, under a timeout."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from dist_harness import run_group

from crossent.torch.distributed import (
    vocab_parallel_cross_entropy,
    vocab_parallel_linear_cross_entropy,
)

F64 = torch.float64
V = 6


def _inputs():
    g = torch.Generator().manual_seed(11)
    x = torch.randn(5, 3, generator=g, dtype=F64)
    w = torch.randn(V, 3, generator=g, dtype=F64)
    y = torch.tensor([0, 5, -100, 3, 2])
    return x, w, y


def _torch_grads(change: bool):
    x, w, y = (t.clone() for t in _inputs())
    x.requires_grad_(), w.requires_grad_()
    n = torch.tensor(4.0, dtype=F64)
    z = x @ w.t()
    z.retain_grad()  # the logits' gradient too, for the vocab-parallel logits' slice
    loss = F.cross_entropy(z, y, reduction="sum") / n
    if change:
        with torch.no_grad():
            n.add_(1)
    try:
        loss.backward()
    except RuntimeError as exc:
        assert "modified by an inplace operation" in str(exc)
        return "raise"
    return x.grad, w.grad, z.grad


def _rank(rank, world, linear, change, count_dtype=F64):
    x, w, y = _inputs()
    rows = V // world
    part = slice(rank * rows, (rank + 1) * rows)
    x = x.clone().requires_grad_()
    local_w = w[part].clone().requires_grad_()
    local_z = (x @ local_w.t()).detach().requires_grad_()  # this rank's logit columns
    # an int64 or float32 count: the loss divides by a float64 copy of it, the caller's
    # tensor is the one to watch
    n = torch.tensor(4, dtype=count_dtype) if count_dtype == torch.int64 else torch.tensor(
        4.0, dtype=count_dtype)
    if linear:
        loss = vocab_parallel_linear_cross_entropy(x, local_w, y, reduction="sum",
                                                   num_items=n)
    else:
        loss = vocab_parallel_cross_entropy(local_z, y, reduction="sum", num_items=n)
    if change:
        with torch.no_grad():
            n.add_(1)
    want = _torch_grads(change)
    if want == "raise":
        with pytest.raises(RuntimeError, match="num_items was modified by an inplace"):
            loss.backward()
        return
    loss.backward()
    if linear:  # (x's gradient summed over the ranks: reduce_input_grad)
        torch.testing.assert_close(x.grad, want[0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(local_w.grad, want[1][part], rtol=1e-12, atol=1e-12)
    else:
        torch.testing.assert_close(local_z.grad, want[2][:, part], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("change", [True, False])
@pytest.mark.parametrize("linear", [False, True])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_num_items_changed_in_place_raises_on_every_rank_as_torch(world, linear, change):
    assert _torch_grads(True) == "raise"  # the reference raises: the case is the one meant
    if world == 1:
        _rank(0, 1, linear, change)
    else:
        run_group(_rank, world, linear, change, timeout=90)


@pytest.mark.parametrize("count_dtype", [torch.int64, torch.float32])
@pytest.mark.parametrize("linear", [False, True])
def test_a_converted_count_changed_in_place_raises(linear, count_dtype):
    """The count is converted to the logits' dtype for the division: the caller's tensor
    is watched, not the copy (world 1 and 2)."""
    _rank(0, 1, linear, True, count_dtype)
    run_group(_rank, 2, linear, True, count_dtype, timeout=90)
