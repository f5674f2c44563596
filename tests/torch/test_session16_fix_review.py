"""Adversarial review of session 16's crossent.torch fixes (helper H39).

Each fix's edges against torch (``torch.nn.functional.cross_entropy`` / ``F.linear`` in
float64, NaN-exact) on the kernels ("auto" reaches crossent's kernels here: conftest lowers
``NATIVE_MAX_LOGITS``), every reduction, the gradients of every differentiable input and
``torch.compile(backend="eager", fullgraph=True)`` where ``_custom_ops`` changed:

1. ``_rules.idle_rows_nan``: rows whose backward scale is 0 with smoothing and a
   non-finite class weight are NaN, as torch's; the linear heads keep them.
3. the vocab-parallel loss ``w_y ((m - z_y) + log s)`` (single process here; the gloo
   ranks are in tests/torch/distributed/test_session16_distributed_fix_review.py).
4. probability targets with a class weight of another floating dtype.
5. double backward through aliased inputs. 6. uint64 ids >= 2**63 on every entry point.
7. ``set_buffer_reuse``, ``check_softcap``, ``extra_repr``, vmap-batched ``num_items``.
8. the target gradient of a zero target on a ``-inf`` logit. 9. negated views.
10. the linear head's dtype check after autocast. 11. ``_config_softcap``. 12. the core
docstring's ``-inf`` rule.

Every bug it found is fixed; each test failed before its fix.
"""

from __future__ import annotations

import math
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from grad_probes import assert_same_with_nans as _same

import crossent.torch as xt
from crossent import losses
from crossent.errors import InputError, UnsupportedError
from crossent.torch.distributed import vocab_parallel_cross_entropy

F64 = torch.float64
INF, NAN = math.inf, math.nan
Y = torch.tensor([0, -100, 2, 1, -100])  # rows 1 and 4 ignored


def _logits(rows=5, classes=4, seed=0, dtype=F64):
    return torch.randn(rows, classes, generator=torch.Generator().manual_seed(seed),
                       dtype=dtype)


def _grads(fn, leaves, grad_output=None):
    """``fn(*leaves)`` on fresh leaf copies: (loss, gradient of each leaf)."""
    copies = [t.clone().requires_grad_() for t in leaves]
    loss = fn(*copies)
    go = torch.ones_like(loss) if grad_output is None else grad_output.to(loss)
    return (loss.detach(), *torch.autograd.grad(loss, copies, go))


def _assert_all_same(got, want):
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        _same(a, b)


# ---- 1. idle rows with smoothing and a non-finite class weight: NaN, as torch's


WEIGHTS = {"inf": [1.0, INF, 1.0, 2.0], "nan": [1.0, NAN, 1.0, 2.0],
           "-inf target": [1.0, 1.0, -INF, 2.0]}
ZERO_ROWS = torch.tensor([1.0, 1.0, 0.0, 2.0, 0.0], dtype=F64)  # "none": rows 2, 4 idle


@pytest.mark.parametrize("weight,reduction,backend", [
    (weight, reduction, backend) for weight in WEIGHTS for reduction in ("none", "sum", "mean")
    for backend in ("auto", "rowblock", "native", "compiled")
    if backend != "compiled" or weight == "inf"])  # a compile costs ~0.5 s: once each
def test_smoothing_nonfinite_weight_idle_rows_are_torchs(weight, reduction, backend):
    w = torch.tensor(WEIGHTS[weight], dtype=F64)
    go = ZERO_ROWS if reduction == "none" else None
    kw = dict(weight=w, reduction=reduction, label_smoothing=0.1)
    want = _grads(lambda z: F.cross_entropy(z, Y, **kw), [_logits()], go)
    assert want[1][1].isnan().all()  # the reference: an ignored row's NaN gradient
    _assert_all_same(_grads(_entry(backend, **kw), [_logits()], go), want)


