"""Adversarial review (helper H71) of two recent changes outside crossent.torch:

- e1862e5: the teaching formula parser (``a^b^c`` right-associative, a sum's index a name
  or number, ``sum_ij``, deep nesting refused, ``-0.0`` printed as 0) and curves (grid's
  ``include`` and an overflowing span, overflow-safe central differences, a >4300-digit
  target, ``loss_comparison`` checking ``q_true``);
- 0f9b29e: the CLI's files and signals (SIGTERM raises in the command, a trailing slash or
  ``/.`` refused as a file name, two outputs that are one file refused).

Expected values are independent of crossent: Python's ``fractions``/``math``, the POSIX
conventions the shell and GNU tools follow, what the operating system does with a path. A
bug is a test written as it should pass, marked ``xfail(strict=True)``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from crossent import InputError, _files
from crossent.cli import app
from crossent.teaching import curves
from crossent.teaching.formula import Node, fmt, mathml, parse

pytestmark = pytest.mark.timeout(120)


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def only(text: str) -> Node:
    (row,) = parse(text)
    assert row.kind == "row" and len(row.parts) == 1, row
    return row.parts[0]


def name(t: str) -> Node:
    return Node("name", t)


def num(t: str) -> Node:
    return Node("num", t)


# --------------------------------------------------------------------------------------------
# formula: powers, signs, sums, depth
# --------------------------------------------------------------------------------------------


def test_power_tower_is_right_associative_as_in_mathematics():
    # 2^3^2 = 2^(3^2) = 512 (Python's ** agrees), not (2^3)^2 = 64
    assert 2 ** 3 ** 2 == 512
    assert only("2^3^2") == Node("sup", parts=(num("2"), Node("sup", parts=(num("3"), num("2")))))


def test_unary_minus_binds_looser_than_the_power():
    # -a^b is -(a^b) (as Python's -2**2 == -4)
    assert -2 ** 2 == -4
    assert only("-a^b") == Node("neg", parts=(Node("sup", parts=(name("a"), name("b"))),))
    assert "<mrow><mo>−</mo><msup><mi>a</mi><mi>b</mi></msup></mrow>" in mathml("-a^b")


def test_subscript_then_power_and_power_of_subscripts():
    assert only("a_i^2") == Node("sup", parts=(Node("sub", parts=(name("a"), name("i"))),
                                               num("2")))
    assert only("p_i^q_i") == Node("sup", parts=(Node("sub", parts=(name("p"), name("i"))),
                                                 Node("sub", parts=(name("q"), name("i")))))


def test_a_power_binds_tighter_than_a_fraction_and_a_log():
    assert only("a^b/c") == Node("frac", parts=(Node("sup", parts=(name("a"), name("b"))),
                                                name("c")))
    assert only("log x^2").parts[0] == Node("sup", parts=(name("x"), num("2")))


def test_a_negative_exponent_is_refused_naming_the_formula():
    with pytest.raises(InputError, match="a\\^-b"):
        parse("a^-b")


@pytest.mark.parametrize("text, index", [("sum_i x_i", "i"), ("sum_ij p_ij", "ij"),
                                         ("sum_1 x", "1"), ("sum_i2 x", "i2")])
def test_sum_indices(text, index):
    node = only(text)
    assert node.kind == "sum" and node.text == index


@pytest.mark.parametrize("text", ["summary", "sum", "ssum_ij", "q_true"])
def test_names_that_merely_start_like_a_sum_stay_names(text):
    assert only(text) == name(text)


@pytest.mark.parametrize("text", ["sum_(i) x", "sum_ x", "sum_"])
def test_a_sum_index_that_is_not_a_name_is_refused(text):
    with pytest.raises(InputError, match="formula"):
        parse(text)


@pytest.mark.parametrize("text", ["a^" * 3000 + "b", "(" * 1500 + "x" + ")" * 1500,
                                  "-" * 3000 + "x", "[" * 1500 + "x" + "]" * 1500])
def test_deep_nesting_is_an_input_error_in_parse_and_mathml(text):
    limit = sys.getrecursionlimit()
    with pytest.raises(InputError, match="nested too deeply"):
        parse(text)
    with pytest.raises(InputError, match="nested too deeply"):
        mathml(text)
    assert sys.getrecursionlimit() == limit
    # and the interpreter is fine afterwards: a moderate depth still typesets
    assert mathml("a^" * 40 + "b").count("<msup>") == 40


@pytest.mark.parametrize("x, text", [(-0.0, "0.000000"), (0.0, "0.000000"),
                                     (-1.5, "-1.500000"), (float("nan"), "nan")])
def test_fmt(x, text):
    assert fmt(x) == text


# --------------------------------------------------------------------------------------------
# curves: grid, central differences, loss_comparison, huge targets
# --------------------------------------------------------------------------------------------


def test_grid_over_a_span_beyond_float64_is_exact_at_the_ends_and_evenly_spaced():
    lo, hi, n = -1.7e308, 1.6e308, 5
    got = curves.grid(lo, hi, n)
    want = [float(Fraction(lo) + k * (Fraction(hi) - Fraction(lo)) / (n - 1)) for k in range(n)]
    assert got[0] == lo and got[-1] == hi and np.isfinite(got).all()
    # within a few ulps of the ends' magnitude, as np.linspace over a finite span
    assert np.allclose(got, want, rtol=0, atol=4 * np.finfo(float).eps * 1.7e308)
    assert (np.diff(got) > 0).all()


def test_grid_include_points_outside_the_range_are_dropped():
    assert curves.grid(0.0, 1.0, 3, include=[0.25, 2.0, -1.0, 1.0]).tolist() == \
        [0.0, 0.25, 0.5, 1.0]
    assert curves.grid(1.0, 0.0, 3, include=[0.25, 2.0]).tolist() == [0.0, 0.25, 0.5, 1.0]


@pytest.mark.parametrize("bad", [[float("nan")], [float("inf")], [1e400], ["0.5"]])
def test_grid_include_non_finite_is_refused_naming_include(bad):
    with pytest.raises(InputError, match="include"):
        curves.grid(0.0, 1.0, 3, include=bad)


@pytest.mark.parametrize("c, h", [(1.2e308, 1.0), (1.7e308, 1.0), (9e307, 1.5), (4e307, 4.0)])
def test_central_difference_where_the_difference_overflows(c, h):
    """f(x) = c x: up - down = 2 c h overflows, the derivative c does not."""
    got = curves.finite_difference_grad(lambda v: float(c * v[0]), [0.0], h=h)
    want = float((Fraction(c * h) - Fraction(-c * h)) / (2 * Fraction(h)))
    assert got.tolist() == [want]


def test_a_class_index_beyond_4300_digits_is_named_by_its_size():
    with pytest.raises(InputError, match="bits"):
        curves.multiclass_breakdown(probs=[0.5, 0.5], target=10 ** 5000)


@pytest.mark.parametrize("bad", [[1.5], [-0.5], [0.5, 2.0]])
def test_loss_comparison_out_of_range_names_q_true(bad):
    with pytest.raises(InputError, match="q_true"):
        curves.loss_comparison(bad)


def test_loss_comparison_values():
    got = curves.loss_comparison([0.25, 1.0])
    assert got.series["-ln q"].tolist() == [np.log(4.0), 0.0]
    assert got.series["(1 - q)^2"].tolist() == [0.5625, 0.0]


# --------------------------------------------------------------------------------------------
# CLI: output paths
# --------------------------------------------------------------------------------------------


def test_tour_html_ending_in_dot_dot_is_refused_before_the_work(tmp_path: Path, monkeypatch):
    from crossent.cli import html as html_mod

    monkeypatch.setattr(html_mod, "page", lambda content, **k: "<!DOCTYPE html>page\n")
    target = str(tmp_path / "new") + "/.."
    result = CliRunner().invoke(app, ["tour", "--no-plots", "--html", target])
    assert result.exit_code == 2, (result.stderr, result.exception)
    assert result.stderr.count("\n") == 1 and "--html" in result.stderr, result.stderr
    assert tree(tmp_path) == []


def test_check_files_in_accepts_hard_links_and_the_replace_separates_them(tmp_path: Path):
    """Two outputs hard-linked to one inode are two names: write_atomic's replace gives
    each its own file (as the shell's `mv` would), so nothing needs refusing."""
    (tmp_path / "metrics.json").write_text("old")
    os.link(tmp_path / "metrics.json", tmp_path / "accuracy.png")
    _files.check_files_in(tmp_path, ["metrics.json", "accuracy.png"], "--out")
    _files.write_atomic(tmp_path / "metrics.json", "{}\n")
    _files.write_atomic(tmp_path / "accuracy.png", b"png")
    assert (tmp_path / "metrics.json").read_text() == "{}\n"
    assert (tmp_path / "accuracy.png").read_bytes() == b"png"


def test_check_files_in_accepts_new_files_under_a_linked_folder(tmp_path: Path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    _files.check_files_in(tmp_path / "link", ["metrics.json", "accuracy.png"], "--out")
    _files.check_files_in(tmp_path / "link" / "not-yet", ["a.png", "b.png"], "--out")


def test_check_files_in_refuses_a_link_to_a_sibling_output_not_yet_written(tmp_path: Path):
    (tmp_path / "accuracy.png").symlink_to("metrics.json")  # dangling until metrics is written
    with pytest.raises(InputError, match=r"--out.*same file"):
        _files.check_files_in(tmp_path, ["metrics.json", "accuracy.png"], "--out")


def test_names_differing_in_case_are_two_files_on_this_file_system(tmp_path: Path):
    (tmp_path / "A.png").write_text("a")
    if (tmp_path / "a.png").exists():  # a case-insensitive file system
        pytest.skip("case-insensitive file system")
    _files.check_files_in(tmp_path, ["A.png", "a.png"], "--out")


# --------------------------------------------------------------------------------------------
# CLI: SIGTERM
# --------------------------------------------------------------------------------------------


def test_a_command_in_a_worker_thread_leaves_sigterm_alone(tmp_path: Path):
    before = signal.getsignal(signal.SIGTERM)
    results = []

    def work():
        results.append(CliRunner().invoke(app, ["plot", "log-loss", "--out",
                                                str(tmp_path / "x.svg")]))

    t = threading.Thread(target=work)
    t.start()
    t.join(60)
    assert results and results[0].exit_code == 0, results and results[0].stderr
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_custom_sigterm_handler_is_given_back_after_a_failing_command(tmp_path: Path):
    def mine(signum, frame):  # pragma: no cover - never delivered
        pass

    previous = signal.signal(signal.SIGTERM, mine)
    try:
        result = CliRunner().invoke(app, ["plot", "log-loss", "--out", str(tmp_path / "x.bmp")])
        assert result.exit_code == 2
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, previous)


READY_THEN_WAIT = r"""
import sys, time
from crossent import _files
real = _files.os.fsync
def slow(fd):
    sys.stderr.write("READY\n")
    sys.stderr.flush()
    time.sleep(3)
    real(fd)
_files.os.fsync = slow
from crossent.cli import main
sys.argv = ["crossent", *sys.argv[1:]]
main()
"""


def test_an_inherited_ignored_sigterm_stays_ignored(tmp_path: Path):
    target = tmp_path / "x.svg"
    child = subprocess.Popen(
        [sys.executable, "-c", READY_THEN_WAIT, "plot", "log-loss", "--out", str(target)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGTERM, signal.SIG_IGN))
    try:
        assert child.stderr is not None
        assert child.stderr.readline() == b"READY\n"
        child.send_signal(signal.SIGTERM)
        _, err = child.communicate(timeout=60)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == 0, err
    assert target.read_bytes().rstrip().endswith(b"</svg>")
