"""The autograd contract of crossent.torch: every gradient torch computes is torch's, or a
loud error; never a constant, never None.

Double backward (Hessians, gradient penalties, MAML), gradients for probability targets
and class weights, torch.func transforms, forward-mode AD, jit.trace, autocast, and the
small edges (C = 0, float ignore_index, dtypes). References: torch's own functions in
float64 (the conftest sends every size through the fused kernels).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fused_testing import close

import crossent.torch as xt
from crossent.errors import InputError, UnsupportedError

N, C, D = 6, 5, 3
REDUCTIONS = ["mean", "sum", "none"]


def data(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(N, C, generator=g, dtype=dtype) * 2
    y = torch.randint(0, C, (N,), generator=g)
    y[1] = -100
    t = torch.softmax(torch.randn(N, C, generator=g, dtype=dtype), 1)
    x = torch.randn(N, D, generator=g, dtype=dtype)
    w = torch.randn(C, D, generator=g, dtype=dtype)
    b = torch.randn(C, generator=g, dtype=dtype)
    cw = torch.rand(C, generator=g, dtype=dtype) + 0.5
    return z, y, t, x, w, b, cw


def reduce_scalar(out):
    """A scalar from any reduction, with a non-uniform grad_output for "none"."""
    return out if out.dim() == 0 else (out * torch.linspace(0.5, 1.5, out.numel(),
                                                            dtype=out.dtype)).sum()


# ---------------------------------------------------------------- double backward


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kw", [{}, dict(label_smoothing=0.2), dict(weight=True)])
def test_hessian_of_cross_entropy_is_torchs(reduction, kw):
    z, y, _, _, _, _, cw = data()
    kw = dict(kw, weight=cw) if kw.get("weight") else kw

    def loss(fn):
        return lambda z: reduce_scalar(fn(z, y, reduction=reduction, **kw))

    want = torch.autograd.functional.hessian(loss(F.cross_entropy), z)
    got = torch.autograd.functional.hessian(loss(xt.cross_entropy), z)
    assert float(want.abs().sum()) > 0.1
    close(got, want)


def test_hessian_with_probability_targets_z_loss_and_softcap():
    z, _, t, _, _, _, _ = data()

    def ref(z):  # z_loss and softcap written out in torch ops
        zc = 3.0 * torch.tanh(z / 3.0)
        lse = torch.logsumexp(zc, 1)
        return (F.cross_entropy(zc, t, reduction="none") + 1e-2 * lse.square()).mean()

    want = torch.autograd.functional.hessian(ref, z)
    got = torch.autograd.functional.hessian(
        lambda z: xt.cross_entropy(z, t, z_loss=1e-2, softcap=3.0), z)
    close(got, want)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradient_penalty_through_the_linear_head_is_torchs(reduction):
    _, y, _, x, w, b, _ = data()

    def step(fn):
        wl, bl = w.clone().requires_grad_(), b.clone().requires_grad_()
        loss = reduce_scalar(fn(x, wl, bl))
        gw, gb = torch.autograd.grad(loss, (wl, bl), create_graph=True)
        (loss + gw.square().sum() + gb.square().sum()).backward()
        return wl.grad, bl.grad

    want = step(lambda x, w, b: F.cross_entropy(F.linear(x, w, b), y, reduction=reduction))
    got = step(lambda x, w, b: xt.linear_cross_entropy(x, w, y, b, reduction=reduction,
                                                       chunk_size=4))
    for g, r in zip(got, want, strict=True):
        close(g, r)


@pytest.mark.parametrize("use_linear", [False, True])
def test_maml_meta_gradient_is_torchs(use_linear):
    _, y, _, x, w, _, _ = data()
    _, y2, _, x2, _, _, _ = data(seed=1)

    def ce(x, w, y, fused):
        if not fused:
            return F.cross_entropy(x @ w.T, y)
        if use_linear:
            return xt.linear_cross_entropy(x, w, y, chunk_size=4)
        return xt.cross_entropy(x @ w.T, y)

    def meta(fused):
        wl = w.clone().requires_grad_()
        (g,) = torch.autograd.grad(ce(x, wl, y, fused), wl, create_graph=True)
        adapted = wl - 0.5 * g
        (meta_grad,) = torch.autograd.grad(ce(x2, adapted, y2, fused), wl)
        return meta_grad

    close(meta(True), meta(False))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradgradcheck_float64(reduction):
    z, y, _, x, w, b, _ = data()
    z, x, w, b = (v[:3].clone().requires_grad_() for v in (z, x, w, b))
    y = y[:3].clamp(0, 2)
    assert torch.autograd.gradgradcheck(
        lambda z: xt.cross_entropy(z, y, reduction=reduction), (z,))
    assert torch.autograd.gradgradcheck(
        lambda x, w, b: xt.linear_cross_entropy(x, w, y, b, reduction=reduction,
                                                chunk_size=2), (x, w, b))


def test_double_backward_with_inplace_backward_raises():
    z, y, *_ = data(dtype=torch.float32)
    leaf = z.requires_grad_()
    loss = xt.cross_entropy(leaf * 1, y, inplace_backward=True)
    with pytest.raises(UnsupportedError, match=r"create_graph.*inplace_backward"):
        torch.autograd.grad(loss, leaf, create_graph=True)


def test_double_backward_after_in_place_change_of_the_logits_raises():
    z, y, *_ = data()
    leaf = z.requires_grad_()
    logits = leaf * 1
    loss = xt.cross_entropy(logits, y)
    logits.mul_(2)  # the first-order gradient was formed already; a recompute would differ
    with pytest.raises(RuntimeError, match="modified in place"):
        torch.autograd.grad(loss, leaf, create_graph=True)


def test_create_graph_gradient_is_never_a_constant():
    z, y, *_ = data(dtype=torch.float32)
    leaf = z.requires_grad_()
    (g,) = torch.autograd.grad(xt.cross_entropy(leaf, y), leaf, create_graph=True)
    assert g.grad_fn is not None


# ---------------------------------------------------------------- target and weight grads


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("smoothing", [0.0, 0.3])
@pytest.mark.parametrize("weighted", [False, True])
def test_probability_target_and_weight_gradients_are_torchs(reduction, smoothing, weighted):
    z, _, t, x, w, b, cw = data()

    def run(fn_ce, fn_lin):
        leaves = [v.clone().requires_grad_() for v in (z, t, cw, x, w, b)]
        zl, tl, cwl, xl, wl, bl = leaves
        weight = cwl if weighted else None
        kw = dict(reduction=reduction, label_smoothing=smoothing)
        loss = reduce_scalar(fn_ce(zl, tl, weight, **kw)) + reduce_scalar(
            fn_lin(xl, wl, tl, bl, weight, **kw))
        loss.backward()
        return [v.grad for v in leaves]

    want = run(F.cross_entropy,
               lambda x, w, t, b, cw, **kw: F.cross_entropy(F.linear(x, w, b), t, cw, **kw))
    got = run(xt.cross_entropy,
              lambda x, w, t, b, cw, **kw: xt.linear_cross_entropy(x, w, t, b, weight=cw,
                                                                   chunk_size=4, **kw))
    for g, r in zip(got, want, strict=True):
        if r is None:
            assert g is None
        else:
            assert g is not None
            close(g, r)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("inplace", [False, pytest.param(True, marks=pytest.mark.xfail(
    strict=True, reason="documented (docs/guarantees.md): the composable path "
    "(_composite.row_losses, taken for inplace_backward with target gradients and under "
    "torch.func transforms) zeroes the term's target gradient too, where torch's (and the "
    "eager path's) is +inf"))])
def test_target_gradient_block_by_block_with_masked_logits(monkeypatch, reduction, inplace):
    from crossent.torch import _cross_entropy

    monkeypatch.setattr(_cross_entropy, "block_rows", lambda *a: 2)  # several blocks
    z, _, t, _, _, _, cw = data()
    z[0, 1] = -torch.inf  # a masked class whose target probability is 0
    t[0, 1] = 0.0
    t[0] /= t[0].sum()

    def ref(z, t, cw, reduction):  # torch ops; 0 * log p = 0 where p = 0 (crossent's rule)
        big_t = t * cw
        logp = torch.log_softmax(z, 1)
        rows = -(big_t * torch.where(big_t == 0, 0.0, logp)).sum(1)
        return rows if reduction == "none" else rows.sum() / (N if reduction == "mean" else 1)

    def run(fn, **kw):
        zl, tl, cwl = (v.clone().requires_grad_() for v in (z, t, cw))
        reduce_scalar(fn(zl * 1, tl, cwl, reduction=reduction, **kw)).backward()
        return zl.grad, tl.grad, cwl.grad

    got = run(xt.cross_entropy, inplace_backward=inplace)
    want = run(ref)
    # the target's gradient there is torch's +inf (any t > 0 makes the loss infinite);
    # the loss, the logits' and the weight's gradients keep the 0 term (PITFALLS 4)
    assert got[1][0, 1] == torch.inf
    got[1][0, 1] = want[1][0, 1]
    for g, r in zip(got, want, strict=True):
        assert torch.isfinite(g).all()
        close(g, r)


@pytest.mark.parametrize("fn", ["cross_entropy", "linear_cross_entropy"])
def test_weight_gradient_with_index_targets_raises_as_torch(fn):
    z, y, _, x, w, _, cw = data()
    cw = cw.requires_grad_()
    with pytest.raises(RuntimeError, match="not differentiable"):
        F.cross_entropy(z, y, cw)
    with pytest.raises(UnsupportedError, match="weight"):
        if fn == "cross_entropy":
            xt.cross_entropy(z.requires_grad_(), y, cw)
        else:
            xt.linear_cross_entropy(x, w.requires_grad_(), y, weight=cw)
    with torch.no_grad():  # no gradient asked: fine, as in torch
        close(xt.cross_entropy(z, y, cw), F.cross_entropy(z, y, cw))


# ---------------------------------------------------------------- transforms


@pytest.mark.parametrize("fn", ["cross_entropy", "linear_cross_entropy"])
def test_func_grad_vmap_jvp_jacrev_match_torch(fn):
    z, y, _, x, w, b, _ = data()
    if fn == "cross_entropy":
        ours, ref, arg = (lambda a: xt.cross_entropy(a, y, label_smoothing=0.1),
                          lambda a: F.cross_entropy(a, y, label_smoothing=0.1), z)
    else:
        ours, ref, arg = (lambda a: xt.linear_cross_entropy(x, a, y, b, chunk_size=2),
                          lambda a: F.cross_entropy(F.linear(x, a, b), y), w)
    close(torch.func.grad(ours)(arg), torch.func.grad(ref)(arg))
    batch = torch.stack([arg, arg * 2, arg - 1])
    close(torch.vmap(ours)(batch), torch.vmap(ref)(batch))
    close(torch.vmap(torch.func.grad(ours))(batch), torch.vmap(torch.func.grad(ref))(batch))
    tangent = torch.ones_like(arg)
    close(torch.func.jvp(ours, (arg,), (tangent,))[1], torch.func.jvp(ref, (arg,), (tangent,))[1])
    close(torch.func.jacrev(torch.func.grad(ours))(arg),
          torch.func.jacrev(torch.func.grad(ref))(arg))
    close(torch.func.jacfwd(ours)(arg), torch.func.jacfwd(ref)(arg))


def test_forward_mode_ad_dual_tensors():
    import torch.autograd.forward_ad as fwad

    z, y, *_ = data()
    tangent = torch.randn_like(z)
    outs = []
    for fn in (xt.cross_entropy, F.cross_entropy):
        with fwad.dual_level():
            outs.append(fwad.unpack_dual(fn(fwad.make_dual(z, tangent), y)).tangent)
    close(outs[0], outs[1])


def test_jit_trace_gives_torchs_numbers_on_new_inputs():
    z, y, *_ = data()
    with pytest.warns(torch.jit.TracerWarning):  # shape checks are Python, as in torch
        traced = torch.jit.trace(lambda a: xt.cross_entropy(a, y), (z,))
    close(traced(z * 3), F.cross_entropy(z * 3, y))


# ---------------------------------------------------------------- autocast and loss_dtype


def test_autocast_cross_entropy_returns_float32_as_torch():
    g = torch.Generator().manual_seed(0)
    z = (torch.randn(64, 100, generator=g) * 3).bfloat16().requires_grad_()
    y = torch.randint(0, 100, (64,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = xt.cross_entropy(z, y), F.cross_entropy(z, y)
    assert got.dtype == want.dtype == torch.float32
    close(got, want, rtol=1e-6)
    (g_ours,) = torch.autograd.grad(got, z)
    (g_torch,) = torch.autograd.grad(want, z)
    assert g_ours.dtype == torch.bfloat16
    close(g_ours, g_torch, rtol=1e-2)


def test_autocast_linear_head_runs_the_matmul_in_bfloat16_as_torch():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 16, generator=g)
    w = torch.randn(100, 16, generator=g).requires_grad_()
    y = torch.randint(0, 100, (64,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = xt.linear_cross_entropy(x, w, y, chunk_size=16)
        want = F.cross_entropy(F.linear(x, w), y)
    assert got.dtype == want.dtype == torch.float32
    close(got, want, rtol=1e-5)
    (gw,) = torch.autograd.grad(got, w)
    (rw,) = torch.autograd.grad(want, w)
    assert gw.dtype == torch.float32
    close(gw, rw, rtol=2e-2)


def test_loss_dtype_gives_a_float32_loss_from_bfloat16_logits():
    z, y, *_ = data()
    zb = z.bfloat16().requires_grad_()
    got = xt.cross_entropy(zb, y, loss_dtype=torch.float32)
    assert got.dtype == torch.float32
    close(got, F.cross_entropy(zb.detach().double(), y), rtol=1e-6)  # no bf16 rounding
    got.backward()
    assert zb.grad.dtype == torch.bfloat16
    _, _, _, x, w, _, _ = data()
    lin = xt.linear_cross_entropy(x.float(), w.float(), y, chunk_size=2,
                                  loss_dtype=torch.float64)
    assert lin.dtype == torch.float64
    with pytest.raises(InputError, match="loss_dtype"):
        xt.cross_entropy(z, y, loss_dtype=torch.int64)


# ---------------------------------------------------------------- small edges


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_no_classes_follows_torch(reduction):
    z = torch.randn(4, 0, requires_grad=True)
    ignored = torch.full((4,), -100)
    for target in (ignored, torch.empty(4, 0)):
        close(xt.cross_entropy(z, target, reduction=reduction),
              F.cross_entropy(z, target, reduction=reduction))
    with pytest.raises(IndexError):
        F.cross_entropy(z, torch.zeros(4, dtype=torch.long))
    with pytest.raises(IndexError):
        xt.cross_entropy(z, torch.zeros(4, dtype=torch.long))
    w = torch.randn(0, 3, requires_grad=True)
    out = xt.linear_cross_entropy(torch.randn(4, 3), w, ignored, reduction=reduction,
                                  chunk_size=2)
    close(out, F.cross_entropy(torch.randn(4, 0), ignored, reduction=reduction))


@pytest.mark.parametrize("bad", [3.7, 3.0, True, "3"])
def test_ignore_index_must_be_an_integer(bad):
    z, y, _, x, w, _, _ = data()
    with pytest.raises(TypeError):
        F.cross_entropy(z, y, ignore_index=bad)
    with pytest.raises(InputError, match="ignore_index"):
        xt.cross_entropy(z, y, ignore_index=bad)
    with pytest.raises(InputError, match="ignore_index"):
        xt.linear_cross_entropy(x, w, y, ignore_index=bad)


def test_integer_like_ignore_index_is_accepted():
    z, y, *_ = data()
    y[1] = 2
    want = F.cross_entropy(z, y, ignore_index=2)
    for value in (np.int64(2), torch.tensor(2)):
        close(xt.cross_entropy(z, y, ignore_index=value), want)


@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float64),
                                    (torch.bfloat16, torch.float32)])
def test_weight_of_another_dtype_raises_as_torch(dtypes):
    z, y, _, x, w, _, cw = data()
    z, cw = z.to(dtypes[0]), cw.to(dtypes[1])
    with pytest.raises(RuntimeError):
        F.cross_entropy(z, y, cw)
    with pytest.raises(InputError, match="weight"):
        xt.cross_entropy(z, y, cw)
    with pytest.raises(InputError, match="weight"):
        xt.linear_cross_entropy(x.to(dtypes[0]), w.to(dtypes[0]), y, weight=cw)


def test_bad_inputs_raise_input_error():
    z, y, *_ = data()
    with pytest.raises(InputError, match="input"):
        xt.cross_entropy(y, y)
    with pytest.raises(InputError, match="target"):
        xt.cross_entropy(z, y[:-1])
    with pytest.raises(InputError, match="target"):
        xt.cross_entropy(z, y.bool())
    with pytest.raises(InputError, match="weight"):
        xt.cross_entropy(z, y, torch.ones(C + 1, dtype=z.dtype))


# ---------------------------------------------------------------- torch's options


def test_linear_cross_entropy_options_are_honoured_or_rejected():
    _, y, _, x, w, b, _ = data(dtype=torch.float32)
    y[1] = 0
    want = F.cross_entropy(F.linear(x, w, b), y)
    opts = torch.nn.LinearCrossEntropyOptions
    for o in (opts(batch_chunk_size=2), opts(chunking_method="aspect_ratio:2"),
              opts(acc_policy="compact"), opts(acc_dtype=torch.float32)):
        close(xt.linear_cross_entropy(x, w, y, b, options=o), want)
    wl = w.clone().requires_grad_()
    loss = xt.linear_cross_entropy(x, wl, y, b, options=opts(allow_retain_graph=True,
                                                             batch_chunk_size=2))
    loss.backward(retain_graph=True)
    first = wl.grad.clone()
    loss.backward()  # allowed: the stored gradients were kept
    close(wl.grad, 2 * first)
    with pytest.raises(UnsupportedError, match="acc_dtype"):
        xt.linear_cross_entropy(x, w, y, options=opts(acc_dtype=torch.float64))
    with pytest.raises(InputError, match="chunk_size"):
        xt.linear_cross_entropy(x, w, y, chunk_size=3, options=opts(batch_chunk_size=2))
    with pytest.raises(InputError, match="options"):
        xt.linear_cross_entropy(x, w, y, options={"batch_chunk_size": 2})


def test_k_dimensional_linear_weight_matches_torch():
    _, _, _, x, _, _, _ = data()
    g = torch.Generator().manual_seed(5)
    w = torch.randn(C, 2, D, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(C, 2, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, C, (N, 2), generator=g)
    want = F.linear_cross_entropy(x, w, y, linear_bias=b, label_smoothing=0.1)
    got = xt.linear_cross_entropy(x, w, y, b, label_smoothing=0.1)
    close(got, want)
    for ours, theirs in zip(torch.autograd.grad(got, (w, b)), torch.autograd.grad(want, (w, b)),
                            strict=True):
        close(ours, theirs)
    with pytest.raises(InputError, match="K-dimensional"):
        xt.linear_cross_entropy(x[0], w, y[0])