def _entry(backend, **kw):
    """``xt.cross_entropy(z, Y, **kw)`` on ``backend``, or under ``torch.compile``."""
    if backend == "compiled":
        torch._dynamo.reset()
        return torch.compile(lambda z: xt.cross_entropy(z, Y, **kw), backend="eager",
                             fullgraph=True)
    return lambda z: xt.cross_entropy(z, Y, backend=backend, **kw)


@pytest.mark.parametrize("weight", ["inf", "nan"])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("route", [dict(backend="auto"), dict(backend="rowblock"),
                                   dict(chunk_size=2), dict(backend="native")])
def test_smoothing_nonfinite_weight_linear_head_keeps_ignored_rows(weight, reduction, route):
    w = torch.tensor(WEIGHTS[weight], dtype=F64)
    g = torch.Generator().manual_seed(3)
    leaves = [torch.randn(5, 3, generator=g, dtype=F64), torch.randn(4, 3, generator=g,
                                                                     dtype=F64),
              torch.randn(4, generator=g, dtype=F64)]
    go = ZERO_ROWS if reduction == "none" else None
    kw = dict(weight=w, reduction=reduction, label_smoothing=0.1)
    want = _grads(lambda x, lw, b: F.cross_entropy(F.linear(x, lw, b), Y, **kw), leaves, go)
    got = _grads(lambda x, lw, b: xt.linear_cross_entropy(x, lw, Y, b, ignore_index=-100,
                                                          **route, **kw), leaves, go)
    _assert_all_same(got, want)


