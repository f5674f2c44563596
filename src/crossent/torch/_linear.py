"""``linear_cross_entropy``: the chunked linear head (``input @ W.T + b`` and the fused
loss, never more than one chunk of logits) and its autograd Function.

The chunk loop is :func:`._chunked_head.head_pass` (shared with the Triton head); here each
chunk's logits go through the row-block kernel (:func:`._rowblock.cross_entropy_rows`) in
place (:class:`_RowBlockChunks`); the routes, option checks and sizing are those of
:func:`._cross_entropy.cross_entropy` (:mod:`._backends`, :mod:`._rules`). Public as
:func:`crossent.torch.linear_cross_entropy` (:mod:`crossent.torch.functional`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any, overload

import torch
import torch.nn.functional as F

from ..errors import InputError, UnsupportedError
from . import _backends, _composite, _statistics
from ._chunked_head import RowSplit, head_pass, rows_per_chunk, split_rows, weight_grad_dtype
from ._cross_entropy import cross_entropy, native_cross_entropy, watch_num_items
from ._custom_ops import compilable
from ._rowblock import cross_entropy_rows
from ._rules import (
    Options,
    Rows,
    autocast_dtype,
    autocast_linear,
    check_flag,
    check_ignore_index,
    check_index_dtype,
    check_same_device,
    check_target_intact,
    choose_loss_dtype,
    compute_dtype,
    divide_by_num_items,
    double_backward,
    fake_values,
    head_inputs_read,
    idle_rows_nan,
    kernel_reduction,
    make_options,
    matmul_dtype,
    no_autocast,
    positive_int,
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
    within_fake_mode,
)

__all__ = ["linear_cross_entropy"]


def _counted_rows(rows: Rows, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None,
                  opts: Options) -> RowSplit | None:
    """The counted and the ignored rows when the pass may skip the ignored ones, else
    None: the shared rule (:func:`._chunked_head.split_rows`; an ignored row whose logits
    may not be finite (non-finite features, weights or bias, or finite ones whose product
    may overflow), or with torch's NaN gradient, is not skipped, so NaN reaches dx and dW
    as in torch)."""
    return split_rows(rows.valid, x, lambda: idle_rows_nan(opts.weight, opts.label_smoothing),
                      (w, b))


def _compact(rows: Rows, keep: torch.Tensor) -> Rows:
    """:class:`Rows` of the counted rows ``keep`` only (same denominator): each row's
    numbers are unchanged, so the kernel computes the same loss and gradient for it."""
    assert rows.index is not None and rows.valid is not None
    assert rows.target_mass is not None
    return Rows(rows.index[keep], rows.valid[keep], rows.scale[keep], rows.target_mass[keep],
                rows.denominator)


class _RowBlockChunks:
    """The row-block kernel (:func:`._rowblock.cross_entropy_rows`) on each chunk of the
    linear head (a :class:`._chunked_head.ChunkKernel`), gathering the statistics
    ``names`` of the rows it sees (their collector made on the first use)."""

    def __init__(self, target: torch.Tensor, rows: Rows, opts: Options,
                 names: tuple[str, ...] | None = None) -> None:
        self.target, self.rows, self.opts, self.names = target, rows, opts, names
        self._stats: _statistics.RowStatistics | None = None

    def only(self, keep: torch.Tensor) -> _RowBlockChunks:
        return _RowBlockChunks(self.target, _compact(self.rows, keep), self.opts, self.names)

    def statistics(self) -> _statistics.RowStatistics | None:
        if self._stats is None and self.names is not None:
            scale = self.rows.scale
            self._stats = _statistics.RowStatistics(
                self.names, scale.shape[0], self.rows.index, scale.dtype, scale.device)
        return self._stats

    def __call__(self, logits: torch.Tensor, start: int, *, grad: bool,
                 row_multiplier: torch.Tensor | None) -> torch.Tensor:
        stats = self.statistics()
        extra = {} if stats is None else stats.kernel_args(start, logits.shape[0])
        # for bf16 the gradient is formed in float32 (p - 1 included) and rounded once
        return cross_entropy_rows(logits, self.target, self.rows, self.opts,
                                  logits if grad else None, start=start,
                                  row_multiplier=row_multiplier, **extra)


def _linear_pass(x, w, b, target, rows, opts, chunk, need, row_multiplier=None, names=None,
                 dw_dtype=None):
    """The chunked head (:func:`._chunked_head.head_pass`) with the row-block kernel:
    row losses, ``[dx, dW, db]`` (None where not asked) and, for statistics ``names``,
    their :class:`._statistics.TokenStatistics` (else None). Ignored rows are skipped
    (:func:`_counted_rows`). ``dw_dtype``: :func:`._chunked_head.weight_grad_dtype`."""
    counted = None if names is None else _statistics.counted_rows(rows, x.shape[0])
    run = head_pass(x, w, b, _RowBlockChunks(target, rows, opts, names), chunk, need,
                    row_multiplier=row_multiplier, split=_counted_rows(rows, x, w, b, opts),
                    dw_dtype=dw_dtype)
    if names is None:
        return run.losses, run.grads, None
    assert counted is not None and isinstance(run.kernel, _RowBlockChunks)
    stats = run.kernel.statistics()
    assert stats is not None
    return run.losses, run.grads, _statistics.finish(stats, opts, counted, run.keep)


class _LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b, target, rows, opts, chunk, keep, out_dtype, holder=None,
                dw_dtype=None, x_source=None):
        need = tuple(ctx.needs_input_grad[:3])
        ctx.reduction, ctx.chunk, ctx.need, ctx.dw_dtype = opts.reduction, chunk, need, dw_dtype
        ctx.keep = keep or x.dtype == torch.float64
        ctx.dtypes = [t.dtype if t is not None else None for t in (x, w, b)]
        ctx.opts, ctx.device_type, ctx.mdtype = opts, x.device.type, matmul_dtype(x, w)
        ctx.rows = rows
        save_inputs(ctx, x, w, b, target)
        # x_source: the caller's input where x is its contiguous copy
        remember_target(ctx, target, **head_inputs_read(
            need, x if x_source is None else x_source, w, opts.saved_weight))
        names = None if holder is None else holder.names
        # float16 chunks (accelerators): the gradients without the mean's 1/denominator,
        # applied in backward with grad_output (_rules.defers_mean_scale)
        kernel_rows, ctx.deferred = (rows_deferring_mean(rows, ctx.mdtype, opts)
                                     if any(need) else (rows, None))
        if opts.reduction == "none":  # the gradient depends on grad_output row by row
            losses, _, stats = _linear_pass(x, w, b, target, rows, opts, chunk, (False,) * 3,
                                            names=names)  # backward: from the saved inputs
        else:
            losses, ctx.grads, stats = _linear_pass(x, w, b, target, kernel_rows, opts, chunk,
                                                    need, names=names, dw_dtype=dw_dtype)
        if holder is not None:
            holder.stats = stats
        return reduce_losses(losses, rows, opts.reduction).to(out_dtype)

    @staticmethod
    @releases_inputs
    def backward(ctx, grad_output):
        nothing = (None,) * 9
        check_target_intact(ctx, "linear_cross_entropy")

        def loss(x, w, b, t):
            logits = _composite.linear_logits(x, w, b, ctx.mdtype)
            return _composite.cross_entropy(logits, t, ctx.opts.weight, ctx.opts)

        if recompute_in_backward(grad_output):  # create_graph=True, is_grads_batched=True
            grads = double_backward(ctx, grad_output, "linear_cross_entropy", loss,
                                    create_graph=torch.is_grad_enabled())
            return (*grads[:3], *nothing)
        # the 0-d grad_output of "mean"/"sum" read to the host once (one sync on an
        # accelerator; on the CPU the tensor itself): the infinite check and
        # scale_stored's test for 1 both read this copy. Rounded to the compute dtype
        # first, as torch's ToCopyBackward rounds a float64 loss's (1e300 is inf for a
        # float32 head: review H110-1)
        cdtype = compute_dtype(ctx.mdtype)
        scale = (None if ctx.reduction == "none"
                 else (grad_output.to(cdtype) if ctx.deferred is None
                       else grad_output.to(ctx.deferred.dtype) * ctx.deferred).to("cpu"))
        if scale is not None and bool(scale.isinf()):
            # torch's dlogits is NaN where inf - inf meets (the targets), +-inf elsewhere,
            # and dx, dW, db sum those; the stored gradients times inf cannot give that
            # pattern, so this rare step (a diverged loss scale) is recomputed with torch
            # ops ("none" recomputes with the kernel, whose a p + c is NaN there already)
            grads = double_backward(ctx, grad_output, "linear_cross_entropy", loss,
                                    create_graph=False)
            return (*grads[:3], *nothing)
        if ctx.reduction == "none":
            x, w, b, target = saved_inputs(ctx, "linear_cross_entropy")
            with no_autocast(ctx.device_type):
                _, grads, _ = _linear_pass(x, w, b, target, ctx.rows, ctx.opts, ctx.chunk,
                                        ctx.need,
                                        row_multiplier=grad_output.to(compute_dtype(x.dtype)),
                                        dw_dtype=ctx.dw_dtype)
        else:
            grads = take_stored(ctx, "grads")
            grads = [g.clone() if ctx.keep and g is not None else g for g in grads]
            valid = ctx.rows.valid  # ignored rows: dx 0; nothing counted: dW, db 0 too
            counted = (valid, None, None) if valid is None else (valid, valid.any(),
                                                                 valid.any())
            for g, rows in zip(grads, counted, strict=True):
                if g is not None:  # the factor in float32, one rounding: a float16
                    scale_stored(g, scale, ctx.reduction, rows)  # 65536 would be inf
        out = [None if g is None else g.to(d)
               for g, d in zip(grads, ctx.dtypes, strict=True)]
        return (*out, *nothing)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _chunk_from_options(options, chunk_size, num_rows, num_classes, features, dtype):
    """``chunk_size`` and torch's ``LinearCrossEntropyOptions`` -> (rows per chunk or None
    for crossent's default, keep the gradients for ``retain_graph``).

    ``batch_chunk_size`` is the chunk; ``chunking_method="aspect_ratio[:k]"`` is torch's
    rule (``next_pow2(ceil(N / ceil(C / D))) / k`` rows); ``"auto"``/``None`` without a
    size: crossent's default. ``allow_retain_graph=True`` keeps the stored gradients so
    backward may run twice. ``acc_policy``, returned third: crossent accumulates in
    float32 (float64 for float64), at least every policy's precision, except that
    ``"compact"``/``"auto"`` sum dW in bf16/fp16 on CUDA as torch does there
    (:func:`._chunked_head.weight_grad_dtype`); ``acc_dtype`` other than the compute dtype
    raises :class:`UnsupportedError`."""
    if options is None:
        return chunk_size, False, None
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
    return ((chunk_size if chunk is None else chunk), bool(options.allow_retain_graph),
            options.acc_policy)


def _linear_k_dimensional(x, w, b, target, weight, opts, loss_dtype, chunked, backend,
                          names=None):
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
                         num_items=opts.num_items, backend=backend, statistics=names)


def _check_linear(x, w, b, t) -> None:
    """torch's argument checks of linear_cross_entropy, as :class:`InputError`."""
    for name, v in (("input", x), ("linear_weight", w), ("target", t)):
        if not isinstance(v, torch.Tensor):
            raise InputError(f"{name} must be a tensor, got {type(v).__name__}")
    if not x.is_floating_point():
        raise InputError(f"input must be a floating tensor, got {x.dtype}")
    for name, v in (("linear_weight", w), ("linear_bias", b), ("target", t)):
        if v is not None:
            check_same_device(v, name, x)
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


