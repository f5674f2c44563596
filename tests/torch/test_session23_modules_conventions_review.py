"""Session 23 review (H76): ``crossent.torch.CrossEntropyLoss`` / ``LinearCrossEntropyLoss``
as drop-ins for torch's modules under the ``nn.Module`` conventions a demanding user
relies on, side by side with ``torch.nn.CrossEntropyLoss`` / ``torch.nn.LinearCrossEntropyLoss``
(torch 2.13), float64 where the comparison is tight.

Probed where the earlier module reviews (test_torch_modules, session16 modules/func,
session20 modules, session22 training loop) do not look: crossent's extras (``z_loss``,
``softcap``, ``backend``, ``loss_dtype``, ``inplace_backward``, ``chunk_size``, ``shift``)
assigned after construction; the head's sizes (``num_classes``, ``out_features``) assigned
after construction; a class-weight *buffer* put under ``requires_grad_()`` (K-dimensional,
every reduction, in place, softcapped); ``torch.nn.utils.parametrize`` on the class-weight
buffer and on the head (custom, ``weight_norm``, ``spectral_norm``, ``orthogonal``, the
hook-based ``prune``); frozen / bias-less / strided / view heads; ``stack_module_state`` +
``vmap`` ensembles over class-weight buffers; state dicts across the two libraries through
``torch.load(weights_only=True)``; whole-module ``weights_only`` loads; global module hooks;
``torch.fx.symbolic_trace`` of a model holding the loss.

Bugs are tests written as they should pass, marked
``@pytest.mark.xfail(strict=True, reason="BUG H76-<n>: ...")``; the other tests are
regression guards.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, stack_module_state, vmap
from torch.nn.utils import parametrize, prune
from torch.nn.utils.parametrizations import orthogonal, spectral_norm, weight_norm

import crossent.torch as xt
from crossent import InputError, UnsupportedError

F64 = torch.float64
TIGHT = dict(rtol=1e-10, atol=1e-12)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _reference(z, t, weight=None, *, reduction="mean", label_smoothing=0.0, z_loss=0.0,
               softcap=None, ignore_index=-100):
    """torch's cross-entropy with crossent's extras written out by hand (independent of
    crossent): ``softcap`` replaces the logits by ``c tanh(z / c)``, ``z_loss`` adds
    ``z_loss * logsumexp(z)^2`` per counted row (not class-weighted)."""
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    rows = F.cross_entropy(z, t, weight, reduction="none", label_smoothing=label_smoothing,
                           ignore_index=ignore_index)
    if z_loss:
        counted = (t != ignore_index) if not t.is_floating_point() else torch.ones_like(rows)
        rows = rows + z_loss * torch.logsumexp(z, 1) ** 2 * counted
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    if t.is_floating_point():
        return rows.sum() / rows.numel()
    kept = t != ignore_index
    denominator = kept.sum() if weight is None else weight[t.clamp(min=0)][kept].sum()
    return rows.sum() / denominator


def _linear_pair(**kw):
    """torch's head and crossent's with the same parameters (float64)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        theirs = nn.LinearCrossEntropyLoss(5, 4, dtype=F64, **kw)
    ours = xt.LinearCrossEntropyLoss(5, 4, dtype=F64, **kw)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def _step(module, x, t):
    """Loss, input gradient and every parameter's gradient (None kept) of one backward."""
    module.zero_grad()
    leaf = x.clone().requires_grad_()
    loss = module(leaf, t)
    loss.sum().backward()
    return [loss.detach(), leaf.grad, *[p.grad for _, p in module.named_parameters()]]


def _assert_all_close(got, want, **tol):
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        if a is None or b is None:
            assert a is None and b is None, f"item {i}: {a} vs {b}"
        else:
            torch.testing.assert_close(a, b, **(tol or TIGHT), msg=f"item {i}")


# --------------------------------------------------------------------------- bugs


