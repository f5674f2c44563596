"""Review (H47, session 17, wave 3) of the lead's fixes a2658f2 on one process:
``_rules.within_fake_mode`` (fake tensors used after their ``FakeTensorMode`` exited: the
entry points re-enter it) and ``_rules.check_flag`` (``shift``). Not repeated from
``test_session17_wave2_review.py`` / ``test_session17_fix_review.py``.

References: torch's ``F.cross_entropy`` (on ``F.linear``) run on the same fake tensors
(shapes, dtypes, and whether it runs at all) or in float64 on plain tensors (values).

Found, fixed since (each test failed before):

* fake tensors used outside their mode: the forward re-enters the mode, but the backward
  of the composable path does not (``loss.backward()`` / ``autograd.grad`` after the
  call, and ``torch.func.grad``, which differentiates inside the transform): torch's
  "Please convert all Tensors to FakeTensors" AssertionError from the backward of
  ``torch.where(valid, losses, 0.0)`` (``_composite.cross_entropy``; the derivative's
  scalar 0 becomes a real tensor), where torch's own ``F.cross_entropy`` on the same fakes
  gives the gradient. H46's test ran the backward inside the mode and missed it;
* ``LinearCrossEntropyLoss(shift="False")`` is built (docs/guarantees.md: the module's
  constructor refuses a flag that is not True or False); it raises only at forward.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

import crossent.torch as xt
from crossent.errors import InputError

pytestmark = pytest.mark.timeout(120)

F64 = torch.float64
N, D, C = 6, 3, 5


def _fakes():
    """Fake leaves made by a mode that has exited (as a shape-propagation pass leaves
    them), and the mode."""
    g = torch.Generator().manual_seed(47)
    mode = FakeTensorMode()
    z = mode.from_tensor(torch.randn(N, C, generator=g)).requires_grad_()
    y0 = torch.randint(0, C, (N,), generator=g)
    y0[1] = -100
    x = mode.from_tensor(torch.randn(N, D, generator=g)).requires_grad_()
    w = mode.from_tensor(torch.randn(C, D, generator=g))
    return mode, z, mode.from_tensor(y0), x, w


def _meta(t):
    return tuple(t.shape), t.dtype


# --------------------------------------- the backward of fakes outside their mode ----


_BACKWARD_CASES = {
    # crossent's call, torch's call on the same fakes (torch's runs outside the mode)
    "ce-rowblock": (lambda z, y, x, w: xt.cross_entropy(z, y, backend="rowblock"),
                    lambda z, y, x, w: F.cross_entropy(z, y), "z"),
    "ce-auto-z_loss": (lambda z, y, x, w: xt.cross_entropy(z, y, z_loss=1e-3),
                       lambda z, y, x, w: F.cross_entropy(z, y), "z"),
    "linear-rowblock": (lambda z, y, x, w: xt.linear_cross_entropy(x, w, y,
                                                                   backend="rowblock"),
                        lambda z, y, x, w: F.cross_entropy(F.linear(x, w), y), "x"),
}


@pytest.mark.parametrize("case", list(_BACKWARD_CASES))
def test_backward_of_fakes_outside_their_mode_as_torch(case):
    """``loss.backward()`` after the call, outside the mode, as torch's own loss on the
    same fakes allows: the gradient's shape and dtype."""
    ours, theirs, leaf = _BACKWARD_CASES[case]
    _, z, y, x, w = _fakes()
    leaf_t = {"z": z, "x": x}[leaf]
    want, = torch.autograd.grad(theirs(z, y, x, w), leaf_t)  # torch: fine outside
    got, = torch.autograd.grad(ours(z, y, x, w), leaf_t)
    assert isinstance(got, FakeTensor) and _meta(got) == _meta(want)


@pytest.mark.parametrize("kind", ["logits", "linear"])
def test_torch_func_grad_of_fakes_outside_their_mode_as_torch(kind):
    _, z, y, x, w = _fakes()

    def ours(a):
        if kind == "logits":
            return xt.cross_entropy(a, y, z_loss=1e-3)
        return xt.linear_cross_entropy(a, w, y, z_loss=1e-3)

    def theirs(a):
        return F.cross_entropy(a if kind == "logits" else F.linear(a, w), y)

    arg = (z if kind == "logits" else x).detach()
    want = torch.func.grad(theirs)(arg)
    got = torch.func.grad(ours)(arg)
    assert isinstance(got, FakeTensor) and _meta(got) == _meta(want)


