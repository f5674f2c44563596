"""The core against the cases other libraries test themselves on.

The inputs below are the kinds of cases SciPy (``scipy.stats.entropy``,
``scipy.special.rel_entr / kl_div / xlogy / logsumexp / softmax / log_softmax``),
scikit-learn (``sklearn.metrics.log_loss``) and optax (``softmax_cross_entropy``, its
integer-label and ``safe_`` forms, ``sigmoid_binary_cross_entropy``, ``kl_divergence``,
``convex_kl_divergence``, ``generalized_kl_divergence``, ``poly_loss_cross_entropy``,
``smooth_labels``) put to their own functions: uniform and zero-holding distributions,
unnormalised inputs, other axes and broadcasting, huge and tiny magnitudes, -inf logits,
masks, labels given by name, sample weights. Each expected value is the library's own
answer, computed here on the same data (never a number copied from crossent). Where the
library silently does something crossent refuses (renormalising, clipping), crossent must
refuse loudly (an InputError naming the argument) or say so in its docstring.

Cases tests/test_measures.py, test_losses.py, test_activations.py and test_pitfalls.py
already pin (random rows on every axis and base, optax per-row agreement on random data,
sklearn's binary log_loss on random data) are not repeated.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import mpmath
import numpy as np
import optax
import pytest
import scipy.special as sp
import scipy.stats
from sklearn.metrics import log_loss

import crossent as xe
from crossent.errors import InputError


def close(got, want, rtol=1e-12, atol=0.0):
    np.testing.assert_allclose(np.asarray(got, dtype=np.float64),
                               np.asarray(want, dtype=np.float64), rtol=rtol, atol=atol)


# --------------------------------------------------------------------------------------------
# scipy.stats.entropy
# --------------------------------------------------------------------------------------------

PK = np.array([[0.1, 0.2], [0.6, 0.3], [0.3, 0.5]])  # columns are distributions
QK = np.array([[0.2, 0.1], [0.3, 0.6], [0.5, 0.3]])


def test_uniform_over_16_is_4_bits_and_base_only_rescales():
    p = np.full(16, 1 / 16)
    close(xe.entropy(p, base=2), scipy.stats.entropy(np.ones(16), base=2.0))
    q = np.where(np.arange(16) < 8, 2.0, 1.0)
    q = q / q.sum()
    nats, bits = xe.kl_divergence(p, q), xe.kl_divergence(p, q, base=2)
    close(nats / bits, math.log(2))
    close(bits, scipy.stats.entropy(p, q, base=2.0))


def test_unnormalised_input_is_refused_not_renormalised():
    """scipy renormalises [0, 1, 2] to [0, 1/3, 2/3]; crossent names p instead."""
    with pytest.raises(InputError, match=r"\bp\b"):
        xe.entropy([0.0, 1.0, 2.0])
    with pytest.raises(InputError, match=r"\bq\b"):
        xe.kl_divergence([0.5, 0.5], [1.0, 3.0])
    close(xe.entropy([0.0, 1 / 3, 2 / 3]), scipy.stats.entropy([0.0, 1.0, 2.0]))


@pytest.mark.parametrize("axis", [0, -2])
def test_columns_as_distributions_along_axis_0(axis):
    close(xe.kl_divergence(PK, QK, axis=axis), scipy.stats.entropy(PK, QK))
    close(xe.entropy(PK, axis=axis), scipy.stats.entropy(PK))
    close(xe.kl_divergence(PK.T, QK.T), scipy.stats.entropy(PK, QK, axis=0))  # transposed
    close(xe.cross_entropy(PK, QK, axis=axis),
          scipy.stats.entropy(PK) + scipy.stats.entropy(PK, QK))


def test_rows_that_do_not_sum_to_1_along_axis_1_are_refused():
    """scipy.stats.entropy(PK, QK, axis=1) renormalises each row (0.1 + 0.2 = 0.3)."""
    with pytest.raises(InputError, match=r"\bp\b"):
        xe.kl_divergence(PK, QK, axis=1)
    with pytest.raises(InputError, match=r"\bp\b"):
        xe.entropy(PK, axis=1)


def test_zeros_in_q_and_in_p():
    q0 = np.array([[0.0, 0.1], [0.3, 0.6], [0.7, 0.3]])  # p > 0 where q = 0: inf
    want = scipy.stats.entropy(PK, q0)
    assert np.isinf(want[0])
    close(xe.kl_divergence(PK, q0, axis=0), want)
    p0 = np.array([[0.0, 0.2], [0.7, 0.3], [0.3, 0.5]])  # p = 0 where q = 0: nothing
    close(xe.kl_divergence(p0, q0, axis=0), scipy.stats.entropy(p0, q0))
    close(xe.entropy(p0, axis=0), scipy.stats.entropy(p0))
    close(xe.cross_entropy(p0, q0, axis=0),
          scipy.stats.entropy(p0) + scipy.stats.entropy(p0, q0))


def test_broadcasting_a_distribution_against_a_batch():
    rng = np.random.default_rng(74187315492831452)
    x = rng.dirichlet(np.ones(3))
    y = rng.dirichlet(np.ones(3), size=2)
    got = xe.kl_divergence(x, y)
    assert got.shape == (2,)
    close(got, scipy.stats.entropy(x, y, axis=-1))
    close(xe.kl_divergence(y, x), scipy.stats.entropy(y, x, axis=-1))


def test_scipys_broadcast_of_a_size_1_class_axis_is_refused():
    """scipy broadcasts q of shape (2, 1) to (2, 3) and renormalises it to uniform rows;
    a one-class q is no belief over 3 classes: crossent names p and q."""
    x = np.array([0.2, 0.3, 0.5])
    with pytest.raises(InputError, match=r"\bq\b"):
        xe.kl_divergence(x, np.ones((2, 1)))
    with pytest.raises(InputError, match=r"\bq\b"):
        xe.kl_divergence(np.ones((10, 1, 12)) / 12, np.ones((11, 2)) / 2)


@pytest.mark.parametrize("base", [-2.0, 0.0, 1.0, math.inf, math.nan])
def test_bad_base_is_refused(base):
    with pytest.raises(InputError, match="base"):
        xe.entropy([0.5, 0.5], base=base)
    with pytest.raises(InputError, match="base"):
        xe.kl_divergence([0.5, 0.5], [0.5, 0.5], base=base)


def test_a_base_below_1_gives_scipys_negative_values():
    p, q = np.array([0.2, 0.8]), np.array([0.5, 0.5])
    close(xe.entropy(p, base=0.5), scipy.stats.entropy(p, base=0.5))
    close(xe.kl_divergence(p, q, base=0.5), scipy.stats.entropy(p, q, base=0.5))


# --------------------------------------------------------------------------------------------
# scipy.special: rel_entr, kl_div, xlogy at the special values
# --------------------------------------------------------------------------------------------

GRID = np.array([0.0, 5e-324, 1e-300, 1e-10, 0.25, 0.5, 1 - 1e-16, 1.0, math.nan])


def test_kl_divergence_terms_are_rel_entr_at_every_special_pair():
    p, q = np.meshgrid(GRID, GRID, indexing="ij")
    close(xe.kl_divergence_terms(p, q), sp.rel_entr(p, q), rtol=1e-13)


def test_generalized_kl_is_kl_div_at_every_special_pair():
    """``sum(kl_div(p, q))``. scipy's kl_div forms p / q, which underflows (5e-324 / 2 gives
    -inf) or overflows (0.25 / 5e-324 gives inf) at the ends of the float range, and loses
    every digit at p = 1, q = 1 - 1e-16 (1e-16 where the truth is 6e-33); rel_entr - p + q
    (rel_entr takes logs apart there) is the reference at those pairs."""
    values = np.concatenate([GRID, [2.0, 1e5, 1e300]])
    p, q = np.meshgrid(values, values, indexing="ij")
    with np.errstate(all="ignore"):
        got = np.asarray(xe.generalized_kl_divergence(p[..., None], q[..., None]))
        ratio = p / q
    want = sp.kl_div(p, q)
    odd = ~((ratio > np.finfo(float).tiny) & (ratio < np.finfo(float).max)) | (
        np.abs(p - q) < 1e-15)
    want = np.where(odd, sp.rel_entr(p, q) - p + q, want)
    slack = 1e-13 * np.abs(want) + 4e-16 * (np.nan_to_num(p) + np.nan_to_num(q))
    both_nan = np.isnan(got) & np.isnan(want)
    same_inf = np.isinf(want) & (got == want)
    with np.errstate(invalid="ignore"):  # inf - inf where both are inf
        ok = both_nan | same_inf | (np.abs(got - want) <= slack)
    assert ok.all(), list(zip(p[~ok], q[~ok], got[~ok], want[~ok], strict=True))


def test_generalized_kl_of_measures_along_an_axis_and_refusal_of_negatives():
    p = np.array([[0.0, 1.0, 2.0, 3e5], [4.0, 0.5, 0.0, 1.0]])
    q = np.array([[1.0, 3.0, 2.0, 1.0], [1e-3, 0.5, 7.0, 2.0]])
    close(xe.generalized_kl_divergence(p, q), sp.kl_div(p, q).sum(axis=-1), rtol=1e-13)
    close(xe.generalized_kl_divergence(p, q, axis=0), sp.kl_div(p, q).sum(axis=0), rtol=1e-13)
    close(xe.generalized_kl_divergence(p, q, base=2), sp.kl_div(p, q).sum(-1) / math.log(2))
    with pytest.raises(InputError, match=r"\bq\b"):
        xe.generalized_kl_divergence(p, -q)


def test_cross_entropy_is_minus_xlogy_at_special_values():
    # rows of two classes: (p, 1 - p) against (q, 1 - q) over the grid
    g = GRID[~np.isnan(GRID)]
    p, q = np.meshgrid(g, g, indexing="ij")
    P, Q = np.stack([p, 1 - p], -1), np.stack([q, 1 - q], -1)
    want = -(sp.xlogy(P, Q)).sum(-1)
    close(xe.cross_entropy(P, Q), want, rtol=1e-13)
    close(xe.surprisal(g), -sp.xlogy(1, g), rtol=1e-13)
    nan = xe.cross_entropy([0.5, 0.5], [math.nan, 0.5], validate=False)
    assert np.isnan(nan) and np.isnan(-sp.xlogy([0.5, 0.5], [math.nan, 0.5]).sum())


# --------------------------------------------------------------------------------------------
# scipy.special.logsumexp
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("a", [
    np.array([]), np.arange(200.0), np.array([1000.0, 1000.0]), np.full(1000, 10000.0),
    np.array([math.inf]), np.array([-math.inf]), np.array([math.nan]),
    np.array([-math.inf, -math.inf]), np.array([0.0, -40.0]), np.array([1000, 1000]),
    np.log(np.full(10_000, 1e-40)),
], ids=["empty", "arange200", "two-1000", "n-10000", "inf", "-inf", "nan", "two--inf",
        "gh18295", "int", "tiny"])
def test_logsumexp_special_and_large_inputs(a):
    want = sp.logsumexp(a)
    got = xe.logsumexp(a)
    close(got, want, rtol=1e-13)


def test_logsumexp_mixed_magnitudes_axes_and_keepdims():
    a = np.array([[1e10, 1e-10], [-1e10, -math.inf]])
    close(xe.logsumexp(a, axis=-1), sp.logsumexp(a, axis=-1))
    close(xe.logsumexp(a, axis=-1, keepdims=True), sp.logsumexp(a, axis=-1, keepdims=True))
    close(xe.logsumexp(a, axis=(-1, -2)), sp.logsumexp(a, axis=(-1, -2)))
    close(xe.logsumexp(a, axis=None), sp.logsumexp(a))
    logx = np.log(np.full((2, 1000), 1e-40))
    for axis in (0, 1, None):
        close(xe.logsumexp(logx, axis=axis), sp.logsumexp(logx, axis=axis), rtol=1e-13)


def test_logsumexp_with_b_signs_zeros_and_shapes():
    a, b = np.arange(200.0), np.arange(200.0, 0.0, -1.0)
    close(xe.logsumexp(a, b=b), sp.logsumexp(a, b=b), rtol=1e-13)
    close(xe.logsumexp([1000, 1000], b=[1.2, 1.2]), sp.logsumexp([1000, 1000], b=[1.2, 1.2]))
    logx = np.log(np.full((2, 1000), 1e-40))
    B = np.stack([np.linspace(1, 1000, 1000)] * 2)
    for axis in (0, 1, None):
        close(xe.logsumexp(logx, b=B, axis=axis), sp.logsumexp(logx, b=B, axis=axis),
              rtol=1e-13)
    r, s = xe.logsumexp([1.0, 1.0, 1.0], b=[1.0, -1.0, -1.0], return_sign=True)
    wr, ws = sp.logsumexp([1.0, 1.0, 1.0], b=[1.0, -1.0, -1.0], return_sign=True)
    close([r, s], [wr, ws])
    with np.errstate(divide="ignore"):
        r0, s0 = xe.logsumexp([1.0, 1.0], b=[1.0, -1.0], return_sign=True)
        wr0, ws0 = sp.logsumexp([1.0, 1.0], b=[1.0, -1.0], return_sign=True)
    assert (float(r0), float(s0)) == (float(wr0), float(ws0)) == (-math.inf, 0.0)
    close(xe.logsumexp([1.0, 10000.0], b=[1.0, 0.0]), sp.logsumexp([1.0, 10000.0], b=[1, 0]))
    ones = np.ones((1, 2, 3, 4))
    for axis in (2, (1, 3)):
        r, s = xe.logsumexp(ones, axis=axis, b=ones, return_sign=True)
        wr, ws = sp.logsumexp(ones, axis=axis, b=ones, return_sign=True)
        assert r.shape == s.shape == wr.shape
        close(r, wr)
    got = xe.logsumexp(np.zeros((4, 1, 2, 1)), b=np.ones((3, 1, 5)), axis=None)
    close(got, sp.logsumexp(np.zeros((4, 1, 2, 1)), b=np.ones((3, 1, 5))))


def test_logsumexp_integer_dtypes_and_mixed_b():
    for dtype in ("int32", "int64", "float32"):
        a = np.array([1000, 1000], dtype=dtype)
        got, want = xe.logsumexp(a), sp.logsumexp(a)
        assert np.asarray(got).dtype == want.dtype, (dtype, got.dtype, want.dtype)
        close(got, want, rtol=1e-6)
    a, b = np.array([2, 1], dtype="int64"), np.array([1, -1], dtype="int32")
    close(xe.logsumexp(a, b=b), sp.logsumexp(a, b=b))


# --------------------------------------------------------------------------------------------
# scipy.special.softmax / log_softmax
# --------------------------------------------------------------------------------------------

WIDE = np.array([[-25, 0, 25, 50], [1, 325, 749, 750]])


def test_softmax_fixtures_and_axes():
    for x in ([1000, 0, 0, 0], [1, 1], [0, 1], np.arange(4), np.arange(4) + 100):
        close(xe.softmax(x), sp.softmax(x), rtol=1e-13)
    close(xe.softmax(np.arange(4).reshape(2, 2), axis=None),
          sp.softmax(np.arange(4).reshape(2, 2)), rtol=1e-13)
    big = [[1000, 0], [1000, 0]]
    for axis in (0, 1):
        close(xe.softmax(big, axis=axis), sp.softmax(big, axis=axis), rtol=1e-13)
    close(xe.softmax(WIDE, axis=1), sp.softmax(WIDE, axis=1), rtol=1e-13)
    close(xe.softmax(WIDE.T, axis=0), sp.softmax(WIDE.T, axis=0), rtol=1e-13)
    x3 = WIDE.reshape(2, 2, 2)
    close(xe.softmax(x3, axis=(1, 2)), sp.softmax(x3, axis=(1, 2)), rtol=1e-13)


def _log_softmax_mp(row) -> list[float]:
    """log softmax of one row in 50-digit arithmetic."""
    with mpmath.workdps(50):
        lse = mpmath.log(mpmath.fsum(mpmath.exp(mpmath.mpf(int(v))) for v in row))
        return [float(mpmath.mpf(int(v)) - lse) for v in row]


def test_log_softmax_fixtures_and_axes():
    for x in ([1000.0, 1.0], [1e-300, 0.0], [0.0, 1e-300], [-1e300, 0.0], np.arange(4) + 100,
              [-math.inf, 0.0], [math.nan, 0.0], [-math.inf, -math.inf]):
        with np.errstate(invalid="ignore"):
            want = sp.log_softmax(np.asarray(x, dtype=float))
            got = xe.log_softmax(x)
        close(got, want, rtol=1e-13)


def test_log_softmax_of_a_row_with_plus_inf_is_torchs_and_jaxs_not_scipys():
    """The references disagree: torch and jax subtract the max (inf - inf) and give NaN
    for the whole row; SciPy shifts by 0 instead and gives NaN only at the +inf entry,
    -inf elsewhere. crossent follows torch and jax, so that exp(log_softmax) is softmax
    (all NaN in all three)."""
    import torch

    x = [math.inf, 0.0, 1.0]
    with np.errstate(invalid="ignore"):
        assert np.isnan(sp.log_softmax(np.asarray(x))).tolist() == [True, False, False]
        got = xe.log_softmax(x)
    want = torch.log_softmax(torch.tensor(x, dtype=torch.float64), 0).numpy()
    assert np.isnan(want).all() and np.isnan(np.asarray(jax.nn.log_softmax(jnp.asarray(x)))).all()
    close(got, want)
    x3 = WIDE.reshape(2, 2, 2)
    # scipy rounds log(1 + e^-324) to 0 where crossent keeps -e^-324: absolute slack
    close(xe.log_softmax(x3, axis=(0, 2)), sp.log_softmax(x3, axis=(0, 2)), rtol=1e-13,
          atol=1e-15)
    close(xe.log_softmax(WIDE, axis=None), sp.log_softmax(WIDE), rtol=1e-13, atol=1e-15)
    # row [-25, 0, 25, 50]: the top entry is -log1p(e^-25 + ...) = -1.3887943865e-11;
    # scipy's log of the rounded sum gives -1.3888001860e-11 (4e-6 off): mpmath decides
    exact = [_log_softmax_mp(row) for row in WIDE]
    close(xe.log_softmax(WIDE, axis=1), exact, rtol=1e-13)
    assert abs(float(sp.log_softmax(WIDE, axis=1)[0, 3]) / exact[0][3] - 1) > 1e-6


# --------------------------------------------------------------------------------------------
# sklearn.metrics.log_loss
# --------------------------------------------------------------------------------------------

YES_NO = np.array(["no", "no", "no", "yes", "yes", "yes"])
YES_NO_PROBA = np.array([[0.5, 0.5], [0.1, 0.9], [0.01, 0.99], [0.9, 0.1], [0.75, 0.25],
                         [0.001, 0.999]])
MULTI_Y, MULTI_PROBA = [1, 0, 2], np.array([[0.2, 0.7, 0.1], [0.6, 0.2, 0.2], [0.6, 0.1, 0.3]])


def _index(y, labels):
    """sklearn's rule: class k is the k-th of the sorted labels."""
    return np.searchsorted(np.asarray(labels), np.asarray(y))


