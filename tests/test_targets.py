"""one_hot against torch and JAX, smooth_labels against optax and torch's internal smoothing,
and Mixup against a plain-NumPy Mixup drawn the way ``mixup_params`` documents."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from numerics import DTYPES, PROPERTY, as_input, assert_close, rounding

import crossent as xe

LABELS = np.array([[0, 4, 2], [1, 1, 3]])


def test_one_hot_matches_torch_and_jax(backend):
    got = backend.to_numpy(xe.one_hot(backend.asarray(LABELS), 5))
    assert got.shape == (2, 3, 5)
    assert np.issubdtype(got.dtype, np.floating)
    np.testing.assert_array_equal(got, F.one_hot(torch.from_numpy(LABELS), 5).numpy())
    np.testing.assert_array_equal(got, np.asarray(jax.nn.one_hot(LABELS, 5)))


@pytest.mark.parametrize("dtype", ["float32", "int64"])
def test_one_hot_returns_the_requested_dtype(backend, dtype):
    got = backend.to_numpy(xe.one_hot(backend.asarray([2, 0]), 3, dtype=backend.dtype(dtype)))
    assert got.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(got, [[0, 0, 1], [1, 0, 0]])


def test_one_hot_of_no_labels_is_empty(backend):
    labels = backend.asarray(np.zeros(0, dtype=np.int64))
    assert tuple(xe.one_hot(labels, 4).shape) == (0, 4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("alpha", [0.0, 0.1, 0.5, 1.0])
def test_smooth_labels_matches_optax_and_rows_still_sum_to_one(backend, rng, dtype, alpha):
    soft = rng.dirichlet(np.ones(5), size=2)
    targets, t64 = as_input(backend, np.concatenate([np.eye(5)[[1, 3, 0]], soft]), dtype)
    got = xe.smooth_labels(targets, alpha)
    assert_close(backend, got, np.asarray(optax.smooth_labels(jnp.asarray(t64), alpha)), dtype)
    sums = backend.to_numpy(got).sum(axis=-1)
    np.testing.assert_allclose(sums, 1.0, rtol=10 * np.finfo(dtype).eps)


def test_smooth_labels_along_axis_zero(backend):
    targets = np.eye(4)[[0, 2, 3]]
    got = xe.smooth_labels(backend.asarray(targets.T), 0.2, axis=0)
    assert_close(backend, got, np.asarray(optax.smooth_labels(jnp.asarray(targets), 0.2)).T)


def test_smooth_labels_are_the_targets_torch_smooths_internally(rng):
    logits = torch.from_numpy(rng.normal(size=(4, 6)))
    labels = torch.tensor([0, 5, 2, 2])
    smoothed = xe.smooth_labels(F.one_hot(labels, 6).double(), 0.3)
    expected = F.cross_entropy(logits, labels, label_smoothing=0.3)
    torch.testing.assert_close(F.cross_entropy(logits, smoothed), expected, rtol=1e-12, atol=0)


def _numpy_mixup(x, targets, alpha, seed):
    """Mixup written out: lam ~ Beta(alpha, alpha), then a permutation, from one generator."""
    rng = np.random.default_rng(seed)
    lam = rng.beta(alpha, alpha)
    perm = rng.permutation(len(x))
    return lam * x + (1 - lam) * x[perm], lam * targets + (1 - lam) * targets[perm]


def test_mixup_params_draws_beta_then_permutation_from_the_seed():
    lam, perm = xe.mixup_params(7, alpha=0.4, seed=123)
    rng = np.random.default_rng(123)
    assert lam == rng.beta(0.4, 0.4)
    np.testing.assert_array_equal(perm, rng.permutation(7))


@pytest.mark.parametrize("dtype", DTYPES)
def test_mixup_gives_the_plain_numpy_mix_on_every_backend(backend, rng, dtype):
    x, x64 = as_input(backend, rng.normal(size=(6, 3, 2)), dtype)
    t, t64 = as_input(backend, rng.dirichlet(np.ones(4), size=6), dtype)
    x_mix, t_mix = xe.mixup(x, t, alpha=0.4, seed=7)
    x_ref, t_ref = _numpy_mixup(x64, t64, 0.4, 7)
    assert_close(backend, x_mix, x_ref, dtype, atol=rounding(dtype, np.abs(x64).max()))
    assert_close(backend, t_mix, t_ref, dtype)


def test_mixup_of_integer_labels_one_hot_encodes_them(backend, rng):
    x, labels = rng.normal(size=(5, 3)), np.array([0, 3, 1, 1, 2])
    x_mix, t_mix = xe.mixup(
        backend.asarray(x), backend.asarray(labels), alpha=1.0, seed=3, num_classes=4
    )
    x_ref, t_ref = _numpy_mixup(x, np.eye(4)[labels], 1.0, 3)
    assert_close(backend, x_mix, x_ref)
    assert_close(backend, t_mix, t_ref)


def test_mixup_is_reproducible_from_its_seed(backend, rng):
    x, t = backend.asarray(rng.normal(size=(8, 2))), backend.asarray(np.eye(8))
    first, again, other = (xe.mixup(x, t, alpha=0.4, seed=s)[1] for s in (11, 11, 12))
    np.testing.assert_array_equal(backend.to_numpy(first), backend.to_numpy(again))
    assert not np.array_equal(backend.to_numpy(first), backend.to_numpy(other))


@PROPERTY
@given(st.integers(0, 2**32 - 1), st.floats(0.05, 5.0), st.integers(1, 8))
def test_mixed_targets_stay_probability_distributions(backend, seed, alpha, n):
    labels = np.arange(n) % 3
    _, t_mix = xe.mixup(
        backend.asarray(np.ones((n, 2))),
        backend.asarray(labels),
        alpha=alpha,
        seed=seed,
        num_classes=3,
    )
    t = backend.to_numpy(t_mix)
    assert ((t >= 0) & (t <= 1)).all()
    np.testing.assert_allclose(t.sum(axis=-1), 1.0, rtol=1e-12)


def test_mixup_params_batch_size_past_memory_is_an_input_error_naming_it():
    """Found by test_core_bad_input's hypothesis run at stop 34: 27_762_002_576 asked numpy
    for a 207 GiB permutation and raised its MemoryError; 2**62 (numpy's ValueError, past
    its largest array) checks the same path without asking the machine for memory."""
    with pytest.raises(xe.InputError, match="batch_size"):
        xe.mixup_params(2**62, alpha=0.2, seed=0)
