"""The losses ``crossent train`` compares, as functions of the logits, with their analytic
gradients with respect to the logits (no autograd).

``ce`` and ``smoothed-ce`` come from the core (:func:`crossent.softmax_cross_entropy` and
:func:`crossent.softmax_cross_entropy_grad`); squared error, plain error and the softmax
focal loss are written here because the core has no loss of softmax probabilities.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._checks import as_float, check_fraction, check_positive
from ..activations import log_softmax
from ..errors import InputError
from ..grad import softmax_cross_entropy_grad
from ..losses import softmax_cross_entropy

LOSSES = ("ce", "mse", "abs", "smoothed-ce", "focal")
"""The losses ``crossent train`` compares, in the order it reports them."""
LOSS_TITLES = {
    "ce": "cross-entropy -log p_y",
    "mse": "squared error sum_c (p_c - e_yc)^2",
    "abs": "plain error 1 - p_y",
    "smoothed-ce": "label-smoothed cross-entropy",
    "focal": "focal -(1 - p_y)^gamma log p_y",
}


def _rows(logits: Any, labels: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(float64 logits (N, C), integer labels (N,), one-hot (N, C)), checked."""
    try:
        z = np.asarray(logits, dtype=float)
        y = np.asarray(labels)
    except (TypeError, ValueError) as err:  # None, strings, ragged lists
        raise InputError(f"logits and labels must be arrays of numbers ({err})") from None
    if z.ndim != 2:
        raise InputError(f"logits must have shape (N, C); got shape {z.shape}")
    if y.shape != (z.shape[0],) or (y.size and not np.issubdtype(y.dtype, np.integer)):
        raise InputError(f"labels must be {z.shape[0]} integer class indices; got shape "
                         f"{y.shape}, dtype {y.dtype}")
    if y.size and (y.min() < 0 or y.max() >= z.shape[1]):
        raise InputError(f"labels must lie in [0, {z.shape[1]})")
    onehot = np.zeros_like(z)
    onehot[np.arange(y.size), y] = 1.0
    return z, y.astype(np.intp), onehot


def _through_softmax(p: np.ndarray, dl_dp: np.ndarray) -> np.ndarray:
    """``J^T g`` for the softmax Jacobian ``J = diag(p) - p p^T``: ``p * (g - <p, g>)``."""
    return p * (dl_dp - np.sum(p * dl_dp, axis=-1, keepdims=True))


def softmax_mse_loss(logits: Any, labels: Any) -> float:
    """Squared error between ``softmax(z)`` and the one-hot target, summed over classes and
    averaged over rows: ``mean_n sum_c (p_nc - e_{y_n c})^2`` (the Brier score).

    >>> softmax_mse_loss([[0.0, 0.0]], [0])  # (0.5 - 1)^2 + 0.5^2
    0.5
    """
    z, _, onehot = _rows(logits, labels)
    p = np.exp(np.asarray(log_softmax(z)))
    return float(np.mean(np.sum((p - onehot) ** 2, axis=-1)))


def softmax_mse_grad(logits: Any, labels: Any) -> np.ndarray:
    """Gradient of :func:`softmax_mse_loss` with respect to the logits.

    ``dl_n/dz_n = (p * (g - <p, g>)) / N`` with ``g = 2 (p - e_y)``: the softmax Jacobian
    does not cancel, so the gradient carries the factor ``p`` and fades when ``p_y -> 0``.

    >>> softmax_mse_grad([[0.0, 0.0]], [0]).tolist()  # 2 * 0.5 * ([-0.5, 0.5] - 0)
    [[-0.5, 0.5]]
    """
    z, _, onehot = _rows(logits, labels)
    p = np.exp(np.asarray(log_softmax(z)))
    return _through_softmax(p, 2.0 * (p - onehot)) / z.shape[0]