_HEAD_SIZES = [
    pytest.param("num_classes", lambda: 4.0, 4, (), id="num_classes-float"),
    pytest.param("num_classes", lambda: True, 1, (), id="num_classes-bool"),
    pytest.param("num_classes", lambda: 4.0, 4, (3,), id="num_classes-float-K"),
    pytest.param("out_features", lambda: 3, 4, (3,), id="out_features-int"),
    pytest.param("out_features", lambda: (3.0,), 4, (3,), id="out_features-float"),
    pytest.param("out_features", lambda: iter((3,)), 4, (3,), id="out_features-iterator"),
]


@pytest.mark.parametrize("name, value, num_classes, out_features", _HEAD_SIZES)
def test_head_sizes_assigned_after_construction_are_refused_naming_them(
        name, value, num_classes, out_features):
    x = torch.randn(7, 5, generator=_gen(1))
    y = torch.randint(0, num_classes, (7, *out_features), generator=_gen(2))
    ours = xt.LinearCrossEntropyLoss(5, num_classes, out_features=out_features)
    setattr(ours, name, value())
    with pytest.raises(InputError, match=name):
        ours(x, y)


def test_torch_refuses_the_same_head_sizes_assigned_after_construction():
    """The reference for H76-1: torch's module raises for each of them (an iterator
    aside, which torch reads once and which is no tuple of sizes)."""
    x = torch.randn(7, 5, generator=_gen(1))
    for param in _HEAD_SIZES:
        name, value, num_classes, out_features = param.values
        if param.id == "out_features-iterator":
            continue
        theirs = nn.LinearCrossEntropyLoss(5, num_classes, out_features=out_features)
        setattr(theirs, name, value())
        y = torch.randint(0, num_classes, (7, *out_features), generator=_gen(2))
        with pytest.raises((TypeError, RuntimeError)):
            theirs(x, y)


class _Model(nn.Module):
    def __init__(self, loss: nn.Module, width: int) -> None:
        super().__init__()
        self.body = nn.Linear(5, width, dtype=F64)
        self.loss = loss

    def forward(self, x, y):
        return self.loss(torch.tanh(self.body(x)), y)


@pytest.mark.parametrize("kind", ["CrossEntropyLoss", "LinearCrossEntropyLoss"])
def test_fx_symbolic_trace_of_a_model_holding_the_loss_is_torchs_or_refused_by_name(kind):
    cw = torch.tensor([0.5, 1.0, 2.0, 1.5], dtype=F64)
    if kind == "CrossEntropyLoss":
        ours, theirs = (xt.CrossEntropyLoss(cw, label_smoothing=0.1),
                        nn.CrossEntropyLoss(cw, label_smoothing=0.1))
    else:
        ours, theirs = _linear_pair(bias=True, weight=cw, label_smoothing=0.1)
    width = 4 if kind == "CrossEntropyLoss" else 5
    with torch.random.fork_rng():
        torch.manual_seed(3)
        model_theirs = _Model(theirs, width)
    model_ours = _Model(ours, width)
    model_ours.load_state_dict(model_theirs.state_dict())
    torch.fx.symbolic_trace(model_theirs)  # torch's module: a leaf, traced fine
    try:
        traced = torch.fx.symbolic_trace(model_ours)
    except UnsupportedError as error:  # a loud, named refusal is acceptable
        assert "fx" in str(error) or "symbolic" in str(error)
        return
    x, y = torch.randn(9, 5, generator=_gen(4), dtype=F64), torch.tensor([0, 1, 2, 3] * 2 + [1])
    torch.testing.assert_close(traced(x, y), model_theirs(x, y), **TIGHT)


# ------------------------------------------- extras assigned after construction


@pytest.mark.parametrize("name, value", [
    ("z_loss", 0.1), ("softcap", 1.5), ("backend", "rowblock"), ("loss_dtype", torch.float32),
    ("inplace_backward", True)])
