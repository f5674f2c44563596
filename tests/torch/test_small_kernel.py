"""The fused small-batch CPU route of ``crossent.torch.cross_entropy`` (``_small``, issue 16),
tested like an adversary against independent references: torch's own
``F.cross_entropy`` (same dtype, and float64), ``log_softmax``, ``gradcheck`` and
``gradgradcheck``. Never a value copied from crossent's own output.

``SMALL_MIN_LOGITS`` is lowered to 1 (fixture) so that small shapes take the route, and every
test asserts the route was really taken (a spy on ``_SmallCrossEntropy.apply``) or, for the
calls that must not take it, that it was not.
"""

from __future__ import annotations

import contextlib
import math
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.overrides import TorchFunctionMode

import crossent.torch as xt
from crossent.torch import _backends, _small

pytestmark = [pytest.mark.native_dispatch, pytest.mark.timeout(120)]

REAL_SMALL_MIN_LOGITS = _backends.SMALL_MIN_LOGITS
NAN, INF = math.nan, math.inf
DTYPES = [torch.float32, torch.float64]
REDUCTIONS = ["mean", "sum", "none"]

_CALLS: list[int] = []  # one entry per _SmallCrossEntropy.apply (any thread)


@pytest.fixture(autouse=True)
def small_route(monkeypatch):
    """Small shapes take the route; a spy counts the calls that reach its autograd
    Function."""
    monkeypatch.setattr(_backends, "SMALL_MIN_LOGITS", 1)
    real = _small._SmallCrossEntropy.apply

    def spy(*args):
        _CALLS.append(1)
        return real(*args)

    monkeypatch.setattr(_small._SmallCrossEntropy, "apply", spy)


@contextlib.contextmanager
def route(taken: bool = True):
    """Asserts that the calls in the block did (or did not) reach the small kernel."""
    before = len(_CALLS)
    yield
    assert (len(_CALLS) > before) == taken, (
        "the small route was " + ("not taken" if taken else "taken"))


def _data(n=7, c=5, dtype=torch.float32, seed=0, ignored=(), ignore_index=-100, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(n, c, generator=g, dtype=torch.float64) * scale).to(dtype)
    t = torch.randint(0, c, (n,), generator=g)
    for i in ignored:
        t[i] = ignore_index
    return z, t


def _torch(z, t, go=None, **kw):
    """torch's loss and logits gradient (a fresh leaf; ``go`` None: ``backward()``, ones
    for "none")."""
    leaf = z.detach().clone().requires_grad_()
    loss = F.cross_entropy(leaf, t.long(), **kw)
    loss.backward(torch.ones_like(loss) if go is None and loss.dim() else go)
    return loss.detach(), leaf.grad


def _ours(z, t, go=None, taken=True, **kw):
    leaf = z.detach().clone().requires_grad_()
    with route(taken):
        loss = xt.cross_entropy(leaf, t, **kw)
    if taken and z.dim() == 2 and loss.dtype == z.dtype and "num_items" not in kw:
        assert "SmallCrossEntropy" in loss.grad_fn.name()
    loss.backward(torch.ones_like(loss) if go is None and loss.dim() else go)
    return loss.detach(), leaf.grad


def _close(got, want, **tol):
    """Values, NaN and infinity positions (and signs) as torch's."""
    torch.testing.assert_close(got, want, equal_nan=True, **tol)


def _same_as_torch(z, t, go=None, **kw):
    loss, grad = _ours(z, t, go, **kw)
    want_loss, want_grad = _torch(z, t, go, **kw)
    _close(loss, want_loss)
    _close(grad, want_grad)
    return loss, grad


def _grad_outputs(reduction, n, dtype):
    """Random and special grad_outputs: 1, 0, 2.5, -1, NaN, +inf, -inf (per row for
    "none", with mixed non-finite rows)."""
    if reduction != "none":
        return [None] + [torch.tensor(v, dtype=dtype)
                         for v in (1.0, 0.0, 2.5, -1.0, NAN, INF, -INF, 0.37)]
    g = torch.Generator().manual_seed(5)
    special = torch.tensor([INF, NAN, -INF, 0.0, 2.5, -1.0, 1.0] * n, dtype=dtype)[:n]
    return [torch.ones(n, dtype=dtype), torch.zeros(n, dtype=dtype),
            torch.randn(n, generator=g, dtype=torch.float64).to(dtype), special,
            torch.arange(2.0 * n, dtype=dtype)[::2] - 3,  # a strided grad_output
            torch.tensor(0.5, dtype=dtype).expand(n),  # stride 0, as loss.mean() sends
            special.flip(0), torch.full((n,), INF, dtype=dtype),
            torch.full((n,), NAN, dtype=dtype)]


# ---- values and gradients: every reduction x ignored rows x dtype x grad_output


