"""The tour's content: the article's chain of ideas, every worked number computed on the spot.

:func:`build_tour` returns a :class:`~crossent.teaching.content.Tour` (sections of prose,
worked examples, tables, figure and widget names). The numbers come from crossent's
functions; this module only arranges them and writes them into formulas. ``crossent tour``
prints the result (:mod:`crossent.cli.tour`) or writes it as a web page
(:mod:`crossent.cli.html`).

>>> tour = build_tour(UNITS["bits"])
>>> tour.sections[1].worked[0].value == float(surprisal(0.001, base=2))
True
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from .. import training as tr
from ..measures import binary_entropy, cross_entropy, kl_divergence, surprisal
from ..targets import mixup, mixup_params, smooth_labels
from . import article as art
from . import curves
from .content import UNITS, Section, Table, Tour, Unit, Worked, unit_beside
from .formula import fmt, short, vector

__all__ = ["GRADIENT_LOGITS", "GRADIENT_TARGET", "ML_PROBS", "ML_TARGET", "UNITS",
           "build_tour", "training_results"]

GRADIENT_LOGITS = (2.0, 1.0, 0.1)
GRADIENT_TARGET = (1.0, 0.0, 0.0)
ML_PROBS, ML_TARGET = [0.9, 0.2, 0.6], [1.0, 0.0, 1.0]
CE_FORMULA = "c = sum_i p_i log(1/q_i)"
BCE_FORMULA = "c = p0 log(1/q0) + (1 - p0) log(1/(1 - q0))"

Compute = Callable[[float], Any]  # log base -> a number (float or 0-d array)


def _terms(weights: list[float], probs: list[float], log: str) -> str:
    pairs = zip(weights, probs, strict=True)
    return " + ".join(f"{short(w)}·{log}(1/{short(q)})" for w, q in pairs)


def _sum(values: object) -> str:
    return " + ".join(fmt(v) for v in values)  # type: ignore[attr-defined]


def _worked(label: str, formula: str, substituted: str, compute: Compute, u: Unit,
            b: Unit) -> Worked:
    return Worked(label, formula, substituted, float(compute(u.base)), float(compute(b.base)))


def _article(key: str) -> art.WorkedExample:
    return next(ex for ex in art.EXAMPLES if ex.key == key)


def _ce_terms(p: list[float], q: list[float], base: float) -> object:
    return curves.multiclass_breakdown(probs=q, target=p, base=base).terms


def build_tour(unit: Unit = UNITS["bits"]) -> Tour:
    """The tour's content in ``unit`` (bits by default) with a second unit beside it."""
    u, b = unit, unit_beside(unit)
    return Tour(u, b, [
        _intro(u), _surprise(u, b), _entropy(u, b), _cross_entropy(u, b), _loss(u, b),
        _binary(u, b), _multilabel(u, b), _soft_targets(u, b), _why(), _training(),
    ])


def _intro(u: Unit) -> Section:
    return Section("0. The one-minute answer", [
        "Cross-entropy loss is the standard loss for multi-class classification. It rests on "
        "cross-entropy, a measure between two probability vectors (usually a one-hot label and "
        "a prediction). It punishes a prediction on a logarithmic curve: the further the "
        "predicted probability of the true class is from 1, the steeper the loss grows "
        "(towards infinity as it approaches 0). It is usually paired with softmax.",
        "Where it is used: multi-class classification (one of many classes, e.g. image "
        "recognition: softmax + cross-entropy); binary classification (binary cross-entropy); "
        "multi-label classification (several labels true at once: the sum over labels of each "
        "label's binary cross-entropy).",
        "The article writes log without a base; its worked numbers are base 2 (bits), its "
        "log-loss plot uses the natural log, and every ML framework reports nats. Results "
        f"below are in {u.name}.",
    ])


def _surprise(u: Unit, b: Unit) -> Section:
    L = u.log
    return Section("1. Surprise", [
        "The surprise (self-information) of an outcome of probability p is "
        "`log(1/p) = -log p`. A panda in the forest (p = 0.001) is very surprising; a bird "
        "(p = 0.5) is not.",
    ], [
        _worked("surprise of a panda, p = 0.001", "s = log(1/p)", f"s = {L}(1/0.001)",
                _article("panda").value, u, b),
        _worked("surprise of a bird, p = 0.5 (low)", "s = log(1/p)", f"s = {L}(1/0.5)",
                lambda base: surprisal(0.5, base=base), u, b),
    ], figures=["surprisal"], widgets=["surprise"])


