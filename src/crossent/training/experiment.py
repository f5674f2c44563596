"""The experiment: train one model per loss with the same settings, seed and batches, record
every epoch, and write the results as JSON."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from ..activations import log_softmax
from ..losses import softmax_cross_entropy
from .data import Dataset, load_digits_split
from .losses import LOSSES, Loss, _check_gamma, make_loss
from .metrics import N_BINS, Reliability, reliability
from .model import MODELS, Params, backward, forward, init_params
from .optim import OPTIMIZERS, SGD, Adam

TARGET_ACCURACY = 0.95


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
