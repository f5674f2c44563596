"""Argument checks. Every failure is an ``InputError`` (a ``ValueError``) that names the
argument and says what was wrong, so that a bad call never returns a silently wrong number.

NaN is *not* an error: it propagates to the output as in every array library, so the
value checks below are written so that a NaN never trips them.
"""

from __future__ import annotations

import math
from typing import Any

from ._array import Array, any_true, is_floating, numel
from .errors import InputError

REDUCTIONS = ("mean", "sum", "none")
SUM_TOLERANCE = 1e-4
"""How far a probability row's sum may be from 1 before it is rejected."""


def check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise InputError(f"reduction={reduction!r} is unknown; use one of {REDUCTIONS}")


def check_base(base: float | None) -> None:
    if base is None:
        return
    try:
        value = float(base)
    except (TypeError, ValueError):
        raise InputError(f"base={base!r} is not a number") from None
    if not (value > 0 and value != 1 and math.isfinite(value)):
        raise InputError(f"base={base!r} must be a finite number > 0 and != 1")


def check_fraction(value: float, name: str) -> float:
    """A scalar that must lie in [0, 1] (label_smoothing, alpha...)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name}={value!r} is not a number") from None
    if not 0.0 <= v <= 1.0:
        raise InputError(f"{name}={value!r} must lie in [0, 1]")
    return v


def check_nonnegative(value: float, name: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name}={value!r} is not a number") from None
    if not (v >= 0.0 and math.isfinite(v)):
        raise InputError(f"{name}={value!r} must be a finite number >= 0")
    return v


def check_softcap(softcap: float | None) -> float | None:
    """None (no cap) or a finite number > 0."""
    if softcap is None:
        return None
    value = check_nonnegative(softcap, "softcap")
    if not value > 0:
        raise InputError(f"softcap={softcap!r} must be > 0 (or None for no cap)")
    return value


def check_floating(xp: Any, x: Array, name: str) -> None:
    if not is_floating(xp, x):
        raise InputError(
            f"{name} must be a floating-point array, got dtype {x.dtype}; "
            f"cast it (e.g. to float32) first"
        )


def check_in_unit_interval(xp: Any, p: Array, name: str) -> None:
    """Every entry of ``p`` in [0, 1] (NaN passes: it propagates instead)."""
    if numel(p) == 0:
        return
    if any_true(xp, (p < 0) | (p > 1)):
        bad = xp.min(p) if any_true(xp, p < 0) else xp.max(p)
        raise InputError(f"{name} must hold probabilities in [0, 1]; found {float(bad):.6g}")


def check_distribution(xp: Any, p: Array, name: str, axis: int = -1) -> None:
    """``p`` holds probability distributions along ``axis``: entries in [0, 1], sums 1 +- 1e-4."""
    check_in_unit_interval(xp, p, name)
    if numel(p) == 0:
        return
    total = xp.sum(p, axis=axis)
    off = xp.abs(total - 1)
    if any_true(xp, off > SUM_TOLERANCE):
        worst = float(xp.max(xp.where(off > SUM_TOLERANCE, off, 0.0)))
        raise InputError(
            f"{name} must sum to 1 along axis {axis} (tolerance {SUM_TOLERANCE:g}); "
            f"a row is off by {worst:.6g}. Normalise it, or pass validate=False"
        )


def check_axis(axis: int | tuple[int, ...] | None, ndim: int) -> None:
    """``axis`` (an int, a tuple of ints, or None) names existing dimensions of an ndim array."""
    axes = () if axis is None else axis if isinstance(axis, tuple) else (axis,)
    for a in axes:
        if not isinstance(a, int) or isinstance(a, bool) or not -ndim <= a < max(ndim, 1):
            raise InputError(f"axis={axis!r} is out of range for an array with {ndim} dimensions")


def check_same_shape(a: Array, b: Array, name_a: str, name_b: str) -> None:
    if tuple(a.shape) != tuple(b.shape):
        raise InputError(
            f"{name_b} has shape {tuple(b.shape)} but {name_a} has shape {tuple(a.shape)}; "
            f"they must match"
        )


def check_broadcastable(a: Array, shape: tuple[int, ...], name: str, to: str) -> None:
    """``a`` broadcasts to ``shape`` without changing it (weights onto a loss)."""
    a_shape = tuple(a.shape)
    if len(a_shape) > len(shape):
        raise InputError(f"{name} with shape {a_shape} does not broadcast to {to} shape {shape}")
    for da, ds in zip(reversed(a_shape), reversed(shape), strict=False):
        if da not in (1, ds):
            raise InputError(
                f"{name} with shape {a_shape} does not broadcast to {to} shape {shape}"
            )
