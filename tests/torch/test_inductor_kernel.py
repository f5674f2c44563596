"""The opt-in compiled (inductor CPU) gradient kernel ``crossent.torch._inductor``, against
float64 torch: loss and gradient of index targets with ignore_index and class weights,
confident rows (true-class ``p - 1`` in float32 before rounding, PITFALLS 6), -inf and NaN
logits, in place, one row / one class. One compilation serves every test (dynamic
shapes); float32 logits compile a second graph."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from crossent.torch import _inductor

pytestmark = [pytest.mark.skipif(not _inductor.available(), reason="no C++ compiler"),
              pytest.mark.timeout(300)]

BF16_ULP = 2.0 ** -8  # bfloat16: 8 significant bits; one rounding is within half of this


def _row_scalars(y, weight, ignore_index):
    """``a``, ``c`` of the mean loss with torch's semantics: a = -c = w[y] / sum w[y]."""
    valid = y != ignore_index
    safe = torch.where(valid, y, 0)
    w = torch.ones(()) if weight is None else weight[safe]
    mass = torch.where(valid, w, 0.0).float()
    scale = mass / mass.sum()
    return safe, scale, -scale


def _reference(z, y, weight, ignore_index):
    x = z.double().requires_grad_()
    w = None if weight is None else weight.double()
    loss = F.cross_entropy(x, y, weight=w, ignore_index=ignore_index)
    return loss.detach(), torch.autograd.grad(loss, x)[0]


def _check(z, y, weight=None, ignore_index=-100, inplace=False):
    safe, a, c = _row_scalars(y, weight, ignore_index)
    ref_loss, ref_grad = _reference(z, y, weight, ignore_index)
    work = z.clone()
    grad, lse, nll = _inductor.softmax_grad_rows(work, safe, a, c,
                                                 out=work if inplace else None)
    assert grad.dtype == z.dtype and lse.dtype == torch.float32
    if inplace:
        assert grad.data_ptr() == work.data_ptr()
    counted = a != 0
    loss = (nll.double() * a.double())[counted].sum()
    # float32 sum of C exponentials: |ds| <= C 2^-24 s, so |d nll| <= C 2^-24 (any float32
    # kernel, torch's included: a confident row's 1 + 1.5e-4 carries ~1e-7 absolute error)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=z.shape[1] * 2.0 ** -24)
    x = z.double()
    torch.testing.assert_close(lse.double(), x.logsumexp(1), rtol=1e-6, atol=1e-6)
    err = (grad.double() - ref_grad).abs()
    rel = BF16_ULP if z.dtype == torch.bfloat16 else 2.0 ** -20
    # one rounding, plus the float32 exp-sum's error (see above) times the row scale
    bound = ref_grad.abs() * rel + z.shape[1] * 2.0 ** -24 * float(a.abs().max())
    assert bool((err <= bound).all()), float((err - bound).max())
    assert bool((grad[~counted] == 0).all())
    return grad, lse, nll


def _logits(rows, classes, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, classes, generator=g) * scale).bfloat16(), g


def test_plain_weighted_and_ignored_rows_match_float64_torch():
    z, g = _logits(37, 300, 0)
    y = torch.randint(0, 300, (37,), generator=g)
    _check(z, y)
    y[::5] = -100
    weight = torch.rand(300, generator=g) + 0.1
    _check(z, y, weight=weight)
    y[y == -100] = 3
    y[::7] = 299  # ignore_index a real class id: still in the denominator
    _check(z, y, weight=weight, ignore_index=299)


def test_confident_rows_keep_their_true_class_gradient():
    # p_y = 1 - 1e-4: in bfloat16 p_y rounds to 1 and p_y - 1 to 0; float32 keeps it
    z, g = _logits(8, 500, 1, scale=0.0)
    y = torch.randint(0, 500, (8,), generator=g)
    z[torch.arange(8), y] = 15.0  # 499 e^-15 = 1.5e-4 off 1
    grad, _, _ = _check(z, y)
    true = grad[torch.arange(8), y].double()
    ref = _reference(z, y, None, -100)[1][torch.arange(8), y]
    assert bool((true < 0).all())  # rounded before subtracting 1, it would be 0
    torch.testing.assert_close(true, ref, rtol=0.05, atol=0)  # float32 sum: ~1% here


def test_minus_inf_logits_give_zero_gradient_and_nan_propagates_like_torch():
    z, g = _logits(6, 64, 2)
    y = torch.randint(0, 64, (6,), generator=g)
    y[y == 0] = 1
    z[:, 0] = float("-inf")  # a masked class
    grad, _, _ = _check(z, y)
    assert bool((grad[:, 0] == 0).all())
    z[2, 5] = float("nan")  # counted row: NaN loss and gradient, as torch
    z[3, 7] = float("nan")  # ignored row: NaN too, as torch (exp(NaN) * 0)
    y[3] = -100
    safe, a, c = _row_scalars(y, None, -100)
    grad, lse, _ = _inductor.softmax_grad_rows(z.clone(), safe, a, c)
    assert bool(lse[2].isnan()) and bool(grad[2].isnan().all())
    ref = _reference(z, y, None, -100)[1]
    assert bool(ref[3].isnan().all()) and bool(grad[3].isnan().all())
    rest = torch.tensor([0, 1, 4, 5])
    assert bool(grad[rest].isfinite().all())


def test_rows_far_from_their_target_take_the_max_shift():
    # z_c - z_y = 100: exp overflows with the target shift; the row is redone from its max
    z, g = _logits(9, 80, 7)
    y = torch.randint(0, 80, (9,), generator=g)
    z[2, (int(y[2]) + 1) % 80] = 100.0
    z[5, :] = -50.0
    z[5, (int(y[5]) + 3) % 80] = 60.0  # in place too: the row is redone before the copy
    y[6] = -100
    z[6, 0] = 120.0  # an ignored row taking the other path
    _check(z, y)
    _check(z, y, inplace=True)


def test_in_place_equals_new_buffer_across_blocks(monkeypatch, workers):
    z, g = _logits(23, 200, 3)
    y = torch.randint(0, 200, (23,), generator=g)
    y[4] = -100
    monkeypatch.setattr(_inductor, "_BLOCK_ELEMENTS", 5 * 200)  # blocks of 5 rows + 3
    new = _check(z, y)
    same = _check(z, y, inplace=True)
    assert all(torch.equal(p, q) for p, q in zip(new, same, strict=True))


def test_one_row_and_one_class():
    z, _ = _logits(1, 50, 4)
    _check(z, torch.tensor([3]))
    _check(z, torch.tensor([3]), inplace=True)
    z1, _ = _logits(9, 1, 5)
    grad, lse, nll = _check(z1, torch.zeros(9, dtype=torch.long))
    assert bool((grad == 0).all()) and bool((nll == 0).all())
    assert torch.equal(lse, z1[:, 0].float())


def test_float32_logits():
    z, g = _logits(12, 100, 6)
    z = z.float() + torch.randn(12, 100, generator=g) * 1e-3
    y = torch.randint(0, 100, (12,), generator=g)
    _check(z, y)
