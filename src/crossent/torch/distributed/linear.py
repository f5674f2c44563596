"""``vocab_parallel_linear_cross_entropy``: the vocab-parallel output layer and its
cross-entropy fused and chunked over rows, so no rank ever holds the full logits."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from ._common import (
    Partials,
    check_target,
    compute_dtype,
    exchange,
    grad_block,
    make_layout,
    make_spec,
    reduce_loss,
)

__all__ = ["vocab_parallel_linear_cross_entropy"]

_CHUNK_BYTES = 16 << 20  # float32 local logits per chunk


def default_chunk(local_classes: int) -> int:
    """About 16 MiB of float32 local logits, a multiple of 32 rows (at least 32)."""
    return max(32, _CHUNK_BYTES // (4 * max(local_classes, 1)) // 32 * 32)


def _run(x, w, b, target, valid, lay, spec, problem, chunk, need, scale=None, saved=None):
    """One pass over row chunks. Forward (``saved is None``): two all-reduces per chunk,
    per-row loss statistics, and (if ``need``) the gradients with ``d reduced/d l_n = 1``
    on counted rows. Backward recompute (``saved = (lse, coef)``): gradients scaled by
    ``scale`` per row, no collective."""
    n, size = x.shape[0], w.shape[0]
    cdtype = compute_dtype(x.dtype)
    w32 = w.to(cdtype)
    b32 = None if b is None else b.to(cdtype)
    need_x, need_w, need_b = need
    gx = torch.zeros(x.shape, dtype=cdtype, device=x.device) if need_x else None
    gw = torch.zeros_like(w32) if need_w else None
    gb = torch.zeros_like(b32) if need_b and b32 is not None else None
    buf = torch.empty((min(chunk, n), size), dtype=cdtype, device=x.device)
    stats = [torch.zeros(n, dtype=cdtype, device=x.device) for _ in range(4)]
    loss, lse, coef, wy = stats if saved is None else (None, *saved, None)
    ones = valid.to(cdtype)
    for i in range(0, max(n, 1), chunk):  # an empty batch still makes the collectives
        j = min(i + chunk, n)
        xc = x[i:j].to(cdtype)
        lg = buf[: j - i]
        if problem is None:
            if b32 is None:
                torch.mm(xc, w32.t(), out=lg)
            else:
                torch.addmm(b32, xc, w32.t(), out=lg)
        if saved is None:
            part = Partials.empty(j - i, spec, cdtype, x.device)
            if problem is None:
                part.fill(0, lg, target[i:j], valid[i:j], lay, spec)
            st = exchange(part, valid[i:j], lay, spec, problem,
                          check=target if i == 0 else None)
            loss[i:j], lse[i:j], coef[i:j], wy[i:j] = st.loss, st.lse, st.coef, st.wy
            sc = ones[i:j]
        else:
            sc = scale[i:j]
        if any(need):
            g = grad_block(lg, target[i:j], valid[i:j], lse[i:j], coef[i:j], sc, lay, spec,
                           spec.num_classes)
            if need_x:
                torch.mm(g, w32, out=gx[i:j])
            if need_w:
                gw.addmm_(g.t(), xc)
            if need_b:
                gb += g.sum(0)
    return (loss, lse, coef, wy), [gx, gw, gb]


class _VocabParallelLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b, target, valid, lay, spec, problem, chunk, reduce_input_grad):
        need = tuple(ctx.needs_input_grad[:3])
        ctx.lay, ctx.spec, ctx.chunk, ctx.need = lay, spec, chunk, need
        ctx.reduce_input_grad = reduce_input_grad
        ctx.dtypes = [t.dtype if t is not None else None for t in (x, w, b)]
        none = spec.reduction == "none"
        (loss, lse, coef, wy), grads = _run(x, w, b, target, valid, lay, spec, problem, chunk,
                                            (False,) * 3 if none else need)
        out, ctx.scale = reduce_loss(loss, wy, valid, spec)
        if none:  # the gradient depends on grad_output row by row: recompute in backward
            ctx.save_for_backward(x, w, b, target, valid, lse, coef)
        else:
            ctx.grads = grads
        return out.to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        spec = ctx.spec
        if spec.reduction == "none":
            x, w, b, target, valid, lse, coef = ctx.saved_tensors
            go = grad_output.reshape(-1).to(lse.dtype)
            _, grads = _run(x, w, b, target, valid, ctx.lay, spec, None, ctx.chunk, ctx.need,
                            scale=go, saved=(lse, coef))
        else:
            grads, ctx.grads = ctx.grads, None
            if grads is None:
                raise RuntimeError("crossent: backward ran twice through "
                                   "vocab_parallel_linear_cross_entropy (retain_graph is not "
                                   "supported)")
            factor = grad_output.to(grads[0].dtype if grads[0] is not None else
                                    next(g for g in grads if g is not None).dtype) * ctx.scale
            grads = [None if g is None else g.mul_(factor) for g in grads]
        gx = grads[0]
        if gx is not None and ctx.reduce_input_grad and ctx.lay.communicate:
            dist.all_reduce(gx, op=dist.ReduceOp.SUM, group=ctx.lay.group)
        out = [None if g is None else g.to(d) for g, d in zip(grads, ctx.dtypes, strict=True)]
        return out[0], out[1], out[2], None, None, None, None, None, None, None


def vocab_parallel_linear_cross_entropy(
    input: torch.Tensor,
    local_weight: torch.Tensor,
    target: torch.Tensor,
    *,
    local_bias: torch.Tensor | None = None,
    group=None,
    vocab_start: int | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    weight: torch.Tensor | None = None,
    reduction: str = "mean",
    num_items: torch.Tensor | float | None = None,
    chunk_size: int | None = None,
    reduce_input_grad: bool = True,
) -> torch.Tensor:
    """``vocab_parallel_cross_entropy(input @ local_weight.T + local_bias, target, ...)``
    computed ``chunk_size`` rows at a time: neither the full logits ``(N, V)`` nor the local
    ``(N, V_r)`` ones, nor a full ``(V, D)`` weight gradient, ever exist on a rank.

    Shapes: ``input`` ``(..., D)`` (the same hidden states on every rank of ``group``, as
    in Megatron's column-parallel output layer), ``local_weight`` ``(V_r, D)`` rows
    ``[vocab_start, vocab_start + V_r)`` of the ``(V, D)`` output weight, ``local_bias``
    ``(V_r,)``, ``target`` ``(...)`` global class ids (same on every rank). The loss
    options and reduction rules are those of :func:`vocab_parallel_cross_entropy` (whose
    docstring has the formulas).

    Per chunk of ``B`` rows: local logits ``Z = X_c W_r^T + b_r`` (``B x V_r`` float32, the
    only logits buffer, reused), their per-row statistics, **one all_reduce(MAX) of
    B + 9 and one all_reduce(SUM) of k B + 2 values** (``k = 2 + [weight] + [eps > 0]``;
    the 9 + 2 check scalars ride on the first chunk only, later chunks send ``B`` and
    ``k B``), then ``G = dloss/dZ`` in place and ``dX_c = G W_r``, ``dW_r += G^T X_c``,
    ``db_r += sum G`` (float32). Forward: ``2 ceil(N / B)`` all-reduces (2 for ``N = 0``).
    Backward: one all_reduce(SUM) of the ``N x D`` input gradient when ``input`` needs a
    gradient and ``reduce_input_grad`` (the column-parallel layer's backward all-reduce:
    ``dX = sum_r G_r W_r``), otherwise none. With ``reduce_input_grad=False`` each rank
    returns its partial ``G_r W_r`` (for a graph that reduces it elsewhere, e.g. behind
    Megatron's ``copy_to_tensor_model_parallel_region``).

    For ``"mean"``/``"sum"`` the gradients are computed in the forward pass (backward scales
    them by ``grad_output``); for ``"none"`` backward recomputes the chunk logits from the
    saved per-row ``lse`` and ``A_n`` (no statistics collective) so any ``grad_output`` is
    right. Peak extra memory per rank: ``B V_r`` float32 logits + ``N x D`` and
    ``V_r x D`` float32 gradients + ``O(N)`` row statistics.

    Args:
        chunk_size: rows per chunk ``B``; default about 16 MiB of float32 local logits.
        reduce_input_grad: all-reduce the input gradient over ``group`` in backward.
        Others: as in :func:`vocab_parallel_cross_entropy` (``weight``: this rank's
        ``(V_r,)`` slice of the class weights).

    Reference: Megatron-LM (Shoeybi et al. 2019, arXiv:1909.08053) for the vocab-parallel
    split; :func:`crossent.torch.linear_cross_entropy` for the chunked fusion.

    >>> import torch
    >>> x, w = torch.ones(2, 4), torch.zeros(3, 4, requires_grad=True)
    >>> round(vocab_parallel_linear_cross_entropy(x, w, torch.tensor([0, 1])).item(), 6)
    1.098612
    """
    if local_weight.dim() != 2:
        raise ValueError(f"local_weight must be (V_r, D); got shape {tuple(local_weight.shape)}")
    if input.dim() == 0 or input.shape[-1] != local_weight.shape[1]:
        raise ValueError(f"input of shape {tuple(input.shape)} does not match local_weight "
                         f"{tuple(local_weight.shape)} (features last)")
    size = local_weight.shape[0]
    row_shape = input.shape[:-1]
    x = input.reshape(-1, input.shape[-1]).contiguous()
    n = x.shape[0]
    lay = make_layout(group, size, vocab_start)
    spec, problem = make_spec(ignore_index, label_smoothing, z_loss, weight, reduction,
                              num_items, x, size)
    problem = problem or check_target(target, n)
    if problem is None and tuple(target.shape) != tuple(row_shape):
        problem = f"target has shape {tuple(target.shape)}; expected {tuple(row_shape)}"
    if problem is None and local_bias is not None and tuple(local_bias.shape) != (size,):
        problem = f"local_bias has shape {tuple(local_bias.shape)}; expected ({size},)"
    if problem is None and lay.start < 0:
        problem = f"vocab_start={vocab_start!r} must be >= 0"
    if problem is None:
        flat = target.reshape(-1).to(device=x.device, dtype=torch.int64)
    else:
        flat = torch.full((n,), spec.ignore_index, dtype=torch.int64, device=x.device)
    valid = flat != spec.ignore_index
    chunk = default_chunk(size) if chunk_size is None else int(chunk_size)
    if chunk < 1:
        raise ValueError(f"chunk_size={chunk_size!r} must be >= 1")
    params = (x, local_weight, local_bias)
    if torch.is_grad_enabled() and any(p is not None and p.requires_grad for p in params):
        out = _VocabParallelLinearCE.apply(x, local_weight, local_bias, flat, valid, lay, spec,
                                           problem, chunk, bool(reduce_input_grad))
    else:
        with torch.no_grad():
            (loss, _, _, wy), _ = _run(x, local_weight, local_bias, flat, valid, lay, spec,
                                       problem, chunk, (False,) * 3)
            out = reduce_loss(loss, wy, valid, spec)[0].to(x.dtype)
    return out.reshape(row_shape) if reduction == "none" else out
