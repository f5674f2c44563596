"""A ``num_items`` tensor changed in place between forward and backward on the Triton
routes (review H86-2): the reference ``F.cross_entropy(..., reduction="sum") / n`` raises
(``DivBackward`` saves ``n``); the Triton kernels read the count once, in forward, so the
entry points read it back in backward. An unchanged count gives torch's gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import crossent.torch as xt

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: interpreter
N, C, D = 8, 33, 4


def _run(loss_fn, change):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(N, D, generator=g).to(DEVICE).requires_grad_()
    w = torch.randn(C, D, generator=g).to(DEVICE).requires_grad_()
    t = torch.randint(0, C, (N,), generator=g).to(DEVICE)
    t[2] = -100
    n = torch.tensor(5.0, device=DEVICE)
    loss = loss_fn(x, w, t, n)
    if change:
        with torch.no_grad():
            n.mul_(2)
    try:
        loss.backward(torch.tensor(2.0, device=DEVICE))
    except RuntimeError as exc:
        assert "modified by an inplace operation" in str(exc)
        return "raise"
    return x.grad, w.grad


def _reference(x, w, t, n):
    return F.cross_entropy(F.linear(x, w), t, reduction="sum") / n


LOSSES = {
    "cross_entropy": lambda x, w, t, n: xt.cross_entropy(
        F.linear(x, w), t, reduction="sum", num_items=n, backend="triton"),
    "linear_cross_entropy": lambda x, w, t, n: xt.linear_cross_entropy(
        x, w, t, reduction="sum", num_items=n, backend="triton"),
}


@pytest.mark.parametrize("change", [True, False])
@pytest.mark.parametrize("name", list(LOSSES))
def test_triton_num_items_changed_in_place_as_torch(name, change):
    want, got = _run(_reference, change), _run(LOSSES[name], change)
    if isinstance(want, str):
        assert got == want == "raise"
        return
    assert not isinstance(got, str)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
