"""Core losses against independent references on every backend.

References: torch.nn.functional (float64, built from the same NumPy data), optax,
scikit-learn's log_loss, and formulas written out in plain torch (focal loss, z-loss,
softcap). Each test names the behaviour it pins; PITFALLS.md numbers are in the comments.
"""

from __future__ import annotations

import itertools

import numpy as np
import optax
import pytest
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
    torch_focal,
    torch_layout,
    torch_softmax_ce,
)
from sklearn.metrics import log_loss

import crossent as xe


def softmax_ce(backend, z, target, weight=None, **kw):
    z, target, weight = on(backend, z, target, weight)
    return backend.to_numpy(xe.softmax_cross_entropy(z, target, weight=weight, **kw))


def evaluate(backend, fn, *arrays, **kw):
    """``fn`` on NumPy ``arrays`` moved to ``backend``, result back in NumPy."""
    return backend.to_numpy(fn(*on(backend, *arrays), **kw))


def torch_ce(z, target, weight=None, axis=-1, **kw):
    z, target = torch_layout(z, target, axis)
    return torch_softmax_ce(t64(z), t64(target), weight=t64(weight), **kw).numpy()


def elementwise_data(rng, shape=(6, 4), soft=True):
    """Logits, targets in [0, 1] (soft or hard), positive weights shaped like a row."""
    x = 3.0 * rng.normal(size=shape)
    t = rng.random(shape) if soft else (rng.random(shape) > 0.5).astype(float)
    return x, t, rng.uniform(0.5, 2.0, size=shape[-1:])


# ---- softmax cross-entropy vs torch.nn.functional.cross_entropy ------------------------


@pytest.mark.parametrize(("kind", "weighted", "ignore", "eps", "reduction"), ce_option_grid())
def test_softmax_ce_matches_torch_for_every_option_combination(
    backend, rng, kind, weighted, ignore, eps, reduction
):
    z, y, w, extra = ce_data(rng, kind, weighted, ignore)
    kw = dict(label_smoothing=eps, reduction=reduction, **extra)
    assert_match(softmax_ce(backend, z, y, w, **kw), torch_ce(z, y, w, **kw),
                 "softmax_cross_entropy | torch F.cross_entropy")


@pytest.mark.parametrize(("z_loss", "softcap"), [(1e-2, None), (0.0, 3.0), (1e-2, 3.0)])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", ["index", "prob"])
def test_softmax_ce_z_loss_and_softcap_match_torch_written_formula(
    backend, rng, kind, reduction, z_loss, softcap
):
    z, y, w, extra = ce_data(rng, kind, True, -100 if kind == "index" else None)
    kw = dict(label_smoothing=0.1, z_loss=z_loss, softcap=softcap, reduction=reduction,
              **extra)
    assert_match(softmax_ce(backend, z, y, w, **kw), torch_ce(z, y, w, **kw),
                 "softmax_cross_entropy | torch F.cross_entropy + z*lse^2, c*tanh(z/c)")


@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("kind", ["index", "prob"])
def test_k_dimensional_logits_with_class_axis_1_match_torch(backend, rng, kind, reduction):
    z, y, w, extra = ce_data(rng, kind, True, -100 if kind == "index" else None,
                             shape=(2, 4, 3, 2), axis=1)
    kw = dict(label_smoothing=0.2, reduction=reduction, **extra)
    got = softmax_ce(backend, z, y, w, axis=1, **kw)
    assert_match(got, torch_ce(z, y, w, axis=1, **kw),
                 "softmax_cross_entropy | torch F.cross_entropy")
    moved = np.moveaxis(y, 1, -1) if kind == "prob" else y
    assert_match(softmax_ce(backend, np.moveaxis(z, 1, -1), moved, w, **kw), got,
                 "softmax_cross_entropy | axis moved last")


def test_class_axis_0_is_the_transpose_of_axis_minus_1(backend, rng):
    z, y, _, _ = ce_data(rng, "prob", False, None)
    assert_match(softmax_ce(backend, z.T, y.T, axis=0, reduction="none"),
                 softmax_ce(backend, z, y, reduction="none"),
                 "softmax_cross_entropy | axis moved last")