def _entropy(u: Unit, b: Unit) -> Section:
    animals, coin, L = art.ANIMALS, art.COIN_TRUTH, u.log
    return Section("2. Entropy", [
        "The entropy of a random event is the probability-weighted sum of the surprises of its "
        "outcomes: `H(p) = -sum_i p_i log p_i`. A certain outcome has entropy 0; a fair coin "
        "has 1 bit.",
    ], [
        _worked("entropy of [panda, bird, dog] = [0.2, 0.3, 0.5]", "e = sum_i p_i log(1/p_i)",
                f"e = {_terms(animals, animals, L)} = {_sum(_ce_terms(animals, animals, u.base))}",
                _article("entropy").value, u, b),
        _worked("loaded coin: entropy of truth [0.99, 0.01]", "e = sum_i p_i log(1/p_i)",
                f"e = {_terms(coin, coin, L)} = {_sum(_ce_terms(coin, coin, u.base))}",
                _article("coin_entropy").value, u, b),
        _worked("a fair coin, [0.5, 0.5]", "e = sum_i p_i log(1/p_i)",
                f"e = {_terms([0.5, 0.5], [0.5, 0.5], L)}",
                lambda base: binary_entropy(0.5, base=base), u, b),
    ], figures=["coin-entropy"], widgets=["entropy"])


def _cross_entropy(u: Unit, b: Unit) -> Section:
    p, q, hot, L = art.ANIMALS, art.PREDICTION, art.ONE_HOT, u.log
    truth, belief = art.COIN_TRUTH, art.COIN_BELIEF
    kl = kl_divergence(p, q, base=u.base)
    return Section("3. Cross-entropy", [
        "Cross-entropy measures the surprise with the predicted probabilities q while the "
        "outcomes happen with the true probabilities p: `H(p, q) = -sum_i p_i log q_i`.",
        "A loaded coin lands heads 99% of the time, but we believe it lands tails 99% of the "
        "time: we are almost always very surprised, so the cross-entropy is large.",
        "Cross-entropy is always >= entropy, with equality only for a perfect prediction "
        f"(q = p). For the soft truth below: `H(p, q) - H(p) = KL(p || q) = {fmt(kl)}` "
        f"{u.name} >= 0.",
    ], [
        _worked("cross-entropy, prediction [0.1, 0.2, 0.7], truth [0, 0, 1]", CE_FORMULA,
                f"c = {_terms(hot, q, L)} = {L}(1/0.7)", _article("cross_entropy").value, u, b),
        _worked("cross-entropy, prediction [0.1, 0.2, 0.7], soft truth [0.2, 0.3, 0.5]",
                CE_FORMULA, f"c = {_terms(p, q, L)} = {_sum(_ce_terms(p, q, u.base))}",
                _article("soft_cross_entropy").value, u, b),
        _worked("loaded coin: truth [0.99, 0.01], belief [0.01, 0.99]", CE_FORMULA,
                f"c = {_terms(truth, belief, L)} = {_sum(_ce_terms(truth, belief, u.base))}",
                _article("coin_cross_entropy").value, u, b),
    ], figures=["cross-entropy-vs-entropy"], widgets=["cross-entropy"])


