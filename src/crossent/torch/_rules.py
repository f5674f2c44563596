"""The rules every ``crossent.torch`` kernel follows, written once: the row-block kernel
(:mod:`._rowblock`), the entry points (:mod:`._cross_entropy`, :mod:`._linear`), the
composable path (:mod:`._composite`), the Triton kernels (:mod:`._triton`) and the
vocab-parallel functions (:mod:`.distributed`) all take them from here.

* dtypes: the compute dtype (float32; float64 stays), the loss dtype (torch's, autocast
  included), the dtype of the linear head's matmuls;
* sizing: rows per kernel block (:func:`block_rows`), rows per linear-head chunk
  (:func:`default_chunk`, :func:`chunk_rows`);
* options: their checks (the core's messages), :class:`Options`, ``ignore_index``,
  ``num_items``, class-index targets;
* denominators: ``"mean"``'s (torch's, or ``num_items``), per-row backward scales
  (:class:`Rows`), the reduction of row losses;
* backward: the gradient computed in forward is stored, consumed by the first backward
  (backward twice raises, float64 excepted), scaled by ``grad_output``; double backward
  recomputes it with differentiable torch ops from the saved, unmodified inputs.

Imports nothing of ``crossent.torch`` (no import circles: everything else imports it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import numbers
import operator
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.autograd.forward_ad as fwAD

from .. import _checks
from .._array import past_integer_range
from ..errors import InputError, UnsupportedError

# ---- dtypes


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64 (gradcheck); everything else is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


LOW_PRECISION = (torch.float16, torch.bfloat16)


def autocast_enabled(device_type: str) -> bool:
    """``torch.is_autocast_enabled(device_type)``, False for device types autocast does
    not know (``"meta"``: torch raises there instead of answering)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:
        return False


def records_graph() -> bool:
    """Autograd records the ops run now: grad mode on and not under
    ``torch.inference_mode()`` (where ``enable_grad()`` inside still records nothing)."""
    return torch.is_grad_enabled() and not torch.is_inference_mode_enabled()


def fake_values(*tensors) -> bool:
    """Values cannot be read: a ``FakeTensorMode`` is active (shape propagation, memory
    estimation) or one of ``tensors`` is a fake tensor. Such calls take torch's kernel or
    the composable path (plain torch operations, no host read; ``_backends``), which
    fake tensors propagate: torch's shapes, checks that read no values, autograd as
    eager. ``make_fx`` tracing with real tensors counts too: a value read there would
    fail (or be baked into the graph)."""
    if torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None:
        return True
    if torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.PROXY) is not None:
        return True
    for t in tensors:
        if isinstance(t, torch.Tensor) and not _plainly_real(t):
            from torch._subclasses.fake_tensor import is_fake

            if is_fake(t):
                return True
    return False


def _plainly_real(t: torch.Tensor) -> bool:
    """No fake tensor can hide in ``t`` (the common case, decided without ``is_fake``'s
    microseconds): a class without its own dispatch, not a functorch or functional
    wrapper."""
    return (type(t).__torch_dispatch__ is torch.Tensor.__torch_dispatch__
            and not torch._C._functorch.is_functorch_wrapped_tensor(t)
            and not torch._is_functional_tensor(t))


def within_fake_mode(fake: bool, *tensors) -> contextlib.AbstractContextManager:
    """With ``fake`` (:func:`fake_values`), the fake tensors' own ``FakeTensorMode`` when
    they are used outside it (after the ``with`` block that made them), else a null
    context: torch's operations re-enter that mode, but crossent's Python scalars
    (``torch.where(mask, x, 0.0)``) would become real tensors next to fake ones."""
    if not fake or (torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE)
                    is not None):
        return contextlib.nullcontext()
    from torch._guards import detect_fake_mode

    mode = detect_fake_mode([t for t in tensors if isinstance(t, torch.Tensor)])
    return contextlib.nullcontext() if mode is None else mode


def autocast_dtype(t: torch.Tensor, device_type: str) -> torch.dtype:
    """The dtype a cross-entropy argument has after autocast's float32 policy (torch lists
    cross_entropy among the ops autocast runs in float32: float16/bfloat16 become
    float32)."""
    if t.dtype in LOW_PRECISION and autocast_enabled(device_type):
        return torch.float32
    return t.dtype


def autocast_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None):
    """``(x, w, b)`` as ``torch.autocast`` hands them to ``linear``: floating tensors cast
    to the autocast dtype (float64 stays), differentiably; unchanged without autocast."""
    device_type = x.device.type
    if not autocast_enabled(device_type):
        return x, w, b
    dtype = torch.get_autocast_dtype(device_type)

    def cast(t):
        return None if t is None else t.to(linear_cast_dtype(t, dtype))

    return cast(x), cast(w), cast(b)


def linear_cast_dtype(t: torch.Tensor, autocast: torch.dtype | None) -> torch.dtype:
    """The dtype ``torch.autocast`` (of dtype ``autocast``; None: off) gives ``t`` as an
    input of ``linear``: floating tensors other than float64 take the autocast dtype."""
    if autocast is None or not t.is_floating_point() or t.dtype == torch.float64:
        return t.dtype
    return autocast


def choose_loss_dtype(loss_dtype, logits: torch.Tensor, target: torch.Tensor | None = None,
                      weight: torch.Tensor | None = None) -> torch.dtype:
    """``loss_dtype`` if given, else torch's: the logits' dtype, float32 under autocast,
    promoted with a probability ``target``'s and then its class ``weight``'s (torch
    multiplies the log-probabilities by both: bfloat16 logits with a float32 target give
    a float32 loss, float32 with a float64 weight a float64 one)."""
    if loss_dtype is None:
        return promote_with_target(autocast_dtype(logits, logits.device.type), target,
                                   weight)
    if not (isinstance(loss_dtype, torch.dtype) and loss_dtype.is_floating_point
            and not loss_dtype.is_complex):
        raise InputError(f"loss_dtype={loss_dtype!r} must be a floating torch.dtype "
                         f"(e.g. torch.float32) or None")
    return loss_dtype


def promote_with_target(dtype: torch.dtype, target: torch.Tensor | None,
                        weight: torch.Tensor | None = None) -> torch.dtype:
    """``dtype`` promoted with a probability ``target``'s dtype and a floating class
    ``weight``'s (after autocast), as torch multiplies the log-probabilities by both;
    class indices leave it as it is (their weight must have the input's dtype)."""
    if target is not None and target.is_floating_point():
        dtype = torch.promote_types(dtype, autocast_dtype(target, target.device.type))
        if isinstance(weight, torch.Tensor) and weight.is_floating_point():
            dtype = torch.promote_types(dtype, autocast_dtype(weight, weight.device.type))
    return dtype


def matmul_dtype(x: torch.Tensor, w: torch.Tensor) -> torch.dtype:
    """The dtype the chunk matmuls run in: bfloat16 stays bfloat16 (and float16 on
    accelerators), as in the unfused ``x @ W.T`` (the hardware accumulates in float32 and
    rounds the logits once, about twice as fast as float32 on an AVX512-BF16 CPU);
    everything else runs in the compute dtype (float32, or float64). float16 on CPU
    (no fast float16 matmul there) multiplies in float32 and the heads then round the
    logits to float16 (:func:`._chunked_head.head_pass`), as torch's ``F.linear``."""
    low = x.dtype == w.dtype and (
        x.dtype == torch.bfloat16 or (x.dtype == torch.float16 and x.device.type != "cpu"))
    return x.dtype if low else compute_dtype(x.dtype)


