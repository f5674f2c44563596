"""Session 21, helper H66: adversarial review of crossent.teaching (formula, curves, article,
tour) and of what ``crossent explain`` / ``crossent tour`` expose of it.

Every expected value is independent of crossent: Python's own operator semantics, ``math``,
``mpmath`` at 50 digits, SciPy or torch. Bugs are strict xfails whose reason says what is
wrong; the rest are regression guards for edges checked and found right.
"""

from __future__ import annotations

import math
import re

import mpmath
import numpy as np
import pytest
import scipy.stats
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from crossent import InputError
from crossent.cli import app
from crossent.teaching import curves
from crossent.teaching import tour as tour_mod
from crossent.teaching.content import UNITS, Section
from crossent.teaching.formula import Node, mathml, numbers, parse, short, vector

# --------------------------------------------------------------------------------------------
# An independent reading of the parse tree: what value the typeset formula denotes
# --------------------------------------------------------------------------------------------

ENV = {"x": 1.7, "y": -0.6, "z": 2.25}


def value_of(n: Node) -> float:
    """The number the tree denotes, read with the usual meaning of each node."""
    if n.kind == "num":
        return float(n.text)
    if n.kind == "name":
        return ENV[n.text]
    if n.kind == "neg":
        return -value_of(n.parts[0])
    if n.kind == "frac":
        return value_of(n.parts[0]) / value_of(n.parts[1])
    if n.kind == "sup":
        return value_of(n.parts[0]) ** value_of(n.parts[1])
    if n.kind == "group":
        assert len(n.parts) == 1
        return value_of(n.parts[0])
    if n.kind == "row":
        items = list(n.parts)
        if any(p.kind == "op" and p.text in ("+", "-") for p in items):  # a sum
            total, sign = value_of(items[0]), None
            for p in items[1:]:
                if p.kind == "op":
                    sign = p.text
                else:
                    total = total + value_of(p) if sign == "+" else total - value_of(p)
            return total
        out = 1.0  # a product: factors, juxtaposed or joined by a dot
        for p in items:
            if p.kind != "op":
                out *= value_of(p)
        return out
    raise AssertionError(n.kind)


def formula_value(text: str) -> float:
    (tree,) = parse(text)
    assert len(tree.parts) == 1
    return value_of(tree.parts[0])


def _atom(inner: st.SearchStrategy) -> st.SearchStrategy:
    numbers_ = st.sampled_from(["1", "2", "3", "0.5", "2.5", "7"])
    names = st.sampled_from(["x", "y", "z"])
    bracket = inner.map(lambda e: ("( " + e[0] + " )", "(" + e[1] + ")"))
    return st.one_of(numbers_.map(lambda s: (s, s)), names.map(lambda s: (s, s)), bracket)


def _factor(inner: st.SearchStrategy) -> st.SearchStrategy:
    power = st.sampled_from(["1", "2", "3"])
    return st.one_of(
        _atom(inner),
        st.tuples(_atom(inner), power).map(lambda t: (f"{t[0][0]} ^ {t[1]}",
                                                      f"{t[0][1]}**{t[1]}")))


def _term(inner: st.SearchStrategy) -> st.SearchStrategy:
    ops = st.sampled_from([("·", "*"), (" ", "*"), ("/", "/")])
    def text(o: tuple[str, str], f: tuple[str, str]) -> str:
        # "x (1)" is an application (softmax(a)), not a product: a dot before a bracket
        return f" {'·' if o[0] == ' ' and f[0].startswith('(') else o[0]} {f[0]}"

    return st.tuples(_factor(inner), st.lists(st.tuples(ops, _factor(inner)), max_size=3)).map(
        lambda t: (t[0][0] + "".join(text(o, f) for o, f in t[1]),
                   t[0][1] + "".join(f"{o[1]}{f[1]}" for o, f in t[1])))


def _expr(inner: st.SearchStrategy) -> st.SearchStrategy:
    sign = st.sampled_from([("", ""), ("- ", "-")])
    ops = st.sampled_from(["+", "-"])
    first = st.tuples(sign, _term(inner)).map(lambda t: (t[0][0] + t[1][0], t[0][1] + t[1][1]))
    return st.tuples(first, st.lists(st.tuples(ops, sign, _term(inner)), max_size=3)).map(
        lambda t: (t[0][0] + "".join(f" {o} {s[0]}{e[0]}" for o, s, e in t[1]),
                   t[0][1] + "".join(f"{o}({s[1]}{e[1]})" for o, s, e in t[1])))


