"""``torch.autograd.Function`` wrappers of the Triton kernels with
``torch.nn.functional.cross_entropy`` semantics (see the package docstring)."""

from __future__ import annotations

import operator

import torch
from torch.autograd.graph import increment_version

from ...errors import InputError, UnsupportedError
from .._chunked_head import head_pass, rows_per_chunk, split_rows
from .._rules import (  # the CPU head's rules
    Options,
    check_index_target,
    check_options,
    check_target_intact,
    check_weight_dtype,
    defers_mean_scale,
    double_backward,
    head_inputs_read,
    idle_rows_nan,
    infinite_as_nan,
    matmul_dtype,
    may_overwrite,
    nan_at_targets,
    positive_int,
    recompute_in_backward,
    records_graph,
    releases_inputs,
    remember_target,
    save_inputs,
    saved_inputs,
    split_scale,
    start_index_check,
    take_stored,
    weight_torch_saves,
)
from . import ops

__all__ = ["triton_cross_entropy", "triton_linear_cross_entropy"]

_TRITON = "the Triton cross-entropy"  # what backward twice names (take_stored)


def _check(reduction, label_smoothing, z_loss, softcap, weight, num_classes, like, target):
    check_options(reduction, label_smoothing, z_loss, softcap)
    if records_graph() and target.requires_grad:
        raise UnsupportedError("crossent Triton cross-entropy: no gradient for target")
    if weight is None:
        return None
    if not isinstance(weight, torch.Tensor):
        raise InputError(f"weight must be a tensor of {num_classes} class weights, got "
                         f"{type(weight).__name__}")
    # float32 with bf16/fp16 input is what torch computes in under autocast (and what
    # crossent.torch's checked entry points may pass on)
    check_weight_dtype(weight, target.is_floating_point(),
                       (like.dtype, ops.accumulate_dtype(like.dtype)))
    if tuple(weight.shape) != (num_classes,):
        raise InputError(f"weight has shape {tuple(weight.shape)}; expected ({num_classes},), "
                         f"one weight per class")
    if records_graph() and weight.requires_grad:
        raise UnsupportedError("crossent Triton cross-entropy: no gradient for weight")
    return weight.detach().resolve_neg().to(device=like.device,
                                            dtype=ops.accumulate_dtype(like.dtype))


def _check_ignore_index(ignore_index, target: torch.Tensor) -> int:
    """``ignore_index`` as an int (None: -100). torch refuses a non-negative one with
    probability targets ("ignore_index is not supported for floating point target")."""
    if ignore_index is None:
        return -100
    try:
        value = None if isinstance(ignore_index, bool) else operator.index(ignore_index)
    except TypeError:
        value = None
    if value is None:
        raise InputError(f"ignore_index={ignore_index!r} must be an integer")
    if target.is_floating_point() and value >= 0:
        raise InputError(f"ignore_index={value} with probability targets: it applies to "
                         f"class indices only (torch raises too)")
    return value


def _shapes(input: torch.Tensor, target: torch.Tensor):
    """Checks the shapes of ``(C)``, ``(N, C)`` or ``(N, C, d1, ...)`` logits and their
    target; returns ``(C, target rows as an (M,) view, or None for probabilities,
    the per-row shape)``. Nothing the size of the logits is copied."""
    if not input.is_floating_point():
        raise InputError(f"input must be a floating tensor of logits, got {input.dtype}")
    if input.dim() == 0:
        raise InputError("input must have a class dimension; got a 0-d tensor")
    num_classes = input.shape[0 if input.dim() == 1 else 1]
    row_shape: tuple[int, ...] = () if input.dim() == 1 else (input.shape[0],
                                                             *input.shape[2:])
    if target.is_floating_point():
        if target.shape != input.shape:
            raise InputError(f"probability target has shape {tuple(target.shape)}; expected "
                             f"the input's {tuple(input.shape)}")
        return num_classes, None, row_shape
    if tuple(target.shape) != row_shape:
        raise InputError(f"class-index target has shape {tuple(target.shape)}; expected "
                         f"{row_shape} for input of shape {tuple(input.shape)}")
    return num_classes, target.reshape(-1), row_shape


