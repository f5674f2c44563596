"""Array-namespace plumbing shared by the core: one place that knows how to take
whatever the caller passed (NumPy, PyTorch, JAX, array-api-strict, or plain Python
numbers and lists) and hand back arrays of the caller's own library.

Every call goes through the namespace returned by ``array_api_compat.array_namespace``
(the pattern SciPy and scikit-learn use); the one library-specific helper is
:func:`stop_gradient`, which the standard does not have.

Every input passes through :func:`arrays` (or :func:`as_array`), which turns whatever
the caller passed into an array or raises ``InputError`` naming the argument: None, text,
ragged lists, objects and complex numbers are bad input here, not an obscure error later.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

import numpy as np
from array_api_compat import (
    array_namespace,
    device,
    is_array_api_obj,
    is_jax_array,
    is_numpy_array,
    is_torch_array,
)

from .errors import InputError

Array = Any
"""Any array of a library that implements the Python array API standard."""

_P = ParamSpec("_P")
_R = TypeVar("_R")


def silent_infinities(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """Decorator: NumPy's divide-by-zero and overflow warnings off inside ``fn``.

    They mark the documented infinite results (``-log 0``, ``log(p / 0)``, a ratio past the
    float range), which SciPy's ufuncs (``rel_entr``, ``xlogy``, ``entropy``) return
    silently, and a user's ``-W error`` would turn into exceptions. The values are the same
    either way; NaN warnings (``invalid``) stay on. Calls with torch or JAX arrays run
    untouched (they do not warn; ``torch.compile`` cannot trace ``np.errstate``)."""

    @functools.wraps(fn)
    def quiet(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        # torch / JAX arrays cannot warn, and torch.compile cannot trace np.errstate
        if any(is_torch_array(a) or is_jax_array(a) for a in (*args, *kwargs.values())):
            return fn(*args, **kwargs)
        with np.errstate(divide="ignore", over="ignore"):
            return fn(*args, **kwargs)

    return quiet


def as_array(x: Any, name: str = "x") -> Array:
    """Return ``x`` unchanged if it is an array, else as a NumPy array; ``name`` is the
    argument named when ``x`` is not numbers.

    Python floats and lists are taken as NumPy so that ``xe.entropy([0.2, 0.8])``
    works at a prompt. None, strings, ragged or object lists and complex numbers raise
    ``InputError`` (crossent's functions are real-valued: a complex input would otherwise
    be truncated to its real part).
    """
    if x is None:
        raise InputError(f"{name} is None; expected an array of numbers")
    if isinstance(x, np.ma.MaskedArray):
        # NumPy's masked ufuncs would skip the masked entries in some steps and not in
        # others (a softmax renormalised over part of a row): refuse rather than guess
        raise InputError(f"{name} is a NumPy masked array, which crossent does not support "
                         f"(its mask would be ignored or half-applied); fill it first "
                         f"({name}.filled(value)), or pass the mask as where= where the "
                         f"function takes one")
    if not is_array_api_obj(x):
        if isinstance(x, (str, bytes)):
            raise InputError(f"{name}={x!r} is text; expected an array of numbers")
        try:
            x = np.asarray(x)
        except (TypeError, ValueError, RuntimeError) as err:
            # RuntimeError: torch's, for a list holding a tensor that requires grad
            raise InputError(f"{name} is not an array of numbers: {err}") from None
    _check_dtype(x, name)
    return x


def _check_dtype(x: Array, name: str) -> None:
    """Real numbers (floating, integer or boolean) only."""
    xp = array_namespace(x)
    try:
        if xp.isdtype(x.dtype, ("bool", "integral", "real floating")):
            return
    except TypeError:
        # a NumPy array of an extension dtype (ml_dtypes' bfloat16, what np.asarray gives
        # for a JAX bfloat16 array): NumPy's array API has no such dtype to compute in
        raise InputError(f"{name} has dtype {x.dtype}, which NumPy's array API does not "
                         f"support; cast it to float32 first") from None
    is_complex = getattr(x.dtype, "kind", "") == "c" or (
        not isinstance(x.dtype, np.dtype) and xp.isdtype(x.dtype, "complex floating")
    )
    what = "complex" if is_complex else f"dtype {x.dtype}"
    hint = ""
    if getattr(x.dtype, "kind", "") == "O" and any(
            type(v) is int for v in np.asarray(x).reshape(-1)[:1000]):
        # NumPy keeps Python ints past 64 bits as objects (review H91)
        hint = " (a Python int past the 64-bit integer range?)"
    raise InputError(f"{name} holds {what} values; expected real numbers{hint}")


def arrays(
    *values: Any, names: tuple[str, ...], optional: tuple[str, ...] = ()
) -> tuple[Any, list[Array]]:
    """The namespace of the first real array among ``values`` that is not a NumPy array
    (else of the first), and all values in it.

    Lets ``cross_entropy([1, 0], q_torch)`` work: the list joins q's library and device.
    ``names`` names each value in error messages; a None value raises ``InputError``
    unless its name is in ``optional`` (weights), where it stays None.
    """
    checked = [
        None if v is None and n in optional else as_array(v, n)
        for v, n in zip(values, names, strict=True)
    ]
    passed = [c for c, raw in zip(checked, values, strict=True)
              if raw is not None and is_array_api_obj(raw)]
    # NumPy arrays join any other library's (a NumPy logit with a JAX target inside
    # jax.jit must become JAX: the traced target cannot become NumPy)
    first = next((c for c in passed if not is_numpy_array(c)),
                 passed[0] if passed else checked[0])
    xp = array_namespace(first)
    return xp, [None if v is None else like(xp, v, first, name=n)
                for v, n in zip(checked, names, strict=True)]


def promoted_dtype(xp: Any, x: Array, other: Array, given_x: Any, given_other: Any) -> Any:
    """The dtype ``x`` and ``other`` promote to, as their library promotes a loss's input
    with its floating target: float16 logits with a float64 target give float64, bfloat16
    with float32 float32, and a 0-d torch tensor or a weakly typed JAX scalar does not
    widen (``torch.result_type``, ``jnp.result_type`` on the arrays).

    Only arrays the caller passed in ``xp``'s own library promote (``given_x`` and
    ``given_other`` are the arguments as passed): a list, a number or another library's
    array takes the dtype of the one that was (as ``torch.tensor([0.2, 0.8])`` takes
    torch's default and not NumPy's float64), and neither: ``x``'s. ``x``'s dtype unless
    both are floating.
    """
    if not (is_floating(xp, x) and is_floating(xp, other)) or x.dtype == other.dtype:
        return x.dtype
    own_x, own_other = is_native(xp, given_x), is_native(xp, given_other)
    if not own_x:
        return other.dtype if own_other else x.dtype
    if not own_other:
        return x.dtype
    if is_torch_array(x):  # array-api-compat's result_type drops torch's 0-d rule
        import torch

        return torch.result_type(x, other)
    return xp.result_type(x, other)


def is_native(xp: Any, given: Any) -> bool:
    """Whether the argument ``given`` (as passed) is an array of ``xp``'s own library."""
    return is_array_api_obj(given) and array_namespace(given) is xp


