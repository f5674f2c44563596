"""The composable path: crossent.torch's losses written in plain differentiable torch ops.

The fused kernels compute the gradient inside forward with ``out=`` and in-place ops, so
autograd sees one opaque node. That node cannot be differentiated again, batched by
``vmap``, pushed forward by ``jvp`` or recorded by ``torch.jit.trace``. Where one of those
is asked for (and for a gradient the fused linear head does not form: a probability
``target`` or a class ``weight`` that requires grad), the loss is computed here instead:
ordinary torch ops, so every autograd mode works, at torch's memory cost (``N x C``
intermediates; for the linear head the full logits). The fused Functions' backward
also calls :func:`cross_entropy` here, with its graph, under ``create_graph=True``.

The formulas are the fused kernel's (:mod:`crossent.torch._rowblock`): arithmetic in
float32 (float64 stays), optional ``softcap`` then ``lse``; index targets
``l = (1 - eps) w_y (lse - z_y) + (eps / C) sum_c w_c (lse - z_c) + z_loss lse^2``,
ignored rows 0; probability targets ``l = -sum_c T_c log p_c + z_loss lse^2`` with
``T = ((1 - eps) t + eps / C) w`` and a zero ``T_c`` contributing exactly 0 where
``log p_c = -inf``. ``"mean"`` divides by ``sum_n w[y_n]`` over counted rows (index
targets) or by the number of rows (probabilities), as torch does, or by the caller's
``num_items``.
"""

from __future__ import annotations

import math

import torch
import torch.autograd.forward_ad as fwAD

from ._rules import (
    Options,
    check_index_target,
    compute_dtype,
    count_tensor,
    fake_values,
    reduce_rows,
    rounds_logits,
)

__all__ = ["capped", "composable_required", "cross_entropy", "linear_logits", "transforms_active",
           "zero_unused"]


def transforms_active() -> bool:
    """A ``torch.func`` transform (grad, vmap, jvp, jacrev...) or ``torch.jit.trace`` is
    running: data-dependent checks (``bool(tensor)``) are not allowed here."""
    return bool(torch._C._are_functorch_transforms_active()) or torch.jit.is_tracing()


def _has_tangent(t: torch.Tensor | None) -> bool:
    return t is not None and fwAD.unpack_dual(t).tangent is not None


def composable_required(*tensors: torch.Tensor | None) -> bool:
    """The fused kernels cannot serve this call: a functorch transform, tracing, or
    forward-mode AD (a dual tensor among ``tensors``) is active."""
    if transforms_active():
        return True
    if getattr(fwAD, "_current_level", -1) >= 0:  # inside a dual_level
        return any(_has_tangent(t) for t in tensors)
    return False


def capped(z: torch.Tensor, opts: Options) -> torch.Tensor:
    """``softcap * tanh(z / softcap)``, or ``z`` without a cap."""
    return z if opts.softcap is None else opts.softcap * torch.tanh(z / opts.softcap)