@pytest.mark.parametrize("zl,cap", [(1e-2, None), (0.0, None)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_smoothing_nonfinite_weight_low_precision_nan_pattern(zl, cap, dtype):
    # the NaN pattern in the compute dtype (float32) and rounded to the logits' dtype
    w = torch.tensor(WEIGHTS["inf"], dtype=dtype)
    kw = dict(reduction="sum", label_smoothing=0.1)
    z = _logits(dtype=dtype).requires_grad_()
    (g,) = torch.autograd.grad(xt.cross_entropy(z, Y, w, z_loss=zl, backend="rowblock",
                                                **kw), z)
    ref = z.detach().double().requires_grad_()
    loss = F.cross_entropy(ref, Y, w.double(), **kw)
    if zl:
        loss = loss + zl * torch.where(Y != -100, torch.logsumexp(ref, 1) ** 2, 0.0).sum()
    (want,) = torch.autograd.grad(loss, ref)
    assert torch.equal(g.isnan(), want.isnan())
    assert torch.equal(g.isinf(), want.isinf())


@pytest.mark.parametrize("backend", ["rowblock", "auto"])
@pytest.mark.parametrize("weight,eps", [(WEIGHTS["inf"], 0.1),
                                        ([INF, 1.0, 1.0, 1.0], 0.0)])  # w_y = inf, no eps
def test_smoothing_inf_weight_with_softcap_keeps_torchs_infinities(backend, weight, eps):
    w = torch.tensor(weight, dtype=F64)
    kw = dict(reduction="sum", label_smoothing=eps)
    cap = 3.0
    want = _grads(lambda z: F.cross_entropy(cap * torch.tanh(z / cap), Y, w, **kw),
                  [_logits()])
    assert want[1].isinf().any()  # the reference keeps +inf on counted rows
    _assert_all_same(_grads(lambda z: xt.cross_entropy(z, Y, w, softcap=cap, backend=backend,
                                                       **kw), [_logits()]), want)


# "mean" with an infinite denominator (a target's class weight inf or NaN), no smoothing:
# every row's backward scale is 1/inf = 0; torch's rows targeting that class get 0 x inf
# at the target, which its log_softmax backward spreads over the whole row
# (fixed: _rowblock's a = where(counted, rs * t_sum, 0 x mass) for rows of scale 0)


@pytest.mark.parametrize("weight", [
    [INF, 1.0, 1.0, 1.0],
    [1.0, 1.0, NAN, 1.0]])  # a NaN denominator: every counted row NaN (fine)
@pytest.mark.parametrize("backend", ["auto", "rowblock", "compiled"])
def test_infinite_target_weight_mean_zero_scale_rows_nan_throughout(weight, backend):
    w = torch.tensor(weight, dtype=F64)
    want = _grads(lambda z: F.cross_entropy(z, Y, w), [_logits()])
    nan = want[1].isnan()
    assert nan.any() and torch.equal(nan.any(1), nan.all(1))  # whole rows NaN in torch
    _assert_all_same(_grads(_entry(backend, weight=w), [_logits()]), want)


@pytest.mark.parametrize("route", [dict(backend="rowblock"), dict(chunk_size=2)])
def test_infinite_target_weight_linear_none_zero_grad_output_dw_is_torchs(route):
    w = torch.tensor([INF, 1.0, 1.0, 1.0], dtype=F64)
    go = torch.tensor([0.0, 1.0, 1.0, 2.0, 0.0], dtype=F64)  # row 0 targets the inf class
    g = torch.Generator().manual_seed(3)
    leaves = [torch.randn(5, 3, generator=g, dtype=F64), torch.randn(4, 3, generator=g,
                                                                     dtype=F64)]
    want = _grads(lambda x, lw: F.cross_entropy(x @ lw.T, Y, w, reduction="none"), leaves, go)
    assert want[2].isnan().all()  # dW: row 0's NaN gradient row meets every class
    _assert_all_same(_grads(lambda x, lw: xt.linear_cross_entropy(
        x, lw, Y, weight=w, ignore_index=-100, reduction="none", **route), leaves, go), want)


@pytest.mark.parametrize("weight", [[1.0, INF, 1.0, 2.0], [INF, 1.0, 1.0, 1.0],
                                    [1.0, NAN, 1.0, 2.0]])
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("backend", ["auto", "rowblock"])
def test_probability_targets_nonfinite_weight_zero_grad_output_rows(weight, eps, backend):
    # torch's -(w_c t_c) x 0 is NaN on a row whose grad_output is 0, smoothing or not
    w = torch.tensor(weight, dtype=F64)
    g = torch.Generator().manual_seed(2)
    t = torch.softmax(torch.randn(5, 4, generator=g, dtype=F64), 1)
    go = ZERO_ROWS
    kw = dict(weight=w, reduction="none", label_smoothing=eps)
    want = _grads(lambda z: F.cross_entropy(z, t, **kw), [_logits()], go)
    _assert_all_same(_grads(lambda z: xt.cross_entropy(z, t, backend=backend, **kw),
                            [_logits()], go), want)


# ---- 3. vocab-parallel loss (single process: world 1)


@pytest.mark.parametrize("weight", [None, [0.0, 1.0, 1.0, 1.0], [INF, 1.0, 1.0, 1.0],
                                    [1.0, NAN, 2.0, 1.0], [1.0, 2.0, 0.0, 1.0]])
@pytest.mark.parametrize("eps", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_vocab_parallel_loss_is_torchs_at_the_edges(weight, eps, reduction):
    # a -inf target logit (torch: inf, or NaN for a zero weight or eps = 1), logits of
    # 1e300, an ignored row
    z = torch.tensor([[-INF, 1.0, 2.0, 0.5], [0.3, 0.1, -1.0, 2.0], [1e300, -1e300, 0.0, 1.0],
                      [0.0, 1.0, 2.0, 3.0]], dtype=F64)
    y = torch.tensor([0, 1, 2, -100])
    w = None if weight is None else torch.tensor(weight, dtype=F64)
    kw = dict(weight=w, reduction=reduction, label_smoothing=eps)
    if eps and w is not None and not bool(w.isfinite().all()):
        with pytest.raises(UnsupportedError, match="label_smoothing"):
            vocab_parallel_cross_entropy(z, y, **kw)
        return
    want = _grads(lambda t: F.cross_entropy(t, y, **kw), [z])
    _assert_all_same(_grads(lambda t: vocab_parallel_cross_entropy(t, y, **kw), [z]), want)


def test_vocab_parallel_finite_weights_with_overflowing_sum_are_refused_truthfully():
    # finite weights whose float64 sum overflows: torch's sum_c w_c (lse - z_c) is finite,
    # the split W lse - sum_c w_c z_c is inf - inf; refused, and the message says so (it
    # said "a weight that is not finite"); the single-process kernel forms torch's sum
    z = torch.tensor([[5.0, 5.0, -5.0, -5.0], [4.0, 5.0, -5.0, -6.0]], dtype=F64)
    y = torch.tensor([0, 1])
    w = torch.tensor([1e308, 1e308, 1.0, 1.0], dtype=F64)
    kw = dict(weight=w, label_smoothing=0.1, reduction="none")
    want = F.cross_entropy(z, y, **kw)
    assert want.isfinite().all()
    _same(xt.cross_entropy(z, y, backend="rowblock", **kw), want)  # the single-process path
    with pytest.raises(UnsupportedError, match="finite weights whose sum leaves"):
        vocab_parallel_cross_entropy(z, y, **kw)


# ---- 4. probability targets: a class weight of any floating dtype promotes the loss


PROMOTIONS = [(torch.float32, torch.float32, torch.float64),
              (torch.bfloat16, torch.float32, torch.float64),
              (torch.float32, torch.float64, torch.float16),
              (torch.bfloat16, torch.bfloat16, torch.float32)]


def _probability_case(zd, td, wd):
    g = torch.Generator().manual_seed(4)
    z = torch.randn(4, 5, generator=g, dtype=F64).to(zd)
    t = torch.softmax(torch.randn(4, 5, generator=g, dtype=F64), 1).to(td)
    w = (torch.rand(5, generator=g, dtype=F64) + 0.5).to(wd)
    return z, t, w


def _compare_promoted(fn, ref, leaves, tol):
    got, want = _grads(fn, leaves), _grads(ref, leaves)
    for a, b in zip(got, want, strict=True):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a.double(), b.double(), rtol=tol, atol=tol)


@pytest.mark.parametrize("zd,td,wd,reduction,backend", [
    (*dtypes, reduction, backend) for dtypes in PROMOTIONS for reduction in ("mean", "none")
    for backend in ("auto", "rowblock", "native", "compiled")
    if backend != "compiled" or reduction == "mean"])
def test_probability_target_weight_dtype_promotes_like_torch(zd, td, wd, reduction, backend):
    z, t, w = _probability_case(zd, td, wd)
    kw = dict(reduction=reduction, label_smoothing=0.1)

    def mine(zz, ww):
        return xt.cross_entropy(zz, t, ww, backend=backend, **kw)

    if backend == "compiled":
        torch._dynamo.reset()
        mine = torch.compile(lambda zz, ww: xt.cross_entropy(zz, t, ww, **kw), backend="eager",
                             fullgraph=True)
    tol = 2e-2 if torch.bfloat16 in (zd, td, wd) or torch.float16 == wd else 1e-6
    _compare_promoted(mine, lambda zz, ww: F.cross_entropy(zz, t, ww, **kw), [z, w], tol)


@pytest.mark.parametrize("zd,td,wd", PROMOTIONS[:3])
@pytest.mark.parametrize("route", ["auto", "chunked", "compiled"])
def test_linear_probability_target_weight_dtype_promotes_like_torch(zd, td, wd, route):
    _, t, w = _probability_case(zd, td, wd)
    g = torch.Generator().manual_seed(6)
    x, lw = (torch.randn(4, 3, generator=g, dtype=F64).to(zd),
             torch.randn(5, 3, generator=g, dtype=F64).to(zd))

    def mine(xx, ll, ww):
        return xt.linear_cross_entropy(xx, ll, t, weight=ww,
                                       chunk_size=2 if route == "chunked" else None)

    if route == "compiled":
        torch._dynamo.reset()
        mine = torch.compile(lambda xx, ll, ww: xt.linear_cross_entropy(xx, ll, t, weight=ww),
                             backend="eager", fullgraph=True)
    tol = 2e-2 if torch.bfloat16 in (zd, td, wd) or torch.float16 == wd else 1e-6
    _compare_promoted(mine, lambda xx, ll, ww: F.cross_entropy(F.linear(xx, ll), t, ww),
                      [x, lw, w], tol)


def test_index_target_weight_of_another_dtype_still_refused():
    z, _, w = _probability_case(torch.float32, torch.float32, torch.float64)
    with pytest.raises(InputError, match="weight"):
        xt.cross_entropy(z, torch.tensor([0, 1, 2, 3]), w)


# ---- 5. double backward through aliased inputs


def _hvp(fn, leaf):
    a = leaf.clone().requires_grad_()
    (g,) = torch.autograd.grad(fn(a), a, create_graph=True)
    (h,) = torch.autograd.grad((g * g).sum(), a)
    return g.detach(), h


@pytest.mark.parametrize("backend", ["auto", "rowblock"])
@pytest.mark.parametrize("case", ["target from logits", "same tensor twice", "A as x and W",
                                  "bias from W"])
def test_double_backward_through_aliased_inputs_is_torchs(backend, case):
    z0 = _logits(4, 4, seed=9)
    y = torch.tensor([0, 1, 3, 2])
    fns = {
        "target from logits": (lambda z, f: f(z, torch.softmax(2 * z, 1))),
        "same tensor twice": (lambda z, f: (lambda p: f(p, p))(z.softmax(1))),
        "A as x and W": (lambda a, f: f(a @ a.T, y) if f is F.cross_entropy
                         else xt.linear_cross_entropy(a, a, y, backend=backend)),
        "bias from W": (lambda a, f: f(a @ a.T + 2 * a[:, 0], y) if f is F.cross_entropy
                        else xt.linear_cross_entropy(a, a, y, 2 * a[:, 0], backend=backend)),
    }
    fn = fns[case]

    def mine(z, t):
        return xt.cross_entropy(z, t, label_smoothing=0.1, backend=backend)

    def ref(z, t):
        return F.cross_entropy(z, t, label_smoothing=0.1)

    if case in ("A as x and W", "bias from W"):
        got, want = _hvp(lambda a: fn(a, None), z0), _hvp(lambda a: fn(a, F.cross_entropy), z0)
    else:
        got, want = _hvp(lambda z: fn(z, mine), z0), _hvp(lambda z: fn(z, ref), z0)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


# ---- 6. uint64 ids >= 2**63 refused on every entry point


@pytest.mark.parametrize("value", [2**63, 2**64 - 100])  # the second wraps to -100
@pytest.mark.parametrize("entry", ["auto", "native", "rowblock", "linear", "linear chunked",
                                   "module", "compiled", "compiled linear", "statistics"])
def test_uint64_ids_past_int64_refused_everywhere(value, entry):
    z = _logits(3, 4)
    x, lw = _logits(3, 2, seed=1), _logits(4, 2, seed=2)
    t = torch.tensor([0, value, 2], dtype=torch.uint64)
    calls = {
        "linear": lambda: xt.linear_cross_entropy(x, lw, t),
        "linear chunked": lambda: xt.linear_cross_entropy(x, lw, t, chunk_size=1),
        "module": lambda: xt.CrossEntropyLoss()(z, t),
        "compiled": lambda: torch.compile(lambda a, b: xt.cross_entropy(a, b),
                                          backend="eager", fullgraph=True)(z, t),
        "compiled linear": lambda: torch.compile(
            lambda a, w, b: xt.linear_cross_entropy(a, w, b), backend="eager",
            fullgraph=True)(x, lw, t),
        "statistics": lambda: xt.cross_entropy(z, t, statistics="accuracy"),
    }
    call = calls.get(entry, lambda: xt.cross_entropy(z, t, backend=entry))
    torch._dynamo.reset()
    with pytest.raises(InputError, match="uint64"):
        call()
    # ids below 2**63 are still class ids
    ok = torch.tensor([0, 1, 2], dtype=torch.uint64)
    _same(xt.cross_entropy(z, ok), F.cross_entropy(z, ok.long()))


# ---- 7. small checks


@pytest.mark.parametrize("value", [1, 0, "no", None, np.bool_(True), torch.tensor(True)])
def test_set_buffer_reuse_refuses_non_bools_and_keeps_the_setting(value):
    previous = xt.set_buffer_reuse(True)
    try:
        with pytest.raises(InputError, match="enabled"):
            xt.set_buffer_reuse(value)
        assert xt.set_buffer_reuse(True) is True  # unchanged by the refused call
    finally:
        xt.set_buffer_reuse(previous)


@pytest.mark.parametrize("cap", [0, -2, -0.0, INF, -INF, NAN])
def test_softcap_one_message(cap):
    with pytest.raises(InputError, match=r"must be a finite number > 0"):
        xt.cross_entropy(_logits(), Y, softcap=cap)


def test_extra_repr_shows_loss_dtype():
    assert "loss_dtype=torch.float32" in repr(xt.CrossEntropyLoss(loss_dtype=torch.float32))
    assert "loss_dtype=torch.float64" in repr(xt.LinearCrossEntropyLoss(
        3, 5, loss_dtype=torch.float64))


def test_vmap_batched_num_items_is_unsupported_unbatched_works():
    z = _logits(3, 4)
    y = torch.tensor([0, 1, 2])
    with pytest.raises(UnsupportedError, match="num_items"):
        torch.func.vmap(lambda zz, n: xt.cross_entropy(zz, y, reduction="sum", num_items=n))(
            z.expand(2, 3, 4), torch.tensor([2.0, 3.0]))
    got = torch.func.vmap(lambda zz: xt.cross_entropy(zz, y, reduction="sum",
                                                      num_items=torch.tensor(2.0)))(
        z.expand(2, 3, 4))
    _same(got, F.cross_entropy(z, y, reduction="sum").expand(2) / 2)


def test_meta_num_items_is_not_called_vmap_batched():
    with pytest.raises((InputError, UnsupportedError), match="num_items") as info:
        xt.cross_entropy(_logits(), Y, num_items=torch.tensor(3.0, device="meta"))
    assert "vmap" not in str(info.value)


# ---- 8. a zero probability target on a -inf logit: torch's +inf target gradient


@pytest.mark.parametrize("weight", [None, [1.0, 2.0, 0.0, 1.0], [1.0, -1.0, 1.0, 1.0]])
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("grad_output", [None, "zero", "negative"])
def test_zero_target_on_minus_inf_logit_target_gradient_is_torchs(weight, eps, grad_output):
    backend = "rowblock" if eps else "auto"  # the same kernel here (conftest)
    z = torch.tensor([[0.5, -INF, 1.0, 0.2], [0.1, 0.3, -INF, -INF], [1.0, 2.0, 3.0, 4.0]],
                     dtype=F64)
    t = torch.tensor([[0.5, 0.0, 0.5, 0.0], [0.5, 0.5, 0.0, 0.0], [0.25] * 4], dtype=F64)
    w = None if weight is None else torch.tensor(weight, dtype=F64)
    go = {None: None, "zero": torch.tensor([0.0, 0.0, 1.0], dtype=F64),
          "negative": torch.tensor([-1.0, 2.0, 1.0], dtype=F64)}[grad_output]
    reduction = "mean" if go is None else "none"
    kw = dict(weight=w, reduction=reduction, label_smoothing=eps)
    _, dz, dt = _grads(lambda a, b: xt.cross_entropy(a, b, backend=backend, **kw), [z, t], go)
    _, want_dz, want_dt = _grads(lambda a, b: F.cross_entropy(a, b, **kw), [z, t], go)
    assert (want_dt.isinf() | want_dt.isnan()).any()  # torch's +-inf (NaN where r = 0)
    _same(dz, want_dz)
    _same(dt, want_dt)


# ---- 9. negated views


@pytest.mark.parametrize("inplace", [False, True])
def test_negated_view_logits_rowblock_with_compiled_kernel_on(inplace):
    x = _logits(6, 5, dtype=torch.float32)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    previous = xt.set_compiled_kernel(True)
    try:
        base = x.clone().requires_grad_()
        z = torch._neg_view(base * 1.0)
        assert z.is_neg()
        loss = xt.cross_entropy(z, y, backend="rowblock", inplace_backward=inplace)
        (g,) = torch.autograd.grad(loss, base)
    finally:
        xt.set_compiled_kernel(previous)
    ref = x.double().requires_grad_()
    want = F.cross_entropy(-ref, y)
    (want_g,) = torch.autograd.grad(want, ref)
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g.double(), want_g, rtol=1e-5, atol=1e-6)


# ---- 10. the linear head's dtype check after autocast


@pytest.mark.parametrize("cast,xd,wd,bd", [
    (torch.bfloat16, torch.bfloat16, torch.float32, None),
    (torch.bfloat16, torch.float32, torch.bfloat16, torch.float32),
    (torch.float16, torch.float16, torch.float32, torch.float32),
    (torch.bfloat16, torch.float64, torch.float32, None),  # torch raises
    (torch.bfloat16, torch.int64, torch.float32, None),  # torch raises
    (None, torch.bfloat16, torch.float32, None),  # no autocast: torch raises
])
@pytest.mark.parametrize("route", ["auto", "chunked", "compiled"])
def test_linear_dtype_check_follows_autocast(cast, xd, wd, bd, route):
    g = torch.Generator().manual_seed(8)
    x0, w0, b0 = (torch.randn(4, 3, generator=g, dtype=F64), torch.randn(5, 3, generator=g,
                                                                         dtype=F64),
                  torch.randn(5, generator=g, dtype=F64))
    y = torch.tensor([0, 1, 4, 2])

    def run(fn):
        x = x0.to(xd)
        leaves = [w0.to(wd).requires_grad_()] + ([] if bd is None else
                                                 [b0.to(bd).requires_grad_()])
        if xd.is_floating_point:
            x.requires_grad_()
            leaves.insert(0, x)
        with torch.autocast("cpu", dtype=cast or torch.bfloat16, enabled=cast is not None):
            loss = fn(x, leaves[-1 - (bd is not None)], None if bd is None else leaves[-1])
        return (loss, *torch.autograd.grad(loss, leaves))

    torch._dynamo.reset()
    mine = {"auto": lambda x, w, b: xt.linear_cross_entropy(x, w, y, b),
            "chunked": lambda x, w, b: xt.linear_cross_entropy(x, w, y, b, chunk_size=2),
            "compiled": torch.compile(lambda x, w, b: xt.linear_cross_entropy(x, w, y, b),
                                      backend="eager", fullgraph=True)}[route]
    try:
        want = run(lambda x, w, b: F.cross_entropy(F.linear(x, w, b), y))
    except RuntimeError:
        with pytest.raises(InputError, match=r"dtype|floating"):
            run(mine)
        return
    got = run(mine)
    for a, b in zip(got, want, strict=True):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a.double(), b.double(), rtol=3e-2, atol=3e-2)


