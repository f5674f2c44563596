"""Adversarial review of five changes (issue 16 and the NaN-gradient fixes): the small-input
fast path of ``crossent.torch.cross_entropy``, the opt-in compiled kernel
(``set_compiled_kernel``), ``grad_output`` that is NaN or infinite, ``C = 0`` and the
``lse`` statistic of infinite rows.

References are independent of crossent: ``torch.nn.functional.cross_entropy`` (float64
for the low-precision kernels) and ``torch.logsumexp``; the fast path must equal torch
bit for bit, and everything it declines must behave as the checked path (its errors).
"""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import crossent.torch as xt
from crossent.errors import InputError
from crossent.torch import _cross_entropy as ce_module
from crossent.torch import _inductor


def _data(n=7, c=5, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, generator=g, dtype=dtype) * 3, torch.randint(0, c, (n,),
                                                                            generator=g)


def _outcome(fn):
    """(result, None) or (None, (exception type, message))."""
    try:
        return fn(), None
    except Exception as e:  # the comparison is the point
        return None, (type(e), str(e))


# ---- 1. the small-input fast path ---------------------------------------------------




def _checked_path(monkeypatch, fn):
    """``fn()`` with the fast path switched off: the checked path's behaviour."""
    with monkeypatch.context() as m:
        m.setattr(ce_module, "_torch_kernel_directly", lambda *args: None)
        return _outcome(fn)


EDGE_CALLS = {
    "transposed": lambda: (torch.randn(5, 7).T, torch.tensor([0, 1, 2, 3, 4, 0, 1]), {}),
    "expanded": lambda: (torch.randn(1, 5).expand(7, 5), torch.tensor([4] * 7), {}),
    "expanded target": lambda: (torch.randn(7, 5), torch.tensor([2]).expand(7), {}),
    "strided target": lambda: (torch.randn(7, 5), (torch.arange(14) % 5)[::2], {}),
    "zero rows": lambda: (torch.randn(0, 5), torch.zeros(0, dtype=torch.long), {}),
    "zero rows none": lambda: (torch.randn(0, 5), torch.zeros(0, dtype=torch.long),
                               {"reduction": "none"}),
    "negative ignore_index": lambda: (torch.randn(7, 5), torch.tensor([0, -7, 2, -7, 4, 1, 0]),
                                      {"ignore_index": -7}),
    "int64 max ignore_index": lambda: (torch.randn(7, 5), torch.tensor([0, 1, 2, 3, 4, 1, 0]),
                                       {"ignore_index": 2 ** 63 - 1}),
    "ignore_index a class": lambda: (torch.randn(7, 5), torch.tensor([0, 1, 2, 3, 4, 1, 0]),
                                     {"ignore_index": 1, "label_smoothing": 1}),
    "numpy ignore_index": lambda: (torch.randn(7, 5), torch.tensor([0, 1, 2, 3, 4, 1, 0]),
                                   {"ignore_index": np.int64(3)}),
    "numpy smoothing": lambda: (torch.randn(7, 5), torch.tensor([0, 1, 2, 3, 4, 1, 0]),
                                {"label_smoothing": np.float64(0.25)}),
    "numpy reduction": lambda: (torch.randn(7, 5), torch.tensor([0, 1, 2, 3, 4, 1, 0]),
                                {"reduction": np.str_("sum")}),
    "smoothing -0.0": lambda: (torch.randn(7, 5), torch.tensor([0, 1, 2, 3, 4, 1, 0]),
                               {"label_smoothing": -0.0, "z_loss": -0.0}),
    "float64": lambda: (torch.randn(7, 5, dtype=torch.float64),
                        torch.tensor([0, 1, 2, 3, 4, 1, 0]), {"reduction": "none"}),
    "-inf row": lambda: (torch.tensor([[-math.inf] * 5, [0.0] * 5]), torch.tensor([1, 2]),
                         {}),
}


