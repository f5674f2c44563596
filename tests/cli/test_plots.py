"""``crossent plot``: each figure's DATA checked against math, and the files it writes."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from matplotlib.image import imread

from crossent.cli import app
from crossent.cli.plots import NAMES, make_figure


def line(fig, label):
    ax = fig.axes[0]
    (found,) = [ln for ln in ax.lines if ln.get_label() == label]
    return np.asarray(found.get_xdata(), float), np.asarray(found.get_ydata(), float)


def y_at(x, y, x0):
    (i,) = np.flatnonzero(np.isclose(x, x0, rtol=0, atol=1e-15))
    return float(y[i])


def test_log_loss_figure_data():
    fig = make_figure("log-loss")
    x, y = line(fig, "-ln q")
    assert y_at(x, y, 0.5) == pytest.approx(math.log(2), rel=1e-12)
    assert x.min() == pytest.approx(1e-4) and y.max() == pytest.approx(-math.log(1e-4))
    x1, y1 = line(fig, "1 - q")
    np.testing.assert_allclose(y1, 1 - x1)
    x2, y2 = line(fig, "(1 - q)^2")
    np.testing.assert_allclose(y2, (1 - x2) ** 2)
    assert fig.axes[0].get_title() == "Log Loss when true label = 1"


def test_surprisal_figure_data():
    x, y = line(make_figure("surprisal"), "surprisal")
    assert y_at(x, y, 0.001) == pytest.approx(math.log2(1000))
    assert y_at(x, y, 0.5) == pytest.approx(1.0)
    x, y = line(make_figure("surprisal", base=math.e, unit="nats"), "surprisal")
    assert y_at(x, y, 0.001) == pytest.approx(math.log(1000))


def test_coin_entropy_figure_data():
    x, y = line(make_figure("coin-entropy"), "entropy")
    assert y_at(x, y, 0.5) == pytest.approx(1.0)
    assert y_at(x, y, 0.99) == pytest.approx(-0.99 * math.log2(0.99) - 0.01 * math.log2(0.01))
    assert y_at(x, y, 0.0) == 0.0 and y_at(x, y, 1.0) == 0.0


def test_cross_entropy_vs_entropy_figure_data():
    fig = make_figure("cross-entropy-vs-entropy")
    x, ce = line(fig, "cross-entropy H(p, q)")
    _, h = line(fig, "entropy H(p)")
    expect_h = -0.99 * math.log2(0.99) - 0.01 * math.log2(0.01)
    np.testing.assert_allclose(h, expect_h)
    expect = [-(0.99 * math.log2(b) + 0.01 * math.log2(1 - b)) for b in x]
    np.testing.assert_allclose(ce, expect, rtol=1e-12)
    assert np.all(ce >= h - 1e-12)
    assert x[np.argmin(ce)] == pytest.approx(0.99)


def test_gradient_figure_bars_are_softmax_minus_target():
    ax = make_figure("gradient").axes[0]
    a = [2.0, 1.0, 0.1]
    total = sum(math.exp(v) for v in a)
    expect = [math.exp(v) / total - t for v, t in zip(a, [1, 0, 0], strict=True)]
    analytic, numeric = ax.containers
    assert analytic.get_label() == "softmax(a) - b"
    np.testing.assert_allclose([r.get_height() for r in analytic], expect, rtol=1e-12)
    np.testing.assert_allclose([r.get_height() for r in numeric], expect, atol=1e-8)


@pytest.mark.parametrize("name", NAMES)
def test_plot_command_writes_png_and_svg(runner, tmp_path, name):
    png, svg = tmp_path / f"{name}.png", tmp_path / f"{name}.svg"
    for path in (png, svg):
        result = runner.invoke(app, ["plot", name, "--out", str(path)])
        assert result.exit_code == 0, result.output
    assert imread(png).shape[:2] == (400, 640)
    root = ET.parse(svg).getroot()
    assert root.tag.endswith("svg")
    assert root.find(".//{http://www.w3.org/2000/svg}g[@id='axes_1']") is not None


@pytest.mark.parametrize("name", NAMES)
def test_figures_in_a_unit_change_with_the_base_and_the_others_do_not(name):
    from crossent.cli.plots import FIGURES

    def data(base, unit):
        ax = make_figure(name, base, unit).axes[0]
        return [np.asarray(v, float).tolist() for v in [ln.get_ydata() for ln in ax.lines]
                + [[r.get_height() for r in c] for c in ax.containers]]

    if name == "training":  # the tour's training run: unitless accuracies
        assert not FIGURES[name].in_unit
        return
    same = data(2.0, "bits") == data(10.0, "hartleys")
    assert same != FIGURES[name].in_unit


def test_save_checks_the_suffix_before_writing(tmp_path):
    from crossent import InputError
    from crossent.cli.plots import save

    with pytest.raises(InputError, match=r"must end in \.png or \.svg"):
        save("log-loss", tmp_path / "sub" / "figure.jpg")
    assert list(tmp_path.iterdir()) == []
    path = save("log-loss", tmp_path / "sub" / "figure.svg")
    assert [p.name for p in path.parent.iterdir()] == ["figure.svg"]  # no temporary left
