"""The rules behind issue 11's core findings, each on every backend against an independent
reference: narrow integer targets compared exactly, class axes that must match, PyTorch's
BCE gradient at probabilities 0 and 1, ignored rows that contribute nothing, finite focal
gradients, dtype-aware row-sum tolerance, gradients with respect to soft targets, and
logsumexp as accurate as SciPy's."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from numerics import PROPERTY, low_precision_input
from references import t64, torch_softmax_ce

import crossent as xe

NARROW = ["uint8", "int8", "int16", "int32"]


def _narrow_labels(dtype: str) -> np.ndarray:
    """Labels that fit ``dtype`` but not as class ids compared in it: with 300 classes,
    uint8 156 is -100 wrapped and int8 100 sits near its top."""
    return np.array({"uint8": [156, 3, 255, 0], "int8": [100, 3, 127, 0],
                     "int16": [299, 3, 156, 0], "int32": [299, 3, 156, 0]}[dtype], dtype=dtype)


# ---- 1 and 9: class indices compared exactly, whatever their dtype ----------------------


@pytest.mark.parametrize("dtype", NARROW)
def test_narrow_integer_targets_give_torchs_loss_for_their_values(backend, rng, dtype):
    z = rng.normal(size=(4, 300))
    y = _narrow_labels(dtype)
    want = F.cross_entropy(t64(z), torch.as_tensor(y.astype(np.int64))).item()
    got = xe.softmax_cross_entropy(backend.asarray(z), backend.asarray(y))
    np.testing.assert_allclose(backend.to_numpy(got), want, rtol=1e-10)
    grad = xe.softmax_cross_entropy_grad(backend.asarray(z), backend.asarray(y))
    want_grad = xe.softmax_cross_entropy_grad(z, y.astype(np.int64))
    np.testing.assert_allclose(backend.to_numpy(grad), want_grad, rtol=1e-12)


def test_uint8_label_156_is_not_mistaken_for_ignore_index_minus_100(backend, rng):
    z = rng.normal(size=(2, 200))
    y = np.array([156, 7], dtype=np.uint8)
    per_row = backend.to_numpy(xe.softmax_cross_entropy(
        backend.asarray(z), backend.asarray(y), reduction="none"))
    want = F.cross_entropy(t64(z), torch.tensor([156, 7]), reduction="none").numpy()
    np.testing.assert_allclose(per_row, want, rtol=1e-10)
    assert per_row[0] > 0


@pytest.mark.parametrize("dtype", ["uint8", "int8", "int16"])
def test_one_hot_of_a_narrow_label_sets_only_its_class(backend, dtype):
    out = backend.to_numpy(xe.one_hot(backend.asarray(np.array([1, 100], dtype=dtype)), 300))
    assert out.shape == (2, 300)
    assert np.flatnonzero(out[0]).tolist() == [1] and np.flatnonzero(out[1]).tolist() == [100]


def test_int16_target_with_33000_classes_is_valid(backend):
    z = np.zeros((1, 33_000))
    z[0, 5] = 2.0
    got = xe.softmax_cross_entropy(backend.asarray(z), backend.asarray(np.array([5], np.int16)))
    want = F.cross_entropy(t64(z), torch.tensor([5])).item()
    np.testing.assert_allclose(backend.to_numpy(got), want, rtol=1e-10)


def test_an_ignore_index_outside_the_targets_dtype_ignores_nothing(backend, rng):
    z, y = rng.normal(size=(3, 4)), np.array([0, 1, 3], dtype=np.uint8)
    got = xe.softmax_cross_entropy(backend.asarray(z), backend.asarray(y), ignore_index=-1)
    want = F.cross_entropy(t64(z), torch.tensor([0, 1, 3])).item()
    np.testing.assert_allclose(backend.to_numpy(got), want, rtol=1e-10)


def test_a_huge_target_is_reported_exactly(backend):
    with pytest.raises(xe.InputError, match=r"class index 1099511627776, outside \[0, 3\)"):
        xe.softmax_cross_entropy(backend.asarray(np.zeros((1, 3))),
                                 backend.asarray(np.array([2**40])))


def test_class_ids_above_2_to_the_24_are_told_apart():
    """float32 holds integers exactly only up to 2^24: 2^24 + 1 must not become 2^24."""
    num_classes = 2**24 + 2
    z = np.zeros((1, num_classes), dtype=np.float32)
    z[0, 2**24], z[0, 2**24 + 1] = -5.0, 5.0
    label = np.array([2**24 + 1])
    loss = float(xe.softmax_cross_entropy(z, label))
    # lse of (C - 2) zeros, e^5 and e^-5, minus the target logit 5
    want = math.log(num_classes - 2 + math.exp(5) + math.exp(-5)) - 5.0
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    hot = xe.one_hot(label, num_classes, dtype=np.bool_)
    assert np.flatnonzero(hot[0]).tolist() == [2**24 + 1]


# ---- 2: class axes must match -----------------------------------------------------------


@pytest.mark.parametrize("fn", [xe.cross_entropy, xe.kl_divergence])
@pytest.mark.parametrize(("p", "q"), [([1.0], [0.3, 0.7]), ([0.5, 0.5], [1.0]),
                                      ([[0.5, 0.5]], [[0.2, 0.3, 0.5]])])
def test_distributions_over_different_classes_are_rejected_naming_p_and_q(backend, fn, p, q):
    with pytest.raises(xe.InputError, match=r"^p has shape .* and q has shape"):
        fn(backend.asarray(p), backend.asarray(q))


def test_batch_axes_still_broadcast(backend, rng):
    p, q = rng.dirichlet(np.ones(4), size=3), rng.dirichlet(np.ones(4))
    got = backend.to_numpy(xe.cross_entropy(backend.asarray(p), backend.asarray(q)))
    np.testing.assert_allclose(got, -(p * np.log(q)).sum(-1), rtol=1e-12)


# ---- 3: binary cross-entropy's gradient at probabilities 0 and 1 is torch's --------------

EDGE_Q = [0.0, 1e-13, 1e-30, 0.5, 1 - 1e-13, 1.0, 0.0, 1.0, 0.3]
EDGE_T = [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.5, 0.5, 0.0]


def _torch_bce_grads(q, t, dtype):
    q = torch.tensor(q, dtype=dtype, requires_grad=True)
    t = torch.tensor(t, dtype=dtype, requires_grad=True)
    loss = F.binary_cross_entropy(q, t, reduction="none")
    gq, gt = torch.autograd.grad(loss.sum(), (q, t))
    return loss.detach().numpy(), gq.numpy(), gt.numpy()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_bce_gradient_at_the_clamp_is_torchs(dtype):
    q = torch.tensor(EDGE_Q, dtype=dtype, requires_grad=True)
    t = torch.tensor(EDGE_T, dtype=dtype, requires_grad=True)
    loss = xe.binary_cross_entropy(q, t, reduction="none")
    gq, gt = torch.autograd.grad(loss.sum(), (q, t))
    want_loss, want_gq, want_gt = _torch_bce_grads(EDGE_Q, EDGE_T, dtype)
    rtol = 1e-12 if dtype == torch.float64 else 1e-6
    np.testing.assert_allclose(loss.detach().numpy(), want_loss, rtol=rtol)
    np.testing.assert_allclose(gq.numpy(), want_gq, rtol=rtol)
    finite = np.isfinite(want_gt)  # torch's d/dt is +-inf at q = 0 and 1: here +-100
    np.testing.assert_allclose(gt.numpy()[finite], want_gt[finite], rtol=rtol)
    np.testing.assert_array_equal(np.sign(gt.numpy()[~finite]), np.sign(want_gt[~finite]))


def test_bce_gradient_at_the_clamp_under_jax_grad_is_torchs():
    q, t = jnp.asarray(EDGE_Q), jnp.asarray(EDGE_T)
    gq = jax.grad(lambda q: xe.binary_cross_entropy(q, t, reduction="sum", validate=False))(q)
    _, want_gq, _ = _torch_bce_grads(EDGE_Q, EDGE_T, torch.float64)
    np.testing.assert_allclose(np.asarray(gq), want_gq, rtol=1e-12)


def test_bce_second_derivative_away_from_the_clamp_is_torchs():
    q = torch.tensor([0.2, 0.7], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([1.0, 0.25], dtype=torch.float64)

    def hessian_diag(fn):
        (g,) = torch.autograd.grad(fn(q, t, reduction="sum"), q, create_graph=True)
        return torch.autograd.grad(g.sum(), q)[0].numpy()

    np.testing.assert_allclose(hessian_diag(xe.binary_cross_entropy),
                               hessian_diag(F.binary_cross_entropy), rtol=1e-9)


# ---- 4: ignored rows contribute nothing, even with NaN logits ----------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_an_ignored_nan_row_contributes_nothing_with_z_loss(backend, rng, reduction,
                                                           label_smoothing):
    z = rng.normal(size=(4, 5))
    z[1] = np.nan
    y = np.array([2, -100, 0, 4])
    kw = dict(z_loss=1e-2, label_smoothing=label_smoothing, reduction=reduction)
    got = backend.to_numpy(xe.softmax_cross_entropy(backend.asarray(z), backend.asarray(y), **kw))
    kept = y != -100  # torch's loss over the counted rows only: same sum, same denominator
    want = torch_softmax_ce(t64(z[kept]), t64(y[kept]), **kw).numpy()
    if reduction == "none":
        want = np.insert(want, 1, 0.0)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, want, rtol=1e-10)
    grad = backend.to_numpy(xe.softmax_cross_entropy_grad(
        backend.asarray(z), backend.asarray(y), **kw))
    assert np.all(grad[1] == 0) and np.all(np.isfinite(grad))


# ---- 5: focal loss with 0 < gamma < 1 keeps a finite gradient ----------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("gamma", [0.25, 0.5, 0.99])
def test_focal_gradient_of_a_saturated_correct_logit_is_its_limit_0(dtype, gamma):
    x = torch.tensor([200.0, -200.0, 1000.0, 2.0, -1.0], dtype=dtype, requires_grad=True)
    t = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.3], dtype=dtype)
    (g,) = torch.autograd.grad(xe.sigmoid_focal_loss(x, t, gamma=gamma, reduction="sum"), x)
    assert torch.all(torch.isfinite(g))
    assert torch.all(g[:3].abs() < 1e-30)
    x_ref = x.detach()[3:].double().requires_grad_()
    p = torch.sigmoid(x_ref)
    t_ref = t[3:].double()
    p_t = p * t_ref + (1 - p) * (1 - t_ref)
    ref = (0.25 * t_ref + 0.75 * (1 - t_ref)) * (1 - p_t) ** gamma * \
        F.binary_cross_entropy_with_logits(x_ref, t_ref, reduction="none")
    (want,) = torch.autograd.grad(ref.sum(), x_ref)
    rtol = 1e-10 if dtype == torch.float64 else 1e-5
    np.testing.assert_allclose(g[3:].double().numpy(), want.numpy(), rtol=rtol)


# ---- 7 and 8: arguments checked by value, dtypes kept ------------------------------------


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_low_precision_distributions_pass_the_row_sum_check(backend, dtype):
    p = low_precision_input(backend, [0.1, 0.2, 0.7], dtype)  # float16 sum: 1.000122
    assert np.isfinite(backend.to_numpy(xe.entropy(p)).astype(float))
    assert np.isfinite(backend.to_numpy(xe.cross_entropy(p, p)).astype(float))
    z = low_precision_input(backend, [[0.0, 1.0, 2.0]], dtype)
    xe.softmax_cross_entropy(z, xe.smooth_labels(low_precision_input(backend, [[0.1, 0.2, 0.7]],
                                                                       dtype), 0.0))


def test_the_row_sum_tolerance_follows_the_dtype(backend):
    off = np.array([0.5, 0.5 + 3e-3])  # more than 2 float16 eps (1.95e-3) off
    p = low_precision_input(backend, off, "float16")
    with pytest.raises(xe.InputError, match=r"^p must sum to 1 .*tolerance 0\.00195"):
        xe.entropy(p)


def test_smooth_labels_and_mixup_keep_float16(backend):
    t = low_precision_input(backend, [[0.0, 1.0], [1.0, 0.0]], "float16")
    assert xe.smooth_labels(t, 0.1).dtype == t.dtype
    x_mix, t_mix = xe.mixup(t, t, alpha=0.4, seed=0)
    assert x_mix.dtype == t.dtype and t_mix.dtype == t.dtype
    _, t_hot = xe.mixup(t, backend.asarray([0, 1]), alpha=0.4, seed=0, num_classes=2)
    assert t_hot.dtype == t.dtype


def test_probability_targets_refuse_an_ignore_index_like_torch(backend):
    z, p = backend.asarray(np.zeros((2, 3))), backend.asarray(np.full((2, 3), 1 / 3))
    with pytest.raises(RuntimeError, match="ignore_index is not supported"):
        F.cross_entropy(torch.zeros(2, 3), torch.full((2, 3), 1 / 3), ignore_index=0)
    with pytest.raises(xe.InputError, match=r"^ignore_index=0 applies to class-index targets"):
        xe.softmax_cross_entropy(z, p, ignore_index=0)
    xe.softmax_cross_entropy(z, p, ignore_index=-1)  # negative: unused, as in torch


def test_value_checks_under_jax_jit_name_validate_and_can_be_skipped():
    labels = jnp.asarray([0, 1, 5])
    with pytest.raises(xe.InputError, match="pass validate=False"):
        jax.jit(lambda v: xe.one_hot(v, 3))(labels)
    out = jax.jit(lambda v: xe.one_hot(v, 3, validate=False))(labels)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(jax.nn.one_hot(labels, 3)))


# ---- other projects' findings: soft-target gradient, empty and complex, accuracy --------


def test_soft_target_gradient_is_minus_log_softmax_also_where_the_target_is_0():
    z = torch.tensor([[10.0, 1.0, -2.0]], dtype=torch.float64)
    t = torch.tensor([[0.0, 1.0, 0.0]], dtype=torch.float64, requires_grad=True)
    (ours,) = torch.autograd.grad(xe.softmax_cross_entropy(z, t), t)
    (theirs,) = torch.autograd.grad(F.cross_entropy(z, t), t)
    np.testing.assert_allclose(ours.numpy(), theirs.numpy(), rtol=1e-12)
    np.testing.assert_allclose(ours.numpy(), -torch.log_softmax(z, -1).numpy(), rtol=1e-12)


def test_soft_target_gradient_under_jax_grad_matches_optax():
    import optax

    z, t = jnp.asarray([[10.0, 1.0, -2.0]]), jnp.asarray([[0.0, 1.0, 0.0]])
    ours = jax.grad(lambda t: xe.softmax_cross_entropy(z, t, validate=False))(t)
    theirs = jax.grad(lambda t: optax.softmax_cross_entropy(z, t).sum())(t)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=1e-12)


def test_logsumexp_of_nothing_is_minus_inf_and_softmax_of_nothing_is_empty(backend):
    empty = backend.asarray(np.zeros((2, 0)))
    np.testing.assert_array_equal(backend.to_numpy(xe.logsumexp(empty)), [-np.inf, -np.inf])
    np.testing.assert_array_equal(backend.to_numpy(xe.logsumexp(backend.asarray([]))), -np.inf)
    assert backend.to_numpy(xe.softmax(empty)).shape == (2, 0)
    assert backend.to_numpy(xe.log_softmax(empty)).shape == (2, 0)
    assert torch.logsumexp(torch.zeros(2, 0), -1).tolist() == [-math.inf, -math.inf]


@pytest.mark.parametrize("fn", [xe.logsumexp, xe.softmax, xe.entropy, xe.surprisal])
def test_complex_input_is_rejected_naming_the_argument(fn):
    with pytest.raises(xe.InputError, match=r"holds complex values"):
        fn(np.array([1 + 1j, 2 - 1j]))


def test_logsumexp_keeps_the_digits_near_zero_like_scipy(backend):
    x = backend.asarray([0.0, -40.0])
    np.testing.assert_allclose(backend.to_numpy(xe.logsumexp(x)),
                               scipy.special.logsumexp([0.0, -40.0]), rtol=6e-8)
    np.testing.assert_allclose(backend.to_numpy(xe.logsumexp(x)), math.log1p(math.exp(-40)),
                               rtol=1e-15)
    loss = xe.softmax_cross_entropy(backend.asarray([[0.0, -40.0]]), backend.asarray([0]))
    np.testing.assert_allclose(backend.to_numpy(loss), math.log1p(math.exp(-40)), rtol=1e-15)
    lsm = backend.to_numpy(xe.log_softmax(x))
    np.testing.assert_allclose(lsm[0], -math.log1p(math.exp(-40)), rtol=1e-15)


def test_logsumexp_gradient_with_tied_maxima_is_the_softmax():
    x = torch.tensor([[3.0, 3.0, 1.0], [0.0, 0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(xe.logsumexp(x).sum(), x)
    np.testing.assert_allclose(g.numpy(), torch.softmax(x.detach(), -1).numpy(), rtol=1e-15)
    xj = jnp.asarray(x.detach().numpy())
    gj = jax.grad(lambda v: xe.logsumexp(v).sum())(xj)
    np.testing.assert_allclose(np.asarray(gj), torch.softmax(x.detach(), -1).numpy(), rtol=1e-15)


@PROPERTY
@given(arrays("float64", st.integers(1, 6), elements=st.floats(-50, 50)))
def test_logsumexp_is_accurate_to_a_few_roundings_of_its_two_parts(x):
    """Against 400-digit mpmath: the error is a few roundings of ``max(x)`` and of
    ``lse - max(x)``, so a result near 0 (``[0, -40]``) keeps its relative accuracy."""
    import mpmath

    with mpmath.workdps(400):
        exact = mpmath.log(mpmath.fsum(mpmath.exp(mpmath.mpf(float(v))) for v in x))
        want = float(exact)
        rest = abs(float(exact - mpmath.mpf(float(x.max()))))
    tolerance = 4 * np.finfo(np.float64).eps * (abs(float(x.max())) + rest)
    assert abs(float(xe.logsumexp(x)) - want) <= tolerance


def test_validation_under_torch_vmap_names_validate_false():
    """torch.func.vmap cannot read values: InputError saying to pass validate=False, not
    torch's own "data-dependent control flow" RuntimeError."""
    torch = pytest.importorskip("torch")
    import crossent as xe
    from crossent.errors import InputError

    z, y = torch.randn(3, 4, 5), torch.randint(0, 5, (3, 4))
    with pytest.raises(InputError, match="validate=False"):
        torch.func.vmap(lambda a, b: xe.softmax_cross_entropy(a, b))(z, y)
    got = torch.func.vmap(lambda a, b: xe.softmax_cross_entropy(a, b, validate=False))(z, y)
    want = torch.stack([torch.nn.functional.cross_entropy(z[i], y[i]) for i in range(3)])
    torch.testing.assert_close(got, want)
