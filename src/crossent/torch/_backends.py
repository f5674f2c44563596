"""Which kernel serves a ``crossent.torch`` call: the one place that decides.

Public choices (the ``backend=`` keyword of :func:`crossent.torch.cross_entropy`,
:func:`crossent.torch.linear_cross_entropy` and their modules):

``"auto"`` (default)
    torch's own kernel for small inputs with torch's options (index targets, neither
    ``z_loss`` nor ``softcap``, under ``2**19`` logits, no ``chunk_size``), or from
    :data:`SMALL_MIN_LOGITS` on the small-batch fused kernel (route ``"small"``, below);
    on CUDA/ROCm
    tensors the Triton kernels when triton imports and the call needs nothing they refuse;
    on CPU, for rows of few classes with torch's options (:func:`_few_classes_route`,
    not with ``inplace_backward`` on logits it may overwrite), the small-batch kernel
    below :data:`FEW_CLASSES` classes or under :data:`SMALL_MAX_LOGITS` logits (float32:
    :data:`SMALL_MAX_LOGITS_FLOAT32`, no limit; with ``set_compiled_kernel(True)`` on, rows
    of :data:`FEW_CLASSES` or more keep the row-block route and its compiled kernel),
    else torch's kernel below
    :data:`FEW_CLASSES_NATIVE` classes (:data:`SPATIAL_FEW_CLASSES` for
    ``(N, C, d1, ...)`` logits; probability targets below
    :data:`FEW_CLASSES_PROBABILITIES`, and small
    ones, when no logit is ``-inf``: :func:`wants_neg_inf_check`); otherwise crossent's
    row-block kernel. Where autograd needs what a fused kernel cannot give (a
    ``torch.func`` transform, forward-mode AD, ``jit.trace``, ``C = 0``, ...), the
    composable path (plain torch ops, :mod:`._composite`).
``"native"``
    ``torch.nn.functional.cross_entropy`` itself (arithmetic in float32, float64 stays):
    torch's numbers, torch's memory. ``z_loss``/``softcap`` raise
    :class:`~crossent.UnsupportedError` (torch has neither).
``"rowblock"``
    crossent's row-block kernel (:mod:`._rowblock`) at every size, with its composable
    form where autograd needs it (the same formulas in differentiable torch ops).
``"triton"``
    the Triton kernels (:mod:`._triton`): CUDA/ROCm tensors, or CPU tensors when
    ``TRITON_INTERPRET=1`` was set before triton was imported (the interpreter). A call
    that needs what they do not support raises :class:`~crossent.UnsupportedError`
    naming it, never a different computation.

Routes (what :func:`choose_backend` returns): the three kernels, ``"composite"``, and
``"small"``: where ``"auto"`` would take torch's kernel for a cross-entropy whose float32,
float64 or bfloat16 CPU logits need a gradient, from :data:`SMALL_MIN_LOGITS` logits on and
with neither class weights nor label smoothing, a fused kernel of a dozen tensor operations
(:mod:`._small`): torch's numbers, one ``N x C`` tensor written instead of three (bfloat16:
a float32 work buffer too); past ``2**19`` logits also the few-classes route's, and
float32's at any size (:func:`_few_classes_route`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from ..errors import InputError, UnsupportedError
from . import _composite

__all__ = ["BACKENDS", "NATIVE_MAX_LOGITS", "SMALL_MIN_LOGITS", "Call", "check_backend",
           "choose_backend", "composite_reason", "own_dispatch", "small_kernel_fits",
           "triton_importable", "triton_refusal"]

BACKENDS = ("auto", "native", "rowblock", "triton")

# Below this many logits torch's own C++ kernel wins: the fused kernel's ~60 tensor
# operations of Python dispatch cost ~0.3 ms, torch eager takes 0.04 ms at 64 x 10 and
# 0.2 ms at 256 x 1000; the two cross between 0.5 and 1.5 M logits on a 2-core CPU.
# (Read at every call by the entry points, as ``_backends.NATIVE_MAX_LOGITS``: the tests
# lower it to send small inputs through the fused kernel.)
NATIVE_MAX_LOGITS = 1 << 19

# From this many logits up to NATIVE_MAX_LOGITS, a cross-entropy whose logits need a
# gradient takes the few-operation fused kernel (._small) instead of torch's: its dozen
# Python-dispatched operations cost ~0.1 ms more than torch's C++ calls, and it writes one
# N x C tensor where torch writes three. Measured (float32, forward + backward, idle 2-core
# EPYC, paired medians of 78-234 alternating rounds, benchmarks/small_inputs.py): against
# eager 1.20-1.22x at 128 x 1000, 1.06-1.17x at 192 x 1000, 1.01-1.12x at 224 x 1000,
# 0.78-0.99x at 256 x 1000 (five runs), 0.65-0.89x at 384 x 1000, 0.66-0.81x at 512 x 1000.
SMALL_MIN_LOGITS = 240_000
# bfloat16 too (converted to float32 once, the gradient rounded once); not float16, whose
# "mean" gradient is stored unscaled (_rules.defers_mean_scale): the row-block kernel's
SMALL_KERNEL_DTYPES = (torch.float32, torch.float64, torch.bfloat16)


# Rows of few classes on CPU (token tagging, segmentation): the row-block kernel's per-row
# reductions over a short row cost more than they save. Measured (float32 forward +
# backward, 2-core EPYC, benchmarks/few_classes.py, paired medians):
SMALL_MAX_LOGITS = 1 << 23  # the small kernel up to here at any C (8192 x 1000: 0.3-0.5x
#                             eager, the row-block kernel 0.5-0.7x) for bfloat16 (its float32
#                             work buffer: 2x the logits' bytes) and float64 (backward copies
#                             the gradient); float32: SMALL_MAX_LOGITS_FLOAT32
SMALL_MAX_LOGITS_FLOAT32 = 1 << 62  # float32 at any size since its buffers are pooled (idle:
#                             16384 x 1000 0.13x eager, the row-block kernel 0.19x; 2048 x
#                             32000 0.13-0.14x against 0.16x; with 2 busy processes level,
#                             0.15-0.20x against 0.16-0.19x): the same memory, one N x C
#                             gradient
FEW_CLASSES = 64  # below: the small kernel at any size (1048576 x 21: 0.71x eager, the
#                   row-block kernel 0.77x; 262144 x 2: 1.03x against 2.3x)
SMALL_MIN_CLASSES = 4  # the small kernel's O(N) temporaries (index, p_y, log p_y, scale)
#                       outweigh 2- and 3-class logits: 262144 x 2 with padding peaked at
#                       5x the logits against eager's 3x, and ran 1.04x eager (torch's: 0.99x)
FEW_CLASSES_NATIVE = 32  # below: torch's kernel where the small one does not serve
#                          (262144 x 2: 0.93x eager, the row-block kernel 2.3x)
FEW_CLASSES_PROBABILITIES = 128  # probability targets below: torch's kernel (65536 x 64:
#                                  0.94-0.99x eager, the row-block kernel 1.3-1.7x; at
#                                  32768 x 150 and up the two were level within the noise)
SPATIAL_FEW_CLASSES = 256  # (N, C, d1, ...) below: torch's kernel, which reads that
#                            layout as it is (8 x 21 x 128 x 128: the row-block kernel
#                            2.7x eager, its transposing copies; 8 x 300 x 64 x 64: 0.84x)


@dataclass(frozen=True)
class Call:
    """What the choice depends on, gathered by the entry point.

    ``composite``: the autograd feature that needs the composable path (None: none).
    ``triton_refusal``: a feature of this call the Triton kernels do not support.
    ``sized``: the linear head got ``chunk_size``/``options`` (always a chunked kernel)."""

    function: str
    device: torch.device
    num_logits: int
    index_target: bool
    z_loss: float
    softcap: float | None
    composite: str | None = None
    triton_refusal: str | None = None
    sized: bool = False
    dtype: torch.dtype | None = None  # the logits' (cross_entropy only)
    needs_grad: bool = False  # the logits need a gradient and grad mode is on
    weighted: bool = False  # class weights given
    label_smoothing: float = 0.0
    plain: bool = False  # plain tensors (no subclass) and no torch-function mode active
    subclass: str | None = None  # own_dispatch(): a tensor subclass with its own dispatch
    fake: bool = False  # fake_values(): no value can be read
    num_classes: int = 0  # C (cross_entropy only; 0: not known)
    spatial: bool = False  # (N, C, d1, ...) logits: the kernels' rows are a transposing copy
    inplace: bool = False  # inplace_backward=True on logits the kernel may overwrite
    # probability targets: no logit is -inf (read by the entry where wants_neg_inf_check):
    # there torch's kernel gives crossent's numbers
    no_neg_inf: bool = False
    # crossent.torch.set_compiled_kernel(True) is on and its kernel takes these CPU logits
    # and options (index targets, no smoothing or statistics): the row-block route runs it
    compiled_kernel: bool = False


def own_dispatch(*tensors) -> str | None:
    """The type name of the first tensor whose class has its own ``__torch_dispatch__``
    (``DTensor``, ``FakeTensor`` outside its mode, ...), or None. crossent's kernels
    write into plain buffers and read values on the host, which such tensors cannot
    serve (DTensor: "mixed torch.Tensor and DTensor"); torch's own kernel can."""
    plain = torch.Tensor.__torch_dispatch__
    for t in tensors:
        if isinstance(t, torch.Tensor) and type(t).__torch_dispatch__ is not plain:
            return type(t).__name__
    return None


