"""Review H106 of e2104a9: float16 gradients under ``torch.compile`` are recomputed in
backward with the real ``grad_output`` (``crossent::cross_entropy_fwd``'s ``copy_input``;
float16 heads save x, W, b and take the backward operator).

References: eager crossent for "compiled == eager" (bitwise), torch for what raises and
for NaN patterns. Complements ``test_compiled_float16_recompute.py`` (not repeated here).
Findings are strict xfails (H106-k); H106-1 and H106-3 were fixed at stop 38 (the head
keeps copies of x and b, under autocast its casts; target and weight gradients recompute
from a copy of the logits too) and are plain tests now."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import crossent.torch as xt

H = torch.float16
SCALE = 2.0**16
pytestmark = pytest.mark.timeout(120)


def _bitwise(a, b):
    assert a is not None and b is not None
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    same = (a == b) | (a.isnan() & b.isnan())
    assert bool(same.all()), f"{int((~same).sum())} of {a.numel()} entries differ"


def _compiled(fn, **kw):
    torch._dynamo.reset()
    return torch.compile(fn, backend=kw.pop("backend", "aot_eager"), **kw)


def _logits(shape=(24, 40), seed=0):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(shape, generator=g) * 3).to(H)
    y = torch.randint(0, shape[1], (shape[0], *shape[2:]), generator=g)
    y.view(-1)[:2] = -100
    return z, y


def _loss(z, y, **kw):
    return xt.cross_entropy(z, y, **{"loss_dtype": torch.float32, **kw})


def _grad(fn, z, y, go=SCALE, **kw):
    """The gradient of the leaf ``z`` (through an activation ``z * 1``)."""
    a = z.clone().requires_grad_()
    out = fn(a * 1.0, y, **kw)
    loss = out[0] if isinstance(out, tuple) else out
    loss.backward(torch.as_tensor(go, dtype=loss.dtype).expand_as(loss))
    return a.grad, out


# ---- what held


def test_module_fullgraph_with_statistics_is_eagers():
    z, y = _logits()
    m = xt.CrossEntropyLoss()

    def fn(z, y, statistics=None):
        out = m(z, y, statistics=statistics) if statistics else m(z, y)
        return out

    want, _ = _grad(fn, z, y)
    got, _ = _grad(_compiled(fn, fullgraph=True), z, y)
    _bitwise(got, want)
    want, (lw, sw) = _grad(_loss, z, y, statistics=("lse", "accuracy"))
    got, (lg, sg) = _grad(_compiled(_loss, fullgraph=True), z, y, statistics=("lse", "accuracy"))
    _bitwise(got, want)
    _bitwise(lg.detach(), lw.detach())
    _bitwise(sg.lse, sw.lse)
    _bitwise(sg.accuracy, sw.accuracy)


def test_dynamic_shapes_float16_is_eagers():
    fn = _compiled(_loss, dynamic=True)
    for n in (24, 31):
        z, y = _logits((n, 40), seed=n)
        _bitwise(_grad(fn, z, y)[0], _grad(_loss, z, y)[0])


def test_spatial_none_and_transposed_logits_are_eagers():
    z3, y3 = _logits((6, 40, 5))
    go = torch.rand(6, 5, generator=torch.Generator().manual_seed(1)) * SCALE
    none = {"reduction": "none"}
    _bitwise(_grad(_compiled(_loss), z3, y3, go, **none)[0], _grad(_loss, z3, y3, go, **none)[0])
    zt, _ = _logits((40, 24))
    _, y = _logits()

    def transposed(z, y):
        return _loss(z.t(), y)

    _bitwise(_grad(_compiled(transposed), zt, y)[0], _grad(transposed, zt, y)[0])


def test_view_of_a_buffer_changed_in_place_after_forward():
    """The copy is of the view's values at forward: a change through the base changes
    nothing, and the gradient is eager's."""
    z, y = _logits()
    fn = _compiled(_loss)
    grads = []
    for change in (False, True):
        a = torch.cat([z, z]).requires_grad_()
        buf = a * 1.0
        loss = fn(buf[24:], y)
        if change:
            with torch.no_grad():
                buf.mul_(-3.0).add_(1.0)
        (loss * SCALE).backward()
        grads.append(a.grad)
    _bitwise(grads[1], grads[0])
    ref = torch.cat([z, z]).requires_grad_()
    (_loss((ref * 1.0)[24:], y) * SCALE).backward()
    _bitwise(grads[0], ref.grad)


def test_save_on_cpu_and_checkpoint_around_compiled_float16():
    from torch.utils.checkpoint import checkpoint

    z, y = _logits()
    want = _grad(_loss, z, y)[0]
    fn = _compiled(_loss)
    a = z.clone().requires_grad_()
    with torch.autograd.graph.save_on_cpu():
        loss = fn(a * 1.0, y)
    (loss * SCALE).backward()
    _bitwise(a.grad, want)
    _bitwise(_grad(lambda q, t: checkpoint(fn, q, t, use_reentrant=False), z, y)[0], want)