def _flatten(input: torch.Tensor, target: torch.Tensor):
    """(N, C, d1, ...) -> (M, C) contiguous logits, (M,) or (M, C) target, and the
    per-row shape (the checks of :func:`_shapes`)."""
    num_classes, _, row_shape = _shapes(input, target)
    if input.dim() == 1:
        input, target = input.unsqueeze(0), target.unsqueeze(0)
    if target.is_floating_point():
        target = target.movedim(1, -1).reshape(-1, num_classes)
    else:
        target = target.reshape(-1)
    logits = input if input.dim() == 2 else input.movedim(1, -1).reshape(-1, num_classes)
    return logits.contiguous(), target.contiguous(), row_shape


def _saved(given, weight, like):
    """The class weight whose in-place change raises (``saved_weight`` of the entry points:
    ``"auto"``, :func:`weight_torch_saves` under the caller's autocast; crossent.torch's
    functions pass what they read before turning autocast off)."""
    return weight_torch_saves(weight, like.device.type) if isinstance(given, str) else given


def _ignored_rows(target: torch.Tensor, ignore_index: int) -> torch.Tensor | None:
    """(M,) bool: rows whose class index is ``ignore_index`` (int64 compare); None for
    probability targets."""
    return None if target.is_floating_point() else target.reshape(-1).long() == ignore_index


def _counted_rows(target: torch.Tensor, ignore_index: int) -> torch.Tensor | None:
    """(M,) bool: the rows that count; None for probability targets (all count)."""
    ignored = _ignored_rows(target, ignore_index)
    return None if ignored is None else ~ignored


def _row_factors(grad_output: torch.Tensor, ignored: torch.Tensor | None) -> torch.Tensor:
    """``grad_output`` per row, 1 on ignored rows: their gradient is exactly 0 and stays
    0 (torch's too, even for a NaN or inf ``grad_output``), and a factor of 1 is skipped
    by the scaling kernel."""
    go = grad_output.reshape(-1)
    if ignored is None:
        return go
    return torch.where(ignored, torch.ones((), dtype=go.dtype, device=go.device), go)


def _scale_grad(g: torch.Tensor, grad_output: torch.Tensor, per_row: bool) -> torch.Tensor:
    if (g.dim() == 2 and g.stride(1) == 1) or (g.dim() == 1 and g.stride(0) == 1):
        return ops.scale_(g, grad_output, per_row=per_row)
    return g.mul_(grad_output.reshape(-1, 1) if per_row else grad_output)


def _save_inputs(ctx, inputs, opts, inplace: bool, **read) -> None:
    """The inputs (with their history) for a double backward (a later in-place change
    raises instead of misleading), and the versions of the target (the last input) and
    of ``read``, the inputs torch's backward reads (:func:`remember_target`)."""
    save_inputs(ctx, *((None,) * len(inputs) if inplace else inputs))
    remember_target(ctx, inputs[-1], **read)
    ctx.opts, ctx.inplace, ctx.device_type = opts, inplace, inputs[0].device.type


def _double_backward(ctx, grad_output, loss_fn, name: str) -> list:
    """:func:`crossent.torch._rules.double_backward` (the gradient recomputed from the
    saved inputs with the CPU path's differentiable formulas, :mod:`._composite`) with
    ``loss_fn(opts, *inputs)``: the kernel's gradient is a constant to autograd (pitfall
    18: Hessians would come out 0 without an error)."""
    o = ctx.opts
    opts = Options(o["weight"], o["ignore_index"], o["label_smoothing"], o["z_loss"],
                   o["softcap"], o["reduction"])
    return double_backward(ctx, grad_output, f"{name} (Triton kernel)",
                           lambda *inputs: loss_fn(opts, *inputs),
                           create_graph=torch.is_grad_enabled())


def _composite_loss(opts, input, target):
    from .. import _composite  # the CPU path's differentiable formulas

    logits, flat_target, row_shape = _flatten(input, target)
    out = _composite.cross_entropy(logits, flat_target, opts.weight, opts)
    return out.reshape(row_shape) if opts.reduction == "none" else out


