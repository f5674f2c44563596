"""Adversarial review (helper, session 22) of ae99b87 and 882cb9b on the CPU kernels:

(a) float16 ``"mean"`` gradients stored without ``1/denominator``, applied in backward
    with ``grad_output`` (``_rules.defers_mean_scale`` / ``split_scale``);
(b) backward raises where torch's would after an in-place change of an input its backward
    reads (class ``weight``; the head's ``linear_weight`` / ``input``): ``remember_target``
    / ``head_inputs_read`` / ``check_target_intact``;
(d) float16 CPU linear-head logits rounded to float16 (``head_pass`` ``rounds_logits``);
(e) the row-block head multiplies its stored gradients by ``grad_output`` in float32.

References are independent of crossent: torch's ``F.cross_entropy`` / ``F.linear`` in the
tested dtype (NaN/inf patterns, whether backward raises), in float64 (accuracy), and torch
in float32 rounded to float16 (autocast's error, the bar crossent's float16 error is held
to). The tests directory's conftest routes ``backend="auto"`` to the fused kernels at every
size. A bug is a test written as it should pass, marked ``xfail(strict=True)``.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from grad_probes import (
    inplace_outcome,
    relative_error,
    same_inplace_outcome,
    same_nonfinite_pattern,
)
from torch.utils.checkpoint import checkpoint

import crossent.torch as xt

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::RuntimeWarning")]






def _as_accurate_as_torch(got: torch.Tensor, theirs: torch.Tensor, ref: torch.Tensor,
                          floor: float = 2e-3) -> None:
    """``got`` has torch's dtype and NaN/inf pattern (``theirs``: torch in the same dtype)
    and, on the finite entries, an error against the float64 ``ref`` within 2.5x torch's
    own (or ``floor``, a few float16 ulps, where torch happens to be exact)."""
    assert got.dtype == theirs.dtype and same_nonfinite_pattern(got, theirs)
    fin = torch.isfinite(theirs)
    if not bool(fin.any()) or float(ref[fin].double().norm()) == 0.0:
        return
    want = ref[fin].double()
    mine, torchs = relative_error(got[fin], want), relative_error(theirs[fin], want)
    assert mine <= max(2.5 * torchs, floor), (mine, torchs)




# ---------------------------------------------------------------------------------------
# (a) float16 "mean" with the 1/denominator deferred: accuracy against float64
# ---------------------------------------------------------------------------------------

_G = torch.Generator().manual_seed(0)
_N, _C = 64, 300
_Z = (torch.randn(_N, _C, generator=_G) * 4).half()  # wide: many p/N under 6e-8
_Y = torch.randint(0, _C, (_N,), generator=_G)
_Y[::5] = -100
_WEIGHTS = {"none": None,
            "positive": (torch.rand(_C, generator=_G) + 0.5).half(),
            "mixed_sign": torch.randn(_C, generator=_G).half()}


def _torch_grad(dtype, w, ls, scale, num_items):
    z = _Z.to(dtype).requires_grad_()
    loss = F.cross_entropy(z, _Y, None if w is None else w.to(dtype), label_smoothing=ls,
                           reduction="sum" if num_items is not None else "mean")
    if num_items is not None:
        loss = loss / float(num_items)
    (loss * scale).backward()
    return z.grad


@pytest.mark.parametrize("extra", [{}, {"inplace_backward": True},
                                   {"statistics": "entropy"}])
@pytest.mark.parametrize("num_items", [None, 1000, 1000.0, "tensor_int", "tensor_float"])
@pytest.mark.parametrize("ls", [0.0, 0.1])
@pytest.mark.parametrize("wname", list(_WEIGHTS))
def test_float16_mean_gradient_under_a_loss_scale_is_as_accurate_as_torch(wname, ls,
                                                                          num_items, extra):
    w = _WEIGHTS[wname]
    count = {"tensor_int": torch.tensor(1000), "tensor_float": torch.tensor(1000.0)}.get(
        num_items, num_items) if isinstance(num_items, str) else num_items
    scale = 65536.0
    ref = _torch_grad(F64, w, ls, scale, None if count is None else 1000)
    torch_amp = _torch_grad(F32, w, ls, scale, None if count is None else 1000).half()
    z = _Z.clone().requires_grad_()
    out = xt.cross_entropy(z * 1, _Y, w, label_smoothing=ls, loss_dtype=F32,
                           reduction="sum" if count is not None else "mean",
                           num_items=count, **extra)
    loss = out[0] if isinstance(out, tuple) else out
    (loss * scale).backward()
    assert z.grad.dtype == F16 and bool(torch.isfinite(z.grad).all())
    assert relative_error(z.grad, ref) < 2.5 * relative_error(torch_amp, ref)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("ls", [0.0, 0.1])
def test_float16_cross_entropy_matches_torch_float16(reduction, ls):
    g = torch.Generator().manual_seed(1)
    z = (torch.randn(48, 50, generator=g) * 3).half()
    y = torch.randint(0, 50, (48,), generator=g)
    y[::4] = -100
    w = (torch.rand(50, generator=g) + 0.5).half()
    a, b = z.clone().requires_grad_(), z.clone().requires_grad_()
    r = z.double().requires_grad_()
    la = xt.cross_entropy(a, y, w, reduction=reduction, label_smoothing=ls)
    lb = F.cross_entropy(b, y, w, reduction=reduction, label_smoothing=ls)
    lr = F.cross_entropy(r, y, w.double(), reduction=reduction, label_smoothing=ls)
    _as_accurate_as_torch(la.reshape(-1), lb.reshape(-1), lr.detach().reshape(-1))
    la.sum().backward()
    lb.sum().backward()
    lr.sum().backward()
    _as_accurate_as_torch(a.grad, b.grad, r.grad)


@pytest.mark.parametrize("ls", [0.0, 0.1])
@pytest.mark.parametrize("case", ["zero_weights", "nan_weight", "all_ignored",
                                  "all_ignored_weighted"])
def test_float16_mean_degenerate_denominators_keep_torchs_pattern(case, ls):
    g = torch.Generator().manual_seed(2)
    z = (torch.randn(16, 9, generator=g) * 2).half()
    y = torch.randint(0, 9, (16,), generator=g)
    w = (torch.rand(9, generator=g) + 0.5).half()
    if case == "zero_weights":
        w = torch.zeros(9, dtype=F16)
    elif case == "nan_weight":
        w[3] = math.nan
    elif case.startswith("all_ignored"):
        y = torch.full((16,), -100)
        w = w if case.endswith("weighted") else None
    a, b = z.clone().requires_grad_(), z.clone().requires_grad_()
    la = xt.cross_entropy(a, y, w, label_smoothing=ls)
    lb = F.cross_entropy(b, y, w, label_smoothing=ls)
    assert same_nonfinite_pattern(la, lb)
    la.backward()
    lb.backward()
    assert same_nonfinite_pattern(a.grad, b.grad)
    torch.testing.assert_close(a.grad.nan_to_num(0, 0, 0), b.grad.nan_to_num(0, 0, 0),
                               rtol=1e-2, atol=1e-4)


@pytest.mark.parametrize("prob", [False, True])
@pytest.mark.parametrize("ls", [0.0, 0.2])
@pytest.mark.parametrize("go", [math.inf, -math.inf, math.nan, 0.0, 65504.0])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_float16_non_finite_grad_output_keeps_torchs_pattern(reduction, go, ls, prob):
    g = torch.Generator().manual_seed(3)
    z = (torch.randn(12, 7, generator=g) * 2).half()  # no p under float16's subnormals
    y = (torch.softmax(torch.randn(12, 7, generator=g), 1).half() if prob
         else torch.tensor([1, -100, 4, 6, 4, 0, 2, -100, 3, 5, 1, 0]))
    a, b = z.clone().requires_grad_(), z.clone().requires_grad_()
    r = z.double().requires_grad_()
    la = xt.cross_entropy(a, y, reduction=reduction, label_smoothing=ls)
    lb = F.cross_entropy(b, y, reduction=reduction, label_smoothing=ls)
    lr = F.cross_entropy(r, y.double() if prob else y, reduction=reduction,
                         label_smoothing=ls)
    la.backward(torch.tensor(go, dtype=F16))
    lb.backward(torch.tensor(go, dtype=F16))
    lr.backward(torch.tensor(go, dtype=F64))
    _as_accurate_as_torch(a.grad, b.grad, r.grad)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_float16_infinite_grad_output_with_a_tiny_probability_is_torchs_inf(reduction):
    z = torch.tensor([[0.0, 20.0, -5.0], [1.0, 2.0, 3.0]], dtype=F16)
    y = torch.tensor([1, 2])
    a, b = z.clone().requires_grad_(), z.clone().requires_grad_()
    la = xt.cross_entropy(a, y, reduction=reduction)
    lb = F.cross_entropy(b, y, reduction=reduction)
    la.backward(torch.full_like(la, math.inf))
    lb.backward(torch.full_like(lb, math.inf))
    assert b.grad[0].isinf().tolist() == [True, False, True]  # torch: inf, NaN, inf
    assert same_nonfinite_pattern(a.grad, b.grad)


def test_bfloat16_mean_is_unchanged_torchs_numbers():
    g = torch.Generator().manual_seed(4)
    z = (torch.randn(64, 300, generator=g) * 4).bfloat16()
    y = torch.randint(0, 300, (64,), generator=g)
    y[::5] = -100
    a, b = z.clone().requires_grad_(), z.clone().requires_grad_()
    xt.cross_entropy(a * 1, y).backward(torch.tensor(65536.0, dtype=BF16))
    F.cross_entropy(b.float(), y).mul(65536.0).backward()
    torch.testing.assert_close(a.grad.float(), b.grad.float(), rtol=1e-2, atol=1e-6)


def test_float16_double_backward_batched_and_func_grad_are_torchs():
    g = torch.Generator().manual_seed(5)
    z = (torch.randn(16, 11, generator=g) * 2).half()
    y = torch.randint(0, 11, (16,), generator=g)
    y[::5] = -100
    w = (torch.rand(11, generator=g) + 0.5).half()

    def double(f):
        zz = z.clone().requires_grad_()
        gz, = torch.autograd.grad(f(zz, y, w), zz, create_graph=True)
        (gz.float() ** 2).sum().backward()
        return gz.detach(), zz.grad

    def batched(f):
        zz = z.clone().requires_grad_()
        return torch.autograd.grad(f(zz, y, w), zz, torch.tensor([1.0, 2.0, 60000.0]).half(),
                                   is_grads_batched=True)[0]

    def func_grad(f):
        return torch.func.grad(lambda q: f(q, y, w).float())(z.clone())

    for got, want in ((double(xt.cross_entropy), double(F.cross_entropy)),):
        for a, b in zip(got, want, strict=False):
            assert a.dtype == b.dtype == F16
            torch.testing.assert_close(a, b, rtol=1e-2, atol=2e-4)
    a, b = batched(xt.cross_entropy), batched(F.cross_entropy)
    assert a.dtype == F16 and same_nonfinite_pattern(a, b)
    torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(func_grad(xt.cross_entropy), func_grad(F.cross_entropy),
                               rtol=1e-2, atol=2e-4)


def test_float16_backward_twice_raises_runtime_error():
    z = torch.randn(8, 5).half().requires_grad_()
    loss = xt.cross_entropy(z * 1, torch.randint(0, 5, (8,)))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def test_float64_retain_graph_twice_accumulates_as_torch():
    z = torch.randn(8, 5, dtype=F64)
    y = torch.randint(0, 5, (8,))
    w = torch.rand(5, dtype=F64) + 0.5
    a, b = z.clone().requires_grad_(), z.clone().requires_grad_()
    la, lb = xt.cross_entropy(a * 1, y, w), F.cross_entropy(b * 1, y, w)
    for loss in (la, lb):
        loss.backward(retain_graph=True)
        loss.backward(torch.tensor(3.0, dtype=F64))
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------------------
# (b) in-place changes between forward and backward: raise exactly where torch raises
# ---------------------------------------------------------------------------------------

_NB, _CB, _DB = 16, 7, 5
_YB = torch.tensor([-100, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 4, 5, 6, 0, 1])


def _ce(lib):
    return xt.cross_entropy if lib == "xt" else F.cross_entropy




def _weight_case(dtype, make, mutate, ls=0.0, prob=False, reduction="mean"):
    def build(lib):
        torch.manual_seed(1)
        z = torch.randn(_NB, _CB, dtype=dtype, requires_grad=True)
        w, base = make(dtype)
        t = torch.softmax(torch.randn(_NB, _CB), 1).to(dtype) if prob else _YB
        loss = _ce(lib)(z * 1, t, w, reduction=reduction, label_smoothing=ls)
        mutate(w, base)
        loss.sum().backward()
    return build


def _plain(dtype):
    return (torch.rand(_CB) + 0.5).to(dtype), None


def _view_of_buffer(dtype):
    buf = (torch.rand(2 * _CB) + 0.5).to(dtype)
    return buf[:_CB], buf


def _strided_view(dtype):
    buf = (torch.rand(2 * _CB) + 0.5).to(dtype)
    return buf[::2], buf


@pytest.mark.parametrize("dtype", [F32, F16, BF16, F64])
@pytest.mark.parametrize("kind", ["mul_", "mul_ ls", "mul_ prob", "mul_ prob ls", "sum",
                                  "none", "buffer view", "strided view", "slice of weight",
                                  ".data"])
def test_cross_entropy_class_weight_changed_in_place_raises_as_torch(dtype, kind):
    make, mutate, kw = _plain, (lambda w, b: w.mul_(2)), {}
    if "ls" in kind:
        kw["ls"] = 0.1
    if "prob" in kind:
        kw["prob"] = True
    if kind in ("sum", "none"):
        kw["reduction"] = kind
    if kind == "buffer view":
        make, mutate = _view_of_buffer, (lambda w, b: b.mul_(2))
    elif kind == "strided view":
        make, mutate = _strided_view, (lambda w, b: b.mul_(2))
    elif kind == "slice of weight":
        mutate = lambda w, b: w[0:2].mul_(2)  # noqa: E731
    elif kind == ".data":  # bypasses version counting in torch too
        mutate = lambda w, b: w.data.mul_(2)  # noqa: E731
    outcome = same_inplace_outcome(_weight_case(dtype, make, mutate, **kw))
    assert outcome == ("ok" if kind == ".data" else "raise")


@pytest.mark.parametrize("dtype", [F32, F16, F64])
@pytest.mark.parametrize("ls", [0.0, 0.1])
@pytest.mark.parametrize("inplace", [False, True])
def test_logits_changed_after_forward_are_not_refused_as_torch(dtype, ls, inplace):
    y = _YB

    def build(lib):
        z = torch.randn(_NB, _CB, dtype=dtype, requires_grad=True)
        h = z * 1
        kw = {"inplace_backward": True} if inplace and lib == "xt" else {}
        loss = _ce(lib)(h, y, label_smoothing=ls, **kw)
        h.mul_(2)
        loss.backward()
    assert same_inplace_outcome(build) == "ok"


@pytest.mark.parametrize("dtype", [F32, F16])
def test_save_on_cpu_and_checkpoint_weight_change_torchs_or_loud(dtype):
    def save_on_cpu(lib):
        z = torch.randn(_NB, _CB, dtype=dtype, requires_grad=True)
        w = (torch.rand(_CB) + 0.5).to(dtype)
        with torch.autograd.graph.save_on_cpu():
            loss = _ce(lib)(z * 1, _YB, w)
        w.mul_(2)
        loss.backward()

    def ckpt(lib, reentrant):
        z = torch.randn(_NB, _CB, dtype=dtype, requires_grad=True)
        w = (torch.rand(_CB) + 0.5).to(dtype)
        loss = checkpoint(lambda a: _ce(lib)(a * 1, _YB, w), z, use_reentrant=reentrant)
        w.mul_(2)
        loss.backward()

    # under save_on_cpu (the CPU tensor itself kept) and non-reentrant checkpointing
    # torch's backward reads the changed weight; the gradient crossent stored in forward
    # does not have it, so crossent refuses loudly (review H88, stop 35: before, "ok" with
    # the forward-time gradient); reentrant checkpointing re-runs crossent's forward too
    assert _loud_where_torch_reads_the_change(save_on_cpu)
    assert same_inplace_outcome(lambda lib: ckpt(lib, True)) == "ok"
    assert _loud_where_torch_reads_the_change(lambda lib: ckpt(lib, False))


def _loud_where_torch_reads_the_change(build) -> bool:
    """torch gives a gradient (read from the changed input), crossent raises its
    in-place error: the contract's "the reference's result or an exception"."""
    assert inplace_outcome(lambda: build("torch")) == "ok"
    with pytest.raises(RuntimeError, match=r"crossent\.torch\..*modified in place"):
        build("xt")
    return True


