"""``shift=True`` on the linear head: the causal-LM label shift done inside, against torch's
``F.cross_entropy(F.linear(x[:, :-1], W, b), target[:, 1:])`` in float64 (values and every
gradient), without a copy of the hidden states."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from fused_testing import close

import crossent.torch as xt
from crossent.errors import InputError, UnsupportedError
from crossent.torch import _linear

B, T, D, C = 3, 7, 5, 13


def data(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    w = torch.randn(C, D, generator=g, dtype=torch.float64)
    b = torch.randn(C, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (B, T), generator=g)
    y[0, :3] = -100  # a masked prompt
    y[1, 0] = 4  # position 0's label is never a target after the shift
    cw = torch.rand(C, generator=g, dtype=torch.float64) + 0.5
    return x, w, b, y, cw


def torch_shifted(x, w, b, y, reduction="mean", **kw):
    logits = F.linear(x[..., :-1, :], w, b)
    out = F.cross_entropy(logits.reshape(-1, C), y[..., 1:].reshape(-1),
                          reduction="sum" if "num_items" in kw else reduction,
                          **{k: v for k, v in kw.items() if k != "num_items"})
    if "num_items" in kw:
        return out / kw["num_items"]
    return out.reshape(y[..., 1:].shape) if reduction == "none" else out


@pytest.mark.parametrize("backend,chunk_size", [("auto", None), ("rowblock", 4),
                                                ("native", None)])
@pytest.mark.parametrize("kw", [dict(reduction="mean"), dict(reduction="none"),
                                dict(reduction="sum", label_smoothing=0.1, weight=True),
                                dict(num_items=11)])
def test_shift_matches_torch_on_the_shifted_views(backend, chunk_size, kw):
    x, w, b, y, cw = data()
    kw = dict(kw, weight=cw) if kw.get("weight") else kw
    refs = [v.clone().requires_grad_() for v in (x, w, b)]
    want = torch_shifted(*refs, y, **kw)
    go = torch.linspace(0.5, 1.5, want.numel(), dtype=torch.float64).reshape(want.shape)
    (want * go).sum().backward()
    leaves = [v.clone().requires_grad_() for v in (x, w, b)]
    got = xt.linear_cross_entropy(leaves[0], leaves[1], y, leaves[2], shift=True,
                                  backend=backend, chunk_size=chunk_size, **kw)
    assert got.shape == want.shape
    (got * go).sum().backward()
    close(got, want)
    for a, r in zip(leaves, refs, strict=True):
        close(a.grad, r.grad)
    assert torch.all(leaves[0].grad[:, -1] == 0)  # the last position predicts nothing


def test_one_sequence_and_the_module():
    x, w, b, y, _ = data(1)
    want = torch_shifted(x[0], w, b, y[0])
    close(xt.linear_cross_entropy(x[0], w, y[0], b, shift=True), want)
    head = xt.LinearCrossEntropyLoss(D, C, bias=True, dtype=torch.float64, shift=True)
    with torch.no_grad():
        head.linear.weight.copy_(w)
        head.linear.bias.copy_(b)
    assert "shift=True" in repr(head)
    close(head(x, y), torch_shifted(x, w, b, y))


def test_hidden_states_are_not_copied(monkeypatch):
    x, w, _, y, _ = data(2)
    seen = []
    real = _linear._fused_linear

    def spy(x2, *args):
        seen.append(x2.data_ptr())
        return real(x2, *args)

    monkeypatch.setattr(_linear, "_fused_linear", spy)
    leaf = x.clone().requires_grad_()
    xt.linear_cross_entropy(leaf, w.requires_grad_(), y, shift=True, chunk_size=4).backward()
    assert seen == [leaf.data_ptr()]


def test_bad_shift_arguments_raise():
    x, w, _, y, _ = data()
    with pytest.raises(InputError, match="shift"):
        xt.linear_cross_entropy(x, w, y, shift=1)
    with pytest.raises(InputError, match="shift"):
        xt.linear_cross_entropy(x, w, y[:, :-1], shift=True)
    with pytest.raises(InputError, match="shift"):
        xt.linear_cross_entropy(x[0, 0], w, y[0, 0], shift=True)
    with pytest.raises(UnsupportedError, match="shift"):
        xt.linear_cross_entropy(x, w, torch.rand(B, T, C, dtype=torch.float64), shift=True)
    with pytest.raises(UnsupportedError, match="shift"):
        xt.linear_cross_entropy(x, w.reshape(C, 1, D), y, shift=True)
    with pytest.raises(InputError, match="input"):  # without shift: (N, D) as torch
        xt.linear_cross_entropy(x, w, y)
