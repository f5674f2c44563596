"""Analytic gradients against torch autograd (through torch's own losses, in float64) and
central finite differences, on every backend; and autograd through crossent itself on
torch and JAX. PITFALLS 4, 6, 9 and 12 are pinned here.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from numerics import (
    LOW_PRECISION,
    NAN_MEAN_EXPECTED,
    assert_match,
    assert_rounded_from,
    low_precision,
    on,
    on_kwargs,
    rounded_to_float32,
)
from references import (
    REDUCTIONS,
    ce_data,
    ce_option_grid,
    masked_data,
    t64,
    torch_layout,
    torch_softmax_ce,
)

import crossent as xe

AUTOGRAD = "torch autograd"
ZCAP_GRID = [(1e-2, None), (0.0, 3.0), (1e-2, 3.0)]


def torch_grad(loss_fn, z, grad_output=None):
    """d sum(grad_output * loss_fn(z)) / dz by torch autograd (grad_output=None: ones)."""
    zt = torch.tensor(z, requires_grad=True)
    out = loss_fn(zt)
    (out if grad_output is None else out * t64(grad_output)).sum().backward()
    return zt.grad.numpy()


def central_difference(loss_fn, z, h=1e-6):
    """d sum(loss_fn(z)) / dz, one coordinate at a time (z float64 NumPy)."""
    grad = np.zeros_like(z)
    for i in np.ndindex(z.shape):
        step = np.zeros_like(z)
        step[i] = h
        grad[i] = (np.sum(loss_fn(z + step)) - np.sum(loss_fn(z - step))) / (2 * h)
    return grad


def ce_grad(backend, z, target, weight=None, **kw):
    z, target, weight = on(backend, z, target, weight)
    return backend.to_numpy(xe.softmax_cross_entropy_grad(z, target, weight=weight, **kw))


def torch_ce_grad(z, target, weight=None, axis=-1, grad_output=None, **kw):
    """Autograd through F.cross_entropy (+ z-loss, softcap) in torch's class-axis-1 layout."""
    z1, target1 = torch_layout(z, target, axis)
    grad = torch_grad(lambda zt: torch_softmax_ce(zt, t64(target1), weight=t64(weight), **kw),
                      z1, grad_output)
    return np.moveaxis(grad, 1, axis)


def torch_sigmoid_loss(per_sample, target, weight, pos_weight, reduction):
    """BCEWithLogits in torch; ``per_sample`` sums the label axis (multi-label) first."""
    def loss(xt):
        out = F.binary_cross_entropy_with_logits(xt, t64(target), weight=t64(weight),
                                                 pos_weight=t64(pos_weight), reduction="none")
        out = out.sum(-1) if per_sample else out
        return {"none": out, "sum": out.sum(), "mean": out.mean()}[reduction]
    return loss


SIGMOID_GRADS = {
    "sigmoid_binary_cross_entropy": (xe.sigmoid_binary_cross_entropy_grad, False),
    "multilabel_cross_entropy": (xe.multilabel_cross_entropy_grad, True),
}


def sigmoid_data(rng, shape=(6, 4)):
    x, t = 3.0 * rng.normal(size=shape), rng.random(shape)
    return x, t, rng.uniform(0.5, 2.0, size=shape[-1:])


# ---- softmax cross-entropy gradient vs torch autograd ----------------------------------


@pytest.mark.parametrize(("kind", "weighted", "ignore", "eps", "reduction"), ce_option_grid())
def test_softmax_ce_grad_matches_torch_autograd_for_every_option_combination(
    backend, rng, kind, weighted, ignore, eps, reduction
):
    z, y, w, extra = ce_data(rng, kind, weighted, ignore)
    kw = dict(label_smoothing=eps, reduction=reduction, **extra)
    assert_match(ce_grad(backend, z, y, w, **kw), torch_ce_grad(z, y, w, **kw),
                 f"softmax_cross_entropy_grad | {AUTOGRAD} F.cross_entropy")


@pytest.mark.parametrize(("z_loss", "softcap"), ZCAP_GRID)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", ["index", "prob"])
def test_softmax_ce_grad_with_z_loss_and_softcap_matches_torch_autograd(
    backend, rng, kind, reduction, z_loss, softcap
):
    z, y, w, extra = ce_data(rng, kind, True, -100 if kind == "index" else None)
    kw = dict(label_smoothing=0.1, z_loss=z_loss, softcap=softcap, reduction=reduction, **extra)
    assert_match(ce_grad(backend, z, y, w, **kw), torch_ce_grad(z, y, w, **kw),
                 f"softmax_cross_entropy_grad | {AUTOGRAD} F.cross_entropy + z-loss, softcap")


