"""Per-token statistics from the loss's own pass: ``statistics=`` of
:func:`crossent.torch.cross_entropy` and :func:`crossent.torch.linear_cross_entropy`.

What a trainer logs next to the loss (the log-partition ``lse`` a z-loss penalises, the
z-loss term, the target's log-probability, argmax accuracy, the predicted distribution's
entropy), taken from the row-block kernel's blocks while they are in cache
(:func:`._rowblock.cross_entropy_rows`' ``lse_out`` and ``observe``), so the linear head
still never holds more than one chunk of logits. Where the whole logits exist anyway
(torch's own kernel for small inputs, the composable path) they are computed from them
with plain torch ops (:func:`from_logits`): the same definitions, the same masks.

Definitions (per row ``n``; ``z`` the logits after ``softcap``, ``p = softmax(z)``):

* ``lse = log sum_c exp(z_c)``;
* ``z_loss = z_loss * lse^2``: the term the loss adds for the row (before the
  reduction's ``1 / denominator``; not class-weighted); all zeros for ``z_loss=0``
  (also where ``lse^2`` overflows or ``lse`` is NaN: the loss adds nothing);
* ``target_logprob = log p_y = z_y - lse`` (``-`` the cross-entropy without smoothing,
  class weights or z-loss); index targets only;
* ``accuracy = argmax_c z_c == y`` (``torch.argmax``: the first of tied maxima);
  index targets only. ``z`` as computed: a softcap in float32 for float32 and narrower
  logits (where ``c tanh(z / c)`` of two large logits can round to one value, a tie), a
  linear head's logits as its matmul rounds them (as ``F.linear`` then ``argmax``);
* ``entropy = -sum_c p_c log p_c`` (``p_c = 0`` counts 0).

Ignored rows (``target == ignore_index``): NaN in every float statistic, False in
``accuracy``, and False in the ``counted`` mask that comes with every result.
Probability targets count every row; their ``target_logprob`` and ``accuracy`` are
undefined and raise :class:`crossent.UnsupportedError`.

Imports nothing of ``crossent.torch`` but :mod:`._rules` (no import circles).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable
from typing import NamedTuple

import torch

from ..errors import InputError, UnsupportedError
from ._rules import Options, Rows, compute_dtype

__all__ = ["STATISTICS", "RowStatistics", "TokenStatistics", "check_statistics",
           "counted_rows", "finish", "from_logits", "refuse_for_probabilities", "reshape",
           "triton_refusal"]

STATISTICS = ("lse", "z_loss", "target_logprob", "accuracy", "entropy")
_TINY = 1e-30  # p_y below this: log p_y from z_y - lse (the kernel's rule)
_FLOAT_TINY = {dt: torch.finfo(dt).tiny for dt in (torch.float32, torch.float64)}


class TokenStatistics(NamedTuple):
    """Per-token statistics returned next to the loss (``statistics=``).

    Every tensor has the target's row shape (as ``reduction="none"``), is detached (no
    gradient flows through a statistic) and is float32 (float64 for float64 input);
    ``accuracy`` and ``counted`` are bool. A statistic not asked for is ``None``.
    Ignored rows hold NaN (``accuracy``: False); ``counted`` marks the rows that count,
    so ``stats.entropy.nanmean()`` or ``stats.accuracy[stats.counted].float().mean()``
    average over the counted tokens only (inside ``torch.compile`` prefer
    ``(stats.accuracy & stats.counted).sum() / stats.counted.sum()``: boolean-mask
    indexing has a data-dependent shape, a graph break).

    Under ``torch.func`` transforms (``vmap``, ``grad(has_aux=True)``, ``jvp``) return
    the wanted fields (``stats.entropy``), not the whole tuple: they take only tensors,
    and the statistics not asked for are ``None``.

    >>> import math, torch, crossent.torch as xt
    >>> z, y = torch.zeros(3, 4), torch.tensor([1, -100, 2])
    >>> loss, stats = xt.cross_entropy(z, y, statistics=("entropy", "accuracy"))
    >>> stats.counted.tolist(), stats.lse is None
    ([True, False, True], True)
    >>> math.isclose(stats.entropy.nanmean().item(), math.log(4), rel_tol=1e-6)  # uniform
    True
    >>> stats.accuracy.tolist()  # argmax of equal logits is class 0; ignored rows False
    [False, False, False]
    """

    lse: torch.Tensor | None
    z_loss: torch.Tensor | None
    target_logprob: torch.Tensor | None
    accuracy: torch.Tensor | None
    entropy: torch.Tensor | None
    counted: torch.Tensor


def check_statistics(statistics) -> tuple[str, ...] | None:
    """``None`` (off), one name, or an iterable of names from :data:`STATISTICS` (any
    subset, any order; an empty one returns only ``counted``) -> the names, in order."""
    if statistics is None:
        return None
    if isinstance(statistics, str):
        statistics = (statistics,)
    elif not isinstance(statistics, Iterable):
        raise InputError(f"statistics={statistics!r} must be None, a name or a tuple of "
                         f"names from {STATISTICS}")
    try:
        names = tuple(statistics)
    except TypeError:  # a 0-d array or tensor: Iterable by type, not by value
        raise InputError(f"statistics={statistics!r} must be None, a name or a tuple of "
                         f"names from {STATISTICS}") from None
    bad = [n for n in names if not isinstance(n, str) or n not in STATISTICS]
    if bad:
        raise InputError(f"statistics holds {bad[0]!r}: each must be one of {STATISTICS}")
    return tuple(n for n in STATISTICS if n in names)


def refuse_for_probabilities(names: tuple[str, ...] | None, prob: bool,
                             function: str) -> None:
    """``target_logprob`` and ``accuracy`` need class indices: refuse them loudly."""
    undefined = [n for n in names or () if n in ("target_logprob", "accuracy")]
    if prob and undefined:
        raise UnsupportedError(
            f"crossent.torch.{function}: statistics {', '.join(undefined)} with probability "
            f"targets (defined for class-index targets only; lse, z_loss and entropy work)")


def triton_refusal(names: tuple[str, ...] | None) -> str | None:
    """The Triton kernels return no statistics: ``backend="triton"`` refuses them
    (``"auto"`` then takes the row-block kernel)."""
    if names is None:
        return None
    return f"statistics={names!r} (per-token statistics; the row-block kernel has them)"


def counted_rows(rows: Rows, num_rows: int) -> torch.Tensor:
    """The rows that count: the non-ignored ones, every row of probability targets (a
    copy: the kernel's own mask may still serve a backward)."""
    if rows.valid is not None:
        return rows.valid.clone()
    return torch.ones(num_rows, dtype=torch.bool, device=rows.scale.device)


def _result(names, values: dict, counted: torch.Tensor) -> TokenStatistics:
    """Ignored rows NaN (False), statistics not asked None."""
    out = {}
    for name in STATISTICS:
        v = values.get(name) if name in names else None
        if v is not None:
            v = torch.where(counted, v, False if v.dtype == torch.bool else torch.nan)
        out[name] = v
    return TokenStatistics(counted=counted, **out)


def _z_loss_term(opts: Options, lse_squared: torch.Tensor) -> torch.Tensor:
    """``z_loss * lse^2``, the term the loss adds per row: exactly 0 for ``z_loss=0``
    (the loss adds nothing; ``0 * lse^2`` would be NaN where ``lse^2`` overflows)."""
    if opts.z_loss == 0:
        return torch.zeros_like(lse_squared)
    return opts.z_loss * lse_squared


def reshape(stats: TokenStatistics, shape: tuple[int, ...], drop_last: bool = False
            ) -> TokenStatistics:
    """Every field reshaped to the target's row shape (``drop_last``: ``shift=True``'s
    last positions cut off, as for ``reduction="none"``)."""
    def one(t):
        if t is None:
            return None
        t = t.reshape(shape)
        return t[..., :-1] if drop_last else t

    return TokenStatistics(*(one(t) for t in stats))


@torch.no_grad()
def from_logits(names: tuple[str, ...], z: torch.Tensor, target: torch.Tensor,
                opts: Options) -> TokenStatistics:
    """The statistics of whole ``(M, C)`` logits with plain torch ops (native and
    composable routes): ``z`` before ``softcap``, ``target`` ``(M,)`` indices or
    ``(M, C)`` probabilities. No data-dependent control flow (``torch.func`` safe)."""
    cdtype = compute_dtype(z.dtype)
    z = z.detach().to(cdtype)
    if opts.softcap is not None:
        z = opts.softcap * torch.tanh(z / opts.softcap)
    num_rows, num_classes = z.shape
    lse = torch.logsumexp(z, 1)
    values: dict[str, torch.Tensor] = {"lse": lse, "z_loss": _z_loss_term(opts, lse.square())}
    if "entropy" in names:
        values["entropy"] = torch.special.entr(torch.softmax(z, 1)).sum(1)
    if target.is_floating_point():
        counted = torch.ones(num_rows, dtype=torch.bool, device=z.device)
        return _result(names, values, counted)
    y = target.detach().long()
    counted = y != opts.ignore_index
    if num_classes == 0:  # every row is ignored (any other index raised)
        values["target_logprob"] = lse
        values["accuracy"] = counted
        return _result(names, values, counted)
    y = torch.where(counted, y, 0).unsqueeze(1)
    values["target_logprob"] = _nan_where_infinite(
        (z.gather(1, y) - lse.unsqueeze(1)).squeeze(1), lse)
    values["accuracy"] = z.argmax(1) == y.squeeze(1)
    return _result(names, values, counted)


class RowStatistics:
    """The statistics of the rows the row-block kernel sees, gathered from its blocks.

    One object per pass; each kernel call over rows ``start .. start + M`` of its
    (possibly compacted) rows gets :meth:`kernel_args` ``(start, M)``. The observer writes
    only its own block's rows (the kernel's worker threads run blocks concurrently) into
    ``(rows,)`` buffers, and :meth:`values` finishes them. Work per block (on the
    block in cache): ``accuracy`` one argmax pass over the logits; ``entropy`` one pass
    of ``p log p`` over the probabilities (a log per entry, into a per-thread block
    buffer) and its sum;
    ``target_logprob`` two gathers (``z_y``, ``p_y``); ``lse`` nothing for class indices
    (the kernel's own), two max passes (logits, probabilities) for probability targets.
    """

    def __init__(self, names: tuple[str, ...], rows: int, index: torch.Tensor | None,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.names, self.index = names, index
        prob = index is None

        def buf(wanted: bool, dt: torch.dtype = dtype) -> torch.Tensor | None:
            return torch.empty(rows, dtype=dt, device=device) if wanted else None

        self.need_lse = bool({"lse", "z_loss", "target_logprob"} & set(names))
        self.lse = buf(self.need_lse)
        self.m = buf(prob and self.need_lse)  # probability targets: lse = m - log max p
        self.p_max = buf(prob and self.need_lse)
        want_tlp = "target_logprob" in names
        self.z_y, self.p_y = buf(want_tlp), buf(want_tlp)
        self.argmax = buf("accuracy" in names, torch.long)
        self.entropy = buf("entropy" in names)
        self.local = threading.local()
        self.start = 0

    def kernel_args(self, start: int, count: int) -> dict:
        """``lse_out`` and ``observe`` for a kernel call over rows ``start .. start +
        count`` (nothing to observe: no observer)."""
        sel = slice(start, start + count)
        lse_out = self.lse[sel] if self.lse is not None and self.m is None else None
        wants = any(b is not None for b in (self.m, self.z_y, self.argmax, self.entropy))
        if not wants:
            return {"lse_out": lse_out}

        def observe(phase: str, i: int, j: int, block: torch.Tensor) -> None:
            self._observe(phase, start + i, start + j, block)

        return {"lse_out": lse_out, "observe": observe}

    def _observe(self, phase: str, i: int, j: int, block: torch.Tensor) -> None:
        if phase == "logits":
            if self.m is not None:
                torch.amax(block, 1, out=self.m[i:j])
            if self.z_y is not None:
                assert self.index is not None
                self.z_y[i:j] = block.gather(1, self.index[i:j, None])[:, 0]
            if self.argmax is not None:
                torch.argmax(block, 1, out=self.argmax[i:j])
            return
        if self.p_max is not None:
            torch.amax(block, 1, out=self.p_max[i:j])
        if self.p_y is not None:
            assert self.index is not None
            self.p_y[i:j] = block.gather(1, self.index[i:j, None])[:, 0]
        if self.entropy is not None:
            work = getattr(self.local, "work", None)
            if work is None or work.shape[0] < j - i or work.shape[1] != block.shape[1]:
                work = self.local.work = torch.empty_like(block)
            # -sum p log p with p = 0 counting 0: log of max(p, tiny) (exact for normal p,
            # and tiny * log(tiny) ~ 1e-36 for a subnormal one); about 3x faster than
            # torch.special.entr, as precise (NaN propagates through clamp_min)
            part = torch.clamp_min(block, _FLOAT_TINY[block.dtype], out=work[: j - i])
            part.log_().mul_(block)
            torch.sum(part, 1, out=self.entropy[i:j]).neg_()

    def values(self) -> dict[str, torch.Tensor]:
        """The finished statistics of the observed rows (compute dtype; ``accuracy``
        bool), not yet masked."""
        out: dict[str, torch.Tensor] = {}
        if self.need_lse:
            assert self.lse is not None
            if self.m is not None:
                assert self.p_max is not None
                torch.sub(self.m, self.p_max.log(), out=self.lse)
                # a row holding +inf, or all -inf, has NaN probabilities: its lse is its
                # max, as torch.logsumexp's (a NaN row's max is NaN)
                torch.where(self.m.isinf(), self.m, self.lse, out=self.lse)
            out["lse"] = self.lse
            out["z_loss"] = self.lse.square()  # times the coefficient in result()
        if self.p_y is not None and self.z_y is not None:
            # log p_y as the kernel's nll: from p_y where it is a normal float, else z_y - lse
            assert self.lse is not None
            out["target_logprob"] = _nan_where_infinite(
                torch.where(self.p_y >= _TINY, self.p_y.log(), self.z_y - self.lse), self.lse)
        if self.argmax is not None:
            assert self.index is not None
            out["accuracy"] = self.argmax == self.index
        if self.entropy is not None:
            out["entropy"] = self.entropy
        return out


def _nan_where_infinite(logprob: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """NaN where a row holds ``+inf`` (``lse = +inf``), as ``torch.log_softmax`` gives
    (``inf - inf``), not the limit ``-inf`` of ``z_y - lse``."""
    return torch.where(lse == math.inf, math.nan, logprob)


def finish(collector: RowStatistics, opts: Options, counted: torch.Tensor,
           keep: torch.Tensor | None = None) -> TokenStatistics:
    """The :class:`TokenStatistics` of a kernel pass: ``counted`` ((N,) bool, all rows);
    ``keep`` the indices of the rows the kernel saw when it saw only those (the linear
    head skips ignored rows), else ``None`` (it saw all N)."""
    values = collector.values()
    if "z_loss" in values:
        values["z_loss"] = _z_loss_term(opts, values["z_loss"])
    if keep is not None:
        full = {}
        for name, v in values.items():
            fill = False if v.dtype == torch.bool else torch.nan
            out = torch.full(counted.shape, fill, dtype=v.dtype, device=v.device)
            full[name] = out.index_copy_(0, keep, v)
        values = full
    return _result(collector.names, values, counted)
