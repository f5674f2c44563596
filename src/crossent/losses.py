"""Cross-entropy losses: softmax (multi-class), binary, multi-label and focal.

Where PyTorch has the same argument, these give PyTorch's answer (tests compare against
``torch.nn.functional``); where PyTorch has no opinion, optax's. Every loss takes
``reduction="mean" | "sum" | "none"``, accepts float16/bfloat16 inputs (computed in float32
inside, returned in the input's dtype, PITFALLS 6) and propagates NaN from its inputs. An
input and a floating target of mixed precision promote as torch and NumPy do (bfloat16
logits with a float32 target: float32); a list, a number or another library's array takes
the input's dtype (:func:`crossent._array.promoted_dtype`).
``validate=False`` skips the value checks (class ranges, probability ranges and sums),
which cost a device synchronisation on accelerators and cannot run under ``jax.jit``.
The losses are in nats (natural log), as every framework's; they take no ``base`` (the
measures in :mod:`crossent.measures` do: divide a loss by ``ln 2`` for bits).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np
from array_api_compat import device, is_jax_array

from . import _checks
from ._array import (
    Array,
    any_true,
    arrays,
    as_array,
    gradient_dtype,
    is_integer,
    like,
    move_axis_last,
    normalize_axis,
    numel,
    past_integer_range,
    promoted,
    restore_dtype,
    silent_infinities,
    stop_gradient,
    to_float,
    wide_integer,
)
from .activations import log_sigmoid, log_softmax_rows
from .errors import InputError

__all__ = ["binary_cross_entropy", "categorical_focal_loss", "multilabel_cross_entropy",
           "nll_loss", "poly1_cross_entropy", "sigmoid_binary_cross_entropy",
           "sigmoid_focal_loss", "softmax_cross_entropy", "softmax_focal_loss"]


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
    z_loss: Any  # a float, or a traced JAX scalar under jit
    softcap: float | None
    reduction: str
    row_weight: Array | None = None  # each row's share of `denominator` (None: 1 per row)
    class_mask: Array | None = None  # where's class mask, class axis last (None: none)
    row_where: Array | None = None  # the rows where keeps (None: all)
    logits_dtype: Any = None  # the caller's logits' (a gradient's); dtype: the loss's


def softmax_cross_entropy_parts(
    logits: Any,
    target: Any,
    *,
    axis: int = -1,
    weight: Any = None,
    where: Any = None,
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
    ignore_index = _checks.check_integer(ignore_index, "ignore_index")
    validate = _checks.check_bool(validate, "validate")
    given = logits, target
    xp, (logits, target, weight) = arrays(
        logits, target, weight, names=("logits", "target", "weight"), optional=("weight",)
    )
    _checks.check_floating(xp, logits, "logits")
    _checks.check_has_axis(logits, "logits")
    axis = normalize_axis(axis, logits.ndim)
    _checks.check_classes(logits, axis, "logits")
    wide = promoted(xp, logits, target, *given)  # bfloat16 logits, float32 target: float32
    logits_dtype = gradient_dtype(xp, logits, wide, given[0])
    logits = wide
    dtype = logits.dtype
    raw = move_axis_last(xp, to_float(xp, logits), axis)
    _checks.check_softcap_fits(softcap, xp.finfo(raw.dtype), raw.dtype)
    class_mask, row_where = class_or_row_where(xp, where, logits, axis, "logits")
    keep = _kept_entries(xp, raw, class_mask, row_where)
    if keep is not None:  # masked logits (NaN, inf) reach no value and no gradient
        raw = xp.where(keep, raw, 0.0)
    z = raw if softcap is None else softcap * xp.tanh(raw / softcap)  # a float or traced
    if weight is not None:
        weight = _class_weight(xp, to_float(xp, weight), z, "weight")
    if class_mask is not None:  # masked classes leave the normaliser
        z = _mask_classes(xp, z, class_mask, row_where)
    # log softmax as (z - m) - log1p(rest): exact near 0 for a confident correct row
    log_probs, lse = log_softmax_rows(xp, z, -1)
    row_weight = None
    if is_integer(xp, target):
        eff, row_mask, denominator, row_weight = _index_target(
            xp, z, target, weight, ignore_index, eps, validate, logits.shape, axis, class_mask,
            row_where,
        )
    elif xp.isdtype(target.dtype, "real floating"):
        check_no_ignore_index(ignore_index)
        eff, denominator = _probability_target(xp, z, target, weight, eps, validate, logits, axis)
        row_mask = None
    else:
        raise InputError(
            f"target must hold integer class indices or floating probabilities, got dtype "
            f"{target.dtype}"
        )
    if keep is not None:  # target mass on a masked class or row contributes nothing (optax)
        eff = xp.where(keep, eff, 0.0)
    return SoftmaxCEParts(
        xp, dtype, axis, raw, z, eff, row_mask, xp.squeeze(lse, axis=-1), log_probs,
        denominator, z_loss, softcap, reduction, row_weight,
        class_mask, row_where, logits_dtype,
    )


def check_no_ignore_index(ignore_index: int) -> None:
    """Probability targets take no ``ignore_index`` >= 0 (torch raises too; a negative one
    is the "not used" default)."""
    if ignore_index >= 0:
        raise InputError(
            f"ignore_index={ignore_index} applies to class-index targets; probability "
            f"targets have no rows to ignore (give ignored rows weight 0 instead)"
        )


def class_or_row_where(
    xp: Any, where: Any, x: Array, axis: int, name: str
) -> tuple[Array | None, Array | None]:
    """``(class_mask, row_where)`` from the boolean ``where`` of a class-axis loss on ``x``.

    The rule (optax's): a ``where`` with as many dimensions as ``x`` is a class mask in
    ``x``'s layout (class axis ``axis``), broadcast against ``x``; it is returned broadcast
    and moved to put the class axis last, with ``row_where`` the rows that keep at least
    one class. Any other ``where`` is a row mask, broadcast against the per-example loss
    (``x``'s shape without the class axis): ``(None, where)``. None gives ``(None, None)``.
    """
    if where is None:
        return None, None
    mask = like(xp, as_array(where, "where"), x, name="where")
    _checks.check_mask(xp, mask)
    shape = tuple(x.shape)
    rows = shape[:axis] + shape[axis + 1 :]
    try:
        _checks.check_broadcastable(mask, shape if mask.ndim == len(shape) else rows, "where", "")
    except InputError:
        raise InputError(
            f"where has shape {tuple(mask.shape)}: a row mask must broadcast to the "
            f"per-example loss's shape {rows}, a class mask (as many dimensions as {name}) "
            f"to {name} shape {shape}"
        ) from None
    if mask.ndim != len(shape):
        return None, mask
    mask = move_axis_last(xp, xp.broadcast_to(mask, shape), axis)
    return mask, xp.any(mask, axis=-1)


def _kept_entries(
    xp: Any, x: Array, class_mask: Array | None, row_where: Array | None
) -> Array | None:
    """The entries of ``x`` (class axis last) that ``where`` keeps, as a boolean mask
    broadcastable to ``x`` (None: all). The losses replace the others by a finite
    stand-in before any arithmetic: ``where(m, f(x), 0)`` alone has a NaN gradient where
    ``x`` is NaN (0 times NaN), JAX's ``where`` trap; optax's and ``jax.nn``'s gradients
    are 0 there."""
    if class_mask is not None:
        return class_mask
    if row_where is None:
        return None
    return xp.expand_dims(xp.broadcast_to(row_where, tuple(x.shape[:-1])), axis=-1)


def _mask_classes(xp: Any, z: Array, class_mask: Array, live: Array) -> Array:
    """Logits (class axis last) with the masked classes at ``-inf``, out of the softmax's
    normaliser; a row with no class kept is all 0, a finite stand-in (the caller drops the
    row), so that no NaN reaches the value or the gradient."""
    z = xp.where(class_mask, z, -math.inf)
    return xp.where(xp.expand_dims(live, axis=-1), z, 0.0)


def _index_hot(xp, z, target, ignore_index, validate, shape, axis):
    """``(hot, valid)``: the one-hot mask of the class-index ``target`` (False on ignored
    rows), class axis last, and the rows not equal to ``ignore_index``; checks the
    target's shape and (with ``validate``) its range."""
    expected = tuple(shape[:axis]) + tuple(shape[axis + 1 :])
    if tuple(target.shape) != expected:
        raise InputError(
            f"target has shape {tuple(target.shape)} but logits of shape {tuple(shape)} with "
            f"class axis {axis} need class indices of shape {expected}"
        )
    num_classes = z.shape[-1]
    target, valid = widened_and_counted(xp, target, ignore_index)
    if validate and numel(target):
        bad = valid & ((target < 0) | (target >= num_classes))
        if any_true(xp, bad):
            high = bad & (target >= 0)
            value = int(xp.max(xp.where(high, target, xp.zeros_like(target)))
                        if any_true(xp, high)
                        else xp.min(xp.where(bad, target, xp.zeros_like(target))))
            raise InputError(
                f"target holds class index {value}, outside [0, {num_classes}) and not "
                f"ignore_index={ignore_index}"
            )
    classes = xp.arange(num_classes, dtype=target.dtype, device=device(target))
    hot = (xp.expand_dims(target, axis=-1) == classes) & xp.expand_dims(valid, axis=-1)
    return hot, valid


def widened_and_counted(xp: Any, target: Array, ignore_index: int) -> tuple[Array, Array]:
    """Class indices in a dtype that holds every class index and ``ignore_index`` (in
    uint8, -100 is 156 and class 257 is class 1), and the mask of rows not ignored."""
    wide = wide_integer(xp, target)
    info = xp.iinfo(wide)
    # uint64 (uint32 for JAX without x64); a traced target (jax.jit, validate=False) has
    # no values to read: its ids are taken as valid, as the range check skips them
    if not _checks.is_traced(target) and past_integer_range(xp, target, info):
        raise InputError(f"target holds class ids past {info.max}, the largest {wide} the "
                         f"indices are compared in: no vocabulary has that many classes "
                         f"(the cast would wrap them, one onto ignore_index)")
    target = xp.astype(target, wide)
    if info.min <= ignore_index <= info.max:
        return target, target != ignore_index
    # no target value can equal it
    return target, xp.ones(target.shape, dtype=xp.bool, device=device(target))


def _index_target(xp, z, target, weight, ignore_index, eps, validate, shape, axis,
                  class_mask=None, live=None):
    hot, valid = _index_hot(xp, z, target, ignore_index, validate, shape, axis)
    if validate and class_mask is not None:
        _check_target_class_kept(xp, hot, class_mask, live)
    num_classes = z.shape[-1]
    row_mask = xp.astype(valid, z.dtype)
    w = weight if weight is not None else xp.ones_like(z[..., 0:1])
    hot_w = xp.where(hot, w, 0.0)
    eff = (1.0 - eps) * hot_w
    if not _checks.is_zero(eps):
        eff = eff + (eps / num_classes) * w * xp.expand_dims(row_mask, axis=-1)
    row_weight = xp.sum(hot_w, axis=-1) if weight is not None else row_mask
    return eff, row_mask, xp.sum(row_weight), row_weight


def _check_target_class_kept(xp: Any, hot: Array, class_mask: Array, live: Array) -> None:
    """No class-index target names a class that ``where`` masks out of a row it keeps: that
    class has probability 0 there, and optax's two losses disagree on it (the index one
    scores ``logsumexp(kept) - z_y``, the one-hot one drops the term)."""
    bad = hot & ~class_mask & xp.expand_dims(live, axis=-1)
    if numel(bad) and any_true(xp, bad):
        classes = xp.arange(bad.shape[-1], device=device(bad))
        first = int(xp.min(xp.where(bad, classes, bad.shape[-1])))
        raise InputError(
            f"target holds class index {first} in a row whose where mask excludes that class "
            f"(a masked class has probability 0); keep the class, mask the whole row, or "
            f"pass validate=False to drop the target's term as for a probability target"
        )


def _probability_target(xp, z, target, weight, eps, validate, logits, axis, name="logits"):
    _checks.check_same_shape(logits, target, name, "target")
    target_dtype = target.dtype
    target = xp.astype(move_axis_last(xp, target, axis), z.dtype)
    if validate:
        _checks.check_distribution(xp, target, "target", -1, target_dtype)
    num_classes = z.shape[-1]
    eff = target if _checks.is_zero(eps) else (1.0 - eps) * target + eps / num_classes
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


def _reduce_softmax_rows(per_row: Array, parts: Any, sample_weight: Any) -> Array:
    """:func:`_reduce_rows` with the rows, masks, weights and reduction of ``parts``."""
    counted = None if parts.row_mask is None else parts.row_mask > 0
    return _reduce_rows(
        parts.xp, per_row, sample_weight, parts.row_where, parts.raw, parts.row_weight,
        parts.denominator, counted, parts.reduction, parts.dtype,
    )


def _reduce_rows(
    xp: Any, per_row: Array, sample_weight: Any, where: Any, ref: Array,
    row_weight: Array | None, denominator: Any, counted: Array | None, reduction: str,
    dtype: Any,
) -> Array:
    """The end every class-axis loss shares: sample weights and the ``where`` mask (see
    :func:`_sample_weighted`), rows outside the boolean ``counted`` (ignored targets; None:
    none) set to exactly 0 (even NaN logits), the reduction, the caller's ``dtype``."""
    per_row, denominator = _sample_weighted(
        xp, per_row, sample_weight, ref, row_weight, denominator, where
    )
    if counted is not None:  # ignored rows contribute nothing, even NaN logits
        per_row = xp.where(counted, per_row, 0.0)
    return restore_dtype(xp, _reduce(xp, per_row, reduction, denominator), dtype)


def _sample_weighted(
    xp: Any, per_item: Array, sample_weight: Any, ref: Array, item_weight: Array | None,
    denominator: Any, where: Any = None,
) -> tuple[Array, Any]:
    """Per-example losses times ``sample_weight`` and zeroed outside the mask ``where``
    (both broadcast against them; a masked NaN too), and the "mean" denominator of
    :func:`example_weights`. Neither given: both unchanged."""
    mask, sw, denominator = example_weights(
        xp, sample_weight, where, ref, tuple(per_item.shape), item_weight, denominator
    )
    if sw is not None:
        per_item = per_item * sw
    if mask is not None:  # masked entries contribute nothing, even NaN ones
        per_item = xp.where(mask, per_item, 0.0)
    return per_item, denominator


def example_weights(
    xp: Any, sample_weight: Any, where: Any, ref: Array, shape: tuple[int, ...],
    item_weight: Array | None, denominator: Any,
) -> tuple[Array | None, Array | None, Any]:
    """``(mask, sw, denominator)`` for per-example losses of ``shape``: the boolean
    ``where`` and ``sample_weight`` broadcast to it (``sw`` in ``ref``'s dtype; None where
    not given), and the "mean" denominator ``sum_n s_n * m_n * item_weight_n``
    (``item_weight``: each example's share of the unweighted denominator, None for 1
    each), as scikit-learn's ``log_loss`` and Keras divide by the summed sample weights and
    optax counts only unmasked entries. Neither given: ``denominator`` unchanged. The
    losses and their analytic gradients share it."""
    if sample_weight is None and where is None:
        return None, None, denominator
    if item_weight is None:
        share = xp.ones(shape, dtype=ref.dtype, device=device(ref))
    else:
        share = xp.broadcast_to(item_weight, shape)
    mask = sw = None
    if where is not None:
        mask = _mask(xp, where, ref, shape)
        share = xp.where(mask, share, 0.0)
    if sample_weight is not None:
        sw = like(xp, as_array(sample_weight, "sample_weight"), ref, name="sample_weight")
        _checks.check_broadcastable(sw, shape, "sample_weight", "the per-example loss")
        sw = xp.broadcast_to(xp.astype(sw, ref.dtype), shape)
        if mask is not None:  # a masked example's weight (even NaN, inf) counts nowhere
            sw = xp.where(mask, sw, 0.0)
        share = share * sw
    return mask, sw, xp.sum(share)


@silent_infinities
def softmax_cross_entropy(
    logits: Any,
    target: Any,
    *,
    axis: int = -1,
    weight: Any = None,
    sample_weight: Any = None,
    where: Any = None,
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
            a real class id, that class still sits in the softmax denominator. With
            probability targets an ``ignore_index >= 0`` raises, as in torch.
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
        * all rows ignored or masked out by ``where`` (or an empty batch) with ``"mean"``:
          NaN (0/0), as PyTorch gives on purpose; Keras and optax give 0 (PITFALLS 2).
          ``"sum"`` gives 0.

    Edge cases: a target probability of exactly 0 contributes exactly 0 even where the logit
    is ``-inf`` (classes masked by hand; PyTorch's probability-target path gives NaN there,
    PITFALLS 4). Class-index targets follow the same rule on their effective target
    ``((1 - eps) e_y + eps / C) w``: where that mass is 0 (a zero class weight) a ``-inf``
    logit contributes 0, where PyTorch's index path gives NaN (``0 * inf``). Where the
    mass is positive a ``-inf`` logit makes the loss +inf, as in PyTorch, except at
    ``label_smoothing=1``: every class then has mass ``w_c / C`` and the loss is +inf,
    where PyTorch's ``(1 - eps) * nll`` is ``0 * inf``, NaN. Logits of 1e4 do not overflow.
    NaN propagates.

    ``sample_weight`` (optional) multiplies each example's loss, broadcast against the
    per-example losses (``"none"``'s shape); ``"mean"`` then divides by the summed sample
    weights (times each example's class weight / counted-row share), as scikit-learn's
    ``log_loss`` and Keras do.

    ``where`` (optional boolean mask). Its number of dimensions tells its two kinds apart,
    as in ``optax.softmax_cross_entropy``:

    * fewer dimensions than ``logits``: a row mask, broadcast against the per-example
      losses (``"none"``'s shape). Masked-out rows contribute 0 (even a NaN) and are not
      counted by ``"mean"``.
    * as many dimensions as ``logits`` (class axis ``axis``): a class mask, broadcast
      against ``logits``. Masked-out classes leave the softmax's normaliser (as ``-inf``
      logits, whatever they hold) and their target entries contribute nothing:
      ``l_n = -sum_{c kept} T_nc log softmax_kept(z_n)_c``, the same number as optax's
      ``softmax_cross_entropy(z, t, where=m)``; ``z_loss`` uses the kept classes'
      logsumexp. A row with no class kept is a masked-out row (0, not counted); a row with
      a class kept counts in ``"mean"`` as without a mask. Label smoothing first spreads
      ``eps / C`` over all C classes, then the masked ones are dropped (optax's
      ``smooth_labels`` then its loss). A class-index target naming a masked class of a
      kept row raises with ``validate=True`` (optax's index-label loss scores it
      ``logsumexp(kept) - z_y``, its one-hot loss drops it); with ``validate=False`` its
      term is dropped, as a probability target's mass there is.

    So a ``(C,)`` mask on ``(N, C)`` logits is a row mask, even when ``N == C``; a class
    mask shared by every row keeps the batch axes as size 1 (``m[None, :]``).
    :func:`crossent.log_softmax` with the same class mask gives the log-probabilities used.

    Reference: ``torch.nn.functional.cross_entropy``; ``optax.softmax_cross_entropy`` and
    ``optax.softmax_cross_entropy_with_integer_labels`` (no weights, no ignore_index).

    >>> round(float(softmax_cross_entropy([[0.0, 0.0, 0.0]], [2])), 6)  # ln 3
    1.098612
    >>> keep = [[True, False, True]]  # class 1 leaves the softmax: ln 2
    >>> round(float(softmax_cross_entropy([[0.0, 9.0, 0.0]], [2], where=keep)), 6)
    0.693147
    """
    parts = softmax_cross_entropy_parts(
        logits, target, axis=axis, weight=weight, where=where, ignore_index=ignore_index,
        label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
        reduction=reduction, validate=validate,
    )
    xp = parts.xp
    per_row = -xp.sum(parts.target * safe_log_probs(xp, parts), axis=-1)
    if not _checks.is_zero(parts.z_loss):
        per_row = per_row + parts.z_loss * parts.lse**2
    return _reduce_softmax_rows(per_row, parts, sample_weight)


def safe_log_probs(xp: Any, parts: SoftmaxCEParts) -> Array:
    """log softmax with ``-inf`` replaced by 0 where the target is 0 (0 log 0 = 0).

    Only that case is replaced, so a zero target keeps its true gradient ``-log p_c``
    (distillation through a trainable teacher needs it, as torch and optax give it).
    """
    masked = (parts.target == 0) & (parts.log_probs == -math.inf)
    return parts.xp.where(masked, 0.0, parts.log_probs)


def _mask(xp: Any, where: Any, ref: Array, shape: tuple[int, ...]) -> Array:
    """The boolean mask ``where`` broadcast to the per-example loss's ``shape``
    (``InputError`` naming ``where`` otherwise)."""
    mask = like(xp, as_array(where, "where"), ref, name="where")
    _checks.check_mask(xp, mask)
    _checks.check_broadcastable(mask, shape, "where", "the per-example loss")
    return xp.broadcast_to(mask, shape)


def _elementwise_prep(xp, logits, target, weight, reduction, name="logits", target_name="target"):
    _checks.check_reduction(reduction)
    _checks.check_floating(xp, logits, name)
    _checks.check_same_shape(logits, target, name, target_name)
    if weight is not None:
        _checks.check_broadcastable(weight, tuple(logits.shape), "weight", name)
    return to_float(xp, logits)


def _as_target(xp, target, like_x, validate, name="target", label_smoothing=0.0):
    if not xp.isdtype(target.dtype, ("bool", "integral", "real floating")):
        raise InputError(f"{name} must hold numbers in [0, 1], got dtype {target.dtype}")
    target = xp.astype(target, like_x.dtype) if target.dtype != like_x.dtype else target
    if _checks.check_bool(validate, "validate"):
        _checks.check_in_unit_interval(xp, target, name)
    return smooth_binary(target, label_smoothing)


def smooth_binary(t: Array, label_smoothing: Any) -> Array:
    """Keras' binary label smoothing ``t (1 - a) + a / 2``: both classes move towards 1/2."""
    if _checks.is_zero(label_smoothing):
        return t
    return t * (1.0 - label_smoothing) + 0.5 * label_smoothing


def _kept_elementwise(xp: Any, where: Any, x: Array, t: Array, fill: float) -> tuple[Array, Array]:
    """``x`` and ``t`` with the entries the elementwise mask ``where`` drops replaced by
    ``fill`` and 0, finite stand-ins, so that a NaN or inf there reaches neither the value
    nor the gradient (see :func:`_kept_entries`); no ``where``: both unchanged."""
    if where is None:
        return x, t
    mask = _mask(xp, where, x, tuple(x.shape))
    return xp.where(mask, x, fill), xp.where(mask, t, 0.0)


def _elementwise_reduce(xp, loss, reduction, sample_weight=None, where=None):
    if sample_weight is not None or where is not None:
        loss, denominator = _sample_weighted(xp, loss, sample_weight, loss, None, None, where)
        return _reduce(xp, loss, reduction, denominator)
    if reduction == "none":
        return loss
    return xp.sum(loss) if reduction == "sum" else xp.mean(loss)


@silent_infinities
def binary_cross_entropy(
    probs: Any,
    target: Any,
    *,
    weight: Any = None,
    sample_weight: Any = None,
    where: Any = None,
    label_smoothing: float = 0.0,
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
    averages over every element.
    ``label_smoothing`` a in [0, 1] first replaces the target by ``t (1 - a) + a / 2``
    (Keras' ``label_smoothing`` of its binary losses).
    ``sample_weight`` (optional) multiplies each example's loss, broadcast against the
    per-example losses (``"none"``'s shape); ``"mean"`` then divides by the summed sample
    weights (times each example's class weight / counted-row share), as scikit-learn's
    ``log_loss`` and Keras do.

    ``where`` (optional boolean mask, broadcast against the elementwise loss): masked-out
    entries contribute 0 (even a NaN) and are not counted by ``"mean"`` (optax's ``where``).

    Reference: ``torch.nn.functional.binary_cross_entropy``,
    ``sklearn.metrics.log_loss``.

    >>> round(float(binary_cross_entropy([0.7], [1.0])), 6)  # ln(1/0.7)
    0.356675
    """
    given = probs, target
    xp, (probs, target, weight) = arrays(
        probs, target, weight, names=("probs", "target", "weight"), optional=("weight",)
    )
    probs = promoted(xp, probs, target, *given)
    dtype = probs.dtype
    label_smoothing = _checks.check_fraction(label_smoothing, "label_smoothing")
    q = _elementwise_prep(xp, probs, target, weight, reduction, "probs")
    t = _as_target(xp, target, q, validate, label_smoothing=label_smoothing)
    if validate:
        _checks.check_in_unit_interval(xp, q, "probs")
    q, t = _kept_elementwise(xp, where, q, t, 0.5)
    loss = _bce_elementwise(xp, q, t)
    if weight is not None:
        loss = loss * xp.astype(weight, loss.dtype)
    return restore_dtype(xp, _elementwise_reduce(xp, loss, reduction, sample_weight, where), dtype)


TORCH_BCE_EPSILON = float(np.float32(1e-12))
"""torch's binary_cross_entropy backward divides by ``max(q (1 - q), 1e-12)``, its 1e-12
a C++ float (9.99999996e-13) in every dtype."""


def _bce_elementwise(xp: Any, q: Array, t: Array) -> Array:
    """``-(t log q + (1 - t) log(1 - q))`` with PyTorch's value and PyTorch's gradient.

    Where ``q (1 - q) >= 1e-12`` both are the formula's. Nearer 0 and 1 (the edge) torch
    clamps each log at -100 for the value and, for the gradient, floors the denominator of
    ``dl/dq = (q - t) / (q (1 - q))`` at 1e-12 (so ``q = 0, t = 1`` gives -1e12, not 0) and
    keeps ``dl/dt = log(1 - q) - log q`` unclamped. The edge value is therefore built as
    ``value + (q - sg(q)) dq + (t - sg(t)) dt`` with ``sg`` = stop_gradient: the same number,
    torch's first derivatives. At q exactly 0 or 1 torch's ``dl/dt`` is infinite; here it
    is the clamped logs' difference (+-100), docs/pitfalls.md.
    """
    edge = (q * (1.0 - q) < TORCH_BCE_EPSILON) & (q >= 0) & (q <= 1)
    # away from the edge: the plain formula (exact derivatives of every order)
    qs = xp.where(edge, 0.5, q)
    regular = -(t * xp.log(qs) + (1.0 - t) * xp.log1p(-qs))
    # at the edge: log(0) kept out of the value and the gradient, -100 is torch's clamp
    qe = stop_gradient(xp.where(edge, q, 0.5))
    te = stop_gradient(t)
    log_q = xp.where(qe > 0, xp.log(xp.where(qe > 0, qe, 1.0)), -100.0)
    log_1mq = xp.where(qe < 1, xp.log1p(-xp.where(qe < 1, qe, 0.0)), -100.0)
    value = -(te * xp.clip(log_q, -100.0, None) + (1.0 - te) * xp.clip(log_1mq, -100.0, None))
    d_q = (qe - te) / TORCH_BCE_EPSILON
    d_t = log_1mq - log_q
    at_edge = value + (q - qe) * d_q + (t - te) * d_t
    return xp.where(edge, at_edge, regular)


def _sigmoid_bce_elementwise(xp, x, t, weight, pos_weight):
    """-(pw * t * log sigmoid(x) + (1 - t) * log sigmoid(-x)) * w, stable for any x."""
    pos = t * log_sigmoid(x)
    if pos_weight is not None:
        pos = pos * xp.astype(pos_weight, x.dtype)
    loss = -(pos + (1.0 - t) * log_sigmoid(-x))
    if weight is not None:
        loss = loss * xp.astype(weight, x.dtype)
    return loss


@silent_infinities
def sigmoid_binary_cross_entropy(
    logits: Any,
    target: Any,
    *,
    weight: Any = None,
    sample_weight: Any = None,
    where: Any = None,
    pos_weight: Any = None,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    validate: bool = True,
) -> Array:
    """Binary cross-entropy from logits, elementwise:
    ``l = -w * (pos_weight * t * log sigmoid(x) + (1 - t) * log sigmoid(-x))``.

    Stable for any logit (``log sigmoid`` is computed without forming ``sigmoid``), so
    there is no clamp: a logit of -1000 with target 1 costs 1000, not 100.
    ``pos_weight`` (broadcast along the last axis: one per label) scales the positive
    term, trading recall for precision. ``"mean"`` averages over every element.
    ``label_smoothing`` a in [0, 1] first replaces the target by ``t (1 - a) + a / 2``
    (Keras' ``label_smoothing`` of its binary losses).

    ``sample_weight`` (optional) multiplies each example's loss, broadcast against the
    per-example losses (``"none"``'s shape); ``"mean"`` then divides by the summed sample
    weights (times each example's class weight / counted-row share), as scikit-learn's
    ``log_loss`` and Keras do.

    ``where`` (optional boolean mask, broadcast against the elementwise loss): masked-out
    entries contribute 0 (even a NaN) and are not counted by ``"mean"`` (optax's ``where``).

    Reference: ``torch.nn.functional.binary_cross_entropy_with_logits``,
    ``optax.sigmoid_binary_cross_entropy``.

    >>> round(float(sigmoid_binary_cross_entropy([0.0], [1.0])), 6)  # ln 2
    0.693147
    """
    given = logits, target
    xp, (logits, target, weight, pos_weight) = arrays(
        logits, target, weight, pos_weight, names=("logits", "target", "weight", "pos_weight"),
        optional=("weight", "pos_weight"),
    )
    logits = promoted(xp, logits, target, *given)
    dtype = logits.dtype
    x = _elementwise_prep(xp, logits, target, weight, reduction)
    if pos_weight is not None:
        _checks.check_broadcastable(pos_weight, tuple(x.shape), "pos_weight", "logits")
    t = _as_target(xp, target, x, validate,
                   label_smoothing=_checks.check_fraction(label_smoothing, "label_smoothing"))
    x, t = _kept_elementwise(xp, where, x, t, 0.0)
    loss = _sigmoid_bce_elementwise(xp, x, t, weight, pos_weight)
    return restore_dtype(xp, _elementwise_reduce(xp, loss, reduction, sample_weight, where), dtype)


@silent_infinities
def multilabel_cross_entropy(
    logits: Any,
    targets: Any,
    *,
    weight: Any = None,
    sample_weight: Any = None,
    where: Any = None,
    pos_weight: Any = None,
    label_smoothing: float = 0.0,
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
    ``weight``, ``pos_weight`` and ``label_smoothing`` as in
    :func:`sigmoid_binary_cross_entropy`.

    ``sample_weight`` (optional) multiplies each example's loss, broadcast against the
    per-example losses (``"none"``'s shape); ``"mean"`` then divides by the summed sample
    weights (times each example's class weight / counted-row share), as scikit-learn's
    ``log_loss`` and Keras do.

    ``where`` (optional boolean mask), by its number of dimensions as on the softmax
    losses: fewer than ``logits``: a sample mask, broadcast against the per-sample losses
    (masked samples contribute 0, even a NaN, and are not counted by ``"mean"``); as many
    as ``logits``: a label mask, broadcast against ``logits`` (masked labels leave the sum
    over labels, ``l_n = sum_{j kept} bce(x_nj, t_nj)``; a sample with no label kept is a
    masked sample).

    Reference: ``L * torch.nn.functional.binary_cross_entropy_with_logits``.

    >>> round(float(multilabel_cross_entropy([[0.0, 0.0]], [[1.0, 0.0]])), 6)  # 2 ln 2
    1.386294
    """
    given = logits, targets
    xp, (logits, targets, weight, pos_weight) = arrays(
        logits, targets, weight, pos_weight, names=("logits", "targets", "weight", "pos_weight"),
        optional=("weight", "pos_weight"),
    )
    _checks.check_has_axis(logits, "logits", "label")
    logits = promoted(xp, logits, targets, *given)
    dtype = logits.dtype
    x = _elementwise_prep(xp, logits, targets, weight, reduction, target_name="targets")
    if pos_weight is not None:
        _checks.check_broadcastable(pos_weight, tuple(x.shape), "pos_weight", "logits")
    t = _as_target(xp, targets, x, validate, "targets",
                   _checks.check_fraction(label_smoothing, "label_smoothing"))
    label_mask, sample_where = class_or_row_where(xp, where, x, x.ndim - 1, "logits")
    keep = _kept_entries(xp, x, label_mask, sample_where)
    if keep is not None:  # masked logits (NaN, inf) reach no value and no gradient
        x, t = xp.where(keep, x, 0.0), xp.where(keep, t, 0.0)
    terms = _sigmoid_bce_elementwise(xp, x, t, weight, pos_weight)
    if label_mask is not None:  # masked labels contribute nothing, even NaN ones
        terms = xp.where(label_mask, terms, 0.0)
    per_sample = xp.sum(terms, axis=-1)
    return restore_dtype(
        xp, _elementwise_reduce(xp, per_sample, reduction, sample_weight, sample_where), dtype
    )


def _focal_factor(xp: Any, u: Array, gamma: float) -> Array:
    """``u ** gamma`` whose gradient stays finite where ``u`` underflows.

    For ``0 < gamma < 1`` the derivative ``gamma u^(gamma - 1)`` is infinite at ``u = 0``
    (a saturated correct logit), and ``inf * 0`` made the gradient NaN where its limit is 0.
    Below the smallest normal number the factor is taken as 0: the loss element there is
    ``bce * u^gamma`` with ``bce`` about ``u``, itself below the smallest normal.
    """
    tiny = float(xp.finfo(u.dtype).smallest_normal)
    live = u >= tiny
    # 0 ** gamma: 0, or 1 for a traced gamma that turns out 0 (a concrete 0 never gets here)
    dead = 0.0 if not _checks.is_traced(gamma) else xp.where(gamma == 0, 1.0, 0.0)
    return xp.where(live, xp.where(live, u, 1.0) ** gamma, dead)


@silent_infinities
def sigmoid_focal_loss(
    logits: Any,
    target: Any,
    *,
    sample_weight: Any = None,
    where: Any = None,
    alpha: float | None = 0.25,
    gamma: float = 2.0,
    label_smoothing: float = 0.0,
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
    ``label_smoothing`` a in [0, 1] first replaces the target by ``t (1 - a) + a / 2``
    (Keras' ``label_smoothing`` of its binary losses).
    ``alpha`` and ``gamma`` may be traced JAX scalars (under ``jax.jit``).

    ``sample_weight`` (optional) multiplies each example's loss, broadcast against the
    per-example losses (``"none"``'s shape); ``"mean"`` then divides by the summed sample
    weights (times each example's class weight / counted-row share), as scikit-learn's
    ``log_loss`` and Keras do.

    ``where`` (optional boolean mask, broadcast against the elementwise loss): masked-out
    entries contribute 0 (even a NaN) and are not counted by ``"mean"`` (optax's ``where``).

    Reference: ``torchvision.ops.sigmoid_focal_loss``, ``optax.sigmoid_focal_loss``.

    >>> round(float(sigmoid_focal_loss([0.0], [1.0], alpha=None, gamma=0.0)), 6)  # ln 2
    0.693147
    """
    if alpha is not None:
        alpha = _checks.check_fraction(alpha, "alpha")
    gamma = _checks.check_nonnegative(gamma, "gamma")
    label_smoothing = _checks.check_fraction(label_smoothing, "label_smoothing")
    given = logits, target
    xp, (logits, target) = arrays(logits, target, names=("logits", "target"))
    logits = promoted(xp, logits, target, *given)
    dtype = logits.dtype
    x = _elementwise_prep(xp, logits, target, None, reduction)
    t = _as_target(xp, target, x, validate, label_smoothing=label_smoothing)
    x, t = _kept_elementwise(xp, where, x, t, 0.0)
    bce = _sigmoid_bce_elementwise(xp, x, t, None, None)
    one_minus_pt = t * xp.exp(log_sigmoid(-x)) + (1.0 - t) * xp.exp(log_sigmoid(x))
    loss = bce if _checks.is_zero(gamma) else bce * _focal_factor(xp, one_minus_pt, gamma)
    if alpha is not None:
        loss = loss * (alpha * t + (1.0 - alpha) * (1.0 - t))
    return restore_dtype(xp, _elementwise_reduce(xp, loss, reduction, sample_weight, where), dtype)


@silent_infinities
def nll_loss(
    log_probs: Any,
    target: Any,
    *,
    axis: int = -1,
    weight: Any = None,
    sample_weight: Any = None,
    where: Any = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    validate: bool = True,
) -> Array:
    """Negative log-likelihood of given log-probabilities: ``l_n = -w[y_n] * log_probs[n, y_n]``.

    The second half of :func:`softmax_cross_entropy` for a caller who already holds
    log-probabilities (from :func:`crossent.log_softmax`, a log-mixture, a CRF...). The
    log-probabilities are taken as they are: nothing checks that a row's exponentials sum
    to 1 (PyTorch checks nothing either), and only the target's entry of each row is read,
    so a NaN elsewhere in the row does not reach the loss.

    Args:
        log_probs: floating array, class axis ``axis`` (default last; PyTorch's layout
            ``(N, C, d1, ...)`` is ``axis=1``).
        target: integer class indices, the shape of ``log_probs`` without the class axis.
        weight: per-class weights, shape ``(C,)``.
        ignore_index: targets equal to it contribute 0 and are not counted.
        reduction: ``"none"`` (per-row losses, ignored rows 0), ``"sum"``, or ``"mean"``:
            the sum divided by the number of non-ignored rows or, with ``weight``, by
            ``sum_n w[y_n]`` over them (NaN when that is 0, as PyTorch).

    ``sample_weight`` (optional) multiplies each example's loss, broadcast against the
    per-example losses (``"none"``'s shape); ``"mean"`` then divides by the summed sample
    weights (times each example's class weight / counted-row share), as scikit-learn's
    ``log_loss`` and Keras do.

    ``where`` (optional boolean mask, broadcast against the per-example losses): masked-out
    examples contribute 0 (even a NaN) and are not counted by ``"mean"``. A mask with as
    many dimensions as ``log_probs`` is a class mask (the softmax losses' rule); only its
    row form (size 1 on the class axis) is taken, as log-probabilities are already
    normalised: mask classes in :func:`crossent.log_softmax` instead.

    Reference: ``torch.nn.functional.nll_loss`` (``NLLLoss``).

    >>> round(float(nll_loss([[-0.5, -1.0], [-2.0, -0.25]], [0, 1])), 6)  # (0.5 + 0.25) / 2
    0.375
    """
    _checks.check_reduction(reduction)
    ignore_index = _checks.check_integer(ignore_index, "ignore_index")
    validate = _checks.check_bool(validate, "validate")
    xp, (log_probs, target, weight) = arrays(
        log_probs, target, weight, names=("log_probs", "target", "weight"), optional=("weight",)
    )
    _checks.check_floating(xp, log_probs, "log_probs")
    _checks.check_has_axis(log_probs, "log_probs")
    axis = normalize_axis(axis, log_probs.ndim)
    _checks.check_classes(log_probs, axis, "log_probs")
    if not is_integer(xp, target):
        raise InputError(f"target must hold integer class indices, got dtype {target.dtype}")
    dtype = log_probs.dtype
    lp = move_axis_last(xp, to_float(xp, log_probs), axis)
    weight = _class_weight(xp, weight, lp, "weight")
    if where is not None:
        where = as_array(where, "where")
        if where.ndim == log_probs.ndim and where.shape[axis] != 1:
            raise InputError(
                f"where has shape {tuple(where.shape)}, a class mask; nll_loss takes "
                f"log-probabilities already normalised, so it takes a row mask only (the "
                f"per-example loss's shape): mask classes in log_softmax(logits, where=...) "
                f"or softmax_cross_entropy(..., where=...)"
            )
    _, row_where = class_or_row_where(xp, where, log_probs, axis, "log_probs")
    hot, valid = _index_hot(xp, lp, target, ignore_index, validate, log_probs.shape, axis)
    w = weight if weight is not None else xp.ones_like(lp[..., 0:1])
    per_row = -xp.sum(xp.where(hot, w * lp, 0.0), axis=-1)
    if weight is not None:
        row_weight = xp.sum(xp.where(hot, w, 0.0), axis=-1)
    else:
        row_weight = xp.astype(valid, lp.dtype)
    return _reduce_rows(
        xp, per_row, sample_weight, row_where, lp, row_weight, xp.sum(row_weight), valid,
        reduction, dtype,
    )


def _class_weight(xp: Any, weight: Array | None, z: Array, name: str) -> Array | None:
    """Per-class weights of shape ``(C,)`` (C = ``z``'s last axis) in ``z``'s dtype."""
    if weight is None:
        return None
    num_classes = z.shape[-1]
    if tuple(weight.shape) != (num_classes,):
        raise InputError(
            f"{name} has shape {tuple(weight.shape)}; expected ({num_classes},), "
            f"one weight per class"
        )
    return xp.astype(weight, z.dtype)


@silent_infinities
def poly1_cross_entropy(
    logits: Any,
    target: Any,
    *,
    sample_weight: Any = None,
    where: Any = None,
    epsilon: float = 2.0,
    axis: int = -1,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    validate: bool = True,
) -> Array:
    """Poly-1 loss (Leng et al. 2022, arXiv:2204.12511): cross-entropy plus ``epsilon``
    times the first polynomial term, ``l_n = CE_n + epsilon * sum_c t_nc (1 - p_nc)``
    with ``p = softmax(z)``.

    For a one-hot target this is ``-log p_y + epsilon (1 - p_y)``; ``epsilon = 0`` is
    :func:`softmax_cross_entropy`. The paper recommends epsilon = 2 (ImageNet, optax's
    default, kept here) and -1 (detection); any finite value is accepted (a traced JAX
    scalar too). ``1 - p`` is computed as ``-expm1(log p)``, exact for confident rows.

    Targets, ``axis``, ``ignore_index``, ``label_smoothing`` (applied to the target of both
    terms, as optax sees a smoothed label) and ``reduction`` are
    :func:`softmax_cross_entropy`'s: ``"mean"`` divides by the number of non-ignored rows
    (index targets) or of rows (probability targets); ignored rows contribute 0.

    ``sample_weight`` (optional) multiplies each example's loss, broadcast against the
    per-example losses (``"none"``'s shape); ``"mean"`` then divides by the summed sample
    weights (times each example's class weight / counted-row share), as scikit-learn's
    ``log_loss`` and Keras do.

    ``where`` (optional boolean mask): :func:`softmax_cross_entropy`'s row mask (fewer
    dimensions than ``logits``: masked rows contribute 0 and are not counted) or class mask
    (as many dimensions as ``logits``: masked classes leave the softmax, ``p`` being the
    softmax over the kept classes, and contribute nothing; optax's ``where``).

    Reference: ``optax.losses.poly_loss_cross_entropy`` (probability labels, no reduction).

    >>> round(float(poly1_cross_entropy([[0.0, 0.0]], [1], epsilon=1.0)), 6)  # ln 2 + 1/2
    1.193147
    """
    epsilon = _checks.check_finite(epsilon, "epsilon")
    parts = softmax_cross_entropy_parts(
        logits, target, axis=axis, where=where, ignore_index=ignore_index,
        label_smoothing=label_smoothing, reduction=reduction, validate=validate,
    )
    xp = parts.xp
    log_p = safe_log_probs(xp, parts)
    ce = -xp.sum(parts.target * log_p, axis=-1)
    one_minus_p = -xp.expm1(parts.log_probs)
    per_row = ce + epsilon * xp.sum(parts.target * one_minus_p, axis=-1)
    return _reduce_softmax_rows(per_row, parts, sample_weight)


@silent_infinities
def softmax_focal_loss(
    logits: Any,
    target: Any,
    *,
    sample_weight: Any = None,
    where: Any = None,
    alpha: Any = 0.25,
    gamma: float = 2.0,
    axis: int = -1,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    validate: bool = True,
) -> Array:
    """Softmax (categorical) focal loss, ``l_n = -sum_c alpha_c (1 - p_nc)^gamma t_nc log p_nc``
    with ``p = softmax(z)`` (Lin et al. 2017, arXiv:1708.02002, for C classes).

    Down-weights the classes the model already predicts well. ``gamma = 0`` and
    ``alpha = None`` give :func:`softmax_cross_entropy`. ``alpha`` is a number (Keras'
    default 0.25, applied to every class), per-class weights of shape ``(C,)``, or None.
    ``1 - p`` is computed as ``-expm1(log p)``, so a confident row keeps its digits, and
    its power is gradient-safe where ``1 - p`` underflows (see :func:`sigmoid_focal_loss`).
    ``alpha`` and ``gamma`` may be traced JAX scalars.

    Targets, ``axis``, ``ignore_index``, ``label_smoothing`` and ``reduction`` are
    :func:`softmax_cross_entropy`'s (``"mean"``: over non-ignored rows for index targets,
    over rows for probability targets; Keras' ``sum_over_batch_size``).

    ``sample_weight`` (optional) multiplies each example's loss, broadcast against the
    per-example losses (``"none"``'s shape); ``"mean"`` then divides by the summed sample
    weights (times each example's class weight / counted-row share), as scikit-learn's
    ``log_loss`` and Keras do.

    ``where`` (optional boolean mask): :func:`softmax_cross_entropy`'s row mask (fewer
    dimensions than ``logits``: masked rows contribute 0 and are not counted) or class mask
    (as many dimensions as ``logits``: masked classes leave the softmax, ``p`` being the
    softmax over the kept classes, and contribute nothing; optax's ``where``).

    Reference: Keras ``CategoricalFocalCrossentropy(from_logits=True)``, whose formula this
    is, except that Keras clips ``p`` to ``[1e-7, 1 - 1e-7]`` before the log (crossent
    does not clip: a probability of 1e-9 costs 20.7, not 16.1).

    >>> round(float(softmax_focal_loss([[0.0, 0.0]], [1], alpha=None, gamma=0.0)), 6)  # ln 2
    0.693147
    """
    gamma = _checks.check_nonnegative(gamma, "gamma")
    parts = softmax_cross_entropy_parts(
        logits, target, axis=axis, where=where, ignore_index=ignore_index,
        label_smoothing=label_smoothing, reduction=reduction, validate=validate,
    )
    xp = parts.xp
    log_p = safe_log_probs(xp, parts)
    terms = parts.target * log_p
    if not _checks.is_zero(gamma):
        terms = terms * _focal_factor(xp, -xp.expm1(parts.log_probs), gamma)
    terms = terms * _focal_alpha(xp, alpha, parts.logits, validate)
    per_row = -xp.sum(terms, axis=-1)
    return _reduce_softmax_rows(per_row, parts, sample_weight)


def _focal_alpha(xp: Any, alpha: Any, z: Array, validate: bool) -> Any:
    """``alpha`` as a factor on the (..., C) terms: 1, a number in [0, 1] (a 0-d JAX array,
    traced or not, counts as one), or per-class weights of shape ``(C,)``, checked to be
    non-negative with ``validate`` (a value read, as the loss's other value checks)."""
    if alpha is None:
        return 1.0
    if isinstance(alpha, numbers.Real) or (is_jax_array(alpha) and alpha.ndim == 0):
        return _checks.check_fraction(alpha, "alpha")
    _, (raw,) = arrays(alpha, names=("alpha",))
    a: Any = _class_weight(xp, like(xp, raw, z, name="alpha"), z, "alpha")
    if validate and not _checks.is_traced(a) and any_true(xp, a < 0):
        raise InputError("alpha must hold non-negative per-class weights")
    return a


@silent_infinities
def categorical_focal_loss(
    probs: Any,
    target: Any,
    *,
    sample_weight: Any = None,
    where: Any = None,
    alpha: Any = 0.25,
    gamma: float = 2.0,
    axis: int = -1,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    validate: bool = True,
) -> Array:
    """Softmax focal loss from probabilities, ``l_n = -sum_c alpha_c (1 - p_nc)^gamma t_nc
    log p_nc``: :func:`softmax_focal_loss` for a caller who holds ``p`` instead of logits.

    ``probs`` must hold distributions along ``axis`` (checked with ``validate=True``, as
    :func:`crossent.cross_entropy` checks them); each ``log p`` is clamped at -100, as
    PyTorch's ``binary_cross_entropy`` does, so a probability of 0 costs at most 100 per
    unit of target. ``alpha`` (a number, per-class ``(C,)``, or None), ``gamma``, targets
    (class indices or probabilities), ``ignore_index`` (an ``ignore_index >= 0`` with
    probability targets raises), ``label_smoothing`` (``(1 - eps) t + eps / C``),
    ``sample_weight`` and ``reduction`` are :func:`softmax_focal_loss`'s.
    Prefer :func:`softmax_focal_loss` on logits: it needs no clamp.

    ``where`` (optional boolean mask): a row mask (fewer dimensions than ``probs``: masked
    rows contribute 0 and are not counted) or a class mask (as many dimensions as
    ``probs``), as :func:`softmax_focal_loss`'s: the kept classes' probabilities are
    renormalised, ``p_c / sum_{kept} p``, which is the softmax over the kept classes of
    logits whose softmax is ``p``, so ``categorical_focal_loss(softmax(z), t, where=m)``
    equals ``softmax_focal_loss(z, t, where=m)``; masked classes contribute nothing.

    Reference: Keras ``CategoricalFocalCrossentropy(from_logits=False)``, whose formula this
    is for probabilities in ``[1e-7, 1 - 1e-7]`` summing to 1 (Keras rescales rows to sum 1
    and clips to that interval; crossent validates and clamps the log instead).

    >>> round(float(categorical_focal_loss([[0.5, 0.5]], [1], alpha=None, gamma=0.0)), 6)
    0.693147
    """
    _checks.check_reduction(reduction)
    gamma = _checks.check_nonnegative(gamma, "gamma")
    eps = _checks.check_fraction(label_smoothing, "label_smoothing")
    ignore_index = _checks.check_integer(ignore_index, "ignore_index")
    validate = _checks.check_bool(validate, "validate")
    given = probs, target
    xp, (probs, target) = arrays(probs, target, names=("probs", "target"))
    _checks.check_floating(xp, probs, "probs")
    _checks.check_has_axis(probs, "probs")
    axis = normalize_axis(axis, probs.ndim)
    _checks.check_classes(probs, axis, "probs")
    probs_dtype = probs.dtype  # the sum-to-1 tolerance is the caller's dtype's
    probs = promoted(xp, probs, target, *given)
    dtype = probs.dtype
    p = move_axis_last(xp, to_float(xp, probs), axis)
    if validate:
        _checks.check_distribution(xp, p, "probs", -1, probs_dtype)
    class_mask, row_where = class_or_row_where(xp, where, probs, axis, "probs")
    if class_mask is not None:
        p = _renormalise_kept(xp, p, class_mask)
    if is_integer(xp, target):
        t, row_mask, denominator, row_weight = _index_target(
            xp, p, target, None, ignore_index, eps, validate, probs.shape, axis, class_mask,
            row_where,
        )
    elif xp.isdtype(target.dtype, "real floating"):
        check_no_ignore_index(ignore_index)
        t, denominator = _probability_target(
            xp, p, target, None, eps, validate, probs, axis, "probs"
        )
        row_mask = row_weight = None
    else:
        raise InputError(
            f"target must hold integer class indices or floating probabilities, got dtype "
            f"{target.dtype}"
        )
    if class_mask is not None:
        t = xp.where(class_mask, t, 0.0)
    positive = p > 0
    log_p = xp.where(positive, xp.clip(xp.log(xp.where(positive, p, 1.0)), -100.0, None), -100.0)
    terms = t * log_p
    if not _checks.is_zero(gamma):
        terms = terms * _focal_factor(xp, 1.0 - p, gamma)
    per_row = -xp.sum(terms * _focal_alpha(xp, alpha, p, validate), axis=-1)
    counted = None if row_mask is None else row_mask > 0
    return _reduce_rows(
        xp, per_row, sample_weight, row_where, p, row_weight, denominator, counted, reduction,
        dtype,
    )


def _renormalise_kept(xp: Any, p: Array, class_mask: Array) -> Array:
    """Probabilities (class axis last) restricted to the kept classes and renormalised,
    ``p_c / sum_{kept} p``: the softmax of ``log p`` with masked classes out of the
    normaliser. A row whose kept mass is 0 (a row with nothing kept among them) is 0; NaN
    propagates."""
    kept = xp.where(class_mask, p, 0.0)
    total = xp.sum(kept, axis=-1, keepdims=True)
    some = total != 0
    return xp.where(some, kept / xp.where(some, total, 1.0), 0.0)
