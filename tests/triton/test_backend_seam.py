"""``backend="triton"`` through the public functions: the Triton kernels run (a spy counts
the calls), give torch's numbers (float64 references), and every feature they lack
raises ``UnsupportedError`` naming it before any kernel runs. On CPU: triton's
interpreter (see conftest.py), so a handful of rows and 150 classes per case."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

import torch.nn.functional as F  # noqa: E402

import crossent.torch as xt  # noqa: E402
from crossent.errors import UnsupportedError  # noqa: E402
from crossent.torch import _triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: interpreter
N, V, D = 6, 150, 8


def close(got, want, rtol=2e-5):
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    scale = float(want.abs().max()) if want.numel() else 1.0
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * scale + 1e-30)


@pytest.fixture
def calls(monkeypatch):
    """How often each Triton entry point ran."""
    count = {"cross_entropy": 0, "linear": 0}

    def spy(name, fn):
        def wrapped(*args, **kwargs):
            count[name] += 1
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(_triton, "triton_cross_entropy",
                        spy("cross_entropy", _triton.triton_cross_entropy))
    monkeypatch.setattr(_triton, "triton_linear_cross_entropy",
                        spy("linear", _triton.triton_linear_cross_entropy))
    return count


def data(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(N, V, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, V, (N,), generator=g)
    y[1] = -100
    t = torch.softmax(torch.randn(N, V, generator=g, dtype=torch.float64), 1)
    cw = torch.rand(V, generator=g, dtype=torch.float64) + 0.5
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    w = torch.randn(V, D, generator=g, dtype=torch.float64)
    b = torch.randn(V, generator=g, dtype=torch.float64)
    return [v.to(DEVICE) for v in (z, y, t, cw, x, w, b)]


def torch_loss(z, target, *, weight=None, reduction="mean", label_smoothing=0.0,
               z_loss=0.0, softcap=None, num_items=None):
    """torch's cross_entropy with crossent's z-loss (per counted row, sharing "mean"'s
    denominator) and softcap written out; ``num_items`` divides the sum."""
    zc = z if softcap is None else softcap * torch.tanh(z / softcap)
    rows = F.cross_entropy(zc, target, weight, reduction="none",
                           label_smoothing=label_smoothing)
    if target.is_floating_point():
        counted = torch.ones_like(rows)
        denominator = float(z.shape[0])
    else:
        counted = (target != -100).to(rows.dtype)
        safe = torch.where(target != -100, target, 0)
        denominator = (counted if weight is None else weight[safe] * counted).sum()
    if z_loss:
        rows = rows + z_loss * torch.logsumexp(zc, 1).square() * counted
    if reduction == "none":
        return rows
    if num_items is not None:
        return rows.sum() / num_items
    return rows.sum() if reduction == "sum" else rows.sum() / denominator


CASES = [
    dict(weight=True, label_smoothing=0.1),
    dict(prob=True, z_loss=1e-3, reduction="sum"),
    dict(softcap=4.0, reduction="none"),
    dict(weight=True, num_items=9),
]


@pytest.mark.parametrize("case", CASES)
def test_cross_entropy_on_triton_is_torchs(calls, case):
    z, y, t, cw, *_ = data()
    kw = dict(case)
    target = t if kw.pop("prob", False) else y
    if kw.pop("weight", False):
        kw["weight"] = cw
    ref = z.clone().requires_grad_()
    want = torch_loss(ref, target, **kw)
    go = torch.linspace(0.5, 1.5, want.numel(), dtype=torch.float64, device=DEVICE)
    (want.reshape(-1) * go).sum().backward()
    leaf = z.float().requires_grad_()
    kw32 = {k: (v.float() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    got = xt.cross_entropy(leaf, target.float() if target.is_floating_point() else target,
                           backend="triton", **kw32)
    (got.reshape(-1) * go.float()).sum().backward()
    assert calls["cross_entropy"] == 1 and got.dtype == torch.float32
    close(got, want)
    close(leaf.grad, ref.grad)


def test_bfloat16_logits_on_triton(calls):
    z, y, *_ = data(1)
    zb = z.to(torch.bfloat16)
    ref = zb.double().requires_grad_()
    F.cross_entropy(ref, y).backward()
    leaf = zb.clone().requires_grad_()
    got = xt.cross_entropy(leaf, y, backend="triton")
    got.backward()
    assert calls["cross_entropy"] == 1 and got.dtype == leaf.grad.dtype == torch.bfloat16
    close(got, F.cross_entropy(zb.double(), y), rtol=1e-2)
    close(leaf.grad, ref.grad, rtol=1e-2)


@pytest.mark.parametrize("kw", [dict(label_smoothing=0.2, num_items=7, chunk_size=4),
                                dict(reduction="none", z_loss=1e-3)])
def test_linear_head_on_triton_is_torchs(calls, kw):
    _, y, _, _, x, w, b = data(2)
    refs = [v.clone().requires_grad_() for v in (x, w, b)]
    ref_kw = {k: v for k, v in kw.items() if k != "chunk_size"}
    want = torch_loss(F.linear(*refs), y, **ref_kw)
    go = torch.linspace(0.5, 1.5, want.numel(), dtype=torch.float64, device=DEVICE)
    (want.reshape(-1) * go).sum().backward()
    leaves = [v.float().requires_grad_() for v in (x, w, b)]
    got = xt.linear_cross_entropy(leaves[0], leaves[1], y, leaves[2], backend="triton", **kw)
    (got.reshape(-1) * go.float()).sum().backward()
    assert calls["linear"] == 1
    close(got, want)
    for a, r in zip(leaves, refs, strict=True):
        close(a.grad, r.grad)


def test_shifted_linear_head_on_triton_is_torchs(calls):
    _, y, _, _, x, w, b = data(5)
    x3, y2 = x.reshape(2, N // 2, D), y.reshape(2, N // 2)
    refs = [v.clone().requires_grad_() for v in (x3, w, b)]
    want = F.cross_entropy(F.linear(refs[0][:, :-1], refs[1], refs[2]).reshape(-1, V),
                           y2[:, 1:].reshape(-1), label_smoothing=0.1)
    want.backward()
    leaves = [v.float().requires_grad_() for v in (x3, w, b)]
    got = xt.linear_cross_entropy(leaves[0], leaves[1], y2, leaves[2], label_smoothing=0.1,
                                  shift=True, backend="triton")
    got.backward()
    assert calls["linear"] == 1
    close(got, want)
    for a, r in zip(leaves, refs, strict=True):
        close(a.grad, r.grad)


def test_double_backward_is_torchs_or_refused(calls):
    z, y, *_ = data(3)
    v = torch.randn(N, V, dtype=torch.float64, device=DEVICE)

    def penalty(fn, z):
        (g,) = torch.autograd.grad(fn(z), z, create_graph=True)
        return (g * v.to(g.dtype)).sum()

    ref = z.clone().requires_grad_()
    penalty(lambda z: F.cross_entropy(z, y, label_smoothing=0.1), ref).backward()
    leaf = z.float().requires_grad_()
    try:
        penalty(lambda z: xt.cross_entropy(z, y, label_smoothing=0.1, backend="triton"),
                leaf).backward()
    except (UnsupportedError, RuntimeError) as err:  # refused loudly: acceptable
        assert "backward" in str(err) or "differentiable" in str(err)
        return
    assert calls["cross_entropy"] == 1
    close(leaf.grad, ref.grad, rtol=1e-4)


def test_auto_never_picks_triton_for_cpu_tensors(calls):
    if DEVICE != "cpu":
        pytest.skip("CPU tensors only")
    z, y, _, _, x, w, _ = data()
    xt.cross_entropy(z.float().requires_grad_(), y, z_loss=1e-3).backward()
    xt.linear_cross_entropy(x.float(), w.float().requires_grad_(), y, chunk_size=4).backward()
    assert calls == {"cross_entropy": 0, "linear": 0}


def test_what_triton_lacks_raises_naming_it_before_any_kernel(calls):
    z, y, t, cw, x, w, _ = data(4)
    z, t, cw, x, w = (v.float() for v in (z, t, cw, x, w))
    ce = xt.cross_entropy
    with pytest.raises(UnsupportedError, match=r"backend='triton'.*target"):
        ce(z.requires_grad_(), t.clone().requires_grad_(), backend="triton")
    with pytest.raises(UnsupportedError, match=r"backend='triton'.*weight"):
        ce(z, t, cw.clone().requires_grad_(), backend="triton")
    with pytest.raises(UnsupportedError, match=r"backend='triton'.*transforms"):
        torch.func.grad(lambda z: ce(z, y, backend="triton"))(z.detach())
    with pytest.raises(UnsupportedError, match=r"backend='triton'.*C = 0"):
        ce(torch.zeros(3, 0, device=DEVICE), torch.full((3,), -100, device=DEVICE),
           backend="triton")
    lce = xt.linear_cross_entropy
    with pytest.raises(UnsupportedError, match=r"backend='triton'.*weight"):
        lce(x, w.requires_grad_(), t, weight=cw.clone().requires_grad_(), backend="triton")
    with pytest.raises(UnsupportedError, match=r"backend='triton'.*target"):
        lce(x, w, t.clone().requires_grad_(), backend="triton")
    if hasattr(torch.nn, "LinearCrossEntropyOptions"):  # torch >= 2.13 (not 2.11)
        options = torch.nn.LinearCrossEntropyOptions(allow_retain_graph=True)
        with pytest.raises(UnsupportedError, match=r"backend='triton'.*retain"):
            lce(x, w, y, options=options, backend="triton")
    assert calls == {"cross_entropy": 0, "linear": 0}


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_float32_loss_from_bfloat16_logits_is_rounded_once(calls, reduction):
    """loss_dtype=float32 (and autocast's float32 loss) from bfloat16 logits: the Triton
    kernels return the float32 sum, not a bfloat16 loss widened afterwards."""
    z, y, *_ = data(5)
    zb = z.bfloat16()
    want = F.cross_entropy(zb.double(), y, reduction=reduction)  # the same rounded logits
    got = xt.cross_entropy(zb.clone().requires_grad_(), y, reduction=reduction,
                           backend="triton", loss_dtype=torch.float32)
    assert got.dtype == torch.float32
    close(got, want, rtol=1e-6)
    num = xt.cross_entropy(zb.clone().requires_grad_(), y, backend="triton",
                           loss_dtype=torch.float32, num_items=7)
    close(num, F.cross_entropy(zb.double(), y, reduction="sum") / 7, rtol=1e-6)
    x, w = data(6)[4:6]
    xb, wb = x.bfloat16(), w.bfloat16()
    lin = xt.linear_cross_entropy(xb, wb.clone().requires_grad_(), y, backend="triton",
                                  loss_dtype=torch.float32, reduction=reduction)
    assert lin.dtype == torch.float32
    ref = xt.linear_cross_entropy(xb, wb.clone().requires_grad_(), y, backend="rowblock",
                                  loss_dtype=torch.float32, reduction=reduction)
    close(lin, ref, rtol=1e-5)
    assert calls == {"cross_entropy": 2, "linear": 1}
