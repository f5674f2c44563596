"""Adversarial review (H22) of ``is_grads_batched=True`` through the Triton kernels
(``_triton/autograd.py``'s ``recompute_in_backward``): spatial ``(N, C, d)`` logits with
every reduction and non-finite grad_outputs, the linear head with a bias and ignored rows, a
plain backward through the retained graph afterwards, ``inplace_backward=True`` refused,
and an in-place change of the saved logits named. Reference: torch's ``F.cross_entropy`` /
``F.linear`` under the same call (on CPU the kernels run in triton's interpreter)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import crossent.torch as xt
from crossent.errors import UnsupportedError

pytestmark = pytest.mark.timeout(120)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: interpreter
INF, NAN = math.inf, math.nan
TOL = {"rtol": 1e-5, "atol": 1e-5}


def _close(got, want):
    torch.testing.assert_close(got, want, equal_nan=True, **TOL)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_spatial_cross_entropy_batched_grad_outputs(reduction):
    g = torch.Generator().manual_seed(0)
    z = (torch.randn(3, 5, 4, generator=g) * 3).to(DEVICE)
    t = torch.randint(0, 5, (3, 4), generator=g)
    t[0, 1] = -100
    t = t.to(DEVICE)
    if reduction == "none":
        go = torch.randn(2, 3, 4, generator=g)
        go[0, 0, 0], go[1, 2, 3], go[1, 0, 2] = INF, NAN, -INF
    else:
        go = torch.tensor([2.0, INF, -1.0])
    go = go.to(DEVICE)
    mine, ref = z.clone().requires_grad_(), z.clone().requires_grad_()
    loss = xt.cross_entropy(mine, t, reduction=reduction, backend="triton")
    (got,) = torch.autograd.grad(loss, mine, go, is_grads_batched=True)
    (want,) = torch.autograd.grad(F.cross_entropy(ref, t, reduction=reduction), ref, go,
                                  is_grads_batched=True)
    _close(got, want)


def test_inplace_backward_with_batched_grad_outputs_is_refused_naming_both():
    z = torch.randn(6, 5, device=DEVICE, requires_grad=True)
    t = torch.randint(0, 5, (6,), device=DEVICE)
    loss = xt.cross_entropy(z * 1, t, backend="triton", inplace_backward=True)
    with pytest.raises(UnsupportedError, match=r"is_grads_batched.*inplace_backward"):
        torch.autograd.grad(loss, z, torch.tensor([1.0, 2.0], device=DEVICE),
                            is_grads_batched=True)


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_linear_head_with_bias_batched_then_plain(reduction):
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(6, 4, generator=g), torch.randn(5, 4, generator=g)
    b = torch.randn(5, generator=g)
    t = torch.randint(0, 5, (6,), generator=g)
    t[0] = t[4] = -100
    x, w, b, t = (v.to(DEVICE) for v in (x, w, b, t))
    go = (torch.randn(2, 6, generator=g) if reduction == "none"
          else torch.tensor([2.0, INF])).to(DEVICE)
    mine = [v.clone().requires_grad_() for v in (x, w, b)]
    ref = [v.clone().requires_grad_() for v in (x, w, b)]
    loss = xt.linear_cross_entropy(mine[0], mine[1], t, mine[2], reduction=reduction,
                                   backend="triton")
    want_loss = F.cross_entropy(F.linear(*ref), t, reduction=reduction)
    got = torch.autograd.grad(loss, mine, go, is_grads_batched=True, retain_graph=True)
    want = torch.autograd.grad(want_loss, ref, go, is_grads_batched=True, retain_graph=True)
    for a, e in zip(got, want, strict=True):
        _close(a, e)
    plain = torch.ones(6, device=DEVICE) if reduction == "none" else None
    got = torch.autograd.grad(loss, mine, plain)
    want = torch.autograd.grad(want_loss, ref, plain)
    for a, e in zip(got, want, strict=True):
        _close(a, e)


def test_logits_changed_in_place_before_a_batched_backward_raise():
    g = torch.Generator().manual_seed(2)
    z = torch.randn(6, 5, generator=g).to(DEVICE).requires_grad_()
    t = torch.randint(0, 5, (6,), generator=g).to(DEVICE)
    y = z * 1
    loss = xt.cross_entropy(y, t, backend="triton")
    y.add_(1.0)
    with pytest.raises(RuntimeError, match=r"modified in place.*batched grad_outputs"):
        torch.autograd.grad(loss, z, torch.tensor([1.0, 2.0], device=DEVICE),
                            is_grads_batched=True)
