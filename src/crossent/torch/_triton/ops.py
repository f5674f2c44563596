"""Host side of the Triton kernels: argument preparation and launches, no autograd.

Nothing here synchronises the host with the device: the "mean" denominator, the row
scale and the reduced loss stay device tensors, and the backward scaling kernel finds
out on the device whether ``grad_output`` is 1 (see :mod:`.kernels`).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import NamedTuple, overload

import torch

from .._rules import compute_dtype as accumulate_dtype  # the CPU kernels' rule
from .._rules import (
    reduce_rows,  # one "mean" rule for every kernel
    split_scale,
)

__all__ = [
    "CeLaunch",
    "CeLaunchOverride",
    "CrossEntropyRows",
    "ce_launch_config",
    "cross_entropy_forward",
    "denominator",
    "kernel_config",
    "override_ce_launch",
    "reduce_rows",
    "rows_of_unit_class_stride",
    "scale_",
    "sm_count",
]

_SUPPORTED = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _kernels():
    # looked up on every launch: a test may re-import triton in interpreter mode
    from . import kernels

    return kernels.compiled()


def _launching():
    """:func:`.kernels.launching`: every launch below runs in it (with its
    :func:`_kernels` look-up)."""
    from . import kernels

    return kernels.launching()


def _tl_dtype(dtype: torch.dtype):
    import triton.language as tl

    return tl.float64 if dtype == torch.float64 else tl.float32


def kernel_config(num_classes: int, itemsize: int, block: int | None = None) -> tuple[int, int]:
    """``(BLOCK, num_warps)`` for a row of ``num_classes`` logits.

    Tiles of 8192 classes (4096 for 8-byte input) with 16 warps: 16 logits per thread per
    tile, enough loads in flight to stream a 128k-class row; small vocabularies take one
    tile of the next power of two. Not yet tuned on a GPU: ``benchmarks/gpu/bench_cuda.py
    --sweep-only`` measures the alternatives. ``block`` overrides the tile (tests use
    small tiles to get ragged last tiles). ``ce_kernel`` takes this through
    :func:`ce_launch_config`; the vocab-parallel kernels directly."""
    npow2 = _kernels()["next_power_of_2"]
    if block is None:
        block = min(npow2(max(num_classes, 16)), 4096 if itemsize >= 8 else 8192)
    else:
        block = npow2(max(int(block), 16))
    warps = 16 if block >= 8192 else 8 if block >= 2048 else 4
    return block, warps


class CeLaunchOverride(NamedTuple):
    """Replacements for :func:`ce_launch_config`'s defaults (``None``: keep the default):
    the tile, the warps (default: from the tile, as :func:`kernel_config`), pass 2 in
    reverse tile order, and the persistent grid in programs per SM (``0``: one program
    per row). Set it with :func:`override_ce_launch` (the sweep in
    ``benchmarks/gpu/bench_cuda.py``, tests)."""

    block: int | None = None
    warps: int | None = None
    reverse: bool | None = None
    programs_per_sm: float | None = None


class CeLaunch(NamedTuple):
    """How ``ce_kernel`` is launched (see :mod:`.kernels`)."""

    block: int
    warps: int
    reverse: bool  # pass 2 walks the tiles last to first
    programs: int  # persistent grid size (rows strided over it); 0: grid N, a row each


# The defaults, until a GPU sweep says otherwise (H200, bf16 16384 x 128256: 2.56x the
# HBM floor as launched today): pass 2 in forward order, one program per row.
DEFAULT_REVERSE = False
DEFAULT_PROGRAMS_PER_SM = 0.0

# None, or what override_ce_launch() set: read at every launch of ce_kernel (only; the
# vocab-parallel kernels keep kernel_config)
ce_launch_override: CeLaunchOverride | None = None

# Stand-in SM count off CUDA (triton's CPU interpreter): small, so that a persistent
# launch of a few rows gives programs several rows each and a ragged last round.
INTERPRETER_SM_COUNT = 4

_sm_counts: dict[int, int] = {}


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA ``device`` (asked once per device; a property
    query, no synchronisation); :data:`INTERPRETER_SM_COUNT` elsewhere."""
    if device.type != "cuda":
        return INTERPRETER_SM_COUNT
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _sm_counts:
        _sm_counts[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _sm_counts[index]


_override_lock = threading.Lock()
_active_overrides: list[CeLaunchOverride] = []  # oldest first


@contextlib.contextmanager
def override_ce_launch(*, block: int | None = None, warps: int | None = None,
                       reverse: bool | None = None, programs_per_sm: float | None = None,
                       ) -> Iterator[CeLaunchOverride]:
    """``with override_ce_launch(block=32768, warps=32, reverse=True,
    programs_per_sm=2): ...``: every launch of ``ce_kernel`` inside uses the fields given
    (``None``: the default; see :class:`CeLaunchOverride`); the previous override comes
    back on exit. Process-wide (not per thread): for benchmarks and tests. Blocks of
    several threads may interleave: each removes its own entry from a stack of the active
    ones, and the override in force is the newest left (none when none is left)."""
    global ce_launch_override
    mine = CeLaunchOverride(block, warps, reverse, programs_per_sm)
    with _override_lock:
        _active_overrides.append(mine)
        ce_launch_override = mine
    try:
        yield mine
    finally:
        with _override_lock:
            # this block's own entry (by identity: equal overrides may be active twice)
            index = next(i for i, o in enumerate(_active_overrides) if o is mine)
            del _active_overrides[index]
            ce_launch_override = _active_overrides[-1] if _active_overrides else None


def ce_launch_config(num_classes: int, itemsize: int, device: torch.device,
                     block: int | None = None) -> CeLaunch:
    """The one place that decides how ``ce_kernel`` runs: tile and warps from
    :func:`kernel_config`, pass 2's order and the grid from the module defaults, each
    replaced by :data:`ce_launch_override`'s field where that is set; an explicit
    ``block`` (tests' ragged tiles) wins over both. A persistent grid has
    ``max(1, round(programs_per_sm * sm_count(device)))`` programs, not capped at the
    number of rows (a program without a row returns at once)."""
    over = ce_launch_override or CeLaunchOverride()
    if block is None:
        block = over.block
    blk, warps = kernel_config(num_classes, itemsize, block)
    if over.warps is not None:
        warps = int(over.warps)
    reverse = DEFAULT_REVERSE if over.reverse is None else bool(over.reverse)
    per_sm = DEFAULT_PROGRAMS_PER_SM if over.programs_per_sm is None else over.programs_per_sm
    programs = max(1, round(float(per_sm) * sm_count(device))) if per_sm > 0 else 0
    return CeLaunch(blk, warps, reverse, programs)


def _to_device(values: list[float], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Host numbers as a device tensor without a host synchronisation: a blocking copy
    from pageable memory would wait for the stream; a pinned buffer copies asynchronously
    (the caching host allocator keeps it until the copy is done). Passing them as kernel
    arguments instead would round them to float32 for float64 input."""
    host = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


class CrossEntropyRows(NamedTuple):
    """What :func:`cross_entropy_forward` returns (all on the logits' device)."""

    loss: torch.Tensor  # (N,) row losses, float32 (float64 for float64 input); 0 if ignored
    lse: torch.Tensor  # (N,) log-sum-exp of the (softcapped) logits; 0 if ignored
    grad: torch.Tensor | None  # (N, V) d(loss)/d(logits), or None
    denominator: torch.Tensor  # 0-d: what reduction="mean" divides the summed loss by
    # with defer_mean: the power of two of 1/denominator left out of grad (split_scale),
    # for the caller to apply with grad_output; None where nothing is deferred
    deferred: torch.Tensor | None = None


def denominator(target: torch.Tensor, num_classes: int, weight: torch.Tensor | None,
                ignore_index: int, dtype: torch.dtype) -> torch.Tensor:
    """torch's "mean" denominator as a 0-d device tensor (no host synchronisation):
    the number of rows for probability targets; ``sum_n w[y_n]`` over non-ignored rows
    (their count without weights) for class indices. Out-of-range indices count 0."""
    if target.is_floating_point():
        return torch.full((), float(target.shape[0]), dtype=dtype, device=target.device)
    target = target.long()  # compared in int64: -100 as uint8 would be class 156
    valid = target != ignore_index
    if weight is None:
        return valid.sum().to(dtype)
    safe = torch.where(valid & (target >= 0) & (target < num_classes), target, 0).long()
    return torch.where(valid, weight.to(dtype)[safe], 0.0).sum()


@overload
def raw(t: torch.Tensor) -> torch.Tensor: ...
@overload
def raw(t: None) -> None: ...
def raw(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` with its values in its memory: a negated view (``is_neg``, a lazy sign bit that
    a kernel's raw pointer would not see) materialized; anything else as it is."""
    return None if t is None else t.resolve_neg()  # itself where there is no sign bit


def cross_entropy_forward(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    reduction: str = "mean",
    compute_grad: bool = True,
    grad_out: torch.Tensor | None = None,
    row_multiplier: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    block: int | None = None,
    defer_mean: bool = False,
) -> CrossEntropyRows:
    """Row losses, lse and (optionally) the gradient of ``(N, V)`` logits in one launch.

    ``target``: ``(N,)`` class indices (any integer dtype) or ``(N, V)`` probabilities
    (class axis contiguous). ``weight``: ``(V,)`` class weights. The gradient is
    ``d(reduced loss)/d(logits)`` for ``reduction`` (``"mean"``: rows scaled by
    ``1/denominator``; ``"sum"``/``"none"``: unscaled), times ``row_multiplier[n]`` if
    given (the ``grad_output`` of ``"none"``), times ``scale`` (a 0-d device tensor) if
    given in place of the reduction's own. ``defer_mean``: the power of two of ``"mean"``'s
    ``1/denominator`` is left out of the gradient and returned (``deferred``), for the
    caller to apply
    (:func:`crossent.torch._rules.defers_mean_scale`, :func:`~crossent.torch._rules.split_scale`
    of ``1 / denominator``). It is written into ``grad_out`` ((N, V), any
    float dtype, class axis contiguous) or, with ``grad_out=None``, into ``logits``
    themselves (which are then destroyed). No argument checks here beyond shapes the
    kernel needs: callers validate options (and index bounds, if they want an exception
    rather than the kernel's NaN for an out-of-range class index). The launch (tile,
    warps, pass 2's order, grid) is :func:`ce_launch_config`'s.
    """
    logits, target = raw(logits), raw(target)
    weight, row_multiplier, scale = raw(weight), raw(row_multiplier), raw(scale)
    if not rows_of_unit_class_stride(logits):
        raise ValueError("logits must be 2-D with a contiguous class axis")
    if logits.dtype not in _SUPPORTED:
        raise TypeError(f"logits dtype {logits.dtype} is not supported by the Triton kernel")
    n, v = logits.shape
    dev = logits.device
    acc = accumulate_dtype(logits.dtype)
    prob = target.is_floating_point()
    if prob and (target.shape != logits.shape or not rows_of_unit_class_stride(target)):
        target = target.reshape(n, v).contiguous()
    w = None if weight is None else weight.to(device=dev, dtype=acc).contiguous()
    denom = denominator(target, v, w, ignore_index, acc)
    deferred = None
    if scale is None:
        scale = (1.0 / denom) if reduction == "mean" else torch.ones((), dtype=acc, device=dev)
        if defer_mean and reduction == "mean":
            scale, deferred = split_scale(scale, w, z_loss)
    scale = scale.to(device=dev, dtype=acc).reshape(1)
    eps_v = float(label_smoothing) / v if v else 0.0
    # the smoothing's target mass (eps / V) sum_c w_c, each term scaled first and summed in
    # float64: finite weights near the dtype's largest would overflow a plain sum (torch's
    # gradient scales each w_c by eps / V); read only with smoothing
    smooth_mass = ((w.double() * eps_v).sum().to(acc).reshape(1) if w is not None
                   else torch.full((1,), float(label_smoothing), dtype=acc, device=dev))
    # 0, or NaN when a class weight is not finite: torch's smoothing backward gives an
    # ignored row 0 x w_c, NaN, spread over the row (read only with smoothing and weights)
    idle = ((w * 0.0).sum().reshape(1) if w is not None and float(label_smoothing)
            else torch.zeros_like(smooth_mass))
    params = torch.cat([
        _to_device([float(label_smoothing), float(z_loss),
                    1.0 if softcap is None else float(softcap)], acc, dev),
        smooth_mass, idle,
    ])
    grad: torch.Tensor | None = None
    if compute_grad:
        grad = logits if grad_out is None else grad_out
        if grad.shape != logits.shape or not rows_of_unit_class_stride(grad):
            raise ValueError("grad_out must have the logits' shape and a contiguous class axis")
    loss = torch.empty(n, dtype=acc, device=dev)
    lse = torch.empty(n, dtype=acc, device=dev)
    if n == 0:
        return CrossEntropyRows(loss, lse, grad, denom, deferred)
    if row_multiplier is not None:
        row_multiplier = row_multiplier.reshape(n).to(device=dev, dtype=acc).contiguous()
    y = target if not prob else loss  # placeholder pointers keep the signature fixed
    if not prob:
        y = target.contiguous()
    launch = ce_launch_config(v, logits.element_size(), dev, block)
    with _launching():
        _kernels()["ce"][(launch.programs or n,)](
            logits, logits.stride(0),
            grad if grad is not None else logits, grad.stride(0) if grad is not None else 0,
            y, target if prob else logits, target.stride(0) if prob else 0,
            w if w is not None else params, params, scale,
            row_multiplier if row_multiplier is not None else scale,
            loss, lse, v, n, int(ignore_index),
            PROB=prob, HAS_WEIGHT=w is not None, HAS_ROWMULT=row_multiplier is not None,
            HAS_CAP=softcap is not None, SMOOTH=float(label_smoothing) != 0.0,
            ZLOSS=float(z_loss) != 0.0, GRAD=compute_grad, ACC=_tl_dtype(logits.dtype),
            BLOCK=launch.block, REVERSE=launch.reverse, PERSISTENT=launch.programs > 0,
            num_warps=launch.warps,
        )
    return CrossEntropyRows(loss, lse, grad, denom, deferred)


def rows_of_unit_class_stride(t: torch.Tensor) -> bool:
    """Whether the kernels may read 2-D ``t`` as rows of adjacent classes: class stride 1,
    or one class or no rows, where torch calls any stride contiguous (``.contiguous()``
    keeps it) and the kernels never step along the class axis."""
    return t.dim() == 2 and (t.stride(1) == 1 or t.shape[1] <= 1 or t.shape[0] == 0)


def scale_(x: torch.Tensor, factor: torch.Tensor, *, per_row: bool = False) -> torch.Tensor:
    """``x *= factor`` in place, on the device, one rounding; returns ``x``.

    ``factor``: a one-element tensor (scalar) or, with ``per_row``, one value per row of
    ``x`` (``x`` 1-D counts as one row; 2-D needs a contiguous last axis). Where the
    factor is exactly 1 nothing is read or written, without the host ever asking."""
    if x.numel() == 0:
        return x
    # 1-D, or one factor over a contiguous tensor: one long row in 4096-wide tiles (a
    # (V, D) dW would otherwise be V programs of D elements)
    flat = x.dim() == 1 or (not per_row and x.is_contiguous())
    x2 = x.view(1, -1) if flat and x.is_contiguous() else x
    if not rows_of_unit_class_stride(x2):
        raise ValueError("scale_ needs a 1-D or 2-D tensor with a contiguous last axis")
    rows, cols = x2.shape
    factor = raw(factor).to(device=x.device).reshape(-1).contiguous()
    if per_row and factor.numel() != rows:
        raise ValueError(f"per-row factor has {factor.numel()} values for {rows} rows")
    with _launching():
        found = _kernels()
        blk = min(found["next_power_of_2"](max(cols, 16)), 4096)
        tiles = (cols + blk - 1) // blk
        found["scale"][(rows * tiles,)](x2, x2.stride(0), factor, cols, tiles,
                                        PER_ROW=per_row, ACC=_tl_dtype(x.dtype), BLOCK=blk,
                                        num_warps=4)
    return x