def test_softmax_ce_matches_optax_per_row_for_index_and_probability_targets(backend, rng):
    for kind, ref in [("index", optax.softmax_cross_entropy_with_integer_labels),
                      ("prob", optax.softmax_cross_entropy)]:
        z, y, _, _ = ce_data(rng, kind, False, None)
        assert_match(softmax_ce(backend, z, y, reduction="none"), np.asarray(ref(z, y)),
                     f"softmax_cross_entropy | optax {ref.__name__}")


@pytest.mark.parametrize("kind", ["index", "prob"])
def test_float32_logits_with_weight_smoothing_and_ignore_match_torch_within_1e_5(
    backend, rng, kind
):
    z, y, w, extra = ce_data(rng, kind, True, 1 if kind == "index" else None)
    kw = dict(label_smoothing=0.2, reduction="none", **extra)
    z, w = rounded_to_float32(z, w)
    if kind == "prob":  # a float64 target would promote the loss to float64, as torch's
        y = y.astype(np.float32).astype(np.float64)
    y32 = y.astype(np.float32) if kind == "prob" else y
    got = softmax_ce(backend, z.astype(np.float32), y32, w.astype(np.float32), **kw)
    assert got.dtype == np.float32
    assert_match(got, torch_ce(z, y, w, **kw), "softmax_cross_entropy | torch F.cross_entropy",
                 "float32")


# ---- reduction rules (PITFALLS 1-3) ----------------------------------------------------


def test_mean_with_class_weights_divides_by_summed_target_weights(backend, rng):
    z, y, w, _ = ce_data(rng, "index", True, None)
    none = softmax_ce(backend, z, y, w, reduction="none")
    mean = softmax_ce(backend, z, y, w)
    assert_match(mean, none.sum() / w[y].sum(), "softmax_cross_entropy | sum / sum w[y]")
    assert not np.isclose(mean, none.mean())  # "none" then .mean() is a different number


def test_mean_with_ignored_rows_divides_by_counted_rows_only(backend, rng):
    z, y, _, extra = ce_data(rng, "index", False, -100)
    none = softmax_ce(backend, z, y, reduction="none", **extra)
    assert np.all(none[y == -100] == 0)
    assert_match(softmax_ce(backend, z, y, **extra), none.sum() / np.sum(y != -100),
                 "softmax_cross_entropy | sum / counted rows")


def test_probability_target_mean_divides_by_rows_not_by_weights(backend, rng):
    z, y, w, _ = ce_data(rng, "prob", True, None)
    none = softmax_ce(backend, z, y, w, reduction="none")
    assert_match(softmax_ce(backend, z, y, w), none.sum() / len(z),
                 "softmax_cross_entropy | sum / rows")
    assert_match(softmax_ce(backend, z, y, w), torch_ce(z, y, w),
                 "softmax_cross_entropy | torch F.cross_entropy")


@NAN_MEAN_EXPECTED
@pytest.mark.parametrize("weighted", [False, True])
def test_all_targets_ignored_gives_nan_mean_and_zero_sum_like_torch(backend, rng, weighted):
    z, _, w, _ = ce_data(rng, "index", weighted, None)
    y = np.full(len(z), -100)
    for reduction, want in [("mean", np.nan), ("sum", 0.0)]:
        kw = dict(label_smoothing=0.2, reduction=reduction)
        got = softmax_ce(backend, z, y, w, **kw)
        np.testing.assert_equal(got, want)
        np.testing.assert_equal(got, torch_ce(z, y, w, **kw))


def test_label_smoothing_weight_and_ignore_index_follow_torchs_formula(backend, rng):
    z, y, w, extra = ce_data(rng, "index", True, -100)
    eps, c = 0.2, z.shape[1]
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    counted = y != -100
    nll = -(w[y[counted]] * log_p[counted, y[counted]])
    smooth = -(w * log_p[counted]).sum(axis=1)
    want = ((1 - eps) * nll.sum() + eps / c * smooth.sum()) / w[y[counted]].sum()
    assert_match(softmax_ce(backend, z, y, w, label_smoothing=eps, **extra), want,
                 "softmax_cross_entropy | PITFALLS 3 formula")


def test_ignore_index_that_is_a_real_class_stays_in_the_softmax_denominator(backend, rng):
    z, y, _, _ = ce_data(rng, "index", False, 1)
    got = softmax_ce(backend, z, y, ignore_index=1, reduction="none")
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))  # over all classes, 1 included
    want = np.where(y == 1, 0.0, -log_p[np.arange(len(y)), y])
    assert_match(got, want, "softmax_cross_entropy | numpy log-softmax")


