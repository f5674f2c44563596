"""float16 under ``torch.compile``: the compiled backward recomputes the gradients with the
real ``grad_output`` (``_custom_ops._recomputes_float16``, the fix of review H105-1/H105-2)
instead of scaling ones stored in forward for ``grad_output = 1`` (rounded to float16
there: entries under 6.1e-5 lost their digits before a ``GradScaler``'s scale).

References: eager crossent (bitwise: the compiled operators run its entry point), torch's
own float16 kernel on the native route, and float64 for the size of the error. The rest
of what the change must keep: every reduction and option, non-finite ``grad_output``, an
in-place change of the logits after forward (torch allows it: a private copy is saved),
of the head's weight (torch's ``F.linear`` raises: so does the recompute), backward twice,
autocast's float16 head, and what backward keeps alive."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import crossent.torch as xt

H = torch.float16
SCALE = 2.0**16  # a GradScaler's
pytestmark = pytest.mark.timeout(120)


def _data(n=40, c=96, seed=0, ignored=3):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(n, c, generator=g) * 3).to(H)
    y = torch.randint(0, c, (n,), generator=g)
    y[:ignored] = -100
    return z, y


def _compiled(fn, backend="aot_eager"):
    torch._dynamo.reset()
    return torch.compile(fn, backend=backend)


def _grad(fn, z, y, go, **kw):
    zz = z.clone().requires_grad_()
    loss = fn(zz, y, **kw)
    loss.backward(torch.as_tensor(go, dtype=loss.dtype).expand_as(loss))
    return loss.detach(), zz.grad


def _bitwise(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    same = (a == b) | (a.isnan() & b.isnan())
    assert bool(same.all()), f"{int((~same).sum())} of {a.numel()} entries differ"


def _loss(z, y, **kw):
    """A float32 loss, as under autocast (a float16 loss times 2**16 is inf)."""
    return xt.cross_entropy(z, y, **{"loss_dtype": torch.float32, **kw})


OPTIONS = {
    "mean": {},
    "sum": {"reduction": "sum"},
    "none": {"reduction": "none"},
    "smoothing": {"label_smoothing": 0.1},
    "z_loss": {"z_loss": 1e-3},
    "softcap": {"softcap": 20.0},
    "num_items": {"num_items": 37},
    "float16_loss": {"loss_dtype": H},  # at 2**16 the grad_output itself is inf
}


@pytest.mark.parametrize("name", sorted(OPTIONS))
@pytest.mark.parametrize("go", [SCALE, 3.0 * 2**13, 2.0**-20])
def test_compiled_float16_gradient_is_eagers_for_every_option(name, go):
    """Not only a power-of-two scale: any grad_output gives eager's gradient."""
    z, y = _data()
    kw = OPTIONS[name]
    if name == "none":
        go = torch.linspace(1.0, 2.0, z.shape[0]) * go
    want_loss, want = _grad(_loss, z, y, go, **kw)
    loss, got = _grad(_compiled(_loss), z, y, go, **kw)
    _bitwise(loss, want_loss)
    _bitwise(got, want)


def test_compiled_float16_probability_targets_are_eagers():
    z, _ = _data()
    t = torch.softmax(torch.randn(z.shape, generator=torch.Generator().manual_seed(3)), 1)
    want = _grad(_loss, z, t.to(H), SCALE)[1]
    _bitwise(_grad(_compiled(_loss), z, t.to(H), SCALE)[1], want)


@pytest.mark.native_dispatch
def test_compiled_float16_small_input_is_torchs_kernel_rounded_once():
    """Small float16 inputs take torch's kernel on float32 logits eagerly (converted, the
    gradient rounded once: ``_cross_entropy.native_cross_entropy``), which scales before
    rounding; the compiled route recomputes through it, so it is that gradient bitwise
    (before: torch's at grad_output 1, rounded, then scaled)."""
    z, y = _data(n=16, c=32)
    fn = _compiled(_loss)
    for go in (SCALE, 1.0, 3.0, 2.0**-20):
        zz = z.clone().requires_grad_()
        (F.cross_entropy(zz.float(), y) * go).backward()
        _bitwise(_grad(fn, z, y, go)[1], zz.grad)


