"""Numerically stable activations: softmax, log_softmax, logsumexp, sigmoid, log_sigmoid.

All take arrays of any array-API library (or Python numbers and lists, taken as NumPy)
and return arrays of the same library. None of them overflows at ``|x| = 1e4``, and a
``-inf`` entry acts as a mask (probability exactly 0). A row that is ``-inf`` everywhere
has no distribution: softmax and log_softmax give NaN there, as PyTorch and SciPy do, and
logsumexp gives ``-inf``; so does an empty axis (softmax of an empty axis is empty).
NaN propagates. logsumexp is ``m + log1p(sum of the other terms)``, as SciPy computes it,
so ``logsumexp([0, -40])`` is 4.25e-18, not 0, and a log-softmax near 0 keeps its digits.

``where`` (softmax, log_softmax, logsumexp; a boolean mask broadcast against ``x``) is
``jax.nn``'s and the softmax losses' class mask: the masked-out entries are left out of
the normaliser (taken as ``-inf``, whatever they hold, NaN included), softmax gives exactly
0 and log_softmax exactly ``-inf`` there, even in a row with nothing kept, whose
logsumexp is ``-inf``. Their gradient is exactly 0.
"""

from __future__ import annotations

import math
import numbers
import operator
from typing import Any

from array_api_compat import device

from ._array import Array, arrays, as_array, like, namespace, restore_dtype, to_float
from ._checks import (
    check_axis,
    check_bool,
    check_broadcastable,
    check_distinct_axes,
    check_in_unit_interval,
    check_mask,
)
from .errors import InputError

__all__ = ["log_sigmoid", "log_softmax", "logit", "logsumexp", "sigmoid", "softmax"]

Axis = int | tuple[int, ...] | None


def _reduced_axes(x: Array, axis: Axis) -> tuple[int, ...]:
    axis = check_axis(axis, x.ndim)
    if axis is None:
        return tuple(range(x.ndim))
    axes = axis if isinstance(axis, tuple) else (axis,)
    return tuple(a % max(x.ndim, 1) for a in axes)


def _row_max(xp: Any, x: Array, axis: Axis) -> tuple[Array, Array]:
    """``(top, m)`` keepdims: the max along ``axis`` (-inf over an empty axis) and the shift
    ``m``, that max with non-finite values replaced by 0 (``x - inf`` would be NaN)."""
    axes = _reduced_axes(x, axis)
    if any(x.shape[d] == 0 for d in axes):  # max of nothing: the sum is 0, its log -inf
        keep = tuple(1 if d in axes else n for d, n in enumerate(x.shape))
        zeros = xp.zeros(keep, dtype=x.dtype, device=device(x))
        return zeros - float("inf"), zeros
    top = xp.max(x, axis=axis, keepdims=True)
    return top, xp.where(xp.isfinite(top), top, 0.0)


def lse_parts(xp: Any, x: Array, axis: Axis) -> tuple[Array, Array]:
    """``(m, r)`` with ``logsumexp(x) = m + r`` (both keepdims): ``m`` the row's max
    (0 where it is not finite) and ``r = log1p(sum of exp(x_i - m) over the non-max terms)``.

    Splitting off the max term (``exp(0) = 1``) before the log keeps the digits that
    ``log(1 + s)`` rounds away when ``s`` is tiny: ``x - m - r`` is a log-softmax exact near
    0 and ``logsumexp([0, -40])`` is 4.25e-18 (SciPy's refinement). Ties at the max count
    as non-max terms except one. A row whose max is not finite gets ``r`` = that max
    (+inf, -inf for an all-masked or empty row, NaN), so ``m + r`` is it.
    """
    top, m = _row_max(xp, x, axis)
    if any(d == 0 for d in x.shape):
        return m, top
    finite = xp.isfinite(top)
    is_max = (x == m) & finite
    rest = xp.sum(xp.where(is_max, 0.0, xp.exp(x - m)), axis=axis, keepdims=True)
    ties = xp.sum(xp.astype(is_max, x.dtype), axis=axis, keepdims=True) - 1.0
    r = xp.where(finite, xp.log1p(xp.where(finite, rest + ties, 0.0)), top)
    return m, r


def log_softmax_rows(xp: Any, x: Array, axis: Axis) -> tuple[Array, Array]:
    """``(x - logsumexp(x), logsumexp(x))`` along ``axis`` (the second keepdims), the first
    as ``(x - m) - r`` (:func:`lse_parts`) and NaN at every entry of a row whose max is
    +inf: torch and SciPy subtract the max first, and ``inf - inf`` is NaN there (not
    ``-inf`` at the finite entries). The log-sum-exp of such a row stays +inf."""
    m, r = lse_parts(xp, x, axis)
    return nan_rows(xp, r == math.inf, x, (x - m) - r), m + r


