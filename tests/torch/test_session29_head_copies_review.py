"""Review H109 of 4e40dcb and e2104a9: under ``torch.compile`` float16 logits, target/weight
gradients and float16 heads (inputs or autocast) recompute in backward from copies made in
forward (``copy_input``, ``copy_inputs``, ``_head_copy_dtypes``, ``ctx.cast_back``).

References: torch (``F.linear`` + ``F.cross_entropy``, float64 for values; its dtypes,
strides and in-place refusals) and, for the "compiled == eager" claim, eager crossent
bitwise. Complements ``test_compiled_float16_recompute.py`` and
``test_session29_compiled_f16_recompute_review.py`` (not repeated here). H109-1 and H109-2
were fixed at stop 38."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from test_compiled_float16_recompute import grads_after_logits_change

import crossent.torch as xt
from crossent.torch._custom_ops import FORMULA

H, B, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
SCALE = 2.0**16
pytestmark = pytest.mark.timeout(120)


def _compiled(fn, **kw):
    torch._dynamo.reset()
    return torch.compile(fn, backend=kw.pop("backend", "aot_eager"), **kw)


def _bitwise(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    assert a.stride() == b.stride(), (a.stride(), b.stride())
    same = (a == b) | (a.isnan() & b.isnan())
    assert bool(same.all()), f"{int((~same).sum())} of {a.numel()} entries differ"


def _head_data(n=20, d=16, v=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    w = 0.3 * torch.randn(v, d, generator=g)
    b = 0.1 * torch.randn(v, generator=g)
    y = torch.randint(0, v, (n,), generator=g)
    y[:2] = -100
    return x, w, b, y


def _head(x, w, b, y, ac=None, **kw):
    with torch.autocast("cpu", dtype=ac or H, enabled=ac is not None):
        return xt.linear_cross_entropy(x, w, y, b, **kw)


def _torch_head(x, w, b, y, ac=None, **kw):
    with torch.autocast("cpu", dtype=ac or H, enabled=ac is not None):
        return F.cross_entropy(F.linear(x, w, b).float(), y, **kw)


def _head_grads(fn, tensors, y, go, ac=None, **kw):
    t = [None if q is None else q.clone().requires_grad_() for q in tensors]
    out = fn(*t, y, ac=ac, **kw)
    (out.float() * go).sum().backward()
    return [None if q is None else q.grad for q in t]


# ---- what held


@pytest.mark.parametrize(("dtypes", "ac"), [
    ((B, B, B), H),            # bfloat16 params under float16 autocast
    ((H, H, H), B),            # float16 params under bfloat16 autocast
    ((F64, F64, F64), H),      # autocast leaves float64
    ((F32, F32, None), H),     # float32 masters, no bias
    ((H, F32, F32), H),        # a float16 input, float32 weight and bias
], ids=["bf16_under_f16", "f16_under_bf16", "f64_under_f16", "f32_no_bias", "f16_x_f32_wb"])
def test_head_dtype_mixes_under_autocast(dtypes, ac):
    """Compiled == eager bitwise (values, dtypes, strides); dtypes as torch's; values
    near float64 torch's; reduction='none' with a per-row grad_output."""
    x, w, b, y = _head_data()
    ts = [None if d is None else q.to(d) for q, d in zip((x, w, b), dtypes, strict=True)]
    go = torch.linspace(-3.0, 2.0**12, y.numel())
    got = _head_grads(_compiled(_head), ts, y, go, ac, reduction="none")
    want = _head_grads(_head, ts, y, go, ac, reduction="none")
    ref = _head_grads(_torch_head, ts, y, go, ac, reduction="none")
    exact = _head_grads(_torch_head, [None if q is None else q.double() for q in ts], y,
                        go, None, reduction="none")
    for g, e, r, q in zip(got, want, ref, exact, strict=True):
        if g is None:
            assert e is None and r is None
            continue
        _bitwise(g, e)
        assert g.dtype == r.dtype
        scale = q.abs().max()
        assert float((g.double() - q).abs().max() / scale) < 2e-2