def test_log_loss_with_named_labels_binary_and_multiclass():
    want = log_loss(YES_NO, YES_NO_PROBA)
    t = _index(YES_NO, ["no", "yes"])
    close(xe.nll_loss(np.log(YES_NO_PROBA), t), want)
    close(xe.binary_cross_entropy(YES_NO_PROBA[:, 1], t.astype(float)), want)
    close(xe.cross_entropy(np.eye(2)[t], YES_NO_PROBA).mean(), want)
    close(xe.nll_loss(np.log(MULTI_PROBA), MULTI_Y), log_loss(MULTI_Y, MULTI_PROBA))
    y2, p2 = MULTI_Y * 2, np.concatenate([MULTI_PROBA] * 2)
    close(xe.nll_loss(np.log(p2), y2, reduction="sum"), log_loss(y2, p2, normalize=False))


def test_log_loss_labels_argument_maps_to_class_indices():
    scores = np.array([[0.1, 0.9], [0.1, 0.9]])
    close(xe.nll_loss(np.log(scores), _index([2, 2], [1, 2])),
          log_loss([2, 2], scores, labels=[1, 2]))
    s3 = np.array([[0.7, 0.1, 0.2], [0.2, 0.7, 0.1], [0.1, 0.7, 0.2]])
    close(xe.nll_loss(np.log(s3), _index([1, 2, 2], [1, 2, 3])),
          log_loss([1, 2, 2], s3, labels=[1, 2, 3]))