IGNORED = {"no": (), "some": (1, 4), "all": tuple(range(7))}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ignored", list(IGNORED))
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_loss_and_gradient_match_torch_for_every_grad_output(reduction, ignored, dtype):
    z, t = _data(7, 5, dtype, ignored=IGNORED[ignored])
    for go in _grad_outputs(reduction, 7, dtype):
        _same_as_torch(z, t, go, reduction=reduction)
    # and torch in float64: the float32 route is as accurate as torch's own kernel
    loss, grad = _ours(z, t, reduction=reduction) if reduction != "none" else (None, None)
    if loss is not None:
        want_loss, want_grad = _torch(z.double(), t, reduction=reduction)
        _close(loss.double(), want_loss, rtol=1e-5, atol=1e-6)
        _close(grad.double(), want_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_wide_rows_and_single_class(dtype):
    z, t = _data(3, 1000, dtype, ignored=(1,), scale=8.0)
    for reduction in REDUCTIONS:
        go = None if reduction != "none" else torch.tensor([2.0, INF, -0.5], dtype=dtype)
        _same_as_torch(z, t, go, reduction=reduction)
    one = torch.randn(4, 1, dtype=dtype)  # C = 1: loss 0, gradient 0
    _same_as_torch(one, torch.zeros(4, dtype=torch.long))
    _same_as_torch(one, torch.tensor([0, -100, 0, 0]), reduction="sum")
    single = torch.randn(1, 6, dtype=dtype)  # N = 1
    _same_as_torch(single, torch.tensor([3]))


# ---- non-finite logits, in counted and ignored rows


def _non_finite_logits(dtype):
    z, t = _data(12, 5, dtype, seed=3)
    t[:] = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1])
    z[0, 0] = NAN  # NaN at the target
    z[1, 3] = NAN  # NaN elsewhere
    z[2, 0] = INF  # +inf elsewhere
    z[3, 3] = INF  # +inf at the target
    z[4, 1] = -INF  # -inf elsewhere
    z[5, 0] = -INF  # -inf at the target: loss inf
    z[6] = -INF  # a whole row -inf
    z[7, :] = INF  # a whole row +inf
    z[8, 2:] = -INF  # -inf at the target and beyond
    return z, t


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("ignored_rows", [(), (0, 2, 6, 9), tuple(range(12))])
def test_non_finite_logits_give_torch_nan_and_inf_pattern(reduction, ignored_rows, dtype):
    z, t = _non_finite_logits(dtype)
    t[list(ignored_rows)] = -100
    for go in _grad_outputs(reduction, 12, dtype):
        _same_as_torch(z, t, go, reduction=reduction)


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_finite_logits_only_in_ignored_rows(dtype):
    """A non-finite logit in an ignored row: torch's loss is finite (the row is skipped) and
    its gradient is 0 there except where the row's softmax is NaN."""
    z, t = _data(6, 4, dtype, seed=8)
    z[1, 2], z[3] = NAN, -INF
    z[4, 0] = INF
    t[[1, 3, 4]] = -100
    for reduction in REDUCTIONS:
        for go in _grad_outputs(reduction, 6, dtype):
            loss, _ = _same_as_torch(z, t, go, reduction=reduction)
            assert torch.isfinite(loss).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_target_probability_underflows_and_nll_stays_finite(dtype):
    """p_y = 0 (or below 1e-30) in the dtype: the row's nll is log_softmax's, finite."""
    deep = -200.0 if dtype == torch.float32 else -1000.0
    z = torch.zeros(6, 4, dtype=dtype)
    t = torch.tensor([0, 1, 2, 3, 0, 1])
    z[0, 0] = deep  # p_y underflows to 0
    z[1, 1] = -69.0  # p_y ~ 1e-30 / 4: just under the switch
    z[2, 2] = -67.0  # p_y ~ 2e-30: just above it
    z[3, 3] = -40.0
    z[4, 1] = 100.0  # a dominant other class: p_y = exp(-100)
    z[5] = torch.tensor([-300.0, 0.0, 1e-3, -5.0], dtype=dtype)
    want = -torch.log_softmax(z.double(), 1).gather(1, t[:, None]).squeeze(1)
    for reduction in REDUCTIONS:
        loss, _ = _same_as_torch(z, t, reduction=reduction)
        assert torch.isfinite(loss).all()
    loss, grad = _ours(z, t, reduction="none", go=torch.ones(6, dtype=dtype))
    _close(loss.double(), want, rtol=1e-6, atol=1e-6)
    assert torch.isfinite(grad).all()
    # only the well-behaved rows: the other branch (-log p_y), still torch's
    _same_as_torch(z[3:4], t[3:4], reduction="none", go=torch.ones(1, dtype=dtype))


# ---- ignore_index


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ignore_index", [2, 0, 4, 10**12, -(1 << 63), -1])
def test_ignore_index_inside_and_outside_the_classes(ignore_index, dtype):
    z, t = _data(8, 5, dtype, seed=11)
    t[[0, 5]] = ignore_index
    for reduction in REDUCTIONS:
        for go in _grad_outputs(reduction, 8, dtype)[::2]:
            _same_as_torch(z, t, go, reduction=reduction, ignore_index=ignore_index)
    if not 0 <= ignore_index < 5:
        return
    # every target the ignored class: "mean" NaN, gradient 0, as torch
    t_all = torch.full((8,), ignore_index)
    for reduction in REDUCTIONS:
        _same_as_torch(z, t_all, None if reduction != "none" else torch.ones(8, dtype=dtype),
                       reduction=reduction, ignore_index=ignore_index)


# ---- out-of-range targets: torch's IndexError on the fast and the checked paths


@pytest.mark.parametrize("bad", [5, -1, -101, 1 << 40])
@pytest.mark.parametrize("target_dtype", [torch.int64, torch.int32])
def test_out_of_range_target_raises_torchs_index_error(bad, target_dtype):
    if target_dtype == torch.int32 and bad == 1 << 40:
        bad = (1 << 31) - 1
    z = torch.randn(4, 5, requires_grad=True)
    t = torch.tensor([1, bad, -100, 0])
    with pytest.raises(IndexError) as torch_error:
        F.cross_entropy(z, t)
    t = t.to(target_dtype)
    for kw in ({}, {"reduction": "none"}, {"num_items": 3}, {"reduction": "sum"}):
        with route(False), pytest.raises(IndexError) as ours:
            xt.cross_entropy(z, t, **kw)
        assert str(ours.value) == str(torch_error.value)
    # (N, C, d) through the checked path
    z3 = torch.randn(2, 5, 3, requires_grad=True)
    t3 = torch.tensor([[0, bad, 1], [2, 3, 4]]).to(target_dtype)
    with route(False), pytest.raises(IndexError):
        xt.cross_entropy(z3, t3)
    assert z.grad is None


