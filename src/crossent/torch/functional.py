"""Fused cross-entropy for PyTorch: the gradient is computed during the forward pass.

``cross_entropy`` is a drop-in for ``torch.nn.functional.cross_entropy`` (same positional
signature, deprecated ``size_average``/``reduce`` included; class dimension 1) and
``linear_cross_entropy`` for ``torch.nn.functional.linear_cross_entropy`` (same argument
order). Both accept crossent's
``z_loss`` and ``softcap`` too. Device-agnostic (CPU and CUDA): plain tensor operations
applied to blocks of rows; see :mod:`crossent.torch._kernels`.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from . import _buffers
from ._kernels import (
    Options,
    check_index_dtype,
    check_options,
    compute_dtype,
    cross_entropy_rows,
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


class _CrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, rows, opts, inplace):
        grad = logits if inplace else _buffers.empty(logits.shape, logits.dtype, logits)
        losses = cross_entropy_rows(logits, target, rows, opts, grad)
        ctx.grad, ctx.reduction = grad, opts.reduction
        ctx.keep = logits.dtype == torch.float64
        return reduce_losses(losses, rows, opts.reduction).to(logits.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        grad = _take(ctx, "grad")
        grad = grad.clone() if ctx.keep else grad
        _scale_stored(grad, grad_output, ctx.reduction)
        return grad, None, None, None, None


def _options(weight, num_classes, like, ignore_index, reduction, label_smoothing, z_loss,
             softcap) -> Options:
    check_options(reduction, label_smoothing, z_loss, softcap)
    if weight is not None:
        if tuple(weight.shape) != (num_classes,):
            raise ValueError(
                f"weight has shape {tuple(weight.shape)}; expected ({num_classes},), "
                f"one weight per class"
            )
        weight = weight.detach().to(device=like.device, dtype=compute_dtype(like.dtype))
    return Options(
        weight, -100 if ignore_index is None else int(ignore_index), float(label_smoothing),
        float(z_loss), None if softcap is None else float(softcap), reduction,
    )


def _flatten(input: torch.Tensor, target: torch.Tensor):
    """(N, C, d1, ...) -> (M, C) logits, (M,) or (M, C) target, and the per-row shape."""
    if not input.is_floating_point():
        raise ValueError(f"input must be a floating tensor of logits, got {input.dtype}")
    if input.dim() == 0:
        raise ValueError("input must have a class dimension; got a 0-d tensor")
    num_classes = input.shape[0 if input.dim() == 1 else 1]
    if input.dim() == 1:
        input, target = input.unsqueeze(0), target.unsqueeze(0)
        row_shape: tuple[int, ...] = ()
    else:
        row_shape = (input.shape[0], *input.shape[2:])
    if target.is_floating_point():
        if target.shape != input.shape:
            raise ValueError(
                f"probability target has shape {tuple(target.shape)}; expected the input's "
                f"{tuple(input.shape)}"
            )
        target = target.movedim(1, -1).reshape(-1, num_classes)
    else:
        if tuple(target.shape) != (input.shape[0], *input.shape[2:]):
            raise ValueError(
                f"class-index target has shape {tuple(target.shape)}; expected "
                f"{(input.shape[0], *input.shape[2:])} for input of shape {tuple(input.shape)}"
            )
        target = target.reshape(-1)
    logits = input if input.dim() == 2 else input.movedim(1, -1).reshape(-1, num_classes)
    return logits.contiguous(), target, row_shape


# Below this many logits torch's own C++ kernel wins: the fused kernel's ~60 tensor
# operations of Python dispatch cost ~0.3 ms, torch eager takes 0.04 ms at 64 x 10 and
# 0.2 ms at 256 x 1000; the two cross between 0.5 and 1.5 M logits on a 2-core CPU.
_NATIVE_MAX_LOGITS = 1 << 19


def _legacy_reduction(size_average: bool | None, reduce: bool | None) -> str:
    """torch's mapping of the deprecated ``size_average``/``reduce`` (None counts as True)."""
    name = "none" if reduce is False else "sum" if size_average is False else "mean"
    warnings.warn(f"size_average and reduce are deprecated (as in torch); use "
                  f"reduction={name!r}", UserWarning, stacklevel=3)
    return name


def _native_is_faster(num_logits: int, target: torch.Tensor, opts: Options) -> bool:
    """Small input with options torch has (index targets, no z-loss, no softcap).
    Probability targets always take the fused kernel: it keeps a zero target's term at
    exactly 0 where a logit is -inf, where torch's gives NaN."""
    return (num_logits < _NATIVE_MAX_LOGITS and not target.is_floating_point()
            and opts.z_loss == 0.0 and opts.softcap is None)


