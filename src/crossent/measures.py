"""The information measures cross-entropy is built from: surprise -> entropy ->
cross-entropy (and KL divergence, and the entropy of a coin).

Every function takes ``base``: e (the default) gives nats, as every ML framework reports;
2 gives bits, the unit of the article's worked numbers; 10 gives hartleys; any finite
base > 0 and != 1 works. Distributions are reduced along ``axis`` (default -1, the last
axis; unlike ``scipy.stats.entropy``, which reduces axis 0 and renormalises its inputs:
crossent validates instead, PITFALLS 5 and 7).

Conventions (Cover & Thomas, *Elements of Information Theory*, 2.1):
``0 * log 0 = 0`` (an impossible outcome contributes nothing), and ``p * log(p / 0) = +inf``
for ``p > 0`` (an outcome that happens but was believed impossible costs infinitely
much). Gradients through these functions obey the same conventions (no NaN from 0 * inf).
NaN in an input propagates to the output.
"""

from __future__ import annotations

import math
from typing import Any

from . import _checks
from ._array import (
    Array,
    any_true,
    arrays,
    axis_index,
    log_base_divisor,
    normalize_axis,
    promoted_dtype,
    restore_dtype,
    silent_infinities,
    to_float,
)
from .errors import InputError

__all__ = ["binary_entropy", "cross_entropy", "entropy", "generalized_kl_divergence",
           "kl_divergence", "kl_divergence_terms", "surprisal"]


def _in_base(xp: Any, nats: Array, base: float) -> Array:
    divisor = log_base_divisor(base)
    return nats if divisor is None else nats / divisor


def _xlogy(xp: Any, x: Array, y: Array) -> Array:
    """x * log(y) with 0 * log(y) = 0 for every finite y (NaN y propagates), gradient-safe.

    The second ``where`` keeps autograd from seeing ``log(0)`` in the branch that is
    thrown away, which would otherwise turn the gradient into 0 * inf = NaN. Only
    ``x = 0`` with ``y <= 0`` is replaced: for ``y > 0`` the gradient in ``x`` is ``log y``
    (as ``torch.xlogy``), and a NaN ``y`` propagates (as ``scipy.special.xlogy``).
    """
    zero = (x == 0) & (y <= 0)
    safe_y = xp.where(zero, 1.0, y)
    return xp.where(zero, 0.0, x * xp.log(safe_y))


@silent_infinities
def surprisal(p: Any, *, base: float = math.e, validate: bool = True) -> Array:
    """Surprise (self-information) of an outcome of probability p: ``s = log(1/p) = -log p``.

    Elementwise; output has the shape of ``p``. ``p = 0`` gives +inf (the impossible
    happened). The article's panda: ``surprisal(0.001, base=2)`` is 9.9658 bits.

    Reference: Shannon (1948); ``-scipy.special.xlogy(1, p)``.

    >>> round(float(surprisal(0.001, base=2)), 6)
    9.965784
    """
    _checks.check_base(base)
    validate = _checks.check_bool(validate, "validate")
    xp, (p,) = arrays(p, names=("p",))
    dtype = p.dtype
    p = to_float(xp, p)
    if validate:
        _checks.check_in_unit_interval(xp, p, "p")
    return restore_dtype(xp, _in_base(xp, 0.0 - xp.log(p), base), dtype)  # +0.0 at p = 1


