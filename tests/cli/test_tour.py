"""``crossent tour``: every worked example of the article, in the chosen unit and beside it."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

import crossent
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


def test_long_lines_wrap_under_their_value():
    """A numbers: line longer than the terminal continues under its value (hanging indent)."""
    import io

    from rich.console import Console

    from crossent.cli.tour import build_tour, render

    buf = io.StringIO()
    render(build_tour(), Console(file=buf, width=60, highlight=False))
    lines = buf.getvalue().splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("  numbers: e = 0.2·log2"))
    indent = len("  numbers: ")
    follow = lines[start + 1:lines.index("  result:  1.485475 bits   (1.029653 nats)", start)]
    assert follow and all(ln[:indent] == " " * indent and ln[indent] != " " for ln in follow)
    text = "".join(ln[indent:].strip() + " " for ln in [lines[start], *follow])
    assert text.replace("  ", " ").strip().endswith("0.464386 + 0.521090 + 0.500000")
    assert max(len(ln.rstrip()) for ln in lines) <= 60


def test_formulas_use_the_same_letters_and_quiz_4_shows_its_formula(runner):
    out = runner.invoke(app, ["tour", "--no-plots"]).stdout
    assert "y_i" not in out and "formula: e = sum_i p_i log(1/p_i)" in out
    after = out[out.index("quiz 4: prediction [0.7, 0.2, 0.1], target [1, 0, 0]"):]
    formula, numbers = after.splitlines()[1:3]
    assert formula.strip() == "formula: c = sum_i p_i log(1/q_i)"
    assert numbers.strip() == "numbers: c = 1·log2(1/0.7) + 0·log2(1/0.2) + 0·log2(1/0.1) = " \
        "log2(1/0.7)"


def _imports(path, package: str) -> set[str]:
    """The crossent modules ``path`` imports (at the top or inside functions)."""
    import ast

    src = Path(crossent.__file__).parent
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            parts = package.split(".")  # the package ``path`` is in
            base = parts[:len(parts) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:
                sub = f"{mod}.{alias.name}"
                rel = Path(*sub.split(".")[1:])
                is_module = (src / rel).with_suffix(".py").exists() or (src / rel).is_dir()
                out.add(sub if is_module else mod)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
    return {m for m in out if m.startswith("crossent")}


def test_no_import_circle_between_the_cli_and_the_teaching_modules():
    """tour -> plots -> train -> tour was a circle; the content model lives in teaching."""
    src = Path(crossent.__file__).parent
    graph = {}
    for folder in ("cli", "teaching"):
        for path in (src / folder).glob("*.py"):
            name = f"crossent.{folder}" + ("" if path.stem == "__init__" else f".{path.stem}")
            graph[name] = _imports(path, f"crossent.{folder}")
    assert "crossent.teaching.content" in graph["crossent.cli.tour"]

    def reach(start: str, seen: set[str]) -> None:
        for nxt in graph.get(start, ()):
            if nxt not in seen:
                seen.add(nxt)
                reach(nxt, seen)

    for name in ("crossent.cli.tour", "crossent.cli.plots", "crossent.cli.html",
                 "crossent.teaching.tour", "crossent.teaching.content"):
        seen: set[str] = set()
        reach(name, seen)
        assert name not in seen, f"{name} imports itself through {sorted(seen)}"
    for name, deps in graph.items():  # the teaching code never reaches the command line
        if name.startswith("crossent.teaching"):
            assert not any(d.startswith("crossent.cli") for d in deps), name
