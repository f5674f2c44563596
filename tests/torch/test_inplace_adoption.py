"""``inplace_backward=True`` on leaf logits: the gradient written into the logits' storage
is adopted by autograd as the leaf's ``.grad``, not copied.

autograd's ``AccumulateGrad`` adopts a returned gradient only when nothing else refers to
that tensor object; the kernels used to hand back the caller's own logits tensor (held by
the caller and by autograd), so every ``loss.backward()`` on leaf logits paid a hidden
``N x C`` allocation and copy: on the H200 run the in-place kernel took 1.41-1.55x the
out-of-place one, with the same 4.2 GB "extra" memory. These tests pin the storage
(``a.grad`` shares ``a``'s) and, with torch's ``F.cross_entropy`` on a copy as the
reference, every value that flows around it: reductions, ``grad_output``, ignored rows, an
existing ``.grad`` (accumulation), hooks, a second use of the leaf in the same graph, and
non-leaf logits. The Triton kernel's counterpart is in
``tests/triton/test_triton_kernels.py``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import crossent.torch as xt

# 600 x 1000 logits: above the small-batch kernel (which ignores inplace_backward), so
# "auto" takes the row-block kernel, as "rowblock" does
N, C = 600, 1000


def _data(seed: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(N, C, generator=g) * 2).to(dtype)
    y = torch.randint(0, C, (N,), generator=g)
    y[::7] = -100
    return z, y


def _torch_grad(z, y, reduction="mean", grad_output=None):
    ref = z.double().requires_grad_()
    loss = F.cross_entropy(ref, y, reduction=reduction)
    loss.backward(None if grad_output is None else grad_output.double())
    return ref.grad


@pytest.mark.parametrize("backend", ["auto", "rowblock"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_leaf_grad_is_the_logits_storage_and_torchs_values(backend, dtype, reduction):
    z, y = _data(0, dtype)
    a = z.clone().requires_grad_()
    loss = xt.cross_entropy(a, y, reduction=reduction, inplace_backward=True, backend=backend)
    go = torch.randn(N, generator=torch.Generator().manual_seed(1)).to(dtype) \
        if reduction == "none" else None
    loss.backward(go)
    assert a.grad.data_ptr() == a.data_ptr(), "the in-place gradient was copied"
    tol = dict(rtol=2e-2, atol=2e-3) if dtype == torch.bfloat16 else dict(rtol=1e-5,
                                                                         atol=1e-7)
    torch.testing.assert_close(a.grad.double(), _torch_grad(z, y, reduction, go), **tol)


def test_existing_grad_accumulates_into_its_own_buffer():
    """A second micro-batch: the leaf already has a ``.grad``; it is added to in place
    (torch's rule), not replaced by the logits' storage."""
    z, y = _data(2)
    a = z.clone().requires_grad_()
    before = torch.full_like(z, 0.25)
    a.grad = before.clone()
    kept = a.grad
    xt.cross_entropy(a, y, inplace_backward=True, backend="rowblock").backward()
    assert a.grad is kept and a.grad.data_ptr() != a.data_ptr()
    torch.testing.assert_close(a.grad.double(), before.double() + _torch_grad(z, y))


def test_tensor_hook_sees_and_replaces_the_gradient():
    z, y = _data(3)
    a = z.clone().requires_grad_()
    seen = []
    a.register_hook(lambda g: seen.append(g.clone()) or g * 2)
    xt.cross_entropy(a, y, inplace_backward=True, backend="rowblock").backward()
    want = _torch_grad(z, y)
    torch.testing.assert_close(seen[0].double(), want)
    torch.testing.assert_close(a.grad.double(), 2 * want)


def test_second_use_of_the_leaf_in_the_same_graph_adds_its_gradient():
    """``a`` also feeds an op that saves nothing (a sum): both gradients arrive at the
    leaf and are summed, the in-place one included."""
    z, y = _data(4)
    a = z.clone().requires_grad_()
    ref = z.double().requires_grad_()
    (xt.cross_entropy(a, y, inplace_backward=True, backend="rowblock") + 0.5 * a.sum()
     ).backward()
    (F.cross_entropy(ref, y) + 0.5 * ref.sum()).backward()
    torch.testing.assert_close(a.grad.double(), ref.grad)


def test_an_op_that_saved_the_leaf_still_raises():
    """The kernel overwrote the logits: an op that saved them for its own backward must
    raise (autograd's version check), never use the gradient as if it were the logits."""
    z, y = _data(5)
    a = z.clone().requires_grad_()
    other = (a * a).sum()  # saves a
    loss = xt.cross_entropy(a, y, inplace_backward=True, backend="rowblock") + other
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_non_leaf_logits_pass_the_gradient_on():
    z, y = _data(6)
    h = z.clone().requires_grad_()
    logits = h * 1.0
    xt.cross_entropy(logits, y, inplace_backward=True, backend="rowblock").backward()
    torch.testing.assert_close(h.grad.double(), _torch_grad(z, y))


def test_parameter_leaf_is_adopted_too():
    z, y = _data(7)
    p = torch.nn.Parameter(z.clone())
    xt.cross_entropy(p, y, inplace_backward=True, backend="rowblock").backward()
    assert p.grad.data_ptr() == p.data_ptr()
    torch.testing.assert_close(p.grad.double(), _torch_grad(z, y))


def test_float64_keeps_a_separate_gradient_and_allows_a_second_backward():
    """float64 (gradcheck's dtype) keeps the stored gradient and scales a copy: the leaf's
    ``.grad`` is that copy, and values match torch."""
    z, y = _data(8, torch.float64)
    a = z.clone().requires_grad_()
    xt.cross_entropy(a, y, inplace_backward=True, backend="rowblock").backward()
    torch.testing.assert_close(a.grad, _torch_grad(z, y))