# ---- adversarial inputs (PITFALLS 4) ---------------------------------------------------


@pytest.mark.parametrize("kind", ["index", "prob"])
def test_zero_target_on_minus_inf_logit_contributes_exactly_zero(backend, rng, kind):
    z, y = masked_data(rng, kind)
    got = softmax_ce(backend, z, y, reduction="none")
    dropped = np.delete(z, 2, axis=1), (np.delete(y, 2, axis=1) if kind == "prob" else y - (y > 2))
    # Reference: the same rows without the masked class (torch's own probability path gives
    # 0 * -inf = NaN here, so it cannot be the reference).
    assert_match(got, torch_ce(*dropped, reduction="none"), "softmax_cross_entropy | masked")


@pytest.mark.parametrize("kind", ["index", "prob"])
def test_label_smoothing_with_minus_inf_logit_gives_inf_like_torch(backend, rng, kind):
    z, y = masked_data(rng, kind)
    got = softmax_ce(backend, z, y, label_smoothing=0.1, reduction="none")
    assert np.all(got == np.inf)
    np.testing.assert_equal(got, torch_ce(z, y, label_smoothing=0.1, reduction="none"))


def test_target_class_with_minus_inf_logit_costs_inf_like_torch(backend, rng):
    z, y = masked_data(rng, "index")
    y[[0, 2]] = 2
    got = softmax_ce(backend, z, y, reduction="none")
    assert_match(got, torch_ce(z, y, reduction="none"),
                 "softmax_cross_entropy | torch F.cross_entropy")
    assert np.all(got[[0, 2]] == np.inf) and np.isfinite(np.delete(got, [0, 2])).all()


@pytest.mark.parametrize("kind", ["index", "prob"])
def test_logits_of_plus_minus_1e4_do_not_overflow(backend, rng, kind):
    z, y, w, _ = ce_data(rng, kind, True, None)
    z = np.where(rng.random(z.shape) > 0.5, 1e4, -1e4) + z
    got = softmax_ce(backend, z, y, w, label_smoothing=0.1, reduction="none")
    assert np.isfinite(got).all()
    assert_match(got, torch_ce(z, y, w, label_smoothing=0.1, reduction="none"),
                 "softmax_cross_entropy | torch F.cross_entropy")


def test_single_class_loss_is_exactly_zero(backend, rng):
    z = 5.0 * rng.normal(size=(3, 1))
    for y in (np.zeros(3, dtype=np.int64), np.ones((3, 1))):
        got = softmax_ce(backend, z, y, label_smoothing=0.3, reduction="none")
        np.testing.assert_array_equal(got, 0.0)
        np.testing.assert_array_equal(got, torch_ce(z, y, label_smoothing=0.3, reduction="none"))


def test_fifty_thousand_classes_match_torch(backend, rng):
    z, y, w, extra = ce_data(rng, "index", True, -100, shape=(3, 50_000))
    kw = dict(label_smoothing=0.1, reduction="none", **extra)
    assert_match(softmax_ce(backend, z, y, w, **kw), torch_ce(z, y, w, **kw),
                 "softmax_cross_entropy | torch F.cross_entropy")


@NAN_MEAN_EXPECTED
@pytest.mark.parametrize("kind", ["index", "prob"])
def test_empty_batch_gives_nan_mean_zero_sum_and_empty_none_like_torch(backend, kind):
    # Probability targets: "mean" divides by the row count 0, so NaN as well, like torch.
    z = np.zeros((0, 3))
    y = np.zeros(0, dtype=np.int64) if kind == "index" else np.zeros((0, 3))
    for reduction in REDUCTIONS:
        got = softmax_ce(backend, z, y, reduction=reduction)
        np.testing.assert_equal(got, torch_ce(z, y, reduction=reduction))
    assert np.isnan(softmax_ce(backend, z, y))


LOSS_INPUTS = {
    "softmax_cross_entropy": lambda rng: ce_data(rng, "index", False, None)[:2],
    "binary_cross_entropy": lambda rng: (rng.uniform(0.01, 0.99, (6, 4)), rng.random((6, 4))),
    "sigmoid_binary_cross_entropy": lambda rng: elementwise_data(rng)[:2],
    "multilabel_cross_entropy": lambda rng: elementwise_data(rng)[:2],
    "sigmoid_focal_loss": lambda rng: elementwise_data(rng)[:2],
}
"""Each loss's (input, target) in NumPy: for the NaN and low-precision tests."""