@pytest.mark.native_dispatch
@pytest.mark.parametrize("case", list(EDGE_CALLS))
def test_fast_path_edge_inputs_are_torch_bit_for_bit(case, monkeypatch):
    x, y, options = EDGE_CALLS[case]()
    torch_options = {k: (v.item() if isinstance(v, np.generic) else v)
                     for k, v in options.items() if k != "z_loss"}
    a, b = x.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
    ours = xt.cross_entropy(a, y, **options)
    ref = F.cross_entropy(b, y, **torch_options)
    assert ours.dtype == ref.dtype and ours.shape == ref.shape
    assert torch.equal(ours.nan_to_num(7.0), ref.nan_to_num(7.0))
    if ref.numel():
        go = torch.linspace(0.5, 1.5, ref.numel(), dtype=ref.dtype).reshape(ref.shape)
        ours.backward(go)
        ref.backward(go)
        assert torch.equal(a.grad.nan_to_num(7.0), b.grad.nan_to_num(7.0))
    checked, problem = _checked_path(monkeypatch, lambda: xt.cross_entropy(x, y, **options))
    assert problem is None and torch.equal(checked.nan_to_num(7.0), ref.nan_to_num(7.0))


BAD_CALLS = {
    "ignore_index beyond int64": ({"ignore_index": 2 ** 70}, None),
    "ignore_index bool": ({"ignore_index": True}, "ignore_index"),
    "ignore_index float": ({"ignore_index": -100.0}, "ignore_index"),
    "smoothing bool": ({"label_smoothing": True}, "label_smoothing"),
    "smoothing 1 + ulp": ({"label_smoothing": math.nextafter(1.0, 2.0)}, "label_smoothing"),
    "reduction upper": ({"reduction": "MEAN"}, "reduction"),
    "reduction elementwise_mean": ({"reduction": "elementwise_mean"}, "reduction"),
    "z_loss nan": ({"z_loss": math.nan}, "z_loss"),
    "backend none": ({"backend": None}, "backend"),
    "backend array": ({"backend": np.array(["auto"])}, "backend"),  # == "auto" is truthy
    "backend pair": ({"backend": np.array(["auto", "native"])}, "backend"),
    "out of range negative target": ({"target": [0, -5, 1, 2, 3, 4, 0]}, None),
    "target on meta": ({"target_device": "meta"}, None),
}


@pytest.mark.native_dispatch
@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_fast_path_bad_calls_fail_as_the_checked_path(case, monkeypatch):
    options, argument = BAD_CALLS[case]
    options = dict(options)
    x, y = _data()
    if "target" in options:
        y = torch.tensor(options.pop("target"))
    if "target_device" in options:
        y = y.to(options.pop("target_device"))
    fast, fast_problem = _outcome(lambda: xt.cross_entropy(x, y, **options))
    _, checked_problem = _checked_path(monkeypatch, lambda: xt.cross_entropy(x, y, **options))
    assert fast is None and fast_problem == checked_problem
    if argument is not None:
        assert issubclass(fast_problem[0], InputError) and argument in fast_problem[1]


@pytest.mark.native_dispatch
def test_fast_path_under_autocast_inference_and_deterministic_modes(checked_calls):
    x, y = _data()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, ref = xt.cross_entropy(x, y), F.cross_entropy(x, y)
        assert ours.dtype == ref.dtype and torch.equal(ours, ref)
        low = x.bfloat16()  # not the fast path: autocast's float32 policy, as torch
        assert torch.equal(xt.cross_entropy(low, y), F.cross_entropy(low, y))
    with torch.inference_mode():
        ours = xt.cross_entropy(x, y, reduction="none")
        assert ours.is_inference() and torch.equal(ours, F.cross_entropy(x, y, reduction="none"))
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert torch.equal(xt.cross_entropy(x, y), F.cross_entropy(x, y))
    finally:
        torch.use_deterministic_algorithms(previous)
    assert checked_calls == [1]  # the bfloat16 call only


@pytest.mark.native_dispatch
def test_dispatch_mode_sees_torchs_own_operators():
    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    x, y = _data()
    results = []
    for fn in (xt.cross_entropy, F.cross_entropy):
        a = x.clone().requires_grad_()
        with Record() as mode:
            loss = fn(a, y, label_smoothing=0.1)
            loss.backward()
        results.append((mode.ops, loss.detach(), a.grad))
    assert results[0][0] == results[1][0]
    assert torch.equal(results[0][1], results[1][1]) and torch.equal(results[0][2],
                                                                     results[1][2])


