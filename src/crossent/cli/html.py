"""``crossent tour --html FILE``: the tour as one self-contained web page you can play with.

The page shows the same content as the terminal tour (:mod:`crossent.teaching.tour`), with
formulas typeset as MathML (rendered natively by browsers), the article's table of worked
examples, the static figures (base64 PNG), interactive figures (sliders, drawn by a small
inline script: :file:`crossent/teaching/page/page.js`), the quiz with checked answers, and a
unit switch (bits / nats / hartleys) that applies to every number on the page. Nothing is
loaded from the network; without scripts (or on paper) the page shows the static content in
the unit chosen with ``--base``.

Every unit-dependent piece is written once per unit and the page shows the chosen unit's
(``html[data-unit]`` and the style sheet), so the numbers in every unit come from Python.
"""

from __future__ import annotations

import base64
import functools
from collections.abc import Callable, Sequence
from html import escape
from importlib import resources
from pathlib import Path

from ..teaching import article as art
from ..teaching.content import UNITS, Section, Table, Tour, Worked
from ..teaching.formula import fmt, mathml, short, split_prose
from ..teaching.tour import build_tour
from . import plots
from . import quiz as quiz_mod
from .files import write_atomic

QUIZ_SEED = 0
"""The seed of the page's generated quiz questions (``crossent quiz --seed 0`` asks the same)."""


def asset(name: str) -> str:
    """The text of a page asset (``page.css``, ``page.js``) shipped in crossent.teaching."""
    return resources.files("crossent.teaching").joinpath("page").joinpath(name).read_text("utf-8")


# --------------------------------------------------------------------------------------------
# Pieces written once per unit
# --------------------------------------------------------------------------------------------


def _variants(tours: Sequence[Tour], draw: Callable[[Tour], str], tag: str = "div") -> str:
    """``draw`` for every unit's tour: once if all agree, else one element per unit."""
    drawn = [draw(t) for t in tours]
    if all(d == drawn[0] for d in drawn):
        return drawn[0]
    return "".join(f'<{tag} class="u u-{t.unit.name}">{d}</{tag}>'
                   for t, d in zip(tours, drawn, strict=True))


def _prose(text: str) -> str:
    return "".join(mathml(p) if is_formula else escape(p) for is_formula, p in split_prose(text))


def _formula(text: str) -> str:
    return f'<span class="formula">{mathml(text)}</span>'


def _worked(w: Worked, tour: Tour) -> str:
    return (
        f'<div class="worked"><p class="label">{escape(w.label)}</p>'
        f'<div class="row"><span class="key">formula</span>{_formula(w.formula)}</div>'
        f'<div class="row"><span class="key">numbers</span>{_formula(w.substituted)}</div>'
        f'<div class="row"><span class="key">result</span><span><span class="value">'
        f"{fmt(w.value)} {tour.unit.name}</span> ({fmt(w.beside)} {tour.beside.name})"
        "</span></div></div>"
    )


TEXT = ' class="text"'
CARD_COLUMNS = 5
"""Tables with this many columns become one card per row on a narrow screen."""