# ---- views: transposed, sliced, expanded logits


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_logits(dtype):
    g = torch.Generator().manual_seed(2)
    base = torch.randn(6, 9, generator=g, dtype=torch.float64).to(dtype)
    t = torch.tensor([0, 3, -100, 4, 1, 2])
    for reduction in REDUCTIONS:
        go = None if reduction != "none" else torch.arange(6, dtype=dtype) - 2.5
        for make in (lambda b: b.t()[:6, :5],  # transposed view (6, 5) of (9, 6)
                     lambda b: b[:, 2:7],  # a column slice
                     lambda b: b[::2, ::2].repeat(2, 1),  # strided, then a fresh tensor
                     lambda b: b[:1, :5].expand(6, 5)):  # every row the same memory
            leaf = base.clone().requires_grad_()
            view = make(leaf)
            assert view.shape == (6, 5)
            with route():
                loss = xt.cross_entropy(view, t, reduction=reduction)
            loss.backward(go)
            ref_leaf = base.clone().requires_grad_()
            want = F.cross_entropy(make(ref_leaf), t, reduction=reduction)
            want.backward(go)
            _close(loss.detach(), want.detach())
            _close(leaf.grad, ref_leaf.grad)
            torch.testing.assert_close(leaf.detach(), base)  # logits intact


# ---- the checked path: (N, C, d1, d2), int32 targets, num_items, loss_dtype, statistics


@pytest.mark.parametrize("target_dtype", [torch.int64, torch.int32, torch.int16, torch.uint8])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_spatial_input_and_narrow_targets(reduction, target_dtype):
    g = torch.Generator().manual_seed(4)
    z = torch.randn(2, 5, 3, 4, generator=g, dtype=torch.float64)
    t = torch.randint(0, 5, (2, 3, 4), generator=g)
    if target_dtype != torch.uint8:
        t[0, 1, 2] = t[1, 0, 0] = -100
    go = (torch.randn(2, 3, 4, generator=g, dtype=torch.float64) if reduction == "none"
          else torch.tensor(1.5, dtype=torch.float64))
    go_none = go.clone() if reduction == "none" else go
    if reduction == "none":
        go_none[0, 0, 0], go_none[1, 2, 3] = INF, NAN
    for dtype in DTYPES:
        for g_out in (go, go_none):
            leaf = z.to(dtype).requires_grad_()
            with route():
                loss = xt.cross_entropy(leaf, t.to(target_dtype), reduction=reduction)
            loss.backward(g_out.to(dtype))
            ref = z.to(dtype).requires_grad_()
            want = F.cross_entropy(ref, t, reduction=reduction)
            want.backward(g_out.to(dtype))
            assert loss.shape == want.shape and loss.dtype == want.dtype
            _close(loss.detach(), want.detach())
            _close(leaf.grad, ref.grad)


def test_unbatched_input_and_parameter_logits():
    z = torch.randn(7, dtype=torch.float64)
    for target in (torch.tensor(3), torch.tensor(-100)):
        for reduction in REDUCTIONS:
            _same_as_torch(z, target, reduction=reduction)
    w = torch.nn.Parameter(torch.randn(5, 6))  # a Parameter: the route (checked path)
    t = torch.tensor([0, 5, -100, 2, 2])
    with route():
        loss = xt.cross_entropy(w, t)
    loss.backward()
    want_loss, want_grad = _torch(w.detach(), t)
    _close(loss.detach(), want_loss)
    _close(w.grad, want_grad)

    class Traced(torch.Tensor):  # a subclass with __torch_function__: torch's kernel
        pass

    leaf = w.detach().clone().requires_grad_()
    with route(False):
        loss = xt.cross_entropy(leaf.as_subclass(Traced), t)
    loss.backward()
    _close(loss.detach().as_subclass(torch.Tensor), want_loss)
    _close(leaf.grad, want_grad)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("num_items", [3, 7.5, torch.tensor(11)])
def test_num_items_divides_the_sum(num_items, reduction, dtype):
    z, t = _data(9, 6, dtype, ignored=(2, 3))
    count = float(num_items)
    for go in (None, torch.tensor(2.0, dtype=dtype), torch.tensor(INF, dtype=dtype)):
        loss, grad = _ours(z, t, go, reduction=reduction, num_items=num_items)
        leaf = z.clone().requires_grad_()
        want = F.cross_entropy(leaf, t, reduction="sum") / count
        want.backward(go)
        _close(loss, want.detach())
        _close(grad, leaf.grad)
        assert loss.dtype == dtype


