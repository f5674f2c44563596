"""``cross_entropy``: the public entry point of the fused loss and its autograd Function.

It checks the arguments (:mod:`._rules`), asks :func:`._backends.choose_backend` for the
route of the call and runs it: torch's own kernel (:func:`native_cross_entropy`), the
row-block kernel (:func:`._rowblock.cross_entropy_rows` inside
:class:`_CrossEntropyFunction`), the Triton kernels (:mod:`._triton`) or the composable
path (:mod:`._composite`). Public as :func:`crossent.torch.cross_entropy`
(:mod:`crossent.torch.functional`).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Sequence
from typing import overload

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.nn import _reduction

from ..errors import InputError, UnsupportedError
from . import _backends, _buffers, _composite, _inductor, _small, _statistics
from ._custom_ops import compilable
from ._rowblock import cross_entropy_rows
from ._rules import (
    Options,
    autocast_dtype,
    block_rows,
    check_flag,
    check_index_dtype,
    check_same_device,
    check_target_intact,
    choose_loss_dtype,
    compute_dtype,
    divide_by_num_items,
    double_backward,
    fake_values,
    infinite_as_nan,
    infinite_on_cpu,
    kernel_reduction,
    legacy_flag,
    make_options,
    may_overwrite,
    nan_at_targets,
    no_autocast,
    prepare_rows,
    recompute_in_backward,
    records_graph,
    reduce_losses,
    releases_inputs,
    remember_target,
    rows_deferring_mean,
    save_inputs,
    saved_inputs,
    scale_stored,
    take_stored,
    watch_count,
    watch_inputs,
    within_fake_mode,
)

__all__ = ["cross_entropy", "native_cross_entropy"]


class _CrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, weight, rows, opts, inplace, out_dtype, stats=None):
        need_logits = ctx.needs_input_grad[0]
        grad = None
        if need_logits:
            # in place: a detached alias, which autograd adopts for a .grad further up
            # without copying (it copies a tensor still referenced elsewhere)
            grad = logits.detach() if inplace else _buffers.empty(logits.shape, logits.dtype,
                                                                  logits)
        extra = {} if stats is None else stats.kernel_args(0, logits.shape[0])
        kernel_rows, ctx.deferred = (rows_deferring_mean(rows, logits.dtype, opts)
                                     if grad is not None else (rows, None))
        losses = cross_entropy_rows(logits, target, kernel_rows, opts, grad, **extra)
        ctx.grad, ctx.reduction, ctx.rows = grad, opts.reduction, rows
        ctx.keep, ctx.loss_dtype = logits.dtype == torch.float64, losses.dtype
        ctx.inplace, ctx.opts, ctx.device_type = inplace, opts, logits.device.type
        save_inputs(ctx, *((None, None, None) if inplace else (logits, target, weight)))
        remember_target(ctx, target, weight=opts.saved_weight)
        return reduce_losses(losses, rows, opts.reduction).to(out_dtype)

    @staticmethod
    @releases_inputs
    def backward(ctx, grad_output):
        check_target_intact(ctx, "cross_entropy")
        if recompute_in_backward(grad_output) or (  # create_graph, is_grads_batched, or an
                not ctx.inplace  # (rounded to the loss's dtype: a float64 1e300 is inf)
                and infinite_on_cpu(grad_output.to(ctx.loss_dtype), ctx.device_type)):
            grads = double_backward(
                ctx, grad_output, "cross_entropy",
                lambda z, t, w: _composite.cross_entropy(z, t, w, ctx.opts),
                create_graph=torch.is_grad_enabled())
            return (*grads, None, None, None, None, None)
        # the loss left the kernel in its compute dtype and was cast to out_dtype inside
        # this Function: round grad_output back first, as torch's ToCopyBackward does (a
        # float64 1e300 is inf for float32 logits)
        grad_output = grad_output.to(ctx.loss_dtype)
        grad = None
        if ctx.needs_input_grad[0]:
            grad = take_stored(ctx, "grad")
            grad = grad.clone() if ctx.keep else grad
            whole_rows = ctx.rows.index is None or ctx.opts.label_smoothing != 0
            go = infinite_as_nan(grad_output) if whole_rows else grad_output
            if ctx.deferred is not None:  # the mean's 1/denominator (defers_mean_scale)
                go = go * ctx.deferred
            scale_stored(grad, go, ctx.reduction, ctx.rows.valid)
            if not whole_rows:
                nan_at_targets(grad, grad_output, ctx.rows.valid, ctx.rows.index.unsqueeze(1),
                               ctx.reduction)
        dt, dw = None, None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            dt, dw = _target_weight_grads(ctx, grad_output)
        return grad, dt, dw, None, None, None, None, None


# An infinite grad_output: torch's backward forms dlogp (the target's -w_y g / W; with
# label smoothing or probability targets every class's) and then dz = dlogp - p sum(dlogp),
# which is inf - inf = NaN wherever dlogp is infinite. The stored gradient (p - T) times g
# gives +-inf there instead; _rules.infinite_as_nan (whole rows) and _rules.nan_at_targets
# (the target entries) give torch's NaN on the counted rows.


def _target_weight_grads(ctx, grad_output):
    """Closed forms for probability targets, from the saved logits, block by block:
    with ``T = ((1 - eps) t + eps / C) w`` and row scale ``r_n`` (the reduction's
    ``1/N`` or 1, times ``grad_output``), ``dL/dt_nc = -(1 - eps) w_c r_n log p_nc`` and
    ``dL/dw_c = -sum_n r_n ((1 - eps) t_nc + eps / C) log p_nc``, where a ``T_nc = 0``
    facing ``log p_nc = -inf`` counts 0 in ``dw`` (the loss's own rule: its term is 0 for
    every ``w_c``) but not in ``dt``: any ``t_nc > 0`` there makes the loss infinite, so
    ``dL/dt_nc`` is torch's ``+inf`` times ``r_n`` (``NaN`` where ``w_c = 0``, as torch)."""
    z, t, weight = saved_inputs(ctx, "cross_entropy")
    opts, (num_rows, num_classes) = ctx.opts, z.shape
    cdtype = compute_dtype(z.dtype)
    eps, w = opts.label_smoothing, opts.weight
    scale = ctx.rows.scale * (grad_output.to(cdtype).reshape(-1) if ctx.reduction == "none"
                              else grad_output.to(cdtype))
    need_t, need_w = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
    dt = torch.empty(t.shape, dtype=t.dtype, device=t.device) if need_t else None
    dw = torch.zeros(num_classes, dtype=cdtype, device=z.device) if need_w else None
    block = block_rows(num_classes, z.device)
    for i in range(0, num_rows, block):
        j = min(i + block, num_rows)
        logp = torch.log_softmax(_composite.capped(z[i:j].detach().to(cdtype), opts), 1)
        r = scale[i:j].unsqueeze(1)
        if dt is not None:
            dt[i:j] = (logp * r) * (-(1.0 - eps) if w is None else -(1.0 - eps) * w)
        if dw is not None:
            mix = t[i:j].detach().to(cdtype) * (1.0 - eps) + eps / num_classes
            dw -= (mix * _composite.zero_unused(mix * w, logp) * r).sum(0)
    return dt, None if dw is None else dw.to(weight.dtype)