def test_cross_entropy_weight_and_target_grads_are_eagers_and_torchs():
    """A class weight and a probability target that need gradients (float32, float16):
    recomputed from a copy of the logits; eager's bitwise, float64 torch's to rounding."""
    g = torch.Generator().manual_seed(1)
    z = torch.randn(12, 20, generator=g) * 3
    p = torch.softmax(torch.randn(12, 20, generator=g), 1)
    cw = torch.rand(20, generator=g) + 0.5

    def loss(z, t, w):
        return xt.cross_entropy(z, t, w, label_smoothing=0.1, loss_dtype=F32)

    fn = _compiled(loss)
    for dt in (F32, H):
        out = []
        for f in (fn, loss, lambda z, t, w: F.cross_entropy(z, t, w, label_smoothing=0.1)):
            leaves = [q.to(dt) for q in (z, p, cw)]
            if len(out) == 2:  # torch in float64, from the same (rounded) inputs
                leaves = [q.double() for q in leaves]
            leaves = [q.clone().requires_grad_() for q in leaves]
            (f(*leaves) * 256.0).backward()  # (2**16: the target's float16 gradient is inf)
            out.append([q.grad for q in leaves])
        for a, e, r in zip(*out, strict=True):
            _bitwise(a, e)
            torch.testing.assert_close(a.double(), r, rtol=2e-3 if dt == H else 1e-5,
                                       atol=r.abs().max().item() * (2e-3 if dt == H else 1e-5))


def test_target_gradient_with_frozen_logits_changed_in_place():
    """Target needs a gradient, logits do not: a change of the logits after forward is
    not refused (torch reads its saved log-softmax) and the gradient is torch's."""
    g = torch.Generator().manual_seed(2)
    z = torch.randn(10, 16, generator=g)
    p = torch.softmax(torch.randn(10, 16, generator=g), 1)
    out = []
    for f in (F.cross_entropy, _compiled(lambda z, t: xt.cross_entropy(z, t))):
        zz, tt = z.clone(), p.clone().requires_grad_()
        loss = f(zz, tt)
        zz.mul_(-2.0)
        (loss * 3.0).backward()
        out.append(tt.grad)
    torch.testing.assert_close(out[1], out[0])


def test_what_backward_keeps():
    """Head under float16 autocast: its casts (x, W, b as float16) and the target, no
    float32 master, nothing N x V. cross_entropy with a target gradient: the target and
    one N x C copy (torch keeps its log-softmax)."""
    def saved_of(fn, *args):
        fn(*args)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: (saved.append(t), t)[1],
                                                      lambda t: t):
            fn(*args)
        return saved

    x, w, b, y = _head_data(n=64, d=8, v=200)
    t = [q.clone().requires_grad_() for q in (x, w, b)]
    saved = saved_of(_compiled(lambda x, w, b, y: _head(x, w, b, y, ac=H)), *t, y)
    assert sorted((tuple(s.shape), s.dtype) for s in saved if s.is_floating_point()) == \
        sorted([((64, 8), H), ((200, 8), H), ((200,), H)])
    z = torch.randn(32, 50).requires_grad_()
    p = torch.softmax(torch.randn(32, 50), 1).requires_grad_()
    saved = saved_of(_compiled(lambda z, t: xt.cross_entropy(z, t)), z, p)
    fresh = [s for s in saved if s is not p]
    assert [tuple(s.shape) for s in fresh] == [(32, 50)] and fresh[0] is not z


def test_export_autocast_head_backward_and_retain_graph():
    """torch.export (strict and not) of a float16-autocast head: the program's backward
    is eager's bitwise; backward twice through a compiled one (retain_graph) too."""
    x, w, b, y = _head_data()

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w, self.b = torch.nn.Parameter(w.clone()), torch.nn.Parameter(b.clone())

        def forward(self, x, y):
            return _head(x, self.w, self.b, y, ac=H)

    want = _head_grads(_head, (x, w, b), y, SCALE, H)
    for strict in (False, True):
        mod = torch.export.export(M(), (x.clone().requires_grad_(), y), strict=strict).module()
        xx = x.clone().requires_grad_()
        (mod(xx, y) * SCALE).backward()
        for a, e in zip((xx.grad, *(p.grad for p in mod.parameters())), want, strict=True):
            _bitwise(a, e)
    t = [q.clone().requires_grad_() for q in (x, w, b)]
    loss = _compiled(_head)(*t, y, ac=H)
    (loss * SCALE).backward(retain_graph=True)
    (loss * SCALE).backward()
    for a, e in zip((q.grad for q in t), want, strict=True):
        _bitwise(a, e * 2)


def _ce_args(z, t, requires, reduction="none", weight=None, statistics=None):
    return (z, t, weight, None, requires, False, True, None,
            None if t.is_floating_point() else -100, None, reduction, 0.1, 1e-3, None, F32,
            None, "auto", None, statistics, FORMULA)


def _linear_args(x, w, b, t, reduction, autocast=None, shift=False, loss_dtype=F32):
    return (x, w, b, t, None, None, [True, True, b is not None, False, False, False], False,
            True, reduction, None, 0.0, 1e-3, 4.0, 3, None, None, None, None, None, False,
            loss_dtype, None, "auto", shift, autocast, None, FORMULA)


