"""The small-batch route (issue 16): ``backend="auto"`` sends small CPU batches with index
targets and no class weights, smoothing, z-loss or softcap to
:func:`crossent.torch._rowblock.small_cross_entropy`. Here every such call takes it (the
size thresholds opened), and values and every gradient are torch's (float64 references)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import crossent.torch as xt
from crossent.errors import UnsupportedError
from crossent.torch import _backends, _rowblock


@pytest.fixture(autouse=True)
def small_route(monkeypatch):
    """Every eligible call below 2**40 logits takes the small route; count its kernel."""
    monkeypatch.setattr(_backends, "NATIVE_MAX_LOGITS", 1 << 40)
    monkeypatch.setattr(_backends, "SMALL_MIN_LOGITS", 0)
    calls = {"small": 0, "block": 0}
    small, block = _rowblock.small_cross_entropy, _rowblock.cross_entropy_rows

    def count_small(*args, **kwargs):
        calls["small"] += 1
        return small(*args, **kwargs)

    def count_block(*args, **kwargs):
        calls["block"] += 1
        return block(*args, **kwargs)

    from crossent.torch import _cross_entropy

    monkeypatch.setattr(_cross_entropy, "small_cross_entropy", count_small)
    monkeypatch.setattr(_cross_entropy, "cross_entropy_rows", count_block)
    return calls


def data(n=37, c=23, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(n, c, generator=g, dtype=torch.float64) * 3).to(dtype)
    y = torch.randint(0, c, (n,), generator=g)
    y[::5] = -100
    return z, y


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("inplace", [False, True])
def test_values_and_gradients_are_torchs(small_route, reduction, dtype, inplace):
    z, y = data(dtype=dtype)
    ref_z = z.double().clone().requires_grad_()  # the same (rounded) logits, in float64
    weights = torch.linspace(0.5, 2.0, y.numel(), dtype=torch.float64)  # a grad_output per row
    want = F.cross_entropy(ref_z, y, reduction=reduction)
    (want * weights).sum().backward() if reduction == "none" else want.backward()
    a = z.clone().requires_grad_()
    got = xt.cross_entropy(a, y, reduction=reduction, inplace_backward=inplace)
    assert small_route == {"small": 1, "block": 0}
    (got * weights.to(got.dtype)).sum().backward() if reduction == "none" else got.backward()
    tol = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 1e-2,
           torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(got.double(), want.detach(), rtol=tol, atol=tol)
    torch.testing.assert_close(a.grad.double(), ref_z.grad, rtol=tol, atol=tol)
    assert a.grad.dtype == dtype


def test_num_items_divides_the_sum(small_route):
    z, y = data()
    a = z.clone().requires_grad_()
    got = xt.cross_entropy(a, y, num_items=11)
    got.backward()
    b = z.clone().requires_grad_()
    (F.cross_entropy(b, y, reduction="sum") / 11).backward()
    torch.testing.assert_close(got, F.cross_entropy(z, y, reduction="sum") / 11)
    torch.testing.assert_close(a.grad, b.grad)
    assert small_route["small"] == 1


def test_underflowing_target_falls_back_to_the_block_kernel(small_route):
    z, y = data()
    y[1] = 3
    z[1, 3] = -1e4  # p_y = 0 in float64: nll from the row max
    a = z.clone().requires_grad_()
    got = xt.cross_entropy(a, y)
    got.backward()
    b = z.clone().requires_grad_()
    F.cross_entropy(b, y).backward()
    assert small_route == {"small": 1, "block": 1}
    torch.testing.assert_close(got, F.cross_entropy(z, y), rtol=1e-12, atol=0)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-15)


def test_nan_logits_stay_in_their_row(small_route):
    z, y = data()
    z[2, 0] = float("nan")
    got = xt.cross_entropy(z, y, reduction="none")
    want = F.cross_entropy(z, y, reduction="none")
    torch.testing.assert_close(got, want, equal_nan=True)


def test_all_ignored_and_empty_batches(small_route):
    z = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    y = torch.full((4,), -100)
    loss = xt.cross_entropy(z, y)
    assert loss.isnan()  # 0/0, as torch
    loss.backward()
    assert bool((z.grad == 0).all())
    e = torch.randn(0, 6, requires_grad=True)
    out = xt.cross_entropy(e, torch.zeros(0, dtype=torch.long))
    assert out.isnan() and F.cross_entropy(e, torch.zeros(0, dtype=torch.long)).isnan()


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32])
def test_narrow_integer_targets_do_not_wrap(small_route, dtype):
    z = torch.randn(3, 300, dtype=torch.float64)
    y = torch.tensor([255, 156, 0], dtype=dtype)  # uint8 156 is -100 wrapped: not ignored
    got = xt.cross_entropy(z, y, reduction="none")
    torch.testing.assert_close(got, F.cross_entropy(z, y.long(), reduction="none"))


def test_out_of_range_class_raises_index_error(small_route):
    z, y = data()
    y[4] = 23
    with pytest.raises(IndexError, match="23"):
        xt.cross_entropy(z, y)
    y[4] = -3
    with pytest.raises(IndexError, match="-3"):
        xt.cross_entropy(z, y)


def test_in_range_ignore_index(small_route):
    z, y = data()
    y[y == -100] = 0
    got = xt.cross_entropy(z, y, ignore_index=0)
    torch.testing.assert_close(got, F.cross_entropy(z, y, ignore_index=0))


def test_double_backward_and_backward_twice(small_route):
    z, y = data(n=6, c=5)
    a = z.clone().requires_grad_()
    (g,) = torch.autograd.grad(xt.cross_entropy(a, y), a, create_graph=True)
    b = z.clone().requires_grad_()
    (h,) = torch.autograd.grad(F.cross_entropy(b, y), b, create_graph=True)
    torch.testing.assert_close(g, h)
    torch.testing.assert_close(torch.autograd.grad(g.square().sum(), a)[0],
                               torch.autograd.grad(h.square().sum(), b)[0])
    c = z.clone().requires_grad_()
    loss = xt.cross_entropy(c, y)
    loss.backward(retain_graph=True)
    loss.backward()  # float64: the stored gradient is kept (gradcheck)
    f = z.float().requires_grad_()
    loss = xt.cross_entropy(f, y)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        loss.backward()


def test_gradcheck(small_route):
    z, y = data(n=5, c=4)
    assert torch.autograd.gradcheck(lambda t: xt.cross_entropy(t, y),
                                    (z.clone().requires_grad_(),))


def test_no_grad_and_module(small_route):
    z, y = data()
    with torch.no_grad():
        got = xt.cross_entropy(z.requires_grad_(), y)
    torch.testing.assert_close(got, F.cross_entropy(z.detach(), y))
    torch.testing.assert_close(xt.CrossEntropyLoss()(z.detach(), y),
                               F.cross_entropy(z.detach(), y))


def test_options_it_lacks_take_another_route(small_route):
    z, y = data()
    xt.cross_entropy(z, y, label_smoothing=0.1)
    xt.cross_entropy(z, y, z_loss=1e-3)
    xt.cross_entropy(z, y, weight=torch.rand(23, dtype=torch.float64))
    xt.cross_entropy(z, torch.softmax(z, 1))
    xt.cross_entropy(z, y, backend="rowblock")  # forced: always the block kernel
    assert small_route["small"] == 0


def test_statistics_take_another_route(small_route):
    z, y = data()
    _, stats = xt.cross_entropy(z, y, statistics="lse")
    assert small_route["small"] == 0
    torch.testing.assert_close(stats.lse[y != -100], torch.logsumexp(z, 1)[y != -100])


def test_target_weight_gradient_refusal_is_unchanged(small_route):
    z, y = data()
    with pytest.raises(UnsupportedError, match="weight"):
        xt.cross_entropy(z, y, torch.ones(23, dtype=torch.float64, requires_grad=True))


def test_auto_thresholds_choose_small_only_inside_its_band(monkeypatch):
    monkeypatch.setattr(_backends, "SMALL_MIN_LOGITS", 1 << 15)
    monkeypatch.setattr(_backends, "NATIVE_MAX_LOGITS", 1 << 19)
    cpu = torch.device("cpu")

    def route(n, small=True, device=cpu):
        call = _backends.Call("cross_entropy", device, n, True, 0.0, None, small=small)
        return _backends.choose_backend("auto", call, _backends.NATIVE_MAX_LOGITS)

    assert route(1 << 10) == "native"
    assert route(1 << 15) == "small"
    assert route((1 << 19) - 1) == "small"
    assert route(1 << 19) == "rowblock"
    assert route(1 << 16, small=False) == "native"
    assert route(1 << 16, device=torch.device("meta")) == "native"