def test_export_float16_training_graph_then_in_place_change():
    class M(torch.nn.Module):
        def forward(self, z, y):
            return _loss(z, y)

    z, y = _logits()
    want = _grad(_loss, z, y)[0]
    mod = torch.export.export(M(), (z.clone().requires_grad_(), y), strict=False).module()
    for change in (False, True):
        a = z.clone().requires_grad_()
        zz = a * 1.0
        loss = mod(zz, y)
        if change:
            with torch.no_grad():
                zz.add_(3.0)
        (loss * SCALE).backward()
        _bitwise(a.grad, want)


def _head_data(n=20, d=16, v=30, k=(), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g).to(H)
    w = (0.3 * torch.randn(v, *k, d, generator=g)).to(H)
    b = (0.1 * torch.randn(v, *k, generator=g)).to(H)
    y = torch.randint(0, v, (n, *k), generator=g)
    y.view(-1)[:2] = -100
    return x, w, b, y


def _head(x, w, b, y, **kw):
    return xt.linear_cross_entropy(x, w, y, b, **{"loss_dtype": torch.float32, **kw})


def _head_grads(fn, x, w, b, y, go=SCALE, **kw):
    t = [q.clone().requires_grad_() for q in (x, w, b)]
    (fn(*t, y, **kw) * go).sum().backward()
    return [q.grad for q in t]


def test_head_k_dim_weight_num_items_tensor_chunk_size_are_eagers():
    fn = _compiled(_head)
    for k, kw in (((3,), {"num_items": torch.tensor(37.0)}), ((), {"chunk_size": 7})):
        x, w, b, y = _head_data(k=k)
        for got, want in zip(_head_grads(fn, x, w, b, y, **kw),
                             _head_grads(_head, x, w, b, y, **kw), strict=True):
            _bitwise(got, want)


def test_head_infinite_grad_output_nan_pattern_is_torchs():
    """Documented: float16 heads, recomputed, have torch's NaN pattern under an infinite
    grad_output (dW/db sums of infinities NaN in places, where stored ones were +-inf)."""
    x, w, b, y = _head_data()

    def torch_head(x, w, b, y):
        return F.cross_entropy(F.linear(x, w, b).float(), y)

    got = _head_grads(_compiled(_head), x, w, b, y, math.inf)
    for g, e, t in zip(got, _head_grads(_head, x, w, b, y, math.inf),
                       _head_grads(torch_head, x, w, b, y, math.inf), strict=True):
        _bitwise(g, e)
        assert torch.equal(g.isnan(), t.isnan())


def test_head_saves_inputs_not_logits():
    """What a float16 head's compiled forward saves: x, W and the target, nothing N x V."""
    x, w, _, y = _head_data(n=64, v=200)
    fn = _compiled(lambda x, w, y: xt.linear_cross_entropy(x, w, y, loss_dtype=torch.float32))
    xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
    fn(xx, ww, y)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: (saved.append(t), t)[1],
                                                  lambda t: t):
        loss = fn(xx, ww, y)
    assert max(t.numel() for t in saved) == w.numel(), [tuple(t.shape) for t in saved]
    (loss * SCALE).backward()
    want = _head_grads(lambda x, w, b, y: xt.linear_cross_entropy(
        x, w, y, loss_dtype=torch.float32), x, w, torch.zeros(1, dtype=H), y)
    _bitwise(xx.grad, want[0])
    _bitwise(ww.grad, want[1])


# ---- findings


def _changed_after_forward(fn, which, autocast=None, requires=(0, 1, 2), data=None):
    """'ok' or 'raises': ``which`` of (x, W, b) changed in place between forward and
    backward."""
    x, w, b, y = data or _head_data()
    if autocast is not None:
        x, w, b = x.float(), w.float(), b.float()
    t = [q.clone().requires_grad_(i in requires) for i, q in enumerate((x, w, b))]
    with torch.autocast("cpu", dtype=autocast or H, enabled=autocast is not None):
        loss = fn(*t, y)
    with torch.no_grad():
        t[which].mul_(0.5)
    try:
        (loss * SCALE).backward()
    except RuntimeError as e:
        assert "modified by an inplace operation" in str(e)
        return "raises"
    return "ok"


def _torch_head(x, w, b, y):
    return F.cross_entropy(F.linear(x, w, b).float(), y)


def _plain_head(x, w, b, y):
    return xt.linear_cross_entropy(x, w, y, b)


@pytest.mark.fixed_bug("H106-1: compiled float16-autocast head saved the float32 master x/W")
def test_float16_autocast_head_master_weight_changed_after_forward():
    """H106-1 (fixed): the compiled float16-autocast head saved the float32 x/W (torch's
    F.linear saves its float16 casts), so an in-place change of the master weight after
    forward raised where torch and eager crossent do not (H87-2 again)."""
    assert _changed_after_forward(_torch_head, 1, autocast=H) == "ok"
    assert _changed_after_forward(_plain_head, 1, autocast=H) == "ok"  # eager crossent
    assert _changed_after_forward(_compiled(_plain_head), 1, autocast=H) == "ok"


