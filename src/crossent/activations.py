"""Numerically stable activations: softmax, log_softmax, logsumexp, sigmoid, log_sigmoid.

All take arrays of any array-API library (or Python numbers and lists, taken as NumPy)
and return arrays of the same library. None of them overflows at ``|x| = 1e4``, and a
``-inf`` entry acts as a mask (probability exactly 0). A row that is ``-inf`` everywhere
has no distribution: softmax and log_softmax give NaN there, as PyTorch and SciPy do, and
logsumexp gives ``-inf``. NaN propagates.
"""

from __future__ import annotations

from typing import Any

from ._array import Array, as_array, namespace, restore_dtype, to_float
from ._checks import check_axis

Axis = int | tuple[int, ...] | None


def _shift(xp: Any, x: Array, axis: Axis) -> Array:
    """The per-row max used to shift exponents, with non-finite maxima replaced by 0.

    Subtracting a ``-inf`` max (all-masked row) or ``+inf`` max would give ``inf - inf``.
    """
    check_axis(axis, x.ndim)
    m = xp.max(x, axis=axis, keepdims=True)
    return xp.where(xp.isfinite(m), m, 0.0)


def logsumexp(x: Any, axis: Axis = -1, *, keepdims: bool = False) -> Array:
    """log(sum(exp(x))) along ``axis``, without overflow.

    Formula: ``m + log(sum(exp(x - m)))`` with ``m = max(x)``. ``axis`` may be an int, a
    tuple, or None (all axes). Unlike ``scipy.special.logsumexp`` the default axis is -1.

    Reference: ``scipy.special.logsumexp``, ``torch.logsumexp``.

    >>> float(logsumexp([1000.0, 1000.0]))  # ln(2 e^1000), no overflow
    1000.6931471805599
    """
    x = as_array(x)
    xp = namespace(x)
    dtype = x.dtype
    x = to_float(xp, x)
    m = _shift(xp, x, axis)
    out = m + xp.log(xp.sum(xp.exp(x - m), axis=axis, keepdims=True))
    if not keepdims:
        out = xp.squeeze(out, axis=axis if axis is not None else tuple(range(x.ndim)))
    return restore_dtype(xp, out, dtype)


def softmax(x: Any, axis: int = -1) -> Array:
    """softmax(x)_i = exp(x_i) / sum_j exp(x_j) along ``axis``.

    Shapes: output has the shape of ``x``. Computed as ``exp(x - max(x))`` normalised, so
    logits of 1e4 do not overflow. Reference: ``torch.softmax``, ``scipy.special.softmax``
    (whose default axis is None; ours is -1, PITFALLS 7).

    >>> [round(float(v), 4) for v in softmax([1.0, 2.0, 3.0])]
    [0.09, 0.2447, 0.6652]
    """
    x = as_array(x)
    xp = namespace(x)
    dtype = x.dtype
    x = to_float(xp, x)
    e = xp.exp(x - _shift(xp, x, axis))
    out = e / xp.sum(e, axis=axis, keepdims=True)
    return restore_dtype(xp, out, dtype)


def log_softmax(x: Any, axis: int = -1) -> Array:
    """log softmax(x)_i = x_i - logsumexp(x) along ``axis``.

    Exact for very negative log-probabilities where ``log(softmax(x))`` would give -inf.
    Reference: ``torch.log_softmax``, ``scipy.special.log_softmax``.

    >>> [round(float(v), 4) for v in log_softmax([0.0, 0.0])]
    [-0.6931, -0.6931]
    """
    x = as_array(x)
    xp = namespace(x)
    dtype = x.dtype
    xf = to_float(xp, x)
    out = xf - logsumexp(xf, axis=axis, keepdims=True)
    return restore_dtype(xp, out, dtype)


def sigmoid(x: Any) -> Array:
    """sigmoid(x) = 1 / (1 + exp(-x)), elementwise, for any x.

    Computed from ``exp(-|x|)``, which never overflows, so ``sigmoid(-1e4)`` is 0 and
    ``sigmoid(1e4)`` is 1 without warnings. Reference: ``torch.sigmoid``,
    ``scipy.special.expit``.

    >>> float(sigmoid(0.0))
    0.5
    """
    x = as_array(x)
    xp = namespace(x)
    dtype = x.dtype
    xf = to_float(xp, x)
    e = xp.exp(-xp.abs(xf))
    out = xp.where(xf >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
    return restore_dtype(xp, out, dtype)


def log_sigmoid(x: Any) -> Array:
    """log(sigmoid(x)) = min(x, 0) - log1p(exp(-|x|)), elementwise, for any x.

    Exact where ``log(sigmoid(x))`` would round to log(0) = -inf (x < -745 in float64).
    Reference: ``torch.nn.functional.logsigmoid``, ``jax.nn.log_sigmoid``.

    >>> float(log_sigmoid(-1000.0))
    -1000.0
    """
    x = as_array(x)
    xp = namespace(x)
    dtype = x.dtype
    xf = to_float(xp, x)
    out = xp.minimum(xf, 0.0) - xp.log1p(xp.exp(-xp.abs(xf)))
    return restore_dtype(xp, out, dtype)