def test_log_loss_sample_weight_is_a_weighted_mean():
    rng = np.random.default_rng(0)
    proba = rng.dirichlet(np.ones(4), size=20)
    y = rng.integers(0, 4, size=20)
    y[:4] = [0, 1, 2, 3]
    w = rng.uniform(0, 3, size=20)
    want = log_loss(y, proba, sample_weight=w, labels=[0, 1, 2, 3])
    close(xe.nll_loss(np.log(proba), y, sample_weight=w), want)
    close(xe.nll_loss(np.log(proba), y, sample_weight=w, reduction="sum"),
          log_loss(y, proba, sample_weight=w, normalize=False, labels=[0, 1, 2, 3]))
    q1 = proba[:, 0] / proba[:, :2].sum(1)
    yb = (y % 2).astype(float)
    close(xe.binary_cross_entropy(q1, yb, sample_weight=w),
          log_loss(yb, q1, sample_weight=w, labels=[0, 1]))


def test_log_loss_one_column_binary_predictions():
    q = np.array([0.9, 0.2, 0.65, 0.4, 0.999])
    y = np.array([1, 0, 1, 1, 0])
    close(xe.binary_cross_entropy(q, y.astype(float)), log_loss(y, q))


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16"])
def test_log_loss_clips_to_eps_where_crossent_clamps_the_log_at_minus_100(dtype):
    """PITFALLS 5: a prediction of exactly 0 for the true class. sklearn clips q to
    [eps, 1 - eps] of the dtype (finite, dtype-dependent); crossent clamps each log at
    -100 as torch does (documented in binary_cross_entropy). Both finite, not equal."""
    y, q = np.array([0, 1], dtype=dtype), np.array([1, 0], dtype=dtype)
    ours = xe.binary_cross_entropy(q, y)
    assert ours.dtype == np.dtype(dtype)
    close(ours, 100.0, rtol=1e-3)
    theirs = log_loss(y, q)
    assert np.isfinite(theirs) and theirs < 100
    close(theirs, -math.log(np.finfo(dtype).eps), rtol=1e-3)