EXPRESSIONS = st.recursive(st.sampled_from([("1", "1"), ("x", "x")]), _expr, max_leaves=12)


@settings(max_examples=150, deadline=None)
@given(EXPRESSIONS)
def test_formula_precedence_is_pythons(pair):
    """+, -, unary -, the dot, juxtaposition, / and ^ (not chained) group as Python's
    operators do: the typeset tree denotes the value Python computes from the same text."""
    text, python = pair
    try:
        expect = eval(python, {}, dict(ENV))  # our own generated arithmetic
    except (ZeroDivisionError, OverflowError):
        assume(False)
    assume(isinstance(expect, float | int) and math.isfinite(expect))
    assert formula_value(text) == pytest.approx(expect, rel=1e-9, abs=1e-9), (text, python)


@pytest.mark.parametrize(("text", "expect"), [
    ("8 / 4 / 2", (8 / 4) / 2),  # left-associative, as Python
    ("8 - 4 - 2", (8 - 4) - 2),
    ("- 3 ^ 2", -(3**2)),  # unary minus below ^, as Python's -3**2
    ("2 / 3 ^ 2", 2 / 3**2),
    ("2 ^ 3 / 4", 2**3 / 4),
    ("1 - - 2", 1 - -2),
    ("(1 - 2) ^ 2", (1 - 2) ** 2),
    ("2 · 3 / 4 · 5", 2 * 3 / 4 * 5),
])
def test_formula_precedence_examples(text, expect):
    assert formula_value(text) == pytest.approx(expect, rel=1e-12)


def test_power_is_right_associative():
    assert formula_value("2 ^ 3 ^ 2") == 2**3**2
    (tree,) = parse("a^b^c")
    top = tree.parts[0]
    assert top.kind == "sup" and top.parts[0].kind == "name" and top.parts[1].kind == "sup"


@pytest.mark.parametrize("bad", [
    "α = 1", "a − b", "a × b", "x²", "a & b", "a < b", "<mi>x</mi>", "a\x00b", "`x`",
    "1.", ".5", "a =", "()", "[]", "(a]", "sum_", "log2", "2^-1", "a·-b",
])
def test_text_outside_the_grammar_is_an_input_error_naming_the_formula(bad):
    with pytest.raises(InputError, match="formula"):
        mathml(bad)


@pytest.mark.parametrize("bad", ["sum_+ x", "sum_( x", "sum_= x", "sum_, x"])
def test_sum_index_must_be_a_name(bad):
    with pytest.raises(InputError, match="formula"):
        parse(bad)


def test_sum_over_a_two_letter_index_is_a_sum():
    out = mathml("c = sum_ij x_ij")
    assert "∑" in out and "sum_ij" not in out


@pytest.mark.parametrize("text", ["(" * 300 + "x" + ")" * 300, "-" * 2000 + "x",
                                  "log " * 2000 + "x"], ids=["brackets", "minus", "log"])
def test_deeply_nested_formula_parses_or_is_an_input_error(text):
    try:
        parse(text)
    except InputError:
        pass


def test_numbers_keep_their_written_form_huge_tiny_and_negative_zero():
    text = "s = 1e400 + 5e-324 + 1e-05 + 1e+20 + 0.001"
    assert numbers(text) == ["1e400", "5e-324", "1e-05", "1e+20", "0.001"]
    shown = re.findall(r"<mn>([^<]*)</mn>", mathml(text))
    assert shown == numbers(text)
    # the tour's own formatting of numbers stays inside the grammar
    values = [1e-5, 1e20, -0.0, 0.1 + 0.2, 5e-324, 123456789.0]
    assert [float(v) for v in numbers(vector(values))] == [abs(float(short(v))) for v in values]
    assert formula_value(short(1e-5)) == 1e-5 and short(-0.0) == "-0"
    assert formula_value("- 0") == 0.0


