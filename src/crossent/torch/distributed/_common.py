"""Shared pieces of the vocab-parallel losses: the group layout, the per-row partial
statistics of one rank's class slice, their exchange (one all-reduce MAX, one all-reduce
SUM), the global per-row loss and the gradient of a block of local logits.

Notation (per row ``n``; ``V`` classes in all, rank ``r`` holds ``[s_r, s_r + V_r)``):
``M_n = max_c z_nc`` (global), ``S_n = sum_c exp(z_nc - M_n)``, ``lse_n = M_n + log S_n``,
``w_y`` the class weight of the target (1 without weights), ``W = sum_c w_c`` (``V``
without weights), ``eps`` the label smoothing, ``zeta`` the z-loss coefficient.
Row loss (counted rows; PyTorch's formula, see :func:`crossent.softmax_cross_entropy`)::

    l_n = A_n lse_n - (1 - eps) w_y z_ny - (eps / V) sum_c w_c z_nc + zeta lse_n^2,
    A_n = (1 - eps) w_y + (eps / V) W,

and its gradient ``dl_n/dz_nc = p_nc (A_n + 2 zeta lse_n) - (eps / V) w_c
- (1 - eps) w_y [c = y_n]`` with ``p_nc = exp(z_nc - lse_n)``: every term is either local
to the slice or a per-row scalar, so backward needs no communication.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .._kernels import check_options

_BLOCK_ELEMS = 1 << 20  # logits per row block: 4 MiB of float32 temporaries
_EXACT = 1 << 24  # integers below this are exact in float32
_CHECKSUM_MOD = 8388593  # a prime below 2**23: target checksums stay exact in float32


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64 (reference checks, gradcheck); everything else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def block_rows(cols: int) -> int:
    return max(1, _BLOCK_ELEMS // max(cols, 1))


@dataclass
class Spec:
    """The loss options; they must be the same on every rank of the group."""

    ignore_index: int
    label_smoothing: float
    z_loss: float
    weight: torch.Tensor | None  # (V_r,) compute dtype: this rank's slice of the class weights
    reduction: str
    num_items: torch.Tensor | float | None
    weight_total: float = 0.0  # sum_c w_c over all V classes, set by the first exchange
    num_classes: int = 0  # V, set by the first exchange


@dataclass
class Layout:
    group: object
    rank: int
    world: int
    start: int  # first global class id of this rank's slice
    size: int  # V_r, classes on this rank
    even: bool  # vocab_start was None: slices assumed equal, checked

    @property
    def communicate(self) -> bool:
        return self.world > 1


def make_layout(group, local_classes: int, vocab_start: int | None) -> Layout:
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        if rank < 0:
            raise ValueError("this process is not a member of the given process group")
    elif group is not None:
        raise ValueError("a group was given but torch.distributed is not initialized")
    else:
        rank, world = 0, 1
    start = rank * local_classes if vocab_start is None else int(vocab_start)
    return Layout(group, rank, world, start, int(local_classes), vocab_start is None)


def make_spec(ignore_index, label_smoothing, z_loss, weight, reduction, num_items, like,
              local_classes) -> tuple[Spec, str | None]:
    """Check the options; a problem local to this rank (its weight slice) is returned as a
    message, not raised, so that every rank can raise together after the first collective."""
    check_options(reduction, label_smoothing, z_loss, None)
    if num_items is not None and reduction != "sum":
        raise ValueError("num_items divides the summed loss: use it with reduction='sum'")
    problem = None
    if weight is not None:
        if tuple(weight.shape) != (local_classes,):
            problem = (f"weight has shape {tuple(weight.shape)}; expected ({local_classes},), "
                       f"this rank's slice of the per-class weights")
            weight = None
        else:
            weight = weight.detach().to(device=like.device, dtype=compute_dtype(like.dtype))
    if isinstance(num_items, torch.Tensor):
        num_items = num_items.detach().to(device=like.device, dtype=compute_dtype(like.dtype))
    elif num_items is not None:
        num_items = float(num_items)
    spec = Spec(int(ignore_index), float(label_smoothing), float(z_loss), weight, reduction,
                num_items)
    return spec, problem


def check_target(target: torch.Tensor, rows: int) -> str | None:
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        return f"target must hold integer class ids, got {target.dtype}"
    if target.numel() != rows:
        return f"target has {target.numel()} entries but the logits have {rows} rows"
    return None


@dataclass
class Partials:
    """One rank's per-row partial statistics over its class slice (compute dtype, (n,))."""

    m: torch.Tensor  # local row max
    s: torch.Tensor  # sum_c exp(z_c - m_safe) over the slice
    zy: torch.Tensor  # w_y z_y if this rank owns y_n, else 0
    wy: torch.Tensor | None  # w_y if this rank owns y_n, else 0 (weighted only)
    smooth: torch.Tensor | None  # sum_c w_c z_c over the slice (label smoothing only)

    @staticmethod
    def empty(n: int, spec: Spec, dtype, device) -> Partials:
        def z():
            return torch.zeros(n, dtype=dtype, device=device)
        return Partials(torch.full((n,), -math.inf, dtype=dtype, device=device), z(), z(),
                        z() if spec.weight is not None else None,
                        z() if spec.label_smoothing else None)

    def fill(self, i: int, z: torch.Tensor, y: torch.Tensor, valid: torch.Tensor,
             lay: Layout, spec: Spec) -> None:
        """Rows ``i:i+len(z)`` from the compute-dtype logits block ``z`` ``(b, V_r)``."""
        j = i + z.shape[0]
        if z.shape[1] == 0:
            return
        m = z.amax(dim=1)
        m_safe = torch.where(m == -math.inf, 0.0, m)
        self.m[i:j] = m
        self.s[i:j] = torch.exp(z - m_safe[:, None]).sum(dim=1)
        own = valid & (y >= lay.start) & (y < lay.start + lay.size)
        idx = torch.where(own, y - lay.start, 0)
        z_y = z.gather(1, idx[:, None]).squeeze(1)
        if spec.weight is not None:
            assert self.wy is not None  # empty() allocates wy exactly when weighted
            w_y = torch.where(own, spec.weight[idx], 0.0)
            self.wy[i:j] = w_y
            self.zy[i:j] = torch.where(w_y == 0, 0.0, w_y * z_y)
        else:
            self.zy[i:j] = torch.where(own, z_y, 0.0)
        if self.smooth is not None:
            if spec.weight is None:
                self.smooth[i:j] = z.sum(dim=1)
            else:
                w = spec.weight[None, :]
                self.smooth[i:j] = torch.where(w == 0, 0.0, z * w).sum(dim=1)


