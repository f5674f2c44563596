"""Train a classifier with each loss and compare them: the article's "why cross-entropy" on data.

The experiment behind ``crossent train``: softmax regression or a one-hidden-layer MLP on
scikit-learn's bundled ``load_digits`` (1797 8x8 images, 10 classes, no download), trained in
plain NumPy with crossent's own analytic gradients (no autograd) and mini-batch SGD or Adam.
The losses compared, all functions of the logits ``z`` of one row with true class ``y`` and
``p = softmax(z)``, averaged over the rows of a batch:

* ``ce``: ``-log p_y``; gradient ``p - e_y`` (the article's ``softmax(a) - b``).
* ``smoothed-ce``: ``-sum_c t_c log p_c`` with ``t = (1 - eps) e_y + eps / C`` (label
  smoothing, eps = 0.1); gradient ``p - t``.
* ``mse``: ``sum_c (p_c - e_yc)^2`` (squared error on the softmax output, the Brier score);
  gradient ``p * (g - <p, g>)`` with ``g = 2 (p - e_y)``.
* ``abs``: ``1 - p_y`` (the article's too-narrow plain error); gradient ``p_y (p - e_y)``.
* ``focal``: ``-(1 - p_y)^gamma log p_y`` (Lin et al. 2017, gamma = 2); gradient
  ``-[gamma (1 - p_y)^(gamma - 1) p_y log p_y - (1 - p_y)^gamma] (p - e_y)``.

Every gradient through the softmax has the form ``J^T g`` with the softmax Jacobian
``J = diag(p) - p p^T``, i.e. ``p * (g - <p, g>)`` where ``g = dl/dp``. For cross-entropy the
``1/p_y`` in ``g`` cancels the ``p_y`` of the Jacobian, which leaves the *linear*
``p - e_y``; for mse and abs it does not, so their gradients vanish where the model is
confidently wrong (``p_y -> 0``, a wrong class's probability -> 1; for abs exactly by the
factor ``p_y``), and learning from such mistakes is slow.

Each epoch reports the training loss (of the loss being trained), the validation accuracy,
the validation cross-entropy (nats) and the expected calibration error (15 bins, Guo et al.
2017). Everything is reproducible from ``seed``: the same seed gives identical numbers.

>>> z, y = np.array([[2.0, 1.0, 0.1]]), np.array([0])
>>> bool(np.allclose(softmax_mse_grad(z, y), finite_difference_loss_grad(softmax_mse_loss, z, y)))
True
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from .activations import log_softmax
from .grad import softmax_cross_entropy_grad
from .losses import softmax_cross_entropy

LOSSES = ("ce", "mse", "abs", "smoothed-ce", "focal")
"""The losses ``crossent train`` compares, in the order it reports them."""
LOSS_TITLES = {
    "ce": "cross-entropy -log p_y",
    "mse": "squared error sum_c (p_c - e_yc)^2",
    "abs": "plain error 1 - p_y",
    "smoothed-ce": "label-smoothed cross-entropy",
    "focal": "focal -(1 - p_y)^gamma log p_y",
}
MODELS = ("softmax", "mlp")
OPTIMIZERS = ("sgd", "adam")
N_BINS = 15
"""Bins of the expected calibration error (Guo et al. 2017 use 15)."""
TARGET_ACCURACY = 0.95


# --------------------------------------------------------------------------------------------
# Losses of softmax probabilities and their gradients with respect to the logits
# --------------------------------------------------------------------------------------------


def _rows(logits: Any, labels: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(float64 logits (N, C), integer labels (N,), one-hot (N, C)), checked."""
    z = np.asarray(logits, dtype=float)
    y = np.asarray(labels)
    if z.ndim != 2:
        raise ValueError(f"logits must have shape (N, C); got shape {z.shape}")
    if y.shape != (z.shape[0],) or (y.size and not np.issubdtype(y.dtype, np.integer)):
        raise ValueError(f"labels must be {z.shape[0]} integer class indices; got {y.shape}")
    if y.size and (y.min() < 0 or y.max() >= z.shape[1]):
        raise ValueError(f"labels must lie in [0, {z.shape[1]})")
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
    gamma = float(gamma)
    if not (math.isfinite(gamma) and gamma >= 0):
        raise ValueError(f"gamma={gamma!r} must be a finite number >= 0")
    return gamma


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
    """Central finite differences of ``loss(logits, labels, **kwargs)`` in every logit."""
    z = np.array(logits, dtype=float)
    out = np.empty_like(z)
    for i in np.ndindex(z.shape):
        old = z[i]
        z[i] = old + h
        up = loss(z, labels, **kwargs)
        z[i] = old - h
        down = loss(z, labels, **kwargs)
        z[i] = old
        out[i] = (up - down) / (2 * h)
    return out


