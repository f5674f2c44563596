"""Adversarial review of session 16's second wave of Triton fixes (helper H40), in the
interpreter on tiny shapes: negated views (``is_neg``: a lazy sign bit a raw pointer does
not see) of every tensor the kernels read (probability targets, class weights,
``grad_output`` as the row multiplier and the scale, the fused linear head's x/W/b, the
vocab-parallel weights), ``autograd._check`` taking any floating class weight with
probability targets, and ``shift=True`` on ``backend="triton"`` with non-finite last
positions. References: ``torch.nn.functional.cross_entropy`` in float64, NaN-exact."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

import torch.nn.functional as F  # noqa: E402
from grad_probes import assert_same_with_nans as _same  # noqa: E402

import crossent.torch as xt  # noqa: E402
from crossent.torch.distributed import vocab_parallel_cross_entropy  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: the interpreter
F64 = torch.float64
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


def _t(*shape, seed, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype).to(DEVICE)


def _neg(t):
    """``t``'s values behind a sign bit: a negated view whose memory holds ``-t``."""
    v = torch._neg_view(t.neg())
    assert v.is_neg()
    return v


def _grads(fn, leaves, grad_output=None):
    copies = [t.clone().requires_grad_() for t in leaves]
    loss = fn(*copies)
    go = torch.ones_like(loss) if grad_output is None else grad_output
    return (loss.detach(), *torch.autograd.grad(loss, copies, go))


def _all_same(got, want):
    for a, b in zip(got, want, strict=True):
        _same(a, b)


Y = torch.tensor([0, -100, 2, 1], device=DEVICE)


@pytest.mark.parametrize("what", ["weight", "prob_target", "grad_output_none",
                                  "grad_output_mean"])
def test_negated_view_inputs_of_the_triton_cross_entropy(what):
    z = _t(4, 4, seed=0)
    w = torch.tensor([0.5, 2.0, 1.5, 1.0], dtype=F64, device=DEVICE)
    target, weight, reduction, go = Y, w, "mean", None
    if what == "weight":
        weight = _neg(w)
    elif what == "prob_target":
        p = torch.softmax(_t(4, 4, seed=1), 1)
        target = _neg(p)
    elif what == "grad_output_none":
        reduction = "none"
        go = _neg(torch.tensor([-1.0, -2.0, 0.5, 3.0], dtype=F64, device=DEVICE))
    else:
        go = _neg(torch.tensor(-0.75, dtype=F64, device=DEVICE))
    plain_t = target.resolve_neg() if target.is_floating_point() else target
    assert torch.equal(weight.resolve_neg(), w)
    want = _grads(lambda t: F.cross_entropy(t, plain_t, w,
                                            reduction=reduction), [z],
                  None if go is None else go.resolve_neg())
    got = _grads(lambda t: xt.cross_entropy(t, target, weight, reduction=reduction,
                                            backend="triton"), [z], go)
    _all_same(got, want)


@pytest.mark.parametrize("neg", ["x", "w", "b"])
def test_negated_view_linear_head(neg):
    x, lw, b = _t(4, 3, seed=2), _t(5, 3, seed=3), _t(5, seed=4)
    y = torch.tensor([0, 4, -100, 2], device=DEVICE)
    args = {"x": x, "w": lw, "b": b}
    args[neg] = _neg(args[neg])
    want = F.cross_entropy(F.linear(x, lw, b), y, reduction="none")
    got = xt.linear_cross_entropy(args["x"], args["w"], y, args["b"], reduction="none",
                                  backend="triton")
    _same(got, want)


@pytest.mark.parametrize("neg", ["x", "w", "b"])
def test_negated_view_fused_linear(neg):
    from crossent.torch._triton.fused_linear import fused_linear_cross_entropy

    x, lw, b = (_t(4, 3, seed=10, dtype=torch.float32), _t(5, 3, seed=11, dtype=torch.float32),
                _t(5, seed=12, dtype=torch.float32))
    y = torch.tensor([0, 4, -100, 2], device=DEVICE)
    args = {"x": x, "w": lw, "b": b}
    args[neg] = _neg(args[neg])
    want = F.cross_entropy(F.linear(x.double(), lw.double(), b.double()), y, reduction="none")
    got = fused_linear_cross_entropy(args["x"], args["w"], y, args["b"], reduction="none")
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_negated_view_vocab_parallel_weight(smoothing):
    z = _t(4, 4, seed=5)
    w = torch.tensor([0.5, 2.0, 1.5, 1.0], dtype=F64, device=DEVICE)
    # "sum": a mean over weights of the wrong sign would be the same
    want = _grads(lambda t: F.cross_entropy(t, Y, w, reduction="sum",
                                            label_smoothing=smoothing), [z])
    got = _grads(lambda t: vocab_parallel_cross_entropy(
        t, Y, weight=_neg(w), reduction="sum", label_smoothing=smoothing,
        backend="triton"), [z])
    _all_same(got, want)