def test_opcheck_copy_flags():
    def r(*shape, dtype=F32):
        return torch.randn(*shape).to(dtype).requires_grad_()

    t = torch.randint(0, 5, (6,))
    p = torch.softmax(torch.randn(6, 5), 1)
    ce = torch.ops.crossent.cross_entropy_fwd.default
    lin = torch.ops.crossent.linear_cross_entropy_fwd.default
    cases = [
        (ce, _ce_args(r(6, 5, dtype=H), p.to(H).requires_grad_(), [True, True, True, False],
                      weight=torch.rand(5).to(H).requires_grad_())),
        (ce, _ce_args(torch.randn(6, 5), p.clone().requires_grad_(),
                      [False, True, False, False], "sum")),
        (ce, _ce_args(r(6, 5, 3, dtype=H), torch.randint(0, 5, (6, 3)),
                      [True, False, False, False], statistics="lse,entropy")),
        (lin, _linear_args(r(6, 4, dtype=H), r(5, 4, dtype=H), None, t, "mean")),
        (lin, _linear_args(r(6, 4, dtype=B), r(5, 4, dtype=B), r(5, dtype=B), t, "sum", H)),
        (lin, _linear_args(r(6, 4, dtype=F64), r(5, 4, dtype=F64), r(5, dtype=F64), t, "sum",
                           H, loss_dtype=F64)),
        (lin, _linear_args(r(6, 4, dtype=H), r(5, 4, dtype=H), r(5, dtype=H), t, "none", B)),
        (lin, _linear_args(r(2, 3, 4, dtype=H), r(5, 4, dtype=H), r(5, dtype=H),
                           torch.randint(0, 5, (2, 3)), "none", shift=True)),
        (lin, _linear_args(r(6, 4), r(5, 4, dtype=H), None, t, "mean", H)),
    ]
    for op, args in cases:
        result = torch.library.opcheck(op, args)
        assert set(result.values()) == {"SUCCESS"}, (op, result)


@pytest.mark.skipif(os.environ.get("CROSSENT_TEST_INDUCTOR") != "1",
                    reason="inductor's first compile takes seconds on a 2-core CPU")
def test_inductor_autocast_head_is_eagers():
    x, w, b, y = _head_data()
    got = _head_grads(_compiled(_head, backend="inductor"), (x, w, b), y, SCALE, H)
    for a, e in zip(got, _head_grads(_head, (x, w, b), y, SCALE, H), strict=True):
        _bitwise(a, e)


# ---- findings


def _changed(fn, which, requires):
    """'ok' or the refusal's message: ``which`` of float16 (x, W, b) changed in place
    after forward."""
    x, w, b, y = (q.to(H) if q.is_floating_point() else q for q in _head_data())
    t = [q.clone().requires_grad_(i in requires) for i, q in enumerate((x, w, b))]
    loss = fn(*t, y)
    with torch.no_grad():
        t[which].mul_(0.5)
    try:
        (loss.float() * SCALE).backward()
    except RuntimeError as e:
        return str(e)
    return "ok"


@pytest.mark.fixed_bug("H109-1: the compiled float16 head copied x where torch saves it")
@pytest.mark.parametrize("requires", [(0, 1, 2), (1,)], ids=["all", "x_frozen"])
def test_float16_head_input_changed_after_forward_raises_as_torchs(requires):
    """H109-1 (fixed): the compiled float16 head kept a copy of x, so x changed in place
    after forward gave forward's gradients where torch's F.linear (which saves x for dW)
    and eager crossent raise; it keeps x itself where W needs a gradient now."""
    assert "modified by an inplace operation" in _changed(_torch_head, 0, requires)
    assert "modified by an inplace operation" in _changed(_head, 0, requires)
    assert _changed(_compiled(_head), 0, requires) != "ok"


class _Loss(torch.nn.Module):
    def forward(self, z, t):
        return xt.cross_entropy(z, t, label_smoothing=0.1)


@pytest.mark.fixed_bug("H109-2: an export run with a gradient the trace lacked saved the "
                       "logits themselves")
def test_export_target_grad_at_run_time_logits_changed():
    """H109-2 (fixed at stop 38): H106-3 on the torch.export path: a program traced without
    a target gradient, run with one (_run_time_requires), recomputed from the logits
    themselves: a change of them after forward raised torch's bare in-place error (torch:
    its gradients). The copies are made in setup_context there now."""
    g = torch.Generator().manual_seed(3)
    z = torch.randn(12, 20, generator=g)
    p = torch.softmax(torch.randn(12, 20, generator=g), 1)
    mod = torch.export.export(_Loss(), (z.clone().requires_grad_(), p), strict=False).module()
    out = [grads_after_logits_change(fn, z, p) for fn in (
        lambda a, t: F.cross_entropy(a, t, label_smoothing=0.1), mod)]
    for got, want in zip(out[1], out[0], strict=True):
        torch.testing.assert_close(got, want)
