"""The nn.Module wrappers: one-line swaps for torch's, and a training loop that matches."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import crossent.torch as xt


def test_cross_entropy_loss_is_a_torch_cross_entropy_loss():
    w = torch.rand(5) + 0.5
    ours = xt.CrossEntropyLoss(w, ignore_index=1, reduction="sum", label_smoothing=0.1)
    theirs = nn.CrossEntropyLoss(w, ignore_index=1, reduction="sum", label_smoothing=0.1)
    assert isinstance(ours, nn.CrossEntropyLoss)
    z, y = torch.randn(8, 5), torch.randint(0, 5, (8,))
    torch.testing.assert_close(ours(z, y), theirs(z, y))
    assert "z_loss" in repr(ours)


def _train(loss_fn, steps=5, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 9))
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(64, 10, generator=g)
        y = torch.randint(0, 9, (64,), generator=g)
        y[::5] = -100
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
    return [p.detach() for p in model.parameters()], loss.item()


@pytest.mark.parametrize("inplace", [False, True])
def test_training_loop_matches_torch(inplace):
    kw = dict(label_smoothing=0.1, weight=torch.linspace(0.5, 1.5, 9))
    want, want_loss = _train(nn.CrossEntropyLoss(**kw))
    got, got_loss = _train(xt.CrossEntropyLoss(**kw, inplace_backward=inplace))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    assert abs(got_loss - want_loss) <= 1e-5 * abs(want_loss)


def test_linear_training_loop_matches_torch():
    def train(head_cls, steps=5):
        torch.manual_seed(0)
        body = nn.Linear(10, 16)
        head = head_cls(16, 9, bias=True)
        opt = torch.optim.Adam([*body.parameters(), *head.parameters()], lr=1e-2)
        g = torch.Generator().manual_seed(1)
        for _ in range(steps):
            x = torch.randn(64, 10, generator=g)
            y = torch.randint(0, 9, (64,), generator=g)
            opt.zero_grad()
            head(torch.tanh(body(x)), y).backward()
            opt.step()
        return [p.detach() for p in (*body.parameters(), *head.parameters())], head

    if hasattr(nn, "LinearCrossEntropyLoss"):
        reference = nn.LinearCrossEntropyLoss
    else:  # torch < 2.13: the same head, unfused
        class reference(nn.Module):
            def __init__(self, d, c, bias):
                super().__init__()
                self.linear = nn.Linear(d, c, bias=bias)

            def forward(self, x, y):
                return nn.functional.cross_entropy(self.linear(x), y)

    want, theirs = train(reference)
    got, ours = train(lambda d, c, bias: xt.LinearCrossEntropyLoss(d, c, bias=bias,
                                                                   chunk_size=16))
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kw", [dict(out_features=(2, 3), bias=True),
                                dict(options=nn.LinearCrossEntropyOptions(batch_chunk_size=4))])
def test_linear_module_k_dimensional_heads_and_options_match_torch(kw):
    torch.manual_seed(0)
    theirs = nn.LinearCrossEntropyLoss(4, 5, **kw).double()
    ours = xt.LinearCrossEntropyLoss(4, 5, **kw).double()
    ours.load_state_dict(theirs.state_dict())  # same keys, same shapes
    x = torch.randn(8, 4, dtype=torch.float64)
    y = torch.randint(0, 5, (8, *kw.get("out_features", ())))
    want, got = theirs(x, y), ours(x, y)
    want.backward()
    got.backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(ours.linear.weight.grad, theirs.linear.weight.grad)


@pytest.mark.parametrize("fused", ["cross_entropy", "linear_cross_entropy"])
def test_inside_torch_compile_matches_eager(fused):
    # under dynamo the fused functions are one crossent:: custom operator each (_custom_ops)
    torch.manual_seed(0)
    head = nn.Linear(8, 11)
    x, y = torch.randn(16, 8), torch.randint(0, 11, (16,))
    y[::4] = -100

    def ours(x, y):
        if fused == "cross_entropy":
            return xt.cross_entropy(head(x).tanh(), y, label_smoothing=0.1)
        return xt.linear_cross_entropy(x.tanh(), head.weight, y, head.bias,
                                       label_smoothing=0.1)

    def theirs(x, y):
        z = head(x).tanh() if fused == "cross_entropy" else F.linear(x.tanh(), head.weight,
                                                                     head.bias)
        return F.cross_entropy(z, y, label_smoothing=0.1)

    torch._dynamo.reset()
    got = torch.compile(ours, backend="eager")(x, y)
    got.backward()
    got_grad = head.weight.grad.clone()
    head.weight.grad = None
    want = theirs(x, y)
    want.backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_grad, head.weight.grad)