@pytest.mark.parametrize("kind", ["index", "prob"])
def test_softmax_ce_grad_for_k_dimensional_logits_with_class_axis_1(backend, rng, kind):
    z, y, w, extra = ce_data(rng, kind, True, -100 if kind == "index" else None,
                             shape=(2, 4, 3, 2), axis=1)
    kw = dict(label_smoothing=0.2, z_loss=1e-2, **extra)
    assert_match(ce_grad(backend, z, y, w, axis=1, **kw), torch_ce_grad(z, y, w, axis=1, **kw),
                 f"softmax_cross_entropy_grad | {AUTOGRAD} F.cross_entropy")


@pytest.mark.parametrize("kind", ["index", "prob"])
def test_softmax_ce_grad_float32_matches_float64_autograd_within_1e_5(backend, rng, kind):
    z, y, w, extra = ce_data(rng, kind, True, -100 if kind == "index" else None)
    kw = dict(label_smoothing=0.2, reduction="sum", **extra)
    z, w = rounded_to_float32(z, w)
    got = ce_grad(backend, z.astype(np.float32), y, w.astype(np.float32), **kw)
    assert got.dtype == np.float32
    assert_match(got, torch_ce_grad(z, y, w, **kw),
                 f"softmax_cross_entropy_grad | {AUTOGRAD} F.cross_entropy", "float32")


@pytest.mark.parametrize("kind", ["index", "prob"])
def test_reduction_none_grad_row_n_is_dl_n_dz_n_under_random_grad_output(backend, rng, kind):
    # PITFALLS 12: grad of sum(g * loss_none) must equal g[:, None] * our grad.
    z, y, w, extra = ce_data(rng, kind, True, -100 if kind == "index" else None)
    kw = dict(label_smoothing=0.2, z_loss=1e-2, softcap=4.0, reduction="none", **extra)
    g = rng.normal(size=len(z))
    assert_match(g[:, None] * ce_grad(backend, z, y, w, **kw),
                 torch_ce_grad(z, y, w, grad_output=g, **kw),
                 f"softmax_cross_entropy_grad | {AUTOGRAD} F.cross_entropy")


# ---- soft targets, masks and extreme logits (PITFALLS 4, 9) -----------------------------


def test_unnormalised_soft_target_gradient_is_p_times_target_sum_minus_target(backend, rng):
    z, t = 2.0 * rng.normal(size=(7, 5)), 3.0 * rng.random((7, 5))  # rows sum to ~7.5, not 1
    got = ce_grad(backend, z, t, reduction="sum", validate=False)
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    assert_match(got, p * t.sum(axis=1, keepdims=True) - t, "softmax_cross_entropy_grad | formula")
    assert_match(got, torch_ce_grad(z, t, reduction="sum"),
                 f"softmax_cross_entropy_grad | {AUTOGRAD} F.cross_entropy")
    assert not np.allclose(got, p - t)  # the article's softmax - t needs rows summing to 1


@pytest.mark.parametrize("kind", ["index", "prob"])
def test_zero_target_on_minus_inf_logit_has_exactly_zero_gradient(backend, rng, kind):
    z, y = masked_data(rng, kind)
    got = ce_grad(backend, z, y, z_loss=1e-2)
    assert np.all(got[:, 2] == 0) and np.isfinite(got).all()
    dropped = np.delete(y, 2, axis=1) if kind == "prob" else y - (y > 2)
    want = np.insert(torch_ce_grad(np.delete(z, 2, axis=1), dropped, z_loss=1e-2), 2, 0.0, axis=1)
    assert_match(got, want, f"softmax_cross_entropy_grad | {AUTOGRAD} without the masked class")


@pytest.mark.parametrize("kind", ["index", "prob"])
def test_label_smoothing_with_minus_inf_logit_has_torchs_finite_gradient(backend, rng, kind):
    # The loss is +inf (every class has target mass) but its gradient is finite: -eps/C there.
    z, y = masked_data(rng, kind)
    got = ce_grad(backend, z, y, label_smoothing=0.1, reduction="sum")
    np.testing.assert_allclose(got[:, 2], -0.1 / 5, rtol=1e-12)
    assert_match(got, torch_ce_grad(z, y, label_smoothing=0.1, reduction="sum"),
                 f"softmax_cross_entropy_grad | {AUTOGRAD} F.cross_entropy")


