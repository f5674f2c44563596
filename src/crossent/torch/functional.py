"""Fused cross-entropy for PyTorch: the gradient is computed during the forward pass.

``cross_entropy`` is a drop-in for ``torch.nn.functional.cross_entropy`` (same positional
signature, deprecated ``size_average``/``reduce`` included; class dimension 1) and
``linear_cross_entropy`` for ``torch.nn.functional.linear_cross_entropy`` (same argument
order). Both accept crossent's
``z_loss`` and ``softcap`` too, and ``num_items`` (the summed loss over a caller's count,
for gradient accumulation), ``backend`` and, on the linear head, ``shift`` (the causal-LM
label shift). Device-agnostic (CPU and CUDA): plain tensor operations applied to blocks
of rows (:mod:`crossent.torch._kernels`), torch's own kernel for small inputs, the Triton
kernels on GPUs; :func:`crossent.torch._backends.choose_backend` decides which, per call.
"""

from __future__ import annotations

import contextlib
import math
import operator
import warnings

import torch
import torch.nn.functional as F

from ..errors import InputError, UnsupportedError
from . import _backends, _buffers, _composite
from ._kernels import (
    Options,
    block_rows,
    check_index_dtype,
    check_num_items,
    check_options,
    compute_dtype,
    cross_entropy_rows,
    divide_by_num_items,
    kernel_reduction,
    prepare_rows,
    reduce_losses,
)

__all__ = ["cross_entropy", "linear_cross_entropy"]

_CHUNK_BYTES = 16 << 20  # smallest logits chunk of the linear head


