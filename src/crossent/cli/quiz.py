"""``crossent quiz``: the article's five questions, plus numeric ones generated from a seed.

Numeric answers are checked against the library's value (nats, or bits) within
:data:`TOLERANCE`, and the working is shown; conceptual questions show a model answer after
the user's. Answers come from the keyboard, a pipe or ``--answers FILE`` (one per line).
End of input (Ctrl-D) or Ctrl-C ends the quiz with the score so far.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.markup import escape

from ..errors import InputError
from ..teaching import article as art
from ..teaching import curves
from .common import BITS, NATS, fmt, short, vector

TOLERANCE = 0.005
"""How far a numeric answer may be from the exact value (in the unit it was given in)."""

MAX_ANSWERS_BYTES = 1 << 20
"""The most an answers file may hold (1 MiB): ``--answers /dev/zero`` must not read forever."""


@dataclass(frozen=True)
class Question:
    text: str
    model: str = ""  # a conceptual question's model answer
    nats: float | None = None  # a numeric question's answer
    bits: float | None = None
    working: str = ""


CONCEPTUAL = {
    1: ("What is entropy? What is cross-entropy? How are they related?",
        "Entropy H(p) = -sum_i p_i log p_i is the expected surprise of an event whose outcomes "
        "have probabilities p. Cross-entropy H(p, q) = -sum_i p_i log q_i is the expected "
        "surprise when outcomes happen with p but are scored with the belief q. "
        "H(p, q) >= H(p), with equality only when q = p; the gap is the KL divergence "
        "KL(p || q)."),
    2: ("In which areas/models is the cross-entropy loss widely used, and why?",
        "In classification: multi-class (softmax + cross-entropy, e.g. image recognition), "
        "binary (binary cross-entropy) and multi-label (a sum of per-label binary "
        "cross-entropies). It punishes confident mistakes steeply (-log q -> infinity as "
        "q -> 0) and, with softmax, its gradient softmax(a) - b is simple and well behaved."),
    3: ("What are the mathematical properties of the cross-entropy loss, and how do they "
        "help training?",
        "It is >= 0 and 0 only when the true class gets probability 1; it grows "
        "logarithmically to +infinity as that probability goes to 0 (unlike 1 - q, which is "
        "stuck in [0, 1]), so confident mistakes cost a lot; its gradient with respect to the "
        "logits is softmax(a) - b, linear in the softmax output and bounded, so training is "
        "smooth; it accepts soft targets (label smoothing, Mixup)."),
    5: ("How is the multi-label cross-entropy computed, and how does it differ from the "
        "multi-class, single-label case?",
        "Each label is an independent yes/no with its own sigmoid probability; the loss is "
        "the SUM over labels of each label's binary cross-entropy t log(1/q) + (1 - t) "
        "log(1/(1 - q)). Multi-class single-label uses one softmax over all classes (the "
        "probabilities sum to 1) and only the true class's -log q counts."),
}


def _multiclass(probs: list[float], target: int, text: str) -> Question:
    nat = curves.multiclass_breakdown(probs=probs, target=target, base=NATS.base)
    bit = curves.multiclass_breakdown(probs=probs, target=target, base=BITS.base)
    pairs = zip(nat.target, probs, strict=True)
    terms = " + ".join(f"{short(t)}·ln(1/{short(q)})" for t, q in pairs)
    working = (f"c = {terms} = ln(1/{short(probs[target])}) = {fmt(nat.loss)} nats "
               f"({fmt(bit.loss)} bits)")
    return Question(text, nats=nat.loss, bits=bit.loss, working=working)


def _binary(q0: float, p0: float, text: str) -> Question:
    nat = curves.label_breakdown(probs=[q0], target=[p0], base=NATS.base)
    bit = curves.label_breakdown(probs=[q0], target=[p0], base=BITS.base)
    working = (f"c = {short(p0)}·ln(1/{short(q0)}) + {short(1 - p0)}·ln(1/{short(1 - q0)})"
               f" = {fmt(nat.loss)} nats ({fmt(bit.loss)} bits)")
    return Question(text, nats=nat.loss, bits=bit.loss, working=working)


def questions(seed: int) -> list[Question]:
    """The article's five questions, then two numeric ones drawn from ``seed``."""
    out = [Question(*CONCEPTUAL[i]) for i in (1, 2, 3)]
    q4 = list(art.QUIZ_PREDICTION)
    out.append(_multiclass(q4, 0, "Compute the cross-entropy loss of the prediction "
                           f"{vector(q4)} for the target {vector(art.QUIZ_TARGET)}."))
    out.append(Question(*CONCEPTUAL[5]))
    rng = np.random.default_rng(seed)
    k = int(rng.integers(3, 6))
    probs = [float(c) / 100 for c in rng.multinomial(100 - k, [1 / k] * k) + 1]
    target = int(rng.integers(k))
    out.append(_multiclass(probs, target, f"A classifier predicts {vector(probs)} for an "
                           f"example of class {target} (classes counted from 0). What is "
                           f"its cross-entropy loss?"))
    q0, p0 = float(rng.integers(5, 96)) / 100, float(rng.integers(0, 2))
    is_cat = "is a cat (p0 = 1)" if p0 else "is not a cat (p0 = 0)"
    out.append(_binary(q0, p0, f"A cat detector gives q0 = {short(q0)} for an image that "
                       f"{is_cat}. What is its binary cross-entropy?"))
    return out