@dataclass(frozen=True)
class Loss:
    """A training loss: its name, ``value(logits, labels) -> float`` (mean over rows) and
    ``grad(logits, labels) -> dvalue/dlogits`` (shape of the logits)."""

    name: str
    value: Callable[[np.ndarray, np.ndarray], float]
    grad: Callable[[np.ndarray, np.ndarray], np.ndarray]


def make_loss(name: str, *, label_smoothing: float = 0.1, gamma: float = 2.0) -> Loss:
    """The :class:`Loss` called ``name`` (one of :data:`LOSSES`).

    ``ce`` and ``smoothed-ce`` use :func:`crossent.softmax_cross_entropy` and
    :func:`crossent.softmax_cross_entropy_grad`; the others the functions above.

    >>> make_loss("ce").grad(np.array([[0.0, 0.0]]), np.array([0])).tolist()
    [[-0.5, 0.5]]
    """
    if name in ("ce", "smoothed-ce"):
        eps = 0.0 if name == "ce" else float(label_smoothing)
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
        _check_gamma(gamma)
        return Loss(
            name,
            lambda z, y: softmax_focal_loss(z, y, gamma=gamma),
            lambda z, y: softmax_focal_grad(z, y, gamma=gamma),
        )
    raise ValueError(f"unknown loss {name!r}; choose from {', '.join(LOSSES)}")


# --------------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reliability:
    """A reliability diagram's data: ``n_bins`` equal-width confidence bins on [0, 1].

    ``confidence[b]`` and ``accuracy[b]`` are the mean top-class probability and the fraction
    correct of the rows in bin b (NaN for an empty bin), ``count[b]`` their number, and
    ``ece`` the expected calibration error ``sum_b (count_b / n) |accuracy_b - confidence_b|``.
    """

    edges: np.ndarray
    confidence: np.ndarray
    accuracy: np.ndarray
    count: np.ndarray
    ece: float


