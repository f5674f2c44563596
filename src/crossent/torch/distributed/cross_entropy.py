"""``vocab_parallel_cross_entropy``: cross-entropy over logits whose class dimension is
split across the ranks of a process group (tensor-parallel output layer).

The local work (each rank's per-row partials in forward, its logit gradient in backward)
is done by :mod:`._local`: the Triton kernels of :mod:`crossent.torch._triton.vocab_parallel`
(``backend="triton"``; ``"auto"`` on CUDA/ROCm when triton imports), else torch operations
on row blocks (``"rowblock"``), on CPU shared out to crossent's worker threads
(:mod:`crossent.torch._blockpool`). The collectives are the same either way."""

from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable

from ...errors import UnsupportedError
from .. import _buffers
from .._rules import (
    autocast_dtype,
    no_autocast,
    records_graph,
    save_inputs,
    saved_inputs,
    watch_count,
)
from ._common import (
    Layout,
    Problems,
    Spec,
    agree,
    check_target,
    exchange,
    header_device,
    make_layout,
    make_spec,
    nan_target_rows,
    not_dense,
    note_subclasses,
    note_transforms,
    raises_together,
    reduce_loss,
    refuse_double_backward,
    report_unbound_call,
)
from ._local import grad_rows, partial_rows, resolve_backend

__all__ = ["vocab_parallel_cross_entropy"]


def _forward(logits: torch.Tensor, target: torch.Tensor, lay: Layout, spec: Spec,
             route: str):
    valid = target != spec.ignore_index
    part = partial_rows(logits, target, valid, lay, spec, route)
    stats = exchange(part, valid, lay, spec)  # the collectives: in this thread
    return stats, valid


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, lay, spec, route, out_dtype):
        stats, valid = _forward(logits, target, lay, spec, route)
        out, scale = reduce_loss(stats.loss, stats.wy, valid, spec)
        # with the caller's class weight: backward raises where one of them changed in
        # place since forward (also under saved-tensor hooks that keep the tensor itself,
        # where torch's backward would read the change: reviews H88-5, H88-6)
        save_inputs(ctx, logits, target, valid, stats.lse, stats.coef, stats.wy,
                    spec.given_weight)
        ctx.lay, ctx.spec, ctx.scale, ctx.route = lay, spec, scale, route
        return out.to(out_dtype)

    @staticmethod
    @refuse_double_backward("vocab_parallel_cross_entropy")
    @once_differentiable
    def backward(ctx, grad_output):
        logits, target, valid, lse, coef, wy, _ = saved_inputs(
            ctx, "distributed.vocab_parallel_cross_entropy")
        cdtype = lse.dtype
        go = grad_output.to(cdtype)
        scale = go.reshape(-1) if ctx.spec.reduction == "none" else go * ctx.scale
        scale = scale.expand(lse.shape) if scale.dim() == 0 else scale
        coef = torch.where(nan_target_rows(wy, scale, valid, ctx.spec), math.nan, coef)
        grad = _buffers.empty(logits.shape, logits.dtype, logits)  # every row written below
        grad_rows(logits, target, valid, lse, coef, scale, ctx.lay, ctx.spec, ctx.route, grad)
        return grad, None, None, None, None, None


