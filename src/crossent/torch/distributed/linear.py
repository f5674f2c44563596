"""``vocab_parallel_linear_cross_entropy``: the vocab-parallel output layer and its
cross-entropy fused and chunked over rows, so no rank ever holds the full logits.

Per chunk: the matmul (torch), the local partials and the chunk's logit gradient by
:mod:`._local` (the Triton kernels of :mod:`crossent.torch._triton.vocab_parallel` with
``backend="triton"``, or ``"auto"`` on CUDA/ROCm when triton imports; else torch operations
on row blocks of the chunk, on CPU run by crossent's worker threads), the two row
collectives in the calling thread between them, then the gradient matmuls (torch). The
chunk loop is the single-process heads' (:func:`crossent.torch._chunked_head.head_pass`),
with :class:`_VocabChunks` as its per-chunk kernel."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from ...errors import UnsupportedError
from .._chunked_head import head_pass
from .._rules import (
    CHUNK_BYTES,
    autocast_dtype,
    autocast_linear,
    check_flag,
    check_same_device,
    chunk_rows,
    is_in_place_refusal,
    no_autocast,
    records_graph,
    save_inputs,
    saved_inputs,
    saved_tensor_hooks_active,
    take_stored,
    watch_count,
)
from ._common import (
    _DTYPES,
    Problems,
    agree,
    cap_logits,
    check_target,
    compute_dtype,
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

__all__ = ["vocab_parallel_linear_cross_entropy"]


def default_chunk(local_classes: int) -> int:
    """About 16 MiB of float32 local logits, a multiple of 32 rows (at least 32).

    crossent.torch's chunk rule (:func:`~crossent.torch._rules.chunk_rows` with its 16 MiB
    floor) without the single-process head's growth with ``C D`` and its dtype's item size
    (:func:`~crossent.torch._rules.default_chunk`), on purpose: kept as it was, the size
    that ``docs/scaling.md``'s figures (:mod:`.costs`) and the tests assume."""
    return chunk_rows(CHUNK_BYTES, local_classes, 4)


class _VocabChunks:
    """The chunk kernel of the vocab-parallel head (a
    :class:`~crossent.torch._chunked_head.ChunkKernel`): on each chunk of local logits the
    local partials, the two row collectives (:func:`~._common.exchange`, in the calling
    thread: every rank makes them in the same order, with the same sizes, as the chunk
    loop is the same on every rank), then the chunk's gradient in place. ``route``: which
    kernel does the local work (:mod:`._local`); the Triton kernels cap the raw chunk
    logits themselves. Forward (``saved is None``): keeps each row's ``lse``, ``coef`` and
    ``w_y`` from the exchange, the gradient with ``d reduced/d l_n = 1`` on counted rows.
    Backward recompute (``saved = (lse, coef)``): no collective, each row's gradient times
    its ``row_multiplier`` (``grad_output``), the returned losses are 0 (not computed)."""

    def __init__(self, target, valid, lay, spec, route, dtype, saved=None):
        n = target.shape[0]
        self.target, self.valid, self.lay, self.spec, self.route = target, valid, lay, spec, route
        self.dtype = dtype
        self.ones = valid.to(dtype)
        self.saved = saved
        if saved is None:
            self.lse, self.coef, self.wy = (torch.zeros(n, dtype=dtype, device=target.device)
                                            for _ in range(3))
        else:
            self.lse, self.coef = saved
            self.wy = None

    def only(self, keep: torch.Tensor) -> _VocabChunks:
        # never asked (the head runs with split=None): a rank's skip decision would depend
        # on its own x's finiteness, so the ranks' chunks and collectives could differ
        raise AssertionError("the vocab-parallel head does not skip rows")

    def __call__(self, logits: torch.Tensor, start: int, *, grad: bool,
                 row_multiplier: torch.Tensor | None) -> torch.Tensor:
        i, j = start, start + logits.shape[0]
        lay, spec, route = self.lay, self.spec, self.route
        target, valid = self.target[i:j], self.valid[i:j]
        capped = route != "triton"
        tanh = cap_logits(logits, spec) if capped else None
        if self.saved is None:
            part = partial_rows(logits, target, valid, lay, spec, route, capped=capped)
            st = exchange(part, valid, lay, spec)  # the collectives: in this thread
            self.lse[i:j], self.coef[i:j], self.wy[i:j] = st.lse, st.coef, st.wy
            loss = st.loss
        else:
            loss = torch.zeros(j - i, dtype=self.dtype, device=logits.device)
        if grad:
            sc = self.ones[i:j] if row_multiplier is None else row_multiplier
            grad_rows(logits, target, valid, self.lse[i:j], self.coef[i:j], sc, lay, spec,
                      route, logits, tanh=tanh, capped=capped)  # in place
        return loss


