"""Adversarial review of session 16's Triton fixes (helper H39), in the interpreter on tiny
shapes: ``ce_kernel``'s ``idle`` parameter (ignored rows NaN with smoothing and a
non-finite class weight), the linear head keeping those rows, the rows whose backward
scale is 0 without smoothing, the unweighted ``z_y`` of ``partials_kernel``, uint64 ids,
probability targets with a class weight of another dtype, and negated views (the fix
given to ``_inductor.serves``). References: ``torch.nn.functional.cross_entropy`` in
float64, NaN-exact. The bugs it found are fixed; each test failed before its fix."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

import torch.nn.functional as F  # noqa: E402
from grad_probes import assert_same_with_nans as _same  # noqa: E402

import crossent.torch as xt  # noqa: E402
from crossent.errors import InputError  # noqa: E402
from crossent.torch.distributed import vocab_parallel_cross_entropy  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: the interpreter
F64 = torch.float64
INF, NAN = math.inf, math.nan
Y = torch.tensor([0, -100, 2, 1], device=DEVICE)  # row 1 ignored
# the interpreter runs the kernels in NumPy, which warns about the NaN they form on purpose
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


def _t(rows, cols, seed, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g, dtype=dtype).to(DEVICE)


def _grads(fn, leaves, grad_output=None):
    copies = [t.clone().requires_grad_() for t in leaves]
    loss = fn(*copies)
    go = torch.ones_like(loss) if grad_output is None else grad_output.to(loss)
    return (loss.detach(), *torch.autograd.grad(loss, copies, go))


def _all_same(got, want):
    for a, b in zip(got, want, strict=True):
        _same(a, b)


@pytest.mark.parametrize("weight,eps,reduction", [
    ([1.0, INF, 1.0, 2.0], 0.1, "none"),  # idle: ignored row and a grad_output-0 row NaN
    ([1.0, NAN, 1.0, 2.0], 0.1, "mean"),
    ([INF, 1.0, 1.0, 1.0], 0.0, "mean"),  # no smoothing: the 1/inf scale, row 0 NaN
])
def test_zero_scale_rows_nonfinite_weight_cross_entropy_and_linear(weight, eps, reduction):
    w = torch.tensor(weight, dtype=F64, device=DEVICE)
    go = (torch.tensor([1.0, 1.0, 0.0, 2.0], dtype=F64, device=DEVICE)
          if reduction == "none" else None)
    kw = dict(weight=w, reduction=reduction, label_smoothing=eps)
    z = _t(4, 4, 0)
    want = _grads(lambda t: F.cross_entropy(t, Y, **kw), [z], go)
    assert want[1].isnan().any()
    _all_same(_grads(lambda t: xt.cross_entropy(t, Y, backend="triton", **kw), [z], go), want)
    x, lw = _t(4, 3, 1), _t(4, 3, 2)
    want = _grads(lambda a, b: F.cross_entropy(a @ b.T, Y, **kw), [x, lw], go)
    _all_same(_grads(lambda a, b: xt.linear_cross_entropy(a, b, Y, ignore_index=-100,
                                                          backend="triton", **kw),
                     [x, lw], go), want)


@pytest.mark.parametrize("weight", [None, [0.0, 1.0, 1.0, 1.0], [INF, 1.0, 1.0, 1.0]])
def test_vocab_parallel_partials_unweighted_z_y(weight):
    # a -inf target logit: torch's inf, NaN with a zero weight (0 x inf); an infinite
    # target weight: inf, not inf - inf; logits of 1e300
    z = torch.tensor([[-INF, 1.0, 2.0, 0.5], [0.3, 0.1, -1.0, 2.0], [1e300, -1e300, 0.0, 1.0],
                      [0.0, 1.0, 2.0, 3.0]], dtype=F64, device=DEVICE)
    y = torch.tensor([0, 1, 2, -100], device=DEVICE)
    w = None if weight is None else torch.tensor(weight, dtype=F64, device=DEVICE)
    want = _grads(lambda t: F.cross_entropy(t, y, w, reduction="none"), [z])
    _all_same(_grads(lambda t: vocab_parallel_cross_entropy(
        t, y, weight=w, reduction="none", backend="triton"), [z]), want)


def test_uint64_ids_past_int64_refused():
    t = torch.tensor([0, 2**63, 2, 1], dtype=torch.uint64, device=DEVICE)
    with pytest.raises(InputError, match="uint64"):
        xt.cross_entropy(_t(4, 4, 0), t, backend="triton")
    with pytest.raises(InputError, match="uint64"):
        xt.linear_cross_entropy(_t(4, 3, 1), _t(4, 3, 2), t, backend="triton")


def test_probability_target_float64_weight_with_float32_logits():
    z = _t(4, 5, 3, torch.float32)
    p = torch.softmax(_t(4, 5, 4), 1).float()
    w = torch.linspace(0.5, 2.0, 5, dtype=F64, device=DEVICE)
    want = _grads(lambda t: F.cross_entropy(t, p, w), [z])
    got = _grads(lambda t: xt.cross_entropy(t, p, w, backend="triton"), [z])
    for a, b in zip(got, want, strict=True):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("entry", ["cross_entropy", "vocab_parallel"])
def test_negated_view_logits(entry):
    x = _t(4, 4, 5)
    y = torch.tensor([0, 1, 2, 3], device=DEVICE)
    z = torch._neg_view(x.clone())
    assert z.is_neg()
    got = (xt.cross_entropy(z, y, backend="triton") if entry == "cross_entropy"
           else vocab_parallel_cross_entropy(z, y, backend="triton"))
    torch.testing.assert_close(got, F.cross_entropy(-x, y))


def test_shift_last_position_no_gradient_nonfinite_weight_smoothing():
    x, lw = _t(8, 3, 12).reshape(2, 4, 3), _t(5, 3, 13)
    y = torch.tensor([[0, 1, 2, 2], [3, 4, 4, 0]], device=DEVICE)
    w = torch.tensor([1.0, INF, 1.0, 1.0, 1.0], dtype=F64, device=DEVICE)
    kw = dict(weight=w, label_smoothing=0.1)
    want = _grads(lambda a, b: F.cross_entropy((a[:, :-1] @ b.T).reshape(-1, 5),
                                               y[:, 1:].reshape(-1), **kw), [x, lw])
    assert torch.equal(want[1][:, -1], torch.zeros_like(want[1][:, -1]))
    _all_same(_grads(lambda a, b: xt.linear_cross_entropy(a, b, y, shift=True,
                                                          backend="triton", **kw),
                     [x, lw]), want)


@pytest.mark.parametrize("weight,eps", [([1.0, INF, 1.0, 2.0], 0.1), ([INF, 1.0, 1.0, 1.0], 0.0)])
def test_softcap_infinite_gradient_keeps_torchs_infinities(weight, eps):
    # the kernel multiplies by 1 - tanh^2 (the row-block kernel's g - g tanh^2 gave NaN,
    # fixed: tests/torch/test_session16_fix_review.py)
    w = torch.tensor(weight, dtype=F64, device=DEVICE)
    kw = dict(reduction="sum", label_smoothing=eps)
    z = _t(4, 4, 0)
    want = _grads(lambda t: F.cross_entropy(3.0 * torch.tanh(t / 3.0), Y, w, **kw), [z])
    assert want[1].isinf().any()
    _all_same(_grads(lambda t: xt.cross_entropy(t, Y, w, softcap=3.0, backend="triton", **kw),
                     [z]), want)
