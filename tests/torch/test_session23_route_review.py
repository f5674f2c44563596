"""Review H78 of 253a6b2: CPU cross-entropies of few classes past ``NATIVE_MAX_LOGITS``
leave the row-block kernel. ``backend="auto"`` now sends float32/float64 ``(N, C)``
logits that need a gradient (index targets, no class weights or smoothing, plain
tensors) to the small-batch kernel (``_small``) under ``SMALL_MAX_LOGITS`` or below
``FEW_CLASSES``, other calls below ``FEW_CLASSES_NATIVE`` and ``(N, C, d1, ...)`` logits
below ``SPATIAL_FEW_CLASSES`` to torch's own kernel (``native_cross_entropy``), and forms
the ``(M, C)`` rows (``logit_rows``) only after routing
(``_backends._few_classes_route``, ``_cross_entropy.cross_entropy``).

Every guarantee is checked on the new routes against torch's ``F.cross_entropy`` (float64
on the same numbers, or torch's own behaviour: its errors, its in-place checks, its peak
memory in a fresh process), each route confirmed by a spy on ``choose_backend``; the
thresholds are exercised at both sides. The module keeps crossent's shipped dispatch
thresholds (``native_dispatch``). A test marked ``xfail(strict=True, reason="BUG H78-n:
...")`` is a bug, written as it should pass; every other test is a regression guard."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import crossent
import crossent.torch as xt
from crossent.torch import _backends

pytestmark = pytest.mark.native_dispatch  # crossent's shipped dispatch thresholds

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
U8, I16, I32 = torch.uint8, torch.int16, torch.int32
ABOVE = _backends.NATIVE_MAX_LOGITS + 1


def _rows(classes, logits=ABOVE):
    """``(N, classes)`` with at least ``logits`` logits."""
    return (-(-logits // classes), classes)


def _data(shape, dtype=F32, seed=0, ignored=-100):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(*shape, generator=g, dtype=F64).mul_(3).to(dtype)
    y = torch.randint(0, shape[1], (shape[0], *shape[2:]), generator=g)
    if ignored is not None:
        y.view(-1)[::7] = ignored
    return z, y


def _tol(dtype):
    return {F64: {"rtol": 1e-10, "atol": 1e-13}, F32: {"rtol": 2e-5, "atol": 2e-6},
            BF16: {"rtol": 2e-2, "atol": 2e-2}, F16: {"rtol": 4e-3, "atol": 4e-3}}[dtype]


def _pattern(shape, dtype):
    """A ``"none"`` grad_output with NaN, +inf, -inf, 0 and 2.5 entries (a diverged step)."""
    values = torch.tensor([math.nan, math.inf, -math.inf, 0.0, 2.5, 1.0, -1.5], dtype=F64)
    return values[torch.arange(math.prod(shape)) % 7].reshape(shape).to(dtype)


# ============================================== values and gradients on the new routes

CASES = [
    # (id, shape, dtype, target dtype, options, route)
    ("2 classes mean", _rows(2), F32, None, {}, "native"),  # under SMALL_MIN_CLASSES
    ("21 classes none", _rows(21), F32, None, {"reduction": "none"}, "small"),
    ("63 classes sum", _rows(63), F32, None, {"reduction": "sum"}, "small"),
    ("float64 none", _rows(9), F64, None, {"reduction": "none"}, "small"),
    ("ignore_index in range", _rows(21), F32, None, {"ignore_index": 3}, "small"),
    ("ignore_index past C", _rows(21), F32, None, {"ignore_index": 40}, "small"),
    ("uint8 target", _rows(21), F32, U8, {"ignore_index": 255}, "small"),
    ("int16 target", _rows(21), F32, I16, {"reduction": "sum"}, "small"),
    ("num_items", _rows(21), F32, None, {"num_items": 1000}, "small"),
    ("loss_dtype float64", _rows(21), F32, None, {"loss_dtype": F64}, "small"),
    ("class weights", _rows(21), F32, None, {"weight": True}, "native"),
    ("smoothing none", _rows(21), F32, None, {"label_smoothing": 0.1, "reduction": "none"},
     "native"),
    ("bfloat16", _rows(21), BF16, None, {}, "small"),  # native until stop 33
    ("float16", _rows(21), F16, None, {}, "native"),
    ("float16 none", _rows(21), F16, None, {"reduction": "none"}, "native"),
    ("int32 target, weights", _rows(21), F32, I32, {"weight": True}, "native"),
    ("spatial 21 none", (2, 21, 112, 112), F32, None, {"reduction": "none"}, "native"),
    ("spatial weights smoothing", (2, 21, 112, 112), F32, None,
     {"weight": True, "label_smoothing": 0.2}, "native"),
    ("spatial bfloat16 200", (1, 200, 52, 52), BF16, None, {}, "native"),
    # probability targets without a -inf logit: torch's kernel (a later change of the stop)
    ("probability targets, weights", _rows(21), F32, None, {"prob": True, "weight": True},
     "native"),
]


def _torch_reference(z, y, opts, grad_output):
    """torch's float64 loss and logits gradient on the same numbers."""
    r = z.double().requires_grad_()
    kw = {k: v for k, v in opts.items() if k in ("reduction", "ignore_index",
                                                  "label_smoothing", "weight")}
    if "num_items" in opts:
        kw["reduction"] = "sum"
    if isinstance(kw.get("weight"), torch.Tensor):
        kw["weight"] = kw["weight"].double()
    want = F.cross_entropy(r, y.double() if y.is_floating_point() else y.long(), **kw)
    if "num_items" in opts:
        want = want / opts["num_items"]
    want.backward(grad_output.double())
    return want.detach(), r.grad