@silent_infinities
def entropy(p: Any, *, axis: int = -1, base: float = math.e, validate: bool = True) -> Array:
    """Entropy of a distribution: ``H(p) = -sum_i p_i log p_i``, reduced along ``axis``.

    The probability-weighted average surprise. Output shape: ``p``'s shape without
    ``axis``. With ``validate=True`` every entry must lie in [0, 1] and every row must sum
    to 1 within 1e-4 (no silent renormalisation, unlike ``scipy.stats.entropy``).

    Reference: ``scipy.stats.entropy(p, axis=axis, base=base)`` on normalised input.

    >>> round(float(entropy([0.2, 0.3, 0.5], base=2)), 4)  # the article's [panda, bird, dog]
    1.4855
    """
    _checks.check_base(base)
    validate = _checks.check_bool(validate, "validate")
    xp, (p,) = arrays(p, names=("p",))
    dtype = p.dtype
    _checks.check_has_axis(p, "p")
    axis = axis_index(axis, p.ndim)
    _checks.check_classes(p, axis, "p")
    p = to_float(xp, p)
    if validate:
        _checks.check_distribution(xp, p, "p", axis, dtype)
    h = 0.0 - xp.sum(_xlogy(xp, p, p), axis=axis)  # 0 - x: +0.0 for a certain p, not -0.0
    return restore_dtype(xp, _in_base(xp, h, base), dtype)


@silent_infinities
def cross_entropy(
    p: Any, q: Any, *, axis: int = -1, base: float = math.e, validate: bool = True
) -> Array:
    """Cross-entropy ``H(p, q) = -sum_i p_i log q_i`` of belief ``q`` under truth ``p``.

    The average surprise when outcomes happen with probabilities ``p`` but are scored with
    ``q``. Argument order: truth first (as Cover & Thomas write it; PyTorch's loss takes the
    prediction first). ``H(p, q) >= H(p)`` with equality iff ``q = p`` (Gibbs' inequality).
    Shapes: ``p`` and ``q`` broadcast, except along ``axis``, where both must have the same
    number of classes (``InputError`` naming p and q otherwise); the result drops ``axis``.
    ``p_i > 0`` where ``q_i = 0`` gives +inf.

    Reference: ``scipy.stats.entropy(p) + scipy.stats.entropy(p, q)``;
    ``-sum(scipy.special.xlogy(p, q))``.

    >>> round(float(cross_entropy([0, 0, 1], [0.1, 0.2, 0.7], base=2)), 6)
    0.514573
    """
    xp, p, q, dtype, axis = _pair(p, q, axis, base, validate)
    h = 0.0 - xp.sum(_xlogy(xp, p, q), axis=axis)  # +0.0 for H(p, p) of a certain p
    return restore_dtype(xp, _in_base(xp, h, base), dtype)


@silent_infinities
def kl_divergence(
    p: Any, q: Any, *, axis: int = -1, base: float = math.e, validate: bool = True
) -> Array:
    """Kullback-Leibler divergence ``KL(p || q) = sum_i p_i log(p_i / q_i) = H(p, q) - H(p)``.

    What believing ``q`` costs beyond the unavoidable entropy of ``p``; >= 0, and 0 iff
    ``q = p``. Truth ``p`` first, both as probabilities (``torch.nn.functional.kl_div``
    takes ``log q`` first and its ``"mean"`` divides by the element count; only
    ``"batchmean"`` is this quantity, PITFALLS 7). ``p_i > 0`` where ``q_i = 0`` gives +inf.

    Reference: ``sum(scipy.special.rel_entr(p, q))`` (not ``scipy.special.kl_div``, which
    adds ``- p + q`` terms), ``scipy.stats.entropy(p, q)``.

    >>> round(float(kl_divergence([0.5, 0.5], [0.9, 0.1], base=2)), 4)
    0.737
    """
    xp, p, q, dtype, axis = _pair(p, q, axis, base, validate)
    terms = _rel_entr(xp, p, q)
    return restore_dtype(xp, _in_base(xp, xp.sum(terms, axis=axis), base), dtype)


