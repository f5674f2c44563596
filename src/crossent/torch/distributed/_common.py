"""Shared pieces of the vocab-parallel losses: the argument checks, the cross-rank agreement
(one fixed-size all-reduce that every rank makes before anything else), the per-row partial
statistics of one rank's class slice, their exchange (one all-reduce MAX, one all-reduce
SUM), the global per-row loss and the gradient of a block of local logits.
:meth:`Partials.fill` and :func:`grad_block` are the torch-ops ("rowblock") form of the
local work; :mod:`._local` runs them on CPU worker threads or sends the work to the Triton
kernels of :mod:`crossent.torch._triton.vocab_parallel` instead.

Notation (per row ``n``; ``V`` classes in all, rank ``r`` holds ``[s_r, s_r + V_r)``):
``M_n = max_c z_nc`` (global), ``S_n = sum_c exp(z_nc - M_n)``, ``lse_n = M_n + log S_n``,
``w_y`` the class weight of the target (1 without weights), ``W = sum_c w_c`` (``V``
without weights), ``eps`` the label smoothing, ``zeta`` the z-loss coefficient.
Row loss (counted rows; PyTorch's formula, see :func:`crossent.softmax_cross_entropy`)::

    l_n = A_n lse_n - (1 - eps) w_y z_ny - (eps / V) sum_c w_c z_nc + zeta lse_n^2,
    A_n = (1 - eps) w_y + (eps / V) W,

and its gradient ``dl_n/dz_nc = p_nc (A_n + 2 zeta lse_n) - (eps / V) w_c
- (1 - eps) w_y [c = y_n]`` with ``p_nc = exp(z_nc - lse_n)``: every term is either local
to the slice or a per-row scalar, so backward needs no communication.

Why a separate agreement collective: the row collectives have ``N`` (per chunk ``B``)
entries, so ranks that disagree on ``N``, the chunk size or an option that changes a buffer
would call collectives of different sizes, which aborts (gloo) or hangs (NCCL). The
agreement buffer has the same size on every rank whatever the arguments: ``world x F``
int64 (:data:`FIELDS`), rank ``r`` writing row ``r`` and zeros elsewhere, so one all-reduce
SUM is an all-gather. Every rank then runs the same checks on the same gathered table and
raises the same :class:`~crossent.errors.InputError`, or none.
"""

from __future__ import annotations

import contextlib
import functools
import math
import numbers
import operator
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

import torch
import torch.autograd.forward_ad as fwAD
import torch.distributed as dist

from ... import _checks
from ...errors import InputError, UnsupportedError
from .._backends import BACKENDS, own_dispatch
from .._composite import composable_required
from .._rules import (
    autocast_dtype,
    batched_grad_output,
    check_index_dtype,
    check_options,
    check_same_device,
    check_softcap_dtype,
    compute_dtype,
    count_value,
    differentiated,
    fake_values,
    records_graph,
    reduce_rows,
    refuse_vmapped,
)

__all__ = ["FIELDS", "compute_dtype"]

# Logits per row block: 4 MiB of float32 temporaries. A rule of its own, kept on purpose:
# :func:`crossent.torch._rules.block_rows` (8 MiB of logits on CPU, 32 MiB elsewhere, at
# least 16 rows) is sized for the row-block kernel's reused buffers, while these blocks
# allocate fresh full-size temporaries per operation (the converted block, ``z - m``,
# ``exp``, the weighted logits); taking that rule would change this code's peak memory.
_BLOCK_ELEMS = 1 << 20

# The agreement table's columns (int64; floats travel as their IEEE-754 float64 bits, so
# equality is exact). Order matters only for the message order of the checks.
FIELDS = (
    "problem",  # 0, or the kind of this rank's bad arguments (_KINDS; it raises its message)
    "function",  # which public function this rank called
    "rows",  # N
    "dtype",  # the logits' (input's) dtype
    "ignore_index",
    "label_smoothing",
    "z_loss",
    "softcap",  # 0 for None (a cap is > 0)
    "reduction",
    "weighted",  # class weights given
    "num_items_given",
    "num_items",
    "num_items_rest",  # an int count's n - int(float(n)): counts one float cannot tell apart
    "features",  # D (linear only)
    "chunk_size",  # the explicit chunk size, 0 for the default (linear only)
    "reduce_input_grad",  # linear only
    "input_grad",  # the input gradient will be all-reduced in backward (linear only)
    "backend",  # the requested backend= (index in crossent.torch._backends.BACKENDS)
    "vocab_start_given",
    "start",  # per rank: checked as a partition of [0, V), not for equality
    "size",
    "weight_sum",  # per rank: sum of its weight slice (float64 bits), summed
    "input_hash0",  # linear only: the hidden states, which every rank must hold alike
    "input_hash1",
    "input_hash2",
    "target_hash0",
    "target_hash1",
    "target_hash2",
    "target_range",  # per rank: its largest counted id, -2 for a negative one (target_range)
)
_COL = {name: i for i, name in enumerate(FIELDS)}
_LABELS = {  # how a disagreement is named in the error (the argument it comes from)
    "function": "the function called",
    "rows": "the number of rows N (of local_logits / input and target)",
    "dtype": "the dtype of local_logits / input",
    "weighted": "weight given (not None)",
    "num_items_given": "num_items given (not None)",
    "num_items_rest": "num_items (beyond float64's precision: n - float(n))",
    "features": "D (the last dimension of input)",
    "chunk_size": "chunk_size (0: None)",
    "input_grad": "input.requires_grad (its gradient is all-reduced in backward)",
    "softcap": "softcap (0: None)",
    "backend": "backend",
}
_FUNCTIONS = ("vocab_parallel_cross_entropy", "vocab_parallel_linear_cross_entropy")
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_REDUCTIONS = ("mean", "sum", "none")
_PER_RANK = ("start", "size", "weight_sum", "problem", "vocab_start_given",
             "target_range")  # target_range: compared with the target hashes
_HASHES = ("_hash0", "_hash1", "_hash2")  # compared after the partition, with their own messages
_FLOATS = ("label_smoothing", "z_loss", "softcap", "num_items")