def _loss(u: Unit, b: Unit) -> Section:
    other, L = [0.25, 0.05, 0.7], u.log
    logits = list(GRADIENT_LOGITS)
    fw = curves.multiclass_breakdown(logits=logits, target=0, base=u.base)
    return Section("4. Cross-entropy loss", [
        "The cross-entropy loss is the cross-entropy between the ground truth (usually "
        "one-hot) and the model's predicted probabilities (usually a softmax output). With a "
        "one-hot target only the true class's surprise counts, however the rest of the mass "
        "is spread.",
    ], [
        _worked("only the true class counts: prediction [0.25, 0.05, 0.7], truth [0, 0, 1]",
                CE_FORMULA, f"c = {_terms(art.ONE_HOT, other, L)} = {L}(1/0.7)",
                lambda base: cross_entropy(art.ONE_HOT, other, base=base), u, b),
        _worked("quiz 4: prediction [0.7, 0.2, 0.1], target [1, 0, 0]", CE_FORMULA,
                f"c = {_terms(art.QUIZ_TARGET, art.QUIZ_PREDICTION, L)} = {L}(1/0.7)",
                _article("quiz4").value, u, b),
        _worked(f"from logits a = {vector(logits)}, true class 0 (what a framework computes)",
                "c = -log softmax(a)_0",
                f"softmax(a) = [{', '.join(fmt(v) for v in fw.probs)}]; "
                f"c = {L}(1/{fmt(fw.probs[0])})",
                lambda base: curves.multiclass_breakdown(logits=logits, target=0,
                                                         base=base).loss, u, b),
    ], widgets=["logits"])


def _bce(q: float, t: float, base: float) -> float:
    return curves.label_breakdown(probs=[q], target=[t], base=base).loss


def _binary(u: Unit, b: Unit) -> Section:
    L = u.log
    return Section("5. Binary cross-entropy", [
        f"With two classes: `{BCE_FORMULA}`, where p0 is 1 if the image is a cat and 0 "
        "otherwise, and q0 is the predicted probability that it is a cat.",
    ], [
        _worked("a cat (p0 = 1) predicted at q0 = 0.7", BCE_FORMULA,
                f"c = 1·{L}(1/0.7) + 0·{L}(1/0.3) = {L}(1/0.7)",
                lambda base: _bce(0.7, 1.0, base), u, b),
        _worked("not a cat (p0 = 0) predicted at q0 = 0.7", BCE_FORMULA,
                f"c = 0·{L}(1/0.7) + 1·{L}(1/0.3) = {L}(1/0.3)",
                lambda base: _bce(0.7, 0.0, base), u, b),
    ], widgets=["binary"])


def _multilabel(u: Unit, b: Unit) -> Section:
    def compute(base: float) -> float:
        return curves.label_breakdown(probs=ML_PROBS, target=ML_TARGET, base=base,
                                      multilabel=True).loss

    L = u.log
    terms = curves.label_breakdown(probs=ML_PROBS, target=ML_TARGET, base=u.base,
                                   multilabel=True).terms
    return Section("6. Multi-label cross-entropy", [
        "When several labels can be true at once, each label gets its own sigmoid probability "
        "and the loss is the SUM over labels of each label's binary cross-entropy. "
        "(PyTorch's BCEWithLogitsLoss averages over every element: the sum divided by the "
        "number of labels; Keras averages over the last axis.)",
    ], [
        _worked("labels [cat, dog, person]: predicted [0.9, 0.2, 0.6], present [1, 0, 1]",
                "c = sum_j [t_j log(1/q_j) + (1 - t_j) log(1/(1 - q_j))]",
                f"c = {L}(1/0.9) + {L}(1/0.8) + {L}(1/0.6) = {_sum(terms)}", compute, u, b),
    ], widgets=["multilabel"])


def _soft_targets(u: Unit, b: Unit) -> Section:
    smooth = smooth_labels(art.ONE_HOT, 0.1)
    _, t_mix = mixup([[0.0], [1.0]], [2, 0], alpha=0.4, seed=0, num_classes=3)
    lam, _ = mixup_params(2, alpha=0.4, seed=0)
    mixed = [float(v) for v in t_mix[0]]
    L = u.log

    def smoothed(base: float) -> float:
        return curves.multiclass_breakdown(probs=art.PREDICTION, target=2,
                                           label_smoothing=0.1, base=base).loss

    return Section("7. Label smoothing and Mixup: targets that are not one-hot", [
        "Cross-entropy does not need a one-hot target. Label smoothing moves alpha of the mass "
        f"to the uniform distribution: `[0, 0, 1]` with `alpha = 0.1` becomes "
        f"`[{', '.join(fmt(v) for v in smooth)}]`. Mixup (arXiv 1710.09412) mixes two "
        "examples and their targets with a weight drawn from Beta(alpha, alpha).",
    ], [
        _worked("label smoothing 0.1: prediction [0.1, 0.2, 0.7], target [0, 0, 1]",
                "c = sum_i ((1 - alpha) p_i + alpha/C) log(1/q_i)",
                f"c = {_terms([float(v) for v in smooth], art.PREDICTION, L)}", smoothed, u, b),
        _worked("Mixup (alpha = 0.4, seed 0) of targets [0, 0, 1] and [1, 0, 0], "
                "prediction [0.1, 0.2, 0.7]", CE_FORMULA,
                f"target = {fmt(lam)}·[0, 0, 1] + (1 - {fmt(lam)})·[1, 0, 0] = {vector(mixed)}; "
                f"c = {_terms(mixed, art.PREDICTION, L)}",
                lambda base: cross_entropy(mixed, art.PREDICTION, base=base), u, b),
    ], widgets=["smoothing"])  # after label smoothing is explained, not before