def _flatten(input: torch.Tensor, target: torch.Tensor):
    """(N, C, d1, ...) -> (M, C) logits, (M,) or (M, C) target, and the per-row shape."""
    source, target, row_shape = _checked_shapes(input, target)
    return logit_rows(source, row_shape), target, row_shape


def logit_rows(source: torch.Tensor, row_shape: tuple[int, ...]) -> torch.Tensor:
    """The ``(M, C)`` contiguous logits of ``(N, C, d1, ...)`` (or ``(N, C)``) ``source``:
    a copy for ``d1, ...`` (the classes become the last axis) or a strided input."""
    logits = (source if source.dim() == 2
              else source.movedim(1, -1).reshape(math.prod(row_shape), source.shape[1]))
    return logits if logits.is_contiguous() else logits.contiguous()


def _checked_shapes(input: torch.Tensor, target: torch.Tensor):
    """The checks of :func:`_flatten`: ``input`` (``(1, C)`` for unbatched ``(C,)``), the
    flattened target and the per-row shape; the logits are not copied yet (torch's own
    kernel takes ``(N, C, d1, ...)`` as it is)."""
    if not isinstance(input, torch.Tensor) or not input.is_floating_point():
        raise InputError(f"input must be a floating tensor of logits, got "
                         f"{getattr(input, 'dtype', type(input).__name__)}")
    if not isinstance(target, torch.Tensor):
        raise InputError(f"target must be a tensor, got {type(target).__name__}")
    for name, t in (("input", input), ("target", target)):
        if t.layout != torch.strided:
            raise UnsupportedError(f"crossent.torch.cross_entropy: {name} with layout "
                                   f"{t.layout}; dense (strided) tensors only")
    if input.dim() == 0:
        raise InputError("input must have a class dimension; got a 0-d tensor")
    check_index_dtype(target)  # bool/complex named before any shape rule of the two kinds
    if input.device.type != "meta" or target.dim() != 0:  # a 0-d CPU target is fine for
        check_same_device(target, "target", input)  # shapes only (torch's own kernel)
    num_classes = input.shape[0 if input.dim() == 1 else 1]
    if input.dim() == 1:  # unbatched: (C,) logits, a 0-d class index or (C,) probabilities
        want = tuple(input.shape) if target.is_floating_point() else ()
        if tuple(target.shape) != want:
            kind = "probability" if target.is_floating_point() else "class-index"
            raise InputError(f"{kind} target has shape {tuple(target.shape)}; expected "
                             f"{want} for unbatched input of shape {tuple(input.shape)}")
        input, target = input.unsqueeze(0), target.unsqueeze(0)
        row_shape: tuple[int, ...] = ()
    else:
        row_shape = (input.shape[0], *input.shape[2:])
    if target.is_floating_point():
        if target.shape != input.shape:
            raise InputError(
                f"probability target has shape {tuple(target.shape)}; expected the input's "
                f"{tuple(input.shape)}"
            )
        target = target.movedim(1, -1).reshape(math.prod(row_shape), num_classes)
    else:
        if tuple(target.shape) != (input.shape[0], *input.shape[2:]):
            raise InputError(
                f"class-index target has shape {tuple(target.shape)}; expected "
                f"{(input.shape[0], *input.shape[2:])} for input of shape {tuple(input.shape)}"
            )
        target = target if target.dim() == 1 else target.reshape(-1)
    return input, target, row_shape


