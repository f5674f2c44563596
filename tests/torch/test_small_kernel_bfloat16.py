"""The small-batch CPU kernel (``crossent.torch._small``) on bfloat16 logits: converted to
float32 once, softmax and gradient in float32, the gradient rounded to bfloat16 once.

References, all independent of crossent: torch's ``F.cross_entropy`` on the logits converted
to float32 (its loss and gradient rounded to bfloat16), torch in float64 (the rounding bound:
half a bfloat16 ulp of the exact gradient, plus float32's error), and torch's own bfloat16
kernel (which the kernel must be at least as accurate as). Every test asserts the route.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F

import crossent.torch as xt
from crossent.torch import _backends, _buffers, _small

pytestmark = [pytest.mark.native_dispatch, pytest.mark.timeout(120)]

BF16 = torch.bfloat16
NAN, INF = math.nan, math.inf
REDUCTIONS = ["mean", "sum", "none"]


@pytest.fixture(autouse=True)
def small_route(monkeypatch):
    monkeypatch.setattr(_backends, "SMALL_MIN_LOGITS", 1)


@contextlib.contextmanager
def taken(expected: bool = True):
    calls = []
    real = _small._SmallCrossEntropy.apply

    def spy(*args):
        calls.append(args[0].dtype)
        return real(*args)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(_small._SmallCrossEntropy, "apply", spy)
        yield
    assert bool(calls) == expected, f"the small kernel was {'not ' * expected}taken"


def _data(n=9, c=6, seed=0, ignored=(), scale=3.0):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(n, c, generator=g, dtype=torch.float64) * scale).to(BF16)
    t = torch.randint(0, c, (n,), generator=g)
    for i in ignored:
        t[i] = -100
    return z, t


def _run(fn, z, t, go=None, **kw):
    leaf = z.detach().clone().requires_grad_()
    loss = fn(leaf, t, **kw)
    loss.backward(torch.ones_like(loss) if go is None and loss.dim() else go)
    return loss.detach(), leaf.grad


def _float32_reference(z, t, go=None, **kw):
    """torch in float32 from the same bfloat16 logits (its NaN/inf pattern for any
    ``grad_output``): loss and gradient, each rounded to bfloat16 once."""
    loss, grad = _run(lambda a, b, **k: F.cross_entropy(a.float(), b, **k), z, t,
                      None if go is None else go.float(), **kw)
    return loss.to(BF16), grad


def _grad_outputs(reduction, n):
    if reduction != "none":
        return [None, *(torch.tensor(v) for v in (0.0, 2.5, -1.0, NAN, INF))]
    return [torch.linspace(-2, 2, n), torch.tensor([INF, NAN, 0.0, -INF, 1.0] * n)[:n]]


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("ignored", [(), (1, 4), tuple(range(9))], ids=["none", "some", "all"])
def test_loss_and_gradient_are_torchs_float32_rounded_once(reduction, ignored):
    z, t = _data(ignored=ignored)
    for go in _grad_outputs(reduction, 9):
        with taken():
            loss, grad = _run(xt.cross_entropy, z, t, go, reduction=reduction)
        want_loss, want_grad = _float32_reference(z, t, go, reduction=reduction)
        assert loss.dtype == grad.dtype == BF16
        # one bfloat16 ulp (float32 roundings may tip a tie either way); two where another
        # grad_output multiplies the stored bfloat16 gradient (the documented second rounding)
        rtol = 2**-7 if go is None else 2**-6
        torch.testing.assert_close(loss, want_loss, rtol=2**-7, atol=0, equal_nan=True)
        torch.testing.assert_close(grad, want_grad, rtol=rtol, atol=1e-30, equal_nan=True)


def test_gradient_within_half_an_ulp_of_float64_and_at_least_torchs_bfloat16():
    z, t = _data(n=64, c=40, seed=3, scale=4.0)
    with taken():
        _, grad = _run(xt.cross_entropy, z, t)
    _, exact = _run(F.cross_entropy, z.double(), t)
    _, torchs = _run(F.cross_entropy, z, t)  # torch's own bfloat16 kernel
    # half an ulp of bfloat16 (8 significant bits) at each entry's magnitude, + float32's
    ulp = torch.exp2(torch.floor(torch.log2(exact.abs().clamp_min(1e-38))) - 7)
    ours_err = (grad.double() - exact).abs()
    assert (ours_err <= 0.5 * ulp + 1e-6 * exact.abs() + 1e-38).all()
    assert ours_err.sum() <= (torchs.double() - exact).abs().sum()


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_underflowing_target_probability_and_non_finite_logits(reduction):
    z, t = _data(n=8, c=5)
    z[0, t[0]] = -200.0  # p_y underflows float32: the log_softmax path
    z[1, 2] = NAN
    z[2, 0] = INF
    z[3, 1] = -INF
    t[4] = -100
    z[4, 0] = NAN  # an ignored row's NaN: its loss 0, its gradient NaN (torch's)
    with taken():
        loss, grad = _run(xt.cross_entropy, z, t, reduction=reduction)
    want_loss, want_grad = _float32_reference(z, t, reduction=reduction)
    torch.testing.assert_close(loss, want_loss, rtol=2**-7, atol=0, equal_nan=True)
    torch.testing.assert_close(grad, want_grad, rtol=2**-7, atol=1e-30, equal_nan=True)


def test_backward_twice_and_double_backward_recompute_in_float32():
    z, t = _data()
    a = z.detach().clone().requires_grad_()
    with taken():
        loss = xt.cross_entropy(a, t)
    first, = torch.autograd.grad(loss, a, retain_graph=True)
    again, = torch.autograd.grad(loss, a, retain_graph=True)
    (g,) = torch.autograd.grad(loss, a, create_graph=True)
    (h,) = torch.autograd.grad(g.float().square().sum(), a)
    r = z.detach().clone().requires_grad_()
    ref = F.cross_entropy(r.float(), t)
    (rg,) = torch.autograd.grad(ref, r, create_graph=True)
    (rh,) = torch.autograd.grad(rg.float().square().sum(), r)
    torch.testing.assert_close(first, rg.detach(), rtol=2**-7, atol=1e-30)
    torch.testing.assert_close(again, rg.detach(), rtol=2**-7, atol=1e-30)
    torch.testing.assert_close(g.detach(), rg.detach(), rtol=2**-7, atol=1e-30)
    torch.testing.assert_close(h, rh, rtol=2**-6, atol=1e-6)


def test_route_takes_bfloat16_but_not_float16_or_label_smoothing():
    z, t = _data()
    with taken():
        xt.cross_entropy(z.requires_grad_(), t)
    with taken(False):
        xt.cross_entropy(z.detach().half().requires_grad_(), t)
    with taken(False):
        xt.cross_entropy(z.detach().requires_grad_(), t, label_smoothing=0.1)
    with taken(False):  # no gradient needed: torch's kernel
        xt.cross_entropy(z.detach(), t)


def test_autocast_and_loss_dtype():
    z, t = _data()
    a = z.detach().clone().requires_grad_()
    with taken():
        loss = xt.cross_entropy(a, t, loss_dtype=torch.float32)
    assert loss.dtype == torch.float32
    loss.backward()
    _, want_grad = _float32_reference(z, t)
    torch.testing.assert_close(loss, F.cross_entropy(z.float(), t))
    torch.testing.assert_close(a.grad, want_grad, rtol=2**-7, atol=1e-30)


@pytest.mark.parametrize("dtype", [torch.float32, BF16, torch.float64])
def test_pooled_buffers_never_overwrite_a_gradient_still_held(dtype):
    """The kernel's N x C buffers come from crossent's pool (``_buffers``): a gradient the
    caller still holds is never handed out again, one dropped is (no fresh pages)."""
    z, t = _data(n=64, c=40)
    held, refs = [], []
    for step in range(3):
        zs = (z.double() * (step + 1)).to(dtype)
        a = zs.clone().requires_grad_()
        with taken():
            xt.cross_entropy(a, t).backward()
        held.append(a.grad)
        r = zs.clone().requires_grad_()
        F.cross_entropy(r.float(), t).backward()
        refs.append(r.grad)
    for got, want in zip(held, refs, strict=True):  # none overwritten by a later step
        torch.testing.assert_close(got, want, rtol=2**-7, atol=1e-30)
    assert len({g.data_ptr() for g in held}) == 3
    a = z.to(dtype).requires_grad_()
    with taken():
        (g,) = torch.autograd.grad(xt.cross_entropy(a, t), a)
    pooled = {e.ptr for e in _buffers._pool}
    # float64 hands backward a copy (every backward the same bits, for gradcheck)
    assert (g.untyped_storage().data_ptr() in pooled) == (dtype != torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, BF16, torch.float64])
def test_underflowing_rows_among_others_take_log_softmax_for_those_rows_only(dtype):
    # rows 0, 3, 7: p_y underflows (float64: under 1e-30 too), row 3 is ignored, row 5 is
    # NaN; every other row from -log p_y; per-row losses as torch's in float64
    z, t = _data(n=10, c=7, seed=5)
    z = z.double()
    for row in (0, 3, 7):
        z[row, t[row]] = -120.0 if dtype == BF16 else -200.0
    t[3] = -100
    z[5, 1] = NAN
    z = z.to(dtype)
    calls = []
    real = torch.log_softmax

    def spy(x, *args, **kwargs):
        calls.append(x.shape[0])
        return real(x, *args, **kwargs)

    with taken(), pytest.MonkeyPatch.context() as m:
        m.setattr(torch, "log_softmax", spy)
        loss, grad = _run(xt.cross_entropy, z, t, reduction="none")
    assert calls == [3]  # rows 0, 5 (NaN) and 7: not the whole logits, not the ignored row
    want, want_grad = _run(F.cross_entropy, z.double(), t, reduction="none")
    tol = {"rtol": 2**-7, "atol": 1e-30} if dtype == BF16 else {"rtol": 1e-6, "atol": 1e-30}
    torch.testing.assert_close(loss.double(), want, equal_nan=True, **tol)
    torch.testing.assert_close(grad.double(), want_grad, equal_nan=True, **tol)
