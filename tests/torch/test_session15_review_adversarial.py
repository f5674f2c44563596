"""Adversarial review of session 15's crossent.torch changes (helper H34).

The "mean" rule (``_rules.reduce_rows``), the smoothing term of the row-block kernel,
the loss dtype with probability targets (``_rules.choose_loss_dtype``), the device checks,
unbatched target shapes and the modules' new base class, each against
``torch.nn.functional.cross_entropy`` in float64 (the reference). A known bug is a test
written as it should pass, marked ``xfail(strict=True)`` with its cause.
"""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from grad_probes import assert_same_with_nans as _same
from grad_probes import value_and_grad as _value_and_grad

import crossent.torch as xt
import crossent.torch._rowblock as rowblock
from crossent.errors import InputError, UnsupportedError
from crossent.torch.distributed import vocab_parallel_cross_entropy

F64 = torch.float64
DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64]


def _logits(rows=4, classes=5, seed=0, dtype=F64):
    return torch.randn(rows, classes, generator=torch.Generator().manual_seed(seed),
                       dtype=dtype)


# ---- "mean" over a zero denominator: torch divides, NaN only where the numerator is 0 too


NEG_ZERO_SUM = torch.tensor([1.0, -1.0, 2.0, 3.0, -1.0], dtype=F64)  # w[0] + w[1] = 0


@pytest.mark.parametrize("eps", [0.0, pytest.param(0.1, marks=pytest.mark.xfail(
    strict=True, reason="documented (_rules.reduce_rows): with smoothing a zero "
    "denominator gives NaN, which is torch's for weights of one sign (0/0); weights of "
    "mixed signs summing to 0 make torch's two quotients +-inf, here NaN"))])
def test_negative_weights_summing_to_zero_mean_is_torchs_inf_rowblock(eps):
    z = _logits()
    y = torch.tensor([0, 1, -100, -100])
    want = F.cross_entropy(z, y, weight=NEG_ZERO_SUM, label_smoothing=eps)
    assert want.isinf()  # the reference: the nonzero sum over 0
    _same(xt.cross_entropy(z, y, weight=NEG_ZERO_SUM, label_smoothing=eps,
                           backend="rowblock"), want)


def test_negative_weights_summing_to_zero_mean_linear_chunked():
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(4, 3, generator=g, dtype=F64), torch.randn(5, 3, generator=g, dtype=F64)
    y = torch.tensor([0, 1, -100, -100])
    want = F.cross_entropy(x @ w.T, y, weight=NEG_ZERO_SUM)
    _same(xt.linear_cross_entropy(x, w, y, weight=NEG_ZERO_SUM, chunk_size=2), want)


@pytest.mark.parametrize("backend", ["auto", "rowblock"])
@pytest.mark.parametrize("kdim", [False, True])
def test_zero_weights_with_smoothing_mean_is_nan(backend, kdim):
    # the case the new rule is for: every counted target's weight 0, smoothing sum not 0
    w = torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0], dtype=F64)
    z, y = _logits(), torch.tensor([0, 1, 0, 1])
    if kdim:  # (N, C, d): two positions per sample
        z, y = z.reshape(2, 2, 5).transpose(1, 2), y.reshape(2, 2)
    want = F.cross_entropy(z, y, weight=w, label_smoothing=0.1)
    assert want.isnan()
    loss, grad = _value_and_grad(
        lambda t: xt.cross_entropy(t, y, weight=w, label_smoothing=0.1, backend=backend), z)
    _, want_grad = _value_and_grad(
        lambda t: F.cross_entropy(t, y, weight=w, label_smoothing=0.1), z)
    _same(loss, want)
    _same(grad, want_grad)


def test_num_items_divides_a_zero_sum_as_given():
    z, y = _logits(), torch.full((4,), -100)
    for backend in ("auto", "rowblock", "native"):
        loss = xt.cross_entropy(z, y, num_items=torch.tensor(3), backend=backend)
        assert loss.item() == 0.0  # 0 / 3, never torch's 0/0 NaN
    loss = xt.cross_entropy(z, y, reduction="sum", num_items=3, label_smoothing=0.2)
    assert loss.item() == 0.0


# ---- a non-finite class weight of a class no row targets, ignored rows present


INF_AT_0 = torch.tensor([math.inf, 1.0, 1.0, 1.0, 1.0], dtype=F64)
ROWS_WITHOUT_CLASS_0 = torch.tensor([1, -100, 2, 3])  # the ignored row is mapped to class 0


