"""The local (per-rank, per-row) work of the vocab-parallel losses, and which kernel does it.

Two routes, chosen per call by :func:`resolve_backend` (the same choice on every rank: the
requested ``backend`` is a column of the agreement table):

``"rowblock"``
    torch operations on row blocks of about 4 MiB of float32 logits
    (:func:`~._common.block_rows`): :meth:`~._common.Partials.fill` in forward,
    :func:`~._common.grad_block` in backward. On CPU the blocks go to the worker threads
    of :mod:`crossent.torch._blockpool` (each block single-threaded, no OpenMP barrier
    waits for a descheduled thread; the blocks write disjoint rows, so the results are
    the bits of the same blocks run one after the other,
    ``crossent.torch.set_block_workers(False)``); each worker holds one block's
    temporaries at a time, so the peak is one block's per worker thread. Elsewhere (CUDA
    without triton) the blocks run in order in the calling thread.
``"triton"``
    :mod:`crossent.torch._triton.vocab_parallel`: one launch for the partials, one for the
    gradient (softcap in the kernels, gradient rounded once into the input dtype), no
    host synchronisation.

The collectives (:func:`~._common.exchange`, the agreement) run in the calling thread
only, before or after the local work, never inside a worker.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ...errors import InputError, UnsupportedError
from .. import _backends
from .._blockpool import run_row_blocks
from ._common import (
    Layout,
    Partials,
    Problems,
    Spec,
    block_rows,
    cap_logits,
    compute_dtype,
    grad_block,
    uncap_grad,
)

__all__ = ["ROUTES", "grad_rows", "partial_rows", "resolve_backend", "run_local"]

ROUTES = ("rowblock", "triton")


def resolve_backend(backend, device: torch.device | None, function: str,
                    spec: Spec, problems: Problems) -> str:
    """The route of this call for the requested ``backend`` (one of
    :data:`crossent.torch._backends.BACKENDS`): ``"auto"`` takes the Triton kernels on
    CUDA/ROCm tensors when triton imports, else ``"rowblock"``; ``"triton"`` forced where
    the kernels cannot run (CPU tensors without ``TRITON_INTERPRET=1``, triton missing) and
    ``"native"`` (torch has no vocab-parallel kernel) are noted as
    :class:`~crossent.UnsupportedError`, a bad value as :class:`~crossent.InputError`: raised
    after the agreement collective, on every rank together."""
    try:
        backend = _backends.check_backend(backend)
    except InputError as e:
        problems.note(str(e))
        return "rowblock"
    name = f"distributed.{function}"
    if backend == "native":
        problems.note(f"crossent.torch.{name}: backend='native' (torch's own kernel) has no "
                      f"vocab-parallel form; use backend='auto', 'rowblock' or 'triton'",
                      UnsupportedError)
        return "rowblock"
    if device is None:  # the input is bad (noted already): nothing runs
        return "rowblock"
    call = _backends.Call(function=name, device=device, num_logits=0, index_target=True,
                          z_loss=spec.z_loss, softcap=spec.softcap)
    try:
        # native_max_logits=0: the small-input shortcut to torch's kernel never applies
        route = _backends.choose_backend(backend, call, 0)
    except UnsupportedError as e:
        problems.note(str(e), UnsupportedError)
        return "rowblock"
    return route if route in ROUTES else "rowblock"


def run_local(fn: Callable[[int, int], None], rows: int, cols: int,
              device: torch.device) -> None:
    """``fn(i, j)`` for the row blocks of ``rows x cols`` logits (:func:`~._common
    .block_rows` rows each): :func:`crossent.torch._blockpool.run_row_blocks` (on CPU the
    worker threads; the blocks must write disjoint rows)."""
    run_row_blocks(fn, rows, block_rows(cols), device)


def partial_rows(z: torch.Tensor, y: torch.Tensor, valid: torch.Tensor, lay: Layout,
                 spec: Spec, route: str, *, capped: bool = False) -> Partials:
    """The partials of the logits ``z`` ``(n, V_r)`` (any float dtype) over this rank's
    slice. ``capped``: ``softcap`` was applied to ``z`` already (the linear head's buffer)."""
    n, size = z.shape
    cdtype = compute_dtype(z.dtype)
    if route == "triton":
        from .._triton.vocab_parallel import vocab_parallel_partials

        got = vocab_parallel_partials(
            z, y, start=lay.start, weight=spec.weight, ignore_index=spec.ignore_index,
            softcap=None if capped else spec.softcap, smooth=bool(spec.label_smoothing))
        return Partials(got.m, got.s, got.zy, got.wy, got.smooth)
    part = Partials.empty(n, spec, cdtype, z.device)
    cap = spec.softcap is not None and not capped

    def one_block(i: int, j: int) -> None:
        zb = z[i:j].to(cdtype, copy=cap)  # a copy where the cap would write into z
        if cap:
            cap_logits(zb, spec)
        part.fill(i, zb, y[i:j], valid[i:j], lay, spec)

    run_local(one_block, n, size, z.device)
    return part


def grad_rows(z: torch.Tensor, y: torch.Tensor, valid: torch.Tensor, lse: torch.Tensor,
              coef: torch.Tensor, scale: torch.Tensor, lay: Layout, spec: Spec, route: str,
              out: torch.Tensor, *, tanh: torch.Tensor | None = None,
              capped: bool = False) -> torch.Tensor:
    """``d loss / d z`` of the logits ``z`` ``(n, V_r)`` written into ``out`` (``z``
    itself allowed: then written in place), given the global per-row ``lse``, ``coef`` and
    ``scale`` (``d(reduced)/d l_n``, ``(n,)`` or 0-d). ``capped`` (rowblock route only):
    ``z`` holds the capped logits already and ``tanh`` their ``tanh(z / c)`` (the linear
    head's chunk buffer); the Triton kernel caps the raw logits itself."""
    n, size = z.shape
    if out.numel() == 0:  # no classes here (or no rows): nothing to write, and two empty
        return out        # tensors share data_ptr 0, which would pass for "in place"
    if route == "triton":
        from .._triton.vocab_parallel import vocab_parallel_grad

        assert not capped, "the Triton route caps the raw logits inside the kernel"
        return vocab_parallel_grad(
            z, y, lse, coef, scale, start=lay.start, num_classes=spec.num_classes,
            weight=spec.weight, ignore_index=spec.ignore_index,
            label_smoothing=spec.label_smoothing, softcap=spec.softcap, out=out)
    cdtype = lse.dtype
    scale = scale.expand(n) if scale.dim() == 0 else scale
    in_place = out.data_ptr() == z.data_ptr() and z.dtype == cdtype

    def one_block(i: int, j: int) -> None:
        zb = z[i:j] if in_place else z[i:j].to(cdtype, copy=True)
        if capped:
            t = tanh[i:j] if tanh is not None else None
        else:
            t = cap_logits(zb, spec)
        g = uncap_grad(grad_block(zb, y[i:j], valid[i:j], lse[i:j], coef[i:j], scale[i:j],
                                  lay, spec, spec.num_classes), t)
        if not in_place:
            out[i:j] = g

    run_local(one_block, n, size, z.device)
    return out