@pytest.mark.parametrize("dtype", [F32, F16])
@pytest.mark.parametrize("replace", [False, True])
def test_module_weight_refilled_raises_replaced_does_not_as_torch(dtype, replace):
    def build(lib):
        w = (torch.rand(_CB) + 0.5).to(dtype)
        mod = xt.CrossEntropyLoss(weight=w) if lib == "xt" else torch.nn.CrossEntropyLoss(
            weight=w)
        z = torch.randn(_NB, _CB, dtype=dtype, requires_grad=True)
        loss = mod(z * 1, _YB)
        if replace:
            mod.weight = w * 2
        else:
            mod.weight.fill_(1.0)
        loss.backward()
    assert same_inplace_outcome(build) == ("ok" if replace else "raise")


@pytest.mark.parametrize("auto", [BF16, F16])
def test_autocast_float32_class_weight_changed_raises_as_torch(auto):
    def build(lib):
        z = torch.randn(_NB, _CB, requires_grad=True)
        w = torch.rand(_CB) + 0.5
        with torch.autocast("cpu", dtype=auto):
            loss = _ce(lib)(F.linear(z, torch.eye(_CB)), _YB, w)
        w.mul_(2)
        loss.backward()
    assert same_inplace_outcome(build) == "raise"


@pytest.mark.parametrize("auto", [BF16, F16])
def test_autocast_low_precision_class_weight_changed_is_not_refused_as_torch(auto):
    def build(lib):
        z = torch.randn(_NB, _CB, requires_grad=True)
        w = (torch.rand(_CB) + 0.5).to(auto)
        with torch.autocast("cpu", dtype=auto):
            loss = _ce(lib)(F.linear(z, torch.eye(_CB)), _YB, w)
        w.mul_(2)
        loss.backward()
    assert same_inplace_outcome(build) == "ok"


