"""Argument checks. Every failure is an ``InputError`` (a ``ValueError``) that names the
argument and says what was wrong, so that a bad call never returns a silently wrong number.

NaN is *not* an error: it propagates to the output as in every array library, so the
value checks below are written so that a NaN never trips them.
"""

from __future__ import annotations

import math
import numbers
import operator
import re
from typing import Any

import numpy as np
from array_api_compat import is_jax_array

from ._array import Array, any_true, is_floating, numel
from .errors import InputError

REDUCTIONS = ("mean", "sum", "none")
SUM_TOLERANCE = 1e-4
"""How far a probability row's sum may be from 1 before it is rejected (at least; a
narrower dtype widens it, see :func:`sum_tolerance`)."""


def is_traced(value: Any) -> bool:
    """``value`` is a JAX tracer (inside ``jax.jit``, ``grad``, ``vmap``): it has no concrete
    value for Python to check or branch on."""
    if type(value) is float or not is_jax_array(value):
        return False
    import jax

    return isinstance(value, jax.core.Tracer)


def is_zero(value: Any) -> bool:
    """``value`` is a concrete number equal to 0 (a traced value never is: the general
    formula handles it, where the Python branch for 0 would need its value)."""
    return not is_traced(value) and bool(value == 0)


def as_float(value: Any) -> float:
    """``float(value)``, where an int beyond float's range rounds to +-inf (IEEE's
    rounding of it) instead of raising ``OverflowError``: a range check then names it."""
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def check_real(value: Any, name: str) -> Any:
    """A real Python or NumPy number (not a bool, not text), as a float.

    A 0-d real JAX array is taken too: a concrete one as its float; a traced one (a
    hyperparameter passed through ``jax.jit``) as it is, unchecked, since its value is
    not known until it runs (the range checks below skip it too).
    """
    if type(value) is float:  # the common case, without the probes
        return value
    if type(value) is int:
        return as_float(value)
    if is_jax_array(value) and value.ndim == 0 and value.dtype.kind in "fiu":
        return value if is_traced(value) else float(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InputError(f"{name}={value!r} is not a number")
    return as_float(value)


INDEX_MAX = 2**63 - 1  # the largest size or class id an int64 (numpy's intp) holds


def is_bool(value: Any) -> bool:
    """``value`` is a bool: Python's, NumPy's, or a bool 0-d array or tensor
    (``operator.index(torch.tensor(True))`` is 1, so an integer check must ask first)."""
    return isinstance(value, (bool, np.bool_)) or str(getattr(value, "dtype", "")) in (
        "bool", "torch.bool")


def integer_value(value: Any) -> int:
    """``operator.index(value)``; a meta tensor (no value to read: torch raises
    ``RuntimeError``) raises ``TypeError`` as any other non-integer does. Every other
    error (a ``vmap``-batched tensor's, an ``__index__`` of the caller's) propagates."""
    if getattr(getattr(value, "device", None), "type", None) == "meta":
        raise TypeError("a meta tensor has no value")
    return operator.index(value)


def check_integer(value: Any, name: str, *, minimum: int | None = None,
                  maximum: int | None = None) -> int:
    """A Python or NumPy integer or integer 0-d array/tensor (not a bool, not a float
    such as 1.5), optionally within ``[minimum, maximum]`` (a size beyond ``INDEX_MAX``
    makes NumPy's ``arange`` silently empty)."""
    if is_bool(value):
        raise InputError(f"{name}={value!r} must be an integer, not a bool")
    try:
        v = integer_value(value)
    except TypeError:
        raise InputError(f"{name}={value!r} must be an integer") from None
    if minimum is not None and v < minimum:
        raise InputError(f"{name}={value!r} must be an integer >= {minimum}")
    if maximum is not None and v > maximum:
        raise InputError(f"{name}={value!r} must be an integer <= {maximum}")
    return v


def check_bool(value: Any, name: str) -> bool:
    """A flag: True or False (a Python or NumPy bool; not 0/1, not text)."""
    if not isinstance(value, (bool, np.bool_)):
        raise InputError(f"{name}={value!r} must be True or False")
    return bool(value)


def check_reduction(reduction: str) -> None:
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise InputError(f"reduction={reduction!r} is unknown; use one of {REDUCTIONS}")


def check_base(base: float) -> None:
    """A logarithm's base: a finite number > 0 and != 1 (math.e for nats)."""
    value = check_real(base, "base")
    if not (value > 0 and value != 1 and math.isfinite(value)):
        raise InputError(f"base={base!r} must be a finite number > 0 and != 1")


def check_fraction(value: Any, name: str) -> Any:
    """A scalar that must lie in [0, 1] (label_smoothing, alpha...)."""
    v = check_real(value, name)
    if is_traced(v):
        return v
    if not 0.0 <= v <= 1.0:
        raise InputError(f"{name}={value!r} must lie in [0, 1]")
    return v


def check_nonnegative(value: Any, name: str) -> Any:
    v = check_real(value, name)
    if is_traced(v):
        return v
    if not (v >= 0.0 and math.isfinite(v)):
        raise InputError(f"{name}={value!r} must be a finite number >= 0")
    return v


def check_positive(value: float, name: str) -> float:
    """A finite number > 0 (a Beta distribution's parameter...)."""
    v = check_real(value, name)
    if not (v > 0.0 and math.isfinite(v)):
        raise InputError(f"{name}={value!r} must be a finite number > 0")
    return v


def check_softcap(softcap: float | None) -> float | None:
    """None (no cap) or a finite number > 0 (a traced JAX value as it is: unchecked, as
    :func:`check_real` takes it)."""
    if softcap is None:
        return None
    value = check_real(softcap, "softcap")
    if is_traced(value):
        return value
    if not (value > 0.0 and math.isfinite(value)):  # one message for -2 and 0 alike
        raise InputError(f"softcap={softcap!r} must be a finite number > 0 (or None for no "
                         f"cap)")
    return value


def check_softcap_fits(softcap: Any, finfo: Any, dtype: Any) -> None:
    """``softcap`` (checked by :func:`check_softcap`) is a normal number of the compute
    dtype (``finfo``: its ``finfo``): one that rounds to 0 or inf there makes
    ``c tanh(z / c)`` NaN (``0 x inf``, ``inf x 0``), and a subnormal one loses its digits."""
    if softcap is None or is_traced(softcap):
        return
    if not finfo.smallest_normal <= softcap <= finfo.max:
        raise InputError(f"softcap={softcap!r} is outside {dtype}'s normal range "
                         f"[{float(finfo.smallest_normal):.3g}, {float(finfo.max):.3g}], the "
                         f"dtype c tanh(z / c) is computed in")


def check_floating(xp: Any, x: Array, name: str) -> None:
    if not is_floating(xp, x):
        raise InputError(
            f"{name} must be a floating-point array, got dtype {x.dtype}; "
            f"cast it (e.g. to float32) first (in a Python list, write 1.0 rather than 1)"
        )


def check_in_unit_interval(xp: Any, p: Array, name: str) -> None:
    """Every entry of ``p`` in [0, 1] (NaN passes: it propagates instead)."""
    if numel(p) == 0:
        return
    if any_true(xp, (p < 0) | (p > 1)):
        bad = xp.min(p) if any_true(xp, p < 0) else xp.max(p)
        raise InputError(f"{name} must hold probabilities in [0, 1]; found {float(bad)!r}")


def sum_tolerance(xp: Any, dtype: Any) -> float:
    """How far from 1 a row of ``dtype`` probabilities may sum: 1e-4, or 2 eps of a narrower
    dtype (each entry rounds by at most eps/2 of itself, so a rounded distribution sums
    to 1 within eps/2: ``[0.1, 0.2, 0.7]`` in float16 sums to 1.000122)."""
    if not xp.isdtype(dtype, "real floating"):
        return SUM_TOLERANCE
    return max(SUM_TOLERANCE, 2.0 * float(xp.finfo(dtype).eps))


def check_distribution(
    xp: Any, p: Array, name: str, axis: int = -1, dtype: Any = None
) -> None:
    """``p`` holds probability distributions along ``axis``: entries in [0, 1], sums 1 within
    :func:`sum_tolerance` of ``dtype`` (the caller's dtype, before any upcast; default
    ``p``'s)."""
    check_in_unit_interval(xp, p, name)
    if numel(p) == 0:
        return
    tolerance = sum_tolerance(xp, p.dtype if dtype is None else dtype)
    total = xp.sum(p, axis=axis)
    off = xp.abs(total - 1)
    if any_true(xp, off > tolerance):
        worst = float(xp.max(xp.where(off > tolerance, off, 0.0)))
        raise InputError(
            f"{name} must sum to 1 along axis {axis} (tolerance {tolerance:g}); "
            f"a row is off by {worst:.6g}. Normalise it, or pass validate=False"
        )


def check_has_axis(x: Array, name: str, what: str = "class") -> None:
    """``x`` is not 0-d: it has the axis (of classes, labels) a function reduces."""
    if x.ndim == 0:
        raise InputError(f"{name} must have a {what} axis; got a 0-d array")


def check_classes(x: Array, axis: int, name: str) -> None:
    """The class axis of ``x`` is not empty (a distribution over no classes is nothing)."""
    if x.shape[axis] == 0:
        raise InputError(f"{name} has 0 classes along axis {axis}; there is nothing to score")


def check_matching_distributions(p: Array, q: Array, axis: int) -> int:
    """``p`` and ``q`` broadcast to one shape without stretching the class axis ``axis``
    (``cross_entropy([1.0], [0.3, 0.7])`` is a mistake, not a broadcast); returns ``axis``
    as a Python int (:func:`check_axis`)."""
    ndim = max(p.ndim, q.ndim)
    if min(p.ndim, q.ndim) == 0:
        name = "p" if p.ndim == 0 else "q"
        raise InputError(f"{name} must have a class axis; got a 0-d array")
    if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
        raise InputError(f"axis={axis!r} must be an integer")
    axis = operator.index(check_axis(axis, ndim))
    ps = (1,) * (ndim - p.ndim) + tuple(p.shape)
    qs = (1,) * (ndim - q.ndim) + tuple(q.shape)
    a = axis % ndim
    if ps[a] != qs[a] or any(x != y and 1 not in (x, y) for x, y in zip(ps, qs, strict=True)):
        raise InputError(
            f"p has shape {tuple(p.shape)} and q has shape {tuple(q.shape)}: they must "
            f"broadcast to one shape with the same number of classes along axis {axis}"
        )
    if ps[a] == 0:
        raise InputError(f"p and q have 0 classes along axis {axis}; there is nothing to score")
    return axis


def check_axis(axis: int | tuple[int, ...] | None, ndim: int) -> int | tuple[int, ...] | None:
    """``axis`` (an int, a tuple of ints, or None) names existing, distinct dimensions of an
    ndim array; returned with Python ints (torch's reductions refuse a NumPy integer), in
    the caller's form and signs."""
    if axis is None:
        return None
    axes = axis if isinstance(axis, tuple) else (axis,)
    for a in axes:
        if (not isinstance(a, (int, numbers.Integral)) or isinstance(a, bool)
                or not -ndim <= a < max(ndim, 1)):
            raise InputError(f"axis={axis!r} is out of range for an array with {ndim} dimensions")
    ints = tuple(operator.index(a) for a in axes)
    check_distinct_axes(axis, ints, ndim)
    return ints if isinstance(axis, tuple) else ints[0]


def check_distinct_axes(axis: Any, ints: tuple[int, ...], ndim: int) -> None:
    """No dimension is named twice (``(1, -1)`` of a 2-d array): torch, NumPy and JAX
    each refuse it with their own error, naming no argument."""
    if len({a % max(ndim, 1) for a in ints}) < len(ints):
        raise InputError(f"axis={axis!r} names a dimension twice; name each axis once")


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


def check_mask(xp: Any, mask: Array, name: str = "where") -> None:
    """``mask`` is boolean (a 0/1 float array is a mistake, not a mask)."""
    if not xp.isdtype(mask.dtype, "bool"):
        raise InputError(f"{name} must be a boolean mask, got dtype {mask.dtype}")


def check_finite(value: Any, name: str) -> Any:
    """A finite real number, of either sign (poly-1's epsilon); a traced one unchecked."""
    v = check_real(value, name)
    if is_traced(v):
        return v
    if not math.isfinite(v):
        raise InputError(f"{name}={value!r} must be a finite number")
    return v


# ---- numbers typed as text (the command line, python -m crossent.torch.bench)

_ASCII_INTEGER = re.compile(r"[+-]?[0-9]+")  # "²".isdigit() is True; int() takes "１", "٣"
_ASCII_NUMBER = re.compile(
    r"[+-]?(?:(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|inf(?:inity)?|nan)", re.IGNORECASE)


def ascii_integer(text: str) -> int:
    """``text`` as an int when written in ASCII digits (``" 12"``, ``"-3"``); a
    ``ValueError`` otherwise: ``int()`` alone also takes ``"1_0"`` (10), full-width and
    Arabic-Indic digits, and more than 4300 digits raise its advice about
    ``sys.set_int_max_str_digits``. (``argparse`` names it in its message.)"""
    stripped = str(text).strip()
    if not _ASCII_INTEGER.fullmatch(stripped):
        raise ValueError(f"{_shown(text)} is not a valid integer")
    try:
        return int(stripped)
    except ValueError:  # over sys.get_int_max_str_digits() digits
        raise ValueError(f"{_shown(text)} is not a valid integer (too many digits)") from None


def _shown(text: str) -> str:
    """``text`` quoted for a one-line message, its middle cut beyond 40 characters."""
    text = str(text)
    return repr(text) if len(text) <= 40 else f"{text[:18]!r}...{text[-18:]!r}"


def ascii_number(text: str) -> float:
    """``text`` as a float when written as a number in ASCII (``0.5``, ``-1e3``, ``.5``,
    ``inf``, ``nan``); a ``ValueError`` otherwise (``float()`` also takes ``"0.0_1"``)."""
    stripped = str(text).strip()
    if not _ASCII_NUMBER.fullmatch(stripped):
        raise ValueError(f"{_shown(text)} is not a valid float")
    return float(stripped)
