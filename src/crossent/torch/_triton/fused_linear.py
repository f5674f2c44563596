"""Experimental: the linear head without any ``N x V`` buffer (fused matmul + log-sum-exp).

Forward: ``linear_lse_kernel`` forms ``(BLOCK_M x BLOCK_N)`` blocks of ``x W^T + b`` in
registers (float32 accumulation; the logits are never rounded or stored) and keeps a
running (max, sum of exponentials) per row and vocabulary split, plus the target logit;
the splits are combined with a log-sum-exp on the device. Backward (a separate launch,
so ``grad_output`` is known, also per row): ``linear_grad_kernel`` recomputes each block,
forms ``G = a p - c onehot(y)`` (``a = r (w_y + 2 z_loss lse)``, ``c = r w_y``, ``r`` the
row's ``grad_output`` over the "mean" denominator, 0 for ignored rows), rounds it once to
the input dtype and adds ``G W`` into dx, ``G^T x`` into dW and ``sum G`` into db with
float32 atomics. Memory beyond the returned gradients: float32 dx and dW accumulators and
O(N) per-row values. Cost: the ``x W^T`` product three times (forward, and once per
backward block before its two products), against the chunked head's three matmuls, with
Triton's matmul instead of cuBLAS. Whether that wins on time is what
``benchmarks/gpu/bench_cuda.py`` measures (contender ``crossent-fused``).

Supported: class-index targets, class weights, ``ignore_index``, ``z_loss``, reductions
mean/sum/none; label smoothing, softcap and probability targets raise
``UnsupportedError`` (the chunked head, :func:`.triton_linear_cross_entropy`, has them).
Atomics make dx and dW sums order-nondeterministic on the GPU (float32 rounding only).
"""

from __future__ import annotations

import torch

from ...errors import InputError, UnsupportedError
from .._rules import batched_grad_output, check_index_target
from . import ops
from .autograd import _check, _check_ignore_index, _check_linear_dtypes

__all__ = ["fused_linear_cross_entropy"]