def composite_reason(num_classes: int, inplace_grads: bool, *tensors) -> str | None:
    """What needs the composable path (plain torch ops), in words, or None."""
    if num_classes == 0:
        return "C = 0 (no classes)"
    if inplace_grads:
        return "target or weight gradients with inplace_backward=True"
    if _composite.composable_required(*tensors):
        return "torch.func transforms, forward-mode AD or torch.jit.trace"
    return None


def triton_refusal(*, target_grad: bool, weight_grad: bool,
                   retain: bool = False) -> str | None:
    """What of this call the Triton kernels do not support, in words, or None."""
    if target_grad:
        return "a gradient for the target (probability targets that require grad)"
    if weight_grad:
        return "a gradient for the class weight"
    if retain:
        return "options.allow_retain_graph=True (backward twice)"
    return None


def check_backend(backend) -> str:
    """``backend`` if it is one of :data:`BACKENDS`, else :class:`InputError`."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise InputError(f"backend={backend!r} must be one of "
                         f"{', '.join(repr(b) for b in BACKENDS)}")
    return backend


def triton_importable() -> bool:
    """triton imports (without importing crossent's kernels)."""
    from . import _triton

    return _triton.available()


def _triton_unusable(call: Call) -> str | None:
    """Why the Triton kernels cannot run this call at all, or None."""
    if not triton_importable():
        return "this machine: triton is not installed (pip install triton)"
    if call.device.type == "cuda":  # ROCm tensors are "cuda" too
        return None
    if call.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return (f"{call.device.type} tensors (CUDA/ROCm tensors, or CPU tensors with "
            f"TRITON_INTERPRET=1 set before triton is imported)")


def _native_is_faster(call: Call, native_max_logits: float) -> bool:
    """Small input with options torch has. Probability targets take a fused kernel where a
    logit may be -inf: it keeps a zero target's term at exactly 0 there (torch: NaN)."""
    return (not call.sized and call.num_logits < native_max_logits
            and (call.index_target or call.no_neg_inf)
            and call.z_loss == 0.0 and call.softcap is None)


def wants_neg_inf_check(backend: str, call: Call, native_max_logits: int) -> bool:
    """Whether a CPU cross-entropy of probability targets would take torch's kernel (small,
    or rows of few classes) if no logit were -inf: the entry then reads that (one pass
    over the logits, no synchronisation on CPU) into :attr:`Call.no_neg_inf`."""
    if (backend != "auto" or call.device.type != "cpu" or call.function != "cross_entropy"
            or call.index_target or call.sized or call.z_loss != 0.0
            or call.softcap is not None or call.composite is not None or call.fake
            or call.subclass is not None):
        return False
    return call.num_logits < native_max_logits or (
        not call.inplace and 0 < call.num_classes < _torchs_few_classes(call))


def has_neg_inf(logits: torch.Tensor) -> bool:
    """Whether a logit is ``-inf``, for :attr:`Call.no_neg_inf`: one minimum over the
    logits (131072 x 21 float32: 0.07-0.2 ms, where ``isneginf(x).any()``, which writes
    an ``N x C`` mask first, took 1.7-2 ms); a NaN minimum hides the answer and takes the
    mask."""
    if logits.numel() == 0:
        return False
    low = float(torch.amin(logits.detach()))
    if math.isnan(low):
        return bool(torch.isneginf(logits).any())
    return low == -math.inf


def small_kernel_fits(device: torch.device, dtype: torch.dtype | None, num_logits: int,
                      needs_grad: bool, label_smoothing: float) -> bool:
    """The few-operation fused kernel (:mod:`._small`) beats torch's for a cross-entropy
    of index targets with torch's options, neither class weights nor label smoothing,
    that torch's kernel would otherwise serve (under ``NATIVE_MAX_LOGITS``; the caller
    checks the weights and plain tensors)."""
    return (needs_grad and label_smoothing == 0 and device.type == "cpu"
            and dtype in SMALL_KERNEL_DTYPES
            and num_logits >= max(SMALL_MIN_LOGITS, 1))


def choose_backend(backend: str, call: Call, native_max_logits: int) -> str:
    """The route of one call: ``"native"``, ``"small"``, ``"rowblock"``, ``"triton"`` or
    ``"composite"``; raises :class:`UnsupportedError` for a forced backend that cannot
    serve the call. ``native_max_logits``: below this many logits torch's C++ kernel beats
    the row-block kernel's Python dispatch (see :data:`NATIVE_MAX_LOGITS`)."""
    name = f"crossent.torch.{call.function}"
    if backend == "native":
        for feature, value in (("z_loss", call.z_loss != 0.0), ("softcap",
                                                               call.softcap is not None)):
            if value:
                raise UnsupportedError(f"{name}: backend='native' (torch's kernel) has no "
                                       f"{feature}; use backend='auto' or 'rowblock'")
        return "native"
    if backend == "triton":
        problem = (_triton_unusable(call) or call.composite or call.triton_refusal
                   or (None if call.subclass is None else f"{call.subclass} inputs")
                   or ("fake tensors (FakeTensorMode)" if call.fake else None))
        if problem is not None:
            raise UnsupportedError(f"{name}: backend='triton' does not support {problem}; "
                                   f"use backend='auto' (or 'rowblock')")
        return "triton"
    if call.fake:  # plain torch operations propagate fake tensors
        return ("native" if backend == "auto" and call.composite is None
                and _native_is_faster(call, math.inf) else "composite")
    if call.device.type == "meta" or call.subclass is not None:  # torch's kernel only
        # (probability targets too for a subclass: its values are torch's to compute)
        torchs = _native_is_faster(call, math.inf) or (
            call.subclass is not None and not call.sized and call.z_loss == 0.0
            and call.softcap is None)
        if backend == "auto" and torchs:
            return "native"
        if call.subclass is None:
            what, targets = "meta tensors (shapes without data)", "index targets, "
        else:
            what, targets = (f"{call.subclass} inputs (a tensor subclass with its own "
                             f"dispatch; for vocab-parallel logits see "
                             f"crossent.torch.distributed)"), ""
        raise UnsupportedError(f"{name}: {what} run torch's own kernel only: "
                               f"backend='native' or 'auto', {targets}neither z_loss, "
                               f"softcap nor chunk_size")
    if call.composite is not None:
        return "composite"
    if backend == "rowblock":
        return "rowblock"
    if _native_is_faster(call, native_max_logits):
        if (call.function == "cross_entropy" and call.index_target and call.plain
                and not call.weighted
                and small_kernel_fits(call.device, call.dtype, call.num_logits,
                                      call.needs_grad, call.label_smoothing)):
            return "small"
        return "native"
    if (call.device.type == "cuda" and call.triton_refusal is None
            and triton_importable()):
        return "triton"
    return _few_classes_route(call) or "rowblock"


def _few_classes_route(call: Call) -> str | None:
    """``"small"`` or ``"native"`` for a CPU cross-entropy whose rows are too short for
    the row-block kernel to pay (see :data:`FEW_CLASSES`), with options torch has; None:
    the row-block kernel."""
    if (call.device.type != "cpu" or call.function != "cross_entropy" or call.inplace
            or not _native_is_faster(call, math.inf)):
        return None  # inplace_backward asks for the row-block kernel's memory
    if call.compiled_kernel and not call.spatial and call.num_classes >= FEW_CLASSES:
        return None  # opted in: the row-block route runs the compiled kernel (its rows;
        # spatial logits keep torch's kernel: the row-block route would transpose them)
    if (call.index_target and not call.spatial and call.plain and not call.weighted
            and call.num_classes >= SMALL_MIN_CLASSES
            and small_kernel_fits(call.device, call.dtype, call.num_logits, call.needs_grad,
                                  call.label_smoothing)
            and (call.num_logits < _small_max_logits(call.dtype)
                 or call.num_classes < FEW_CLASSES)):
        return "small"
    # probability targets (checked free of -inf): torch's kernel below
    # FEW_CLASSES_PROBABILITIES (131072 x 21: 1.10x eager with the check, the row-block
    # kernel 2.2x)
    return "native" if 0 < call.num_classes < _torchs_few_classes(call) else None


def _small_max_logits(dtype: torch.dtype | None) -> int:
    return SMALL_MAX_LOGITS_FLOAT32 if dtype == torch.float32 else SMALL_MAX_LOGITS


def _torchs_few_classes(call: Call) -> int:
    """Below this many classes a large CPU call goes to torch's kernel (where the small
    one does not serve it)."""
    if call.spatial:
        return SPATIAL_FEW_CLASSES
    return FEW_CLASSES_NATIVE if call.index_target else FEW_CLASSES_PROBABILITIES