@pytest.mark.parametrize(("y", "proba"), [
    ([0, 1, 0], [0.0, 1.0, 0.0]),
    ([0, 1, 0], [[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]),
    ([0, 1, 2], np.eye(3)),
])
def test_log_loss_perfect_predictions_are_exactly_0(y, proba):
    proba = np.asarray(proba)
    assert log_loss(y, proba) == pytest.approx(0)
    if proba.ndim == 1:
        assert float(xe.binary_cross_entropy(proba, np.asarray(y, float))) == 0.0
    else:
        with np.errstate(divide="ignore"):
            log_p = np.log(proba)
        assert float(xe.nll_loss(log_p, y)) == 0.0
        assert float(xe.cross_entropy(np.eye(proba.shape[1])[y], proba).mean()) == 0.0


def test_log_loss_bad_inputs_are_refused_loudly():
    """sklearn warns and renormalises rows that do not sum to 1; crossent names q."""
    proba = np.array([[0.2, 0.7], [0.6, 0.3], [0.4, 0.7], [0.8, 0.3]])
    with pytest.raises(InputError, match=r"\bq\b"):
        xe.cross_entropy(np.eye(2)[[0, 1, 1, 0]], proba)
    with pytest.raises(InputError, match="target"):  # class 2 of 2-class predictions
        xe.nll_loss(np.log([[0.3, 0.7], [0.6, 0.4], [0.4, 0.6]]), [1, 0, 2])
    with pytest.raises(InputError, match="target"):  # 2 labels, 3 rows
        xe.nll_loss(np.log([[0.2, 0.8], [0.6, 0.4], [0.7, 0.3]]), [1, 1])
    with pytest.raises(InputError, match="probs"):
        xe.binary_cross_entropy([0.5, 1.5], [0.0, 1.0])


# --------------------------------------------------------------------------------------------
# optax
# --------------------------------------------------------------------------------------------

YS = np.array([[10.0, 1.0, -2.0], [1.0, 4.0, 0.2]])
TS = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
LABELS = np.array([1, 0])
ROW_MASK = np.array([True, False])
LOGIT_MASK = np.array([[1, 0, 0], [0, 0, 0]]).astype(bool)


def test_softmax_cross_entropy_single_row_and_batch():
    close(xe.softmax_cross_entropy(YS[0], TS[0], reduction="none"),
          optax.softmax_cross_entropy(YS[0], TS[0]))
    close(xe.softmax_cross_entropy(YS, TS, reduction="none"),
          optax.softmax_cross_entropy(YS, TS))
    close(xe.softmax_cross_entropy(YS[0], LABELS[0], reduction="none"),
          optax.softmax_cross_entropy_with_integer_labels(YS[0], LABELS[0]))


def test_per_logit_mask_like_optax():
    """Row 0 keeps class 0 only; rows with no class kept cost 0 in both libraries."""
    close(xe.softmax_cross_entropy(YS, TS, where=LOGIT_MASK, reduction="none"),
          optax.softmax_cross_entropy(YS, TS, where=LOGIT_MASK))


def test_an_index_label_on_a_masked_class_is_refused_or_dropped_as_documented():
    """optax's integer-label loss scores label 1 of row 0 (class 1 masked) as
    logsumexp(kept) - z_1 = 9, its one-hot loss drops it (0): the two optax forms
    disagree. crossent refuses it (validate=True), or drops it as the one-hot form does."""
    with pytest.raises(InputError, match="target"):
        xe.softmax_cross_entropy(YS, LABELS, where=LOGIT_MASK, reduction="none")
    got = xe.softmax_cross_entropy(YS, LABELS, where=LOGIT_MASK, reduction="none",
                                   validate=False)
    close(got, optax.softmax_cross_entropy(YS, np.eye(3)[LABELS], where=LOGIT_MASK))
    close(optax.softmax_cross_entropy_with_integer_labels(YS, LABELS, where=LOGIT_MASK),
          [9.0, 0.0])


@pytest.mark.parametrize("size", [5, 10])
def test_a_class_mask_equals_dropping_the_classes(size):
    rng = np.random.default_rng(size)
    preds = rng.normal(size=size)
    targets = rng.dirichlet(np.ones(size))
    mask = rng.integers(0, 2, size=size).astype(bool)
    mask[0] = True
    want = optax.softmax_cross_entropy(preds, targets, where=mask)
    close(want, optax.softmax_cross_entropy(preds[mask], targets[mask]), rtol=1e-12)
    close(xe.softmax_cross_entropy(preds, targets, where=mask, reduction="none"), want)
    close(xe.poly1_cross_entropy(preds, targets, where=mask, reduction="none"),
          optax.losses.poly_loss_cross_entropy(preds, targets, where=mask))


def test_gradient_with_a_row_mask_is_optaxs_and_finite():
    f = optax.softmax_cross_entropy_with_integer_labels
    want = jax.grad(lambda z: jnp.sum(f(z, LABELS, where=ROW_MASK)))(jnp.asarray(YS))
    got = xe.softmax_cross_entropy_grad(YS, LABELS, where=ROW_MASK, reduction="sum")
    assert np.isfinite(got).all()
    close(got, want)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_class_axis_anywhere(axis):
    rng = np.random.default_rng(axis)
    shape = [2, 3, 4]
    preds = rng.normal(size=shape)
    soft = np.moveaxis(rng.dirichlet(np.ones(shape[axis]), size=shape[:axis] + shape[axis + 1:]),
                       -1, axis)
    close(xe.softmax_cross_entropy(preds, soft, axis=axis, reduction="none"),
          optax.softmax_cross_entropy(preds, soft, axis=axis))
    idx = rng.integers(0, shape[axis], size=shape[:axis] + shape[axis + 1:])
    close(xe.softmax_cross_entropy(preds, idx, axis=axis, reduction="none"),
          optax.softmax_cross_entropy_with_integer_labels(preds, idx, axis=axis))


def test_several_class_axes_are_refused_by_name():
    """optax takes a tuple of class axes for integer labels; crossent's axis is one int."""
    logits = np.zeros((2, 3, 4, 5))
    with pytest.raises((InputError, NotImplementedError), match="axis"):
        xe.softmax_cross_entropy(logits, np.zeros((2, 4), dtype=int), axis=(1, 3))


SAFE_YS = np.array([[10.0, 1.0, -2.0], [1.0, 4.0, 0.2], [-np.inf, 0.0, 0.0],
                    [-np.inf, 0.0, 0.0], [-np.inf, 0.0, -np.inf]])
SAFE_TS = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.5, 0.5], [0.4, 0.3, 0.3],
                    [0.0, 1.0, 0.0]])