@pytest.mark.parametrize("backend", ["rowblock", "linear"])
def test_nonfinite_weight_of_class_zero_with_ignored_rows_mean(backend):
    z = _logits()
    want = F.cross_entropy(z, ROWS_WITHOUT_CLASS_0, weight=INF_AT_0)
    assert want.isfinite()
    if backend == "linear":
        got = xt.linear_cross_entropy(z, torch.eye(5, dtype=F64), ROWS_WITHOUT_CLASS_0,
                                      weight=INF_AT_0, chunk_size=2)
    else:
        got = xt.cross_entropy(z, ROWS_WITHOUT_CLASS_0, weight=INF_AT_0, backend="rowblock")
    _same(got, want)


def test_nonfinite_weight_of_class_zero_with_ignored_rows_torch_func():
    z = _logits()
    want_grad, want = torch.func.grad_and_value(
        lambda t: F.cross_entropy(t, ROWS_WITHOUT_CLASS_0, weight=INF_AT_0))(z)
    grad, got = torch.func.grad_and_value(
        lambda t: xt.cross_entropy(t, ROWS_WITHOUT_CLASS_0, weight=INF_AT_0))(z)
    _same(got, want)
    _same(grad, want_grad)


def test_nonfinite_weight_of_class_zero_ignored_rows_gradient_sum():
    z = _logits()
    _, want = _value_and_grad(
        lambda t: F.cross_entropy(t, ROWS_WITHOUT_CLASS_0, weight=INF_AT_0, reduction="sum"), z)
    _, got = _value_and_grad(
        lambda t: xt.cross_entropy(t, ROWS_WITHOUT_CLASS_0, weight=INF_AT_0, reduction="sum",
                                   backend="rowblock"), z)
    _same(got, want)


@pytest.mark.parametrize("weight", [math.inf, -math.inf, math.nan])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_nonfinite_weight_smoothing_ignored_row_gradient_pattern(weight, reduction):
    # torch's ignored rows get NaN gradients here (masked_fill's 0 times w = inf in
    # (logp * w).sum's backward, spread by log_softmax's backward): _rules.idle_rows_nan
    w = torch.tensor([1.0, 1.0, 1.0, 1.0, weight], dtype=F64)
    y = torch.tensor([0, -100, 1, -100])
    want, want_grad = _value_and_grad(
        lambda t: F.cross_entropy(t, y, weight=w, label_smoothing=0.1, reduction=reduction),
        _logits())
    for backend in ("auto", "rowblock"):
        got, grad = _value_and_grad(
            lambda t, b=backend: xt.cross_entropy(t, y, weight=w, label_smoothing=0.1,
                                                  reduction=reduction, backend=b), _logits())
        _same(got, want)
        _same(grad, want_grad)


@pytest.mark.parametrize("weight", [math.inf, math.nan])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_nonfinite_weight_smoothing_ignored_rows_reach_the_linear_heads_grads(weight,
                                                                              reduction):
    # the linear heads skip ignored rows, except where torch's gradient of them is NaN:
    # dx of those rows NaN and dW all NaN, as the unfused F.linear + F.cross_entropy
    g = torch.Generator().manual_seed(5)
    w = torch.tensor([1.0, 1.0, 1.0, 1.0, weight], dtype=F64)
    y = torch.tensor([0, -100, 1, -100])
    x, lw, lb = (torch.randn(4, 3, generator=g, dtype=F64), torch.randn(5, 3, generator=g,
                 dtype=F64), torch.randn(5, generator=g, dtype=F64))

    def run(fn):
        p = [t.clone().requires_grad_() for t in (x, lw, lb)]
        out = fn(*p)
        return (out, *torch.autograd.grad(out.sum(), p))

    want = run(lambda a, b, c: F.cross_entropy(F.linear(a, b, c), y, weight=w,
                                               label_smoothing=0.1, reduction=reduction))
    assert want[1][1].isnan().all()  # the reference: ignored rows' dx is NaN
    for backend in ("auto", "rowblock"):
        got = run(lambda a, b, c, k=backend: xt.linear_cross_entropy(
            a, b, y, linear_bias=c, weight=w, label_smoothing=0.1, reduction=reduction,
            backend=k))
        for u, v in zip(got, want, strict=True):
            _same(u, v)