def _unflatten(grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The ``(M, C)`` gradient in the input's ``shape`` (a view: no copy)."""
    if len(shape) == 1:
        return grad[0]
    if len(shape) == 2:
        return grad
    return grad.reshape(shape[0], *shape[2:], shape[1]).movedim(-1, 1)


class _CrossEntropy(torch.autograd.Function):
    """Takes the caller's ``input`` itself (``(C)``, ``(N, C)`` or ``(N, C, d1, ...)``),
    flattened inside: a double backward recomputes from it without a flattened copy being
    kept alive from forward to backward."""

    @staticmethod
    def forward(ctx, input, target, opts, inplace, loss_dtype, saved_weight=None):
        logits, flat_target, row_shape = _flatten(input, target)
        inplace = inplace and may_overwrite(input, logits)  # never a leaf's memory
        grad = None if inplace else torch.empty_like(logits)
        defer = defers_mean_scale(logits.dtype, opts["reduction"])
        res = ops.cross_entropy_forward(logits, flat_target, grad_out=grad, defer_mean=defer,
                                        **opts)
        # the mean's 1/denominator's power of two, applied with grad_output in backward
        ctx.deferred = res.deferred
        # overwritten: the caller's memory, not a flattened copy of it (then the caller's
        # input is intact, saved, and a double backward recomputes from it)
        overwritten = inplace and logits.untyped_storage().data_ptr() == \
            input.untyped_storage().data_ptr()
        if overwritten:
            # the kernel wrote into the input behind autograd's back: say so, so that
            increment_version(input)  # an op that saved it raises instead of misleading
        # in place, res.grad is the caller's own tensor: a detached alias lets autograd
        # adopt it for a .grad further up (it copies a tensor referenced elsewhere, a
        # whole extra read and write of the logits)
        ctx.grad = res.grad.detach() if inplace else res.grad
        ctx.reduction, ctx.loss_dtype = opts["reduction"], res.loss.dtype
        ctx.keep = logits.dtype == torch.float64
        ctx.input_shape = input.shape
        ctx.ignored = _ignored_rows(flat_target, opts["ignore_index"])
        # index targets without smoothing: an infinite grad_output is NaN at the target
        # entries only (torch's inf - inf), set in backward; elsewhere whole rows
        ctx.index = (None if ctx.ignored is None or opts["label_smoothing"]
                     else torch.where(ctx.ignored, 0, flat_target.reshape(-1).long()))
        _save_inputs(ctx, (input, target), opts, overwritten, weight=saved_weight)
        out = ops.reduce_rows(res.loss, res.denominator, opts["reduction"],
                              nan_at_zero=opts["label_smoothing"] > 0).to(loss_dtype)
        return out.reshape(row_shape) if opts["reduction"] == "none" else out

    @staticmethod
    @releases_inputs
    def backward(ctx, grad_output):
        check_target_intact(ctx, "cross_entropy")
        if recompute_in_backward(grad_output):  # create_graph=True, is_grads_batched=True
            g, _ = _double_backward(ctx, grad_output, _composite_loss, "cross_entropy")
            return g, None, None, None, None, None
        grad = take_stored(ctx, "grad", _TRITON)
        grad = grad.clone() if ctx.keep else grad
        grad_output = grad_output.to(ctx.loss_dtype)  # as torch's ToCopyBackward rounds it
        # an infinite grad_output: torch's NaN (inf - inf) over whole rows, or (index ctx)
        # at the target entries; on the device, no host read
        factor = grad_output if ctx.index is not None else infinite_as_nan(grad_output)
        if ctx.deferred is not None:
            factor = factor * ctx.deferred
        if ctx.ignored is None:
            _scale_grad(grad, factor.reshape(-1).contiguous(), ctx.reduction == "none")
        else:
            _scale_grad(grad, _row_factors(factor, ctx.ignored).contiguous(), True)
        if ctx.index is not None and grad.numel():
            nan_at_targets(grad, grad_output, ~ctx.ignored, ctx.index.unsqueeze(1),
                           ctx.reduction, sync=False)
        return _unflatten(grad, ctx.input_shape), None, None, None, None, None


def triton_cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    z_loss: float = 0.0,
    softcap: float | None = None,
    inplace_backward: bool = False,
    check_targets: bool = True,
    block: int | None = None,
    loss_dtype: torch.dtype | None = None,
    saved_weight: torch.Tensor | str | None = "auto",
) -> torch.Tensor:
    """``torch.nn.functional.cross_entropy`` (plus ``z_loss``, ``softcap``) on the Triton
    kernel: loss and gradient in one launch during forward; backward scales the stored
    gradient by ``grad_output`` on the device. ``check_targets`` raises torch's
    ``IndexError`` for an out-of-range class index (one host read: queued behind the
    kernel, :func:`.._rules.start_index_check`, so the GPU does not wait for the host;
    with ``inplace_backward`` read before the kernel, so the logits are intact when it
    raises); without it such a row gets a NaN loss. ``loss_dtype``: the returned loss's
    dtype, rounded once from the float32 sum (default: the input's). ``saved_weight``:
    the class weight whose in-place change before backward raises, as torch's
    (``"auto"``: ``weight``, unless autocast makes torch save a float32 copy of it).
    See the package docstring for everything else."""
    num_classes, index_target, row_shape = _shapes(input, target)
    w = _check(reduction, label_smoothing, z_loss, softcap, weight, num_classes, input,
               target)
    ignore_index = _check_ignore_index(ignore_index, target)
    finish_check = _start_target_check(index_target if check_targets else None, num_classes,
                                       ignore_index, bool(inplace_backward))
    opts = dict(weight=w, ignore_index=ignore_index, label_smoothing=float(label_smoothing),
                z_loss=float(z_loss), softcap=None if softcap is None else float(softcap),
                reduction=reduction, block=block)
    out_dtype = input.dtype if loss_dtype is None else loss_dtype
    if records_graph() and input.requires_grad:
        out = _CrossEntropy.apply(input, target, opts, bool(inplace_backward), out_dtype,
                                  _saved(saved_weight, weight, input))
        finish_check()
        return out
    with torch.no_grad():
        logits, flat_target, _ = _flatten(input, target)
        res = ops.cross_entropy_forward(logits, flat_target, compute_grad=False, **opts)
        out = ops.reduce_rows(res.loss, res.denominator, reduction,
                              nan_at_zero=opts["label_smoothing"] > 0).to(out_dtype)
    finish_check()
    return out.reshape(row_shape) if reduction == "none" else out


