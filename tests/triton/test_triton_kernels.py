"""The Triton kernels against torch in float64: values and gradients, every option and
dtype, on small shapes with ragged tiles (CPU: triton's interpreter, see conftest.py).

The interpreter costs milliseconds per tile operation, so every case is a handful of
rows and a few hundred classes, and options are combined rather than multiplied out.
"""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

import torch.nn.functional as F  # noqa: E402
from grad_probes import close_to_reference as close  # noqa: E402

from crossent.errors import InputError, UnsupportedError  # noqa: E402
from crossent.torch._triton import (  # noqa: E402
    cross_entropy_forward,
    scale_,
    triton_cross_entropy,
    triton_linear_cross_entropy,
)
from crossent.torch._triton.fused_linear import fused_linear_cross_entropy  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: interpreter
BLOCK = 64  # tile width in the tests: V = 150 gives tiles of 64, 64 and a ragged 22
V = 150
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def reference(z, target, weight=None, ignore_index=-100, reduction="mean", eps=0.0,
              z_loss=0.0, softcap=None):
    """torch in float64: F.cross_entropy on the softcapped logits, plus the z-loss
    ``z_loss * lse^2`` per counted row sharing torch's "mean" denominator."""
    z = z.detach().double().requires_grad_()
    zc = softcap * torch.tanh(z / softcap) if softcap is not None else z
    w = None if weight is None else weight.double()
    prob = target.is_floating_point()
    t = target.double() if prob else target
    rows = F.cross_entropy(zc, t, weight=w, ignore_index=ignore_index, reduction="none",
                           label_smoothing=eps)
    if prob:
        counted = torch.ones(z.shape[0], dtype=torch.float64, device=z.device)
        denom = torch.tensor(float(z.shape[0]), dtype=torch.float64, device=z.device)
    else:
        counted = (target != ignore_index).double()
        safe = torch.where(target != ignore_index, target, 0)
        denom = (counted if w is None else w[safe] * counted).sum()
    # where, not a product: an ignored row's NaN lse adds nothing (0 x NaN would)
    rows = rows + torch.where(counted > 0, z_loss * torch.logsumexp(zc, 1).square(), 0.0)
    out = rows if reduction == "none" else rows.sum() if reduction == "sum" else rows.sum() / denom
    return z, out


def make(n, v=V, dtype=torch.float32, prob=False, ignore=(), seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(n, v, generator=g, dtype=torch.float64) * scale).to(dtype)
    if prob:
        target = torch.rand(n, v, generator=g, dtype=torch.float64)
        target[:, ::7] = 0.0  # zero targets: their terms must be exactly 0
        target = (target / target.sum(1, keepdim=True)).to(dtype)
    else:
        target = torch.randint(0, v, (n,), generator=g)
        for i in ignore:
            target[i] = -100
    weight = torch.rand(v, generator=g, dtype=torch.float64).float() + 0.5
    return z.to(DEVICE), target.to(DEVICE), weight.to(DEVICE)


def check(dtype, prob, reduction="mean", weight=False, eps=0.0, z_loss=0.0, softcap=None,
          ignore=(), n=10, v=V, seed=0, inplace=False, block=BLOCK):
    z, target, w = make(n, v, dtype, prob, ignore, seed)
    w = w.to(dtype) if weight else None  # torch wants the logits' dtype
    zz, want = reference(z.cpu(), target.cpu(), None if w is None else w.cpu(),
                         reduction=reduction, eps=eps, z_loss=z_loss, softcap=softcap)
    leaf = z.clone().requires_grad_()
    src = leaf * 1 if inplace else leaf  # in place destroys its input: not the leaf
    got = triton_cross_entropy(src, target, w, reduction=reduction, label_smoothing=eps,
                               z_loss=z_loss, softcap=softcap, inplace_backward=inplace,
                               block=block)
    assert got.dtype == dtype
    close(got, want, TOL[dtype])
    go = torch.rand(want.shape, dtype=torch.float64) + 0.5 if reduction == "none" \
        else torch.tensor(1.7, dtype=torch.float64)
    (want_grad,) = torch.autograd.grad(want, zz, go)
    got.backward(go.to(device=DEVICE, dtype=dtype))
    assert leaf.grad.dtype == dtype
    close(leaf.grad, want_grad, TOL[dtype])
    return leaf, src


DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("prob", [False, True], ids=["index", "prob"])
def test_every_option_at_once_in_every_dtype(dtype, prob):
    check(dtype, prob, weight=True, eps=0.1, z_loss=0.01, softcap=5.0, ignore=(2, 7))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_plain_index_targets_in_every_dtype(dtype):
    check(dtype, False, n=6, seed=1)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("prob", [False, True], ids=["index", "prob"])
def test_reductions_with_weights_and_smoothing(reduction, prob):
    check(torch.float32, prob, reduction, weight=True, eps=0.2, ignore=(0,), n=8, seed=2)


@pytest.mark.parametrize("option", [
    {"weight": True}, {"eps": 0.3}, {"z_loss": 0.05}, {"softcap": 2.0},
    {"weight": True, "eps": 1.0}, {"ignore": (1, 3)},
], ids=["weight", "smoothing", "z_loss", "softcap", "weight+full-smoothing", "ignored"])
def test_each_option_alone(option):
    check(torch.float32, False, n=6, seed=3, **option)


@pytest.mark.parametrize("v,block", [(37, 64), (128, 64), (64, 64), (130, 16)],
                         ids=["one-ragged-tile", "exact-tiles", "one-tile", "many-tiles"])
def test_tile_edges(v, block):
    check(torch.float32, False, weight=True, eps=0.1, n=4, v=v, block=block, seed=4)


