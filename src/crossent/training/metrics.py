"""Calibration: the reliability diagram and the expected calibration error (Guo et al. 2017)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .._checks import check_integer
from ..errors import InputError

N_BINS = 15
"""Bins of the expected calibration error (Guo et al. 2017 use 15)."""
MAX_BINS = 2**31 - 1
"""The most bins :func:`reliability` takes. Each bin costs several float64 arrays' entries
(its edge, count, sums: ~40 bytes), so 2**31 bins would already need ~80 GiB; and beyond
2**53 the edges ``b / n_bins`` are no longer distinct float64 numbers, so the bins would be
wrong, not just large. A bound of 2**31 - 1 (the largest 32-bit signed integer) refuses
such a number loudly, naming ``n_bins``, instead of NumPy's raw ``IndexError`` (2**63) or
``ValueError`` (2**64)."""


@dataclass(frozen=True)
class Reliability:
    """A reliability diagram's data: ``n_bins`` equal-width confidence bins on [0, 1].

    ``confidence[b]`` and ``accuracy[b]`` are the mean top-class probability and the fraction
    correct of the rows in bin b (NaN for an empty bin), ``count[b]`` their number, and
    ``ece`` the expected calibration error ``sum_b (count_b / n) |accuracy_b - confidence_b|``.

    >>> rel = reliability([[0.9, 0.1], [0.6, 0.4]], [0, 1], n_bins=2)
    >>> rel.edges.tolist(), rel.count.tolist()  # both confidences in (0.5, 1]
    ([0.0, 0.5, 1.0], [0, 2])
    """

    edges: np.ndarray
    confidence: np.ndarray
    accuracy: np.ndarray
    count: np.ndarray
    ece: float


def reliability(probs: Any, labels: Any, *, n_bins: int = N_BINS) -> Reliability:
    """Bin the rows of ``probs`` (N, C) by their confidence ``max_c p_c`` (Guo et al. 2017).

    Bin b holds the confidences in ``(b / n_bins, (b + 1) / n_bins]`` (a confidence of exactly
    0 goes to the first bin), as in Guo et al.'s reference code. ``n_bins`` is an integer in
    [1, :data:`MAX_BINS`] (2**31 - 1); anything else raises an
    :class:`~crossent.errors.InputError` naming it.

    >>> rel = reliability([[0.9, 0.1], [0.6, 0.4]], [0, 1], n_bins=2)
    >>> rel.accuracy.tolist(), rel.ece  # empty bin NaN; |(1 + 0) - (0.9 + 0.6)| / 2
    ([nan, 0.5], 0.25)
    """
    try:
        p = np.asarray(probs, dtype=float)
        y = np.asarray(labels)
    except (TypeError, ValueError) as err:  # None, strings, ragged lists
        raise InputError(f"probs and labels must be arrays of numbers ({err})") from None
    if p.ndim != 2 or y.shape != (p.shape[0],):
        raise InputError(f"probs (N, C) and labels (N,) expected; got shapes {p.shape} and "
                         f"{y.shape}")
    n_bins = _check_bins(n_bins)
    conf = np.max(p, axis=-1)
    correct = (np.argmax(p, axis=-1) == y).astype(float)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    count = np.bincount(which, minlength=n_bins)
    sum_conf = np.bincount(which, weights=conf, minlength=n_bins)
    sum_acc = np.bincount(which, weights=correct, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.where(count > 0, sum_conf / count, np.nan)
        mean_acc = np.where(count > 0, sum_acc / count, np.nan)
    n = max(p.shape[0], 1)
    ece = float(np.sum(np.abs(sum_acc - sum_conf)) / n)
    return Reliability(edges, mean_conf, mean_acc, count, ece)


def _check_bins(n_bins: Any) -> int:
    """``n_bins`` as an int in [1, :data:`MAX_BINS`]; an :class:`InputError` naming it
    otherwise (a bool or a float such as 2.0 is not a number of bins)."""
    return check_integer(n_bins, "n_bins", minimum=1, maximum=MAX_BINS)


def expected_calibration_error(probs: Any, labels: Any, *, n_bins: int = N_BINS) -> float:
    """Expected calibration error (Guo, Pleiss, Sun and Weinberger 2017, "On Calibration of
    Modern Neural Networks", arXiv:1706.04599):
    ``ECE = sum_b (|B_b| / n) |acc(B_b) - conf(B_b)|`` over ``n_bins`` equal-width bins of
    the top-class probability. 0 for a perfectly calibrated model. ``n_bins`` is an integer
    in [1, :data:`MAX_BINS`] (2**31 - 1), as for :func:`reliability`.

    >>> expected_calibration_error([[0.9, 0.1], [0.6, 0.4]], [0, 1])  # (|1-.9| + |0-.6|) / 2
    0.35
    """
    return reliability(probs, labels, n_bins=n_bins).ece