def _start_target_check(index_target: torch.Tensor | None, num_classes: int,
                        ignore_index: int, inplace: bool):
    """The class-index bounds check as a ``finish()`` to call after the kernel's launch
    (:func:`.._rules.start_index_check`); in place (the kernel overwrites the logits)
    it runs to the end now. No index target or no check: a no-op."""
    if index_target is None:
        return _nothing
    if inplace:
        check_index_target(index_target, num_classes, ignore_index)
        return _nothing
    return start_index_check(index_target, num_classes, ignore_index)


def _nothing() -> None:
    return None


# --------------------------------------------------------------------------- linear head


class _TritonChunks:
    """The Triton kernel (:func:`.ops.cross_entropy_forward`) on each chunk of the linear
    head (a :class:`.._chunked_head.ChunkKernel`): ``target`` holds the kernel's rows,
    ``scale`` (0-d device tensor) is the gradient's factor (``1 / denominator`` for
    "mean", else 1), ``opts`` the kernel's options."""

    def __init__(self, target: torch.Tensor, opts: dict, scale: torch.Tensor) -> None:
        self.target, self.opts, self.scale = target, opts, scale

    def only(self, keep: torch.Tensor) -> _TritonChunks:
        return _TritonChunks(self.target[keep], self.opts, self.scale)

    def __call__(self, logits: torch.Tensor, start: int, *, grad: bool,
                 row_multiplier: torch.Tensor | None) -> torch.Tensor:
        target = self.target[start : start + logits.shape[0]]
        return ops.cross_entropy_forward(logits, target, compute_grad=grad, grad_out=None,
                                         row_multiplier=row_multiplier, scale=self.scale,
                                         **self.opts).loss


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b, target, split, opts, chunk, loss_dtype, dw_dtype=None,
                x_source=None, saved_weight=None):
        need = tuple(ctx.needs_input_grad[:3])
        ctx.reduction, ctx.chunk, ctx.need, ctx.opts = opts["reduction"], chunk, need, opts
        ctx.dw_dtype = dw_dtype
        ctx.keep = x.dtype == torch.float64
        ctx.dtypes = [t.dtype if t is not None else None for t in (x, w, b)]
        ctx.shape, ctx.split = x.shape, split
        ctx.ignored = _ignored_rows(target, opts["ignore_index"])
        loss = _head(x, w, b, target, split, opts, chunk, need if opts["reduction"] != "none"
                     else (False,) * 3, ctx, dw_dtype)
        # "none": the gradient depends on grad_output row by row (recomputed from these)
        # x_source: the caller's input where x is its contiguous copy
        _save_inputs(ctx, (x, w, b, target), opts, False, **head_inputs_read(
            need, x if x_source is None else x_source, w, saved_weight))
        return loss.to(loss_dtype)

    @staticmethod
    @releases_inputs
    def backward(ctx, grad_output):
        check_target_intact(ctx, "linear_cross_entropy")
        if recompute_in_backward(grad_output):  # create_graph=True, is_grads_batched=True
            return (*_double_backward(ctx, grad_output, _composite_linear_loss,
                                      "linear_cross_entropy")[:3],
                    None, None, None, None, None, None, None, None)
        if ctx.reduction == "none":
            x, w, b, target = saved_inputs(ctx, "linear_cross_entropy")
            grads = _head_grads(x, w, b, target, ctx.split, ctx.opts, ctx.chunk, ctx.need,
                                grad_output.reshape(-1), ctx.dw_dtype)
        else:
            grads = take_stored(ctx, "grads", _TRITON)
            grads = [g.clone() if ctx.keep and g is not None else g for g in grads]
            go = grad_output.reshape(1)
            if ctx.deferred is not None:
                go = go.to(ctx.deferred.dtype) * ctx.deferred
            if grads[0] is not None:  # dx: ignored rows stay exactly 0
                _scale_grad(grads[0], _row_factors(go, ctx.ignored).contiguous(),
                            ctx.ignored is not None)
            if ctx.ignored is not None:  # no row counts: torch forms nothing for dW, db
                go = torch.where((~ctx.ignored).any(), go, 0.0)  # (0, not NaN x 0)
            for g in grads[1:]:
                if g is not None:
                    _scale_grad(g, go, False)
        out = [None if g is None else g.to(d) for g, d in zip(grads, ctx.dtypes, strict=True)]
        return out[0], out[1], out[2], None, None, None, None, None, None, None, None