# ---- the linear head


def _head(lib, x, w, t, b=None, **kw):
    if lib == "xt":
        return xt.linear_cross_entropy(x, w, t, b, **kw)
    cw = kw.pop("weight", None)
    return F.cross_entropy(F.linear(x, w, b), t, cw, **kw)


def _head_case(dtype, x_grad, w_grad, mutate, reduction="mean", class_weight=False,
               bias=False, x_make=None):
    def build(lib):
        torch.manual_seed(1)
        x = (torch.randn(_NB, _DB) if x_make is None else x_make()).to(dtype)
        if x_grad:
            x.requires_grad_()
        w = torch.randn(_CB, _DB, dtype=dtype, requires_grad=w_grad)
        b = torch.randn(_CB, dtype=dtype, requires_grad=True) if bias else None
        cw = (torch.rand(_CB) + 0.5).to(dtype) if class_weight else None
        xin = x * 1 if x_grad else x
        loss = _head(lib, xin, w, _YB, b, reduction=reduction, weight=cw)
        with torch.no_grad():
            mutate(xin, w, b, cw)
        loss.sum().backward()
    return build


_HEAD_CASES = {
    # name: (x_grad, w_grad, mutate, extra, torch's outcome)
    "dx and dW, linear_weight": (True, True, lambda x, w, b, c: w.add_(1), {}, "raise"),
    "dW only, linear_weight": (False, True, lambda x, w, b, c: w.add_(1), {}, "ok"),
    "dx only, linear_weight": (True, False, lambda x, w, b, c: w.add_(1), {}, "raise"),
    "dx only, a row of linear_weight": (True, False, lambda x, w, b, c: w[0].add_(1), {},
                                        "raise"),
    "dx only, input": (True, False, lambda x, w, b, c: x.add_(1), {}, "ok"),
    "dW only, input": (False, True, lambda x, w, b, c: x.add_(1), {}, "raise"),
    "bias": (True, True, lambda x, w, b, c: b.add_(1), {"bias": True}, "ok"),
    "linear_weight.data": (True, True, lambda x, w, b, c: w.data.add_(1), {}, "ok"),
}


