"""Small inputs with torch's options run torch's own kernel (in float32); everything else,
and every input past the size threshold, runs the fused kernel."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from fused_testing import DEVICES, close

import crossent.torch as xt
from crossent.errors import InputError
from crossent.torch import _backends

pytestmark = pytest.mark.native_dispatch
C = 7


def fused(out: torch.Tensor) -> bool:
    return "_CrossEntropyFunction" in type(out.grad_fn).__name__


def test_small_index_input_runs_torchs_kernel_and_large_the_fused_one():
    small = torch.randn(16, C, requires_grad=True)
    assert not fused(xt.cross_entropy(small, torch.randint(0, C, (16,))))
    # past the small kernel's range too (it keeps up to 2^23 float64 logits of 1000
    # classes; float32 at any size)
    rows = _backends.SMALL_MAX_LOGITS // 1000 + 1
    large = torch.randn(rows, 1000, dtype=torch.float64, requires_grad=True)
    assert fused(xt.cross_entropy(large, torch.randint(0, 1000, (rows,))))


@pytest.mark.parametrize("kw", [dict(z_loss=1e-3), dict(softcap=5.0)])
def test_crossent_only_options_always_run_the_fused_kernel(kw):
    z = torch.randn(16, C, requires_grad=True)
    assert fused(xt.cross_entropy(z, torch.randint(0, C, (16,)), **kw))


def test_probability_targets_always_run_the_fused_kernel():
    # torch gives NaN for a zero target probability on a -inf logit; crossent gives 0
    z = torch.randn(4, C)
    z[:, 0] = -float("inf")
    t = torch.softmax(torch.randn(4, C), 1)
    t[:, 0] = 0.0
    t = t / t.sum(1, keepdim=True)
    leaf = z.requires_grad_()
    out = xt.cross_entropy(leaf, t)
    assert fused(out) and torch.isfinite(out)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "reduction,weighted,smoothing,kdim",
    list(itertools.product(["mean", "sum", "none"], [False, True], [0.0, 0.2], [False, True])),
)
def test_small_inputs_match_torch(device, reduction, weighted, smoothing, kdim):
    g = torch.Generator().manual_seed(0)
    shape = (9, C, 3) if kdim else (9, C)
    z = torch.randn(shape, generator=g, dtype=torch.float64).to(device)
    y = torch.randint(0, C, (9, 3) if kdim else (9,), generator=g).to(device)
    y.view(-1)[::4] = -100
    w = (torch.rand(C, generator=g, dtype=torch.float64) + 0.5).to(device) if weighted else None
    ref_leaf = z.clone().requires_grad_()
    ref = F.cross_entropy(ref_leaf, y, w, reduction=reduction, label_smoothing=smoothing)
    go = torch.rand(ref.shape, generator=g, dtype=torch.float64).to(device) + 0.5
    ref.backward(go)
    leaf = z.float().requires_grad_()
    out = xt.cross_entropy(leaf, y, None if w is None else w.float(), reduction=reduction,
                           label_smoothing=smoothing)
    assert not fused(out) and out.shape == ref.shape
    out.backward(go.float())
    close(out, ref)
    close(leaf.grad, ref_leaf.grad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_small_low_precision_input_is_computed_in_float32_and_rounded_once(dtype):
    # p_y = 1 - 1e-3: p - 1 in the input dtype would lose the gradient (PITFALLS 6)
    z = torch.zeros(4, C)
    z[:, 0] = torch.log(torch.tensor((1 - 1e-3) * (C - 1) / 1e-3))
    y = torch.zeros(4, dtype=torch.long)
    leaf = z.to(dtype).requires_grad_()
    out = xt.cross_entropy(leaf, y, reduction="sum")
    out.backward()
    assert not fused(out) and out.dtype == dtype and leaf.grad.dtype == dtype
    ref_leaf = z.to(dtype).double().requires_grad_()
    F.cross_entropy(ref_leaf, y, reduction="sum").backward()
    assert torch.all(leaf.grad[:, 0] != 0)
    close(leaf.grad, ref_leaf.grad, rtol=1e-2)


def test_small_input_bad_targets_raise():
    with pytest.raises(ValueError, match="target"):
        xt.cross_entropy(torch.randn(4, C), torch.ones(4, dtype=torch.bool))
    with pytest.raises(IndexError, match="out of bounds"):
        xt.cross_entropy(torch.randn(4, C), torch.tensor([0, 1, 2, C]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_small_linear_head_matches_unfused_torch(dtype, bias):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(12, 5, generator=g, dtype=torch.float64)
    w = torch.randn(C, 5, generator=g, dtype=torch.float64)
    b = torch.randn(C, generator=g, dtype=torch.float64) if bias else None
    y = torch.randint(0, C, (12,), generator=g)
    y[::3] = -100
    leaves = [t.to(dtype).requires_grad_() for t in (x, w) + ((b,) if bias else ())]
    out = xt.linear_cross_entropy(*leaves[:2], y, leaves[2] if bias else None,
                                  label_smoothing=0.1)
    assert "LinearCrossEntropy" not in type(out.grad_fn).__name__ and out.dtype == dtype
    out.backward()
    refs = [t.to(dtype).double().requires_grad_() for t in (x, w) + ((b,) if bias else ())]
    want = F.cross_entropy(F.linear(*refs[:2], refs[2] if bias else None), y,
                           label_smoothing=0.1)
    want.backward()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    close(out, want, rtol=tol)
    for got, ref in zip(leaves, refs, strict=True):
        assert got.grad.dtype == dtype
        close(got.grad, ref.grad, rtol=tol)


def test_linear_head_with_chunk_size_or_z_loss_runs_the_fused_kernel():
    x, w = torch.randn(8, 4, requires_grad=True), torch.randn(C, 4, requires_grad=True)
    y = torch.randint(0, C, (8,))
    for kw in (dict(chunk_size=4), dict(z_loss=1e-3)):
        out = xt.linear_cross_entropy(x, w, y, **kw)
        assert "LinearCrossEntropy" in type(out.grad_fn).__name__


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.int8, torch.uint8])
def test_small_inputs_take_any_integer_target_dtype(dtype):
    z = torch.randn(8, C, dtype=torch.float64)
    y = torch.randint(0, C, (8,))
    want = F.cross_entropy(z, y)
    close(xt.cross_entropy(z.float(), y.to(dtype)), want)
    x, w = torch.randn(8, 3, dtype=torch.float64), torch.randn(C, 3, dtype=torch.float64)
    close(xt.linear_cross_entropy(x.float(), w.float(), y.to(dtype)),
          F.cross_entropy(x @ w.T, y))


@pytest.mark.parametrize("x_dtype,w_dtype", [(torch.bfloat16, torch.float32),
                                             (torch.float32, torch.float64),
                                             (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("chunk_size", [None, 4])
def test_linear_head_with_mixed_dtypes_raises_as_torch(x_dtype, w_dtype, chunk_size):
    x, w = torch.randn(8, 4).to(x_dtype), torch.randn(C, 4).to(w_dtype).requires_grad_()
    y = torch.randint(0, C, (8,))
    with pytest.raises(RuntimeError):  # torch's own verdict
        F.linear_cross_entropy(x, w, y)
    with pytest.raises(InputError, match="one dtype"):
        xt.linear_cross_entropy(x, w, y, chunk_size=chunk_size)
    with pytest.raises(InputError, match="one dtype"):
        xt.linear_cross_entropy(x, w.detach().to(x_dtype), y, w[:, 0].detach(),
                                chunk_size=chunk_size)
