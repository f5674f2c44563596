"""``crossent tour``: every worked example of the article, in the chosen unit and beside it."""

from __future__ import annotations

import math

import numpy as np
import pytest
from matplotlib.image import imread

from crossent.cli import app
from crossent.cli.plots import NAMES

from .conftest import article_numbers, f6

UNIT_BASES = {"2": (2.0, "bits", math.e, "nats"), "e": (math.e, "nats", 2.0, "bits"),
              "10": (10.0, "hartleys", math.e, "nats")}


@pytest.mark.parametrize("base", ["2", "e", "10"])
def test_every_worked_number_with_the_unit_beside(runner, base):
    result = runner.invoke(app, ["tour", "--no-plots", "--base", base])
    assert result.exit_code == 0, result.output
    b, unit, b2, unit2 = UNIT_BASES[base]
    main, beside = article_numbers(b), article_numbers(b2)
    for key in main:
        line = f"result:  {f6(main[key])} {unit}   ({f6(beside[key])} {unit2})"
        assert line in result.stdout, key


def test_tour_walks_the_chain_of_ideas(runner):
    out = runner.invoke(app, ["tour", "--no-plots"]).stdout
    titles = ["0. The one-minute answer", "1. Surprise", "2. Entropy", "3. Cross-entropy",
              "4. Cross-entropy loss", "5. Binary", "6. Multi-label", "7. Label smoothing",
              "8. Why cross-entropy"]
    positions = [out.index(t) for t in titles]
    assert positions == sorted(positions)
    assert "log2(1/0.001)" in out and "figure:" not in out


def test_other_worked_numbers(runner):
    out = runner.invoke(app, ["tour", "--no-plots"]).stdout
    assert f"{f6(1.0)} bits" in out  # a bird, p = 0.5; a fair coin
    assert f6(math.log2(1 / 0.3)) in out  # not a cat predicted at 0.7
    multilabel = math.log2(1 / 0.9) + math.log2(1 / 0.8) + math.log2(1 / 0.6)
    assert f6(multilabel) in out
    smoothed = [0.1 / 3, 0.1 / 3, 0.9 + 0.1 / 3]
    ls = sum(t * math.log2(1 / q) for t, q in zip(smoothed, [0.1, 0.2, 0.7], strict=True))
    assert f6(ls) in out
    for q in (0.5, 0.01, 1e-4):  # the why-table: -ln q next to 1 - q
        assert f6(-math.log(q)) in out and f6(1 - q) in out
    a = [2.0, 1.0, 0.1]
    total = sum(math.exp(v) for v in a)
    assert f6(math.exp(2.0) / total - 1) in out  # softmax(a) - b for the true class


def test_tour_writes_every_figure(runner, tmp_path):
    result = runner.invoke(app, ["tour", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    for name in NAMES:
        path = tmp_path / f"{name}.png"
        assert f"figure: {path}" in result.stdout.replace("\n", "")
        pixels = imread(path)
        assert pixels.shape[:2] == (400, 640)
        assert np.ptp(pixels[..., :3]) > 0.5  # not a blank image


def test_html_without_plots_has_no_images(runner, tmp_path):
    page = tmp_path / "tour.html"
    result = runner.invoke(app, ["tour", "--no-plots", "--html", str(page)])
    assert result.exit_code == 0, result.output
    html = page.read_text()
    assert "<img" not in html and f6(math.log2(1 / 0.001)) in html
    assert not list(tmp_path.glob("*.png"))