def promoted(xp: Any, x: Array, other: Array, given_x: Any, given_other: Any) -> Array:
    """``x`` cast to :func:`promoted_dtype` (unchanged where that is its own)."""
    dtype = promoted_dtype(xp, x, other, given_x, given_other)
    return x if x.dtype == dtype else xp.astype(x, dtype)


def gradient_dtype(xp: Any, x: Array, wide: Array, given_x: Any) -> Any:
    """The dtype a gradient with respect to ``x`` is returned in, as autograd returns it:
    ``x``'s where the caller passed an array of ``xp``'s library, else (a list, another
    library's array) that of ``wide``, ``x`` :func:`promoted` with its target."""
    return x.dtype if is_native(xp, given_x) else wide.dtype


def namespace(x: Array) -> Any:
    """The array-API namespace of ``x`` (NumPy, torch, jax.numpy, array_api_strict...)."""
    return array_namespace(x)


def like(xp: Any, value: Any, ref: Array, *, dtype: Any = None, name: str = "x") -> Array:
    """``value`` as an array of ``ref``'s namespace and device (optionally cast to ``dtype``).

    Used for the secondary arguments (targets, weights): a NumPy weight passed with
    torch logits becomes a torch tensor on the logits' device. Another library's array
    travels through NumPy (:func:`_host_copy`); one that cannot, or whose integers the
    namespace would wrap, or a torch tensor on another device than ``ref``, raises
    ``InputError`` naming ``name``.
    """
    if is_array_api_obj(value) and array_namespace(value) is xp:
        _check_same_device(value, ref, name)
    else:
        narrow = _widened_dtype_name(value)
        host = _host_copy(value, name)
        value = xp.asarray(host, device=device(ref))
        _check_integers_kept(xp, host, value, name)
        if narrow is not None and getattr(xp, narrow, None) is not None:
            # the caller's bfloat16 again where the namespace has it: the loss checks a
            # target's sums with its dtype's tolerance
            value = xp.astype(value, getattr(xp, narrow))
    if dtype is not None and value.dtype != dtype:
        value = xp.astype(value, dtype)
    return value


