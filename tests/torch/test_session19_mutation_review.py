"""Session 19, H59: tests that kill hand-made mutants of crossent.torch's shared rules and
CPU kernels (_rules.py, _rowblock.py, _chunked_head.py, _small.py, _composite.py) which
the suite let live. Each test names the rule it pins; the references are torch (float64
where it matters), torch's own division, or closed forms, never crossent's own output
alone."""

from __future__ import annotations

import math

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

import crossent.torch as xt
from crossent.errors import InputError

pytestmark = pytest.mark.timeout(60)

# an integer count past 2**53: float(n) rounds it (to 2**53 + 2**29, a float32 tie that
# rounds to 2**53), where torch's ``sum / n`` rounds the int to float32 once (2**53 + 2**30)
_BIG_COUNT = 2**53 + 2**29 + 1


def _data(rows: int, classes: int, seed: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(rows, classes, generator=g, dtype=torch.float64).to(dtype)
    y = torch.randint(0, classes, (rows,), generator=g)
    return z, y


# ---- num_items: an integer count is rounded once (_rules.count_value, count_tensor)


def test_integer_num_items_past_2_53_divides_as_torchs_sum_over_n():
    """``num_items=n`` for a Python int divides as torch's ``loss_sum / n`` does: n rounded
    to float32 once (count_value keeps ints under 2**64 as ints; float(n) first would round
    twice and divide by 2**53). Reference: torch's division of the same summed loss by the
    int, and float64 softmax - onehot over float32(n) for the gradient."""
    z, y = _data(64, 50, 0)
    leaf = z.clone().requires_grad_()
    total = xt.cross_entropy(z, y, reduction="sum", num_items=1)  # divides exactly by 1
    torch.testing.assert_close(total, F.cross_entropy(z, y, reduction="sum"))
    loss = xt.cross_entropy(leaf, y, reduction="sum", num_items=_BIG_COUNT)
    assert torch.equal(loss, total / _BIG_COUNT)  # torch: one rounding of n
    assert not torch.equal(loss, total / float(_BIG_COUNT))  # the twice-rounded count differs
    loss.backward()
    once = torch.tensor(_BIG_COUNT, dtype=torch.int64).to(torch.float32).double()
    assert once.item() == 2**53 + 2**30
    ref = (torch.softmax(z.double(), 1) - F.one_hot(y, 50).double()) / once
    # the mean relative deviation: ~1e-9 with float32(n), 1.2e-7 with 2**53 (a bias)
    bias = (leaf.grad.double() / ref - 1).mean().item()
    assert abs(bias) < 3e-8, bias


# ---- the composable path (_composite.row_losses, cross_entropy)


@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_no_classes_with_label_smoothing_under_forward_ad_is_nan_as_torch(reduction):
    """C = 0 with class indices (all ignored) and label smoothing: torch scales its
    smoothing sum by eps / C = inf, NaN on every row (``0 x inf``), primal and tangent.
    Forward-mode AD takes the composable path (the row-wise ``smooth * inf`` term)."""
    z = torch.empty(3, 0, dtype=torch.float64, device="cpu")
    t = torch.full((3,), -100, device="cpu")
    with fwAD.dual_level():
        dual = fwAD.make_dual(z, torch.zeros_like(z))
        ref = fwAD.unpack_dual(F.cross_entropy(dual, t, label_smoothing=0.1,
                                               reduction=reduction))
        got = fwAD.unpack_dual(xt.cross_entropy(dual, t, label_smoothing=0.1,
                                                reduction=reduction))
    assert ref.primal.isnan().all() and ref.tangent.isnan().all()  # torch's pattern
    torch.testing.assert_close(got.primal, ref.primal, equal_nan=True)
    torch.testing.assert_close(got.tangent, ref.tangent, equal_nan=True)


def test_ignored_row_does_not_read_an_infinite_weight_of_class_zero_under_grad():
    """An ignored row's index is set to 0 and its class weight masked to 0 (a fill, not
    ``w[0] x 0``): with ``w[0] = inf`` the product would be NaN and poison the ``"mean"``
    denominator and every gradient. torch.func.grad takes the composable path. Reference:
    torch's own loss under torch.func.grad, float64."""
    g = torch.Generator().manual_seed(1)
    z = torch.randn(4, 3, generator=g, dtype=torch.float64)
    t = torch.tensor([1, -100, 2, -100], device="cpu")
    w = torch.tensor([math.inf, 2.0, 0.5], dtype=torch.float64, device="cpu")

    def grad_of(fn):
        return torch.func.grad_and_value(lambda q: fn(q, t, weight=w, reduction="mean"))(z)

    ref_grad, ref_loss = grad_of(F.cross_entropy)
    got_grad, got_loss = grad_of(xt.cross_entropy)
    assert torch.isfinite(ref_loss) and torch.isfinite(ref_grad).all()
    torch.testing.assert_close(got_loss, ref_loss)
    torch.testing.assert_close(got_grad, ref_grad)


# ---- the small-batch kernel (_small.cross_entropy)


@pytest.mark.native_dispatch
@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_small_kernel_subnormal_target_probability_takes_log_softmax(monkeypatch, reduction):
    """A float32 target probability below 1e-30 but above 0 (here e^-101, a subnormal with
    three significant bits) must not be logged: -log p_y would be off by up to 0.05. The
    small kernel switches to log_softmax there (``_TINY``). Reference: torch in float64."""
    from crossent.torch import _backends, _small

    monkeypatch.setattr(_backends, "SMALL_MIN_LOGITS", 1)
    calls = []
    real = _small._SmallCrossEntropy.apply
    monkeypatch.setattr(_small._SmallCrossEntropy, "apply",
                        lambda *a: calls.append(1) or real(*a))
    z, y = _data(6, 5, 3)
    z[:, 0] = 50.0
    y[:] = 1
    z[:, 1] = 50.0 - torch.tensor([101.0, 100.3, 102.2, 99.1, 101.7, 100.9])
    ref = F.cross_entropy(z.double(), y, reduction=reduction)
    leaf = z.clone().requires_grad_()
    got = xt.cross_entropy(leaf, y, reduction=reduction)
    assert calls, "the small route was not taken"
    torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=1e-5)


