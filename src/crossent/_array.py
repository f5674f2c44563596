"""Array-namespace plumbing shared by the core: one place that knows how to take
whatever the caller passed (NumPy, PyTorch, JAX, array-api-strict, or plain Python
numbers and lists) and hand back arrays of the caller's own library.

Nothing here is library-specific: every call goes through the namespace returned by
``array_api_compat.array_namespace`` (the pattern SciPy and scikit-learn use).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from array_api_compat import array_namespace, device, is_array_api_obj

Array = Any
"""Any array of a library that implements the Python array API standard."""


def as_array(x: Any) -> Array:
    """Return ``x`` unchanged if it is an array, else as a NumPy array.

    Python floats and lists are taken as NumPy so that ``xe.entropy([0.2, 0.8])``
    works at a prompt.
    """
    if is_array_api_obj(x):
        return x
    return np.asarray(x)


def arrays(*values: Any) -> tuple[Any, list[Array]]:
    """The namespace of the first real array among ``values``, and all values in it.

    Lets ``cross_entropy([1, 0], q_torch)`` work: the list joins q's library and device.
    ``None`` entries stay None.
    """
    first = next((v for v in values if is_array_api_obj(v)), None)
    ref = first if first is not None else as_array(next(v for v in values if v is not None))
    xp = array_namespace(ref)
    return xp, [None if v is None else like(xp, v, ref) for v in values]


def namespace(x: Array) -> Any:
    """The array-API namespace of ``x`` (NumPy, torch, jax.numpy, array_api_strict...)."""
    return array_namespace(x)


def like(xp: Any, value: Any, ref: Array, *, dtype: Any = None) -> Array:
    """``value`` as an array of ``ref``'s namespace and device (optionally cast to ``dtype``).

    Used for the secondary arguments (targets, weights): a NumPy weight passed with
    torch logits becomes a torch tensor on the logits' device.
    """
    if not is_array_api_obj(value) or array_namespace(value) is not xp:
        if is_array_api_obj(value):
            value = np.asarray(value)
        value = xp.asarray(value, device=device(ref))
    if dtype is not None and value.dtype != dtype:
        value = xp.astype(value, dtype)
    return value


def is_floating(xp: Any, x: Array) -> bool:
    return bool(xp.isdtype(x.dtype, "real floating"))


def is_integer(xp: Any, x: Array) -> bool:
    return bool(xp.isdtype(x.dtype, "integral"))


def default_float(xp: Any, ref: Array) -> Any:
    """The namespace's default real floating dtype (float64 for NumPy, float32 for torch)."""
    return xp.__array_namespace_info__().default_dtypes(device=device(ref))["real floating"]


def compute_dtype(xp: Any, x: Array) -> Any:
    """The dtype the core computes in for input ``x``.

    Floating inputs narrower than 32 bits (float16, bfloat16) are computed in float32,
    because their 8-to-11-bit mantissas quantise a loss visibly (PITFALLS 6); integer and
    boolean inputs are computed in the namespace's default floating dtype.
    """
    if is_floating(xp, x):
        return xp.float32 if xp.finfo(x.dtype).bits < 32 else x.dtype
    return default_float(xp, x)


def to_float(xp: Any, x: Array) -> Array:
    """``x`` cast to its compute dtype (see :func:`compute_dtype`)."""
    dtype = compute_dtype(xp, x)
    return x if x.dtype == dtype else xp.astype(x, dtype)


def restore_dtype(xp: Any, y: Array, dtype: Any) -> Array:
    """``y`` cast back to the caller's floating ``dtype`` (a float16 input gets float16 back).

    Integer inputs have no floating dtype to return to: ``y`` keeps its compute dtype.
    """
    if y.dtype == dtype or not xp.isdtype(dtype, "real floating"):
        return y
    return xp.astype(y, dtype)


def normalize_axis(axis: int, ndim: int, *, name: str = "axis") -> int:
    if not -ndim <= axis < ndim:
        raise ValueError(f"{name}={axis} is out of range for an array with {ndim} dimensions")
    return axis % ndim


def move_axis_last(xp: Any, x: Array, axis: int) -> Array:
    """Permute dimensions so that ``axis`` (already normalised) becomes the last one."""
    if axis == x.ndim - 1:
        return x
    order = [d for d in range(x.ndim) if d != axis] + [axis]
    return xp.permute_dims(x, tuple(order))


def move_last_to_axis(xp: Any, x: Array, axis: int) -> Array:
    """Inverse of :func:`move_axis_last`."""
    if axis == x.ndim - 1:
        return x
    order = list(range(x.ndim - 1))
    order.insert(axis, x.ndim - 1)
    return xp.permute_dims(x, tuple(order))


def log_base_divisor(base: float | None) -> float | None:
    """``ln(base)``, the number a natural-log result is divided by; None for base e."""
    if base is None or base == math.e:
        return None
    return math.log(base)


def numel(x: Array) -> int:
    """Number of elements (``x.size`` is a method on torch tensors, an int elsewhere)."""
    return math.prod(x.shape)


def any_true(xp: Any, mask: Array) -> bool:
    """Python bool of ``any(mask)``; a device sync on accelerators (skip with validate=False).

    Traced values (``jax.jit``) have no concrete value to check: the library's own
    TypeError is replaced by one that says how to call crossent there.
    """
    try:
        return bool(xp.any(mask))
    except TypeError as err:
        raise TypeError(
            "crossent's value checks need concrete arrays; inside jax.jit or another tracing "
            "transform pass validate=False"
        ) from err