@pytest.mark.native_dispatch
def test_fast_path_from_threads_is_torch():
    inputs = [_data(64, 33, seed=s) for s in range(4)]
    refs = [F.cross_entropy(x, y, reduction="none") for x, y in inputs]
    bad = []

    def work(k):
        x, y = inputs[k]
        for _ in range(50):
            if not torch.equal(xt.cross_entropy(x, y, reduction="none"), refs[k]):
                bad.append(k)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert bad == [] and not any(t.is_alive() for t in threads)


# ---- 2. the compiled kernel ----------------------------------------------------------

needs_compiler = pytest.mark.skipif(not _inductor.available(), reason="no C++ compiler")


@pytest.fixture
def compiled(monkeypatch):
    calls = []
    real = _inductor.softmax_grad_rows

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(_inductor, "softmax_grad_rows", spy)
    previous = xt.set_compiled_kernel(True)
    yield calls
    xt.set_compiled_kernel(previous)


def _float64_torch(z, y, weight=None, grad_output=None, **options):
    x = z.double().requires_grad_()
    loss = F.cross_entropy(x, y, weight=None if weight is None else weight.double(),
                           **options)
    loss.backward(None if grad_output is None else grad_output.double())
    return loss.detach(), x.grad


def _assert_like(ours, ref, rtol=2.0 ** -7, atol=1e-5):
    ours = ours.double()
    assert torch.equal(ours.isnan(), ref.isnan()), (ours.isnan() != ref.isnan()).nonzero()
    torch.testing.assert_close(ours, ref, rtol=rtol, atol=atol, equal_nan=True)


@needs_compiler
@pytest.mark.timeout(300)
def test_compiled_kernel_non_finite_rows_give_torchs_nan(compiled):
    """torch's gradient of a row is ``dlogp - p sum(dlogp)``: a row whose softmax is NaN
    (a NaN logit, all -inf, a +inf) has a NaN gradient even when it is ignored or its
    class weight is 0 (``NaN * 0``). The row-block kernel gives the same; the compiled
    kernel used to give 0 there."""
    g = torch.Generator().manual_seed(0)
    z = (torch.randn(16, 64, generator=g) * 3).bfloat16()
    y = torch.randint(0, 64, (16,), generator=g)
    y[2] = y[4] = y[5] = -100
    z[2, 3] = math.nan
    z[4] = -math.inf
    z[5, 7] = math.inf
    weight = (torch.rand(64, generator=g) + 0.5).bfloat16()
    weight[y[8]] = weight[y[9]] = 0
    z[8, 1] = math.nan  # counted, class weight 0
    z[9, (int(y[9]) + 1) % 64] = math.inf
    z[10, (int(y[10]) + 1) % 64] = z[10, y[10]] + 60  # the far-row redo, finite
    for options in ({}, {"weight": weight}, {"reduction": "none"}):
        for inplace in (False, True):
            x = z.clone().requires_grad_()
            loss = xt.cross_entropy(x, y, backend="rowblock", inplace_backward=inplace,
                                    **options)
            go = torch.linspace(0.5, 2.0, 16).bfloat16() if loss.dim() else None
            loss.backward(go)
            ref_loss, ref_grad = _float64_torch(z, y, grad_output=go, **options)
            _assert_like(loss.detach(), ref_loss, rtol=1e-2, atol=1e-2)
            _assert_like(x.grad, ref_grad)
    assert compiled


@needs_compiler
@pytest.mark.timeout(300)
def test_compiled_kernel_tiny_class_weights_keep_their_gradient(compiled):
    """``a = w_y`` (reduction "sum") far below 1, in a row whose ``s = sum exp(z - z_y)``
    is large: ``a / s`` used to underflow float32 (1e-35 / e^30 = 1e-48 -> 0), so every
    other class's gradient ``w_y p_c`` (~1e-35, a normal bfloat16) came out 0."""
    g = torch.Generator().manual_seed(1)
    z = torch.zeros(6, 40).bfloat16()
    y = torch.randint(0, 40, (6,), generator=g)
    z[torch.arange(6), (y + 1) % 40] = 30.0
    weight = torch.full((40,), 1e-35).bfloat16()
    x = z.clone().requires_grad_()
    xt.cross_entropy(x, y, weight=weight, reduction="sum", backend="rowblock").backward()
    ref = _float64_torch(z, y, weight=weight, reduction="sum")[1]
    others = torch.ones_like(ref, dtype=torch.bool)
    others[torch.arange(6), y] = False
    assert bool((ref[others].abs() > 1e-38).any())
    torch.testing.assert_close(x.grad.double()[others], ref[others], rtol=2.0 ** -7,
                               atol=1e-40)
    assert compiled


