"""Session 20 review: ``crossent.torch.CrossEntropyLoss`` / ``LinearCrossEntropyLoss`` as an
``nn.Module`` user meets them, against torch's own modules (float64 where tight).

Probed where the earlier module files do not look: attributes set after construction
(``weight`` to and from ``None``, bad values, a replaced head), the legacy constructor
arguments, ``.to("meta")`` and meta factory kwargs, seeded initialisation, forward hooks
with keyword arguments, weight tying, ``torch.compile`` guards on mutated attributes, a
compiled K-dimensional head with dynamic shapes and ``torch.export`` of parent models.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import crossent.torch as xt
from crossent import InputError, UnsupportedError

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------- bugs found at stop 29 (fixed in modules.py)


@pytest.mark.parametrize("kw, name", [
    (dict(size_average=torch.tensor([1, 0])), "size_average"),
    (dict(reduce=np.array([True, False])), "reduce")], ids=["size_average", "reduce"])
def test_module_legacy_value_without_one_truth_is_refused_naming_it(kw, name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(InputError, match=name):
            xt.CrossEntropyLoss(**kw)


def test_cross_entropy_module_weight_not_a_tensor_is_input_error():
    with pytest.raises(InputError, match="weight"):
        xt.CrossEntropyLoss(weight=[1.0, 2.0])


def test_linear_module_integer_dtype_is_refused_naming_it():
    with pytest.raises(InputError, match="dtype"):
        xt.LinearCrossEntropyLoss(5, 4, dtype=torch.int64)


@pytest.mark.parametrize("how", ["replaced_linear", "num_classes"])
def test_linear_module_head_that_disagrees_with_num_classes_raises_as_torch(how):
    x, y = torch.randn(3, 5, generator=_gen(1)), torch.tensor([0, 3, 1])
    for cls in (nn.LinearCrossEntropyLoss, xt.LinearCrossEntropyLoss):
        m = cls(5, 4)
        if how == "replaced_linear":
            m.linear = nn.Linear(5, 6)
        else:
            m.num_classes = 2
        with pytest.raises((RuntimeError, InputError)):
            m(x, y)


# ------------------------------------------------- CrossEntropyLoss: attributes


def test_weight_set_to_a_tensor_and_back_to_none_after_construction_as_torch():
    """``module.weight = tensor`` on a module built without one (and ``= None`` again)
    updates the registered buffer and the loss as torch's module does."""
    z = torch.randn(6, 4, generator=_gen(2), dtype=F64)
    y = torch.tensor([0, 1, 2, 3, 1, -100])
    cw = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=F64)
    results = []
    for cls in (xt.CrossEntropyLoss, nn.CrossEntropyLoss):
        m = cls(label_smoothing=0.1)
        keys = [list(m.state_dict())]
        m.weight = cw
        keys.append(list(m.state_dict()))
        weighted = m(z, y)
        m.weight = None
        keys.append(list(m.state_dict()))
        results.append((keys, weighted, m(z, y)))
    (k1, *got), (k2, *want) = results
    assert k1 == k2 == [[], ["weight"], []]
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got[0], F.cross_entropy(z, y, cw, label_smoothing=0.1))


@pytest.mark.parametrize("name, value", [
    ("reduction", "avg"), ("reduction", None), ("label_smoothing", 1.5),
    ("ignore_index", 2.0), ("z_loss", -1.0), ("softcap", 0.0), ("backend", "bogus"),
    ("loss_dtype", "float32")])
def test_bad_value_set_after_construction_is_refused_naming_it(name, value):
    """Options checked in the constructor or not, a bad value assigned to the attribute
    later raises InputError naming it (torch's module raises raw for its own three)."""
    z, y = torch.randn(3, 4, generator=_gen(3)), torch.tensor([0, 1, 2])
    if hasattr(nn.CrossEntropyLoss(), name):
        theirs = nn.CrossEntropyLoss()
        setattr(theirs, name, value)
        with pytest.raises((ValueError, RuntimeError, TypeError)):
            theirs(z, y)
    ours = xt.CrossEntropyLoss()
    setattr(ours, name, value)
    with pytest.raises(InputError, match=name):
        ours(z, y)