# --------------------------------------- the forward of fakes outside their mode ----


def test_fakes_outside_their_mode_statistics_spatial_and_shift_give_torchs_shapes():
    """The re-entered mode covers every route's forward: ``statistics=`` (rowblock's
    fused statistics and the logits' ones on torch's kernel), ``(N, C, d)`` logits with
    ``reduction="none"`` and a z-loss (the composable path), and ``shift=True`` on the
    linear head (its label shift outside the mode): torch's shapes, fake results."""
    mode, z, y, _, w = _fakes()
    g = torch.Generator().manual_seed(1)
    z3 = mode.from_tensor(torch.randn(2, C, 4, generator=g)).requires_grad_()
    y3 = mode.from_tensor(torch.randint(0, C, (2, 4), generator=g))
    h = mode.from_tensor(torch.randn(2, 4, D, generator=g)).requires_grad_()
    for backend in ("rowblock", "auto"):
        loss, stats = xt.cross_entropy(z, y, backend=backend,
                                       statistics=("accuracy", "lse"))
        assert isinstance(loss, FakeTensor) and _meta(loss) == _meta(F.cross_entropy(z, y))
        assert _meta(stats.lse) == ((N,), torch.float32)
        assert _meta(stats.accuracy) == _meta(stats.counted) == ((N,), torch.bool)
    got = xt.cross_entropy(z3, y3, reduction="none", z_loss=1e-3)
    assert isinstance(got, FakeTensor)
    want = F.cross_entropy(z3, y3, reduction="none")
    assert _meta(got) == _meta(want) == ((2, 4), torch.float32)
    want = F.cross_entropy(F.linear(h[:, :-1], w).reshape(-1, C), y3[:, 1:].reshape(-1),
                           reduction="none")
    for backend in ("rowblock", "auto"):
        got = xt.linear_cross_entropy(h, w, y3, shift=True, reduction="none", backend=backend)
        assert isinstance(got, FakeTensor) and _meta(got) == ((2, 3), want.dtype)


def test_real_calls_next_to_live_fakes_stay_real_with_torchs_values():
    """``within_fake_mode`` must not enter a mode for plain tensors while fake tensors
    (and their mode) exist elsewhere: real results with torch's float64 values on every
    route (torch's kernel, the composable path, the row-block kernel, statistics)."""
    _fakes()  # alive, mode exited
    g = torch.Generator().manual_seed(2)
    z = torch.randn(N, C, 3, generator=g, dtype=F64)
    y = torch.randint(0, C, (N, 3), generator=g)
    want = F.cross_entropy(z, y, reduction="none", label_smoothing=0.1)
    for backend in ("auto", "native", "rowblock"):
        got = xt.cross_entropy(z, y, reduction="none", label_smoothing=0.1, backend=backend)
        assert type(got) is torch.Tensor
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    loss, stats = xt.cross_entropy(z, y, statistics="accuracy", backend="native")
    assert type(loss) is torch.Tensor and type(stats.accuracy) is torch.Tensor
    torch.testing.assert_close(loss, F.cross_entropy(z, y), rtol=1e-12, atol=1e-12)
    assert torch.equal(stats.accuracy, z.argmax(1) == y)


# ------------------------------------------------------------------ the shift flag ----


@pytest.mark.parametrize("value", ["False", np.True_, 1, None])
def test_shift_not_a_bool_is_refused_by_name_in_the_function_and_module(value):
    """``_rules.check_flag`` for ``shift`` (the function and the module's forward):
    InputError naming ``shift``, never the truthiness of ``"False"``."""
    g = torch.Generator().manual_seed(3)
    h, w = torch.randn(2, 4, D, generator=g), torch.randn(C, D, generator=g)
    t = torch.randint(0, C, (2, 4), generator=g)
    with pytest.raises(InputError, match="shift"):
        xt.linear_cross_entropy(h, w, t, shift=value)
    module = xt.LinearCrossEntropyLoss(D, C)
    module.shift = value
    with pytest.raises(InputError, match="shift"):
        module(h, t)


@pytest.mark.parametrize("value", ["False", np.False_])
def test_linear_module_constructor_refuses_a_shift_that_is_not_a_bool(value):
    with pytest.raises(InputError, match="shift"):
        xt.LinearCrossEntropyLoss(D, C, shift=value)