# Target hashes: three independent position-keyed nonlinear hashes modulo the Mersenne
# prime 2^31 - 1 of the full 64-bit class ids (a sum, a permutation or a shift by 2^31 of
# the targets changes them). Every product stays below 2^62: exact in int64 on any device.
_P = (1 << 31) - 1
_DIGIT = (1 << 30) - 1
_HASH_KEYS = ((1103515245, 12345, 1664525, 22695477),
              (214013, 2531011, 134775813, 1140671485),
              (69069, 1013904223, 1597334677, 747796405))


def refuse_double_backward(name: str, collective: bool = False):
    """Decorates a Function's (``once_differentiable``) backward so that a backward that
    records a graph (``create_graph=True``) raises instead of returning a gradient with no
    ``grad_fn``: ``once_differentiable`` alone only guards when the incoming gradient requires
    grad, and a Hessian or gradient penalty would otherwise see a constant (PITFALLS 18).
    ``collective``: the backward makes a collective (the linear head's input gradient), so
    a rank asking for ``create_graph`` alone runs it first: the other ranks waiting in it
    get their gradients (torch's own collectives would give them), this one the error."""

    def decorate(backward):
        def guarded(ctx, *grads):
            if torch.is_grad_enabled():
                if collective:
                    with torch.no_grad():
                        backward(ctx, *grads)
                raise UnsupportedError(
                    f"{name}: double backward (create_graph=True) is not supported by the "
                    f"vocab-parallel functions; use crossent.torch on the gathered logits"
                )
            if any(g is not None and batched_grad_output(g) for g in grads):
                raise UnsupportedError(
                    f"{name}: torch.autograd.grad(..., is_grads_batched=True) is not "
                    f"supported by the vocab-parallel functions; call backward once per "
                    f"grad_output"
                )
            return backward(ctx, *grads)

        return guarded

    return decorate


