"""What the in-place and gradient-adoption tests share (tests/torch, tests/triton and the
distributed tests import it as ``grad_probes``): torch's gradient in float64, a dtype's
closeness, and the probe for a hidden copy (the data pointers of the gradients a fused
Function's backward returns, compared afterwards with the leaves' ``.grad``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def torch_grad(z, y, reduction="mean", grad_output=None, **kw):
    """``d F.cross_entropy(z, y) / dz`` in float64, ``grad_output`` for ``"none"``."""
    ref = z.detach().double().requires_grad_()
    loss = F.cross_entropy(ref, y, reduction=reduction, **kw)
    loss.backward(None if grad_output is None else grad_output.double())
    return ref.grad


def assert_grad_close(got, want, dtype=torch.float32, atol=1e-7):
    """``got`` against a float64 ``want``: bf16's rounding for bf16, else 1e-5 relative."""
    tol = dict(rtol=2e-2, atol=2e-3) if dtype == torch.bfloat16 else dict(rtol=1e-5,
                                                                         atol=atol)
    torch.testing.assert_close(got.double(), want, **tol)


def fused_node(loss):
    """The autograd Function's node behind ``loss`` (past views and casts)."""
    node = loss.grad_fn
    while not isinstance(node, torch.autograd.function.BackwardCFunction):
        node = node.next_functions[0][0]
    return node


def returned_grad_ptrs(loss, node=None):
    """Data pointers of the gradients ``node``'s (default: :func:`fused_node`'s) backward
    returns, filled during backward. Pointers only: a kept tensor would itself make
    autograd copy it."""
    seen: list[list[int | None]] = []
    (fused_node(loss) if node is None else node).register_hook(
        lambda gi, go: seen.append([None if g is None else g.data_ptr() for g in gi]))
    return seen


def assert_own_grad(leaf, z):
    """The leaf is intact (equal to ``z``) and its ``.grad`` has memory of its own."""
    assert torch.equal(leaf.detach(), z), "a leaf's logits were overwritten"
    assert leaf.grad.untyped_storage().data_ptr() != leaf.untyped_storage().data_ptr(), \
        ".grad shares the leaf's storage"


def assert_written_in_place(loss, logits, ref_logits, y, leaves, refs, kind):
    """An activation's logits overwritten by the gradient (torch's, from ``ref_logits``,
    the float64 twin), the rest of a ``"view_of_activation"``'s base untouched, and the
    producer's leaves' gradients torch's (``refs``)."""
    ref_logits.retain_grad()
    F.cross_entropy(ref_logits, y).backward()
    loss.backward()
    assert_grad_close(logits.detach(), ref_logits.grad)  # written in place, scaled
    if kind == "view_of_activation":  # the rest of the activation is left alone
        assert torch.equal(logits._base[0], leaves[0].detach()[0] * 2)
    for got, ref in zip(leaves, refs, strict=True):
        torch.testing.assert_close(got.grad.double(), ref.grad, rtol=1e-5, atol=1e-6)


def close_to_reference(got, want, rtol):
    """Relative to the reference's largest finite magnitude (gradients hold tiny
    entries), NaN where the reference has NaN."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    finite = torch.isfinite(want)
    scale = float(want[finite].abs().max()) if finite.any() else 1.0
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * scale + 1e-30,
                               equal_nan=True)


class Identity(torch.autograd.Function):
    """Returns its input as is (autograd makes the output a view of it)."""

    @staticmethod
    def forward(ctx, x):
        return x

    @staticmethod
    def backward(ctx, g):
        return g