@pytest.mark.parametrize("go", [math.inf, -math.inf, math.nan])
def test_compiled_float16_non_finite_grad_output_is_eagers(go):
    z, y = _data()
    for kw in ({}, {"label_smoothing": 0.1}, {"reduction": "sum"}):
        _bitwise(_grad(_compiled(_loss), z, y, go, **kw)[1], _grad(_loss, z, y, go, **kw)[1])


def test_compiled_float16_gradscaler_error_at_a_vocabulary_is_eagers():
    """The size of what H105-1 lost: 64 x 8192 at a GradScaler's 2**16, relative error
    (Frobenius) against float64's gradient (scaled), the compiled one as eager's (before:
    8.6e-4 at 1024 x 8192 with these logits, where eager's is 6.4e-5), both at float16's
    rounding."""
    z, y = _data(n=64, c=8192, ignored=0)
    z64 = z.double().requires_grad_()
    (F.cross_entropy(z64, y) * SCALE).backward()
    exact = z64.grad

    def error(g):
        return float((g.double() - exact).norm() / exact.norm())

    eager, compiled = (_grad(fn, z, y, SCALE)[1] for fn in (_loss, _compiled(_loss)))
    _bitwise(compiled, eager)
    assert error(compiled) < 2 * error(exact.to(H)), (error(compiled), error(exact.to(H)))


def test_compiled_float16_logits_changed_in_place_after_forward():
    """torch's loss saves its softmax, so a change of the logits after forward neither
    raises nor changes the gradient: the compiled recompute reads a copy made in forward."""
    z, y = _data()
    fn = _compiled(_loss)
    grads = []
    for change in (False, True):
        a = z.clone().requires_grad_()
        logits = a * 1.0  # an activation (a leaf requiring grad cannot change in place)
        loss = fn(logits, y)
        if change:
            with torch.no_grad():
                logits.add_(5.0).neg_()
        (loss * SCALE).backward()
        grads.append(a.grad)
    _bitwise(grads[1], grads[0])
    ref = z.clone().requires_grad_()
    (_loss(ref * 1.0, y) * SCALE).backward()
    _bitwise(grads[0], ref.grad)


def test_compiled_float16_backward_twice_retain_graph():
    z, y = _data()
    zz = z.clone().requires_grad_()
    loss = _compiled(_loss)(zz, y)
    (loss * SCALE).backward(retain_graph=True)
    first = zz.grad.clone()
    (loss * SCALE).backward()
    want = _grad(_loss, z, y, SCALE)[1]
    _bitwise(first, want)
    _bitwise(zz.grad, (want.float() * 2).to(H))


def test_compiled_float16_backward_keeps_one_copy_of_the_logits():
    """What forward saves for backward: the copy of the logits (as many bytes as the
    gradient stored before the change) and the O(N) target, nothing of N x C more."""
    z, y = _data(n=64, c=512)
    fn = _compiled(_loss)
    zz = z.clone().requires_grad_()
    fn(zz, y)  # compile outside the hooks
    saved = []

    def pack(t):
        saved.append(t)
        return t

    zz = z.clone().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fn(zz, y)
    sizes = [t.numel() * t.element_size() for t in saved]
    assert z.numel() * 2 <= sum(sizes) <= z.numel() * 2 + 64 * 8 + 64, sizes
    copy = next(t for t in saved if t.shape == z.shape)
    assert copy.data_ptr() != zz.data_ptr()
    _bitwise(copy, z)
    loss.backward()
    _bitwise(zz.grad, _grad(_loss, z, y, 1.0)[1])


def test_inductor_float16_at_gradscaler_scale_is_eagers():
    z, y = _data()
    for kw in ({}, {"reduction": "sum"}, {"label_smoothing": 0.1, "num_items": 29}):
        _bitwise(_grad(_compiled(_loss, "inductor"), z, y, SCALE, **kw)[1],
                 _grad(_loss, z, y, SCALE, **kw)[1])


def test_float32_and_bfloat16_keep_the_stored_gradient():
    """The recompute is float16's: other dtypes store the gradient in forward (no copy of
    the logits is saved; an in-place change after forward changes nothing)."""
    for dtype in (torch.float32, torch.bfloat16):
        z, y = _data()
        z = z.to(dtype)
        fn = _compiled(_loss)
        saved = []
        zz = z.clone().requires_grad_()
        fn(zz, y)

        def pack(t, saved=saved):
            saved.append(t)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = fn(zz, y)
        stored = [t for t in saved if t.shape == z.shape]
        assert len(stored) == 1
        _bitwise(stored[0], _grad(_loss, z, y, 1.0)[1])  # the gradient, not the logits
        (loss * SCALE).backward()
        _bitwise(zz.grad, _grad(_loss, z, y, SCALE)[1])