def test_target_class_with_minus_inf_logit_has_torchs_finite_gradient(backend, rng):
    z, y = masked_data(rng, "index", masked=1)
    y[[0, 2]] = 1
    assert_match(ce_grad(backend, z, y), torch_ce_grad(z, y),
                 f"softmax_cross_entropy_grad | {AUTOGRAD} F.cross_entropy")


@pytest.mark.parametrize("kind", ["index", "prob"])
def test_grad_of_logits_of_plus_minus_1e4_is_finite_and_matches_autograd(backend, rng, kind):
    z, y, w, _ = ce_data(rng, kind, True, None)
    z = np.where(rng.random(z.shape) > 0.5, 1e4, -1e4) + z
    got = ce_grad(backend, z, y, w, label_smoothing=0.1, z_loss=1e-6)
    assert np.isfinite(got).all()
    assert_match(got, torch_ce_grad(z, y, w, label_smoothing=0.1, z_loss=1e-6),
                 f"softmax_cross_entropy_grad | {AUTOGRAD} F.cross_entropy")


def test_single_class_gradient_is_exactly_zero_like_torch(backend, rng):
    z, y = rng.normal(size=(3, 1)), np.zeros(3, dtype=np.int64)
    got = ce_grad(backend, z, y, label_smoothing=0.3)
    np.testing.assert_array_equal(got, 0.0)
    np.testing.assert_array_equal(got, torch_ce_grad(z, y, label_smoothing=0.3))


def test_fifty_thousand_classes_grad_matches_autograd(backend, rng):
    z, y, _, extra = ce_data(rng, "index", False, -100, shape=(3, 50_000))
    assert_match(ce_grad(backend, z, y, label_smoothing=0.1, **extra),
                 torch_ce_grad(z, y, label_smoothing=0.1, **extra),
                 f"softmax_cross_entropy_grad | {AUTOGRAD} F.cross_entropy", atol=1e-18)


@NAN_MEAN_EXPECTED
@pytest.mark.parametrize("weighted", [False, True])
def test_all_targets_ignored_mean_grad_is_exactly_zero_like_torch(backend, rng, weighted):
    z, _, w, _ = ce_data(rng, "index", weighted, None)
    y = np.full(len(z), -100)
    for z_loss in (0.0, 1e-2):
        got = ce_grad(backend, z, y, w, label_smoothing=0.2, z_loss=z_loss)
        np.testing.assert_array_equal(got, 0.0)
    np.testing.assert_array_equal(got, torch_ce_grad(z, y, w, label_smoothing=0.2))


@pytest.mark.parametrize("kind", ["index", "prob"])
def test_empty_batch_grad_is_empty_with_the_logits_shape(backend, kind):
    y = np.zeros(0, dtype=np.int64) if kind == "index" else np.zeros((0, 3))
    assert ce_grad(backend, np.zeros((0, 3)), y).shape == (0, 3)


# ---- sigmoid and multi-label gradients ---------------------------------------------------


@pytest.mark.parametrize(
    ("name", "weighted", "pos_weighted", "reduction"),
    list(itertools.product(sorted(SIGMOID_GRADS), [False, True], [False, True], REDUCTIONS)),
)
def test_sigmoid_grads_match_torch_autograd_through_bce_with_logits(
    backend, rng, name, weighted, pos_weighted, reduction
):
    grad_fn, per_sample = SIGMOID_GRADS[name]
    x, t, w = sigmoid_data(rng)
    w, pw = (w if weighted else None), (2.0 * w[::-1] if pos_weighted else None)
    got = grad_fn(*on(backend, x, t), reduction=reduction,
                  **on_kwargs(backend, {"weight": w, "pos_weight": pw}))
    want = torch_grad(torch_sigmoid_loss(per_sample, t, w, pw, reduction), x)
    assert_match(backend.to_numpy(got), want, f"{name}_grad | {AUTOGRAD} BCEWithLogits")


@pytest.mark.parametrize("name", sorted(SIGMOID_GRADS))
def test_sigmoid_grads_float32_match_float64_autograd_within_1e_5(backend, rng, name):
    grad_fn, per_sample = SIGMOID_GRADS[name]
    x, t = rounded_to_float32(*sigmoid_data(rng)[:2])
    got = backend.to_numpy(grad_fn(*on(backend, x.astype(np.float32), t.astype(np.float32))))
    assert got.dtype == np.float32
    want = torch_grad(torch_sigmoid_loss(per_sample, t, None, None, "mean"), x)
    assert_match(got, want, f"{name}_grad | {AUTOGRAD} BCEWithLogits", "float32")


