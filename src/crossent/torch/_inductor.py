"""An opt-in compiled (TorchInductor, CPU C++) softmax cross-entropy kernel for index
targets: per-row loss and the gradient in one generated C++ loop (issue 16).

Per row ``n`` of the logits ``z`` ((M, C), float32 arithmetic whatever the input dtype)::

    k_n   = z_ny  (the target logit; max_c z_nc in rows where that overflows, below)
    s_n   = sum_c exp(z_nc - k_n)
    lse_n = k_n + log s_n,   nll_n = (k_n - z_ny) + log s_n   (= lse_n - z_ny)
    g_nc  = (exp(z_nc - k_n) / s_n) a_n + c_n [c == y_n]    rounded once to z's dtype

``a`` and ``c`` are per-row float32 scalars chosen by the caller (for plain index targets
with "mean": ``a = 1/N``, ``c = -1/N``; class weights only change them: ``a = w[y]/W``,
``c = -w[y]/W``, ``W = sum_n w[y_n]``); rows with ``a == c == 0`` (ignored rows) get a
gradient of 0, except where their softmax is NaN (a NaN logit, a +inf, all -inf): NaN
there, as torch's ``dlogp - p sum(dlogp)`` gives (``NaN * 0``). ``p = exp(z - k) / s``
is formed before it is scaled by ``a`` (``a / s`` first would underflow float32 for a
tiny ``a``, e.g. a class weight of 1e-35, and lose the gradient). The true-class entry
``a p_y + c`` is formed in float32 and rounded once (PITFALLS 6: ``p - 1`` after rounding
to bfloat16 loses a confident row's gradient).

The shift ``k = z_y`` makes ``s >= 1`` and ``nll = log s`` (no cancellation: a confident
row keeps its loss digits) and saves the max pass (measured: 1.38x against 1.55x an exp
pass on one thread); a row where ``s > 2^64`` (some ``z_c - z_y > 44``: ``a / s`` would
near float32's subnormals), or that holds NaN or infinities, is done again, from its still
intact logits, with ``k = max_c z_c``.
Inductor fuses the two row passes (exp, sum and a row-local float32 copy of the
exponentials; scale and round) under one outer loop over rows, so each logit is read from
memory once and ``exp`` is evaluated once per logit (written twice instead of named
once, inductor evaluates it twice: 2.7x an exp pass); the true-class entries are patched
by an O(M) ``index_put_``. Label smoothing, z-loss, softcap and probability targets are not
handled here (the caller keeps its own kernel for them).

:func:`softmax_grad_rows` takes a whole batch and runs it in blocks of up to
``_BLOCK_ELEMENTS`` logits in the calling thread, each block one parallel region on
torch's OpenMP threads (not on crossent's block workers: the generated kernel's binding
keeps the GIL); call it once per batch, not per small block (a call costs ~1 ms of small
operations, a block ~0.1-0.3 ms of dynamo guards).

Needs a C++ compiler (``torch._inductor`` compiles on first use: ~10-20 s, then cached on
disk); :func:`available` says whether one is found.
"""

from __future__ import annotations

import functools
import shutil
import threading
from collections.abc import Callable

import torch
from torch.fx.experimental import _config as fx_config

from ..errors import InputError, UnsupportedError
from ._rules import LOW_PRECISION

__all__ = ["available", "serves", "set_compiled_kernel", "softmax_grad_rows"]

_enabled = False  # the opt-in (set_compiled_kernel)


def set_compiled_kernel(enabled: bool) -> bool:
    """Opt in (``True``) or out of the compiled kernel for low-precision CPU logits;
    returns the previous setting. Off by default: the first call per dtype compiles for
    10-25 s (then inductor's disk cache: 8-10 s per new process).

    With it on, ``crossent.torch.cross_entropy`` and the linear head run bfloat16/float16
    CPU logits with index targets and neither label smoothing, ``z_loss``, ``softcap``
    nor ``statistics=`` through :func:`softmax_grad_rows` (everything else keeps the
    row-block kernel). Needs a C++ compiler (:func:`available`), else
    :class:`crossent.UnsupportedError`.

    >>> import crossent.torch as xt
    >>> xt.set_compiled_kernel(False)
    False
    """
    global _enabled
    if not isinstance(enabled, bool):
        raise InputError(f"enabled must be True or False, got {enabled!r}")
    if enabled and not available():
        raise UnsupportedError("crossent.torch.set_compiled_kernel(True): needs a C++ "
                               "compiler for torch's inductor (g++ or clang++ on PATH)")
    previous, _enabled = _enabled, enabled
    return previous