def nan_rows(xp: Any, bad: Array, x: Array, out: Array) -> Array:
    """``out`` with NaN where ``bad`` (broadcast against ``x``), as ``x * NaN``: autograd
    then gives those entries' inputs a NaN gradient, as torch's and JAX's ``x - max(x)``
    do, where a constant NaN would give 0. ``x`` is 0 outside ``bad`` before the product:
    the inner ``where`` keeps the product's NaN derivative from the other rows, and no
    ``-inf x 0`` makes NumPy warn."""
    return xp.where(bad, xp.where(bad, x, 0.0) * math.nan, out)


def where_mask(xp: Any, where: Any, x: Array, name: str = "x") -> Array | None:
    """The boolean mask ``where`` broadcast to ``x``'s shape (None stays None); an
    ``InputError`` naming ``where`` if it is not boolean or does not broadcast."""
    if where is None:
        return None
    mask = like(xp, as_array(where, "where"), x, name="where")
    check_mask(xp, mask)
    check_broadcastable(mask, tuple(x.shape), "where", name)
    return xp.broadcast_to(mask, tuple(x.shape))


def _masked(xp: Any, x: Array, mask: Array | None) -> Array:
    """``x`` with the entries outside the boolean ``mask`` set to ``-inf``: excluded from
    every sum (as ``jax.nn``'s ``where``); None keeps ``x``."""
    return x if mask is None else xp.where(mask, x, -math.inf)


def _masked_rows(xp: Any, x: Array, mask: Array | None, axis: Axis) -> Array:
    """:func:`_masked`, except that a row (along ``axis``) with nothing kept is all 0: a
    finite stand-in, so that no 0/0 (value or gradient) arises where the caller then writes
    its fill value."""
    if mask is None:
        return x
    live = xp.any(mask, axis=axis, keepdims=True)
    return xp.where(live, _masked(xp, x, mask), 0.0)


def _flatten_0d(xp: Any, x: Array, axis: Axis) -> tuple[Array, Axis, bool]:
    """A 0-d ``x`` as a 1-element vector reduced along axis 0 (SciPy takes 0-d input with
    any of ``axis=None, 0, -1, ()``); other inputs unchanged. The flag says to squeeze back."""
    if x.ndim != 0:
        return x, check_axis(axis, x.ndim), False
    axes = () if axis is None else axis if isinstance(axis, tuple) else (axis,)
    for a in axes:  # a NumPy integer too, as SciPy takes it
        if isinstance(a, bool) or not isinstance(a, numbers.Integral) or a not in (0, -1):
            raise InputError(f"axis={axis!r} is out of range for a 0-d array")
    check_distinct_axes(axis, tuple(operator.index(a) for a in axes), 1)
    return xp.reshape(x, (1,)), 0, True


def logsumexp(
    x: Any,
    axis: Axis = -1,
    *,
    b: Any = None,
    keepdims: bool = False,
    return_sign: bool = False,
    where: Any = None,
) -> Any:
    """log(sum(b * exp(x))) along ``axis``, without overflow.

    Formula: ``m + log(sum(b * exp(x - m)))`` with ``m = max(x)`` (over the entries whose
    ``b`` is not 0). ``axis`` may be an int, a tuple, or None (all axes); a 0-d ``x`` is its
    own logsumexp. Unlike ``scipy.special.logsumexp`` the default axis is -1.

    ``b`` (optional) scales each ``exp(x_i)`` and broadcasts against ``x``; it may be
    negative. An entry with ``b = 0`` contributes nothing, even where ``x`` is ``+inf``.
    A negative sum gives NaN unless ``return_sign=True``, which returns ``(log|s|, sign(s))``
    (sign +1, -1, or 0 where ``s = 0``, NaN where ``s`` is NaN), as SciPy. ``where`` (a
    boolean mask broadcast against ``x``) leaves the masked-out entries out of the sum, as
    ``jax.nn.logsumexp``'s (an all-masked row gives ``-inf``). Shapes: the
    broadcast shape of ``x`` and ``b`` without ``axis`` (kept as size 1 with ``keepdims``).

    Reference: ``scipy.special.logsumexp`` (same ``b``, ``return_sign``, ``keepdims``;
    SciPy gives sign -1 for an empty axis, crossent 0), ``torch.logsumexp``.

    An empty axis gives ``-inf`` (the log of an empty sum), as SciPy and torch do.
    Without ``b`` it is computed as ``m + log1p(sum_{i != argmax} exp(x_i - m))`` (see
    :func:`lse_parts`).

    >>> float(logsumexp([1000.0, 1000.0]))  # ln(2 e^1000), no overflow
    1000.6931471805599
    >>> float(logsumexp([0.0, -40.0]))  # log1p(e^-40), not 0
    4.248354255291589e-18
    >>> [float(v) for v in logsumexp([0.0, 0.0], b=[1.0, -3.0], return_sign=True)]  # -2
    [0.6931471805599453, -1.0]
    """
    keepdims = check_bool(keepdims, "keepdims")
    return_sign = check_bool(return_sign, "return_sign")
    xp, (x, b) = arrays(x, b, names=("x", "b"), optional=("b",))
    dtype = x.dtype
    x = to_float(xp, x)
    mask = where_mask(xp, where, x)
    x = _masked(xp, x, mask)
    if b is not None:
        x, b = _broadcast_b(xp, x, b)
        if mask is not None:  # a masked entry's scale (even NaN) is out of the sum too
            b = xp.where(mask, b, 0.0)
    x, axis, was_0d = _flatten_0d(xp, x, axis)
    if was_0d and b is not None:
        b = xp.reshape(b, (1,))
    if b is None:
        m, r = lse_parts(xp, x, axis)
        out = m + r
        # +1, 0 where the sum is 0 (-inf), NaN where it is NaN
        sign = xp.where(out == -math.inf, 0.0, xp.sign(xp.abs(out) + 1.0))
    else:
        out, sign = _scaled_lse(xp, x, b, axis)
        if not return_sign:
            out = xp.where(sign < 0, xp.nan, out)
    if was_0d:
        out, sign = xp.reshape(out, ()), xp.reshape(sign, ())
    elif not keepdims:
        axes = _reduced_axes(x, axis)
        out, sign = xp.squeeze(out, axis=axes), xp.squeeze(sign, axis=axes)
    out, sign = restore_dtype(xp, out, dtype), restore_dtype(xp, sign, dtype)
    return (out, sign) if return_sign else out