def test_minus_inf_logits_like_optax_safe_softmax_cross_entropy():
    """A -inf logit with target 0 costs nothing; with target mass it costs inf."""
    want = optax.safe_softmax_cross_entropy(SAFE_YS, SAFE_TS)
    got = xe.softmax_cross_entropy(SAFE_YS, SAFE_TS, reduction="none")
    close(got, want)
    g = xe.softmax_cross_entropy_grad(SAFE_YS[[0, 1, 2, 4]], SAFE_TS[[0, 1, 2, 4]],
                                      reduction="sum")
    rows = SAFE_TS[[0, 1, 2, 4]]
    want_g = jax.grad(lambda z: jnp.sum(optax.safe_softmax_cross_entropy(z, rows)))(
        jnp.asarray(SAFE_YS[[0, 1, 2, 4]]))
    close(g, want_g, atol=1e-15)


@pytest.mark.parametrize(("preds", "labels"), [
    (p, t) for p in ([-1e9, -1e-9], [1e9, 1e-9], [-1e9, 1e-9], [1e9, -1e-9], [0.0, 0.0])
    for t in ([1.0, 0.0], [0.0, 1.0])])
def test_sigmoid_bce_at_huge_and_tiny_logits(preds, labels):
    want = jnp.mean(optax.sigmoid_binary_cross_entropy(np.array(preds), np.array(labels)))
    close(xe.sigmoid_binary_cross_entropy(preds, labels), want, rtol=1e-12)