@dataclass
class RowStats:
    """Global per-row results after the exchange (compute dtype, (n,))."""

    loss: torch.Tensor  # l_n, 0 on ignored rows
    lse: torch.Tensor
    coef: torch.Tensor  # A_n + 2 zeta lse_n: multiplies p in the gradient
    wy: torch.Tensor  # w_y on counted rows, 0 on ignored ones
    num_classes: int  # V


def _all_reduce(buf: torch.Tensor, op, lay: Layout) -> None:
    # Looked up at call time (dist.all_reduce), so tests can wrap and count it.
    dist.all_reduce(buf, op=op, group=lay.group)


def exchange(part: Partials, valid: torch.Tensor, lay: Layout, spec: Spec,
             problem: str | None, check: torch.Tensor | None) -> RowStats:
    """Two all-reduces: MAX of ``[m_n..., checks]``, then SUM of ``[S_n..., (w_y z_y)_n...,
    (w_y)_n... if weighted, (sum_c w_c z_c)_n... if smoothing, checks]``.

    ``valid`` marks the counted rows of this block. ``check`` (the whole flat target, given
    on the first exchange of a call) adds the consistency scalars (an error flag, the slice
    layout, the target range and a checksum of the target), checked identically on every
    rank after each collective, so a bad input raises on all ranks together instead of
    hanging the others.
    """
    dtype, device = part.m.dtype, part.m.device
    n = part.m.shape[0]
    first = check is not None
    # ---- all-reduce MAX: row maxima (+ checks)
    extra_max = []
    if check is not None:  # the first exchange of a call (same test as `first`)
        flag = float(lay.rank + 1) if problem else 0.0
        y = check
        yv = y[y != spec.ignore_index]
        if yv.numel():
            tmax = yv.max().clamp(max=_EXACT).to(dtype)
            tmin = yv.min().clamp(min=-_EXACT).to(dtype)
        else:
            tmax = torch.tensor(-1.0, dtype=dtype, device=device)
            tmin = torch.tensor(0.0, dtype=dtype, device=device)
        check = (y.sum() % _CHECKSUM_MOD).to(dtype) if y.numel() else tmin * 0
        end = float(lay.start + lay.size)
        consts = torch.tensor([flag, end, -float(lay.start), float(lay.size), -float(lay.size)],
                              dtype=dtype, device=device)
        extra_max = [consts, torch.stack([tmax, -tmin, check, -check])]
    buf = torch.cat([part.m, *extra_max]) if extra_max else part.m.clone()
    if lay.communicate:
        _all_reduce(buf, dist.ReduceOp.MAX, lay)
    m_global = buf[:n]
    num_classes = spec.num_classes
    if first:
        flag, end, neg_start, vmax, neg_vmin, tmax, neg_tmin, check, neg_check = (
            buf[n:].tolist())
        if flag:
            if problem:
                raise ValueError(problem)
            raise ValueError(f"rank {int(flag) - 1} of the group reported invalid input "
                             f"(its error says which); every rank stops")
        num_classes = spec.num_classes = int(end)
        if neg_start != 0:
            raise ValueError(f"the class slices must start at 0; the smallest vocab_start "
                             f"is {int(-neg_start)}")
        if lay.even and vmax != -neg_vmin:
            raise ValueError(f"the ranks hold different numbers of classes ({int(-neg_vmin)} "
                             f"to {int(vmax)}): pass vocab_start for an uneven split")
        if tmax >= num_classes or neg_tmin > 0:
            bad = int(tmax) if tmax >= num_classes else int(-neg_tmin)
            raise ValueError(f"target holds class index {bad}, outside [0, {num_classes}) "
                             f"and not ignore_index={spec.ignore_index}")
        if check != -neg_check:
            raise ValueError("target differs across the ranks of the group; every rank must "
                             "pass the same global class ids")
    # ---- all-reduce SUM: rescaled exp-sums, target logits, weights, smoothing sums
    m_safe = torch.where(part.m == -math.inf, 0.0, part.m)
    g_safe = torch.where(m_global == -math.inf, 0.0, m_global)
    s = torch.where(part.s > 0, part.s * torch.exp(m_safe - g_safe), 0.0)
    cols = [s, part.zy]
    if part.wy is not None:
        cols.append(part.wy)
    if part.smooth is not None:
        cols.append(part.smooth)
    extra_sum = []
    if first:
        wsum = spec.weight.sum() if spec.weight is not None else torch.zeros((), dtype=dtype,
                                                                            device=device)
        extra_sum = [torch.stack([torch.tensor(float(lay.size), dtype=dtype, device=device),
                                  wsum.to(dtype)])]
    buf = torch.cat([*cols, *extra_sum])
    if lay.communicate:
        _all_reduce(buf, dist.ReduceOp.SUM, lay)
    k = len(cols)
    got = buf[: k * n].view(k, n)
    if first:
        total, wsum = buf[k * n:].tolist()
        if int(total) != num_classes:
            raise ValueError(f"the class slices hold {int(total)} classes in all but the "
                             f"largest ends at {num_classes}: they overlap or leave a gap")
        spec.weight_total = wsum
    return _finish(m_global, got, part, valid, num_classes, spec)


