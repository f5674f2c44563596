"""The article's worked examples (ARTICLE.md's table): each value crossent computes against the
example's formula written out with ``math.log2``/``math.log``/``math.log10``, and the two
command lines that print them."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
from references import ARTICLE_TABLE

from crossent.teaching.article import EXAMPLES, binary_example, loss_from_logits_example

LOGS = {"bits": math.log2, "nats": math.log, "hartleys": math.log10}

FORMULAS = {
    "panda": lambda log: log(1 / 0.001),
    "entropy": lambda log: 0.2 * log(1 / 0.2) + 0.3 * log(1 / 0.3) + 0.5 * log(1 / 0.5),
    "cross_entropy": lambda log: log(1 / 0.7),
    "soft_cross_entropy": lambda log: 0.2 * log(1 / 0.1) + 0.3 * log(1 / 0.2) + 0.5 * log(1 / 0.7),
    "coin_entropy": lambda log: 0.99 * log(1 / 0.99) + 0.01 * log(1 / 0.01),
    "coin_cross_entropy": lambda log: 0.99 * log(1 / 0.01) + 0.01 * log(1 / 0.99),
    "quiz4": lambda log: log(1 / 0.7),
}
"""Each worked example's formula as a function of the logarithm (the unit)."""

# ARTICLE.md's table, bits / nats / hartleys, to 6 decimals, with its typo mended: it prints
# 0.487140 hartleys; 1.121686 nats / ln 10 = 0.4871420 (math wins)
TABLE = {**ARTICLE_TABLE, "soft_cross_entropy": (1.618251, 1.121686, 0.487142)}

EXAMPLE_UNITS = [(ex, unit) for ex in EXAMPLES for unit in LOGS]
IDS = [f"{ex.key}-{unit}" for ex, unit in EXAMPLE_UNITS]


def test_every_row_of_the_article_table_is_an_example():
    assert [ex.key for ex in EXAMPLES] == list(FORMULAS) == list(TABLE)


@pytest.mark.parametrize(("example", "unit"), EXAMPLE_UNITS, ids=IDS)
def test_worked_example_equals_its_formula(example, unit):
    assert example.values()[unit] == pytest.approx(FORMULAS[example.key](LOGS[unit]), rel=1e-12)


@pytest.mark.parametrize(("example", "unit"), EXAMPLE_UNITS, ids=IDS)
def test_worked_example_rounds_to_the_article_table(example, unit):
    expected = TABLE[example.key][list(LOGS).index(unit)]
    assert round(FORMULAS[example.key](LOGS[unit]), 6) == expected
    assert round(example.values()[unit], 6) == expected


def test_cross_entropy_exceeds_the_truths_entropy_in_the_soft_truth_example():
    values = {ex.key: ex.value(2) for ex in EXAMPLES}
    assert values["soft_cross_entropy"] > values["entropy"]
    assert values["coin_cross_entropy"] > values["coin_entropy"]


def test_quiz4_from_logits_and_the_binary_cat_are_minus_ln_0_7():
    assert loss_from_logits_example() == pytest.approx(math.log(1 / 0.7), rel=1e-12)
    assert binary_example() == pytest.approx(math.log(1 / 0.7), rel=1e-12)


def _run(*args):
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_one_liner_prints_the_entropy_of_panda_bird_dog_in_bits():
    out = _run("-c", "import crossent as xe; print(xe.entropy([0.2,0.3,0.5], base=2))")
    assert f"{float(out):.4f}" == "1.4855"
    assert float(out) == pytest.approx(FORMULAS["entropy"](math.log2), rel=1e-12)


def test_python_m_crossent_prints_every_example_in_every_unit():
    out = _run("-m", "crossent")
    for example in EXAMPLES:
        assert example.title in out
        for log in LOGS.values():
            assert f"{FORMULAS[example.key](log):.6f}" in out, example.key
    assert f"{math.log(1 / 0.7):.6f} nats" in out