@pytest.mark.parametrize("weight", [math.inf, -math.inf, math.nan])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_nonfinite_unused_weight_values_rowblock(weight, eps):
    # item 2: t_sum without sum(w) when eps = 0; exact_smooth (an extra logsumexp) with eps
    w = torch.tensor([1.0, 2.0, 1.0, 0.5, weight], dtype=F64)
    y = torch.tensor([0, 1, 2, 3])
    for red in ("none", "sum", "mean"):
        want, want_grad = _value_and_grad(
            lambda t, red=red: F.cross_entropy(t, y, weight=w, label_smoothing=eps,
                                               reduction=red),
            _logits())
        got, grad = _value_and_grad(
            lambda t, red=red: xt.cross_entropy(t, y, weight=w, label_smoothing=eps,
                                                reduction=red, backend="rowblock"), _logits())
        _same(got, want)
        _same(grad, want_grad)


# ---- vocab-parallel code: its own reduce_loss / smoothing split, not the shared rule


def test_vocab_parallel_zero_weights_with_smoothing_mean_is_nan():
    w = torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0], dtype=F64)
    y = torch.tensor([0, 1, 0, 1])
    want = F.cross_entropy(_logits(), y, weight=w, label_smoothing=0.1)
    _same(vocab_parallel_cross_entropy(_logits(), y, weight=w, label_smoothing=0.1), want)


@pytest.mark.parametrize("weights", [[1.0, 1.0, 1.0, 1.0, math.inf],
                                     [1.0, 1.0, 1.0, math.inf, -math.inf],
                                     [1.0, math.nan, 1.0, 1.0, 1.0]])
def test_vocab_parallel_smoothing_with_a_nonfinite_weight_is_refused(weights):
    # torch's smoothing term sum_c w_c (lse - z_c) is inf or NaN in a pattern the split
    # W lse - sum_c w_c z_c does not reproduce: refused, naming the feature (every rank
    # reads the same weight total, so they raise together); inf + -inf no longer reaches
    # math.fsum's ValueError
    w = torch.tensor(weights, dtype=F64)
    y = torch.tensor([0, 1, 2, 3])
    with pytest.raises(UnsupportedError, match=r"label_smoothing=0\.1 with class weights"):
        vocab_parallel_cross_entropy(_logits(), y, weight=w, label_smoothing=0.1)


@pytest.mark.parametrize("case", ["inf_target_weight", "inf_and_minus_inf", "zero_weight_at_-inf",
                                  "overflowing_weights"])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_vocab_parallel_extreme_weights_without_smoothing_are_torchs(case, reduction):
    # the loss as torch's w_y (lse - z_y): an inf w_y gives inf (was inf - inf = NaN), a
    # zero w_y at a -inf target logit torch's NaN (was 0); overflowing weight sums no
    # longer reach math.fsum's OverflowError
    z = _logits()
    w = {"inf_target_weight": [1.0, 1.0, 1.0, math.inf, 1.0],
         "inf_and_minus_inf": [1.0, 1.0, 1.0, math.inf, -math.inf],
         "zero_weight_at_-inf": [0.0, 1.0, 1.0, 1.0, 1.0],
         "overflowing_weights": [1e308, 1e308, 1.0, 1.0, 1.0]}[case]
    if case == "zero_weight_at_-inf":
        z[0, 0] = -math.inf
    w = torch.tensor(w, dtype=F64)
    y = torch.tensor([0, 1, 2, 3])
    want, want_grad = _value_and_grad(
        lambda t: F.cross_entropy(t, y, weight=w, reduction=reduction), z)
    got, grad = _value_and_grad(
        lambda t: vocab_parallel_cross_entropy(t, y, weight=w, reduction=reduction), z)
    _same(got, want)
    _same(grad, want_grad)


# ---- loss dtype with probability targets (choose_loss_dtype)


@pytest.mark.parametrize("autocast", [False, True])
def test_loss_dtype_matrix_matches_torch(autocast):
    g = torch.Generator().manual_seed(2)
    base, probs = torch.randn(3, 5, generator=g), torch.rand(3, 5, generator=g).softmax(1)
    for ld in DTYPES:
        for td in DTYPES:
            z, t = base.to(ld), probs.to(td)
            with torch.autocast("cpu", enabled=autocast):
                want = F.cross_entropy(z, t, label_smoothing=0.1)
                for backend in ("auto", "rowblock"):
                    got = xt.cross_entropy(z, t, label_smoothing=0.1, backend=backend)
                    assert got.dtype == want.dtype, (ld, td, backend)
                    torch.testing.assert_close(got.double(), want.double(), rtol=2e-2, atol=0)
                lin = xt.linear_cross_entropy(z, torch.eye(5, dtype=ld), t, chunk_size=2)
                assert lin.dtype == want.dtype, (ld, td, "linear")