def _composite_linear_loss(opts, x, w, b, target):
    from .. import _composite  # the CPU path's differentiable formulas

    logits = _composite.linear_logits(x, w, b, matmul_dtype(x, w))
    return _composite.cross_entropy(logits, target, opts.weight, opts)


def _kernel_options(opts: dict) -> dict:
    return {k: v for k, v in opts.items() if k != "reduction"}


def _head(x, w, b, target, split, opts, chunk, need, ctx=None, dw_dtype=None):
    """Forward of the head (:func:`.._chunked_head.head_pass` with the Triton kernel): the
    reduced loss; with ``ctx`` and ``need``, the gradients (for "mean"/"sum") stored on
    it as ``ctx.grads``. ``split``: the ignored rows to skip, or None. ``dw_dtype``:
    :func:`.._chunked_head.weight_grad_dtype`."""
    acc = ops.accumulate_dtype(x.dtype)
    denom = ops.denominator(target, w.shape[0], opts["weight"], opts["ignore_index"], acc)
    scale = 1.0 / denom if opts["reduction"] == "mean" else torch.ones((), dtype=acc,
                                                                       device=x.device)
    deferred = None  # float16 chunks: the mean's 1/denominator applied in backward
    if any(need) and defers_mean_scale(matmul_dtype(x, w), opts["reduction"]):
        scale, deferred = split_scale(scale, opts["weight"], opts["z_loss"])
    kernel = _TritonChunks(target, _kernel_options(opts), scale)
    run = head_pass(x, w, b, kernel, chunk, need, split=split, dw_dtype=dw_dtype)
    if ctx is not None:
        ctx.grads, ctx.deferred = run.grads, deferred
    return ops.reduce_rows(run.losses, denom, opts["reduction"],
                           nan_at_zero=opts["label_smoothing"] > 0)


def _head_grads(x, w, b, target, split, opts, chunk, need, grad_output, dw_dtype=None):
    """Gradients for reduction "none": the chunks again, each row scaled by its
    ``grad_output``."""
    acc = ops.accumulate_dtype(x.dtype)
    one = torch.ones((), dtype=acc, device=x.device)
    kernel = _TritonChunks(target, _kernel_options(opts), one)
    return head_pass(x, w, b, kernel, chunk, need, row_multiplier=grad_output.to(acc),
                     split=split, dw_dtype=dw_dtype).grads


