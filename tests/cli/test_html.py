"""``crossent tour --html``: one self-contained page, its MathML and its content per unit.

tests/cli/test_page_browser.py drives the page's interactive parts in Chromium."""

from __future__ import annotations

import base64
import io
import math
import re
import subprocess
from dataclasses import dataclass
from html import escape
from html.parser import HTMLParser
from pathlib import Path

import pytest
from matplotlib.image import imread

from crossent.cli import app
from crossent.cli.html import QUIZ_SEED, WIDGETS
from crossent.cli.plots import FIGURES
from crossent.cli.quiz import questions as quiz_questions
from crossent.teaching.content import UNITS
from crossent.teaching.formula import mathml, numbers
from crossent.teaching.tour import build_tour

from .conftest import article_numbers, f6

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--no-first-run"]


class Page(HTMLParser):
    """The images (their attributes) and the visible text of an HTML document."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.images: list[dict[str, str]] = []
        self.text: list[str] = []
        self._skip = 0
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append({k: v or "" for k, v in attrs})
        self._skip += tag in ("script", "style")

    def handle_endtag(self, tag):
        self._skip -= tag in ("script", "style")

    def handle_data(self, data):
        if not self._skip:
            self.text.append(data)

    @property
    def flat_text(self) -> str:
        return " ".join(" ".join(self.text).split())


@dataclass
class Tour:
    html_path: Path
    html: str


@pytest.fixture(scope="module")
def tour_page(tmp_path_factory) -> Tour:
    from typer.testing import CliRunner

    tmp = tmp_path_factory.mktemp("html")
    path = tmp / "tour.html"
    result = CliRunner().invoke(app, ["tour", "--html", str(path), "--out", str(tmp / "figs")])
    assert result.exit_code == 0, result.output
    return Tour(path, path.read_text(encoding="utf-8"))


def figure_copies() -> list[str]:
    """Each figure's name once per unit it is drawn in (three for the figures in a unit)."""
    return [n for n, spec in FIGURES.items() for _ in range(3 if spec.in_unit else 1)]


def test_page_is_self_contained(tour_page):
    html = tour_page.html
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", html)
    assert "<link" not in html and "@import" not in html and "url(" not in html
    assert html.count("<script>") == 1 and "<script src" not in html
    # the one address is the SVG namespace (a name, never fetched); the script fetches nothing
    assert re.findall(r"https?://[^\s\"'<>)`]*", html) == ["http://www.w3.org/2000/svg"]
    assert not re.search(r"fetch\(|XMLHttpRequest|import\(|WebSocket|sendBeacon|<iframe", html)
    images = Page(html).images
    assert len(images) == len(figure_copies())
    for img in images:
        head, data = img["src"].split(",", 1)
        assert head == "data:image/png;base64"
        assert imread(io.BytesIO(base64.b64decode(data))).shape[:2] == (400, 640)


def test_page_declares_language_viewport_and_unit(tour_page):
    head = tour_page.html.split("</head>", 1)[0]
    assert '<html lang="en" class="no-js" data-unit="bits">' in head
    assert '<meta name="viewport" content="width=device-width, initial-scale=1">' in head
    assert "@media print" in head and "@media (max-width: 40rem)" in head


def check_numbers(text: str) -> None:
    bits, nats, hartleys = (article_numbers(b) for b in (2.0, math.e, 10.0))
    for key in bits:
        assert f"{f6(bits[key])} bits ({f6(nats[key])} nats)" in text, key
        assert f6(hartleys[key]) in text, key  # the examples table: all three units


def test_page_has_every_worked_number(tour_page):
    check_numbers(Page(tour_page.html).flat_text)