def _check_same_device(value: Array, ref: Array, name: str) -> None:
    """A torch ``value`` lives on ``ref``'s device: torch refuses to mix devices in one
    operation (its own ``RuntimeError`` would name no argument); moving it silently would
    hide a copy per call. A 0-d CPU tensor is refused too: torch mixes one into a single
    operation, but not once the core has broadcast it."""
    if is_torch_array(value) and is_torch_array(ref) and value.device != ref.device:
        raise InputError(f"{name} is on device {value.device}, but the call computes on "
                         f"{ref.device} (its first torch argument's device); move {name} "
                         f"there first (.to({str(ref.device)!r}))")


def _widened_dtype_name(value: Any) -> str | None:
    """The name of ``value``'s floating dtype if NumPy has none (``"bfloat16"``, a float8):
    :func:`_host_copy` widens such arrays to float32. None for every other dtype."""
    dtype_name = str(getattr(value, "dtype", "")).removeprefix("torch.")
    if "float" not in dtype_name or dtype_name in ("float16", "float32", "float64"):
        return None
    return dtype_name


def _host_copy(value: Array, name: str) -> np.ndarray:
    """Another library's array as a NumPy array any library can take: native byte order,
    NumPy's canonical dtype objects, no extension dtype. A torch tensor that requires grad
    raises ``InputError`` (its gradient could not follow into the other library)."""
    if is_torch_array(value):
        value = _torch_to_host(value, name)
    host = np.asarray(value)
    if not host.dtype.isnative:  # np.load of a '>f8' file: torch and JAX refuse it
        host = host.astype(host.dtype.newbyteorder("="))
    if host.dtype.kind == "V" and "float" in host.dtype.name:
        # ml_dtypes' bfloat16/float8 (a JAX array's): torch and array-api-strict cannot
        # take them; float32 holds each of their values exactly
        return host.astype(np.float32)
    # np.dtype(str) is the canonical dtype object: torch refuses NumPy's ulonglong ('Q'),
    # which equals uint64 ('L') but is another type (Python ints past int64 give it)
    return host.view(np.dtype(host.dtype.str))


def _torch_to_host(value: Array, name: str) -> Array:
    """A torch tensor ready for ``np.asarray``: on the CPU, bfloat16 widened to float32
    (exactly; NumPy has no bfloat16). One that requires grad or has no values (meta)
    raises ``InputError``."""
    if value.requires_grad:
        raise InputError(f"{name} is a torch tensor that requires grad, passed with arrays "
                         f"of another library: its gradient cannot follow there; pass "
                         f"{name}.detach(), or torch tensors throughout")
    if value.device.type == "meta":
        raise InputError(f"{name} is a meta tensor (no values), passed with arrays of "
                         f"another library; pass torch tensors throughout")
    import torch

    if value.dtype == torch.bfloat16 or (value.is_floating_point() and value.element_size() < 2):
        value = value.float()  # bfloat16, float8: NumPy has neither
    return value.cpu()