@pytest.mark.parametrize("name", sorted(SIGMOID_GRADS))
def test_sigmoid_grads_with_reduction_none_under_random_grad_output(backend, rng, name):
    grad_fn, per_sample = SIGMOID_GRADS[name]
    x, t, _ = sigmoid_data(rng)
    g = rng.normal(size=x.shape[:-1] if per_sample else x.shape)
    got = backend.to_numpy(grad_fn(*on(backend, x, t), reduction="none"))
    want = torch_grad(torch_sigmoid_loss(per_sample, t, None, None, "none"), x, g)
    assert_match((g[..., None] if per_sample else g) * got, want,
                 f"{name}_grad | {AUTOGRAD} BCEWithLogits")


def test_multilabel_mean_grad_divides_by_samples_not_labels(backend, rng):
    x, t, _ = sigmoid_data(rng, (3, 5, 4))
    grad_sum = backend.to_numpy(
        xe.multilabel_cross_entropy_grad(*on(backend, x, t), reduction="sum"))
    assert_match(grad_sum, 1 / (1 + np.exp(-x)) - t, "multilabel_cross_entropy_grad | sigmoid - t")
    got = backend.to_numpy(xe.multilabel_cross_entropy_grad(*on(backend, x, t)))
    assert_match(got, grad_sum / (3 * 5), "multilabel_cross_entropy_grad | sum / samples")


def test_sigmoid_grad_at_extreme_logits_is_finite_and_exact(backend):
    x, t = np.array([-1e4, 1e4, -1000.0, 1000.0]), np.array([1.0, 0.0, 0.0, 1.0])
    got = backend.to_numpy(xe.sigmoid_binary_cross_entropy_grad(*on(backend, x, t),
                                                                reduction="sum"))
    np.testing.assert_array_equal(got, [-1.0, 1.0, 0.0, 0.0])


# ---- central finite differences ------------------------------------------------------


FD_CASES = {
    "softmax_cross_entropy": (
        lambda rng: ce_data(rng, "index", True, 1)[:2],
        dict(weight=np.linspace(0.5, 2, 5), ignore_index=1, label_smoothing=0.2, z_loss=1e-2,
             softcap=3.0),
    ),
    "softmax_cross_entropy-prob": (
        lambda rng: ce_data(rng, "prob", False, None)[:2], dict(z_loss=1e-2, softcap=3.0)
    ),
    "sigmoid_binary_cross_entropy": (lambda rng: sigmoid_data(rng)[:2],
                                     dict(pos_weight=np.array([1.0, 2.0, 0.5, 3.0]))),
    "multilabel_cross_entropy": (lambda rng: sigmoid_data(rng)[:2],
                                 dict(weight=np.array([1.0, 2.0, 0.5, 3.0]))),
}


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", sorted(FD_CASES))
def test_grad_equals_central_finite_differences_of_the_loss(backend, rng, case, reduction):
    name = case.split("-")[0]
    make, kw = FD_CASES[case]
    z, y = make(rng)
    kw = dict(kw, reduction=reduction)
    got = getattr(xe, f"{name}_grad")(*on(backend, z, y), **kw)
    want = central_difference(lambda v: getattr(xe, name)(v, y, **kw), z)
    np.testing.assert_allclose(backend.to_numpy(got), want, rtol=1e-6, atol=1e-8)


# ---- autograd through crossent itself (torch, JAX) --------------------------------------


@pytest.mark.parametrize(("kind", "weighted", "ignore", "eps", "reduction"), ce_option_grid())
def test_torch_autograd_through_crossent_equals_analytic_grad_and_torchs_own(
    rng, kind, weighted, ignore, eps, reduction
):
    z, y, w, extra = ce_data(rng, kind, weighted, ignore)
    kw = dict(label_smoothing=eps, reduction=reduction, z_loss=1e-2, **extra)
    ours = torch_grad(lambda zt: xe.softmax_cross_entropy(zt, t64(y), weight=t64(w), **kw), z)
    assert_match(ours, xe.softmax_cross_entropy_grad(z, y, weight=w, **kw),
                 "softmax_cross_entropy torch autograd | analytic grad")
    assert_match(ours, torch_ce_grad(z, y, w, **kw),
                 f"softmax_cross_entropy torch autograd | {AUTOGRAD} F.cross_entropy")


