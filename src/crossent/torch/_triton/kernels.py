# mypy: disable-error-code="valid-type"
# (the kernels' parameters are annotated tl.constexpr, tl being bound on first use)
"""Triton source of crossent's GPU kernels, decorated on first use (see :func:`compiled`).

The functions below are plain Python until :func:`compiled` wraps them with ``triton.jit``.
Why not decorate at import: ``triton.jit`` decides between the compiler and the CPU
interpreter (``TRITON_INTERPRET=1``) when it is applied, and triton itself is imported as
a side effect of ``import torch._dynamo``; deferring the decoration (and the import of
``triton.language``) to the first launch lets a test set the variable late, and lets this
module be imported (by ``pytest --doctest-modules``) where triton is not installed.

Kernels
-------
``ce_kernel``: one program per row of logits ``z`` (``(N, V)``, class axis contiguous;
or a persistent grid, below).
Pass 1 reads the row in tiles of ``BLOCK`` classes and keeps the running max ``m`` and
``s = sum_c exp(z_c - m)`` (online: ``s <- s exp(m_old - m_new) + sum_tile exp(z - m_new)``;
one exponential per logit), plus ``sum_c T_c`` for probability targets. Then
``lse = m + log s``. Pass 2 (only when the gradient, label smoothing or probability
targets need it) reads the row again, forms ``p = exp(z - m) / s`` and writes

    g_c = r * (A p_c - B_c) * softcap'(z_c),      r = scale * row_multiplier

with ``A = sum_c T_c + 2 z_loss lse`` and ``B_c = T_c`` (probability targets,
``T = ((1 - eps) t + eps / V) w``) or ``B_c = (eps / V) w_c + (1 - eps) w_y [c = y]``
(index targets), while it sums the loss terms ``T_c ((m - z_c) + log s)`` (each >= 0: no
cancellation, and no ``lse = m + log s`` rounded to ``m`` at logits near 3e38; a zero
``T_c`` contributes exactly 0 even where ``z_c = -inf``).
All arithmetic runs in ``ACC`` (float32; float64 for float64 input) and the gradient is
rounded once, by the store, to the gradient buffer's dtype. ``G`` may be ``Z`` itself: each
tile is read before it is overwritten by the same program. A row whose target equals
``ignore_index`` gets loss 0, lse 0 and torch's gradient of a row it does not count: 0,
or NaN throughout when the row's max is not finite (read once, written once); a
target outside ``[0, V)`` (and not ignored) gets a NaN loss and gradient (no device-to-host
check in the kernel).

Two launch variants, constexpr switches of the same source (``ce_row_source`` is the
row; :func:`.ops.ce_launch_config` chooses): ``REVERSE`` walks pass 2's tiles last to
first, so the tiles pass 1 read last, the freshest in L2, are re-read first;
``PERSISTENT`` launches a fixed grid of ``P`` programs (a multiple of the SM count) in
which program ``p`` serves rows ``p, p + P, p + 2P, ...``, so fewer rows are in flight
and a row's second read can hit L2. Without it, one program per row (grid ``N``).

``linear_lse_kernel`` / ``linear_grad_kernel``: the experimental fused linear head (no
logits buffer), described in :mod:`.fused_linear`.

``scale_kernel``: ``g *= go`` in place, ``go`` a device scalar or one value per row; a
program whose multiplier is exactly 1 returns without touching memory, so the usual
``loss.backward()`` costs nothing and needs no host synchronisation to find that out.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Any

# Bound by compiled(); referenced as globals by the kernel sources below.
tl: Any = None
triton: Any = None
_tanh: Any = None  # the jitted tanh_source
_ce_row: Any = None  # the jitted ce_row_source
_logits_block: Any = None  # the jitted logits_block_source

_cache: dict[tuple[int, bool], dict[str, Any]] = {}


def tanh_source(x, ACC: tl.constexpr):
    # tanh(|x|) = -expm1(-2|x|) / (2 + expm1(-2|x|)). Near 0, where e^u - 1 cancels,
    # expm1(u) = (e^u - 1) u / log(e^u) (Kahan: exact to a few ulps); for e^u <= 1/2 plain
    # e^u - 1 is within an ulp, also where e^u is subnormal and keeps few bits (a ratio
    # with log(e^u) there would be off by 1e-3). Written with exp and log only:
    # libdevice's tanh is not available to the interpreter.
    u = -2.0 * tl.abs(x)
    e = tl.exp(u)
    kahan = (e > 0.5) & (e < 1.0)
    em = tl.where(kahan, (e - 1.0) * u / tl.log(tl.where(kahan, e, 0.5)), e - 1.0)
    em = tl.where(e == 1.0, u, em)  # |u| below an ulp of 1: expm1(u) = u
    t = -em / (2.0 + em)
    return tl.where(x < 0, -t, t).to(ACC)


def ce_kernel(
    Z, stride_z, G, stride_g, Y, T, stride_t, W, PARAMS, SCALE, ROWMULT, LOSS, LSE,
    V, n_rows, ignore_index,
    PROB: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_ROWMULT: tl.constexpr,
    HAS_CAP: tl.constexpr, SMOOTH: tl.constexpr, ZLOSS: tl.constexpr, GRAD: tl.constexpr,
    ACC: tl.constexpr, BLOCK: tl.constexpr, REVERSE: tl.constexpr, PERSISTENT: tl.constexpr,
):
    # the options, loaded once per program (a persistent program serves many rows)
    eps = tl.load(PARAMS + 0)
    zl = tl.load(PARAMS + 1)
    cap = tl.load(PARAMS + 2)
    w_smooth = tl.load(PARAMS + 3)  # the smoothing's target mass (eps / V) sum_c w_c
    idle = tl.load(PARAMS + 4)  # 0, or NaN for a non-finite class weight
    scale = tl.load(SCALE)
    pid = tl.program_id(0).to(tl.int64)
    if PERSISTENT:
        # rows pid, pid + P, pid + 2P, ... (P = programs launched; none if pid >= n_rows);
        # the bounds promote the row index to int64
        for row in range(pid, n_rows, tl.num_programs(0)):
            _ce_row(row, Z, stride_z, G, stride_g, Y, T, stride_t, W, ROWMULT, LOSS, LSE,
                    V, ignore_index, eps, zl, cap, w_smooth, idle, scale, PROB, HAS_WEIGHT,
                    HAS_ROWMULT, HAS_CAP, SMOOTH, ZLOSS, GRAD, ACC, BLOCK, REVERSE)
    else:
        _ce_row(pid, Z, stride_z, G, stride_g, Y, T, stride_t, W, ROWMULT, LOSS, LSE,
                V, ignore_index, eps, zl, cap, w_smooth, idle, scale, PROB, HAS_WEIGHT,
                HAS_ROWMULT, HAS_CAP, SMOOTH, ZLOSS, GRAD, ACC, BLOCK, REVERSE)


def ce_row_source(
    row, Z, stride_z, G, stride_g, Y, T, stride_t, W, ROWMULT, LOSS, LSE,
    V, ignore_index, eps, zl, cap, w_smooth, idle, scale,
    PROB: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_ROWMULT: tl.constexpr,
    HAS_CAP: tl.constexpr, SMOOTH: tl.constexpr, ZLOSS: tl.constexpr, GRAD: tl.constexpr,
    ACC: tl.constexpr, BLOCK: tl.constexpr, REVERSE: tl.constexpr,
):
    # one row of ce_kernel (row: int64, so row * stride never wraps)
    zrow = Z + row * stride_z
    grow = G + row * stride_g
    cols = tl.arange(0, BLOCK)
    r = scale
    if HAS_ROWMULT:
        r = r * tl.load(ROWMULT + row).to(ACC)
    if PROB:
        valid = True
        y = tl.full((), -1, tl.int64)
        z_y = tl.full((), 0.0, ACC)
        w_y = tl.full((), 0.0, ACC)
        bad = tl.full((), 0.0, ACC)
        trow = T + row * stride_t
    else:
        y = tl.load(Y + row).to(tl.int64)
        valid = y != ignore_index
        in_range = (y >= 0) & (y < V)
        y_safe = tl.where(in_range, y, 0)
        z_y = tl.load(zrow + y_safe).to(ACC)
        if HAS_CAP:
            z_y = cap * _tanh(z_y / cap, ACC)
        if HAS_WEIGHT:
            w_y = tl.load(W + y_safe).to(ACC)
        else:
            w_y = tl.full((), 1.0, ACC)
        bad = tl.where(in_range, 0.0, float("nan")).to(ACC)  # NaN for a bad class index
        trow = T
    if valid:
        # pass 1: running max and sum of exponentials (and sum_c T_c)
        m = tl.full((), float("-inf"), ACC)
        s = tl.full((), 0.0, ACC)
        tsum = tl.full((), 0.0, ACC)
        for start in range(0, V, BLOCK):
            offs = start + cols
            mask = offs < V
            x = tl.load(zrow + offs, mask=mask, other=float("-inf")).to(ACC)
            if HAS_CAP:
                x = tl.where(mask, cap * _tanh(x / cap, ACC), float("-inf"))
            m_new = tl.maximum(m, tl.max(x, 0))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row of -inf so far
            s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe), 0)
            m = m_new
            if PROB:
                t = tl.load(trow + offs, mask=mask, other=0.0).to(ACC)
                if SMOOTH:
                    t = t * (1.0 - eps) + eps / V
                if HAS_WEIGHT:
                    t = t * tl.load(W + offs, mask=mask, other=0.0).to(ACC)
                tsum += tl.sum(tl.where(mask, t, 0.0), 0)
        m = tl.where(m == float("-inf"), 0.0, m)
        log_s = tl.log(s)
        lse = m + log_s
        inv_s = 1.0 / s
        # loss terms as (m - z_c) + log s, never (m + log s) - z_c: at |z| ~ 1e38 the
        # sum m + log s rounds to m and a loss of log 2 would come out 0
        if PROB:
            a = tsum
            loss = tl.full((), 0.0, ACC)
        else:
            if SMOOTH:
                a = (1.0 - eps) * w_y + w_smooth
            else:  # w_smooth unread: an unused class's inf/NaN weight stays out (0 x inf)
                a = w_y
            loss = (1.0 - eps) * w_y * ((m - z_y) + log_s) + bad
        if ZLOSS:
            a += 2.0 * zl * lse
            loss += zl * lse * lse
        target_mass = r * (1.0 - eps) * w_y
        # a NaN target term (a zero w_y over a zero "mean" denominator: 0 x 1/0) is NaN on
        # the whole row, as torch's log_softmax backward spreads its NaN at the target;
        # a p - c would leave the z-loss's and smoothing's inf off the target
        a = tl.where(target_mass != target_mass, target_mass, a * r + bad)
        if GRAD or SMOOTH or PROB:
            acc = tl.zeros((BLOCK,), ACC)  # loss terms T_c (lse - z_c), summed per lane
            last = ((V - 1) // BLOCK) * BLOCK
            for k in range(0, V, BLOCK):
                if REVERSE:  # last tile first: the tiles pass 1 read last are likeliest in L2
                    start = last - k
                else:
                    start = k
                offs = start + cols
                mask = offs < V
                x = tl.load(zrow + offs, mask=mask, other=0.0).to(ACC)
                if HAS_CAP:
                    th = _tanh(x / cap, ACC)
                    x = cap * th
                if HAS_WEIGHT:
                    wv = tl.load(W + offs, mask=mask, other=0.0).to(ACC)
                else:
                    wv = tl.full((BLOCK,), 1.0, ACC)
                if PROB:
                    t = tl.load(trow + offs, mask=mask, other=0.0).to(ACC)
                    if SMOOTH:
                        t = t * (1.0 - eps) + eps / V
                    t = t * wv
                    acc += tl.where(mask & (t != 0.0), t * ((m - x) + log_s), 0.0)
                elif SMOOTH:  # eps / V inside the sum: V terms near 3e38 would overflow
                    acc += tl.where(mask, (eps / V) * wv * ((m - x) + log_s), 0.0)
                if GRAD:
                    p = tl.exp(x - m) * inv_s
                    if PROB:
                        g = a * p - r * t
                    else:
                        g = a * p - tl.where(offs == y, target_mass, 0.0)
                        if SMOOTH:
                            g -= (r * eps / V) * wv
                    if HAS_CAP:
                        g = g * (1.0 - th * th)
                    tl.store(grow + offs, g, mask=mask)
            if PROB:
                loss += tl.sum(acc, 0)
            elif SMOOTH:
                loss += tl.sum(acc, 0)
        tl.store(LOSS + row, loss)
        tl.store(LSE + row, lse)
    else:
        tl.store(LOSS + row, tl.full((), 0.0, ACC))
        tl.store(LSE + row, tl.full((), 0.0, ACC))
        if GRAD:
            # torch's log_softmax backward of the row's zero upstream, 0 - exp(log p) x 0:
            # NaN throughout when the row's max is not finite (a NaN, a +inf, or every logit
            # -inf: log p is NaN somewhere), else 0. One read and one write, as a counted
            # row's floor; the rare NaN row is written again.
            zeros = tl.zeros((BLOCK,), ACC)
            if SMOOTH and HAS_WEIGHT:  # torch's 0 x w_c: NaN rows for a non-finite weight
                zeros += idle
            m = tl.full((), float("-inf"), ACC)
            odd = tl.full((), 0, tl.int32)  # NaN or +inf entries seen
            for start in range(0, V, BLOCK):
                offs = start + cols
                mask = offs < V
                x = tl.load(zrow + offs, mask=mask, other=float("-inf")).to(ACC)
                if HAS_CAP:  # c tanh(z / c) is finite for z = +-inf: only a NaN stays odd
                    x = tl.where(mask, cap * _tanh(x / cap, ACC), float("-inf"))
                odd += tl.sum(((x != x) | (x == float("inf"))).to(tl.int32), 0)
                m = tl.maximum(m, tl.max(x, 0))
                tl.store(grow + offs, zeros, mask=mask)
            if (odd > 0) | (m == float("-inf")):
                nans = tl.full((BLOCK,), float("nan"), ACC)
                for start in range(0, V, BLOCK):
                    offs = start + cols
                    tl.store(grow + offs, nans, mask=offs < V)


def scale_kernel(X, stride_x, GO, ncols, tiles, PER_ROW: tl.constexpr, ACC: tl.constexpr,
                 BLOCK: tl.constexpr):
    # one program per (row, column tile), flattened on grid axis 0 (the others are
    # limited to 65535 programs on CUDA)
    pid = tl.program_id(0).to(tl.int64)
    row = pid // tiles
    tile = pid % tiles
    if PER_ROW:
        go = tl.load(GO + row).to(ACC)
    else:
        go = tl.load(GO).to(ACC)
    if go != 1.0:
        offs = tile * BLOCK + tl.arange(0, BLOCK)
        mask = offs < ncols
        ptr = X + row * stride_x + offs
        x = tl.load(ptr, mask=mask, other=0.0).to(ACC)
        tl.store(ptr, x * go, mask=mask)


def logits_block_source(X, W, B, rows, cols, rmask, cmask, stride_x, stride_w, D,
                        HAS_BIAS: tl.constexpr, FP32: tl.constexpr, UPCAST: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # (BLOCK_M x BLOCK_N) block of x W^T (+ b), float32 accumulation, never stored.
    # UPCAST (interpreter only: its dot mishandles bfloat16) multiplies exact float32
    # copies of the low-precision tiles.
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < D
        xt = tl.load(X + rows[:, None] * stride_x + ks[None, :],
                     mask=rmask[:, None] & kmask[None, :], other=0.0)
        wt = tl.load(W + cols[:, None] * stride_w + ks[None, :],
                     mask=cmask[:, None] & kmask[None, :], other=0.0)
        if UPCAST:
            xt = xt.to(tl.float32)
            wt = wt.to(tl.float32)
        if FP32 or UPCAST:
            acc = tl.dot(xt, tl.trans(wt), acc, input_precision="ieee")
        else:
            acc = tl.dot(xt, tl.trans(wt), acc)
    if HAS_BIAS:
        acc += tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    return acc


def linear_lse_kernel(
    X, W, B, Y, M_OUT, S_OUT, ZY_OUT, M, V, D, stride_x, stride_w, tiles_per_split,
    HAS_BIAS: tl.constexpr, FP32: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # grid (row tiles, vocabulary splits): running (max, sum exp) of this split's logits
    # and the target logit if it falls in the split; combined on the host side
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    rows64 = rows.to(tl.int64)
    y = tl.load(Y + rows, mask=rmask, other=-1).to(tl.int64)
    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_M,), tl.float32)
    zy = tl.zeros((BLOCK_M,), tl.float32)
    first = split * tiles_per_split
    for t in range(first, first + tiles_per_split):
        cols = t * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < V
        z = _logits_block(X, W, B, rows64, cols.to(tl.int64), rmask, cmask, stride_x,
                          stride_w, D, HAS_BIAS, FP32, UPCAST, BLOCK_M, BLOCK_N, BLOCK_K)
        z = tl.where(cmask[None, :], z, float("-inf"))
        zy += tl.sum(tl.where(cols[None, :] == y[:, None], z, 0.0), 1)
        m_new = tl.maximum(m, tl.max(z, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(z - m_safe[:, None]), 1)
        m = m_new
    out = split * M + rows64
    tl.store(M_OUT + out, m, mask=rmask)
    tl.store(S_OUT + out, s, mask=rmask)
    tl.store(ZY_OUT + out, zy, mask=rmask)


def linear_grad_kernel(
    X, W, B, Y, LSE, COEF_P, COEF_Y, DX, DW, DB, M, V, D, stride_x, stride_w,
    HAS_BIAS: tl.constexpr, NEED_X: tl.constexpr, NEED_W: tl.constexpr,
    NEED_B: tl.constexpr, FP32: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # grid (row tiles, vocabulary tiles): G = COEF_P p - COEF_Y onehot(y) for the block,
    # recomputed from x and W, then dx += G W, dW += G^T x, db += sum G (float32 atomics)
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < M
    cmask = cols < V
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)
    z = _logits_block(X, W, B, rows64, cols64, rmask, cmask, stride_x, stride_w, D,
                      HAS_BIAS, FP32, UPCAST, BLOCK_M, BLOCK_N, BLOCK_K)
    y = tl.load(Y + rows, mask=rmask, other=-1).to(tl.int64)
    lse = tl.load(LSE + rows, mask=rmask, other=0.0)
    a = tl.load(COEF_P + rows, mask=rmask, other=0.0)
    c = tl.load(COEF_Y + rows, mask=rmask, other=0.0)
    g = a[:, None] * tl.exp(z - lse[:, None]) - tl.where(cols64[None, :] == y[:, None],
                                                         c[:, None], 0.0)
    # rows with no coefficient (ignored ones) add nothing, also where their p is not finite
    g = tl.where(rmask[:, None] & cmask[None, :] & ((a != 0.0) | (c != 0.0))[:, None], g, 0.0)
    if NEED_B:
        tl.atomic_add(DB + cols64, tl.sum(g, 0), mask=cmask)
    gm = g.to(X.dtype.element_ty)  # the gradient block, rounded once
    if UPCAST:
        gm = gm.to(tl.float32)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < D
        if NEED_X:
            wt = tl.load(W + cols64[:, None] * stride_w + ks[None, :],
                         mask=cmask[:, None] & kmask[None, :], other=0.0)
            if UPCAST:
                wt = wt.to(tl.float32)
            if FP32 or UPCAST:
                part = tl.dot(gm, wt, input_precision="ieee")
            else:
                part = tl.dot(gm, wt)
            tl.atomic_add(DX + rows64[:, None] * D + ks[None, :], part,
                          mask=rmask[:, None] & kmask[None, :])
        if NEED_W:
            xt = tl.load(X + rows64[:, None] * stride_x + ks[None, :],
                         mask=rmask[:, None] & kmask[None, :], other=0.0)
            if UPCAST:
                xt = xt.to(tl.float32)
            if FP32 or UPCAST:
                part_w = tl.dot(tl.trans(gm), xt, input_precision="ieee")
            else:
                part_w = tl.dot(tl.trans(gm), xt)
            tl.atomic_add(DW + cols64[:, None] * D + ks[None, :], part_w,
                          mask=cmask[:, None] & kmask[None, :])


def interpreting() -> bool:
    """Whether ``triton.jit`` currently builds interpreted (CPU) kernels."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