@pytest.mark.parametrize("dtype", [F32, F16, BF16, F64])
@pytest.mark.parametrize("name", list(_HEAD_CASES))
def test_head_input_changed_in_place_raises_exactly_where_torch_does(dtype, name):
    x_grad, w_grad, mutate, extra, want = _HEAD_CASES[name]
    assert same_inplace_outcome(_head_case(dtype, x_grad, w_grad, mutate, **extra)) == want


@pytest.mark.parametrize("dtype", [F32, F64])
def test_head_float32_class_weight_changed_raises_as_torch(dtype):
    build = _head_case(dtype, True, True, lambda x, w, b, c: c.mul_(2), class_weight=True)
    assert same_inplace_outcome(build) == "raise"


@pytest.mark.parametrize("dtype", [F16, BF16])
def test_head_low_precision_class_weight_changed_raises_as_torch(dtype):
    build = _head_case(dtype, True, True, lambda x, w, b, c: c.mul_(2), class_weight=True)
    assert same_inplace_outcome(build) == "raise"


@pytest.mark.parametrize("layout", ["transposed", "strided"])
def test_head_non_contiguous_input_changed_raises_as_torch(layout):
    def make():
        return (torch.randn(_DB, _NB).t() if layout == "transposed"
                else torch.randn(_NB, 2 * _DB)[:, ::2])
    build = _head_case(F32, False, True, lambda x, w, b, c: x.add_(1), x_make=make)
    assert same_inplace_outcome(build) == "raise"


