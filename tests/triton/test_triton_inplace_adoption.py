"""``triton_cross_entropy(..., inplace_backward=True)`` and ``backend="triton"``: where the
gradient is written (``_rules.may_overwrite``, as on the row-block kernel).

Leaf logits, or a view of a leaf: a fresh buffer; the logits stay intact, ``.grad`` has
memory of its own (never the leaf's: a refill, ``zero_grad(set_to_none=False)`` or an
optimizer step would change both) and is adopted without a copy (a hook on the
Function's node records the data pointers backward returned). A non-leaf activation
(``h * 1.0``, ``x @ W.T``, a view of one): the kernel writes the gradient into its
memory, and the producer's gradients are torch's. Reference: torch's ``F.cross_entropy``
in float64. The row-block kernel's counterpart is
``tests/torch/test_inplace_adoption.py``; the adversarial cases are in
``test_triton_inplace_adversarial.py``. Tiny shapes: the interpreter is slow on CPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from grad_probes import assert_grad_close as _close
from grad_probes import assert_written_in_place
from grad_probes import returned_grad_ptrs as _returned_ptrs

import crossent.torch as xt
from crossent.torch._triton import triton_cross_entropy

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: interpreter
N, C = 9, 300


def _data(dtype, n=N):
    g = torch.Generator().manual_seed(11)
    z = (torch.randn(n, C, generator=g) * 2).to(dtype).to(DEVICE)
    y = torch.randint(0, C, (n,), generator=g).to(DEVICE)
    y[4] = -100
    return z, y


def _loss(logits, y, entry, **kw):
    if entry == "kernel":  # ragged tiles
        return triton_cross_entropy(logits, y, inplace_backward=True, block=128, **kw)
    return xt.cross_entropy(logits, y, inplace_backward=True, backend="triton", **kw)


def _storage(t):
    return t.untyped_storage().data_ptr()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("entry", ["kernel", "backend"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_leaf_stays_intact_and_its_fresh_grad_is_adopted(dtype, entry, reduction):
    z, y = _data(dtype)
    a = z.clone().requires_grad_()
    holders = [a, (a,)]  # other references to the leaf change nothing
    loss = _loss(a, y, entry, reduction=reduction)
    seen = _returned_ptrs(loss)
    go = torch.linspace(-2, 3, N, device=DEVICE).to(dtype) if reduction == "none" else None
    loss.backward(go)
    assert torch.equal(a.detach(), z), "a leaf's logits were overwritten"
    assert _storage(a.grad) != _storage(a), ".grad shares the leaf's storage"
    assert seen[0][0] == a.grad.data_ptr(), "the gradient was copied into .grad"
    ref = z.double().requires_grad_()
    F.cross_entropy(ref, y, reduction=reduction).backward(
        None if go is None else go.double())
    _close(a.grad, ref.grad, dtype)
    assert holders[0] is a


@pytest.mark.parametrize("entry", ["kernel", "backend"])
def test_view_of_a_leaf_stays_intact(entry):
    z, y = _data(torch.float32, N + 2)
    leaf = z.clone().requires_grad_()
    _loss(leaf[1:N + 1], y[:N], entry).backward()
    assert torch.equal(leaf.detach(), z), "a view of a leaf was overwritten"
    assert _storage(leaf.grad) != _storage(leaf)
    ref = z.double().requires_grad_()
    F.cross_entropy(ref[1:N + 1], y[:N]).backward()
    _close(leaf.grad, ref.grad)


@pytest.mark.parametrize("entry, kind", [("kernel", "mul"), ("backend", "mul"),
                                         ("kernel", "matmul"),
                                         ("backend", "view_of_activation")])
def test_activation_is_overwritten_by_torchs_gradient(entry, kind):
    """The activation's memory holds torch's gradient of the logits after backward, and
    the producer's gradients (``h.grad``, dx, dW) are torch's."""
    g = torch.Generator().manual_seed(12)
    y = torch.randint(0, C, (N,), generator=g).to(DEVICE)
    y[2] = -100
    if kind == "matmul":
        x0 = torch.randn(N, 8, generator=g).to(DEVICE)
        w0 = (torch.randn(C, 8, generator=g) * 0.5).to(DEVICE)
        leaves = [x0.clone().requires_grad_(), w0.clone().requires_grad_()]
        refs = [x0.double().requires_grad_(), w0.double().requires_grad_()]
        logits, ref_logits = leaves[0] @ leaves[1].t(), refs[0] @ refs[1].t()
    else:
        h0 = (torch.randn(N + 1, C, generator=g) * 2).to(DEVICE)
        leaves, refs = [h0.clone().requires_grad_()], [h0.double().requires_grad_()]
        if kind == "mul":
            logits, ref_logits = leaves[0][:N] * 1.0, refs[0][:N] * 1.0
        else:
            logits, ref_logits = (leaves[0] * 2)[1:], (refs[0] * 2)[1:]
    loss = _loss(logits, y, entry)
    assert_written_in_place(loss, logits, ref_logits, y, leaves, refs, kind)


def test_existing_grad_accumulates_into_its_own_buffer():
    z, y = _data(torch.float32)
    a = z.clone().requires_grad_()
    a.grad = torch.full_like(z, 0.5)
    kept = a.grad
    triton_cross_entropy(a, y, inplace_backward=True).backward()
    ref = z.double().requires_grad_()
    F.cross_entropy(ref, y).backward()
    assert a.grad is kept and torch.equal(a.detach(), z)
    _close(a.grad, ref.grad + 0.5)