# triton's interpreter is not thread-safe: while an interpreted kernel runs it rebinds
# triton.language's functions and keeps the grid in one builder for the process, and the
# compiled() functions here rebind their modules' globals. Every interpreted launch of a
# crossent kernel (with its compiled() look-up) holds this one lock; compiled launches run
# concurrently. Reentrant: a launch inside a launching() block does not deadlock.
_interpreter_lock = threading.RLock()


def launching() -> contextlib.AbstractContextManager[Any]:
    """The context every launch of a crossent Triton kernel runs in (``with
    launching(): compiled()[name][grid](...)``): under the interpreter, the process-wide
    lock that serialises interpreted launches (two threads at once would corrupt each
    other's kernels); compiled, nothing."""
    return _interpreter_lock if interpreting() else contextlib.nullcontext()


def compiled() -> dict[str, Any]:
    """The jitted kernels for the triton module imported now and the current mode."""
    global tl, triton, _tanh, _ce_row, _logits_block
    import triton as _triton
    import triton.language as _tl

    key = (id(_triton), interpreting())
    if key not in _cache:
        jit = _triton.jit
        _helpers[key] = (_tl, _triton, jit(tanh_source), jit(ce_row_source),
                         jit(logits_block_source))
        _cache[key] = {
            "ce": jit(ce_kernel),
            "scale": jit(scale_kernel),
            "linear_lse": jit(linear_lse_kernel),
            "linear_grad": jit(linear_grad_kernel),
            "next_power_of_2": _triton.next_power_of_2,
        }
    # bound on every look-up, not only the first: the kernels find them as globals
    tl, triton, _tanh, _ce_row, _logits_block = _helpers[key]
    if key[1]:
        adopt_interpreter_globals(globals(), _OWN_NAMES)
    return _cache[key]


def adopt_interpreter_globals(namespace: dict[str, Any], own: frozenset[str]) -> None:
    """Bind the current interpreter's helpers in a kernel module's ``namespace`` (whose
    own names are ``own``), before an interpreted launch of its kernels."""
    # triton's interpreter runs a kernel (and each jitted function it calls) as a rewritten
    # copy executed in this module's namespace, first adding its own helpers
    # (interpreter_semantic, ...) to it, but only where a name is missing. After a test
    # re-imports triton, the first interpreter's helpers would stay, and every assignment
    # in a kernel would make a tensor of the old triton.language ("Did you forget to add
    # @triton.jit ?"). So the current interpreter's are bound on every launch.
    import importlib

    interpreter = importlib.import_module("triton.runtime.interpreter")
    for name, value in vars(interpreter).items():
        if name not in own and not (name.startswith("__") and name.endswith("__")):
            namespace[name] = value


_helpers: dict[tuple[int, bool], tuple[Any, ...]] = {}
# this module's own names (the interpreter's additions are the others)
_OWN_NAMES = frozenset(globals()) | {"_OWN_NAMES"}
