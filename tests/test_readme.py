"""The README's usage example runs as written, and its commented numbers are what it computes."""

from __future__ import annotations

import math
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def usage_block() -> str:
    text = README.read_text(encoding="utf-8")
    section = text.split("## Usage", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_usage_example_runs():
    exec(compile(usage_block(), str(README), "exec"), {})


def test_readme_usage_comments_state_the_numbers_the_lines_compute():
    namespace: dict = {}
    checked = 0
    for line in usage_block().splitlines():
        code, _, comment = line.partition("#")
        number = re.match(r"\s*(-?\d+\.\d+) bits", comment)
        if number and code.strip():
            value = float(eval(code.strip(), {"xe": __import__("crossent")}, namespace))
            assert math.isclose(value, float(number.group(1)), abs_tol=5e-7), line
            checked += 1
    assert checked >= 4


def test_readme_performance_example_runs():
    section = README.read_text(encoding="utf-8").split("## Performance", 1)[1]
    block = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    exec(compile(block, str(README), "exec"), namespace)
    assert namespace["hidden"].grad.shape == (64, 128)
    assert namespace["head"].weight.grad.shape == (5000, 128)
