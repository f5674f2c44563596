"""Every OpInfo sample PyTorch ships for ``nn.functional.cross_entropy`` and
``nn.functional.linear_cross_entropy`` (``torch.testing._internal`` ``op_db``), in float32
and float64: crossent's value and the gradient of every input that requires grad
(logits, features, linear weight and bias, probability targets) against torch's, computed
in float64 from the same values. The samples include K-dimensional losses and linear
weights, probability targets that require grad, and ``options=LinearCrossEntropyOptions``.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from fused_testing import close

import crossent.torch as xt

pytest.importorskip("expecttest")  # torch.testing._internal needs it (the test extra)

OPS = {"nn.functional.cross_entropy": (F.cross_entropy, xt.cross_entropy),
       "nn.functional.linear_cross_entropy": (F.linear_cross_entropy,
                                              xt.linear_cross_entropy)}


@pytest.fixture(scope="module")
def op_db():
    from torch.testing._internal.common_methods_invocations import op_db

    return {op.name: op for op in op_db if op.name in OPS}


def _tensors(sample):
    """(name, tensor) for every tensor argument of a sample, in call order."""
    out = [("input", sample.input)]
    out += [(f"args[{k}]", a) for k, a in enumerate(sample.args)
            if isinstance(a, torch.Tensor)]
    out += [(k, v) for k, v in sample.kwargs.items() if isinstance(v, torch.Tensor)]
    return out


def _call(fn, sample, cast):
    """``fn`` on fresh leaves (cast by ``cast``) of the sample's tensors; returns the
    output and the leaves that require grad, by name."""
    leaves = {}

    def leaf(name, t):
        if not isinstance(t, torch.Tensor):
            return t
        v = cast(t.detach()) if t.is_floating_point() else t.detach().clone()
        if t.requires_grad:
            v.requires_grad_()
            leaves[name] = v
        return v

    inp = leaf("input", sample.input)
    args = [leaf(f"args[{k}]", a) for k, a in enumerate(sample.args)]
    kwargs = {k: leaf(k, v) for k, v in sample.kwargs.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's options fall-back warnings
        return fn(inp, *args, **kwargs), leaves


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", list(OPS))
def test_every_opinfo_sample_matches_torch(op_db, name, dtype):
    ref_fn, our_fn = OPS[name]
    samples = list(op_db[name].sample_inputs("cpu", dtype, requires_grad=True))
    assert len(samples) > 20
    rtol = 2e-5 if dtype == torch.float32 else 1e-10
    checked = 0
    for k, sample in enumerate(samples):
        want, want_leaves = _call(ref_fn, sample, lambda t: t.double())
        got, got_leaves = _call(our_fn, sample, lambda t: t.clone())
        assert got.dtype == dtype and got.shape == want.shape, (k, sample)
        close(got, want, rtol=rtol)
        g = torch.Generator().manual_seed(k)
        go = torch.rand(want.shape, generator=g, dtype=torch.float64) + 0.25
        wanted = [n for n in want_leaves]
        assert wanted == list(got_leaves)
        want_grads = torch.autograd.grad(want, [want_leaves[n] for n in wanted], go,
                                         allow_unused=True)
        got_grads = torch.autograd.grad(got, [got_leaves[n] for n in wanted], go.to(dtype),
                                        allow_unused=True)
        for n, gg, wg in zip(wanted, got_grads, want_grads, strict=True):
            if wg is None:
                assert gg is None or not gg.any(), (k, n)
                continue
            assert gg is not None, (k, n, "no gradient where torch has one")
            assert gg.dtype == dtype
            close(gg, wg, rtol=rtol)
            checked += 1
    assert checked >= len(samples)  # at least one gradient per sample