def test_a_long_flat_formula_is_typeset_quickly_and_breaks_between_terms():
    import time

    text = "c = " + " + ".join(f"0.{i % 9 + 1}·log2(1/0.{i % 7 + 1})" for i in range(5000))
    start = time.perf_counter()
    out = mathml(text)
    assert time.perf_counter() - start < 5
    assert out.count("<math>") == 5001 and out.count("<mfrac>") == 5000


# --------------------------------------------------------------------------------------------
# curves: numbers against math / SciPy / torch, refusals naming the argument
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("base", [2.0, math.e, 10.0])
def test_curves_against_math_in_every_base(base):
    s = curves.surprisal_curve(base=base, lo=1e-6, n=97)
    np.testing.assert_allclose(s.series["surprisal"], [-math.log(p) / math.log(base) for p in s.x],
                               rtol=1e-13, atol=1e-15)
    h = curves.coin_entropy_curve(base=base, n=51)
    ref = [scipy.stats.entropy([p, 1 - p], base=base) for p in h.x]
    np.testing.assert_allclose(h.series["entropy"], ref, rtol=1e-12, atol=1e-15)
    c = curves.coin_cross_entropy_curve((0.3, 0.7), base=base, lo=1e-3, n=101)
    ref_ce = [-(0.3 * math.log(b) + 0.7 * math.log(1 - b)) / math.log(base) for b in c.x]
    np.testing.assert_allclose(c.series["cross-entropy"], ref_ce, rtol=1e-12)
    np.testing.assert_allclose(c.series["entropy"], scipy.stats.entropy([0.3, 0.7], base=base),
                               rtol=1e-12)
    assert c.x[np.argmin(c.series["cross-entropy"])] == 0.3  # Gibbs: touches at b = p[0]
    assert np.all(c.series["cross-entropy"] >= c.series["entropy"] - 1e-15)


def test_curves_at_zero_and_subnormal_lo():
    assert curves.surprisal_curve(lo=-0.0, n=3).series["surprisal"][0] == math.inf
    tiny = curves.surprisal_curve(lo=5e-324, n=3)
    assert tiny.x[0] == 5e-324 and tiny.series["surprisal"][0] == 1074.0  # -log2(2^-1074)
    c = curves.coin_cross_entropy_curve((1.0, 0.0), lo=0.0, n=3)
    np.testing.assert_array_equal(c.series["cross-entropy"], [math.inf, 1.0, 0.0])
    np.testing.assert_array_equal(c.series["entropy"], [0.0, 0.0, 0.0])


@pytest.mark.parametrize(("call", "name"), [
    (lambda: curves.grid(math.nan, 1, 3), "lo"),
    (lambda: curves.grid(0, math.inf, 3), "hi"),
    (lambda: curves.grid(0, 1, 0), "n"),
    (lambda: curves.grid(0, 1, True), "n"),
    (lambda: curves.grid(0, 1, 2.5), "n"),
    (lambda: curves.grid(0, 1, 10**8), "n"),
    (lambda: curves.surprisal_curve(lo=1.0), "lo"),
    (lambda: curves.surprisal_curve(lo=-1e-300), "lo"),
    (lambda: curves.surprisal_curve(base=1.0), "base"),
    (lambda: curves.surprisal_curve(base=True), "base"),
    (lambda: curves.coin_entropy_curve(base=-2.0), "base"),
    (lambda: curves.log_loss_curves(lo=math.nan), "lo"),
    (lambda: curves.coin_cross_entropy_curve(lo=0.5), "lo"),
    (lambda: curves.coin_cross_entropy_curve((0.2, 0.3, 0.5)), "truth"),
    (lambda: curves.coin_cross_entropy_curve((0.5, 0.6)), "truth"),
    (lambda: curves.coin_cross_entropy_curve(("a", "b")), "truth"),
    (lambda: curves.coin_cross_entropy_curve((1.5, -0.5)), "truth"),
    (lambda: curves.coin_cross_entropy_curve((10**400, 0)), "truth"),
    (lambda: curves.finite_difference_grad(sum, [1.0], h=0.0), "h"),
    (lambda: curves.finite_difference_grad(sum, [1e300], h=1e-6), "h"),
    (lambda: curves.finite_difference_grad(sum, []), "x"),
    (lambda: curves.softmax_gradient_check([1.0, 2.0], [0.5, 0.6]), "target"),
    (lambda: curves.multiclass_breakdown(probs=[0.5, 0.5], target=10**400),
     "target class index"),
    (lambda: curves.multiclass_breakdown(probs=[0.5, 0.5], target=0, base=math.nan), "base"),
    (lambda: curves.multiclass_breakdown(probs=[0.5, 0.5], target=0,
                                         label_smoothing=math.nan), "label_smoothing"),
    (lambda: curves.multiclass_breakdown(probs=[0.5, 0.5 + 2e-4], target=0), "probs"),
    (lambda: curves.multiclass_breakdown(probs=[0.5, None], target=0), "probs"),
    (lambda: curves.multiclass_breakdown(logits=[1.0, 1j], target=0), "logits"),
    (lambda: curves.label_breakdown(probs=[0.5], target=[10**400]), "target"),
    (lambda: curves.label_breakdown(probs=[1.5], target=[1.0]), "probs"),
])
def test_curve_refusals_name_the_argument(call, name):
    with pytest.raises(InputError, match=name):
        call()


