# mypy: disable-error-code="valid-type"
# (the kernels' parameters are annotated tl.constexpr, tl being bound on first use)
"""Triton kernels for the local work of the vocab-parallel losses
(:mod:`crossent.torch.distributed`): one launch for a rank's per-row partial statistics,
one for the gradient of its logits. The collectives stay with the caller (NCCL or gloo).

Notation as in :mod:`crossent.torch.distributed._common`: rank ``r`` holds the classes
``[start, start + V_r)`` of ``V``; ``z`` its ``(n, V_r)`` logits (after ``softcap``:
``c tanh(z / c)``, applied in the kernels), ``w`` its slice of the class weights (1
without), ``y`` the global target ids.

``partials_kernel``: one program per row reads the row once in tiles of ``BLOCK`` classes
and keeps, in ``ACC`` (float32; float64 for float64 input):

* the running max ``m`` and ``s = sum_c exp(z_c - m)`` (online:
  ``s <- s exp(m_old - m_new) + sum_tile exp(z - m_new)``, one exponential per logit;
  ``m`` of an all ``-inf`` row stays ``-inf`` and ``s`` 0);
* ``w_y z_y`` if this rank owns ``y`` (0 otherwise, and 0 where ``w_y = 0``), ``w_y``;
* the smoothing sum ``sum_c w_c z_c`` (NaN where a zero weight meets an infinite logit,
  as torch's ``0 x inf`` in ``sum_c w_c log p_c``).

NaN exactly as :meth:`~crossent.torch.distributed._common.Partials.fill`: a NaN logit in
the slice makes the row's ``m`` and ``s`` NaN (counted per tile; ``tl.max`` alone may drop
a NaN), so :func:`~crossent.torch.distributed._common.exchange` makes the row NaN on every
rank. Ignored rows are computed like the others: their loss is masked after the exchange,
their gradient row is NaN where their logits hold a NaN, as single-process torch's.

``grad_kernel``: one program per row writes, tile by tile,
``g_c = (exp(z_c - lse) a - (eps / V) r w_c - (1 - eps) w_y r [c = y]) softcap'(z_c)``
with ``r`` the row's ``d(reduced loss)/d l_n`` (0 on ignored rows) and ``a = coef r``
(``coef = A_n + 2 zeta lse_n``, the exchange's), in ``ACC``, rounded once by the store
into the output's dtype (the input dtype; the output may be ``z`` itself: each tile is
read before the same program overwrites it).

No host synchronisation: the options travel as a device tensor (``ops._to_device``), the
row counts as launch sizes. Decorated on first launch (see :mod:`.kernels`), with
:func:`~.kernels.tanh_source` for the softcap.
"""

from __future__ import annotations

import types
from typing import Any, NamedTuple

import torch

from .._rules import compute_dtype as accumulate_dtype
from . import kernels
from .ops import _tl_dtype, _to_device, kernel_config, rows_of_unit_class_stride

__all__ = ["VocabPartials", "vocab_parallel_grad", "vocab_parallel_partials"]

# Bound by compiled() on every launch; referenced as globals by the kernel sources below.
tl: Any = None
triton: Any = None
_tanh: Any = None

_cache: dict[tuple[int, bool], dict[str, Any]] = {}

# triton's interpreter is not thread-safe (it rebinds triton.language's functions while a
# kernel runs, and so does compiled() here): every launch below runs in
# kernels.launching(), crossent's one lock for interpreted launches.