# ---- the linear head


def _head_data(n=48, d=24, v=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g).to(H)
    w = (0.3 * torch.randn(v, d, generator=g)).to(H)
    b = (0.1 * torch.randn(v, generator=g)).to(H)
    y = torch.randint(0, v, (n,), generator=g)
    y[:3] = -100
    return x, w, b, y


def _head(x, w, b, y, **kw):
    return xt.linear_cross_entropy(x, w, y, b, loss_dtype=torch.float32, **kw)


def _head_grads(fn, x, w, b, y, go, **kw):
    xx, ww, bb = (t.clone().requires_grad_() for t in (x, w, b))
    loss = fn(xx, ww, bb, y, **kw)
    (loss * go).sum().backward()
    return loss.detach(), xx.grad, ww.grad, bb.grad


@pytest.mark.parametrize("kw", [{}, {"reduction": "sum"}, {"label_smoothing": 0.1},
                                {"z_loss": 1e-3, "num_items": 41}, {"shift": True}])
@pytest.mark.parametrize("go", [SCALE, 3.0 * 2**13])
def test_compiled_float16_head_is_eagers(kw, go):
    x, w, b, y = _head_data()
    want = _head_grads(_head, x, w, b, y, go, **kw)
    got = _head_grads(_compiled(_head), x, w, b, y, go, **kw)
    for a, e in zip(got, want, strict=True):
        _bitwise(a, e)


def test_compiled_head_under_float16_autocast_is_eagers():
    """float32 inputs, float16 matmuls (autocast): recomputed too."""
    x, w, b, y = (t.float() if t.is_floating_point() else t for t in _head_data())

    def head(x, w, b, y):
        with torch.autocast("cpu", dtype=H):
            return xt.linear_cross_entropy(x, w, y, b)

    want = _head_grads(head, x, w, b, y, SCALE)
    got = _head_grads(_compiled(head), x, w, b, y, SCALE)
    for a, e in zip(got, want, strict=True):
        _bitwise(a, e)


def test_compiled_float16_head_weight_changed_in_place_raises_as_torchs():
    """The recompute saves x and W (as torch's ``F.linear`` does), so an optimizer step
    between forward and backward raises, as torch's unfused head raises."""
    x, w, b, y = _head_data()
    for fn in (lambda x, w, b, y: F.cross_entropy(F.linear(x, w, b).float(), y),
               _compiled(_head)):
        xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
        loss = fn(xx, ww, b, y)
        with torch.no_grad():
            ww.mul_(0.5)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()


def grads_after_logits_change(loss_fn, z, t):
    """``(dz, dt)`` of ``loss_fn(z * 1, t) * 3`` with the logits ``z * 1`` changed in place
    between forward and backward (``t`` a probability target that needs a gradient)."""
    a, tt = z.clone().requires_grad_(), t.clone().requires_grad_()
    logits = a * 1.0
    loss = loss_fn(logits, tt)
    with torch.no_grad():
        logits.mul_(-2.0)
    (loss * 3.0).backward()  # torch's loss refuses nothing: it saved its log-softmax
    return a.grad, tt.grad


def test_compiled_target_gradient_recomputes_from_a_copy_of_the_logits():
    """Any dtype: with a probability target that needs a gradient the compiled backward
    recomputes from a copy of the logits made in forward (it saved the logits themselves,
    so a change of them after forward raised torch's bare in-place error, review H106-3),
    and so it gives torch's gradients, which come from torch's saved log-softmax."""
    g = torch.Generator().manual_seed(5)
    z = torch.randn(24, 40, generator=g, dtype=torch.float64)
    t = torch.softmax(torch.randn(24, 40, generator=g, dtype=torch.float64), 1)
    fn = _compiled(lambda z, t: xt.cross_entropy(z, t, label_smoothing=0.1))
    grads = [grads_after_logits_change(loss_fn, z, t) for loss_fn in (
        lambda z, t: F.cross_entropy(z, t, label_smoothing=0.1), fn)]
    for got, want in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