# ---- the chunked linear head: when ignored rows may be skipped (_chunked_head.split_rows)


def _linear_grads(fn, x, w, b, t, **kw):
    leaves = [v.clone().requires_grad_() for v in (x, w, b)]
    loss = fn(leaves[0], leaves[1], t, leaves[2], **kw)
    loss.backward()
    return [loss.detach().double()] + [v.grad.double() for v in leaves]


def _torch_head(x, w, t, b, **kw):
    kw = {k: v.double() if torch.is_tensor(v) else v for k, v in kw.items()}
    return F.cross_entropy(F.linear(x.double(), w.double(), b.double()), t, **kw)


def _head_case(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 4, generator=g)
    w = torch.randn(5, 4, generator=g)
    b = torch.randn(5, generator=g)
    t = torch.tensor([1, -100, 2, 4, -100, 0], device="cpu")
    return x, w, b, t


@pytest.mark.parametrize("bad", ["class_weight", "linear_weight", "linear_bias"])
def test_linear_head_keeps_ignored_rows_where_torch_makes_them_nan(bad):
    """Ignored rows are skipped only where torch's gradient of them is exactly 0. Not with
    label smoothing and an infinite class weight (torch's ``0 x inf``, idle_rows_nan), nor
    with a NaN in W or an inf in b (the row's logits are NaN/inf, and torch's softmax
    backward makes its zero gradient NaN): dx of the ignored rows is NaN in torch.
    Reference: torch's F.linear + F.cross_entropy in float64."""
    x, w, b, t = _head_case()
    kw = {}
    if bad == "class_weight":
        kw = dict(weight=torch.tensor([1.0, math.inf, 0.5, 2.0, 1.0], device="cpu"),
                  label_smoothing=0.1)
    elif bad == "linear_weight":
        w[3, 2] = math.nan
    else:
        b[2] = math.inf
    ref = _linear_grads(_torch_head, x, w, b, t, **kw)
    got = _linear_grads(xt.linear_cross_entropy, x, w, b, t, **kw)
    assert ref[1][t == -100].isnan().all()  # torch's ignored rows: NaN dx
    for r, g_ in zip(ref, got, strict=True):
        torch.testing.assert_close(g_, r, rtol=1e-4, atol=1e-5, equal_nan=True)


