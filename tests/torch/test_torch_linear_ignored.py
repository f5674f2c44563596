"""The CPU linear head skips ignored rows (``target == ignore_index``): the chunk matmuls
and the kernel see only the counted rows, and the loss and every gradient (x, W, b) are
still torch's ``F.cross_entropy(F.linear(x, W, b), y)`` (plus crossent's z-loss and
softcap, written out here in plain torch) in float64 to 1e-12, with ``dx`` of the
ignored rows exactly 0."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from fused_testing import close

import crossent.torch as xt
from crossent.torch import _linear

N, C, D = 41, 13, 5


def data(seed=0, dtype=torch.float64, n=N):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g, dtype=torch.float64).to(dtype)
    w = torch.randn(C, D, generator=g, dtype=torch.float64).to(dtype)
    b = torch.randn(C, generator=g, dtype=torch.float64).to(dtype)
    y = torch.randint(0, C, (n,), generator=g)
    y[torch.rand(n, generator=g) < 0.5] = -100  # a prompt-masked batch: about half ignored
    y[:3] = -100  # a masked prompt at the start
    cw = (torch.rand(C, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    return x, w, b, y, cw


def torch_reference(x, w, y, b=None, *, weight=None, reduction="mean", label_smoothing=0.0,
                    z_loss=0.0, softcap=None, num_items=None):
    """The unfused head in plain torch (float64): crossent's z-loss ``z_loss lse^2`` per
    counted row and ``softcap`` ``c tanh(z / c)`` written out."""
    z = F.linear(x, w, b)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    per = F.cross_entropy(z, y, weight, reduction="none", label_smoothing=label_smoothing)
    valid = y != -100
    if z_loss:
        per = per + torch.where(valid, z_loss * torch.logsumexp(z, 1) ** 2, 0.0)
    if num_items is not None:
        return per.sum() / num_items
    if reduction == "none":
        return per
    if reduction == "sum":
        return per.sum()
    w_y = valid.double() if weight is None else torch.where(valid, weight[y.clamp(min=0)], 0.0)
    return per.sum() / w_y.sum()


OPTIONS = [
    dict(),
    dict(weight=True),
    dict(label_smoothing=0.15),
    dict(weight=True, label_smoothing=0.1, z_loss=1e-2),
    dict(z_loss=1e-2, softcap=3.0),
    dict(weight=True, label_smoothing=0.2, z_loss=1e-3, softcap=4.0),
]


def _run(fn, x, w, b, y, go, **kw):
    leaves = [None if v is None else v.clone().requires_grad_() for v in (x, w, b)]
    out = fn(leaves[0], leaves[1], y, leaves[2], **kw)
    (out * go).sum().backward() if out.dim() else (out * go).backward()
    return out, [None if v is None else v.grad for v in leaves]


@pytest.mark.parametrize("kw", OPTIONS)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("bias,chunk", [(True, 4), (False, 16), (True, None)])
def test_skipped_rows_give_torchs_loss_and_gradients(kw, reduction, bias, chunk):
    x, w, b, y, cw = data()
    kw = dict(kw, weight=cw) if kw.get("weight") else kw
    b = b if bias else None
    go = (torch.linspace(0.5, 1.5, N, dtype=torch.float64) if reduction == "none"
          else torch.tensor(0.7, dtype=torch.float64))
    want, want_grads = _run(torch_reference, x, w, b, y, go, reduction=reduction, **kw)
    got, grads = _run(xt.linear_cross_entropy, x, w, b, y, go, reduction=reduction,
                      chunk_size=chunk, backend="rowblock", **kw)
    close(got, want, rtol=1e-12)
    for g, r in zip(grads, want_grads, strict=True):
        if r is not None:
            close(g, r, rtol=1e-12)
    ignored = y == -100
    assert torch.all(grads[0][ignored] == 0)


@pytest.mark.parametrize("kw", [dict(), dict(weight=True, label_smoothing=0.1, z_loss=1e-2,
                                             softcap=5.0)])
def test_skipping_equals_the_unskipped_pass(kw, monkeypatch):
    x, w, b, y, cw = data(seed=1)
    kw = dict(kw, weight=cw) if kw.get("weight") else kw
    go = torch.tensor(1.0, dtype=torch.float64)
    got, grads = _run(xt.linear_cross_entropy, x, w, b, y, go, chunk_size=6, **kw)
    monkeypatch.setattr(_linear, "_counted_rows", lambda *args: None)
    full, full_grads = _run(xt.linear_cross_entropy, x, w, b, y, go, chunk_size=6, **kw)
    close(got, full, rtol=1e-12)
    for g, r in zip(grads, full_grads, strict=True):
        close(g, r, rtol=1e-12)


def _seen_rows(monkeypatch):
    seen: list[int] = []
    real = _linear.cross_entropy_rows

    def spy(z, *args, **kwargs):
        seen.append(z.shape[0])
        return real(z, *args, **kwargs)

    monkeypatch.setattr(_linear, "cross_entropy_rows", spy)
    return seen


def test_the_kernel_sees_only_counted_rows(monkeypatch):
    seen = _seen_rows(monkeypatch)
    x, w, b, y, _ = data()
    xt.linear_cross_entropy(x, w.requires_grad_(), y, b, chunk_size=4)
    assert sum(seen) == int((y != -100).sum()) < N
    seen.clear()  # probability targets are never ignored
    t = torch.softmax(torch.randn(N, C, dtype=torch.float64), 1)
    xt.linear_cross_entropy(x, w, t, b, chunk_size=4)
    assert sum(seen) == N
    seen.clear()  # reduction="none": the backward's recomputation skips them too
    out = xt.linear_cross_entropy(x, w, y, b, chunk_size=4, reduction="none")
    out.sum().backward()
    assert sum(seen) == 2 * int((y != -100).sum())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_ignored_dx_exactly_zero(dtype):
    x, w, b, y, _ = data(dtype=dtype)
    leaves = [v.clone().requires_grad_() for v in (x, w, b)]
    loss = xt.linear_cross_entropy(leaves[0], leaves[1], y, leaves[2], chunk_size=8)
    loss.backward()
    assert torch.all(leaves[0].grad[y == -100] == 0)
    want = F.cross_entropy(F.linear(x.double(), w.double(), b.double()), y)
    close(loss, want, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5)


def test_shift_and_num_items():
    x, w, b, y, cw = data()
    hidden, tokens = x[:40].reshape(4, 10, D), y[:40].reshape(4, 10)
    leaves = [v.clone().requires_grad_() for v in (hidden, w, b)]
    got = xt.linear_cross_entropy(leaves[0], leaves[1], tokens, leaves[2], shift=True,
                                  num_items=17, weight=cw, label_smoothing=0.1, chunk_size=5)
    got.backward()
    refs = [v.clone().requires_grad_() for v in (hidden, w, b)]
    want = torch_reference(refs[0][:, :-1].reshape(-1, D), refs[1],
                           tokens[:, 1:].reshape(-1), refs[2], weight=cw,
                           label_smoothing=0.1, num_items=17)
    want.backward()
    close(got, want, rtol=1e-12)
    for a, r in zip(leaves, refs, strict=True):
        close(a.grad, r.grad, rtol=1e-12)
    assert torch.all(leaves[0].grad[:, -1] == 0)  # the last positions are ignored


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_rows_ignored_and_empty(reduction):
    x, w, b, _, _ = data()
    y = torch.full((N,), -100)
    leaves = [v.clone().requires_grad_() for v in (x, w, b)]
    out = xt.linear_cross_entropy(leaves[0], leaves[1], y, leaves[2], chunk_size=4,
                                  reduction=reduction)
    want = F.cross_entropy(F.linear(x, w, b), y, reduction=reduction)
    torch.testing.assert_close(out, want, equal_nan=True)
    out.sum().backward()
    for v in leaves:
        assert torch.all(v.grad == 0)
    empty = [v.clone().requires_grad_() for v in (x[:0], w, b)]
    out = xt.linear_cross_entropy(empty[0], empty[1], y[:0], empty[2], chunk_size=4,
                                  reduction="sum")
    out.backward()
    assert out == 0 and torch.all(empty[1].grad == 0) and empty[0].grad.shape == (0, D)


def test_non_finite_features_of_ignored_rows_reach_dw_as_in_torch():
    """torch's dW = G^T x turns an ignored row's zero gradient times NaN into NaN; the
    head then does not skip, so it gives torch's numbers (NaN propagates)."""
    x, w, b, y, _ = data()
    x = x.clone()
    x[0] = torch.nan  # y[0] is ignored
    go = torch.tensor(1.0, dtype=torch.float64)
    want, want_grads = _run(torch_reference, x, w, b, y, go)
    got, grads = _run(xt.linear_cross_entropy, x, w, b, y, go, chunk_size=4)
    close(got, want, rtol=1e-12)
    for g, r in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12, equal_nan=True)
    assert grads[1].isnan().all()