def test_compiled_loss_dtype_promotes_with_probability_target():
    z = torch.randn(3, 5, dtype=torch.bfloat16, requires_grad=True)
    p = torch.rand(3, 5).softmax(1)
    assert xt.cross_entropy(z, p).dtype == torch.float32  # eager: torch's promotion
    compiled = torch.compile(lambda a, b: xt.cross_entropy(a, b), backend="eager",
                             fullgraph=True)
    lin = torch.compile(lambda a, w, b: xt.linear_cross_entropy(a, w, b), backend="eager",
                        fullgraph=True)
    dtypes = (compiled(z, p).dtype,
              lin(torch.randn(3, 4, dtype=torch.bfloat16),
                  torch.randn(5, 4, dtype=torch.bfloat16, requires_grad=True), p).dtype)
    assert dtypes == (torch.float32, torch.float32)


# ---- device checks: refuse mismatches torch refuses, keep what torch (and HEAD) accepted


def test_batched_meta_input_with_cpu_target_or_weight_is_refused_by_name():
    zm = torch.empty(4, 5, device="meta")
    with pytest.raises(InputError, match="target"):
        xt.cross_entropy(zm, torch.zeros(4, dtype=torch.long))
    with pytest.raises(InputError, match="weight"):
        xt.cross_entropy(zm, torch.zeros(4, dtype=torch.long, device="meta"),
                         weight=torch.ones(5))
    with pytest.raises(InputError, match="linear_weight"):
        xt.linear_cross_entropy(torch.randn(4, 3), torch.empty(5, 3, device="meta"),
                                torch.zeros(4, dtype=torch.long))
    # still working: meta shapes, and CPU 0-d num_items with meta tensors
    ym = torch.zeros(4, dtype=torch.long, device="meta")
    assert xt.cross_entropy(zm, ym, num_items=torch.tensor(3)).device.type == "meta"
    assert xt.cross_entropy(zm, ym, reduction="none").shape == (4,)


def test_unbatched_meta_input_with_cpu_zero_dim_target():
    z = torch.empty(5, device="meta")
    assert F.cross_entropy(z, torch.tensor(1)).device.type == "meta"
    assert xt.cross_entropy(z, torch.tensor(1)).device.type == "meta"


def test_unbatched_shape_error_names_callers_shapes():
    with pytest.raises(InputError, match=r"\(1, 5\).*\(5,\)"):
        xt.cross_entropy(torch.randn(5), torch.rand(1, 5))
    with pytest.raises(InputError, match=r"class-index target has shape \(5,\)"):
        xt.cross_entropy(torch.randn(5), torch.arange(5))


# ---- inputs never modified: every dtype, smoothing (gap / exact_smooth), several blocks


@pytest.mark.parametrize("dtype", DTYPES)
def test_inputs_intact_multi_block_smoothing(monkeypatch, dtype):
    monkeypatch.setattr(rowblock, "block_rows", lambda classes, device="cpu": 2)
    g = torch.Generator().manual_seed(3)
    for layout in ("contiguous", "transposed", "strided"):
        if layout == "contiguous":
            z = (torch.randn(7, 6, generator=g) * 3).to(dtype)
        elif layout == "transposed":
            z = (torch.randn(6, 7, generator=g) * 3).to(dtype).T
        else:
            z = (torch.randn(7, 12, generator=g) * 3).to(dtype)[:, ::2]
        for weight in (None, torch.rand(6, generator=g) + 0.5,
                       torch.tensor([1.0, 1, 1, 1, 1, math.inf])):
            w = None if weight is None else weight.to(dtype)
            before = z.clone()
            leaf = z.requires_grad_()
            loss = xt.cross_entropy(leaf, torch.arange(7) % 6, weight=w, label_smoothing=0.2,
                                    backend="rowblock", reduction="none")
            loss.sum().backward()
            assert torch.equal(torch.nan_to_num(z.detach()), torch.nan_to_num(before))
            z = z.detach()


# ---- modules: torch's LinearCrossEntropyLoss as the base class