def test_a_million_classes():
    b = curves.multiclass_breakdown(probs=np.full(10**6, 1e-6), target=3, base=2)
    assert b.loss == pytest.approx(math.log2(1e6), rel=1e-9)
    assert b.grad[3] == pytest.approx(1e-6 - 1, rel=1e-9) and b.grad[4] == pytest.approx(1e-6)


@pytest.mark.parametrize(("kw", "t"), [
    ({"probs": [5e-324]}, 1.0), ({"probs": [1 - 2**-53]}, 0.0), ({"probs": [0.0]}, 0.0),
    ({"logits": [1e308]}, 0.0), ({"logits": [-1e308]}, 1.0), ({"logits": [-800.0]}, 0.3),
])
def test_binary_breakdown_at_float64_edges_is_torchs(kw, t):
    b = curves.label_breakdown(target=[t], base=math.e, **kw)
    tt = torch.tensor([t], dtype=torch.float64)
    if "probs" in kw:
        ref = torch.nn.functional.binary_cross_entropy(
            torch.tensor(kw["probs"], dtype=torch.float64), tt, reduction="sum")
    else:
        ref = torch.nn.functional.binary_cross_entropy_with_logits(
            torch.tensor(kw["logits"], dtype=torch.float64), tt, reduction="sum")
    assert b.loss == pytest.approx(float(ref), rel=1e-12)
    assert float(b.terms.sum()) == pytest.approx(b.loss, rel=1e-12)


def test_a_4301_digit_class_index_is_refused_by_name():
    with pytest.raises(InputError, match="target"):
        curves.multiclass_breakdown(probs=[0.5, 0.5], target=10**5000)


@pytest.mark.parametrize("bad", [["a"], None, [None]])
def test_loss_comparison_refuses_what_is_not_numbers(bad):
    with pytest.raises(InputError, match="q_true"):
        curves.loss_comparison(bad)


@pytest.mark.parametrize("include", [["a"], 0.5])
def test_grid_include_is_checked(include):
    try:
        x = curves.grid(0.0, 1.0, 3, include=include)
    except InputError as err:
        assert "include" in str(err)
    else:
        assert 0.5 in x


def test_grid_over_the_whole_float64_range():
    with np.errstate(all="ignore"):
        try:
            x = curves.grid(-1.7e308, 1.7e308, 3)
        except InputError as err:
            assert "hi" in str(err) or "lo" in str(err)
            return
    np.testing.assert_array_equal(x, [-1.7e308, 0.0, 1.7e308])


@pytest.mark.parametrize(("make", "low", "high"), [
    (lambda: curves.surprisal_curve(lo=0.9, n=5), 0.9, 1.0),
    (lambda: curves.log_loss_curves(lo=0.6, n=5), 0.6, 1.0),
    (lambda: curves.coin_cross_entropy_curve(lo=0.4, n=5), 0.4, 0.6),
])
def test_curve_x_stays_in_the_promised_interval(make, low, high):
    x = make().x
    assert x.min() >= low and x.max() <= high + 1e-15


