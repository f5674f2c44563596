"""Row-blocked softmax cross-entropy kernels: loss and gradient in one pass over the logits.

The logits ``z`` are a 2-D ``(M, C)`` tensor (class axis last, rows contiguous). They are
processed a block of rows at a time, the block small enough to stay in cache, so every
logit is read from memory once and every gradient entry written once:

1. ``m = max(z_b)`` per row and the target logit ``z_y`` (gathered before anything is
   overwritten); for a converted low-precision block on CPU without smoothing or softcap
   the max is skipped (``lse = z_y - log p_y``) and taken only for rows whose ``p_y``
   underflows,
2. ``p = softmax(z_b)`` into the destination (the gradient buffer, or ``z`` itself),
3. ``lse = z_y - log p_y`` (or ``m - log max p`` where ``p_y`` underflows),
   ``loss = lse - z_y`` (+ smoothing and z-loss terms),
4. ``g = a * p - b * w - c * onehot(y)`` with per-row float32 scalars, in place.

All arithmetic is float32 (float64 for float64 input, so gradcheck works); a bfloat16 or
float16 block is converted into a float32 work buffer first and the finished float32
gradient (true-class ``p - 1`` included) is rounded once when copied out (PITFALLS 6).
That is the whole gradient for ``grad_output == 1`` (``loss.backward()``); any other
``grad_output`` multiplies the stored low-precision gradient in backward, a second
rounding (``reduction="none"`` in the linear head scales in float32 instead: one).
Semantics are ``torch.nn.functional.cross_entropy``'s plus crossent's ``z_loss`` and
``softcap`` (see :func:`crossent.softmax_cross_entropy`). Block size, compute dtype,
:class:`~._rules.Options` and :class:`~._rules.Rows` follow :mod:`._rules`;
:mod:`._cross_entropy` and :mod:`._linear` call :func:`cross_entropy_rows`.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable

import torch

from . import _inductor
from ._blockpool import run_row_blocks
from ._rules import Options, Rows, block_rows, compute_dtype, idle_rows_nan

_TINY = 1e-30  # p_y below this: lse from the row max instead


def _workspace(rows: int, cols: int, like: torch.Tensor) -> torch.Tensor:
    return torch.empty((rows, cols), dtype=compute_dtype(like.dtype), device=like.device)


def _finish(m, z_y, p_y, p_max):
    """``(lse, nll, lse - m)`` per row from the row max ``m``, the target logit ``z_y``, and
    ``p_y``, ``max_c p_c`` of ``p = softmax(z)``, without re-reading ``z``.

    ``nll = -log p_y`` (as precise as ``log_softmax``) and ``lse - m = (z_y - m) + nll``
    where ``p_y`` is a normal float; elsewhere (an underflowed or -inf target logit)
    ``lse - m = -log max_c p_c``, exact because ``max_c p_c >= 1/C`` never underflows.
    """
    nll = -p_y.log()
    fix = ~(p_y >= _TINY)  # NaN too
    fixed = -p_max.log()
    shift = torch.where(fix, fixed, (z_y - m) + nll)
    nll = torch.where(fix, (m - z_y) + fixed, nll)
    return m + shift, nll, shift


Observer = Callable[[str, int, int, torch.Tensor], None]


def cross_entropy_rows(
    z: torch.Tensor,
    target: torch.Tensor,
    rows: Rows,
    opts: Options,
    grad: torch.Tensor | None = None,
    *,
    start: int = 0,
    row_multiplier: torch.Tensor | None = None,
    block: int | None = None,
    lse_out: torch.Tensor | None = None,
    observe: Observer | None = None,
) -> torch.Tensor:
    """Per-row losses (compute dtype, (M,)) of logits ``z`` ((M, C), contiguous rows).

    ``target`` and ``rows`` describe rows ``start .. start + M`` of the whole batch (the
    linear kernel calls this chunk by chunk). When ``grad`` ((M, C), any float dtype,
    ``grad is z`` allowed: the logits are then overwritten) is given, it receives
    ``d(reduced loss)/dz`` (``row_multiplier`` (M,) scales each row further: the
    ``grad_output`` of ``reduction="none"``). Ignored rows give loss 0 and gradient 0
    (NaN where their softmax is NaN, a NaN or +inf logit or all -inf, as torch's).
    The per-block work is a handful of tensor operations; the per-row bookkeeping is
    done once for all rows, before and after the blocks. On CPU the blocks are shared
    out to worker threads, each running its block's operations single-threaded
    (:mod:`._blockpool`): the same operations on the same rows, so the same bits.

    ``lse_out`` ((M,), compute dtype) receives each row's ``logsumexp`` (of the capped
    logits with ``softcap``; index targets only). ``observe(phase, i, j, block)`` is
    called for every block of rows ``i .. j`` (of this call), possibly from several
    threads at once: with ``phase="logits"`` and the block's compute-dtype logits
    (softcapped) before the softmax, then with ``phase="probs"`` and its softmax, before
    the gradient overwrites it. Both tensors are only valid during the call.
    """
    num_rows, num_classes = z.shape
    block = block or block_rows(num_classes, z.device)
    eps, cap, zl = float(opts.label_smoothing), opts.softcap, float(opts.z_loss)
    w = opts.weight
    prob = rows.index is None
    inplace = grad is not None and grad.data_ptr() == z.data_ptr()
    cdtype = compute_dtype(z.dtype)
    dev = z.device
    convert = z.dtype != cdtype or cap is not None
    in_work = convert and not prob  # softmax in place in the float32 work buffer
    need_p = not in_work and (grad is None or grad.dtype != cdtype or (prob and inplace
                                                                       and not convert))
    # The row max is only needed where p_y underflows (found after the softmax; then read
    # from the untouched source rows), except for smoothing, which needs it for every row.
    # Where the block is converted anyway, skipping it saves a pass; elsewhere it is the
    # pass that brings the block into cache, so it costs nothing.
    lazy_max = in_work and cap is None and not eps and dev.type == "cpu"
    size = min(block, num_rows)
    w64 = None if w is None else w.double()
    w_sum = float(num_classes) if w64 is None else float(w64.sum())
    exact_smooth = bool(eps) and not math.isfinite(w_sum)  # a class weight inf or NaN
    # the smoothing's target mass (eps / C) sum_c w_c, each term scaled before the sum: finite
    # weights whose plain sum overflows keep torch's finite gradient
    w_smooth = eps if w64 is None or not eps else float((w64 * (eps / num_classes)).sum())
    nan_idle = exact_smooth and idle_rows_nan(w, eps)  # rows with scale 0: NaN, as torch's
    sel = slice(start, start + num_rows)
    m = torch.empty(num_rows, dtype=cdtype, device=dev)
    p_max = torch.ones(num_rows, dtype=cdtype, device=dev)
    losses = torch.empty(num_rows, dtype=cdtype, device=dev)
    if not prob:
        index, target_mass, valid = rows.index, rows.target_mass, rows.valid
        assert index is not None and target_mass is not None and valid is not None
        y = index[sel].unsqueeze(1)
        z_y = torch.empty((num_rows, 1), dtype=cdtype, device=dev)
        p_y = torch.empty((num_rows, 1), dtype=cdtype, device=dev)
        gap = torch.empty(num_rows if eps else 0, dtype=torch.float64, device=dev)
        mass = target_mass[sel]
        counted_rows = valid[sel]
        # (without smoothing W is not read: an unused class's inf/NaN weight stays out)
        t_sum = mass + w_smooth if eps else mass
    if grad is not None:
        rs = rows.scale[sel]
        if row_multiplier is not None:  # an ignored row's 0 stays 0 under a NaN/inf multiplier
            rs = torch.where(rs != 0, rs * row_multiplier, 0.0)
        counted = rs != 0  # ignored rows: gradient exactly 0, even if their lse is NaN
        if not prob:
            # a row of scale 0 is 0 x (its target's weight): NaN for an infinite w_y, as
            # torch's whole-row NaN (its nll backward forms 0 x w_y, spread by log_softmax)
            a = torch.where(counted, rs * t_sum, 0.0 * mass).unsqueeze(1)
            c = (-rs * mass).unsqueeze(1)
            d = (-eps / num_classes) * rs.unsqueeze(1)
    if (not prob and not eps and not zl and cap is None and observe is None
            and lse_out is None and _inductor.serves(z, grad)):
        # opt-in (crossent.torch.set_compiled_kernel): one generated C++ loop per block
        _, _, nll = _inductor.softmax_grad_rows(z, y[:, 0], a[:, 0], c[:, 0], out=grad)
        return torch.where(counted_rows, mass * nll, 0.0)
    local = threading.local()  # each worker thread's own block buffers

    def buffers() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        made = getattr(local, "buffers", None)
        if made is None:  # buffers a configuration does not use are empty (0 rows)
            made = local.buffers = (_workspace(size if convert else 0, num_classes, z),
                                    _workspace(size if need_p else 0, num_classes, z),
                                    _workspace(size if cap is not None else 0, num_classes, z))
        return made

    def one_block(i: int, j: int) -> None:
        work, pbuf, tanh = buffers()
        n = j - i
        zb = z[i:j]
        if convert:
            if cap is not None:
                t = tanh[:n]
                t.copy_(zb).div_(cap).tanh_()
                zb = torch.mul(t, cap, out=work[:n])
            else:
                zb = work[:n].copy_(zb)
        if not lazy_max:
            torch.amax(zb, 1, out=m[i:j])
        if not prob:
            yb = y[i:j]
            torch.gather(zb, 1, yb, out=z_y[i:j])
            if lazy_max:  # lse = z_y + nll exactly where p_y is normal: m = z_y there
                m[i:j] = z_y[i:j, 0]
            if eps:  # sum_c w_c (m - z_c) in float64 (each term >= 0); with a non-finite
                # class weight torch's sum_c w_c (lse - z_c) itself (an extra pass), whose
                # W (lse - m) + ... split would be inf - inf or 0 x inf
                mb = (torch.logsumexp(zb, 1) if exact_smooth else m[i:j]).double()
                gap[i:j] = (num_classes * mb - zb.sum(1, dtype=torch.float64) if w64 is None
                            else (mb.unsqueeze(1) - zb.double()) @ w64)
        else:
            tb = target[start + i : start + j].to(cdtype)
            if eps:
                tb = tb.mul(1.0 - eps).add_(eps / num_classes)
            if w is not None:
                tb = tb.mul(w)
        if observe is not None:
            observe("logits", i, j, zb)
        if in_work:
            dest = work[:n]
        elif need_p or grad is None:
            dest = pbuf[:n]
        else:
            dest = grad[i:j]
        torch.ops.aten._softmax.out(zb, 1, False, out=dest)
        if observe is not None:
            observe("probs", i, j, dest)
        if prob:
            torch.amax(dest, 1, out=p_max[i:j])
            shift = -p_max[i:j].log()
            logp = (zb - m[i:j].unsqueeze(1)).sub_(shift.unsqueeze(1))
            losses[i:j] = -torch.where(tb == 0, 0.0, tb * logp).sum(1)
            if zl:
                losses[i:j] += zl * (m[i:j] + shift).square()
        else:
            torch.gather(dest, 1, yb, out=p_y[i:j])
            if dev.type != "cpu":  # no host sync on accelerators
                torch.amax(dest, 1, out=p_max[i:j])
            else:
                bad = ~(p_y[i:j, 0] >= _TINY)
                if bool(bad.any()):
                    idx = bad.nonzero().squeeze(1)
                    p_max[i + idx] = dest[idx].amax(1)
                    if lazy_max:  # the source rows are intact until the copy-out below
                        m[i + idx] = z[i:j][idx].amax(1).to(cdtype)
        if grad is None:
            return
        g = dest
        if prob:
            t_sum_b = tb.sum(1)
            if zl:
                t_sum_b = t_sum_b + 2.0 * zl * (m[i:j] + shift)
            a_b = torch.where(counted[i:j], rs[i:j] * t_sum_b, 0.0).unsqueeze(1)
            g.mul_(a_b).addcmul_(tb, rs[i:j].unsqueeze(1), value=-1.0)
        else:
            a_b = a[i:j]
            if zl:
                lse, _, _ = _finish(m[i:j], z_y[i:j, 0], p_y[i:j, 0], p_max[i:j])
                a_b = a_b + torch.where(counted[i:j], (2.0 * zl) * lse * rs[i:j], 0.0)[:, None]
            if eps and w is not None:
                g.mul_(a_b).addr_(rs[i:j], w, alpha=-eps / num_classes)
            elif eps:
                torch.addcmul(d[i:j], g, a_b, out=g)
            else:
                g.mul_(a_b)
            g.scatter_add_(1, yb, c[i:j])
            if nan_idle:
                g.masked_fill_((rs[i:j] == 0).unsqueeze(1), math.nan)
        if cap is not None:  # d(c tanh(x/c))/dx = 1 - tanh^2, as a factor (an infinite g
            # stays infinite: g - g tanh^2 would be inf - inf)
            t = tanh[:n]
            g.mul_(t.mul_(t).neg_().add_(1.0))
        if g.data_ptr() != grad[i:j].data_ptr():
            # measured on CPU (32 x 32000 bfloat16 block, one thread): mul_ + copy_ 370 us,
            # torch.mul(g, a, out=bfloat16) 660 us; scatter_ into bfloat16 300 us, into the
            # float32 block 4 us: so the block is finished in float32, then rounded once
            grad[i:j].copy_(g)

    run_row_blocks(one_block, num_rows, block, dev)
    if not prob:
        lse, nll, shift = _finish(m, z_y[:, 0], p_y[:, 0], p_max)
        if lse_out is not None:  # an infinite row max is the logsumexp (torch's value)
            lse_out.copy_(torch.where(m.isinf(), m, lse))
        losses = mass * nll
        if eps:  # sum_c w_c (lse - z_c) = W (lse - m) + sum_c w_c (m - z_c), W = sum_c w_c
            smooth = gap if exact_smooth else w_sum * shift.double() + gap
            losses = losses + (eps / num_classes) * smooth.to(cdtype)
        if zl:
            losses = losses + zl * lse.square()
        losses = torch.where(counted_rows, losses, 0.0)
    return losses