@NAN_MEAN_EXPECTED
@pytest.mark.parametrize("name", sorted(LOSS_INPUTS))
def test_nan_input_propagates_to_the_loss_instead_of_raising(backend, rng, name):
    loss = getattr(xe, name)
    x, target = LOSS_INPUTS[name](rng)
    x[0, 0] = np.nan
    args = on(backend, x, target)
    per_item = backend.to_numpy(loss(*args, reduction="none"))
    assert np.isnan(per_item.flat[0]) and np.isfinite(per_item.flat[1:]).all()
    assert np.isnan(backend.to_numpy(loss(*args)))


# ---- binary cross-entropy on probabilities ---------------------------------------------


@pytest.mark.parametrize(("weighted", "reduction"),
                         list(itertools.product([False, True], REDUCTIONS)))
def test_binary_cross_entropy_matches_torch(backend, rng, weighted, reduction):
    q, t, w = rng.uniform(0.02, 0.98, size=(6, 4)), rng.random((6, 4)), rng.random(4)
    w = w if weighted else None
    want = F.binary_cross_entropy(t64(q), t64(t), weight=t64(w), reduction=reduction)
    got = evaluate(backend, xe.binary_cross_entropy, q, t, **on_kwargs(backend, {"weight": w}),
                   reduction=reduction)
    assert_match(got, want.numpy(), "binary_cross_entropy | torch F.binary_cross_entropy")


def test_binary_cross_entropy_mean_matches_sklearn_log_loss(backend, rng):
    q, t = rng.uniform(0.02, 0.98, size=(6, 4)), (rng.random((6, 4)) > 0.5).astype(float)
    assert_match(evaluate(backend, xe.binary_cross_entropy, q, t),
                 log_loss(t.ravel(), q.ravel(), labels=[0, 1]),
                 "binary_cross_entropy | sklearn log_loss")


def test_probabilities_exactly_0_and_1_clamp_the_log_at_minus_100_like_torch(backend):
    q = np.array([0.0, 0.0, 1.0, 1.0, 0.5])
    t = np.array([1.0, 0.0, 0.0, 1.0, 0.3])
    got = evaluate(backend, xe.binary_cross_entropy, q, t, reduction="none")
    assert_match(got, [100.0, 0.0, 100.0, 0.0, np.log(2)], "binary_cross_entropy | clamp")
    want = F.binary_cross_entropy(t64(q), t64(t), reduction="none").numpy()
    assert_match(got, want, "binary_cross_entropy | torch F.binary_cross_entropy")


# ---- sigmoid binary cross-entropy and multi-label --------------------------------------


WEIGHT_GRID = list(itertools.product([False, True], [False, True], REDUCTIONS))


def torch_bce_logits(x, t, w, pw, reduction):
    return F.binary_cross_entropy_with_logits(t64(x), t64(t), weight=t64(w), pos_weight=t64(pw),
                                              reduction=reduction).numpy()


@pytest.mark.parametrize(("weighted", "pos_weighted", "reduction"), WEIGHT_GRID)
def test_sigmoid_bce_matches_torch_bce_with_logits(backend, rng, weighted, pos_weighted,
                                                   reduction):
    x, t, w = elementwise_data(rng)
    w, pw = (w if weighted else None), (2.0 * w[::-1] if pos_weighted else None)
    got = evaluate(backend, xe.sigmoid_binary_cross_entropy, x, t, reduction=reduction,
                   **on_kwargs(backend, {"weight": w, "pos_weight": pw}))
    assert_match(got, torch_bce_logits(x, t, w, pw, reduction),
                 "sigmoid_binary_cross_entropy | torch F.binary_cross_entropy_with_logits")


def test_sigmoid_bce_matches_optax_elementwise(backend, rng):
    x, t, _ = elementwise_data(rng)
    assert_match(evaluate(backend, xe.sigmoid_binary_cross_entropy, x, t, reduction="none"),
                 np.asarray(optax.sigmoid_binary_cross_entropy(x, t)),
                 "sigmoid_binary_cross_entropy | optax")


