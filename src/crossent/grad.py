"""Analytic gradients of the losses with respect to the logits, for code without autograd
(NumPy training loops, teaching) and as the reference the fused kernels are tested against.

The article's result: for ``l = cross_entropy(softmax(a), b)`` the gradient is
``dl/da = softmax(a) - b``, linear in the softmax output.
"""

from __future__ import annotations

import math
from typing import Any

from . import _checks
from ._array import (
    Array,
    arrays,
    gradient_dtype,
    move_last_to_axis,
    promoted,
    restore_dtype,
    silent_infinities,
    to_float,
)
from .activations import sigmoid
from .losses import (
    class_or_row_where,
    example_weights,
    smooth_binary,
    softmax_cross_entropy_parts,
)

__all__ = ["multilabel_cross_entropy_grad", "sigmoid_binary_cross_entropy_grad",
           "softmax_cross_entropy_grad"]


@silent_infinities
def softmax_cross_entropy_grad(
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
    """Gradient of :func:`crossent.softmax_cross_entropy` with respect to ``logits``.

    With ``p = softmax(z)`` and ``T`` the effective (smoothed, weighted, masked) target:
    ``dl_n/dz_n = p_n * sum_c T_nc - T_n + 2 * z_loss * lse_n * p_n``. For a plain
    distribution target this is the article's ``softmax(a) - b``; for a target row that
    does not sum to 1 (``validate=False``) the ``sum_c T_nc`` factor keeps it exact
    (PITFALLS 9). ``"mean"`` divides by the loss's denominator; ``softcap`` multiplies by
    ``1 - tanh(z / c)^2``; ignored rows get 0, also when every row is ignored and the
    ``"mean"`` loss is NaN (torch's autograd gives 0 there too), and also when their logits
    are NaN (they contribute nothing to the loss; torch's autograd gives NaN there). With
    ``reduction="none"`` row n holds ``dl_n / dz_n`` (the gradient of the sum of the
    per-row losses).

    ``sample_weight`` (broadcast against the per-row losses) multiplies row n's gradient by
    ``s_n``, and ``"mean"`` divides by the loss's weighted denominator (a gradient of 0 where
    that is 0 and the loss NaN, as autograd gives through the loss). ``where`` is the
    loss's: a row mask (fewer dimensions than ``logits``) or a class mask (``logits``'
    dimensions); with a class mask ``p`` is the softmax over the kept classes and ``T`` is 0
    at the masked ones, so their gradient is exactly 0, and so is every masked row's (even
    where its logits are NaN).

    Same arguments and shapes as the loss; returns an array shaped like ``logits`` in its
    dtype. Reference: ``torch.autograd`` through ``torch.nn.functional.cross_entropy``;
    finite differences.

    >>> [round(float(g), 4) for g in softmax_cross_entropy_grad([[0.0, 0.0]], [0])[0]]
    [-0.5, 0.5]
    >>> g = softmax_cross_entropy_grad([[0.0, 0.0, 5.0]], [0], where=[[True, True, False]])
    >>> [round(float(v), 4) for v in g[0]]  # class 2 out: the 2-class gradient, and 0
    [-0.5, 0.5, 0.0]
    """
    parts = softmax_cross_entropy_parts(
        logits, target, axis=axis, weight=weight, where=where, ignore_index=ignore_index,
        label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
        reduction=reduction, validate=validate,
    )
    xp = parts.xp
    probs = xp.exp(parts.log_probs)
    grad = probs * xp.sum(parts.target, axis=-1, keepdims=True) - parts.target
    if parts.z_loss:
        scale = 2.0 * parts.z_loss * parts.lse
        grad = grad + xp.expand_dims(scale, axis=-1) * probs
    mask, sw, denominator = example_weights(
        xp, sample_weight, parts.row_where, parts.raw, tuple(parts.lse.shape), parts.row_weight,
        parts.denominator,
    )
    if sw is not None:
        grad = grad * xp.expand_dims(sw, axis=-1)
    if parts.reduction == "mean":
        grad = _weighted_mean(xp, grad, denominator) if sw is not None else grad / denominator
    if parts.row_mask is not None:  # ignored rows: exactly 0, even when all are (torch)
        grad = xp.where(xp.expand_dims(parts.row_mask, axis=-1) > 0, grad, 0.0)
    if mask is not None:  # masked rows: exactly 0, even with NaN logits
        grad = xp.where(xp.expand_dims(mask, axis=-1), grad, 0.0)
    if parts.softcap is not None:
        grad = grad * (1.0 - xp.tanh(parts.raw / parts.softcap) ** 2)
    # the logits' dtype, as autograd's, also where a wider target promoted the loss
    return restore_dtype(xp, move_last_to_axis(xp, grad, parts.axis), parts.logits_dtype)


@silent_infinities
def sigmoid_binary_cross_entropy_grad(
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
    """Gradient of :func:`crossent.sigmoid_binary_cross_entropy` with respect to ``logits``.

    ``dl/dx = w * ((1 - t) * sigmoid(x) - pos_weight * t * sigmoid(-x))``, which is
    ``w * (sigmoid(x) - t)`` without ``pos_weight``: the binary ``softmax(a) - b``.
    ``"mean"`` divides by the element count; ``label_smoothing`` smooths ``t`` as the loss
    does. ``sample_weight`` and the boolean ``where`` broadcast against the elementwise
    loss, as the loss's: the gradient is multiplied by ``s``, exactly 0 where masked (even
    at a NaN logit), and ``"mean"`` divides by ``sum s * m`` instead of the element count
    (a gradient of 0 where that is 0 and the loss NaN, as autograd gives through the loss).
    Reference: torch autograd through ``binary_cross_entropy_with_logits``.

    >>> float(sigmoid_binary_cross_entropy_grad([0.0], [1.0], reduction="sum")[0])
    -0.5
    >>> [float(g) for g in sigmoid_binary_cross_entropy_grad(
    ...     [0.0, 0.0], [1.0, 1.0], sample_weight=[3.0, 1.0])]  # (-0.5 s) / (3 + 1)
    [-0.375, -0.125]
    """
    return _sigmoid_grad(logits, target, weight, pos_weight, label_smoothing, reduction,
                         validate, False, sample_weight, where)


@silent_infinities
def multilabel_cross_entropy_grad(
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
    """Gradient of :func:`crossent.multilabel_cross_entropy` with respect to ``logits``.

    Each label's binary gradient ``w * ((1 - t) sigmoid(x) - pos_weight t sigmoid(-x))``;
    ``"mean"`` divides by the number of samples (not labels), because the loss sums over
    labels; ``label_smoothing`` smooths ``t`` as the loss does. ``sample_weight``
    (broadcast against the per-sample losses, shape ``logits.shape[:-1]``) multiplies
    sample n's gradient by ``s_n``; ``where`` is the loss's sample mask (fewer dimensions
    than ``logits``) or label mask (as many): the gradient is exactly 0 where masked, and
    ``"mean"`` divides by ``sum_n s_n m_n`` over the samples kept (a gradient of 0 where that
    is 0). Reference: torch autograd.

    >>> [float(g) for g in multilabel_cross_entropy_grad([[0.0, 0.0]], [[1.0, 0.0]])[0]]
    [-0.5, 0.5]
    """
    return _sigmoid_grad(logits, targets, weight, pos_weight, label_smoothing, reduction,
                         validate, True, sample_weight, where)


def _sigmoid_grad(logits, target, weight, pos_weight, label_smoothing, reduction, validate,
                  per_sample, sample_weight=None, where=None):
    target_name = "targets" if per_sample else "target"
    _checks.check_reduction(reduction)
    validate = _checks.check_bool(validate, "validate")
    label_smoothing = _checks.check_fraction(label_smoothing, "label_smoothing")
    given = logits, target
    xp, (logits, target, weight, pos_weight) = arrays(
        logits, target, weight, pos_weight, names=("logits", target_name, "weight", "pos_weight"),
        optional=("weight", "pos_weight"),
    )
    _checks.check_floating(xp, logits, "logits")
    if per_sample:
        _checks.check_has_axis(logits, "logits", "label")
    _checks.check_same_shape(logits, target, "logits", target_name)
    # computed where the loss is (a float64 target: float64), returned as autograd
    # returns a gradient: in the logits' dtype
    wide = promoted(xp, logits, target, *given)
    dtype = gradient_dtype(xp, logits, wide, given[0])
    x = to_float(xp, wide)
    t = xp.astype(target, x.dtype)
    if validate:
        _checks.check_in_unit_interval(xp, t, target_name)
    t = smooth_binary(t, label_smoothing)
    if pos_weight is not None:
        _checks.check_broadcastable(pos_weight, tuple(x.shape), "pos_weight", "logits")
    if weight is not None:
        _checks.check_broadcastable(weight, tuple(x.shape), "weight", "logits")
    neg = sigmoid(-x)
    pos = t * neg if pos_weight is None else t * neg * xp.astype(pos_weight, x.dtype)
    grad = (1.0 - t) * sigmoid(x) - pos
    if weight is not None:
        grad = grad * xp.astype(weight, x.dtype)
    shape = tuple(x.shape[:-1]) if per_sample else tuple(x.shape)
    if per_sample:  # a mask with the logits' dimensions masks labels (the loss's rule)
        label_mask, where = class_or_row_where(xp, where, x, x.ndim - 1, "logits")
        if label_mask is not None:
            grad = xp.where(label_mask, grad, 0.0)
    mask, sw, count = example_weights(
        xp, sample_weight, where, x, shape, None, math.prod(shape)
    )
    if sw is not None:
        grad = grad * (xp.expand_dims(sw, axis=-1) if per_sample else sw)
    if reduction == "mean":
        grad = _weighted_mean(xp, grad, count) if sw is not None else grad / count
    if mask is not None:  # masked entries: exactly 0, even at NaN logits
        grad = xp.where(xp.expand_dims(mask, axis=-1) if per_sample else mask, grad, 0.0)
    return restore_dtype(xp, grad, dtype)


def _weighted_mean(xp: Any, grad: Array, denominator: Any) -> Array:
    """``grad / denominator`` for a "mean" divided by summed sample weights, and 0 where
    they sum to 0: the loss is NaN there (0/0) and its own gradient, what autograd gives
    through it, is 0 (Keras' ``divide_no_nan``); a bare division would give NaN."""
    empty = denominator == 0
    return xp.where(empty, 0.0, grad / xp.where(empty, 1.0, denominator))
