"""Review (H48, session 17, wave 4) of b5b9522 and 775abb4 on one process:
the vocab-parallel functions under ``torch.compile`` (eager behaviour, doctests,
pickling, ``fullgraph=True``, ``torch.export``; written for a ``torch.compiler.disable``
around them, since removed for its import cost; a 2-rank compiled/eager test was kept out of
CI after one failure in 15 runs), the composable
path's ``masked_fill`` (values, gradients, double backward, ``torch.func``, forward-mode
AD, ``is_grads_batched``, NaN/inf on ignored rows), ``_rules.differentiated(...,
gradient=False)`` for the vocab-parallel count and class weight, and
``_rules.fake_values``'s fast ``_plainly_real`` check. Not repeated from the wave-3 files.

References: torch's ``F.cross_entropy`` in float64 run the same way (same transform, same
autograd call), and ``torch._subclasses.fake_tensor.is_fake`` for fake detection.

Found: nothing wrong in these two commits (every test passes).
"""

from __future__ import annotations

import doctest
import inspect
import pickle

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, is_fake
from torch.func import grad, jacfwd, jacrev, jvp, vmap

import crossent.torch as xt
import crossent.torch.distributed.cross_entropy as vp_module
import crossent.torch.distributed.linear as vpl_module
from crossent.errors import UnsupportedError
from crossent.torch import _rules
from crossent.torch.distributed import (
    vocab_parallel_cross_entropy as vp,
)
from crossent.torch.distributed import (
    vocab_parallel_linear_cross_entropy as vpl,
)

pytestmark = pytest.mark.timeout(120)

F64 = torch.float64
N, C, D = 6, 5, 3


def _data(seed=48):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(N, C, generator=g, dtype=F64)
    y = torch.randint(1, C, (N,), generator=g)  # no row targets class 0
    y[1] = y[4] = -100  # ignored rows: the composable path gathers class 0 there
    w = torch.rand(C, generator=g, dtype=F64) + 0.5
    x = torch.randn(N, D, generator=g, dtype=F64)
    lw = torch.randn(C, D, generator=g, dtype=F64)
    return z, y, w, x, lw


