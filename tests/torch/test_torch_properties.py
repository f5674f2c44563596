"""Property tests (hypothesis): the fused kernels against torch on random shapes, options,
scales and block/chunk boundaries; the float64 reference is torch's own unfused path."""

from __future__ import annotations

from unittest import mock

import torch
import torch.nn.functional as F
from fused_testing import close
from hypothesis import given, settings
from hypothesis import strategies as st

import crossent.torch as xt
from crossent.torch import _kernels

options = st.fixed_dictionaries({
    "reduction": st.sampled_from(["mean", "sum", "none"]),
    "label_smoothing": st.sampled_from([0.0, 0.05, 0.5]),
    "weighted": st.booleans(),
    "ignore": st.booleans(),
    "probabilities": st.booleans(),
    "inplace": st.booleans(),
})


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
@given(seed=st.integers(0, 2**16), n=st.integers(1, 70), c=st.integers(1, 40),
       scale=st.sampled_from([0.1, 3.0, 30.0]), opts=options)
def test_fused_cross_entropy_matches_torch(seed, n, c, scale, opts):
    z, y, w, go = _case(seed, n, c, scale, opts)
    kw = dict(reduction=opts["reduction"], label_smoothing=opts["label_smoothing"])
    ref_leaf = z.clone().requires_grad_()
    ref = F.cross_entropy(ref_leaf, y, w, **kw)
    ref.backward(go)
    # 16-row blocks (the minimum): several blocks and a ragged last one
    with mock.patch.object(_kernels, "_BLOCK_BYTES", 1):
        leaf = z.float().requires_grad_()
        inp = leaf * 1 if opts["inplace"] else leaf
        out = xt.cross_entropy(inp, y.float() if y.is_floating_point() else y,
                               None if w is None else w.float(),
                               inplace_backward=opts["inplace"], **kw)
        out.backward(go.float())
    close(out, ref, rtol=2e-5)
    close(leaf.grad, ref_leaf.grad, rtol=2e-5)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), n=st.integers(1, 40), d=st.integers(1, 12),
       c=st.integers(1, 30), chunk=st.integers(1, 17), bias=st.booleans(), opts=options)
def test_fused_linear_cross_entropy_matches_unfused(seed, n, d, c, chunk, bias, opts):
    _, y, w, go = _case(seed, n, c, 1.0, opts)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    weight = torch.randn(c, d, generator=g, dtype=torch.float64)
    b = torch.randn(c, generator=g, dtype=torch.float64) if bias else None
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
    close(out, ref, rtol=2e-5)
    for got, want in zip(leaves, refs, strict=True):
        close(got.grad, want.grad, rtol=2e-5)
