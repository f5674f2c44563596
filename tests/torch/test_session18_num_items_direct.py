"""Stop 18: a Python-number ``num_items`` on the direct torch-kernel call, and counts or
options too large for a float.

The commonest call with ``num_items`` (Hugging Face's ``num_items_in_batch`` as a Python
int, float32 logits, int64 targets) now goes straight to torch's operator: ``"sum"``
divided by the count, as the checked path divides. References: torch's own
``F.cross_entropy(..., reduction="sum") / n`` (float64 for the gradients)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import crossent
import crossent.torch as xt
from crossent.torch import _cross_entropy, _rules

pytestmark = pytest.mark.native_dispatch  # small inputs keep the route to torch's kernel


def _data(rows=6, classes=5, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(rows, classes, generator=g, dtype=dtype)
    y = torch.randint(0, classes, (rows,), generator=g)
    return z, y


def _refuse_checked_path(monkeypatch):
    def checked(*args, **kwargs):
        raise AssertionError("the checked path ran")
    monkeypatch.setattr(_cross_entropy, "make_options", checked)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("count", [1, 7, 2.5, 1e6])
def test_python_count_goes_to_torchs_kernel_with_torchs_numbers(monkeypatch, dtype, reduction,
                                                                count):
    z, y = _data(dtype=dtype)
    y[1] = -100
    _refuse_checked_path(monkeypatch)
    a = z.clone().requires_grad_()
    loss = xt.cross_entropy(a, y, num_items=count, reduction=reduction, label_smoothing=0.1)
    loss.backward()
    b = z.clone().requires_grad_()
    want = F.cross_entropy(b, y, reduction="sum", label_smoothing=0.1) / count
    want.backward()
    assert loss.dtype == want.dtype
    torch.testing.assert_close(loss, want, rtol=0, atol=0)
    torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)


def test_direct_count_equals_the_checked_paths(monkeypatch):
    """Same bits as the checked path (a 0-d tensor count takes it: it needs a host read)."""
    z, y = _data(rows=40, classes=9)
    direct = xt.cross_entropy(z, y, num_items=13)
    checked = xt.cross_entropy(z, y, num_items=torch.tensor(13))
    assert torch.equal(direct, checked)


def test_count_on_the_small_fused_kernel_route(monkeypatch):
    """Large enough float32 logits needing a gradient take ``_small``; the count divides."""
    from crossent.torch import _backends

    monkeypatch.setattr(_backends, "small_kernel_fits", lambda *a: True)
    z, y = _data(rows=32, classes=11)
    a = z.clone().requires_grad_()
    loss = xt.cross_entropy(a, y, num_items=50)
    loss.backward()
    b = z.double().requires_grad_()
    want = F.cross_entropy(b, y, reduction="sum") / 50
    want.backward()
    torch.testing.assert_close(loss.double(), want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(a.grad.double(), b.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("count", [0, -3, 0.0, float("nan"), float("inf"), 10**400, -10**400,
                                   True, "4"])
def test_a_bad_python_count_still_raises_crossents_error(count):
    z, y = _data()
    with pytest.raises(crossent.InputError, match="num_items"):
        xt.cross_entropy(z, y, num_items=count)


def test_count_with_reduction_none_still_raises():
    z, y = _data()
    with pytest.raises(crossent.InputError, match="num_items"):
        xt.cross_entropy(z, y, num_items=4, reduction="none")


@pytest.mark.parametrize("name", ["label_smoothing", "z_loss", "softcap"])
@pytest.mark.parametrize("value", [10**400, -10**400])
def test_options_beyond_float_range_name_the_argument(name, value):
    """``float(10**400)`` raises OverflowError; crossent names the argument instead."""
    z, y = _data()
    with pytest.raises(crossent.InputError, match=name):
        xt.cross_entropy(z, y, **{name: value})


def test_core_options_beyond_float_range_name_the_argument():
    import numpy as np

    with pytest.raises(crossent.InputError, match="base"):
        crossent.cross_entropy(np.array([0.5, 0.5]), np.array([0.5, 0.5]), base=10**400)
    with pytest.raises(crossent.InputError, match="label_smoothing"):
        crossent.softmax_cross_entropy(np.zeros((2, 3)), np.array([0, 1]),
                                       label_smoothing=-10**400)


def test_check_num_items_rounds_a_huge_count_to_inf_and_refuses_it():
    with pytest.raises(crossent.InputError, match="num_items"):
        _rules.check_num_items(2**1100, "mean")
    assert _rules.check_num_items(2**60, "sum") == float(2**60)
