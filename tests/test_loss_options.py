"""The options optax, Keras, SciPy and PyTorch users reach for (issue 14), on every backend,
each against the library that defines it: poly-1 (optax), generalized KL (optax, SciPy),
pointwise KL terms (torch KLDivLoss, SciPy rel_entr), NLL of log-probabilities (torch),
logit (SciPy, torch), softmax focal loss (Keras' formula written out in torch), logsumexp's
``b`` / ``return_sign`` / axes (SciPy), binary label smoothing (Keras' formula, optax,
torch), and JAX ``jit`` with traced hyperparameters and mixed NumPy/JAX inputs.

One data shape per kind of test, so that JAX compiles few programs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.special as sp
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import crossent as xe

N, C = 6, 4
RTOL, ATOL = 1e-10, 1e-12


@pytest.fixture
def data(rng):
    """Logits, class indices, soft targets, per-class weights (NumPy, float64)."""
    z = 1.5 * rng.normal(size=(N, C))
    y = rng.integers(0, C, size=N)
    y[::3] = 1
    soft = rng.dirichlet(np.ones(C), size=N)
    w = rng.uniform(0.5, 2.0, size=C)
    return z, y, soft, w


def run(backend, fn, *arrays, **kw):
    """``fn`` on NumPy ``arrays`` moved to ``backend``; the result(s) back in NumPy."""
    out = fn(*[None if a is None else backend.asarray(a) for a in arrays], **kw)
    if isinstance(out, tuple):
        return tuple(backend.to_numpy(o) for o in out)
    return backend.to_numpy(out)


def close(got, expected, rtol=RTOL, atol=ATOL):
    np.testing.assert_allclose(np.asarray(got, dtype=float), np.asarray(expected, dtype=float),
                               rtol=rtol, atol=atol)


def reduce_rows(per_row, reduction, count=None):
    if reduction == "none":
        return per_row
    total = per_row.sum()
    return total if reduction == "sum" else total / (len(per_row) if count is None else count)


def one_hot(y):
    return np.eye(C)[y]


# ---- poly-1 vs optax.poly_loss_cross_entropy ------------------------------------------


@pytest.mark.parametrize("epsilon", [2.0, -1.0, 0.5])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_poly1_matches_optax_for_index_and_soft_targets(backend, data, epsilon, reduction):
    z, y, soft, _ = data
    for target, labels in [(y, one_hot(y)), (soft, soft)]:
        ref = np.asarray(optax.losses.poly_loss_cross_entropy(
            jnp.asarray(z), jnp.asarray(labels), epsilon=epsilon))
        got = run(backend, xe.poly1_cross_entropy, z, target, epsilon=epsilon,
                  reduction=reduction)
        close(got, reduce_rows(ref, reduction))


def test_poly1_with_ignore_index_and_label_smoothing_matches_optax_on_smoothed_rows(backend, data):
    z, y, _, _ = data
    y = y.copy()
    y[2] = -100
    kept = y != -100
    labels = np.asarray(optax.smooth_labels(jnp.asarray(one_hot(y[kept])), 0.1))
    ref = np.asarray(optax.losses.poly_loss_cross_entropy(
        jnp.asarray(z[kept]), jnp.asarray(labels), epsilon=1.0))
    got = run(backend, xe.poly1_cross_entropy, z, y, epsilon=1.0, label_smoothing=0.1,
              reduction="none")
    close(got[kept], ref)
    assert got[2] == 0
    mean = run(backend, xe.poly1_cross_entropy, z, y, epsilon=1.0, label_smoothing=0.1)
    close(mean, ref.mean())  # "mean" counts the non-ignored rows


def test_poly1_class_axis_1_matches_last_axis(backend, data):
    z, y, _, _ = data
    z3 = np.stack([z, z[::-1]], axis=-1)  # (N, C, 2), classes on axis 1
    y3 = np.stack([y, y[::-1]], axis=-1)
    got = run(backend, xe.poly1_cross_entropy, z3, y3, axis=1, reduction="none")
    ref = np.asarray(optax.losses.poly_loss_cross_entropy(
        jnp.asarray(np.moveaxis(z3, 1, -1)), jnp.asarray(np.eye(C)[y3])))
    close(got, ref)


# ---- generalized KL and pointwise KL terms ------------------------------------------------


def test_generalized_kl_matches_optax_and_scipy(backend, rng):
    p = rng.uniform(0.0, 3.0, size=(N, C))
    p[0, 0] = 0.0
    q = rng.uniform(0.1, 3.0, size=(N, C))
    got = run(backend, xe.generalized_kl_divergence, p, q)
    close(got, sp.kl_div(p, q).sum(axis=-1))
    optax_ref = optax.losses.generalized_kl_divergence(jnp.log(jnp.asarray(q)), jnp.asarray(p))
    close(got, np.asarray(optax_ref), rtol=1e-9)
    close(run(backend, xe.generalized_kl_divergence, p, q, axis=0, base=2.0),
          sp.kl_div(p, q).sum(axis=0) / np.log(2))


def test_generalized_kl_of_distributions_is_kl(backend, data):
    _, _, soft, _ = data
    q = soft[::-1].copy()
    close(run(backend, xe.generalized_kl_divergence, soft, q),
          run(backend, xe.kl_divergence, soft, q))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # p > 0 where q = 0: +inf, as SciPy
def test_kl_divergence_terms_match_torch_kldivloss_none_and_scipy_rel_entr(backend, data):
    _, _, p, _ = data
    p = p.copy()
    p[0, 1] = 0.0
    p /= p.sum(axis=-1, keepdims=True)
    q = p[::-1].copy()
    got = run(backend, xe.kl_divergence_terms, p, q)
    close(got, sp.rel_entr(p, q))
    torch_ref = F.kl_div(torch.log(torch.tensor(q)), torch.tensor(p), reduction="none")
    close(got, torch_ref.numpy())
    close(run(backend, xe.kl_divergence_terms, p, q, base=2.0).sum(axis=-1),
          run(backend, xe.kl_divergence, p, q, base=2.0))


def test_kl_divergence_terms_broadcast(backend, data):
    _, _, p, _ = data
    q = p[0]
    close(run(backend, xe.kl_divergence_terms, p, q), sp.rel_entr(p, q[None, :]))


# ---- NLL of log-probabilities vs torch.nn.functional.nll_loss --------------------------


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("ignore", [None, 1])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_nll_loss_matches_torch(backend, data, weighted, ignore, reduction):
    z, y, _, w = data
    log_p = sp.log_softmax(z, axis=-1)
    w = w if weighted else None
    kw = {} if ignore is None else {"ignore_index": ignore}
    ref = F.nll_loss(torch.tensor(log_p), torch.tensor(y),
                     weight=None if w is None else torch.tensor(w), reduction=reduction, **kw)
    close(run(backend, xe.nll_loss, log_p, y, weight=w, reduction=reduction, **kw), ref.numpy())


def test_nll_loss_torch_layout_and_narrow_int_target(backend, data):
    z, y, _, w = data
    log_p = np.stack([sp.log_softmax(z, -1), sp.log_softmax(-z, -1)], axis=-1)  # (N, C, 2)
    y2 = np.stack([y, y[::-1]], axis=-1).astype(np.uint8)
    ref = F.nll_loss(torch.tensor(log_p), torch.tensor(y2.astype(np.int64)), weight=torch.tensor(w))
    close(run(backend, xe.nll_loss, log_p, y2, axis=1, weight=w), ref.numpy())


def test_nll_loss_reads_only_the_target_entry(backend):
    log_p = np.array([[np.nan, -0.5], [-np.inf, -1.0]])
    close(run(backend, xe.nll_loss, log_p, np.array([1, 1]), reduction="none"), [0.5, 1.0])


# ---- logit vs scipy.special.logit and torch.logit -------------------------------------


def test_logit_matches_scipy_and_torch(backend):
    p = np.array([0.0, 1e-300, 1e-8, 0.1, 0.3, 0.31, 0.5, 0.6, 0.649, 0.65, 0.9, 1 - 1e-12, 1.0,
                  np.nan])
    got = run(backend, xe.logit, p)
    np.testing.assert_allclose(got, sp.logit(p), rtol=1e-14)
    np.testing.assert_allclose(got, torch.logit(torch.tensor(p)).numpy(), rtol=1e-12)
    np.testing.assert_allclose(run(backend, xe.sigmoid, got[2:-2]), p[2:-2], rtol=1e-12)
    got32 = run(backend, xe.logit, p[2:-2].astype(np.float32))
    assert got32.dtype == np.float32
    np.testing.assert_allclose(got32, sp.logit(p[2:-2].astype(np.float32)), rtol=1e-6)


# ---- softmax focal loss vs Keras CategoricalFocalCrossentropy's formula --------------------


def keras_categorical_focal(z, target, alpha, gamma):
    """Keras 3 ``categorical_focal_crossentropy(from_logits=True)`` written out in torch
    float64: softmax, clip to [1e-7, 1 - 1e-7], ``-alpha (1 - p)^gamma t log p`` summed
    over classes (per sample)."""
    p = torch.softmax(torch.tensor(z), dim=-1).clamp(1e-7, 1 - 1e-7)
    t = torch.tensor(target)
    a = torch.tensor(alpha) if alpha is not None else torch.tensor(1.0, dtype=torch.float64)
    return (-(a * (1 - p) ** gamma * t * torch.log(p))).sum(-1).numpy()


@pytest.mark.parametrize(("alpha", "gamma"), [(0.25, 2.0), (None, 0.5), ("per_class", 1.0),
                                              (1.0, 0.0)])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_softmax_focal_matches_keras_formula(backend, data, alpha, gamma, reduction):
    z, y, soft, w = data
    alpha = w if isinstance(alpha, str) else alpha
    for target, probs in [(y, one_hot(y)), (soft, soft)]:
        ref = keras_categorical_focal(z, probs, alpha, gamma)
        a = backend.asarray(alpha) if isinstance(alpha, np.ndarray) else alpha
        got = backend.to_numpy(xe.softmax_focal_loss(
            backend.asarray(z), backend.asarray(target), alpha=a, gamma=gamma,
            reduction=reduction))
        close(got, reduce_rows(ref, reduction))


def test_softmax_focal_with_label_smoothing_and_ignore_index(backend, data):
    z, y, _, _ = data
    y = y.copy()
    y[4] = -100
    kept = y != -100
    smoothed = one_hot(y[kept]) * 0.8 + 0.2 / C
    ref = keras_categorical_focal(z[kept], smoothed, 0.25, 2.0)
    got = run(backend, xe.softmax_focal_loss, z, y, label_smoothing=0.2, reduction="none")
    close(got[kept], ref)
    assert got[4] == 0
    close(run(backend, xe.softmax_focal_loss, z, y, label_smoothing=0.2), ref.mean())


def test_softmax_focal_gamma_0_without_alpha_is_cross_entropy_and_gradient_is_finite(data):
    z, y, _, _ = data
    close(xe.softmax_focal_loss(z, y, alpha=None, gamma=0.0), xe.softmax_cross_entropy(z, y))
    zt = torch.tensor(np.array([[60.0, 0.0, -60.0]]), requires_grad=True)
    xe.softmax_focal_loss(zt, torch.tensor([0]), gamma=0.5).backward()
    assert torch.isfinite(zt.grad).all()


@pytest.mark.parametrize(("alpha", "gamma"), [(0.25, 2.0), ("per_class", 0.5)])
def test_categorical_focal_from_probabilities_matches_keras_formula(backend, data, alpha, gamma):
    z, y, soft, w = data
    alpha = w if isinstance(alpha, str) else alpha
    probs = sp.softmax(z, axis=-1)  # within Keras' [1e-7, 1 - 1e-7]: its clip is inactive
    for target, hot in [(y, one_hot(y)), (soft, soft)]:
        a = backend.asarray(alpha) if isinstance(alpha, np.ndarray) else alpha
        got = backend.to_numpy(xe.categorical_focal_loss(
            backend.asarray(probs), backend.asarray(target), alpha=a, gamma=gamma,
            reduction="none"))
        close(got, keras_categorical_focal(z, hot, alpha, gamma), rtol=1e-9)
    close(run(backend, xe.categorical_focal_loss, probs, y),
          run(backend, xe.softmax_focal_loss, z, y))


def test_categorical_focal_clamps_the_log_of_a_zero_probability_at_minus_100(backend):
    got = run(backend, xe.categorical_focal_loss, np.array([[0.0, 1.0]]), np.array([0]),
              alpha=None, reduction="none")
    close(got, [100.0])


# ---- logsumexp, softmax, log_softmax as SciPy's -------------------------------------------


@pytest.mark.parametrize("axis", [-1, (0, 2), None])
def test_logsumexp_b_and_return_sign_match_scipy(backend, rng, axis):
    x = rng.normal(size=(2, 3, 4))
    b = rng.normal(size=(3, 4))
    b[0, 0] = 0.0
    for kw in [dict(b=b), dict(b=np.abs(b)), dict()]:
        bb = kw.get("b")
        for keepdims in (False, True):
            got = run(backend, lambda x, b=None, k=keepdims: xe.logsumexp(
                x, axis=axis, b=b, keepdims=k, return_sign=True), x, bb)
            ref = sp.logsumexp(x, axis=axis, b=bb, keepdims=keepdims, return_sign=True)
            close(got[0], ref[0])
            close(got[1], ref[1])
        with np.errstate(invalid="ignore"):
            ref_plain = sp.logsumexp(x, axis=axis, b=bb)
        close(run(backend, lambda x, b=None: xe.logsumexp(x, axis=axis, b=b), x, bb), ref_plain)


def test_logsumexp_b_zero_skips_infinite_entries_and_sign_zero(backend):
    x = np.array([[np.inf, 1.0], [2.0, 3.0]])
    b = np.array([[0.0, 2.0], [0.0, 0.0]])
    got = run(backend, lambda x, b: xe.logsumexp(x, b=b, return_sign=True), x, b)
    ref = sp.logsumexp(x, axis=-1, b=b, return_sign=True)
    close(got[0], ref[0])
    close(got[1], ref[1])


@pytest.mark.parametrize("axis", [(0, 2), None, 1])
def test_softmax_and_log_softmax_over_axis_tuples_and_none_match_scipy(backend, rng, axis):
    x = rng.normal(size=(2, 3, 4))
    close(run(backend, xe.softmax, x, axis=axis), sp.softmax(x, axis=axis))
    close(run(backend, xe.log_softmax, x, axis=axis), sp.log_softmax(x, axis=axis))


def test_zero_d_input_like_scipy(backend):
    x = np.float64(2.5)
    for axis in (-1, 0, None, ()):
        close(run(backend, xe.logsumexp, x, axis=axis), sp.logsumexp(x))
    close(run(backend, xe.softmax, x), sp.softmax(x))
    close(run(backend, xe.log_softmax, x, axis=None), sp.log_softmax(x))
    got = run(backend, lambda x, b: xe.logsumexp(x, b=b, return_sign=True), x, np.float64(-2.0))
    close(got, sp.logsumexp(x, b=-2.0, return_sign=True))
    with pytest.raises(xe.InputError, match="axis"):
        xe.logsumexp(backend.asarray(x), axis=1)


# ---- binary label smoothing (Keras: t -> t (1 - a) + a / 2) --------------------------------


def keras_smooth(t, a):
    return t * (1 - a) + a / 2


@pytest.mark.parametrize("a", [0.1, 1.0])
def test_binary_label_smoothing_matches_torch_and_optax_on_smoothed_targets(backend, rng, a):
    x = 2.0 * rng.normal(size=(N, C))
    t = (rng.random((N, C)) > 0.5).astype(float)
    ts = keras_smooth(t, a)
    q = sp.expit(x)
    close(run(backend, xe.binary_cross_entropy, q, t, label_smoothing=a, reduction="none"),
          F.binary_cross_entropy(torch.tensor(q), torch.tensor(ts), reduction="none").numpy())
    close(run(backend, xe.sigmoid_binary_cross_entropy, x, t, label_smoothing=a,
              reduction="none"),
          np.asarray(optax.sigmoid_binary_cross_entropy(jnp.asarray(x), jnp.asarray(ts))))
    close(run(backend, xe.multilabel_cross_entropy, x, t, label_smoothing=a),
          C * F.binary_cross_entropy_with_logits(torch.tensor(x), torch.tensor(ts)).item())
    close(run(backend, xe.sigmoid_focal_loss, x, t, alpha=0.25, gamma=2.0, label_smoothing=a,
              reduction="none"),
          np.asarray(optax.sigmoid_focal_loss(jnp.asarray(x), jnp.asarray(ts), alpha=0.25,
                                              gamma=2.0)))
    xt = torch.tensor(x, requires_grad=True)
    F.binary_cross_entropy_with_logits(xt, torch.tensor(ts)).backward()
    close(run(backend, xe.sigmoid_binary_cross_entropy_grad, x, t, label_smoothing=a),
          xt.grad.numpy())
    close(run(backend, xe.multilabel_cross_entropy_grad, x, t, label_smoothing=a),
          C * xt.grad.numpy())


# ---- JAX under jit: traced hyperparameters, mixed NumPy and JAX inputs ------------------


def test_jit_accepts_traced_hyperparameters(data):
    z, y, soft, _ = data
    zj, yj = jnp.asarray(z), jnp.asarray(y)

    @jax.jit
    def losses(alpha, gamma, eps, z_loss, epsilon):
        return jnp.stack([
            xe.sigmoid_focal_loss(zj, jnp.asarray(soft), alpha=alpha, gamma=gamma,
                                  label_smoothing=eps, validate=False),
            xe.softmax_focal_loss(zj, yj, alpha=alpha, gamma=gamma, label_smoothing=eps,
                                  validate=False),
            xe.softmax_cross_entropy(zj, yj, label_smoothing=eps, z_loss=z_loss, validate=False),
            xe.poly1_cross_entropy(zj, yj, epsilon=epsilon, label_smoothing=eps, validate=False),
            xe.sigmoid_binary_cross_entropy(zj, jnp.asarray(soft), label_smoothing=eps,
                                            validate=False),
        ])

    for args in [(0.25, 2.0, 0.1, 1e-3, 2.0), (0.5, 0.0, 0.0, 0.0, 0.0)]:
        alpha, gamma, eps, z_loss, epsilon = args
        expected = [
            xe.sigmoid_focal_loss(z, soft, alpha=alpha, gamma=gamma, label_smoothing=eps),
            xe.softmax_focal_loss(z, y, alpha=alpha, gamma=gamma, label_smoothing=eps),
            xe.softmax_cross_entropy(z, y, label_smoothing=eps, z_loss=z_loss),
            xe.poly1_cross_entropy(z, y, epsilon=epsilon, label_smoothing=eps),
            xe.sigmoid_binary_cross_entropy(z, soft, label_smoothing=eps),
        ]
        close(np.asarray(losses(*[jnp.asarray(v) for v in args])), np.array(expected))


def test_jit_gradient_in_a_hyperparameter_and_concrete_jax_scalars_are_checked(data):
    z, y, _, _ = data
    grad = jax.grad(lambda e: xe.poly1_cross_entropy(jnp.asarray(z), jnp.asarray(y),
                                                     epsilon=e, validate=False))(1.0)
    p_y = sp.softmax(z, axis=-1)[np.arange(N), y]
    close(float(grad), np.mean(1.0 - p_y))
    with pytest.raises(xe.InputError, match="alpha"):
        xe.sigmoid_focal_loss(z, sp.expit(z), alpha=jnp.asarray(1.5))


def test_jit_mixed_numpy_logits_and_jax_target_take_the_jax_namespace(data):
    z, y, soft, w = data

    @jax.jit
    def f(target, weight):
        return xe.softmax_cross_entropy(z, target, weight=weight, validate=False)

    out = f(jnp.asarray(y), jnp.asarray(w))
    assert isinstance(out, jax.Array)
    close(np.asarray(out), xe.softmax_cross_entropy(z, y, weight=w))
    close(np.asarray(jax.jit(lambda t: xe.kl_divergence(soft, t, validate=False))(
        jnp.asarray(soft[::-1]))), xe.kl_divergence(soft, soft[::-1]))


# ---- properties ---------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(z=st.lists(st.floats(-30, 30), min_size=C, max_size=C),
       y=st.integers(0, C - 1), eps=st.sampled_from([0.0, 0.3]))
def test_poly1_with_epsilon_0_is_cross_entropy(z, y, eps):
    z = np.array([z])
    close(xe.poly1_cross_entropy(z, [y], epsilon=0.0, label_smoothing=eps),
          xe.softmax_cross_entropy(z, [y], label_smoothing=eps), rtol=1e-12, atol=1e-12)


# ---- sample_weight: scikit-learn's log_loss, and the weighted mean ------------------------

SW_LOSSES = {
    "softmax_cross_entropy": lambda z, y, s, sw, **kw: xe.softmax_cross_entropy(
        z, y, sample_weight=sw, **kw),
    "poly1_cross_entropy": lambda z, y, s, sw, **kw: xe.poly1_cross_entropy(
        z, y, sample_weight=sw, **kw),
    "softmax_focal_loss": lambda z, y, s, sw, **kw: xe.softmax_focal_loss(
        z, y, sample_weight=sw, **kw),
    "nll_loss": lambda z, y, s, sw, **kw: xe.nll_loss(
        xe.log_softmax(z), y, sample_weight=sw, **kw),
    "categorical_focal_loss": lambda z, y, s, sw, **kw: xe.categorical_focal_loss(
        xe.softmax(z), y, sample_weight=sw, **kw),
    "binary_cross_entropy": lambda z, y, s, sw, **kw: xe.binary_cross_entropy(
        xe.sigmoid(z), s, sample_weight=sw, **kw),
    "sigmoid_binary_cross_entropy": lambda z, y, s, sw, **kw: xe.sigmoid_binary_cross_entropy(
        z, s, sample_weight=sw, **kw),
    "sigmoid_focal_loss": lambda z, y, s, sw, **kw: xe.sigmoid_focal_loss(
        z, s, sample_weight=sw, **kw),
    "multilabel_cross_entropy": lambda z, y, s, sw, **kw: xe.multilabel_cross_entropy(
        z, s, sample_weight=sw, **kw),
}
ROW_LOSSES = {"softmax_cross_entropy", "poly1_cross_entropy", "softmax_focal_loss", "nll_loss",
              "multilabel_cross_entropy", "categorical_focal_loss"}


def test_sample_weight_mean_matches_sklearn_log_loss(backend, data):
    from sklearn.metrics import log_loss

    z, y, _, _ = data
    sw = np.linspace(0.0, 2.0, N)
    got = run(backend, lambda z, y, sw: xe.softmax_cross_entropy(z, y, sample_weight=sw),
              z, y, sw)
    close(got, log_loss(y, sp.softmax(z, axis=-1), sample_weight=sw, labels=range(C)))
    q, t = sp.expit(z[:, 0]), (y == 1).astype(float)
    got = run(backend, lambda q, t, sw: xe.binary_cross_entropy(q, t, sample_weight=sw), q, t, sw)
    close(got, log_loss(t, q, sample_weight=sw))


def test_sample_weight_with_class_weight_and_ignore_index_matches_torch(backend, data):
    z, y, _, w = data
    y = y.copy()
    y[3] = -100
    sw = np.linspace(0.5, 2.0, N)
    rows = F.cross_entropy(torch.tensor(z), torch.tensor(y), weight=torch.tensor(w),
                           reduction="none").numpy()
    counted = np.where(y == -100, 0.0, w[np.where(y == -100, 0, y)])
    got = run(backend, lambda z, y, w, sw: xe.softmax_cross_entropy(
        z, y, weight=w, sample_weight=sw), z, y, w, sw)
    close(got, (sw * rows).sum() / (sw * counted).sum())
    got = run(backend, lambda lp, y, w, sw: xe.nll_loss(lp, y, weight=w, sample_weight=sw,
                                                        reduction="none"),
              sp.log_softmax(z, axis=-1), y, w, sw)
    close(got, sw * rows)


@pytest.mark.parametrize("name", sorted(SW_LOSSES))
def test_sample_weight_scales_each_example_and_the_mean_divides_by_their_sum(backend, data, name):
    z, y, _, _ = data
    s = sp.expit(z)
    sw = np.linspace(0.25, 2.0, N) if name in ROW_LOSSES else np.linspace(0.25, 2.0, N * C)
    sw = sw.reshape((N,) if name in ROW_LOSSES else (N, C))
    fn = SW_LOSSES[name]
    plain = run(backend, lambda z, y, s: fn(z, y, s, None, reduction="none"), z, y, s)
    weighted = run(backend, lambda z, y, s, sw: fn(z, y, s, sw, reduction="none"), z, y, s, sw)
    close(weighted, sw * plain)
    mean = run(backend, lambda z, y, s, sw: fn(z, y, s, sw), z, y, s, sw)
    close(mean, (sw * plain).sum() / sw.sum())
    ones = run(backend, lambda z, y, s, sw: fn(z, y, s, sw), z, y, s, np.ones(sw.shape[-1:]))
    close(ones, run(backend, lambda z, y, s: fn(z, y, s, None), z, y, s))


@settings(max_examples=30, deadline=None)
@given(name=st.sampled_from(sorted(SW_LOSSES)), seed=st.integers(0, 2**16),
       reduction=st.sampled_from(["none", "sum", "mean"]))
def test_sample_weights_of_ones_equal_none(name, seed, reduction):
    rng = np.random.default_rng(seed)
    z = 4.0 * rng.normal(size=(3, C))
    y = rng.integers(0, C, size=3)
    s = rng.random((3, C))
    ones = np.ones(3 if name in ROW_LOSSES else (3, C))
    fn = SW_LOSSES[name]
    close(fn(z, y, s, ones, reduction=reduction), fn(z, y, s, None, reduction=reduction),
          rtol=1e-12, atol=1e-12)


def test_sample_weight_that_does_not_broadcast_is_an_input_error(data):
    z, y, _, _ = data
    with pytest.raises(xe.InputError, match="sample_weight"):
        xe.softmax_cross_entropy(z, y, sample_weight=np.ones(N + 1))
    with pytest.raises(xe.InputError, match="sample_weight"):
        xe.sigmoid_binary_cross_entropy(z, sp.expit(z), sample_weight="heavy")


# ---- where: masked entries contribute nothing and are not counted ----------------------

WHERE_LOSSES = {
    "binary_cross_entropy": lambda z, t, **kw: xe.binary_cross_entropy(xe.sigmoid(z), t, **kw),
    "sigmoid_binary_cross_entropy": xe.sigmoid_binary_cross_entropy,
    "sigmoid_focal_loss": xe.sigmoid_focal_loss,
}


@pytest.mark.parametrize("name", sorted(WHERE_LOSSES))
def test_where_drops_masked_entries_from_sum_and_mean(backend, rng, name):
    z = 2.0 * rng.normal(size=(N, C))
    t = rng.random((N, C))
    mask = rng.random((N, C)) > 0.4
    sw = rng.uniform(0.5, 2.0, size=C)
    fn = WHERE_LOSSES[name]
    plain = run(backend, lambda z, t: fn(z, t, reduction="none"), z, t)
    z_nan = np.where(mask, z, np.nan)  # a masked NaN does not reach the loss
    got = run(backend, lambda z, t, m: fn(z, t, where=m, reduction="none"), z_nan, t, mask)
    close(got, np.where(mask, plain, 0.0))
    got = run(backend, lambda z, t, m: fn(z, t, where=m), z_nan, t, mask)
    close(got, plain[mask].mean())
    got = run(backend, lambda z, t, m, sw: fn(z, t, where=m, sample_weight=sw), z, t, mask, sw)
    swb = np.broadcast_to(sw, (N, C))
    close(got, (swb * plain)[mask].sum() / swb[mask].sum())


@settings(max_examples=20, deadline=None)
@given(name=st.sampled_from(sorted(WHERE_LOSSES)), seed=st.integers(0, 2**16),
       reduction=st.sampled_from(["none", "sum", "mean"]))
def test_a_mask_of_all_ones_equals_no_mask(name, seed, reduction):
    rng = np.random.default_rng(seed)
    z, t = 4.0 * rng.normal(size=(3, C)), rng.random((3, C))
    fn = WHERE_LOSSES[name]
    close(fn(z, t, where=np.ones((3, C), dtype=bool), reduction=reduction),
          fn(z, t, reduction=reduction), rtol=1e-12, atol=1e-12)


def test_where_must_be_a_broadcasting_boolean_mask(data):
    z, _, _, _ = data
    for bad in (np.ones((N, C)), np.ones((2, C), dtype=bool), "all", [[1.0j]]):
        with pytest.raises(xe.InputError, match="where"):
            xe.sigmoid_binary_cross_entropy(z, sp.expit(z), where=bad)


def test_where_on_softmax_log_softmax_and_logsumexp_matches_jax_nn(backend, rng):
    x = rng.normal(size=(3, C))
    x[0, 1] = np.nan  # masked out: it does not reach the kept entries
    mask = rng.random((3, C)) > 0.3
    mask[:, 0] = True
    mask[0, 1] = False
    xj, mj = jnp.asarray(x), jnp.asarray(mask)
    for ours, theirs in [(xe.softmax, jax.nn.softmax), (xe.log_softmax, jax.nn.log_softmax)]:
        close(run(backend, lambda x, m, f=ours: f(x, where=m), x, mask), theirs(xj, where=mj))
    close(run(backend, lambda x, m: xe.logsumexp(x, where=m), x, mask),
          jax.nn.logsumexp(xj, axis=-1, where=mj))
    ones = np.ones_like(mask)
    close(run(backend, lambda x, m: xe.log_softmax(x, where=m), x[1:], ones[1:]),
          run(backend, xe.log_softmax, x[1:]))


@pytest.mark.parametrize("name", sorted(SW_LOSSES))
def test_where_on_every_loss_drops_masked_examples(backend, data, name):
    z, y, _, _ = data
    s = sp.expit(z)
    shape = (N,) if name in ROW_LOSSES else (N, C)
    mask = (np.arange(np.prod(shape)) % 3 != 1).reshape(shape)
    fn = SW_LOSSES[name]
    plain = run(backend, lambda z, y, s: fn(z, y, s, None, reduction="none"), z, y, s)
    got = run(backend, lambda z, y, s, m: fn(z, y, s, None, where=m, reduction="none"),
              z, y, s, mask)
    close(got, np.where(mask, plain, 0.0))
    close(run(backend, lambda z, y, s, m: fn(z, y, s, None, where=m), z, y, s, mask),
          plain[mask].mean())
    ones = run(backend, lambda z, y, s, m: fn(z, y, s, None, where=m), z, y, s,
               np.ones(shape, dtype=bool))
    close(ones, run(backend, lambda z, y, s: fn(z, y, s, None), z, y, s))


# A where shaped like the logits is a class mask on the softmax losses (optax's rule):
# tests/test_core_where_class_axis.py.
