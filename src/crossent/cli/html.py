"""``crossent tour --html FILE``: the tour as one self-contained web page.

Figures are embedded as base64 PNG (``data:`` URLs), the style sheet is inline, and the page
loads nothing from the network. It shows the same content as the terminal tour, plus the
article's table of worked examples in bits, nats and hartleys.
"""

from __future__ import annotations

import base64
from html import escape
from pathlib import Path

from .. import article as art
from . import plots
from .common import fmt
from .tour import Section, Table, Tour

STYLE = """
body { font-family: sans-serif; max-width: 72rem; margin: 2rem auto; padding: 0 1rem;
       line-height: 1.45; color: #222; }
code { background: #f3f3f3; padding: 0 .25rem; }
.worked { border-left: 4px solid #4a7ab5; padding: .25rem .75rem; margin: .75rem 0; }
.value { font-weight: bold; }
table { border-collapse: collapse; margin: .75rem 0; }
td, th { border: 1px solid #ccc; padding: .2rem .6rem; text-align: right; }
td:first-child, td:nth-child(2) { text-align: left; }
section { overflow: auto; }
.figures { float: right; width: 30rem; margin: 0 0 1rem 1.5rem; }
figure { margin: 0 0 1rem 0; }
figure img { width: 100%; }
figcaption { font-size: .9rem; color: #555; }
"""


def _table(t: Table) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in t.headers)
    rows = "".join(
        "<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>" for row in t.rows
    )
    return f"<table><caption>{escape(t.title)}</caption><tr>{head}</tr>{rows}</table>"


def _figure(name: str, tour: Tour) -> str:
    spec = plots.FIGURES[name]
    png = plots.render(name, "png", tour.unit.base, tour.unit.name)
    data = base64.b64encode(png).decode("ascii")
    return (f'<figure id="figure-{name}"><img alt="{escape(spec.alt)}" '
            f'src="data:image/png;base64,{data}"><figcaption>{escape(spec.title)}'
            "</figcaption></figure>")


def _section(s: Section, tour: Tour, with_figures: bool) -> str:
    parts = [f"<section><h2>{escape(s.title)}</h2>"]
    if with_figures and s.figures:
        parts.append('<div class="figures">')
        parts += [_figure(name, tour) for name in s.figures]
        parts.append("</div>")
    parts += [f"<p>{escape(p)}</p>" for p in s.text]
    for w in s.worked:
        parts.append(
            f'<div class="worked"><div>{escape(w.label)}</div>'
            f"<div>formula: <code>{escape(w.formula)}</code></div>"
            f"<div>numbers: <code>{escape(w.substituted)}</code></div>"
            f'<div>result: <span class="value">{fmt(w.value)} {tour.unit.name}</span> '
            f"({fmt(w.beside)} {tour.beside.name})</div></div>"
        )
    parts += [_table(t) for t in s.tables]
    parts.append("</section>")
    return "\n".join(parts)


def _examples_table() -> str:
    rows = [[ex.title, ex.formula, *(fmt(v) for v in ex.values().values())]
            for ex in art.EXAMPLES]
    return _table(Table("The article's worked examples, computed by crossent",
                        ["example", "formula", *art.UNITS], rows))


# Records each figure's decoded size on its <img> once the page has loaded, so a headless
# browser's DOM dump shows that every embedded figure really decoded (inline; no network).
SCRIPT = """window.addEventListener("load", () => {
  for (const img of document.images) {
    img.dataset.naturalWidth = img.naturalWidth;
    img.dataset.naturalHeight = img.naturalHeight;
  }
});"""


def page(tour: Tour, *, with_figures: bool = True) -> str:
    """The whole HTML document."""
    body = "\n".join(_section(s, tour, with_figures) for s in tour.sections)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<title>crossent tour: cross-entropy from surprise to the loss</title>"
        f"<style>{STYLE}</style></head><body>"
        "<h1>Cross-entropy, from surprise to the loss</h1>"
        f"<p>Every number on this page was computed by crossent. Results are in "
        f"{tour.unit.name}, with {tour.beside.name} beside; the article's numbers are "
        "bits.</p>"
        f"{_examples_table()}\n{body}\n<script>{SCRIPT}</script></body></html>\n"
    )


def write(tour: Tour, path: Path, *, with_figures: bool = True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page(tour, with_figures=with_figures), encoding="utf-8")
    return path