def test_cross_entropy_extras_assigned_after_construction_take_effect(name, value):
    """Each extra read at every forward: the value assigned later is the one used (against
    torch's loss with the extra written out by hand), and assigning the default back gives
    torch's module again (no stale state)."""
    z = torch.randn(7, 4, generator=_gen(5), dtype=F64)
    y = torch.tensor([0, 1, 2, 3, 1, -100, 2])
    cw = torch.tensor([0.5, 1.0, 2.0, 1.5], dtype=F64)
    ours = xt.CrossEntropyLoss(cw, label_smoothing=0.1)
    theirs = nn.CrossEntropyLoss(cw, label_smoothing=0.1)
    default = getattr(ours, name)
    setattr(ours, name, value)
    extra = {name: value} if name in ("z_loss", "softcap") else {}
    act = z.clone().requires_grad_()
    want = _reference(act, y, cw, label_smoothing=0.1, **extra)
    want_grad, = torch.autograd.grad(want, act)
    leaf = z.clone().requires_grad_()
    got = ours(leaf * 1.0, y)  # an activation, so inplace_backward may overwrite it
    got.backward()
    tol = dict(rtol=1e-6, atol=1e-7) if name == "loss_dtype" else TIGHT
    assert got.dtype == (torch.float32 if name == "loss_dtype" else F64)
    torch.testing.assert_close(got.double(), want.detach(), **tol)
    torch.testing.assert_close(leaf.grad, want_grad, **tol)
    setattr(ours, name, default)
    _assert_all_close(_step(ours, z, y), _step(theirs, z, y))


@pytest.mark.parametrize("name, value", [
    ("z_loss", 0.1), ("softcap", 1.5), ("chunk_size", 2), ("backend", "rowblock")])
def test_linear_extras_assigned_after_construction_take_effect(name, value):
    x = torch.randn(7, 5, generator=_gen(6), dtype=F64)
    y = torch.tensor([0, 1, 2, 3, 1, -100, 2])
    ours, theirs = _linear_pair(bias=True, label_smoothing=0.1)
    setattr(ours, name, value)
    extra = {name: value} if name in ("z_loss", "softcap") else {}
    w, b = (p.detach().clone().requires_grad_() for p in (theirs.linear.weight,
                                                          theirs.linear.bias))
    want = _reference(F.linear(x, w, b), y, label_smoothing=0.1, **extra)
    want.backward()
    got = _step(ours, x, y)
    _assert_all_close([got[0], got[2], got[3]], [want.detach(), w.grad, b.grad])
    setattr(ours, name, None if name == "softcap" or name == "chunk_size" else
            "auto" if name == "backend" else 0.0)
    _assert_all_close(_step(ours, x, y), _step(theirs, x, y))


def test_shift_assigned_after_construction_is_the_shifted_head():
    x = torch.randn(2, 5, 5, generator=_gen(7), dtype=F64)
    y = torch.randint(0, 4, (2, 5), generator=_gen(8))
    ours, theirs = _linear_pair(bias=True)
    ours.shift = True
    want = theirs(x[:, :-1].reshape(-1, 5), y[:, 1:].reshape(-1))
    torch.testing.assert_close(ours(x, y), want, **TIGHT)


# ------------------------------------------- class weight buffer under requires_grad_


@pytest.mark.parametrize("kdim, reduction, extra", [
    (False, "mean", dict()), (True, "mean", dict(inplace_backward=True)),
    (False, "sum", dict(softcap=2.0, z_loss=0.1)), (True, "none", dict(backend="rowblock"))])
