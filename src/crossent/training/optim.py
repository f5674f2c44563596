"""The optimizers: plain SGD and Adam, updating a :data:`~crossent.training.model.Params`
dict in place."""

from __future__ import annotations

from typing import Any

import numpy as np

from .._checks import check_positive, check_real
from ..errors import InputError
from .model import Params

OPTIMIZERS = ("sgd", "adam")


def _check_decay(value: Any, name: str) -> float:
    """A moment's decay rate ``b1`` / ``b2``: a number in [0, 1). At 1 the bias correction
    ``1 - b^t`` is 0 and every weight turns NaN; above 1 or below 0 the moments diverge or
    flip sign."""
    v = check_real(value, name)
    if not 0.0 <= v < 1.0:
        raise InputError(f"{name}={value!r} must lie in [0, 1)")
    return float(v)


class SGD:
    """Plain mini-batch gradient descent: ``w <- w - lr * g``.

    >>> params = {"w": np.array([1.0, 2.0])}
    >>> SGD(lr=0.5).step(params, {"w": np.array([2.0, -2.0])})
    >>> params["w"].tolist()
    [0.0, 3.0]

    ``lr`` is a finite number > 0, checked here (an :class:`~crossent.errors.InputError`
    naming it), not at the first step.
    """

    def __init__(self, lr: float) -> None:
        self.lr = check_positive(lr, "lr")

    def step(self, params: Params, grads: Params) -> None:
        for k, g in grads.items():
            params[k] -= self.lr * g


class Adam:
    """Adam (Kingma and Ba 2015, arXiv:1412.6980): ``m <- b1 m + (1 - b1) g``,
    ``v <- b2 v + (1 - b2) g^2``, ``w <- w - lr * m_hat / (sqrt(v_hat) + eps)`` with the
    bias corrections ``m_hat = m / (1 - b1^t)``, ``v_hat = v / (1 - b2^t)``.

    The first step moves every weight by ``lr`` against its gradient's sign
    (``m_hat / sqrt(v_hat) = g / |g|``):

    >>> params = {"w": np.array([1.0, 2.0])}
    >>> Adam(lr=0.1).step(params, {"w": np.array([3.0, -0.5])})
    >>> params["w"].round(6).tolist()
    [0.9, 2.1]

    Checked here, each refused with an :class:`~crossent.errors.InputError` naming it:
    ``lr`` and ``eps`` finite numbers > 0, ``b1`` and ``b2`` numbers in [0, 1).
    """

    def __init__(self, lr: float, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8
                 ) -> None:
        self.lr = check_positive(lr, "lr")
        self.b1 = _check_decay(b1, "b1")
        self.b2 = _check_decay(b2, "b2")
        self.eps = check_positive(eps, "eps")
        self.t = 0
        self.m: Params = {}
        self.v: Params = {}

    def step(self, params: Params, grads: Params) -> None:
        self.t += 1
        for k, g in grads.items():
            m = self.m[k] = self.b1 * self.m.get(k, 0.0) + (1 - self.b1) * g
            v = self.v[k] = self.b2 * self.v.get(k, 0.0) + (1 - self.b2) * g * g
            m_hat = m / (1 - self.b1**self.t)
            v_hat = v / (1 - self.b2**self.t)
            params[k] -= self.lr * m_hat / (np.sqrt(v_hat) + self.eps)
