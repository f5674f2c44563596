"""The README's training-loop examples run as a user types them and check what they claim.

``examples/loop_pytorch.py`` (gradient accumulation with ``global_num_items``),
``examples/loop_ddp.py`` and ``examples/loop_tensor_parallel.py`` (``torchrun``, 2 gloo ranks)
compare crossent's accumulated or vocab-parallel gradient with one process's full batch and
print the largest difference. Each must exit 0 and print a difference at float32 rounding
(far below what the mean of micro-batch means gives, PITFALLS 11: 5.3e-4 in
``loop_pytorch.py``, whose prompts are of uneven lengths), and the
README's table must quote each script's output line as the script prints it (its numbers as
this machine's, review H98-2: three lines had gone stale, unnoticed, since no test ran them).
The three run at once: they are separate processes.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# README command -> the pattern of the line the script prints (its numbers in groups)
NUM = r"([0-9.]+(?:e-?[0-9]+)?)"
EXAMPLES = {
    "python examples/loop_pytorch.py": rf"max \|accumulated - full\| grad: {NUM}",
    "torchrun --nproc-per-node 2 examples/loop_ddp.py":
        rf"max \|DDP accumulated - full batch\| grad: {NUM}",
    "torchrun --nproc-per-node 2 examples/loop_tensor_parallel.py":
        rf"rank 0: loss {NUM}, single process {NUM}, max \|grad diff\| {NUM}",
}


def _readme_output(command: str) -> str:
    """The README table cell quoting ``command``'s output (its last backticked cell)."""
    for line in (ROOT / "README.md").read_text(encoding="utf-8").splitlines():
        if line.startswith(f"| `{command}` |"):
            return re.findall(r"`([^`]*)`", line.replace("\\|", "|"))[-1]
    raise AssertionError(f"README.md has no table row for `{command}`")


@pytest.fixture(scope="module")
def outputs() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    procs = {}
    for command in EXAMPLES:
        argv = command.split()
        if argv[0] == "torchrun":  # the console script of this interpreter's torch
            argv = [sys.executable, "-m", "torch.distributed.run", *argv[1:]]
        else:
            argv[0] = sys.executable
        procs[command] = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True)
    seen = {}
    for command, proc in procs.items():
        try:
            out, err = proc.communicate(timeout=180)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        assert proc.returncode == 0, (command, err[-3000:])
        seen[command] = out
    return seen


@pytest.mark.parametrize("command", list(EXAMPLES))
def test_example_matches_the_full_batch(outputs, command):
    found = re.search(EXAMPLES[command], outputs[command])
    assert found, (command, outputs[command])
    numbers = [float(g) for g in found.groups()]
    assert numbers[-1] < 1e-7, (command, found.group(0))  # float32 rounding, not 5e-4
    if len(numbers) == 3:  # the vocab-parallel loss and the single process's, 6 decimals
        assert abs(numbers[0] - numbers[1]) <= 2e-6, found.group(0)


@pytest.mark.parametrize("command", list(EXAMPLES))
def test_readme_quotes_the_examples_output(outputs, command):
    """The quoted line is the script's line; its numbers are this machine's (another CPU's
    kernels may round the last digit differently), so they are compared as the script's are
    checked: a float32-rounding difference, and the losses to 6 decimals."""
    quoted = re.fullmatch(EXAMPLES[command], _readme_output(command))
    printed = re.search(EXAMPLES[command], outputs[command])
    assert quoted and printed, (_readme_output(command), outputs[command])
    ours, theirs = map(float, quoted.groups()), map(float, printed.groups())
    for q, p in zip(ours, theirs, strict=True):
        assert (q < 1e-7 and p < 1e-7) or abs(q - p) <= 2e-6, (quoted.group(0), printed.group(0))
