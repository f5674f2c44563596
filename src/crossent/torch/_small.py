"""A fused softmax cross-entropy of a dozen tensor operations on CPU: small batches, rows
of few classes, and float32 logits of any size (:func:`._backends.choose_backend` decides).

At a few hundred thousand logits torch's own kernel is hard to beat with the row-block
kernel (:mod:`._rowblock`): that kernel's ~60 tensor operations of Python dispatch cost
more than the arithmetic. torch eager, though, makes three ``N x C`` passes that write
memory (``log_softmax`` forward; ``nll_loss_backward``'s zero-filled ``dlogp``;
``log_softmax_backward``), three fresh ``N x C`` tensors a step. This kernel writes one,
taken from crossent's buffer pool (:mod:`._buffers`: no fresh pages in a training loop):
for float32/float64/bfloat16 ``(N, C)`` logits, int64 ``(N,)`` targets and torch's options
without class weights or label smoothing,

    p = softmax(z)                                   one N x C pass
    nll_n = -log p_ny                                (log_softmax where p_ny underflows)
    g = (p - onehot(y)) a,  a_n = [y_n counted] / D  D = number counted ("mean"), else 1

the gradient formed in forward (the true-class entry ``(p_y - 1) a`` from the unscaled
``p_y``); backward hands it over, times ``grad_output`` unless that is 1. bfloat16 logits
are converted to float32 once (a pooled work buffer), computed as float32 and the finished
gradient rounded once (float16 is not served: its ``"mean"`` gradient is stored unscaled,
:func:`._rules.defers_mean_scale`, which the row-block kernel does). Ignored rows
(``y_n == ignore_index``) give loss 0 and gradient ``p * 0`` (0, NaN where the softmax is
NaN: torch's ``exp(logp) * 0``). Measured against ``torch.nn.functional.cross_entropy``
(forward + backward, float32, 2-core CPU): see :data:`._backends.SMALL_MIN_LOGITS`.

Autograd (torch's numbers or an error, never a constant): backward with
``create_graph=True``, a second backward through a retained graph (float32; float64 keeps
the gradient, so every backward gives the same bits, as ``gradcheck`` asks) and
``is_grads_batched=True`` recompute with ``torch.nn.functional.cross_entropy`` from the
saved logits (an in-place change of them in between raises; of the target, always, as
torch); ``torch.func`` transforms, forward-mode AD and tracing never reach it
(the entry point sends them to torch's kernel or the composable path).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _buffers
from ._rules import (
    check_not_freed,
    check_target_intact,
    double_backward,
    infinite_on_cpu,
    nan_at_targets,
    no_autocast,
    recompute_in_backward,
    releases_inputs,
    remember_target,
    save_inputs,
    scale_stored,
)

__all__ = ["cross_entropy"]

# p_y below this: the rows' nll from log_softmax instead of -log p_y (which would be inf
# or lose digits in float32's subnormals); NaN logits take that path too (NaN either way)
_TINY = 1e-30


class _SmallCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, index, valid, counted, ignore_index, reduction):
        # valid: (N,) bool where some row is ignored, None where none is (the common call:
        # no mask operations at all); index: (N, 1), the target with ignored rows at 0
        low = logits.dtype == torch.bfloat16
        # the N x C buffers from the pool (._buffers): fresh pages every step cost more
        # than the softmax at a few million logits
        p = _buffers.empty(tuple(logits.shape), torch.float32 if low else logits.dtype,
                           logits)
        if low:  # float32 arithmetic: converted once, the softmax in place
            p.copy_(logits)
            torch.ops.aten._softmax.out(p, 1, False, out=p)
        else:
            torch.ops.aten._softmax.out(logits, 1, False, out=p)
        p_y = p.gather(1, index)
        counted_p_y = p_y if valid is None else torch.where(valid.unsqueeze(1), p_y, 1.0)
        logp_y = p_y.log()
        if not float(counted_p_y.min()) >= _TINY:  # one host sync (CPU only); NaN too
            # those rows from log_softmax (only them: at an LLM's vocabulary the whole
            # logits would be another N x C)
            rows = (~(counted_p_y.view(-1) >= _TINY)).nonzero().view(-1)
            some = logits.index_select(0, rows)
            logp_y[rows] = torch.log_softmax(some.float() if low else some, 1).gather(
                1, index.index_select(0, rows))
        # the true-class entry p_y - 1 formed in full precision before the row scale, which
        # then multiplies every entry once (ignored rows: p_y - 0, then times 0)
        if valid is None:
            p.scatter_(1, index, p_y.sub_(1.0))
            if reduction == "mean":
                p.mul_(1.0 / counted)
        else:
            scale = valid.to(p.dtype)
            p.scatter_(1, index, p_y - scale.unsqueeze(1))
            if reduction == "mean":
                scale /= max(counted, 1)  # all ignored: gradient 0, as torch's
            p.mul_(scale.unsqueeze(1))
        # bfloat16 (float32's exponent range): the finished gradient rounded once
        ctx.grad = (_buffers.empty(tuple(logits.shape), logits.dtype, logits).copy_(p)
                    if low else p)
        ctx.reduction, ctx.valid, ctx.index, ctx.low = reduction, valid, index, low
        ctx.ignore_index, ctx.device_type = ignore_index, logits.device.type
        ctx.keep = logits.dtype == torch.float64
        save_inputs(ctx, logits, target)
        # torch's nll_loss saves the target too: its in-place change raises (checked
        # without unpacking the saved logits, whose change torch allows)
        remember_target(ctx, target)
        if reduction == "none":
            nll = logp_y.view(-1).neg()
            return nll if valid is None else torch.where(valid, nll, 0.0)
        total = (logp_y if valid is None
                 else torch.where(valid.unsqueeze(1), logp_y, 0.0)).sum()
        return total.neg() if reduction == "sum" else total.div(-counted)  # 0 counted: NaN

    @staticmethod
    @releases_inputs
    def backward(ctx, grad_output):
        none = (None,) * 6
        check_target_intact(ctx, "cross_entropy")
        if (recompute_in_backward(grad_output) or ctx.grad is None  # or backward twice
                or infinite_on_cpu(grad_output, ctx.device_type)):
            dz, _ = double_backward(
                ctx, grad_output, "cross_entropy",
                lambda z, t: F.cross_entropy(z.float() if ctx.low else z, t,
                                             ignore_index=ctx.ignore_index,
                                             reduction=ctx.reduction),
                create_graph=torch.is_grad_enabled())
            return dz, *none
        if ctx.keep:  # float64: every backward the same bits (gradcheck's reentrancy test)
            check_not_freed(ctx)  # ... but a second one without retain_graph raises
            grad = ctx.grad.clone()
        else:  # released: autograd adopts it without a copy
            grad, ctx.grad = ctx.grad, None
        # loss.backward(): one host read, where scale_stored and nan_at_targets would make
        # two tensor comparisons and reads (measured 30-100 us a call at 16 x 100)
        if ctx.reduction != "none" and grad_output.item() == 1.0:
            return grad, *none
        valid = ctx.valid
        if valid is None:  # every row counted
            valid = torch.ones(grad.shape[0], dtype=torch.bool, device=grad.device)
        scale_stored(grad, grad_output, ctx.reduction, valid)
        nan_at_targets(grad, grad_output, valid, ctx.index, ctx.reduction)
        return grad, *none


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int,
                  reduction: str) -> torch.Tensor | None:
    """Loss of float32/float64/bfloat16 CPU ``logits`` (N, C), N > 0, for int64 ``target``
    (N,), with its gradient formed for backward (the caller checked that the logits need one
    and that ``torch.is_grad_enabled()``). ``reduction``: ``"mean"``, ``"sum"`` or
    ``"none"``. ``None`` where a target is outside ``0 .. C-1`` and not ``ignore_index``:
    the caller lets torch's kernel raise torch's error.

    >>> import torch
    >>> z = torch.zeros(2, 3, requires_grad=True)
    >>> cross_entropy(z, torch.tensor([0, -100]), -100, "mean").backward()
    >>> z.grad
    tensor([[-0.6667,  0.3333,  0.3333],
            [ 0.0000,  0.0000,  0.0000]])
    """
    rows, classes = logits.shape
    low, high = (int(v) for v in torch.aminmax(target))
    if 0 <= low and high < classes and not low <= ignore_index <= high:
        valid, counted, index = None, rows, target  # the common call: one host sync
    else:
        valid = target != ignore_index
        counted = int(valid.sum())
        index = torch.where(valid, target, 0)
        low, high = (int(v) for v in torch.aminmax(index))
        if low < 0 or high >= classes:
            return None
    with no_autocast(logits.device.type):
        return _SmallCrossEntropy.apply(logits, target, index.view(rows, 1), valid, counted,
                                        ignore_index, reduction)