@pytest.mark.xfail(strict=True, reason=(
    "BUG H73 (left, documented): reduction='none' linear heads recompute the logits in "
    "backward from the saved input, weight and bias, so a change of any of them raises "
    "(a loud refusal) where torch, which saved its softmax, does not"))
@pytest.mark.parametrize("name", ["dW only, linear_weight", "dx only, input", "bias"])
def test_head_none_reduction_refuses_only_where_torch_does(name):
    x_grad, w_grad, mutate, extra, want = _HEAD_CASES[name]
    build = _head_case(F32, x_grad, w_grad, mutate, reduction="none", **extra)
    assert same_inplace_outcome(build) == want == "ok"


@pytest.mark.parametrize("auto", [BF16, F16])
@pytest.mark.parametrize("what", ["linear_weight", "input", "class weight"])
def test_head_under_autocast_is_not_refused_as_torch(auto, what):
    def build(lib):
        torch.manual_seed(1)
        x = torch.randn(_NB, _DB, requires_grad=True)
        w = torch.randn(_CB, _DB, requires_grad=True)
        cw = (torch.rand(_CB) + 0.5).to(auto)
        xin = x * 1
        with torch.autocast("cpu", dtype=auto):
            loss = _head(lib, xin, w, _YB, weight=cw)
        with torch.no_grad():
            {"linear_weight": w, "input": xin, "class weight": cw}[what].mul_(2)
        loss.backward()
    assert same_inplace_outcome(build) == "ok"