def test_finite_difference_with_a_huge_step():
    g = curves.finite_difference_grad(lambda v: float(v.sum()), [1.0], h=1e308)
    assert g.tolist() == [1.0]


# --------------------------------------------------------------------------------------------
# The article's numbers at 50 digits; the tour's substituted formulas evaluate to its results
# --------------------------------------------------------------------------------------------

mpmath.mp.dps = 50
M = mpmath.mpf
ARTICLE = {  # ../shared/ARTICLE.md's table (bits, nats, hartleys) and each row's definition
    "panda": ((9.965784, 6.907755, 3.000000), lambda lg: lg(1 / M("0.001"))),
    "entropy": ((1.485475, 1.029653, 0.447173),
                lambda lg: sum(M(p) * lg(1 / M(p)) for p in ("0.2", "0.3", "0.5"))),
    "cross_entropy": ((0.514573, 0.356675, 0.154902), lambda lg: lg(1 / M("0.7"))),
    "soft_cross_entropy": ((1.618251, 1.121686, None),  # ARTICLE prints 0.487140: a typo
                           lambda lg: sum(M(p) * lg(1 / M(q)) for p, q in
                                          (("0.2", "0.1"), ("0.3", "0.2"), ("0.5", "0.7")))),
    "coin_entropy": ((0.080793, 0.056002, 0.024321),
                     lambda lg: M("0.99") * lg(1 / M("0.99")) + M("0.01") * lg(1 / M("0.01"))),
    "coin_cross_entropy": ((6.577563, 4.559219, 1.980044),
                           lambda lg: M("0.99") * lg(1 / M("0.01"))
                           + M("0.01") * lg(1 / M("0.99"))),
    "quiz4": ((0.514573, 0.356675, 0.154902), lambda lg: lg(1 / M("0.7"))),
}
LOGS = {"bits": lambda v: mpmath.log(v, 2), "nats": mpmath.log,
        "hartleys": lambda v: mpmath.log(v, 10)}


def test_article_table_at_fifty_digits():
    from crossent.teaching.article import EXAMPLES

    assert [ex.key for ex in EXAMPLES] == list(ARTICLE)
    for ex in EXAMPLES:
        printed, definition = ARTICLE[ex.key]
        for (unit, lg), shown in zip(LOGS.items(), printed, strict=True):
            exact = definition(lg)
            got = ex.values()[unit]
            assert abs(got - float(exact)) <= 4e-16 * max(1.0, abs(got)), (ex.key, unit)
            if shown is not None:
                assert f"{got:.6f}" == f"{float(exact):.6f}" == f"{shown:.6f}", (ex.key, unit)
    soft = ARTICLE["soft_cross_entropy"][1](LOGS["hartleys"])
    assert f"{float(soft):.6f}" == "0.487142"  # ARTICLE.md's 0.487140 is off by 2e-6


def _evaluate(text: str, log: str) -> list[float]:
    """Each side of ``lhs = a = b`` after the first, evaluated with Python's math."""
    py = text.replace("·", "*").replace("log2(", "L2(").replace("log10(", "L10(")
    py = py.replace("ln(", "LN(")
    env = {"L2": math.log2, "L10": math.log10, "LN": math.log}
    return [eval(side, {}, env) for side in py.split("=")[1:]]  # the tour's own text


@pytest.fixture
def quick_tour(monkeypatch):
    """The tour without its 9-second training section (not under review here)."""
    monkeypatch.setattr(tour_mod, "_training", lambda: Section("9. Training", []))
    return tour_mod.build_tour


@pytest.mark.parametrize("unit", list(UNITS))
def test_every_substituted_formula_evaluates_to_the_result(quick_tour, unit):
    tour = quick_tour(UNITS[unit])
    u, b = tour.unit, tour.beside
    checked = 0
    for s in tour.sections:
        for w in s.worked:
            # the same number in the unit beside: value * ln(base_u) / ln(base_b)
            assert w.beside == pytest.approx(w.value * math.log(u.base) / math.log(b.base),
                                             rel=1e-12), w.label
            for piece in w.substituted.split(";"):
                piece = piece.strip()
                if not re.match(r"[sec] = ", piece):
                    continue
                for side in _evaluate(piece, u.log):
                    assert side == pytest.approx(w.value, rel=2e-6, abs=2e-6), (w.label, piece)
                    checked += 1
    assert checked >= 20