def _why() -> Section:
    comp = curves.loss_comparison([0.99, 0.9, 0.7, 0.5, 0.1, 0.01, 0.0001])
    g = curves.softmax_gradient_check(GRADIENT_LOGITS, GRADIENT_TARGET)
    rows = [[short(q), *(fmt(comp.series[k][i]) for k in comp.series)]
            for i, q in enumerate(comp.x)]
    grad_rows = [[str(i), fmt(g.probs[i]), short(g.target[i]), fmt(g.analytic[i]),
                  fmt(g.numeric[i])] for i in range(g.analytic.size)]
    return Section("8. Why cross-entropy", [
        "A loss of `1 - q_true` lives in [0, 1]: too narrow to punish confident mistakes. "
        "`-log q_true` is near 0 when q_true -> 1 and grows to +infinity as q_true -> 0.",
        "The gradient of `cross_entropy(softmax(a), b)` with respect to the logits a is "
        "`softmax(a) - b`: linear in the softmax output, which makes training smooth. Checked "
        f"here against a central finite difference: largest difference {g.max_abs_diff:.1e}.",
    ], tables=[
        Table("loss against the predicted probability of the true class (nats)",
              ["q_true", *comp.series], rows),
        Table(f"gradient for logits a = {vector(GRADIENT_LOGITS)}, target b = "
              f"{vector(GRADIENT_TARGET)}",
              ["class", "softmax(a)", "b", "softmax(a) - b", "finite difference"], grad_rows),
    ], figures=["log-loss", "gradient"])


def _epochs(value: int | None) -> str:
    return "never" if value is None else str(value)


@functools.lru_cache(maxsize=1)
def training_results() -> dict[str, tr.RunResult]:
    """Every loss trained with :data:`crossent.training.TOUR_CONFIG` (cached: the tour's
    table and its figure share one run).

    Without scikit-learn: :func:`crossent.training.load_digits_split`'s
    ``ModuleNotFoundError`` (``name='sklearn'``): a missing package, not a bad argument."""
    return tr.compare(tr.LOSSES, tr.TOUR_CONFIG, tr.load_digits_split())


def _training() -> Section:
    results = training_results()
    c = tr.TOUR_CONFIG
    ce, mse = results["ce"].epochs_to(), results["mse"].epochs_to()
    rows = [[name, _epochs(r.epochs_to()), f"{r.final.val_accuracy:.4f}",
             f"{r.final.val_ece:.4f}"] for name, r in results.items()]
    return Section("9. Training with each loss", [
        f"The same {c.model} ({c.hidden} hidden units) trained on scikit-learn's digits for "
        f"{c.epochs} epochs ({c.optimizer} lr {c.lr:g}, seed {c.seed}) once per loss, in "
        "NumPy with crossent's analytic gradients. Through the softmax, the gradients of the "
        "squared error (mse) and of `1 - q_true` (abs) carry factors of the predicted "
        "probabilities that fade on confident mistakes; cross-entropy's `softmax(a) - b` "
        f"does not. Here ce reaches 95% validation accuracy after {_epochs(ce)} epochs, mse "
        f"after {_epochs(mse)}. The command crossent train runs the full experiment.",
    ], tables=[Table(f"validation after {c.epochs} epochs (ECE: 15 bins)",
                     ["loss", "epochs to 95%", "accuracy", "ECE"], rows)],
        figures=["training"])