def softmax_abs_loss(logits: Any, labels: Any) -> float:
    """The plain error of the article's "why cross-entropy": ``mean_n (1 - p_{n y_n})``.

    It lives in [0, 1], too narrow to punish confident mistakes. (For a probability vector and
    a one-hot target, ``sum_c |p_c - e_yc| = 2 (1 - p_y)``: it is also half the L1 error.)

    >>> softmax_abs_loss([[0.0, 0.0]], [1])
    0.5
    """
    z, y, _ = _rows(logits, labels)
    p_y = np.exp(np.asarray(log_softmax(z))[np.arange(y.size), y])
    return float(np.mean(1.0 - p_y))


def softmax_abs_grad(logits: Any, labels: Any) -> np.ndarray:
    """Gradient of :func:`softmax_abs_loss`: ``dl_n/dz_n = p_y (p - e_y) / N``.

    The cross-entropy gradient ``p - e_y`` times ``p_y``: it vanishes on confident mistakes.

    >>> softmax_abs_grad([[0.0, 0.0]], [1]).tolist()
    [[0.25, -0.25]]
    """
    z, y, onehot = _rows(logits, labels)
    p = np.exp(np.asarray(log_softmax(z)))
    p_y = p[np.arange(y.size), y][:, None]
    return p_y * (p - onehot) / z.shape[0]


def _check_gamma(gamma: float) -> float:
    """``gamma`` as a float; an :class:`~crossent.errors.InputError` naming it unless it is a
    finite number >= 0 (an int beyond float's range, 10**400, included: it is refused, not
    an ``OverflowError``)."""
    ok = isinstance(gamma, numbers.Real) and not isinstance(gamma, bool | np.bool_)
    value = as_float(gamma) if ok else math.nan
    if not (math.isfinite(value) and value >= 0):
        raise InputError(f"gamma={gamma!r} must be a finite number >= 0")
    return value


def softmax_focal_loss(logits: Any, labels: Any, *, gamma: float = 2.0) -> float:
    """Multi-class softmax focal loss (Lin et al. 2017, "Focal Loss for Dense Object
    Detection", arXiv:1708.02002): ``mean_n -(1 - p_{n y_n})^gamma log p_{n y_n}``.

    ``gamma = 0`` is cross-entropy; larger ``gamma`` down-weights well-classified rows.
    ``1 - p_y`` is computed as ``-expm1(log p_y)``, exact when ``p_y`` is near 1.
    (:func:`crossent.sigmoid_focal_loss` is the paper's per-label sigmoid version.)

    >>> round(softmax_focal_loss([[0.0, 0.0]], [0], gamma=2.0), 6)  # 0.25 ln 2
    0.173287
    """
    gamma = _check_gamma(gamma)
    z, y, _ = _rows(logits, labels)
    log_py = np.asarray(log_softmax(z))[np.arange(y.size), y]
    return float(np.mean(-((-np.expm1(log_py)) ** gamma) * log_py))


def softmax_focal_grad(logits: Any, labels: Any, *, gamma: float = 2.0) -> np.ndarray:
    """Gradient of :func:`softmax_focal_loss` with respect to the logits.

    With ``l = log p_y`` (so ``dl/dz = e_y - p``) and ``u = 1 - p_y``, the loss is
    ``-u^gamma l`` and ``d/dl = gamma u^(gamma - 1) p_y l - u^gamma``, hence
    ``dl_n/dz_n = -(gamma u^(gamma - 1) p_y log p_y - u^gamma) (p - e_y) / N``.
    At ``p_y = 1`` the gradient is 0 (for ``gamma < 1`` the first term is taken as 0 there).

    >>> g = softmax_focal_grad([[0.0, 0.0]], [0], gamma=0.0)  # gamma = 0: cross-entropy
    >>> g.tolist()
    [[-0.5, 0.5]]
    """
    gamma = _check_gamma(gamma)
    z, y, onehot = _rows(logits, labels)
    log_p = np.asarray(log_softmax(z))
    p = np.exp(log_p)
    log_py = log_p[np.arange(y.size), y]
    p_y = np.exp(log_py)
    u = -np.expm1(log_py)
    if gamma == 0:
        first = np.zeros_like(u)
    else:
        with np.errstate(divide="ignore", invalid="ignore"):
            first = np.where(u > 0, gamma * u ** (gamma - 1.0) * p_y * log_py, 0.0)
    d_dl = first - u**gamma
    return -(d_dl[:, None] * (p - onehot)) / z.shape[0]