@raises_together(report_unbound_call(0))
def vocab_parallel_cross_entropy(
    local_logits: torch.Tensor,
    target: torch.Tensor,
    *,
    group=None,
    vocab_start: int | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    weight: torch.Tensor | None = None,
    reduction: str = "mean",
    num_items: torch.Tensor | float | None = None,
    softcap: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Softmax cross-entropy over logits whose classes are split across the ranks of
    ``group``: the result (and each rank's logit gradient) equals single-process
    :func:`crossent.torch.cross_entropy` on the logits concatenated along the class axis.

    Layout: rank ``r`` of ``group`` holds the contiguous classes
    ``[vocab_start, vocab_start + V_r)`` in ``local_logits`` of shape ``(..., V_r)``
    (class dimension **last**, Megatron's ``[s, b, V/p]``; ``(N, V_r)`` is the common case).
    ``vocab_start=None`` means an even split, ``vocab_start = r * V_r``; an uneven split
    needs an explicit ``vocab_start`` on every rank. ``V = sum_r V_r``; the slices must
    tile ``[0, V)`` exactly (checked: sorted by start, each begins where the last ended).
    ``target`` ``(...)`` holds **global** class ids and must be the same on every rank.

    Loss of a counted row (``lse_n = log sum_c exp z_nc`` over all ``V`` classes, ``w_y``
    the target's class weight, ``eps`` = ``label_smoothing``, ``zeta`` = ``z_loss``)::

        l_n = (1 - eps) w_y (lse_n - z_ny) + (eps / V) sum_c w_c (lse_n - z_nc)
              + zeta lse_n^2

    computed from per-row statistics: each rank takes the max ``m_r``, the exp-sum
    ``sum exp(z - m_r)``, ``w_y z_y`` (only the rank owning ``y``), ``w_y`` (with weights)
    and ``sum_c w_c z_c`` (with smoothing) over its slice. Communication per call:

    * ONE ``all_reduce(SUM)`` of ``world x F`` int64 (``F = len(_common.FIELDS)``, 29):
      every rank's arguments (the agreement, below), then
    * ONE ``all_reduce(MAX)`` of the ``N`` row maxima, then
    * ONE ``all_reduce(SUM)`` of ``k N`` values, ``k = 2 + [weight] + [eps > 0]``
      (the rescaled exp-sums ``sum_r S_r exp(m_r - M)``, the target terms, ...),

    the row buffers in the logits' compute dtype (float32, or float64 for float64 input):
    ``4 (k + 1) N + 8 F world`` bytes, nothing proportional to ``V`` (for every
    ``backend``: it changes only which kernel computes the partials). Backward makes
    **no** collective: the gradient
    ``p (A_n + 2 zeta lse_n) - (eps / V) w_c - (1 - eps) w_y [c = y]``,
    ``A_n = (1 - eps) w_y + (eps / V) sum_c w_c``, needs only the saved per-row ``lse_n``
    and ``A_n`` and the local slice. All arithmetic is float32 for bfloat16/float16 input
    (float64 for float64); the loss and gradient come back in the input dtype (the loss
    in float32 under ``torch.autocast``, as torch's, which also takes a float32 ``weight``
    next to bfloat16 logits there). Plain tensors only: fake tensors, a DTensor
    (``.to_local()`` is this function's input) and ``torch.func`` transforms other than
    ``jvp`` raise :class:`crossent.UnsupportedError` on every rank; under
    ``torch.compile`` dynamo breaks the graph inside the call (the agreement reads values
    on the host), so ``fullgraph=True`` cannot take it.

    Args:
        local_logits: ``(..., V_r)`` this rank's slice of the logits.
        target: ``(...)`` global class ids (integer), identical on every rank.
        group: the tensor-parallel process group (``None``: the default group; without an
            initialized ``torch.distributed`` the call is single-process, ``world = 1``).
        vocab_start: first global class id of this rank's slice (``None``: even split).
        ignore_index: targets equal to it give loss 0, gradient 0 and are not counted.
        label_smoothing: ``eps`` in [0, 1], spread over the **global** ``V`` classes
            (``torch.nn.functional.cross_entropy``'s rule). Known divergence: Megatron-LM's
            ``vocab_parallel_cross_entropy`` smooths with the per-partition class count
            (``V / p``) and no weights; this function gives the single-process answer.
        z_loss: ``zeta >= 0``, adds ``zeta lse_n^2`` per counted row (not class-weighted).
        weight: ``(V_r,)`` **this rank's slice** of the per-class weights (the entries for
            classes ``[vocab_start, vocab_start + V_r)``), not the full ``(V,)`` vector;
            same dtype as the logits. No gradient flows to it: one that requires grad
            raises :class:`crossent.UnsupportedError` (detach it).
        reduction: ``"none"`` (per-row losses, shape of ``target``, ignored rows 0),
            ``"sum"``, or ``"mean"``: the sum divided by the number of counted rows, or by
            ``sum_n w[y_n]`` over them with weights; NaN when nothing is counted, with a
            zero gradient; counted rows whose weights sum to 0 give ``0/0`` (or
            ``+-inf``) and a NaN gradient on those rows (all as
            ``torch.nn.functional.cross_entropy``).
        num_items: with ``reduction="sum"`` only: the summed loss is divided by it. Pass the
            count of counted targets over all data-parallel ranks and gradient-accumulation
            micro-batches of the step (:func:`global_num_items`) so the accumulated
            gradient is the full-batch mean (PITFALLS 11).
        softcap: ``c > 0`` replaces every logit by ``c tanh(z / c)`` first (elementwise,
            so each rank caps its own slice), as :func:`crossent.torch.cross_entropy`;
            ``None`` for no cap.
        backend: which kernel does this rank's local work (the collectives are the same):
            ``"auto"`` (default: the Triton kernels on CUDA/ROCm tensors when triton
            imports, else ``"rowblock"``), ``"rowblock"`` (torch operations on row blocks
            of about 4 MiB; on CPU run by crossent's worker threads, see
            ``crossent.torch.set_block_workers``) or ``"triton"`` (one kernel for the
            partials, one for the gradient; CUDA/ROCm tensors, or CPU tensors with
            ``TRITON_INTERPRET=1``, else :class:`crossent.UnsupportedError`).
            ``"native"`` raises :class:`crossent.UnsupportedError` (torch has no
            vocab-parallel kernel). The same value on every rank (checked).

    Agreement (checked before any row collective, the same way on every rank): the first
    collective gathers every rank's options (``ignore_index``, ``label_smoothing``,
    ``z_loss``, ``softcap``, ``reduction``, weight presence, ``num_items``, ``backend``,
    ``N``, the logits' dtype, whether ``vocab_start`` was given), its slice
    ``(vocab_start, V_r)``, the
    sum of its weight slice and three independent 31-bit hashes of the whole target. Every
    rank then raises the same :class:`crossent.InputError` (a ``ValueError``) if an option
    differs across ranks, the slices do not tile ``[0, V)`` exactly (overlap, gap, unequal
    slices without ``vocab_start``), the targets differ (position-keyed hashes: equal sums
    or permutations do not pass), a target lies outside ``[0, V)``, or ``num_items`` is not
    ``> 0``. A bad argument on one rank (a wrong shape or dtype, an invalid option) is
    raised there with its own message after that collective, and as "rank r of the group
    reported invalid input" on the others: no rank is left waiting in a collective, and the
    group stays usable. A call Python cannot bind on one rank (an unknown keyword, a
    missing or extra argument) takes part in that collective too: ``TypeError`` on every
    rank.

    NaN: a NaN logit on any rank makes its row's loss (and ``"mean"``/``"sum"``) NaN on
    every rank, as single-process; an ignored row contributes 0 to the loss even if it
    holds NaN, and its gradient row is NaN, as ``torch.nn.functional.cross_entropy``'s.

    References: Megatron-LM ``tensor_parallel.vocab_parallel_cross_entropy``; Shoeybi et
    al. 2019, "Megatron-LM: Training Multi-Billion Parameter Language Models Using Model
    Parallelism", arXiv:1909.08053 (section 3: the fused parallel cross-entropy that
    communicates ``N`` scalars instead of ``N x V`` logits).

    >>> import torch
    >>> logits = torch.zeros(2, 3, requires_grad=True)  # single process: world = 1
    >>> round(vocab_parallel_cross_entropy(logits, torch.tensor([0, 2])).item(), 6)  # ln 3
    1.098612
    """
    problems = Problems()
    note_subclasses("vocab_parallel_cross_entropy", problems, local_logits, target, weight,
                    num_items)
    logits = _check_logits(local_logits, problems)
    row_shape = tuple(logits.shape[:-1]) if logits is not None else ()
    size = logits.shape[-1] if logits is not None else 0
    lay = make_layout(group, size, vocab_start, problems)
    device = header_device(group, local_logits, target)
    spec = make_spec(ignore_index, label_smoothing, z_loss, weight, reduction, num_items,
                     logits, size, problems, softcap)
    flat = check_target(target, row_shape, problems, device,
                        saved=records_graph() and logits is not None and logits.requires_grad)
    rows = math.prod(row_shape)
    route = resolve_backend(backend, logits.device if logits is not None else None,
                            "vocab_parallel_cross_entropy", spec, problems)
    note_transforms("vocab_parallel_cross_entropy", problems, forward_ad=True,
                    tensors=(local_logits,))
    agree(lay, spec, problems, flat, function=0, rows=rows,
          dtype=logits.dtype if logits is not None else None, device=device,
          backend=backend)
    assert logits is not None  # agree() raised otherwise
    # torch.autocast runs cross_entropy in float32: the loss's dtype; the kernels choose
    # their own (float32 arithmetic, the gradient in the logits' dtype)
    out_dtype = autocast_dtype(logits, logits.device.type)
    logits = logits.reshape(rows, size)
    with no_autocast(logits.device.type):
        if records_graph() and logits.requires_grad:
            out = _VocabParallelCrossEntropy.apply(logits, flat, lay, spec, route, out_dtype)
            # a num_items tensor read back in backward, as torch's sum / n (review H86-2)
            out = watch_count(out, spec.given_num_items,
                              "distributed.vocab_parallel_cross_entropy")
        else:
            with torch.no_grad():
                stats, valid = _forward(logits, flat, lay, spec, route)
                out, _ = reduce_loss(stats.loss, stats.wy, valid, spec)
                out = out.to(out_dtype)
    return out.reshape(row_shape) if spec.reduction == "none" else out


def _check_logits(local_logits, problems: Problems) -> torch.Tensor | None:
    if not isinstance(local_logits, torch.Tensor):
        problems.note(f"local_logits must be a tensor; got {type(local_logits).__name__}")
    elif not local_logits.is_floating_point():
        problems.note(f"local_logits must be floating, got {local_logits.dtype}")
    elif (why := not_dense("local_logits", local_logits)) is not None:
        problems.note(why, UnsupportedError)
    elif local_logits.dim() == 0:
        problems.note("local_logits must have a class dimension; got a 0-d tensor")
    elif local_logits.device.type == "meta":
        problems.note("local_logits on the meta device: the vocab-parallel loss needs the "
                      "values of every rank's logits (collectives)", UnsupportedError)
    else:
        return local_logits
    return None