def test_sigmoid_bce_of_extreme_logits_is_exact_without_a_clamp(backend):
    x = np.array([-1000.0, 1000.0, 1e4, -1e4, 30.0])
    t = np.array([1.0, 0.0, 1.0, 0.0, 1.0])
    got = evaluate(backend, xe.sigmoid_binary_cross_entropy, x, t, reduction="none")
    assert_match(got, [1000.0, 1000.0, 0.0, 0.0, np.log1p(np.exp(-30.0))],
                 "sigmoid_binary_cross_entropy | exact")
    assert_match(got, torch_bce_logits(x, t, None, None, "none"),
                 "sigmoid_binary_cross_entropy | torch F.binary_cross_entropy_with_logits")


@pytest.mark.parametrize(("weighted", "pos_weighted", "reduction"), WEIGHT_GRID)
def test_multilabel_ce_is_the_sum_over_labels_of_torch_bce_with_logits(
    backend, rng, weighted, pos_weighted, reduction
):
    # PITFALLS 8: "mean" is L times torch's BCEWithLogits mean; "none" sums the label axis.
    x, t, w = elementwise_data(rng, soft=False)
    w, pw = (w if weighted else None), (2.0 * w[::-1] if pos_weighted else None)
    got = evaluate(backend, xe.multilabel_cross_entropy, x, t, reduction=reduction,
                   **on_kwargs(backend, {"weight": w, "pos_weight": pw}))
    per_element = torch_bce_logits(x, t, w, pw, "none")
    want = {"none": per_element.sum(axis=-1), "sum": per_element.sum(),
            "mean": x.shape[-1] * torch_bce_logits(x, t, w, pw, "mean")}[reduction]
    assert_match(got, want, "multilabel_cross_entropy | L * torch BCEWithLogits")


def test_multilabel_ce_of_a_3d_batch_sums_only_the_last_axis(backend, rng):
    x, t, _ = elementwise_data(rng, shape=(3, 5, 4))
    got = evaluate(backend, xe.multilabel_cross_entropy, x, t, reduction="none")
    assert got.shape == (3, 5)
    assert_match(got, torch_bce_logits(x, t, None, None, "none").sum(axis=-1),
                 "multilabel_cross_entropy | L * torch BCEWithLogits")


# ---- focal loss ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("alpha", "gamma", "reduction"),
    list(itertools.product([0.25, None, 0.7], [0.0, 0.5, 2.0], REDUCTIONS)),
)
def test_focal_loss_matches_torchvision_formula(backend, rng, alpha, gamma, reduction):
    x, t, _ = elementwise_data(rng, soft=False)
    x = x / 1.5  # keeps 1 - p_t away from 0, where the written-out reference loses digits
    got = evaluate(backend, xe.sigmoid_focal_loss, x, t, alpha=alpha, gamma=gamma,
                   reduction=reduction)
    want = torch_focal(t64(x), t64(t), alpha, gamma, reduction).numpy()
    assert_match(got, want, "sigmoid_focal_loss | torchvision formula in torch")


@pytest.mark.parametrize(("alpha", "gamma"), [(None, 2.0), (0.25, 2.0), (0.6, 1.5)])
def test_focal_loss_matches_optax(backend, rng, alpha, gamma):
    x, t, _ = elementwise_data(rng, soft=False)
    want = np.asarray(optax.sigmoid_focal_loss(x, t, alpha=alpha, gamma=gamma))
    got = evaluate(backend, xe.sigmoid_focal_loss, x, t, alpha=alpha, gamma=gamma, reduction="none")
    assert_match(got, want, "sigmoid_focal_loss | optax")


def test_focal_defaults_are_torchvisions_alpha_quarter_gamma_two(backend, rng):
    x, t, _ = elementwise_data(rng, soft=False)
    x = x / 1.5
    assert_match(evaluate(backend, xe.sigmoid_focal_loss, x, t),
                 torch_focal(t64(x), t64(t), 0.25, 2.0, "mean").numpy(),
                 "sigmoid_focal_loss | torchvision formula in torch")


def test_focal_with_gamma_0_and_alpha_none_is_sigmoid_bce(backend, rng):
    x, t, _ = elementwise_data(rng)
    assert_match(evaluate(backend, xe.sigmoid_focal_loss, x, t, alpha=None, gamma=0.0),
                 torch_bce_logits(x, t, None, None, "mean"),
                 "sigmoid_focal_loss | torch F.binary_cross_entropy_with_logits")