@pytest.mark.parametrize("dtype", [F32, F16])
@pytest.mark.parametrize("step", [False, True])
def test_head_optimizer_between_forward_and_backward_as_torch(dtype, step):
    def build(lib):
        torch.manual_seed(0)
        lin = torch.nn.Linear(_DB, _CB, bias=False).to(dtype)
        opt = torch.optim.SGD(lin.parameters(), lr=0.1)
        x = torch.randn(_NB, _DB, dtype=dtype, requires_grad=True)
        _head(lib, x * 1, lin.weight, _YB).backward()
        loss = _head(lib, x * 1, lin.weight, _YB)
        opt.zero_grad()
        if step:
            lin.weight.grad = torch.ones_like(lin.weight)
            opt.step()
        loss.backward()
    assert same_inplace_outcome(build) == ("raise" if step else "ok")


@pytest.mark.parametrize("how", ["save_on_cpu", "reentrant", "non-reentrant"])
def test_head_saved_tensor_hooks_and_checkpoint_torchs_or_loud(how):
    def build(lib):
        x = torch.randn(_NB, _DB, requires_grad=True)
        w = torch.randn(_CB, _DB, requires_grad=True)
        if how == "save_on_cpu":
            with torch.autograd.graph.save_on_cpu():
                loss = _head(lib, x * 1, w, _YB)
        else:
            loss = checkpoint(lambda a: _head(lib, a * 1, w, _YB), x,
                              use_reentrant=how == "reentrant")
        with torch.no_grad():
            w.add_(1)
        loss.backward()
    if how == "reentrant":  # crossent's forward re-runs with the changed W, as torch's
        assert same_inplace_outcome(build) == "ok"
    else:  # torch reads the changed W; crossent's stored gradient has the old: loud (H88)
        assert _loud_where_torch_reads_the_change(build)


# H73, fixed on CPU at stop 34: the compiled backward's CPU operator
# (crossent::scale_stored_grad_cpu) reads the class weight, so AOTAutograd saves it and
# checks its version (CUDA keeps the forward-time gradient: docs/guarantees.md)
def test_compiled_class_weight_changed_raises_as_torch():
    def build(lib):
        torch._dynamo.reset()
        z = torch.randn(_NB, _CB, requires_grad=True)
        w = torch.rand(_CB) + 0.5
        fn = torch.compile(lambda q: _ce(lib)(q * 1, _YB, w), backend="aot_eager")
        loss = fn(z)
        w.mul_(2)
        loss.backward()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert same_inplace_outcome(build) == "raise"


# ---------------------------------------------------------------------------------------
# (d)/(e) float16 CPU linear head: torch's float16 logits, patterns, loss scales
# ---------------------------------------------------------------------------------------