@pytest.mark.parametrize(("shape", "dtype", "tdtype", "opts", "route"),
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_new_routes_give_torchs_float64_values_and_gradients(routes, shape, dtype, tdtype,
                                                            opts, route):
    ignore = opts.get("ignore_index", -100)
    z, y = _data(shape, dtype, ignored=ignore if ignore >= 0 or tdtype is None else None)
    opts = dict(opts)
    if opts.pop("weight", False):
        opts["weight"] = torch.linspace(0.5, 1.5, shape[1], dtype=F64).to(dtype)
    if opts.pop("prob", False):
        opts.pop("ignore_index", None)
        y = torch.softmax(torch.randn(shape, generator=torch.Generator().manual_seed(3),
                                      dtype=F64), 1).to(dtype)
    elif tdtype is not None:
        y = y.to(tdtype)
    a = z.clone().requires_grad_()
    loss = xt.cross_entropy(a, y, **opts)
    assert routes == [route]
    go = (_pattern(loss.shape, loss.dtype) if opts.get("reduction") == "none"
          else torch.tensor(2.5, dtype=loss.dtype))
    loss.backward(go)
    want, want_grad = _torch_reference(z, y, opts, go)
    assert loss.dtype == opts.get("loss_dtype", dtype)
    torch.testing.assert_close(loss.double(), want, **_tol(dtype), equal_nan=True)
    torch.testing.assert_close(a.grad.double(), want_grad, **_tol(dtype), equal_nan=True)


def test_narrow_targets_compare_ignore_index_in_int64(routes):
    # uint8 259 and int32 2^32 + 5 would wrap to 3 and 5: those targets still count
    z, y = _data(_rows(21), ignored=None)
    for tdtype, ignore in ((U8, 256 + 3), (I32, (1 << 32) + 5)):
        a = z.clone().requires_grad_()
        loss = xt.cross_entropy(a, y.to(tdtype), ignore_index=ignore, reduction="sum")
        loss.backward()
        r = z.double().requires_grad_()
        want = F.cross_entropy(r, y, reduction="sum")  # nothing ignored
        want.backward()
        torch.testing.assert_close(loss.double(), want, rtol=2e-6, atol=0)
        torch.testing.assert_close(a.grad.double(), r.grad, rtol=2e-5, atol=2e-6)
    assert routes == ["small", "small"]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_every_row_ignored_on_the_new_routes(routes, reduction):
    z, _ = _data(_rows(21))
    y = torch.full((z.shape[0],), -100)
    for kw in ({}, {"label_smoothing": 0.1}):
        a = z.clone().requires_grad_()
        loss = xt.cross_entropy(a, y, reduction=reduction, **kw)
        loss.sum().backward()
        r = z.clone().requires_grad_()
        want = F.cross_entropy(r, y, reduction=reduction, **kw)
        want.sum().backward()
        torch.testing.assert_close(loss, want, equal_nan=True, rtol=0, atol=0)
        assert torch.equal(a.grad, r.grad)
    assert routes == ["small", "native"]


def test_non_finite_logits_give_torchs_pattern_on_the_small_route(routes):
    z, y = _data(_rows(21))
    z[1, 3], z[2, 4], z[3, 5], z[7, 0] = math.nan, math.inf, -math.inf, math.nan  # 7: ignored
    z[4, y[4]] = -math.inf
    a = z.clone().requires_grad_()
    loss = xt.cross_entropy(a, y, reduction="none")
    loss.backward(torch.ones_like(loss))
    r = z.double().requires_grad_()
    want = F.cross_entropy(r, y, reduction="none")
    want.backward(torch.ones_like(want))
    assert routes == ["small"]
    torch.testing.assert_close(loss.double(), want, equal_nan=True, **_tol(F32))
    torch.testing.assert_close(a.grad.double(), r.grad, equal_nan=True, **_tol(F32))


# ========================================================== thresholds, at both sides

BOUNDARIES = [
    # (id, shape, needs grad, route)
    ("63 classes at 2^23 logits", _rows(63, 1 << 23), True, "small"),
    # float32 at any size since stop 33 (SMALL_MAX_LOGITS_FLOAT32); float64 below
    ("64 classes at 2^23 logits", _rows(64, 1 << 23), True, "small"),
    ("2^23 - 1 logits, 178481 classes", (47, 178481), True, "small"),
    ("2^23 logits, 128 classes", (65536, 128), True, "small"),
    ("31 classes, no gradient", _rows(31), False, "native"),
    ("32 classes, no gradient", _rows(32), False, "rowblock"),
    ("spatial 255 classes", (1, 255, 46, 46), True, "native"),
    ("spatial 256 classes", (1, 256, 46, 46), True, "rowblock"),
]


@pytest.mark.parametrize(("shape", "grad", "route"), [b[1:] for b in BOUNDARIES],
                         ids=[b[0] for b in BOUNDARIES])
def test_thresholds_take_the_documented_route_with_torchs_numbers(routes, shape, grad,
                                                                 route):
    _threshold_case(shape, grad, route, routes)


@pytest.mark.parametrize(("shape", "route"), [(_rows(63, 1 << 23), "small"),
                                              (_rows(64, 1 << 23), "rowblock"),
                                              ((8191, 1024), "small"),
                                              ((65536, 128), "rowblock")],
                         ids=["63 classes", "64 classes", "2^23 - 1024", "2^23, 128 classes"])
def test_float64_keeps_the_small_kernel_under_2_23_logits(routes, shape, route):
    _threshold_case(shape, True, route, routes, F64)


def _threshold_case(shape, grad, route, routes, dtype=F32):
    z, y = _data(shape, dtype)
    a = z.clone().requires_grad_(grad)
    loss = xt.cross_entropy(a, y, reduction="sum")
    assert routes == [route]
    r = z.double().requires_grad_(grad)
    want = F.cross_entropy(r, y, reduction="sum")
    torch.testing.assert_close(loss.double(), want, rtol=1e-6, atol=0)
    if grad:
        loss.backward()
        want.backward()
        torch.testing.assert_close(a.grad.double(), r.grad, rtol=1e-5, atol=1e-6)


# ================================================================== autograd and autocast


@pytest.mark.parametrize("dtype", [F32, F64])
def test_small_route_autograd_contract_past_native_max(routes, dtype):
    z, y = _data(_rows(21), dtype)
    v = torch.randn(z.shape, generator=torch.Generator().manual_seed(5), dtype=dtype)
    got, want = [], []
    for fn, out in ((xt.cross_entropy, got), (F.cross_entropy, want)):
        a = z.clone().requires_grad_()
        loss = fn(a, y, reduction="none")
        (g,) = torch.autograd.grad(loss.sum(), a, create_graph=True)  # double backward
        (hv,) = torch.autograd.grad((g * v).sum(), a)
        b = z.clone().requires_grad_()
        loss = fn(b, y)
        loss.backward(retain_graph=True)
        first = b.grad.clone()
        loss.backward()  # retained graph, twice
        c = z.clone().requires_grad_()
        gos = torch.randn(3, z.shape[0], generator=torch.Generator().manual_seed(6),
                          dtype=dtype)
        (batched,) = torch.autograd.grad(fn(c, y, reduction="none"), c, gos,
                                         is_grads_batched=True)
        out += [g.detach(), hv, first, b.grad, batched]
    assert routes == ["small"] * 3
    for x, w in zip(got, want, strict=True):
        torch.testing.assert_close(x, w, **_tol(dtype))
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        loss = xt.cross_entropy(z.clone().requires_grad_(), y)
        loss.backward()
        loss.backward()


def test_transform_and_forward_ad_never_reach_the_new_routes(routes):
    z, y = _data(_rows(21))
    got = torch.func.grad(lambda t: xt.cross_entropy(t, y))(z)
    want = torch.func.grad(lambda t: F.cross_entropy(t, y))(z)
    torch.testing.assert_close(got, want, **_tol(F32))
    zs, ys = _data((2, 21, 112, 112))
    got = torch.func.grad(lambda t: xt.cross_entropy(t, ys))(zs)
    want = torch.func.grad(lambda t: F.cross_entropy(t, ys))(zs)
    torch.testing.assert_close(got, want, **_tol(F32))
    assert routes == ["composite", "composite"]


@pytest.mark.parametrize("autocast", [BF16, F16])
@pytest.mark.parametrize(("dtype", "route"), [(F32, "small"), (BF16, "small"), (F16, "native")])
def test_cpu_autocast_on_the_new_routes(routes, autocast, dtype, route):
    z, y = _data(_rows(21), dtype)
    a, b = z.clone().requires_grad_(), z.clone().requires_grad_()
    with torch.autocast("cpu", dtype=autocast):
        loss = xt.cross_entropy(a, y)
        ref = F.cross_entropy(b, y)
    assert routes == [route]
    assert loss.dtype == ref.dtype == F32
    loss.backward()
    ref.backward()
    assert a.grad.dtype == b.grad.dtype == dtype
    r = z.double().requires_grad_()
    want = F.cross_entropy(r, y)
    want.backward()
    torch.testing.assert_close(loss.double(), want, **_tol(F32))
    torch.testing.assert_close(a.grad.double(), r.grad, **_tol(dtype))


# ============================================================ layouts and target shapes


def _layouts():
    z, y = _data(_rows(21))
    base = torch.randn(z.shape[0], 42, generator=torch.Generator().manual_seed(7))
    row = torch.randn(1, 21, generator=torch.Generator().manual_seed(8))
    last = torch.randn(2, 21, 112, 112, generator=torch.Generator().manual_seed(9))
    last = last.contiguous(memory_format=torch.channels_last)
    ys = torch.randint(0, 21, (2, 112, 112))
    return {
        "transposed": (z.t().contiguous().t(), y, lambda t: t),
        "strided": (base, y, lambda t: t[:, ::2]),
        "expanded": (row, y, lambda t: t.expand(z.shape[0], 21)),
        "channels_last spatial": (last, ys, lambda t: t),
        "unbatched": (torch.randn(ABOVE + 4), torch.tensor(11), lambda t: t),
        "unbatched ignored": (torch.randn(ABOVE + 4), torch.tensor(-100), lambda t: t),
    }


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("layout", list(_layouts()))
def test_layouts_on_the_new_routes(routes, layout, reduction):
    source, y, view = _layouts()[layout]
    a = source.clone().requires_grad_()
    loss = xt.cross_entropy(view(a), y, reduction=reduction)
    assert routes == ["native" if "spatial" in layout else "small"]
    loss.sum().backward()
    r = source.double().requires_grad_()
    want = F.cross_entropy(view(r), y, reduction=reduction)
    want.sum().backward()
    assert loss.shape == want.shape
    torch.testing.assert_close(loss.double(), want, equal_nan=True, **_tol(F32))
    torch.testing.assert_close(a.grad.double(), r.grad, **_tol(F32))


# ================================================================ errors and statistics


@pytest.mark.parametrize(("what", "bad"), [("small", 21), ("small", -1), ("native", 21),
                                           ("spatial", 21), ("spatial", -101)])
def test_out_of_range_class_raises_torchs_index_error(routes, what, bad):
    shape = (2, 21, 112, 112) if what == "spatial" else _rows(21)
    z, y = _data(shape)
    y.view(-1)[5] = bad
    with pytest.raises(IndexError) as torchs:
        F.cross_entropy(z, y)
    with pytest.raises(IndexError) as got:
        xt.cross_entropy(z.requires_grad_(what != "native"), y)
    assert routes == ["native" if what != "small" else "small"]
    assert str(got.value) == str(torchs.value)  # "Target 21 is out of bounds."


@pytest.mark.parametrize("dtype", [BF16, F16])
def test_statistics_on_the_native_route(routes, dtype):
    names = ("lse", "z_loss", "target_logprob", "accuracy", "entropy")
    z, y = _data(_rows(21), dtype)
    loss, stats = xt.cross_entropy(z, y, statistics=names, z_loss=0.0)
    assert routes == ["native"]
    r = z.double()
    counted = y != -100
    logp = torch.log_softmax(r, 1)
    want = {"lse": torch.logsumexp(r, 1), "z_loss": torch.zeros(len(y), dtype=F64),
            "target_logprob": logp.gather(1, y.clamp(min=0)[:, None])[:, 0],
            "entropy": -(logp.exp() * logp).sum(1)}
    for name, value in want.items():
        got = getattr(stats, name)
        assert got.dtype == F32
        torch.testing.assert_close(got.double(), value.masked_fill(~counted, math.nan),
                                   equal_nan=True, rtol=1e-5, atol=1e-5)
    assert torch.equal(stats.accuracy, (r.argmax(1) == y) & counted)
    assert torch.equal(stats.counted, counted)
    torch.testing.assert_close(loss.double(), F.cross_entropy(r, y), **_tol(dtype))


# ======================================================= in-place changes before backward


def _torch_raises_on_change(fn, change):
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss = fn()
        change()
        loss.backward()


@pytest.mark.parametrize(("dtype", "opts", "route"), [
    (F32, {}, "small"), (F32, {"label_smoothing": 0.1}, "native"),
    (BF16, {}, "small"), (F16, {}, "native")])
def test_int64_target_changed_in_place_raises_on_the_new_routes(routes, dtype, opts, route):
    z, y = _data(_rows(21), dtype)
    a = z.clone().requires_grad_()
    loss = xt.cross_entropy(a, y, **opts)
    assert routes == [route]
    y[0] = 1 - y[0].clamp(max=1)
    with pytest.raises(RuntimeError, match="modified"):
        loss.backward()


@pytest.mark.parametrize(("dtype", "opts", "route"), [
    (F32, {}, "small"), (F32, {"weight": True}, "native"), (BF16, {}, "small"),
    (F16, {}, "native")])
def test_uint8_target_changed_in_place_raises_as_torchs(routes, dtype, opts, route):
    z, y = _data(_rows(21), dtype, ignored=None)
    y8 = y.to(U8)
    kw = {"weight": torch.linspace(0.5, 1.5, 21).to(dtype)} if opts else {}

    def change():
        y8[0] = 1 - y8[0].clamp(max=1)

    _torch_raises_on_change(lambda: F.cross_entropy(z.clone().requires_grad_(), y8, **kw),
                            change)
    loss = xt.cross_entropy(z.clone().requires_grad_(), y8, **kw)
    assert routes == [route]
    change()
    with pytest.raises(RuntimeError, match="modified"):
        loss.backward()


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_linear_head_uint8_target_changed_in_place_raises_as_torchs(routes, dtype):
    """The small linear head takes torch's kernel too (_linear: route "native"), with the
    uint8 target as an int64 copy: the watch sits where the copy is made
    (native_cross_entropy), so the head's in-place check holds as well."""
    g = torch.Generator().manual_seed(40)
    x = torch.randn(6, 4, generator=g).to(dtype)
    w = torch.randn(5, 4, generator=g).to(dtype)
    y8 = torch.randint(0, 5, (6,), generator=g).to(U8)

    def change():
        y8[0] = 1 - y8[0].clamp(max=1)

    _torch_raises_on_change(
        lambda: F.cross_entropy(F.linear(x.clone().requires_grad_(), w), y8), change)
    loss = xt.linear_cross_entropy(x.clone().requires_grad_(), w, y8)
    assert routes == ["native"]
    change()
    with pytest.raises(RuntimeError, match="linear_cross_entropy: the target was modified"):
        loss.backward()


def test_float32_weight_changed_in_place_raises_on_the_native_route(routes):
    z, y = _data(_rows(21))
    w = torch.linspace(0.5, 1.5, 21)
    loss = xt.cross_entropy(z.clone().requires_grad_(), y, weight=w)
    assert routes == ["native"]
    w.mul_(2.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("dtype", [BF16, F16])
def test_low_precision_weight_changed_in_place_raises_as_torchs(routes, dtype):
    z, y = _data(_rows(21), dtype)
    w = torch.linspace(0.5, 1.5, 21).to(dtype)
    _torch_raises_on_change(
        lambda: F.cross_entropy(z.clone().requires_grad_(), y, weight=w), lambda: w.mul_(2))
    loss = xt.cross_entropy(z.clone().requires_grad_(), y, weight=w)
    assert routes == ["native"]
    w.mul_(2)
    with pytest.raises(RuntimeError, match="modified"):
        loss.backward()


# ============================================================== inplace_backward, memory


def _inplace_gradient_storage(dtype, backend, shape):
    """Whether the logits gradient reaching an activation's own ``backward`` lives in the
    activation's storage, and the logits gradient against torch's."""
    z, y = _data(shape, dtype)
    leaf = z.clone().requires_grad_()
    act = leaf * 1.0  # an activation: inplace_backward may overwrite it
    ptr = act.data_ptr()
    seen = []
    act.register_hook(lambda g: seen.append(g.data_ptr()))
    xt.cross_entropy(act, y, inplace_backward=True, backend=backend).backward()
    r = z.double().requires_grad_()
    F.cross_entropy(r, y).backward()
    torch.testing.assert_close(leaf.grad.double(), r.grad, **_tol(dtype))
    return seen == [ptr]


def test_inplace_backward_on_the_row_block_route_writes_into_the_activation():
    assert _inplace_gradient_storage(F32, "rowblock", _rows(21))
    assert _inplace_gradient_storage(BF16, "rowblock", _rows(21))


@pytest.mark.parametrize(("dtype", "route"), [(F32, "small"), (BF16, "small"),
                                              (F16, "native")])
def test_inplace_backward_writes_into_the_activation_on_the_new_routes(routes, dtype,
                                                                         route):
    # fixed by keeping inplace_backward on the row-block kernel (its memory is asked for)
    assert _inplace_gradient_storage(dtype, "auto", _rows(21))
    assert routes == ["rowblock"]


_PEAK_SCRIPT = textwrap.dedent("""
    import gc, json, sys
    import torch, torch.nn.functional as F
    import crossent.torch as xt

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024

    def peak(fn, classes, padded):
        rows = (1 << 21) // classes
        g = torch.Generator().manual_seed(0)
        y = torch.randint(0, classes, (rows,), generator=g)
        if padded:
            y[::5] = -100
        x = torch.randn(rows, classes, generator=g, requires_grad=True)
        fn(torch.randn(8, classes, requires_grad=True), y[:8]).backward()  # warm
        gc.collect()
        base = status("VmRSS")
        open("/proc/self/clear_refs", "w").write("5")  # resets VmHWM
        fn(x, y).backward()
        out = (status("VmHWM") - base) / x.nbytes
        del x
        gc.collect()
        return out

    out = {}
    for classes, padded in ((2, True), (2, False), (21, True)):
        key = f"{classes}{'p' if padded else ''}"
        out[key] = (peak(F.cross_entropy, classes, padded),
                    peak(xt.cross_entropy, classes, padded))
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def peaks():
    """Peak resident memory of forward + backward (in units of the logits' size), torch
    eager's and crossent's ``"auto"``, in a fresh process with a fixed mmap threshold (so
    freed N x C buffers go back to the system and each measurement starts clean)."""
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux /proc/self/clear_refs")
    src = os.path.dirname(os.path.dirname(crossent.__file__))
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="2",
               PYTHONPATH=os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=120, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", ["2", "21p"])
def test_small_route_peak_memory_is_not_above_eagers(peaks, case):
    eager, auto = peaks[case]
    assert 2.5 < eager < 3.5  # torch: log-probabilities, dlogp, dz
    assert auto <= 1.05 * eager  # 2 classes: torch's own kernel, equal within RSS noise


def test_small_route_peak_memory_with_padding_at_two_classes(peaks):
    eager, auto = peaks["2p"]
    assert auto <= 1.1 * eager


# ================================================================================= docs


def _paragraph(doc, start, stop):
    text = " ".join(doc.split())
    return text[text.index(start):text.index(stop, text.index(start))]


def test_readme_and_guarantees_name_the_shipped_thresholds():
    root = os.path.join(os.path.dirname(__file__), "..", "..")
    readme = " ".join(open(os.path.join(root, "README.md"), encoding="utf-8").read().split())
    bullet = readme[readme.index("**Few classes"):readme.index("| shape | eager")]
    assert _backends.SMALL_MAX_LOGITS == 1 << 23 and "under 2^23 logits" in bullet
    assert _backends.FEW_CLASSES == 64 and "below 64 classes" in bullet
    assert _backends.FEW_CLASSES_NATIVE == 32 and "fewer than 32" in bullet
    assert _backends.SPATIAL_FEW_CLASSES == 256 and "fewer than 256 classes" in bullet
    guarantees = " ".join(open(os.path.join(root, "docs", "guarantees.md"),
                               encoding="utf-8").read().split())
    assert re.search(r"float32 at any size; float64 and bfloat16 under `2\*\*23` logits or of "
                     r"fewer than 64 classes.*fewer than 32 "
                     r"classes, and `\(N, C, d1, \.\.\.\)` logits of fewer than 256", guarantees)


def test_docstrings_name_the_few_class_routes():
    backend = _paragraph(xt.cross_entropy.__doc__, "backend: which kernel", "statistics:")
    assert "few classes" in backend
    auto = _paragraph(_backends.__doc__, '``"auto"`` (default)', '``"native"``')
    assert "few classes" in auto