def _check_one_dtype(x, w, b) -> None:
    """input, linear_weight and linear_bias of one dtype, as ``F.linear`` sees them: after
    autocast's casts (a bfloat16 body with a float32 head computes under autocast; a
    float64 one, which autocast leaves alone, raises as in torch)."""
    if w.dtype != x.dtype or (b is not None and b.dtype != x.dtype):
        raise InputError(
            f"input, linear_weight and linear_bias must share one dtype (torch raises "
            f"too); got {x.dtype}, {w.dtype}, {None if b is None else b.dtype}"
        )


@overload
def linear_cross_entropy(
    input: torch.Tensor, linear_weight: torch.Tensor, target: torch.Tensor,
    linear_bias: torch.Tensor | None = ..., *, weight: torch.Tensor | None = ...,
    reduction: str = ..., ignore_index: int | None = ..., label_smoothing: float = ...,
    z_loss: float = ..., softcap: float | None = ..., chunk_size: int | None = ...,
    options: Any = ..., loss_dtype: torch.dtype | None = ...,
    num_items: int | float | torch.Tensor | None = ..., backend: str = ...,
    shift: bool = ..., statistics: None = ...,
) -> torch.Tensor: ...
@overload
def linear_cross_entropy(
    input: torch.Tensor, linear_weight: torch.Tensor, target: torch.Tensor,
    linear_bias: torch.Tensor | None = ..., *, weight: torch.Tensor | None = ...,
    reduction: str = ..., ignore_index: int | None = ..., label_smoothing: float = ...,
    z_loss: float = ..., softcap: float | None = ..., chunk_size: int | None = ...,
    options: Any = ..., loss_dtype: torch.dtype | None = ...,
    num_items: int | float | torch.Tensor | None = ..., backend: str = ...,
    shift: bool = ..., statistics: str | Sequence[str],
) -> tuple[torch.Tensor, _statistics.TokenStatistics]: ...
# (the two overloads: without statistics a tensor, with them a (loss, statistics) pair)
@compilable("linear_cross_entropy")  # torch.compile: the crossent:: custom operators
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
    statistics: str | Sequence[str] | None = None,
) -> torch.Tensor | tuple[torch.Tensor, _statistics.TokenStatistics]:
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
    float32). Ignored rows (class-index targets equal to ``ignore_index``: the masked
    prompt of SFT batches, padding) are skipped: the chunks are gathered from the counted
    rows only, so neither the matmuls nor the kernel run on them (half the work when half
    the tokens are ignored). A skipped row's ``dx`` is exactly 0 and every other number
    is the unskipped computation's. Only rows whose logits cannot overflow are skipped
    (finite features, ``||x_n||_1 max|W| + max|b|`` under half the dtype's largest
    number), and none where torch's ignored rows get NaN gradients (a non-finite class
    weight with label smoothing): other ignored rows are computed and get torch's
    numbers, so NaN or infinite features (or logits past the dtype's range) give torch's
    NaN ``dx`` for that row and NaN ``dW``.
    For ``"mean"`` and ``"sum"`` the gradients are computed in the forward pass (a
    ``grad_output`` other than 1 then scales the stored low-precision ``dx``: a second
    rounding; so does float16 ``"mean"`` (or ``num_items``) on accelerators, whose chunks
    store the gradient without ``1 / denominator`` and apply it with ``grad_output`` in
    backward); for ``"none"`` the backward recomputes the logits chunk by chunk, scaling
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
        statistics: per-token statistics from the same pass (``"lse"``, ``"z_loss"``,
            ``"target_logprob"``, ``"accuracy"``, ``"entropy"``; any subset): the call
            returns ``(loss, stats)``, a :class:`crossent.torch.TokenStatistics` of
            detached float32 (float64) tensors of the target's row shape (``(B, T - 1)``
            with ``shift=True``); definitions, ignored rows (NaN; ``accuracy`` False;
            the ``counted`` mask) and probability targets as in :func:`cross_entropy`.
            The chunked head takes them from each chunk's logits while the kernel holds
            them, never forming more logits than that chunk: ``lse``/``z_loss`` cost
            O(N), ``target_logprob`` two gathers per row, ``accuracy`` an argmax pass over
            the chunk, ``entropy`` a ``-p log p`` pass (a log per logit) and a sum;
            ignored rows cost nothing. Measured on a shared 2-core CPU at N=2048,
            C=32000, D=512 float32: all five add 7-17% to a forward+backward step (two
            runs; the matmuls dominate; ``entropy`` and ``accuracy`` are the costly ones,
            ``lse``/``z_loss``/``target_logprob`` about nothing). ``statistics=None``
            (the default) runs the same code as without the option.
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
    >>> loss, stats = linear_cross_entropy(x, w, torch.tensor([0, -100]),
    ...                                    statistics=("entropy", "accuracy"))
    >>> stats.entropy, stats.accuracy  # uniform: ln 3; argmax 0; row 1 ignored
    (tensor([1.0986,    nan]), tensor([ True, False]))
    """
    row_shape, drop_last = None, True
    if shift is not False:
        input, target, row_shape, drop_last = _shift_labels(
            input, target, ignore_index, shift, weight, label_smoothing)
    _check_linear(input, linear_weight, linear_bias, target)
    if row_shape is not None and linear_weight.dim() > 2:
        raise UnsupportedError("crossent.torch.linear_cross_entropy: shift=True with a "
                               "K-dimensional linear_weight")
    backend = _backends.check_backend(backend)
    names = _statistics.check_statistics(statistics)
    _statistics.refuse_for_probabilities(names, target.is_floating_point(),
                                         "linear_cross_entropy")
    x, w, b = autocast_linear(input, linear_weight, linear_bias)
    _check_one_dtype(x, w, b)
    if target.is_floating_point() and ignore_index is not None:
        raise InputError(f"ignore_index={ignore_index!r} with probability targets: it only "
                         f"applies to class indices (torch raises too); leave it None")
    num_classes, features = w.shape[0], w.shape[-1]
    if chunk_size is not None:
        chunk_size = positive_int(chunk_size, "chunk_size")
    chunk_size, keep, acc_policy = _chunk_from_options(
        options, chunk_size, x.shape[0] if x.dim() == 2 else 1, num_classes, features,
        x.dtype)
    out_dtype = choose_loss_dtype(loss_dtype, x, target, weight)
    opts = make_options(weight, num_classes, x, ignore_index, reduction, label_smoothing,
                    z_loss, softcap, autocast_dtype(x, x.device.type), num_items,
                    isinstance(target, torch.Tensor) and target.is_floating_point())
    if w.dim() > 2:
        found = _linear_k_dimensional(x, w, b, target, weight, opts, loss_dtype,
                                      chunk_size is not None, backend, names)
        if names is None:
            return watch_num_items(found, "linear_cross_entropy", x, target, num_items)
        return (watch_num_items(found[0], "linear_cross_entropy", x, target, num_items),
                found[1])
    single = x.dim() == 1
    x = x.unsqueeze(0) if single else x
    t = target.unsqueeze(0) if single else target
    if t.is_floating_point() and tuple(t.shape) != (x.shape[0], num_classes):
        raise InputError(f"probability target must have shape {(x.shape[0], num_classes)}")
    if not t.is_floating_point() and tuple(t.shape) != (x.shape[0],):
        raise InputError(f"class-index target must have shape {(x.shape[0],)}")
    grad_on = records_graph()
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
                 if target_grad else
                 _backends.composite_reason(num_classes, False, x, w, b, t, weight))
    call = _backends.Call(
        "linear_cross_entropy", x.device, x.shape[0] * num_classes, not prob, opts.z_loss,
        opts.softcap, composite,
        _statistics.triton_refusal(names) or _backends.triton_refusal(
            target_grad=target_grad, weight_grad=weight_grad, retain=keep),
        sized=chunk_size is not None,
        subclass=_backends.own_dispatch(input, linear_weight, linear_bias, target, weight),
        fake=fake_values(input, linear_weight, linear_bias, target, weight))
    route = _backends.choose_backend(backend, call, _backends.NATIVE_MAX_LOGITS)
    stats = None
    with no_autocast(x.device.type), within_fake_mode(call.fake, x, w, b, t, weight):
        if route in ("composite", "native"):
            logits = (_composite.linear_logits(x, w, b, matmul_dtype(x, w))
                      if route == "composite" else F.linear(x, w, b))
            out = (_composite.cross_entropy(logits, t, weight, opts).to(out_dtype)
                   if route == "composite"  # one torch matmul, torch's kernel:
                   else native_cross_entropy(logits, t, weight, opts, out_dtype,
                                             "linear_cross_entropy"))
            if names is not None:
                stats = _statistics.from_logits(names, logits, t, opts)
        elif route == "triton":
            out = _triton_linear(x, w, b, t, weight, opts, chunk_size, out_dtype,
                                 weight_grad_dtype(acc_policy, x, w))
        else:
            out, stats = _fused_linear(x, w, b, t, opts, chunk_size, keep, out_dtype, names,
                                       weight_grad_dtype(acc_policy, x, w))
    out = watch_num_items(out, "linear_cross_entropy", x, t, num_items)
    if row_shape is not None and reduction == "none":  # drop the last positions
        out = out.reshape(row_shape)
        out = out[..., :-1] if drop_last else out
    elif single and reduction == "none":
        out = out.reshape(())
    if names is None:
        return out
    assert stats is not None
    if row_shape is not None:
        return out, _statistics.reshape(stats, row_shape, drop_last=drop_last)
    return out, _statistics.reshape(stats, () if single else (x.shape[0],))


def _shift_labels(input, target, ignore_index, shift, weight=None, label_smoothing=0.0):
    """``shift=True``: the ``(B T, D)`` view of ``(B, T, D)`` hidden states, the int64
    targets ``target[..., 1:]`` with ``ignore_index`` at each last position, the
    target's shape and True (to cut ``reduction="none"`` back to ``(B, T - 1)``).

    Where those padding rows would reach a gradient (a last position's features not
    finite: ``0 x inf`` in ``dW``; label smoothing with a non-finite class weight: NaN
    gradients of ignored rows) or a ``torch.func`` transform is active (no host read),
    torch's own ``input[..., :-1, :]`` and ``target[..., 1:]`` instead, a copy of the
    hidden states when ``B > 1``, with their row shape and False."""
    check_flag(shift, "shift")
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
    ignore = -100 if ignore_index is None else check_ignore_index(ignore_index)
    if _padding_would_leak(input, weight, label_smoothing):
        kept = target[..., 1:]
        return (input[..., :-1, :].reshape(-1, input.shape[-1]), kept.reshape(-1),
                tuple(kept.shape), False)
    shifted = torch.full(target.shape, ignore, dtype=torch.long, device=target.device)
    shifted[..., :-1] = target[..., 1:]
    return (input.reshape(-1, input.shape[-1]), shifted.reshape(-1),
            tuple(target.shape), True)


def _padding_would_leak(input: torch.Tensor, weight, label_smoothing) -> bool:
    """Whether ``shift=True``'s ignored padding rows would reach a gradient torch never
    forms (see :func:`_shift_labels`). One host read of the last positions' ``B x D``
    features (and of the class weight with smoothing)."""
    if (_composite.composable_required(input) or input.device.type == "meta"
            or fake_values(input, weight)):
        return True  # no host read there; torch's slicing gives the same shapes
    if input.shape[-2] and not bool(torch.isfinite(input[..., -1, :]).all()):
        return True
    return (isinstance(weight, torch.Tensor) and weight.is_floating_point()
            and isinstance(label_smoothing, (int, float)) and not isinstance(label_smoothing, bool)
            and idle_rows_nan(weight, float(label_smoothing)))


def _triton_linear(x, w, b, t, weight, opts, chunk_size, out_dtype, dw_dtype=None):
    """The Triton-backed chunked head (:mod:`._triton`), options already checked."""
    from ._triton import triton_linear_cross_entropy

    out = triton_linear_cross_entropy(
        x, w, t, b, weight=None if weight is None else weight.detach(),
        reduction=kernel_reduction(opts),
        ignore_index=None if t.is_floating_point() else opts.ignore_index,
        label_smoothing=opts.label_smoothing, z_loss=opts.z_loss, softcap=opts.softcap,
        chunk_size=chunk_size, loss_dtype=compute_dtype(x.dtype), dw_dtype=dw_dtype,
        saved_weight=opts.saved_weight)
    return divide_by_num_items(out, opts).to(out_dtype)  # rounded once, from float32


class _StatisticsHolder:
    """Carries the statistics names into the autograd Function and the result out."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self.names = names
        self.stats: _statistics.TokenStatistics | None = None


def _fused_linear(x, w, b, t, opts, chunk_size, keep, out_dtype, names=None, dw_dtype=None):
    """The chunked head's loss, and with statistics ``names`` their values (else None)."""
    rows = prepare_rows(t, x.shape[0], w.shape[0], opts, compute_dtype(x.dtype))
    chunk = rows_per_chunk(chunk_size, x, w)
    source, x = x, x.contiguous()
    if records_graph() and any(p is not None and p.requires_grad for p in (x, w, b)):
        holder = None if names is None else _StatisticsHolder(names)
        out = _LinearCrossEntropyFunction.apply(x, w, b, t, rows, opts, chunk, keep,
                                                out_dtype, holder, dw_dtype, source)
        return out, None if holder is None else holder.stats
    with torch.no_grad():
        losses, _, stats = _linear_pass(x, w, b, t, rows, opts, chunk, (False,) * 3,
                                        names=names)
        return reduce_losses(losses, rows, opts.reduction).to(out_dtype), stats