def _rel_entr(xp: Any, p: Array, q: Array) -> Array:
    """``p log(p / q)`` elementwise (``scipy.special.rel_entr``), 0 where p = 0."""
    zero = (p == 0) & ~xp.isnan(q)  # 0 log(0/q) = 0, but a NaN q propagates
    safe_p = xp.where(zero, 1.0, p)
    safe_q = xp.where(zero, 1.0, q)
    # log(p/q) is exact where the ratio is a normal number; log p - log q covers the
    # ratios that overflow or underflow (p or q near the bottom of the float range);
    # near p = q, log1p((p - q) / q) keeps the digits log(p/q) rounds away (p - q is
    # exact there). `ratio` only picks the branch: each branch gets masked inputs, so
    # no 0 * inf from a discarded branch reaches the gradient.
    ratio = safe_p / safe_q
    finfo = xp.finfo(p.dtype)
    direct = (ratio > finfo.smallest_normal) & (ratio < finfo.max)
    near = (ratio > 0.5) & (ratio < 2.0)
    dp, dq = xp.where(direct, safe_p, 1.0), xp.where(direct, safe_q, 1.0)
    ep, eq = xp.where(direct, 1.0, safe_p), xp.where(direct, 1.0, safe_q)
    rel = xp.where(near, (dp - dq) / dq, 0.0)
    log_ratio = xp.where(
        near, xp.log1p(rel), xp.where(direct, xp.log(dp / dq), xp.log(ep) - xp.log(eq))
    )
    return xp.where(zero, 0.0, p * log_ratio)


def _elementwise_pair(
    p: Any, q: Any, base: float, validate: bool, check: Any
) -> tuple[Any, Array, Array, Any]:
    """Namespace, ``p`` and ``q`` broadcast in one floating dtype, and the dtype to return;
    ``check(xp, array, name)`` validates each entry."""
    _checks.check_base(base)
    validate = _checks.check_bool(validate, "validate")
    given = p, q
    xp, (p, q) = arrays(p, q, names=("p", "q"))
    dtype = _returned_dtype(xp, p, q, given)
    p, q = _common_float(xp, to_float(xp, p), to_float(xp, q))
    try:
        p, q = xp.broadcast_arrays(p, q)
    except (ValueError, RuntimeError, TypeError):
        raise InputError(
            f"p has shape {tuple(p.shape)} and q has shape {tuple(q.shape)}: they must "
            f"broadcast to one shape"
        ) from None
    if validate:
        check(xp, p, "p")
        check(xp, q, "q")
    return xp, p, q, dtype


@silent_infinities
def kl_divergence_terms(
    p: Any, q: Any, *, base: float = math.e, validate: bool = True
) -> Array:
    """The pointwise terms of ``KL(p || q)``, elementwise: ``p log(p / q)``, not summed.

    ``kl_divergence(p, q)`` is their sum along the class axis; a term may be negative
    (where ``q > p``). ``0 log(0 / q) = 0``; ``p > 0`` with ``q = 0`` gives +inf.
    Shapes: ``p`` and ``q`` broadcast; the output has the broadcast shape. With
    ``validate=True`` every entry must lie in [0, 1] (no sum check: terms can belong to
    any part of a distribution).

    Reference: ``scipy.special.rel_entr(p, q)``; PyTorch's
    ``torch.nn.functional.kl_div(log q, p, reduction="none")`` (``KLDivLoss``), which
    takes the log-prediction first.

    >>> [round(float(v), 6) for v in kl_divergence_terms([0.5, 0.5], [0.25, 0.75])]
    [0.346574, -0.202733]
    """
    xp, p, q, dtype = _elementwise_pair(p, q, base, validate, _checks.check_in_unit_interval)
    return restore_dtype(xp, _in_base(xp, _rel_entr(xp, p, q), base), dtype)