def test_legacy_arguments_warn_once_at_construction_as_torch():
    z, y = torch.randn(3, 4, generator=_gen(4)), torch.tensor([0, 1, 2])
    counts = []
    for cls in (xt.CrossEntropyLoss, nn.CrossEntropyLoss):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            m = cls(size_average=False)
            built = [str(w.message) for w in seen]
            m(z, y)
            m(z, y)
        counts.append((built, len(seen), m.reduction))
    assert counts[0] == counts[1]
    assert counts[0][1] == 1 and counts[0][2] == "sum"


def test_half_module_with_probability_targets_is_torchs():
    """``.half()`` converts the class weight; probability targets (the existing dtype
    test uses class indices) give torch's float16 loss and gradient."""
    w = torch.rand(4, generator=_gen(5)) + 0.5
    z = torch.randn(6, 4, generator=_gen(6)).half()
    p = torch.rand(6, 4, generator=_gen(7)).softmax(1).half()
    ref_z = z.double().requires_grad_()
    ref = F.cross_entropy(ref_z, p.double(), w.half().double(), label_smoothing=0.1)
    ref.backward()
    for cls in (xt.CrossEntropyLoss, nn.CrossEntropyLoss):
        m = cls(w, label_smoothing=0.1).half()
        leaf = z.clone().requires_grad_()
        loss = m(leaf, p)
        loss.backward()
        assert loss.dtype == leaf.grad.dtype == m.weight.dtype == torch.float16
        torch.testing.assert_close(loss.double(), ref.detach(), rtol=2e-3, atol=2e-3)
        torch.testing.assert_close(leaf.grad.double(), ref_z.grad, rtol=0, atol=2e-3)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_modules_moved_to_meta_propagate_torchs_shapes(reduction):
    for ours, theirs, args in (
            (xt.CrossEntropyLoss(torch.rand(4), reduction=reduction, label_smoothing=0.1),
             nn.CrossEntropyLoss(torch.rand(4), reduction=reduction, label_smoothing=0.1),
             (torch.empty(5, 4, 3), torch.zeros(5, 3, dtype=torch.long))),
            (xt.LinearCrossEntropyLoss(5, 4, out_features=(2,), bias=True,
                                       weight=torch.rand(4), reduction=reduction),
             nn.LinearCrossEntropyLoss(5, 4, out_features=(2,), bias=True,
                                       weight=torch.rand(4), reduction=reduction),
             (torch.empty(3, 5), torch.zeros(3, 2, dtype=torch.long)))):
        meta_args = tuple(a.to("meta") for a in args)
        got, want = ours.to("meta")(*meta_args), theirs.to("meta")(*meta_args)
        assert got.device.type == "meta"
        assert (got.shape, got.dtype) == (want.shape, want.dtype)


def test_forward_hooks_with_keyword_arguments_reach_num_items():
    """A ``with_kwargs`` pre-hook adding ``num_items`` and a forward hook rescaling the
    output: the module sees the keyword, the hook sees it, the loss is torch's sum / 10."""
    z = torch.randn(6, 4, generator=_gen(8), dtype=F64)
    y = torch.tensor([0, 1, 2, 3, 1, -100])
    seen: list = []
    m = xt.CrossEntropyLoss(reduction="sum")
    m.register_forward_pre_hook(lambda mod, args, kwargs: (args, {**kwargs, "num_items": 10}),
                                with_kwargs=True)
    m.register_forward_hook(lambda mod, args, kwargs, out: seen.append(kwargs) or out * 2,
                            with_kwargs=True)
    torch.testing.assert_close(m(z, y), 2 * F.cross_entropy(z, y, reduction="sum") / 10)
    assert seen == [{"num_items": 10}]


# ------------------------------------------------- LinearCrossEntropyLoss


