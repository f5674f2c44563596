"""PITFALLS 7 and 11, the two items not pinned beside their functions' other tests:
KL argument order and reductions, and the mean across micro-batches."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.special
import scipy.stats
import torch
import torch.nn.functional as F

import crossent as xe


@pytest.mark.filterwarnings("ignore:reduction. 'mean' divides:UserWarning")  # torch's own
def test_kl_divergence_is_torch_kl_div_batchmean_with_log_q_first_not_mean(backend, rng):
    p = rng.dirichlet(np.ones(6), size=5)
    q = rng.dirichlet(np.ones(6), size=5)
    ours = backend.to_numpy(xe.kl_divergence(backend.asarray(p), backend.asarray(q)))
    log_q, target = torch.as_tensor(np.log(q)), torch.as_tensor(p)
    batchmean = F.kl_div(log_q, target, reduction="batchmean").item()
    elementwise_mean = F.kl_div(log_q, target, reduction="mean").item()
    np.testing.assert_allclose(ours.mean(), batchmean, rtol=1e-10)
    np.testing.assert_allclose(ours.mean() / p.shape[1], elementwise_mean, rtol=1e-10)


def test_kl_divergence_is_rel_entr_not_scipy_kl_div_elementwise(rng):
    p, q = rng.dirichlet(np.ones(4)), rng.dirichlet(np.ones(4))
    rel = scipy.special.rel_entr(p, q)
    kl_div = scipy.special.kl_div(p, q)  # p log(p/q) - p + q: same sum, other terms
    np.testing.assert_allclose(float(xe.kl_divergence(p, q)), rel.sum(), rtol=1e-12)
    np.testing.assert_allclose(kl_div - rel, q - p, atol=1e-15)


def test_scipy_entropy_reduces_axis_0_while_crossent_reduces_the_last_axis(rng):
    p = rng.dirichlet(np.ones(3), size=4)  # rows are distributions
    np.testing.assert_allclose(xe.entropy(p), scipy.stats.entropy(p, axis=1), rtol=1e-12)
    assert scipy.stats.entropy(p).shape == (3,)  # scipy's default: columns


def test_sum_over_micro_batches_divided_by_global_count_is_the_full_batch_mean(backend, rng):
    logits = rng.normal(size=(12, 5))
    target = rng.integers(0, 5, size=12)
    target[[0, 1, 2, 7]] = -100  # micro-batches hold different numbers of counted tokens
    full = backend.to_numpy(xe.softmax_cross_entropy(backend.asarray(logits),
                                                     backend.asarray(target)))
    chunks = [slice(0, 4), slice(4, 6), slice(6, 12)]
    num_items = int((target != -100).sum())
    summed = sum(
        backend.to_numpy(xe.softmax_cross_entropy(
            backend.asarray(logits[c]), backend.asarray(target[c]), reduction="sum"))
        for c in chunks
    )
    per_chunk_means = [
        backend.to_numpy(xe.softmax_cross_entropy(backend.asarray(logits[c]),
                                                  backend.asarray(target[c])))
        for c in chunks
    ]
    np.testing.assert_allclose(summed / num_items, full, rtol=1e-12)
    assert abs(np.nanmean(per_chunk_means) - full) > 1e-3  # the 2024 accumulation bug


def test_zero_summed_target_weight_with_smoothing_gives_nan_mean_like_torch(backend, rng):
    logits = rng.normal(size=(4, 3))
    target = np.array([0, 1, 1, 0])
    weight = np.array([0.0, 0.0, 1.0])  # every target's class weighs 0: the mean is 0/0
    got = backend.to_numpy(xe.softmax_cross_entropy(
        backend.asarray(logits), backend.asarray(target), weight=backend.asarray(weight),
        label_smoothing=0.1))
    want = F.cross_entropy(torch.as_tensor(logits), torch.as_tensor(target),
                           weight=torch.as_tensor(weight), label_smoothing=0.1)
    assert np.isnan(got) and torch.isnan(want)
