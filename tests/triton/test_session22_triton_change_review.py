"""Adversarial review (helper H71) of the Triton side of two recent changes, in triton's CPU
interpreter (this folder's conftest sets ``TRITON_INTERPRET=1``):

- 6731b06: ``ce_row_source``'s ignored row is torch's gradient of a row it does not count
  (NaN throughout where the row's max is not finite: a NaN, a +inf, every logit -inf;
  softcapped, only a NaN), read once and written once;
- 7ccf2bd: the Triton chunked linear head skips ignored rows by the shared bound
  (``_chunked_head.split_rows``), so torch's NaN dx/dW/db of an ignored row whose logits
  are not finite is kept.

References are independent of crossent: torch's ``F.cross_entropy`` in float64 on the
logits rounded to the tested dtype (softcap as ``c tanh(z / c)``, z-loss as
``z_loss * logsumexp^2`` masked on ignored rows with ``where``), and ``F.linear`` +
``F.cross_entropy`` in the tested dtype for the linear head's NaN patterns. A bug is a
test written as it should pass, marked ``xfail(strict=True)``.
"""

from __future__ import annotations

import math
import random

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

import torch.nn.functional as F  # noqa: E402

import crossent.torch as xt  # noqa: E402

if torch.cuda.is_available():  # the review targets the CPU interpreter
    pytest.skip("CPU interpreter review", allow_module_level=True)

from crossent.torch._triton import ops  # noqa: E402

F64 = torch.float64
INF, NAN = math.inf, math.nan
TOL = {F64: 1e-10, torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 3e-2}
pytestmark = [pytest.mark.filterwarnings("ignore::RuntimeWarning"),
              pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.timeout(300)]


def same(got, want, tol):
    """Equal NaN and +-inf patterns, finite values within ``tol`` (relative to
    max(1, max |want|))."""
    got, want = got.detach().double(), want.detach().double()
    assert got.shape == want.shape
    assert torch.equal(got.isnan(), want.isnan()), (got, want)
    inf = torch.isinf(want)
    assert torch.equal(torch.isinf(got), inf) and torch.equal(got[inf], want[inf]), (got, want)
    fin = torch.isfinite(want)
    if fin.any():
        scale = max(1.0, float(want[fin].abs().max()))
        assert float((got[fin] - want[fin]).abs().max()) <= tol * scale, (got, want)


def ref_rows(z, y, weight, ignore_index, label_smoothing, z_loss, softcap):
    zc = z if softcap is None else softcap * torch.tanh(z / softcap)
    rows = F.cross_entropy(zc, y, weight=weight, ignore_index=ignore_index, reduction="none",
                           label_smoothing=label_smoothing)
    if z_loss:
        rows = rows + torch.where(y != ignore_index,
                                  z_loss * torch.logsumexp(zc, 1).square(), 0.0)
    return rows


def reduce_ref(rows, y, weight, ignore_index, reduction):
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    counted = y != ignore_index
    den = (counted.sum().to(rows.dtype) if weight is None
           else weight[torch.where(counted, y, 0)].masked_fill(~counted, 0).sum())
    return rows.sum() / den


# --------------------------------------------------------------------------------------------
# 6731b06: the ignored row's gradient in the kernel, random rows
# --------------------------------------------------------------------------------------------

ROW_KINDS = ["finite", "nan", "+inf", "all -inf", "-inf tile", "+inf and -inf", "1e38",
             "nan last", "-inf but one"]