def _broadcast_b(xp: Any, x: Array, b: Array) -> tuple[Array, Array]:
    """``x`` and the scale factors ``b`` broadcast to one shape, ``b`` in ``x``'s dtype."""
    try:
        x, b = xp.broadcast_arrays(x, b)
    except (ValueError, RuntimeError, TypeError):
        raise InputError(
            f"b has shape {tuple(b.shape)}, which does not broadcast against x's shape "
            f"{tuple(x.shape)}"
        ) from None
    return x, xp.astype(b, x.dtype)


def _scaled_lse(xp: Any, x: Array, b: Array, axis: Axis) -> tuple[Array, Array]:
    """``(log|s|, sign(s))`` keepdims for ``s = sum(b exp(x))``; ``b = 0`` entries skipped."""
    used = b != 0
    xm = xp.where(used, x, -math.inf)
    _, m = _row_max(xp, xm, axis)
    if any(d == 0 for d in x.shape):
        s = xp.zeros(m.shape, dtype=x.dtype, device=device(x))
    else:
        s = xp.sum(xp.where(used, b * xp.exp(xm - m), 0.0), axis=axis, keepdims=True)
    sign = xp.sign(s)
    zero = s == 0  # log 0 = -inf, without the divide-by-zero warning
    log_abs = xp.where(zero, -math.inf, xp.log(xp.where(zero, 1.0, xp.abs(s))))
    return m + log_abs, sign


def _normalise_axes(xp: Any, x: Array, axis: Axis) -> tuple[Array, Axis, bool]:
    """softmax and log_softmax normalise along ``axis`` (an int, a tuple or None); a 0-d
    ``x`` is a one-element distribution (SciPy's ``softmax`` of a scalar is 1)."""
    return _flatten_0d(xp, x, axis)


def softmax(x: Any, axis: Axis = -1, *, where: Any = None) -> Array:
    """softmax(x)_i = exp(x_i) / sum_j exp(x_j) along ``axis``.

    ``axis`` may be an int, a tuple of ints or None (normalise over every element jointly,
    SciPy's default). Shapes: output has the shape of ``x`` (a 0-d ``x`` gives 1). Computed
    as ``exp(x - max(x))`` normalised, so logits of 1e4 do not overflow. ``where`` (a boolean
    mask broadcast against ``x``) normalises over the kept entries only and gives exactly 0 at
    the others (every entry of a row with nothing kept), as ``jax.nn.softmax``'s. A row
    holding +inf is NaN throughout (``inf / inf``), as in torch, SciPy and JAX. Reference:
    ``torch.softmax``, ``scipy.special.softmax`` (whose default axis is None; ours is -1,
    PITFALLS 7).

    >>> [round(float(v), 4) for v in softmax([1.0, 2.0, 3.0])]
    [0.09, 0.2447, 0.6652]
    """
    x = as_array(x, "x")
    xp = namespace(x)
    dtype = x.dtype
    shape = tuple(x.shape)
    x = to_float(xp, x)
    mask = where_mask(xp, where, x)
    x, axis, _ = _normalise_axes(xp, x, axis)
    x = _masked_rows(xp, x, None if mask is None else xp.reshape(mask, x.shape), axis)
    top, m = _row_max(xp, x, axis)
    e = xp.exp(x - m)
    # a row whose max is +inf: NaN throughout, as torch's and SciPy's exp(x - max(x))
    p = nan_rows(xp, top == math.inf, x, e / xp.sum(e, axis=axis, keepdims=True))
    out = xp.reshape(p, shape)
    if mask is not None:  # exactly 0 where masked, also in a row with nothing kept (0/0)
        out = xp.where(mask, out, 0.0)
    return restore_dtype(xp, out, dtype)


