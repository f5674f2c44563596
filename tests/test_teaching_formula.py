"""crossent.teaching.formula: the tour's text formulas typeset as MathML."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

import pytest

from crossent import InputError
from crossent.teaching.content import UNITS
from crossent.teaching.formula import mathml, numbers, parse, plain, split_prose
from crossent.teaching.tour import build_tour

NS = "{http://www.w3.org/1998/Math/MathML}"


def tree(text: str) -> list[ET.Element]:
    """The ``<math>`` elements of ``text``'s MathML, parsed as XML (so it is well formed)."""
    html = mathml(text)
    assert "</math> <math>" not in html  # pieces join with <wbr>: a break, but no space
    doc = ET.fromstring(f'<root xmlns="{NS[1:-1]}">{html}</root>'
                        .replace("&#x2061;", "\u2061").replace("<wbr>", ""))
    return list(doc.iter(f"{NS}math"))


def flat(text: str) -> str:
    """The characters of the MathML in reading order (what a reader sees)."""
    return "".join("".join(m.itertext()) for m in tree(text))


def every_formula(unit: str) -> list[str]:
    tour = build_tour(UNITS[unit])
    out = []
    for s in tour.sections:
        out += [w.formula for w in s.worked] + [w.substituted for w in s.worked]
        out += [p for para in s.text for is_formula, p in split_prose(para) if is_formula]
    return out


@pytest.mark.parametrize("unit", list(UNITS))
def test_every_formula_of_the_tour_is_well_formed_mathml_with_its_numbers(unit):
    formulas = every_formula(unit)
    assert len(formulas) > 40
    for text in formulas:
        maths = tree(text)
        assert maths, text
        shown = [e.text for m in maths for e in m.iter(f"{NS}mn")]
        log_bases = [e.text for m in maths for e in m.iter(f"{NS}msub")
                     if e[0].text == "log" for e in [e[1]]]
        for b in log_bases:
            shown.remove(b)
        for _, index in re.findall(r"\b([a-z])(\d+)\b", text):  # q0, p0: subscripts
            shown.remove(index)
        assert shown == numbers(text), text


def test_structures():
    log2 = tree("s = log2(1/0.001)")[1]
    sub = log2.find(f".//{NS}msub")
    assert [e.text for e in sub] == ["log", "2"]
    frac = log2.find(f".//{NS}mfrac")
    assert [e.text for e in frac] == ["1", "0.001"]
    total = tree("e = sum_i p_i log(1/p_i)")[1].find(f".//{NS}munder")
    assert [e.text for e in total] == ["∑", "i"]
    # log(1/q) is typeset log 1/q, as in print: brackets that cannot stretch around a
    # fraction without an OpenType MATH font (phones) are not drawn; a denominator loses its own
    assert flat("c = p0 log(1/q0) + (1 - p0) log(1/(1 - q0))") == \
        "c=p0log\u20611q0+(1−p0)log\u206111−q0"
    assert flat("log2(1 + q)") == "log2(1+q)" and flat("log(a, b)") == "log(a,b)"
    assert not tree("s = log2(1/0.001)")[1].findall(f".//{NS}mo[.='(']")
    assert flat("c = sum_i ((1 - alpha) p_i + alpha/C) log(1/q_i)").count("α") == 2
    assert flat("KL(p || q) >= 0") == "KL(p∥q)≥0"
    assert flat("-log q_true") == "−log\u2061qtrue"
    assert flat("(1 - q)^2") == "(1−q)2"
    assert flat("cross_entropy(softmax(a), b)") == "cross_entropy(softmax(a),b)"


def test_a_long_formula_breaks_between_terms_only():
    text = "e = 0.2·log2(1/0.2) + 0.3·log2(1/0.3) + 0.5·log2(1/0.5) = 0.464386 + 0.521090"
    pieces = ["".join(m.itertext()) for m in tree(text)]
    assert pieces == ["e=", "0.2·log2\u206110.2+", "0.3·log2\u206110.3+", "0.5·log2\u206110.5=",
                      "0.464386+", "0.521090"]
    inside = tree("c = sum_j [t_j log(1/q_j) + (1 - t_j) log(1/(1 - q_j))]")
    assert len(inside) == 2  # never inside brackets
    assert len(tree("softmax(a) = [0.1, 0.9]; c = log2(1/0.1)")) == 4


@pytest.mark.parametrize("bad", ["c = (1", "c = 1 +", "c = ]", "c = 1 $ 2", "log(", "a = = b"])
def test_bad_formulas_raise_input_error(bad):
    with pytest.raises(InputError, match="formula"):
        parse(bad)


def test_prose_with_formulas():
    assert split_prose("a `x = 1` b") == [(False, "a "), (True, "x = 1"), (False, " b")]
    assert plain("a `x = 1` b") == "a x = 1 b"
    with pytest.raises(InputError, match="unmatched backtick"):
        split_prose("a `x = 1 b")