def _run(x, w, b, target, valid, lay, spec, chunk, need, route, scale=None, saved=None):
    """One pass over row chunks: :func:`crossent.torch._chunked_head.head_pass` with the
    kernel :class:`_VocabChunks`, the matmuls in the compute dtype (float32 logits for
    bfloat16/float16 input too, as :func:`vocab_parallel_linear_cross_entropy` states;
    not the single-process heads' :func:`~crossent.torch._rules.matmul_dtype`). Forward
    (``saved is None``): two all-reduces per chunk, per-row loss statistics
    ``(loss, lse, coef, w_y)``, and (if ``need``) the gradients. Backward recompute
    (``saved = (lse, coef)``): gradients scaled by ``scale`` per row, no collective.

    No ignored row is skipped (``split=None``): the skip decision of
    :func:`~crossent.torch._chunked_head.split_rows` depends on the finiteness of this
    rank's ``x`` rows, which may differ between ranks, and different chunks would make
    different collectives (a hang). An empty batch still runs one (empty) chunk, so its
    collectives are made."""
    cdtype = compute_dtype(x.dtype)
    kernel = _VocabChunks(target, valid, lay, spec, route, cdtype, saved)
    run = head_pass(x, w, b, kernel, chunk, need, row_multiplier=scale, matmul=cdtype,
                    empty_chunk=True)
    return (run.losses, kernel.lse, kernel.coef, kernel.wy), run.grads


_NAME = "distributed.vocab_parallel_linear_cross_entropy"


def _reduces_input_grad(ctx) -> bool:
    return bool(ctx.need[0] and ctx.reduce_input_grad and ctx.lay.communicate)


def _consumed(ctx) -> bool:
    """An earlier backward took the stored gradients (a backward now raises, joining no
    collective: it is not a step the peers make)."""
    return ctx.spec.reduction != "none" and not ctx.keep and ctx.grads is None


def _join_input_grad_reduce(ctx) -> None:
    """This rank's backward is refused before its all-reduce of the input gradient, which
    its peers' backwards make: join it with a NaN gradient (their input gradient becomes
    NaN, not one silently lacking this rank's part) so that no peer waits there until the
    collective timeout; the caller raises. torch's own composition, which all-reduces the
    input gradient after the matmul's backward, leaves them waiting.

    Not where forward ran under saved-tensor hooks: with non-reentrant checkpointing the
    peers are recomputing the forward, whose collectives are others (joining them with
    this one crashed gloo: review H89-2); this rank raises alone, as before. (Nothing
    after the all-reduce raises an in-place refusal: a join never follows it.)"""
    if _reduces_input_grad(ctx) and not ctx.hooked:
        shape, dtype, device = ctx.input_grad_like
        nan = torch.full(shape, math.nan, dtype=dtype, device=device)
        dist.all_reduce(nan, op=dist.ReduceOp.SUM, group=ctx.lay.group)


