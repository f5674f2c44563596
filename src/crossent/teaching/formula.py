"""Formulas written once as plain text, shown as text in a terminal and as MathML on a page.

The tour writes every formula the way a terminal shows it (``c = sum_i p_i log2(1/q_i)``);
:func:`mathml` parses that text and typesets it as MathML, which browsers render natively
(no script, no network). The grammar is the small one the tour uses:

- numbers (``0.7``, ``1e-4``), names with an optional subscript (``p_i``, ``q0``, ``t_j``),
  Greek letters by name (``alpha``), applications ``softmax(a)``, ``H(p, q)``, ``softmax(a)_0``;
- ``log``, ``log2``, ``ln``, ``log10`` applied to a bracketed argument or to the next factor;
- ``sum_i BODY`` (the body is the product that follows), ``a/b`` as a fraction, ``x^2``;
- ``+``, ``-``, ``·`` (or juxtaposition), ``=``, ``>=``, ``||``, brackets ``( )`` and
  vectors ``[a, b]``; ``;`` separates two formulas.

A long formula is cut into pieces at its top-level ``=``, ``+`` and ``-`` so that a narrow
screen wraps it between terms (MathML itself never breaks a line).

>>> print(mathml("s = log2(1/0.001)").replace("><", ">\\n<"))
<math>
<mi>s</mi>
<mo>=</mo>
</math>
<wbr>
<math>
<mrow>
<msub>
<mi>log</mi>
<mn>2</mn>
</msub>
<mo>&#x2061;</mo>
<mspace width="0.17em">
</mspace>
<mfrac>
<mn>1</mn>
<mn>0.001</mn>
</mfrac>
</mrow>
</math>
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from html import escape

from ..errors import InputError


def fmt(x: float) -> str:
    """A computed number as the tour prints it: 6 decimals (the article's precision);
    ``-0.0`` prints as 0, as the CLI's numbers do."""
    return f"{float(x) + 0.0:.6f}"  # -0.0 + 0.0 is 0.0


def short(x: float) -> str:
    """A number as typed in a formula: 0.7, 0.001, 1."""
    return f"{float(x):g}"


def vector(values: object) -> str:
    """``[0.1, 0.2, 0.7]``, each entry with :func:`short`."""
    return "[" + ", ".join(short(v) for v in values) + "]"  # type: ignore[attr-defined]


# --------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------

TOKEN = re.compile(r"""
    (?P<num>\d+(?:\.\d+)?(?:e[-+]?\d+)?)
  | (?P<name>[A-Za-z]+(?:_[A-Za-z]{2,})*\d*)
  | (?P<op>>=|<=|\|\||[-+=·/^_(),\[\];<>])
  | (?P<space>\s+)
""", re.X)
LOGS = {"log": None, "log2": "2", "ln": None, "log10": "10"}
GREEK = {"alpha": "α", "epsilon": "ε", "lambda": "λ", "mu": "μ", "sigma": "σ"}
OPS = {"-": "−", "·": "·", ">=": "≥", "<=": "≤", "||": "∥"}


@dataclass(frozen=True)
class Node:
    kind: str  # num, name, sub, sup, call, log, frac, sum, group, vector, neg, op, row
    text: str = ""
    parts: tuple[Node, ...] = ()


def _tokens(text: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    while pos < len(text):
        m = TOKEN.match(text, pos)
        if m is None:
            raise InputError(f"formula {text!r}: cannot read {text[pos:pos + 10]!r}")
        pos = m.end()
        if m.lastgroup != "space":
            out.append((m.lastgroup or "", m.group()))
    return out


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.toks = _tokens(text)
        self.i = 0

    def peek(self) -> tuple[str, str]:
        return self.toks[self.i] if self.i < len(self.toks) else ("end", "")

    def take(self, want: str | None = None) -> str:
        kind, value = self.peek()
        if kind == "end" or (want is not None and value != want):
            raise InputError(f"formula {self.text!r}: expected {want or 'more'} at token "
                             f"{self.i} ({value!r})")
        self.i += 1
        return value

    def formula(self) -> Node:
        """relation := sum (('=' | '>=' | '<=') sum)*, read to the end."""
        items = [self.additive()]
        while self.peek()[1] in ("=", ">=", "<="):
            items += [Node("op", self.take()), self.additive()]
        if self.peek()[0] != "end":
            raise InputError(f"formula {self.text!r}: unexpected {self.peek()[1]!r}")
        return Node("row", parts=tuple(items))

    def additive(self) -> Node:
        items = [self.product()]
        while self.peek()[1] in ("+", "-", "||"):
            items += [Node("op", self.take()), self.product()]
        return items[0] if len(items) == 1 else Node("row", parts=tuple(items))

    def _starts_factor(self) -> bool:
        kind, value = self.peek()
        return kind in ("num", "name") or value in ("(", "[")

    def product(self) -> Node:
        if self.peek()[1] == "-":
            self.take()
            return Node("neg", parts=(self.product(),))
        items = [self.fraction()]
        while self.peek()[1] == "·" or self._starts_factor():
            if self.peek()[1] == "·":
                items.append(Node("op", self.take()))
            items.append(self.fraction())
        return items[0] if len(items) == 1 else Node("row", parts=tuple(items))

    def fraction(self) -> Node:
        node = self.postfix()
        while self.peek()[1] == "/":
            self.take()
            node = Node("frac", parts=(node, self.postfix()))
        return node

    def postfix(self) -> Node:
        node = self.atom()
        while self.peek()[1] in ("_", "^"):
            if self.take() == "_":
                node = Node("sub", parts=(node, self.atom()))
            else:  # right-associative, as Python's **: a^b^c is a^(b^c)
                return Node("sup", parts=(node, self.postfix()))
        return node

    def atom(self) -> Node:
        kind, value = self.peek()
        if kind == "num":
            return Node("num", self.take())
        if value in ("(", "["):
            return self._bracket()
        if kind != "name":
            raise InputError(f"formula {self.text!r}: unexpected {value!r}")
        name = self.take()
        if name == "sum" and self.peek()[1] == "_":
            self.take()
            if self.peek()[0] not in ("name", "num"):
                raise InputError(f"formula {self.text!r}: a sum's index must be a name or a "
                                 f"number, not {self.peek()[1]!r}")
            return Node("sum", self.take(), (self.product(),))
        if name.startswith("sum_"):  # sum_ij: one name token, as q_true is
            return Node("sum", name[4:], (self.product(),))
        if name in LOGS:
            arg = self._bracket() if self.peek()[1] == "(" else self.postfix()
            return Node("log", name, (arg,))
        if self.peek()[1] == "(":
            return Node("call", name, (self._bracket(),))
        return Node("name", name)

    def _bracket(self) -> Node:
        opening = self.take()
        closing = ")" if opening == "(" else "]"
        items = [self.additive_relation()]
        while self.peek()[1] == ",":
            self.take()
            items.append(self.additive_relation())
        self.take(closing)
        return Node("group" if opening == "(" else "vector", opening, tuple(items))

    def additive_relation(self) -> Node:
        items = [self.additive()]
        while self.peek()[1] in ("=", ">=", "<="):
            items += [Node("op", self.take()), self.additive()]
        return items[0] if len(items) == 1 else Node("row", parts=tuple(items))


def parse(text: str) -> list[Node]:
    """The formulas in ``text`` (separated by ``;``), each a tree of :class:`Node`."""
    with _not_too_deep(text):
        return [_Parser(part.strip()).formula() for part in text.split(";") if part.strip()]


@contextlib.contextmanager
def _not_too_deep(text: str) -> Iterator[None]:
    """A formula nested beyond Python's recursion limit (hundreds of brackets or signs) is
    refused naming it, not left to a raw ``RecursionError``."""
    try:
        yield
    except RecursionError:
        raise InputError(f"formula {text[:40]!r}...: nested too deeply to typeset") from None


# --------------------------------------------------------------------------------------------
# MathML
# --------------------------------------------------------------------------------------------


def _name(name: str) -> str:
    head, _, tail = name.partition("_")
    if tail and len(head) == 1:  # q_true -> q with subscript "true"
        return f"<msub>{_name(head)}{_name(tail)}</msub>"
    m = re.fullmatch(r"([A-Za-z]+?)(\d+)", name)
    if m and name not in LOGS:  # q0 -> q with subscript 0
        return f"<msub>{_name(m.group(1))}<mn>{m.group(2)}</mn></msub>"
    return f"<mi>{escape(GREEK.get(name, name))}</mi>"


def _fenced(opening: str, inner: str, closing: str) -> str:
    return f"<mrow><mo>{opening}</mo>{inner}<mo>{closing}</mo></mrow>"


def _items(parts: tuple[Node, ...]) -> str:
    return "<mo>,</mo>".join(_ml(p) for p in parts)


def _ml(n: Node) -> str:
    if n.kind == "num":
        return f"<mn>{n.text}</mn>"
    if n.kind == "name":
        return _name(n.text)
    if n.kind == "op":
        return f"<mo>{escape(OPS.get(n.text, n.text))}</mo>"
    if n.kind == "row":
        return "<mrow>" + "".join(_ml(p) for p in n.parts) + "</mrow>"
    if n.kind == "neg":
        return f"<mrow><mo>−</mo>{_ml(n.parts[0])}</mrow>"
    if n.kind in ("sub", "sup"):
        return f"<m{n.kind}>{_ml(n.parts[0])}{_ml(n.parts[1])}</m{n.kind}>"
    if n.kind == "frac":
        num, den = (p.parts[0] if p.kind == "group" and len(p.parts) == 1 else p
                    for p in n.parts)
        return f"<mfrac>{_ml(num)}{_ml(den)}</mfrac>"
    if n.kind == "group":
        return _fenced("(", _items(n.parts), ")")
    if n.kind == "vector":
        return _fenced("[", _items(n.parts), "]")
    if n.kind == "call":
        return f"<mrow>{_name(n.text)}{_ml(n.parts[0])}</mrow>"
    if n.kind == "log":
        base = LOGS[n.text]
        head = (f"<msub><mi>log</mi><mn>{base}</mn></msub>" if base else f"<mi>{n.text}</mi>")
        arg = n.parts[0]
        if arg.kind == "group" and len(arg.parts) == 1 and arg.parts[0].kind == "frac":
            arg = arg.parts[0]  # log(1/q) is printed log 1/q: no brackets to stretch
        thin = '<mspace width="0.17em"></mspace>'  # log p: a thin space, as in print
        body = _ml(arg) if arg.kind == "group" else f"<mo>&#x2061;</mo>{thin}{_ml(arg)}"
        return f"<mrow>{head}{body}</mrow>"
    if n.kind == "sum":
        return (f"<mrow><munder><mo>∑</mo>{_name(n.text)}</munder>"
                f"{_ml(n.parts[0])}</mrow>")
    raise AssertionError(n.kind)  # pragma: no cover - the parser makes no other kind


def _pieces(tree: Node) -> list[list[Node]]:
    """The formula cut after each top-level ``=``, ``+`` and ``-`` (where a line may break)."""
    flat: list[Node] = []
    for part in tree.parts:
        is_sum = part.kind == "row" and any(p.kind == "op" and p.text in "+-"
                                            for p in part.parts)
        flat += list(part.parts) if is_sum else [part]
    pieces: list[list[Node]] = [[]]
    for node in flat:
        pieces[-1].append(node)
        if node.kind == "op" and node.text in ("=", "+", "-", ">=", "<="):
            pieces.append([])
    return [p for p in pieces if p]


def mathml(text: str, *, display: bool = False) -> str:
    """``text``'s formulas as MathML ``<math>`` elements, one per piece between which a line
    may break (pieces joined by ``<wbr>``, a break without a space; formulas by ``"; "``)."""
    attr = ' display="block"' if display else ""
    out = []
    for tree in parse(text):
        with _not_too_deep(text):
            out.append("<wbr>".join(f"<math{attr}>{''.join(_ml(n) for n in piece)}</math>"
                                for piece in _pieces(tree)))
    return '<span class="sep">; </span>'.join(out)


def numbers(text: str) -> list[str]:
    """Every number written in ``text`` (the MathML of ``text`` shows each as ``<mn>``)."""
    return [value for kind, value in _tokens(text) if kind == "num"]


# --------------------------------------------------------------------------------------------
# Paragraphs with formulas
# --------------------------------------------------------------------------------------------


def split_prose(paragraph: str) -> list[tuple[bool, str]]:
    """A paragraph whose formulas are quoted with backticks, as (is_formula, text) pieces.

    >>> split_prose("so `H(p) = 0` here")
    [(False, 'so '), (True, 'H(p) = 0'), (False, ' here')]
    """
    pieces = paragraph.split("`")
    if len(pieces) % 2 == 0:
        raise InputError(f"paragraph has an unmatched backtick: {paragraph[:60]!r}")
    return [(i % 2 == 1, p) for i, p in enumerate(pieces) if p]


def plain(paragraph: str) -> str:
    """The paragraph as a terminal shows it: formulas as typed, without the backticks."""
    return paragraph.replace("`", "")