def finite_difference_loss_grad(
    loss: Callable[..., float], logits: Any, labels: Any, *, h: float = 1e-6, **kwargs: Any
) -> np.ndarray:
    """Central finite differences of ``loss(logits, labels, **kwargs)`` in every logit:
    ``(loss(z + h e_i) - loss(z - h e_i)) / (2 h)``.

    ``h`` is a finite number > 0 that changes every logit (``z_i + h != z_i - h`` in
    float64); otherwise an :class:`~crossent.errors.InputError` names it (a step of 0, or
    one lost in a large logit's rounding, would give 0/0 or a silent 0).

    >>> g = finite_difference_loss_grad(make_loss("ce").value, np.zeros((1, 2)), np.array([0]))
    >>> g.round(6).tolist()  # softmax - onehot
    [[-0.5, 0.5]]
    """
    h = check_positive(h, "h")
    z = np.array(logits, dtype=float)
    out = np.empty_like(z)
    for i in np.ndindex(z.shape):
        old = z[i]
        if math.isfinite(old) and old + h == old - h:
            raise InputError(f"h={h!r} is too small to change the logit {old!r} at {i} "
                             f"(in float64); use a larger step")
        z[i] = old + h
        up = loss(z, labels, **kwargs)
        z[i] = old - h
        down = loss(z, labels, **kwargs)
        z[i] = old
        out[i] = (up - down) / 2 / h  # not / (2 * h): 2 * 1e308 overflows to inf
    return out


@dataclass(frozen=True)
class Loss:
    """A training loss: its name, ``value(logits, labels) -> float`` (mean over rows) and
    ``grad(logits, labels) -> dvalue/dlogits`` (shape of the logits).

    >>> loss = make_loss("ce")
    >>> round(loss.value(np.zeros((1, 4)), np.array([0])), 6)  # ln 4
    1.386294
    """

    name: str
    value: Callable[[np.ndarray, np.ndarray], float]
    grad: Callable[[np.ndarray, np.ndarray], np.ndarray]


def make_loss(name: str, *, label_smoothing: float = 0.1, gamma: float = 2.0) -> Loss:
    """The :class:`Loss` called ``name`` (one of :data:`LOSSES`).

    ``ce`` and ``smoothed-ce`` use :func:`crossent.softmax_cross_entropy` and
    :func:`crossent.softmax_cross_entropy_grad`; the others the functions above.

    ``label_smoothing`` (a number in [0, 1], used by ``smoothed-ce``) and ``gamma`` (a
    finite number >= 0, used by ``focal``) are checked whatever the loss, each refused with
    an :class:`~crossent.errors.InputError` naming it.

    >>> make_loss("ce").grad(np.array([[0.0, 0.0]]), np.array([0])).tolist()
    [[-0.5, 0.5]]
    """
    smoothing = check_fraction(label_smoothing, "label_smoothing")
    gamma = _check_gamma(gamma)
    if name in ("ce", "smoothed-ce"):
        eps = 0.0 if name == "ce" else smoothing
        return Loss(
            name,
            lambda z, y: float(softmax_cross_entropy(z, y, label_smoothing=eps)),
            lambda z, y: np.asarray(softmax_cross_entropy_grad(z, y, label_smoothing=eps)),
        )
    if name == "mse":
        return Loss(name, softmax_mse_loss, softmax_mse_grad)
    if name == "abs":
        return Loss(name, softmax_abs_loss, softmax_abs_grad)
    if name == "focal":
        return Loss(
            name,
            lambda z, y: softmax_focal_loss(z, y, gamma=gamma),
            lambda z, y: softmax_focal_grad(z, y, gamma=gamma),
        )
    raise InputError(f"name: unknown loss {name!r}; choose from {', '.join(LOSSES)}")
