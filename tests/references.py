"""Independent references for tests/test_losses.py and tests/test_grad.py: PyTorch written
out in float64, and the grids and data they are compared on. Nothing here calls crossent.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

REDUCTIONS = ("none", "sum", "mean")

# ARTICLE.md's worked-example table as printed: bits, nats, hartleys, to 6 decimals
# (test_article.py, test_session27_article_review.py). Its soft-truth hartleys, 0.487140,
# is a typo: 1.121686 nats / ln 10 = 0.4871420.
ARTICLE_TABLE = {
    "panda": (9.965784, 6.907755, 3.000000),
    "entropy": (1.485475, 1.029653, 0.447173),
    "cross_entropy": (0.514573, 0.356675, 0.154902),
    "soft_cross_entropy": (1.618251, 1.121686, 0.487140),
    "coin_entropy": (0.080793, 0.056002, 0.024321),
    "coin_cross_entropy": (6.577563, 4.559219, 1.980044),
    "quiz4": (0.514573, 0.356675, 0.154902),
}


def t64(a: Any) -> torch.Tensor | None:
    """A NumPy array as a CPU torch tensor (float64 stays float64), None stays None."""
    return None if a is None else torch.tensor(np.ascontiguousarray(a))


# ---- softmax cross-entropy: option grid, data and the torch reference -----------------


def ce_option_grid() -> list[Any]:
    """Every combination of target kind, weight, ignore_index, label_smoothing, reduction.

    ``ignore``: None (nothing ignored), -100 (the default sentinel) or 1 (a real class id).
    Probability targets have no ignore_index, so only ``None`` is paired with them.
    """
    grid = itertools.product(("index", "prob"), (False, True), (None, -100, 1), (0.0, 0.2),
                             REDUCTIONS)
    return [
        pytest.param(kind, weighted, ignore, eps, red,
                     id=f"{kind}-{'w' if weighted else 'now'}-ign{ignore}-ls{eps}-{red}")
        for kind, weighted, ignore, eps, red in grid
        if not (kind == "prob" and ignore is not None)
    ]


def ce_data(rng, kind: str, weighted: bool, ignore: int | None, shape=(7, 5), axis=-1):
    """Logits, target, weight and the ignore_index keyword for one grid cell (NumPy)."""
    z = 2.0 * rng.normal(size=shape)
    num_classes = shape[axis]
    batch = tuple(int(d) for d in np.delete(shape, axis % len(shape)))
    if kind == "index":
        target = rng.integers(0, num_classes, size=batch)
        target.flat[::2] = 1  # class 1 appears, so ignore=1 has rows to ignore
        if ignore is not None:
            target.flat[1::3] = ignore
    else:
        target = np.moveaxis(rng.dirichlet(np.ones(num_classes), size=batch), -1, axis)
    weight = rng.uniform(0.5, 2.0, size=num_classes) if weighted else None
    extra = {} if ignore is None else {"ignore_index": ignore}
    return z, target, weight, extra


def masked_data(rng, kind: str, masked: int = 2):
    """(7, 5) logits whose class ``masked`` is -inf, and targets giving it probability 0."""
    z = rng.normal(size=(7, 5))
    z[:, masked] = -np.inf
    if kind == "index":
        return z, rng.choice(np.delete(np.arange(5), masked), size=7)
    t = rng.dirichlet(np.ones(5), size=7)
    t[:, masked] = 0.0
    return z, t / t.sum(axis=1, keepdims=True)


def torch_softmax_ce(z, target, *, weight=None, ignore_index=-100, label_smoothing=0.0,
                     z_loss=0.0, softcap=None, reduction="mean"):
    """Reference in plain torch, class axis 1: softcap, then F.cross_entropy + z-loss.

    The z-loss term ``z_loss * logsumexp(z)^2`` is added to each counted row; "mean"
    divides it by F.cross_entropy's own denominator (counted rows, or sum_n w[y_n]).
    """
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    ce = F.cross_entropy(z, target, weight=weight, ignore_index=ignore_index,
                         label_smoothing=label_smoothing, reduction=reduction)
    if not z_loss:
        return ce
    zl = z_loss * torch.logsumexp(z, dim=1) ** 2
    if target.is_floating_point():
        denominator = zl.numel()
    else:
        counted = target != ignore_index
        zl = zl * counted
        w = torch.ones(z.shape[1], dtype=z.dtype) if weight is None else weight
        denominator = (w[target.clamp(0, z.shape[1] - 1)] * counted).sum()
    return ce + {"none": zl, "sum": zl.sum(), "mean": zl.sum() / denominator}[reduction]


def torch_layout(z: np.ndarray, target: np.ndarray, axis: int):
    """Move the class axis to 1 (torch's layout) for the reference."""
    z = np.moveaxis(z, axis, 1) if z.ndim > 1 else z
    if np.issubdtype(target.dtype, np.floating):
        target = np.moveaxis(target, axis, 1)
    return z, target


# ---- sigmoid focal loss ----------------------------------------------------------------


def torch_focal(x, t, alpha, gamma, reduction):
    """torchvision.ops.sigmoid_focal_loss written out (torchvision is not installed);
    ``alpha=None`` disables the alpha weighting (torchvision's alpha < 0)."""
    p = torch.sigmoid(x)
    ce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
    p_t = p * t + (1 - p) * (1 - t)
    loss = ce * (1 - p_t) ** gamma
    if alpha is not None:
        loss = (alpha * t + (1 - alpha) * (1 - t)) * loss
    return {"none": loss, "sum": loss.sum(), "mean": loss.mean()}[reduction]