def test_tour_prose_numbers_against_math(quick_tour):
    tour = quick_tour(UNITS["bits"])
    text = " ".join(p for s in tour.sections for p in s.text)
    kl = sum(p * math.log2(p / q) for p, q in ((0.2, 0.1), (0.3, 0.2), (0.5, 0.7)))
    assert f"KL(p || q) = {kl:.6f}` bits" in text
    assert "`[0.033333, 0.033333, 0.933333]`" in text
    (why,) = [s for s in tour.sections if s.title.startswith("8.")]
    table, grads = why.tables
    for row in table.rows:
        q = float(row[0])
        assert row[1:] == [f"{-math.log(q):.6f}", f"{1 - q:.6f}", f"{(1 - q) ** 2:.6f}"]
    a = [2.0, 1.0, 0.1]
    soft = [math.exp(v) / sum(math.exp(w) for w in a) for v in a]
    for i, row in enumerate(grads.rows):
        want = f"{soft[i] - (i == 0):.6f}"
        assert row[1] == f"{soft[i]:.6f}" and row[3] == want and row[4] == want


def test_mixup_example_is_lambda_times_one_target_plus_the_rest(quick_tour):
    tour = quick_tour(UNITS["nats"])
    (w,) = [w for s in tour.sections for w in s.worked if w.label.startswith("Mixup")]
    m = re.match(r"target = ([\d.]+)·\[0, 0, 1\] \+ \(1 - \1\)·\[1, 0, 0\] = "
                 r"\[([\d.]+), 0, ([\d.]+)\]; ", w.substituted)
    assert m, w.substituted
    lam, first, last = (float(g) for g in m.groups())
    assert 0 < lam < 1 and first == pytest.approx(1 - lam, abs=1.5e-6) and last == lam
    assert w.value == pytest.approx(first * math.log(1 / 0.1) + last * math.log(1 / 0.7),
                                    rel=1e-5)


# --------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("args", "bits"), [
    (["--probs", "5e-324,0.3,0.7", "--target", "0"], 1074.0),  # a subnormal q: -log2 exact
    (["--probs", "-0.0,0.3,0.7", "--target", "2"], math.log2(1 / 0.7)),
    (["--probs", "1", "--target", "0"], 0.0),
    (["--probs", "0.1,0.2,0.7", "--target", "+2"], math.log2(1 / 0.7)),
])
def test_explain_edges_print_math(args, bits):
    result = CliRunner().invoke(app, ["explain", *args])
    assert result.exit_code == 0, result.output
    assert f"= {bits:.6f} bits" in result.stdout
    assert "-0.000000" not in result.stdout


@pytest.mark.parametrize(("args", "needle"), [
    (["--probs", "0.1,0.2,0.7", "--target", "0,0,1,"], "--target"),
    (["--probs", "0.1,0.2,0.7,", "--target", "0"], "--probs"),
    (["--probs", "0.1,0.2,0.7", "--target", "٢"], "--target"),
    (["--probs", "0.1,0.2,0.7", "--target", "1" * 5000], "--target"),
    (["--logits", "1e400", "--target", "0"], "--logits"),
    (["--probs", "0.5", "--target", "2", "--binary"], "target"),
    (["--probs", "0.5,0.5", "--target", "1", "--multilabel"], "target"),
], ids=["target-comma", "probs-comma", "arabic-digit", "5000-digits", "logit-1e400",
        "binary-target-2", "multilabel-size"])
def test_explain_bad_input_is_one_stderr_line(args, needle):
    result = CliRunner().invoke(app, ["explain", *args])
    assert result.exit_code == 2 and not result.stdout
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in result.stderr


def test_tour_html_to_a_non_utf8_file_name(quick_tour, tmp_path):
    page = tmp_path / "\udce9.html"
    result = CliRunner().invoke(app, ["tour", "--no-plots", "--html", str(page)])
    assert result.exception is None or isinstance(result.exception, SystemExit), \
        repr(result.exception)
    assert result.exit_code in (0, 2)