def _legacy_reduction(size_average: bool | None, reduce: bool | None) -> str:
    """torch's mapping of the deprecated ``size_average``/``reduce`` (None counts as True,
    any other value by its truth: :func:`._rules.legacy_flag`)."""
    average, reduced = (legacy_flag(v, n) is not False
                        for v, n in ((size_average, "size_average"), (reduce, "reduce")))
    name = "none" if not reduced else "mean" if average else "sum"
    warnings.warn(f"size_average and reduce are deprecated (as in torch); use "
                  f"reduction={name!r}", UserWarning, stacklevel=3)
    return name


def native_cross_entropy(input: torch.Tensor, target: torch.Tensor,
                          weight: torch.Tensor | None, opts: Options,
                          out_dtype: torch.dtype, name: str = "cross_entropy") -> torch.Tensor:
    """``torch.nn.functional.cross_entropy`` with the arithmetic in float32 (float64
    stays): low-precision logits are converted first and the gradient rounded once.
    Every cast is differentiable, so torch computes the target's and the weight's
    gradients itself (and double backward, transforms); ``num_items`` divides the sum.
    ``name``: the entry point an in-place error names (:func:`_watch_copies`)."""
    cdtype = compute_dtype(input.dtype)
    # each .to() that changes nothing still costs microseconds: skip them on the hot path
    handed = target
    if target.is_floating_point():
        handed = target.to(cdtype)
    elif target.dtype != torch.int64:
        check_index_dtype(target)
        handed = target.long()
    handed_weight = None if weight is None else weight.to(device=input.device, dtype=cdtype)
    out = F.cross_entropy(input if input.dtype == cdtype else input.to(cdtype), handed,
                          handed_weight, ignore_index=opts.ignore_index,
                          reduction=kernel_reduction(opts),
                          label_smoothing=opts.label_smoothing)
    out = divide_by_num_items(out, opts)
    out = out if out.dtype == out_dtype else out.to(out_dtype)
    copied = handed is not target or (opts.saved_weight is not None
                                      and handed_weight is not weight)
    return _watch_copies(out, name, input, target, opts, copied)


def _watch_copies(out: torch.Tensor, name: str, input: torch.Tensor, target: torch.Tensor,
                  opts: Options, copied: bool) -> torch.Tensor:
    """``out``, watched (:func:`._rules.watch_inputs`) where ``copied``: torch's kernel
    (or the small one) was handed a converted copy of the caller's ``target`` or class
    weight (a uint8/int32 target as int64, a bfloat16 target or weight in float32), whose
    in-place change before backward its own version checks would not see. Not where no
    value can be read or a transform is active (plain torch operations only there)."""
    if not copied or not _watchable(input, target):
        return out
    return watch_inputs(out, name, target, opts.saved_weight)


def _watchable(input: torch.Tensor, target: torch.Tensor) -> bool:
    """A watching identity node may join the graph: values can be read and no transform
    is active (plain torch operations only there, whose own checks apply)."""
    return not (fake_values(input, target) or _composite.composable_required(input, target))


def watch_num_items(out: torch.Tensor, name: str, input: torch.Tensor, target: torch.Tensor,
                    num_items: object) -> torch.Tensor:
    """``out``, whose backward reads a ``num_items`` tensor back as torch's ``sum / n``
    does (:func:`._rules.watch_count`: every route reads the count once, in forward). For
    the entry points, on the loss whatever the route."""
    if not isinstance(num_items, torch.Tensor) or not _watchable(input, target):
        return out
    return watch_count(out, num_items, name)


def _check_probability_ignore_index(prob: bool, opts: Options) -> None:
    if prob and opts.ignore_index >= 0:
        raise InputError(f"ignore_index={opts.ignore_index} with probability targets: it "
                         f"applies to class indices only (torch raises too)")


# torch's reduction codes, as torch.nn.functional.cross_entropy passes them on.
_REDUCTION_CODE = {name: _reduction.get_enum(name) for name in ("none", "mean", "sum")}
_FULL_PRECISION = (torch.float32, torch.float64)
_PLAIN = (torch.Tensor, torch.nn.Parameter)  # a Parameter has no __torch_function__ of its own
_I64_MIN, _I64_MAX = -(1 << 63), (1 << 63) - 1
_MAX_COUNT = 1e300  # a count float() converts exactly enough and never overflows


def _plain_count(num_items) -> int | float | None:
    """``num_items`` as the number the checked path divides by
    (:func:`._rules.check_num_items`), where it is a Python number that function accepts
    without a question: an int in ``[1, 2**64)`` (kept an int: torch rounds it to the
    loss's dtype once) or a finite float > 0; ``None`` otherwise (a tensor, a bad value:
    the checked path)."""
    if type(num_items) is int:
        return num_items if 0 < num_items < 1 << 64 else None
    if type(num_items) is float and 0 < num_items <= _MAX_COUNT:
        return num_items
    return None


