"""A NaN ``grad_output`` (a diverged run, an upstream NaN scale) gives torch's gradients:
NaN on every counted row, exactly 0 on ignored rows (torch forms their gradient from
nothing), and for the linear head 0 in dW and db when no row is counted. The stored
gradient used to be multiplied by NaN everywhere (``0 * NaN``). Reference: autograd
through ``torch.nn.functional``."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import crossent.torch as xt

TARGETS = {
    "some ignored": [0, -100, 2, -100, 4, 1],
    "none ignored": [0, 3, 2, 1, 4, 1],
    "all ignored": [-100] * 6,
}


def _grad_output(loss: torch.Tensor) -> torch.Tensor:
    go = torch.full_like(loss, math.nan)
    if go.dim():  # "none": NaN on two rows only, one of them ignored in "some ignored"
        go = torch.ones_like(loss)
        go[1] = go[2] = math.nan
    return go


@pytest.mark.parametrize("targets", list(TARGETS))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cross_entropy_nan_grad_output_like_torch(reduction, targets, dtype):
    z = torch.randn(6, 5, dtype=dtype, generator=torch.Generator().manual_seed(0))
    y = torch.tensor(TARGETS[targets])
    ours, ref = z.clone().requires_grad_(), z.clone().requires_grad_()
    loss = xt.cross_entropy(ours, y, reduction=reduction, backend="rowblock")
    loss_ref = F.cross_entropy(ref, y, reduction=reduction)
    go = _grad_output(loss_ref)
    loss.backward(go)
    loss_ref.backward(go)
    torch.testing.assert_close(ours.grad, ref.grad, equal_nan=True)


@pytest.mark.parametrize("targets", list(TARGETS))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_linear_head_nan_grad_output_like_torch(reduction, targets):
    g = torch.Generator().manual_seed(1)
    x, w, b = torch.randn(6, 4, generator=g), torch.randn(5, 4, generator=g), torch.randn(5)
    y = torch.tensor(TARGETS[targets])
    ours = [t.clone().requires_grad_() for t in (x, w, b)]
    ref = [t.clone().requires_grad_() for t in (x, w, b)]
    loss = xt.linear_cross_entropy(*ours[:2], y, linear_bias=ours[2], reduction=reduction)
    loss_ref = F.cross_entropy(F.linear(*ref), y, reduction=reduction)
    go = _grad_output(loss_ref)
    loss.backward(go)
    loss_ref.backward(go)
    for a, r in zip(ours, ref, strict=True):
        torch.testing.assert_close(a.grad, r.grad, equal_nan=True)


@pytest.mark.native_dispatch
@pytest.mark.parametrize("backend", ["rowblock", "small"])
@pytest.mark.parametrize(("dtype", "reduction"), [
    (torch.bfloat16, "mean"), (torch.bfloat16, "sum"), (torch.bfloat16, "none"),
    (torch.float32, "mean")])
def test_infinite_grad_output_where_the_stored_gradient_rounded_to_zero(
        backend, reduction, dtype, monkeypatch):
    """A logit far below its row's top: p_j (bfloat16: e^-95, under its subnormals; float32
    "mean": e^-101 / 1000) rounds to 0 in the stored gradient, where torch's float32
    p_j x inf is inf, not 0 x inf = NaN: CPU backward recomputes for an infinite
    grad_output (review H82)."""
    from crossent.torch import _backends

    monkeypatch.setattr(_backends, "SMALL_MIN_LOGITS", 1)
    rows = 1000 if dtype == torch.float32 else 6
    z = torch.randn(rows, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    z[:, 0] = 0.0
    z[:, 1] = -101.0 if dtype == torch.float32 else -95.0
    z[:, 2:] = z[:, 2:].clamp(-1, 0)
    z = z.to(dtype)
    y = torch.tensor([0, -100, 2, 3, 4, 0] * (rows // 6) + [0] * (rows % 6))
    ours, ref = z.clone().requires_grad_(), z.clone().requires_grad_()
    loss = xt.cross_entropy(ours, y, reduction=reduction,
                            backend="auto" if backend == "small" else backend)
    assert _reaches(loss.grad_fn, "_SmallCrossEntropy") == (backend == "small")
    want = F.cross_entropy(ref.float(), y, reduction=reduction)
    go = torch.full_like(want, math.inf)
    if reduction == "none":
        go[3] = -math.inf
    loss.backward(go.to(loss.dtype))
    want.backward(go)
    assert torch.isinf(ref.grad[2, 1])  # torch: the tiny p_j times inf
    torch.testing.assert_close(ours.grad.float(), ref.grad.float(), equal_nan=True)


def _reaches(node, name: str, depth: int = 4) -> bool:
    """Whether the graph above ``node`` holds a node of ``name`` within ``depth`` steps."""
    if node is None or depth < 0:
        return False
    if name in type(node).__name__:
        return True
    return any(_reaches(n, name, depth - 1) for n, _ in node.next_functions)
