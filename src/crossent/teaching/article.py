"""The article's worked examples, each computed by the library (never typed in).

The article ("cross-entropy loss", an interview-prep deep dive) writes ``log`` without a
base; its three printed numbers (9.965784, 1.485475, 0.514573) are base-2 values, so the
examples are reported in bits, nats and hartleys side by side. ``python -m crossent``
prints them; the CLI's tour (``crossent tour``) walks through them with formulas.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from ..losses import binary_cross_entropy, softmax_cross_entropy
from ..measures import cross_entropy, entropy, surprisal
from .content import UNITS as _UNITS

UNITS = {name: unit.base for name, unit in _UNITS.items()}
"""The log base of each unit: bits, nats, hartleys."""


@dataclass(frozen=True)
class WorkedExample:
    """One worked number: what it is, the formula as the article writes it, how to compute."""

    key: str
    title: str
    formula: str
    compute: Callable[[float], float]  # base -> value

    def value(self, base: float = 2.0) -> float:
        return float(self.compute(base))

    def values(self) -> dict[str, float]:
        """The value in bits, nats and hartleys."""
        return {unit: self.value(base) for unit, base in UNITS.items()}


PANDA = 0.001
ANIMALS = [0.2, 0.3, 0.5]  # [panda, bird, dog]
PREDICTION = [0.1, 0.2, 0.7]
ONE_HOT = [0.0, 0.0, 1.0]
COIN_TRUTH = [0.99, 0.01]
COIN_BELIEF = [0.01, 0.99]
QUIZ_PREDICTION = [0.7, 0.2, 0.1]
QUIZ_TARGET = [1.0, 0.0, 0.0]

EXAMPLES: tuple[WorkedExample, ...] = (
    WorkedExample(
        "panda", "surprise of a panda, p = 0.001", "s = log(1/0.001)",
        lambda b: float(surprisal(PANDA, base=b)),
    ),
    WorkedExample(
        "entropy", "entropy of [panda, bird, dog] = [0.2, 0.3, 0.5]",
        "e = sum_i y_i log(1/y_i)", lambda b: float(entropy(ANIMALS, base=b)),
    ),
    WorkedExample(
        "cross_entropy", "cross-entropy, prediction [0.1, 0.2, 0.7], truth [0, 0, 1]",
        "c = sum_i p_i log(1/q_i) = log(1/0.7)",
        lambda b: float(cross_entropy(ONE_HOT, PREDICTION, base=b)),
    ),
    WorkedExample(
        "soft_cross_entropy",
        "cross-entropy, prediction [0.1, 0.2, 0.7], soft truth [0.2, 0.3, 0.5]",
        "c = sum_i p_i log(1/q_i)", lambda b: float(cross_entropy(ANIMALS, PREDICTION, base=b)),
    ),
    WorkedExample(
        "coin_entropy", "loaded coin: entropy of truth [0.99, 0.01]",
        "e = sum_i p_i log(1/p_i)", lambda b: float(entropy(COIN_TRUTH, base=b)),
    ),
    WorkedExample(
        "coin_cross_entropy", "loaded coin: truth [0.99, 0.01], belief [0.01, 0.99]",
        "c = sum_i p_i log(1/q_i)",
        lambda b: float(cross_entropy(COIN_TRUTH, COIN_BELIEF, base=b)),
    ),
    WorkedExample(
        "quiz4", "quiz 4: prediction [0.7, 0.2, 0.1], target [1, 0, 0]",
        "c = sum_i p_i log(1/q_i) = log(1/0.7)",
        lambda b: float(cross_entropy(QUIZ_TARGET, QUIZ_PREDICTION, base=b)),
    ),
)


def loss_from_logits_example() -> float:
    """The same quiz-4 number reached the way a framework gets it: as the softmax
    cross-entropy of logits ``log q`` with class-index target 0 (in nats)."""
    logits = [[math.log(q) for q in QUIZ_PREDICTION]]
    return float(softmax_cross_entropy(logits, [0]))


def binary_example() -> float:
    """The article's binary cross-entropy for a cat image (p0 = 1) predicted at q0 = 0.7."""
    return float(binary_cross_entropy([0.7], [1.0]))


def format_table() -> str:
    """The worked examples as a plain-text table (no third-party dependency)."""
    head = f"{'example':<72} {'bits':>10} {'nats':>10} {'hartleys':>10}"
    lines = [head, "-" * len(head)]
    for ex in EXAMPLES:
        v = ex.values()
        lines.append(f"{ex.title:<72} {v['bits']:>10.6f} {v['nats']:>10.6f} {v['hartleys']:>10.6f}")
        lines.append(f"    {ex.formula}")
    lines.append("")
    lines.append(
        "quiz 4 as a framework computes it, softmax_cross_entropy(log q, target=0): "
        f"{loss_from_logits_example():.6f} nats"
    )
    lines.append(
        f"binary cross-entropy of a cat predicted at q0 = 0.7: {binary_example():.6f} nats"
    )
    lines.append("cross-entropy >= entropy: the soft-truth row (1.618 bits) exceeds H([.2,.3,.5]).")
    soft = next(ex for ex in EXAMPLES if ex.key == "soft_cross_entropy").values()
    lines.append(f"(the article prints 0.487140 hartleys for the soft-truth row; "
                 f"{soft['nats']:.6f} nats / ln 10 = {soft['hartleys']:.6f}: a typo there)")
    return "\n".join(lines)
