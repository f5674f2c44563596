"""Adversarial review of session 15's Triton changes (helper H34): the shared "mean" rule
(``_rules.reduce_rows``), ``a = w_y`` without smoothing in ``ce_kernel``, ``ops.scale_``
over a flat contiguous tensor and the loss dtype with probability targets, against
``torch.nn.functional.cross_entropy`` (float64 where the kernel takes it). Known bugs are
tests written as they should pass, marked ``xfail(strict=True)`` with their cause."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

import torch.nn.functional as F  # noqa: E402
from grad_probes import assert_same_with_nans as _same  # noqa: E402
from grad_probes import value_and_grad as _value_and_grad  # noqa: E402

import crossent.torch as xt  # noqa: E402
from crossent.torch._triton import ops  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: the interpreter
F64 = torch.float64


def _logits(rows=4, classes=5, dtype=F64):
    g = torch.Generator().manual_seed(0)
    return torch.randn(rows, classes, generator=g, dtype=dtype).to(DEVICE)


def test_negative_weights_summing_to_zero_mean():
    w = torch.tensor([1.0, -1.0, 2.0, 3.0, -1.0], dtype=F64, device=DEVICE)
    y = torch.tensor([0, 1, -100, -100], device=DEVICE)
    want = F.cross_entropy(_logits(), y, weight=w)
    assert want.isinf()
    _same(xt.cross_entropy(_logits(), y, weight=w, backend="triton"), want)


@pytest.mark.parametrize("weight", [math.inf, math.nan])
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_nonfinite_weight_smoothing_ignored_row_gradient_pattern(weight, reduction):
    # torch's gradient of an ignored row is NaN throughout (its smoothing backward
    # multiplies the row's 0 by the weight); ops' `idle` parameter, and the linear head
    # keeps those rows (dx NaN, dW NaN) instead of skipping them
    w = torch.tensor([weight, 1.0, 1.0, 1.0, 1.0], dtype=F64, device=DEVICE)
    y = torch.tensor([1, -100, 2, 3], device=DEVICE)
    _, want = _value_and_grad(
        lambda t: F.cross_entropy(t, y, weight=w, label_smoothing=0.1, reduction=reduction),
        _logits())
    _, got = _value_and_grad(
        lambda t: xt.cross_entropy(t, y, weight=w, label_smoothing=0.1, reduction=reduction,
                                   backend="triton"), _logits())
    _same(got, want)
    g = torch.Generator().manual_seed(5)
    x, lw = (torch.randn(4, 3, generator=g, dtype=F64).to(DEVICE),
             torch.randn(5, 3, generator=g, dtype=F64).to(DEVICE))

    def run(fn):
        p = [x.clone().requires_grad_(), lw.clone().requires_grad_()]
        out = fn(*p)
        return (out, *torch.autograd.grad(out.sum(), p))

    want = run(lambda a, b: F.cross_entropy(a @ b.T, y, weight=w, label_smoothing=0.1,
                                            reduction=reduction))
    got = run(lambda a, b: xt.linear_cross_entropy(a, b, y, weight=w, label_smoothing=0.1,
                                                   reduction=reduction, backend="triton"))
    for u, v in zip(got, want, strict=True):
        _same(u, v)


@pytest.mark.parametrize("weight", [math.inf, math.nan])
def test_nonfinite_unused_weight_without_smoothing_changes_nothing(weight):
    # item 3: a = w_y without smoothing, sum(w) unread; the denominator skips ignored rows
    w = torch.tensor([weight, 1.0, 2.0, 1.0, 0.5], dtype=F64, device=DEVICE)
    y = torch.tensor([1, -100, 2, 3], device=DEVICE)
    for red in ("mean", "sum", "none"):
        want, want_grad = _value_and_grad(
            lambda t, red=red: F.cross_entropy(t, y, weight=w, reduction=red), _logits())
        got, grad = _value_and_grad(
            lambda t, red=red: xt.cross_entropy(t, y, weight=w, reduction=red,
                                                backend="triton"),
            _logits())
        _same(got, want)
        _same(grad, want_grad)


def test_zero_weights_with_smoothing_mean_is_nan_with_zero_gradient():
    w = torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0], dtype=F64, device=DEVICE)
    y = torch.tensor([0, 1, 0, 1], device=DEVICE)
    want, want_grad = _value_and_grad(
        lambda t: F.cross_entropy(t, y, weight=w, label_smoothing=0.1), _logits())
    got, grad = _value_and_grad(
        lambda t: xt.cross_entropy(t, y, weight=w, label_smoothing=0.1, backend="triton"),
        _logits())
    assert want.isnan()
    _same(got, want)
    _same(grad, want_grad)


def test_scale_flat_contiguous_and_padded_rows():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 5, generator=g).to(DEVICE)  # 3-D contiguous: one flat row
    want = x * 2.5
    ops.scale_(x, torch.tensor(2.5))
    torch.testing.assert_close(x, want)
    base = torch.randn(4, 10, generator=g).to(DEVICE)
    x = base[:, :5]  # rows padded: not contiguous, scaled row by row
    want = x * -3.0
    ops.scale_(x, torch.tensor(-3.0))
    torch.testing.assert_close(base[:, :5], want)
    torch.testing.assert_close(base[:, 5:], base[:, 5:].clone())
    with pytest.raises(ValueError, match="contiguous"):
        ops.scale_(torch.randn(2, 3, 4).to(DEVICE).transpose(0, 1), torch.tensor(2.0))


@pytest.mark.parametrize("logits_dtype,target_dtype", [
    (torch.bfloat16, torch.float32), (torch.float16, torch.float64),
    (torch.float32, torch.float64)])
def test_loss_dtype_promotes_with_probability_target(logits_dtype, target_dtype):
    g = torch.Generator().manual_seed(2)
    z = torch.randn(3, 5, generator=g).to(DEVICE, logits_dtype)
    p = torch.rand(3, 5, generator=g).softmax(1).to(DEVICE, target_dtype)
    want = F.cross_entropy(z, p)
    got = xt.cross_entropy(z.requires_grad_(), p, backend="triton")
    assert got.dtype == want.dtype
    torch.testing.assert_close(got.double(), want.double(), rtol=5e-3, atol=0)
    got.backward()
    assert z.grad is not None and z.grad.dtype == logits_dtype


@pytest.mark.parametrize("case", ["inf_target_weight", "zero_weight_at_-inf"])
@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_vocab_parallel_extreme_target_weights_are_torchs(case, reduction):
    # partials_kernel sends z_y unweighted: the loss is torch's w_y (lse - z_y) (an inf
    # w_y gave inf - inf = NaN, a zero w_y at a -inf target logit 0 instead of NaN)
    from crossent.torch.distributed import vocab_parallel_cross_entropy

    z = _logits()
    w = [1.0, 1.0, 1.0, math.inf, 1.0] if case == "inf_target_weight" else [0.0] + [1.0] * 4
    if case == "zero_weight_at_-inf":
        z[0, 0] = -math.inf
    w = torch.tensor(w, dtype=F64, device=DEVICE)
    y = torch.tensor([0, 1, 2, 3], device=DEVICE)
    want, want_grad = _value_and_grad(
        lambda t: F.cross_entropy(t, y, weight=w, reduction=reduction), z)
    got, grad = _value_and_grad(
        lambda t: vocab_parallel_cross_entropy(t, y, weight=w, reduction=reduction,
                                               backend="triton"), z)
    _same(got, want)
    _same(grad, want_grad)