def test_class_weight_buffer_under_requires_grad_gets_torchs_gradient(kdim, reduction, extra):
    """``module.weight.requires_grad_()`` (the registered buffer, not a Parameter) with
    probability targets: the weight's and the logits' gradients are torch's; with class
    indices both libraries refuse (crossent by name)."""
    z = torch.randn(6, 4, 3, generator=_gen(9), dtype=F64)
    p = torch.rand(6, 4, 3, generator=_gen(10), dtype=F64).softmax(1)
    if not kdim:
        z, p = z[..., 0], p[..., 0]
    cw = torch.linspace(0.5, 2.0, 4, dtype=F64)
    ours = xt.CrossEntropyLoss(cw.clone(), reduction=reduction, label_smoothing=0.2, **extra)
    ours.weight.requires_grad_()
    assert "weight" in dict(ours.named_buffers())
    ref_w, ref_z = cw.clone().requires_grad_(), z.clone().requires_grad_()
    want = _reference(ref_z, p, ref_w, reduction=reduction, label_smoothing=0.2,
                      z_loss=extra.get("z_loss", 0.0), softcap=extra.get("softcap"))
    want_grads = torch.autograd.grad(want.sum(), (ref_z, ref_w))
    leaf = z.clone().requires_grad_()
    got = ours(leaf * 1.0, p)
    got_grads = torch.autograd.grad(got.sum(), (leaf, ours.weight))
    _assert_all_close([got, *got_grads], [want, *want_grads])

    y = torch.randint(0, 4, z.shape[:1] + z.shape[2:], generator=_gen(11))
    theirs = nn.CrossEntropyLoss(cw.clone(), reduction=reduction)
    theirs.weight.requires_grad_()
    with pytest.raises(RuntimeError, match="weight"):
        theirs(z, y)
    with pytest.raises(UnsupportedError, match="weight"):
        ours(z.clone().requires_grad_(), y).sum().backward()


# ------------------------------------------------------------ parametrizations


class _Softplus(nn.Module):
    def forward(self, w):
        return F.softplus(w)


@pytest.mark.parametrize("learned", [False, True], ids=["buffer", "parameter"])
def test_parametrized_class_weight_is_torchs(learned):
    """``parametrize.register_parametrization`` on the class weight (a buffer, or a
    Parameter learned with probability targets): the swapped class still runs crossent's
    forward, loss and gradient of the original are torch's."""
    z = torch.randn(7, 4, generator=_gen(12), dtype=F64)
    y = torch.tensor([0, 1, 2, 3, 1, -100, 2])
    p = torch.rand(7, 4, generator=_gen(13), dtype=F64).softmax(1)
    results = []
    for cls in (xt.CrossEntropyLoss, nn.CrossEntropyLoss):
        m = cls(torch.linspace(-1.0, 1.0, 4, dtype=F64), label_smoothing=0.1)
        if learned:
            del m.weight
            m.weight = nn.Parameter(torch.linspace(-1.0, 1.0, 4, dtype=F64))
        parametrize.register_parametrization(m, "weight", _Softplus())
        assert isinstance(m, cls)
        with torch.no_grad():  # a learned weight with class indices: refused (elsewhere)
            res = [m(z, y)]
        res.append(m(z, p))
        if learned:
            res[1].backward()
            res.append(m.parametrizations.weight.original.grad)
        results.append(res)
    _assert_all_close([r.detach() for r in results[0]], [r.detach() for r in results[1]])


class _Squash(nn.Module):
    def forward(self, w):
        return 2 * torch.tanh(w)


def _seeded(fn):
    def apply(module):
        with torch.random.fork_rng():
            torch.manual_seed(3)
            fn(module)
    return apply


@pytest.mark.parametrize("how", [
    "parametrize", "weight_norm", "spectral_norm", "orthogonal", "prune"])