def _table(t: Table, *, text_columns: int = 1, formula_columns: Sequence[int] = ()) -> str:
    def is_text(i: int) -> bool:  # left-aligned: prose and formulas, not numbers
        return i < text_columns or i in formula_columns

    head = "".join(f'<th scope="col"{TEXT if is_text(i) else ""}>{escape(h)}</th>'
                   for i, h in enumerate(t.headers))
    rows = []
    for row in t.rows:
        cells = []
        for i, (h, c) in enumerate(zip(t.headers, row, strict=True)):
            cls = TEXT if is_text(i) else ""
            body = _formula(c) if i in formula_columns else escape(c)
            cells.append(f'<td{cls} data-label="{escape(h)}">{body}</td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    cards = ' class="cards"' if len(t.headers) >= CARD_COLUMNS else ""
    return (f'<table{cards}><caption>{escape(t.title)}</caption><thead><tr>{head}</tr>'
            f"</thead><tbody>{''.join(rows)}</tbody></table>")


def _figure(name: str, tour: Tour, suffix: str = "") -> str:
    spec = plots.FIGURES[name]
    png = plots.render(name, "png", tour.unit.base, tour.unit.name)
    data = base64.b64encode(png).decode("ascii")
    unit = f" (in {tour.unit.name})" if spec.in_unit else ""
    return (f'<figure id="figure-{name}{suffix}"><img alt="{escape(spec.alt)}" width="640" '
            f'height="400" src="data:image/png;base64,{data}"><figcaption>'
            f"{escape(spec.title)}{unit}</figcaption></figure>")


def _figures(s: Section, tours: Sequence[Tour], default: Tour) -> str:
    parts = []
    for name in s.figures:
        if not plots.FIGURES[name].in_unit:
            parts.append(_figure(name, default))
            continue
        for t in tours:
            suffix = "" if t.unit == default.unit else f"-{t.unit.name}"
            parts.append(f'<div class="u u-{t.unit.name}">{_figure(name, t, suffix)}</div>')
    return f'<div class="figures">{"".join(parts)}</div>' if parts else ""


def _paragraph(i: int, j: int, t: Tour) -> str:
    return f"<p>{_prose(t.sections[i].text[j])}</p>"


def _worked_in(i: int, k: int, t: Tour) -> str:
    return _worked(t.sections[i].worked[k], t)


def _section(i: int, tours: Sequence[Tour], default: Tour, with_figures: bool) -> str:
    s = default.sections[i]
    parts = [f'<section id="{s.anchor}"><h2>{escape(s.title)}</h2>']
    if with_figures:
        parts.append(_figures(s, tours, default))
    for j in range(len(s.text)):
        parts.append(_variants(tours, functools.partial(_paragraph, i, j)))
    for k in range(len(s.worked)):
        parts.append(_variants(tours, functools.partial(_worked_in, i, k)))
    parts += [WIDGETS[name]() for name in s.widgets]
    parts += [_table(t) for t in s.tables]
    parts.append("</section>")
    return "\n".join(parts)


def _examples_table() -> str:
    rows = [[ex.title, ex.formula, *(fmt(v) for v in ex.values().values())]
            for ex in art.EXAMPLES]
    return _table(Table("The article's worked examples, computed by crossent",
                        ["example", "formula (as the article writes it)", *art.UNITS], rows),
                  formula_columns=[1])


# --------------------------------------------------------------------------------------------
# Interactive figures (markup; page.js gives them life)
# --------------------------------------------------------------------------------------------


def _slider(wid: str, key: str, label: str, lo: float, hi: float, step: float,
            value: float) -> str:
    ident = f"w-{wid}-{key}"
    return (f'<div class="slider"><label for="{ident}">{escape(label)}</label>'
            f'<input type="range" id="{ident}" data-in="{key}" min="{short(lo)}" '
            f'max="{short(hi)}" step="{short(step)}" value="{short(value)}">'
            f'<output for="{ident}" data-out="{key}">{short(value)}</output></div>')


def _check(wid: str, key: str, label: str, checked: bool) -> str:
    ident = f"w-{wid}-{key}"
    return (f'<label for="{ident}"><input type="checkbox" id="{ident}" data-in="{key}"'
            f'{" checked" if checked else ""}> {escape(label)}</label>')


def _out(key: str, label: str, *, in_unit: bool = True, total: bool = False) -> str:
    unit = ' <span class="unit-name">bits</span>' if in_unit else ""
    cls = ' class="total" aria-live="polite"' if total else ""  # the total is announced
    return f'<div{cls}>{escape(label)} = <output data-out="{key}">…</output>{unit}</div>'


def _widget(wid: str, caption: str, controls: list[str], outputs: list[str], alt: str) -> str:
    return (f'<figure class="widget js-only" id="widget-{wid}" data-widget="{wid}">'
            f"<figcaption>Try it: {escape(caption)}</figcaption>"
            f'<div class="controls">{"".join(controls)}</div>'
            f'<div class="readout">{"".join(outputs)}</div>'
            f'<svg role="img" aria-label="{escape(alt)}"></svg></figure>')


def _dist(wid: str, key: str, names: Sequence[str], values: Sequence[float],
          lo: float = 0.0, hi: float = 1.0) -> list[str]:
    return [_slider(wid, f"{key}{i}", f"{n}: {key}{i}", lo, hi, 0.001, v)
            for i, (n, v) in enumerate(zip(names, values, strict=True))]


CLASSES = ("class 0", "class 1", "class 2")


def _surprise_widget() -> str:
    return _widget("surprise", "the surprise of an outcome of probability p",
                   [_slider("surprise", "p", "probability p", 0.001, 1.0, 0.001, art.PANDA)],
                   [_out("s", "surprise log(1/p)", total=True)],
                   "the surprise curve log(1/p) with the chosen p marked")


def _entropy_widget() -> str:
    animals = ("panda", "bird", "dog")
    return _widget(
        "entropy", "the entropy of [panda, bird, dog]; the probabilities keep summing to 1",
        _dist("entropy", "p", animals, art.ANIMALS),
        [_out(f"term{i}", f"{n}: p{i}·log(1/p{i})") for i, n in enumerate(animals)]
        + [_out("h", "entropy H(p)", total=True)],
        "bars of each animal's probability and its term of the entropy")


def _cross_entropy_widget() -> str:
    return _widget(
        "cross-entropy", "truth p and prediction q (each keeps summing to 1)",
        _dist("cross-entropy", "p", [f"truth, {c}" for c in CLASSES], art.ANIMALS)
        + _dist("cross-entropy", "q", [f"prediction, {c}" for c in CLASSES], art.PREDICTION,
                lo=0.001, hi=0.998),
        [_out(f"term{i}", f"p{i}·log(1/q{i})") for i in range(3)]
        + [_out("h", "entropy H(p)"), _out("c", "cross-entropy H(p, q)", total=True),
           _out("kl", "H(p, q) − H(p) = KL(p ‖ q)")],
        "bars of the truth p and the prediction q for each class")


def _per_class_outs(key: str, label: str, term: str, grad: str) -> list[str]:
    """The readout of a widget over the 3 classes: for each class ``key{i}`` (no unit), its
    term of the loss and its gradient (no unit), then the loss. Labels have ``{i}`` in them."""
    return ([_out(f"{key}{i}", label.format(i=i), in_unit=False) for i in range(3)]
            + [_out(f"term{i}", term.format(i=i)) for i in range(3)]
            + [_out(f"grad{i}", grad.format(i=i), in_unit=False) for i in range(3)]
            + [_out("loss", "loss", total=True)])


def _logits_widget() -> str:
    radios = "".join(
        f'<label><input type="radio" name="w-logits-class" data-in="class" value="{i}"'
        f'{" checked" if i == 0 else ""}> {i}</label>' for i in range(3))
    return _widget(
        "logits", "softmax and cross-entropy from logits (gradients per nat of loss)",
        [_slider("logits", f"a{i}", f"logit a{i}", -5.0, 5.0, 0.1, v)
         for i, v in enumerate((2.0, 1.0, 0.1))]
        + [f'<fieldset class="choices"><legend>true class</legend>{radios}</fieldset>'],
        _per_class_outs("q", "softmax(a){i}", "term {i}: b{i}·log(1/q{i})",
                        "gradient {i}: softmax(a){i} − b{i}"),
        "bars of softmax(a) and of the gradient softmax(a) − b for each class")


def _smoothing_widget() -> str:
    return _widget(
        "smoothing", "label smoothing of the target [0, 0, 1], prediction [0.1, 0.2, 0.7]",
        [_slider("smoothing", "alpha", "smoothing alpha", 0.0, 1.0, 0.01, 0.1)],
        _per_class_outs("t", "smoothed target {i}", "term {i}",
                        "gradient {i}: q{i} − t{i} (per nat)"),
        "bars of the smoothed target and each class's term of the loss")


def _binary_widget() -> str:
    return _widget(
        "binary", "binary cross-entropy of a cat detector",
        [_slider("binary", "q", "predicted probability q0 of a cat", 0.001, 0.999, 0.001, 0.7),
         _check("binary", "cat", "the image is a cat (p0 = 1)", True)],
        [_out("pos", "p0·log(1/q0)"), _out("neg", "(1 − p0)·log(1/(1 − q0))"),
         _out("grad", "gradient with respect to the logit, q0 − p0 (per nat)", in_unit=False),
         _out("loss", "loss", total=True)],
        "the binary cross-entropy curve against q0 with the chosen q0 marked")


def _multilabel_widget() -> str:
    labels = ("cat", "dog", "person")
    return _widget(
        "multilabel", "multi-label: one sigmoid probability per label, the losses summed",
        [_slider("multilabel", f"q{j}", f"{n}: predicted q{j}", 0.001, 0.999, 0.001, v)
         for j, (n, v) in enumerate(zip(labels, [0.9, 0.2, 0.6], strict=True))]
        + [_check("multilabel", f"t{j}", f"{n} present", bool(t))
           for j, (n, t) in enumerate(zip(labels, [1, 0, 1], strict=True))],
        [_out(f"term{j}", f"{n}'s binary cross-entropy") for j, n in enumerate(labels)]
        + [_out("loss", "loss (the sum)", total=True)],
        "bars of each label's probability and its loss")


WIDGETS: dict[str, Callable[[], str]] = {
    "surprise": _surprise_widget, "entropy": _entropy_widget,
    "cross-entropy": _cross_entropy_widget, "logits": _logits_widget,
    "smoothing": _smoothing_widget, "binary": _binary_widget,
    "multilabel": _multilabel_widget,
}


# --------------------------------------------------------------------------------------------
# The quiz
# --------------------------------------------------------------------------------------------


def _question(i: int, q: quiz_mod.Question) -> str:
    text = f"<p>{_prose(q.text)}</p>"  # formulas quoted with backticks are typeset
    if q.nats is None:
        return (f'<li class="question" id="question-{i}">{text}'
                f'<label for="answer-{i}">Your answer</label>'
                f'<textarea id="answer-{i}" rows="3"></textarea>'
                f"<details><summary>Model answer</summary><p>{_prose(q.model)}</p></details></li>")
    return (
        f'<li class="question" id="question-{i}" data-nats="{q.nats!r}" data-bits="{q.bits!r}" '
        f'data-tolerance="{quiz_mod.TOLERANCE!r}">{text}'
        f'<label for="answer-{i}">Your answer (nats or bits)</label> '
        f'<input type="text" inputmode="decimal" id="answer-{i}" autocomplete="off">'
        '<button type="button" class="js-only">Check</button>'
        '<p class="verdict" role="status"></p>'
        f"<details><summary>Answer and working</summary><p>{fmt(q.nats)} nats "
        f'({fmt(q.bits or 0.0)} bits). Working: <span class="working">{escape(q.working)}'
        "</span></p></details></li>"
    )


def _quiz() -> str:
    qs = quiz_mod.questions(QUIZ_SEED)
    items = "".join(_question(i, q) for i, q in enumerate(qs, 1))
    return (
        '<section id="quiz"><h2>Test your knowledge</h2>'
        "<p>The article's five questions, then two numeric ones (the same as "
        f"<code>crossent quiz --seed {QUIZ_SEED}</code>). Numeric answers are accepted in nats "
        f"or bits, within {quiz_mod.TOLERANCE}.</p>"
        f'<ol class="quiz">{items}</ol></section>'
    )


# --------------------------------------------------------------------------------------------
# The page
# --------------------------------------------------------------------------------------------


def _unit_switch(default: Tour) -> str:
    radios = "".join(
        f'<label><input type="radio" name="unit" value="{u.name}"'
        f'{" checked" if u == default.unit else ""}> {u.name} ({u.log})</label>'
        for u in UNITS.values())
    return (f'<div class="unitbar js-only"><div class="inner"><fieldset><legend>Units</legend>'
            f"{radios}</fieldset></div></div>")


def _contents(tour: Tour) -> str:
    items = "".join(f'<li><a href="#{s.anchor}">{escape(s.title.split(". ", 1)[-1])}</a></li>'
                    for s in tour.sections)
    return (f'<nav aria-label="Contents"><ol start="0">{items}'
            '<li><a href="#quiz">Test your knowledge</a></li></ol></nav>')


def page(tour: Tour, *, with_figures: bool = True) -> str:
    """The whole HTML document (``tour`` picks the unit shown first)."""
    tours = [tour if u == tour.unit else build_tour(u) for u in UNITS.values()]
    body = "\n".join(_section(i, tours, tour, with_figures) for i in range(len(tour.sections)))
    return (
        f'<!DOCTYPE html>\n<html lang="en" class="no-js" data-unit="{tour.unit.name}"><head>'
        '<meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        "<title>crossent tour: cross-entropy from surprise to the loss</title>"
        f"<style>{asset('page.css')}</style></head><body>"
        f"{_unit_switch(tour)}"  # a child of body: sticky over the whole page, not the header
        '<header><div class="inner">'
        "<h1>Cross-entropy, from surprise to the loss</h1>"
        "<p>Every number on this page was computed by crossent. Results are in "
        f'<span class="unit-name">{tour.unit.name}</span>, with the unit beside in brackets; '
        "the article's numbers are bits.<span class=\"js-only\"> Switch the unit at the top; "
        "move the sliders of the interactive figures.</span></p>"
        f"{_contents(tour)}</div></header><main>"
        f"{_examples_table()}\n{body}\n{_quiz()}</main>"
        f"<script>{asset('page.js')}</script></body></html>\n"
    )


def write(tour: Tour, path: Path, *, with_figures: bool = True) -> Path:
    """Write the page to ``path`` (atomically: a failed run leaves no half-written file)."""
    return write_page(path, page(tour, with_figures=with_figures))


def write_page(path: Path, text: str) -> Path:
    """``text`` (a :func:`page`) written atomically to ``path`` (missing folders created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, text)
    return path
