"""``crossent explain``: one loss, every intermediate in a table.

Softmax (or sigmoid) of the logits, the target after label smoothing, each class's (label's)
term, their sum and the gradient, all from :mod:`crossent.teaching.curves` (which calls
the library).
"""

from __future__ import annotations

import numpy as np
from rich.console import Console
from rich.markup import escape

from .._checks import as_float
from ..errors import InputError
from ..teaching import curves
from .common import Base, columns, fmt, units


def compute(
    *,
    probs: list[float] | None,
    logits: list[float] | None,
    target: int | list[float],
    label_smoothing: float,
    base: float,
    binary: bool,
    multilabel: bool,
) -> curves.Breakdown:
    """The breakdown the options ask for; an :class:`InputError` naming the problem otherwise."""
    if (probs is None) == (logits is None):
        raise InputError("give exactly one of --probs and --logits")
    if binary and multilabel:
        raise InputError("--binary and --multilabel exclude each other")
    # logits 1e308 apart overflow float64 on the way (max - min is inf): the loss shown is
    # then inf, which is the float64 value; NumPy's overflow warnings would be noise on stderr
    with np.errstate(over="ignore"):
        if binary or multilabel:
            # a 401-digit index becomes inf (not OverflowError): the range check names it
            t = [as_float(target)] if isinstance(target, int) else target
            return curves.label_breakdown(probs=probs, logits=logits, target=t,
                                          label_smoothing=label_smoothing, base=base,
                                          multilabel=multilabel)
        return curves.multiclass_breakdown(probs=probs, logits=logits, target=target,
                                           label_smoothing=label_smoothing, base=base)


def render(b: curves.Breakdown, beside_loss: float, base: Base, con: Console) -> None:
    """Print the table; ``beside_loss`` is the same loss in the unit shown beside."""
    unit, beside = units(base)
    L = unit.log
    smoothing = bool((b.used_target != b.target).any())
    multiclass = b.kind == "multiclass"
    act = "softmax(a)" if multiclass else "sigmoid(x)"
    cols = ["class" if multiclass else "label"]
    cols += ["logit"] if b.logits is not None else []
    cols += ["q", "target t"] + (["smoothed t"] if smoothing else [])
    cols += ["term"] if multiclass else ["pos", "neg", "term"]
    cols += ["gradient"]
    rows = [cols]
    for i in range(b.probs.size):
        row = [str(i)]
        row += [fmt(b.logits[i])] if b.logits is not None else []
        row += [fmt(b.probs[i]), fmt(b.target[i])]
        row += [fmt(b.used_target[i])] if smoothing else []
        if not multiclass:
            row += [fmt(b.pos_terms[i]), fmt(b.neg_terms[i])]  # type: ignore[index]
        row += [fmt(b.terms[i]), fmt(b.grad[i])]
        rows.append(row)
    lines = columns(rows, left=0)
    # plain lines, never wrapped or cut (a narrow terminal wraps them), written as they are: a
    # rich Table takes half a minute for 10,000 classes, rich's line wrapping a second
    title = f"{b.kind} cross-entropy, term by term ({unit.name})"
    con.file.write("\n".join([title, lines[0], "-" * len(lines[0]), *lines[1:], ""]))
    t = "smoothed t" if smoothing else "t"
    legend = [f"q = {act}" if b.logits is not None else "q: as given"]
    if smoothing:
        legend.append("smoothed t = (1 - alpha) t + alpha / C" if multiclass else
                      "smoothed t = (1 - alpha) t + alpha / 2")
    if multiclass:
        legend.append(f"term = {t}·{L}(1/q)")
    else:
        legend += [f"pos = {t}·{L}(1/q)", f"neg = (1 - {t})·{L}(1/(1 - q))", "term = pos + neg"]
        if b.logits is None and bool(((b.probs == 0) | (b.probs == 1)).any()):
            legend.append("each ln is clamped at -100, as torch's binary_cross_entropy does: "
                          "q = 0 or 1 costs at most 100 nats per label")
    logit = ("" if b.logits is not None else
             ", logits taken as log q" if multiclass else ", logit taken as log(q / (1 - q))")
    legend.append(f"gradient = {act} - {t}: d loss (in nats) / d logit{logit}")
    for line in legend:
        con.print(escape(line), soft_wrap=True)  # a formula is not cut in two at 80 columns
    what = "sum of the terms" if b.probs.size > 1 else "the term"
    con.print(f"loss = {what} = [bold]{fmt(b.loss)} {unit.name}[/] "
              f"({fmt(beside_loss)} {beside.name})")
