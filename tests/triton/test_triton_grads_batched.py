"""``torch.autograd.grad(..., is_grads_batched=True)`` through the Triton kernels (a batch
of ``grad_output``s under torch's vmap, where the kernels' in-place scaling has no batching
rule): torch's batched gradients, recomputed with torch ops
(``_rules.recompute_in_backward``). Reference: torch's ``F.cross_entropy`` / ``F.linear``."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import crossent.torch as xt
from crossent.errors import UnsupportedError

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: interpreter


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cross_entropy_batched_grad_outputs_match_torch(reduction):
    g = torch.Generator().manual_seed(0)
    z = (torch.randn(6, 5, generator=g) * 3).to(DEVICE)
    t = torch.randint(0, 5, (6,), generator=g).to(DEVICE)
    t[2] = -100
    go = (torch.randn(3, 6) if reduction == "none"
          else torch.tensor([1.0, 2.0, math.inf])).to(DEVICE)
    zc, zr = z.clone().requires_grad_(), z.clone().requires_grad_()
    loss = xt.cross_entropy(zc, t, reduction=reduction, backend="triton")
    (got,) = torch.autograd.grad(loss, zc, go, is_grads_batched=True)
    (want,) = torch.autograd.grad(F.cross_entropy(zr, t, reduction=reduction), zr, go,
                                  is_grads_batched=True)
    torch.testing.assert_close(got, want, equal_nan=True)


def _head(seed: int):
    """``(mine, ref, t, go)``: two leaf copies of ``(x, W)``, targets with an ignored row,
    and a batch of two grad_outputs, on DEVICE."""
    g = torch.Generator().manual_seed(seed)
    x, w = torch.randn(6, 4, generator=g), torch.randn(5, 4, generator=g)
    t = torch.randint(0, 5, (6,), generator=g)
    t[0] = -100
    x, w, t = x.to(DEVICE), w.to(DEVICE), t.to(DEVICE)
    mine = [v.clone().requires_grad_() for v in (x, w)]
    ref = [v.clone().requires_grad_() for v in (x, w)]
    return mine, ref, t, torch.tensor([1.0, 3.0], device=DEVICE)


def test_linear_head_batched_grad_outputs_match_torch():
    mine, ref, t, go = _head(1)
    loss = xt.linear_cross_entropy(*mine, t, backend="triton")
    got = torch.autograd.grad(loss, mine, go, is_grads_batched=True)
    want = torch.autograd.grad(F.cross_entropy(F.linear(*ref), t), ref, go,
                               is_grads_batched=True)
    for a, e in zip(got, want, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


def test_experimental_fused_linear_head_refuses_batched_grad_outputs_by_name():
    """Its Triton launches cannot take vmap's batched coefficients: refused by name
    (UnsupportedError), not torch's "Cannot access storage of BatchedTensorImpl"."""
    from crossent.torch._triton.fused_linear import fused_linear_cross_entropy

    mine, _, t, go = _head(3)
    loss = fused_linear_cross_entropy(*mine, t)
    with pytest.raises(UnsupportedError, match="is_grads_batched"):
        torch.autograd.grad(loss, mine, go, is_grads_batched=True)
