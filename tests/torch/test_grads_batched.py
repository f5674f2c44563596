"""``torch.autograd.grad(..., is_grads_batched=True)`` (a batch of ``grad_output``s, run by
torch under its vmap: Jacobians of the loss, per-sample weighting) through the fused
kernels: torch's batched gradients, NaN/inf included, where a host read or an in-place
scaling of the stored gradient has no batching rule. The fused kernels recompute the
gradient with torch ops for it (``_rules.recompute_in_backward``). References: torch's own
``F.cross_entropy`` / ``F.linear`` under the same call."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import crossent.torch as xt

# conftest.py sets NATIVE_MAX_LOGITS to 0: every call below takes the row-block kernel

GO_SCALAR = torch.tensor([1.0, 2.0, -0.5, math.inf, math.nan])


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(6, 5, generator=g, dtype=torch.float64) * 3
    t = torch.randint(0, 5, (6,), generator=g)
    t[2] = -100
    return z, t


@pytest.mark.parametrize("options", [{}, {"reduction": "sum"}, {"label_smoothing": 0.2},
                                     {"weight": "w"}, {"reduction": "none"},
                                     {"z_loss": 1e-2}, {"probability": True}])
def test_cross_entropy_batched_grad_outputs_match_torch(options):
    z, t = _data()
    options = dict(options)
    w = torch.rand(5, dtype=torch.float64) + 0.5
    if options.pop("weight", None):
        options["weight"] = w
    z_loss = options.pop("z_loss", 0.0)
    if options.pop("probability", False):
        t = torch.softmax(torch.randn(6, 5, dtype=torch.float64), 1)
    reduction = options.get("reduction", "mean")
    go = (torch.randn(4, 6, dtype=torch.float64) if reduction == "none"
          else GO_SCALAR.double())
    if reduction == "none":
        go[0, 1], go[1, 3] = math.inf, math.nan
    zc, zr = z.clone().requires_grad_(), z.clone().requires_grad_()
    loss = xt.cross_entropy(zc, t, z_loss=z_loss, **options)
    node = loss.grad_fn if reduction != "none" else loss.grad_fn.next_functions[0][0]
    assert "CrossEntropyFunction" in node.name()  # the row-block kernel's
    (got,) = torch.autograd.grad(loss, zc, go, is_grads_batched=True)
    ref_loss = F.cross_entropy(zr, t, **options)
    if z_loss:  # z_loss * lse^2 per counted row, reduced as the loss (index targets)
        counted = (t != -100).double()  # ignored rows: no term (where, not times 0)
        terms = torch.where(t != -100, z_loss * torch.logsumexp(zr, 1).square(), 0.0)
        ref_loss = ref_loss + (terms.sum() / counted.sum() if reduction == "mean"
                               else terms.sum())
    (want,) = torch.autograd.grad(ref_loss, zr, go, is_grads_batched=True)
    torch.testing.assert_close(got, want, equal_nan=True)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_linear_head_batched_grad_outputs_match_torch(reduction):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 4, generator=g, dtype=torch.float64)
    w = torch.randn(5, 4, generator=g, dtype=torch.float64)
    b = torch.randn(5, generator=g, dtype=torch.float64)
    t = torch.randint(0, 5, (6,), generator=g)
    t[0] = -100
    go = (torch.randn(3, 6, dtype=torch.float64) if reduction == "none"
          else torch.tensor([1.0, 3.0, math.inf], dtype=torch.float64))
    mine = [v.clone().requires_grad_() for v in (x, w, b)]
    ref = [v.clone().requires_grad_() for v in (x, w, b)]
    loss = xt.linear_cross_entropy(*mine[:2], t, mine[2], reduction=reduction)
    got = torch.autograd.grad(loss, mine, go, is_grads_batched=True)
    want = torch.autograd.grad(
        F.cross_entropy(F.linear(ref[0], ref[1], ref[2]), t, reduction=reduction), ref, go,
        is_grads_batched=True)
    for a, e in zip(got, want, strict=True):
        torch.testing.assert_close(a, e, equal_nan=True)


def test_a_plain_backward_after_a_batched_one_still_hands_over_the_stored_gradient():
    """The batched backward recomputes and leaves the stored gradient in place: a later
    plain backward through the retained graph gives torch's gradient (float64 keeps it)."""
    z, t = _data(2)
    zc, zr = z.clone().requires_grad_(), z.clone().requires_grad_()
    loss = xt.cross_entropy(zc, t)
    torch.autograd.grad(loss, zc, GO_SCALAR.double()[:2], is_grads_batched=True,
                        retain_graph=True)
    (got,) = torch.autograd.grad(loss, zc)
    (want,) = torch.autograd.grad(F.cross_entropy(zr, t), zr)
    torch.testing.assert_close(got, want)