@pytest.mark.parametrize("loss_dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_loss_dtype(loss_dtype, reduction):
    z, t = _data(6, 4, torch.float32, ignored=(1,))
    leaf = z.clone().requires_grad_()
    with route():
        loss = xt.cross_entropy(leaf, t, reduction=reduction, loss_dtype=loss_dtype)
    assert loss.dtype == loss_dtype
    ref = z.clone().requires_grad_()
    want = F.cross_entropy(ref, t, reduction=reduction)
    go = torch.linspace(-1, 2, 6) if reduction == "none" else torch.tensor(3.0)
    loss.backward(go.to(loss_dtype))
    want.backward(go.to(loss_dtype).float())
    _close(loss, want.detach().to(loss_dtype))
    _close(leaf.grad, ref.grad)


@pytest.mark.parametrize("dtype", DTYPES)
def test_statistics_from_the_same_call(dtype):
    z, t = _data(6, 5, dtype, ignored=(2,))
    z[4, 1] = z[4].max() + 1  # argmax known
    names = ("lse", "z_loss", "target_logprob", "accuracy", "entropy")
    for reduction in REDUCTIONS:
        leaf = z.clone().requires_grad_()
        with route():
            loss, stats = xt.cross_entropy(leaf, t, reduction=reduction, statistics=names)
        go = torch.ones(6, dtype=dtype) if reduction == "none" else None
        loss.backward(go)
        want_loss, want_grad = _torch(z, t, go, reduction=reduction)
        _close(loss.detach(), want_loss)
        _close(leaf.grad, want_grad)
        valid = t != -100
        zd = z.double()
        logp = torch.log_softmax(zd, 1)
        safe = torch.where(valid, t, 0)
        expect = {
            "lse": torch.logsumexp(zd, 1),
            "z_loss": torch.zeros(6, dtype=torch.float64),
            "target_logprob": logp.gather(1, safe[:, None]).squeeze(1),
            "entropy": -(logp.exp() * logp).sum(1),
        }
        for name, value in expect.items():
            got = getattr(stats, name).double()
            _close(got[valid], value[valid], rtol=1e-5, atol=1e-5)
            assert got[~valid].isnan().all() or name == "z_loss"
        assert torch.equal(stats.counted, valid)
        assert torch.equal(stats.accuracy, valid & (zd.argmax(1) == t))


# ---- autograd: backward twice, in-place changes, double backward, gradcheck


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_backward_through_a_retained_graph_three_times(reduction, dtype):
    z, t = _data(5, 4, dtype, ignored=(2,))
    leaf, ref = z.clone().requires_grad_(), z.clone().requires_grad_()
    with route():
        loss = xt.cross_entropy(leaf, t, reduction=reduction)
    want = F.cross_entropy(ref, t, reduction=reduction)
    shape = (5,) if reduction == "none" else ()
    for value in (1.0, 2.5, INF, -0.5):
        go = torch.full(shape, value, dtype=dtype)
        got = torch.autograd.grad(loss, leaf, go, retain_graph=True)[0]
        expected = torch.autograd.grad(want, ref, go, retain_graph=True)[0]
        _close(got, expected)
    loss.backward(torch.ones(shape, dtype=dtype), retain_graph=True)
    loss.backward(torch.ones(shape, dtype=dtype))  # accumulates: twice torch's gradient
    want.backward(torch.full(shape, 2.0, dtype=dtype))
    _close(leaf.grad, ref.grad)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("create_graph", [False, True])
def test_logits_changed_in_place_between_two_backwards(create_graph, dtype):
    """A second backward that recomputes from the changed logits raises, naming crossent;
    one that reuses the gradient formed in forward (float64 keeps it) gives torch's numbers
    (torch saves log_softmax's output, not the logits: it does not raise)."""
    z, t = _data(5, 4, dtype)
    leaf, ref = z.clone().requires_grad_(), z.clone().requires_grad_()
    logits, ref_logits = leaf * 1.0, ref * 1.0  # non-leaves that can be changed in place
    with route():
        loss = xt.cross_entropy(logits, t)
    want = F.cross_entropy(ref_logits, t)
    first = torch.autograd.grad(loss, leaf, retain_graph=True)[0]
    _close(first, torch.autograd.grad(want, ref, retain_graph=True)[0])
    with torch.no_grad():
        logits.add_(1.0)
        ref_logits.add_(1.0)
    if create_graph or dtype == torch.float32:
        with pytest.raises(RuntimeError, match=r"crossent\.torch\.cross_entropy"):
            torch.autograd.grad(loss, leaf, create_graph=create_graph)
    else:
        _close(torch.autograd.grad(loss, leaf)[0], torch.autograd.grad(want, ref)[0])


def test_target_changed_in_place_before_backward_raises_as_torch():
    """torch saves the target for nll_loss's backward: changing it in place before backward
    raises there. The small route must raise too, or give torch's numbers: it must not hand
    back a gradient that mixes the old target and the new one."""
    z, t = _data(5, 4)
    t_torch = t.clone()
    ref = z.clone().requires_grad_()
    want = F.cross_entropy(ref, t_torch)
    t_torch[0] = (t_torch[0] + 1) % 4
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        want.backward(torch.tensor(INF))
    leaf = z.clone().requires_grad_()
    with route():
        loss = xt.cross_entropy(leaf, t)
    t[0] = (t[0] + 1) % 4
    with pytest.raises(RuntimeError, match=r"crossent\.torch\.cross_entropy"):
        loss.backward(torch.tensor(INF))
    # a target made in inference mode cannot be saved for backward: torch raises, so must we
    with torch.inference_mode():
        frozen = torch.tensor([0, 1, 2, 3, -100])
    with pytest.raises(RuntimeError, match=r"[Ii]nference"):
        F.cross_entropy(z.clone().requires_grad_(), frozen).backward()
    with pytest.raises(RuntimeError, match=r"[Ii]nference"):
        xt.cross_entropy(z.clone().requires_grad_(), frozen).backward()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_create_graph_hessian_vector_products_match_torch(reduction, dtype):
    z, t = _data(6, 5, dtype, ignored=(3,))
    g = torch.Generator().manual_seed(9)
    v = torch.randn(6, 5, generator=g, dtype=torch.float64).to(dtype)
    go = (torch.randn(6, generator=g, dtype=torch.float64).to(dtype) if reduction == "none"
          else torch.tensor(1.7, dtype=dtype))
    results = []
    for fn, taken in ((xt.cross_entropy, True), (F.cross_entropy, False)):
        leaf = z.clone().requires_grad_()
        with route(taken):
            loss = fn(leaf, t, reduction=reduction)
        (grad,) = torch.autograd.grad(loss, leaf, go, create_graph=True)
        (hv,) = torch.autograd.grad((grad * v).sum(), leaf, retain_graph=True)
        penalty = grad.square().sum()
        penalty.backward(retain_graph=True)  # a gradient penalty: d|g|^2/dz
        loss.backward(go)  # then a plain backward through the same graph
        results.append((grad.detach(), hv, leaf.grad))
    for got, want in zip(*results, strict=True):
        _close(got, want)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck_and_gradgradcheck(reduction):
    z, t = _data(3, 4, torch.float64, ignored=(1,))
    z.requires_grad_()
    with route():
        assert torch.autograd.gradcheck(
            lambda x: xt.cross_entropy(x, t, reduction=reduction), (z,))
    with route():
        assert torch.autograd.gradgradcheck(
            lambda x: xt.cross_entropy(x, t, reduction=reduction), (z,))
    t_all = torch.tensor([0, 3, 2])
    with route():
        assert torch.autograd.gradcheck(
            lambda x: xt.cross_entropy(x, t_all, reduction=reduction, ignore_index=3), (z,))


def test_gradients_accumulate_over_two_steps():
    z, t = _data(6, 5, ignored=(0,))
    leaf = z.clone().requires_grad_()
    ref = z.clone().requires_grad_()
    for step, reduction in enumerate(("mean", "none")):
        with route():
            loss = xt.cross_entropy(leaf * (step + 1), t, reduction=reduction)
        want = F.cross_entropy(ref * (step + 1), t, reduction=reduction)
        (loss if reduction != "none" else loss.sum()).backward()
        (want if reduction != "none" else want.sum()).backward()
    _close(leaf.grad, ref.grad)
    leaf.grad = None
    ref.grad = None
    for _ in range(2):  # a leaf's .grad adopted on step 1, added to in place on step 2
        with route():
            xt.cross_entropy(leaf, t, reduction="sum").backward()
        F.cross_entropy(ref, t, reduction="sum").backward()
    _close(leaf.grad, ref.grad)


def test_returned_gradient_is_not_aliased_to_a_later_call():
    z, t = _data(6, 5, ignored=(1,))
    leaf = z.clone().requires_grad_()
    with route():
        first = torch.autograd.grad(xt.cross_entropy(leaf, t), leaf)[0]
    kept = first.clone()
    with route():
        xt.cross_entropy(leaf, t).backward()
    adopted = leaf.grad
    adopted_copy = adopted.clone()
    assert adopted.data_ptr() != first.data_ptr()
    assert adopted.untyped_storage().data_ptr() != leaf.untyped_storage().data_ptr()
    leaf.grad = None
    other = torch.randn(6, 5)
    for reduction in REDUCTIONS:  # later calls of the same shape, other data
        x = other.clone().requires_grad_()
        with route():
            loss = xt.cross_entropy(x, t, reduction=reduction)
        kept_loss = loss.detach().clone()
        (loss if reduction != "none" else loss.sum()).backward(retain_graph=True)
        loss.backward(None if reduction != "none" else torch.ones(6), retain_graph=True)
        torch.testing.assert_close(loss.detach(), kept_loss)  # backward leaves the loss
        x.grad.mul_(1000.0)  # the user scales a later gradient in place
    torch.testing.assert_close(first, kept)
    torch.testing.assert_close(adopted, adopted_copy)
    _close(first, _torch(z, t)[1])
    torch.testing.assert_close(leaf.detach(), z)  # the logits untouched


def test_inplace_backward_leaves_the_logits_intact():
    z, t = _data(6, 5, ignored=(1,))
    leaf = z.clone().requires_grad_()
    with route():
        loss = xt.cross_entropy(leaf, t, inplace_backward=True)
    loss.backward()
    torch.testing.assert_close(leaf.detach(), z)
    _close(leaf.grad, _torch(z, t)[1])


# ---- threads, autocast, the module


def test_four_threads_at_once_each_get_torchs_numbers():
    cases = [(_data(8 + i, 5 + 3 * i, DTYPES[i % 2], seed=20 + i, ignored=(i,)),
              REDUCTIONS[i % 3]) for i in range(4)]
    barrier = threading.Barrier(4, timeout=30)

    def work(i):
        (z, t), reduction = cases[i]
        barrier.wait()
        out = []
        for _ in range(25):
            leaf = z.clone().requires_grad_()
            loss = xt.cross_entropy(leaf, t, reduction=reduction)
            (loss if reduction != "none" else loss.sum()).backward()
            out.append((loss.detach(), leaf.grad, loss.grad_fn.name()))
        return out

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(work, range(4), timeout=60))
    # four threads accumulating into one shared leaf's .grad
    z, t = _data(9, 6, seed=30, ignored=(3,))
    shared = z.clone().requires_grad_()
    barrier = threading.Barrier(4, timeout=30)

    def accumulate(_):
        barrier.wait()
        for _ in range(10):
            xt.cross_entropy(shared, t, reduction="sum").backward()

    with route(), ThreadPoolExecutor(4) as pool:
        list(pool.map(accumulate, range(4), timeout=60))
    _close(shared.grad, 40 * _torch(z, t, reduction="sum")[1], rtol=1e-5, atol=1e-5)
    for ((z, t), reduction), got in zip(cases, results, strict=True):
        leaf = z.clone().requires_grad_()
        want = F.cross_entropy(leaf, t, reduction=reduction)
        (want if reduction != "none" else want.sum()).backward()
        for loss, grad, name in got:
            assert "SmallCrossEntropy" in name
            _close(loss, want.detach())
            _close(grad, leaf.grad)