def zero_unused(big_t: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """``logp`` with 0 where a zero ``T_c`` faces ``log p_c = -inf``, so that term is 0
    (the fused kernel's rule), not NaN."""
    return logp.masked_fill((big_t == 0) & torch.isneginf(logp), 0.0)


def _share(eps: float, num_classes, dtype: torch.dtype, floor: int = 0):
    """``eps / num_classes`` (at least ``floor`` classes) as torch forms it: a Python
    float, divided in float64. Under ``torch.jit.trace`` ``z.shape[1]`` is a 0-d int64
    tensor, and ``eps / C`` became a float32 reciprocal (1e-8 off for float64 logits:
    review H92-1); it is divided in float64 there too, then rounded to ``dtype`` once."""
    if not isinstance(num_classes, torch.Tensor):  # an int, or make_fx's SymInt
        return eps / max(num_classes, floor)
    return (eps / num_classes.clamp(min=floor).to(torch.float64)).to(dtype)


def row_losses(z: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None,
               opts: Options) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row losses of ``(M, C)`` logits and the ``"mean"`` denominator, both in the
    compute dtype and differentiable w.r.t. ``z``, a probability ``target`` and
    ``weight``."""
    cdtype = compute_dtype(z.dtype)
    z = capped(z.to(cdtype), opts)
    num_classes = z.shape[1]
    eps, zl = opts.label_smoothing, opts.z_loss
    w = None if weight is None else weight.to(cdtype)
    # log_softmax, not z - lse: its backward is torch's (a row holding +inf is NaN
    # throughout, where z - lse's is NaN only at the inf)
    logp = torch.log_softmax(z, 1)
    if target.is_floating_point():
        t = target.to(cdtype)
        # (C = 0: no classes to smooth over; torch's sums over no classes give 0 too)
        big_t = (1.0 - eps) * t + _share(eps, num_classes, cdtype, floor=1) if eps else t
        if w is not None:
            big_t = big_t * w
        losses = -(big_t * zero_unused(big_t, logp)).sum(1)
        if zl:
            losses = losses + zl * torch.logsumexp(z, 1).square()
        # torch divides by numel / C (NaN for C = 0, as there): counted by a tensor
        # operation, so a traced graph (make_fx, jit.trace, export) divides by the rows
        # it is run on, not the traced batch's (float(z.shape[0]) would be a constant)
        if not num_classes:
            return losses, torch.full((), math.nan, dtype=cdtype, device=z.device)
        return losses, torch.ones_like(losses).sum()
    if transforms_active() or fake_values(target):
        index = target.long()  # no data-dependent check here; gather checks the bounds
        valid = index != opts.ignore_index
    else:
        index, valid = check_index_target(target, num_classes, opts.ignore_index)
    index = index.masked_fill(~valid, 0)
    validf = valid.to(cdtype)
    if num_classes:
        nll = -logp.gather(1, index.unsqueeze(1)).squeeze(1)
    else:  # C = 0: every row is ignored (anything else raised above); zeros that keep
        nll = -logp.sum(1)  # the graph, so backward gives torch's (N, 0) gradient
    # (C = 0: none; a fill, not a product: an ignored row must not read an inf/NaN w[0])
    w_y = validf if w is None or not num_classes else w[index].masked_fill(~valid, 0.0)
    losses = w_y * nll if not eps else (1.0 - eps) * w_y * nll
    if eps:
        # a product, not logp @ w: forward-mode AD of mm multiplies logp by w's zero
        # tangent, 0 x (-inf) = NaN at a -inf logit (torch's jvp is finite there)
        smooth = -(logp.sum(1) if w is None else (logp * w).sum(1))
        if num_classes:
            losses = losses + _share(eps, num_classes, cdtype) * smooth
    if zl:
        losses = losses + zl * torch.logsumexp(z, 1).square()
    # masked_fill, not where(valid, x, 0.0): where's derivative makes its scalar a tensor,
    # which breaks a backward on fake tensors after their mode exited
    losses = losses.masked_fill(~valid, 0.0)
    if eps and not num_classes:  # torch adds (eps / C) x the masked smoothing sum:
        losses = losses + smooth * math.inf  # 0 x inf, NaN on every row, as there
    return losses, w_y.sum()


def cross_entropy(z: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None,
                  opts: Options) -> torch.Tensor:
    """The reduced loss (or per-row losses for ``"none"``) in the compute dtype."""
    losses, denominator = row_losses(z, target, weight, opts)
    if opts.num_items is not None and opts.reduction != "none":  # the caller's count
        # as a tensor of the loss's dtype: a Python float would give torch.func.jvp a
        # float64 tangent for a float32 loss (review H87-4)
        out = losses.sum() / count_tensor(opts.num_items, losses.device, losses.dtype)
    else:
        out = reduce_rows(losses, denominator, opts.reduction,
                          nan_at_zero=opts.label_smoothing > 0)
    if (opts.label_smoothing and not z.shape[1] and opts.reduction != "none"
            and not target.is_floating_point()):
        # C = 0, class indices: torch scales its smoothing sum by eps / C = inf, NaN even
        # over no rows (its probability-target path sums over no classes: 0)
        out = out + math.nan
    return out


def linear_logits(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None,
                  mdtype: torch.dtype) -> torch.Tensor:
    """``x W^T + b`` in the matmul dtype of the fused head (all of it at once); float16
    multiplied in float32 (CPU) is rounded to float16, as the chunked head rounds it
    (:func:`._chunked_head.head_pass`) and torch's ``F.linear`` does."""
    logits = torch.nn.functional.linear(x.to(mdtype), w.to(mdtype),
                                        None if b is None else b.to(mdtype))
    if rounds_logits(x.dtype, mdtype):
        logits = logits.to(x.dtype).to(mdtype)
    return logits
