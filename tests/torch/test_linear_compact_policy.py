"""torch's ``LinearCrossEntropyOptions(acc_policy="compact")`` in crossent's chunked linear
head: on CUDA with bf16/fp16 operands dW is summed over the chunks in its own dtype (one
``addmm_`` per chunk, one rounding per chunk), as torch's chunked head and Liger Kernel
do, instead of in a ``V x D`` float32 buffer (2.1 GB at V = 128256, D = 4096); on CPU torch
falls back to float32 ("balanced"), and so does crossent.

This machine has no GPU, so the CUDA branch is exercised three ways: the policy table
(:func:`weight_grad_dtype` on stand-in tensors), the chunk loop itself with
``dw_dtype=torch.bfloat16`` on CPU tensors, and the whole public function with the table
forced to answer as on CUDA. References: torch in float64 (``F.linear`` +
``F.cross_entropy``)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import crossent.torch as xt
from crossent.torch import _chunked_head, _linear

N, D, V = 40, 24, 70
HAVE_OPTIONS = hasattr(torch.nn, "LinearCrossEntropyOptions")


def _stand_in(device: str, dtype: torch.dtype):
    return SimpleNamespace(device=torch.device(device) if device != "cuda"
                           else SimpleNamespace(type="cuda"), dtype=dtype)


@pytest.mark.parametrize("policy,device,dtype,want", [
    ("compact", "cuda", torch.bfloat16, torch.bfloat16),
    ("compact", "cuda", torch.float16, torch.float16),
    ("auto", "cuda", torch.bfloat16, torch.bfloat16),  # torch's auto pick on CUDA
    ("compact", "cuda", torch.float32, None),  # float32 operands: float32 anyway
    ("balanced", "cuda", torch.bfloat16, None),
    ("accurate", "cuda", torch.bfloat16, None),
    (None, "cuda", torch.bfloat16, None),  # no options: crossent's float32
    ("compact", "cpu", torch.bfloat16, None),  # torch falls back to "balanced" off CUDA
    ("auto", "cpu", torch.bfloat16, None),
])
def test_policy_table(policy, device, dtype, want):
    x, w = _stand_in(device, dtype), _stand_in(device, dtype)
    assert _chunked_head.weight_grad_dtype(policy, x, w) == want


def _data(seed: int, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g).to(dtype)
    w = (torch.randn(V, D, generator=g) / D**0.5).to(dtype)
    b = (torch.randn(V, generator=g) * 0.1).to(dtype)
    y = torch.randint(0, V, (N,), generator=g)
    y[::6] = -100
    return x, w, b, y


def _torch64(x, w, b, y, reduction="mean", go=None):
    ps = [t.double().requires_grad_() for t in (x, w, b)]
    loss = F.cross_entropy(F.linear(*ps), y, reduction=reduction)
    loss.backward(None if go is None else go.double())
    return loss.detach(), [p.grad for p in ps]


def _assert_bf16_close(got, want, chunks: int):
    # each chunk's product is rounded to bf16 once and added in bf16: at most about
    # chunks * 2^-8 of the largest entry
    scale = float(want.abs().max())
    err = float((got.double() - want).abs().max())
    assert err <= chunks * 2.0**-8 * scale + 1e-6, (err, scale)


def test_chunk_loop_sums_dw_in_bf16_and_leaves_the_rest_alone():
    from crossent.torch._linear import _RowBlockChunks
    from crossent.torch._rules import compute_dtype, make_options, prepare_rows

    x, w, b, y = _data(0)
    opts = make_options(None, V, x, -100, "sum", 0.0, 0.0, None)
    rows = prepare_rows(y, N, V, opts, compute_dtype(x.dtype))

    def run(dw_dtype):
        return _chunked_head.head_pass(x, w, b, _RowBlockChunks(y, rows, opts), 8,
                                       (True, True, True), dw_dtype=dw_dtype)

    compact, default = run(torch.bfloat16), run(None)
    assert compact.grads[1].dtype == torch.bfloat16 and default.grads[1].dtype == torch.float32
    # the losses, dx and db do not depend on how dW is summed
    torch.testing.assert_close(compact.losses, default.losses, rtol=0, atol=0)
    torch.testing.assert_close(compact.grads[0], default.grads[0], rtol=0, atol=0)
    torch.testing.assert_close(compact.grads[2], default.grads[2], rtol=0, atol=0)
    _, want = _torch64(x, w, b, y, "sum")
    _assert_bf16_close(compact.grads[1], want[1], chunks=N // 8)


@pytest.mark.skipif(not HAVE_OPTIONS, reason="torch.nn.LinearCrossEntropyOptions needed")
@pytest.mark.parametrize("policy", ["compact", "auto", "balanced", "accurate"])
def test_cpu_keeps_float32_whatever_the_policy(policy):
    """Off CUDA torch falls back to float32 accumulation: crossent's results are the
    same bits as without options."""
    x, w, b, y = _data(1)
    opts = torch.nn.LinearCrossEntropyOptions(acc_policy=policy, batch_chunk_size=8)
    got = [t.clone().requires_grad_() for t in (x, w, b)]
    ref = [t.clone().requires_grad_() for t in (x, w, b)]
    a = xt.linear_cross_entropy(got[0], got[1], y, got[2], options=opts, backend="rowblock")
    e = xt.linear_cross_entropy(ref[0], ref[1], y, ref[2], chunk_size=8, backend="rowblock")
    a.backward()
    e.backward()
    assert torch.equal(a, e)
    for p, q in zip(got, ref, strict=True):
        assert torch.equal(p.grad, q.grad)


@pytest.mark.skipif(not HAVE_OPTIONS, reason="torch.nn.LinearCrossEntropyOptions needed")
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_public_head_as_on_cuda_matches_torch(monkeypatch, reduction):
    """The table forced to answer as on CUDA: ``linear_cross_entropy`` with
    ``acc_policy="compact"`` returns a bf16 dW summed in bf16, torch's values within the
    per-chunk rounding, for every reduction (``"none"`` recomputes in backward with a
    ``grad_output`` per row) and a ``grad_output`` other than 1."""
    def as_on_cuda(policy, x, w):
        return w.dtype if policy == "compact" else None

    monkeypatch.setattr(_linear, "weight_grad_dtype", as_on_cuda)
    seen = []  # the dW dtype each chunk pass was given

    def spy(*args, **kwargs):
        seen.append(kwargs.get("dw_dtype"))
        return _chunked_head.head_pass(*args, **kwargs)

    monkeypatch.setattr(_linear, "head_pass", spy)
    x, w, b, y = _data(2)
    opts = torch.nn.LinearCrossEntropyOptions(acc_policy="compact", batch_chunk_size=8)
    ps = [t.clone().requires_grad_() for t in (x, w, b)]
    loss = xt.linear_cross_entropy(ps[0], ps[1], y, ps[2], reduction=reduction, options=opts,
                                   backend="rowblock")
    go = (torch.linspace(-1, 2, N) if reduction == "none" else torch.tensor(1.5)).to(loss.dtype)
    loss.backward(go)
    want_loss, want = _torch64(x, w, b, y, reduction, go)
    torch.testing.assert_close(loss.double(), want_loss, rtol=2e-2, atol=2e-2)
    # "none": forward computes no gradient, backward's pass sums dW
    assert seen == ([None, torch.bfloat16] if reduction == "none" else [torch.bfloat16])
    assert ps[1].grad.dtype == torch.bfloat16
    _assert_bf16_close(ps[1].grad, want[1], chunks=N // 8 + 1)
    torch.testing.assert_close(ps[0].grad.double(), want[0], rtol=3e-2, atol=3e-3)
    torch.testing.assert_close(ps[2].grad.double(), want[2], rtol=3e-2, atol=3e-3)