# ---- 11. transformers' final_logit_softcapping


@pytest.mark.parametrize("cap,want", [(30.0, 30.0), (-30.0, 30.0), (7, 7.0), (None, None)])
def test_config_softcap_magnitude(cap, want):
    hf = pytest.importorskip("crossent.integrations.transformers")
    got = hf._config_softcap(types.SimpleNamespace(final_logit_softcapping=cap))
    assert got == want and (got is None or type(got) is float)
    if cap is not None:  # transformers' c tanh(z / c) is the same for -c
        z = torch.linspace(-50, 50, 11, dtype=F64)
        torch.testing.assert_close(cap * torch.tanh(z / cap), got * torch.tanh(z / got))


@pytest.mark.parametrize("cap", [0, 0.0, INF, -INF, NAN, True, "30"])
def test_config_softcap_refuses_zero_and_nonfinite(cap):
    hf = pytest.importorskip("crossent.integrations.transformers")
    with pytest.raises(InputError, match="final_logit_softcapping"):
        hf._config_softcap(types.SimpleNamespace(final_logit_softcapping=cap))


# ---- 12. the core docstring's -inf rule for class-index targets


def test_core_label_smoothing_one_minus_inf_logit_is_inf_as_documented():
    # the docstring (and docs/pitfalls.md row 4) said label_smoothing=1 zeroes the mass; at
    # eps=1 every class keeps w_c / C, so a -inf logit gives +inf (torch's index path: NaN)
    z = np.array([[0.5, -np.inf, 1.0], [1.0, 2.0, 3.0]])
    y = np.array([1, 0])
    got = np.asarray(losses.softmax_cross_entropy(z, y, label_smoothing=1.0,
                                                  reduction="none"))
    assert got[0] == np.inf
    doc = losses.softmax_cross_entropy.__doc__
    assert "label_smoothing=1``: every class then has mass ``w_c / C``" in " ".join(doc.split())