def _torch_kernel_directly(input, target, ignore_index, reduction, label_smoothing,
                           backend, num_items=None):
    """The common small call (float32/float64 ``(N, C)`` logits under ``2**19`` entries,
    int64 ``(N,)`` targets, torch's options only, or a Python number as ``num_items``; no
    transform, tracing, forward-mode AD or torch-function mode; plain tensors) handed
    straight to the C++ operator that ``torch.nn.functional.cross_entropy`` calls, with
    the same arguments: the route ``"auto"`` takes for it anyway
    (``native_cross_entropy``), without the ~35 us of checks and option objects around
    it, which at 256 x 1000 were 5-10% of a forward + backward step. With ``num_items``:
    the ``"sum"`` divided by it, as the checked path divides. Bad input raises there
    exactly as it does in torch; ``None`` (the checked path) for anything else."""
    count = None
    if num_items is not None:
        count = _plain_count(num_items)
        # only a valid "mean"/"sum" becomes "sum" (anything else: the checked path's error)
        if count is None or type(reduction) is not str or reduction not in ("mean", "sum"):
            return None
        reduction = "sum"
    if (type(input) is not torch.Tensor or type(target) is not torch.Tensor
            or type(ignore_index) is not int or not _I64_MIN <= ignore_index <= _I64_MAX
            or type(reduction) is not str
            or not (type(label_smoothing) is float or type(label_smoothing) is int)
            or not 0.0 <= label_smoothing <= 1.0 or reduction not in _REDUCTION_CODE):
        return None
    if (input.dtype not in _FULL_PRECISION or target.dtype != torch.int64
            or input.dim() != 2 or target.dim() != 1 or input.layout != torch.strided
            or target.layout != torch.strided or target.device != input.device):
        return None
    rows, classes = input.shape
    if (classes == 0 or target.shape[0] != rows
            or rows * classes >= _backends.NATIVE_MAX_LOGITS):
        return None
    if (torch._C._are_functorch_transforms_active() or torch._C._is_tracing()
            or fwAD._current_level >= 0 or torch._C._is_torch_function_mode_enabled()):
        return None
    if backend == "auto" and _backends.small_kernel_fits(
            input.device, input.dtype, rows * classes,
            input.requires_grad and records_graph(), label_smoothing):
        out = _small.cross_entropy(input, target, ignore_index, reduction)
        if out is not None:  # else an index out of range: torch's error below
            return out if count is None else out / count
    out = torch._C._nn.cross_entropy_loss(input, target, None, _REDUCTION_CODE[reduction],
                                          ignore_index, label_smoothing)
    return out if count is None else out / count


def _is_zero(value) -> bool:
    return (type(value) is float or type(value) is int) and value == 0