@pytest.mark.parametrize("kw", [dict(), dict(chunk_size=3)], ids=["whole", "chunked"])
def test_reparametrized_head_is_torchs(how, kw):
    """The head's weight under ``torch.nn.utils.parametrize`` (computed at each access) or
    the hook-based ``prune`` (computed when pruned; neither module calls ``linear``):
    loss and the gradients of the underlying parameters as torch's module, twice in a row
    (spectral_norm's power iteration advances per forward)."""
    x = torch.randn(7, 5, generator=_gen(14), dtype=F64)
    y = torch.tensor([0, 1, 2, 3, 1, -100, 2])
    ours, theirs = _linear_pair(bias=True, label_smoothing=0.1)
    for name, value in kw.items():
        setattr(ours, name, value)
    apply = _seeded({
        "parametrize": lambda m: parametrize.register_parametrization(m.linear, "weight",
                                                                      _Squash()),
        "weight_norm": lambda m: weight_norm(m.linear),
        "spectral_norm": lambda m: spectral_norm(m.linear),
        "orthogonal": lambda m: orthogonal(m.linear),
        "prune": lambda m: prune.l1_unstructured(m.linear, "weight", amount=0.4),
    }[how])
    apply(ours)
    apply(theirs)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    for _ in range(1 if how == "prune" else 2):  # pruned weight: one graph per prune
        _assert_all_close(_step(ours, x, y), _step(theirs, x, y))


# ----------------------------------------------------- head variants, ensembles


def _replace_by_strided(m):
    base = torch.zeros(8, 5, dtype=F64)
    base[::2] = m.linear.weight.detach()
    m.linear.weight = nn.Parameter(base[::2])


def _replace_by_transposed(m):
    m.linear.weight = nn.Parameter(m.linear.weight.detach().t().contiguous().t())


def _tie_to_a_larger_table(m):
    table = nn.Parameter(torch.cat([m.linear.weight.detach(), torch.ones(2, 5, dtype=F64)]))
    m.table = table
    del m.linear.weight
    m.linear.weight = table[:4]  # a non-leaf view of a bigger parameter


@pytest.mark.parametrize("how", [
    lambda m: m.linear.weight.requires_grad_(False),
    lambda m: m.linear.bias.requires_grad_(False),
    lambda m: m.requires_grad_(False),
    _replace_by_strided, _replace_by_transposed, _tie_to_a_larger_table,
], ids=["frozen_weight", "frozen_bias", "frozen_all", "strided", "transposed", "view"])
@pytest.mark.parametrize("kw", [dict(), dict(chunk_size=2)], ids=["whole", "chunked"])
def test_frozen_strided_and_view_heads_are_torchs(how, kw):
    """Frozen parts get no gradient (None, as torch's), the rest torch's gradients; a
    non-contiguous parameter or a view of a larger table is read as torch reads it."""
    x = torch.randn(7, 5, generator=_gen(15), dtype=F64)
    y = torch.tensor([0, 1, 2, 3, 1, -100, 2])
    ours, theirs = _linear_pair(bias=True, label_smoothing=0.1)
    for name, value in kw.items():
        setattr(ours, name, value)
    how(ours)
    how(theirs)
    _assert_all_close(_step(ours, x, y), _step(theirs, x, y))


def test_bias_free_head_with_a_class_weight_is_torchs():
    x = torch.randn(7, 5, generator=_gen(16), dtype=F64)
    y = torch.tensor([0, 1, 2, 3, 1, -100, 2])
    ours, theirs = _linear_pair(bias=False, weight=torch.linspace(0.5, 2.0, 4, dtype=F64))
    assert ours.linear.bias is None and [n for n, _ in ours.named_parameters()] == [
        "linear.weight"]
    _assert_all_close(_step(ours, x, y), _step(theirs, x, y))