def _native_cross_entropy(input: torch.Tensor, target: torch.Tensor,
                          opts: Options) -> torch.Tensor:
    """``torch.nn.functional.cross_entropy`` with the arithmetic in float32 (float64
    stays): low-precision logits are converted first and the gradient rounded once."""
    check_index_dtype(target)
    out = F.cross_entropy(input.to(compute_dtype(input.dtype)), target.long(), opts.weight,
                          ignore_index=opts.ignore_index, reduction=opts.reduction,
                          label_smoothing=opts.label_smoothing)
    return out.to(input.dtype)


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
        target: class indices ``()``, ``(N)`` or ``(N, d1, ...)`` (integer), or class
            probabilities shaped like ``input`` (floating; no gradient flows to them).
        weight: per-class weights ``(C)``.
        size_average, reduce: torch's deprecated pair, mapped to ``reduction`` as torch maps
            them (with a warning); they keep the positional order of torch's signature.
        ignore_index: index targets equal to it give loss 0, gradient 0, and are not counted.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (per-row losses, shape of ``target``).
        label_smoothing: eps in [0, 1].
        z_loss: coefficient of ``lse^2`` added per counted row; not class-weighted.
        softcap: c > 0 to cap the logits at ``c * tanh(z / c)``; ``None`` for no cap.
        inplace_backward: write the gradient into the logits' own storage: no extra
            ``N x C`` memory, but **the logits tensor is destroyed** (it holds the gradient
            after the call). Only use it when nothing else reads the logits afterwards;
            autograd raises if an op that saved them for its own backward needs them.
            For ``(N, C, d1, ...)`` or non-contiguous input the kernel works on a copy.

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
    so ``torch.autograd.gradcheck`` works); double backward is not supported.

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
    """
    if size_average is not None or reduce is not None:
        reduction = _legacy_reduction(size_average, reduce)
    logits, flat_target, row_shape = _flatten(input, target)
    num_rows, num_classes = logits.shape
    opts = _options(weight, num_classes, logits, ignore_index, reduction,
                    label_smoothing, z_loss, softcap)
    if torch.is_grad_enabled() and target.requires_grad:
        raise NotImplementedError("crossent.torch.cross_entropy: no gradient for target")
    if _native_is_faster(logits.numel(), flat_target, opts):
        return _native_cross_entropy(input, target, opts)  # torch checks the indices
    rows = prepare_rows(flat_target, num_rows, num_classes, opts, compute_dtype(logits.dtype))
    if torch.is_grad_enabled() and logits.requires_grad:
        out = _CrossEntropyFunction.apply(logits, flat_target, rows, opts, inplace_backward)
    else:
        with torch.no_grad():
            losses = cross_entropy_rows(logits, flat_target, rows, opts)
            out = reduce_losses(losses, rows, reduction).to(logits.dtype)
    return out.reshape(row_shape) if reduction == "none" else out


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
    def forward(ctx, x, w, b, target, rows, opts, chunk):
        need = tuple(ctx.needs_input_grad[:3])
        ctx.reduction, ctx.chunk, ctx.need = opts.reduction, chunk, need
        ctx.keep = x.dtype == torch.float64
        ctx.dtypes = [t.dtype if t is not None else None for t in (x, w, b)]
        if opts.reduction == "none":  # the gradient depends on grad_output row by row
            losses, _ = _linear_pass(x, w, b, target, rows, opts, chunk, (False,) * 3)
            ctx.save_for_backward(x, w, b, target)
            ctx.rows, ctx.opts = rows, opts
        else:
            losses, ctx.grads = _linear_pass(x, w, b, target, rows, opts, chunk, need)
        return reduce_losses(losses, rows, opts.reduction).to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        if ctx.reduction == "none":
            x, w, b, target = ctx.saved_tensors
            _, grads = _linear_pass(x, w, b, target, ctx.rows, ctx.opts, ctx.chunk, ctx.need,
                                    row_multiplier=grad_output.to(compute_dtype(x.dtype)))
        else:
            grads = _take(ctx, "grads")
            grads = [g.clone() if ctx.keep and g is not None else g for g in grads]
            for g in grads:
                if g is not None:
                    _scale_stored(g, grad_output.to(g.dtype), ctx.reduction)
        out = [None if g is None else g.to(d)
               for g, d in zip(grads, ctx.dtypes, strict=True)]
        return out[0], out[1], out[2], None, None, None, None


@torch.compiler.disable
def linear_cross_entropy(
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
    For ``"mean"`` and ``"sum"`` the gradients are computed in the forward pass; for
    ``"none"`` the backward recomputes the logits chunk by chunk, scaling each row by its
    ``grad_output`` (so any ``grad_output`` is right).

    Args:
        input: ``(N, D)`` or ``(D)`` features.
        linear_weight: ``(C, D)``, as ``torch.nn.Linear(D, C).weight``.
        target: ``(N)``/``()`` class indices or ``(N, C)``/``(C)`` probabilities.
        linear_bias: ``(C)`` or ``None``. Positional here, keyword in torch; both work.
        weight, reduction, ignore_index, label_smoothing, z_loss, softcap: as in
            :func:`cross_entropy` (``ignore_index=None`` means -100, as in torch).
        chunk_size: rows per chunk. Default: logits of a quarter of the float32 dW's
            size, at least 16 MiB (at D=512: 128 float32 rows, 256 bfloat16 rows); and
            under ``2**19`` logits with index targets, neither ``z_loss`` nor ``softcap``,
            and input, weight and bias of one dtype, no chunking at all: ``F.linear`` and
            torch's own kernel (in float32), faster at that size (see
            :func:`cross_entropy`). Giving ``chunk_size`` always takes the fused path.
            Larger chunks are faster (fewer passes over ``W`` and ``dW``) and hold more
            memory.

    Same argument order as ``torch.nn.functional.linear_cross_entropy`` (torch >= 2.13),
    whose ``options`` (chunking strategy) this replaces with ``chunk_size``.
    Reference: the unfused ``torch.nn.functional.cross_entropy(input @ W.T + b, target)``.

    >>> import torch
    >>> x, w = torch.ones(2, 4), torch.zeros(3, 4, requires_grad=True)
    >>> round(linear_cross_entropy(x, w, torch.tensor([0, 1])).item(), 6)  # ln 3
    1.098612
    """
    if linear_weight.dim() != 2:
        raise NotImplementedError("linear_weight must be (C, D); K-dimensional heads unsupported")
    if input.dim() not in (1, 2):
        raise ValueError(f"input must be (N, D) or (D); got shape {tuple(input.shape)} "
                         f"(flatten (B, T, D) hidden states to (B*T, D), target to (B*T))")
    single = input.dim() == 1
    x = input.unsqueeze(0) if single else input
    t = target.unsqueeze(0) if single else target
    num_classes, features = linear_weight.shape
    if x.shape[1] != features:
        raise ValueError(f"input has {x.shape[1]} features, linear_weight expects {features}")
    if linear_bias is not None and tuple(linear_bias.shape) != (num_classes,):
        raise ValueError(f"linear_bias must have shape ({num_classes},)")
    if t.is_floating_point() and tuple(t.shape) != (x.shape[0], num_classes):
        raise ValueError(f"probability target must have shape {(x.shape[0], num_classes)}")
    if not t.is_floating_point() and tuple(t.shape) != (x.shape[0],):
        raise ValueError(f"class-index target must have shape {(x.shape[0],)}")
    opts = _options(weight, num_classes, x, ignore_index, reduction, label_smoothing,
                    z_loss, softcap)
    same_dtype = linear_weight.dtype == x.dtype and (linear_bias is None
                                                     or linear_bias.dtype == x.dtype)
    if (chunk_size is None and same_dtype
            and _native_is_faster(x.shape[0] * num_classes, t, opts)):
        # small: one torch matmul (as the unfused head) and torch's kernel in float32
        logits = F.linear(x, linear_weight, linear_bias)
        out = _native_cross_entropy(logits, t, opts)
        return out.reshape(()) if single and reduction == "none" else out
    rows = prepare_rows(t, x.shape[0], num_classes, opts, compute_dtype(x.dtype))
    if chunk_size is None:
        chunk = _default_chunk(num_classes, features,
                               _matmul_dtype(x, linear_weight).itemsize)
    else:
        chunk = int(chunk_size)
    if chunk < 1:
        raise ValueError(f"chunk_size={chunk_size!r} must be >= 1")
    x = x.contiguous()
    params = (x, linear_weight, linear_bias)
    if torch.is_grad_enabled() and any(p is not None and p.requires_grad for p in params):
        out = _LinearCrossEntropyFunction.apply(x, linear_weight, linear_bias, t, rows, opts,
                                                chunk)
    else:
        with torch.no_grad():
            losses, _ = _linear_pass(x, linear_weight, linear_bias, t, rows, opts, chunk,
                                     (False,) * 3)
            out = reduce_losses(losses, rows, reduction).to(x.dtype)
    return out.reshape(()) if single and reduction == "none" else out