POLY_LOGITS = np.array([0.14, 1.456, 2.356, -0.124, -2.47])
POLY_LABELS = np.array([0.1, 0.15, 0.2, 0.25, 0.3])
POLY_BATCH = (np.array([[4.0, 2.0, 1.0], [0.0, 5.0, 1.0]]),
              np.array([[1.0, 0.0, 0.0], [0.0, 0.8, 0.2]]))


@pytest.mark.parametrize("eps", [2, 1, -1, 0, -0.5, 1.15, 1.214, 5.45])
def test_poly1_like_optax_poly_loss(eps):
    close(xe.poly1_cross_entropy(POLY_LOGITS, POLY_LABELS, epsilon=eps, reduction="none"),
          optax.losses.poly_loss_cross_entropy(POLY_LOGITS, POLY_LABELS, epsilon=eps))
    close(xe.poly1_cross_entropy(*POLY_BATCH, epsilon=eps, reduction="none"),
          optax.losses.poly_loss_cross_entropy(*POLY_BATCH, epsilon=eps))


LOG_PS = np.array([[-2.9957, -3.5066, -3.9120, -1.2040, -0.6931, -2.3026],
                   [-1.6094, -1.6094, -1.6094, -2.3026, -1.8971, -1.8971]])
QS = np.array([[0.2, 0.2, 0.2, 0.1, 0.15, 0.15], [0.05, 0.03, 0.02, 0.3, 0.5, 0.0]])


