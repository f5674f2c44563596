"""Property tests (hypothesis): the fused kernels against torch on random shapes, options,
scales and block/chunk boundaries; the float64 reference is torch's own unfused path.
(One class is its own test: the exact gradient is 0, so a relative check has no scale.)"""

from __future__ import annotations

import math
from unittest import mock

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import crossent.torch as xt
from crossent.torch import _rules

options = st.fixed_dictionaries({
    "reduction": st.sampled_from(["mean", "sum", "none"]),
    "label_smoothing": st.sampled_from([0.0, 0.05, 0.5]),
    "weighted": st.booleans(),
    "ignore": st.booleans(),
    "probabilities": st.booleans(),
    "inplace": st.booleans(),
})


def _f32_close(got, want, *, unit):
    """Within 2e-5 of the reference's largest magnitude, and never stricter than float32
    resolution: ``unit`` is one float32 ulp of the values that cancel (``lse - z_y`` of a
    confident row loses ~|lse| * 6e-8 in any float32 implementation, torch's included)."""
    want = want.detach().double()
    scale = float(want[torch.isfinite(want)].abs().max()) if torch.isfinite(want).any() else 1.0
    torch.testing.assert_close(got.detach().double(), want, rtol=2e-5,
                               atol=2e-5 * scale + 8 * unit, equal_nan=True)


def _units(z, w, go, reduction, n):
    """float32 ulps (6e-8 relative) of the loss and of a gradient entry for this case."""
    lse = float(z.abs().max()) + math.log(z.shape[1]) + 1.0
    wmax = 1.0 if w is None else float(w.max())
    rows = n if reduction == "sum" else 1
    loss = 6e-8 * lse * wmax * rows * float(go.max())
    per_entry = 1.0 / max(1.0, 0.2 * n) if reduction == "mean" else 1.0  # weights >= 0.2
    return loss, 6e-8 * lse * wmax * float(go.max()) * per_entry


def _case(seed, n, c, scale, opts):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, c, generator=g, dtype=torch.float64) * scale
    if opts["probabilities"]:
        y = torch.softmax(torch.randn(n, c, generator=g, dtype=torch.float64) * 3, 1)
    else:
        y = torch.randint(0, c, (n,), generator=g)
        if opts["ignore"]:
            y[torch.rand(n, generator=g) < 0.3] = -100
    w = torch.rand(c, generator=g, dtype=torch.float64) + 0.2 if opts["weighted"] else None
    go = torch.rand(n if opts["reduction"] == "none" else (), generator=g,
                    dtype=torch.float64) + 0.5
    return z, y, w, go


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**16), n=st.integers(1, 70), c=st.integers(2, 40),
       scale=st.sampled_from([0.1, 3.0, 30.0]), opts=options)
def test_fused_cross_entropy_matches_torch(seed, n, c, scale, opts):
    z, y, w, go = _case(seed, n, c, scale, opts)
    z = z.float().double()  # the values the float32 kernel sees
    kw = dict(reduction=opts["reduction"], label_smoothing=opts["label_smoothing"])
    ref_leaf = z.clone().requires_grad_()
    ref = F.cross_entropy(ref_leaf, y, w, **kw)
    ref.backward(go)
    # 16-row blocks (the minimum): several blocks and a ragged last one
    with mock.patch.object(_rules, "_BLOCK_BYTES", 1):
        leaf = z.float().requires_grad_()
        inp = leaf * 1 if opts["inplace"] else leaf
        out = xt.cross_entropy(inp, y.float() if y.is_floating_point() else y,
                               None if w is None else w.float(),
                               inplace_backward=opts["inplace"], **kw)
        out.backward(go.float())
    loss_unit, grad_unit = _units(z, w, go, opts["reduction"], n)
    _f32_close(out, ref, unit=loss_unit)
    _f32_close(leaf.grad, ref_leaf.grad, unit=grad_unit)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), n=st.integers(1, 40), d=st.integers(1, 12),
       c=st.integers(2, 30), chunk=st.integers(1, 17), bias=st.booleans(), opts=options)
def test_fused_linear_cross_entropy_matches_unfused(seed, n, d, c, chunk, bias, opts):
    _, y, w, go = _case(seed, n, c, 1.0, opts)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(n, d, generator=g).double()  # float32 values
    weight = torch.randn(c, d, generator=g).double()
    b = torch.randn(c, generator=g).double() if bias else None
    kw = dict(reduction=opts["reduction"], label_smoothing=opts["label_smoothing"])
    refs = [t.clone().requires_grad_() for t in (x, weight) + ((b,) if bias else ())]
    ref = F.cross_entropy(F.linear(*refs[:2], refs[2] if bias else None), y, w, **kw)
    ref.backward(go)
    leaves = [t.float().requires_grad_() for t in (x, weight) + ((b,) if bias else ())]
    out = xt.linear_cross_entropy(leaves[0], leaves[1],
                                  y.float() if y.is_floating_point() else y,
                                  leaves[2] if bias else None,
                                  weight=None if w is None else w.float(), chunk_size=chunk,
                                  **kw)
    out.backward(go.float())
    logits = F.linear(x, weight, b)
    loss_unit, grad_unit = _units(logits, w, go, opts["reduction"], n)
    _f32_close(out, ref, unit=loss_unit)
    scale = 1.0 + float(max(x.abs().max(), weight.abs().max()))
    for got, want in zip(leaves, refs, strict=True):  # dx, dW: sums over C or N of entries
        _f32_close(got.grad, want.grad, unit=grad_unit * scale * max(n, c))


def test_one_class_loss_and_gradient_are_zero_up_to_rounding():
    z = torch.randn(5, 1, requires_grad=True)
    for y in (torch.zeros(5, dtype=torch.long), torch.ones(5, 1)):
        out = xt.cross_entropy(z, y, torch.tensor([0.7]), label_smoothing=0.1)
        (grad,) = torch.autograd.grad(out, z)
        assert abs(out.item()) < 1e-6 and grad.abs().max().item() < 1e-7