def partials_kernel(
    Z, stride_z, Y, W, PARAMS, M_OUT, S_OUT, ZY_OUT, WY_OUT, SM_OUT, V, start, ignore_index,
    HAS_WEIGHT: tl.constexpr, HAS_CAP: tl.constexpr, SMOOTH: tl.constexpr,
    ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    zrow = Z + row * stride_z
    cols = tl.arange(0, BLOCK)
    cap = tl.load(PARAMS + 0)
    y = tl.load(Y + row).to(tl.int64)
    own = (y != ignore_index) & (y >= start) & (y < start + V)
    y_local = tl.where(own, y - start, -1)
    m = tl.full((), float("-inf"), ACC)
    s = tl.full((), 0.0, ACC)
    nans = tl.full((), 0, tl.int32)
    zy_acc = tl.zeros((BLOCK,), ACC)
    sm_acc = tl.zeros((BLOCK,), ACC)
    for t0 in range(0, V, BLOCK):
        offs = t0 + cols
        mask = offs < V
        x = tl.load(zrow + offs, mask=mask, other=float("-inf")).to(ACC)
        if HAS_CAP:
            x = tl.where(mask, cap * _tanh(x / cap, ACC), float("-inf"))
        isnan = x != x
        nans += tl.sum(isnan.to(tl.int32), 0)
        m_new = tl.maximum(m, tl.max(tl.where(isnan, float("-inf"), x), 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row of -inf so far
        s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe), 0)
        m = m_new
        zy_acc += tl.where(offs == y_local, x, 0.0)  # one lane at most: exact
        if SMOOTH:
            if HAS_WEIGHT:  # a zero weight at z = +-inf gives torch's 0 x inf = NaN
                wv = tl.load(W + offs, mask=mask, other=0.0).to(ACC)
                sm_acc += tl.where(mask, x, 0.0) * wv
            else:
                sm_acc += tl.where(mask, x, 0.0)
    z_y = tl.sum(zy_acc, 0)
    if HAS_WEIGHT:
        w_y = tl.load(W + tl.where(own, y_local, 0)).to(ACC)  # V > 0: launched only then
        w_y = tl.where(own, w_y, 0.0)
        tl.store(WY_OUT + row, w_y)
    zy = tl.where(own, z_y, 0.0)  # unweighted: the loss is w_y (lse - z_y), as torch's
    bad = nans > 0
    tl.store(M_OUT + row, tl.where(bad, float("nan"), m))
    tl.store(S_OUT + row, tl.where(bad, float("nan"), s))
    tl.store(ZY_OUT + row, zy)
    if SMOOTH:
        tl.store(SM_OUT + row, tl.sum(sm_acc, 0))


def grad_kernel(
    Z, stride_z, G, stride_g, Y, W, PARAMS, LSE, COEF, SCALE, V, start, ignore_index,
    HAS_WEIGHT: tl.constexpr, HAS_CAP: tl.constexpr, SMOOTH: tl.constexpr,
    ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    zrow = Z + row * stride_z
    grow = G + row * stride_g
    cols = tl.arange(0, BLOCK)
    cap = tl.load(PARAMS + 0)
    eps = tl.load(PARAMS + 1)
    eps_v = tl.load(PARAMS + 2)  # eps / V, V the global class count
    y = tl.load(Y + row).to(tl.int64)
    valid = y != ignore_index
    own = valid & (y >= start) & (y < start + V)
    y_local = tl.where(own, y - start, -1)
    r = tl.where(valid, tl.load(SCALE + row).to(ACC), 0.0)
    lse = tl.load(LSE + row).to(ACC)
    a = tl.load(COEF + row).to(ACC) * r
    if HAS_WEIGHT:
        w_y = tl.load(W + tl.where(own, y_local, 0)).to(ACC)
    else:
        w_y = tl.full((), 1.0, ACC)
    c = (1.0 - eps) * w_y * r
    for t0 in range(0, V, BLOCK):
        offs = t0 + cols
        mask = offs < V
        x = tl.load(zrow + offs, mask=mask, other=0.0).to(ACC)
        if HAS_CAP:
            th = _tanh(x / cap, ACC)
            x = cap * th
        g = tl.exp(x - lse) * a
        if SMOOTH:
            if HAS_WEIGHT:
                wv = tl.load(W + offs, mask=mask, other=0.0).to(ACC)
                g -= eps_v * r * wv
            else:
                g -= eps_v * r
        g -= tl.where(offs == y_local, c, 0.0)
        if HAS_CAP:
            g = g * (1.0 - th * th)
        tl.store(grow + offs, g, mask=mask)


def compiled() -> dict[str, Any]:
    """The jitted kernels for the triton module imported now and the current mode.

    The globals ``tl`` / ``triton`` / ``_tanh`` are rebound on every call (not only when a
    new set is jitted): the interpreter looks them up when a kernel runs, and a test may
    swap triton's modules between launches (``tests/triton/conftest.py``)."""
    global tl, triton, _tanh
    import triton as _triton
    import triton.language as _tl

    key = (id(_triton), kernels.interpreting())
    tl, triton = _tl, _triton
    if key not in _cache:
        # kernels.tanh_source with this module's globals: its ``tl`` is the one bound here
        tanh = types.FunctionType(kernels.tanh_source.__code__, globals(), "tanh_source")
        _cache[key] = {
            "tanh": _triton.jit(tanh),
            "partials": _triton.jit(partials_kernel),
            "grad": _triton.jit(grad_kernel),
        }
    _tanh = _cache[key]["tanh"]
    if key[1]:  # the interpreter's helpers, as kernels.compiled binds them
        kernels.adopt_interpreter_globals(globals(), _OWN_NAMES)
    return _cache[key]


class VocabPartials(NamedTuple):
    """One rank's per-row partials (``(n,)``, float32; float64 for float64 logits)."""

    m: torch.Tensor  # local max (NaN if the row's slice holds a NaN; -inf if V_r = 0)
    s: torch.Tensor  # sum_c exp(z_c - m) over the slice (NaN with m)
    zy: torch.Tensor  # w_y z_y if this rank owns y_n, else 0
    wy: torch.Tensor | None  # w_y if this rank owns y_n, else 0 (weight given only)
    smooth: torch.Tensor | None  # sum_c w_c z_c over the slice (smooth only)


def _rowwise(z: torch.Tensor) -> torch.Tensor:
    if z.dim() != 2:
        raise ValueError("logits must be 2-D (rows, local classes)")
    z = z.resolve_neg()  # a negated view's sign bit is not in its memory
    return z if rows_of_unit_class_stride(z) else z.contiguous()


def vocab_parallel_partials(
    z: torch.Tensor,
    target: torch.Tensor,
    *,
    start: int,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    softcap: float | None = None,
    smooth: bool = False,
    block: int | None = None,
) -> VocabPartials:
    """Per-row partials of the logits ``z`` ``(n, V_r)`` (any float dtype) of the classes
    ``[start, start + V_r)``; ``target`` ``(n,)`` global ids (any integer dtype; ignored
    rows and ids outside the slice own nothing); ``weight`` ``(V_r,)`` this rank's class
    weights; ``softcap`` applied in the kernel; ``smooth``: also ``sum_c w_c z_c``.
    ``block`` overrides the vocabulary tile (tests: ragged last tiles). One launch."""
    z = _rowwise(z)
    n, v = z.shape
    acc = accumulate_dtype(z.dtype)
    dev = z.device

    def zeros():
        return torch.zeros(n, dtype=acc, device=dev)

    out = VocabPartials(torch.full((n,), float("-inf"), dtype=acc, device=dev), zeros(),
                        zeros(), zeros() if weight is not None else None,
                        zeros() if smooth else None)
    if n == 0 or v == 0:  # nothing to read: the empty slice's partials
        return out
    y = target.reshape(n).to(device=dev, dtype=torch.int64).contiguous()
    w = None if weight is None else weight.resolve_neg().to(device=dev, dtype=acc).contiguous()
    params = _to_device([1.0 if softcap is None else float(softcap)], acc, dev)
    blk, warps = kernel_config(v, z.element_size(), block)
    with kernels.launching():
        compiled()["partials"][(n,)](
            z, z.stride(0), y, w if w is not None else params, params,
            out.m, out.s, out.zy, out.wy if out.wy is not None else out.m,
            out.smooth if out.smooth is not None else out.m,
            v, int(start), int(ignore_index),
            HAS_WEIGHT=w is not None, HAS_CAP=softcap is not None, SMOOTH=bool(smooth),
            ACC=_tl_dtype(z.dtype), BLOCK=blk, num_warps=warps,
        )
    return out


def vocab_parallel_grad(
    z: torch.Tensor,
    target: torch.Tensor,
    lse: torch.Tensor,
    coef: torch.Tensor,
    scale: torch.Tensor,
    *,
    start: int,
    num_classes: int,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    softcap: float | None = None,
    out: torch.Tensor | None = None,
    block: int | None = None,
) -> torch.Tensor:
    """``d loss / d z`` for the logits ``z`` ``(n, V_r)`` of the classes
    ``[start, start + V_r)`` given each row's global ``lse``, ``coef`` (``A_n + 2 zeta
    lse_n``) and ``scale`` (``d(reduced loss)/d l_n``; zeroed on ignored rows here), all
    ``(n,)``; ``num_classes`` the global ``V`` (the smoothing's ``eps / V``). Written into
    ``out`` (``(n, V_r)``, contiguous class axis, any float dtype, ``z`` itself allowed;
    default a new tensor of ``z``'s dtype), rounded once. One launch; returns ``out``."""
    z = _rowwise(z)
    n, v = z.shape
    acc = accumulate_dtype(z.dtype)
    dev = z.device
    if out is None:
        out = torch.empty((n, v), dtype=z.dtype, device=dev)
    elif tuple(out.shape) != (n, v) or not rows_of_unit_class_stride(out):
        raise ValueError("out must have the logits' shape and a contiguous class axis")
    if n == 0 or v == 0:
        return out
    y = target.reshape(n).to(device=dev, dtype=torch.int64).contiguous()
    w = None if weight is None else weight.resolve_neg().to(device=dev, dtype=acc).contiguous()
    eps = float(label_smoothing)
    params = _to_device([1.0 if softcap is None else float(softcap), eps,
                         eps / num_classes if num_classes else 0.0], acc, dev)

    def rows(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=dev, dtype=acc).reshape(-1).expand(n).contiguous()

    blk, warps = kernel_config(v, z.element_size(), block)
    lse, coef, scale = rows(lse), rows(coef), rows(scale)
    with kernels.launching():
        compiled()["grad"][(n,)](
            z, z.stride(0), out, out.stride(0), y, w if w is not None else params, params,
            lse, coef, scale, v, int(start), int(ignore_index),
            HAS_WEIGHT=w is not None, HAS_CAP=softcap is not None, SMOOTH=eps != 0.0,
            ACC=_tl_dtype(z.dtype), BLOCK=blk, num_warps=warps,
        )
    return out


# this module's own names (the interpreter's additions are the others)
_OWN_NAMES = frozenset(globals()) | {"_OWN_NAMES"}