def _row(kind, c, g):
    r = torch.randn(c, generator=g, dtype=F64) * 2
    if kind == "nan":
        r[c // 2] = NAN
    elif kind == "+inf":
        r[1] = INF
    elif kind == "all -inf":
        r[:] = -INF
    elif kind == "-inf tile":
        r[:16] = -INF
    elif kind == "+inf and -inf":
        r[0], r[-1] = INF, -INF
    elif kind == "1e38":
        r[3] = 3e38
    elif kind == "nan last":
        r[-1] = NAN
    elif kind == "-inf but one":
        r[:] = -INF
        r[c - 2] = 0.5
    return r


@pytest.mark.parametrize("seed", range(24))
def test_ignored_rows_random_kinds_options_and_layouts(seed):
    """Rows of every kind, ignored or counted, 37 or 50 classes in 16-wide tiles, random
    options (softcap, smoothing with finite/inf class weights, z-loss), reductions,
    dtypes, in place or not, reversed/persistent launches: torch's loss and gradient."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    c = rng.choice([37, 50])
    kinds = [rng.choice(ROW_KINDS) for _ in range(6)]
    z = torch.stack([_row(k, c, g) for k in kinds])
    ignore_index = rng.choice([-100, 0, 5])
    y = torch.tensor([ignore_index if rng.random() < 0.5 else rng.choice([1, 2, c - 1])
                      for _ in kinds])
    dtype = rng.choice([torch.float32, torch.bfloat16, torch.float16, F64])
    softcap = rng.choice([None, 4.0])
    eps = rng.choice([0.0, 0.2])
    zl = rng.choice([0.0, 1e-2])
    if "1e38" in kinds and dtype != F64:
        zl = 0.0  # z_loss lse^2 = 9e76 overflows float32 (the float64 reference's does not)
    weight = None
    if rng.random() < 0.5:
        weight = torch.rand(c, generator=g, dtype=F64) + 0.5
        if eps and rng.random() < 0.5:
            weight[7] = INF
    reduction = rng.choice(["none", "sum", "mean"])
    inplace = rng.random() < 0.5
    launch = rng.choice([{"block": 16}, {"block": 16, "reverse": True},
                         {"block": 16, "programs_per_sm": 0.5}])
    go = None
    if reduction == "none":
        go = torch.tensor([rng.choice([1.0, 0.0, NAN, -2.0]) for _ in kinds], dtype=F64)

    zd = z.to(dtype)
    leaf = zd.clone().requires_grad_()
    src = leaf * 1 if inplace else leaf
    w = None if weight is None else weight.to(dtype)
    with ops.override_ce_launch(**launch):
        out = xt.cross_entropy(src, y, w, backend="triton", inplace_backward=inplace,
                               ignore_index=ignore_index, reduction=reduction,
                               label_smoothing=eps, z_loss=zl, softcap=softcap)
    out.backward(torch.ones_like(out) if go is None else go.to(out.dtype))

    ref = zd.double().requires_grad_()
    wd = None if w is None else w.double()
    want = reduce_ref(ref_rows(ref, y, wd, ignore_index, eps, zl, softcap), y, wd,
                      ignore_index, reduction)
    want.backward(torch.ones_like(want) if go is None else go)
    same(out, want, TOL[dtype])
    same(leaf.grad, ref.grad, TOL[dtype] * 4)


# --------------------------------------------------------------------------------------------
# 7ccf2bd: the Triton linear head's skip of ignored rows against torch's unfused head
# --------------------------------------------------------------------------------------------


def _pair(x, w, b, y, **kw):
    out = []
    for which in ("torch", "crossent"):
        xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
        bb = None if b is None else b.clone().requires_grad_()
        if which == "torch":
            loss = F.cross_entropy(F.linear(xx, ww, bb), y, **kw)
        else:
            loss = xt.linear_cross_entropy(xx, ww, y, bb, backend="triton", chunk_size=2, **kw)
        loss.backward(torch.ones_like(loss))
        out.append([loss, xx.grad, ww.grad] + ([] if bb is None else [bb.grad]))
    return out


def _overflowing(dtype, big):
    x = torch.tensor([[big, big], [1.0, -1.0], [0.5, 0.25]], dtype=dtype)
    w = torch.tensor([[big, 1.0], [1.0, 1.0], [0.5, -0.5]], dtype=dtype)
    return x, w, torch.tensor([-100, 2, 0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_triton_head_ignored_row_with_overflowing_logits_keeps_torch_nan(dtype, reduction):
    x, w, y = _overflowing(dtype, 1e20)
    (want, *want_g), (got, *got_g) = _pair(x, w, None, y, reduction=reduction)
    assert bool(want_g[0][0].isnan().all())
    same(got, want, TOL[dtype])
    for a, b in zip(got_g, want_g, strict=True):
        same(a, b, TOL[dtype] * 4)


def test_triton_head_float16_ignored_row_overflow_keeps_torch_nan():
    x, w, y = _overflowing(torch.float16, 300.0)
    (_, *want_g), (_, *got_g) = _pair(x, w, None, y)
    assert bool(want_g[0][0].isnan().all())
    for a, b in zip(got_g, want_g, strict=True):
        same(a, b, TOL[torch.float16] * 4)


@pytest.mark.parametrize("bias_value", [INF, NAN])
def test_triton_head_ignored_row_with_non_finite_bias_is_torch(bias_value):
    """A non-finite bias makes every row's logits non-finite: torch's ignored rows are NaN
    in dx, and dW/db NaN; the bound (NaN/inf) refuses the skip."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 3, generator=g)
    w = torch.randn(5, 3, generator=g)
    b = torch.randn(5, generator=g)
    b[2] = bias_value
    y = torch.tensor([-100, 1, -100, 4])
    (want, *want_g), (got, *got_g) = _pair(x, w, b, y, reduction="sum")
    same(got, want, 1e-5)
    for a, c in zip(got_g, want_g, strict=True):
        same(a, c, 1e-4)


def test_triton_head_ignored_rows_with_finite_logits_are_still_skipped(monkeypatch):
    """The bound lets ordinary ignored rows be skipped (the optimisation is kept): the
    kernel sees only the counted rows, and the result is torch's."""
    from crossent.torch import _chunked_head

    seen = []
    real = _chunked_head.split_rows

    def spy(*args, **kwargs):
        split = real(*args, **kwargs)
        seen.append(split)
        return split

    monkeypatch.setattr("crossent.torch._triton.autograd.split_rows", spy)
    g = torch.Generator().manual_seed(4)
    x, w = torch.randn(6, 3, generator=g) * 1e3, torch.randn(5, 3, generator=g) * 1e3
    y = torch.tensor([-100, 1, -100, 4, 0, -100])
    (want, *want_g), (got, *got_g) = _pair(x, w, None, y)
    assert seen and seen[0] is not None and seen[0].dropped.tolist() == [0, 2, 5]
    same(got, want, 1e-5)
    for a, b in zip(got_g, want_g, strict=True):
        same(a, b, 1e-4)


# ---- review H72 on the Triton route: an input torch's backward reads, changed in place
# between forward and backward, raises as torch's does (was: the forward-time gradient)


@pytest.mark.parametrize("what", ["input", "linear_weight", "weight"])
def test_triton_head_refuses_an_input_changed_in_place_before_backward(what):
    g = torch.Generator().manual_seed(0)
    tensors = {"input": torch.randn(8, 6, generator=g).requires_grad_(),
               "linear_weight": torch.randn(5, 6, generator=g).requires_grad_(),
               "weight": torch.rand(5, generator=g) + 0.5}
    y = torch.randint(0, 5, (8,), generator=g)
    for lib in ("torch", "crossent"):
        ts = {k: v.detach().clone().requires_grad_(v.requires_grad) for k, v in tensors.items()}
        fn = (torch.nn.functional.linear_cross_entropy if lib == "torch" else
              lambda *a, **k: xt.linear_cross_entropy(*a, backend="triton", **k))
        loss = fn(ts["input"], ts["linear_weight"], y, weight=ts["weight"])
        with torch.no_grad():
            ts[what].mul_(2)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_triton_cross_entropy_refuses_a_class_weight_changed_before_backward(smoothing):
    w = torch.rand(5) + 0.5
    z = torch.randn(8, 5, requires_grad=True)
    loss = xt.cross_entropy(z * 1, torch.randint(0, 5, (8,)), w, backend="triton",
                            label_smoothing=smoothing)
    with torch.no_grad():
        w.copy_(torch.rand(5) + 0.5)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_triton_only_dx_needed_ignores_a_changed_input_as_torch():
    """dx = G W reads W, not x: torch's backward does not notice x changed; neither does
    crossent's (and the gradient is the forward's, as torch's)."""
    g = torch.Generator().manual_seed(1)
    x0, w0 = torch.randn(8, 6, generator=g), torch.randn(5, 6, generator=g)
    y = torch.randint(0, 5, (8,), generator=g)
    grads = []
    for fn in (lambda x, w, t: F.cross_entropy(F.linear(x, w), t),
               lambda *a: xt.linear_cross_entropy(*a, backend="triton")):
        x = x0.clone().requires_grad_()
        loss = fn(x, w0.clone(), y)
        with torch.no_grad():
            x.mul_(2)  # after the forward: dx needs W only
        grads.append(torch.autograd.grad(loss, x)[0])
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6)
