"""The chunked linear head, written once: the chunk loop every linear head runs.

``cross_entropy(x W^T + b, target)`` without ever holding more than one chunk of logits:
the rows of ``x`` are taken ``chunk`` at a time; the chunk's logits ``x_c W^T + b`` come
from one matmul into a reused buffer, a fused cross-entropy kernel turns them in place
into the row losses and ``G = dloss/dlogits``, then ``dx_c = G W`` is written and
``dW += G^T x_c``, ``db += sum G`` are summed over chunks in float32 (float64 for float64;
dW in bf16/fp16 under torch's ``acc_policy="compact"`` on CUDA, :func:`weight_grad_dtype`).
Which kernel runs on a chunk is the caller's: a :class:`ChunkKernel` (the row-block kernel
in :mod:`._linear`, the Triton kernel in :mod:`._triton.autograd`, the vocab-parallel
head's local partials, row collectives and gradient in :mod:`.distributed.linear`).
Everything else is here, once: the dtypes and the rows per chunk (:func:`rows_per_chunk`,
from :mod:`._rules`), skipping ignored rows (:func:`split_rows`), the float32
accumulation of dW and db (:func:`accumulate_dw`), the bias, each row's ``grad_output``
(``row_multiplier``: the backward of ``reduction="none"``) and the statistics the kernel
gathers on the rows it saw (:attr:`HeadPass.kernel`, :attr:`HeadPass.keep`).

Imports nothing of ``crossent.torch`` but :mod:`._rules` and :mod:`._buffers` (no import
circles).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, Protocol

import torch

from . import _buffers
from ._rules import compute_dtype, default_chunk, matmul_dtype, rounds_logits

__all__ = ["ChunkKernel", "HeadPass", "RowSplit", "accumulate_dw", "head_pass",
           "rows_per_chunk", "split_rows", "weight_grad_dtype"]


class ChunkKernel(Protocol):
    """The per-chunk cross-entropy of a linear head (one object per pass over the rows:
    it holds the rows' targets, options and, if asked, gathers their statistics)."""

    def only(self, keep: torch.Tensor) -> ChunkKernel:
        """The same kernel over the rows ``keep`` (int64 indices) only, in that order:
        each row's numbers unchanged (same ``"mean"`` denominator)."""

    def __call__(self, logits: torch.Tensor, start: int, *, grad: bool,
                 row_multiplier: torch.Tensor | None) -> torch.Tensor:
        """Row losses ((M,), compute dtype) of the chunk ``logits`` ((M, C), contiguous
        rows ``start .. start + M`` of this kernel's rows); with ``grad`` the logits are
        overwritten by ``d(reduced loss)/d(logits)``, each row times its
        ``row_multiplier`` ((M,) compute dtype) if given; ignored rows: loss 0, gradient
        exactly 0."""


class RowSplit(NamedTuple):
    """The rows a pass computes (``keep``) and the ignored rows it skips (``dropped``)."""

    keep: torch.Tensor  # (K,) int64, ascending
    dropped: torch.Tensor  # (N - K,) int64, ascending


class HeadPass(NamedTuple):
    """What :func:`head_pass` returns."""

    losses: torch.Tensor  # (N,) compute dtype; 0 on ignored rows
    grads: list[torch.Tensor | None]  # [dx (matmul dtype), dW, db (compute dtype)] or None
    kernel: ChunkKernel  # the kernel that ran (over ``keep`` only when rows were skipped)
    keep: torch.Tensor | None  # the rows it saw when it saw only those, else None (all N)


def rows_per_chunk(chunk_size: int | None, x: torch.Tensor, w: torch.Tensor) -> int:
    """``chunk_size`` (already checked) or the default of :func:`._rules.default_chunk`
    for ``(C, D)`` weights multiplied in :func:`._rules.matmul_dtype`."""
    if chunk_size is not None:
        return int(chunk_size)
    return default_chunk(w.shape[0], w.shape[1], matmul_dtype(x, w).itemsize)


def split_rows(counted: torch.Tensor | None, x: torch.Tensor,
               idle_nan: Callable[[], bool] | None = None,
               params: tuple[torch.Tensor | None, ...] = ()) -> RowSplit | None:
    """The counted and the ignored rows when some rows are ignored and may be skipped,
    else None (every row counts, an ignored row's logits may not be finite, or
    ``idle_nan()``: torch's ignored rows have NaN gradients, :func:`._rules.idle_rows_nan`;
    each asked only when some row is ignored). ``params``: the head's ``(weight, bias)``.

    An ignored row whose logits may hold inf/NaN is not skipped: torch's softmax backward
    turns its zero gradient into NaN (``0 - exp(NaN) x 0``), in dx and dW, and so does the
    unskipped pass (NaN propagates, as in torch). "May": the bound
    ``|z_nv| <= ||x_n||_1 max|W| + max|b|`` (float64) reaches half the largest finite
    number of ``x``'s or ``W``'s dtype, or is itself inf/NaN (a non-finite feature, weight
    or bias). A cheap bound: it reads the ignored rows' features and the parameters once,
    not the logits the skip saves; where it is loose the rows are merely not skipped (the
    same result, slower). Host synchronisations: three (the two index lists, the bound)."""
    if counted is None:
        return None
    dropped = (~counted).nonzero().squeeze(1)
    if dropped.numel() == 0 or (idle_nan is not None and idle_nan()):
        return None
    if not _logits_surely_finite(x.index_select(0, dropped), *params):
        return None
    return RowSplit(counted.nonzero().squeeze(1), dropped)


def _logits_surely_finite(x: torch.Tensor, weight: torch.Tensor | None = None,
                          bias: torch.Tensor | None = None) -> bool:
    """Whether ``x @ weight.T + bias`` is surely finite, by the bound of
    :func:`split_rows` (without ``weight``: whether ``x`` is finite)."""
    wide = torch.float64 if x.device.type != "mps" else torch.float32
    if weight is None:
        return bool(torch.isfinite(x).all())
    limit = min(torch.finfo(t.dtype).max for t in (x, weight)) / 2
    # |x| in x's dtype (exact), summed in the wide dtype: no wide copy of the rows
    bound = (x.abs().sum(1, dtype=wide).amax() if x.numel()
             else x.new_zeros((), dtype=wide))
    w_max = weight.abs().amax().to(wide) if weight.numel() else bound.new_zeros(())
    bound = bound * w_max
    if bias is not None and bias.numel():
        bound = bound + bias.abs().amax().to(wide)
    # NaN compares False: a NaN feature, weight or bias is not surely finite
    return bool(bound < limit)


# low-precision dW: partial products per vocabulary tile (CPU: the tile's product stays in
# cache; accelerators: few launches)
_W_TILE_BYTES = 4 << 20
_ACCELERATOR_W_TILE_BYTES = 64 << 20
_dtype_out_mm = True  # CUDA's addmm with a float32 output for bf16/fp16 operands


def weight_grad_dtype(acc_policy: str | None, x: torch.Tensor,
                      w: torch.Tensor) -> torch.dtype | None:
    """The dtype dW is summed in over the chunks, as torch's ``LinearCrossEntropyOptions``
    ``acc_policy`` sets it; None: the compute dtype (float32; float64 for float64).

    ``"compact"`` (and ``"auto"``, which torch resolves to ``"compact"`` there) with
    bf16/fp16 operands on CUDA adds each chunk's ``G^T x_c`` straight into dW in
    ``w``'s dtype (cuBLAS sums the product in float32, then one rounding per chunk):
    no ``V x D`` float32 buffer (2.1 GB at V = 128256, D = 4096), at the precision of
    torch's own chunked head and Liger Kernel's. Elsewhere, as torch falls back to
    ``"balanced"`` off CUDA, and for every other policy or no options: float32.

    >>> x = torch.zeros(2, 3, dtype=torch.bfloat16); w = torch.zeros(4, 3, dtype=torch.bfloat16)
    >>> weight_grad_dtype("compact", x, w) is None  # a CPU tensor: float32
    True
    """
    low = (torch.bfloat16, torch.float16)
    if acc_policy in ("compact", "auto") and x.device.type == "cuda" and w.dtype in low \
            and x.dtype == w.dtype:
        return w.dtype
    return None


def accumulate_dw(gw: torch.Tensor, g: torch.Tensor, xc: torch.Tensor, first: bool) -> None:
    """``gw += g^T xc`` (``first``: ``=``), ``g``, ``xc`` in the matmul dtype. ``gw`` in
    the compute dtype: never a low-precision running sum (the training drift of bf16
    accumulation); on CUDA a float32-output matmul; elsewhere each vocabulary tile's
    partial product is rounded once and summed in float32. ``gw`` in the matmul dtype
    (:func:`weight_grad_dtype`'s ``"compact"``): one ``addmm_`` per chunk."""
    global _dtype_out_mm
    beta = 0.0 if first else 1.0  # beta 0: no zero-filled start
    if g.dtype == gw.dtype:
        gw.addmm_(g.t(), xc, beta=beta)
        return
    if _dtype_out_mm and g.device.type == "cuda":
        try:  # float32 accumulation and output straight from the matmul
            torch.ops.aten.addmm.dtype_out(gw, g.t(), xc, gw.dtype, beta=beta, alpha=1.0,
                                           out=gw)
            return
        except (RuntimeError, NotImplementedError):
            _dtype_out_mm = False  # this build lacks it: tiles below
    budget = _W_TILE_BYTES if g.device.type == "cpu" else _ACCELERATOR_W_TILE_BYTES
    tile = max(1, budget // (g.element_size() * max(gw.shape[1], 1)))
    for v in range(0, gw.shape[0], tile):
        part = torch.mm(g[:, v : v + tile].t(), xc)  # rounded once per chunk and tile
        if first:
            gw[v : v + tile].copy_(part)
        else:
            gw[v : v + tile] += part


def head_pass(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, kernel: ChunkKernel,
              chunk: int, need: tuple[bool, bool, bool], *,
              row_multiplier: torch.Tensor | None = None,
              split: RowSplit | None = None, matmul: torch.dtype | None = None,
              empty_chunk: bool = False, dw_dtype: torch.dtype | None = None) -> HeadPass:
    """One pass of the chunked head over the rows of ``x`` ((N, D), contiguous).

    The logits are ``x W^T + b`` in :func:`._rules.matmul_dtype`; ``kernel`` turns each
    chunk into its row losses and, if any of ``need`` = (dx, dW, db) is asked, its
    gradient; then dx (matmul dtype), dW and db (compute dtype, summed over chunks).
    ``row_multiplier`` ((N,), compute dtype) scales each row's gradient (the
    ``grad_output`` of ``reduction="none"``).

    ``split`` (from :func:`split_rows`): the ignored rows are skipped. The chunks are
    gathered from the counted rows only (``index_select`` of ``x``'s rows, a chunk at a
    time) and the kernel is restricted to them (:meth:`ChunkKernel.only`), so neither the
    matmuls nor the kernel see the ignored rows (prompt-masked batches: 30-60% of the
    rows); their loss and ``dx`` are exactly 0 and every counted row's numbers are those
    of the unskipped pass.

    ``matmul``: the dtype of the matmuls, the logits and dx instead of
    :func:`._rules.matmul_dtype` (the vocab-parallel head's float32 logits).
    ``empty_chunk``: with no rows, ``kernel`` still runs once, on an empty chunk (a kernel
    that makes collectives: every rank makes the same calls, even for ``N = 0``).
    ``dw_dtype``: dW's dtype over the chunks (:func:`weight_grad_dtype`), None for the
    compute dtype."""
    num_rows = x.shape[0]
    cdtype = compute_dtype(x.dtype)
    mdtype = matmul_dtype(x, w) if matmul is None else matmul
    # (not the vocab-parallel head's float32 logits, ``matmul`` given)
    rounded = matmul is None and rounds_logits(x.dtype, mdtype)
    wm = w.to(mdtype)
    bm = None if b is None else b.to(mdtype)
    need_x, need_w, need_b = need
    want = any(need)
    keep = None if split is None else split.keep
    if keep is not None:
        kernel = kernel.only(keep)
        row_multiplier = None if row_multiplier is None else row_multiplier[keep]
    seen = num_rows if keep is None else keep.shape[0]
    gx = _buffers.empty(tuple(x.shape), mdtype, x) if need_x else None
    gw = _buffers.empty(tuple(w.shape), dw_dtype or cdtype, x) if need_w else None
    gb = (torch.zeros(w.shape[0], dtype=cdtype, device=x.device)
          if need_b and b is not None else None)
    buf = _buffers.empty((min(chunk, seen), w.shape[0]), mdtype, x)
    losses = torch.empty(seen, dtype=cdtype, device=x.device)
    dx = None  # skipping: each chunk's dx, then scattered to its rows
    if gx is not None and split is not None:
        gx.index_fill_(0, split.dropped, 0.0)
        dx = torch.empty((min(chunk, seen), x.shape[1]), dtype=mdtype, device=x.device)
    for i in range(0, max(seen, 1) if empty_chunk else seen, chunk):
        j = min(i + chunk, seen)
        xc = (x[i:j] if keep is None else x.index_select(0, keep[i:j])).to(mdtype)
        lg = buf[: j - i]
        if bm is None:
            torch.mm(xc, wm.t(), out=lg)
        else:
            torch.addmm(bm, xc, wm.t(), out=lg)
        if rounded:  # torch's float16 logits: its rounding, its overflow to inf
            lg.copy_(lg.to(x.dtype))
        rm = None if row_multiplier is None else row_multiplier[i:j]
        # the gradient overwrites the chunk's logits
        losses[i:j] = kernel(lg, i, grad=want, row_multiplier=rm)
        if gx is not None:
            if dx is None:
                torch.mm(lg, wm, out=gx[i:j])
            else:
                assert keep is not None
                gx.index_copy_(0, keep[i:j], torch.mm(lg, wm, out=dx[: j - i]))
        if gw is not None:
            accumulate_dw(gw, lg, xc, first=i == 0)
        if gb is not None:
            gb += lg.sum(0, dtype=cdtype)
    if gw is not None and seen == 0:  # no chunk ran: the (pooled) buffer is stale
        gw.zero_()
    if keep is not None:  # ignored rows: loss 0
        losses = torch.zeros(num_rows, dtype=cdtype, device=x.device).index_copy_(
            0, keep, losses)
    return HeadPass(losses, [gx, gw, gb], kernel, keep)