def test_kl_divergence_like_optax_log_prediction_first():
    """optax.kl_divergence(log q, p) is crossent's kl_divergence(p, q): truth first."""
    q = np.exp(LOG_PS)
    close(xe.kl_divergence(QS, q, validate=False), optax.kl_divergence(LOG_PS, QS),
          rtol=1e-12)
    close(xe.kl_divergence(QS[0], q[0], validate=False), optax.kl_divergence(LOG_PS[0], QS[0]),
          rtol=1e-12)


def test_kl_divergence_like_optax_with_log_targets():
    """optax.kl_divergence_with_log_targets(log q, log p): both given as logs."""
    log_t = LOG_PS[::-1]
    close(xe.kl_divergence(np.exp(log_t), np.exp(LOG_PS), validate=False),
          optax.losses.kl_divergence_with_log_targets(LOG_PS, log_t), rtol=1e-12)


@pytest.mark.filterwarnings("ignore:The function convex_kl_divergence is deprecated")
def test_convex_and_generalized_kl_like_optax():
    q = np.exp(LOG_PS)
    close(xe.generalized_kl_divergence(QS, q), optax.convex_kl_divergence(LOG_PS, QS),
          rtol=1e-12)
    close(xe.generalized_kl_divergence(QS, q), optax.losses.generalized_kl_divergence(LOG_PS, QS),
          rtol=1e-12)


