"""surprisal, entropy, cross_entropy, kl_divergence, binary_entropy: values in every base and
along every axis against SciPy and math formulas, the 0 log 0 and p log(p/0) conventions
(values and autograd gradients), KL accuracy, and Gibbs' inequality as properties."""

from __future__ import annotations

import math
from decimal import Decimal, localcontext

import numpy as np
import pytest
import scipy.special as sp
import scipy.stats
import torch
from hypothesis import given
from hypothesis import strategies as st
from numerics import (
    DTYPES,
    INF_NAN_EXPECTED,
    LOW_PRECISION,
    PROPERTY,
    as_input,
    assert_close,
    low_precision_input,
    rounding,
)

import crossent as xe

BASES = [math.e, 2.0, 10.0, 3.7]
SHAPE = (3, 4, 5)


def distributions(rng, shape=SHAPE, axis=-1, zeros=0.0):
    """Random probability vectors along ``axis``; a fraction ``zeros`` of entries set to 0."""
    d = rng.dirichlet(np.ones(shape[axis]), size=tuple(np.delete(shape, axis)))
    d = np.moveaxis(d, -1, axis)
    if zeros:
        d = np.where(rng.random(shape) < zeros, 0.0, d)
        d = np.where(d.sum(axis=axis, keepdims=True) == 0, 1.0, d)
        d = d / d.sum(axis=axis, keepdims=True)
    return d


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("base", BASES)
def test_surprisal_is_minus_log_p_in_any_base(backend, rng, dtype, base):
    p, p64 = as_input(backend, np.append(rng.uniform(0.001, 1, 11), 1.0), dtype)
    assert_close(backend, xe.surprisal(p, base=base), -sp.xlogy(1, p64) / math.log(base), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("axis", [0, 1, 2, -1])
def test_entropy_matches_scipy_along_any_axis_in_any_base(backend, rng, dtype, base, axis):
    p, p64 = as_input(backend, distributions(rng, axis=axis, zeros=0.2), dtype)
    expected = scipy.stats.entropy(p64, base=base, axis=axis)  # renormalises float32 rows
    assert_close(
        backend, xe.entropy(p, axis=axis, base=base), expected, dtype, atol=rounding(dtype)
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("axis", [0, 1, -1])
def test_cross_entropy_is_minus_sum_xlogy_along_any_axis(backend, rng, dtype, base, axis):
    p, p64 = as_input(backend, distributions(rng, axis=axis, zeros=0.2), dtype)
    q, q64 = as_input(backend, distributions(rng, axis=axis), dtype)
    got = xe.cross_entropy(p, q, axis=axis, base=base)
    assert_close(backend, got, -sp.xlogy(p64, q64).sum(axis=axis) / math.log(base), dtype)
    scipy_sum = scipy.stats.entropy(p64, base=base, axis=axis) + scipy.stats.entropy(
        p64, q64, base=base, axis=axis
    )
    assert_close(backend, got, scipy_sum, dtype, atol=rounding(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("axis", [0, 1, -1])
def test_kl_divergence_is_sum_rel_entr_along_any_axis(backend, rng, dtype, base, axis):
    p, p64 = as_input(backend, distributions(rng, axis=axis, zeros=0.2), dtype)
    q, q64 = as_input(backend, distributions(rng, axis=axis), dtype)
    got = xe.kl_divergence(p, q, axis=axis, base=base)
    assert_close(backend, got, sp.rel_entr(p64, q64).sum(axis=axis) / math.log(base), dtype)
    scipy_kl = scipy.stats.entropy(p64, q64, base=base, axis=axis)
    assert_close(backend, got, scipy_kl, dtype, atol=rounding(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("base", BASES)
def test_binary_entropy_is_the_entropy_of_a_coin(backend, dtype, base):
    p, p64 = as_input(backend, [0.0, 0.01, 0.25, 0.5, 0.9, 0.99, 1.0], dtype)
    expected = scipy.stats.entropy(np.stack([p64, 1 - p64]), base=base, axis=0)
    assert_close(backend, xe.binary_entropy(p, base=base), expected, dtype, atol=1e-15)


def test_binary_entropy_is_accurate_for_a_tiny_p(backend):
    # H_b(p) = -p ln p + p - p^2/2 + O(p^3); the p^2 term is below float64 resolution here.
    p = 1e-12
    assert_close(backend, xe.binary_entropy(backend.asarray([p])), [p * (1 - math.log(p))])


def test_binary_entropy_peaks_at_one_bit_for_a_fair_coin(backend):
    assert_close(backend, xe.binary_entropy(backend.asarray(0.5), base=2), 1.0)


def test_impossible_outcomes_contribute_nothing(backend):
    p = backend.asarray([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]])
    assert_close(backend, xe.entropy(p), [0.0, math.log(2)])
    one_hot, q = backend.asarray([0.0, 0.0, 1.0]), backend.asarray([0.0, 0.3, 0.7])
    assert_close(backend, xe.cross_entropy(one_hot, q), -math.log(0.7))
    assert_close(backend, xe.kl_divergence(one_hot, q), -math.log(0.7))
    assert_close(backend, xe.binary_entropy(backend.asarray([0.0, 1.0])), [0.0, 0.0])


@INF_NAN_EXPECTED
def test_an_outcome_believed_impossible_costs_infinitely_much(backend):
    p, q = backend.asarray([0.5, 0.5]), backend.asarray([1.0, 0.0])
    for got in (xe.cross_entropy(p, q), xe.kl_divergence(p, q), xe.surprisal(q)[1]):
        assert np.isposinf(backend.to_numpy(got))


def _grads(fn, *values):
    tensors = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in values]
    fn(*tensors).sum().backward()
    return [t.grad.numpy() for t in tensors]


def test_gradients_at_zero_probability_follow_the_0_log_0_convention():
    # position 0: p = q = 0; position 1: p = 0 < q; the rest: both positive.
    p, q = np.array([0.0, 0.0, 0.3, 0.7]), np.array([0.0, 0.2, 0.2, 0.6])
    pos = p > 0
    (dh,) = _grads(xe.entropy, p)
    np.testing.assert_allclose(dh, np.where(pos, -np.log(np.where(pos, p, 1)) - 1, 0.0), rtol=1e-12)
    dp, dq = _grads(xe.cross_entropy, p, q)
    np.testing.assert_allclose(dp, [0.0, -math.log(0.2), -math.log(0.2), -math.log(0.6)])
    np.testing.assert_allclose(dq, np.where(pos, -p / np.where(pos, q, 1), 0.0), rtol=1e-12)
    dp, dq = _grads(xe.kl_divergence, p, q)
    log_ratio = np.log(np.where(pos, p / np.where(pos, q, 1), 1))
    np.testing.assert_allclose(dp, np.where(pos, log_ratio + 1, 0.0), rtol=1e-12)
    np.testing.assert_allclose(dq, np.where(pos, -p / np.where(pos, q, 1), 0.0), rtol=1e-12)
    # a ratio p/q that overflows (subnormal q) must not leak 0 * inf into the gradient
    assert not np.isnan(_grads(xe.kl_divergence, [1.0, 0.0], [1e-310, 1.0])).any()
    (db,) = _grads(xe.binary_entropy, [0.0, 0.25, 1.0])
    assert np.isfinite(db).all()
    np.testing.assert_allclose(db[1], math.log(3))


def _kl_decimal(p, q):
    """KL(p || q) of the exact binary values of p and q, in 40-digit decimal arithmetic."""
    with localcontext() as ctx:
        ctx.prec = 40
        terms = (
            Decimal(a) * (Decimal(a) / Decimal(b)).ln() for a, b in zip(p, q, strict=True) if a > 0
        )
        return float(sum(terms, Decimal(0)))


@pytest.mark.parametrize("delta", [1e-3, 1e-6])
def test_kl_divergence_is_accurate_when_q_is_close_to_p(backend, rng, delta):
    # The result is ~delta^2 while its terms are ~delta: summing exact terms loses
    # ~eps/delta; H(p, q) - H(p), or log(p/q) with a rounded ratio, loses ~eps/delta^2.
    q = distributions(rng, shape=(4, 6))
    p = q * (1 + delta * rng.standard_normal(q.shape))
    p /= p.sum(axis=-1, keepdims=True)
    got = xe.kl_divergence(backend.asarray(p), backend.asarray(q))
    expected = [_kl_decimal(a, b) for a, b in zip(p, q, strict=True)]
    assert_close(backend, got, expected, rtol=100 * np.finfo(float).eps / delta)
    assert (backend.to_numpy(got) > 0).all()


@INF_NAN_EXPECTED
@pytest.mark.parametrize(
    ("p", "q"),
    [(1e-300, 1.0), (1.0, 1e-300), (1e-300, 1e-300), (1e-300, 1e-10), (1e-310, 1.0), (1.0, 1e-310)],
)
def test_kl_divergence_term_is_exact_for_extreme_ratios(backend, p, q):
    if min(p, q) < np.finfo(float).smallest_normal and backend.name == "jax":
        pytest.skip("XLA on CPU flushes subnormal float64 to zero")
    got = xe.kl_divergence(backend.asarray([p]), backend.asarray([q]), validate=False)
    assert_close(backend, got, p * (math.log(p) - math.log(q)))


def test_kl_divergence_of_normalised_extreme_distributions(backend):
    p, q = backend.asarray([1e-300, 1.0]), backend.asarray([1.0, 1e-300])
    assert_close(backend, xe.kl_divergence(p, q), 1e-300 * math.log(1e-300) + math.log(1e300))


def test_integer_truth_takes_the_predictions_float_dtype(backend):
    truth = backend.asarray([[0, 0, 1], [1, 0, 0]])
    q = backend.asarray([[0.1, 0.2, 0.7], [0.5, 0.25, 0.25]], dtype="float32")
    expected = [-math.log(0.7), -math.log(0.5)]
    assert_close(backend, xe.cross_entropy(truth, q), expected, "float32")


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_measures_return_the_low_precision_dtype_they_were_given(backend, dtype):
    p = low_precision_input(backend, [0.25, 0.25, 0.5], dtype)
    q = low_precision_input(backend, [0.5, 0.25, 0.25], dtype)
    cases = [
        (xe.surprisal(p), -np.log([0.25, 0.25, 0.5])),
        (xe.binary_entropy(p), [0.562335, 0.562335, math.log(2)]),
        (xe.entropy(p), 1.5 * math.log(2)),
        (xe.cross_entropy(p, q), 1.75 * math.log(2)),
        (xe.kl_divergence(p, q), 0.25 * math.log(2)),
    ]
    for got, expected in cases:
        assert got.dtype == p.dtype
        out = backend.to_numpy(got).astype("float64")
        np.testing.assert_allclose(out, expected, rtol=1e-2)


# Properties ---------------------------------------------------------------------------------


@st.composite
def distribution_pairs(draw):
    """Two probability vectors of one length, with zeros allowed."""
    n = draw(st.integers(2, 6))
    weight = st.floats(0.0, 1.0, allow_subnormal=False) | st.just(0.0)
    weights = st.lists(weight, min_size=n, max_size=n).filter(lambda w: sum(w) > 1e-3)
    p, q = np.array(draw(weights)), np.array(draw(weights))
    return p / p.sum(), q / q.sum()


@INF_NAN_EXPECTED
@PROPERTY
@given(distribution_pairs())
def test_gibbs_cross_entropy_exceeds_entropy_unless_q_is_p(backend, pq):
    p, q = pq
    h = float(backend.to_numpy(xe.entropy(backend.asarray(p))))
    ce = float(backend.to_numpy(xe.cross_entropy(backend.asarray(p), backend.asarray(q))))
    kl = float(backend.to_numpy(xe.kl_divergence(backend.asarray(p), backend.asarray(q))))
    assert ce >= h - 1e-12
    # Pinsker: KL >= ||p - q||_1^2 / 2 (nats), so KL = 0 (and H(p, q) = H(p)) only at q = p.
    assert kl >= 0.5 * np.abs(p - q).sum() ** 2 - 1e-12
    if math.isfinite(ce):
        assert kl == pytest.approx(ce - h, rel=1e-9, abs=1e-12)
    else:
        assert kl == math.inf


@PROPERTY
@given(distribution_pairs())
def test_divergence_from_itself_is_zero(backend, pq):
    p = backend.asarray(pq[0])
    assert backend.to_numpy(xe.kl_divergence(p, p)) == 0.0
    h, ce = xe.entropy(p), xe.cross_entropy(p, p)
    np.testing.assert_allclose(backend.to_numpy(ce), backend.to_numpy(h), rtol=1e-14, atol=1e-15)


@PROPERTY
@given(distribution_pairs(), st.floats(1.01, 100.0) | st.floats(0.01, 0.99))
def test_changing_base_divides_by_the_log_of_the_base(backend, pq, base):
    p = backend.asarray(pq[0])
    nats = backend.to_numpy(xe.entropy(p))
    assert_close(backend, xe.entropy(p, base=2), nats / math.log(2), atol=1e-15)
    assert_close(backend, xe.entropy(p, base=base), nats / math.log(base), atol=1e-15)
