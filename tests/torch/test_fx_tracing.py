"""``torch.fx.symbolic_trace`` of models that use crossent, side by side with the same
models using torch's functions and modules: the traced graph gives torch's values and
gradients. torch's loss modules are fx leaves (one ``call_module`` node that reads the
module's attributes when the graph runs); crossent's functions and modules become one
``call_function`` node with the same effect, and a trace of a loss module itself records
the functional call with the attributes as constants, as torch's does."""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

import crossent.torch as xt
from crossent.errors import UnsupportedError

F64 = torch.float64


def _data(seed=0, n=6, d=4, c=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=F64)
    y = torch.randint(0, c, (n,), generator=g)
    y[1] = -100
    return x, y


class _Functional(nn.Module):
    """A body and a loss through the functional API of ``lib`` (crossent.torch or F)."""

    def __init__(self, lib, **kw):
        super().__init__()
        self.lib, self.kw = lib, kw
        self.body = nn.Linear(4, 4, dtype=F64)
        self.head = nn.Linear(4, 5, dtype=F64)

    def forward(self, x, y):
        h = torch.tanh(self.body(x))
        ce = self.lib.cross_entropy(self.head(h), y, **self.kw)
        lin = self.lib.linear_cross_entropy(h, self.head.weight, y, linear_bias=self.head.bias)
        return ce + lin


class _Modules(nn.Module):
    """A body and both loss modules of ``lib`` (crossent.torch or torch.nn)."""

    def __init__(self, lib):
        super().__init__()
        self.body = nn.Linear(4, 4, dtype=F64)
        self.loss = lib.CrossEntropyLoss(weight=torch.rand(5, dtype=F64) + 0.5,
                                         label_smoothing=0.1)
        self.head = lib.LinearCrossEntropyLoss(4, 5, bias=True, dtype=F64)

    def forward(self, x, y):
        h = torch.tanh(self.body(x))
        return self.loss(self.head.linear(h), y) + self.head(h, y)


def _twins(make, *libs):
    models = []
    for lib in libs:
        torch.manual_seed(3)
        models.append(make(lib))
    return models


def _value_and_grads(model, x, y):
    model.zero_grad(set_to_none=True)
    loss = model(x, y)
    loss.backward()
    return [loss.detach()] + [p.grad.clone() for p in model.parameters()]


def _assert_same(a, b):
    assert len(a) == len(b)
    for u, v in zip(a, b, strict=True):
        torch.testing.assert_close(u, v, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kw", [{}, {"label_smoothing": 0.2, "reduction": "sum"}])
def test_functional_calls_trace_to_one_node_each_with_torchs_numbers(kw):
    ours, theirs = _twins(lambda lib: _Functional(lib, **kw), xt, F)
    traced = torch.fx.symbolic_trace(ours)
    called = [n.target for n in traced.graph.nodes if n.op == "call_function"]
    assert xt.cross_entropy in called and xt.linear_cross_entropy in called
    x, y = _data()
    _assert_same(_value_and_grads(traced, x, y), _value_and_grads(theirs, x, y))


def test_a_model_holding_the_loss_modules_traces_as_one_holding_torchs():
    ours, theirs = _twins(_Modules, xt, nn)
    traced_ours, traced_theirs = (torch.fx.symbolic_trace(m) for m in (ours, theirs))
    x, y = _data(1)
    _assert_same(_value_and_grads(traced_ours, x, y), _value_and_grads(traced_theirs, x, y))
    # torch's leaf reads its attributes when the graph runs: so does crossent's node
    for m in (ours, theirs):
        m.loss.label_smoothing, m.loss.ignore_index = 0.3, 2
    y = y.clamp(min=0)  # -100 is a class index out of range once ignore_index is 2
    _assert_same(_value_and_grads(traced_ours, x, y), _value_and_grads(traced_theirs, x, y))


@pytest.mark.parametrize("kind", ["CrossEntropyLoss", "LinearCrossEntropyLoss"])
def test_tracing_a_loss_module_itself_gives_torchs_traced_module(kind):
    def make(lib):
        if kind == "CrossEntropyLoss":
            return lib.CrossEntropyLoss(label_smoothing=0.2, reduction="sum")
        return lib.LinearCrossEntropyLoss(4, 5, bias=True, dtype=F64, out_features=(2,))

    ours, theirs = (torch.fx.symbolic_trace(m) for m in _twins(make, xt, nn))
    x, y = _data(2)
    if kind == "CrossEntropyLoss":
        z = torch.randn(6, 5, dtype=F64, requires_grad=True)
        a, b = ours(z, y), theirs(z, y)
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
        ga, = torch.autograd.grad(a, z)
        gb, = torch.autograd.grad(b, z)
        torch.testing.assert_close(ga, gb, rtol=1e-12, atol=1e-15)
    else:
        y2 = torch.randint(0, 5, (6, 2), generator=torch.Generator().manual_seed(4))
        _assert_same(_value_and_grads(ours, x, y2), _value_and_grads(theirs, x, y2))


def test_a_traced_head_checks_its_sizes_when_the_graph_runs():
    traced = torch.fx.symbolic_trace(xt.LinearCrossEntropyLoss(4, 5, dtype=F64))
    traced.linear.weight = nn.Parameter(torch.randn(3, 4, dtype=F64))
    x, y = _data(3)
    with pytest.raises(ValueError, match=r"linear\.weight"):
        traced(x, y.clamp(min=0))


def test_statistics_and_numpy_scalars_trace():
    class WithStatistics(nn.Module):
        def forward(self, z, y):
            loss, stats = xt.cross_entropy(z, y, statistics="lse",
                                           label_smoothing=np.float64(0.1),
                                           ignore_index=np.int64(-100))
            return loss, stats.lse

    z = torch.randn(6, 5, dtype=F64)
    y = _data(4)[1].clamp(min=0)  # an ignored row's lse is NaN, not torch's logsumexp
    loss, lse = torch.fx.symbolic_trace(WithStatistics())(z, y)
    torch.testing.assert_close(loss, F.cross_entropy(z, y, label_smoothing=0.1),
                               rtol=1e-12, atol=0)
    torch.testing.assert_close(lse, torch.logsumexp(z, -1), rtol=1e-12, atol=0)


def test_an_argument_fx_cannot_record_is_refused_naming_fx():
    class Odd(nn.Module):
        def forward(self, z, y):
            return xt.cross_entropy(z, y, backend=object())

    with pytest.raises(UnsupportedError, match=r"torch\.fx"):
        torch.fx.symbolic_trace(Odd())


def test_traced_graphs_survive_deepcopy_and_save_load():
    ours, theirs = _twins(_Modules, xt, nn)
    traced = torch.fx.symbolic_trace(ours)
    buffer = io.BytesIO()
    torch.save(traced, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    x, y = _data(5)
    want = theirs(x, y)
    for graph in (copy.deepcopy(traced), loaded):
        torch.testing.assert_close(graph(x, y), want, rtol=1e-12, atol=0)