def test_torch_autograd_through_crossent_is_finite_at_masked_logits(rng):
    z, t = masked_data(rng, "prob", masked=0)
    grad = torch_grad(lambda zt: xe.softmax_cross_entropy(zt, t64(t)), z)
    assert np.isfinite(grad).all() and np.all(grad[:, 0] == 0)
    assert_match(grad, xe.softmax_cross_entropy_grad(z, t),
                 "softmax_cross_entropy torch autograd | analytic grad")


@NAN_MEAN_EXPECTED
def test_torch_autograd_through_crossent_with_all_targets_ignored_is_zero_like_torch(rng):
    z, _, w, _ = ce_data(rng, "index", True, None)
    y = np.full(len(z), -100)
    grad = torch_grad(lambda zt: xe.softmax_cross_entropy(zt, t64(y), weight=t64(w),
                                                           label_smoothing=0.2), z)
    np.testing.assert_array_equal(grad, 0.0)
    np.testing.assert_array_equal(grad, torch_ce_grad(z, y, w, label_smoothing=0.2))


@pytest.mark.parametrize("name", sorted(SIGMOID_GRADS))
def test_torch_autograd_through_sigmoid_losses_equals_analytic_grad(rng, name):
    x, t, w = sigmoid_data(rng)
    got = torch_grad(lambda xt: getattr(xe, name)(xt, t64(t), weight=t64(w),
                                                  pos_weight=t64(w[::-1])), x)
    want = getattr(xe, f"{name}_grad")(x, t, weight=w, pos_weight=w[::-1])
    assert_match(got, want, f"{name} autograd | analytic grad")


@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("kind", ["index", "prob"])
def test_jitted_jax_grad_through_crossent_with_validate_false_equals_analytic_grad(
    rng, kind, reduction
):
    z, y, w, extra = ce_data(rng, kind, True, 1 if kind == "index" else None)
    z, y = jnp.asarray(z), jnp.asarray(y)
    kw = dict(weight=jnp.asarray(w), label_smoothing=0.2, z_loss=1e-2, softcap=3.0,
              reduction=reduction, validate=False, **extra)
    g = jnp.asarray(rng.normal(size=len(z)) if reduction == "none" else 1.0)
    got = jax.jit(jax.grad(lambda v: jnp.sum(g * xe.softmax_cross_entropy(v, y, **kw))))(z)
    want = np.asarray(xe.softmax_cross_entropy_grad(z, y, **kw))
    assert_match(got, want * (g[:, None] if g.ndim else g),
                 "softmax_cross_entropy jax.grad | analytic grad")


@pytest.mark.parametrize("name", sorted(SIGMOID_GRADS))
def test_jitted_jax_grad_through_sigmoid_losses_equals_analytic_grad(rng, name):
    x, t, w = (jnp.asarray(a) for a in sigmoid_data(rng))
    kw = dict(weight=w, pos_weight=w[::-1], validate=False)
    got = jax.jit(jax.grad(lambda v: getattr(xe, name)(v, t, **kw)))(x)
    assert_match(got, getattr(xe, f"{name}_grad")(x, t, **kw), f"{name} jax.grad | analytic")


# ---- low precision (PITFALLS 6) --------------------------------------------------------


LOW_PRECISION_GRADS = {
    "softmax_cross_entropy_grad": lambda rng: ce_data(rng, "index", False, None)[:2],
    "sigmoid_binary_cross_entropy_grad": lambda rng: sigmoid_data(rng, (6, 4))[:2],
    "multilabel_cross_entropy_grad": lambda rng: sigmoid_data(rng, (6, 4))[:2],
}


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("name", sorted(LOW_PRECISION_GRADS))
def test_low_precision_grad_returns_its_dtype_computed_in_float32(backend, rng, name, dtype):
    grad_fn = getattr(xe, name)
    low, upcast = low_precision(backend, dtype, *LOW_PRECISION_GRADS[name](rng))
    assert_rounded_from(grad_fn(*low, reduction="sum"), grad_fn(*upcast, reduction="sum"),
                        backend, dtype, f"{name} | float32 of upcast input")


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_confident_correct_prediction_keeps_its_gradient_in_low_precision(backend, dtype):
    # 1 - softmax = 4 e^-9.25 = 4e-4 is below bf16's resolution near 1: softmax - 1 in bf16
    # would give 0. (7, 5) logits: 9.25 (exact in bf16) on the target class, 0 elsewhere.
    y = np.arange(7) % 5
    z = np.where(np.arange(5) == y[:, None], 9.25, 0.0)
    low, upcast = low_precision(backend, dtype, z, y)
    grad = xe.softmax_cross_entropy_grad(*low)
    assert_rounded_from(grad, xe.softmax_cross_entropy_grad(*upcast),
                        backend, dtype, "softmax_cross_entropy_grad | float32 of upcast input")
    true_class = backend.to_numpy(grad)[np.arange(7), y].astype(np.float64)
    np.testing.assert_allclose(true_class, -4 * np.exp(-9.25) / 7, rtol=1e-2)