def _default_chunk(num_classes: int, features: int, itemsize: int) -> int:
    """Rows per linear chunk: logits of a quarter of the float32 dW's bytes (``C D``
    bytes), at least 16 MiB, in a multiple of 32 rows (at least 32).

    Why: the extra memory stays a fixed fraction of a gradient that exists anyway, and
    the chunk matmuls get enough rows to run near full speed: with fewer rows each matmul
    re-reads (and re-packs) all of ``W``. Measured on a 2-core CPU at D=512, C=32000:
    128 float32 rows ran at 0.95-1.03x the unfused time over three runs, 64 rows at
    1.15-1.25x (C=128256: 0.70-0.97x and 0.84x); bfloat16 needs 256 rows (0.87-0.94x;
    128 rows: 1.2x)."""
    budget = max(_CHUNK_BYTES, num_classes * features)
    return max(32, budget // (itemsize * max(num_classes, 1)) // 32 * 32)


def _scale_stored(grad: torch.Tensor, grad_output: torch.Tensor, reduction: str) -> None:
    if reduction == "none":
        grad.mul_(grad_output.reshape(-1, 1))
    elif not bool(grad_output == 1):  # the common loss.backward(): skip a pass over N x C
        grad.mul_(grad_output)


def _take(ctx, name: str):
    """The stored gradient, released from ``ctx`` so autograd can adopt it without a copy.

    float64 (the dtype of gradcheck and reference checks) keeps it instead: backward then
    scales a copy, so repeated backward through the graph works."""
    value = getattr(ctx, name)
    if ctx.keep:
        return value
    if value is None:
        raise RuntimeError(
            "crossent.torch: backward ran twice through a fused cross-entropy; its gradient "
            "is computed in forward and consumed by the first backward (retain_graph is "
            "not supported)"
        )
    setattr(ctx, name, None)
    return value


def _check_intact(ctx, name: str) -> None:
    """The inputs saved for a double backward are what forward saw."""
    for t, version in zip(ctx.inputs, ctx.versions, strict=True):
        if t is not None and t._version != version:
            raise RuntimeError(
                f"crossent.torch.{name}: an input was modified in place after the forward "
                f"pass; backward with create_graph=True recomputes from it"
            )


def _double_backward(ctx, grad_output, name: str, loss_fn):
    """Backward with ``create_graph=True`` (grad mode on inside backward): the fused
    kernel's stored gradient is a constant to autograd, so the gradient is recomputed
    from the saved inputs with differentiable torch ops (:mod:`._composite`) and returned
    with its graph: Hessians, gradient penalties and MAML get torch's numbers."""
    if getattr(ctx, "inplace", False):
        raise UnsupportedError(
            f"crossent.torch.{name}: double backward (backward with create_graph=True, "
            f"torch.autograd.grad(..., create_graph=True)) is not supported with "
            f"inplace_backward=True: the logits were overwritten by their gradient"
        )
    _check_intact(ctx, name)
    wanted = [t for t, need in zip(ctx.inputs, ctx.needs_input_grad, strict=False)
              if need and t is not None]
    with torch.enable_grad(), _no_autocast(ctx.device_type):
        loss = loss_fn(*ctx.inputs).to(grad_output.dtype)
        grads = iter(torch.autograd.grad(loss, wanted, grad_output, create_graph=True,
                                         allow_unused=True))
    return [next(grads) if need and t is not None else None
            for t, need in zip(ctx.inputs, ctx.needs_input_grad, strict=False)]


def _no_autocast(device_type: str):
    """The fused kernels choose their own dtypes; autocast must not re-cast their ops."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _save_inputs(ctx, *inputs) -> None:
    """Keep the inputs (with their autograd history) for a double backward. A reference,
    not a copy: the inputs of a loss are alive until backward in a training step anyway."""
    ctx.inputs = inputs
    ctx.versions = [None if t is None else t._version for t in inputs]


class _CrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, weight, rows, opts, inplace, out_dtype):
        need_logits = ctx.needs_input_grad[0]
        grad = None
        if need_logits:
            grad = logits if inplace else _buffers.empty(logits.shape, logits.dtype, logits)
        losses = cross_entropy_rows(logits, target, rows, opts, grad)
        ctx.grad, ctx.reduction, ctx.rows = grad, opts.reduction, rows
        ctx.keep = logits.dtype == torch.float64
        ctx.inplace, ctx.opts, ctx.device_type = inplace, opts, logits.device.type
        _save_inputs(ctx, *((None, None, None) if inplace else (logits, target, weight)))
        return reduce_losses(losses, rows, opts.reduction).to(out_dtype)

    @staticmethod
    def backward(ctx, grad_output):
        if torch.is_grad_enabled():  # create_graph=True
            grads = _double_backward(
                ctx, grad_output, "cross_entropy",
                lambda z, t, w: _composite.cross_entropy(z, t, w, ctx.opts))
            return (*grads, None, None, None, None)
        grad = None
        if ctx.needs_input_grad[0]:
            grad = _take(ctx, "grad")
            grad = grad.clone() if ctx.keep else grad
            _scale_stored(grad, grad_output, ctx.reduction)
        dt, dw = None, None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            dt, dw = _target_weight_grads(ctx, grad_output)
        return grad, dt, dw, None, None, None, None


def _target_weight_grads(ctx, grad_output):
    """Closed forms for probability targets, from the saved logits, block by block:
    with ``T = ((1 - eps) t + eps / C) w`` and row scale ``r_n`` (the reduction's
    ``1/N`` or 1, times ``grad_output``), ``dL/dt_nc = -(1 - eps) w_c r_n log p_nc`` and
    ``dL/dw_c = -sum_n r_n ((1 - eps) t_nc + eps / C) log p_nc``, where a ``T_nc = 0``
    facing ``log p_nc = -inf`` counts 0 (the loss's own rule)."""
    z, t, weight = ctx.inputs
    _check_intact(ctx, "cross_entropy")
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
        mix = t[i:j].detach().to(cdtype) * (1.0 - eps) + eps / num_classes
        logp = _composite.zero_unused(mix if w is None else mix * w, logp)
        logp.mul_(scale[i:j].unsqueeze(1))
        if dt is not None:
            dt[i:j] = logp * (-(1.0 - eps) if w is None else -(1.0 - eps) * w)
        if dw is not None:
            dw -= (mix * logp).sum(0)
    return dt, None if dw is None else dw.to(weight.dtype)


def _check_ignore_index(ignore_index) -> int:
    """An integer (Python int, NumPy integer, integer 0-d tensor). torch raises
    ``TypeError`` for a float, even 3.0; crossent raises :class:`InputError`, never
    truncates (3.7 is not 3)."""
    if isinstance(ignore_index, bool):
        raise InputError(f"ignore_index={ignore_index!r} must be an integer, not a bool")
    try:
        return operator.index(ignore_index)
    except TypeError:
        raise InputError(f"ignore_index={ignore_index!r} must be an integer (torch raises "
                         f"TypeError for a float, even an integral one)") from None


def _positive_int(value, name: str) -> int:
    try:
        n = None if isinstance(value, bool) else operator.index(value)
    except TypeError:
        n = None
    if n is None or n < 1:
        raise InputError(f"{name}={value!r} must be an integer >= 1 (or None)")
    return n


def _options(weight, num_classes, like, ignore_index, reduction, label_smoothing, z_loss,
             softcap, input_dtype=None, num_items=None) -> Options:
    """Checked options; ``opts.weight`` is a detached copy in the compute dtype (the
    fused kernels' constant). ``input_dtype``: the dtype torch would compare ``weight``
    with (the logits' dtype, float32 for low-precision logits under autocast). With
    ``num_items`` the reduction is ``"mean"`` over that count (see
    :func:`~crossent.torch._kernels.check_num_items`)."""
    check_options(reduction, label_smoothing, z_loss, softcap)
    count = check_num_items(num_items, reduction)
    ignore = -100 if ignore_index is None else _check_ignore_index(ignore_index)
    if weight is not None:
        if not isinstance(weight, torch.Tensor):
            raise InputError(f"weight must be a tensor of {num_classes} class weights, got "
                             f"{type(weight).__name__}")
        if tuple(weight.shape) != (num_classes,):
            raise InputError(
                f"weight has shape {tuple(weight.shape)}; expected ({num_classes},), "
                f"one weight per class"
            )
        want = like.dtype if input_dtype is None else input_dtype
        if _autocast_dtype(weight, like.device.type) != want:
            raise InputError(
                f"weight has dtype {weight.dtype}; expected the input's {want} (as "
                f"torch.nn.functional.cross_entropy, which raises too)"
            )
        weight = weight.detach().to(device=like.device, dtype=compute_dtype(like.dtype))
    return Options(
        weight, ignore, float(label_smoothing),
        float(z_loss), None if softcap is None else float(softcap),
        reduction if count is None else "mean", count,
    )


_LOW = (torch.float16, torch.bfloat16)


def _autocast_dtype(t: torch.Tensor, device_type: str) -> torch.dtype:
    """The dtype a cross-entropy argument has after autocast's float32 policy (torch lists
    cross_entropy among the ops autocast runs in float32: float16/bfloat16 become
    float32)."""
    if t.dtype in _LOW and torch.is_autocast_enabled(device_type):
        return torch.float32
    return t.dtype


def _loss_dtype(loss_dtype, logits: torch.Tensor) -> torch.dtype:
    """``loss_dtype`` if given, else torch's: the logits' dtype, float32 under autocast."""
    if loss_dtype is None:
        return _autocast_dtype(logits, logits.device.type)
    if not (isinstance(loss_dtype, torch.dtype) and loss_dtype.is_floating_point
            and not loss_dtype.is_complex):
        raise InputError(f"loss_dtype={loss_dtype!r} must be a floating torch.dtype "
                         f"(e.g. torch.float32) or None")
    return loss_dtype


def _flatten(input: torch.Tensor, target: torch.Tensor):
    """(N, C, d1, ...) -> (M, C) logits, (M,) or (M, C) target, and the per-row shape."""
    if not isinstance(input, torch.Tensor) or not input.is_floating_point():
        raise InputError(f"input must be a floating tensor of logits, got "
                         f"{getattr(input, 'dtype', type(input).__name__)}")
    if not isinstance(target, torch.Tensor):
        raise InputError(f"target must be a tensor, got {type(target).__name__}")
    if input.dim() == 0:
        raise InputError("input must have a class dimension; got a 0-d tensor")
    num_classes = input.shape[0 if input.dim() == 1 else 1]
    if input.dim() == 1:
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
        target = target.reshape(-1)
    logits = (input if input.dim() == 2
              else input.movedim(1, -1).reshape(math.prod(row_shape), num_classes))
    return logits.contiguous(), target, row_shape


# Below this many logits torch's own C++ kernel wins: the fused kernel's ~60 tensor
# operations of Python dispatch cost ~0.3 ms, torch eager takes 0.04 ms at 64 x 10 and
# 0.2 ms at 256 x 1000; the two cross between 0.5 and 1.5 M logits on a 2-core CPU.
# (Read at every call: the tests lower it to send small inputs through the fused kernel.)
_NATIVE_MAX_LOGITS = 1 << 19


def _legacy_reduction(size_average: bool | None, reduce: bool | None) -> str:
    """torch's mapping of the deprecated ``size_average``/``reduce`` (None counts as True)."""
    name = "none" if reduce is False else "sum" if size_average is False else "mean"
    warnings.warn(f"size_average and reduce are deprecated (as in torch); use "
                  f"reduction={name!r}", UserWarning, stacklevel=3)
    return name


def _native_cross_entropy(input: torch.Tensor, target: torch.Tensor,
                          weight: torch.Tensor | None, opts: Options,
                          out_dtype: torch.dtype) -> torch.Tensor:
    """``torch.nn.functional.cross_entropy`` with the arithmetic in float32 (float64
    stays): low-precision logits are converted first and the gradient rounded once.
    Every cast is differentiable, so torch computes the target's and the weight's
    gradients itself (and double backward, transforms); ``num_items`` divides the sum."""
    cdtype = compute_dtype(input.dtype)
    if target.is_floating_point():
        target = target.to(cdtype)
    else:
        check_index_dtype(target)
        target = target.long()
    if weight is not None:
        weight = weight.to(device=input.device, dtype=cdtype)
    out = F.cross_entropy(input.to(cdtype), target, weight, ignore_index=opts.ignore_index,
                          reduction=kernel_reduction(opts),
                          label_smoothing=opts.label_smoothing)
    return divide_by_num_items(out, opts).to(out_dtype)


def _composite_reason(num_classes: int, inplace_grads: bool, *tensors) -> str | None:
    """What needs the composable path (plain torch ops), in words, or None."""
    if num_classes == 0:
        return "C = 0 (no classes)"
    if inplace_grads:
        return "target or weight gradients with inplace_backward=True"
    if _composite.composable_required(*tensors):
        return "torch.func transforms, forward-mode AD or torch.jit.trace"
    return None


def _triton_refusal(input_dtype: torch.dtype, out_dtype: torch.dtype, *, target_grad: bool,
                    weight_grad: bool, retain: bool = False) -> str | None:
    """What of this call the Triton kernels do not support, in words, or None."""
    if target_grad:
        return "a gradient for the target (probability targets that require grad)"
    if weight_grad:
        return "a gradient for the class weight"
    if retain:
        return "options.allow_retain_graph=True (backward twice)"
    if input_dtype in _LOW and out_dtype != input_dtype:
        return (f"a {out_dtype} loss from {input_dtype} input (loss_dtype, or autocast's "
                f"float32 loss): the Triton kernels return the loss in the input's dtype")
    return None


def _check_probability_ignore_index(prob: bool, opts: Options) -> None:
    if prob and opts.ignore_index >= 0:
        raise InputError(f"ignore_index={opts.ignore_index} with probability targets: it "
                         f"applies to class indices only (torch raises too)")


# torch.compile: the kernels are loops of tensor ops with host-side checks; traced, they
# would unroll into one graph per shape and break at every check. Run them as they are.
@torch.compiler.disable
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
) -> torch.Tensor:
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
    backward only multiplies the stored gradient by ``grad_output``.

    Args:
        input: logits ``(C)``, ``(N, C)`` or ``(N, C, d1, ...)``; float32, bfloat16 or
            float16 (all arithmetic in float32 inside; loss and gradient in the input dtype).
            ``C = 0`` follows torch: all targets ignored gives NaN (``"mean"``) or 0,
            any other index raises ``IndexError``.
        target: class indices ``()``, ``(N)`` or ``(N, d1, ...)`` (integer), or class
            probabilities shaped like ``input`` (floating; a target that requires grad
            gets torch's gradient, in closed form from the saved logits).
        weight: per-class weights ``(C)``, of the input's dtype (torch raises for another
            dtype; so does crossent, :class:`crossent.InputError`). With probability
            targets a weight that requires grad gets torch's gradient (closed form);
            with index targets torch raises ("not differentiable with respect to
            weight"), and so does crossent (:class:`crossent.UnsupportedError`).
        size_average, reduce: torch's deprecated pair, mapped to ``reduction`` as torch maps
            them (with a warning); they keep the positional order of torch's signature.
        ignore_index: index targets equal to it give loss 0, gradient 0, and are not counted.
            An integer: a float (3.7, even 3.0) raises :class:`crossent.InputError` (torch
            raises ``TypeError``), never truncated.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (per-row losses, shape of ``target``).
        label_smoothing: eps in [0, 1].
        z_loss: coefficient of ``lse^2`` added per counted row; not class-weighted.
        softcap: c > 0 to cap the logits at ``c * tanh(z / c)``; ``None`` for no cap.
        inplace_backward: write the gradient into the logits' own storage: no extra
            ``N x C`` memory, but **the logits tensor is destroyed** (it holds the gradient
            after the call). Only use it when nothing else reads the logits afterwards;
            autograd raises if an op that saved them for its own backward needs them.
            For ``(N, C, d1, ...)`` or non-contiguous input the kernel works on a copy.
            Double backward then raises :class:`crossent.UnsupportedError`.
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
            ``1 / num_items``, on every backend and autograd path.
        backend: which kernel computes the loss (:mod:`crossent.torch._backends`):
            ``"auto"`` (default: torch's own kernel for small inputs with torch's
            options, the Triton kernels for CUDA/ROCm tensors when triton is installed
            and the call needs nothing they lack, else crossent's row-block kernel);
            ``"native"`` (``torch.nn.functional.cross_entropy`` in float32: torch's
            numbers, torch's probability-target NaN included; ``z_loss``/``softcap``
            raise :class:`crossent.UnsupportedError`); ``"rowblock"`` (crossent's
            row-block kernel at every size); ``"triton"`` (the Triton kernels, on CPU
            tensors only under ``TRITON_INTERPRET=1``; a target or weight gradient, a
            transform, ``C = 0`` or a loss dtype other than low-precision input's raise
            :class:`crossent.UnsupportedError` naming it).

    Reduction rules (PyTorch's): ``"mean"`` divides the summed row losses (and z-loss
    terms) by the number of non-ignored rows, or by ``sum_n w[y_n]`` with class weights;
    with probability targets by the number of rows (weights not in the denominator). All
    rows ignored with ``"mean"``: NaN (0/0), as in PyTorch; ``"sum"``: 0. ``reduction="none"``
    gives correct gradients for any ``grad_output``.

    Memory: one ``N x C`` gradient buffer in the input dtype (none with
    ``inplace_backward``). On CPU that buffer is kept after autograd has consumed it and
    handed to the next call of the same size, which skips the page faults of a fresh
    500 MiB allocation (about 2/3 of the time at N=4096, C=32000); a buffer anything still
    references (a kept ``.grad``, a view) is never reused. :func:`crossent.torch.empty_cache`
    releases the kept buffers, ``crossent.torch.set_buffer_reuse(False)`` turns reuse off.

    Small inputs (under ``2**19`` logits) with index targets and neither ``z_loss`` nor
    ``softcap`` run ``torch.nn.functional.cross_entropy`` itself, in float32 (gradient
    rounded once for low precision): there torch's C++ kernel beats the fused kernel's
    Python dispatch (about 0.06 ms against 0.35 ms at 64 x 10). ``inplace_backward`` then
    leaves the logits intact.

    Under ``torch.no_grad()`` or for logits that need no gradient, only the loss is
    computed. The stored gradient is consumed by the first backward: backward twice
    (``retain_graph=True``) raises, except for float64 input (kept, scaled out of place,
    so ``torch.autograd.gradcheck`` works).

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
    rounded once in forward; a ``grad_output`` other than 1 multiplies the rounded
    gradient (a second rounding, as torch's own bf16 backward rounds more than once).

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
    """
    if size_average is not None or reduce is not None:
        reduction = _legacy_reduction(size_average, reduce)
    backend = _backends.check_backend(backend)
    logits, flat_target, row_shape = _flatten(input, target)
    num_classes = logits.shape[1]
    out_dtype = _loss_dtype(loss_dtype, logits)
    opts = _options(weight, num_classes, logits, ignore_index, reduction, label_smoothing,
                    z_loss, softcap, _autocast_dtype(logits, logits.device.type), num_items)
    grad_on = torch.is_grad_enabled()
    prob = flat_target.is_floating_point()
    _check_probability_ignore_index(prob, opts)
    weight_grad = grad_on and weight is not None and weight.requires_grad
    if weight_grad and not prob:
        raise UnsupportedError(
            "crossent.torch.cross_entropy: no gradient for weight with class-index targets "
            "(torch.nn.functional.cross_entropy raises too: nll_loss is not differentiable "
            "with respect to weight); detach it or use probability targets"
        )
    target_grad = grad_on and prob and flat_target.requires_grad
    call = _backends.Call(
        "cross_entropy", logits.device, logits.numel(), not prob, opts.z_loss, opts.softcap,
        _composite_reason(num_classes, inplace_backward and (weight_grad or target_grad),
                          logits, flat_target, weight),
        _triton_refusal(logits.dtype, out_dtype, target_grad=target_grad,
                        weight_grad=weight_grad))
    route = _backends.choose_backend(backend, call, _NATIVE_MAX_LOGITS)
    if route == "native":  # torch checks the indices
        return _native_cross_entropy(input, target, weight, opts, out_dtype)
    with _no_autocast(logits.device.type):
        if route == "composite":
            out = _composite.cross_entropy(logits, flat_target, weight, opts).to(out_dtype)
        elif route == "triton":
            out = _triton_cross_entropy(logits, flat_target, weight, opts, inplace_backward,
                                        out_dtype)
        else:
            out = _fused_cross_entropy(logits, flat_target, weight, opts, inplace_backward,
                                       out_dtype)
    return out.reshape(row_shape) if reduction == "none" else out


def _triton_cross_entropy(logits, flat_target, weight, opts, inplace, out_dtype):
    """The Triton kernel (:mod:`._triton`), options already checked; ``num_items``
    divides its sum."""
    from ._triton import triton_cross_entropy

    out = triton_cross_entropy(
        logits, flat_target, None if weight is None else weight.detach(),
        ignore_index=opts.ignore_index, reduction=kernel_reduction(opts),
        label_smoothing=opts.label_smoothing, z_loss=opts.z_loss, softcap=opts.softcap,
        inplace_backward=inplace)
    return divide_by_num_items(out, opts).to(out_dtype)


def _fused_cross_entropy(logits, flat_target, weight, opts, inplace, out_dtype):
    num_rows, num_classes = logits.shape
    rows = prepare_rows(flat_target, num_rows, num_classes, opts, compute_dtype(logits.dtype))
    if torch.is_grad_enabled() and any(v is not None and v.requires_grad
                                       for v in (logits, flat_target, weight)):
        return _CrossEntropyFunction.apply(logits, flat_target, weight, rows, opts, inplace,
                                           out_dtype)
    with torch.no_grad():
        losses = cross_entropy_rows(logits, flat_target, rows, opts)
        return reduce_losses(losses, rows, opts.reduction).to(out_dtype)


_W_TILE_BYTES = 4 << 20  # low-precision dW: partial products per vocabulary tile


def _matmul_dtype(x: torch.Tensor, w: torch.Tensor) -> torch.dtype:
    """The dtype the chunk matmuls run in: bfloat16 stays bfloat16 (and float16 on
    accelerators), as in the unfused ``x @ W.T`` (the hardware accumulates in float32 and
    rounds the logits once, about twice as fast as float32 on an AVX512-BF16 CPU);
    everything else runs in the compute dtype (float32, or float64)."""
    low = x.dtype == w.dtype and (
        x.dtype == torch.bfloat16 or (x.dtype == torch.float16 and x.device.type != "cpu"))
    return x.dtype if low else compute_dtype(x.dtype)


def _accumulate_dw(gw, g, xc, first):
    """``gw (float32) += g^T xc``. Low-precision ``g`` has no mixed-dtype addmm: each
    vocabulary tile's partial product is rounded once and summed in float32, so the sum
    over chunks never runs in low precision (the training drift of bf16 accumulation)."""
    if g.dtype == gw.dtype:
        gw.addmm_(g.t(), xc, beta=0.0 if first else 1.0)  # beta 0: no zero-filled start
        return
    tile = max(1, _W_TILE_BYTES // (g.element_size() * max(gw.shape[1], 1)))
    for v in range(0, gw.shape[0], tile):
        part = torch.mm(g[:, v : v + tile].t(), xc)
        if first:
            gw[v : v + tile].copy_(part)
        else:
            gw[v : v + tile] += part


def _linear_pass(x, w, b, target, rows, opts, chunk, need, row_multiplier=None):
    """Chunk over rows: logits = x W^T + b (see :func:`_matmul_dtype`), loss in float32 and,
    if asked, the gradients: dW and db summed over chunks in float32, dx per chunk."""
    num_rows = x.shape[0]
    cdtype = compute_dtype(x.dtype)
    mdtype = _matmul_dtype(x, w)
    wm = w.to(mdtype)
    bm = None if b is None else b.to(mdtype)
    need_x, need_w, need_b = need
    want = any(need)
    gx = _buffers.empty(x.shape, mdtype, x) if need_x else None
    gw = _buffers.empty(w.shape, cdtype, x) if need_w else None
    gb = torch.zeros(w.shape[0], dtype=cdtype, device=x.device) if need_b and b is not None \
        else None
    buf = _buffers.empty((min(chunk, num_rows), w.shape[0]), mdtype, x)
    losses = torch.empty(num_rows, dtype=cdtype, device=x.device)
    for i in range(0, num_rows, chunk):
        j = min(i + chunk, num_rows)
        xc = x[i:j].to(mdtype)
        lg = buf[: j - i]
        if bm is None:
            torch.mm(xc, wm.t(), out=lg)
        else:
            torch.addmm(bm, xc, wm.t(), out=lg)
        rm = None if row_multiplier is None else row_multiplier[i:j]
        # the gradient overwrites the chunk's logits; for bf16 it is formed in float32
        # (p - 1 included) and rounded once
        losses[i:j] = cross_entropy_rows(lg, target, rows, opts, lg if want else None,
                                         start=i, row_multiplier=rm)
        if need_x:
            torch.mm(lg, wm, out=gx[i:j])
        if need_w:
            _accumulate_dw(gw, lg, xc, first=i == 0)
        if need_b:
            gb += lg.sum(0, dtype=cdtype)
    if gw is not None and num_rows == 0:  # no chunk ran: the pooled buffer is stale
        gw.zero_()
    return losses, [gx, gw, gb]


class _LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b, target, rows, opts, chunk, keep, out_dtype):
        need = tuple(ctx.needs_input_grad[:3])
        ctx.reduction, ctx.chunk, ctx.need = opts.reduction, chunk, need
        ctx.keep = keep or x.dtype == torch.float64
        ctx.dtypes = [t.dtype if t is not None else None for t in (x, w, b)]
        ctx.opts, ctx.device_type, ctx.mdtype = opts, x.device.type, _matmul_dtype(x, w)
        _save_inputs(ctx, x, w, b, target)
        if opts.reduction == "none":  # the gradient depends on grad_output row by row
            losses, _ = _linear_pass(x, w, b, target, rows, opts, chunk, (False,) * 3)
            ctx.save_for_backward(x, w, b, target)
            ctx.rows = rows
        else:
            losses, ctx.grads = _linear_pass(x, w, b, target, rows, opts, chunk, need)
        return reduce_losses(losses, rows, opts.reduction).to(out_dtype)

    @staticmethod
    def backward(ctx, grad_output):
        nothing = (None,) * 6
        if torch.is_grad_enabled():  # create_graph=True
            def loss(x, w, b, t):
                logits = _composite.linear_logits(x, w, b, ctx.mdtype)
                return _composite.cross_entropy(logits, t, ctx.opts.weight, ctx.opts)

            grads = _double_backward(ctx, grad_output, "linear_cross_entropy", loss)
            return (*grads[:3], *nothing)
        if ctx.reduction == "none":
            x, w, b, target = ctx.saved_tensors
            with _no_autocast(ctx.device_type):
                _, grads = _linear_pass(x, w, b, target, ctx.rows, ctx.opts, ctx.chunk,
                                        ctx.need,
                                        row_multiplier=grad_output.to(compute_dtype(x.dtype)))
        else:
            grads = _take(ctx, "grads")
            grads = [g.clone() if ctx.keep and g is not None else g for g in grads]
            for g in grads:
                if g is not None:
                    _scale_stored(g, grad_output.to(g.dtype), ctx.reduction)
        out = [None if g is None else g.to(d)
               for g, d in zip(grads, ctx.dtypes, strict=True)]
        return (*out, *nothing)


def _autocast_linear(x, w, b):
    """torch.autocast runs ``linear`` in the autocast dtype (float64 stays): cast the
    floating arguments as it would, differentiably."""
    device_type = x.device.type
    if not torch.is_autocast_enabled(device_type):
        return x, w, b
    dtype = torch.get_autocast_dtype(device_type)

    def cast(t):
        return t if t is None or t.dtype == torch.float64 else t.to(dtype)

    return cast(x), cast(w), cast(b)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _chunk_from_options(options, chunk_size, num_rows, num_classes, features, dtype):
    """``chunk_size`` and torch's ``LinearCrossEntropyOptions`` -> (rows per chunk or None
    for crossent's default, keep the gradients for ``retain_graph``).

    ``batch_chunk_size`` is the chunk; ``chunking_method="aspect_ratio[:k]"`` is torch's
    rule (``next_pow2(ceil(N / ceil(C / D))) / k`` rows); ``"auto"``/``None`` without a
    size: crossent's default. ``allow_retain_graph=True`` keeps the stored gradients so
    backward may run twice. ``acc_policy``: crossent always accumulates in float32 (float64
    for float64), at least every policy's precision, so any policy is accepted;
    ``acc_dtype`` other than that raises :class:`UnsupportedError`."""
    if options is None:
        return chunk_size, False
    fields = ("batch_chunk_size", "chunking_method", "acc_policy", "acc_dtype",
              "allow_retain_graph")
    if not all(hasattr(options, f) for f in fields):
        raise InputError(f"options must be a torch.nn.LinearCrossEntropyOptions, got "
                         f"{type(options).__name__}")
    if options.acc_dtype not in (None, compute_dtype(dtype)):
        raise UnsupportedError(
            f"options.acc_dtype={options.acc_dtype}: crossent accumulates in "
            f"{compute_dtype(dtype)} for {dtype} input (use acc_dtype=None)"
        )
    chunk = options.batch_chunk_size
    method = options.chunking_method
    if chunk is None and method not in (None, "auto"):
        _, _, factor = method.partition(":")
        ratio = -(-num_classes // max(features, 1))
        chunk = max(1, _next_pow2(-(-num_rows // max(ratio, 1))) // int(factor or 1))
    if chunk_size is not None and chunk is not None and chunk_size != chunk:
        raise InputError(f"chunk_size={chunk_size!r} disagrees with options "
                         f"(batch_chunk_size={chunk}); give one of them")
    return (chunk_size if chunk is None else chunk), bool(options.allow_retain_graph)


def _linear_k_dimensional(x, w, b, target, weight, opts, loss_dtype, chunked, backend):
    """``linear_weight`` ``(C, d1, ..., dK, D)``: logits ``(N, C, d1, ..., dK)``, as torch
    forms them, then the fused :func:`cross_entropy`. The logits are materialised."""
    if x.dim() != 2:
        raise InputError(f"input must be (N, D) for a K-dimensional linear_weight of shape "
                         f"{tuple(w.shape)}; got shape {tuple(x.shape)}")
    if chunked:
        warnings.warn("linear_cross_entropy: chunk_size/options ignored for a K-dimensional "
                      "linear_weight (its logits are formed whole, as torch does)",
                      UserWarning, stacklevel=3)
    num_classes, features = w.shape[0], w.shape[-1]
    out_features = tuple(w.shape[1:-1])
    flat = math.prod(out_features, start=num_classes)
    logits = F.linear(x, w.reshape(flat, features), None if b is None else b.reshape(flat))
    return cross_entropy(logits.reshape(x.shape[0], num_classes, *out_features), target,
                         weight, ignore_index=opts.ignore_index, reduction=opts.reduction,
                         label_smoothing=opts.label_smoothing, z_loss=opts.z_loss,
                         softcap=opts.softcap, loss_dtype=loss_dtype,
                         num_items=opts.num_items, backend=backend)


def _check_linear(x, w, b, t) -> None:
    """torch's argument checks of linear_cross_entropy, as :class:`InputError`."""
    for name, v in (("input", x), ("linear_weight", w), ("target", t)):
        if not isinstance(v, torch.Tensor):
            raise InputError(f"{name} must be a tensor, got {type(v).__name__}")
    if not x.is_floating_point():
        raise InputError(f"input must be a floating tensor, got {x.dtype}")
    if x.dim() not in (1, 2):
        raise InputError(f"input must be (N, D) or (D); got shape {tuple(x.shape)} "
                         f"(flatten (B, T, D) hidden states to (B*T, D), target to (B*T))")
    if w.dim() < 2:
        raise InputError(f"linear_weight must be (C, D) (or (C, d1, ..., dK, D)); got shape "
                         f"{tuple(w.shape)}")
    if x.shape[-1] != w.shape[-1]:
        raise InputError(f"input has {x.shape[-1]} features, linear_weight expects "
                         f"{w.shape[-1]}")
    if b is not None and tuple(b.shape) != tuple(w.shape[:-1]):
        raise InputError(f"linear_bias must have shape {tuple(w.shape[:-1])}, got "
                         f"{tuple(b.shape)}")
    if w.dtype != x.dtype or (b is not None and b.dtype != x.dtype):
        raise InputError(
            f"input, linear_weight and linear_bias must share one dtype (torch raises "
            f"too); got {x.dtype}, {w.dtype}, {None if b is None else b.dtype}"
        )


@torch.compiler.disable
def linear_cross_entropy(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    linear_bias: torch.Tensor | None = None,
    *,
    weight: torch.Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    chunk_size: int | None = None,
    options=None,
    loss_dtype: torch.dtype | None = None,
    num_items: int | float | torch.Tensor | None = None,
    backend: str = "auto",
    shift: bool = False,
) -> torch.Tensor:
    """``cross_entropy(input @ linear_weight.T + linear_bias, target, ...)`` without ever
    holding more than one chunk of logits.

    The rows of ``input`` are processed ``chunk_size`` at a time: the chunk's logits are
    formed, the fused :func:`cross_entropy` kernel turns them into the loss and
    ``G = dloss/dlogits`` in place (all its arithmetic in float32), then ``dx = G W`` is
    written for the chunk and ``dW += G^T x``, ``db += sum G`` are summed over chunks in
    float32 (cast to the parameters' dtypes at the end). float32 inputs multiply in float32.
    bfloat16 inputs (and float16 ones on accelerators) multiply in their own dtype, as the
    unfused ``x @ W.T`` does: the logits and each chunk's products are rounded once, but the
    sums over chunks never run in low precision (bf16 accumulation drifts).
    Peak extra memory: one ``chunk_size x C`` logits buffer plus the gradients (dW in
    float32).
    For ``"mean"`` and ``"sum"`` the gradients are computed in the forward pass (a
    ``grad_output`` other than 1 then scales the stored low-precision ``dx``: a second
    rounding); for ``"none"`` the backward recomputes the logits chunk by chunk, scaling
    each row by its ``grad_output`` in float32 (so any ``grad_output`` is right).

    Args:
        input: ``(N, D)`` or ``(D)`` features.
        linear_weight: ``(C, D)``, as ``torch.nn.Linear(D, C).weight``; or ``(C, d1, ...,
            dK, D)`` for a K-dimensional loss (as torch: logits ``(N, C, d1, ..., dK)``,
            formed whole, then the fused :func:`cross_entropy`; not chunked).
        target: ``(N)``/``()`` class indices or ``(N, C)``/``(C)`` probabilities.
        linear_bias: ``(C)`` (``(C, d1, ..., dK)``) or ``None``. Positional here, keyword
            in torch; both work. ``input``, ``linear_weight`` and ``linear_bias`` must
            share one dtype (torch raises otherwise; so does crossent, InputError).
        weight, reduction, label_smoothing, z_loss, softcap, loss_dtype, num_items: as in
            :func:`cross_entropy` (``num_items``: the loss is the sum over rows divided
            by it; the gradients likewise).
        backend: as in :func:`cross_entropy`: ``"native"`` is ``F.linear`` then torch's
            kernel (the whole logits), ``"rowblock"`` the chunked head below at every
            size, ``"triton"`` the chunked head with the Triton kernel on each chunk
            (it also refuses ``options.allow_retain_graph=True``).
        shift: the causal-LM label shift, done inside: ``input`` is ``(B, T, D)`` (or
            ``(T, D)``) hidden states and ``target`` ``(B, T)`` (``(T)``) class indices,
            and position ``t`` is scored against ``target[..., t + 1]``: the loss of
            ``input[:, :-1]`` against ``target[:, 1:]``. The hidden states are not copied
            (a view of all ``B T`` rows; the last position of each sequence counts as
            ignored: no loss, no gradient, not in ``"mean"``'s denominator); only the
            small target is. ``reduction="none"`` returns ``(B, T - 1)``. Class-index
            targets only (probability targets raise :class:`crossent.UnsupportedError`).
        ignore_index: as in :func:`cross_entropy`; ``None`` (the default) means -100 for
            index targets. With probability targets it must be ``None`` (torch raises).
        chunk_size: rows per chunk. Default: logits of a quarter of the float32 dW's
            size, at least 16 MiB (at D=512: 128 float32 rows, 256 bfloat16 rows); and
            under ``2**19`` logits with index targets, neither ``z_loss`` nor ``softcap``,
            no chunking at all: ``F.linear`` and torch's own kernel (in float32), faster
            at that size (see :func:`cross_entropy`). Giving ``chunk_size`` (or
            ``options``) always takes the fused path. Larger chunks are faster (fewer
            passes over ``W`` and ``dW``) and hold more memory.
        options: torch's ``torch.nn.LinearCrossEntropyOptions``: ``batch_chunk_size`` is
            ``chunk_size``; ``chunking_method="aspect_ratio[:k]"`` sizes it by torch's
            rule, ``"auto"`` by crossent's default; ``allow_retain_graph=True`` keeps the
            gradients so backward may run twice; any ``acc_policy`` is accepted (crossent
            always accumulates in float32, float64 for float64); an ``acc_dtype`` other
            than that raises :class:`crossent.UnsupportedError`.

    Under ``torch.autocast`` the head follows torch: ``input``, ``linear_weight`` and
    ``linear_bias`` are cast to the autocast dtype (float64 stays) and the loss is
    float32. Double backward, ``torch.func`` transforms, forward-mode AD, ``jit.trace``,
    ``C = 0`` and gradients for probability targets or class weights: as in
    :func:`cross_entropy`, through the composable path, which forms the whole ``N x C``
    logits (torch's memory).

    Same argument order as ``torch.nn.functional.linear_cross_entropy`` (torch >= 2.13).
    Reference: the unfused ``torch.nn.functional.cross_entropy(input @ W.T + b, target)``.

    >>> import torch
    >>> x, w = torch.ones(2, 4), torch.zeros(3, 4, requires_grad=True)
    >>> round(linear_cross_entropy(x, w, torch.tensor([0, 1])).item(), 6)  # ln 3
    1.098612
    >>> hidden, tokens = torch.ones(1, 5, 4), torch.tensor([[7, 0, 1, 2, -100]])
    >>> round(linear_cross_entropy(hidden, w, tokens, shift=True).item(), 6)  # 3 targets
    1.098612
    """
    row_shape = None
    if shift is not False:
        input, target, row_shape = _shift_labels(input, target, ignore_index, shift)
    _check_linear(input, linear_weight, linear_bias, target)
    if row_shape is not None and linear_weight.dim() > 2:
        raise UnsupportedError("crossent.torch.linear_cross_entropy: shift=True with a "
                               "K-dimensional linear_weight")
    backend = _backends.check_backend(backend)
    x, w, b = _autocast_linear(input, linear_weight, linear_bias)
    if target.is_floating_point() and ignore_index is not None:
        raise InputError(f"ignore_index={ignore_index!r} with probability targets: it only "
                         f"applies to class indices (torch raises too); leave it None")
    num_classes, features = w.shape[0], w.shape[-1]
    if chunk_size is not None:
        chunk_size = _positive_int(chunk_size, "chunk_size")
    chunk_size, keep = _chunk_from_options(options, chunk_size, x.shape[0] if x.dim() == 2
                                           else 1, num_classes, features, x.dtype)
    out_dtype = _loss_dtype(loss_dtype, x)
    opts = _options(weight, num_classes, x, ignore_index, reduction, label_smoothing,
                    z_loss, softcap, _autocast_dtype(x, x.device.type), num_items)
    if w.dim() > 2:
        return _linear_k_dimensional(x, w, b, target, weight, opts, loss_dtype,
                                     chunk_size is not None, backend)
    single = x.dim() == 1
    x = x.unsqueeze(0) if single else x
    t = target.unsqueeze(0) if single else target
    if t.is_floating_point() and tuple(t.shape) != (x.shape[0], num_classes):
        raise InputError(f"probability target must have shape {(x.shape[0], num_classes)}")
    if not t.is_floating_point() and tuple(t.shape) != (x.shape[0],):
        raise InputError(f"class-index target must have shape {(x.shape[0],)}")
    grad_on = torch.is_grad_enabled()
    prob = t.is_floating_point()
    weight_grad = grad_on and weight is not None and weight.requires_grad
    if weight_grad and not prob:
        raise UnsupportedError(
            "crossent.torch.linear_cross_entropy: no gradient for weight with class-index "
            "targets (torch raises too: nll_loss is not differentiable with respect to "
            "weight); detach it or use probability targets"
        )
    target_grad = grad_on and prob and t.requires_grad
    composite = ("a gradient for the class weight" if weight_grad else
                 "a gradient for the target (probability targets that require grad)"
                 if target_grad else _composite_reason(num_classes, False, x, w, b, t, weight))
    call = _backends.Call(
        "linear_cross_entropy", x.device, x.shape[0] * num_classes, not prob, opts.z_loss,
        opts.softcap, composite,
        _triton_refusal(x.dtype, out_dtype, target_grad=target_grad, weight_grad=weight_grad,
                        retain=keep),
        sized=chunk_size is not None)
    route = _backends.choose_backend(backend, call, _NATIVE_MAX_LOGITS)
    with _no_autocast(x.device.type):
        if route == "composite":
            logits = _composite.linear_logits(x, w, b, _matmul_dtype(x, w))
            out = _composite.cross_entropy(logits, t, weight, opts).to(out_dtype)
        elif route == "native":  # one torch matmul (as the unfused head), torch's kernel
            out = _native_cross_entropy(F.linear(x, w, b), t, weight, opts, out_dtype)
        elif route == "triton":
            out = _triton_linear(x, w, b, t, weight, opts, chunk_size, out_dtype)
        else:
            out = _fused_linear(x, w, b, t, opts, chunk_size, keep, out_dtype)
    if row_shape is not None and reduction == "none":  # drop the last positions
        return out.reshape(row_shape)[..., :-1]
    return out.reshape(()) if single and reduction == "none" else out


def _shift_labels(input, target, ignore_index, shift):
    """``shift=True``: the ``(B T, D)`` view of ``(B, T, D)`` hidden states, the int64
    targets ``target[..., 1:]`` with ``ignore_index`` at each last position, and the
    target's shape (to cut ``reduction="none"`` back to ``(B, T - 1)``)."""
    if not isinstance(shift, bool):
        raise InputError(f"shift={shift!r} must be True or False")
    for name, v in (("input", input), ("target", target)):
        if not isinstance(v, torch.Tensor):
            raise InputError(f"{name} must be a tensor, got {type(v).__name__}")
    if target.is_floating_point():
        raise UnsupportedError("crossent.torch.linear_cross_entropy: shift=True with "
                               "probability targets (class indices only)")
    check_index_dtype(target)
    if input.dim() not in (2, 3) or tuple(target.shape) != tuple(input.shape[:-1]):
        raise InputError(
            f"shift=True takes (B, T, D) or (T, D) hidden states and (B, T) or (T) "
            f"targets; got input {tuple(input.shape)} and target {tuple(target.shape)}")
    ignore = -100 if ignore_index is None else _check_ignore_index(ignore_index)
    shifted = torch.full(target.shape, ignore, dtype=torch.long, device=target.device)
    shifted[..., :-1] = target[..., 1:]
    return (input.reshape(-1, input.shape[-1]), shifted.reshape(-1),
            tuple(target.shape))


def _triton_linear(x, w, b, t, weight, opts, chunk_size, out_dtype):
    """The Triton-backed chunked head (:mod:`._triton`), options already checked."""
    from ._triton import triton_linear_cross_entropy

    out = triton_linear_cross_entropy(
        x, w, t, b, weight=None if weight is None else weight.detach(),
        reduction=kernel_reduction(opts),
        ignore_index=None if t.is_floating_point() else opts.ignore_index,
        label_smoothing=opts.label_smoothing, z_loss=opts.z_loss, softcap=opts.softcap,
        chunk_size=chunk_size)
    return divide_by_num_items(out, opts).to(out_dtype)


def _fused_linear(x, w, b, t, opts, chunk_size, keep, out_dtype):
    num_classes, features = w.shape
    rows = prepare_rows(t, x.shape[0], num_classes, opts, compute_dtype(x.dtype))
    chunk = (_default_chunk(num_classes, features, _matmul_dtype(x, w).itemsize)
             if chunk_size is None else int(chunk_size))
    x = x.contiguous()
    if torch.is_grad_enabled() and any(p is not None and p.requires_grad for p in (x, w, b)):
        return _LinearCrossEntropyFunction.apply(x, w, b, t, rows, opts, chunk, keep,
                                                 out_dtype)
    with torch.no_grad():
        losses, _ = _linear_pass(x, w, b, t, rows, opts, chunk, (False,) * 3)
        return reduce_losses(losses, rows, opts.reduction).to(out_dtype)