def test_focal_loss_of_confident_correct_prediction_keeps_its_tiny_value(backend):
    # 1 - p_t = sigmoid(-40) ~ 4e-18 would round to 0 if formed as 1 - sigmoid(40).
    got = evaluate(backend, xe.sigmoid_focal_loss, np.array([40.0]), np.array([1.0]),
                   alpha=None, reduction="sum")
    e = np.exp(-40.0)
    assert_match(got, np.log1p(e) * (e / (1 + e)) ** 2, "sigmoid_focal_loss | exact")


# ---- float32 and low precision (PITFALLS 6) --------------------------------------------


FLOAT64_REFERENCES = {
    "softmax_cross_entropy": lambda z, y: torch_ce(z, y, reduction="none"),
    "binary_cross_entropy": lambda q, t: F.binary_cross_entropy(t64(q), t64(t),
                                                                reduction="none").numpy(),
    "sigmoid_binary_cross_entropy": lambda x, t: torch_bce_logits(x, t, None, None, "none"),
    "multilabel_cross_entropy": lambda x, t: torch_bce_logits(x, t, None, None,
                                                              "none").sum(axis=-1),
    "sigmoid_focal_loss": lambda x, t: torch_focal(t64(x), t64(t), 0.25, 2.0, "none").numpy(),
}


@pytest.mark.parametrize("name", sorted(LOSS_INPUTS))
def test_float32_input_matches_the_float64_reference_within_1e_5(backend, rng, name):
    x, target = rounded_to_float32(*LOSS_INPUTS[name](rng))
    x32, target32 = (a.astype(np.float32) if a.dtype.kind == "f" else a for a in (x, target))
    got = evaluate(backend, getattr(xe, name), x32, target32, reduction="none")
    assert got.dtype == np.float32
    assert_match(got, FLOAT64_REFERENCES[name](x, target), f"{name} | torch (float64)", "float32")


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("name", sorted(LOSS_INPUTS))
def test_low_precision_input_returns_its_dtype_computed_in_float32(backend, rng, name, dtype):
    loss = getattr(xe, name)
    low, upcast = low_precision(backend, dtype, *LOSS_INPUTS[name](rng))
    assert_rounded_from(loss(*low, reduction="none"), loss(*upcast, reduction="none"),
                        backend, dtype, f"{name} | float32 of upcast input")


# ---- properties (hypothesis) -----------------------------------------------------------


logits_strategy = st.integers(1, 6).flatmap(
    lambda n: st.integers(1, 8).flatmap(
        lambda c: arrays(np.float64, (n, c), elements=st.floats(-50, 50))
    )
)


@settings(max_examples=50, deadline=None)
@given(z=logits_strategy, data=st.data())
def test_softmax_ce_is_invariant_to_adding_a_constant_per_row(z, data):
    # NumPy only: the property is about the formula; the backends are covered above.
    shift = np.array(data.draw(st.lists(st.floats(-1e3, 1e3), min_size=len(z),
                                        max_size=len(z))))[:, None]
    y = np.array(data.draw(st.lists(st.integers(0, z.shape[1] - 1), min_size=len(z),
                                    max_size=len(z))))
    eps = data.draw(st.sampled_from([0.0, 0.2]))
    before = xe.softmax_cross_entropy(z, y, label_smoothing=eps, reduction="none")
    after = xe.softmax_cross_entropy(z + shift, y, label_smoothing=eps, reduction="none")
    scale = 1 + np.abs(shift).max() + np.abs(z).max()
    np.testing.assert_allclose(after, before, rtol=1e-9, atol=1e-13 * z.shape[1] * scale)


# ---- argument errors -------------------------------------------------------------------


Z, Y, P = np.zeros((4, 3)), np.array([0, 1, 2, 0]), np.full((4, 3), 1 / 3)
X, T = np.zeros((4, 3)), np.full((4, 3), 0.5)
SCE, BCE = xe.softmax_cross_entropy, xe.binary_cross_entropy
SIG, ML, FOCAL = xe.sigmoid_binary_cross_entropy, xe.multilabel_cross_entropy, xe.sigmoid_focal_loss