def rounds_logits(x_dtype: torch.dtype, mdtype: torch.dtype) -> bool:
    """Whether a head multiplying ``x_dtype`` input in ``mdtype`` rounds its logits to
    ``x_dtype`` afterwards: float16 multiplied in float32 (CPU, :func:`matmul_dtype`), so
    that the logits are torch's ``F.linear``'s (its rounding, a logit past 65504 inf)."""
    return x_dtype == torch.float16 and mdtype != x_dtype


# ---- sizing: row blocks of the kernels, row chunks of the linear heads


# float32 bytes of logits per block. CPU: measured best at 8 MiB on a 2-core EPYC (2 MiB
# L2 per core, 32 MiB L3): smaller blocks pay more Python overhead per row, larger ones
# fall out of cache. On accelerators the block bounds the float32 work buffers of
# low-precision input (a block's worth, next to the gradient) while keeping kernel
# launches few: 32 MiB is 256 rows at C=32000, 16 blocks for N=4096 (not yet measured on
# a GPU).
_BLOCK_BYTES = 8 << 20
_ACCELERATOR_BLOCK_BYTES = 32 << 20


def block_rows(num_classes: int, device: torch.device | str = "cpu") -> int:
    """Rows per block: about :data:`_BLOCK_BYTES` of float32 logits on CPU
    (:data:`_ACCELERATOR_BLOCK_BYTES` elsewhere), at least 16 rows (Python overhead)."""
    budget = _BLOCK_BYTES if torch.device(device).type == "cpu" else _ACCELERATOR_BLOCK_BYTES
    return max(16, budget // (4 * max(num_classes, 1)))


CHUNK_BYTES = 16 << 20  # smallest logits chunk of a linear head


def chunk_rows(budget_bytes: int, num_classes: int, itemsize: int) -> int:
    """Rows of ``num_classes`` logits of ``itemsize`` bytes that fit in ``budget_bytes``,
    rounded down to a multiple of 32 rows, at least 32 (matmul-friendly row counts)."""
    return max(32, budget_bytes // (itemsize * max(num_classes, 1)) // 32 * 32)


def default_chunk(num_classes: int, features: int, itemsize: int) -> int:
    """Rows per linear chunk: logits of a quarter of the float32 dW's bytes (``C D``
    bytes), at least 16 MiB, in a multiple of 32 rows (at least 32).

    Why: the extra memory stays a fixed fraction of a gradient that exists anyway, and
    the chunk matmuls get enough rows to run near full speed: with fewer rows each matmul
    re-reads (and re-packs) all of ``W``. Measured on a 2-core CPU at D=512, C=32000:
    128 float32 rows ran at 0.95-1.03x the unfused time over three runs, 64 rows at
    1.15-1.25x (C=128256: 0.70-0.97x and 0.84x); bfloat16 needs 256 rows (0.87-0.94x;
    128 rows: 1.2x)."""
    return chunk_rows(max(CHUNK_BYTES, num_classes * features), num_classes, itemsize)


# ---- options and their checks


@dataclass
class Options:
    weight: torch.Tensor | None  # (C,) float32
    ignore_index: int
    label_smoothing: float
    z_loss: float
    softcap: float | None
    reduction: str
    # the "mean" denominator given by the caller (``num_items=``), or None for torch's;
    # with one, ``reduction`` is "mean" (sum / num_items) whether the caller said so or "sum"
    num_items: int | float | None = None
    # the caller's class weight where torch's backward saves that very tensor, for the
    # in-place check (:func:`weight_torch_saves`; ``weight`` above is a float32 copy)
    saved_weight: torch.Tensor | None = None


@dataclass
class Rows:
    """Per-row float32 quantities, computed once for all M rows (O(M) work)."""

    index: torch.Tensor | None  # (M,) int64 target, ignored rows set to 0; None for probabilities
    valid: torch.Tensor | None  # (M,) bool, index targets only
    scale: torch.Tensor  # (M,) d(reduced loss)/d(row loss): 1/denominator, 1, or 0 when ignored
    target_mass: torch.Tensor | None  # (M,) (1 - eps) * w[y], index targets only
    denominator: torch.Tensor  # what "mean" divides the summed loss by
    # torch's own "mean" with label smoothing: a zero denominator gives NaN (reduce_rows)
    nan_at_zero: bool = False


def idle_rows_nan(weight: torch.Tensor | None, label_smoothing: float) -> bool:
    """Whether torch's gradient of a row it does not count (an ignored row, or a row whose
    backward scale is 0) is NaN throughout: with label smoothing and a class weight that is
    not finite. torch's smoothing backward forms the row's 0 upstream times ``w_c``,
    ``0 x inf = NaN``, and its log_softmax backward spreads it over the row. The kernels
    then write NaN rows and the linear heads keep ignored rows (``dx`` NaN, ``dW`` NaN, as
    torch's). One host read of the (C,) weight, only with both options."""
    return (bool(label_smoothing) and weight is not None
            and not bool(weight.isfinite().all()))


def check_options(reduction: str, label_smoothing: float, z_loss: float, softcap) -> None:
    """The core's argument checks, so both paths reject the same values with one message."""
    _checks.check_reduction(reduction)
    _checks.check_fraction(label_smoothing, "label_smoothing")
    _checks.check_nonnegative(z_loss, "z_loss")
    _checks.check_softcap(softcap)


def check_softcap_dtype(softcap, dtype: torch.dtype) -> None:
    """``softcap`` (already checked > 0 and finite) is a normal number of ``dtype``'s
    compute dtype, where ``c tanh(z / c)`` runs (:func:`crossent._checks.check_softcap_fits`)."""
    cdtype = compute_dtype(dtype)
    _checks.check_softcap_fits(softcap, torch.finfo(cdtype), cdtype)


def check_num_items(num_items, reduction: str) -> int | float | None:
    """``num_items`` (a positive number: int, float or 0-d tensor) as a float, or None; an
    integer count under ``2**64`` as an int (``sum / n`` then rounds ``n`` to the loss's
    dtype once, as torch's ``sum / n`` does; ``float(n)`` first would round twice:
    :func:`count_tensor`).

    It replaces the ``"mean"`` denominator: the loss is ``sum / num_items`` (for
    ``"mean"`` and ``"sum"`` alike), so gradient-accumulation micro-batches divided by the
    whole batch's count add up to the full batch's mean. A tensor costs one host
    synchronisation (the check); it is a constant (one that requires grad raises)."""
    if num_items is None:
        return None
    if reduction == "none":
        raise InputError(f"num_items={num_items!r} with reduction='none': it divides the "
                         f"summed loss; use reduction='mean' or 'sum' (or leave it None)")
    if isinstance(num_items, torch.Tensor):
        if num_items.dim() != 0 or num_items.dtype == torch.bool or num_items.is_complex():
            raise InputError(f"num_items must be a positive number or a 0-d real tensor; got "
                             f"a {num_items.dtype} tensor of shape {tuple(num_items.shape)}")
        if num_items.requires_grad:
            raise UnsupportedError("num_items that requires grad: crossent treats it as a "
                                   "constant count; detach it")
        if torch._C._functorch.is_batchedtensor(num_items):  # no one value to read
            raise UnsupportedError(
                "num_items as a tensor that torch.func.vmap batches: crossent reads it as "
                "one constant count; divide reduction='sum' by it yourself inside the "
                "vmapped function (or pass a Python number)")
        if differentiated(num_items):
            # a count a transform differentiates (jvp, grad) or a dual: its tangent would
            # be dropped silently, where torch's sum / n carries -sum / n^2
            raise UnsupportedError(
                "num_items that a torch.func transform or forward-mode AD differentiates: "
                "crossent treats it as a constant count; compute it outside the transform "
                "(or divide reduction='sum' by it yourself)")
        if num_items.device.type == "meta":
            raise InputError("num_items is a meta tensor: it has no value to divide by")
        try:
            number = num_items.detach().item()  # an int for an integer tensor: exact
        except RuntimeError as error:  # a transform's wrapper around a batched count
            raise UnsupportedError(f"num_items: its value cannot be read here ({error}); "
                                   f"pass a Python number") from error
    elif isinstance(num_items, numbers.Real) and not isinstance(num_items, bool):
        number = num_items  # type: ignore[assignment]  # a Real: int, float, NumPy, Fraction
    else:
        raise InputError(f"num_items={num_items!r} must be a positive number (int, float or "
                         f"0-d tensor) or None")
    value = _checks.as_float(number)  # an int beyond float's range: inf, refused
    if not (math.isfinite(value) and value > 0):
        raise InputError(f"num_items={value!r} must be a finite number > 0 (the count the "
                         f"summed loss is divided by)")
    return count_value(number)


def count_value(count) -> int | float:
    """A checked count (a real number > 0) as crossent divides by it: an integer under
    ``2**64`` as an int (:func:`count_tensor` rounds it to the loss's dtype once, as
    torch's ``sum / n`` does), anything else as its float."""
    if isinstance(count, numbers.Integral) and count < 1 << 64:
        return operator.index(count)
    return _checks.as_float(count)


def differentiated(t: torch.Tensor, *, gradient: bool = True) -> bool:
    """Whether ``t`` carries a gradient (with ``gradient``) or a forward-mode tangent at
    any ``torch.func`` level (a count made inside a transform from constants is wrapped
    but carries none). Known gap: a tangent of an outer ``jvp`` seen through an inner
    ``grad`` is not visible to these checks."""
    functorch = torch._C._functorch
    while True:
        if (gradient and t.requires_grad) or fwAD.unpack_dual(t).tangent is not None:
            return True
        if not functorch.is_functorch_wrapped_tensor(t):
            return False
        t = functorch.get_unwrapped(t)


def check_ignore_index(ignore_index) -> int:
    """An integer (Python int, NumPy integer, integer 0-d tensor). torch raises
    ``TypeError`` for a float, even 3.0; crossent raises :class:`InputError`, never
    truncates (3.7 is not 3)."""
    if _checks.is_bool(ignore_index):  # tensor(True) too: operator.index takes it as 1
        raise InputError(f"ignore_index={ignore_index!r} must be an integer, not a bool")
    refuse_vmapped(ignore_index, "ignore_index")  # no single value to compare targets with
    try:
        value = _checks.integer_value(ignore_index)
    except TypeError:
        raise InputError(f"ignore_index={ignore_index!r} must be an integer (torch raises "
                         f"TypeError for a float, even an integral one)") from None
    if not -(1 << 63) <= value < (1 << 63):  # torch's class ids are int64
        raise InputError(f"ignore_index={value} is outside int64, the class ids' type")
    return value


def check_flag(value, name: str) -> bool:
    """``value`` if it is ``True`` or ``False``; an :class:`InputError` naming ``name``
    otherwise (``bool("False")`` is True; NumPy bools are refused as under
    ``torch.compile``, which hands them over as arrays)."""
    if not isinstance(value, bool):
        raise InputError(f"{name}={value!r} must be True or False")
    return value


def legacy_flag(value, name: str) -> bool | None:
    """The deprecated ``size_average``/``reduce`` as torch reads them
    (``torch.nn._reduction.legacy_get_string``): ``None``, or the value's truth, so ``0``,
    ``-0.0``, ``np.False_`` and ``tensor(False)`` are False; a value with no single truth
    (a tensor of several entries) raises an :class:`InputError` naming ``name``."""
    if value is None:
        return None
    try:
        return bool(value)
    except (TypeError, ValueError, RuntimeError) as error:
        raise InputError(f"{name}={value!r} has no single truth value: {error}") from error


def vmapped(value) -> bool:
    """``value`` is a tensor that ``torch.func.vmap`` batches at some level (under
    ``grad``/``jacrev`` too, whose wrappers hide the batching): it holds one value per
    vmapped call, so no single integer option can be read from it."""
    functorch = torch._C._functorch
    while isinstance(value, torch.Tensor):
        if functorch.is_batchedtensor(value):
            return True
        if not functorch.is_functorch_wrapped_tensor(value):
            return False
        value = functorch.get_unwrapped(value)
    return False


def refuse_vmapped(value, name: str) -> None:
    """An :class:`UnsupportedError` naming ``name`` where ``value`` is :func:`vmapped`: an
    integer option holds one value per call there, and crossent reads one."""
    if vmapped(value):
        raise UnsupportedError(f"{name} as a tensor that torch.func.vmap batches: pass a "
                               f"Python int (the same for every vmapped call)")


def positive_int(value, name: str) -> int:
    refuse_vmapped(value, name)
    try:
        n = None if _checks.is_bool(value) else _checks.integer_value(value)
    except TypeError:
        n = None
    if n is None or n < 1:
        raise InputError(f"{name}={value!r} must be an integer >= 1 (or None)")
    return n


def check_same_device(t: torch.Tensor, name: str,
                      like: torch.Tensor | torch.device) -> None:
    """``t`` (named ``name``) is on ``like``'s device (``like``: the input or its device),
    as torch requires of every tensor argument (it raises a device mismatch); crossent
    never moves one silently."""
    device = like if isinstance(like, torch.device) else like.device
    if t.device != device:
        raise InputError(f"{name} is on {t.device}, the input on {device}: every tensor "
                         f"argument must be on the input's device (torch raises too); move "
                         f"it with .to({str(device)!r})")


def make_options(weight, num_classes, like, ignore_index, reduction, label_smoothing, z_loss,
             softcap, input_dtype=None, num_items=None, probability=False) -> Options:
    """Checked options; ``opts.weight`` is a detached copy in the compute dtype (the
    fused kernels' constant). ``input_dtype``: the dtype torch would compare ``weight``
    with (the logits' dtype, float32 for low-precision logits under autocast), for
    class-index targets; with ``probability`` targets torch multiplies and promotes, so
    any floating weight is taken (the loss dtype: :func:`choose_loss_dtype`). With
    ``num_items`` the reduction is ``"mean"`` over that count (see
    :func:`check_num_items`)."""
    check_options(reduction, label_smoothing, z_loss, softcap)
    check_softcap_dtype(softcap, like.dtype)
    count = check_num_items(num_items, reduction)
    ignore = -100 if ignore_index is None else check_ignore_index(ignore_index)
    if weight is not None:
        if not isinstance(weight, torch.Tensor):
            raise InputError(f"weight must be a tensor of {num_classes} class weights, got "
                             f"{type(weight).__name__}")
        if tuple(weight.shape) != (num_classes,):
            raise InputError(
                f"weight has shape {tuple(weight.shape)}; expected ({num_classes},), "
                f"one weight per class"
            )
        check_same_device(weight, "weight", like)
        want = like.dtype if input_dtype is None else input_dtype
        check_weight_dtype(weight, probability, (want,),
                           autocast_dtype(weight, like.device.type))
    saved = weight_torch_saves(weight, like.device.type)
    if weight is not None:
        weight = weight.detach().to(device=like.device, dtype=compute_dtype(like.dtype))
    return Options(
        weight, ignore, float(label_smoothing),
        float(z_loss), None if softcap is None else float(softcap),
        reduction if count is None else "mean", count, saved,
    )


def check_weight_dtype(weight: torch.Tensor, probability: bool,
                       allowed: tuple[torch.dtype, ...], seen: torch.dtype | None = None) -> None:
    """A class ``weight``'s dtype as torch takes it: with class-index targets one of
    ``allowed`` (the input's; ``seen`` is the weight's dtype after autocast), with
    ``probability`` targets any real floating dtype (torch multiplies and promotes: the
    loss dtype is :func:`choose_loss_dtype`'s)."""
    if probability:
        if not weight.is_floating_point() or weight.is_complex():
            raise InputError(f"weight has dtype {weight.dtype}; class weights must be real "
                             f"floating point")
    elif (weight.dtype if seen is None else seen) not in allowed:
        raise InputError(
            f"weight has dtype {weight.dtype}; expected the input's {allowed[0]} (as "
            f"torch.nn.functional.cross_entropy with class-index targets, which raises too)"
        )


def check_index_dtype(target: torch.Tensor) -> None:
    """Raise for a target dtype that holds neither class indices nor probabilities, and
    for uint64 ids of ``2**63`` or more (int64 would wrap them to negative ids, one of
    them ``ignore_index``; a host read, for uint64 targets only)."""
    if target.dtype in (torch.bool, torch.complex64, torch.complex128):
        raise InputError(f"target must hold class indices or probabilities, got {target.dtype}")
    if (target.dtype == torch.uint64 and target.device.type != "meta"
            and past_integer_range(torch, target, torch.iinfo(torch.int64))):
        raise InputError("target holds uint64 class ids of 2**63 or more, past int64 (torch "
                         "refuses uint64 targets): no vocabulary has that many classes")


def check_index_target(target: torch.Tensor, num_classes: int, ignore_index: int):
    """``(target as int64, target != ignore_index)``; raises for a non-index dtype or a
    class index outside ``[0, num_classes)`` that is not ``ignore_index``."""
    check_index_dtype(target)
    target = target.long()
    valid = target != ignore_index
    bad = valid & ((target < 0) | (target >= num_classes))
    if bool(bad.any()):  # a device sync, as torch's own bounds check
        _raise_bad_index(target, bad, num_classes, ignore_index)
    return target, valid


def _raise_bad_index(target: torch.Tensor, bad: torch.Tensor, num_classes: int,
                     ignore_index: int) -> None:
    value = int(target[bad][0])
    raise IndexError(
        f"target holds class index {value}, outside [0, {num_classes}) and not "
        f"ignore_index={ignore_index}"
    )


def start_index_check(target: torch.Tensor, num_classes: int,
                      ignore_index: int) -> Callable[[], None]:
    """:func:`check_index_target`'s bounds check with its host read deferred: the check is
    queued on the device now; the returned ``finish()`` raises the same ``IndexError``.

    Kernels launched between the two calls are queued before the host waits. On CUDA
    the flag is copied behind the check into pinned host memory and ``finish()`` waits
    for that copy only (an event), so the GPU does not idle while the host prepares and
    launches them (a check read first would leave it idle for that whole time). Only for
    kernels that read the targets safely (an out-of-range row: NaN, no stray access) and
    leave their inputs intact: the work done before the error is discarded."""
    check_index_dtype(target)
    index = target.long()
    bad = (index != ignore_index) & ((index < 0) | (index >= num_classes))
    flag = bad.any()
    event = None
    if flag.device.type == "cuda":
        host = torch.empty((), dtype=torch.bool, pin_memory=True)
        host.copy_(flag, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        flag = host

    def finish() -> None:
        if event is not None:
            event.synchronize()
        if bool(flag):
            _raise_bad_index(index, bad, num_classes, ignore_index)

    return finish


# ---- denominators and reductions


def prepare_rows(target: torch.Tensor, num_rows: int, num_classes: int, opts: Options,
                 dtype: torch.dtype = torch.float32) -> Rows:
    """Validate ``target`` ((M,) indices or (M, C) probabilities) and build :class:`Rows`."""
    device = target.device
    given = (None if opts.num_items is None
             else count_tensor(opts.num_items, device, dtype))
    if target.is_floating_point():
        denominator = (torch.tensor(float(num_rows), device=device, dtype=dtype)
                       if given is None else given)
        scale = torch.full((num_rows,), 1.0, device=device, dtype=dtype)
        if opts.reduction == "mean":
            scale /= denominator
        return Rows(None, None, scale, None, denominator)
    target, valid = check_index_target(target, num_classes, opts.ignore_index)
    index = torch.where(valid, target, 0)
    validf = valid.to(dtype)
    # where, not a product: an ignored row (index 0) must not read an inf/NaN w[0]
    w_y = validf if opts.weight is None else torch.where(valid, opts.weight[index], 0.0)
    denominator = w_y.sum() if given is None else given
    # ignored rows: 0, even when every row is ignored (the "mean" loss is then 0/0 = NaN,
    # its gradient 0, as in torch)
    scale = torch.where(valid, validf / denominator, 0.0) if opts.reduction == "mean" else validf
    return Rows(index, valid, scale, (1.0 - opts.label_smoothing) * w_y, denominator,
                given is None and opts.label_smoothing > 0)


def count_tensor(count: int | float, device, dtype: torch.dtype) -> torch.Tensor:
    """``count`` (:func:`check_num_items`'s) as a 0-d ``dtype`` tensor, an int rounded
    once, from an integer tensor (``torch.tensor(n, dtype=float32)`` goes through float64:
    two roundings, where torch's ``sum / n`` makes one)."""
    if type(count) is int:
        wide = torch.int64 if count < 1 << 63 else torch.uint64
        # rounded on the host (not every device has uint64; the host named: a default
        # device of meta must not take it), then copied as torch.tensor would copy it
        return torch.tensor(count, dtype=wide, device="cpu").to(dtype).to(device)
    return torch.tensor(count, device=device, dtype=dtype)


def kernel_reduction(opts: Options) -> str:
    """The reduction a kernel that knows nothing of ``num_items`` is asked for: ``"sum"``
    when the caller's count divides it afterwards (:func:`divide_by_num_items`)."""
    return "sum" if opts.num_items is not None else opts.reduction


def divide_by_num_items(total: torch.Tensor, opts: Options) -> torch.Tensor:
    """``total / num_items`` in the compute dtype (``total`` unchanged without one)."""
    if opts.num_items is None:
        return total
    return total.to(compute_dtype(total.dtype)) / opts.num_items


def reduce_losses(losses: torch.Tensor, rows: Rows, reduction: str) -> torch.Tensor:
    """Row losses reduced: as they are, their sum, or the sum over ``rows.denominator``
    (:func:`reduce_rows`)."""
    return reduce_rows(losses, rows.denominator, reduction, nan_at_zero=rows.nan_at_zero)


def reduce_rows(losses: torch.Tensor, denominator: torch.Tensor, reduction: str, *,
                nan_at_zero: bool = False) -> torch.Tensor:
    """``"none"``: the row losses; ``"sum"``: their sum; ``"mean"``: the sum over
    ``denominator``, as torch divides (``0/0`` NaN, ``x/0`` +-inf).

    ``nan_at_zero`` (torch's own denominator with label smoothing): NaN where it is 0.
    torch divides the unsmoothed and the smoothing sums apart; with every counted target's
    class weight 0 the first is ``0/0``, NaN, however large the second (a pad class of
    weight 0 and a batch of padding). The NaN is ``sum x NaN``, so the gradient and a
    ``jvp`` tangent are NaN too, as torch's. (Counted weights of mixed signs summing to 0
    also give NaN here, where torch's two quotients may be infinities of one sign.) No
    host read."""
    if reduction == "none":
        return losses
    total = losses.sum()
    if reduction == "sum":
        return total
    out = total / denominator
    if nan_at_zero:
        zero = denominator == 0
        out = out + torch.where(zero, total * torch.where(zero, math.nan, 0.0), 0.0)
    return out


# ---- backward: the stored gradient, backward twice, double backward


def scale_stored(grad: torch.Tensor, grad_output: torch.Tensor, reduction: str,
                 counted: torch.Tensor | None = None) -> None:
    """The stored gradient times ``grad_output`` (per row for ``"none"``), in place.

    ``counted``: (M,) bool over ``grad``'s rows (or 0-d: all of ``grad``), False where
    torch scales nothing (ignored rows: torch forms their ``dlogp`` from nothing, so a NaN
    or infinite ``grad_output`` leaves their gradient as it is, where ``NaN * 0`` would
    not). Those rows are multiplied by 0 instead: their stored gradient is 0, or NaN where
    their softmax is NaN (a NaN logit), and so is torch's (``exp(NaN) * 0``)."""
    if reduction == "none":
        factor = grad_output.reshape(-1)
    elif bool(grad_output == 1):  # the common loss.backward(): skip a pass over N x C
        return
    else:
        factor = grad_output
    if counted is not None:  # no host sync: a 0 factor on the rows torch leaves alone
        if factor.device != counted.device:  # a host copy of grad_output (the linear head)
            factor = factor.to(counted.device, non_blocking=True)
        factor = torch.where(counted, factor, 0.0)
    if factor.dim() == 1:
        _mul_rows(grad, factor.unsqueeze(1))
    else:
        grad.mul_(factor)


_MUL_BLOCK = 1 << 20  # elements a block: its float32 temporaries stay a few MiB


def _mul_rows(grad: torch.Tensor, factor: torch.Tensor) -> None:
    """``grad.mul_(factor)`` for a per-row ``(M, 1)`` factor. On CPU a float32 factor and a
    bfloat16/float16 ``grad`` make TensorIterator compute in float32 through whole-tensor
    temporaries: 4x the gradient's bytes (H101: 1.5 GiB extra for a 0.4 GiB bfloat16
    gradient, and 4.5x slower), where blocks of rows keep them small (CUDA casts in
    registers)."""
    rows = grad.shape[0]
    if grad.device.type != "cpu" or grad.dtype == factor.dtype or grad.numel() <= _MUL_BLOCK:
        grad.mul_(factor)
        return
    step = max(1, _MUL_BLOCK // max(1, grad[0].numel()))
    for start in range(0, rows, step):
        grad[start:start + step].mul_(factor[start:start + step])


def defers_mean_scale(dtype: torch.dtype, reduction: str) -> bool:
    """Whether a kernel stores the ``"mean"`` gradient of ``dtype`` logits without its
    ``1 / denominator``, which backward then applies together with ``grad_output`` (one
    float32 multiplication, one rounding): for float16, whose exponent range is narrower
    than the float32 it is computed in. Stored scaled, ``(p - onehot) / N`` rounded to
    float16 loses every entry under its subnormals (6e-8), which a loss scale
    (``torch.amp.GradScaler``'s 65536) cannot bring back, where torch scales before
    rounding: at N = 2048, C = 8192, 42% of the entries became 0 and an AMP step's
    first-layer gradients were 16-50% off. bfloat16 has float32's range: stored scaled."""
    return reduction == "mean" and torch.finfo(dtype).tiny > torch.finfo(
        compute_dtype(dtype)).tiny


def split_scale(scale: torch.Tensor, weight: torch.Tensor | None = None,
                z_loss: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``scale`` (the gradient's ``1 / denominator``, per row or 0-d) as ``(stored,
    deferred)`` for :func:`defers_mean_scale`, ``stored x deferred == scale`` exactly:
    ``deferred`` is the power of two ``2**e`` of ``scale x max|weight|`` (``weight``: the
    class weights the kernel multiplies in, or None; not under 1 with a ``z_loss``, whose
    term no class weight scales) where that is finite, not 0 and under 1,
    so the largest stored row factor, ``scale x w_y / 2**e``, is its significand, in
    [0.5, 1); ``(scale, 1)`` elsewhere (an ignored row's 0; a zero denominator's inf or NaN,
    whose patterns the kernel forms as it does without deferring; a scale of 1 or more, which
    puts nothing under float16's normals). No host read.

    Why a power of two: backward multiplies the stored float16 gradient by ``grad_output x
    2**e``. Where ``grad_output`` is a power of two too (1, a ``GradScaler``'s scale) that
    product is exact, so the one rounding is the kernel's, and float16's result is torch's
    (rounded once from the exact gradient; review H99-1: deferring all of ``1/N`` rounded
    ``p - onehot`` first, and an entry torch rounds to -65504 overflowed to -inf, skipping a
    GradScaler step torch takes). Why the largest weight: a stored entry is then never
    larger than ``p - onehot`` (a significand in [1, 2) overflowed where torch's is finite,
    with a class weight from 32768: review H102-1), and small weights (normalized ones) or
    a ``num_items`` under 1 no longer push stored entries under float16's normals, which the
    deferred factor then lifted (H102-2: 70% of torch's normal-range entries off). With a
    z-loss, weights under 1 do not count: its term ``2 z_loss lse p`` was stored times
    ``1 / max|w|`` and overflowed (review H103-1: weights of 1e-3, z_loss 1)."""
    peak = scale
    if weight is not None and weight.numel():
        largest = weight.detach().abs().amax().to(scale.dtype)  # NaN stays NaN: not movable
        peak = scale * (largest.clamp(min=1.0) if z_loss else largest)
    movable = scale.isfinite() & (scale != 0) & peak.isfinite() & (peak != 0) & (
        peak.abs() < 1)
    significand = torch.frexp(peak)[0]
    # peak / significand is exactly 2**e (as 2.0**e would not be where e is past float32's)
    power = torch.where(movable, peak / torch.where(movable, significand, 1.0), 1.0)
    return torch.where(movable, scale / power, scale), power


def rows_deferring_mean(rows: Rows, dtype: torch.dtype,
                        opts: Options) -> tuple[Rows, torch.Tensor | None]:
    """The row-block kernels' side of :func:`defers_mean_scale`: ``rows`` for the kernel,
    with :func:`split_scale`'s power of two (for ``opts``' class weight and z-loss) left
    out of their scale, and that 0-d factor for backward to multiply with ``grad_output``
    (None, ``rows`` unchanged, where ``dtype`` keeps the scale in the stored gradient).
    Dividing by a power of two is exact."""
    if not defers_mean_scale(dtype, opts.reduction):
        return rows, None
    _, deferred = split_scale(1.0 / rows.denominator, opts.weight, opts.z_loss)
    return dataclasses.replace(rows, scale=rows.scale / deferred), deferred


def infinite_as_nan(grad_output: torch.Tensor) -> torch.Tensor:
    """``grad_output`` with NaN for +-inf: torch's pattern where every class's ``dlogp``
    of a row is infinite (label smoothing, probability targets), ``inf - inf``."""
    return torch.where(grad_output.isinf(), math.nan, grad_output)


def nan_at_targets(grad: torch.Tensor, grad_output: torch.Tensor, valid: torch.Tensor,
                   index: torch.Tensor, reduction: str, *, sync: bool = True) -> None:
    """NaN at the target entry (``index`` (M, 1)) of the counted rows whose ``grad_output``
    is infinite, in place. torch's backward forms ``dlogp`` (the target's ``-w_y g / W``)
    and then ``dz = dlogp - p sum(dlogp)``: ``inf - inf = NaN`` there, where the stored
    gradient times ``g`` gives an infinity. Index targets without smoothing (only there is
    just the target's ``dlogp`` infinite). O(M); one host sync unless ``"none"`` or
    ``sync=False`` (the GPU kernels: the O(M) gather and scatter run every time instead)."""
    if reduction != "none" and sync:
        if bool(torch.isfinite(grad_output)):  # the common case: nothing to do
            return
        hit = valid
    else:  # no host sync (a 0-d grad_output broadcasts as one row's)
        hit = valid & grad_output.reshape(-1).isinf()
    grad.scatter_(1, index, torch.where(hit.unsqueeze(1), torch.nan, grad.gather(1, index)))


def take_stored(ctx, name: str, function: str = "a fused cross-entropy"):
    """The stored gradient ``ctx.<name>``, released from ``ctx`` so autograd can adopt it
    without a copy: backward twice (``retain_graph=True``) raises, naming ``function``.

    ``ctx.keep`` (float64, the dtype of gradcheck and reference checks, or
    ``allow_retain_graph``) keeps it instead: backward then scales a copy, so repeated
    backward through the graph works."""
    value = getattr(ctx, name)
    if ctx.keep:
        check_not_freed(ctx)
        return value
    if value is None:
        raise RuntimeError(
            f"crossent.torch: backward ran twice through {function}; its gradient "
            f"is computed in forward and consumed by the first backward (retain_graph is "
            f"not supported)"
        )
    setattr(ctx, name, None)
    return value


def saved_inputs(ctx, name: str) -> tuple:
    """The inputs :func:`save_inputs` saved, as forward saw them (with their history);
    one modified in place since raises, naming ``crossent.torch.<name>``. torch checks
    versions on unpacking, except under saved-tensor hooks
    (``torch.autograd.graph.saved_tensors_hooks``): there a tensor that comes back at
    its forward address with a newer version raises too (a hook that copied returns the
    forward values elsewhere, and is trusted)."""
    inputs = unpacked_or_refused(ctx, lambda: _modified(name))
    for t, seen in zip(inputs, ctx.saved_versions, strict=True):
        now = _forward_state(t)
        if seen is not None and now is not None and now[0] == seen[0] and now != seen:
            raise _modified(name)
    return inputs


def unpacked_inputs(ctx) -> tuple:
    """``ctx.saved_tensors``, or the tuple :func:`check_target_intact` unpacked earlier in
    this backward (under saved-tensor hooks): non-reentrant checkpointing refuses a
    second unpack of a saved tensor in one backward."""
    held = getattr(ctx, "held_inputs", None)
    return held if held is not None else ctx.saved_tensors


def unpacked_or_refused(ctx, refusal: Callable[[], RuntimeError]) -> tuple:
    """:func:`unpacked_inputs`, with torch's "modified by an inplace operation" error
    replaced by ``refusal()`` (naming crossent's function and what it reads); torch's
    other errors (a backward through freed buffers) as they are."""
    try:
        return unpacked_inputs(ctx)
    except RuntimeError as exc:
        if "modified by an inplace operation" not in str(exc):
            raise  # e.g. torch's "backward through the graph a second time"
        raise refusal() from exc


def releases_inputs(backward: Callable) -> Callable:
    """A Function's ``backward`` that drops what :func:`check_target_intact` unpacked when
    it returns: kept on ``ctx``, the saved logits (recomputed, under checkpointing) would
    live as long as the graph (as review H85-1 found of a kept reference)."""
    @functools.wraps(backward)
    def run(ctx, *grads):
        try:
            return backward(ctx, *grads)
        finally:
            ctx.held_inputs = None
    return run


def in_place_refusal(message: str) -> RuntimeError:
    """crossent's refusal of a backward whose input (one torch's backward reads) was
    changed in place since forward: torch's exception type, ``RuntimeError``, marked so
    that :func:`is_in_place_refusal` tells it apart from torch's other errors (the
    vocab-parallel head joins its peers' collective on it)."""
    error = RuntimeError(message)
    error.crossent_in_place = True  # type: ignore[attr-defined]
    return error


def is_in_place_refusal(error: BaseException) -> bool:
    return getattr(error, "crossent_in_place", False) is True


def _modified(name: str) -> RuntimeError:
    return in_place_refusal(
        f"crossent.torch.{name}: an input was modified in place after the forward "
        f"pass; this backward (create_graph=True, a second backward through a "
        f"retained graph, batched grad_outputs, a target or weight gradient, an "
        f"infinite grad_output, the vocab-parallel functions) recomputes the gradient "
        f"from it, or reads it under saved-tensor hooks as torch's would"
    )


def check_not_freed(ctx) -> None:
    """torch's error for a backward through a graph whose saved tensors backward has
    freed (a second backward without ``retain_graph=True``), for a Function that keeps
    its stored gradient (float64, ``allow_retain_graph``) and so could go on silently."""
    try:
        _ = unpacked_inputs(ctx)  # unpacking raises torch's error once they were freed
    except RuntimeError as exc:
        if "modified by an inplace operation" not in str(exc):
            raise
        # the stored gradient is forward's: a later change of an input does not matter


def remember_target(ctx, target: torch.Tensor, **saved: torch.Tensor | None) -> None:
    """torch's losses save the target, so an in-place change of it before backward raises
    there: the target (a reference for class indices, O(N); a weak one for
    probabilities) and its version, checked by :func:`check_target_intact` on every
    backward (the saved inputs are not unpacked on the plain one).

    ``saved``: the other inputs torch's own backward would read, by argument name (the
    class ``weight``, which ``nll_loss`` saves; the head's ``input`` and
    ``linear_weight``, which ``F.linear`` saves): weakly, with their versions, so that
    an in-place change (an optimizer step between forward and backward, a class weight
    buffer refilled) raises as torch's does instead of giving the forward-time gradient.
    Under saved-tensor hooks torch checks no version: its backward reads what the unpack
    hook gives back. Where :func:`save_inputs` saved these inputs first (the fused
    kernels), backward unpacks them through the hooks and raises if one comes back as the
    caller's tensor (its forward address) changed since forward: torch's backward would
    read the changed values, which the gradient stored in forward does not have (review
    H88; a hook that copied gives torch the forward's values, as the stored gradient). A
    watched input not saved itself (a converted copy was) raises on any change there.
    Elsewhere (:func:`watch_inputs`) nothing is checked under hooks, as torch."""
    hooked = saved_tensor_hooks_active()
    if hooked and not hasattr(ctx, "saved_versions"):
        ctx.watched, ctx.hook_slots = (), None
        return
    if target.is_inference():  # its _version read says only "do not track version counter"
        raise RuntimeError(
            "crossent: Inference tensors cannot be saved for backward, and the target was "
            "made under torch.inference_mode() (torch's losses save the target): clone it "
            "outside inference mode, or compute the loss without gradients (review H104-1)")
    # the target strongly (class indices: O(N)); probabilities weakly (not kept alive),
    # except under hooks: checkpointing stores no saved tensor, so the flattened view
    # handed here would die with forward
    target_ref = (weakref.ref(target) if target.is_floating_point() and not hooked
                  else (lambda t=target: t))
    ctx.watched = (("the target", target_ref, target._version), *(
        (arg, weakref.ref(t), t._version) for arg, t in saved.items()
        if isinstance(t, torch.Tensor) and _forward_state(t) is not None))
    # under hooks: the position of each watched input among the saved ones (or None)
    ctx.hook_slots = None if not hooked else {
        arg: _saved_slot(ctx, t) for arg, t in (("the target", target), *saved.items())
        if isinstance(t, torch.Tensor)}


def _saved_slot(ctx, t: torch.Tensor) -> int | None:
    """Where ``t`` itself is among the inputs :func:`save_inputs` saved, or None."""
    state = _forward_state(t)
    if state is None or t.numel() == 0:
        return None
    for i, seen in enumerate(ctx.saved_versions):
        if seen is not None and seen[0] == state[0]:
            return i
    return None


def check_target_intact(ctx, name: str) -> None:
    """Raise torch's ``RuntimeError`` where the target, or an input given to
    :func:`remember_target`, was modified in place since the forward pass (under
    saved-tensor hooks: where torch's backward would read the change)."""
    unpacked = None
    if getattr(ctx, "hook_slots", None) is not None:
        # as torch's backward, which unpacks its saved tensors: a copying hook's copy, the
        # tensor itself, or (non-reentrant checkpointing) the region recomputed
        unpacked = ctx.held_inputs = ctx.saved_tensors  # once: checkpointing refuses two
    for arg, ref, version in getattr(ctx, "watched", ()):
        t = ref()
        if (t is not None and t._version != version
                and not _hook_copied(ctx, unpacked, arg, t)):
            raise _changed(name, arg, unpacked is not None)


def _changed(name: str, what: str, hooked: bool) -> RuntimeError:
    if hooked:
        return in_place_refusal(
            f"crossent.torch.{name}: {what} was modified in place after the forward pass, "
            f"under saved-tensor hooks that hand back the tensor itself: torch's backward "
            f"would read the changed values, which the gradient stored in forward does not "
            f"have")
    if what == "the target":
        return in_place_refusal(f"crossent.torch.{name}: the target was modified in place "
                            f"after the forward pass (torch raises here too)")
    return in_place_refusal(f"crossent.torch.{name}: {what} was modified by an inplace "
                        f"operation after the forward pass; torch raises here too "
                        f"(its backward needs the forward's {what})")


def _hook_copied(ctx, unpacked, arg: str, t: torch.Tensor) -> bool:
    """Under saved-tensor hooks, the saved ``arg`` came back as a copy (not ``t``'s
    memory): torch's backward reads the forward's values, as the stored gradient has."""
    if unpacked is None:
        return False
    slot = ctx.hook_slots.get(arg)
    if slot is None or unpacked[slot] is None:
        return False  # not saved itself: whether torch would see the change is unknown
    now = _forward_state(unpacked[slot])
    return now is not None and now[0] != t.data_ptr()


class _WatchInputs(torch.autograd.Function):
    """The identity on a loss, whose backward raises torch's ``RuntimeError`` where the
    caller's target or class weight changed in place since forward
    (:func:`watch_inputs`)."""

    @staticmethod
    def forward(ctx, out, name, watched):  # type: ignore[override]
        target, weight = watched  # in a tuple: not inputs of this node
        remember_target(ctx, target, weight=weight)
        ctx.loss_name = name  # not ctx.name: the node's name() method
        # a copy (one value, or one per row), not a view: the caller may change the loss
        # in place (loss /= accumulation_steps), which a Function's view output refuses
        return out.clone()

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        check_target_intact(ctx, ctx.loss_name)
        return grad, None, None


def watch_inputs(out: torch.Tensor, name: str, target: torch.Tensor,
                 weight: torch.Tensor | None) -> torch.Tensor:
    """``out``, with an in-place change of the caller's ``target`` or ``weight`` before
    backward raising as torch's: for routes that hand torch's kernel (or the small
    kernel) a converted copy (a uint8/int32 target as int64, a bfloat16 weight as
    float32), which is all their own backward would watch."""
    if not out.requires_grad:
        return out
    return _WatchInputs.apply(out, name, (target, weight))


class _WatchCount(torch.autograd.Function):
    """The identity on a loss divided by ``count`` in forward, whose backward reads
    ``count`` back as torch's ``sum / n`` does (:func:`watch_count`)."""

    @staticmethod
    def forward(ctx, out, count, name, on_refusal):  # type: ignore[override]
        ctx.save_for_backward(count)  # torch's version check; saved-tensor hooks apply
        # under hooks (no version check) the forward's value, to rescale by in backward
        ctx.kept = count.detach().clone() if saved_tensor_hooks_active() else None
        ctx.loss_name, ctx.on_refusal = name, on_refusal
        return out.clone()  # not a view: the loss may be changed in place (_WatchInputs)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        try:
            (count,) = unpacked_or_refused(ctx, lambda: in_place_refusal(
                f"crossent.torch.{ctx.loss_name}: num_items was modified by an inplace "
                f"operation after the forward pass; torch raises here too (its "
                f"sum / num_items saves num_items)"))
        except RuntimeError as error:
            if ctx.on_refusal is not None and is_in_place_refusal(error):
                ctx.on_refusal()
            raise
        if ctx.kept is not None:  # the count the hook gave back, as torch's divides by
            # (exactly 1 where it is the forward's: no host read to find out)
            ratio = ctx.kept.to(torch.float64) / count.detach().to(torch.float64)
            grad = grad * ratio.reshape(()).to(grad.device, grad.dtype)
        return grad, None, None, None


def watch_count(out: torch.Tensor, num_items: object, name: str,
                on_refusal: Callable[[], None] | None = None) -> torch.Tensor:
    """``out``, a loss divided by the ``num_items`` tensor's value in forward, whose
    backward follows the documented reference ``F.cross_entropy(..., "sum") / n``, which
    saves ``n`` (review H86-2): an in-place change of the tensor before backward raises
    torch's error, and under saved-tensor hooks (which check no version) the gradient is
    divided by the count the hook gives back (the changed tensor where the hook kept it
    itself, as torch's). A number (or None) leaves ``out`` as it is, and so does an
    inference tensor (made under ``torch.inference_mode``), which autograd cannot save and
    nothing outside that mode can change in place (torch's ``sum / n`` refuses it).
    ``on_refusal``: called before that in-place error is raised (the vocab-parallel head's
    peers wait in a collective of the backward this error stops)."""
    if (not isinstance(num_items, torch.Tensor) or not out.requires_grad
            or num_items.is_inference()):
        return out
    return _WatchCount.apply(out, num_items, name, on_refusal)


def weight_torch_saves(weight: torch.Tensor | None, device_type: str) -> torch.Tensor | None:
    """The class weight torch's own backward saves, whose in-place change before backward
    raises there: the caller's tensor, except under autocast, which casts a float16 or
    bfloat16 weight to a float32 copy for cross_entropy (a change of the caller's then goes
    unnoticed by torch, and must here too). Read at the entry point, where autocast is
    the caller's."""
    if weight is None or autocast_dtype(weight, device_type) != weight.dtype:
        return None
    return weight


def head_inputs_read(need: tuple[bool, ...], x: torch.Tensor, w: torch.Tensor,
                     weight: torch.Tensor | None) -> dict[str, torch.Tensor | None]:
    """The inputs of a linear head whose in-place change torch's unfused backward
    (``F.linear`` then ``cross_entropy``) notices, for :func:`remember_target`: the class
    ``weight`` always, ``linear_weight`` where ``dx`` is needed (``dx = G W``), ``input``
    where ``dW`` is (``dW = G^T x``). ``need``: ``needs_input_grad`` of (x, W, b)."""
    return {"weight": weight, "linear_weight": w if need[0] else None,
            "input": x if need[1] else None}


def may_overwrite(logits: torch.Tensor, written: torch.Tensor | None = None) -> bool:
    """Whether ``inplace_backward`` may write the gradient into ``written`` (default:
    ``logits``, the caller's tensor). Only where that memory is not a leaf's: ``written``
    is a copy the entry point made, or the caller's storage belongs to a non-leaf tensor
    (an activation, such as the head's matmul output, whose memory nothing else needs).

    A leaf's storage (``logits`` a leaf, or a view of one) would become its ``.grad``
    too: autograd adopts the returned gradient as the leaf's ``.grad``, sharing memory
    with the leaf (a refill of the leaf, ``zero_grad(set_to_none=False)`` or an optimizer
    step would then change both, silently), or copies it (a hidden ``N x C`` pass). There
    the kernel writes a fresh buffer instead, and the logits stay intact. So it does under
    saved-tensor hooks (``torch.autograd.graph.save_on_cpu``, non-reentrant
    checkpointing): torch skips its version checks there, and an op that saved the
    activation would silently read the gradient.

    >>> leaf = torch.zeros(2, 3, requires_grad=True)
    >>> may_overwrite(leaf), may_overwrite(leaf[1:]), may_overwrite(leaf * 2)
    (False, False, True)
    """
    if saved_tensor_hooks_active():
        return False  # hooks (save_on_cpu, checkpoint) skip torch's version checks
    if written is not None and \
            written.untyped_storage().data_ptr() != logits.untyped_storage().data_ptr():
        return True
    owner = logits._base if logits._base is not None else logits
    return not owner.is_leaf


def saved_tensor_hooks_active() -> bool:
    """Default saved-tensor hooks are in force (a private query of torch's; where a torch
    lacks it, assume they are: the safe answer for :func:`may_overwrite`)."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is None or top(False) is not None


def _forward_state(t: torch.Tensor | None) -> tuple[int, int] | None:
    """``(data address, version)`` of a saved input; None for none, or for a tensor
    without storage (a wrapper subclass: torch's own check only)."""
    if t is None:
        return None
    try:
        return t.data_ptr(), t._version
    except RuntimeError:
        return None


def save_inputs(ctx, *inputs) -> None:
    """Save the inputs (with their autograd history) for a backward that recomputes from
    them (double backward, batched grad_outputs, target and weight gradients), read back
    with :func:`saved_inputs`. Through ``save_for_backward``: autograd frees them after
    backward, as it frees torch's own saved tensors (a plain ``ctx`` attribute would keep
    the ``N x C`` logits alive as long as the loss tensor, into the next step's forward),
    and an input modified in place before they are read raises instead of misleading."""
    ctx.save_for_backward(*inputs)
    # for saved_inputs' check under saved-tensor hooks (torch skips its own there)
    ctx.saved_versions = [_forward_state(t) for t in inputs]


def no_autocast(device_type: str):
    """The fused kernels choose their own dtypes; autocast must not re-cast their ops."""
    if autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def batched_grad_output(grad_output: torch.Tensor) -> bool:
    """``grad_output`` is one of ``torch.autograd.grad(..., is_grads_batched=True)``'s
    batch: backward runs under torch's vmap, where a host read (``.item()``, ``bool``) or
    an in-place scaling of a stored gradient has no batching rule; the gradient is then
    recomputed with torch ops (:func:`double_backward` with ``create_graph=False``)."""
    return torch._C._functorch.is_legacy_batchedtensor(grad_output)


def recompute_in_backward(grad_output: torch.Tensor) -> bool:
    """Backward must recompute the gradient with torch ops rather than hand over the
    stored one: ``create_graph=True`` (grad mode on inside backward) or a batched
    ``grad_output`` (:func:`batched_grad_output`)."""
    return torch.is_grad_enabled() or batched_grad_output(grad_output)


def infinite_on_cpu(grad_output: torch.Tensor, device_type: str) -> bool:
    """An infinite ``grad_output`` on CPU (one host read, O(N) for ``"none"``): the fused
    kernels' stored gradient cannot take it. Its entries that rounded to 0 (a ``p_j``, or
    ``p_j / N`` for ``"mean"``, under the smallest subnormal: a logit some 92 nats below its
    row's top in bfloat16, 104 in float32, 745 in float64, fewer for ``"mean"``) give
    ``0 x inf = NaN`` where torch's,
    which multiplies first, gives ``+-inf``; so backward recomputes with torch operations
    (:func:`double_backward`, ``create_graph=False``). Accelerators keep the stored
    gradient: no host synchronisation there (documented)."""
    if device_type != "cpu":
        return False
    if grad_output.dim() == 0:  # "mean"/"sum": a scalar read, no tensor operation
        return math.isinf(grad_output.item())
    return bool(torch.isinf(grad_output).any())


def double_backward(ctx, grad_output, name: str, loss_fn, create_graph: bool = True):
    """Backward with ``create_graph=True`` (grad mode on inside backward): the fused
    kernel's stored gradient is a constant to autograd, so the gradient is recomputed
    from the saved inputs with differentiable torch ops (:mod:`._composite`) and returned
    with its graph: Hessians, gradient penalties and MAML get torch's numbers.
    ``create_graph=False``: the same recomputation for a plain backward whose
    ``grad_output`` the stored gradient cannot take (an infinite one in the linear head)."""
    if getattr(ctx, "inplace", False):
        what = ("double backward (backward with create_graph=True, torch.autograd.grad(..., "
                "create_graph=True))" if create_graph else
                "batched grad_outputs (torch.autograd.grad(..., is_grads_batched=True))")
        raise UnsupportedError(
            f"crossent.torch.{name}: {what} is not supported with inplace_backward=True: "
            f"the logits (or the kernel's flattened copy of them) were overwritten by "
            f"their gradient"
        )
    saved = saved_inputs(ctx, name)
    with torch.enable_grad(), no_autocast(ctx.device_type):
        # fresh aliases: each input's own partial derivative, not the total one through
        # another input computed from it (a target z * 1.0, a bias from W, the same
        # tensor twice); their graphs still lead back to the saved inputs
        inputs = [t.view_as(t) if t is not None and t.requires_grad else t for t in saved]
        wanted = [t for t, need in zip(inputs, ctx.needs_input_grad, strict=False)
                  if need and t is not None]
        loss = loss_fn(*inputs).to(grad_output.dtype)
        grads = iter(torch.autograd.grad(loss, wanted, grad_output,
                                         create_graph=create_graph, allow_unused=True))
    return [next(grads) if need and t is not None else None
            for t, need in zip(inputs, ctx.needs_input_grad, strict=False)]
