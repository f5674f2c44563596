"""softmax, log_softmax, logsumexp, sigmoid, log_sigmoid against SciPy and PyTorch: every axis,
huge logits, -inf masks, all-masked rows, +inf, NaN, low-precision dtypes, and the algebraic
properties (shift invariance, normalisation) as hypothesis properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.special as sp
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
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

INF = math.inf
# Logits where float32 and float64 results stay normal numbers (no subnormal outputs).
EXTREMES = {"float64": [-1e4, -700.0, -50.0], "float32": [-1e4, -50.0]}
SMALL = [-20.0, -1.0, -1e-8, 0.0, 1e-8, 1.0, 20.0, 50.0, 1e4]


def _logits(rng, dtype, shape=(3, 4, 5)):
    return rng.normal(scale=10.0, size=shape).astype(dtype).astype("float64")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("axis", [0, 1, 2, -1])
def test_softmax_and_log_softmax_match_scipy_and_torch_along_any_axis(backend, rng, dtype, axis):
    x, x64 = as_input(backend, _logits(rng, dtype), dtype)
    t = torch.from_numpy(x64)
    # x - logsumexp(x) cancels where a log-probability is near 0: absolute error ~eps * |x|
    # there (in SciPy and torch as well).
    cancellation = rounding(dtype, np.abs(x64).max())
    for ours, theirs, torchs, atol in [
        (xe.softmax, sp.softmax, torch.softmax, 0.0),
        (xe.log_softmax, sp.log_softmax, torch.log_softmax, cancellation),
    ]:
        got = ours(x, axis=axis)
        assert_close(backend, got, theirs(x64, axis=axis), dtype, atol=atol)
        assert_close(backend, got, torchs(t, dim=axis).numpy(), dtype, atol=atol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("keepdims", [False, True])
@pytest.mark.parametrize("axis", [0, -1, (0, 2), (1,), None])
def test_logsumexp_matches_scipy_and_torch_for_any_axis(backend, rng, dtype, axis, keepdims):
    x, x64 = as_input(backend, _logits(rng, dtype), dtype)
    got = xe.logsumexp(x, axis=axis, keepdims=keepdims)
    atol = rounding(dtype, np.abs(x64).max())  # max(x) + log(sum) cancels near 0
    assert_close(backend, got, sp.logsumexp(x64, axis=axis, keepdims=keepdims), dtype, atol=atol)
    dim = tuple(range(x64.ndim)) if axis is None else axis
    expected = torch.logsumexp(torch.from_numpy(x64), dim, keepdims).numpy()
    assert_close(backend, got, expected, dtype, atol=atol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sigmoid_and_log_sigmoid_match_scipy_and_torch_everywhere(backend, rng, dtype):
    values = EXTREMES[dtype] + SMALL + list(5 * rng.standard_normal(20))
    x, x64 = as_input(backend, values, dtype)
    t = torch.from_numpy(x64)
    assert_close(backend, xe.sigmoid(x), sp.expit(x64), dtype)
    assert_close(backend, xe.sigmoid(x), torch.sigmoid(t).numpy(), dtype)
    assert_close(backend, xe.log_sigmoid(x), sp.log_expit(x64), dtype)
    assert_close(backend, xe.log_sigmoid(x), F.logsigmoid(t).numpy(), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_logits_of_size_1e4_do_not_overflow(backend, dtype):
    def arr(values):
        return as_input(backend, values, dtype)[0]

    assert_close(backend, xe.softmax(arr([1e4, 0.0, -1e4])), [1.0, 0.0, 0.0], dtype)
    e = math.exp(-1.0)
    assert_close(backend, xe.softmax(arr([1e4, 1e4 - 1])), [1 / (1 + e), e / (1 + e)], dtype)
    assert_close(backend, xe.log_softmax(arr([1e4, -1e4])), [0.0, -2e4], dtype)
    assert_close(backend, xe.logsumexp(arr([1e4, 1e4])), 1e4 + math.log(2), dtype)
    assert_close(backend, xe.logsumexp(arr([-1e4, -1e4])), -1e4 + math.log(2), dtype)
    assert_close(backend, xe.sigmoid(arr([-1e4, 1e4])), [0.0, 1.0], dtype)
    assert_close(backend, xe.log_sigmoid(arr([-1e4, 1e4])), [-1e4, 0.0], dtype)


def test_minus_inf_logits_are_masks_with_probability_exactly_zero(backend):
    x = np.array([[-INF, 0.5, 2.0, -INF], [1.0, -INF, -3.0, 0.0]])
    mask = np.isinf(x)
    kept = [row[~m] for row, m in zip(x, mask, strict=True)]
    p = backend.to_numpy(xe.softmax(backend.asarray(x)))
    assert (p[mask] == 0.0).all()
    np.testing.assert_allclose(p[~mask], np.concatenate([sp.softmax(k) for k in kept]), rtol=1e-10)
    logp = backend.to_numpy(xe.log_softmax(backend.asarray(x)))
    assert np.isneginf(logp[mask]).all()
    expected = np.concatenate([sp.log_softmax(k) for k in kept])
    np.testing.assert_allclose(logp[~mask], expected, rtol=1e-10)
    assert_close(backend, xe.logsumexp(backend.asarray(x)), [sp.logsumexp(k) for k in kept])


@INF_NAN_EXPECTED
def test_a_fully_masked_row_has_no_distribution(backend):
    # softmax and log_softmax give NaN there, like torch; logsumexp gives -inf, like SciPy.
    x = np.array([[-INF, -INF, -INF], [0.0, 1.0, 2.0]])
    t = torch.from_numpy(x)
    for ours, theirs in [(xe.softmax, torch.softmax), (xe.log_softmax, torch.log_softmax)]:
        got = backend.to_numpy(ours(backend.asarray(x)))
        assert np.isnan(got[0]).all()
        np.testing.assert_allclose(got[1], theirs(t, dim=-1)[1].numpy(), rtol=1e-10)
        assert torch.isnan(theirs(t, dim=-1)[0]).all()
    assert_close(backend, xe.logsumexp(backend.asarray(x)), sp.logsumexp(x, axis=-1))
    assert np.isneginf(sp.logsumexp(x, axis=-1)[0])


@INF_NAN_EXPECTED
def test_plus_inf_logits(backend):
    x = backend.asarray([[INF, 0.0, -INF], [INF, INF, 1.0]])
    assert_close(backend, xe.logsumexp(x), [INF, INF])
    # The +inf entry has no finite share of the mass: NaN there, as torch and SciPy give.
    assert np.isnan(backend.to_numpy(xe.softmax(x))[:, 0]).all()
    assert np.isnan(backend.to_numpy(xe.log_softmax(x))[:, 0]).all()
    y = backend.asarray([INF, -INF])
    assert_close(backend, xe.sigmoid(y), [1.0, 0.0])
    assert_close(backend, xe.log_sigmoid(y), [0.0, -INF])


@INF_NAN_EXPECTED
def test_nan_propagates_through_its_row_only(backend):
    x = backend.asarray([[math.nan, 0.0, 1e4], [0.0, 1.0, 2.0]])
    for fn in (xe.softmax, xe.log_softmax):
        got = backend.to_numpy(fn(x))
        assert np.isnan(got[0]).all() and np.isfinite(got[1]).all()
    lse = backend.to_numpy(xe.logsumexp(x))
    assert np.isnan(lse[0]) and np.isfinite(lse[1])
    for fn in (xe.sigmoid, xe.log_sigmoid):
        got = backend.to_numpy(fn(backend.asarray([math.nan, 1.0])))
        assert np.isnan(got[0]) and np.isfinite(got[1])


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_low_precision_logits_give_the_same_dtype_back(backend, dtype):
    x = low_precision_input(backend, [[1e4, 0.0, -3.5], [0.25, 2.0, -1e4]], dtype)
    x64 = backend.to_numpy(x).astype("float64")  # the rounded values the function saw
    cases = [
        (xe.softmax(x), sp.softmax(x64, axis=-1)),
        (xe.log_softmax(x), sp.log_softmax(x64, axis=-1)),
        (xe.logsumexp(x), sp.logsumexp(x64, axis=-1)),
        (xe.sigmoid(x), sp.expit(x64)),
        (xe.log_sigmoid(x), sp.log_expit(x64)),
    ]
    for got, expected in cases:
        assert got.dtype == x.dtype
        out = backend.to_numpy(got).astype("float64")
        np.testing.assert_allclose(out, expected, rtol=1e-2, atol=1e-6)


# Properties ---------------------------------------------------------------------------------

logit_rows = hnp.arrays(
    np.float64,
    hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=6),
    elements=st.floats(-100.0, 100.0),
)
shifts = st.floats(-1e3, 1e3)


@PROPERTY
@given(logit_rows, shifts)
def test_softmax_is_invariant_to_adding_a_constant_to_a_row(backend, x, c):
    shifted = x + c * np.arange(1, x.shape[0] + 1)[:, None]  # a different constant per row
    expected = backend.to_numpy(xe.softmax(backend.asarray(x)))
    assert_close(backend, xe.softmax(backend.asarray(shifted)), expected, rtol=1e-9)


@PROPERTY
@given(logit_rows)
def test_softmax_rows_sum_to_one_and_log_softmax_is_their_log(backend, x):
    p = backend.to_numpy(xe.softmax(backend.asarray(x)))
    np.testing.assert_allclose(p.sum(axis=-1), 1.0, rtol=1e-12)
    logp = backend.to_numpy(xe.log_softmax(backend.asarray(x)))
    finite = p > 0
    np.testing.assert_allclose(logp[finite], np.log(p[finite]), rtol=1e-10, atol=1e-13)


@PROPERTY
@given(logit_rows, shifts)
def test_logsumexp_moves_with_a_constant_shift(backend, x, c):
    expected = backend.to_numpy(xe.logsumexp(backend.asarray(x))) + c
    got = xe.logsumexp(backend.asarray(x + c))
    assert_close(backend, got, expected, rtol=1e-10, atol=1e-12 * (1 + abs(c)))