@needs_compiler
@pytest.mark.timeout(300)
def test_compiled_kernel_buffers_threads_toggling_and_double_backward(compiled):
    g = torch.Generator().manual_seed(2)
    inputs = [((torch.randn(48, 300, generator=g) * 4).bfloat16(),
               torch.randint(0, 300, (48,), generator=g)) for _ in range(3)]
    refs = [_float64_torch(z, y)[1] for z, y in inputs]
    previous = xt.set_buffer_reuse(True)
    try:
        # two pending forwards, then both backwards; the first gradient is kept while
        # more calls (same shape: a reused buffer would be visible) run
        xs = [z.clone().requires_grad_() for z, _ in inputs[:2]]
        losses = [xt.cross_entropy(x, y, backend="rowblock") for x, (_, y) in zip(
            xs, inputs[:2], strict=True)]
        for loss in losses:
            loss.backward()
        kept = xs[0].grad.clone()
        for _ in range(2):
            x = inputs[2][0].clone().requires_grad_()
            xt.cross_entropy(x, inputs[2][1], backend="rowblock").backward()
        assert torch.equal(xs[0].grad, kept)
        for x, ref in zip(xs, refs[:2], strict=True):
            _assert_like(x.grad, ref)
        # switched off between forward and backward: the stored gradient still serves
        x = inputs[0][0].clone().requires_grad_()
        loss = xt.cross_entropy(x, inputs[0][1], backend="rowblock")
        xt.set_compiled_kernel(False)
        loss.backward()
        xt.set_compiled_kernel(True)
        _assert_like(x.grad, refs[0])
        # threads at once, in place and not
        got: dict = {}

        def work(k):
            z, y = inputs[k]
            for i in range(3):
                x = z.clone().requires_grad_()
                xt.cross_entropy(x, y, backend="rowblock",
                                 inplace_backward=bool((k + i) % 2)).backward()
                got.setdefault(k, []).append(x.grad)

        threads = [threading.Thread(target=work, args=(k,)) for k in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in threads)
        for k, grads in got.items():
            assert len(grads) == 3 and all(torch.equal(q, grads[0]) for q in grads)
            _assert_like(grads[0], refs[k])
    finally:
        xt.set_buffer_reuse(previous)
    # double backward: create_graph takes the composable path
    z, y = inputs[1]
    x = z.clone().requires_grad_()
    (grad,) = torch.autograd.grad(xt.cross_entropy(x, y, backend="rowblock"), x,
                                  create_graph=True)
    (hess,) = torch.autograd.grad(grad.float().square().sum(), x)
    r = z.double().requires_grad_()
    (grad_ref,) = torch.autograd.grad(F.cross_entropy(r, y), r, create_graph=True)
    (hess_ref,) = torch.autograd.grad(grad_ref.square().sum(), r)
    _assert_like(grad, grad_ref)
    torch.testing.assert_close(hess.double(), hess_ref, rtol=0.05,
                               atol=0.02 * float(hess_ref.abs().max()))
    assert compiled


@pytest.mark.parametrize("value", [1, 0, None, "True", np.bool_(True)])
def test_set_compiled_kernel_refuses_non_bools(value):
    with pytest.raises(InputError, match="enabled"):
        xt.set_compiled_kernel(value)


# ---- 3. grad_output NaN or infinite ---------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_non_finite_grad_output_with_nan_logits_in_ignored_rows(reduction, dtype):
    """An ignored row with a NaN logit: torch's gradient there is NaN (``exp(NaN) * 0``)
    whatever ``grad_output`` is; a NaN ``grad_output`` used to zero it."""
    z, _ = _data(6, 5, dtype=torch.float64, seed=3)
    z[1, 2] = math.nan
    z[3] = -math.inf
    y = torch.tensor([0, -100, 2, -100, 4, 1])
    for value in (math.nan, 1.0, 2.0):
        x = z.to(dtype).requires_grad_()
        loss = xt.cross_entropy(x, y, reduction=reduction, backend="rowblock")
        go = torch.full(loss.shape, value)
        if go.dim():
            go[2] = math.nan
        loss.backward(go.to(loss.dtype))
        ref = _float64_torch(z.to(dtype), y, grad_output=go.to(dtype), reduction=reduction)[1]
        _assert_like(x.grad, ref, rtol=2.0 ** -7 if dtype == torch.bfloat16 else 1e-5)