def block_rows(cols: int) -> int:
    return max(1, _BLOCK_ELEMS // max(cols, 1))


def float_bits(x: float) -> int:
    """The IEEE-754 float64 bits of ``x`` as an int (``-0.0`` as ``0.0``)."""
    return struct.unpack("<q", struct.pack("<d", float(x) + 0.0))[0]


def bits_float(b: int) -> float:
    return struct.unpack("<d", struct.pack("<q", int(b)))[0]


def tensor_bits(t: torch.Tensor) -> torch.Tensor:
    """A 0-d tensor's value as the int64 bits of its float64 value, on its device (no sync)."""
    return (t.detach().reshape(()).to(torch.float64) + 0.0).view(torch.int64)


def target_hashes(y: torch.Tensor) -> torch.Tensor:
    """Three hashes ``(3,)`` int64 in ``[0, 2^31 - 1)`` of the int64 vector ``y`` (position
    included): equal targets give equal hashes on every rank and device."""
    pos = torch.arange(1, y.numel() + 1, dtype=torch.int64, device=y.device) % _P
    # base-2^30 digits, each below _P (a 31-bit digit of 2^31 - 1 would be 0 mod _P: 0 and
    # INT32_MAX hashed alike)
    lo, hi, top = y & _DIGIT, (y >> 30) & _DIGIT, (y >> 60) + 9
    out = []
    for a, b, c, d in _HASH_KEYS:
        u = (lo * a + pos * b) % _P
        u = (u * u) % _P
        u = (u * c + hi) % _P
        u = (u * u) % _P
        u = (u * d + top) % _P
        out.append(u.sum() % _P)  # N < 2^32 terms below 2^31: no overflow
    return torch.stack(out)


# input_hashes takes its rows in slices of this many 16-bit words (32 MiB of float64)
_HASH_WORDS = 1 << 22


def input_hashes(x: torch.Tensor) -> torch.Tensor:
    """Three hashes ``(3,)`` int64 of the values of the ``(N, D)`` floating tensor ``x``:
    equal values give equal hashes on every rank and device, whatever the strides
    (``-0.0`` hashes as ``0.0``, every NaN alike; read from the bits, so a rank that flushes
    subnormals reads them as the others do). Each row is read as signed 16-bit words
    ``u_j`` and summed twice, ``sum_j u_j k_j`` and ``sum_j u_j k'_j``, with two key
    sequences in ``[1, 2^16)`` of different prime periods (65521 and 65519: no pair of
    words shares both keys below ``4.3e9`` words): one float64 matrix product, exact in any
    summation order, since every partial sum is an integer below ``2^53`` (rows of fewer
    than ``2^21`` words). A word changed by ``d != 0`` changes both sums; two words changed
    so that one sum cancels leave the other changed unless the key pairs are
    proportional. The ``2N`` sums then go through :func:`target_hashes` (position-keyed and
    nonlinear: rows swapped are caught). Slices of rows bound the temporaries; no host
    synchronisation."""
    x = x.detach()
    rows = x.shape[0]
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()]
    nan = torch.tensor(math.nan, dtype=x.dtype, device=x.device).view(bits)
    negative_zero = torch.iinfo(bits).min  # the sign bit alone
    per_row = x.shape[1] * x.element_size() // 2
    j = torch.arange(per_row, dtype=torch.int64, device=x.device)
    keys = torch.stack([(j * 1103515245 + 12345) % 65521 + 1,  # primes < 2^16
                        (j * 22695477 + 1) % 65519 + 1], dim=1).to(torch.float64)
    sums = torch.empty((rows, 2), dtype=torch.int64, device=x.device)
    step = max(1, _HASH_WORDS // max(per_row, 1))
    for lo in range(0, rows, step):
        part = x[lo:lo + step]
        raw = part.contiguous().view(bits)
        canonical = torch.where(torch.isnan(part), nan,
                                torch.where(raw == negative_zero, 0, raw)).contiguous()
        words = canonical.view(torch.int16).to(torch.float64)
        sums[lo:lo + step] = (words @ keys).to(torch.int64)
    return target_hashes(sums.reshape(-1))


def target_range(target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """A 0-d int64 for the agreement table: the largest counted class index of the int64
    ``target`` (-1 if none), or -2 where a counted index is negative (no host sync). Every
    rank judges every rank's targets against ``V`` from the shared table, so a bad id raises
    on every rank together even if the target hashes were to collide."""
    if target.numel() == 0:
        return torch.tensor(-1, dtype=torch.int64, device=target.device)
    counted = target != ignore_index
    top = torch.where(counted, target, -1).max()
    return torch.where((counted & (target < 0)).any(), -2, top)


# the error types a noted problem may have, by their code in the table's "problem" column
_KINDS: tuple[type[Exception], ...] = (InputError, UnsupportedError)
# The agreement's problem codes: 1 + the index of the error type every rank raises (the
# first bad rank's). TypeError: a call that Python could not bind (raises_together).
CODES: tuple[type[Exception], ...] = (*_KINDS, TypeError)


class Problems:
    """The first bad-argument message of this rank. Checks on one rank must not raise
    before the agreement collective (the other ranks would wait in it): they are noted
    here and raised after it, on every rank together."""

    def __init__(self) -> None:
        self.message: str | None = None
        self.kind: type[Exception] = InputError

    def note(self, message: str, kind: type[Exception] = InputError) -> None:
        if self.message is None:
            self.message, self.kind = message, kind

    def check(self, fn, *args):
        """``fn(*args)``; an :class:`InputError` or :class:`UnsupportedError` it raises is
        noted (with its type) and ``None`` returned."""
        try:
            return fn(*args)
        except _KINDS as e:
            self.note(str(e), type(e))
            return None


@dataclass
class Spec:
    """The loss options; they must be (and are checked to be) the same on every rank."""

    ignore_index: int
    label_smoothing: float
    z_loss: float
    weight: torch.Tensor | None  # (V_r,) compute dtype: this rank's slice of the class weights
    reduction: str
    num_items: torch.Tensor | int | float | None
    softcap: float | None = None
    weight_total: float = 0.0  # sum_c w_c over all V classes, set by agree()
    num_classes: int = 0  # V, set by agree()
    # the caller's class weight and num_items tensors (``weight``/``num_items`` above are
    # copies), whose in-place change before backward raises as torch's (its backward
    # reads them: nll_loss saves the weight, sum / n saves n)
    given_weight: torch.Tensor | None = None
    given_num_items: torch.Tensor | None = None


@dataclass
class Layout:
    group: object
    rank: int
    world: int
    start: int  # first global class id of this rank's slice
    size: int  # V_r, classes on this rank
    even: bool  # vocab_start was None: slices assumed equal, checked
    max_size: int = 0  # max_r V_r, set by agree() (the default chunk depends on it)

    @property
    def communicate(self) -> bool:
        return self.world > 1


def group_rank_world(group) -> tuple[int, int]:
    """``(rank, world)`` in ``group``; ``(0, 1)`` without an initialized torch.distributed.
    Raised at once: a process outside the group cannot take part in its collectives."""
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        if rank < 0:
            raise InputError("group: this process is not a member of the given process group")
        return rank, world
    if group is not None:
        raise InputError("group was given but torch.distributed is not initialized")
    return 0, 1


def make_layout(group, local_classes: int, vocab_start, problems: Problems) -> Layout:
    rank, world = group_rank_world(group)
    if vocab_start is None:
        start = rank * local_classes
    else:
        start = problems.check(_index, vocab_start, "vocab_start")
        if start is None:
            start = 0
        elif start < 0:
            problems.note(f"vocab_start={vocab_start!r} must be >= 0")
            start = 0
    return Layout(group, rank, world, start, int(local_classes), vocab_start is None)


def _ignore_index(value) -> int:
    refuse_vmapped(value, "ignore_index")  # the single-process rule
    return _index(value, "ignore_index")


# Not crossent.torch._rules.check_ignore_index: this one also checks vocab_start, and the
# value must fit the int64 agreement table; its problems are noted, not raised (below).
def _index(value, name: str) -> int:
    if _checks.is_bool(value):  # tensor(True) too: operator.index takes it as 1
        raise InputError(f"{name}={value!r} must be an integer")
    try:
        index = operator.index(value)
    except Exception:  # a meta tensor has no value; a caller's __index__ may raise anything
        raise InputError(f"{name}={value!r} must be an integer") from None
    if not -(1 << 63) <= index < 1 << 63:
        raise InputError(f"{name}={value!r} does not fit in int64")
    return index


def make_spec(ignore_index, label_smoothing, z_loss, weight, reduction, num_items, like,
              local_classes: int, problems: Problems, softcap=None) -> Spec:
    """Check the options; problems are noted (raised after the agreement collective)."""
    try:
        check_options(reduction, label_smoothing, z_loss, softcap)
        check_softcap_dtype(softcap, torch.float32 if like is None else like.dtype)
        eps, zeta = float(label_smoothing), float(z_loss)
        cap = None if softcap is None else float(softcap)
    except InputError as e:
        problems.note(str(e))
        eps = zeta = 0.0
        cap = None
    if not isinstance(reduction, str) or reduction not in _REDUCTIONS:
        reduction = "mean"  # (check_options noted it; a numpy array's `in` would raise)
    index = problems.check(_ignore_index, ignore_index)
    cdtype = compute_dtype(like.dtype) if like is not None else torch.float32
    device = like.device if like is not None else None
    given_weight = None
    if weight is not None:
        if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
            problems.note(f"weight must be a floating tensor, this rank's slice of the "
                          f"per-class weights; got {_describe(weight)}")
            weight = None
        elif (why := not_dense("weight", weight)) is not None:
            problems.note(why, UnsupportedError)
            weight = None
        elif tuple(weight.shape) != (local_classes,):
            problems.note(f"weight has shape {tuple(weight.shape)}; expected "
                          f"({local_classes},), this rank's slice of the per-class weights")
            weight = None
        elif like is not None and weight.device != like.device:
            problems.check(check_same_device, weight, "weight", like)
            weight = None
        elif like is not None and (autocast_dtype(weight, like.device.type)
                                   != autocast_dtype(like, like.device.type)):
            # torch's rule, after autocast's float32 policy for cross_entropy
            problems.note(f"weight has dtype {weight.dtype}; expected {like.dtype}, the "
                          f"logits' dtype (as torch.nn.functional.cross_entropy)")
            weight = None
        elif (records_graph() and weight.requires_grad) or differentiated(weight,
                                                                           gradient=False):
            problems.note("crossent.torch.distributed: no gradient for the class weight, "
                          "nor a forward-mode tangent (it requires grad or is a dual); detach "
                          "it, or use crossent.torch.cross_entropy", UnsupportedError)
            weight = None
        else:
            given_weight = weight
            # a copy: backward must not read a weight changed since forward (review H88-5)
            weight = weight.detach().to(device=device, dtype=cdtype, copy=True)
    items = _num_items(num_items, reduction, problems)
    given_items = items if isinstance(items, torch.Tensor) else None
    if isinstance(items, torch.Tensor):
        items = items.detach().reshape(()).to(device=device, dtype=cdtype)
    return Spec(-100 if index is None else index, eps, zeta, weight, reduction, items, cap,
                given_weight=given_weight,
                given_num_items=given_items)


# Not crossent.torch._rules.check_num_items, on purpose: a rank must not raise before the
# agreement collective (problems are noted), a tensor's value is checked after it (no host
# sync on one rank alone), and here num_items goes with reduction="sum" only.
def _num_items(num_items, reduction: str, problems: Problems):
    if num_items is None:
        return None
    if reduction != "sum":
        problems.note("num_items divides the summed loss: use it with reduction='sum'")
        return None
    if isinstance(num_items, torch.Tensor):
        if (why := not_dense("num_items", num_items)) is not None:
            problems.note(why, UnsupportedError)
            return None
        if num_items.numel() != 1 or num_items.dtype == torch.bool or num_items.is_complex():
            problems.note(f"num_items must be a number or a one-element real tensor; got a "
                          f"{num_items.dtype} tensor of shape {tuple(num_items.shape)}")
            return None
        if num_items.device.type == "meta":  # no value to read, nor to send
            problems.note("num_items is a meta tensor: it has no value to divide by")
            return None
        if (records_graph() and num_items.requires_grad) or differentiated(
                num_items, gradient=False):  # its gradient or tangent would be dropped
            problems.note("num_items that requires grad or carries a forward-mode tangent: "
                          "crossent treats it as a constant count; detach it (or divide "
                          "reduction='sum' by it yourself)", UnsupportedError)
            return None
        return num_items  # its value is checked after the agreement collective
    if isinstance(num_items, bool) or not isinstance(num_items, numbers.Real):
        problems.note(f"num_items={num_items!r} must be a number > 0 or a tensor")
        return None
    value = _checks.as_float(num_items)  # never OverflowError on one rank alone
    if not (value > 0 and math.isfinite(value)):
        problems.note(f"num_items={num_items!r} must be a finite number > 0")
        return None
    return count_value(num_items)  # an int divided as an int: rounded once, as torch's


def not_dense(name: str, t: torch.Tensor) -> str | None:
    """Why ``t`` is not a dense strided tensor (sparse, nested), or None. A nested tensor's
    layout is ``torch.strided`` too, but its ``shape`` raises: noted before it is read."""
    if t.is_nested:
        return f"{name} is a nested tensor: dense (strided) tensors only"
    if t.layout != torch.strided:
        return f"{name} with layout {t.layout}: dense (strided) tensors only"
    return None


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)}"
    return f"{type(x).__name__}"