def test_linear_module_state_dict_pickle_deepcopy_with_torchs_module():
    mine = xt.LinearCrossEntropyLoss(4, 5, bias=True, weight=torch.rand(5, dtype=F64),
                                     dtype=F64)
    theirs = torch.nn.LinearCrossEntropyLoss(4, 5, bias=True,
                                             weight=torch.rand(5, dtype=F64), dtype=F64)
    assert isinstance(mine, torch.nn.LinearCrossEntropyLoss)
    assert sorted(mine.state_dict()) == sorted(theirs.state_dict())
    mine.load_state_dict(theirs.state_dict())
    x, y = torch.randn(3, 4, dtype=F64), torch.tensor([0, 4, -100])
    want = theirs(x, y)
    for m in (mine, pickle.loads(pickle.dumps(mine)), copy.deepcopy(mine)):
        _same(m(x, y), want)
    theirs.load_state_dict(mine.state_dict())


def test_modules_refuse_jit_script_by_name():
    for m in (xt.CrossEntropyLoss(), xt.LinearCrossEntropyLoss(3, 4),
              torch.nn.Sequential(torch.nn.Linear(2, 2), xt.CrossEntropyLoss())):
        with pytest.raises(UnsupportedError, match=r"torch\.jit\.script"):
            torch.jit.script(m)


def test_linear_module_weight_not_a_tensor_is_input_error():
    with pytest.raises(InputError, match="weight"):
        xt.LinearCrossEntropyLoss(4, 3, weight=[1.0, 2.0, 3.0])


def test_jvp_zero_denominator_with_smoothing_is_nan():
    w = torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0], dtype=F64)
    y = torch.tensor([0, 1, -100, -100])
    v = _logits(seed=5)
    _, want = torch.func.jvp(lambda t: F.cross_entropy(t, y, weight=w, label_smoothing=0.2),
                             (_logits(),), (v,))
    _, got = torch.func.jvp(lambda t: xt.cross_entropy(t, y, weight=w, label_smoothing=0.2),
                            (_logits(),), (v,))
    assert want.isnan()
    _same(got, want)


WEIGHT_DTYPE_CASES = [  # (logits, target, weight): torch multiplies and promotes
    (torch.bfloat16, torch.float32, torch.float32), (torch.float32, torch.float32, F64),
    (torch.float32, F64, torch.float16), (torch.bfloat16, torch.bfloat16, torch.float16)]


@pytest.mark.parametrize("dtypes", WEIGHT_DTYPE_CASES, ids=str)
@pytest.mark.parametrize("head", [False, True])
def test_probability_target_weight_of_another_dtype_promotes_as_torch(dtypes, head):
    # _rules.make_options(probability=True) takes any floating weight; choose_loss_dtype
    # promotes the loss with it; values and gradients (logits, target, weight; linear
    # weight) against torch's own float64 computation on the same rounded inputs
    zd, td, wd = dtypes
    g = torch.Generator().manual_seed(4)
    x, lw = torch.randn(3, 4, generator=g), torch.randn(5, 4, generator=g)
    p, w = torch.rand(3, 5, generator=g).softmax(1), torch.rand(5, generator=g) + 0.5
    x, lw, p, w = x.to(zd), lw.to(zd), p.to(td), w.to(wd)

    def run(fn, cast):
        a = [cast(t).requires_grad_() for t in (x, lw, p, w)]
        out = fn(*a)
        return out, torch.autograd.grad(out.sum(), a)

    def torch_loss(a, b, c, d):
        logits = F.linear(a, b) if head else a @ b.T
        return F.cross_entropy(logits, c, weight=d, label_smoothing=0.1, reduction="none")

    def crossent_loss(a, b, c, d):
        if head:
            return xt.linear_cross_entropy(a, b, c, weight=d, label_smoothing=0.1,
                                           reduction="none")
        return xt.cross_entropy(a @ b.T, c, weight=d, label_smoothing=0.1, reduction="none")

    want_dtype = F.cross_entropy(x @ lw.T, p, weight=w).dtype
    assert want_dtype == torch.promote_types(torch.promote_types(zd, td), wd)
    ref, ref_grads = run(torch_loss, lambda t: t.double())
    got, grads = run(crossent_loss, lambda t: t.clone())
    assert got.dtype == want_dtype
    low = torch.bfloat16 in dtypes or torch.float16 in dtypes
    tol = dict(rtol=2e-2, atol=2e-2) if low else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.double(), ref, **tol)
    for a, b, t in zip(grads, ref_grads, (x, lw, p, w), strict=True):
        assert a.dtype == t.dtype
        torch.testing.assert_close(a.double(), b, **tol)
