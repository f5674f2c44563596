"""Cross-entropy losses: softmax (multi-class), binary, multi-label and focal.

Where PyTorch has the same argument, these give PyTorch's answer (tests compare against
``torch.nn.functional``); where PyTorch has no opinion, optax's. Every loss takes
``reduction="mean" | "sum" | "none"``, accepts float16/bfloat16 inputs (computed in float32
inside, returned in the input's dtype, PITFALLS 6) and propagates NaN from its inputs.
``validate=False`` skips the value checks (class ranges, probability ranges and sums),
which cost a device synchronisation on accelerators and cannot run under ``jax.jit``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _checks
from ._array import (
    Array,
    any_true,
    arrays,
    is_integer,
    like,
    move_axis_last,
    normalize_axis,
    numel,
    restore_dtype,
    to_float,
)
from .activations import log_sigmoid, logsumexp


@dataclass
class SoftmaxCEParts:
    """The pieces shared by :func:`softmax_cross_entropy` and its analytic gradient.

    All arrays have the class axis last. ``target`` is the *effective* target matrix
    ``T``: the loss of a row is ``-sum_c T_c log softmax(z)_c (+ z-loss)`` and its gradient
    ``softmax(z) * sum_c T_c - T (+ z-loss term)``, for index and probability targets alike.
    """

    xp: Any
    dtype: Any
    axis: int
    raw: Array  # logits before softcap, compute dtype
    logits: Array  # after softcap
    target: Array
    row_mask: Array | None  # 1.0 for counted rows, 0.0 for ignored (index targets only)
    lse: Array
    log_probs: Array
    denominator: Any  # what "mean" divides the summed loss by
    z_loss: float
    softcap: float | None
    reduction: str


def softmax_cross_entropy_parts(
    logits: Any,
    target: Any,
    *,
    axis: int = -1,
    weight: Any = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    reduction: str = "mean",
    validate: bool = True,
) -> SoftmaxCEParts:
    """Check the arguments of :func:`softmax_cross_entropy` and build its shared pieces."""
    _checks.check_reduction(reduction)
    eps = _checks.check_fraction(label_smoothing, "label_smoothing")
    z_loss = _checks.check_nonnegative(z_loss, "z_loss")
    softcap = _checks.check_softcap(softcap)
    xp, (logits, target, weight) = arrays(logits, target, weight)
    _checks.check_floating(xp, logits, "logits")
    if logits.ndim == 0:
        raise ValueError("logits must have a class axis; got a 0-d array")
    axis = normalize_axis(axis, logits.ndim)
    dtype = logits.dtype
    raw = move_axis_last(xp, to_float(xp, logits), axis)
    num_classes = raw.shape[-1]
    z = raw if softcap is None else float(softcap) * xp.tanh(raw / float(softcap))
    if weight is not None:
        weight = to_float(xp, weight)
        if tuple(weight.shape) != (num_classes,):
            raise ValueError(
                f"weight has shape {tuple(weight.shape)}; expected ({num_classes},), "
                f"one weight per class"
            )
        weight = xp.astype(weight, z.dtype)
    lse = logsumexp(z, axis=-1, keepdims=True)
    log_probs = z - lse
    if is_integer(xp, target):
        eff, row_mask, denominator = _index_target(
            xp, z, target, weight, ignore_index, eps, validate, logits.shape, axis
        )
    elif xp.isdtype(target.dtype, "real floating"):
        eff, denominator = _probability_target(xp, z, target, weight, eps, validate, logits, axis)
        row_mask = None
    else:
        raise ValueError(f"target must hold integers or probabilities, got dtype {target.dtype}")
    return SoftmaxCEParts(
        xp, dtype, axis, raw, z, eff, row_mask, xp.squeeze(lse, axis=-1), log_probs,
        denominator, z_loss, None if softcap is None else float(softcap), reduction,
    )


def _index_target(xp, z, target, weight, ignore_index, eps, validate, shape, axis):
    expected = tuple(shape[:axis]) + tuple(shape[axis + 1 :])
    if tuple(target.shape) != expected:
        raise ValueError(
            f"target has shape {tuple(target.shape)} but logits of shape {tuple(shape)} with "
            f"class axis {axis} need class indices of shape {expected}"
        )
    num_classes = z.shape[-1]
    valid = target != ignore_index
    if validate and numel(target):
        bad = valid & ((target < 0) | (target >= num_classes))
        if any_true(xp, bad):
            value = int(xp.max(xp.where(bad, target, -1)) if any_true(xp, bad & (target >= 0))
                        else xp.min(xp.where(bad, target, 0)))
            raise ValueError(
                f"target holds class index {value}, outside [0, {num_classes}) and not "
                f"ignore_index={ignore_index}"
            )
    classes = like(xp, np.arange(num_classes), target, dtype=target.dtype)
    hot = (xp.expand_dims(target, axis=-1) == classes) & xp.expand_dims(valid, axis=-1)
    row_mask = xp.astype(valid, z.dtype)
    w = weight if weight is not None else xp.ones_like(z[..., 0:1])
    hot_w = xp.where(hot, w, 0.0)
    eff = (1.0 - eps) * hot_w
    if eps:
        eff = eff + (eps / num_classes) * w * xp.expand_dims(row_mask, axis=-1)
    denominator = xp.sum(hot_w) if weight is not None else xp.sum(row_mask)
    return eff, row_mask, denominator


def _probability_target(xp, z, target, weight, eps, validate, logits, axis):
    _checks.check_same_shape(logits, target, "logits", "target")
    target = xp.astype(move_axis_last(xp, target, axis), z.dtype)
    if validate:
        _checks.check_distribution(xp, target, "target", -1)
    num_classes = z.shape[-1]
    eff = target if not eps else (1.0 - eps) * target + eps / num_classes
    if weight is not None:
        eff = eff * weight
    rows = int(np.prod(z.shape[:-1]))
    return eff, rows


def _reduce(xp: Any, per_row: Array, reduction: str, denominator: Any) -> Array:
    if reduction == "none":
        return per_row
    total = xp.sum(per_row)
    if reduction == "sum":
        return total
    if isinstance(denominator, int):  # probability targets: the row count
        return total / denominator if denominator else total * math.nan
    # A zero denominator is 0/0 in torch's NLL part, so its mean is NaN even where the
    # label-smoothing part alone would be x/0 = inf (every target class weighted 0).
    empty = denominator == 0
    return xp.where(empty, xp.nan, total / xp.where(empty, 1.0, denominator))


def softmax_cross_entropy(
    logits: Any,
    target: Any,
    *,
    axis: int = -1,
    weight: Any = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    reduction: str = "mean",
    validate: bool = True,
) -> Array:
    """Softmax cross-entropy loss from logits: ``l_n = -sum_c t_nc log softmax(z_n)_c``.

    The multi-class classification loss: the cross-entropy between a target distribution
    and the softmax of the logits. With a class-index target it is ``-log softmax(z_n)_y``,
    the surprise of the true class (the article's ``log(1/0.7)``).

    Args:
        logits: floating array, class axis ``axis`` (default last; PyTorch layout
            ``(N, C, d1, ...)`` is ``axis=1``). Any number of other (batch, spatial) axes.
        target: integer class indices with the logits' shape minus the class axis, or
            floating class probabilities with the logits' shape (soft targets: label
            smoothing, Mixup, distillation).
        weight: per-class weights, shape ``(C,)``.
        ignore_index: index targets equal to it contribute 0 and are not counted. If it is
            a real class id, that class still sits in the softmax denominator.
        label_smoothing: eps in [0, 1]; targets become ``(1 - eps) t + eps / C``.
        z_loss: adds ``z_loss * logsumexp(z_n)^2`` to each counted row (PaLM, Chowdhery et
            al. 2022, arXiv:2204.02311, used 1e-4), keeping the softmax normaliser near 0.
            It is not class-weighted.
        softcap: c > 0 replaces the logits by ``c * tanh(z / c)`` first (Gemma 2).
        reduction: ``"none"`` (per-row losses, ignored rows 0), ``"sum"``, or ``"mean"``.

    Reduction rules (PyTorch's, ``torch.nn.functional.cross_entropy``; PITFALLS 1-3):
        * index targets, ``"mean"``: the sum of row losses divided by the number of
          non-ignored rows, or, with ``weight``, by ``sum_n w[y_n]`` over non-ignored rows.
          So ``"none"`` then ``.mean()`` differs from ``"mean"`` when weighted or ignoring.
          The z-loss terms are divided by the same denominator.
        * probability targets, ``"mean"``: divided by the number of rows (N * d1 * ...);
          weights do not enter the denominator: the two target modes disagree, as in torch.
        * label smoothing with index targets is PyTorch's
          ``(1 - eps) * w[y] * nll + (eps / C) * sum_c w_c * (-log p_c)``, zero on ignored rows.
        * all rows ignored (or an empty batch) with ``"mean"``: NaN (0/0), as PyTorch gives
          on purpose; Keras and optax give 0 (PITFALLS 2). ``"sum"`` gives 0.

    Edge cases: a target probability of exactly 0 contributes exactly 0 even where the logit
    is ``-inf`` (masked classes; PyTorch's probability-target path gives NaN there,
    PITFALLS 4). With label smoothing every class has target mass, so a ``-inf`` logit makes
    the loss +inf, as in PyTorch. Logits of 1e4 do not overflow. NaN propagates.

    Reference: ``torch.nn.functional.cross_entropy``; ``optax.softmax_cross_entropy`` and
    ``optax.softmax_cross_entropy_with_integer_labels`` (no weights, no ignore_index).

    >>> round(float(softmax_cross_entropy([[0.0, 0.0, 0.0]], [2])), 6)  # ln 3
    1.098612
    """
    parts = softmax_cross_entropy_parts(
        logits, target, axis=axis, weight=weight, ignore_index=ignore_index,
        label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
        reduction=reduction, validate=validate,
    )
    xp = parts.xp
    zero = parts.target == 0
    safe_log_probs = xp.where(zero, 0.0, parts.log_probs)
    per_row = -xp.sum(xp.where(zero, 0.0, parts.target * safe_log_probs), axis=-1)
    if parts.z_loss:
        z_term = parts.z_loss * parts.lse**2
        per_row = per_row + (z_term if parts.row_mask is None else z_term * parts.row_mask)
    out = _reduce(xp, per_row, parts.reduction, parts.denominator)
    return restore_dtype(xp, out, parts.dtype)


def _elementwise_prep(xp, logits, target, weight, reduction, name="logits"):
    _checks.check_reduction(reduction)
    _checks.check_floating(xp, logits, name)
    _checks.check_same_shape(logits, target, name, "target")
    if weight is not None:
        _checks.check_broadcastable(weight, tuple(logits.shape), "weight", name)
    return to_float(xp, logits)


def _as_target(xp, target, like_x, validate):
    target = xp.astype(target, like_x.dtype) if target.dtype != like_x.dtype else target
    if validate:
        _checks.check_in_unit_interval(xp, target, "target")
    return target


def _elementwise_reduce(xp, loss, reduction):
    if reduction == "none":
        return loss
    return xp.sum(loss) if reduction == "sum" else xp.mean(loss)


def binary_cross_entropy(
    probs: Any,
    target: Any,
    *,
    weight: Any = None,
    reduction: str = "mean",
    validate: bool = True,
) -> Array:
    """Binary cross-entropy from probabilities, elementwise:
    ``l = -w * (t * log q + (1 - t) * log(1 - q))``.

    The article's ``c = p0 log(1/q0) + (1 - p0) log(1/(1 - q0))`` with truth ``t = p0`` and
    prediction ``q = q0``. Each log is clamped at -100, as PyTorch does, so a probability of
    exactly 0 or 1 gives a finite loss (at most 100 per element) instead of inf; Keras clips
    q to [1e-7, 1 - 1e-7] and scikit-learn's ``log_loss`` to the dtype's eps instead
    (PITFALLS 5). ``log(1 - q)`` is computed as ``log1p(-q)``. Prefer
    :func:`sigmoid_binary_cross_entropy` on logits: it needs no clamp.

    Shapes: ``probs`` and ``target`` equal; ``weight`` broadcasts to them. ``"mean"``
    averages over every element. Reference: ``torch.nn.functional.binary_cross_entropy``,
    ``sklearn.metrics.log_loss``.

    >>> round(float(binary_cross_entropy([0.7], [1.0])), 6)  # ln(1/0.7)
    0.356675
    """
    xp, (probs, target, weight) = arrays(probs, target, weight)
    dtype = probs.dtype
    q = _elementwise_prep(xp, probs, target, weight, reduction, "probs")
    t = _as_target(xp, target, q, validate)
    if validate:
        _checks.check_in_unit_interval(xp, q, "probs")
    # where() keeps log(0) out of both the value and the gradient; -100 is torch's clamp.
    # != (not > / <) so that a NaN probability takes the log branch and propagates.
    log_q = xp.where(q != 0, xp.clip(xp.log(xp.where(q != 0, q, 1.0)), -100.0, None), -100.0)
    log_1mq = xp.where(
        q != 1, xp.clip(xp.log1p(-xp.where(q != 1, q, 0.0)), -100.0, None), -100.0
    )
    loss = -(t * log_q + (1.0 - t) * log_1mq)
    if weight is not None:
        loss = loss * xp.astype(weight, loss.dtype)
    return restore_dtype(xp, _elementwise_reduce(xp, loss, reduction), dtype)


def _sigmoid_bce_elementwise(xp, x, t, weight, pos_weight):
    """-(pw * t * log sigmoid(x) + (1 - t) * log sigmoid(-x)) * w, stable for any x."""
    pos = t * log_sigmoid(x)
    if pos_weight is not None:
        pos = pos * xp.astype(pos_weight, x.dtype)
    loss = -(pos + (1.0 - t) * log_sigmoid(-x))
    if weight is not None:
        loss = loss * xp.astype(weight, x.dtype)
    return loss


def sigmoid_binary_cross_entropy(
    logits: Any,
    target: Any,
    *,
    weight: Any = None,
    pos_weight: Any = None,
    reduction: str = "mean",
    validate: bool = True,
) -> Array:
    """Binary cross-entropy from logits, elementwise:
    ``l = -w * (pos_weight * t * log sigmoid(x) + (1 - t) * log sigmoid(-x))``.

    Stable for any logit (``log sigmoid`` is computed without forming ``sigmoid``), so
    there is no clamp: a logit of -1000 with target 1 costs 1000, not 100.
    ``pos_weight`` (broadcast along the last axis: one per label) scales the positive
    term, trading recall for precision. ``"mean"`` averages over every element.

    Reference: ``torch.nn.functional.binary_cross_entropy_with_logits``,
    ``optax.sigmoid_binary_cross_entropy``.

    >>> round(float(sigmoid_binary_cross_entropy([0.0], [1.0])), 6)  # ln 2
    0.693147
    """
    xp, (logits, target, weight, pos_weight) = arrays(logits, target, weight, pos_weight)
    dtype = logits.dtype
    x = _elementwise_prep(xp, logits, target, weight, reduction)
    if pos_weight is not None:
        _checks.check_broadcastable(pos_weight, tuple(x.shape), "pos_weight", "logits")
    t = _as_target(xp, target, x, validate)
    loss = _sigmoid_bce_elementwise(xp, x, t, weight, pos_weight)
    return restore_dtype(xp, _elementwise_reduce(xp, loss, reduction), dtype)


def multilabel_cross_entropy(
    logits: Any,
    targets: Any,
    *,
    weight: Any = None,
    pos_weight: Any = None,
    reduction: str = "mean",
    validate: bool = True,
) -> Array:
    """Multi-label cross-entropy: the SUM over labels of each label's binary cross-entropy,
    ``l_n = sum_j bce(x_nj, t_nj)``, then reduced over samples.

    The article's definition for multi-label classification (several labels true at once,
    each an independent sigmoid). Shapes: ``logits`` and ``targets`` (..., L), labels on
    the last axis; ``"none"`` returns shape (...). Conversions (PITFALLS 8): PyTorch's
    ``BCEWithLogitsLoss()`` (mean over every element) equals this ``"mean"`` divided by L;
    Keras' ``binary_crossentropy`` (mean over the last axis) equals ``"none"`` divided by L.
    ``weight`` and ``pos_weight`` as in :func:`sigmoid_binary_cross_entropy`.

    Reference: ``L * torch.nn.functional.binary_cross_entropy_with_logits``.

    >>> round(float(multilabel_cross_entropy([[0.0, 0.0]], [[1.0, 0.0]])), 6)  # 2 ln 2
    1.386294
    """
    xp, (logits, targets, weight, pos_weight) = arrays(logits, targets, weight, pos_weight)
    if logits.ndim == 0:
        raise ValueError("logits must have a label axis (the last one); got a 0-d array")
    dtype = logits.dtype
    x = _elementwise_prep(xp, logits, targets, weight, reduction)
    if pos_weight is not None:
        _checks.check_broadcastable(pos_weight, tuple(x.shape), "pos_weight", "logits")
    t = _as_target(xp, targets, x, validate)
    per_sample = xp.sum(_sigmoid_bce_elementwise(xp, x, t, weight, pos_weight), axis=-1)
    return restore_dtype(xp, _elementwise_reduce(xp, per_sample, reduction), dtype)


def sigmoid_focal_loss(
    logits: Any,
    target: Any,
    *,
    alpha: float | None = 0.25,
    gamma: float = 2.0,
    reduction: str = "mean",
    validate: bool = True,
) -> Array:
    """Focal loss (Lin et al. 2017, arXiv:1708.02002), elementwise on logits:
    ``l = alpha_t * (1 - p_t)^gamma * bce(x, t)`` with ``p = sigmoid(x)``,
    ``p_t = p t + (1 - p)(1 - t)`` and ``alpha_t = alpha t + (1 - alpha)(1 - t)``.

    Down-weights easy examples so that training focuses on hard ones; ``gamma = 0`` and
    ``alpha = None`` give plain sigmoid binary cross-entropy. Defaults are the paper's and
    torchvision's (alpha = 0.25, gamma = 2); optax's default is alpha = None (PITFALLS 10).
    Unlike torchvision (default ``"none"``), the default reduction is ``"mean"`` over every
    element, like every crossent loss. ``1 - p_t`` is computed as
    ``t sigmoid(-x) + (1 - t) sigmoid(x)``, exact for confident predictions where
    ``1 - p_t`` would round to 0.

    Reference: ``torchvision.ops.sigmoid_focal_loss``, ``optax.sigmoid_focal_loss``.

    >>> round(float(sigmoid_focal_loss([0.0], [1.0], alpha=None, gamma=0.0)), 6)  # ln 2
    0.693147
    """
    if alpha is not None:
        alpha = _checks.check_fraction(alpha, "alpha")
    gamma = _checks.check_nonnegative(gamma, "gamma")
    xp, (logits, target) = arrays(logits, target)
    dtype = logits.dtype
    x = _elementwise_prep(xp, logits, target, None, reduction)
    t = _as_target(xp, target, x, validate)
    bce = _sigmoid_bce_elementwise(xp, x, t, None, None)
    one_minus_pt = t * xp.exp(log_sigmoid(-x)) + (1.0 - t) * xp.exp(log_sigmoid(x))
    loss = bce if gamma == 0 else bce * one_minus_pt**gamma
    if alpha is not None:
        loss = loss * (alpha * t + (1.0 - alpha) * (1.0 - t))
    return restore_dtype(xp, _elementwise_reduce(xp, loss, reduction), dtype)