@pytest.mark.parametrize("dtype", DTYPES)
def test_autocast_bfloat16_around_full_precision_logits(dtype):
    z, t = _data(6, 5, dtype, ignored=(2,))
    for reduction in REDUCTIONS:
        results = []
        for fn, taken in ((xt.cross_entropy, True), (F.cross_entropy, False)):
            leaf = z.clone().requires_grad_()
            with torch.autocast("cpu", dtype=torch.bfloat16), route(taken):
                loss = fn(leaf, t, reduction=reduction)
            (loss if reduction != "none" else loss.sum()).backward()
            results.append((loss.detach(), leaf.grad))
        assert results[0][0].dtype == results[1][0].dtype
        _close(results[0][0], results[1][0])
        _close(results[0][1], results[1][1])
    # bfloat16 logits from a matmul under autocast: the small kernel in float32 (since
    # stop 33; torch's route before), torch's float32 loss and its gradients
    x = torch.randn(6, 3, requires_grad=True)
    w = torch.randn(5, 3)
    xr = x.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with route(True):
            loss = xt.cross_entropy(x @ w.T, t)
        want = F.cross_entropy(xr @ w.T, t)
    assert loss.dtype == want.dtype == torch.float32
    _close(loss, want)
    loss.backward()
    want.backward()
    _close(x.grad, xr.grad, rtol=2e-2, atol=1e-3)