def log_softmax(x: Any, axis: Axis = -1, *, where: Any = None) -> Array:
    """log softmax(x)_i = x_i - logsumexp(x) along ``axis`` (an int, a tuple, or None).

    Exact for very negative log-probabilities where ``log(softmax(x))`` would give -inf.
    A 0-d ``x`` gives 0. ``where`` (boolean mask broadcast against ``x``) normalises over the
    kept entries and gives exactly ``-inf`` at the others (every entry of a row with nothing
    kept), as ``jax.nn.log_softmax``; ``-sum_c t_c log_softmax(z, where=m)_c`` over the kept
    classes is :func:`crossent.softmax_cross_entropy` with ``where=m``. A row holding +inf
    is NaN throughout, as torch's and ``jax.nn``'s (SciPy's: NaN at the +inf, -inf
    elsewhere), so that ``exp(log_softmax(x))`` is :func:`softmax`. Reference:
    ``torch.log_softmax``, ``scipy.special.log_softmax``.

    >>> [round(float(v), 4) for v in log_softmax([0.0, 0.0])]
    [-0.6931, -0.6931]
    """
    x = as_array(x, "x")
    xp = namespace(x)
    dtype = x.dtype
    shape = tuple(x.shape)
    xf = to_float(xp, x)
    mask = where_mask(xp, where, xf)
    xf, axis, _ = _normalise_axes(xp, xf, axis)
    xf = _masked_rows(xp, xf, None if mask is None else xp.reshape(mask, xf.shape), axis)
    out = xp.reshape(log_softmax_rows(xp, xf, axis)[0], shape)
    if mask is not None:  # exactly -inf where masked, also in a row with nothing kept
        out = xp.where(mask, out, -math.inf)
    return restore_dtype(xp, out, dtype)


def sigmoid(x: Any) -> Array:
    """sigmoid(x) = 1 / (1 + exp(-x)), elementwise, for any x.

    Computed from ``exp(-|x|)``, which never overflows, so ``sigmoid(-1e4)`` is 0 and
    ``sigmoid(1e4)`` is 1 without warnings. Reference: ``torch.sigmoid``,
    ``scipy.special.expit``.

    >>> float(sigmoid(0.0))
    0.5
    """
    x = as_array(x, "x")
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
    x = as_array(x, "x")
    xp = namespace(x)
    dtype = x.dtype
    xf = to_float(xp, x)
    out = xp.minimum(xf, 0.0) - xp.log1p(xp.exp(-xp.abs(xf)))
    return restore_dtype(xp, out, dtype)


def logit(p: Any, *, validate: bool = True) -> Array:
    """The inverse of the sigmoid, elementwise: ``logit(p) = log(p / (1 - p))``.

    The log-odds of a probability: ``sigmoid(logit(p)) = p``. ``logit(0) = -inf`` and
    ``logit(1) = +inf``. As SciPy does, it is computed as ``log(p / (1 - p))`` away from
    1/2 and as ``log1p(2 (p - 1/2) / (1 - p))`` for ``0.3 < p < 0.65``, where the plain
    formula loses digits. Shapes: output has the shape of ``p``. With ``validate=True``
    an entry outside [0, 1] raises (SciPy returns NaN there); NaN propagates.

    Reference: ``scipy.special.logit``, ``torch.logit``.

    >>> float(logit(0.5))
    0.0
    >>> round(float(logit(0.75)), 6)  # ln 3
    1.098612
    """
    validate = check_bool(validate, "validate")
    p = as_array(p, "p")
    xp = namespace(p)
    dtype = p.dtype
    pf = to_float(xp, p)
    if validate:
        check_in_unit_interval(xp, pf, "p")
    near_half = (pf > 0.3) & (pf < 0.65)
    one = pf == 1
    denom = xp.where(one, 1.0, 1.0 - pf)  # p = 1 divides by 0 below: +inf set apart
    zero = pf == 0
    ratio = xp.where(zero, 1.0, pf / denom)
    far = xp.where(one, math.inf, xp.where(zero, -math.inf, xp.log(ratio)))
    close = xp.log1p(2.0 * (xp.where(near_half, pf, 0.5) - 0.5) / xp.where(near_half, denom, 1.0))
    return restore_dtype(xp, xp.where(near_half, close, far), dtype)