# ---- 1 (cont.). shift=True: the last position's padding row is not one of torch's rows


@pytest.mark.parametrize("route", [dict(), dict(chunk_size=2)])
def test_shift_last_position_has_no_gradient_with_nonfinite_weight_smoothing(route):
    g = torch.Generator().manual_seed(12)
    x = torch.randn(2, 4, 3, generator=g, dtype=F64)
    lw = torch.randn(5, 3, generator=g, dtype=F64)
    y = torch.tensor([[0, 1, 2, 2], [3, 4, 4, 0]])  # no ignored target: only the padding
    w = torch.tensor([1.0, INF, 1.0, 1.0, 1.0], dtype=F64)
    kw = dict(weight=w, label_smoothing=0.1)
    want = _grads(lambda a, b: F.cross_entropy((a[:, :-1] @ b.T).reshape(-1, 5),
                                               y[:, 1:].reshape(-1), **kw), [x, lw])
    assert torch.equal(want[1][:, -1], torch.zeros(2, 3, dtype=F64))  # no gradient there
    _assert_all_same(_grads(lambda a, b: xt.linear_cross_entropy(a, b, y, shift=True, **kw,
                                                                 **route), [x, lw]), want)


def test_shift_last_position_has_no_gradient_finite_weights():
    # the guard: with finite weights the padding rows are skipped (dx exactly 0)
    g = torch.Generator().manual_seed(12)
    x = torch.randn(2, 4, 3, generator=g, dtype=F64)
    lw = torch.randn(5, 3, generator=g, dtype=F64)
    y = torch.tensor([[0, 1, 2, 2], [3, 4, 4, 0]])
    w = torch.tensor([1.0, 3.0, 1.0, 1.0, 2.0], dtype=F64)
    kw = dict(weight=w, label_smoothing=0.1)
    got = _grads(lambda a, b: xt.linear_cross_entropy(a, b, y, shift=True, **kw), [x, lw])
    want = _grads(lambda a, b: F.cross_entropy((a[:, :-1] @ b.T).reshape(-1, 5),
                                               y[:, 1:].reshape(-1), **kw), [x, lw])
    assert torch.equal(got[1][:, -1], torch.zeros(2, 3, dtype=F64))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
