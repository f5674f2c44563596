"""The Triton linear head with dW summed over the chunks in bf16 (torch's
``acc_policy="compact"`` on CUDA, :func:`crossent.torch._chunked_head.weight_grad_dtype`):
torch's values in float64 within one bf16 rounding per chunk, dx, db and the loss the
same bits as with crossent's float32 sum. The row-block head's counterpart (and the
policy table) is ``tests/torch/test_linear_compact_policy.py``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import crossent.torch as xt
from crossent.torch import _linear
from crossent.torch._triton import triton_linear_cross_entropy

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: interpreter
N, D, V, CHUNK = 12, 16, 70, 4


def _data():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(N, D, generator=g).to(torch.bfloat16)
    w = (torch.randn(V, D, generator=g) / D**0.5).to(torch.bfloat16)
    b = (torch.randn(V, generator=g) * 0.1).to(torch.bfloat16)
    y = torch.randint(0, V, (N,), generator=g)
    y[3] = -100
    return [t.to(DEVICE) for t in (x, w, b, y)]


def _torch64(x, w, b, y, reduction, go):
    ps = [t.double().requires_grad_() for t in (x, w, b)]
    F.cross_entropy(F.linear(*ps), y, reduction=reduction).backward(go.double())
    return [p.grad for p in ps]


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_bf16_dw_sum_matches_torch_and_leaves_the_rest_alone(reduction):
    x, w, b, y = _data()
    go = (torch.linspace(-1, 2, N) if reduction == "none" else torch.tensor(1.5)).to(
        torch.bfloat16).to(DEVICE)
    grads = {}
    for dw_dtype in (torch.bfloat16, None):
        ps = [t.clone().requires_grad_() for t in (x, w, b)]
        triton_linear_cross_entropy(ps[0], ps[1], y, ps[2], reduction=reduction,
                                    chunk_size=CHUNK, dw_dtype=dw_dtype).backward(go)
        grads[dw_dtype] = [p.grad for p in ps]
    compact, default = grads[torch.bfloat16], grads[None]
    assert torch.equal(compact[0], default[0]) and torch.equal(compact[2], default[2])
    want = _torch64(x, w, b, y, reduction, go)[1]
    err = float((compact[1].double() - want).abs().max())
    assert err <= (N // CHUNK + 1) * 2.0**-8 * float(want.abs().max()) + 1e-6


def test_public_triton_head_passes_the_policy_on(monkeypatch):
    """``linear_cross_entropy(..., options=LinearCrossEntropyOptions(acc_policy=
    "compact"), backend="triton")`` with the policy table answering as on CUDA reaches
    the Triton head's chunk loop as a bf16 dW."""
    if not hasattr(torch.nn, "LinearCrossEntropyOptions"):
        pytest.skip("torch.nn.LinearCrossEntropyOptions needed")
    from crossent.torch._triton import autograd

    monkeypatch.setattr(_linear, "weight_grad_dtype",
                        lambda policy, x, w: w.dtype if policy == "compact" else None)
    seen = []
    real = autograd.head_pass

    def spy(*args, **kwargs):
        seen.append(kwargs.get("dw_dtype"))
        return real(*args, **kwargs)

    monkeypatch.setattr(autograd, "head_pass", spy)
    x, w, b, y = _data()
    ps = [t.clone().requires_grad_() for t in (x, w, b)]
    opts = torch.nn.LinearCrossEntropyOptions(acc_policy="compact", batch_chunk_size=CHUNK)
    xt.linear_cross_entropy(ps[0], ps[1], y, ps[2], options=opts, backend="triton").backward()
    assert seen == [torch.bfloat16]
    want = _torch64(x, w, b, y, "mean", torch.tensor(1.0, device=DEVICE))
    err = float((ps[1].grad.double() - want[1]).abs().max())
    assert err <= (N // CHUNK + 1) * 2.0**-8 * float(want[1].abs().max()) + 1e-6