@silent_infinities
def generalized_kl_divergence(
    p: Any, q: Any, *, axis: int = -1, base: float = math.e, validate: bool = True
) -> Array:
    """Generalized KL divergence of non-negative measures (not necessarily normalised):
    ``D(p || q) = sum_i (p_i log(p_i / q_i) - p_i + q_i)`` along ``axis``.

    The Bregman divergence of ``x log x - x``: >= 0, 0 iff ``p = q``, and equal to
    :func:`kl_divergence` when both sum to 1. Truth ``p`` first. Shapes: ``p`` and ``q``
    broadcast; the result drops ``axis``. With ``validate=True`` every entry must be >= 0
    (NaN propagates). ``base`` divides the whole sum by ``ln(base)``.

    Reference: ``sum(scipy.special.kl_div(p, q))``; ``optax.losses.generalized_kl_divergence(
    log q, p)`` (log-prediction first).

    >>> round(float(generalized_kl_divergence([1.0, 2.0], [2.0, 2.0])), 6)  # ln(1/2) + 1
    0.306853
    """
    xp, p, q, dtype = _elementwise_pair(p, q, base, validate, _check_nonnegative_entries)
    _checks.check_has_axis(p, "p")
    axis = normalize_axis(axis, p.ndim)
    terms = _rel_entr(xp, p, q) - p + q
    return restore_dtype(xp, _in_base(xp, xp.sum(terms, axis=axis), base), dtype)


def _check_nonnegative_entries(xp: Any, x: Array, name: str) -> None:
    if any_true(xp, x < 0):
        raise InputError(f"{name} must hold non-negative numbers; found {float(xp.min(x)):.6g}")


@silent_infinities
def binary_entropy(p: Any, *, base: float = math.e, validate: bool = True) -> Array:
    """Entropy of a coin that lands heads with probability p, elementwise:
    ``H_b(p) = -p log p - (1 - p) log(1 - p)``.

    Maximal (1 bit) at p = 0.5, 0 at p = 0 and p = 1. ``log(1 - p)`` is computed as
    ``log1p(-p)``, exact for tiny p. Reference: ``scipy.stats.entropy([p, 1 - p])``.

    >>> round(float(binary_entropy(0.99, base=2)), 6)  # the article's loaded coin
    0.080793
    """
    _checks.check_base(base)
    validate = _checks.check_bool(validate, "validate")
    xp, (p,) = arrays(p, names=("p",))
    dtype = p.dtype
    p = to_float(xp, p)
    if validate:
        _checks.check_in_unit_interval(xp, p, "p")
    one = p == 1
    log1m = xp.log1p(-xp.where(one, 0.0, p))
    h = 0.0 - _xlogy(xp, p, p) - xp.where(one, 0.0, (1.0 - p) * log1m)  # +0.0 at p = 1
    return restore_dtype(xp, _in_base(xp, h, base), dtype)


def _pair(
    p: Any, q: Any, axis: int, base: float, validate: bool
) -> tuple[Any, Array, Array, Any, int]:
    """The checked arguments of a two-distribution measure: namespace, p and q in one
    floating dtype, the dtype to return (p's if floating, else q's), and ``axis`` as a
    Python int."""
    _checks.check_base(base)
    validate = _checks.check_bool(validate, "validate")
    given = p, q
    xp, (p, q) = arrays(p, q, names=("p", "q"))
    axis = _checks.check_matching_distributions(p, q, axis)
    dtype = _returned_dtype(xp, p, q, given)
    p_dtype, q_dtype = p.dtype, q.dtype
    p, q = _common_float(xp, to_float(xp, p), to_float(xp, q))
    if validate:
        _checks.check_distribution(xp, p, "p", axis, p_dtype)
        _checks.check_distribution(xp, q, "q", axis, q_dtype)
    return xp, p, q, dtype, axis


def _returned_dtype(xp: Any, p: Array, q: Array, given: tuple[Any, Any]) -> Any:
    """The dtype a two-distribution measure returns: the two arrays' promotion where both
    are floating arrays of the caller's library (see :func:`promoted_dtype`), else p's if
    floating, else q's."""
    if not xp.isdtype(p.dtype, "real floating"):
        return q.dtype
    return promoted_dtype(xp, p, q, *given)


def _common_float(xp: Any, a: Array, b: Array) -> tuple[Array, Array]:
    """Promote two floating arrays to one dtype (array-api-strict refuses to mix them)."""
    if a.dtype == b.dtype:
        return a, b
    dtype = xp.result_type(a.dtype, b.dtype)
    return xp.astype(a, dtype), xp.astype(b, dtype)