_ANSWER = re.compile(r"^(\S+?)\s*(nats?|bits?)?$", re.IGNORECASE)


def _parse(answer: str) -> tuple[float | None, str | None]:
    """``(number, unit)`` of an answer as the tour page reads it: an optional ``nats`` /
    ``bits`` after the number (then only that unit is checked) and a decimal comma
    (``0,357``); ``(None, None)`` for anything else (review H96-1: "0.357 nats" was "not
    a number" here while the page took it)."""
    match = _ANSWER.match(answer.strip())
    if match is None or "_" in match[1]:  # float() takes 0.3_5; the page does not
        return None, None
    number = re.sub(r"^([-+]?\d*),(\d+)$", r"\1.\2", match[1])
    unit = match[2].lower().rstrip("s") + "s" if match[2] else None
    try:
        return float(number), unit
    except ValueError:
        return None, None


def _numeric(q: Question, answer: str, con: Console) -> bool:
    given, unit = _parse(answer)
    values = {"nats": q.nats, "bits": q.bits}
    ok = given is not None and any(
        abs(given - v) <= TOLERANCE for u, v in values.items()
        if v is not None and unit in (None, u)
    )
    if given is None:
        con.print(f"[red]{escape(repr(answer.strip()))} is not a number.[/]")
    con.print("[green]Correct![/]" if ok else
              f"[red]Not quite[/]: the answer is {fmt(q.nats or 0.0)} nats "
              f"({fmt(q.bits or 0.0)} bits).")
    con.print(f"Working: {escape(q.working)}")
    return ok


def run(seed: int, con: Console, read: Callable[[str], str]) -> int:
    """Ask every question; return the exit code (0, or 130 after Ctrl-C)."""
    qs = questions(seed)
    numeric = [q for q in qs if q.nats is not None]
    con.print(f"[bold]crossent quiz[/] (seed {seed}): {len(qs)} questions. Numeric answers "
              f"in nats (bits accepted), within {TOLERANCE}.")
    right = asked = 0
    code = 0
    try:
        for i, q in enumerate(qs, 1):
            con.print(f"\n[bold]Question {i}/{len(qs)}.[/] {escape(q.text)}")
            answer = read("your answer> ")
            if q.nats is None:
                con.print(f"Model answer: {escape(q.model)}")
                continue
            asked += 1
            right += _numeric(q, answer, con)
        end = "Quiz complete."
    except EOFError:
        end = "Quiz ended (end of input)."
    except KeyboardInterrupt:
        end, code = "Quiz interrupted.", 130
    con.print(f"\n{end} Score: {right}/{asked} numeric answers correct "
              f"({len(numeric)} numeric questions in all).")
    return code


def file_reader(lines: Iterator[str], con: Console) -> Callable[[str], str]:
    """A reader that takes answers from ``lines`` and echoes them after the prompt."""
    def read(prompt: str) -> str:
        try:
            line = next(lines).rstrip("\n")
        except StopIteration:
            raise EOFError from None
        con.print(f"{prompt}{escape(line)}")
        return line
    return read


MAX_ANSWER_CHARS = 10_000
"""The longest answer read from a pipe: ``crossent quiz < /dev/zero`` must not read forever."""


def stdin_reader(con: Console) -> Callable[[str], str]:
    """``input()`` on a terminal; from a pipe, one line of at most :data:`MAX_ANSWER_CHARS`
    characters, echoed after the prompt (a terminal echoes it)."""
    def read(prompt: str) -> str:
        try:
            return read_decoded(prompt)
        except UnicodeDecodeError as error:  # a strict stdin encoding (a UTF-8 locale)
            raise InputError(f"standard input: an answer is not {error.encoding} text "
                             f"(byte {error.object[error.start:error.start + 1]!r}); give "
                             f"one answer per line") from None

    def read_decoded(prompt: str) -> str:
        if sys.stdin.isatty():
            return input(prompt)
        sys.stdout.write(prompt)
        sys.stdout.flush()
        line = sys.stdin.readline(MAX_ANSWER_CHARS + 1)
        if not line:
            raise EOFError
        if len(line) > MAX_ANSWER_CHARS:
            raise InputError(f"standard input: an answer longer than {MAX_ANSWER_CHARS} "
                             "characters; give one short answer per line")
        line = line.rstrip("\n")
        con.print(escape(line))
        return line
    return read


def read_answers(path: Path | str, option: str) -> list[str]:
    """The lines of the answers file ``path`` (UTF-8, at most :data:`MAX_ANSWERS_BYTES`);
    an :class:`InputError` naming ``option`` when it is empty, cannot be read, is larger, or
    is not UTF-8 text."""
    if not str(path):
        raise InputError(f"{option}: the path is empty")
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_ANSWERS_BYTES + 1)
    except OSError as e:
        raise InputError(f"{option}: cannot read {str(path)!r}: {e.strerror or e}") from None
    if len(data) > MAX_ANSWERS_BYTES:
        raise InputError(f"{option}: {str(path)!r} holds more than {MAX_ANSWERS_BYTES >> 20} "
                         "MiB; give one short answer per line")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{option}: {str(path)!r} is not UTF-8 text (byte "
                         f"0x{data[e.start]:02x} at offset {e.start})") from None
    return text.splitlines()