def check_target(target, row_shape: tuple[int, ...], problems: Problems, device,
                 saved: bool = False):
    """The flat int64 target (``(N,)``), or ignored placeholders after noting a problem.
    ``saved``: backward will need it (a graph is recorded)."""
    rows = math.prod(row_shape)
    if not isinstance(target, torch.Tensor):
        problems.note(f"target must be a tensor of class ids; got {_describe(target)}")
    elif target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        problems.note(f"target must hold integer class ids, got {target.dtype}")
    elif (why := not_dense("target", target)) is not None:
        problems.note(why, UnsupportedError)
    elif saved and target.is_inference():  # torch's save_for_backward would raise, later
        problems.note("target was created under torch.inference_mode and cannot be saved "
                      "for backward (torch raises too); make it outside inference_mode or "
                      "clone it there")
    elif tuple(target.shape) != tuple(row_shape):
        problems.note(f"target has shape {tuple(target.shape)}; expected {tuple(row_shape)} "
                      f"({rows} rows)")
    elif target.device != device:  # never moved silently
        problems.check(check_same_device, target, "target", device)
    else:
        try:
            check_index_dtype(target)  # uint64 ids past int64
        except InputError as error:
            problems.note(str(error))
        else:
            return target.reshape(-1).to(dtype=torch.int64)
    return torch.zeros(rows, dtype=torch.int64, device=device)


def note_subclasses(name: str, problems: Problems, *tensors) -> None:
    """Plain tensors only, noted (raised after the agreement, on every rank together):
    fake tensors (``FakeTensorMode``: the agreement reads values; :func:`agree` runs on
    real tensors then, so the other ranks are answered) and a tensor subclass with its
    own dispatch (DTensor: the kernels write plain buffers; its local shard is what
    these functions take)."""
    if fake_values(*tensors):
        problems.note(f"crossent.torch.distributed.{name}: fake tensors (FakeTensorMode) "
                      f"are not supported (the agreement between ranks reads values)",
                      UnsupportedError)
        return
    kind = own_dispatch(*tensors)
    if kind is not None:
        problems.note(f"crossent.torch.distributed.{name}: {kind} inputs are not supported; "
                      f"pass this rank's local tensors (DTensor: .to_local())",
                      UnsupportedError)


def note_transforms(name: str, problems: Problems, *, forward_ad: bool, tensors=()) -> None:
    """The vocab-parallel autograd Functions have no ``torch.func`` rules (``grad``,
    ``vmap``, ``jacrev``) and no ``jvp``: refused by name, noted before the agreement so
    every rank raises together. ``forward_ad=True``: ``jvp`` and forward-mode dual
    tensors run through the no-graph path's torch operations (torch's tangents) when no
    tensor among ``tensors`` also needs a gradient; otherwise they are refused too."""
    if not torch._C._are_functorch_transforms_active() and fwAD._current_level < 0:
        return  # the common call: no transform, no dual level open
    from torch._C._functorch import TransformType
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    kinds = {i.key() for i in retrieve_all_functorch_interpreters()}
    forward = TransformType.Jvp in kinds or composable_required(*tensors)
    graph = records_graph() and any(isinstance(t, torch.Tensor) and t.requires_grad
                                    for t in tensors)
    refused = kinds - {TransformType.Jvp} if forward_ad else kinds
    if refused or (forward and (not forward_ad or graph)):
        what = ("torch.func transforms and forward-mode AD" if not forward_ad else
                "torch.func transforms (grad, vmap, jacrev)" if refused else
                "forward-mode AD (jvp, dual tensors) on logits that also need a gradient")
        problems.note(f"crossent.torch.distributed.{name}: {what} are not supported; use "
                      f"crossent.torch.cross_entropy / linear_cross_entropy on one process",
                      UnsupportedError)


