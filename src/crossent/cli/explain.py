"""``crossent explain``: one loss, every intermediate in a table.

Softmax (or sigmoid) of the logits, the target after label smoothing, each class's (label's)
term, their sum and the gradient, all from :mod:`crossent.curves` (which calls the library).
"""

from __future__ import annotations

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.measure import Measurement
from rich.table import Table

from .. import curves
from .common import Base, fmt, units


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
    """The breakdown the options ask for; a ``ValueError`` naming the problem otherwise."""
    if (probs is None) == (logits is None):
        raise ValueError("give exactly one of --probs and --logits")
    if binary and multilabel:
        raise ValueError("--binary and --multilabel exclude each other")
    if binary or multilabel:
        t = [float(target)] if isinstance(target, int) else target
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
    table = Table(title=f"{b.kind} cross-entropy, term by term ({unit.name})",
                  box=box.SIMPLE_HEAD, padding=(0, 1))
    for c in cols:
        table.add_column(c, justify="right", no_wrap=True)
    for i in range(b.probs.size):
        row = [str(i)]
        row += [fmt(b.logits[i])] if b.logits is not None else []
        row += [fmt(b.probs[i]), fmt(b.target[i])]
        row += [fmt(b.used_target[i])] if smoothing else []
        if not multiclass:
            row += [fmt(b.pos_terms[i]), fmt(b.neg_terms[i])]  # type: ignore[index]
        row += [fmt(b.terms[i]), fmt(b.grad[i])]
        table.add_row(*row)
    # never cut a number: print at the table's natural width (a narrow terminal wraps it)
    need = Measurement.get(con, con.options.update_width(500), table).maximum
    wide = Console(width=max(con.width, need), file=con.file, highlight=False,
                   force_terminal=con.is_terminal, no_color=con.no_color)
    wide.print(table)
    t = "smoothed t" if smoothing else "t"
    legend = [f"q = {act}" if b.logits is not None else "q: as given"]
    if smoothing:
        legend.append("smoothed t = (1 - alpha) t + alpha / C" if multiclass else
                      "smoothed t = (1 - alpha) t + alpha / 2")
    if multiclass:
        legend.append(f"term = {t}·{L}(1/q)")
    else:
        legend += [f"pos = {t}·{L}(1/q)", f"neg = (1 - {t})·{L}(1/(1 - q))", "term = pos + neg"]
    logit = ("" if b.logits is not None else
             ", logits taken as log q" if multiclass else ", logit taken as log(q / (1 - q))")
    legend.append(f"gradient = {act} - {t}: d loss (in nats) / d logit{logit}")
    for line in legend:
        con.print(escape(line))
    what = "sum of the terms" if b.probs.size > 1 else "the term"
    con.print(f"loss = {what} = [bold]{fmt(b.loss)} {unit.name}[/] "
              f"({fmt(beside_loss)} {beside.name})")
