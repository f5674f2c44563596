"""The experiment: train one model per loss with the same settings, seed and batches, record
every epoch, and write the results as JSON."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from .._checks import as_float
from ..activations import log_softmax
from ..errors import InputError
from ..losses import softmax_cross_entropy
from .data import Dataset, load_digits_split
from .losses import LOSSES, Loss, _check_gamma, make_loss
from .metrics import MAX_BINS, N_BINS, Reliability, reliability
from .model import MODELS, Params, backward, forward, init_params
from .optim import OPTIMIZERS, SGD, Adam

TARGET_ACCURACY = 0.95


@dataclass(frozen=True)
class TrainConfig:
    """The settings of one run. The defaults are ``crossent train``'s.

    >>> TrainConfig(epochs=5).epochs, TrainConfig().model
    (5, 'mlp')
    >>> TrainConfig(lr=0.0)
    Traceback (most recent call last):
    crossent.errors.InputError: lr must be a finite number > 0 (got 0.0)
    """

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
        """Every setting checked (an :class:`~crossent.errors.InputError` naming it); NumPy
        numbers become Python ones (the settings go into ``metrics.json``)."""
        if self.model not in MODELS:
            raise InputError(f"model={self.model!r}: unknown model; choose from "
                             f"{', '.join(MODELS)}")
        if self.optimizer not in OPTIMIZERS:
            raise InputError(f"optimizer={self.optimizer!r}: unknown optimizer; choose from "
                             f"{', '.join(OPTIMIZERS)}")
        for name, low, high in (("epochs", 1, None), ("batch_size", 1, None),
                                ("hidden", 1, MAX_HIDDEN), ("n_bins", 1, MAX_BINS),
                                ("seed", 0, None)):
            object.__setattr__(self, name, _integer(name, getattr(self, name), low, high))
        lr = _real("lr", self.lr)
        if not (math.isfinite(lr) and lr > 0):
            raise InputError(f"lr must be a finite number > 0 (got {self.lr!r})")
        smoothing = _real("label_smoothing", self.label_smoothing)
        if not 0 <= smoothing <= 1:
            raise InputError(f"label_smoothing must lie in [0, 1] (got {self.label_smoothing!r})")
        object.__setattr__(self, "lr", lr)
        object.__setattr__(self, "label_smoothing", smoothing)
        object.__setattr__(self, "gamma", _check_gamma(self.gamma))


MAX_HIDDEN = 2**31 - 1
"""The most hidden units :class:`TrainConfig` takes: more would not fit NumPy's array sizes
(and no memory: the first layer alone holds 64 x hidden float64 numbers)."""


def _integer(name: str, value: Any, low: int, high: int | None) -> int:
    """``value`` as an ``int`` in [low, high]; an :class:`InputError` naming ``name`` otherwise
    (a bool is not an integer here)."""
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool | np.bool_)
    if not ok or value < low or (high is not None and value > high):
        what = "a positive integer" if low == 1 else f"an integer >= {low}"
        limit = f" and <= {high}" if high is not None else ""
        raise InputError(f"{name} must be {what}{limit} (got {value!r})")
    return int(value)


def _real(name: str, value: Any) -> float:
    """``value`` as a ``float``; an :class:`InputError` naming ``name`` when it is not a real
    number (a bool or a string is not). An int beyond float's range becomes +-inf (not an
    ``OverflowError``), which the range checks then refuse."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool | np.bool_):
        raise InputError(f"{name} must be a number (got {value!r})")
    return as_float(value)


@dataclass(frozen=True)
class EpochMetrics:
    """One epoch's report, all measured after the epoch's last update.

    >>> EpochMetrics(epoch=1, train_loss=0.4, val_accuracy=0.9, val_cross_entropy=0.35,
    ...              val_ece=0.05).val_accuracy
    0.9
    """

    epoch: int
    train_loss: float  # the trained loss, mean over the whole training set
    val_accuracy: float
    val_cross_entropy: float  # nats, whatever loss was trained
    val_ece: float  # expected calibration error, N_BINS bins