@pytest.mark.parametrize("options", [{}, {"reduction": "sum", "ignore_index": 1},
                                     {"reduction": "none"}])
def test_cross_entropy_loss_module(options):
    z, t = _data(7, 4, ignored=(3,), ignore_index=options.get("ignore_index", -100))
    leaf, ref = z.clone().requires_grad_(), z.clone().requires_grad_()
    with route():
        loss = xt.CrossEntropyLoss(**options)(leaf, t)
    want = torch.nn.CrossEntropyLoss(**options)(ref, t)
    (loss if loss.dim() == 0 else loss.sum()).backward()
    (want if want.dim() == 0 else want.sum()).backward()
    _close(loss.detach(), want.detach())
    _close(leaf.grad, ref.grad)


# ---- the calls that must not take the route


def test_calls_that_must_not_take_the_route_give_torchs_numbers():
    z, t = _data(6, 5, ignored=(2,))
    want_loss, want_grad = _torch(z, t)

    def check(taken, fn=xt.cross_entropy, tol=None, **kw):
        leaf = z.clone().requires_grad_()
        with route(taken):
            loss = fn(leaf, t, **kw)
        assert loss.dtype == torch.float32
        _close(loss.detach(), want_loss, **(tol or {}))
        if loss.requires_grad:
            loss.backward()
            _close(leaf.grad, want_grad, **(tol or {}))

    check(True)  # the control
    with torch.no_grad():
        check(False)
    with torch.inference_mode():
        with route(False):
            _close(xt.cross_entropy(z, t), want_loss)
    with route(False):
        _close(xt.cross_entropy(z, t), want_loss)  # requires_grad False
    check(False, weight=torch.ones(5))
    check(False, backend="native")
    check(False, backend="rowblock", tol={"rtol": 1e-5, "atol": 1e-6})
    check(False, z_loss=0.0 + 1e-30, tol={"rtol": 1e-5, "atol": 1e-6})
    check(False, softcap=1e9, tol={"rtol": 1e-5, "atol": 1e-6})
    leaf = z.clone().requires_grad_()
    with route(False):
        smooth = xt.cross_entropy(leaf, t, label_smoothing=0.1)
    _close(smooth, F.cross_entropy(z, t, label_smoothing=0.1))
    for low, taken in ((torch.bfloat16, True), (torch.float16, False)):  # bf16: stop 33
        leaf = z.to(low).requires_grad_()
        with route(taken):
            loss = xt.cross_entropy(leaf, t)
        _close(loss, F.cross_entropy(z.to(low), t), rtol=1e-2, atol=1e-2)
    class Mode(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    leaf = z.clone().requires_grad_()
    with Mode(), route(False):
        _close(xt.cross_entropy(leaf, t), want_loss)
    probs = torch.softmax(torch.randn(6, 5), 1)
    leaf = z.clone().requires_grad_()
    with route(False):
        _close(xt.cross_entropy(leaf, probs), F.cross_entropy(z, probs),
               rtol=1e-5, atol=1e-6)


def test_transforms_and_forward_ad_do_not_take_the_route():
    z, t = _data(6, 5, dtype=torch.float64, ignored=(2,))
    want = torch.func.grad(lambda x: F.cross_entropy(x, t))(z)
    with route(False):
        got = torch.func.grad(lambda x: xt.cross_entropy(x, t))(z)
    _close(got, want)
    with route(False):
        got = torch.func.vmap(lambda x: xt.cross_entropy(x, t, reduction="sum"))(z[None])
    _close(got[0], F.cross_entropy(z, t, reduction="sum"))
    tangent = torch.randn(6, 5, dtype=torch.float64)
    results = []
    for fn, taken in ((xt.cross_entropy, False), (F.cross_entropy, False)):
        leaf = z.clone().requires_grad_()
        with fwAD.dual_level(), route(taken):
            dual = fwAD.make_dual(leaf, tangent)
            out = fwAD.unpack_dual(fn(dual, t))
            results.append((out.primal.detach(), out.tangent))
    _close(results[0][0], results[1][0])
    _close(results[0][1], results[1][1])


def test_size_limits_of_the_route(monkeypatch):
    monkeypatch.setattr(_backends, "SMALL_MIN_LOGITS", REAL_SMALL_MIN_LOGITS)
    classes = 256
    first = -(-REAL_SMALL_MIN_LOGITS // classes)  # the fewest rows at or above the limit
    below = torch.randn(first - 1, classes)
    at = torch.randn(first, classes)
    # past NATIVE_MAX_LOGITS the kernel keeps rows of few classes (_backends.FEW_CLASSES),
    # and others up to SMALL_MAX_LOGITS, where the row-block kernel takes over: for float64
    # (and bfloat16); float32 at every size (SMALL_MAX_LOGITS_FLOAT32, since stop 33)
    assert classes >= _backends.FEW_CLASSES
    top = torch.randn(_backends.SMALL_MAX_LOGITS // classes, classes)
    just_under_top = torch.randn(_backends.SMALL_MAX_LOGITS // classes - 1, classes)
    past_native = torch.randn(_backends.NATIVE_MAX_LOGITS // classes, classes)
    assert _backends.SMALL_MAX_LOGITS_FLOAT32 > 1 << 40
    for z, taken in ((below, False), (at, True), (past_native, True), (just_under_top, True),
                     (top.double(), False), (just_under_top.double(), True), (top, True)):
        t = torch.randint(0, classes, (z.shape[0],))
        t[::7] = -100
        tol = {} if taken or z is below else {"rtol": 1e-5, "atol": 1e-6}
        loss, grad = _ours(z, t, taken=taken)
        want_loss, want_grad = _torch(z, t)
        _close(loss, want_loss, **tol)
        _close(grad, want_grad, **tol)


# ---- a property: random shapes, targets, ignored fraction, reduction


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(1, 12), c=st.integers(1, 40), seed=st.integers(0, 2**31 - 1),
       ignore=st.floats(0.0, 1.0), reduction=st.sampled_from(REDUCTIONS),
       dtype=st.sampled_from(DTYPES), scale=st.sampled_from([0.1, 3.0, 50.0]),
       ignore_index=st.sampled_from([-100, 0, 3]))
def test_property_matches_torch(n, c, seed, ignore, reduction, dtype, scale, ignore_index):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(n, c, generator=g, dtype=torch.float64) * scale).to(dtype)
    t = torch.randint(0, c, (n,), generator=g)
    t[torch.rand(n, generator=g) < ignore] = ignore_index
    go = (torch.randn(n, generator=g, dtype=torch.float64).to(dtype) if reduction == "none"
          else torch.tensor(float(torch.randn(1, generator=g)), dtype=dtype))
    if not ((t == ignore_index) | ((t >= 0) & (t < c))).all():
        with route(False), pytest.raises(IndexError):
            xt.cross_entropy(z.requires_grad_(), t, reduction=reduction,
                             ignore_index=ignore_index)
        return
    _same_as_torch(z, t, go, reduction=reduction, ignore_index=ignore_index)


# ---- more autograd machinery: batched grads, checkpointing, target views, legacy options


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_is_grads_batched_matches_torch(reduction, dtype):
    """torch.autograd.grad(..., is_grads_batched=True) runs backward under (legacy) vmap:
    torch's kernel supports it, so the route that replaces it must too (or refuse loudly)."""
    z, t = _data(4, 5, dtype, ignored=(2,))
    gos = torch.tensor([1.0, 2.5, INF], dtype=dtype)
    if reduction == "none":
        gos = torch.tensor([[1.0] * 4, [0.0, 1.0, 2.0, 3.0], [NAN, 1.0, 2.0, INF]], dtype=dtype)
    ref = z.clone().requires_grad_()
    want = torch.autograd.grad(F.cross_entropy(ref, t, reduction=reduction), ref, gos,
                               is_grads_batched=True)[0]
    leaf = z.clone().requires_grad_()
    with route():
        loss = xt.cross_entropy(leaf, t, reduction=reduction)
    got = torch.autograd.grad(loss, leaf, gos, is_grads_batched=True)[0]
    _close(got, want)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_activation_checkpointing(use_reentrant):
    from torch.utils.checkpoint import checkpoint

    z, t = _data(6, 5, ignored=(1,))
    w = torch.randn(5, 5)
    results = []
    for fn, taken in ((xt.cross_entropy, True), (F.cross_entropy, False)):
        leaf = z.clone().requires_grad_()
        with route(taken):
            loss = checkpoint(lambda x, fn=fn: fn(x @ w, t), leaf,
                              use_reentrant=use_reentrant)
            loss.backward()
        results.append((loss.detach(), leaf.grad))
    _close(results[0][0], results[1][0])
    _close(results[0][1], results[1][1])


def test_target_views_and_legacy_reduction_options():
    z, _ = _data(8, 5)
    base = torch.tensor([0, 9, 4, 9, -100, 9, 2, 9, 1, 9, 3, 9, 4, 9, -100, 9])
    strided = base[::2]  # a strided view of a target
    assert not strided.is_contiguous()
    for reduction in REDUCTIONS:
        _same_as_torch(z, strided, reduction=reduction)
    expanded = torch.tensor([3]).expand(8)  # stride 0
    _same_as_torch(z, expanded, reduction="sum")
    leaf, ref = z.clone().requires_grad_(), z.clone().requires_grad_()
    with pytest.warns(UserWarning), route():
        loss = xt.cross_entropy(leaf, strided, size_average=False)
    with pytest.warns(UserWarning):
        want = F.cross_entropy(ref, strided, size_average=False)
    loss.backward()
    want.backward()
    _close(loss.detach(), want.detach())
    _close(leaf.grad, ref.grad)


def test_double_backward_of_the_checked_path():
    """(N, C, d) input and int32 targets: the recomputation from the flattened logits."""
    g = torch.Generator().manual_seed(6)
    z = torch.randn(2, 4, 3, generator=g, dtype=torch.float64)
    t = torch.tensor([[0, 3, -100], [2, 1, 1]])
    v = torch.randn(2, 4, 3, generator=g, dtype=torch.float64)
    out = []
    for fn, target, taken in ((xt.cross_entropy, t.int(), True), (F.cross_entropy, t, False)):
        leaf = z.clone().requires_grad_()
        with route(taken):
            loss = fn(leaf, target, reduction="sum")
        (grad,) = torch.autograd.grad(loss, leaf, create_graph=True)
        (hv,) = torch.autograd.grad((grad * v).sum(), leaf)
        out.append((grad.detach(), hv))
    _close(out[0][0], out[1][0])
    _close(out[0][1], out[1][1])


def test_confident_predictions_are_as_accurate_as_torchs_kernel():
    """p_y close to 1 (a tiny loss): -log p_y loses digits, as torch's log_softmax does;
    the route's per-row error against float64 must be no worse than torch's float32 one."""
    g = torch.Generator().manual_seed(1)
    for margin in (8.0, 12.0, 15.0):
        z = torch.randn(512, 50, generator=g)
        t = torch.randint(0, 50, (512,), generator=g)
        z[torch.arange(512), t] += margin
        truth = F.cross_entropy(z.double(), t, reduction="none")
        ours, _ = _ours(z, t, reduction="none")
        theirs = F.cross_entropy(z, t, reduction="none")
        ours_err = (ours.double() - truth).abs() / truth
        torch_err = (theirs.double() - truth).abs() / truth
        assert float(ours_err.median()) <= 1.5 * float(torch_err.median()) + 1e-7
        assert float(ours_err.max()) <= 1.5 * float(torch_err.max()) + 1e-7


def test_statistics_of_a_spatial_input():
    g = torch.Generator().manual_seed(12)
    z = torch.randn(2, 4, 3, generator=g, dtype=torch.float64)
    t = torch.tensor([[0, 3, -100], [2, 1, 1]])
    leaf = z.clone().requires_grad_()
    with route():
        loss, stats = xt.cross_entropy(leaf, t, reduction="none", statistics=("lse", "entropy"))
    assert loss.shape == stats.lse.shape == stats.entropy.shape == (2, 3)
    _close(loss.detach(), F.cross_entropy(z, t, reduction="none"))
    lse = torch.logsumexp(z, 1)
    valid = t != -100
    _close(stats.lse[valid], lse[valid])
    assert stats.lse[~valid].isnan().all()


@pytest.mark.timeout(240)
def test_under_torch_compile():
    """Compiled, the call is one crossent:: operator that runs the eager entry point (and
    so the route) inside; finite grad_outputs give torch's numbers."""
    z, t = _data(6, 5, torch.float64, ignored=(2,))
    compiled = torch.compile(lambda x, y: xt.cross_entropy(x, y), backend="aot_eager",
                             fullgraph=True)
    try:
        for go in (None, torch.tensor(2.5, dtype=torch.float64)):
            leaf = z.clone().requires_grad_()
            with route():
                loss = compiled(leaf, t)
            loss.backward(go)
            want_loss, want_grad = _torch(z, t, go)
            _close(loss.detach(), want_loss)
            _close(leaf.grad, want_grad)
    finally:
        torch._dynamo.reset()  # no compiled state left for other test files


@pytest.mark.parametrize("vectorize", [False, True])
def test_jacobian_and_hessian_of_the_functional_api(vectorize):
    """torch.autograd.functional: the Jacobian of "none" (one backward per row through a
    retained graph, or one batched backward) and the Hessian of "mean" (create_graph)."""
    z, t = _data(4, 3, torch.float64, ignored=(1,))
    z[2, 0] = -INF
    taken = []

    def ours(x, reduction, t=t):
        before = len(_CALLS)
        out = xt.cross_entropy(x, t, reduction=reduction)
        taken.append(len(_CALLS) > before)
        return out

    jac = torch.autograd.functional.jacobian(lambda x: ours(x, "none"), z, vectorize=vectorize)
    want = torch.autograd.functional.jacobian(
        lambda x: F.cross_entropy(x, t, reduction="none"), z, vectorize=vectorize)
    _close(jac, want)
    hess = torch.autograd.functional.hessian(lambda x: ours(x, "mean", t[[0, 1, 3]]), z[[0, 1, 3]],
                                             vectorize=vectorize)
    want = torch.autograd.functional.hessian(
        lambda x: F.cross_entropy(x, t[[0, 1, 3]]), z[[0, 1, 3]], vectorize=vectorize)
    _close(hess, want)
    assert taken and all(taken)