def reliability(probs: Any, labels: Any, *, n_bins: int = N_BINS) -> Reliability:
    """Bin the rows of ``probs`` (N, C) by their confidence ``max_c p_c`` (Guo et al. 2017).

    Bin b holds the confidences in ``(b / n_bins, (b + 1) / n_bins]`` (a confidence of exactly
    0 goes to the first bin), as in Guo et al.'s reference code.
    """
    p = np.asarray(probs, dtype=float)
    y = np.asarray(labels)
    if p.ndim != 2 or y.shape != (p.shape[0],):
        raise ValueError(f"probs (N, C) and labels (N,) expected; got {p.shape} and {y.shape}")
    if not (isinstance(n_bins, int) and n_bins >= 1):
        raise ValueError(f"n_bins={n_bins!r} must be a positive integer")
    conf = np.max(p, axis=-1)
    correct = (np.argmax(p, axis=-1) == y).astype(float)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    count = np.bincount(which, minlength=n_bins)
    sum_conf = np.bincount(which, weights=conf, minlength=n_bins)
    sum_acc = np.bincount(which, weights=correct, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.where(count > 0, sum_conf / count, np.nan)
        mean_acc = np.where(count > 0, sum_acc / count, np.nan)
    n = max(p.shape[0], 1)
    ece = float(np.sum(np.abs(sum_acc - sum_conf)) / n)
    return Reliability(edges, mean_conf, mean_acc, count, ece)


def expected_calibration_error(probs: Any, labels: Any, *, n_bins: int = N_BINS) -> float:
    """Expected calibration error (Guo, Pleiss, Sun and Weinberger 2017, "On Calibration of
    Modern Neural Networks", arXiv:1706.04599):
    ``ECE = sum_b (|B_b| / n) |acc(B_b) - conf(B_b)|`` over ``n_bins`` equal-width bins of
    the top-class probability. 0 for a perfectly calibrated model.

    >>> expected_calibration_error([[0.9, 0.1], [0.6, 0.4]], [0, 1])  # (|1-.9| + |0-.6|) / 2
    0.35
    """
    return reliability(probs, labels, n_bins=n_bins).ece


# --------------------------------------------------------------------------------------------
# Data, models and optimizers
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dataset:
    """A fixed train/validation split, features standardised with the training statistics."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    num_classes: int


def load_digits_split(*, val_fraction: float = 0.2, split_seed: int = 0) -> Dataset:
    """scikit-learn's bundled digits (no download), split stratified 80/20 with a fixed seed
    (1437 training and 360 validation images), pixels standardised per feature using the
    training set's mean and standard deviation (constant pixels are only centred)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_tr, x_va, y_tr, y_va = train_test_split(
        x.astype(float), y.astype(np.intp), test_size=val_fraction, random_state=split_seed,
        stratify=y,
    )
    mean, std = x_tr.mean(axis=0), x_tr.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    return Dataset((x_tr - mean) / std, y_tr, (x_va - mean) / std, y_va, int(y.max()) + 1)


Params = dict[str, np.ndarray]


def init_params(model: str, n_in: int, n_classes: int, *, hidden: int, rng: np.random.Generator
                ) -> Params:
    """Initial weights: softmax regression starts at 0; the MLP's layers are drawn from
    ``N(0, 2 / fan_in)`` (He et al. 2015, for ReLU) with zero biases."""
    if model == "softmax":
        return {"W": np.zeros((n_in, n_classes)), "b": np.zeros(n_classes)}
    if model == "mlp":
        return {
            "W1": rng.normal(0.0, math.sqrt(2.0 / n_in), (n_in, hidden)),
            "b1": np.zeros(hidden),
            "W2": rng.normal(0.0, math.sqrt(2.0 / hidden), (hidden, n_classes)),
            "b2": np.zeros(n_classes),
        }
    raise ValueError(f"unknown model {model!r}; choose from {', '.join(MODELS)}")