def serves(z: torch.Tensor, grad: torch.Tensor | None) -> bool:
    """The compiled kernel is on and takes these logits and gradient buffer (the caller
    checks the options: index targets, no smoothing, z-loss, softcap or hooks)."""
    return (_enabled and grad is not None and z.device.type == "cpu"
            and z.dtype in LOW_PRECISION and grad.dtype == z.dtype
            and grad.is_contiguous() and z.is_contiguous())


@functools.cache
def available() -> bool:
    """Whether inductor's CPU backend can compile here (a C++ compiler on ``PATH``)."""
    try:
        from torch._inductor import config
    except ImportError:  # pragma: no cover - torch without inductor
        return False
    cxx = config.cpp.cxx[1] if config.cpp.cxx[1] else "g++"
    return any(shutil.which(name) for name in (cxx, "g++", "c++", "clang++"))


def _scaled_softmax(z: torch.Tensor, k: torch.Tensor, a: torch.Tensor, out: torch.Tensor):
    """The traced body: ``out = (exp(z - k) / s) a`` (rounded once), returns ``s``."""
    e = torch.exp(z.float() - k.unsqueeze(1))  # named once: kept in a row-local buffer
    s = e.sum(1, keepdim=True)
    # 1 / s >= 2^-64 (rows past _MAX_SUM are redone), so e / s = p keeps its digits;
    # times a last: a / s first would underflow for a tiny a (a class weight of 1e-35)
    out.copy_(e * (1.0 / s) * a.unsqueeze(1))
    return s.squeeze(1)


@functools.cache
def _compiled() -> Callable:
    return torch.compile(_scaled_softmax, dynamic=True, fullgraph=True)


# above this s, a / s nears float32's subnormals (a >= 2e-19 stays normal): redo the row
_MAX_SUM = 2.0 ** 64
# most logits per block: a block's call costs 0.1-0.3 ms (dynamo's guards, the overflow
# check). Measured on one thread, 1024 x 32000 bfloat16, x an exp pass, into a reused
# buffer / in place: 2.12 / 2.05 with 1 << 19, 1.53 / 2.16 with 1 << 22, 1.36 / 1.91 with
# 1 << 23. In place each calling thread keeps a scratch block of this size (16 MiB bf16).
_BLOCK_ELEMENTS = 1 << 23
_local = threading.local()  # each thread's in-place scratch block
_compiled_dtypes: set[torch.dtype] = set()
_compile_lock = threading.Lock()


def _scaled(z: torch.Tensor, k: torch.Tensor, a: torch.Tensor, out: torch.Tensor):
    """``_scaled_softmax`` compiled; eager for one row or one class (dynamic shapes still
    specialise sizes 0 and 1: a second compilation would cost more than the call)."""
    with torch.no_grad():
        if min(z.shape) <= 1:
            return _scaled_softmax(z, k, a, out)
        return _compiled()(z, k, a, out)


def _compile(z: torch.Tensor, k: torch.Tensor, a: torch.Tensor, out: torch.Tensor):
    """:func:`_scaled`, compiling: without "duck" sizes (rows of a view and of its base
    being equal once is no guard), one caller at a time (concurrent first calls compile
    once, not once each)."""
    with _compile_lock, fx_config.patch(use_duck_shape=False):  # type: ignore[attr-defined]
        result = _scaled(z, k, a, out)
        if min(z.shape) > 1:
            _compiled_dtypes.add(z.dtype)
        return result