def _blocks(fp32: bool) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, warps): 16-wide tiles in the interpreter (speed),
    128 x 128 x 64 on GPUs (untuned)."""
    from .kernels import interpreting

    if interpreting():
        return 16, 32, 16, 4
    return (64, 128, 32, 8) if fp32 else (128, 128, 64, 8)


def _upcast(x: torch.Tensor) -> bool:
    from .kernels import interpreting

    return interpreting() and x.dtype != torch.float32


def _forward_lse(x, w, b, y, splits=None):
    m_rows, d = x.shape
    v = w.shape[0]
    bm, bn, bk, warps = _blocks(x.dtype == torch.float32)
    row_tiles = (m_rows + bm - 1) // bm
    vocab_tiles = (v + bn - 1) // bn
    if splits is None:  # enough programs to fill a GPU: about 4 per SM-sized unit
        splits = max(1, min(vocab_tiles, 512 // max(row_tiles, 1)))
    per = (vocab_tiles + splits - 1) // splits
    splits = (vocab_tiles + per - 1) // per
    stats = torch.empty((3, splits, m_rows), dtype=torch.float32, device=x.device)
    with ops._launching():
        ops._kernels()["linear_lse"][(row_tiles, splits)](
            x, w, b if b is not None else x, y, stats[0], stats[1], stats[2], m_rows, v, d,
            x.stride(0), w.stride(0), per, HAS_BIAS=b is not None,
            FP32=x.dtype == torch.float32, UPCAST=_upcast(x), BLOCK_M=bm, BLOCK_N=bn,
            BLOCK_K=bk, num_warps=warps)
    m, s, zy = stats
    lse = torch.logsumexp(torch.where(s > 0, m + s.log(), float("-inf")), 0)
    return lse, zy.sum(0)


class _FusedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b, y, weight, ignore_index, z_loss, reduction):
        valid = y != ignore_index  # y is int64: -100 as uint8 would be class 156
        safe = torch.where(valid, y, 0)
        w_y = valid.float() if weight is None else torch.where(valid, weight[safe], 0.0)
        lse, zy = _forward_lse(x, w, b, y)
        rows = torch.where(valid, w_y * (lse - zy) + z_loss * lse.square(), 0.0)
        denom = w_y.sum()
        ctx.save_for_backward(x, w, b, y, lse, w_y, denom)
        ctx.z_loss, ctx.reduction, ctx.ignore_index = z_loss, reduction, ignore_index
        out = ops.reduce_rows(rows, denom, reduction)
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        if torch.is_grad_enabled():  # create_graph=True: the kernels are not differentiable
            raise UnsupportedError("fused_linear_cross_entropy: double backward "
                                   "(create_graph=True); use triton_linear_cross_entropy")
        if batched_grad_output(grad_output):  # a Triton launch cannot take vmap's batches
            raise UnsupportedError("fused_linear_cross_entropy: batched grad_outputs "
                                   "(torch.autograd.grad(..., is_grads_batched=True)); use "
                                   "triton_linear_cross_entropy")
        x, w, b, y, lse, w_y, denom = ctx.saved_tensors
        go = grad_output.float()
        r = go.reshape(-1) if ctx.reduction == "none" else go.expand(x.shape[0])
        if ctx.reduction == "mean":
            r = r / denom
        # ignored rows: no gradient. A counted row whose class weighs 0 keeps r: its z-loss
        # term has a gradient, and a "mean" over a zero weight sum is NaN (r = 1/0 times 0),
        # as torch's
        r = torch.where(y != ctx.ignore_index, r, 0.0)
        coef_y = r * w_y
        # a NaN target coefficient (0 x 1/0: a zero w_y over a zero "mean" denominator) is
        # NaN on the whole row, as torch's log_softmax backward spreads the NaN
        coef_p = torch.where(coef_y.isnan(), coef_y, r * (w_y + 2.0 * ctx.z_loss * lse))
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dev = x.device
        dx = torch.zeros(x.shape, dtype=torch.float32, device=dev) if need_x else None
        dw = torch.zeros(w.shape, dtype=torch.float32, device=dev) if need_w else None
        db = torch.zeros(w.shape[0], dtype=torch.float32, device=dev) \
            if need_b and b is not None else None
        m_rows, d = x.shape
        v = w.shape[0]
        bm, bn, bk, warps = _blocks(x.dtype == torch.float32)
        grid = ((m_rows + bm - 1) // bm, (v + bn - 1) // bn)
        dummy = lse
        with ops._launching():
            ops._kernels()["linear_grad"][grid](
                x, w, b if b is not None else x, y, lse, coef_p.contiguous(),
                coef_y.contiguous(), dx if dx is not None else dummy,
                dw if dw is not None else dummy, db if db is not None else dummy, m_rows, v,
                d, x.stride(0), w.stride(0), HAS_BIAS=b is not None, NEED_X=dx is not None,
                NEED_W=dw is not None, NEED_B=db is not None, FP32=x.dtype == torch.float32,
                UPCAST=_upcast(x), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps)
        return (None if dx is None else dx.to(x.dtype), None if dw is None else dw.to(w.dtype),
                None if db is None else db.to(b.dtype), None, None, None, None, None)


def fused_linear_cross_entropy(
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
    check_targets: bool = True,
) -> torch.Tensor:
    """``cross_entropy(input @ linear_weight.T + linear_bias, target)`` without logits in
    memory (experimental; see the module docstring for what it supports). ``input``
    ``(N, D)``, ``linear_weight`` ``(V, D)``, ``target`` ``(N,)`` class indices."""
    if label_smoothing or softcap is not None:
        raise UnsupportedError("fused_linear_cross_entropy: label_smoothing and softcap "
                               "(use triton_linear_cross_entropy)")
    if target.is_floating_point():
        raise UnsupportedError("fused_linear_cross_entropy: probability targets "
                               "(use triton_linear_cross_entropy)")
    if input.dim() != 2 or linear_weight.dim() != 2 or input.shape[1] != linear_weight.shape[1]:
        raise InputError(f"input (N, D) and linear_weight (V, D) expected; got "
                         f"{tuple(input.shape)} and {tuple(linear_weight.shape)}")
    _check_linear_dtypes(input, linear_weight, linear_bias)
    if input.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise UnsupportedError(f"fused_linear_cross_entropy: input dtype {input.dtype} "
                               f"(float32, bfloat16 or float16 only)")
    if tuple(target.shape) != (input.shape[0],):
        raise InputError(f"class-index target must have shape {(input.shape[0],)}")
    num_classes = linear_weight.shape[0]
    if linear_bias is not None and tuple(linear_bias.shape) != (num_classes,):
        raise InputError(f"linear_bias must have shape ({num_classes},)")
    w = _check(reduction, 0.0, z_loss, None, weight, num_classes, input, target)
    ignore_index = _check_ignore_index(ignore_index, target)
    if check_targets:
        check_index_target(target, num_classes, ignore_index)
    x = input.resolve_neg().contiguous()  # raw pointers: a negated view's sign resolved
    wt = linear_weight.resolve_neg().contiguous()
    b = None if linear_bias is None else linear_bias.resolve_neg().contiguous()
    return _FusedLinear.apply(x, wt, b, target.long().contiguous(), w, ignore_index,
                              float(z_loss), reduction)