# torch.compile: the kernels are loops of tensor ops with host-side checks; traced, they
# would unroll into one graph per shape and break at every check. Under dynamo the call is
# one crossent:: custom operator (compilable); dynamo never traces this body.
@overload
def cross_entropy(
    input: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = ...,
    size_average: bool | None = ..., ignore_index: int = ..., reduce: bool | None = ...,
    reduction: str = ..., label_smoothing: float = ..., *, z_loss: float = ...,
    softcap: float | None = ..., inplace_backward: bool = ...,
    loss_dtype: torch.dtype | None = ..., num_items: int | float | torch.Tensor | None = ...,
    backend: str = ..., statistics: None = ...,
) -> torch.Tensor: ...
@overload
def cross_entropy(
    input: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = ...,
    size_average: bool | None = ..., ignore_index: int = ..., reduce: bool | None = ...,
    reduction: str = ..., label_smoothing: float = ..., *, z_loss: float = ...,
    softcap: float | None = ..., inplace_backward: bool = ...,
    loss_dtype: torch.dtype | None = ..., num_items: int | float | torch.Tensor | None = ...,
    backend: str = ..., statistics: str | Sequence[str],
) -> tuple[torch.Tensor, _statistics.TokenStatistics]: ...
# (the two overloads: without statistics a tensor, with them a (loss, statistics) pair)
@compilable("cross_entropy")  # torch.compile: the crossent:: custom operators
def cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    size_average: bool | None = None,
    ignore_index: int = -100,
    reduce: bool | None = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    z_loss: float = 0.0,
    softcap: float | None = None,
    inplace_backward: bool = False,
    loss_dtype: torch.dtype | None = None,
    num_items: int | float | torch.Tensor | None = None,
    backend: str = "auto",
    statistics: str | Sequence[str] | None = None,
) -> torch.Tensor | tuple[torch.Tensor, _statistics.TokenStatistics]:
    """Fused softmax cross-entropy: ``torch.nn.functional.cross_entropy`` with the gradient
    computed in the forward pass, block of rows by block of rows.

    Row loss (index target ``y``, smoothing ``eps``, class weights ``w``, ``C`` classes):
    ``l_n = (1 - eps) w_y (lse_n - z_ny) + (eps / C) sum_c w_c (lse_n - z_nc)
    + z_loss * lse_n^2`` with ``lse_n = log sum_c exp(z_nc)``; with a probability target
    ``t``: ``l_n = -sum_c T_c log softmax(z_n)_c (+ z_loss term)``, ``T = ((1 - eps) t +
    eps / C) * w``, and a zero ``T_c`` contributes exactly 0 even where ``z_nc = -inf``.
    ``softcap=c`` replaces the logits by ``c * tanh(z / c)`` first. The gradient
    ``p * sum_c T_c - T + 2 z_loss lse p`` (times the softcap derivative) is written while
    the block is in cache, so the logits are read once and the gradient written once;
    backward only multiplies the stored gradient by ``grad_output`` (float16 with
    ``"mean"`` or ``num_items``: by ``grad_output / denominator``, see below).

    Args:
        input: logits ``(C)``, ``(N, C)`` or ``(N, C, d1, ...)``; float32, bfloat16 or
            float16 (all arithmetic in float32 inside; loss and gradient in the input dtype).
            ``C = 0`` follows torch: all targets ignored gives NaN (``"mean"``) or 0,
            any other index raises ``IndexError``.
        target: class indices ``()``, ``(N)`` or ``(N, d1, ...)`` (integer), or class
            probabilities shaped like ``input`` (floating; a target that requires grad
            gets torch's gradient, in closed form from the saved logits).
        weight: per-class weights ``(C)``. With class-index targets: of the input's
            dtype (torch raises for another dtype; so does crossent,
            :class:`crossent.InputError`), after ``torch.autocast``'s casts under autocast
            (float16/bfloat16 logits and weight become float32, as torch's). With
            probability targets: any floating dtype, promoting the loss's dtype as torch's
            multiplication does (a float64 weight: a float64 loss), and a weight that
            requires grad gets torch's gradient (closed form); with index targets torch
            raises ("not differentiable with respect to weight"), and so does crossent
            (:class:`crossent.UnsupportedError`).
        size_average, reduce: torch's deprecated pair, mapped to ``reduction`` as torch maps
            them (with a warning); they keep the positional order of torch's signature.
        ignore_index: index targets equal to it give loss 0, gradient 0, and are not counted.
            An integer: a float (3.7, even 3.0) raises :class:`crossent.InputError` (torch
            raises ``TypeError``), never truncated.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (per-row losses, shape of ``target``).
        label_smoothing: eps in [0, 1].
        z_loss: coefficient of ``lse^2`` added per counted row; not class-weighted, but
            under ``"mean"`` divided by the same denominator as the rest (``sum w[y]``
            with class weights: ``"mean"`` is the sum of the ``"none"`` rows over it,
            torch's rule; Liger Kernel divides its z-loss by the counted rows).
        softcap: c > 0 to cap the logits at ``c * tanh(z / c)``; ``None`` for no cap.
        inplace_backward: write the gradient into the logits' own storage: no extra
            ``N x C`` memory, but **the logits tensor is destroyed** (it holds the gradient
            after the call). Only use it when nothing else reads the logits afterwards;
            autograd raises if an op that saved them for its own backward needs them.
            Only an activation's memory is overwritten: for leaf logits, or a view of a
            leaf, the gradient goes to a new buffer and the logits stay intact (their
            ``.grad`` would otherwise share the leaf's memory).
            Where moving the class axis last needs a copy (``(N, C, d1, ...)`` with a
            spatial size above 1, non-contiguous input) the kernel works on the copy
            and the logits stay intact; ``(N, C, 1, ...)`` flattens to a view, which
            is overwritten.
            Double backward through overwritten logits (or an activation's overwritten
            copy) raises :class:`crossent.UnsupportedError`; on a leaf it is torch's.
            Under saved-tensor hooks (``save_on_cpu``, checkpointing) nothing is
            overwritten: torch skips its version checks there.
        loss_dtype: the dtype of the returned loss, e.g. ``torch.float32`` for a float32
            loss from bfloat16 logits outside autocast (the arithmetic is float32 either
            way; only the final rounding changes). Default ``None``: torch's, the input's
            dtype, or float32 for float16/bfloat16 logits under ``torch.autocast`` (torch
            runs cross_entropy in float32 there). The gradient keeps the input's dtype.
        num_items: the count the summed loss is divided by, instead of ``"mean"``'s own
            denominator: the loss is ``sum_n l_n / num_items`` (``"mean"`` and ``"sum"``
            alike; ``"none"`` raises :class:`crossent.InputError`). For gradient
            accumulation and data parallelism: give every micro-batch (every rank) the
            whole batch's count of non-ignored targets (``sum_n w[y_n]`` with class
            weights) and the summed micro-batch losses (and gradients) equal the full
            batch's mean, where the mean of micro-batch means does not (the Hugging Face
            Trainer's ``num_items_in_batch``). A positive int, float or 0-d tensor
            (one host synchronisation to check it; a constant: one that requires grad
            raises :class:`crossent.UnsupportedError`); 0, negative, NaN or inf raise
            :class:`crossent.InputError`. Every rows' gradient is scaled by
            ``1 / num_items``, on every backend and autograd path. A tensor changed in
            place before backward raises, as torch's ``sum / n`` (which saves ``n``).
        backend: which kernel computes the loss (:mod:`crossent.torch._backends`):
            ``"auto"`` (default: torch's own kernel or the small-batch fused kernel
            for small inputs with torch's options, and on CPU for rows of few classes
            with torch's options (below 64 classes, or under ``2**23`` logits for the
            small-batch kernel; below 32 classes, or 256 for ``(N, C, d1, ...)``
            logits, torch's kernel) unless ``inplace_backward`` asks for the logits'
            memory, the Triton kernels for CUDA/ROCm tensors when triton is installed
            and the call needs nothing they lack, else crossent's row-block kernel);
            ``"native"`` (``torch.nn.functional.cross_entropy`` in float32: torch's
            numbers, torch's probability-target NaN included; ``z_loss``/``softcap``
            raise :class:`crossent.UnsupportedError`); ``"rowblock"`` (crossent's
            row-block kernel at every size); ``"triton"`` (the Triton kernels, on CPU
            tensors only under ``TRITON_INTERPRET=1``; a target or weight gradient, a
            transform or ``C = 0`` raise :class:`crossent.UnsupportedError` naming it).
        statistics: per-token statistics from the same pass, e.g.
            ``statistics=("lse", "z_loss", "target_logprob", "accuracy", "entropy")``
            (any subset, or one name; another name raises :class:`crossent.InputError`).
            The call then returns ``(loss, stats)``, ``stats`` a
            :class:`crossent.torch.TokenStatistics`: one field per statistic (``None``
            where not asked) plus the bool ``counted`` mask, each of the target's row
            shape (as ``reduction="none"``), detached (no gradient flows through them),
            float32 (float64 for float64 input; ``accuracy`` bool). With ``z`` the
            (softcapped) logits and ``p = softmax(z)``: ``lse = logsumexp(z)``;
            ``z_loss = z_loss * lse^2``, the term the loss adds per row (zeros for
            ``z_loss=0``); ``target_logprob = log p_y`` (minus the unsmoothed, unweighted
            cross-entropy); ``accuracy = argmax(z) == y`` (the first of tied maxima, as
            ``torch.argmax``); ``entropy = -sum_c p_c log p_c``. Ignored rows hold NaN
            (``accuracy`` False; ``counted`` False), so ``stats.entropy.nanmean()`` averages
            the counted tokens. Probability targets: ``lse``, ``z_loss`` and ``entropy``;
            ``target_logprob`` and ``accuracy`` raise :class:`crossent.UnsupportedError`.
            Cost on the fused kernel (per block, while it is in cache; nothing when
            ``statistics=None``): ``lse``/``z_loss`` nothing but O(N) (two max passes for
            probability targets), ``target_logprob`` two gathers, ``accuracy`` an argmax
            pass over the logits, ``entropy`` a ``-p log p`` pass (a log per logit) and a
            sum (measured at N=2048, C=32000 float32, forward+backward on a shared 2-core
            CPU, two runs: all five 1.7-1.8x the kernel's time without them,
            ``entropy`` 1.4-1.5x, ``accuracy`` 1.2-1.3x, the other three 1.01-1.04x).
            torch's kernel (small inputs) and the composable path compute them from the
            logits with torch ops; ``backend="triton"`` raises
            :class:`crossent.UnsupportedError` (``"auto"`` then takes the row-block
            kernel).

    Reduction rules (PyTorch's): ``"mean"`` divides the summed row losses (and z-loss
    terms) by the number of non-ignored rows, or by ``sum_n w[y_n]`` with class weights;
    with probability targets by the number of rows (weights not in the denominator). All
    rows ignored with ``"mean"``: NaN (0/0), as in PyTorch; ``"sum"``: 0. ``reduction="none"``
    gives correct gradients for any ``grad_output``.

    Memory: one ``N x C`` gradient buffer in the input dtype (none with
    ``inplace_backward`` on an activation's logits, not a leaf's). On CPU that buffer is
    kept after autograd has consumed it and handed to the next call of the same size,
    which skips the page faults of a fresh 500 MiB allocation (about 2/3 of the time at
    N=4096, C=32000); a buffer anything still references (a kept ``.grad``, a view) is
    never reused. :func:`crossent.torch.empty_cache` releases the kept buffers,
    ``crossent.torch.set_buffer_reuse(False)`` turns reuse off.

    Small inputs (under ``2**19`` logits) with index targets and neither ``z_loss`` nor
    ``softcap`` run ``torch.nn.functional.cross_entropy`` itself, in float32 (gradient
    rounded once for low precision): there torch's C++ kernel beats the fused kernel's
    Python dispatch (about 0.06 ms against 0.35 ms at 64 x 10). ``inplace_backward`` then
    leaves the logits intact. The commonest such call (float32/float64 ``(N, C)`` logits,
    int64 ``(N,)`` targets, only torch's own options or a Python-number ``num_items``,
    plain tensors, no transform) goes straight to the C++ operator ``F.cross_entropy``
    calls, with torch's arguments (``"sum"`` then divided by the count), so it costs what
    torch eager costs (crossent's checks took ~35 us of a 0.6 ms step at
    256 x 1000); an out-of-range class index raises torch's ``IndexError`` there, as on
    every torch-kernel call, and a bad option still takes the checked path and its
    :class:`crossent.InputError`. Where such float32/float64 CPU logits need a gradient,
    from 240 000 logits on and with neither class weights nor label smoothing,
    ``"auto"`` runs a fused kernel of a dozen tensor operations instead
    (:mod:`crossent.torch._small`): torch's numbers, one ``N x C`` tensor written where
    torch eager writes three (0.73-0.99x eager's time at 256 x 1000 on a 2-core CPU).

    Under ``torch.no_grad()`` or for logits that need no gradient, only the loss is
    computed. The stored gradient is consumed by the first backward: backward twice
    (``retain_graph=True``) raises, except for float64 input (kept, scaled out of place,
    so ``torch.autograd.gradcheck`` works) and on the small-batch kernel (the second
    backward recomputes with torch's own ``cross_entropy``).

    Autograd contract (torch's numbers or an error, never a constant gradient):
    double backward (``create_graph=True``: Hessians, gradient penalties, MAML) recomputes
    the gradient in backward with differentiable torch ops from the saved logits (which
    therefore stay alive until backward; an in-place change of them raises).
    ``torch.func.grad``/``vmap``/``jvp``/``jacrev``/``jacfwd``, forward-mode AD
    (``torch.autograd.forward_ad``), ``torch.jit.trace`` and ``C = 0`` take the composable
    path: the same loss in plain torch ops (torch's memory: ``N x C`` intermediates), see
    :mod:`crossent.torch._composite`; so do target/weight gradients with
    ``inplace_backward=True`` (which then leaves the logits intact). Otherwise the
    gradients of a probability target and of class weights are closed forms computed in
    backward, block by block, from the saved logits
    (``dL/dt_nc = -(1 - eps) w_c r_n log p_nc``,
    ``dL/dw_c = -sum_n r_n ((1 - eps) t_nc + eps / C) log p_nc``, ``r_n`` the row's
    ``grad_output`` times ``1/N`` or 1). Low-precision gradients: formed in float32 and
    stored in the logits' dtype in forward; a ``grad_output`` other than 1 multiplies the
    stored gradient (a second rounding, as torch's own bf16 backward rounds more than
    once; none for a power of two, a ``GradScaler``'s scale). float16 with ``"mean"`` (or
    ``num_items``) on the row-block and Triton kernels: ``p - onehot`` times the
    significand of ``1 / denominator`` (of ``max|w| / denominator`` with class weights;
    where that is under 1) is stored in float16 and backward multiplies it by
    ``grad_output`` times that power of two in float32
    (:func:`crossent.torch._rules.defers_mean_scale`, :func:`~crossent.torch._rules.split_scale`),
    rounded once at a power-of-two ``grad_output`` but for entries stored in float16's
    subnormal range (one subnormal step, 6e-8, times ``grad_output x 2**e`` at most: at a
    ``GradScaler``'s scale most entries' bits differ from torch's, the error against
    float64 is torch's), so a loss scale's small gradients
    survive, where ``(p - onehot) / N`` fell under float16's subnormals before a
    ``GradScaler`` could lift them (2048 x 8192, a ``GradScaler``'s 65536: error 1.08e-4
    against float64, torch's own float16 error 1.08e-4).

    Reference: ``torch.nn.functional.cross_entropy``; :func:`crossent.softmax_cross_entropy`
    for ``z_loss`` and ``softcap``; the fused-kernel idea of Liger-Kernel (Hsu et al. 2024,
    arXiv:2410.10989) and of Apple's Cut Cross-Entropy (Wijmans et al. 2024, arXiv:2411.09009).

    >>> import torch
    >>> logits = torch.zeros(2, 3, requires_grad=True)
    >>> loss = cross_entropy(logits, torch.tensor([0, 2]))
    >>> round(loss.item(), 6)  # ln 3
    1.098612
    >>> loss.backward()
    >>> logits.grad[0]  # (softmax - onehot) / N
    tensor([-0.3333,  0.1667,  0.1667])
    >>> half = cross_entropy(torch.zeros(2, 3), torch.tensor([0, 2]), num_items=4)
    >>> round(half.item(), 6)  # 2 ln 3 / 4: one of two equal micro-batches of 4 rows
    0.549306
    >>> loss, stats = cross_entropy(torch.tensor([[2.0, 0.0, 0.0]] * 2),
    ...                             torch.tensor([0, -100]), statistics=("accuracy", "lse"))
    >>> stats.accuracy, stats.counted, stats.lse.isnan().tolist()
    (tensor([ True, False]), tensor([ True, False]), [False, True])
    """
    if (weight is None and softcap is None and _is_zero(z_loss) and loss_dtype is None
            and statistics is None and size_average is None
            and reduce is None and type(backend) is str and backend in ("auto", "native")
            and type(inplace_backward) is bool):
        out = _torch_kernel_directly(input, target, ignore_index, reduction, label_smoothing,
                                     backend, num_items)
        if out is not None:
            return out
    if size_average is not None or reduce is not None:
        reduction = _legacy_reduction(size_average, reduce)
    backend = _backends.check_backend(backend)
    # bool("False") is True: a flag that destroys the logits takes True or False only
    inplace_backward = check_flag(inplace_backward, "inplace_backward")
    names = _statistics.check_statistics(statistics)
    # the (M, C) logits are formed once the route is known: torch's kernel takes
    # (N, C, d1, ...) as it is, where the rows would be a transposing copy
    source, flat_target, row_shape = _checked_shapes(input, target)
    num_classes = source.shape[1]
    out_dtype = choose_loss_dtype(loss_dtype, source, flat_target, weight)
    opts = make_options(weight, num_classes, source, ignore_index, reduction, label_smoothing,
                    z_loss, softcap, autocast_dtype(source, source.device.type), num_items,
                    flat_target.is_floating_point())
    grad_on = records_graph()
    prob = flat_target.is_floating_point()
    _check_probability_ignore_index(prob, opts)
    _statistics.refuse_for_probabilities(names, prob, "cross_entropy")
    weight_grad = grad_on and weight is not None and weight.requires_grad
    if weight_grad and not prob:
        raise UnsupportedError(
            "crossent.torch.cross_entropy: no gradient for weight with class-index targets "
            "(torch.nn.functional.cross_entropy raises too: nll_loss is not differentiable "
            "with respect to weight); detach it or use probability targets"
        )
    target_grad = grad_on and prob and flat_target.requires_grad
    call = _backends.Call(
        "cross_entropy", source.device, source.numel(), not prob, opts.z_loss, opts.softcap,
        _backends.composite_reason(num_classes,
                                   inplace_backward and (weight_grad or target_grad),
                                   source, flat_target, weight),
        _statistics.triton_refusal(names) or _backends.triton_refusal(
            target_grad=target_grad, weight_grad=weight_grad),
        dtype=source.dtype, needs_grad=grad_on and source.requires_grad,
        weighted=weight is not None, label_smoothing=opts.label_smoothing,
        plain=(type(input) in _PLAIN and type(target) in _PLAIN
               and not torch._C._is_torch_function_mode_enabled()),
        subclass=_backends.own_dispatch(input, target, weight),
        fake=fake_values(input, target, weight), num_classes=num_classes,
        spatial=source.dim() > 2,
        # decided once, here, on the caller's tensor (never a leaf's memory, nor a
        # leaf's flattened copy: its double backward recomputes from the copy)
        inplace=inplace_backward and may_overwrite(input),
        # (the opt-in, and $CROSSENT_COMPILED_KERNEL, read only where auto could use it)
        compiled_kernel=(backend == "auto" and not prob and opts.label_smoothing == 0
                         and names is None and _inductor.takes(source.dtype, source.device)))
    if _backends.wants_neg_inf_check(backend, call, _backends.NATIVE_MAX_LOGITS):
        call = dataclasses.replace(call, no_neg_inf=not _backends.has_neg_inf(source))
    route = _backends.choose_backend(backend, call, _backends.NATIVE_MAX_LOGITS)
    if route != "native" or names is not None:
        logits = logit_rows(source, row_shape)
    stats = None
    with within_fake_mode(call.fake, input, target, weight):
        if route == "native":  # torch checks the indices
            out = native_cross_entropy(input, target, weight, opts, out_dtype)
            if names is not None:
                stats = _statistics.from_logits(names, logits, flat_target, opts)
        else:
            with no_autocast(logits.device.type):
                if route in ("composite", "small"):  # statistics from the logits, as "native"
                    if route == "composite":
                        out = _composite.cross_entropy(logits, flat_target, weight,
                                                       opts).to(out_dtype)
                    else:
                        out = _small_cross_entropy(input, target, logits, flat_target, opts,
                                                   out_dtype)
                    if names is not None:
                        stats = _statistics.from_logits(names, logits, flat_target, opts)
                else:
                    inplace = call.inplace
                    if route == "triton":
                        out = _triton_cross_entropy(logits, flat_target, weight, opts, inplace,
                                                    out_dtype)
                    else:
                        out, stats = _fused_cross_entropy(logits, flat_target, weight, opts,
                                                          inplace, out_dtype, names)
    out = watch_num_items(out, "cross_entropy", input, target, num_items)
    out = out.reshape(row_shape) if reduction == "none" else out
    if names is None:
        return out
    assert stats is not None
    return out, _statistics.reshape(stats, row_shape)