def test_stacked_ensembles_over_class_weight_buffers_are_torchs():
    """``stack_module_state`` of modules with different class-weight buffers, vmapped
    through ``functional_call`` on a meta copy: losses, logits gradients and (probability
    targets) class-weight gradients as torch's ensemble; the same for weighted heads."""
    z = torch.randn(6, 4, generator=_gen(17), dtype=F64)
    y = torch.tensor([0, 1, 2, 3, 1, -100])
    p = torch.rand(6, 4, generator=_gen(18), dtype=F64).softmax(1)
    weights = [torch.rand(4, generator=_gen(20 + i), dtype=F64) + 0.5 for i in range(3)]
    results = []
    for cls in (xt.CrossEntropyLoss, nn.CrossEntropyLoss):
        members = [cls(w, label_smoothing=0.1) for w in weights]
        params, buffers = stack_module_state(members)
        base = copy.deepcopy(members[0]).to("meta")

        def f(pp, bb, a, t, base=base):
            return functional_call(base, (pp, bb), (a, t))

        dims = (0, 0, None, None)
        results.append([vmap(f, in_dims=dims)(params, buffers, z, y),
                        vmap(grad(f, argnums=2), in_dims=dims)(params, buffers, z, y),
                        vmap(grad(f, argnums=1), in_dims=dims)(params, buffers, z, p)["weight"]])
    _assert_all_close(*results)

    x = torch.randn(6, 5, generator=_gen(19), dtype=F64)
    results = []
    for cls in (xt.LinearCrossEntropyLoss, nn.LinearCrossEntropyLoss):
        with torch.random.fork_rng():
            torch.manual_seed(0)
            members = [cls(5, 4, bias=True, dtype=F64, weight=w, label_smoothing=0.1)
                       for w in weights]
        params, buffers = stack_module_state(members)
        base = copy.deepcopy(members[0]).to("meta")

        def h(pp, bb, a, t, base=base):
            return functional_call(base, (pp, bb), (a, t))

        dims = (0, 0, None, None)
        gp = vmap(grad(h), in_dims=dims)(params, buffers, x, y)
        results.append([vmap(h, in_dims=dims)(params, buffers, x, y).detach(),
                        gp["linear.weight"], gp["linear.bias"]])
    _assert_all_close(*results)


# ------------------------------------------------------- state dicts, serialisation


def _saved(obj) -> io.BytesIO:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


@pytest.mark.parametrize("kind", ["CrossEntropyLoss", "LinearCrossEntropyLoss"])
def test_state_dicts_cross_between_the_libraries_through_weights_only_loads(kind):
    """A state dict saved by one library and ``torch.load(weights_only=True)``-ed into the
    other's module (strict), and a partial one with ``strict=False``: the same keys, the
    same losses; missing / unexpected keys reported as torch reports them."""
    cw = torch.tensor([0.5, 1.0, 2.0, 1.5], dtype=F64)
    if kind == "CrossEntropyLoss":
        make = [lambda c, w=None: c(w, label_smoothing=0.1)] * 2
        classes = (xt.CrossEntropyLoss, nn.CrossEntropyLoss)
        args = (torch.randn(7, 4, generator=_gen(22), dtype=F64),)
    else:
        make = [lambda c, w=None: c(5, 4, bias=True, dtype=F64, weight=w,
                                    label_smoothing=0.1)] * 2
        classes = (xt.LinearCrossEntropyLoss, nn.LinearCrossEntropyLoss)
        args = (torch.randn(7, 5, generator=_gen(22), dtype=F64),)
    y = torch.tensor([0, 1, 2, 3, 1, -100, 2])
    source = {}
    for c, mk in zip(classes, make, strict=True):
        with torch.random.fork_rng():
            torch.manual_seed(1 if c is classes[0] else 2)
            source[c] = mk(c, cw * (1 if c is classes[0] else 2))
    for src, dst in (classes, classes[::-1]):
        with torch.random.fork_rng():
            torch.manual_seed(7)
            target = make[0](dst, torch.ones(4, dtype=F64))
        state = torch.load(_saved(source[src].state_dict()), weights_only=True)
        assert list(state) == list(target.state_dict())
        assert str(target.load_state_dict(state)) == "<All keys matched successfully>"
        torch.testing.assert_close(target(*args, y), source[src](*args, y), **TIGHT)
    partial = {k: v for k, v in source[classes[1]].state_dict().items() if k != "weight"}
    reports = []
    for c, mk in zip(classes, make, strict=True):
        m = mk(c, torch.ones(4, dtype=F64))
        reports.append(m.load_state_dict(partial, strict=False))
        assert torch.equal(m.weight, torch.ones(4, dtype=F64))
        with pytest.raises(RuntimeError, match=r'Missing key.*"weight"'):
            m.load_state_dict(partial)
    assert reports[0] == reports[1]


