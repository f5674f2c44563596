"""Review (H46, session 17, wave 2) of the lead's fixes 96d9f93 / 11e9d40 on one process:
fake tensors (``_rules.fake_values``, ``_backends.choose_backend``'s fake branch, the
composable path's skipped host read), tensor subclasses with their own dispatch
(``_backends.own_dispatch``), and ``inplace_backward`` taking True/False only. Not
repeated from ``test_session17_fix_review.py`` / ``test_session17_training_review.py``.

References: ``torch.nn.functional.cross_entropy`` (on ``F.linear``) run on the same fake
tensors (shapes and dtypes) or in float64 on plain tensors (values); never crossent.

Found, fixed since (each test failed before):

* fake tensors outside their ``FakeTensorMode``: crossent's composable path died in torch's
  "Please convert all Tensors to FakeTensors" assertion (its Python scalars became real
  tensors); the entry points now re-enter the tensors' own mode
  (``_rules.within_fake_mode``). torch's own ``where(mask, x, 0.0)`` backward fails
  outside the mode too, so backward runs inside it;
* ``inplace_backward=numpy.True_``: eager took it, ``torch.compile`` refused it; one rule
  now (``_rules.check_flag``: True or False only, as ``shift``).

Documented instead: ``num_items`` as a fake 0-d tensor is refused naming ``num_items``
(crossent reads the count).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from grad_probes import DispatchWrapper as _Wrapper
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

import crossent.torch as xt
from crossent.errors import InputError, UnsupportedError
from crossent.torch import _backends

pytestmark = pytest.mark.timeout(120)

F64 = torch.float64
N, D, C = 6, 3, 5


def _data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(N, C, generator=g)
    y = torch.randint(0, C, (N,), generator=g)
    y[1] = -100
    x = torch.randn(N, D, generator=g)
    w = torch.randn(C, D, generator=g)
    cw = torch.rand(C, generator=g) + 0.5
    return z, y, x, w, cw


def _meta(t):
    return tuple(t.shape), t.dtype


# ------------------------------------------------ fake tensors outside their mode ----


def _outside_mode_cases():
    ce, lin = xt.cross_entropy, xt.linear_cross_entropy
    return {
        # crossent's call, torch's call (the same arguments): fakes used outside the mode
        "ce-rowblock": (lambda z, y, x, w: ce(z, y, backend="rowblock"),
                        lambda z, y, x, w: F.cross_entropy(z, y)),
        "ce-auto-z_loss": (lambda z, y, x, w: ce(z, y, z_loss=1e-3, reduction="none"),
                           lambda z, y, x, w: F.cross_entropy(z, y, reduction="none")),
        "linear-rowblock": (lambda z, y, x, w: lin(x, w, y, backend="rowblock"),
                            lambda z, y, x, w: F.cross_entropy(F.linear(x, w), y)),
    }


@pytest.mark.parametrize("case", list(_outside_mode_cases()))
def test_fake_tensors_used_outside_their_mode_give_torchs_shapes(case):
    """``own_dispatch``'s docstring names "FakeTensor outside its mode": fake tensors made
    by a mode and used after it exits (torch's operations re-enter their mode). crossent
    must give torch's shapes and dtypes for the loss and the gradient, as torch does on
    the same fakes."""
    z0, y0, x0, w0, _ = _data(1)
    mode = FakeTensorMode()
    z, x = (mode.from_tensor(t).requires_grad_() for t in (z0, x0))
    y, w = mode.from_tensor(y0), mode.from_tensor(w0)
    ours, theirs = _outside_mode_cases()[case]
    want = theirs(z, y, x, w)
    got = ours(z, y, x, w)
    leaf = x if case.startswith("linear") else z
    assert isinstance(got, FakeTensor) and _meta(got) == _meta(want)
    with mode:  # torch's own backward of where(mask, x, 0.0) fails outside the mode
        g, = torch.autograd.grad(got.sum(), leaf)
    assert _meta(g) == _meta(leaf)


@pytest.mark.parametrize("backend", ["auto", "rowblock"])
def test_fake_num_items_tensor_under_fake_tensor_mode_is_refused_naming_it(backend):
    """A per-token-normalised loss (``reduction="sum"``, ``num_items`` a 0-d tensor, as
    HF's trainer passes it) traced for shapes: crossent reads the count (its > 0 check),
    which a fake tensor cannot give: ``UnsupportedError`` naming ``num_items`` and the
    way out (a Python number), documented in docs/guarantees.md; never torch's
    data-dependent error."""
    z0, y0, *_ = _data(2)
    with FakeTensorMode() as mode:
        z, y = mode.from_tensor(z0).requires_grad_(), mode.from_tensor(y0)
        n = mode.from_tensor(torch.tensor(5.0))
        with pytest.raises(UnsupportedError, match=r"num_items.*Python number"):
            xt.cross_entropy(z, y, reduction="sum", num_items=n, backend=backend)
        got = xt.cross_entropy(z, y, reduction="sum", num_items=5, backend=backend)
        assert isinstance(got, FakeTensor) and got.shape == ()


@pytest.mark.parametrize("backend", ["auto", "rowblock"])
def test_fake_mode_double_backward_and_transforms_on_the_composable_path(backend):
    """Under ``FakeTensorMode`` the composable path (crossent's options torch lacks:
    z-loss, with smoothing and class weights) gives double backward, ``jvp`` and ``vmap``
    torch's shapes (the existing test covers double backward on torch's kernel only)."""
    z0, y0, x0, w0, cw0 = (t.to(F64) if t.is_floating_point() else t for t in _data(3))
    with FakeTensorMode() as mode:
        z = mode.from_tensor(z0).requires_grad_()
        y, cw = mode.from_tensor(y0), mode.from_tensor(cw0)
        kw = {"z_loss": 1e-3, "label_smoothing": 0.1, "weight": cw, "backend": backend}
        g, = torch.autograd.grad(xt.cross_entropy(z, y, **kw), z, create_graph=True)
        h, = torch.autograd.grad(g.pow(2).sum(), z)
        _, tangent = torch.func.jvp(lambda a: xt.cross_entropy(a, y, reduction="none", **kw),
                                    (z.detach(),), (z.detach(),))
        batched = torch.func.vmap(lambda a: xt.cross_entropy(a, y, **kw))(
            torch.stack([z.detach()] * 3))
        x, w = mode.from_tensor(x0).requires_grad_(), mode.from_tensor(w0)
        gx, = torch.autograd.grad(xt.linear_cross_entropy(x, w, y, backend=backend, z_loss=1e-3),
                                  x, create_graph=True)
        hx, = torch.autograd.grad(gx.pow(2).sum(), x)
    assert _meta(h) == _meta(g) == _meta(z)
    assert _meta(tangent) == ((N,), F64) and _meta(batched) == ((3,), F64)
    assert _meta(hx) == _meta(x)


# ------------------------------------ subclasses with their own __torch_dispatch__ ----


@pytest.mark.native_dispatch
@pytest.mark.parametrize("backend", ["auto", "native"])
def test_own_dispatch_subclass_takes_torchs_kernel_with_torchs_numbers(backend):
    """A wrapper subclass (not DTensor) with torch's options: torch's loss and gradient
    (float64 reference), the result still the subclass; crossent's kernels refused by
    name (never torch's internal mixed-tensor error)."""
    z0, y0, _, _, cw = _data(4)
    z = _Wrapper(z0.to(F64).clone()).requires_grad_()
    got = xt.cross_entropy(z, _Wrapper(y0), weight=_Wrapper(cw.to(F64)), label_smoothing=0.1,
                           backend=backend)
    g, = torch.autograd.grad(got, z)
    ref_in = z0.to(F64).requires_grad_()
    want = F.cross_entropy(ref_in, y0, weight=cw.to(F64), label_smoothing=0.1)
    h, = torch.autograd.grad(want, ref_in)
    assert isinstance(got, _Wrapper)
    torch.testing.assert_close(got.inner, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g.inner, h, rtol=1e-12, atol=1e-12)
    for call in (lambda: xt.cross_entropy(z, _Wrapper(y0), backend="rowblock"),
                 lambda: xt.cross_entropy(z, _Wrapper(y0), z_loss=1e-3, backend="auto"),
                 lambda: xt.linear_cross_entropy(_Wrapper(z0), torch.randn(4, C), y0,
                                                 backend="rowblock")):
        with pytest.raises(UnsupportedError, match=_Wrapper.__name__):
            call()


@pytest.mark.parametrize("kind", ["Parameter", "Buffer"])
def test_parameter_and_buffer_are_not_counted_as_subclasses(kind):
    """``nn.Parameter`` / ``nn.Buffer`` logits and class weights keep crossent's kernels
    (``own_dispatch`` is None; ``backend="rowblock"`` would raise for a subclass) with
    torch's numbers."""
    z0, y0, x0, w0, cw = _data(5)
    make = torch.nn.Parameter if kind == "Parameter" else torch.nn.Buffer
    z, w = make(z0.clone()), make(w0.clone())
    weight = make(cw.clone(), requires_grad=False) if kind == "Parameter" else make(cw.clone())
    assert _backends.own_dispatch(z, w, weight) is None
    got = xt.cross_entropy(z, y0, weight=weight, backend="rowblock")
    lin = xt.linear_cross_entropy(x0, w, y0, backend="rowblock")
    want = F.cross_entropy(z0.to(F64), y0, weight=cw.to(F64))
    torch.testing.assert_close(got.to(F64), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lin.to(F64), F.cross_entropy(F.linear(x0, w0).to(F64), y0),
                               rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------- inplace_backward flags ----


def test_inplace_backward_set_on_the_module_after_construction_is_checked():
    """The constructor checks ``inplace_backward``; a config applied to the attribute
    later (``loss.inplace_backward = "False"``) must raise too, before the logits are
    touched."""
    z0, y0, *_ = _data(6)
    leaf = z0.clone().requires_grad_()
    logits = leaf * 2.0
    keep = logits.detach().clone()
    module = xt.CrossEntropyLoss(backend="rowblock")
    module.inplace_backward = "False"
    with pytest.raises(InputError, match="inplace_backward"):
        module(logits, y0).backward()
    assert torch.equal(logits.detach(), keep)


def _compiled_outcome(value) -> str:
    z0, y0, *_ = _data(7)
    torch._dynamo.reset()
    fn = torch.compile(lambda z, y: xt.cross_entropy(z, y, inplace_backward=value),
                       backend="eager", fullgraph=True)
    try:
        fn(z0, y0)
    except InputError as error:
        assert "inplace_backward" in str(error)
        return "InputError"
    return "returned"


def _eager_outcome(value) -> str:
    z0, y0, *_ = _data(7)
    try:
        xt.cross_entropy(z0, y0, inplace_backward=value)
    except InputError:
        return "InputError"
    return "returned"


def test_compiled_inplace_backward_string_is_refused_by_name():
    """Under ``torch.compile`` (``_custom_ops._BOOL``) a string flag raises InputError
    naming ``inplace_backward``, as eager."""
    assert _compiled_outcome("False") == _eager_outcome("False") == "InputError"


def test_numpy_bool_inplace_backward_eager_and_compiled_agree():
    """One rule for the flags of crossent.torch (``_rules.check_flag``): a NumPy bool is
    refused by name eagerly, as under ``torch.compile`` (which hands it over as an
    array)."""
    assert _compiled_outcome(np.True_) == _eager_outcome(np.True_) == "InputError"