def _scaled_rows(z: torch.Tensor, k: torch.Tensor, a: torch.Tensor, out: torch.Tensor
                 ) -> torch.Tensor:
    """``out = a * exp(z - k) / s`` (``out is z`` allowed) block by block in the calling
    thread (each block on torch's OpenMP threads); returns ``s``. Rows whose ``s`` exceeds
    ``_MAX_SUM`` (or is NaN) get ``k = max_c z_c`` (written into ``k``) and are done again.

    In place, each block goes through a reused per-thread scratch block and is copied
    back: inductor 2.13 fails (KeyError in its row-local buffer pass) on a graph that
    overwrites its own input; the block's logits stay intact for the rows done again."""
    num_rows, num_classes = z.shape
    rows = max(2, _BLOCK_ELEMENTS // max(num_classes, 1))
    inplace = out.data_ptr() == z.data_ptr()
    key = (rows, num_classes, z.dtype, z.device)
    s = torch.empty(num_rows, device=z.device)

    def one(i: int, j: int) -> None:
        if inplace:
            if getattr(_local, "key", None) != key:
                _local.key = None  # the old block is freed before the new one is made
                _local.block = torch.empty((rows, num_classes), dtype=z.dtype,
                                           device=z.device)
                _local.key = key
            dest = _local.block[: j - i]
        else:
            dest = out[i:j]
        zb = z[i:j]
        run = _scaled if z.dtype in _compiled_dtypes else _compile
        s[i:j] = run(zb, k[i:j], a[i:j], dest)
        bad = ~(s[i:j] <= _MAX_SUM)
        if bool(bad.any()):  # some z_c - z_y > 44, NaN or infinite logits
            idx = bad.nonzero().squeeze(1)
            redo = zb[idx]
            k_max = redo.float().amax(1)
            g = torch.empty_like(redo)
            s[i + idx] = run(redo, k_max, a[i:j][idx], g)
            k[i + idx] = k_max
            dest[idx] = g
        if inplace:
            zb.copy_(dest)

    # In the calling thread, on inductor's own OpenMP threads: one parallel region per
    # block. Not on crossent's block workers: the generated kernel's Python binding keeps
    # the GIL, so workers ran one at a time (measured, 4096 x 32000 bfloat16, 2 threads:
    # 3.1x an exp pass on the workers, 1.5x here).
    for i in range(0, num_rows, rows):
        one(i, min(i + rows, num_rows))
    return s


def softmax_grad_rows(z: torch.Tensor, y: torch.Tensor, a: torch.Tensor, c: torch.Tensor,
                      out: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(grad, lse, nll)`` of a batch of rows (see the module docstring for the formula).

    ``z``: (M, C) float32/bfloat16/float16 CPU logits, contiguous; ``y``: (M,) int64 class
    ids in ``[0, C)`` (ignored rows: any valid id, with ``a == c == 0``); ``a``, ``c``:
    (M,) float32. ``out`` ((M, C), z's dtype, contiguous; ``out is z`` allowed: the
    logits are then overwritten) receives the gradient, else a new tensor does. ``lse``
    and ``nll = lse - z[n, y_n]`` are float32 (M,); ``nll`` is ``log s`` itself where the
    shift is ``z_y``: no cancellation (a confident row's loss keeps its digits).
    """
    num_rows, num_classes = z.shape
    rows = torch.arange(num_rows, device=z.device)
    z_y = z[rows, y].float()  # before ``out is z`` overwrites it
    if out is None:
        out = torch.empty_like(z)
    k = z_y.clone()  # the shift: max_c z_c instead where this one overflows
    s = _scaled_rows(z, k, a, out)
    # the true class: a p_y + c in float32, rounded once (PITFALLS 6); NaN where the
    # row's softmax is, even with a = 0 (an ignored row), as in torch
    g_y = torch.exp(z_y - k) / s * a + c
    out.view(-1).index_put_((rows * num_classes + y,), g_y.to(out.dtype))
    log_s = s.log()
    return out, k + log_s, (k - z_y) + log_s