def run_chromium(chromium: str, tmp: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([chromium, *FLAGS, f"--user-data-dir={tmp / 'profile'}", *extra],
                          capture_output=True, text=True, timeout=180, check=False)


def test_chromium_dom_has_every_figure_decoded_and_every_number(chromium, tour_page, tmp_path):
    done = run_chromium(chromium, tmp_path, "--dump-dom", tour_page.html_path.as_uri())
    assert done.returncode == 0, done.stderr[-2000:]
    dom = Page(done.stdout)
    alts = sorted(FIGURES[n].alt for n in figure_copies())
    assert sorted(img["alt"] for img in dom.images) == alts
    check_numbers(dom.flat_text)
    for title in ("1. Surprise", "2. Entropy", "3. Cross-entropy", "8. Why cross-entropy"):
        assert title in dom.flat_text
    assert '<html lang="en" class="js"' in done.stdout  # the script ran


def worked_blocks(html: str, unit: str) -> list[str]:
    """The text of the worked examples the page shows in ``unit`` (its own blocks and the
    blocks every unit shares)."""
    blocks = re.findall(r'(<div class="u u-(\w+)">)?<div class="worked">(.*?)</div></div>'
                        r"</div>", html)
    return [Page(body).flat_text for _, u, body in blocks if u in ("", unit)]


@pytest.mark.parametrize("unit", ["bits", "nats", "hartleys"])
def test_every_unit_has_its_own_numbers_and_formulas(tour_page, unit):
    base = {"bits": 2.0, "nats": math.e, "hartleys": 10.0}[unit]
    beside = "bits" if unit == "nats" else "nats"
    main, other = article_numbers(base), article_numbers(2.0 if unit == "nats" else math.e)
    shown = " ".join(worked_blocks(tour_page.html, unit))
    for key in main:
        assert f"{f6(main[key])} {unit} ({f6(other[key])} {beside})" in shown, key
    assert len(worked_blocks(tour_page.html, unit)) == sum(
        len(s.worked) for s in build_tour(UNITS[unit]).sections)


def test_formulas_are_mathml_with_every_number_substituted(tour_page):
    html = tour_page.html
    tour = build_tour(UNITS["bits"])
    for s in tour.sections:
        for w in s.worked:
            ml = mathml(w.substituted)
            assert ml in html, w.label
            without_bases = re.sub(r"<msub><mi>log</mi><mn>\d+</mn></msub>", "", ml)
            assert re.findall(r"<mn>([^<]*)</mn>", without_bases) == numbers(w.substituted)
            assert mathml(w.formula) in html
    before_quiz = html.split('<section id="quiz">')[0]  # the quiz's model answers are text
    assert "sum_i" not in Page(before_quiz).flat_text
    assert html.count("<math") > 200 and "<munder><mo>∑</mo>" in html


def test_page_has_every_widget_and_the_quiz(tour_page):
    html = tour_page.html
    for name in WIDGETS:
        assert f'data-widget="{name}"' in html
    # each interactive figure sits in the section that explains its idea (smoothing: after
    # label smoothing is introduced, not before)
    home = {"surprise": "1. Surprise", "entropy": "2. Entropy", "cross-entropy": "3. Cross",
            "logits": "4. Cross-entropy loss", "binary": "5. Binary", "multilabel": "6. Multi",
            "smoothing": "7. Label smoothing"}
    assert set(home) == set(WIDGETS)
    sections = html.split("<h2>")
    for name, title in home.items():
        inside = [s for s in sections if f'data-widget="{name}"' in s]
        assert len(inside) == 1 and inside[0].startswith(title), name
    qs = quiz_questions(QUIZ_SEED)
    for i, q in enumerate(qs, 1):
        assert f'id="question-{i}"' in html and escape(q.text) in html
        if q.nats is not None:
            assert f'data-nats="{q.nats!r}" data-bits="{q.bits!r}"' in html


def test_write_is_atomic(tmp_path, monkeypatch):
    from crossent.cli import html as html_mod

    path = tmp_path / "tour.html"
    path.write_text("old page")

    def fail(*args, **kwargs):
        raise RuntimeError("drawing failed")

    monkeypatch.setattr(html_mod.plots, "render", fail)
    with pytest.raises(RuntimeError, match="drawing failed"):
        html_mod.write(build_tour(UNITS["bits"]), path)
    assert path.read_text() == "old page" and sorted(tmp_path.iterdir()) == [path]


def test_ids_are_unique_and_every_label_points_at_a_control(tour_page):
    html = tour_page.html
    ids = re.findall(r'\sid="([^"]+)"', html)
    assert len(ids) == len(set(ids)) and len(ids) > 60
    for target in re.findall(r'<label for="([^"]+)"', html):
        assert f'id="{target}"' in html, target