def _small_cross_entropy(input, target, logits, flat_target, opts, out_dtype):
    """The few-operation fused kernel (:mod:`._small`) on the flattened ``(M, C)`` logits;
    ``num_items`` divides its sum. A class index out of range: torch's kernel raises
    torch's error (as on the ``"native"`` route)."""
    copied = flat_target.dtype != torch.int64
    if copied:
        check_index_dtype(flat_target)
        flat_target = flat_target.long()
    out = _small.cross_entropy(logits, flat_target, opts.ignore_index, kernel_reduction(opts))
    if out is None:
        return native_cross_entropy(input, target, None, opts, out_dtype)
    out = divide_by_num_items(out, opts)
    out = out if out.dtype == out_dtype else out.to(out_dtype)
    return _watch_copies(out, "cross_entropy", input, target, opts, copied)


def _triton_cross_entropy(logits, flat_target, weight, opts, inplace, out_dtype):
    """The Triton kernel (:mod:`._triton`), options already checked; ``num_items``
    divides its sum."""
    from ._triton import triton_cross_entropy

    out = triton_cross_entropy(
        logits, flat_target, None if weight is None else weight.detach(),
        ignore_index=opts.ignore_index, reduction=kernel_reduction(opts),
        label_smoothing=opts.label_smoothing, z_loss=opts.z_loss, softcap=opts.softcap,
        inplace_backward=inplace, loss_dtype=compute_dtype(logits.dtype),
        saved_weight=opts.saved_weight)
    return divide_by_num_items(out, opts).to(out_dtype)  # rounded once, from float32


def _fused_cross_entropy(logits, flat_target, weight, opts, inplace, out_dtype, names=None):
    """The row-block kernel's loss, and with ``names`` its statistics (else None)."""
    num_rows, num_classes = logits.shape
    rows = prepare_rows(flat_target, num_rows, num_classes, opts, compute_dtype(logits.dtype))
    stats = None if names is None else _statistics.RowStatistics(
        names, num_rows, rows.index, compute_dtype(logits.dtype), logits.device)
    if records_graph() and any(v is not None and v.requires_grad
                                       for v in (logits, flat_target, weight)):
        out = _CrossEntropyFunction.apply(logits, flat_target, weight, rows, opts, inplace,
                                          out_dtype, stats)
    else:
        with torch.no_grad():
            extra = {} if stats is None else stats.kernel_args(0, num_rows)
            losses = cross_entropy_rows(logits, flat_target, rows, opts, **extra)
            out = reduce_losses(losses, rows, opts.reduction).to(out_dtype)
    if stats is None:
        return out, None
    return out, _statistics.finish(stats, opts, _statistics.counted_rows(rows, num_rows))
