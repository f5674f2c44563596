"""crossent.teaching.curves: the data behind the figures and ``explain``, checked against math."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crossent import InputError
from crossent.teaching import curves


def at(c: curves.Curves, series: str, x: float) -> float:
    (i,) = np.flatnonzero(np.isclose(c.x, x, rtol=0, atol=1e-15))
    return float(c.series[series][i])


def test_surprisal_curve_is_log_one_over_p():
    c = curves.surprisal_curve(base=2)
    assert at(c, "surprisal", 0.001) == pytest.approx(math.log2(1000), rel=1e-12)
    assert at(c, "surprisal", 0.5) == pytest.approx(1.0)
    np.testing.assert_allclose(c.series["surprisal"], [-math.log2(p) for p in c.x], rtol=1e-12)
    assert np.all(np.diff(c.series["surprisal"]) < 0)


def test_coin_entropy_curve():
    c = curves.coin_entropy_curve(base=2)
    expect = [0.0 if p in (0, 1) else -p * math.log2(p) - (1 - p) * math.log2(1 - p) for p in c.x]
    np.testing.assert_allclose(c.series["entropy"], expect, atol=1e-12)
    assert at(c, "entropy", 0.5) == pytest.approx(1.0)
    assert c.x[np.argmax(c.series["entropy"])] == 0.5


def test_log_loss_curves():
    c = curves.log_loss_curves()
    assert at(c, "-ln q", 0.5) == pytest.approx(math.log(2), rel=1e-12)
    assert c.x[0] == 1e-4 and c.series["-ln q"][0] == pytest.approx(-math.log(1e-4))
    assert at(c, "1 - q", 0.5) == pytest.approx(0.5)
    assert at(c, "(1 - q)^2", 0.5) == pytest.approx(0.25)
    assert c.series["1 - q"].max() <= 1 and c.series["(1 - q)^2"].max() <= 1


def test_coin_cross_entropy_at_least_entropy():
    c = curves.coin_cross_entropy_curve((0.99, 0.01), base=2)
    h = 0.99 * math.log2(1 / 0.99) + 0.01 * math.log2(1 / 0.01)
    np.testing.assert_allclose(c.series["entropy"], h, rtol=1e-12)
    assert np.all(c.series["cross-entropy"] >= h - 1e-12)
    assert c.x[np.argmin(c.series["cross-entropy"])] == pytest.approx(0.99)
    believed = 0.99 * math.log2(1 / 0.01) + 0.01 * math.log2(1 / 0.99)
    assert at(c, "cross-entropy", 0.01) == pytest.approx(believed, rel=1e-12)


def test_gradient_check_is_softmax_minus_target():
    a, b = [2.0, 1.0, 0.1], [1.0, 0.0, 0.0]
    total = sum(math.exp(v) for v in a)
    expect = [math.exp(v) / total - t for v, t in zip(a, b, strict=True)]
    g = curves.softmax_gradient_check(a, b)
    np.testing.assert_allclose(g.analytic, expect, rtol=1e-12)
    np.testing.assert_allclose(g.numeric, expect, atol=1e-8)
    assert g.max_abs_diff < 1e-8


def test_multiclass_breakdown_probs_and_smoothing():
    b = curves.multiclass_breakdown(probs=[0.1, 0.2, 0.7], target=2, base=2)
    assert b.loss == pytest.approx(math.log2(1 / 0.7))
    np.testing.assert_allclose(b.terms, [0, 0, math.log2(1 / 0.7)])
    np.testing.assert_allclose(b.grad, [0.1, 0.2, -0.3], atol=1e-12)
    s = curves.multiclass_breakdown(probs=[0.1, 0.2, 0.7], target=2, label_smoothing=0.1, base=2)
    t = [0.1 / 3, 0.1 / 3, 0.9 + 0.1 / 3]
    np.testing.assert_allclose(s.used_target, t)
    pairs = zip(t, [0.1, 0.2, 0.7], strict=True)
    assert s.loss == pytest.approx(sum(ti * math.log2(1 / q) for ti, q in pairs))


def test_label_breakdown_binary_and_multilabel():
    b = curves.label_breakdown(probs=[0.7], target=[0.0], base=math.e)
    assert b.loss == pytest.approx(math.log(1 / 0.3))
    assert float(b.grad[0]) == pytest.approx(0.7)
    x, t = [1.2, -0.3, 2.0], [1.0, 0.0, 1.0]
    m = curves.label_breakdown(logits=x, target=t, base=math.e, multilabel=True)
    sig = [1 / (1 + math.exp(-v)) for v in x]
    pairs = zip(t, sig, strict=True)
    expect = [-(ti * math.log(s) + (1 - ti) * math.log(1 - s)) for ti, s in pairs]
    np.testing.assert_allclose(m.terms, expect, rtol=1e-12)
    assert m.loss == pytest.approx(sum(expect))
    np.testing.assert_allclose(m.grad, [s - ti for s, ti in zip(sig, t, strict=True)], rtol=1e-12)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"probs": [0.5, 0.6], "target": 0}, "probs must sum to 1"),
    ({"probs": [0.1, 0.2, 0.7], "target": 7}, "index 7 is out of range for 3 classes"),
    ({"probs": [], "target": 0}, "probs is empty"),
    ({"logits": [1.0, 2.0], "target": [0.0, 0.0, 1.0]}, "target has 3 entries"),
    ({"probs": [0.1, 0.9], "target": 1, "label_smoothing": 2.0}, "label_smoothing=2.0"),
    ({"probs": [0.5, 0.5], "target": [0.5, 0.6]}, "target must sum to 1"),
])
def test_breakdown_errors_name_the_problem(kwargs, message):
    with pytest.raises(InputError, match=message):
        curves.multiclass_breakdown(**kwargs)


@pytest.mark.parametrize(("n", "message"), [
    (1, r"target has 1 entry but probs has 2: one target in \[0, 1\] per class"),
    (3, r"target has 3 entries but probs has 2"),
])
def test_multilabel_target_count_is_named_in_good_english(n, message):
    """Review H98-5: "target has 1 entries" read as a typo to a learner."""
    with pytest.raises(InputError, match=message):
        curves.label_breakdown(probs=[0.7, 0.2], target=[1.0] * n, multilabel=True)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-8, 8), min_size=2, max_size=6), st.data())
def test_breakdown_terms_sum_to_loss(logits, data):
    target = data.draw(st.integers(0, len(logits) - 1))
    alpha = data.draw(st.floats(0, 1))
    b = curves.multiclass_breakdown(logits=logits, target=target, label_smoothing=alpha,
                                    base=2)
    assert float(b.terms.sum()) == pytest.approx(b.loss, rel=1e-9, abs=1e-12)
    np.testing.assert_allclose(b.grad, b.probs - b.used_target, atol=1e-12)


def test_teaching_modules_have_one_home():
    """The article and the figures' data live in crossent.teaching only (no second copy)."""
    import importlib.util

    assert importlib.util.find_spec("crossent.article") is None
    assert importlib.util.find_spec("crossent.curves") is None
    assert curves.__name__ == "crossent.teaching.curves"
