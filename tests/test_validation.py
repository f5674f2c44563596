"""Argument checks: every bad argument raises ValueError naming it, the row-sum tolerance is
1e-4 on both sides, ``validate=False`` skips the value checks, and NaN is not an error (it
propagates to the output)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from numerics import INF_NAN_EXPECTED

import crossent as xe

MEASURES = {
    "surprisal": lambda p, q, **kw: xe.surprisal(p, **kw),
    "entropy": lambda p, q, **kw: xe.entropy(p, **kw),
    "cross_entropy": xe.cross_entropy,
    "kl_divergence": xe.kl_divergence,
    "binary_entropy": lambda p, q, **kw: xe.binary_entropy(p, **kw),
}
DISTRIBUTION_MEASURES = ["entropy", "cross_entropy", "kl_divergence"]
PAIR_MEASURES = ["cross_entropy", "kl_divergence"]
VALID = [0.2, 0.3, 0.5]


@pytest.mark.parametrize("name", MEASURES)
@pytest.mark.parametrize("base", [0, -2.0, 1, 1.0, math.inf, math.nan, "two", [2.0]])
def test_a_bad_base_is_rejected_by_name(backend, name, base):
    p = backend.asarray(VALID)
    with pytest.raises(ValueError, match=r"^base="):
        MEASURES[name](p, p, base=base)


@pytest.mark.parametrize("name", MEASURES)
@pytest.mark.parametrize("bad", [1.5, -0.5])
def test_probabilities_outside_zero_one_are_rejected_by_name(backend, name, bad):
    p, good = backend.asarray([bad, 1 - bad]), backend.asarray([0.5, 0.5])
    with pytest.raises(ValueError, match=r"^p must hold probabilities in \[0, 1\]"):
        MEASURES[name](p, good)
    if name in PAIR_MEASURES:
        with pytest.raises(ValueError, match=r"^q must hold probabilities in \[0, 1\]"):
            MEASURES[name](good, p)


@pytest.mark.parametrize("name", DISTRIBUTION_MEASURES)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("off", [5e-5, -5e-5])
def test_rows_within_1e_4_of_summing_to_one_pass(backend, name, dtype, off):
    p = backend.asarray([0.5, 0.5 + off], dtype=dtype)
    assert np.isfinite(backend.to_numpy(MEASURES[name](p, p)))


@pytest.mark.parametrize("name", DISTRIBUTION_MEASURES)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("off", [2e-4, -2e-4])
def test_rows_further_than_1e_4_from_summing_to_one_are_rejected(backend, name, dtype, off):
    bad, good = backend.asarray([0.5, 0.5 + off], dtype=dtype), backend.asarray([0.5, 0.5])
    with pytest.raises(ValueError, match=r"^p must sum to 1"):
        MEASURES[name](bad, good)
    if name in PAIR_MEASURES:
        with pytest.raises(ValueError, match=r"^q must sum to 1"):
            MEASURES[name](good, bad)


def test_the_row_sum_is_checked_along_axis(backend):
    p = backend.asarray([[0.5, 0.25], [0.5, 0.75]])  # columns are distributions, rows are not
    np.testing.assert_allclose(
        backend.to_numpy(xe.entropy(p, axis=0)),
        [math.log(2), -0.25 * math.log(0.25) - 0.75 * math.log(0.75)],
    )
    with pytest.raises(ValueError, match=r"^p must sum to 1 along axis -1"):
        xe.entropy(p)


def test_validate_false_skips_the_value_checks(backend):
    p, q = np.array([0.5, 0.7]), np.array([0.2, 0.2])  # neither sums to 1
    bp, bq = backend.asarray(p), backend.asarray(q)
    for got, expected in [
        (xe.entropy(bp, validate=False), -(p * np.log(p)).sum()),
        (xe.cross_entropy(bp, bq, validate=False), -(p * np.log(q)).sum()),
        (xe.kl_divergence(bp, bq, validate=False), (p * np.log(p / q)).sum()),
        (xe.surprisal(backend.asarray(2.0), validate=False), -math.log(2)),
    ]:
        np.testing.assert_allclose(backend.to_numpy(got), expected, rtol=1e-12)


@INF_NAN_EXPECTED
@pytest.mark.parametrize("name", MEASURES)
def test_nan_propagates_instead_of_raising(backend, name):
    p = backend.asarray([[math.nan, 0.5, 0.5], VALID])
    assert np.isnan(backend.to_numpy(MEASURES[name](p, p))).any()
    if name in PAIR_MEASURES:
        # a NaN belief propagates even where the truth is 0 (0 * log NaN is NaN, as in SciPy)
        got = MEASURES[name](
            backend.asarray([[0.0, 1.0], [0.5, 0.5]]),
            backend.asarray([[math.nan, 1.0], [0.5, 0.5]]),
        )
        out = backend.to_numpy(got)
        assert np.isnan(out[0]) and np.isfinite(out[1])


# Targets ------------------------------------------------------------------------------------


@pytest.mark.parametrize("labels", [[0, 5], [-1, 2]])
def test_labels_outside_the_classes_are_rejected_by_name(backend, labels):
    with pytest.raises(ValueError, match=r"^labels must lie in \[0, 5\)"):
        xe.one_hot(backend.asarray(labels), 5)


def test_non_integer_labels_are_rejected_by_name(backend):
    with pytest.raises(ValueError, match=r"^labels must be integers"):
        xe.one_hot(backend.asarray([0.0, 1.0]), 3)


@pytest.mark.parametrize("num_classes", [0, -1, 2.5, True, "3"])
def test_a_bad_num_classes_is_rejected_by_name(num_classes):
    with pytest.raises(ValueError, match=r"^num_classes="):
        xe.one_hot([0, 1], num_classes)


@pytest.mark.parametrize("alpha", [-0.1, 1.5, math.nan, "x"])
def test_a_smoothing_alpha_outside_zero_one_is_rejected_by_name(backend, alpha):
    with pytest.raises(ValueError, match=r"^alpha="):
        xe.smooth_labels(backend.asarray([[0.0, 1.0]]), alpha)


def test_mixup_argument_errors_name_the_argument(backend):
    x, labels = backend.asarray(np.zeros((3, 2))), backend.asarray([0, 1, 1])
    with pytest.raises(ValueError, match=r"^num_classes is required"):
        xe.mixup(x, labels, alpha=0.4, seed=0)
    for alpha in (0.0, -1.0):
        with pytest.raises(ValueError, match=r"^alpha="):
            xe.mixup(x, labels, alpha=alpha, seed=0, num_classes=2)
    with pytest.raises(ValueError, match=r"^targets has 2 rows but x has 3"):
        xe.mixup(x, backend.asarray([0, 1]), alpha=0.4, seed=0, num_classes=2)