def _joins_input_grad_reduce(backward):
    """Decorates the head's backward: one that crossent refuses on this rank before the
    all-reduce of the input gradient because an input was changed in place on this rank
    still makes it (:func:`_join_input_grad_reduce`). torch's own errors (a second
    backward through a freed graph: review H89-1), a backward through gradients an
    earlier backward consumed, and the refusal of a batched ``grad_output`` (local: a
    plain backward retried on that rank pairs with its peers') join nothing."""

    @functools.wraps(backward)
    def run(ctx, *grads):
        consumed = _consumed(ctx)
        try:
            return backward(ctx, *grads)
        except RuntimeError as error:
            if not consumed and is_in_place_refusal(error):
                _join_input_grad_reduce(ctx)
            raise

    return run


def _join_on_count_refusal(node) -> Callable[[], None]:
    """For :func:`~crossent.torch._rules.watch_count`, whose node runs before the head's
    backward (``node``, the head's autograd node) and stops it where ``num_items`` changed
    in place on this rank."""
    return lambda: None if _consumed(node) else _join_input_grad_reduce(node)


class _VocabParallelLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b, target, valid, lay, spec, chunk, reduce_input_grad, route,
                out_dtype):
        need = tuple(ctx.needs_input_grad[:3])
        ctx.lay, ctx.spec, ctx.chunk, ctx.need, ctx.route = lay, spec, chunk, need, route
        ctx.reduce_input_grad = reduce_input_grad
        ctx.dtypes = [t.dtype if t is not None else None for t in (x, w, b)]
        ctx.input_grad_like = (x.shape, compute_dtype(x.dtype), x.device)
        ctx.hooked = saved_tensor_hooks_active()  # (a recompute may be the peers' step)
        none = spec.reduction == "none"
        (loss, lse, coef, wy), grads = _run(x, w, b, target, valid, lay, spec, chunk,
                                            (False,) * 3 if none else need, route)
        out, ctx.scale = reduce_loss(loss, wy, valid, spec)
        # "none": the gradient depends on grad_output row by row, recomputed in backward;
        # "mean"/"sum" keep the same (references and (N,) statistics) for an infinite
        # grad_output, which the stored gradients cannot take (torch gives NaN there)
        # with the caller's class weight: backward raises where an input changed in place
        # since forward (also under saved-tensor hooks that keep the tensor itself, where
        # torch's backward would read the change: reviews H88-4, H88-5)
        save_inputs(ctx, x, w, b, target, valid, lse, coef, wy, spec.given_weight)
        if not none:
            # backward scales the stored gradients in place, so none is kept for a second
            # backward (float64 included, unlike the single-process head: no gradcheck here)
            ctx.grads, ctx.keep = grads, False
            ctx.valid = valid
        return out.to(out_dtype)

    @staticmethod
    @_joins_input_grad_reduce
    @refuse_double_backward("vocab_parallel_linear_cross_entropy", collective=True)
    @once_differentiable
    def backward(ctx, grad_output):
        spec = ctx.spec
        # An infinite row scale ("mean"/"sum": an infinite grad_output, or "mean" over
        # class weights of mixed signs summing to 0) is recomputed as "none" is, with no
        # collective (the branch may differ between ranks: no hang): the kernel's a p + c is
        # torch's NaN where an infinite row scale meets p - 1. Not on the Triton route, whose
        # backward makes no host synchronisation (a per-step cost on the GPU): there the
        # stored gradients times +-inf give +-inf where torch gives NaN (documented).
        if spec.reduction == "none" or (ctx.route != "triton"
                                        and bool((grad_output * ctx.scale).isinf())):
            x, w, b, target, valid, lse, coef, wy, _ = saved_inputs(ctx, _NAME)
            if spec.reduction == "none":
                go = grad_output.reshape(-1).to(lse.dtype)
            else:
                go = (grad_output.to(lse.dtype) * ctx.scale).expand(x.shape[0])
            coef = torch.where(nan_target_rows(wy, go, valid, spec), math.nan, coef)
            if spec.reduction != "none":  # consumed as on the other branch: backward
                take_stored(ctx, "grads", "vocab_parallel_linear_cross_entropy")  # twice raises
            _, grads = _run(x, w, b, target, valid, ctx.lay, spec, ctx.chunk, ctx.need,
                            ctx.route, scale=go, saved=(lse, coef))
        else:
            grads = take_stored(ctx, "grads", "vocab_parallel_linear_cross_entropy")
            factor = grad_output.to(grads[0].dtype if grads[0] is not None else
                                    next(g for g in grads if g is not None).dtype) * ctx.scale
            wy = saved_inputs(ctx, _NAME)[-2]
            grads = _scale_stored(grads, factor, ctx.valid,
                                  nan_target_rows(wy, factor.to(wy.dtype), ctx.valid, spec))
        gx = grads[0]
        if _reduces_input_grad(ctx):
            dist.all_reduce(gx, op=dist.ReduceOp.SUM, group=ctx.lay.group)
        out = [None if g is None else g.to(d) for g, d in zip(grads, ctx.dtypes, strict=True)]
        return out[0], out[1], out[2], None, None, None, None, None, None, None, None