INF_CASES = [("mean", {}), ("sum", {}), ("none", {}), ("mean", {"label_smoothing": 0.2}),
             ("none", {"label_smoothing": 0.2}), ("sum", {"probabilities": True}),
             ("none", {"probabilities": True})]


@pytest.mark.parametrize("reduction, options", INF_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_infinite_grad_output_gives_torchs_nan(reduction, options, dtype):
    """torch forms ``dlogp - p sum(dlogp)``: with an infinite ``grad_output`` the entries
    where ``dlogp`` is infinite (the target; every class with smoothing or probability
    targets) are ``inf - inf = NaN``, the others ``+-inf`` (NaN where ``p = 0``);
    ignored rows 0."""
    options = dict(options)
    z, y = _data(6, 5, dtype=dtype, seed=4)
    z[5, 0] = -math.inf
    target = torch.softmax(torch.randn(6, 5, dtype=dtype), 1) if options.pop(
        "probabilities", False) else torch.where(torch.arange(6) == 2, -100, y)
    for value in (math.inf, -math.inf):
        x = z.clone().requires_grad_()
        loss = xt.cross_entropy(x, target, reduction=reduction, backend="rowblock", **options)
        go = torch.full(loss.shape, value, dtype=dtype)
        if go.dim():
            go[1] = 1.5
        loss.backward(go)
        r = z.clone().requires_grad_()
        F.cross_entropy(r, target, reduction=reduction, **options).backward(go)
        assert torch.equal(x.grad.isnan(), r.grad.isnan())
        assert torch.equal(x.grad.nan_to_num(0.0, 1.0, -1.0).sign(),
                           r.grad.nan_to_num(0.0, 1.0, -1.0).sign())
        finite = r.grad.isfinite()
        torch.testing.assert_close(x.grad[finite], r.grad[finite])


def test_float64_repeated_backward_with_nan_grad_output():
    """float64 keeps the stored gradient (gradcheck): each backward scales a copy."""
    z, y = _data(6, 5, dtype=torch.float64, seed=5)
    y[1] = -100
    z[1, 0] = math.nan
    x = z.clone().requires_grad_()
    loss = xt.cross_entropy(x, y, backend="rowblock")
    r = z.clone().requires_grad_()
    ref = F.cross_entropy(r, y)
    for value in (math.nan, 1.0, 2.0, math.nan):
        go = torch.tensor(value, dtype=torch.float64)
        (ours,) = torch.autograd.grad(loss, x, go, retain_graph=True)
        (theirs,) = torch.autograd.grad(ref, r, go, retain_graph=True)
        _assert_like(ours, theirs, rtol=1e-7, atol=1e-12)


def test_nan_grad_output_three_dimensional_input():
    g = torch.Generator().manual_seed(6)
    z = torch.randn(3, 5, 4, generator=g)
    y = torch.randint(0, 5, (3, 4), generator=g)
    y[0, 1] = y[2, 3] = -100
    for reduction in ("mean", "none"):
        x, r = z.clone().requires_grad_(), z.clone().requires_grad_()
        loss = xt.cross_entropy(x, y, reduction=reduction, backend="rowblock")
        ref = F.cross_entropy(r, y, reduction=reduction)
        go = torch.full_like(ref, math.nan)
        loss.backward(go)
        ref.backward(go)
        _assert_like(x.grad, r.grad.double(), rtol=1e-5)


# ---- 4. C = 0 and 5. the lse statistic of infinite rows --------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing", [0.0, 0.3])
@pytest.mark.parametrize("probabilities", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
def test_no_classes_like_torch(reduction, smoothing, probabilities, weighted):
    """C = 0 (smoothing over no classes used to divide by zero; a (0,) class weight
    used to be indexed)."""
    z = torch.randn(3, 0)
    y = torch.randn(3, 0) if probabilities else torch.full((3,), -100)
    weight = torch.ones(0) if weighted else None
    x, r = z.clone().requires_grad_(), z.clone().requires_grad_()
    ours = xt.cross_entropy(x, y, weight, reduction=reduction, label_smoothing=smoothing)
    ref = F.cross_entropy(r, y, weight, reduction=reduction, label_smoothing=smoothing)
    assert ours.shape == ref.shape and ours.dtype == ref.dtype
    torch.testing.assert_close(ours, ref, equal_nan=True)
    (g,) = torch.autograd.grad(ours, x, torch.ones_like(ours))
    assert g.shape == (3, 0)


@pytest.mark.parametrize("backend", ["rowblock", "native"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_lse_statistic_of_infinite_rows_is_logsumexp(backend, dtype):
    z = torch.randn(7, 5, generator=torch.Generator().manual_seed(7)).to(dtype)
    z[0] = math.inf
    z[1] = -math.inf
    z[2, 1] = math.inf
    z[3, 2] = -math.inf
    z[4, 0] = math.nan
    z[5, 1], z[5, 2] = math.inf, -math.inf
    y = torch.tensor([0, 1, 2, 3, 4, 0, -100])
    for options in ({}, {"label_smoothing": 0.1}):
        _, stats = xt.cross_entropy(z, y, statistics=("lse",), backend=backend, **options)
        ref = torch.logsumexp(z.double(), 1)
        ref[6] = math.nan  # ignored rows hold NaN
        _assert_like(stats.lse, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["native", "rowblock"])
def test_target_logprob_of_a_row_holding_inf_is_log_softmax_nan(backend):
    """A +inf logit anywhere in the row: torch.log_softmax is NaN on the whole row (inf -
    inf); target_logprob follows it, not the limit -inf of z_y - lse."""
    inf = float("inf")
    z = torch.tensor([[0.0, inf, 1.0], [1.0, 2.0, 3.0], [inf, 0.0, 0.0], [-inf] * 3])
    y = torch.tensor([0, 1, 0, 1])
    _, stats = xt.cross_entropy(z, y, reduction="none", backend=backend,
                                statistics="target_logprob")
    want = torch.log_softmax(z.double(), 1)[torch.arange(4), y].float()
    torch.testing.assert_close(stats.target_logprob, want, equal_nan=True)


LINEAR_INF_CASES = [("mean", {}), ("sum", {}), ("none", {}),
                    ("mean", {"label_smoothing": 0.2}), ("sum", {"weight": True})]


@pytest.mark.parametrize("reduction, options", LINEAR_INF_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_linear_head_infinite_grad_output_gives_torchs_nan(reduction, options, dtype):
    """The unfused ``F.cross_entropy(F.linear(x, W, b), y)``: ``dlogits`` is NaN at the
    targets (``inf - inf``), ``+-inf`` elsewhere, and ``dx``/``dW``/``db`` sum those into
    NaN and infinities; crossent's fused head (several chunks) gives the same pattern."""
    options = dict(options)
    g = torch.Generator().manual_seed(7)
    x, w, b = (torch.randn(*shape, generator=g, dtype=dtype) for shape in ((9, 4), (6, 4),
                                                                           (6,)))
    y = torch.randint(0, 6, (9,), generator=g)
    y[4] = -100
    if options.pop("weight", False):
        options["weight"] = torch.rand(6, generator=g, dtype=dtype) + 0.5
    for value in (math.inf, -math.inf):
        ours = [t.clone().requires_grad_() for t in (x, w, b)]
        ref = [t.clone().requires_grad_() for t in (x, w, b)]
        loss = xt.linear_cross_entropy(ours[0], ours[1], y, ours[2], reduction=reduction,
                                       backend="rowblock", chunk_size=4, **options)
        go = torch.full(loss.shape, value, dtype=dtype)
        if go.dim():
            go[1] = 1.5
        loss.backward(go)
        F.cross_entropy(F.linear(*ref), y, reduction=reduction, **options).backward(go)
        for a, r in zip(ours, ref, strict=True):
            assert torch.equal(a.grad.isnan(), r.grad.isnan())
            assert torch.equal(a.grad.nan_to_num(0.0, 1.0, -1.0).sign(),
                               r.grad.nan_to_num(0.0, 1.0, -1.0).sign())
            finite = r.grad.isfinite()
            torch.testing.assert_close(a.grad[finite], r.grad[finite])