@pytest.mark.parametrize("wdtype", [torch.float16, torch.float32])
def test_probability_targets_take_any_floating_class_weight(wdtype):
    z = _t(4, 4, seed=6)
    p = torch.softmax(_t(4, 4, seed=7), 1)
    w = torch.tensor([0.5, 2.0, 1.5, 1.0], device=DEVICE).to(wdtype)
    want = _grads(lambda t: F.cross_entropy(t, p, w, label_smoothing=0.1), [z])
    got = _grads(lambda t: xt.cross_entropy(t, p, w, label_smoothing=0.1,
                                            backend="triton"), [z])
    assert got[0].dtype == want[0].dtype
    _all_same(got, want)


@pytest.mark.parametrize("where", ["last", "middle"])
def test_shift_nonfinite_positions_triton_linear(where):
    x, lw = _t(2, 4, 3, seed=8), _t(5, 3, seed=9)
    x[0, -1 if where == "last" else 1, 1] = math.inf
    y = torch.tensor([[0, 1, 2, 2], [3, -100, 4, 0]], device=DEVICE)
    want = _grads(lambda a, b: F.cross_entropy((a[:, :-1] @ b.T).reshape(-1, 5),
                                               y[:, 1:].reshape(-1), reduction="sum"),
                  [x, lw])
    got = _grads(lambda a, b: xt.linear_cross_entropy(a, b, y, shift=True, reduction="sum",
                                                      backend="triton"), [x, lw])
    _all_same(got, want)


def test_negated_view_row_multiplier_and_scale_reach_the_kernel_resolved():
    from crossent.torch._triton import cross_entropy_forward, scale_

    z = _t(4, 4, seed=13)
    go = torch.tensor([1.0, 2.0, 0.5, -3.0], dtype=F64, device=DEVICE)
    s = torch.tensor(0.25, dtype=F64, device=DEVICE)
    grad = torch.empty_like(z)
    got = cross_entropy_forward(z, Y, reduction="none", grad_out=grad,
                                row_multiplier=_neg(go), scale=_neg(s))
    leaf = z.clone().requires_grad_()
    want = F.cross_entropy(leaf, Y, reduction="none")
    (dz,) = torch.autograd.grad(want, leaf, go * s)
    _same(got.loss, want)
    _same(grad, dz)
    x = _t(3, 4, seed=14)
    f = torch.tensor([2.0, -1.0, 0.5], dtype=F64, device=DEVICE)
    _same(scale_(x.clone(), _neg(f), per_row=True), x * f[:, None])
    _same(scale_(x.clone(), _neg(s)), x * s)


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_negated_view_logits_inplace_backward(reduction):
    x = _t(4, 4, seed=15)
    want = _grads(lambda t: F.cross_entropy(t, Y, reduction=reduction), [x])
    leaf = x.clone().requires_grad_()
    z = _neg(leaf * 1.0)  # an activation behind a sign bit
    loss = xt.cross_entropy(z, Y, reduction=reduction, inplace_backward=True,
                            backend="triton")
    (dz,) = torch.autograd.grad(loss, leaf, torch.ones_like(loss))
    _all_same((loss.detach(), dz), want)


@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("cap", [None, 3.0])
def test_zero_grad_output_row_with_an_infinite_target_weight(eps, cap):
    # torch's nll backward forms 0 x w_y = NaN for the zero row, spread over it by
    # log_softmax's backward (the row-block kernel's 0.0 * mass)
    z = _t(4, 4, seed=16)
    y = torch.tensor([1, -100, 2, 1], device=DEVICE)
    w = torch.tensor([1.0, math.inf, 1.0, 2.0], dtype=F64, device=DEVICE)
    go = torch.tensor([0.0, 1.0, 2.0, 1.0], dtype=F64, device=DEVICE)
    kw = dict(reduction="none", label_smoothing=eps)

    def ref(t):
        return F.cross_entropy(t if cap is None else cap * torch.tanh(t / cap), y, w, **kw)

    want = _grads(ref, [z], go)
    assert want[1][0].isnan().all()
    _all_same(_grads(lambda t: xt.cross_entropy(t, y, w, softcap=cap, backend="triton", **kw),
                     [z], go), want)