def _finish(m, got, part, valid, num_classes, spec) -> RowStats:
    eps, zeta = spec.label_smoothing, spec.z_loss
    s, zy = got[0], got[1]
    col = 2
    if part.wy is not None:
        wy = got[col]
        col += 1
    else:
        wy = valid.to(s.dtype)
    smooth = got[col] if part.smooth is not None else None
    m_safe = torch.where(m == -math.inf, 0.0, m)
    lse = m_safe + torch.log(s)
    wtot = float(num_classes) if spec.weight is None else spec.weight_total
    a = (1.0 - eps) * wy
    if eps:
        a = a + (eps / num_classes) * wtot
    loss = a * lse - (1.0 - eps) * zy
    if smooth is not None:
        loss = loss - (eps / num_classes) * smooth
    coef = a
    if zeta:
        loss = loss + zeta * lse * lse
        coef = a + (2.0 * zeta) * lse
    loss = torch.where(valid, loss, 0.0)
    return RowStats(loss, lse, coef, torch.where(valid, wy, 0.0), num_classes)


def grad_block(z: torch.Tensor, y: torch.Tensor, valid: torch.Tensor, lse: torch.Tensor,
               coef: torch.Tensor, scale: torch.Tensor, lay: Layout, spec: Spec,
               num_classes: int) -> torch.Tensor:
    """``d loss / d z`` for a compute-dtype block ``z`` ``(b, V_r)``; ``scale`` ``(b,)`` is
    ``d(reduced loss)/d l_n`` (0 on ignored rows). Written into ``z`` (a work buffer)."""
    eps = spec.label_smoothing
    scale = torch.where(valid, scale, 0.0)
    g = z.sub_(lse[:, None]).exp_().mul_((coef * scale)[:, None])
    if eps:
        w = spec.weight if spec.weight is not None else 1.0
        g.sub_((eps / num_classes) * scale[:, None] * w)
    own = valid & (y >= lay.start) & (y < lay.start + lay.size)
    rows = own.nonzero().squeeze(1)
    if rows.numel():
        cls = y[rows] - lay.start
        w_y = spec.weight[cls] if spec.weight is not None else 1.0
        g[rows, cls] -= (1.0 - eps) * w_y * scale[rows]
    return g


def reduce_loss(loss: torch.Tensor, wy: torch.Tensor, valid: torch.Tensor, spec: Spec):
    """The reduced loss and ``d reduced / d l_n`` per row (before grad_output)."""
    if spec.reduction == "none":
        return loss, None
    total = loss.sum()
    if spec.reduction == "sum":
        if spec.num_items is None:
            return total, 1.0
        return total / spec.num_items, 1.0 / spec.num_items
    denom = wy.sum() if spec.weight is not None else valid.sum().to(loss.dtype)
    empty = denom == 0
    safe = torch.where(empty, 1.0, denom)
    return torch.where(empty, math.nan, total / safe), 1.0 / safe