@pytest.mark.parametrize("kw", [dict(), dict(bias=True, out_features=(2, 3), dtype=F64)])
def test_linear_module_seeded_initialisation_is_torchs(kw):
    """The same seed gives the same head bit for bit (nn.Linear's kaiming-uniform init,
    nothing drawn before it), and the state dict keys in torch's order."""
    with torch.random.fork_rng():
        torch.manual_seed(3)
        ours = xt.LinearCrossEntropyLoss(5, 4, **kw)
        torch.manual_seed(3)
        theirs = nn.LinearCrossEntropyLoss(5, 4, **kw)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    for a, b in zip(ours.state_dict().values(), theirs.state_dict().values(), strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_linear_module_built_on_meta_then_materialised_is_torchs():
    """``device="meta"`` (deferred init), ``to_empty`` and ``reset_parameters`` on the
    head: the weight buffer stays where torch leaves it and the loss is torch's."""
    x, y = torch.randn(4, 5, generator=_gen(9)), torch.tensor([0, 3, -100, 1])
    losses = []
    for cls in (xt.LinearCrossEntropyLoss, nn.LinearCrossEntropyLoss):
        m = cls(5, 4, bias=True, device="meta", weight=torch.tensor([1.0, 2.0, 0.5, 1.0]))
        assert m.linear.weight.device.type == "meta" and m.weight.device.type == "cpu"
        m = m.to_empty(device="cpu")
        with torch.random.fork_rng():
            torch.manual_seed(1)
            m.linear.reset_parameters()
        m.weight.copy_(torch.tensor([1.0, 2.0, 0.5, 1.0]))
        losses.append(m(x, y))
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)