# ---- the row-block kernel (_rowblock.cross_entropy_rows)


def test_softcap_row_whose_target_probability_underflows_uses_the_capped_max():
    """With ``softcap`` the row max is taken of the capped logits for every row (no lazy
    max: a row whose p_y underflows would otherwise read the uncapped source max, 1000
    instead of 50). Reference: torch on ``50 tanh(z / 50)`` in float64."""
    g = torch.Generator().manual_seed(4)
    z = torch.randn(4, 5, generator=g)
    z[:, 0], z[:, 1] = 1000.0, -1000.0  # capped: 50 and -50, p_1 = e^-100 underflows
    y = torch.tensor([1, 2, 1, 3], device="cpu")
    ref = F.cross_entropy(50 * torch.tanh(z.double() / 50), y, reduction="none")
    got = xt.cross_entropy(z, y, reduction="none", softcap=50.0, backend="rowblock")
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-4)


def test_lse_statistic_of_a_row_with_an_infinite_max_is_that_infinity():
    """``statistics="lse"`` of a counted row holding +inf is +inf, of a row of -inf logits
    -inf (torch.logsumexp), not the NaN of ``m - log max p`` (the kernel's ``lse_out``)."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4, 5, generator=g)
    z[1, 2] = math.inf
    z[2] = -math.inf
    y = torch.tensor([0, 1, 2, 3], device="cpu")
    _, stats = xt.cross_entropy(z, y, reduction="none", statistics="lse", backend="rowblock")
    torch.testing.assert_close(stats.lse.double(), torch.logsumexp(z.double(), 1))


def test_label_smoothing_with_an_infinite_class_weight_follows_torch():
    """Label smoothing with a class weight of +inf: torch's smoothing term is
    ``sum_c w_c (lse - z_c)`` itself (+inf, never ``inf x 0`` where that class holds the
    row max: the kernel's exact_smooth logsumexp, not the row max), and its ignored rows'
    gradient is NaN throughout (``0 x inf`` spread by log_softmax: the kernel's
    nan_idle). Reference: torch in float64."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(5, 4, generator=g)
    z[0, 1], z[2, 1] = 5.0, 4.0  # the infinite-weight class holds the row max
    y = torch.tensor([0, -100, 2, 3, 0], device="cpu")
    w = torch.tensor([1.0, math.inf, 0.5, 2.0], device="cpu")
    ref_leaf, leaf = z.double().requires_grad_(), z.clone().requires_grad_()
    ref = F.cross_entropy(ref_leaf, y, weight=w.double(), label_smoothing=0.1, reduction="none")
    got = xt.cross_entropy(leaf, y, weight=w, label_smoothing=0.1, reduction="none",
                           backend="rowblock")
    torch.testing.assert_close(got.double(), ref.detach(), equal_nan=True)
    ref.sum().backward()
    got.sum().backward()
    assert ref_leaf.grad[1].isnan().all()  # torch: the ignored row is NaN
    torch.testing.assert_close(leaf.grad.double(), ref_leaf.grad, equal_nan=True)


# ---- shared rules (_rules.make_options)


@pytest.mark.parametrize("shape", [(3, 1), (1, 3)])
def test_class_weight_of_c_entries_in_two_dims_is_refused_naming_weight(shape):
    """A class weight must have shape (C,): one of shape (C, 1) or (1, C) raises an
    InputError naming ``weight`` (torch raises a RuntimeError for it), not taken as C
    weights."""
    z = torch.randn(2, 3, device="cpu")
    y = torch.tensor([0, 1], device="cpu")
    w = torch.ones(shape, device="cpu")
    with pytest.raises(RuntimeError):
        F.cross_entropy(z, y, weight=w)
    with pytest.raises(InputError, match="weight"):
        xt.cross_entropy(z, y, weight=w, backend="rowblock")
