"""``crossent tour --html``: one self-contained page, opened in headless Chromium."""

from __future__ import annotations

import base64
import io
import math
import re
import subprocess
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from crossent.cli import app
from crossent.cli.plots import FIGURES

from .conftest import article_numbers, f6

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]


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


def test_page_is_self_contained(tour_page):
    html = tour_page.html
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", html)
    assert "<link" not in html and "@import" not in html and "url(" not in html
    images = Page(html).images
    assert len(images) == len(FIGURES)
    for img in images:
        head, data = img["src"].split(",", 1)
        assert head == "data:image/png;base64"
        assert imread(io.BytesIO(base64.b64decode(data))).shape[:2] == (400, 640)


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
    assert sorted(img["alt"] for img in dom.images) == sorted(f.alt for f in FIGURES.values())
    for img in dom.images:  # set by the page's onload script from the decoded image
        assert (img.get("data-natural-width"), img.get("data-natural-height")) == ("640", "400")
    check_numbers(dom.flat_text)
    for title in ("1. Surprise", "2. Entropy", "3. Cross-entropy", "8. Why cross-entropy"):
        assert title in dom.flat_text


SHOT_HEIGHT = 9000  # the page is about 5000 px tall; the margin leaves room for new chapters


def test_chromium_screenshot_shows_the_figures(chromium, tour_page, tmp_path):
    shot = tmp_path / "tour.png"
    done = run_chromium(chromium, tmp_path, f"--screenshot={shot}",
                        f"--window-size=1200,{SHOT_HEIGHT}",
                        "--hide-scrollbars", tour_page.html_path.as_uri())
    assert done.returncode == 0 and shot.exists(), done.stderr[-2000:]
    pixels = imread(shot)[..., :3]
    assert pixels.shape[:2] == (SHOT_HEIGHT, 1200)
    blue = np.all(np.abs(pixels - np.array([31, 119, 180]) / 255) < 0.02, axis=-1)
    assert blue.sum() > 500  # matplotlib's first line colour: the figures were painted
    orange = np.all(np.abs(pixels - np.array([255, 127, 14]) / 255) < 0.02, axis=-1)
    assert orange.sum() > 500  # the second series (1 - q, finite differences...)
    ink = np.flatnonzero((pixels < 0.9).any(axis=(1, 2)))
    assert ink.max() < pixels.shape[0] - 20  # the whole page fits the window