def _head_pair(x, w, t=None, go=1.0, ref=False, **kw):
    """crossent's and torch's (loss, dx, dW), and with ``ref`` torch's in float64 on the
    same (rounded) inputs too."""
    t = _YH if t is None else t
    out = []
    for lib in ("xt", "torch", "f64")[:3 if ref else 2]:
        dtype = F64 if lib == "f64" else x.dtype
        xx = x.detach().to(dtype).clone().requires_grad_()
        ww = w.detach().to(dtype).clone().requires_grad_()
        if lib == "xt":
            loss = xt.linear_cross_entropy(xx, ww, t, **kw)
        else:
            tkw = {k: v for k, v in kw.items() if k in ("reduction", "label_smoothing")}
            loss = F.cross_entropy(F.linear(xx, ww), t, **tkw)
        loss.backward(torch.full(loss.shape, go, dtype=loss.dtype))
        out.append((loss.detach(), xx.grad, ww.grad))
    return out


_GH = torch.Generator().manual_seed(7)
_YH = torch.randint(0, 40, (64,), generator=_GH)
_YH[::5] = -100
_XH = torch.randn(64, 16, generator=_GH)
_WH = torch.randn(40, 16, generator=_GH) * 0.3


@pytest.mark.parametrize("dtype", [F16, BF16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("go", [1.0, math.inf, math.nan, "big"])
def test_low_precision_head_matches_torch_and_its_patterns(dtype, reduction, go):
    if go == "big":
        go = 60000.0 if reduction == "none" else 65504.0
    got, want, ref = _head_pair(_XH.to(dtype), _WH.to(dtype), go=go, reduction=reduction,
                                ref=True)
    for a, b, r in zip(got, want, ref, strict=False):
        _as_accurate_as_torch(a.reshape(-1), b.reshape(-1), r.reshape(-1),
                              floor=1e-2 if dtype == BF16 else 2e-3)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("chunk_size", [None, 4])
def test_float16_head_overflowing_logit_is_torchs_nan_also_on_an_ignored_row(reduction,
                                                                          chunk_size):
    x, w = _XH.clone().half(), _WH.abs().half()
    x[3] = 6e4  # counted row: logits past 65504
    x[5] = 6e4  # ignored row (index 5 is a multiple of 5)
    got, want = _head_pair(x, w, reduction=reduction, chunk_size=chunk_size)
    for a, b in zip(got, want, strict=False):
        assert a.dtype == b.dtype and same_nonfinite_pattern(a, b)
    assert bool(want[2].isnan().any())


@pytest.mark.parametrize("dtype", [F16, BF16])
def test_low_precision_head_non_finite_inputs_and_loss_dtype(dtype):
    x = _XH.clone().to(dtype)
    x[2, 0], x[5, 1] = -math.inf, math.nan
    got, want = _head_pair(x, _WH.to(dtype))
    for a, b in zip(got, want, strict=False):
        assert same_nonfinite_pattern(a, b)
    xa = _XH.to(dtype).requires_grad_()
    loss = xt.linear_cross_entropy(xa, _WH.to(dtype), _YH, loss_dtype=F32)
    assert loss.dtype == F32
    ref = F.cross_entropy(F.linear(_XH.to(dtype).double(), _WH.to(dtype).double()), _YH)
    assert abs(loss.item() - ref.item()) < 1e-2


def test_float16_head_with_statistics_matches_torch():
    xa = _XH.half().requires_grad_()
    loss, stats = xt.linear_cross_entropy(xa, _WH.half(), _YH, statistics="entropy")
    xb = _XH.half().requires_grad_()
    logits = F.linear(xb, _WH.half())
    ref = F.cross_entropy(logits, _YH)
    torch.testing.assert_close(loss, ref, rtol=2e-3, atol=2e-3)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=2e-2, atol=2e-4)
    p = torch.softmax(logits.detach().double(), 1)
    ent = -(p * p.clamp_min(1e-300).log()).sum(1)
    counted = _YH != -100
    torch.testing.assert_close(stats.entropy[counted].double(), ent[counted], rtol=1e-2,
                               atol=1e-2)


@pytest.mark.parametrize("auto", [BF16, F16])
def test_head_under_cpu_autocast_matches_torch(auto):
    xa, xb = _XH.clone().requires_grad_(), _XH.clone().requires_grad_()
    wa, wb = _WH.clone().requires_grad_(), _WH.clone().requires_grad_()
    with torch.autocast("cpu", dtype=auto):
        la = xt.linear_cross_entropy(xa, wa, _YH, label_smoothing=0.1)
        lb = F.cross_entropy(F.linear(xb, wb), _YH, label_smoothing=0.1)
    assert la.dtype == lb.dtype == F32
    torch.testing.assert_close(la, lb, rtol=1e-2, atol=1e-2)
    (la * 65536).backward()
    (lb * 65536).backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=2e-2, atol=50.0)
    torch.testing.assert_close(wa.grad, wb.grad, rtol=2e-2, atol=50.0)


