"""The tour's figures, drawn with matplotlib (Agg, no display) from :mod:`crossent.teaching.curves`.

``make_figure(name)`` returns a :class:`matplotlib.figure.Figure` whose lines and bars hold
exactly the library's numbers; ``render`` and ``save`` write it as PNG or SVG.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import InputError
from ..teaching import curves
from ..teaching.article import COIN_BELIEF, COIN_TRUTH
from ..teaching.tour import GRADIENT_LOGITS, GRADIENT_TARGET, training_results
from .files import write_atomic

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["FIGURES", "GRADIENT_LOGITS", "GRADIENT_TARGET", "NAMES", "FigureSpec",
           "make_figure", "render", "save"]


@dataclass(frozen=True)
class FigureSpec:
    name: str
    title: str
    alt: str  # what the figure shows, for the HTML page's alt text
    draw: Callable[[Figure, float, str], None]  # (figure, base, unit name)
    in_unit: bool = True  # False: drawn in nats (or unitless) whatever the base


def _axes(fig: Figure, title: str, xlabel: str, ylabel: str) -> Any:
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    return ax


def _surprisal(fig: Figure, base: float, unit: str) -> None:
    c = curves.surprisal_curve(base=base)
    ax = _axes(fig, "Surprise log(1/p)", "probability p of the outcome", f"surprise ({unit})")
    ax.plot(c.x, c.series["surprisal"], label="surprisal")
    for p, name in ((0.001, "panda"), (0.5, "bird")):
        y = c.series["surprisal"][c.x == p][0]
        ax.plot([p], [y], "o", label=f"{name}, p = {p:g}")
    ax.legend()


def _coin_entropy(fig: Figure, base: float, unit: str) -> None:
    c = curves.coin_entropy_curve(base=base)
    ax = _axes(fig, "Entropy of a coin", "probability of heads", f"entropy ({unit})")
    ax.plot(c.x, c.series["entropy"], label="entropy")
    y = c.series["entropy"][c.x == COIN_TRUTH[0]][0]
    ax.plot([COIN_TRUTH[0]], [y], "o", label=f"loaded coin, heads {COIN_TRUTH[0]:g}")
    ax.legend()


def _log_loss(fig: Figure, base: float, unit: str) -> None:
    c = curves.log_loss_curves()
    ax = _axes(fig, "Log Loss when true label = 1", "predicted probability q", "loss")
    for label in ("-ln q", "1 - q", "(1 - q)^2"):
        ax.plot(c.x, c.series[label], label=label)
    ax.legend()


def _cross_vs_entropy(fig: Figure, base: float, unit: str) -> None:
    c = curves.coin_cross_entropy_curve(COIN_TRUTH, base=base)
    ax = _axes(fig, "Cross-entropy >= entropy: the loaded coin",
               "believed probability of heads", f"{unit}")
    ax.plot(c.x, c.series["cross-entropy"], label="cross-entropy H(p, q)")
    ax.plot(c.x, c.series["entropy"], "--", label="entropy H(p)")
    y = c.series["cross-entropy"][c.x == COIN_BELIEF[0]][0]
    ax.plot([COIN_BELIEF[0]], [y], "o", label=f"belief heads {COIN_BELIEF[0]:g}")
    ax.legend()


def _gradient(fig: Figure, base: float, unit: str) -> None:
    g = curves.softmax_gradient_check(GRADIENT_LOGITS, GRADIENT_TARGET)
    ax = _axes(fig, "Gradient of softmax cross-entropy per class", "class",
               "d loss / d logit (nats)")
    classes = list(range(g.analytic.size))
    ax.bar([i - 0.2 for i in classes], g.analytic, width=0.4, label="softmax(a) - b")
    ax.bar([i + 0.2 for i in classes], g.numeric, width=0.4, label="finite difference")
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(classes)
    ax.legend()


def _training(fig: Figure, base: float, unit: str) -> None:
    from .train import draw_accuracy

    draw_accuracy(fig, training_results())  # the tour's quick experiment (cached)


FIGURES: dict[str, FigureSpec] = {
    spec.name: spec
    for spec in (
        FigureSpec("surprisal", "Surprise of an outcome",
                   "Surprisal curve: surprise log(1/p) falls from high (panda, p = 0.001) "
                   "to low (bird, p = 0.5) and 0 at p = 1", _surprisal),
        FigureSpec("coin-entropy", "Entropy of a coin",
                   "Entropy of a coin against its bias: 0 for a certain coin, maximal "
                   "at a fair coin", _coin_entropy),
        FigureSpec("log-loss", "Log loss for true label 1",
                   "Log-loss curve for true label 1: -ln q grows without bound as q goes "
                   "to 0, while 1 - q and (1 - q)^2 stay in [0, 1]", _log_loss, in_unit=False),
        FigureSpec("cross-entropy-vs-entropy", "Cross-entropy is at least entropy",
                   "Cross-entropy of every belief about the loaded coin stays above its "
                   "entropy and touches it only at the true bias 0.99", _cross_vs_entropy),
        FigureSpec("gradient", "Softmax cross-entropy gradient",
                   "Gradient per class of softmax cross-entropy for logits [2, 1, 0.1], "
                   "true class 0: softmax(a) - b next to a finite difference", _gradient,
                   in_unit=False),
        FigureSpec("training", "Validation accuracy per epoch, one line per loss",
                   "Validation accuracy against epoch on the digits for cross-entropy, "
                   "squared error, plain error, label-smoothed cross-entropy and focal loss",
                   _training, in_unit=False),
    )
}
NAMES = tuple(FIGURES)


def make_figure(name: str, base: float = 2.0, unit: str = "bits") -> Figure:
    """Draw figure ``name`` (one of :data:`NAMES`) with its data in ``unit`` (log ``base``)."""
    from matplotlib.figure import Figure

    if name not in FIGURES:
        raise InputError(f"unknown plot {name!r}; choose one of {', '.join(NAMES)}")
    fig = Figure(figsize=(6.4, 4.0), layout="constrained")
    FIGURES[name].draw(fig, base, unit)
    return fig


@functools.lru_cache(maxsize=32)
def render(name: str, fmt: str = "png", base: float = 2.0, unit: str = "bits") -> bytes:
    """Figure ``name`` as PNG or SVG bytes (cached: the tour's files and its web page share
    each drawing)."""
    if fmt not in ("png", "svg"):
        raise InputError(f"unknown figure format {fmt!r}; use png or svg")
    buf = io.BytesIO()
    make_figure(name, base, unit).savefig(buf, format=fmt, dpi=100)
    return buf.getvalue()


def save(name: str, path: Path, base: float = 2.0, unit: str = "bits") -> Path:
    """Write figure ``name`` to ``path``; its suffix (.png or .svg) picks the format."""
    return write(path, draw(name, path, base, unit))


def draw(name: str, path: Path, base: float = 2.0, unit: str = "bits") -> bytes:
    """Figure ``name`` in the format ``path``'s suffix (.png or .svg) picks, in memory."""
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in ("png", "svg"):
        raise InputError(f"--out {str(path)!r} must end in .png or .svg")
    return render(name, fmt, base, unit)


def write(path: Path, data: bytes) -> Path:
    """``data`` written atomically to ``path`` (missing folders created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, data)
    return path
