"""``crossent quiz``: piped answers, an answers file, and a real pseudo-terminal (pexpect)."""

from __future__ import annotations

import math
import os
import re
import sys

import pexpect
import pytest

from crossent.cli import app

Q4 = math.log(1 / 0.7)  # the article's quiz 4 in nats (bits: log2(1/0.7))
CONCEPTUAL = "a free-text answer\n"


def generated_answers(out: str) -> list[float]:
    """The generated questions' answers, computed with math from the question text."""
    out = " ".join(out.split())  # undo the console's line wrapping
    m = re.search(r"predicts \[([^\]]*)\] for an example of class (\d+)", out)
    assert m, out
    probs = [float(v) for v in m.group(1).split(",")]
    multiclass = -math.log(probs[int(m.group(2))])
    b = re.search(r"gives q0 = ([\d.]+) for an image that (is|is not) a cat", out)
    assert b, out
    q0 = float(b.group(1))
    binary = -math.log(q0) if b.group(2) == "is" else -math.log(1 - q0)
    return [multiclass, binary]


def test_piped_answers_all_right(runner):
    first = runner.invoke(app, ["quiz", "--seed", "7"], input="")
    assert first.exit_code == 0
    answers = CONCEPTUAL * 3 + f"{Q4:.4f}\n" + CONCEPTUAL
    probe = runner.invoke(app, ["quiz", "--seed", "7"], input=answers + "0\n0\n")
    multiclass, binary = generated_answers(probe.stdout)
    result = runner.invoke(app, ["quiz", "--seed", "7"],
                           input=answers + f"{multiclass:.4f}\n{binary / math.log(2):.4f}\n")
    assert result.exit_code == 0, result.output
    assert result.stdout.count("Correct!") == 3
    assert result.stdout.count("Model answer:") == 4
    assert "Quiz complete. Score: 3/3 numeric answers correct" in result.stdout
    flat = " ".join(result.stdout.split())
    assert f"= ln(1/0.7) = {Q4:.6f} nats ({math.log2(1 / 0.7):.6f} bits)" in flat


def test_same_seed_same_questions(runner):
    a = runner.invoke(app, ["quiz", "--seed", "11"], input="").stdout
    b = runner.invoke(app, ["quiz", "--seed", "11"], input="").stdout
    assert a == b


def test_answers_file_wrong_q4_shows_working(runner, tmp_path):
    path = tmp_path / "answers.txt"
    path.write_text(CONCEPTUAL * 3 + "0.9\n")
    result = runner.invoke(app, ["quiz", "--seed", "1", "--answers", str(path)])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "your answer> 0.9" in out and "Not quite" in out
    assert f"the answer is {Q4:.6f} nats" in out
    assert "ln(1/0.7)" in out
    assert "Quiz ended (end of input). Score: 0/1 numeric answers correct" in out


def test_not_a_number_counts_as_wrong(runner):
    result = runner.invoke(app, ["quiz", "--seed", "1"], input=CONCEPTUAL * 3 + "abc\n")
    assert "'abc' is not a number" in result.stdout
    assert "Score: 0/1" in result.stdout


def spawn_quiz(seed: int) -> pexpect.spawn:
    env = {**os.environ, "TERM": "dumb", "NO_COLOR": "1", "COLUMNS": "200"}
    child = pexpect.spawn(sys.executable, ["-m", "crossent.cli", "quiz", "--seed", str(seed)],
                          env=env, encoding="utf-8", timeout=60, dimensions=(50, 200))
    for _ in range(3):
        child.expect_exact("your answer> ")
        child.sendline("entropy is expected surprise")
        child.expect_exact("Model answer:")
    child.expect_exact("Question 4/7.")
    child.expect_exact("your answer> ")
    return child


@pytest.mark.parametrize(("answer", "verdict", "score"), [
    (f"{Q4:.3f}", "Correct!", "1/1"),
    (f"{math.log2(1 / 0.7):.3f}", "Correct!", "1/1"),  # bits are accepted too
    ("1.5", "Not quite", "0/1"),
])
def test_pty_question_4_then_ctrl_d(answer, verdict, score):
    child = spawn_quiz(3)
    child.sendline(answer)
    child.expect_exact(verdict)
    child.expect_exact("Working: c = 1·ln(1/0.7)")
    child.expect_exact("your answer> ")  # question 5
    child.sendeof()
    child.expect_exact(f"Quiz ended (end of input). Score: {score} numeric answers correct")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert "Traceback" not in child.before


def test_pty_ctrl_c_ends_with_score():
    child = spawn_quiz(4)
    child.sendline(f"{Q4:.4f}")
    child.expect_exact("Correct!")
    child.expect_exact("your answer> ")
    child.sendintr()
    child.expect_exact("Quiz interrupted. Score: 1/1 numeric answers correct")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 130
    assert "Traceback" not in child.before
