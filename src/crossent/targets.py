"""Targets for cross-entropy: one-hot labels, label smoothing and Mixup.

Cross-entropy does not need a one-hot target: any probability vector works, which is
what label smoothing (Szegedy et al. 2016, arXiv:1512.00567) and Mixup (Zhang et al.
2018, arXiv:1710.09412) exploit.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from array_api_compat import device

from . import _checks
from ._array import (
    Array,
    any_true,
    arrays,
    compute_dtype,
    default_float,
    is_floating,
    is_integer,
    like,
    normalize_axis,
    numel,
    past_integer_range,
    restore_dtype,
    to_float,
    wide_integer,
)
from .errors import InputError

__all__ = ["mixup", "mixup_params", "one_hot", "smooth_labels"]


def one_hot(labels: Any, num_classes: int, *, dtype: Any = None, validate: bool = True) -> Array:
    """One-hot encode integer class labels: ``out[..., c] = 1 if labels[...] == c else 0``.

    Shapes: ``labels`` (...) -> (..., num_classes). ``dtype`` defaults to the namespace's
    default floating dtype. Labels outside ``[0, num_classes)`` raise ``InputError``;
    ``validate=False`` skips that check (a device sync, impossible under ``jax.jit``) and
    gives such labels an all-zero row, as ``jax.nn.one_hot`` does. Labels of any integer
    dtype are compared exactly (a uint8 label never wraps onto class 257).
    Reference: ``torch.nn.functional.one_hot`` (which returns integers), ``jax.nn.one_hot``.

    >>> one_hot([2, 0], 3).tolist()
    [[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]
    """
    num_classes = _checks.check_integer(num_classes, "num_classes", minimum=1,
                                         maximum=_checks.INDEX_MAX)
    validate = _checks.check_bool(validate, "validate")
    xp, (labels,) = arrays(labels, names=("labels",))
    return _one_hot(xp, labels, num_classes, dtype, validate, "labels")


def _too_many_classes(labels: Array, num_classes: int) -> InputError:
    # bad input (review H91: numpy's bare MemoryError "8.00 TiB" for num_classes=2**40)
    return InputError(f"num_classes={num_classes}: a one-hot array of {numel(labels)} x "
                      f"{num_classes} entries does not fit in memory")


def _one_hot(xp: Any, labels: Array, num_classes: int, dtype: Any, validate: bool,
             name: str) -> Array:
    if not is_integer(xp, labels):
        raise InputError(f"{name} must be integers (class indices), got dtype {labels.dtype}")
    wide = wide_integer(xp, labels)
    if validate and past_integer_range(xp, labels, xp.iinfo(wide)):
        # checked before the cast, which would report 2**64 - 1 as -1
        raise InputError(f"{name} must lie in [0, {num_classes}); found a label past "
                         f"{xp.iinfo(wide).max}, the largest {wide} labels are compared in")
    labels = xp.astype(labels, wide)
    if validate and numel(labels) and any_true(xp, (labels < 0) | (labels >= num_classes)):
        raise InputError(
            f"{name} must lie in [0, {num_classes}); found {int(xp.min(labels))}..."
            f"{int(xp.max(labels))}"
        )
    dtype = dtype if dtype is not None else default_float(xp, labels)
    try:
        classes = xp.arange(num_classes, dtype=labels.dtype, device=device(labels))
        hot = xp.expand_dims(labels, axis=-1) == classes
    except (MemoryError, RuntimeError) as error:  # torch's CPU allocator: RuntimeError
        if not isinstance(error, MemoryError) and "memory" not in str(error):
            raise
        raise _too_many_classes(labels, num_classes) from None
    try:
        return xp.astype(hot, dtype)
    except MemoryError:
        raise _too_many_classes(labels, num_classes) from None
    except (TypeError, ValueError, AttributeError, RuntimeError):
        raise InputError(f"dtype={dtype!r} is not a dtype of {xp.__name__}") from None


def smooth_labels(targets: Any, alpha: float, *, axis: int = -1, validate: bool = True) -> Array:
    """Label smoothing: ``targets * (1 - alpha) + alpha / C`` along ``axis`` (C classes).

    Moves ``alpha`` of the probability mass from the labels to a uniform distribution, so
    a smoothed row still sums to 1. ``alpha`` in [0, 1]. ``targets`` are probability rows
    (floating; one-hot class indices first with :func:`one_hot`), checked to lie in [0, 1]
    and sum to 1 unless ``validate=False``; the result has their dtype. Matches the targets
    that ``torch.nn.functional.cross_entropy(..., label_smoothing=alpha)`` uses internally,
    and ``optax.smooth_labels``.

    >>> [round(float(v), 4) for v in smooth_labels([0.0, 0.0, 1.0], 0.1)]
    [0.0333, 0.0333, 0.9333]
    """
    alpha = _checks.check_fraction(alpha, "alpha")
    validate = _checks.check_bool(validate, "validate")
    xp, (targets,) = arrays(targets, names=("targets",))
    if not is_floating(xp, targets):
        raise InputError(
            f"targets must hold probabilities (a floating dtype), got dtype {targets.dtype}; "
            f"turn class indices into rows with one_hot() first"
        )
    _checks.check_has_axis(targets, "targets")
    axis = normalize_axis(axis, targets.ndim)
    _checks.check_classes(targets, axis, "targets")
    dtype = targets.dtype
    t = to_float(xp, targets)
    if validate:
        _checks.check_distribution(xp, t, "targets", axis, dtype)
    num_classes = targets.shape[axis]
    return restore_dtype(xp, t * (1.0 - alpha) + alpha / num_classes, dtype)


def mixup_params(batch_size: int, *, alpha: float, seed: int) -> tuple[float, np.ndarray]:
    """The Mixup draw: ``lam ~ Beta(alpha, alpha)`` and a permutation of the batch.

    Drawn with ``numpy.random.default_rng(seed)``, so the same seed gives the same mix in
    every array library. ``batch_size`` and ``seed`` are integers >= 0, ``alpha`` a finite
    number > 0. Returns ``(lam, permutation)``.

    >>> lam, order = mixup_params(4, alpha=0.2, seed=0)
    >>> 0.0 <= lam <= 1.0, sorted(order.tolist()), mixup_params(4, alpha=0.2, seed=0)[0] == lam
    (True, [0, 1, 2, 3], True)
    """
    batch_size = _checks.check_integer(batch_size, "batch_size", minimum=0,
                                        maximum=_checks.INDEX_MAX)
    alpha = _checks.check_positive(alpha, "alpha")
    seed = _checks.check_integer(seed, "seed", minimum=0)
    rng = np.random.default_rng(seed)
    if math.isfinite(2.0 * alpha):
        lam = float(rng.beta(alpha, alpha))
    else:  # numpy's beta gives 0.0 once a + b overflows (review H91-1): X / (X + Y) with
        # X, Y ~ Gamma(alpha), as 1 / (1 + Y / X) so that nothing overflows
        x, y = rng.standard_gamma(alpha, size=2)
        lam = float(1.0 / (1.0 + y / x))
    try:
        return lam, rng.permutation(batch_size)
    except (MemoryError, ValueError):  # one int64 array of batch_size entries (numpy's
        # ValueError: past its largest array; MemoryError: past this machine's memory)
        raise InputError(f"batch_size={batch_size}: a permutation of that many indices "
                         f"does not fit in memory") from None


def mixup(
    x: Any, targets: Any, *, alpha: float, seed: int, num_classes: int | None = None
) -> tuple[Array, Array]:
    """Mixup (Zhang et al. 2018, arXiv:1710.09412): convex combinations of example pairs.

    ``x_mix = lam * x + (1 - lam) * x[perm]`` and ``t_mix = lam * t + (1 - lam) * t[perm]``
    with ``lam ~ Beta(alpha, alpha)`` and ``perm`` a permutation of the batch (axis 0),
    both from :func:`mixup_params` (reproducible from ``seed``). ``targets`` are
    probability rows (N, C), or integer labels (N,) with ``num_classes`` given. Returns
    ``(x_mix, t_mix)``; ``t_mix`` rows are probability vectors, not one-hot: the soft
    targets :func:`crossent.softmax_cross_entropy` accepts. Floating inputs keep their
    dtype (float16 is mixed in float32 and rounded back); integer ``x`` and one-hot labels
    come back in the floating dtype ``x`` is mixed in.

    >>> xm, tm = mixup([[0.0], [1.0]], [0, 1], alpha=0.4, seed=0, num_classes=2)
    >>> [round(float(v), 6) for v in tm.sum(axis=-1)]
    [1.0, 1.0]
    """
    _checks.check_positive(alpha, "alpha")
    _checks.check_integer(seed, "seed", minimum=0)
    xp, (x, targets) = arrays(x, targets, names=("x", "targets"))
    _checks.check_has_axis(x, "x", "batch")
    _checks.check_has_axis(targets, "targets", "batch")
    if xp.isdtype(x.dtype, "bool"):
        raise InputError("x holds booleans; mix numbers (cast x to a floating dtype)")
    x_dtype = x.dtype if is_floating(xp, x) else compute_dtype(xp, x)
    if is_integer(xp, targets):
        if num_classes is None:
            raise InputError("num_classes is required when targets are integer labels")
        num_classes = _checks.check_integer(num_classes, "num_classes", minimum=1,
                                             maximum=_checks.INDEX_MAX)
        # one-hot in the dtype x is mixed in, so the labels' library default (float32
        # for torch) does not set the precision of t_mix
        targets = _one_hot(xp, targets, num_classes, compute_dtype(xp, x), True, "targets")
        t_dtype = x_dtype
    elif is_floating(xp, targets):
        t_dtype = targets.dtype
    else:
        raise InputError(
            f"targets must be integer labels or probability rows, got dtype {targets.dtype}"
        )
    if x.shape[0] != targets.shape[0]:
        raise InputError(
            f"targets has {targets.shape[0]} rows but x has {x.shape[0]}; they must match"
        )
    lam, perm = mixup_params(x.shape[0], alpha=alpha, seed=seed)
    perm = like(xp, perm, x, name="perm")
    x = to_float(xp, x)
    targets = to_float(xp, targets)
    x_mix = lam * x + (1.0 - lam) * xp.take(x, perm, axis=0)
    t_mix = lam * targets + (1.0 - lam) * xp.take(targets, perm, axis=0)
    return restore_dtype(xp, x_mix, x_dtype), restore_dtype(xp, t_mix, t_dtype)