@pytest.mark.parametrize("alpha", [0.0, 0.1, 0.5, 1.0])
def test_smooth_labels_like_optax(alpha):
    labels = np.eye(4)[[0, 3, 1]]
    close(xe.smooth_labels(labels, alpha), optax.smooth_labels(labels, alpha), rtol=1e-15)
    soft = np.array([[0.2, 0.3, 0.5]])
    close(xe.smooth_labels(soft, alpha), optax.smooth_labels(soft, alpha), rtol=1e-15)


# --------------------------------------------------------------------------------------------
# Found here (each failed before its fix in this change)
# --------------------------------------------------------------------------------------------

INF_ROW = np.array([math.inf, 0.0, 1.0])


def test_softmax_of_a_row_with_plus_inf_is_nan_like_every_reference():
    with np.errstate(invalid="ignore"):
        want = sp.softmax(INF_ROW)
    assert np.isnan(want).all()
    assert np.isnan(np.asarray(jax.nn.softmax(jnp.asarray(INF_ROW)))).all()
    with np.errstate(invalid="ignore"):
        got = xe.softmax(INF_ROW)
    close(got, want)


def test_gradient_of_a_row_with_plus_inf_is_nan_like_torch():
    import torch

    z = torch.tensor(INF_ROW[None, :], requires_grad=True)
    torch.nn.functional.cross_entropy(z, torch.tensor([0]), reduction="sum").backward()
    assert z.grad is not None and torch.isnan(z.grad).all()
    with np.errstate(invalid="ignore"):
        got = xe.softmax_cross_entropy_grad(INF_ROW[None, :], [0], reduction="sum")
    assert np.isnan(got).all(), got


@pytest.mark.parametrize("call", [
    lambda: xe.kl_divergence([0.5, 0.5], [1.0, 0.0]),
    lambda: xe.kl_divergence_terms([0.5, 0.5], [1.0, 0.0]),
    lambda: xe.generalized_kl_divergence([0.5, 0.5], [1.0, 0.0]),
    lambda: xe.kl_divergence([1.0, 0.0], [5e-324, 1.0], validate=False),
    lambda: xe.cross_entropy([0.5, 0.5], [1.0, 0.0]),
    lambda: xe.surprisal(0.0),
], ids=["kl", "kl-terms", "generalized-kl", "kl-subnormal-q", "cross-entropy", "surprisal"])
def test_documented_infinities_come_without_runtime_warnings(call):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scipy.stats.entropy([0.5, 0.5], [1.0, 0.0])  # the reference is silent
        sp.rel_entr(1.0, 5e-324)
        call()