def _check_linear_dtypes(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> None:
    """One floating dtype for input, linear_weight and linear_bias: ``F.linear`` raises
    for a mismatch, so crossent does not multiply them in some dtype of its own."""
    if not x.is_floating_point():
        raise InputError(f"input must be a floating tensor, got {x.dtype}")
    if w.dtype != x.dtype:
        raise InputError(f"linear_weight has dtype {w.dtype}; expected the input's {x.dtype} "
                         f"(torch.nn.functional.linear raises too)")
    if b is not None and b.dtype != x.dtype:
        raise InputError(f"linear_bias has dtype {b.dtype}; expected the input's {x.dtype} "
                         f"(torch.nn.functional.linear raises too)")


def triton_linear_cross_entropy(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    linear_bias: torch.Tensor | None = None,
    *,
    weight: torch.Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int | None = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    chunk_size: int | None = None,
    skip_ignored: bool = True,
    check_targets: bool = True,
    block: int | None = None,
    loss_dtype: torch.dtype | None = None,
    dw_dtype: torch.dtype | None = None,
    saved_weight: torch.Tensor | str | None = "auto",
) -> torch.Tensor:
    """``cross_entropy(input @ linear_weight.T + linear_bias, target, ...)`` through row
    chunks: matmul, the Triton kernel in place on the chunk's logits, then dx, dW, db
    (dW and db summed in float32; dW in ``dw_dtype`` if given, one rounding per chunk:
    :func:`crossent.torch._chunked_head.weight_grad_dtype`); the loss in ``loss_dtype``
    (default: the input's),
    rounded once from float32. The chunk loop is the CPU head's
    (:func:`crossent.torch._chunked_head.head_pass`): with ``skip_ignored`` the ignored
    rows are skipped by its rule (their ``dx`` exactly 0; not where an ignored row's
    logits may not be finite, so NaN reaches dx and dW as in torch; three host
    synchronisations per call). ``saved_weight``: as :func:`triton_cross_entropy`'s (an
    in-place change of it, of ``linear_weight`` where dx is needed, or of ``input`` where
    dW is, raises at backward as torch's). See the package docstring."""
    if linear_weight.dim() != 2:
        raise UnsupportedError("linear_weight must be (C, D); K-dimensional heads unsupported")
    if input.dim() not in (1, 2):
        raise InputError(f"input must be (N, D) or (D); got shape {tuple(input.shape)}")
    single = input.dim() == 1
    x = input.unsqueeze(0) if single else input
    t = target.unsqueeze(0) if single else target
    num_classes, features = linear_weight.shape
    if x.shape[1] != features:
        raise InputError(f"input has {x.shape[1]} features, linear_weight expects {features}")
    if linear_bias is not None and tuple(linear_bias.shape) != (num_classes,):
        raise InputError(f"linear_bias must have shape ({num_classes},)")
    _check_linear_dtypes(x, linear_weight, linear_bias)
    if t.is_floating_point() and tuple(t.shape) != (x.shape[0], num_classes):
        raise InputError(f"probability target must have shape {(x.shape[0], num_classes)}")
    if not t.is_floating_point() and tuple(t.shape) != (x.shape[0],):
        raise InputError(f"class-index target must have shape {(x.shape[0],)}")
    w = _check(reduction, label_smoothing, z_loss, softcap, weight, num_classes, x, t)
    ignore_index = _check_ignore_index(ignore_index, t)
    if not t.is_floating_point() and check_targets:
        check_index_target(t, num_classes, ignore_index)
    chunk = rows_per_chunk(None if chunk_size is None
                           else positive_int(chunk_size, "chunk_size"), x, linear_weight)
    opts = dict(weight=w, ignore_index=ignore_index, label_smoothing=float(label_smoothing),
                z_loss=float(z_loss), softcap=None if softcap is None else float(softcap),
                reduction=reduction, block=block)
    source = x  # the caller's, for the in-place check (x may become a copy)
    x, t = x.contiguous(), t.contiguous()
    # ignored rows are skipped by the CPU head's rule (not where their logits may not be
    # finite: NaN reaches dx and dW, as in torch)
    split = (split_rows(_counted_rows(t, ignore_index), x,
                        lambda: idle_rows_nan(w, label_smoothing),
                        (linear_weight, linear_bias)) if skip_ignored else None)
    params = (x, linear_weight, linear_bias)
    out_dtype = x.dtype if loss_dtype is None else loss_dtype
    if records_graph() and any(p is not None and p.requires_grad for p in params):
        out = _LinearCrossEntropy.apply(x, linear_weight, linear_bias, t, split, opts, chunk,
                                        out_dtype, dw_dtype, source,
                                        _saved(saved_weight, weight, x))
    else:
        with torch.no_grad():
            out = _head(x, linear_weight, linear_bias, t, split, opts, chunk,
                        (False,) * 3).to(out_dtype)
    return out.reshape(()) if single and reduction == "none" else out