def test_bfloat16_autocast_head_master_weight_changed_after_forward_is_torchs():
    assert _changed_after_forward(_torch_head, 1, autocast=torch.bfloat16) == "ok"
    assert _changed_after_forward(_compiled(_plain_head), 1, autocast=torch.bfloat16) == "ok"


@pytest.mark.fixed_bug("H106-1: compiled float16 head saved b (and x with W frozen)")
@pytest.mark.parametrize(("which", "requires"), [(2, (0, 1, 2)), (2, (0,)), (0, (0,))],
                         ids=["bias", "bias_frozen", "x_with_frozen_W"])
def test_float16_head_input_torch_does_not_save_changed_after_forward(which, requires):
    """H106-1 (fixed): the compiled float16 head saved b (and x, W) unconditionally:
    changing the bias, or x with W frozen, after forward raised where torch's F.linear
    (which saves neither there) and eager crossent do not."""
    assert _changed_after_forward(_torch_head, which, requires=requires) == "ok"
    assert _changed_after_forward(_head, which, requires=requires) == "ok"  # eager crossent
    assert _changed_after_forward(_compiled(_head), which, requires=requires) == "ok"
    x, w, b, y = _head_data()  # and the gradients are forward's, as torch's
    out = []
    for fn in (_head, _compiled(_head)):
        t = [q.clone().requires_grad_(i in requires) for i, q in enumerate((x, w, b))]
        loss = fn(*t, y)
        with torch.no_grad():
            t[which].mul_(0.5)
        (loss * SCALE).backward()
        out.append([q.grad for q in t if q.requires_grad])
    for a, e in zip(out[1], out[0], strict=True):
        _bitwise(a, e)


def test_float16_head_weight_changed_with_input_frozen_raises():
    """What is left of H106-1, a loud refusal (docs/guarantees.md): without autocast the
    compiled float16 head recomputes from W itself (a V x D copy would double the head's
    memory), so a change of W after forward raises also where torch, whose F.linear saves
    no W when x needs no gradient, would not."""
    assert _changed_after_forward(_torch_head, 1, requires=(1,)) == "ok"
    assert _changed_after_forward(_compiled(_head), 1, requires=(1,)) == "raises"


@pytest.mark.xfail(strict=True, reason=(
    "H106-2: a weight change the version counter does not see (FSDP2's regather, H97-1; "
    "here .data) enters the compiled float16 head's recompute: dx and dW both differ from "
    "torch's (dW from forward's softmax) and eager's; docs' H97-1 row says forward's"))
def test_float16_head_untracked_weight_change_dw_is_torchs():
    x, w, b, y = _head_data()
    out = []
    for fn in (_torch_head, _head, _compiled(_head)):
        xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
        loss = fn(xx, ww, b, y)
        ww.data.neg_()
        loss.backward()
        out.append(ww.grad.float())
    torch.testing.assert_close(out[1], out[0])  # eager crossent: torch's
    torch.testing.assert_close(out[2], out[0])


def _target_grad_refusal(fn):
    """The message of the refusal when float16 logits with a probability target that
    requires grad were changed in place after forward (None: no refusal)."""
    z, _ = _logits()
    t = torch.softmax(torch.randn(z.shape, generator=torch.Generator().manual_seed(2)), 1)
    a = z.clone().requires_grad_()
    zz = a * 1.0
    loss = fn(zz, t.to(H).requires_grad_())
    with torch.no_grad():
        zz.add_(3.0)
    try:
        (loss * SCALE).backward()
    except RuntimeError as e:
        return str(e)
    return None


@pytest.mark.fixed_bug("H106-3: compiled target gradient recomputed from the logits themselves")
def test_compiled_target_grad_in_place_change_is_torchs():
    """H106-3 (fixed): with a target gradient the compiled backward recomputed from the
    saved logits and refused an in-place change of them with torch's bare autograd message
    (eager's refusal names crossent). It recomputes from a copy now, so it takes torch's
    gradients, which come from the saved log-softmax (torch does not refuse)."""
    eager = _target_grad_refusal(_loss)  # the fused route (tests/torch/conftest.py)
    assert eager is not None and "crossent.torch.cross_entropy" in eager
    assert _target_grad_refusal(_compiled(_loss)) is None
    z, _ = _logits()
    t = torch.softmax(torch.randn(z.shape, generator=torch.Generator().manual_seed(2)), 1)
    got = []
    for fn in (lambda z, t: F.cross_entropy(z.float(), t.float()), _compiled(_loss)):
        a, tt = z.clone().requires_grad_(), t.to(H).requires_grad_()
        zz = a * 1.0
        loss = fn(zz, tt)
        with torch.no_grad():
            zz.add_(3.0)
        (loss * 4.0).backward()
        got.append((a.grad.float(), tt.grad.float()))
    for a, e in zip(got[1], got[0], strict=True):
        torch.testing.assert_close(a, e, rtol=2e-3, atol=1e-4)