def forward(params: Params, x: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Logits ``z = x W + b`` (softmax regression) or ``z = relu(x W1 + b1) W2 + b2`` (MLP),
    and what :func:`backward` needs."""
    if "W" in params:
        return x @ params["W"] + params["b"], {"x": x}
    pre = x @ params["W1"] + params["b1"]
    h = np.maximum(pre, 0.0)
    return h @ params["W2"] + params["b2"], {"x": x, "pre": pre, "h": h}


def backward(params: Params, cache: dict[str, np.ndarray], dz: np.ndarray) -> Params:
    """Gradients of the loss with respect to every parameter, given ``dz = dloss/dlogits``:
    ``dW = x^T dz``, ``db = sum_n dz``; through the MLP's hidden layer
    ``dh = dz W2^T`` and ``dpre = dh * [pre > 0]``."""
    x = cache["x"]
    if "W" in params:
        return {"W": x.T @ dz, "b": dz.sum(axis=0)}
    dpre = (dz @ params["W2"].T) * (cache["pre"] > 0)
    return {
        "W1": x.T @ dpre, "b1": dpre.sum(axis=0),
        "W2": cache["h"].T @ dz, "b2": dz.sum(axis=0),
    }


class SGD:
    """Plain mini-batch gradient descent: ``w <- w - lr * g``."""

    def __init__(self, lr: float) -> None:
        self.lr = lr

    def step(self, params: Params, grads: Params) -> None:
        for k, g in grads.items():
            params[k] -= self.lr * g


class Adam:
    """Adam (Kingma and Ba 2015, arXiv:1412.6980): ``m <- b1 m + (1 - b1) g``,
    ``v <- b2 v + (1 - b2) g^2``, ``w <- w - lr * m_hat / (sqrt(v_hat) + eps)`` with the
    bias corrections ``m_hat = m / (1 - b1^t)``, ``v_hat = v / (1 - b2^t)``."""

    def __init__(self, lr: float, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8
                 ) -> None:
        self.lr, self.b1, self.b2, self.eps = lr, b1, b2, eps
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


# --------------------------------------------------------------------------------------------
# The experiment
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainConfig:
    """The settings of one run. The defaults are ``crossent train``'s."""

    model: str = "mlp"
    epochs: int = 30
    lr: float = 0.1
    batch_size: int = 32
    hidden: int = 64
    optimizer: str = "sgd"
    seed: int = 0
    label_smoothing: float = 0.1
    gamma: float = 2.0
    n_bins: int = N_BINS

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"unknown model {self.model!r}; choose from {', '.join(MODELS)}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(
                f"unknown optimizer {self.optimizer!r}; choose from {', '.join(OPTIMIZERS)}")
        for name in ("epochs", "batch_size", "hidden", "n_bins"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer (got {value!r})")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an integer >= 0 (got {self.seed!r})")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0 (got {self.lr!r})")
        if not 0 <= self.label_smoothing <= 1:
            raise ValueError(f"label_smoothing must lie in [0, 1] (got {self.label_smoothing!r})")
        _check_gamma(self.gamma)


@dataclass(frozen=True)
class EpochMetrics:
    """One epoch's report, all measured after the epoch's last update."""

    epoch: int
    train_loss: float  # the trained loss, mean over the whole training set
    val_accuracy: float
    val_cross_entropy: float  # nats, whatever loss was trained
    val_ece: float  # expected calibration error, N_BINS bins