def _close(got, want):
    torch.testing.assert_close(got, want, equal_nan=True, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------- eager behaviour ----


@pytest.mark.parametrize("module", [vp_module, vpl_module])
def test_doctests_of_the_wrapped_functions_are_found_and_pass(module):
    """The decorator must not hide the docstring's examples from doctest (it finds a
    function through ``__module__``) or change their output."""
    tests = [t for t in doctest.DocTestFinder().find(module) if t.examples]
    names = {t.name.rsplit(".", 1)[1] for t in tests}
    assert {"vocab_parallel_cross_entropy", "vocab_parallel_linear_cross_entropy"} & names
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for t in tests:
        runner.run(t)
    assert runner.failures == 0 and runner.tries > 0


def test_wrapped_functions_keep_name_signature_and_pickle():
    for fn, first in ((vp, "local_logits"), (vpl, "input")):
        assert fn.__name__ in ("vocab_parallel_cross_entropy",
                               "vocab_parallel_linear_cross_entropy")
        assert next(iter(inspect.signature(fn).parameters)) == first
        assert pickle.loads(pickle.dumps(fn)) is fn  # spawn / partial by reference


def test_eager_refusals_unchanged_by_the_decorator():
    z, y, _, _, _ = _data()
    for transform in (lambda f: grad(f)(z), lambda f: vmap(f)(z[None]),
                      lambda f: jacrev(f)(z)):
        with pytest.raises(UnsupportedError, match="vocab_parallel_cross_entropy"):
            transform(lambda a: vp(a, y))
    a = z.clone().requires_grad_()
    loss = vp(a, y, reduction="none")
    with pytest.raises(UnsupportedError, match="is_grads_batched"):
        torch.autograd.grad(loss, a, torch.eye(N, dtype=F64), is_grads_batched=True)


# ------------------------------------------------ torch.compile / torch.export ----


@pytest.mark.parametrize("which", ["vp", "vpl"])
def test_fullgraph_names_the_function(which):
    z, y, _, x, lw = _data()
    fn, arg, name = ((lambda a: vp(a, y), z, "vocab_parallel_cross_entropy")
                     if which == "vp" else
                     (lambda a: vpl(a, lw, y), x, "vocab_parallel_linear_cross_entropy"))
    torch._dynamo.reset()
    with pytest.raises(Exception, match=name) as info:
        torch.compile(fn, fullgraph=True, backend="eager")(arg)
    # dynamo's refusal of the graph breaks inside the call; its user-code traceback names
    # the function (a torch.compiler.disable around it would cost a dynamo import, 2.4 s,
    # in every process that imports crossent.torch.distributed)
    assert "Unsupported" in type(info.value).__name__


class _Loss(torch.nn.Module):
    def __init__(self, lw):
        super().__init__()
        self.lw = torch.nn.Parameter(lw.clone())

    def forward(self, z, x, y):
        return vp(z, y) + vpl(x, self.lw, y)


@pytest.mark.parametrize("strict", [False, True])
def test_export_of_a_module_calling_them_names_the_function(strict):
    """``torch.export`` cannot trace the agreement's host reads: it must raise naming the
    function (dynamo's Unsupported with ``strict``, crossent's UnsupportedError naming
    FakeTensorMode without), never export something else."""
    z, y, _, x, lw = _data()
    with pytest.raises(Exception, match="vocab_parallel_cross_entropy") as info:
        torch.export.export(_Loss(lw), (z, x, y), strict=strict)
    assert isinstance(info.value, UnsupportedError) != strict


# ------------------------------------------------ the composable path's masked_fill ----


_OPTIONS = {
    "plain": {},
    "weight": {"weight": "w"},
    "weight-smooth": {"weight": "w", "label_smoothing": 0.1},
    "smooth": {"label_smoothing": 0.2},
}


def _kw(name, w, reduction):
    kw = dict(_OPTIONS[name], reduction=reduction)
    if "weight" in kw:
        kw["weight"] = w
    return kw


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("opt", list(_OPTIONS))
def test_torch_func_transforms_match_torch(opt, reduction):
    z, y, w, _, _ = _data()
    kw = _kw(opt, w, reduction)

    def ours(a):
        return xt.cross_entropy(a, y, **kw).sum()

    def theirs(a):
        return F.cross_entropy(a, y, **kw).sum()

    t = torch.randn_like(z)
    zz = torch.stack([z, 2 * z])
    _close(grad(ours)(z), grad(theirs)(z))
    _close(jvp(ours, (z,), (t,))[1], jvp(theirs, (z,), (t,))[1])
    _close(vmap(grad(ours))(zz), vmap(grad(theirs))(zz))
    _close(jacfwd(jacrev(ours))(z), jacfwd(jacrev(theirs))(z))


_BAD = [float("nan"), float("inf"), -float("inf")]


@pytest.mark.parametrize("bad", _BAD, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("opt", list(_OPTIONS))
def test_nonfinite_ignored_rows_as_torch_under_transforms(opt, bad):
    """An ignored row's non-finite logits and a non-finite weight of class 0 (which the
    composable path gathers on ignored rows, then masks): torch's loss and gradients
    (a NaN where torch has one, none where it has none), under grad, jvp, forward AD."""
    z, y, w, _, _ = _data()
    z[1] = bad
    w[0] = bad
    for reduction in ("mean", "sum", "none"):
        kw = _kw(opt, w, reduction)

        def ours(a, kw=kw):
            return xt.cross_entropy(a, y, **kw).sum()

        def theirs(a, kw=kw):
            return F.cross_entropy(a, y, **kw).sum()

        ones = torch.ones_like(z)
        _close(grad(ours)(z), grad(theirs)(z))
        _close(jvp(ours, (z,), (ones,))[1], jvp(theirs, (z,), (ones,))[1])
        with fwAD.dual_level():
            dual = fwAD.make_dual(z, ones)
            got = fwAD.unpack_dual(xt.cross_entropy(dual, y, **kw)).tangent
            want = fwAD.unpack_dual(F.cross_entropy(dual, y, **kw)).tangent
        _close(got, want)
        if opt == "weight":  # finite logits: an ignored row's w[0] shows nowhere (torch)
            finite = z.nan_to_num(0.0, 0.0, 0.0)
            want = grad(theirs)(finite)
            assert torch.isfinite(want).all()
            _close(grad(ours)(finite), want)


@pytest.mark.parametrize("bad", _BAD, ids=["nan", "inf", "-inf"])
def test_nonfinite_ignored_rows_double_backward_and_batched_grads(bad):
    z, y, w, _, _ = _data()
    z[1] = bad
    w[0] = bad
    v = torch.randn_like(z)
    for kw in ({}, {"weight": w, "label_smoothing": 0.1}):
        a, r = z.clone().requires_grad_(), z.clone().requires_grad_()
        ga, = torch.autograd.grad(xt.cross_entropy(a, y, **kw), a, create_graph=True)
        gr, = torch.autograd.grad(F.cross_entropy(r, y, **kw), r, create_graph=True)
        _close(ga, gr)
        _close(torch.autograd.grad((ga * v).sum(), a)[0],
               torch.autograd.grad((gr * v).sum(), r)[0])
        eye = torch.eye(N, dtype=F64)
        la = xt.cross_entropy(a, y, reduction="none", **kw)
        lr = F.cross_entropy(r, y, reduction="none", **kw)
        _close(torch.autograd.grad(la, a, eye, is_grads_batched=True)[0],
               torch.autograd.grad(lr, r, eye, is_grads_batched=True)[0])


# ------------------------------------------------ differentiated(gradient=False) ----


def test_vocab_parallel_takes_weight_and_count_that_require_grad_under_no_grad():
    z, y, w, _, _ = _data()
    wr, n = w.clone().requires_grad_(), torch.tensor(5.0, requires_grad=True)
    with torch.no_grad():
        _close(vp(z, y, weight=wr), F.cross_entropy(z, y, weight=w))
        _close(vp(z, y, reduction="sum", num_items=n), F.cross_entropy(z, y, reduction="sum") / 5)


def test_vocab_parallel_constant_weight_and_count_made_inside_jvp_are_taken():
    z, y, _, _, _ = _data()
    t = torch.randn_like(z)

    def ours(a):  # made from the transform's own (wrapped) tensor, carrying no tangent
        return vp(a, y, weight=torch.ones_like(a[0]) * 0.5, reduction="sum",
                  num_items=torch.ones_like(a).sum())

    def theirs(a):
        return F.cross_entropy(a, y, weight=torch.full((C,), 0.5, dtype=F64),
                               reduction="sum") / (N * C)

    got, want = jvp(ours, (z,), (t,)), jvp(theirs, (z,), (t,))
    _close(got[0], want[0])
    _close(got[1], want[1])


def test_vocab_parallel_weight_tangent_inside_vmap_is_refused():
    z, y, w, _, _ = _data()

    def f(ww):
        return jvp(lambda w2: vp(z, y, weight=w2), (ww,), (torch.ones_like(ww),))

    with pytest.raises(UnsupportedError, match=r"weight|torch\.func"):
        vmap(f)(w[None])


# ------------------------------------------------ fake_values's fast check ----


def _fake_cases():
    """``name: tensor-producing function`` run where the tensor is seen; is_fake is the
    reference."""
    mode = FakeTensorMode()
    real = torch.randn(N, C)
    return mode, real, mode.from_tensor(real)


def test_fake_values_agrees_with_is_fake_through_wrappers():
    _, real, fake = _fake_cases()
    seen = []

    def probe(t):
        seen.append((_rules.fake_values(t), is_fake(t)))
        return t.sum()

    for base in (real, fake):
        probe(base)
        probe(torch.nn.Parameter(base.clone()))
        vmap(probe)(base)
        grad(probe)(base.double() if base is real else base)
        jvp(probe, (base,), (torch.ones_like(base),))
        vmap(grad(probe))(base)
        torch.func.functionalize(probe)(base)
        unwrapped = torch._to_functional_tensor(base)
        probe(unwrapped)
    assert [want for _, want in seen].count(True) >= 8  # the reference saw the fakes
    assert [got for got, _ in seen] == [want for _, want in seen]


def test_fake_values_detects_python_functional_and_wrapper_subclasses_of_fakes():
    from torch._subclasses.functional_tensor import FunctionalTensor, FunctionalTensorMode
    from torch.testing._internal.two_tensor import TwoTensor

    _, _, fake = _fake_cases()
    two = TwoTensor(fake, fake.clone())
    assert is_fake(two) and _rules.fake_values(two)
    with FunctionalTensorMode():
        ft = FunctionalTensor.to_functional(fake)
    assert is_fake(ft) and _rules.fake_values(ft)


def test_crossent_on_fakes_behind_vmap_and_functionalize_gives_fakes():
    mode, _, fake = _fake_cases()
    y = mode.from_tensor(torch.randint(0, C, (N,)))
    out = vmap(lambda a: xt.cross_entropy(a, y, backend="rowblock"))(fake[None])
    assert isinstance(out, FakeTensor) and out.shape == (1,)
    out = torch.func.functionalize(lambda a: xt.cross_entropy(a, y, z_loss=1e-3))(fake)
    assert isinstance(out, FakeTensor) and out.shape == ()