@dataclass
class RunResult:
    """The history of one loss's run, its final reliability diagram and weights.

    >>> run = RunResult("ce", TrainConfig(), [EpochMetrics(1, 0.5, 0.90, 0.3, 0.05),
    ...                                       EpochMetrics(2, 0.2, 0.96, 0.1, 0.02)])
    >>> run.epochs_to(0.95), run.final.epoch
    (2, 2)
    """

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
    (``epoch`` is left 0).

    Zero weights predict the uniform distribution: cross-entropy ``ln C``, every row's
    confidence ``1 / C``:

    >>> x, y = np.eye(2), np.array([0, 1])
    >>> metrics, rel = evaluate({"W": np.zeros((2, 2)), "b": np.zeros(2)}, make_loss("ce"),
    ...                         Dataset(x, y, x, y, 2))
    >>> math.isclose(metrics.val_cross_entropy, math.log(2)), int(rel.count.sum())
    (True, 2)
    """
    z_train, _ = forward(params, data.x_train)
    z_val, _ = forward(params, data.x_val)
    probs = np.exp(np.asarray(log_softmax(z_val)))
    rel = reliability(probs, data.y_val, n_bins=n_bins)
    metrics = EpochMetrics(
        0,
        loss.value(z_train, data.y_train),
        _accuracy(z_val, data.y_val),
        float(softmax_cross_entropy(z_val, data.y_val)),
        rel.ece,
    )
    return metrics, rel


def _accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """The fraction of rows whose largest logit is the label's; NaN when a row's logits hold a
    NaN (a diverged model predicts nothing: NumPy's argmax would say class 0)."""
    if np.isnan(logits).any():
        return math.nan
    return float(np.mean(np.argmax(logits, axis=-1) == labels))


EpochCallback = Callable[[str, EpochMetrics], None]


def train(loss_name: str, config: TrainConfig = TrainConfig(), data: Dataset | None = None,
          on_epoch: EpochCallback | None = None) -> RunResult:
    """Train ``config.model`` with loss ``loss_name`` for ``config.epochs`` epochs.

    The initial weights come from ``default_rng([seed, 0])`` and the order of the mini-batches
    (a fresh permutation of the training set each epoch) from ``default_rng([seed, 1])``, so
    every loss starts from the same weights and sees the same batches. Each step applies the
    optimizer to ``backward(forward(x), loss.grad(z, y))``.

    >>> rng = np.random.default_rng(0)
    >>> x = np.concatenate([rng.normal(-2, 1, (20, 2)), rng.normal(2, 1, (20, 2))])
    >>> y = np.repeat([0, 1], 20)
    >>> config = TrainConfig(model="softmax", epochs=3)
    >>> run = train("ce", config, Dataset(x, y, x, y, 2))
    >>> len(run.history), run.final.val_accuracy > 0.9
    (3, True)
    >>> train("ce", config, Dataset(x, y, x, y, 2)).final == run.final  # same seed
    True
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


def check_losses(losses: Sequence[str], *, argument: str = "losses") -> list[str]:
    """``losses`` with duplicates dropped, in the given order; an
    :class:`~crossent.errors.InputError` naming ``argument`` (``crossent train`` passes
    ``--loss``) for an unknown name or none.

    >>> check_losses(["ce", "mse", "ce"])
    ['ce', 'mse']
    """
    if isinstance(losses, str):  # "ce" would be read as the losses "c" and "e"
        raise InputError(f"{argument} must be a sequence of names such as ['ce'] "
                         f"(got {losses!r})")
    out: list[str] = []
    for name in losses:
        if name not in LOSSES:
            raise InputError(f"{argument}: unknown loss {name!r}; choose from "
                             f"{', '.join(LOSSES)}")
        if name not in out:
            out.append(name)
    if not out:
        raise InputError(f"{argument}: no loss given; choose from {', '.join(LOSSES)}")
    return out


def compare(losses: Sequence[str] = LOSSES, config: TrainConfig = TrainConfig(),
            data: Dataset | None = None, on_epoch: EpochCallback | None = None
            ) -> dict[str, RunResult]:
    """Train one model per loss with the same settings, seed, data and batches.

    >>> x, y = np.array([[-1.0], [1.0]]), np.array([0, 1])
    >>> runs = compare(["ce", "mse"], TrainConfig(model="softmax", epochs=2),
    ...                Dataset(x, y, x, y, 2))
    >>> {name: len(run.history) for name, run in runs.items()}
    {'ce': 2, 'mse': 2}
    """
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
    :meth:`RunResult.to_json` with non-finite numbers (a diverged run) as None.

    >>> nan = float("nan")
    >>> run = RunResult("ce", TrainConfig(), [EpochMetrics(1, nan, 0.5, nan, nan)])
    >>> out = metrics_json({"ce": run})["ce"]
    >>> out["final_cross_entropy"], out["final_accuracy"], out["settings"]["model"]
    (None, 0.5, 'mlp')
    """
    return {name: _finite(r.to_json()) for name, r in results.items()}


TOUR_CONFIG = TrainConfig(model="mlp", epochs=10)
"""The quick setting of ``crossent tour``'s last chapter."""