@dataclass
class RunResult:
    """The history of one loss's run, its final reliability diagram and weights."""

    loss: str
    config: TrainConfig
    history: list[EpochMetrics] = field(default_factory=list)
    reliability: Reliability | None = None  # of the last epoch
    params: Params = field(default_factory=dict)  # the trained weights

    def epochs_to(self, accuracy: float = TARGET_ACCURACY) -> int | None:
        """The first epoch whose validation accuracy is >= ``accuracy`` (None if never)."""
        return next((m.epoch for m in self.history if m.val_accuracy >= accuracy), None)

    @property
    def final(self) -> EpochMetrics:
        return self.history[-1]

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict: the settings, every epoch, ``epochs_to_95`` (None if never)."""
        rel = self.reliability
        return {
            "loss": self.loss,
            "settings": asdict(self.config),
            "epochs": [asdict(m) for m in self.history],
            "epochs_to_95": self.epochs_to(TARGET_ACCURACY),
            "final_accuracy": self.final.val_accuracy,
            "final_cross_entropy": self.final.val_cross_entropy,
            "final_ece": self.final.val_ece,
            "reliability": None if rel is None else {
                "edges": rel.edges.tolist(),
                "confidence": rel.confidence.tolist(),
                "accuracy": rel.accuracy.tolist(),
                "count": rel.count.tolist(),
            },
        }


def evaluate(params: Params, loss: Loss, data: Dataset, n_bins: int = N_BINS
             ) -> tuple[EpochMetrics, Reliability]:
    """Training loss, validation accuracy, cross-entropy and calibration of ``params``
    (``epoch`` is left 0)."""
    z_train, _ = forward(params, data.x_train)
    z_val, _ = forward(params, data.x_val)
    probs = np.exp(np.asarray(log_softmax(z_val)))
    rel = reliability(probs, data.y_val, n_bins=n_bins)
    metrics = EpochMetrics(
        0,
        loss.value(z_train, data.y_train),
        float(np.mean(np.argmax(z_val, axis=-1) == data.y_val)),
        float(softmax_cross_entropy(z_val, data.y_val)),
        rel.ece,
    )
    return metrics, rel


EpochCallback = Callable[[str, EpochMetrics], None]


def train(loss_name: str, config: TrainConfig = TrainConfig(), data: Dataset | None = None,
          on_epoch: EpochCallback | None = None) -> RunResult:
    """Train ``config.model`` with loss ``loss_name`` for ``config.epochs`` epochs.

    The initial weights come from ``default_rng([seed, 0])`` and the order of the mini-batches
    (a fresh permutation of the training set each epoch) from ``default_rng([seed, 1])``, so
    every loss starts from the same weights and sees the same batches. Each step applies the
    optimizer to ``backward(forward(x), loss.grad(z, y))``.
    """
    loss = make_loss(loss_name, label_smoothing=config.label_smoothing, gamma=config.gamma)
    data = load_digits_split() if data is None else data
    init_rng = np.random.default_rng([config.seed, 0])
    order_rng = np.random.default_rng([config.seed, 1])
    params = init_params(config.model, data.x_train.shape[1], data.num_classes,
                         hidden=config.hidden, rng=init_rng)
    opt: SGD | Adam = SGD(config.lr) if config.optimizer == "sgd" else Adam(config.lr)
    result = RunResult(loss_name, config, params=params)
    n = data.x_train.shape[0]
    with np.errstate(over="ignore", invalid="ignore"):
        for epoch in range(1, config.epochs + 1):
            order = order_rng.permutation(n)
            for start in range(0, n, config.batch_size):
                idx = order[start:start + config.batch_size]
                z, cache = forward(params, data.x_train[idx])
                opt.step(params, backward(params, cache, loss.grad(z, data.y_train[idx])))
            metrics, rel = evaluate(params, loss, data, config.n_bins)
            metrics = replace(metrics, epoch=epoch)
            result.history.append(metrics)
            result.reliability = rel
            if on_epoch is not None:
                on_epoch(loss_name, metrics)
    return result


def check_losses(losses: Sequence[str]) -> list[str]:
    """``losses`` with duplicates dropped, in the given order; ValueError for unknown names."""
    out: list[str] = []
    for name in losses:
        if name not in LOSSES:
            raise ValueError(f"unknown loss {name!r}; choose from {', '.join(LOSSES)}")
        if name not in out:
            out.append(name)
    if not out:
        raise ValueError(f"no loss given; choose from {', '.join(LOSSES)}")
    return out


def compare(losses: Sequence[str] = LOSSES, config: TrainConfig = TrainConfig(),
            data: Dataset | None = None, on_epoch: EpochCallback | None = None
            ) -> dict[str, RunResult]:
    """Train one model per loss with the same settings, seed, data and batches."""
    names = check_losses(losses)
    data = load_digits_split() if data is None else data
    return {name: train(name, config, data, on_epoch) for name in names}


def _finite(obj: Any) -> Any:
    """``obj`` with every NaN or infinite float replaced by None (strict JSON)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def metrics_json(results: dict[str, RunResult]) -> dict[str, Any]:
    """``metrics.json``'s content: an object keyed by loss name, each value
    :meth:`RunResult.to_json` with non-finite numbers (a diverged run) as None."""
    return {name: _finite(r.to_json()) for name, r in results.items()}


TOUR_CONFIG = TrainConfig(model="mlp", epochs=10)
"""The quick setting of ``crossent tour``'s last chapter."""