# ---- properties (hypothesis) -----------------------------------------------------------


@st.composite
def logits_and_distribution(draw):
    n, c = draw(st.integers(1, 5)), draw(st.integers(1, 7))
    z = draw(arrays(np.float64, (n, c), elements=st.floats(-30, 30)))
    t = draw(arrays(np.float64, (n, c), elements=st.floats(0.01, 1)))
    return z, t / t.sum(axis=1, keepdims=True)


@settings(max_examples=50, deadline=None)
@given(data=logits_and_distribution(), eps=st.sampled_from([0.0, 0.3]),
       reduction=st.sampled_from(REDUCTIONS))
def test_grad_rows_sum_to_zero_for_distribution_targets(data, eps, reduction):
    z, t = data
    weight = np.linspace(0.5, 2.0, z.shape[1])
    grad = xe.softmax_cross_entropy_grad(z, t, weight=weight, label_smoothing=eps,
                                         reduction=reduction)
    np.testing.assert_allclose(grad.sum(axis=1), 0.0, atol=1e-14 * z.shape[1] * 4)


@settings(max_examples=50, deadline=None)
@given(data=logits_and_distribution(), z_loss=st.sampled_from([0.0, 1e-2]),
       softcap=st.sampled_from([None, 5.0]))
def test_grad_equals_finite_differences_for_random_inputs(data, z_loss, softcap):
    z, t = data
    kw = dict(z_loss=z_loss, softcap=softcap, reduction="sum")
    want = central_difference(lambda v: xe.softmax_cross_entropy(v, t, **kw), z)
    np.testing.assert_allclose(xe.softmax_cross_entropy_grad(z, t, **kw), want, rtol=1e-6,
                               atol=1e-7)


# ---- argument errors -------------------------------------------------------------------


X, T = np.zeros((4, 3)), np.full((4, 3), 0.5)

GRAD_ERROR_CASES = [
    ("softmax_target_shape", xe.softmax_cross_entropy_grad, (X, np.array([0, 1])), {}, "target"),
    ("softmax_label_smoothing", xe.softmax_cross_entropy_grad, (X, np.array([0, 1, 2, 0])),
     {"label_smoothing": 2.0}, "label_smoothing"),
    ("softmax_class_index", xe.softmax_cross_entropy_grad, (X, np.array([0, 1, 3, 0])), {},
     "target"),
    ("sigmoid_pos_weight_shape", xe.sigmoid_binary_cross_entropy_grad, (X, T),
     {"pos_weight": np.ones(5)}, "pos_weight"),
    ("multilabel_pos_weight_shape", xe.multilabel_cross_entropy_grad, (X, T),
     {"pos_weight": np.ones(2)}, "pos_weight"),
    ("sigmoid_weight_shape", xe.sigmoid_binary_cross_entropy_grad, (X, T),
     {"weight": np.ones(5)}, "weight"),
    ("sigmoid_target_range", xe.sigmoid_binary_cross_entropy_grad, (X, T + 1), {}, "target"),
    ("sigmoid_target_shape", xe.multilabel_cross_entropy_grad, (X, T[:2]), {}, "target"),
    ("sigmoid_integer_logits", xe.sigmoid_binary_cross_entropy_grad,
     (np.zeros((4, 3), dtype=np.int64), T), {}, "logits"),
    ("sigmoid_reduction", xe.multilabel_cross_entropy_grad, (X, T), {"reduction": "avg"},
     "reduction"),
]


@pytest.mark.parametrize(("fn", "args", "kwargs", "match"),
                         [pytest.param(*case[1:], id=case[0]) for case in GRAD_ERROR_CASES])
def test_bad_argument_to_a_grad_raises_value_error_naming_it(backend, fn, args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        fn(*on(backend, *args), **on_kwargs(backend, kwargs))