ERROR_CASES = [
    ("target_shape", SCE, (Z, Y[:3]), {}, "target"),
    ("prob_target_shape", SCE, (Z, P[:, :2]), {}, "target"),
    ("class_index_too_large", SCE, (Z, np.array([0, 3, 1, 0])), {}, "target holds class index 3"),
    ("negative_class_index", SCE, (Z, np.array([0, -1, 1, 0])), {}, "target holds class index -1"),
    ("ignore_index_is_not_a_free_pass", SCE, (Z, np.array([0, -100, 1, 0])),
     {"ignore_index": 2}, "target"),
    ("prob_target_negative", SCE, (Z, P * np.array([2, -1, 2])), {}, "target"),
    ("prob_rows_not_summing_to_1", SCE, (Z, P * 1.01), {}, "target must sum to 1"),
    ("label_smoothing_negative", SCE, (Z, Y), {"label_smoothing": -0.1}, "label_smoothing"),
    ("label_smoothing_above_1", SCE, (Z, Y), {"label_smoothing": 1.5}, "label_smoothing"),
    ("unknown_reduction", SCE, (Z, Y), {"reduction": "avg"}, "reduction"),
    ("integer_logits", SCE, (Y[:, None] * np.ones((1, 3), dtype=np.int64), Y), {}, "logits"),
    ("weight_shape", SCE, (Z, Y), {"weight": np.ones(4)}, "weight"),
    ("softcap_zero", SCE, (Z, Y), {"softcap": 0.0}, "softcap"),
    ("softcap_negative", SCE, (Z, Y), {"softcap": -1.0}, "softcap"),
    ("softcap_inf", SCE, (Z, Y), {"softcap": float("inf")}, "softcap"),
    ("softcap_nan", SCE, (Z, Y), {"softcap": float("nan")}, "softcap"),
    ("softcap_not_a_number", SCE, (Z, Y), {"softcap": "big"}, "softcap"),
    ("z_loss_negative", SCE, (Z, Y), {"z_loss": -1e-4}, "z_loss"),
    ("axis_out_of_range", SCE, (Z, Y), {"axis": 2}, "axis"),
    ("bce_probs_above_1", BCE, (T + 0.6, T), {}, "probs"),
    ("bce_target_below_0", BCE, (T, T - 0.6), {}, "target"),
    ("bce_shape", BCE, (T, T[:2]), {}, "target"),
    ("bce_integer_probs", BCE, (np.ones((4, 3), dtype=np.int64), T), {}, "probs"),
    ("bce_weight_shape", BCE, (T, T), {"weight": np.ones(2)}, "weight"),
    ("sigmoid_target_above_1", SIG, (X, T + 0.6), {}, "target"),
    ("sigmoid_weight_shape", SIG, (X, T), {"weight": np.ones(5)}, "weight"),
    ("sigmoid_pos_weight_shape", SIG, (X, T), {"pos_weight": np.ones(5)}, "pos_weight"),
    ("multilabel_0d_logits", ML, (np.float64(0.0), np.float64(1.0)), {}, "logits"),
    ("multilabel_pos_weight_shape", ML, (X, T), {"pos_weight": np.ones(2)}, "pos_weight"),
    ("focal_alpha_above_1", FOCAL, (X, T), {"alpha": 1.5}, "alpha"),
    ("focal_gamma_negative", FOCAL, (X, T), {"gamma": -1.0}, "gamma"),
    ("focal_unknown_reduction", FOCAL, (X, T), {"reduction": "batchmean"}, "reduction"),
]


@pytest.mark.parametrize(("fn", "args", "kwargs", "match"),
                         [pytest.param(*case[1:], id=case[0]) for case in ERROR_CASES])
def test_bad_argument_raises_value_error_naming_it(backend, fn, args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        fn(*on(backend, *args), **on_kwargs(backend, kwargs))


def test_validate_false_skips_the_probability_row_sum_check(backend):
    z, p = on(backend, Z, P * 2)
    got = backend.to_numpy(xe.softmax_cross_entropy(z, p, validate=False, reduction="none"))
    assert_match(got, 2 * np.log(3) * np.ones(4), "softmax_cross_entropy | unnormalised")


def test_probability_rows_within_1e_4_of_summing_to_1_are_accepted(backend):
    z, p = on(backend, Z, P * (1 + 5e-5))
    xe.softmax_cross_entropy(z, p)