def _check_integers_kept(xp: Any, host: np.ndarray, value: Array, name: str) -> None:
    """``value`` (``host`` converted by ``xp``) holds ``host``'s integers: JAX without x64
    makes an int64 array int32, wrapping ``2**32 + 1`` onto 1 (class ids, ignore_index)."""
    if host.dtype.kind not in "iu" or host.size == 0 or not is_integer(xp, value):
        return
    info = xp.iinfo(value.dtype)
    wide = np.iinfo(host.dtype)
    if wide.min >= info.min and wide.max <= info.max:
        return
    low, high = int(host.min()), int(host.max())
    if low < info.min or high > info.max:
        bad = low if low < info.min else high
        raise InputError(f"{name} holds {bad}, outside [{info.min}, {info.max}], the range of "
                         f"{value.dtype} that {xp.__name__} computes in here (JAX without "
                         f"x64 narrows 64-bit integers to 32 bits, wrapping them); enable "
                         f"jax_enable_x64 or pass smaller values")


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


def axis_index(axis: Any, ndim: int, *, name: str = "axis") -> int:
    """``axis``, one dimension of an ``ndim``-d array, as a Python int with the caller's
    sign (messages quote it): torch's reductions refuse a NumPy integer."""
    if not isinstance(axis, (int, np.integer)) or isinstance(axis, bool):
        raise InputError(f"{name}={axis!r} must be an integer")
    if not -ndim <= axis < ndim:
        raise InputError(f"{name}={axis} is out of range for an array with {ndim} dimensions")
    return int(axis)


def normalize_axis(axis: Any, ndim: int, *, name: str = "axis") -> int:
    """:func:`axis_index` counted from 0 (``-1`` is ``ndim - 1``)."""
    return axis_index(axis, ndim, name=name) % ndim


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

    Arrays without concrete values (traced by ``jax.jit`` or ``torch.func.vmap``, torch
    meta and fake tensors) have nothing to check: the library's own error is replaced by
    an ``InputError`` that says how to call crossent there (every function that checks
    values has ``validate``).
    """
    if is_torch_array(mask) and mask.device.type == "meta":
        raise _no_values_error()
    try:
        return bool(xp.any(mask))
    except (TypeError, RuntimeError) as err:
        # jax.jit: TypeError; torch.func.vmap: RuntimeError ("data-dependent control
        # flow"); FakeTensorMode: DataDependentOutputException, a RuntimeError
        if isinstance(err, RuntimeError) and not (
                "data-dependent" in str(err)
                or type(err).__name__ == "DataDependentOutputException"):
            raise
        raise _no_values_error() from err


def _no_values_error() -> InputError:
    return InputError(
        "validate=True checks values, which needs concrete arrays; inside jax.jit or "
        "another tracing transform, or with torch meta or fake tensors, pass validate=False"
    )


def stop_gradient(x: Array) -> Array:
    """``x`` with the same value and no gradient (torch ``detach``, JAX ``stop_gradient``).

    Libraries without autograd (NumPy, array-api-strict) get ``x`` back. Used where a
    loss follows PyTorch's hand-written gradient rather than the derivative of its value
    (binary cross-entropy at probabilities 0 and 1).
    """
    if is_torch_array(x):
        return x.detach()
    if is_jax_array(x):
        import jax

        return jax.lax.stop_gradient(x)
    return x


def wide_integer(xp: Any, ref: Array) -> Any:
    """The widest integer dtype the namespace computes in (int64; int32 for JAX without x64).

    Class indices are compared in it, so a uint8 or int16 target holds every class index
    and ``ignore_index`` (a narrow dtype would wrap: -100 is 156 in uint8).
    """
    return xp.__array_namespace_info__().default_dtypes(device=device(ref))["integral"]


def past_integer_range(xp: Any, target: Array, info: Any) -> bool:
    """Whether an unsigned ``target`` holds a value above ``info.max`` (one host read;
    False at once for a dtype that cannot). torch has no ``>`` for uint64: there, the
    int64 view's sign bit says it, as ``info`` is int64's."""
    if xp.iinfo(target.dtype).max <= info.max or numel(target) == 0:
        return False
    if is_torch_array(target):
        import torch

        if target.dtype == torch.uint64 and info.max == 2**63 - 1:
            return bool((target.view(torch.int64) < 0).any())
    return bool(xp.any(target > info.max))

