"""Targets for cross-entropy: one-hot labels, label smoothing and Mixup.

Cross-entropy does not need a one-hot target: any probability vector works, which is
what label smoothing (Szegedy et al. 2016, arXiv:1512.00567) and Mixup (Zhang et al.
2018, arXiv:1710.09412) exploit.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import _checks
from ._array import (
    Array,
    any_true,
    arrays,
    compute_dtype,
    default_float,
    is_integer,
    like,
    numel,
    to_float,
)


def one_hot(labels: Any, num_classes: int, *, dtype: Any = None) -> Array:
    """One-hot encode integer class labels: ``out[..., c] = 1 if labels[...] == c else 0``.

    Shapes: ``labels`` (...) -> (..., num_classes). ``dtype`` defaults to the namespace's
    default floating dtype. Labels outside ``[0, num_classes)`` raise ``ValueError``.
    Reference: ``torch.nn.functional.one_hot`` (which returns integers), ``jax.nn.one_hot``.

    >>> one_hot([2, 0], 3).tolist()
    [[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]
    """
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"num_classes={num_classes!r} must be a positive integer")
    xp, (labels,) = arrays(labels)
    if not is_integer(xp, labels):
        raise ValueError(f"labels must be integers (class indices), got dtype {labels.dtype}")
    if numel(labels) and any_true(xp, (labels < 0) | (labels >= num_classes)):
        raise ValueError(
            f"labels must lie in [0, {num_classes}); found {int(xp.min(labels))}..."
            f"{int(xp.max(labels))}"
        )
    classes = like(xp, np.arange(num_classes), labels, dtype=labels.dtype)
    dtype = dtype if dtype is not None else default_float(xp, labels)
    return xp.astype(xp.expand_dims(labels, axis=-1) == classes, dtype)


def smooth_labels(targets: Any, alpha: float, *, axis: int = -1) -> Array:
    """Label smoothing: ``targets * (1 - alpha) + alpha / C`` along ``axis`` (C classes).

    Moves ``alpha`` of the probability mass from the labels to a uniform distribution, so
    a smoothed row still sums to 1. ``alpha`` in [0, 1]. Matches the targets that
    ``torch.nn.functional.cross_entropy(..., label_smoothing=alpha)`` uses internally, and
    ``optax.smooth_labels``.

    >>> [round(float(v), 4) for v in smooth_labels([0.0, 0.0, 1.0], 0.1)]
    [0.0333, 0.0333, 0.9333]
    """
    alpha = _checks.check_fraction(alpha, "alpha")
    xp, (targets,) = arrays(targets)
    targets = to_float(xp, targets)
    num_classes = targets.shape[axis]
    return targets * (1.0 - alpha) + alpha / num_classes


def mixup_params(batch_size: int, *, alpha: float, seed: int) -> tuple[float, np.ndarray]:
    """The Mixup draw: ``lam ~ Beta(alpha, alpha)`` and a permutation of the batch.

    Drawn with ``numpy.random.default_rng(seed)``, so the same seed gives the same mix in
    every array library. Returns ``(lam, permutation)``.
    """
    if not alpha > 0:
        raise ValueError(f"alpha={alpha!r} must be > 0 (the Beta(alpha, alpha) parameter)")
    rng = np.random.default_rng(seed)
    lam = float(rng.beta(alpha, alpha))
    return lam, rng.permutation(batch_size)


def mixup(
    x: Any, targets: Any, *, alpha: float, seed: int, num_classes: int | None = None
) -> tuple[Array, Array]:
    """Mixup (Zhang et al. 2018, arXiv:1710.09412): convex combinations of example pairs.

    ``x_mix = lam * x + (1 - lam) * x[perm]`` and ``t_mix = lam * t + (1 - lam) * t[perm]``
    with ``lam ~ Beta(alpha, alpha)`` and ``perm`` a permutation of the batch (axis 0),
    both from :func:`mixup_params` (reproducible from ``seed``). ``targets`` are
    probability rows (N, C), or integer labels (N,) with ``num_classes`` given. Returns
    ``(x_mix, t_mix)``; ``t_mix`` rows are probability vectors, not one-hot: the soft
    targets :func:`crossent.softmax_cross_entropy` accepts.

    >>> xm, tm = mixup([[0.0], [1.0]], [0, 1], alpha=0.4, seed=0, num_classes=2)
    >>> [round(float(v), 6) for v in tm.sum(axis=-1)]
    [1.0, 1.0]
    """
    xp, (x, targets) = arrays(x, targets)
    if is_integer(xp, targets):
        if num_classes is None:
            raise ValueError("num_classes is required when targets are integer labels")
        # one-hot in the dtype x is mixed in, so the labels' library default (float32
        # for torch) does not set the precision of t_mix
        targets = one_hot(targets, num_classes, dtype=compute_dtype(xp, x))
    if x.shape[0] != targets.shape[0]:
        raise ValueError(
            f"targets has {targets.shape[0]} rows but x has {x.shape[0]}; they must match"
        )
    lam, perm = mixup_params(x.shape[0], alpha=alpha, seed=seed)
    perm = like(xp, perm, x)
    x = to_float(xp, x)
    targets = to_float(xp, targets)
    x_mix = lam * x + (1.0 - lam) * xp.take(x, perm, axis=0)
    t_mix = lam * targets + (1.0 - lam) * xp.take(targets, perm, axis=0)
    return x_mix, t_mix
