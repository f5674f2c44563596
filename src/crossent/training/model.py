"""The models: softmax regression and a one-hidden-layer ReLU MLP, forward and backward by
hand (the weights are a plain dict of NumPy arrays)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .._checks import check_integer
from ..errors import InputError

MODELS = ("softmax", "mlp")

Params = dict[str, np.ndarray]


def init_params(model: str, n_in: int, n_classes: int, *, hidden: int, rng: np.random.Generator
                ) -> Params:
    """Initial weights: softmax regression starts at 0; the MLP's layers are drawn from
    ``N(0, 2 / fan_in)`` (He et al. 2015, for ReLU) with zero biases.

    ``n_in``, ``n_classes`` and ``hidden`` (used by the MLP) are positive integers, each
    refused otherwise with an :class:`~crossent.errors.InputError` naming it.

    >>> p = init_params("mlp", 64, 10, hidden=32, rng=np.random.default_rng(0))
    >>> {k: v.shape for k, v in p.items()}
    {'W1': (64, 32), 'b1': (32,), 'W2': (32, 10), 'b2': (10,)}
    """
    n_in = _size(n_in, "n_in")
    n_classes = _size(n_classes, "n_classes")
    hidden = _size(hidden, "hidden")
    if model == "softmax":
        return {"W": np.zeros((n_in, n_classes)), "b": np.zeros(n_classes)}
    if model == "mlp":
        return {
            "W1": rng.normal(0.0, math.sqrt(2.0 / n_in), (n_in, hidden)),
            "b1": np.zeros(hidden),
            "W2": rng.normal(0.0, math.sqrt(2.0 / hidden), (hidden, n_classes)),
            "b2": np.zeros(n_classes),
        }
    raise InputError(f"model={model!r}: unknown model; choose from {', '.join(MODELS)}")


def _size(value: Any, name: str) -> int:
    """A layer's size: an integer >= 1 (0 would divide by 0 in the He scale ``2 / fan_in``;
    a bool or 1.5 is not a size)."""
    return check_integer(value, name, minimum=1)


def forward(params: Params, x: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Logits ``z = x W + b`` (softmax regression) or ``z = relu(x W1 + b1) W2 + b2`` (MLP),
    and what :func:`backward` needs.

    >>> p = {"W": np.array([[1.0, 0.0], [0.0, 2.0]]), "b": np.array([0.5, 0.0])}
    >>> forward(p, np.array([[1.0, 1.0]]))[0].tolist()
    [[1.5, 2.0]]
    """
    if "W" in params:
        return x @ params["W"] + params["b"], {"x": x}
    pre = x @ params["W1"] + params["b1"]
    h = np.maximum(pre, 0.0)
    return h @ params["W2"] + params["b2"], {"x": x, "pre": pre, "h": h}


def backward(params: Params, cache: dict[str, np.ndarray], dz: np.ndarray) -> Params:
    """Gradients of the loss with respect to every parameter, given ``dz = dloss/dlogits``:
    ``dW = x^T dz``, ``db = sum_n dz``; through the MLP's hidden layer
    ``dh = dz W2^T`` and ``dpre = dh * [pre > 0]``.

    >>> p = {"W": np.zeros((3, 2)), "b": np.zeros(2)}
    >>> z, cache = forward(p, np.ones((4, 3)))
    >>> grads = backward(p, cache, np.ones((4, 2)))  # dz = 1: dW = x^T 1, db = 4
    >>> grads["W"].tolist(), grads["b"].tolist()
    ([[4.0, 4.0], [4.0, 4.0], [4.0, 4.0]], [4.0, 4.0])
    """
    x = cache["x"]
    if "W" in params:
        return {"W": x.T @ dz, "b": dz.sum(axis=0)}
    dpre = (dz @ params["W2"].T) * (cache["pre"] > 0)
    return {
        "W1": x.T @ dpre, "b1": dpre.sum(axis=0),
        "W2": cache["h"].T @ dz, "b2": dz.sum(axis=0),
    }