def test_default_tile_and_large_logits():
    # one tile of 256 (the default for V=150), logits far from 0 (lse - z_y cancels)
    z, target, _ = make(4, dtype=torch.float32, seed=5)
    z = z + 1000.0
    got = triton_cross_entropy(z, target, reduction="none")
    _, want = reference(z.cpu(), target.cpu(), reduction="none")
    close(got, want, 1e-4)


def test_inplace_backward_writes_the_gradient_into_the_logits():
    leaf, src = check(torch.bfloat16, False, weight=True, eps=0.1, ignore=(1,), n=5,
                      inplace=True)
    # src's storage now holds the (unscaled by grad_output) gradient
    assert not torch.equal(src.detach(), leaf.detach())


def test_inplace_backward_over_logits_another_op_saved_raises():
    z, target, _ = make(3, v=20, dtype=torch.float32)
    leaf = z.clone().requires_grad_()
    capped = torch.tanh(leaf)  # tanh saves its output for backward
    loss = triton_cross_entropy(capped, target, inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_probability_target_zero_where_logit_is_minus_inf():
    z, t, _ = make(3, dtype=torch.float32, prob=True, seed=6)
    z[:, 0] = float("-inf")
    t[:, 0] = 0.0
    leaf = z.clone().requires_grad_()
    got = triton_cross_entropy(leaf, t, reduction="none", block=BLOCK)
    zd, td = z.double(), t.double()
    lse = torch.logsumexp(zd, 1, keepdim=True)
    want = torch.where(td == 0, 0.0, td * (lse - zd)).sum(1)
    close(got, want, 1e-5)
    got.sum().backward()
    assert torch.isfinite(leaf.grad).all() and float(leaf.grad[:, 0].abs().max()) == 0.0


def test_a_first_tile_of_minus_inf_does_not_poison_the_running_sum():
    z, target, _ = make(3, dtype=torch.float32, seed=7)
    z[:, :BLOCK] = float("-inf")
    target[:] = BLOCK + 5
    got = triton_cross_entropy(z, target, reduction="none", block=BLOCK)
    _, want = reference(z.cpu(), target.cpu(), reduction="none")
    close(got, want, 1e-5)


def test_nan_logits_propagate():
    z, target, _ = make(3, dtype=torch.float32, seed=8)
    z[1, 5] = float("nan")
    got = triton_cross_entropy(z, target, reduction="none", block=BLOCK)
    assert torch.isnan(got[1]) and torch.isfinite(got[[0, 2]]).all()


def test_all_rows_ignored():
    z, target, w = make(3, dtype=torch.float32, ignore=(0, 1, 2))
    leaf = z.clone().requires_grad_()
    mean = triton_cross_entropy(leaf, target, w, block=BLOCK)
    assert torch.isnan(mean)  # 0/0, as torch
    mean.backward()
    assert float(leaf.grad.abs().max()) == 0.0
    assert float(triton_cross_entropy(z, target, reduction="sum", block=BLOCK)) == 0.0


def test_custom_ignore_index_and_bad_class_index():
    z, target, _ = make(4, dtype=torch.float32, seed=9)
    target[2] = 3
    got = triton_cross_entropy(z, target, ignore_index=3, reduction="none", block=BLOCK)
    want = F.cross_entropy(z.double().cpu(), target.cpu(), ignore_index=3, reduction="none")
    close(got, want, 1e-5)
    target[1] = V
    with pytest.raises(IndexError, match="class index"):
        triton_cross_entropy(z, target)
    rows = triton_cross_entropy(z, target, reduction="none", check_targets=False, block=BLOCK)
    assert torch.isnan(rows[1]) and torch.isfinite(rows[[0, 3]]).all()  # loud, not silent


def test_shapes_1d_and_spatial():
    z, target, _ = make(6, v=20, dtype=torch.float32, seed=10)
    spatial = z.reshape(2, 3, 20).movedim(2, 1)  # (N, C, d1)
    got = triton_cross_entropy(spatial, target.reshape(2, 3), reduction="none")
    assert got.shape == (2, 3)
    close(got.reshape(-1), reference(z.cpu(), target.cpu(), reduction="none")[1], 1e-5)
    one = triton_cross_entropy(z[0], target[0])
    close(one, F.cross_entropy(z[0].double().cpu(), target[0].cpu()), 1e-5)
    empty = triton_cross_entropy(z[:0], target[:0], reduction="sum")
    assert float(empty) == 0.0


def test_bad_arguments_and_unsupported_gradients():
    z, target, w = make(2, v=8, dtype=torch.float32)
    with pytest.raises(InputError, match="reduction"):
        triton_cross_entropy(z, target, reduction="avg")
    with pytest.raises(InputError, match="label_smoothing"):
        triton_cross_entropy(z, target, label_smoothing=1.5)
    with pytest.raises(InputError, match="weight"):
        triton_cross_entropy(z, target, w[:3])
    with pytest.raises(UnsupportedError, match="weight"):
        triton_cross_entropy(z, target, w.clone().requires_grad_())
    probs = torch.softmax(z, 1).requires_grad_()
    with pytest.raises(UnsupportedError, match="target"):
        triton_cross_entropy(z, probs)


def test_backward_twice_raises_and_no_grad_computes_only_the_loss():
    z, target, _ = make(3, v=20, dtype=torch.float32)
    leaf = z.clone().requires_grad_()
    loss = triton_cross_entropy(leaf, target)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()
    with torch.no_grad():
        close(triton_cross_entropy(leaf, target), reference(z, target)[1], 1e-5)


def test_gradcheck_float64_every_option():
    z, target, w = make(3, v=5, dtype=torch.float64, seed=11)
    target[1] = -100
    z = z.clone().requires_grad_()

    def f(logits):
        return triton_cross_entropy(logits, target, w.double(), label_smoothing=0.2,
                                    z_loss=0.1, softcap=4.0, reduction="sum", block=16)

    assert torch.autograd.gradcheck(f, (z,), eps=1e-6, atol=1e-7)


def test_forward_into_a_separate_float32_buffer_with_row_multipliers():
    z, target, w = make(5, dtype=torch.bfloat16, seed=12)
    grad = torch.empty(z.shape, dtype=torch.float32, device=DEVICE)
    mult = torch.tensor([0.5, 2.0, 0.0, 1.0, 3.0], device=DEVICE)
    before = z.clone()
    res = cross_entropy_forward(z, target, weight=w, reduction="sum", grad_out=grad,
                                row_multiplier=mult, block=BLOCK)
    assert torch.equal(z, before)  # a separate buffer leaves the logits alone
    zz, want = reference(z.cpu(), target.cpu(), w.cpu(), reduction="none")
    (want_grad,) = torch.autograd.grad(want, zz, mult.double().cpu())
    close(res.grad, want_grad, 1e-5)  # float32 gradient: no bf16 rounding
    close(res.loss, want, 1e-5)
    close(res.lse, torch.logsumexp(z.double().cpu(), 1), 1e-6)
    close(res.denominator, w.double().cpu()[target.cpu()].sum(), 1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_scale_rows_and_scalars(dtype):
    x = torch.randn(4, 70, dtype=torch.float64)
    got = x.to(dtype).to(DEVICE)
    f = torch.tensor([1.0, 0.0, -2.5, 3.0])
    scale_(got, f.to(DEVICE), per_row=True)
    close(got, (x.to(dtype).double() * f[:, None].double()), TOL[dtype])
    scale_(got, torch.tensor(1.0, device=DEVICE))
    close(got, (x.to(dtype).double() * f[:, None].double()), TOL[dtype])
    flat = x[0].to(dtype).to(DEVICE)
    scale_(flat, torch.tensor(0.5, device=DEVICE))
    close(flat, x[0].to(dtype).double() * 0.5, TOL[dtype])


# ------------------------------------------------------------------------- linear head


def linear_reference(x, w, b, target, reduction="mean", **kw):
    xd = x.detach().double().requires_grad_()
    wd = w.detach().double().requires_grad_()
    bd = None if b is None else b.detach().double().requires_grad_()
    z = F.linear(xd, wd, bd)
    zc = z if kw.get("softcap") is None else kw["softcap"] * torch.tanh(z / kw["softcap"])
    weight = kw.get("weight")
    weight = None if weight is None else weight.double()
    t = target.double() if target.is_floating_point() else target
    rows = F.cross_entropy(zc, t, weight=weight, reduction="none",
                           label_smoothing=kw.get("eps", 0.0))
    counted = (torch.ones(len(z), dtype=torch.float64, device=z.device)
               if target.is_floating_point()
               else (target != -100).double())
    rows = rows + kw.get("z_loss", 0.0) * torch.logsumexp(zc, 1).square() * counted
    if reduction == "none":
        out = rows
    elif reduction == "sum":
        out = rows.sum()
    elif target.is_floating_point():
        out = rows.sum() / len(z)
    else:
        safe = torch.where(target != -100, target, 0)
        out = rows.sum() / (counted if weight is None else weight[safe] * counted).sum()
    return (xd, wd, bd), out


def linear_case(dtype, prob=False, reduction="mean", bias=True, n=12, d=16, v=90,
                chunk=5, ignore=(3, 4), seed=0, skip_ignored=True, **kw):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype)
    w = (torch.randn(v, d, generator=g, dtype=torch.float64) / math.sqrt(d)).to(dtype)
    b = (torch.randn(v, generator=g, dtype=torch.float64) * 0.1).to(dtype) if bias else None
    if prob:
        target = torch.softmax(torch.randn(n, v, generator=g, dtype=torch.float64), 1)
        target = target.to(dtype)
    else:
        target = torch.randint(0, v, (n,), generator=g)
        for i in ignore:
            target[i] = -100
    cw = kw.pop("class_weight", None)
    if cw:
        kw["weight"] = (torch.rand(v, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    leaves, want = linear_reference(x, w, b, target, reduction, **kw)
    params = [t.clone().to(DEVICE).requires_grad_() if t is not None else None
              for t in (x, w, b)]
    got = triton_linear_cross_entropy(
        params[0], params[1], target.to(DEVICE), params[2], reduction=reduction,
        weight=None if kw.get("weight") is None else kw["weight"].to(DEVICE),
        label_smoothing=kw.get("eps", 0.0), z_loss=kw.get("z_loss", 0.0),
        softcap=kw.get("softcap"), chunk_size=chunk, skip_ignored=skip_ignored, block=32)
    tol = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float64: 1e-10}[dtype]
    close(got, want, tol)
    go = (torch.rand(want.shape, dtype=torch.float64) + 0.5 if reduction == "none"
          else torch.tensor(0.7, dtype=torch.float64))
    wants = torch.autograd.grad(want, [t for t in leaves if t is not None], go)
    got.backward(go.to(device=DEVICE, dtype=dtype))
    for p, want_grad in zip([p for p in params if p is not None], wants, strict=True):
        assert p.grad.dtype == dtype
        close(p.grad, want_grad, tol)
    return params


def test_linear_head_every_option_float32():
    linear_case(torch.float32, class_weight=True, eps=0.1, z_loss=0.01, softcap=3.0)


def test_linear_head_bfloat16_multiplies_in_bfloat16():
    linear_case(torch.bfloat16, class_weight=True, eps=0.1, seed=1)


@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_linear_head_reductions(reduction):
    linear_case(torch.float32, reduction=reduction, n=7, chunk=3, seed=2, z_loss=0.02)


def test_linear_head_probability_targets_no_bias_unchunked():
    linear_case(torch.float32, prob=True, bias=False, n=6, chunk=64, eps=0.05, seed=3)


def test_linear_head_without_skipping_ignored_rows_and_float64():
    linear_case(torch.float64, skip_ignored=False, n=6, chunk=4, seed=4, class_weight=True)


def test_linear_head_all_rows_ignored_and_no_grad():
    params = linear_case(torch.float32, reduction="sum", n=4, ignore=(0, 1, 2, 3), seed=5)
    assert float(params[0].grad.abs().max()) == 0.0
    x, w, _ = (p.detach() for p in params)
    with torch.no_grad():
        rows = triton_linear_cross_entropy(x, w, torch.tensor([1, 2, 3, 4], device=DEVICE),
                                           reduction="none")
    close(rows, F.cross_entropy(x.double().cpu() @ w.double().cpu().T,
                                torch.tensor([1, 2, 3, 4]), reduction="none"), 1e-5)
    one = triton_linear_cross_entropy(x[0], w, torch.tensor(2, device=DEVICE),
                                      reduction="none")
    assert one.shape == ()
    close(one, F.cross_entropy(x[0].double().cpu() @ w.double().cpu().T, torch.tensor(2)),
          1e-5)


# ----------------------------------------------- experimental fused matmul + lse head


@pytest.mark.parametrize("dtype,reduction", [(torch.float32, "mean"), (torch.bfloat16, "none")],
                         ids=["float32-mean", "bfloat16-none"])
def test_fused_linear_head_against_float64(dtype, reduction):
    g = torch.Generator().manual_seed(20)
    n, d, v = 20, 24, 70  # ragged row, feature and vocabulary tiles
    x = torch.randn(n, d, generator=g).to(dtype)
    w = (torch.randn(v, d, generator=g) / 5).to(dtype)
    b = (torch.randn(v, generator=g) * 0.1).to(dtype)
    y = torch.randint(0, v, (n,), generator=g)
    y[[3, 11]] = -100
    cw = (torch.rand(v, generator=g) + 0.5).to(dtype)  # torch wants the input's dtype
    ps = [t.clone().to(DEVICE).requires_grad_() for t in (x, w, b)]
    loss = fused_linear_cross_entropy(ps[0], ps[1], y.to(DEVICE), ps[2], weight=cw.to(DEVICE),
                                      z_loss=0.01, reduction=reduction)
    go = torch.rand(n, dtype=torch.float64) + 0.5 if reduction == "none" \
        else torch.tensor(1.3, dtype=torch.float64)
    loss.backward(go.to(device=DEVICE, dtype=dtype))
    ds = [t.double().requires_grad_() for t in (x, w, b)]
    z = F.linear(ds[0], ds[1], ds[2])
    valid = (y != -100).double()
    rows = (F.cross_entropy(z, y, weight=cw.double(), reduction="none")
            + 0.01 * torch.logsumexp(z, 1).square() * valid)
    want = rows if reduction == "none" else rows.sum() / (cw.double()[y.clamp(min=0)] * valid).sum()
    want.backward(go)
    tol = 2e-5 if dtype == torch.float32 else 1.6e-2
    close(loss, want, tol)
    for p, q in zip(ps, ds, strict=True):
        assert p.grad.dtype == dtype
        close(p.grad, q.grad, tol)


def test_fused_linear_head_refuses_what_it_lacks():
    x, w = torch.randn(4, 16, device=DEVICE), torch.randn(32, 16, device=DEVICE)
    y = torch.tensor([1, 2, 3, 4], device=DEVICE)
    for kw in ({"label_smoothing": 0.1}, {"softcap": 5.0}):
        with pytest.raises(UnsupportedError, match="softcap"):
            fused_linear_cross_entropy(x, w, y, **kw)
    with pytest.raises(UnsupportedError, match="probability"):
        fused_linear_cross_entropy(x, w, torch.softmax(torch.randn(4, 32, device=DEVICE), 1))


# ------------------------------------------------------------ the GPU compiler, on CPU


def test_kernels_compile_for_an_nvidia_gpu(sm90_compile):
    """The interpreter accepts code the compiler rejects (it runs the kernel as Python):
    every kernel compiled for sm_90 (compile_for_gpu.py's "kernels" group, run in a fresh
    process by conftest's ``sm90_compile``: this one holds the interpreter)."""
    assert "FAIL kernels" not in sm90_compile, sm90_compile
    assert sm90_compile.count("ok kernels ") == 8, sm90_compile


# ------------------------------------------------- adversarial inputs (against torch)

NEG_INF, NAN = float("-inf"), float("nan")


def against_torch(z, target, ref_target=None, rtol=1e-5, **kw):
    """Loss and gradient (random ``grad_output`` for "none") of the Triton function
    against ``F.cross_entropy`` in float64 on the same values; NaN must match NaN."""
    leaf = z.clone().requires_grad_()
    got = triton_cross_entropy(leaf, target, **kw)
    kw.pop("block", None)
    w = kw.pop("weight", None)
    zd = z.detach().double().cpu().requires_grad_()
    want = F.cross_entropy(zd, (target if ref_target is None else ref_target).cpu(),
                           weight=None if w is None else w.double().cpu(), **kw)
    torch.testing.assert_close(got.double().cpu(), want.detach(), rtol=rtol, atol=1e-6,
                               equal_nan=True)
    go = torch.rand(want.shape, dtype=torch.float64) + 0.5
    got.backward(go.to(got.dtype).to(got.device))
    want.backward(go)
    torch.testing.assert_close(leaf.grad.double().cpu(), zd.grad, rtol=rtol * 10, atol=1e-6,
                               equal_nan=True)
    return got, leaf.grad


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_masked_classes_minus_inf_with_every_index_option():
    z, target, w = make(4, v=40, seed=30)
    z[:, 3:9] = NEG_INF  # masked classes across the first tile
    target[:] = torch.tensor([0, 5, -100, 30])  # row 1's target is masked: loss +inf
    for kw in ({}, {"weight": w}, {"label_smoothing": 0.1}, {"reduction": "none"}):
        _, grad = against_torch(z, target, block=16, **kw)
        if not kw.get("label_smoothing"):  # p = 0 there: exactly 0 (but p_y - 1 = -1)
            assert float(grad[[0, 2, 3], 3:9].abs().max()) == 0.0
    rows = triton_cross_entropy(z, target, reduction="none", label_smoothing=0.1, block=16)
    assert torch.isposinf(rows[[0, 1, 3]]).all() and rows[2] == 0  # torch: +inf too


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_all_minus_inf_rows_nan_rows_and_ignored_rows():
    z, target, _ = make(5, v=20, seed=31)
    z[0] = NEG_INF  # softmax 0/0: NaN, as torch
    z[1, 7] = NAN
    z[2] = NEG_INF  # ignored: loss 0, gradient 0, nothing leaks into the mean
    z[3, 4] = NAN
    target[2] = target[3] = -100
    keep = [0, 1, 4]
    against_torch(z[keep], target[keep], reduction="none", block=16)
    leaf = z.clone().requires_grad_()
    got = triton_cross_entropy(leaf, target, reduction="none", block=16)
    got.backward(torch.ones_like(got))
    assert torch.isnan(got[:2]).all() and torch.isfinite(got[2:]).all()
    # ignored rows with NaN / all -inf logits: NaN gradient rows, as torch's log_softmax
    # backward makes them (0 - exp(NaN) x 0); the counted finite row is finite
    ref = z.double().cpu().requires_grad_()
    F.cross_entropy(ref, target.cpu(), reduction="none").sum().backward()
    assert torch.equal(leaf.grad.isnan().cpu(), ref.grad.isnan())
    assert leaf.grad[:4].isnan().all() and torch.isfinite(leaf.grad[4]).all()
    mean = triton_cross_entropy(z[2:], target[2:], block=16)  # ignored NaN row: finite
    close(mean, F.cross_entropy(z[2:].double().cpu(), target[2:].cpu()), 1e-5)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("options", [
    {}, {"softcap": 2.0}, {"eps": 0.1, "weight": True}, {"z_loss": 1e-2},
    {"softcap": 5.0, "eps": 0.2, "z_loss": 1e-3, "weight": True},
])
@pytest.mark.parametrize("inplace", [False, True])
def test_ignored_rows_gradient_nan_pattern_is_torchs(dtype, options, inplace):
    """An ignored row's gradient is torch's: 0 where its logits are finite, NaN throughout
    where its max is not finite (a NaN, a +inf anywhere, every entry -inf; under softcap
    only a NaN, ``c tanh(z / c)`` being finite at +-inf), in every tile of a ragged row."""
    inf, nan = math.inf, math.nan
    z, target, w = make(9, dtype=dtype, seed=37)
    z[0, 140] = nan  # in the ragged last tile
    z[1, 3] = inf
    z[2] = -inf
    z[3, :64] = -inf  # one whole tile of -inf, the others finite
    z[4, 70] = -inf
    z[5, 10], z[5, 100] = inf, -inf
    z[6, 149] = inf
    target[:7] = -100  # rows 7 and 8 count
    weight = w.to(dtype) if options.get("weight") else None
    kw = {k: v for k, v in options.items() if k != "weight"}
    ref_leaf, want = reference(z.cpu(), target.cpu(), None if weight is None else weight.cpu(),
                               reduction="sum", **kw)
    want.backward()
    leaf = z.clone().requires_grad_()
    src = leaf * 1 if inplace else leaf
    got = triton_cross_entropy(src, target, weight, reduction="sum",
                               label_smoothing=kw.get("eps", 0.0),
                               z_loss=kw.get("z_loss", 0.0), softcap=kw.get("softcap"),
                               inplace_backward=inplace, block=BLOCK)
    got.backward()
    assert torch.equal(leaf.grad.isnan().cpu(), ref_leaf.grad.isnan())
    nan_rows = [0] if "softcap" in kw else [0, 1, 2, 5, 6]
    assert leaf.grad.isnan().all(1).nonzero().flatten().tolist() == nan_rows
    assert float(leaf.grad[3:5].abs().max()) == 0.0
    finite = ~ref_leaf.grad.isnan()
    close(leaf.grad.cpu().double()[finite], ref_leaf.grad[finite], TOL[dtype])
    close(got.cpu().double(), want.detach(), TOL[dtype])


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_probability_targets_at_masked_classes():
    z, t, w = make(3, v=30, prob=True, seed=32)
    z[:, :4] = NEG_INF
    t[:, :4] = 0.0
    t = t / t.sum(1, keepdim=True)
    zd, td = z.double().cpu(), t.double().cpu()
    logp = torch.log_softmax(zd, 1)
    w_zero = w.clone().index_fill_(0, torch.tensor([5], device=DEVICE), 0.0)
    for weight in (None, w_zero):
        rows = triton_cross_entropy(z, t, weight, reduction="none", block=16)
        big_t = td if weight is None else td * weight.double().cpu()
        want = -torch.where(big_t == 0, 0.0, big_t * logp).sum(1)  # 0 * -inf := 0
        close(rows, want, 1e-5)  # torch: NaN here (pitfall 4); crossent: exactly 0
    leaf = z.clone().requires_grad_()
    triton_cross_entropy(leaf, t, reduction="sum", block=16).backward()
    zz = zd.clone().requires_grad_()
    (-(td * torch.where(torch.isinf(zz), 0.0, torch.log_softmax(zz, 1)))).sum().backward()
    close(leaf.grad, zz.grad, 1e-5)
    assert float(leaf.grad[:, :4].abs().max()) == 0.0
    t2 = t.clone()
    t2[0, 1] = 0.25  # probability on a masked class: +inf, as torch
    rows = triton_cross_entropy(z, t2, reduction="none", block=16)
    assert torch.isposinf(rows[0]) and torch.isfinite(rows[1:]).all()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy: overflow, inf * 0
def test_huge_logits():
    """1e4 and 3e38 (near float32's max): losses as torch in float64, where the loss is
    small next to the logits (two tied maxima: log 2, not 0) and where smoothing sums V
    terms near 3e38 (no overflow)."""
    z, target, _ = make(4, v=24, seed=33)
    z[0] *= 1e4
    z[1, 0] = z[1, 1] = 3e38
    target[1] = 1
    z[2, 5], z[2, 6], target[2] = 3e38, -3e38, 5
    against_torch(z, target, reduction="none", block=16)
    got = triton_cross_entropy(z, target, reduction="none", label_smoothing=0.1, block=16)
    want = F.cross_entropy(z.double().cpu(), target.cpu(), reduction="none",
                           label_smoothing=0.1)
    # row 1: 22 terms (0.1 / 24) (3e38 - z_c), no overflow (torch's float32 gives inf);
    # row 2: 3e38 - (-3e38) itself exceeds float32, inf as torch's float32
    close(got[[0, 1, 3]], want[[0, 1, 3]], 1e-5)
    assert torch.isposinf(got[2])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_gradient_of_a_confident_correct_prediction(dtype):
    """p_y = 1 - 6e-7: rounding p to bf16 before subtracting 1 would give 0 (pitfall 6);
    the -1 is applied in float32 and the result rounded once."""
    z = torch.zeros(3, 300, dtype=dtype, device=DEVICE)
    z[:, 5] = 20.0
    target = torch.full((3,), 5, device=DEVICE)
    leaf = z.clone().requires_grad_()
    triton_cross_entropy(leaf, target, reduction="sum", block=64).backward()
    zd = z.double().cpu().requires_grad_()
    F.cross_entropy(zd, target.cpu(), reduction="sum").backward()
    true_y = zd.grad[:, 5]  # -(1 - p_y) = -6.2e-7
    got_y = leaf.grad[:, 5].double().cpu()
    assert (got_y < 0).all()
    # float32 resolution near p_y = 1 (2^-24 per ulp; a few for exp and 1/s), one
    # rounding to dtype (the interpreter truncates bfloat16: a full ulp, 2^-7 relative)
    assert ((got_y - true_y).abs() <= 4 * 2.0**-24 + 2.0**-7 * true_y.abs()).all()
    others = leaf.grad[:, :5].double().cpu()
    close(others, zd.grad[:, :5].to(dtype), 2.0**-7)  # float16: 2e-9 underflows to 0


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy: overflow, inf * 0
def test_ignore_index_and_class_weights_edge_cases():
    z, target, w = make(6, v=20, seed=34)
    target[:] = torch.tensor([3, 3, 0, 7, 3, 1])
    # ignore_index a real class: still in every row's softmax denominator
    against_torch(z, target, ignore_index=3, block=16)
    against_torch(z, target, weight=w, ignore_index=3, label_smoothing=0.2, block=16)
    # class weights with zeros; every counted target weighted 0: 0/0 = NaN as torch,
    # with smoothing too (torch's unsmoothed part is 0/0)
    w0 = w.clone()
    w0[[0, 7]] = 0.0
    against_torch(z, target, weight=w0, block=16)
    against_torch(z, target, weight=w0, reduction="none", block=16)
    w_all = w.clone()
    w_all[[0, 1, 3, 7]] = 0.0
    for eps in (0.0, 0.3):
        got = triton_cross_entropy(z, target, w_all, label_smoothing=eps, block=16)
        assert torch.isnan(got)
        assert torch.isnan(F.cross_entropy(z.cpu(), target.cpu(), w_all.cpu(),
                                           label_smoothing=eps))
    # ignore_index with probability targets: torch raises for a non-negative one
    probs = torch.softmax(z, 1)
    with pytest.raises(InputError, match="ignore_index"):
        triton_cross_entropy(z, probs, ignore_index=0)
    close(triton_cross_entropy(z, probs, ignore_index=-1, block=16),
          F.cross_entropy(z.double().cpu(), probs.double().cpu()), 1e-5)
    for bad in (3.0, True, "3"):
        with pytest.raises(InputError, match="ignore_index"):
            triton_cross_entropy(z, target, ignore_index=bad)
    with pytest.raises(InputError, match="weight has dtype"):
        triton_cross_entropy(z, target, w.double())


def test_non_finite_grad_output_leaves_ignored_rows_at_zero():
    """torch's gradient of an ignored row is 0 whatever grad_output holds (NaN, inf);
    a scaling pass that multiplies it would make it NaN."""
    z, target, _ = make(3, v=20, seed=40)
    target[1] = -100
    x = z[:, :6].contiguous()  # a small linear head
    w = torch.randn(7, 6, generator=torch.Generator().manual_seed(41)).to(DEVICE)
    for go in (torch.tensor([1.0, NAN, 2.0], device=DEVICE),
               torch.tensor([0.5, math.inf, 1.0], device=DEVICE)):
        leaf = z.clone().requires_grad_()
        triton_cross_entropy(leaf, target, reduction="none", block=16).backward(go)
        assert float(leaf.grad[1].abs().max()) == 0.0 and torch.isfinite(leaf.grad).all()
        for skip in (True, False):
            xs = x.clone().requires_grad_()
            triton_linear_cross_entropy(xs, w, target.clamp(max=6), reduction="none",
                                        skip_ignored=skip, block=16).backward(go)
            assert float(xs.grad[1].abs().max()) == 0.0
    leaf = z.clone().requires_grad_()
    triton_cross_entropy(leaf, target, block=16).backward(torch.tensor(NAN, device=DEVICE))
    assert float(leaf.grad[1].abs().max()) == 0.0 and torch.isnan(leaf.grad[[0, 2]]).all()
    zd = z.double().requires_grad_()
    F.cross_entropy(zd, target).backward(torch.tensor(NAN, dtype=torch.float64,
                                                      device=DEVICE))
    assert float(zd.grad[1].abs().max()) == 0.0  # torch: the same


def test_narrow_integer_targets_compare_in_int64():
    """Any integer dtype holds class indices (the CPU kernel's rule; torch itself accepts
    int64 and uint8 only); -100 is never cast to the target's dtype (pitfall 14: as uint8
    it is 156, a real class of 200)."""
    z, target, _ = make(4, v=200, seed=35)
    target[:] = torch.tensor([156, 3, 199, 0])
    want = F.cross_entropy(z.double().cpu(), target.cpu())
    for dtype in (torch.uint8, torch.int16, torch.int32):
        close(triton_cross_entropy(z, target.to(dtype), block=64), want, 1e-5)
    small = torch.tensor([1, -100, 2, -100], dtype=torch.int8, device=DEVICE)
    close(triton_cross_entropy(z, small, block=64),
          F.cross_entropy(z.double().cpu(), small.long().cpu()), 1e-5)
    with pytest.raises(InputError, match="target"):
        triton_cross_entropy(z, target.bool())


def test_views_strides_and_layouts():
    z, target, w = make(6, v=20, seed=36)
    zt = z.t().contiguous().t()  # column-major logits
    against_torch(zt, target, block=16)
    against_torch(torch.cat([z, z], 1)[:, ::2], target, block=16)  # strided classes
    against_torch(z[::2], target[::2], block=16)  # strided rows
    against_torch(z[:1].expand(6, 20), target, block=16)  # a broadcast row
    against_torch(z, torch.stack([target, target], 1)[:, 0], weight=torch.stack([w, w], 1)[:, 1],
                  block=16)  # strided target and weight
    spatial = z.reshape(2, 3, 20).movedim(2, 1)  # (N, C, d) view, class axis strided
    against_torch(spatial, target.reshape(2, 3), reduction="none", block=16)
    probs = torch.softmax(torch.randn(2, 20, 3, dtype=torch.float64), 1).float().to(DEVICE)
    against_torch(spatial, probs, block=16)
    against_torch(z, torch.softmax(z[:1], 1).expand(6, 20), block=16)


def test_empty_batches_and_a_single_class():
    z = torch.randn(0, 7, device=DEVICE)
    t = torch.zeros(0, dtype=torch.long, device=DEVICE)
    for reduction in ("mean", "sum", "none"):
        against_torch(z, t, reduction=reduction, block=16)
    against_torch(z, torch.zeros(0, 7, device=DEVICE), block=16)
    against_torch(torch.randn(2, 7, 0, device=DEVICE), torch.zeros(2, 0, dtype=torch.long,
                                                                   device=DEVICE), block=16)
    one = torch.randn(4, 1, device=DEVICE)
    against_torch(one, torch.zeros(4, dtype=torch.long, device=DEVICE), block=16)
    against_torch(one, torch.zeros(4, dtype=torch.long, device=DEVICE), label_smoothing=0.5,
                  block=16)


def test_a_large_vocabulary_with_few_rows():
    g = torch.Generator().manual_seed(37)
    z = (torch.randn(2, 1 << 17, generator=g) * 4).to(DEVICE)
    target = torch.tensor([5, (1 << 17) - 1], device=DEVICE)
    against_torch(z, target, reduction="none", label_smoothing=0.1)  # default tiles


def test_backward_twice_double_backward_and_the_version_counter():
    z, target, w = make(2, v=3, dtype=torch.float64, seed=38)
    z = z.clone().requires_grad_()
    for kw in ({"reduction": "sum"},
               {"weight": w.double(), "label_smoothing": 0.1, "z_loss": 0.01, "softcap": 3.0}):
        assert torch.autograd.gradgradcheck(
            lambda logits, kw=kw: triton_cross_entropy(logits, target, block=16, **kw), (z,))
    # float32: backward twice raises (the gradient was consumed), create_graph works
    z32, t32, _ = make(3, v=20, seed=38)
    leaf = z32.clone().requires_grad_()
    (g,) = torch.autograd.grad(triton_cross_entropy(leaf, t32), leaf, create_graph=True)
    (hv,) = torch.autograd.grad(g.square().sum(), leaf)
    zd = z32.double().requires_grad_()
    (gd,) = torch.autograd.grad(F.cross_entropy(zd, t32), zd, create_graph=True)
    (hvd,) = torch.autograd.grad(gd.square().sum(), zd)
    close(hv, hvd, 1e-4)  # not 0 (pitfall 18)
    # a spatial (N, C, d) input and reduction "none": Hessian-vector product as torch's
    sp = z32[:2].reshape(2, 2, 10).clone().requires_grad_()
    ts = t32[:2].reshape(2, 1).expand(2, 10) % 2
    go = torch.rand(2, 10, dtype=torch.float64).to(DEVICE)
    (g,) = torch.autograd.grad(triton_cross_entropy(sp, ts, reduction="none"), sp,
                               go.float(), create_graph=True)
    (hv,) = torch.autograd.grad(g.square().sum(), sp)
    spd = sp.detach().double().requires_grad_()
    (gd,) = torch.autograd.grad(F.cross_entropy(spd, ts, reduction="none"), spd, go,
                                create_graph=True)
    close(g, gd, 1e-5)
    close(hv, torch.autograd.grad(gd.square().sum(), spd)[0], 1e-4)
    src = leaf * 1.0
    version = src._version
    loss = triton_cross_entropy(src, t32, inplace_backward=True, block=16)
    assert src._version > version  # the logits now hold the gradient, and autograd knows
    with pytest.raises(UnsupportedError, match="inplace_backward"):
        torch.autograd.grad(loss, leaf, create_graph=True)


def test_linear_head_adversarial():
    g = torch.Generator().manual_seed(39)
    x = torch.randn(7, 8, generator=g).to(DEVICE)
    w = (torch.randn(200, 8, generator=g) / 3).to(DEVICE)
    b = (torch.randn(200, generator=g) * 0.1).to(DEVICE)
    y = torch.tensor([156, -100, 3, 199, -100, 0, 7], device=DEVICE)
    want = F.cross_entropy(F.linear(x.double(), w.double(), b.double()).cpu(), y.cpu())
    for dtype in (torch.uint8, torch.int32):  # -100 stays -100 when compared (pitfall 14)
        yy = y.clone()
        yy[yy == -100] = 0 if dtype == torch.uint8 else -100
        ref = want if dtype != torch.uint8 else F.cross_entropy(
            F.linear(x.double(), w.double(), b.double()).cpu(), yy.cpu())
        close(triton_linear_cross_entropy(x, w, yy.to(dtype), b, chunk_size=3, block=64),
              ref, 1e-5)
        close(fused_linear_cross_entropy(x, w, yy.to(dtype), b), ref, 1e-5)
    # ignored rows are skipped: their input gradient is exactly 0, loss as torch
    xs = x.clone().requires_grad_()
    triton_linear_cross_entropy(xs, w, y, b, chunk_size=3, block=64).backward()
    assert float(xs.grad[[1, 4]].abs().max()) == 0.0 and xs.grad[[0, 2]].abs().min() > 0
    # F.linear raises for mixed dtypes; so does crossent, naming the argument
    with pytest.raises(InputError, match="linear_weight"):
        triton_linear_cross_entropy(x, w.double(), y)
    with pytest.raises(InputError, match="linear_bias"):
        triton_linear_cross_entropy(x, w, y, b.bfloat16())
    with pytest.raises(InputError, match="linear_weight"):
        fused_linear_cross_entropy(x, w.bfloat16(), y)
    with pytest.raises(InputError, match="weight has dtype"):
        triton_linear_cross_entropy(x, w, y, weight=torch.ones(200, dtype=torch.float64,
                                                               device=DEVICE))
    with pytest.raises(InputError, match="ignore_index"):
        triton_linear_cross_entropy(x, w, torch.softmax(x @ w.T, 1), ignore_index=0)
    for bad in (0, 2.5, True):
        with pytest.raises(InputError, match="chunk_size"):
            triton_linear_cross_entropy(x, w, y, chunk_size=bad)
    # double backward (the composite formulas), and the fused head refuses it
    xd = x[:3, :2].double().requires_grad_()  # small: gradgradcheck runs it ~40 times
    wd = w[:4, :2].double().requires_grad_()
    yd = torch.tensor([1, -100, 3], device=DEVICE)
    assert torch.autograd.gradgradcheck(
        lambda a, c: triton_linear_cross_entropy(a, c, yd, chunk_size=2, reduction="none",
                                                 block=16), (xd, wd))
    xf = x.clone().requires_grad_()
    loss = fused_linear_cross_entropy(xf, w, y.clamp(min=0))
    with pytest.raises(UnsupportedError, match="double backward"):
        torch.autograd.grad(loss, xf, create_graph=True)


@pytest.mark.xfail(strict=True, reason=(
    "documented (docs/guarantees.md): the Triton linear head's backward makes no host "
    "synchronisation, so an infinite scalar grad_output scales its stored gradients to "
    "+-inf where torch gives NaN (the row-block heads recompute and match)"))
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_linear_head_infinite_grad_output_gives_torchs_nan(reduction):
    """As the unfused ``F.cross_entropy(F.linear(x, W, b), y)``: NaN where ``inf - inf``
    meets in ``dlogits`` (the targets) and what sums them, ``+-inf`` elsewhere."""
    g = torch.Generator().manual_seed(8)
    x, w, b = (torch.randn(*shape, generator=g) for shape in ((5, 4), (6, 4), (6,)))
    y = torch.tensor([0, 3, -100, 5, 3])
    for value in (math.inf, -math.inf):
        ours = [t.clone().to(DEVICE).requires_grad_() for t in (x, w, b)]
        ref = [t.clone().double().requires_grad_() for t in (x, w, b)]
        loss = triton_linear_cross_entropy(ours[0], ours[1], y.to(DEVICE), ours[2],
                                           reduction=reduction, chunk_size=2, block=32)
        loss.backward(torch.tensor(value, device=DEVICE))
        F.cross_entropy(F.linear(*ref), y, reduction=reduction).backward(
            torch.tensor(value, dtype=torch.float64))
        for a, r in zip(ours, ref, strict=True):
            a = a.grad.cpu().double()
            assert torch.equal(a.isnan(), r.grad.isnan())
            assert torch.equal(a.nan_to_num(0.0, 1.0, -1.0).sign(),
                               r.grad.nan_to_num(0.0, 1.0, -1.0).sign())
