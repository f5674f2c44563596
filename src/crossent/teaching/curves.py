"""The numbers behind the command line's figures and explanations, computed by the library.

Each function returns NumPy arrays built by calling crossent's own functions (``surprisal``,
``binary_entropy``, ``cross_entropy``, ``softmax_cross_entropy`` and its gradient...), so
that what a figure shows is exactly what the library computes. Nothing here imports a
plotting or terminal library: ``crossent.cli`` draws and prints what these return.

>>> c = log_loss_curves()
>>> i = int(np.flatnonzero(c.x == 0.5)[0])
>>> round(float(c.series["-ln q"][i]), 6)  # ln 2
0.693147
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .. import _checks
from ..activations import log_sigmoid, log_softmax, sigmoid, softmax
from ..errors import InputError
from ..grad import sigmoid_binary_cross_entropy_grad, softmax_cross_entropy_grad
from ..losses import (
    binary_cross_entropy,
    multilabel_cross_entropy,
    softmax_cross_entropy,
)
from ..measures import binary_entropy, cross_entropy, entropy, surprisal
from ..targets import smooth_labels

SUM_TOLERANCE = _checks.SUM_TOLERANCE
Numbers = Sequence[float] | np.ndarray
"""A 1-d list of numbers or a NumPy vector."""
MAX_POINTS = 10**7
"""The most evenly spaced points :func:`grid` (and every ``*_curve`` function's ``n``) takes:
10 million float64 points are 80 MB per series and thousands of times more than any
screen or print has pixels across, so a larger ``n`` is a mistake, refused naming ``n``
rather than left to NumPy's raw ``MemoryError`` / ``IndexError``."""


@dataclass(frozen=True)
class Curves:
    """Named y-series over one x grid (all 1-d NumPy arrays of the same length)."""

    x: np.ndarray
    series: dict[str, np.ndarray]


def _entries(n: int) -> str:
    return "entry" if n == 1 else "entries"


def grid(lo: float, hi: float, n: int, include: Sequence[float] = ()) -> np.ndarray:
    """``n`` evenly spaced points in [lo, hi] plus the points of ``include`` that lie in
    [lo, hi] (a curve's x never leaves the range it was asked for), sorted, unique.

    ``lo`` and ``hi`` are finite numbers, ``n`` an integer in [1, :data:`MAX_POINTS`] and
    ``include`` finite real numbers, each refused otherwise with an
    :class:`~crossent.errors.InputError` naming it.

    >>> grid(0.0, 1.0, 3, include=[0.25, 2.0]).tolist()
    [0.0, 0.25, 0.5, 1.0]
    """
    lo = float(_checks.check_finite(lo, "lo"))
    hi = float(_checks.check_finite(hi, "hi"))
    n = _check_points(n)
    extra = _finite_points(include, "include")
    if math.isfinite(hi - lo):
        even = np.linspace(lo, hi, n)
    else:  # hi - lo overflows (-1.7e308 to 1.7e308): halves, then doubled exactly
        even = 2.0 * np.linspace(lo / 2.0, hi / 2.0, n)
    low, high = min(lo, hi), max(lo, hi)
    return np.unique(np.concatenate([even, extra[(extra >= low) & (extra <= high)]]))


def _finite_points(values: object, name: str) -> np.ndarray:
    """``values`` as finite float64 points (none for an empty sequence)."""
    if np.size(_as_array(values)) == 0:
        return np.zeros(0)
    points = _vector(values, name)  # type: ignore[arg-type]
    if not np.isfinite(points).all():
        raise InputError(f"{name} must hold finite numbers")
    return points


def _check_points(n: int) -> int:
    """``n``, a number of points: an integer in [1, :data:`MAX_POINTS`]."""
    return _checks.check_integer(n, "n", minimum=1, maximum=MAX_POINTS)


def _check_lo(lo: float, below: float) -> float:
    """``lo``, where a curve's x starts: a finite number in [0, below)."""
    value = _checks.check_finite(lo, "lo")
    if not 0.0 <= value < below:
        raise InputError(f"lo={lo!r} must lie in [0, {below:g})")
    return float(value)


def surprisal_curve(*, base: float = 2.0, lo: float = 1e-3, n: int = 400) -> Curves:
    """Surprise ``log(1/p)`` against p in [lo, 1] (the panda p = 0.001, the bird p = 0.5).

    >>> c = surprisal_curve()
    >>> float(c.series["surprisal"][c.x == 0.5][0])  # a bird: 1 bit
    1.0
    """
    p = grid(_check_lo(lo, 1.0), 1.0, n, include=[0.001, 0.5])
    return Curves(p, {"surprisal": np.asarray(surprisal(p, base=base))})


def coin_entropy_curve(*, base: float = 2.0, n: int = 401) -> Curves:
    """Entropy of a coin against its bias (probability of heads), maximal at 0.5.

    >>> c = coin_entropy_curve()
    >>> float(c.series["entropy"].max())  # a fair coin: 1 bit
    1.0
    """
    p = grid(0.0, 1.0, n, include=[0.5, 0.99])
    return Curves(p, {"entropy": np.asarray(binary_entropy(p, base=base))})


def log_loss_curves(*, lo: float = 1e-4, n: int = 400) -> Curves:
    """The log loss ``-ln q`` for true label 1 next to ``1 - q`` and ``(1 - q)^2``.

    x: the predicted probability q of the true class in [lo, 1] (the article's plot starts
    at 1e-4, where ``-ln q`` is about 9.2). ``-ln q`` grows without bound as q -> 0 while
    ``1 - q`` and ``(1 - q)^2`` never leave [0, 1]: too narrow to punish a confident mistake.
    In nats (the article's plot uses the natural log).
    """
    return loss_comparison(grid(_check_lo(lo, 1.0), 1.0, n, include=[0.5]))


def coin_cross_entropy_curve(
    truth: Sequence[float] = (0.99, 0.01), *, base: float = 2.0, lo: float = 1e-3, n: int = 400
) -> Curves:
    """Cross-entropy ``H(p, [b, 1 - b])`` of every belief b about a coin whose truth is p.

    ``series["cross-entropy"]`` never drops below ``series["entropy"]`` (the constant
    ``H(p)``) and touches it only at b = p[0] (Gibbs' inequality). The article's loaded coin:
    p = [0.99, 0.01], believed to be [0.01, 0.99]. ``truth`` is two probabilities summing
    to 1 and ``lo`` (the beliefs run over [lo, 1 - lo]) a number in [0, 0.5).
    """
    truth_arr = _vector(truth, "truth")
    if truth_arr.size != 2:
        raise InputError(f"truth must hold 2 probabilities (heads, tails); got {truth_arr.size}")
    _checks.check_in_unit_interval(np, truth_arr, "truth")
    truth_arr = _check_sums_to_one(truth_arr, "truth", truth)
    lo = _check_lo(lo, 0.5)
    b = grid(lo, 1.0 - lo, n, include=[truth_arr[0], truth_arr[1], 0.5])
    beliefs = np.stack([b, 1.0 - b], axis=-1)
    ce = np.asarray(cross_entropy(truth_arr, beliefs, base=base))
    h = float(entropy(truth_arr, base=base))
    return Curves(b, {"cross-entropy": ce, "entropy": np.full_like(b, h)})


def finite_difference_grad(
    f: Callable[[np.ndarray], float], x: Numbers, *, h: float = 1e-6
) -> np.ndarray:
    """Central differences ``(f(x + h e_i) - f(x - h e_i)) / 2h`` for every coordinate i.

    ``h`` is a finite number > 0 that changes every coordinate (``x_i + h != x_i - h`` in
    float64); otherwise an :class:`~crossent.errors.InputError` names it (a step of 0 gives
    0/0, a step lost in a large coordinate's rounding a silent 0).

    >>> finite_difference_grad(lambda v: float((v**2).sum()), [1.0, -2.0]).round(6).tolist()
    [2.0, -4.0]
    """
    h = _checks.check_positive(h, "h")
    x0 = _vector(x, "x")
    out = np.empty_like(x0)
    for i in range(x0.size):
        if math.isfinite(x0[i]) and x0[i] + h == x0[i] - h:
            raise InputError(f"h={h!r} is too small to change x[{i}] = {x0[i]!r} (in float64); "
                             f"use a larger step")
        step = np.zeros_like(x0)
        step[i] = h
        out[i] = _central_difference(f(x0 + step), f(x0 - step), h)
    return out


def _central_difference(up: float, down: float, h: float) -> float:
    """``(up - down) / 2h``, without overflowing where ``up - down`` (or ``2h``) would."""
    diff = up - down
    if math.isinf(diff) and math.isfinite(up) and math.isfinite(down):
        return (up / 2 - down / 2) / h  # 1e308 - (-1e308) is inf; the halves' difference not
    return diff / 2 / h  # not / (2 * h): 2 * 1e308 is inf


@dataclass(frozen=True)
class GradientCheck:
    """The article's gradient ``softmax(a) - b`` next to a finite difference of the loss."""

    logits: np.ndarray
    probs: np.ndarray  # softmax(a)
    target: np.ndarray  # b, one-hot or soft
    analytic: np.ndarray  # softmax_cross_entropy_grad, i.e. softmax(a) - b
    numeric: np.ndarray  # central finite difference of softmax_cross_entropy
    max_abs_diff: float


def softmax_gradient_check(
    logits: Sequence[float], target: Sequence[float], *, h: float = 1e-6
) -> GradientCheck:
    """Check ``d/da cross_entropy(softmax(a), b) = softmax(a) - b`` on one row of logits.

    ``h`` is the finite-difference step, as for :func:`finite_difference_grad`.

    >>> g = softmax_gradient_check([2.0, 1.0, 0.1], [1.0, 0.0, 0.0])
    >>> g.max_abs_diff < 1e-8
    True
    """
    h = _checks.check_positive(h, "h")
    a = _vector(logits, "logits")
    b = _vector(target, "target")

    def loss(z: np.ndarray) -> float:
        return float(softmax_cross_entropy(z[None], b[None], reduction="sum"))

    analytic = np.asarray(softmax_cross_entropy_grad(a[None], b[None], reduction="sum"))[0]
    numeric = finite_difference_grad(loss, a, h=h)
    return GradientCheck(
        a, np.asarray(softmax(a)), b, analytic, numeric, float(np.max(np.abs(analytic - numeric)))
    )


@dataclass(frozen=True)
class Breakdown:
    """Every intermediate of one cross-entropy loss, for ``crossent explain``.

    ``kind`` is ``"multiclass"`` (softmax over classes), ``"binary"`` (one probability of
    the positive class) or ``"multilabel"`` (independent labels, losses summed). ``terms``
    holds each class's (label's) contribution in ``base`` and sums to ``loss``; for binary
    and multi-label, ``pos_terms`` (``t log(1/q)``) and ``neg_terms``
    (``(1 - t) log(1/(1 - q))``) add up to ``terms``. ``grad`` is the gradient of the loss
    in nats with respect to the logits (``log q`` for multiclass probabilities, ``log(q / (1
    - q))`` for binary ones): ``softmax(a) - b`` or ``sigmoid(x) - t``.
    """

    kind: str
    base: float
    logits: np.ndarray | None
    probs: np.ndarray
    target: np.ndarray  # as given (a class index becomes its one-hot row)
    used_target: np.ndarray  # after label smoothing
    terms: np.ndarray
    pos_terms: np.ndarray | None
    neg_terms: np.ndarray | None
    loss: float  # in base, as the library's loss reports it
    loss_nats: float
    grad: np.ndarray


def _as_array(values: object) -> np.ndarray:
    """``np.asarray(values)``, a tensor that requires grad (given whole, or an entry of
    lists or tuples at any depth) detached first: NumPy cannot read it, and the curves are numbers,
    not a graph."""
    return np.asarray(_detached(values))


def _detached(value: object) -> object:
    if isinstance(value, list | tuple):  # nested lists too: [[p, 1 - p]]
        return [_detached(v) for v in value]
    detach = getattr(value, "detach", None)
    return detach() if callable(detach) else value


def _vector(values: Numbers, name: str) -> np.ndarray:
    """``values`` as a flat float64 vector; an :class:`InputError` naming ``name`` for text,
    None (which NumPy would make NaN), a ragged list, a number beyond float64's range
    (``10**400``) or nothing at all."""
    try:
        raw = _as_array(values)
        if raw.dtype.kind not in "biufO" or (raw.dtype.kind == "O" and not all(
                isinstance(v, numbers.Real) for v in raw.reshape(-1).tolist())):
            raise TypeError("found text, None or a complex number")
        arr = raw.astype(float).reshape(-1)
    except OverflowError:
        raise InputError(f"{name} holds a number beyond float64's range") from None
    except (TypeError, ValueError) as err:
        raise InputError(f"{name} must be real numbers ({err})") from None
    if arr.size == 0:
        raise InputError(f"{name} is empty; give at least one number")
    return arr


def _check_sums_to_one(v: np.ndarray, name: str, given: object) -> np.ndarray:
    """``v`` (``given`` as float64) if it sums to 1 within the tolerance of ``given``'s own
    dtype (:func:`crossent._checks.sum_tolerance`: ``[0.99, 0.01]`` in float16 sums to
    0.99974); a sum further from 1 than float64's tolerance (1e-4) is divided out, so the
    float64 formulas the curves call take it."""
    dtype = _as_array(given).dtype  # _vector read it the same way
    tolerance = _checks.sum_tolerance(np, dtype) if dtype.kind == "f" else SUM_TOLERANCE
    total = float(v.sum())
    if abs(total - 1.0) > tolerance:
        raise InputError(f"{name} must sum to 1 (they sum to {total:.6g})")
    return v / total if abs(total - 1.0) > SUM_TOLERANCE else v


def _multiclass_target(target: int | Numbers, num_classes: int) -> np.ndarray:
    if isinstance(target, (int, np.integer)) and not isinstance(target, bool):
        if not 0 <= int(target) < num_classes:
            raise InputError(
                f"target class index {_integer_text(int(target))} is out of range for "
                f"{num_classes} classes "
                f"(valid: 0..{num_classes - 1})"
            )
        row = np.zeros(num_classes)  # not np.eye(C)[k]: C x C floats for 10^5 classes
        row[int(target)] = 1.0
        return row
    t = _vector(target, "target")  # type: ignore[arg-type]
    if t.size != num_classes:
        raise InputError(
            f"target has {t.size} {'entry' if t.size == 1 else 'entries'} but there are "
            f"{num_classes} classes; give a class index (an integer) or one probability per class"
        )
    _checks.check_in_unit_interval(np, t, "target")
    t = _check_sums_to_one(t, "target", target)
    return t


def _integer_text(k: int) -> str:
    """``str(k)``, or its size where Python refuses to print it (beyond 4300 digits)."""
    try:
        return str(k)
    except ValueError:
        return f"{'-' if k < 0 else ''}<an integer of {k.bit_length()} bits>"


def _log_in(base: float, label_smoothing: float) -> float:
    _checks.check_fraction(label_smoothing, "label_smoothing")
    _checks.check_base(base)
    return math.log(base)


def multiclass_breakdown(
    *,
    target: int | Sequence[float],
    probs: Sequence[float] | None = None,
    logits: Sequence[float] | None = None,
    label_smoothing: float = 0.0,
    base: float = 2.0,
) -> Breakdown:
    """Softmax cross-entropy of one example, term by term (give ``probs`` or ``logits``).

    ``target`` is a class index or a probability vector. Label smoothing turns it into
    ``(1 - alpha) t + alpha / C``.

    >>> b = multiclass_breakdown(probs=[0.1, 0.2, 0.7], target=2)
    >>> round(b.loss, 6), [round(float(g), 2) for g in b.grad]  # log2(1/0.7); q - t
    (0.514573, [0.1, 0.2, -0.3])
    """
    if (probs is None) == (logits is None):
        raise InputError("give exactly one of probs and logits")
    ln_base = _log_in(base, label_smoothing)
    if logits is not None:
        z = _vector(logits, "logits")
        q = np.asarray(softmax(z))
        log_q = np.asarray(log_softmax(z))
    else:
        q = _vector(probs, "probs")  # type: ignore[arg-type]
        _checks.check_in_unit_interval(np, q, "probs")
        q = _check_sums_to_one(q, "probs", probs)
        with np.errstate(divide="ignore"):
            log_q = np.log(q)
        z = log_q
    t = _multiclass_target(target, q.size)
    used = np.asarray(smooth_labels(t, label_smoothing))
    nats = np.where(used == 0, 0.0, -used * np.where(used == 0, 0.0, log_q))
    terms = nats / ln_base
    if logits is None:
        # the loss is the sum of the terms shown: q as given (a sum within 1e-4 of 1 is
        # kept, not divided out, so the printed q column is the user's)
        loss_nats = float(nats.sum())
    else:
        loss_nats = float(softmax_cross_entropy(z[None], t[None],
                                                label_smoothing=label_smoothing,
                                                reduction="sum", validate=False))
    grad = np.asarray(softmax_cross_entropy_grad(
        z[None], t[None], label_smoothing=label_smoothing, reduction="sum", validate=False
    ))[0]
    return Breakdown("multiclass", base, None if logits is None else z, q, t, used, terms,
                     None, None, loss_nats / ln_base, loss_nats, grad)


def label_breakdown(
    *,
    target: Sequence[float],
    probs: Sequence[float] | None = None,
    logits: Sequence[float] | None = None,
    label_smoothing: float = 0.0,
    base: float = 2.0,
    multilabel: bool = False,
) -> Breakdown:
    """Binary (one label) or multi-label (several labels, losses summed) cross-entropy.

    Each label j has a probability ``q_j`` of being present (``sigmoid`` of a logit) and a
    target ``t_j`` in [0, 1]; its loss is ``t_j log(1/q_j) + (1 - t_j) log(1/(1 - q_j))``.
    Label smoothing makes ``t_j (1 - alpha) + alpha / 2`` (two outcomes per label). With
    probabilities, each log is clamped at -100 as :func:`crossent.binary_cross_entropy` does
    (PITFALLS 5), so a probability of exactly 0 or 1 costs at most 100 nats per label.

    >>> b = label_breakdown(probs=[0.7], target=[1.0], base=math.e)  # the article's cat
    >>> round(b.loss, 6)
    0.356675
    """
    if (probs is None) == (logits is None):
        raise InputError("give exactly one of probs and logits")
    ln_base = _log_in(base, label_smoothing)
    name = "logits" if logits is not None else "probs"
    values = _vector(logits if logits is not None else probs, name)  # type: ignore[arg-type]
    if not multilabel and values.size != 1:
        what = "logit" if logits is not None else "probability"
        raise InputError(
            f"binary cross-entropy takes one {what} (of the positive class), got "
            f"{values.size}; several labels are multi-label"
        )
    t = _vector(target, "target")
    if t.size != values.size:
        raise InputError(f"target has {t.size} {_entries(t.size)} but {name} has "
                         f"{values.size}: one target in [0, 1] per class")
    _checks.check_in_unit_interval(np, t, "target")
    pair = np.asarray(smooth_labels(np.stack([t, 1.0 - t], axis=-1), label_smoothing))
    used = pair[:, 0]
    if logits is not None:
        x = values
        q = np.asarray(sigmoid(x))
        log_q, log_1mq = np.asarray(log_sigmoid(x)), np.asarray(log_sigmoid(-x))
        loss_nats = float(multilabel_cross_entropy(x[None], used[None], reduction="sum"))
    else:
        q = values
        _checks.check_in_unit_interval(np, q, "probs")
        with np.errstate(divide="ignore"):
            x = np.log(q) - np.log1p(-q)
            # clamped at -100 as binary_cross_entropy (and PyTorch) does, so terms sum to loss
            log_q, log_1mq = np.maximum(np.log(q), -100.0), np.maximum(np.log1p(-q), -100.0)
        loss_nats = float(binary_cross_entropy(q, used, reduction="sum"))
    pos = np.where(used == 0, 0.0, -used * np.where(used == 0, 0.0, log_q)) / ln_base
    neg = np.where(used == 1, 0.0, -(1 - used) * np.where(used == 1, 0.0, log_1mq)) / ln_base
    grad = np.asarray(sigmoid_binary_cross_entropy_grad(x, used, reduction="sum"))
    return Breakdown("multilabel" if multilabel else "binary", base,
                     None if logits is None else x, q, t, used, pos + neg, pos, neg,
                     loss_nats / ln_base, loss_nats, grad)


def loss_comparison(q_true: Numbers) -> Curves:
    """``-ln q``, ``1 - q`` and ``(1 - q)^2`` at chosen probabilities of the true class.

    >>> round(float(loss_comparison([0.5]).series["-ln q"][0]), 6)
    0.693147
    """
    q = _vector(q_true, "q_true")
    _checks.check_in_unit_interval(np, q, "q_true")
    series = {"-ln q": np.asarray(surprisal(q)), "1 - q": 1.0 - q, "(1 - q)^2": (1.0 - q) ** 2}
    return Curves(q, series)
