"""CPU cross-entropies of few classes (token tagging, segmentation) above
``NATIVE_MAX_LOGITS``: ``backend="auto"`` sends them to the small-batch kernel or torch's
own kernel, where the row-block kernel's per-row reductions over short rows, and the
transposing copies of ``(N, C, d1, ...)`` logits, cost more than eager (thresholds and
measurements in ``crossent.torch._backends``; ``benchmarks/few_classes.py``). Each route
is checked by what it runs and by torch's numbers in float64 (values and gradients)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import crossent.torch as xt
from crossent.torch import _backends, _cross_entropy, _small

pytestmark = pytest.mark.native_dispatch  # the dispatch as shipped

ABOVE = _backends.NATIVE_MAX_LOGITS + 1


def _data(shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)
    y = torch.randint(0, shape[1], (shape[0], *shape[2:]), generator=g)
    y.view(-1)[::7] = -100
    return z, y


def _rows(classes, spatial=False):
    """A shape just above NATIVE_MAX_LOGITS with ``classes`` classes."""
    if spatial:
        side = int((ABOVE / (2 * classes)) ** 0.5) + 1
        return (2, classes, side, side)
    return (ABOVE // classes + 1, classes)


CASES = [
    # (what, shape, dtype, options, route)
    ("2 classes", _rows(2), torch.float32, {}, "native"),  # under SMALL_MIN_CLASSES
    ("4 classes", _rows(4), torch.float32, {}, "small"),
    ("21 classes", _rows(21), torch.float32, {}, "small"),
    ("1000 classes under 2^23 logits", _rows(1000), torch.float32, {}, "small"),
    ("float64", _rows(9), torch.float64, {"reduction": "sum"}, "small"),
    ("class weights, 21 classes", _rows(21), torch.float32, {"weight": True}, "native"),
    ("label smoothing, 9 classes", _rows(9), torch.float32, {"label_smoothing": 0.1},
     "native"),
    ("bfloat16, 21 classes", _rows(21), torch.bfloat16, {}, "small"),
    ("bfloat16, 150 classes", _rows(150), torch.bfloat16, {}, "small"),
    ("float16, 21 classes", _rows(21), torch.float16, {}, "native"),
    ("float16, 150 classes", _rows(150), torch.float16, {}, "rowblock"),
    ("class weights, 100 classes", _rows(100), torch.float32, {"weight": True}, "rowblock"),
    ("z_loss, 21 classes", _rows(21), torch.float32, {"z_loss": 1e-3}, "rowblock"),
    ("probability targets, 21 classes", _rows(21), torch.float32, {"prob": True}, "native"),
    ("probability targets, 64 classes", _rows(64), torch.float32, {"prob": True}, "native"),
    ("probability targets, 128 classes", _rows(128), torch.float32, {"prob": True},
     "rowblock"),
    ("probability targets, spatial", _rows(21, True), torch.float32, {"prob": True},
     "native"),
    ("small probability targets", (16, 10), torch.float32, {"prob": True}, "native"),
    ("(N, C, H, W), 21 classes", _rows(21, True), torch.float32, {}, "native"),
    ("(N, C, H, W), 300 classes", _rows(300, True), torch.float32, {}, "rowblock"),
]


def _call(fn, z, y, opts, **extra):
    kw = {k: v for k, v in opts.items() if k not in ("weight", "prob")}
    if opts.get("weight"):
        kw["weight"] = torch.linspace(0.5, 1.5, z.shape[1], dtype=z.dtype)
    if opts.get("prob"):  # the same probabilities for both (a seeded draw)
        g = torch.Generator().manual_seed(1)
        y = torch.softmax(torch.randn(z.shape, generator=g, dtype=torch.float64), 1)
        y = y.to(z.dtype)
    return fn(z, y, **kw, **extra)


@pytest.mark.parametrize(("what", "shape", "dtype", "opts", "route"), CASES,
                         ids=[c[0] for c in CASES])
def test_auto_takes_the_faster_route_with_torchs_numbers(routes, what, shape, dtype, opts,
                                                         route):
    z, y = _data(shape, dtype)
    a = z.clone().requires_grad_()
    loss = _call(xt.cross_entropy, a, y, opts)
    assert routes == [route]
    loss.backward()
    # torch in float64 on the same numbers (z_loss: its formula added)
    r = z.double().requires_grad_()
    plain = {k: v for k, v in opts.items() if k != "z_loss"}
    want = _call(F.cross_entropy, r, y, plain)
    if "z_loss" in opts:
        lse = torch.logsumexp(r, 1)
        want = want + opts["z_loss"] * (lse[y != -100] ** 2).mean()
    want.backward()
    tol = {"rtol": 1e-12, "atol": 1e-15} if dtype == torch.float64 else (
        {"rtol": 2e-2, "atol": 1e-4} if dtype == torch.bfloat16 else
        {"rtol": 2e-3, "atol": 1e-5} if dtype == torch.float16 else {"rtol": 1e-5,
                                                                       "atol": 1e-8})
    torch.testing.assert_close(loss.double(), want, **tol)
    torch.testing.assert_close(a.grad.double(), r.grad, **tol)


def test_spatial_logits_on_torchs_kernel_are_not_copied(monkeypatch):
    copies = []
    real = _cross_entropy.logit_rows
    monkeypatch.setattr(_cross_entropy, "logit_rows",
                        lambda *a: copies.append(1) or real(*a))
    z, y = _data(_rows(21, True))
    a = z.clone().requires_grad_()
    got = xt.cross_entropy(a, y)
    assert not copies
    assert torch.equal(got, F.cross_entropy(z, y))  # torch's own kernel: its bits


def test_statistics_on_the_native_route_come_from_the_rows():
    z, y = _data(_rows(21, True))
    loss, stats = xt.cross_entropy(z, y, statistics="lse")
    assert torch.equal(loss, F.cross_entropy(z, y))
    torch.testing.assert_close(stats.lse, torch.logsumexp(z, 1).masked_fill(y == -100,
                                                                            float("nan")),
                               equal_nan=True)


def test_the_small_kernel_serves_many_rows_of_few_classes(monkeypatch):
    calls = []
    real = _small.cross_entropy
    monkeypatch.setattr(_small, "cross_entropy", lambda *a: calls.append(a[0].shape) or real(*a))
    z, y = _data((_backends.SMALL_MAX_LOGITS // 8 + 1, 8))  # past 2^23 logits, 8 classes
    a = z.clone().requires_grad_()
    xt.cross_entropy(a, y, reduction="sum").backward()
    assert calls == [z.shape]
    r = z.double().requires_grad_()
    F.cross_entropy(r, y, reduction="sum").backward()
    torch.testing.assert_close(a.grad.double(), r.grad, rtol=1e-5, atol=1e-7)


def test_forced_backends_are_kept(routes):
    z, y = _data(_rows(21))
    xt.cross_entropy(z, y, backend="rowblock")
    xt.cross_entropy(z, y, backend="native")
    assert routes == ["rowblock", "native"]


@pytest.mark.parametrize("shape", [(16, 10), _rows(21), _rows(21, True)],
                         ids=["small", "21 classes", "spatial"])
def test_probability_targets_with_a_minus_inf_logit_keep_the_fused_kernel(routes, shape):
    # torch: 0 * log(0) = NaN for a zero target on a -inf logit; crossent's documented 0
    z, _ = _data(shape)
    g = torch.Generator().manual_seed(2)
    t = torch.softmax(torch.randn(z.shape, generator=g), 1)
    first = (0, 0) + (0,) * (z.dim() - 2)
    z[first] = -float("inf")
    t[first] = 0.0
    t = t / t.sum(1, keepdim=True)
    assert torch.isnan(F.cross_entropy(z, t))
    a = z.clone().requires_grad_()
    loss = xt.cross_entropy(a, t)
    assert routes == ["rowblock"] and torch.isfinite(loss)
    loss.backward()
    keep = torch.ones_like(z, dtype=torch.bool)
    keep[first] = False
    r = z.double().masked_fill(~keep, -1e300).requires_grad_()  # the limit, in float64
    want = F.cross_entropy(r, t.double())
    want.backward()
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(a.grad.double(), r.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("where", ["same row", "other row", "nan only"])
def test_a_nan_logit_does_not_hide_a_minus_inf_from_the_route(routes, dtype, where):
    # the -inf check reads the logits' minimum; a NaN minimum must not read as "no -inf"
    # (torch's kernel would then give NaN for the -inf logit's zero target in other rows)
    z, _ = _data((16, 10), dtype=dtype)
    g = torch.Generator().manual_seed(3)
    t = torch.softmax(torch.randn(z.shape, generator=g, dtype=torch.float64), 1).to(dtype)
    if where != "nan only":
        z[0, 0], t[0, 0] = -float("inf"), 0.0
    z[0 if where == "same row" else 5, 3] = float("nan")
    loss = xt.cross_entropy(z, t, reduction="none")
    assert routes == ["native" if where == "nan only" else "rowblock"]
    want = F.cross_entropy(z.double(), t.double(), reduction="none")
    finite = want.isfinite()
    if where == "other row":  # torch: 0 * log(0) = NaN there; crossent's documented limit
        assert torch.isnan(want[0]) and torch.isfinite(loss[0])
        finite[0] = False
        r = z.double().clone()
        r[0, 0] = -1e300
        torch.testing.assert_close(loss[0].double(),
                                   F.cross_entropy(r[:1], t[:1].double(), reduction="none")[0],
                                   rtol=2e-2, atol=2e-3)
    assert torch.isnan(loss[~want.isfinite() & ~(torch.arange(16) == 0)]).all()
    assert torch.isnan(loss[5 if where != "same row" else 0])
    torch.testing.assert_close(loss[finite].double(), want[finite], rtol=2e-2, atol=2e-3)
