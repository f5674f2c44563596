"""Session 17, H44: tests that kill mutants of crossent.torch's shared rules which the
suite let live (hand mutation testing of _rules.py, _rowblock.py, _cross_entropy.py,
_linear.py). Each test names the rule it pins; references are torch in float64 or
closed forms, never crossent's own output."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import crossent.torch as xt
from crossent.errors import InputError, UnsupportedError

pytestmark = pytest.mark.timeout(60)


def _probabilities(rows: int, classes: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(rows, classes, generator=g), 1)


# ---- dtypes (_rules.promote_with_target, matmul_dtype, check_weight_dtype)


def test_probability_target_loss_promotes_with_a_float64_class_weight():
    """torch multiplies log p by the target and by the class weight: float32 logits and
    target with a float64 weight give a float64 loss (promote_with_target's weight step)."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, 5, generator=g)
    t = _probabilities(6, 5, 1)
    w = torch.rand(5, generator=g, dtype=torch.float64) + 0.5
    ref = F.cross_entropy(z.double(), t.double(), weight=w)
    got = xt.cross_entropy(z, t, weight=w)
    assert got.dtype == torch.float64 == F.cross_entropy(z, t, weight=w).dtype
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)


def test_float16_linear_head_on_cpu_rounds_its_logits_as_torch():
    """On CPU float16 operands are multiplied in float32 (matmul_dtype), then the logits are
    rounded to float16 as torch's ``F.linear`` rounds them (review H71: a logit past 65504
    must be inf, as torch's). Reference: the float64 loss of torch's float16 logits."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(64, 64, generator=g).half()
    w = torch.randn(40, 64, generator=g).half()
    y = torch.randint(0, 40, (64,), generator=g)
    ref = F.cross_entropy(F.linear(x, w).double(), y, reduction="none")
    exact = F.cross_entropy(x.double() @ w.double().T, y, reduction="none")
    got = xt.linear_cross_entropy(x, w, y, loss_dtype=torch.float32, reduction="none")
    assert got.dtype == torch.float32
    # torch's float16 logits: 1e-5 here (float32 products, one rounding each); the exact
    # product's loss is 7e-3 away, which float32 logits would have come within 6e-6 of
    assert (got.double() - ref).abs().max().item() < 1e-4
    assert (got.double() - exact).abs().max().item() > 1e-3


def test_autocast_takes_a_low_precision_weight_as_torch():
    """Under autocast torch casts logits and weight to float32 alike, so a bfloat16 weight
    with bfloat16 logits is taken (check_weight_dtype compares the autocast dtypes)."""
    g = torch.Generator().manual_seed(3)
    z = torch.randn(8, 6, generator=g).bfloat16()
    y = torch.randint(0, 6, (8,), generator=g)
    w = (torch.rand(6, generator=g) + 0.5).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.cross_entropy(z, y, weight=w)
        got = xt.cross_entropy(z, y, weight=w)
    assert got.dtype == ref.dtype == torch.float32
    exact = F.cross_entropy(z.double(), y, weight=w.double())
    torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=1e-5)


# ---- option checks (_rules.check_num_items, check_ignore_index)


def test_num_items_that_requires_grad_is_refused_as_such():
    """A count that requires grad is refused with the message that says so (detach it),
    not the torch.func/forward-AD one (which would send the user looking for a transform)."""
    z, y = torch.randn(4, 3, requires_grad=True), torch.tensor([0, 1, 2, 0])
    with pytest.raises(UnsupportedError, match=r"requires grad.*detach"):
        xt.cross_entropy(z, y, num_items=torch.tensor(4.0, requires_grad=True))


@pytest.mark.parametrize("flag", [True, False])
def test_bool_ignore_index_raises_instead_of_ignoring_class_one_or_zero(flag):
    """ignore_index=True is not class 1 (operator.index(True) == 1 would silently drop
    every target of class 1 from the loss and its denominator)."""
    z, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 1])
    with pytest.raises(InputError, match="ignore_index"):
        xt.cross_entropy(z, y, ignore_index=flag)
    with pytest.raises(InputError, match="ignore_index"):
        xt.linear_cross_entropy(torch.randn(4, 2), torch.randn(3, 2), y, ignore_index=flag)


# ---- the row-block kernel (_rowblock)


def test_zero_probability_target_facing_minus_inf_logit_contributes_zero():
    """A probability target of exactly 0 contributes 0 where the logit is -inf (the
    kernel's rule, xlogy's 0 log 0 = 0; torch's own product gives NaN there)."""
    z = torch.tensor([[0.0, -math.inf, 1.0]], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([[0.5, 0.0, 0.5]], dtype=torch.float64)
    logp = torch.log_softmax(z.detach()[:, [0, 2]], 1)  # class 1 has probability 0
    want = -(0.5 * logp).sum()
    got = xt.cross_entropy(z, t)
    torch.testing.assert_close(got, want)
    grad = torch.autograd.grad(got, z)[0]
    assert grad.isfinite().all()


def test_linear_head_nan_upstream_on_an_ignored_row_changes_nothing():
    """reduction="none": torch forms an ignored row's gradient from nothing, so a NaN
    upstream there leaves its dx row 0 (the kernel's row multiplier must keep an ignored
    row's scale 0, not 0 x NaN). Another ignored row holds an inf feature, so the head
    runs every row through the kernel (torch's dW = G^T x is NaN there, 0 x inf)."""
    g = torch.Generator().manual_seed(10)
    x = torch.randn(4, 3, generator=g, dtype=torch.float64)
    x[3, 0] = math.inf
    x.requires_grad_()
    w_head = torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([1, -100, 2, -100])
    upstream = torch.tensor([1.0, math.nan, 2.0, 1.0], dtype=torch.float64)
    ref = F.cross_entropy(F.linear(x, w_head), y, reduction="none")
    ref_dx, ref_dw = torch.autograd.grad(ref, (x, w_head), upstream)
    got = xt.linear_cross_entropy(x, w_head, y, reduction="none")
    dx, dw = torch.autograd.grad(got, (x, w_head), upstream)
    assert not ref_dx[1].any()  # the reference's claim
    torch.testing.assert_close(dx, ref_dx, rtol=1e-12, atol=1e-12, equal_nan=True)
    assert torch.equal(dw.isnan(), ref_dw.isnan())


def test_linear_head_all_rows_ignored_nan_upstream_leaves_dw_and_db_zero():
    """Every row ignored: torch's dlogits is 0 whatever the upstream, so dW and db stay 0
    under a NaN grad_output (the head multiplies them by 0 when nothing is counted)."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(3, 2, generator=g, dtype=torch.float64, requires_grad=True)
    w_head = torch.randn(4, 2, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.full((3,), -100)
    upstream = torch.tensor(math.nan, dtype=torch.float64)
    ref = F.cross_entropy(F.linear(x, w_head, bias), y, reduction="sum")
    refs = torch.autograd.grad(ref, (x, w_head, bias), upstream)
    got = xt.linear_cross_entropy(x, w_head, y, bias, reduction="sum")
    grads = torch.autograd.grad(got, (x, w_head, bias), upstream)
    for want, have in zip(refs, grads, strict=True):
        assert not want.any()  # the reference's claim: zeros
        assert torch.equal(have, want)


# ---- entry point (_cross_entropy)


def test_ignore_index_zero_with_probability_targets_raises():
    """ignore_index applies to class indices only; torch raises for any given with
    probability targets, class 0 included (only the default -100 passes)."""
    z, t = torch.randn(3, 4), _probabilities(3, 4, 12)
    with pytest.raises(RuntimeError):
        F.cross_entropy(z, t, ignore_index=0)
    with pytest.raises(InputError, match="ignore_index=0 with probability targets"):
        xt.cross_entropy(z, t, ignore_index=0)


def test_float64_loss_of_float32_logits_rounds_a_huge_grad_output_as_torch():
    """loss_dtype=float64 from float32 logits: torch's cast back (ToCopyBackward) rounds a
    grad_output of 1e300 to float32 inf, and the target entries become inf - inf = NaN;
    the stored gradient times a finite 1e300 would not give that pattern."""
    g = torch.Generator().manual_seed(13)
    z = torch.randn(3, 4, generator=g, requires_grad=True)
    y = torch.tensor([1, 0, 3])
    upstream = torch.tensor(1e300, dtype=torch.float64)
    ref = torch.autograd.grad(F.cross_entropy(z, y).to(torch.float64), z, upstream)[0]
    got = torch.autograd.grad(xt.cross_entropy(z, y, loss_dtype=torch.float64), z,
                              upstream)[0]
    assert ref[0, 1].isnan()  # the reference's claim
    assert torch.equal(got.isnan(), ref.isnan())
    assert torch.equal(got.isinf(), ref.isinf())


def test_class_weight_gradient_counts_a_zero_target_at_minus_inf_as_zero():
    """Probability targets, reduction="sum": ``dL/dw_c = -sum_n t_nc log p_nc`` with the
    loss's own rule that a zero target facing ``log p = -inf`` contributes 0 (xlogy),
    not ``0 x -inf = NaN``. Reference: torch.xlogy in float64."""
    z = torch.tensor([[0.0, -math.inf, 1.0], [0.5, 0.0, -1.0]], dtype=torch.float64,
                     requires_grad=True)
    t = torch.tensor([[0.5, 0.0, 0.5], [0.2, 0.3, 0.5]], dtype=torch.float64)
    w = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64, requires_grad=True)
    want = -torch.xlogy(t, torch.softmax(z.detach(), 1)).sum(0)
    (got,) = torch.autograd.grad(xt.cross_entropy(z, t, weight=w, reduction="sum"), w)
    assert want.isfinite().all()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