def header_device(group, *tensors) -> torch.device:
    """Where the agreement buffer lives: the first tensor argument's device (not a meta
    tensor's: its problem is noted, and the other ranks must be answered), else the
    backend's (CUDA for NCCL)."""
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":  # meta: no collective
            return t.device
    if dist.is_available() and dist.is_initialized() and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def agree(lay: Layout, spec: Spec, problems: Problems, target: torch.Tensor, *,
          function: int, rows: int, dtype, device, features: int = 0, chunk_size: int = 0,
          reduce_input_grad: bool = False, input_grad: bool = False,
          backend: object = "auto", input: torch.Tensor | None = None) -> None:
    """The first collective of a call: one all-reduce SUM of a ``world x F`` int64 table
    (each rank's arguments in its row), then the same checks on every rank. Raises
    :class:`InputError` on every rank together, or sets ``spec.num_classes``,
    ``spec.weight_total`` and ``lay.max_size``. ``backend`` is the requested ``backend=``
    value (not the route it resolved to): every rank must pass the same. ``input`` (the
    linear head's ``(N, D)`` hidden states) must hold the same values on every rank. One host
    synchronisation in all (the table read back, with the target range check's flag)."""
    ok = problems.message is None
    with _real_tensors():  # under a FakeTensorMode: the other ranks must be answered
        if not ok:  # every rank raises after the table: nothing of this rank's is read
            target = torch.zeros(0, dtype=torch.int64, device=device)
        values = {
            "problem": 0 if ok else 1 + (CODES.index(problems.kind)
                                         if problems.kind in CODES else 0),
            "function": function,
            "rows": rows,
            "dtype": _DTYPES.index(dtype) if dtype in _DTYPES else len(_DTYPES),
            "ignore_index": spec.ignore_index,
            "label_smoothing": float_bits(spec.label_smoothing),
            "z_loss": float_bits(spec.z_loss),
            "softcap": float_bits(spec.softcap or 0.0),
            "reduction": _REDUCTIONS.index(spec.reduction),
            "weighted": int(spec.weight is not None),
            "num_items_given": int(spec.num_items is not None),
            "num_items": (float_bits(float(spec.num_items))
                          if isinstance(spec.num_items, (int, float)) else 0),
            # an int is divided as itself: ranks whose ints round to one float must agree
            # on the rest too (a float count's rest is 0)
            "num_items_rest": (spec.num_items - int(float(spec.num_items))
                               if type(spec.num_items) is int else 0),
            "features": features,
            "chunk_size": chunk_size,
            "reduce_input_grad": int(reduce_input_grad),
            "input_grad": int(input_grad and reduce_input_grad),
            "backend": (BACKENDS.index(backend) if isinstance(backend, str) and backend in BACKENDS
                        else len(BACKENDS)),
            "vocab_start_given": int(not lay.even),
            "start": lay.start,
            "size": lay.size,
        }
        row = torch.tensor([values.get(name, 0) for name in FIELDS], dtype=torch.int64,
                           device=device)
        if ok:
            if isinstance(spec.num_items, torch.Tensor):
                row[_COL["num_items"]] = tensor_bits(spec.num_items)
            if spec.weight is not None:
                row[_COL["weight_sum"]] = tensor_bits(spec.weight.to(torch.float64).sum())
            row[_COL["target_hash0"]:_COL["target_hash0"] + 3] = target_hashes(target)
            row[_COL["target_range"]] = target_range(target, spec.ignore_index)
            if input is not None:
                row[_COL["input_hash0"]:_COL["input_hash0"] + 3] = input_hashes(input)
        table = torch.zeros((lay.world, len(FIELDS)), dtype=torch.int64, device=device)
        table[lay.rank] = row
        if lay.communicate:
            _all_reduce(table, dist.ReduceOp.SUM, lay)
        # The target check's device half rides along: V is the end of the slices (the largest
        # start + size; _check_table raises unless they tile [0, V)), so the whole check costs
        # this one host sync.
        ends = (table[:, _COL["start"]] + table[:, _COL["size"]]).max()
        ranges = table[:, _COL["target_range"]]
        bad = ((ranges == -2) | (ranges >= ends)).any().to(torch.int64)
        got = torch.cat([table.reshape(-1), bad.reshape(1)]).tolist()  # the one host sync
        width = len(FIELDS)
        _check_table([got[r * width:(r + 1) * width] for r in range(lay.world)], lay, spec,
                     problems)
        if got[-1]:
            _raise_bad_target(target, spec)


P = ParamSpec("P")
R = TypeVar("R")
Report = Callable[[tuple[Any, ...], dict[str, Any], str], None]


