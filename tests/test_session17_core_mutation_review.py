"""Session 17, H44: tests that kill mutants of the core's measures (crossent.measures) that
the suite let live. Reference: SciPy's special functions."""

from __future__ import annotations

import math

import numpy as np
import pytest

import crossent as xe

special = pytest.importorskip("scipy.special")


def test_kl_terms_zero_probability_facing_nan_q_is_nan():
    """``rel_entr(0, NaN)`` is NaN (scipy.special.rel_entr): a NaN q propagates."""
    p, q = np.array([0.0, 1.0]), np.array([math.nan, 1.0])
    want = special.rel_entr(p, q)
    got = xe.kl_divergence_terms(p, q, validate=False)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    assert np.isnan(got[0]) and got[1] == 0.0
