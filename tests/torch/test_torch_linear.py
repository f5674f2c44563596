"""crossent.torch.linear_cross_entropy against the unfused F.cross_entropy(x @ W.T + b)."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from fused_testing import DEVICES, close

import crossent as xe
import crossent.torch as xt
from crossent.errors import InputError

N, D, C = 19, 6, 11


def make(device, prob=False, ignore=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    w = torch.randn(C, D, generator=g, dtype=torch.float64)
    b = torch.randn(C, generator=g, dtype=torch.float64)
    cw = torch.rand(C, generator=g, dtype=torch.float64) + 0.5
    if prob:
        y = torch.softmax(torch.randn(N, C, generator=g, dtype=torch.float64), 1)
    else:
        y = torch.randint(0, C, (N,), generator=g)
        if ignore:
            y[::4] = -100
    return [t.to(device) for t in (x, w, b, cw, y)]


def grads(fn, tensors, go):
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    out.backward(go.to(out.dtype))
    return out, [None if t is None else t.grad for t in leaves]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "reduction,bias,weighted,smoothing,target,chunk",
    list(itertools.product(["mean", "sum", "none"], [False, True], [False, True], [0.0, 0.2],
                           ["index", "ignore", "prob"], [None, 4])),
)
def test_matches_unfused(device, reduction, bias, weighted, smoothing, target, chunk):
    x, w, b, cw, y = make(device, prob=target == "prob", ignore=target == "ignore")
    b = b if bias else None
    cw = cw if weighted else None
    kw = dict(weight=cw, reduction=reduction, label_smoothing=smoothing)

    def ref(x, w, b):
        return F.cross_entropy(F.linear(x, w, b), y, **kw)

    gen = torch.Generator().manual_seed(3)
    go = (torch.rand(ref(x, w, b).shape, generator=gen, dtype=torch.float64) + 0.25).to(device)
    want, want_grads = grads(ref, (x, w, b), go)
    kw32 = dict(kw, weight=None if cw is None else cw.float())
    yy = y.float() if y.is_floating_point() else y

    def ours(x, w, b):
        return xt.linear_cross_entropy(x, w, yy, b, chunk_size=chunk, **kw32)

    got, got_grads = grads(ours, [t if t is None else t.float() for t in (x, w, b)], go)
    close(got, want)
    for g, r in zip(got_grads, want_grads, strict=True):
        assert (g is None) == (r is None)
        if g is not None:
            assert g.dtype == torch.float32
            close(g, r)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_z_loss_softcap_match_core(device, reduction):
    x, w, b, _, y = make(device, ignore=True)
    kw = dict(reduction=reduction, z_loss=1e-2, softcap=2.0, label_smoothing=0.1)

    def ref(x, w, b):
        return xe.softmax_cross_entropy(F.linear(x, w, b), y, **kw)

    go = torch.rand(N if reduction == "none" else (), dtype=torch.float64).to(device) + 0.5
    want, want_grads = grads(ref, (x, w, b), go)
    got, got_grads = grads(lambda x, w, b: xt.linear_cross_entropy(x, w, y, b, chunk_size=5,
                                                                    **kw),
                           (x.float(), w.float(), b.float()), go)
    close(got, want)
    for g, r in zip(got_grads, want_grads, strict=True):
        close(g, r)


@pytest.mark.parametrize("device", DEVICES)
def test_bfloat16_gradients_in_float32_then_rounded(device):
    x, w, b, _, y = make(device, ignore=True)
    x, w, b = (t.to(torch.bfloat16) for t in (x, w, b))

    def ref(x, w, b):  # the same bf16 values, computed in float64
        return F.cross_entropy(F.linear(x.double(), w.double(), b.double()), y)

    want, want_grads = grads(ref, (x, w, b), torch.ones(()))
    got, got_grads = grads(lambda x, w, b: xt.linear_cross_entropy(x, w, y, b, chunk_size=4),
                           (x, w, b), torch.ones(()))
    assert got.dtype == torch.bfloat16
    close(got, want, rtol=1e-2)
    for g, r in zip(got_grads, want_grads, strict=True):
        assert g.dtype == torch.bfloat16
        close(g, r, rtol=1e-2)


@pytest.mark.parametrize("device", DEVICES)
def test_bfloat16_weight_gradient_does_not_drift_over_many_chunks(device):
    # 512 one-row chunks: a dW summed in bfloat16 is several % off (up to 7% per entry
    # when tried); in float32 it stays
    # within the rounding of the inputs and of each chunk's partial product
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(512, D, generator=g) + 1.0).to(device, torch.bfloat16)
    w = torch.randn(C, D, generator=g).to(device, torch.bfloat16)
    y = torch.zeros(512, dtype=torch.long, device=device)  # every row pushes dW one way

    def ref(x, w):
        return F.cross_entropy(x.double() @ w.double().T, y, reduction="sum")

    _, (want,) = grads(lambda w: ref(x, w), (w,), torch.ones(()))
    _, (got,) = grads(lambda w: xt.linear_cross_entropy(x, w, y, reduction="sum",
                                                        chunk_size=1), (w,), torch.ones(()))
    close(got, want, rtol=1e-2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck_float64(device, reduction):
    x, w, b, _, y = make(device, ignore=True)
    x, w, b = x[:5].requires_grad_(), w.requires_grad_(), b.requires_grad_()

    def f(x, w, b):
        return xt.linear_cross_entropy(x, w, y[:5], b, chunk_size=2, label_smoothing=0.1,
                                       z_loss=1e-2, reduction=reduction)

    assert torch.autograd.gradcheck(f, (x, w, b))


def test_only_the_needed_gradients_and_no_grad():
    x, w, _, _, y = make("cpu")
    x, w = x.float(), w.float().requires_grad_()
    out = xt.linear_cross_entropy(x, w, y)
    out.backward()
    assert w.grad is not None and x.grad is None
    with torch.no_grad():
        again = xt.linear_cross_entropy(x, w, y)
    assert again.grad_fn is None
    close(again, F.cross_entropy(x @ w.detach().T, y))


def test_all_ignored_mean_is_nan():
    x, w, _, _, y = make("cpu")
    y = torch.full_like(y, -100)
    x, w = x.float(), w.float().requires_grad_()
    out = xt.linear_cross_entropy(x, w, y)
    assert torch.isnan(out) and torch.isnan(F.cross_entropy(x @ w.T, y))
    out.backward()
    assert torch.all(w.grad == 0)  # as torch: the gradient is 0, not NaN


@pytest.mark.skipif(not hasattr(F, "linear_cross_entropy"), reason="torch < 2.13")
def test_same_argument_order_as_torch():
    x, w, b, _, y = make("cpu")
    x, w, b = x.float(), w.float(), b.float()
    want = F.linear_cross_entropy(x, w, y, linear_bias=b, reduction="sum", label_smoothing=0.1)
    got = xt.linear_cross_entropy(x, w, y, linear_bias=b, reduction="sum", label_smoothing=0.1)
    close(got, want)


def test_bad_arguments_raise():
    x, w, b, _, y = make("cpu")
    with pytest.raises(ValueError, match="features"):
        xt.linear_cross_entropy(x, w[:, :-1], y)
    with pytest.raises(ValueError, match="linear_bias"):
        xt.linear_cross_entropy(x, w, y, b[:-1])
    with pytest.raises(ValueError, match="target"):
        xt.linear_cross_entropy(x, w, y[:-1])
    with pytest.raises(InputError, match="features"):  # (C, 2, 3): 3 features, not 6
        xt.linear_cross_entropy(x, w.reshape(C, 2, 3), y)
    with pytest.raises(ValueError, match=r"flatten \(B, T, D\)"):
        xt.linear_cross_entropy(x.reshape(1, *x.shape), w, y.reshape(1, -1))
    with pytest.raises(ValueError, match="chunk_size"):
        xt.linear_cross_entropy(x, w, y, chunk_size=0)
    with pytest.raises(InputError, match="dtype"):
        xt.linear_cross_entropy(x, w, y, b.float())
    with pytest.raises(InputError, match="ignore_index"):
        xt.linear_cross_entropy(x, w, torch.softmax(x @ w.T, 1), ignore_index=-100)


@pytest.mark.parametrize("kw", [dict(chunk_size=4), dict(z_loss=1e-3)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_no_rows_gives_zero_weight_gradient_after_earlier_calls(kw, reduction):
    # an empty micro-batch must add nothing, whatever buffer earlier steps left behind
    x, w, _, _, y = make("cpu")
    xt.linear_cross_entropy(x.float().requires_grad_(), w.float().requires_grad_(), y,
                            **kw).backward()
    w2 = w.float().requires_grad_()
    out = xt.linear_cross_entropy(torch.randn(0, D), w2, y[:0], reduction=reduction, **kw)
    out.sum().backward() if reduction == "none" else out.backward()
    assert torch.all(w2.grad == 0)


def test_bfloat16_head_with_no_features():
    x = torch.randn(4, 0).bfloat16()
    w = torch.randn(C, 0).bfloat16().requires_grad_()
    b = torch.randn(C).bfloat16().requires_grad_()
    y = torch.randint(0, C, (4,))
    out = xt.linear_cross_entropy(x, w, y, b, chunk_size=2)
    out.backward()
    want = F.cross_entropy(b.detach().double().expand(4, C), y)
    close(out, want, rtol=1e-2)
    assert w.grad.shape == (C, 0)