def raises_together(report: Report) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorator of a collective entry point. Python matches a call's arguments to the
    signature before the function runs, so an unknown keyword or a missing or extra
    argument on one rank would raise ``TypeError`` there while the other ranks wait in the
    first collective until it times out. Such a call runs ``report(args, kwargs, message)``
    instead: the function's first collective, with this rank's problem in it, so that
    every rank raises ``TypeError`` together (this rank Python's own). A ``TypeError``
    from inside the function passes as it is: a call that could not bind has no frame of
    the function in its traceback."""

    def decorate(fn: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(fn)
        def call(*args: P.args, **kwargs: P.kwargs) -> R:
            try:
                return fn(*args, **kwargs)
            except TypeError as error:
                if error.__traceback__ is None or error.__traceback__.tb_next is not None:
                    raise  # raised inside fn, after the agreement
                try:
                    report(args, kwargs, str(error))
                except Exception as agreed:
                    if type(agreed) is TypeError and str(agreed) == str(error):
                        raise error from None  # this rank's, with its own traceback
                    raise agreed from error
                raise  # report() always raises

        return call

    return decorate


def _is_group(value: object) -> bool:
    return dist.is_available() and isinstance(value, dist.ProcessGroup)


def report_unbound_call(function: int) -> Report:
    """The ``report`` of :func:`raises_together` for the two losses: the agreement of
    ``_FUNCTIONS[function]`` with a problem noted (every rank raises; nothing of this
    call's arguments is read but ``group`` and the device of a tensor among them)."""

    def report(args: tuple[Any, ...], kwargs: dict[str, Any], message: str) -> None:
        # a group passed by position (the parameter is keyword-only) is still the group
        group = kwargs.get("group", next((a for a in args if _is_group(a)), None))
        rank, world = group_rank_world(group)
        device = header_device(group, *args, *kwargs.values())
        problems = Problems()
        problems.note(message, TypeError)
        agree(Layout(group, rank, world, 0, 0, True), Spec(-100, 0.0, 0.0, None, "mean", None),
              problems, torch.zeros(0, dtype=torch.int64, device=device), function=function,
              rows=0, dtype=None, device=device)

    return report


def _real_tensors() -> contextlib.AbstractContextManager:
    """Real tensors for the agreement even under a ``FakeTensorMode`` (a collective on a
    fake buffer would leave the other ranks waiting)."""
    if torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is None:
        return contextlib.nullcontext()
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    return unset_fake_temporarily()


def _check_table(rows: list[list[int]], lay: Layout, spec: Spec, problems: Problems) -> None:
    def col(name):
        return [r[_COL[name]] for r in rows]

    bad = [(r, code) for r, code in enumerate(col("problem")) if code]
    if bad:
        # every rank raises one type, the first bad rank's (an `except UnsupportedError`
        # that falls back must not fall back on one rank alone); the message is the
        # rank's own where it has one
        first, code = bad[0]
        kind = CODES[code - 1] if 0 < code <= len(CODES) else InputError
        if problems.message is not None:
            if problems.kind is kind:
                raise kind(problems.message)
            raise kind(f"{problems.message} (rank {first} of the group reported a problem "
                       f"first: its error, a {kind.__name__}, says which; every rank stops)")
        raise kind(f"rank {first} of the group reported invalid input (its error says "
                   f"which); every rank stops")
    for name in FIELDS:
        if name in _PER_RANK or name.endswith(_HASHES):
            continue
        values = col(name)
        if len(set(values)) > 1:
            shown = ", ".join(f"rank {r}: {_show(name, v)}" for r, v in enumerate(values))
            what = _LABELS.get(name, name)
            raise InputError(f"{what} differs across the ranks of the group ({shown}); every "
                             f"rank must pass the same value")
    given = col("vocab_start_given")
    if len(set(given)) > 1:
        raise InputError(f"vocab_start is None on ranks {[r for r, g in enumerate(given) if not g]}"
                         f" and given on ranks {[r for r, g in enumerate(given) if g]}: pass "
                         f"it on every rank (uneven split) or on none (even split)")
    starts, sizes = col("start"), col("size")
    if lay.even and len(set(sizes)) > 1:
        raise InputError(f"the ranks hold different numbers of classes ({min(sizes)} to "
                         f"{max(sizes)}): pass vocab_start for an uneven split")
    num_classes = _check_partition(starts, sizes)
    if any(len(set(col(name))) > 1 for name in
           ("target_hash0", "target_hash1", "target_hash2", "target_range")):
        raise InputError("target differs across the ranks of the group; every rank must "
                         "pass the same global class ids")
    if any(len(set(col(f"input_hash{i}"))) > 1 for i in range(3)):
        raise InputError("input differs across the ranks of the group; every rank must "
                         "pass the same hidden states (the vocab-parallel head splits the "
                         "classes, not the rows)")
    items = bits_float(rows[0][_COL["num_items"]])
    if spec.num_items is not None and not (items > 0 and math.isfinite(items)):
        raise InputError(f"num_items={items!r} must be a finite number > 0")
    spec.num_classes = num_classes
    spec.weight_total = _weight_total([bits_float(b) for b in col("weight_sum")])
    kind = col("dtype")[0]  # agreed above
    largest = (torch.finfo(compute_dtype(_DTYPES[kind])).max if kind < len(_DTYPES)
               else math.inf)
    if spec.label_smoothing and not abs(spec.weight_total) <= largest:  # NaN too
        # every rank read the same table: they raise together
        raise UnsupportedError(
            f"label_smoothing={spec.label_smoothing} with class weights summing to "
            f"{spec.weight_total} (a weight that is not finite, or finite weights whose sum "
            f"leaves the compute dtype's range): the vocab-parallel smoothing term W lse - "
            f"sum_c w_c z_c is then not torch's sum_c w_c (lse - z_c) (inf - inf); use "
            f"crossent.torch.cross_entropy on the whole vocabulary (it forms torch's sum)")
    lay.max_size = max(sizes)


def _weight_total(sums: list[float]) -> float:
    """The ranks' weight sums added exactly (``math.fsum``), or as floats add where fsum
    refuses: ``inf + -inf`` is NaN and an overflow +-inf, as torch's own sum gives."""
    try:
        return math.fsum(sums)
    except (ValueError, OverflowError):
        return sum(sums, 0.0)


def _show(name: str, value: int):
    if name in _FLOATS:
        return bits_float(value)
    if name == "reduction":
        return repr(_REDUCTIONS[value])
    if name == "dtype":
        return str(_DTYPES[value]) if value < len(_DTYPES) else "not floating"
    if name == "function":
        return _FUNCTIONS[value]
    if name == "backend":
        return repr(BACKENDS[value]) if value < len(BACKENDS) else "not a backend"
    if name in ("weighted", "num_items_given", "reduce_input_grad", "input_grad"):
        return bool(value)
    return value


def _check_partition(starts: list[int], sizes: list[int]) -> int:
    """The slices ``[start_r, start_r + size_r)`` must tile ``[0, V)`` exactly (no overlap,
    no gap; empty slices anywhere in ``[0, V]``). Returns ``V``."""
    held = sorted((s, n, r) for r, (s, n) in enumerate(zip(starts, sizes, strict=True)) if n)
    end = 0
    for s, n, r in held:
        if s != end:
            if s < end:
                raise InputError(f"the class slices overlap: rank {r} holds [{s}, {s + n}) "
                                 f"but classes up to {end} are already held by lower slices "
                                 f"(vocab_start per rank: {starts}; sizes: {sizes})")
            raise InputError(f"the class slices leave a gap: classes [{end}, {s}) belong to "
                             f"no rank (vocab_start per rank: {starts}; sizes: {sizes}); "
                             f"the slices must start at 0 and tile [0, V)")
        end = s + n
    for r, (s, n) in enumerate(zip(starts, sizes, strict=True)):
        if not n and not 0 <= s <= end:
            raise InputError(f"rank {r} holds no classes at vocab_start={s}, outside [0, {end}]")
    return end


def _out_of_range(target: torch.Tensor, ignore_index: int, num_classes) -> torch.Tensor:
    """Where ``target`` holds an id outside ``[0, num_classes)`` that is not
    ``ignore_index`` (``num_classes`` an int or a 0-d device tensor: no host sync)."""
    return (target != ignore_index) & ((target < 0) | (target >= num_classes))


def _raise_bad_target(target: torch.Tensor, spec: Spec) -> None:
    """Raise naming the first bad id. Reached after the hashes agreed, so every rank
    finds the same id. (crossent.torch._rules.check_index_target raises torch's
    IndexError; the vocab-parallel functions raise InputError for every bad argument, on
    every rank together.)"""
    bad = _out_of_range(target, spec.ignore_index, spec.num_classes)
    if not bool(bad.any()):  # another rank's target: their hashes collided
        raise InputError(f"target: another rank's holds a class index outside "
                         f"[0, {spec.num_classes}) that is not ignore_index="
                         f"{spec.ignore_index}; the ranks' targets differ")
    value = int(target[bad][0])
    raise InputError(f"target holds class index {value}, outside [0, {spec.num_classes}) "
                     f"and not ignore_index={spec.ignore_index}")


def cap_logits(z: torch.Tensor, spec: Spec) -> torch.Tensor | None:
    """With ``softcap = c``: ``z <- c tanh(z / c)`` in place, returning ``tanh(z / c)`` (for
    the derivative ``1 - tanh^2`` in backward); ``None`` without a cap."""
    if spec.softcap is None:
        return None
    t = torch.tanh(z.div_(spec.softcap))
    z.copy_(t).mul_(spec.softcap)
    return t


def uncap_grad(g: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor:
    """``d loss / d z = d loss / d(c tanh(z / c)) (1 - tanh^2(z / c))``, in place."""
    if t is None:
        return g
    return g.mul_(t.mul_(t).neg_().add_(1.0))


@dataclass
class Partials:
    """One rank's per-row partial statistics over its class slice (compute dtype, (n,))."""

    m: torch.Tensor  # local row max (NaN if the row's slice holds a NaN)
    s: torch.Tensor  # sum_c exp(z_c - m_safe) over the slice
    zy: torch.Tensor  # z_y if this rank owns y_n, else 0
    wy: torch.Tensor | None  # w_y if this rank owns y_n, else 0 (weighted only)
    smooth: torch.Tensor | None  # sum_c w_c z_c over the slice (label smoothing only)

    @staticmethod
    def empty(n: int, spec: Spec, dtype, device) -> Partials:
        def z():
            return torch.zeros(n, dtype=dtype, device=device)
        return Partials(torch.full((n,), -math.inf, dtype=dtype, device=device), z(), z(),
                        z() if spec.weight is not None else None,
                        z() if spec.label_smoothing else None)

    def fill(self, i: int, z: torch.Tensor, y: torch.Tensor, valid: torch.Tensor,
             lay: Layout, spec: Spec) -> None:
        """Rows ``i:i+len(z)`` from the compute-dtype logits block ``z`` ``(b, V_r)``."""
        j = i + z.shape[0]
        if z.shape[1] == 0:
            return
        m = z.amax(dim=1)  # NaN if the row holds a NaN
        m_safe = torch.where(m == -math.inf, 0.0, m)
        self.m[i:j] = m
        self.s[i:j] = torch.exp(z - m_safe[:, None]).sum(dim=1)
        own = valid & (y >= lay.start) & (y < lay.start + lay.size)
        idx = torch.where(own, y - lay.start, 0)
        z_y = z.gather(1, idx[:, None]).squeeze(1)
        if spec.weight is not None:
            assert self.wy is not None  # empty() allocates wy exactly when weighted
            w_y = torch.where(own, spec.weight[idx], 0.0)
            self.wy[i:j] = w_y
        self.zy[i:j] = torch.where(own, z_y, 0.0)
        if self.smooth is not None:
            if spec.weight is None:
                self.smooth[i:j] = z.sum(dim=1)
            else:
                # a zero weight at an infinite logit is NaN, as torch's w_c log p_c
                self.smooth[i:j] = (z * spec.weight[None, :]).sum(dim=1)


@dataclass
class RowStats:
    """Global per-row results after the exchange (compute dtype, (n,))."""

    loss: torch.Tensor  # l_n, 0 on ignored rows
    lse: torch.Tensor
    coef: torch.Tensor  # A_n + 2 zeta lse_n: multiplies p in the gradient
    wy: torch.Tensor  # w_y on counted rows, 0 on ignored ones
    num_classes: int  # V


def _all_reduce(buf: torch.Tensor, op, lay: Layout) -> None:
    # Looked up at call time (dist.all_reduce), so tests can wrap and count it.
    dist.all_reduce(buf, op=op, group=lay.group)


def exchange(part: Partials, valid: torch.Tensor, lay: Layout, spec: Spec) -> RowStats:
    """Two all-reduces: MAX of the row maxima ``[m_n...]``, then SUM of ``[S_n...,
    (w_y z_y)_n..., (w_y)_n... if weighted, (sum_c w_c z_c)_n... if smoothing]``.

    NaN: a MAX all-reduce need not propagate NaN (gloo's keeps whichever operand its
    comparison picks), so a NaN row maximum is sent as ``-inf`` and the NaN travels in the
    SUM instead, where it propagates on every rank: the rank whose slice holds a NaN sends
    NaN as its exp-sum, so ``S_n``, ``lse_n``, the row's loss and its gradient are NaN on
    every rank, as single-process (an ignored row's loss stays 0, its gradient NaN, as
    ``torch.nn.functional.cross_entropy``'s)."""
    n = part.m.shape[0]
    nan = torch.isnan(part.m)
    m_local = torch.where(nan, -math.inf, part.m)
    m_global = m_local.clone()
    if lay.communicate:
        _all_reduce(m_global, dist.ReduceOp.MAX, lay)
    m_safe = torch.where(m_local == -math.inf, 0.0, m_local)
    g_safe = torch.where(m_global == -math.inf, 0.0, m_global)
    s = torch.where(part.s == 0, 0.0, part.s * torch.exp(m_safe - g_safe))
    s = torch.where(nan, math.nan, s)  # the explicit NaN flag of this rank's slice
    cols = [s, part.zy]
    if part.wy is not None:
        cols.append(part.wy)
    if part.smooth is not None:
        cols.append(part.smooth)
    buf = torch.cat(cols)
    if lay.communicate:
        _all_reduce(buf, dist.ReduceOp.SUM, lay)
    got = buf.view(len(cols), n)
    return _finish(m_global, got, part, valid, spec.num_classes, spec)


def _finish(m, got, part, valid, num_classes, spec) -> RowStats:
    eps, zeta = spec.label_smoothing, spec.z_loss
    s, zy = got[0], got[1]
    col = 2
    if part.wy is not None:
        wy = got[col]
        col += 1
    else:
        wy = valid.to(s.dtype)
    smooth = got[col] if part.smooth is not None else None
    m_safe = torch.where(m == -math.inf, 0.0, m)
    log_s = torch.log(s)
    lse = m_safe + log_s
    wtot = float(num_classes) if spec.weight is None else spec.weight_total
    a = (1.0 - eps) * wy
    # torch's w_y (lse - z_y), not w_y lse - w_y z_y: an infinite w_y gives inf, not
    # inf - inf; a zero w_y at z_y = -inf gives torch's NaN; (m - z_y) + log s keeps a
    # small loss at |z| ~ 1e38, where m + log s rounds to m
    loss = a * ((m_safe - zy) + log_s)
    if eps:
        assert smooth is not None  # Partials.empty allocates it exactly with smoothing
        a = a + (eps / num_classes) * wtot
        loss = loss + (eps / num_classes) * (wtot * lse - smooth)
    coef = a
    if zeta:
        loss = loss + zeta * lse * lse
        coef = a + (2.0 * zeta) * lse
    loss = torch.where(valid, loss, 0.0)  # an ignored row contributes nothing, even NaN
    return RowStats(loss, lse, coef, torch.where(valid, wy, 0.0), num_classes)


def nan_target_rows(wy: torch.Tensor, scale: torch.Tensor, valid: torch.Tensor,
                    spec: Spec) -> torch.Tensor:
    """``(n,)`` bool: the counted rows whose target term's gradient coefficient
    ``(1 - eps) w_y scale`` is NaN (``w_y`` the global target weight, ``scale`` ``d
    reduced / d l_n``): a zero ``w_y`` (or ``eps = 1``) over a zero "mean" denominator
    (``num_items`` is refused unless > 0). torch's NLL backward puts that NaN at the target
    and log_softmax's backward spreads it over the row, so these rows' gradient is NaN
    everywhere (the kernels' ``coef p - c onehot`` would leave the z-loss's and smoothing's
    ``inf``)."""
    return valid & torch.isnan((1.0 - spec.label_smoothing) * wy * scale)


def grad_block(z: torch.Tensor, y: torch.Tensor, valid: torch.Tensor, lse: torch.Tensor,
               coef: torch.Tensor, scale: torch.Tensor, lay: Layout, spec: Spec,
               num_classes: int) -> torch.Tensor:
    """``d loss / d z`` for a compute-dtype block ``z`` ``(b, V_r)``; ``scale`` ``(b,)`` is
    ``d(reduced loss)/d l_n`` (0 on ignored rows). Written into ``z`` (a work buffer)."""
    eps = spec.label_smoothing
    scale = torch.where(valid, scale, 0.0)
    g = z.sub_(lse[:, None]).exp_().mul_((coef * scale)[:, None])
    if eps:
        w = spec.weight if spec.weight is not None else 1.0
        g.sub_((eps / num_classes) * scale[:, None] * w)
    own = valid & (y >= lay.start) & (y < lay.start + lay.size)
    rows = own.nonzero().squeeze(1)
    if rows.numel():
        cls = y[rows] - lay.start
        w_y = spec.weight[cls] if spec.weight is not None else 1.0
        g[rows, cls] -= (1.0 - eps) * w_y * scale[rows]
    return g


def reduce_loss(loss: torch.Tensor, wy: torch.Tensor, valid: torch.Tensor, spec: Spec):
    """The reduced loss and ``d reduced / d l_n`` per row (before grad_output).

    The single-process denominators (:func:`crossent.torch._rules.prepare_rows`: ``sum
    w_y`` over counted rows) on this code's global row statistics (:class:`RowStats`,
    known only after the exchange), and a scalar scale that backward applies (the stored
    gradients are unscaled sums here). A zero denominator is divided by, as torch does:
    every row ignored gives ``0/0 = NaN`` and (the scale reaching counted rows only) a zero
    gradient; counted rows whose weights sum to 0 give a NaN (or ``+-inf``) loss and a
    NaN gradient on those rows, as ``torch.nn.functional.cross_entropy``'s."""
    if spec.reduction == "none":
        return loss, None
    total = loss.sum()
    if spec.reduction == "sum":
        if spec.num_items is None:
            return total, 1.0
        return total / spec.num_items, 1.0 / spec.num_items
    denom = wy.sum() if spec.weight is not None else valid.sum().to(loss.dtype)
    # the single-process rule (_rules.reduce_rows): with smoothing, NaN where it is 0
    return (reduce_rows(loss, denom, "mean", nan_at_zero=spec.label_smoothing > 0),
            1.0 / denom)