@pytest.mark.parametrize("dtype", [F64, F32])
def test_full_precision_heads_unchanged(dtype):
    got, want = _head_pair(_XH.to(dtype), _WH.to(dtype), label_smoothing=0.1)
    tol = 1e-10 if dtype == F64 else 1e-5
    for a, b in zip(got, want, strict=False):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("case", [("mean", None, 65536.0), ("mean", None, 2.0 ** 20),
                                  ("sum", 10 ** 6, 65536.0), ("sum", 10 ** 6, 2.0 ** 20)])
def test_float16_head_float32_loss_under_a_loss_scale_is_as_accurate_as_torch(case):
    """(e): the stored float16 dx/dW times a float32 grad_output (a GradScaler's 65536 or
    more, through ``loss_dtype=float32``), against torch in float32 rounded to float16."""
    reduction, num_items, scale = case
    g = torch.Generator().manual_seed(11)
    x = torch.randn(64, 32, generator=g).half()
    w = (torch.randn(120, 32, generator=g) * 0.3).half()
    y = torch.randint(0, 120, (64,), generator=g)
    y[::5] = -100

    def torch_grads(dtype):
        xx, ww = x.to(dtype).requires_grad_(), w.to(dtype).requires_grad_()
        loss = F.cross_entropy(F.linear(xx, ww), y, reduction=reduction)
        (loss / (num_items or 1) * scale).backward()
        return xx.grad, ww.grad

    ref = torch_grads(F64)
    amp = [t.half() for t in torch_grads(F32)]
    xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
    loss = xt.linear_cross_entropy(xx, ww, y, reduction=reduction, num_items=num_items,
                                   loss_dtype=F32)
    (loss * scale).backward()
    for got, theirs, r in zip((xx.grad, ww.grad), amp, ref, strict=False):
        assert got.dtype == F16 and same_nonfinite_pattern(got, theirs)
        fin = torch.isfinite(theirs)
        assert relative_error(got[fin], r[fin]) < 2.5 * relative_error(theirs[fin], r[fin])


@pytest.mark.parametrize("auto", [F16, BF16])
@pytest.mark.parametrize("ls", [0.0, 0.1])
def test_cross_entropy_under_cpu_autocast_matches_torch(auto, ls):
    g = torch.Generator().manual_seed(12)
    h = torch.randn(32, 16, generator=g)
    lin = torch.randn(40, 16, generator=g) * 0.5
    y = torch.randint(0, 40, (32,), generator=g)
    y[::3] = -100
    w = torch.rand(40, generator=g) + 0.5
    out = []
    for lib in ("xt", "torch"):
        hh = h.clone().requires_grad_()
        with torch.autocast("cpu", dtype=auto):
            logits = F.linear(hh, lin)
            loss = _ce(lib)(logits, y, w, label_smoothing=ls)
        (loss * 65536.0).backward()
        out.append((logits.dtype, loss, hh.grad))
    (da, la, ga), (db, lb, gb) = out
    assert da == db == auto and la.dtype == lb.dtype == F32
    torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-5)
    # the gradient against float64 on the same rounded weights: within torch's own error
    hr = h.double().requires_grad_()
    ref = F.cross_entropy(F.linear(hr, lin.to(auto).double()), y, w.double(),
                          label_smoothing=ls)
    (ref * 65536.0).backward()
    assert relative_error(ga, hr.grad) <= 2.5 * relative_error(gb, hr.grad) + 1e-6


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_float16_head_large_feature_dimension_is_as_accurate_as_torch(reduction):
    """(d): D = 4096 float16 features, logits accumulated in float32 and rounded once to
    float16 (as torch's CPU F.linear), some past 65504 (torch's NaN there)."""
    g = torch.Generator().manual_seed(13)
    x = torch.randn(8, 4096, generator=g).half()
    w = (torch.randn(50, 4096, generator=g) * 0.05).half()
    x[2] = 40.0  # row 2's logits overflow float16: 40 * 0.05 * 4096 ~ 8e3 x spread
    w[7] = 0.5  # class 7 makes row 2's logit 40 * 0.5 * 4096 = 81920 > 65504
    y = torch.tensor([1, 7, -100, 3, 49, 0, 7, 2])
    got, want, ref = _head_pair(x, w, t=y, reduction=reduction, ref=True)
    assert bool(want[2].isnan().any())  # torch: the ignored overflowing row's NaN in dW
    for a, b, r in zip(got, want, ref, strict=False):
        _as_accurate_as_torch(a.reshape(-1), b.reshape(-1), r.reshape(-1))