def test_linear_module_attributes_set_after_construction_take_effect_as_torch():
    x = torch.randn(7, 5, generator=_gen(10), dtype=F64)
    y = torch.tensor([0, 1, 2, 3, 1, 2, 2])
    with torch.random.fork_rng():
        torch.manual_seed(0)
        theirs = nn.LinearCrossEntropyLoss(5, 4, bias=True, dtype=F64,
                                           weight=torch.rand(4, dtype=F64) + 0.5)
    ours = xt.LinearCrossEntropyLoss(5, 4, bias=True, dtype=F64, weight=torch.ones(4, dtype=F64))
    ours.load_state_dict(theirs.state_dict())
    new_head = nn.Linear(5, 4, bias=False, dtype=F64)
    steps = [("label_smoothing", 0.2), ("ignore_index", 2), ("reduction", "sum"),
             ("weight", None), ("reduction", "none"),
             ("options", nn.LinearCrossEntropyOptions(batch_chunk_size=2)),
             ("label_smoothing", 0.0), ("weight", torch.tensor([1.0, 0.0, 2.0, 3.0], dtype=F64)),
             ("reduction", "mean"), ("linear", new_head), ("ignore_index", None),
             ("options", None)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch: options ignored with smoothing
        for name, value in steps:
            setattr(ours, name, value)
            setattr(theirs, name, copy.deepcopy(value) if name == "linear" else value)
            outs = []
            for m in (ours, theirs):
                m.zero_grad()
                loss = m(x, y)
                loss.sum().backward()
                outs.append((loss.detach(), m.linear.weight.grad))
            for a, b in zip(*outs, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("name, value, match", [
    ("chunk_size", 0, "chunk_size"), ("reduction", "avg", "reduction"),
    ("label_smoothing", -0.1, "label_smoothing"), ("weight", torch.ones(3), "weight"),
    ("z_loss", float("nan"), "z_loss"), ("backend", "cuda", "backend")])
def test_linear_module_bad_value_set_after_construction_is_refused_naming_it(name, value,
                                                                           match):
    m = xt.LinearCrossEntropyLoss(5, 4)
    setattr(m, name, value)
    with pytest.raises(InputError, match=match):
        m(torch.randn(3, 5, generator=_gen(11)), torch.tensor([0, 1, 2]))


def test_linear_module_class_weight_parameter_gradient_or_refusal_as_torch():
    """A learned class weight on the head: with probability targets torch's gradient;
    with class indices torch refuses and so does crossent (UnsupportedError by name)."""
    x = torch.randn(7, 5, generator=_gen(12), dtype=F64)
    y = torch.tensor([0, 1, 2, 3, 1, -100, 2])
    p = torch.rand(7, 4, generator=_gen(13), dtype=F64).softmax(1)
    grads = []
    for cls in (xt.LinearCrossEntropyLoss, nn.LinearCrossEntropyLoss):
        with torch.random.fork_rng():
            torch.manual_seed(0)
            m = cls(5, 4, dtype=F64, label_smoothing=0.1)
        del m.weight
        m.weight = nn.Parameter(torch.linspace(0.5, 2.0, 4, dtype=F64))
        with pytest.raises(UnsupportedError if cls is xt.LinearCrossEntropyLoss
                           else RuntimeError, match="weight"):
            m(x, y).backward()
        m.zero_grad()
        m(x, p).backward()
        grads.append((m.weight.grad, m.linear.weight.grad))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


class _TiedLM(nn.Module):
    def __init__(self, head: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 5, dtype=dtype)
        self.head = head
        self.head.linear.weight = self.emb.weight  # weight tying

    def forward(self, tok, y):
        h = torch.tanh(self.emb(tok))
        return self.head(h, y) + self.head(h * 0.5, y.flip(0))


@pytest.mark.parametrize("dtype, kw", [(F64, {}), (F64, dict(chunk_size=3)),
                                       (torch.float32, dict(backend="rowblock"))])
def test_tied_embedding_head_called_twice_gets_torchs_gradients(dtype, kw):
    """The head's weight is the embedding's Parameter and the head runs twice per step:
    the gradients stored in each forward add up to torch's."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        theirs = _TiedLM(nn.LinearCrossEntropyLoss(5, 7, bias=True, dtype=dtype,
                                                   label_smoothing=0.1), dtype)
    ours = _TiedLM(xt.LinearCrossEntropyLoss(5, 7, bias=True, dtype=dtype,
                                             label_smoothing=0.1, **kw), dtype)
    ours.load_state_dict(theirs.state_dict())
    assert ours.head.linear.weight is ours.emb.weight
    tok = torch.tensor([0, 3, 6, 2, 2, 5, 1, 4, 4])
    y = torch.tensor([1, 2, 3, -100, 0, 6, 5, 4, 2])
    res = []
    for m in (ours, theirs):
        loss = m(tok, y)
        loss.backward()
        res.append((loss.detach(), m.emb.weight.grad, m.head.linear.bias.grad))
    tol = 1e-12 if dtype == F64 else 1e-5
    for a, b in zip(*res, strict=True):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


# ------------------------------------------------- compile / export


def test_compiled_module_follows_attributes_mutated_after_compilation():
    """``torch.compile(module, fullgraph=True)``: changing ``label_smoothing``,
    ``reduction``, the weight buffer in place, or ``weight = None`` after the first call
    is seen (a guard fails and the graph is rebuilt), loss and gradient as torch's."""
    torch._dynamo.reset()
    cw = torch.tensor([1.0, 2.0, 0.5, 1.5])
    ours, theirs = xt.CrossEntropyLoss(cw.clone()), nn.CrossEntropyLoss(cw.clone())
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    z = torch.randn(6, 4, generator=_gen(14))
    y = torch.tensor([0, 1, 2, 3, 2, 1])

    def check(what):
        res = []
        for m in (compiled, theirs):
            leaf = z.clone().requires_grad_()
            loss = m(leaf, y)
            loss.sum().backward()
            res.append((loss.detach(), leaf.grad))
        for a, b in zip(*res, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=what)

    try:
        check("first")
        for name, value in (("label_smoothing", 0.3), ("reduction", "none")):
            setattr(ours, name, value)
            setattr(theirs, name, value)
            check(name)
        with torch.no_grad():
            ours.weight.mul_(3)
            theirs.weight.mul_(3)
        check("weight in place")
        ours.weight = theirs.weight = None
        check("weight None")
    finally:
        torch._dynamo.reset()


def test_compiled_k_dimensional_head_with_dynamic_batches_is_torchs():
    torch._dynamo.reset()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        theirs = nn.LinearCrossEntropyLoss(5, 4, out_features=(3,), bias=True,
                                           label_smoothing=0.1)
    ours = xt.LinearCrossEntropyLoss(5, 4, out_features=(3,), bias=True, label_smoothing=0.1)
    ours.load_state_dict(theirs.state_dict())
    compiled = torch.compile(ours, fullgraph=True, dynamic=True, backend="aot_eager")
    try:
        for n in (6, 9):
            x = torch.randn(n, 5, generator=_gen(n))
            t = torch.randint(0, 4, (n, 3), generator=_gen(n + 1))
            t[0, 0] = -100
            outs = []
            for m, module in ((compiled, ours), (theirs, theirs)):
                module.zero_grad()
                leaf = x.clone().requires_grad_()
                loss = m(leaf, t)
                loss.backward()
                outs.append((loss.detach(), leaf.grad, module.linear.weight.grad,
                             module.linear.bias.grad))
            for a, b in zip(*outs, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    finally:
        torch._dynamo.reset()


class _Model(nn.Module):
    def __init__(self, loss: nn.Module) -> None:
        super().__init__()
        self.body = nn.Linear(5, 4)
        self.loss = loss

    def forward(self, x, y):
        return self.loss(self.body(x).tanh(), y)


def test_exported_models_with_weighted_losses_and_dynamic_batch_are_torchs():
    """``torch.export.export`` of a parent model holding the weighted loss (its weight a
    buffer of the exported program under torch's key) and of a K-dimensional weighted
    head with a bias, batch dynamic: the program's numbers on a new batch are torch's."""
    cw = torch.tensor([0.5, 1.0, 2.0, 1.5])
    with torch.random.fork_rng():
        torch.manual_seed(0)
        ours = _Model(xt.CrossEntropyLoss(cw, ignore_index=1, label_smoothing=0.1))
    theirs = _Model(nn.CrossEntropyLoss(cw, ignore_index=1, label_smoothing=0.1))
    theirs.load_state_dict(ours.state_dict())
    assert list(ours.state_dict()) == list(theirs.state_dict())
    batch = torch.export.Dim("batch", min=2)
    dyn = ({0: batch}, {0: batch})
    x, y = torch.randn(6, 5, generator=_gen(15)), torch.tensor([0, 1, 2, 3, 1, 2])
    program = torch.export.export(ours, (x, y), dynamic_shapes=dyn)
    assert "loss.weight" in program.state_dict
    x2, y2 = torch.randn(11, 5, generator=_gen(16)), torch.randint(0, 4, (11,), generator=_gen(17))
    torch.testing.assert_close(program.module()(x2, y2), theirs(x2, y2), rtol=1e-5, atol=1e-6)

    with torch.random.fork_rng():
        torch.manual_seed(1)
        head_theirs = nn.LinearCrossEntropyLoss(5, 4, out_features=(3,), bias=True, weight=cw,
                                                label_smoothing=0.1)
    head_ours = xt.LinearCrossEntropyLoss(5, 4, out_features=(3,), bias=True, weight=cw,
                                          label_smoothing=0.1)
    head_ours.load_state_dict(head_theirs.state_dict())
    t = torch.randint(0, 4, (6, 3), generator=_gen(18))
    program = torch.export.export(head_ours, (x, t), dynamic_shapes=dyn)
    t2 = torch.randint(0, 4, (11, 3), generator=_gen(19))
    torch.testing.assert_close(program.module()(x2, t2), head_theirs(x2, t2), rtol=1e-5,
                               atol=1e-6)