def _scale_stored(grads, factor, valid, nan_rows):
    """The stored (unscaled) gradients times ``factor``, in place (``"mean"`` and
    ``"sum"``). ``"mean"`` over a zero denominator makes ``factor`` infinite (and a NaN
    ``grad_output`` makes it NaN), which must reach only what torch's gradient
    makes non-finite: a row that counts nothing keeps its stored input gradient (0, or NaN
    from NaN logits), and with no counted row at all dW and db keep theirs (no device
    sync: the choices are made by ``torch.where``). ``nan_rows``
    (:func:`~._common.nan_target_rows`): rows whose logit gradient is NaN everywhere, so
    their input gradient and all of dW and db are NaN, as torch's."""
    gx, gw, gb = grads
    # "sum" too: a NaN grad_output leaves the ignored rows' input gradient as torch does
    if gx is not None:
        row = torch.where(nan_rows, math.nan, torch.where(valid, factor, 1.0))
        gx.mul_(row[:, None].to(gx.dtype))
    factor = torch.where(nan_rows.any(), math.nan, torch.where(valid.any(), factor, 1.0))
    return [gx, *(None if g is None else g.mul_(factor) for g in (gw, gb))]


@raises_together(report_unbound_call(1))
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
    softcap: float | None = None,
    backend: str = "auto",
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

    First, once per call, the agreement all-reduce of :func:`vocab_parallel_cross_entropy`
    (``world x F`` int64), which here also checks that ``D``, ``chunk_size``,
    ``reduce_input_grad`` and whether ``input`` needs a gradient agree, and that ``input``
    holds the same values on every rank (three hashes of its bits, one pass over it, so a
    rank fed other hidden states raises instead of mixing two batches). Then per chunk of
    ``B`` rows: local logits ``Z = X_c W_r^T + b_r`` (``B x V_r`` float32, the only logits
    buffer, reused), their per-row statistics, **one all_reduce(MAX) of B and one
    all_reduce(SUM) of k B values** (``k = 2 + [weight] + [eps > 0]``), then
    ``G = dloss/dZ`` in place and ``dX_c = G W_r``, ``dW_r += G^T X_c``, ``db_r += sum G``
    (float32). Forward: ``1 + 2 ceil(N / B)`` all-reduces (3 for ``N = 0``).
    Backward: one all_reduce(SUM) of the ``N x D`` input gradient when ``input`` needs a
    gradient and ``reduce_input_grad`` (the column-parallel layer's backward all-reduce:
    ``dX = sum_r G_r W_r``), otherwise none. With ``reduce_input_grad=False`` each rank
    returns its partial ``G_r W_r`` (for a graph that reduces it elsewhere, e.g. behind
    Megatron's ``copy_to_tensor_model_parallel_region``). A backward crossent refuses on
    one rank before that all-reduce (an input changed in place there only) still makes it,
    with a NaN gradient, then raises: the peers get a NaN input gradient, not a wait
    (except where that rank's forward ran under saved-tensor hooks: see
    ``docs/guarantees.md``).

    For ``"mean"``/``"sum"`` the gradients are computed in the forward pass (backward scales
    them by ``grad_output``); for ``"none"`` backward recomputes the chunk logits from the
    saved per-row ``lse`` and ``A_n`` (no statistics collective) so any ``grad_output`` is
    right. Peak extra memory per rank: ``B V_r`` float32 logits (twice with ``softcap``:
    the ``tanh`` is kept for the derivative) + ``N x D`` and ``V_r x D`` float32 gradients
    + ``O(N)`` row statistics.

    The logits are float32 also for bfloat16/float16 input (torch's unfused head rounds
    them to the input dtype: the loss differs by that rounding). Under ``torch.autocast``
    ``input``, ``local_weight`` and ``local_bias`` are cast as ``F.linear``'s are
    (differentiably) and the loss is float32, as torch's. Plain tensors only: fake
    tensors, a DTensor (pass ``.to_local()``), ``torch.func`` transforms and forward-mode
    AD raise :class:`crossent.UnsupportedError` on every rank; under ``torch.compile``
    dynamo breaks the graph inside the call (the agreement reads values on the host), so
    ``fullgraph=True`` cannot take it.

    Args:
        chunk_size: rows per chunk ``B`` (the same on every rank); default about 16 MiB of
            float32 logits of the **largest** slice ``max_r V_r`` (gathered by the
            agreement), so an uneven split chunks the same on every rank.
        reduce_input_grad: all-reduce the input gradient over ``group`` in backward.
        backend: which kernel does the local work on each chunk's logits (the matmuls are
            torch's, the collectives the same): ``"auto"``, ``"rowblock"`` or ``"triton"``,
            as in :func:`vocab_parallel_cross_entropy` (the same value on every rank).
        Others: as in :func:`vocab_parallel_cross_entropy` (``weight``: this rank's
        ``(V_r,)`` slice of the class weights).

    Reference: Megatron-LM (Shoeybi et al. 2019, arXiv:1909.08053) for the vocab-parallel
    split; :func:`crossent.torch.linear_cross_entropy` for the chunked fusion.

    >>> import torch
    >>> x, w = torch.ones(2, 4), torch.zeros(3, 4, requires_grad=True)
    >>> round(vocab_parallel_linear_cross_entropy(x, w, torch.tensor([0, 1])).item(), 6)
    1.098612
    """
    problems = Problems()
    note_subclasses("vocab_parallel_linear_cross_entropy", problems, input, local_weight,
                    local_bias, target, weight, num_items)
    x, w, b, size, features = _check_inputs(input, local_weight, local_bias, problems)
    row_shape = tuple(input.shape[:-1]) if x is not None else ()
    rows = math.prod(row_shape)
    lay = make_layout(group, size, vocab_start, problems)
    device = header_device(group, input, local_weight, target)
    spec = make_spec(ignore_index, label_smoothing, z_loss, weight, reduction, num_items,
                     x, size, problems, softcap)
    grad = records_graph() and any(isinstance(p, torch.Tensor) and p.requires_grad
                                   for p in (x, w, b))
    flat = check_target(target, row_shape, problems, device, saved=grad)
    chunk = _check_chunk(chunk_size, problems)
    if problems.check(check_flag, reduce_input_grad, "reduce_input_grad") is None:
        reduce_input_grad = False
    input_grad = grad and x is not None and x.requires_grad
    route = resolve_backend(backend, x.device if x is not None else None,
                            "vocab_parallel_linear_cross_entropy", spec, problems)
    note_transforms("vocab_parallel_linear_cross_entropy", problems, forward_ad=False,
                    tensors=(input, local_weight, local_bias))
    agree(lay, spec, problems, flat, function=1, rows=rows,
          dtype=x.dtype if x is not None else None, device=device, features=features,
          chunk_size=chunk, reduce_input_grad=reduce_input_grad, input_grad=input_grad,
          backend=backend, input=x.reshape(rows, features) if x is not None else None)
    assert x is not None  # agree() raised otherwise
    x = x.reshape(rows, features).contiguous()
    # identical on every rank: from the largest slice, which agree() gathered
    chunk = chunk or default_chunk(lay.max_size)
    valid = flat != spec.ignore_index
    out_dtype = autocast_dtype(x, x.device.type)  # float32 under autocast, as torch's loss
    with no_autocast(x.device.type):  # the matmuls in the compute dtype (see _run)
        if grad:
            out = _VocabParallelLinearCE.apply(x, w, b, flat, valid, lay, spec, chunk,
                                               reduce_input_grad, route, out_dtype)
            out = watch_count(out, spec.given_num_items,  # as torch's sum / n (review H86-2)
                              "distributed.vocab_parallel_linear_cross_entropy",
                              _join_on_count_refusal(out.grad_fn))
        else:
            with torch.no_grad():
                (loss, _, _, wy), _ = _run(x, w, b, flat, valid, lay, spec, chunk,
                                           (False,) * 3, route)
                out = reduce_loss(loss, wy, valid, spec)[0].to(out_dtype)
    return out.reshape(row_shape) if spec.reduction == "none" else out


def _check_inputs(input, local_weight, local_bias, problems: Problems):
    """``(input or None, local_weight, local_bias, V_r, D)``: the tensors as
    ``torch.autocast`` hands them to ``linear`` (cast to its dtype, differentiably; as
    they are without autocast). A problem is noted (raised after the agreement)."""
    bad = None, local_weight, local_bias
    tensors = {"input": input, "local_weight": local_weight}
    if local_bias is not None:
        tensors["local_bias"] = local_bias
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            what = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            problems.note(f"{name} must be a floating tensor, got {what}")
            return *bad, 0, 0
        if (why := not_dense(name, t)) is not None:
            problems.note(why, UnsupportedError)
            return *bad, 0, 0
        if t.dtype not in _DTYPES:  # float8: no matmul on CPU, no input hash
            problems.note(f"{name} has dtype {t.dtype}: float16, bfloat16, float32 or "
                          f"float64 only", UnsupportedError)
            return *bad, 0, 0
    if local_weight.dim() != 2:
        problems.note(f"local_weight must be (V_r, D); got shape {tuple(local_weight.shape)}")
        return *bad, 0, 0
    size, features = local_weight.shape
    if input.dim() == 0 or input.shape[-1] != features:
        problems.note(f"input of shape {tuple(input.shape)} does not match local_weight "
                      f"{tuple(local_weight.shape)} (features last)")
        return *bad, size, 0
    for name, t in tensors.items():
        if t.device != input.device:  # never moved silently (torch raises too)
            problems.check(check_same_device, t, name, input)
            return *bad, size, features
    if input.device.type == "meta":  # all on meta (checked above): no values to exchange
        problems.note("input on the meta device: the vocab-parallel loss needs the values "
                      "of every rank's tensors (collectives)", UnsupportedError)
        return *bad, size, features
    x, w, b = autocast_linear(input, local_weight, local_bias)
    for name, t in (("local_weight", w), ("local_bias", b)):
        if t is not None and t.dtype != x.dtype:  # torch.nn.functional.linear's rule
            problems.note(f"{name} has dtype {t.dtype}; expected {x.dtype}, the dtype of "
                          f"input (as torch.nn.functional.linear)")
            return *bad, size, features
    if b is not None and tuple(b.shape) != (size,):
        problems.note(f"local_bias has shape {tuple(b.shape)}; expected ({size},)")
        return *bad, size, features
    return x, w, b, size, features


def _check_chunk(chunk_size, problems: Problems) -> int:
    """The explicit chunk size, or 0 for the default (chosen after the agreement)."""
    if chunk_size is None:
        return 0
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or \
            not 1 <= chunk_size < 1 << 62:
        problems.note(f"chunk_size={chunk_size!r} must be an integer >= 1 (or None)")
        return 0
    return chunk_size