def test_whole_module_weights_only_load_is_torchs_and_keeps_the_extras():
    """``torch.load(weights_only=True)`` of a whole module: refused as for torch's module,
    loaded under ``torch.serialization.safe_globals`` with every extra intact."""
    cw = torch.tensor([0.5, 1.0, 2.0, 1.5], dtype=F64)
    ours = xt.CrossEntropyLoss(cw, label_smoothing=0.1, reduction="sum", z_loss=0.05,
                               softcap=3.0, backend="rowblock", loss_dtype=F64)
    head = xt.LinearCrossEntropyLoss(
        5, 4, bias=True, dtype=F64, weight=cw, z_loss=0.05, softcap=3.0, backend="rowblock",
        options=nn.LinearCrossEntropyOptions(batch_chunk_size=2), ignore_index=-100)
    for theirs in (nn.CrossEntropyLoss(cw), nn.LinearCrossEntropyLoss(5, 4)):
        with pytest.raises(Exception, match="Weights only load failed"):
            torch.load(_saved(theirs), weights_only=True)
    for module in (ours, head):
        with pytest.raises(Exception, match="Weights only load failed"):
            torch.load(_saved(module), weights_only=True)
    z = torch.randn(7, 4, generator=_gen(23), dtype=F64)
    x = torch.randn(7, 5, generator=_gen(24), dtype=F64)
    y = torch.tensor([0, 1, 2, 3, 1, -100, 2])
    with torch.serialization.safe_globals([xt.CrossEntropyLoss, xt.LinearCrossEntropyLoss,
                                           nn.Linear, nn.LinearCrossEntropyOptions]):
        loaded = torch.load(_saved(ours), weights_only=True)
        loaded_head = torch.load(_saved(head), weights_only=True)
    assert type(loaded) is xt.CrossEntropyLoss and repr(loaded) == repr(ours)
    assert type(loaded_head) is xt.LinearCrossEntropyLoss and repr(loaded_head) == repr(head)
    torch.testing.assert_close(loaded(z, y), ours(z, y), rtol=0, atol=0)
    torch.testing.assert_close(loaded_head(x, y), head(x, y), rtol=0, atol=0)


# ------------------------------------------------------------------ global hooks


def test_global_module_hooks_see_the_loss_module_once_as_torchs():
    """``register_module_forward_pre_hook`` rewriting the inputs and
    ``register_module_forward_hook`` counting calls: crossent's modules are called once per
    forward like torch's (the head's ``linear`` is not called by either) and see the
    rewritten inputs."""
    z = torch.randn(7, 4, generator=_gen(25), dtype=F64)
    x = torch.randn(7, 5, generator=_gen(26), dtype=F64)
    y = torch.tensor([0, 1, 2, 3, 1, -100, 2])
    ours, theirs = _linear_pair(bias=True)
    runs = []
    for ce, head in ((xt.CrossEntropyLoss(), ours), (nn.CrossEntropyLoss(), theirs)):
        seen: list[str] = []
        pre = nn.modules.module.register_module_forward_pre_hook(
            lambda m, args: (args[0] * 2, args[1]))
        post = nn.modules.module.register_module_forward_hook(
            lambda m, args, out, seen=seen: seen.append(type(m).__name__))
        try:
            runs.append((seen, ce(z, y), head(x, y)))
        finally:
            pre.remove()
            post.remove()
    (seen_ours, *ours_out), (seen_theirs, *theirs_out) = runs
    assert seen_ours == seen_theirs == ["CrossEntropyLoss", "LinearCrossEntropyLoss"]
    _assert_all_close(ours_out, theirs_out)
    torch.testing.assert_close(ours_out[0], F.cross_entropy(2 * z, y), **TIGHT)
