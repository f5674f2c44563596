"""crossent.cli.app: the command tree, and one clean stderr line for every bad input."""

from __future__ import annotations

import math
import subprocess
import sys
from importlib.metadata import entry_points, requires

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crossent.cli import app


def test_help_lists_every_command(runner):
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("tour", "explain", "quiz", "plot"):
        assert command in result.stdout


def test_no_arguments_shows_help_once(runner):
    result = runner.invoke(app, [])
    assert result.exit_code == 0
    assert "tour" in result.stdout
    assert result.stdout.count("Usage: crossent [OPTIONS] COMMAND") == 1
    assert result.stdout == runner.invoke(app, ["--help"]).stdout


def test_version(runner):
    from importlib.metadata import version

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout == f"crossent {version('crossent')}\n"


COMMANDS = ["tour", "explain", "quiz", "plot", "train", "bench"]


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_has_plain_help(runner, command):
    """Flags read as flags (no "<bool>"), no reStructuredText, every line fits 80 columns."""
    result = runner.invoke(app, [command, "--help"], terminal_width=80)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"Usage: crossent {command} [OPTIONS]")
    assert "<bool>" not in result.stdout and "``" not in result.stdout
    assert max(len(line) for line in result.stdout.splitlines()) <= 80
    assert result.stdout.isascii()


def test_command_list_is_not_cut(runner):
    """Each command's one-line summary is whole (click shortens long ones with "...")."""
    out = runner.invoke(app, ["--help"], terminal_width=80).stdout
    listed = out[out.index("Commands:"):].splitlines()[1:]
    assert [line.split()[0] for line in listed] == COMMANDS
    assert not any(line.endswith("...") for line in listed)


BAD = [
    (["explain", "--probs", "0.5,0.6", "--target", "0"], "sum to 1"),
    (["explain", "--probs", "0.1,0.2,0.7", "--target", "7"], "out of range for 3 classes"),
    (["explain", "--logits", "1.2,0.3,2.0", "--target", "3"], "out of range for 3 classes"),
    (["explain", "--probs", "a,b,c", "--target", "0"], "'a' is not a number"),
    (["explain", "--probs", "0.1,0.9", "--target", "x"], "'x' is not a number"),
    (["explain", "--probs", "", "--target", "0"], "--probs is empty"),
    (["explain", "--probs", "0.1,0.9"], "Missing option '--target'"),
    (["explain", "--probs", "0.1,0.9", "--target", ""], "--target is empty"),
    (["explain", "--target", "0"], "exactly one of --probs and --logits"),
    (["explain", "--probs", "1.5,-0.5", "--target", "0"], "probabilities in [0, 1]"),
    (["explain", "--probs", "0.3,0.7", "--target", "1", "--label-smoothing", "2"],
     "label_smoothing"),
    (["explain", "--probs", "0.3,0.7", "--target", "1", "--binary"], "one probability"),
    (["explain", "--probs", "0.3,0.7", "--target", "1", "--base", "3"], "--base"),
    (["plot", "nonsense", "--out", "x.png"], "unknown plot 'nonsense'"),
    (["plot", "log-loss", "--out", "x.pdf"], ".png or .svg"),
    (["plot", "log-loss"], "--out"),
    (["quiz", "--answers", "/nonexistent/answers.txt"], "cannot read"),
    (["frobnicate"], "No such command"),
    (["tour", "--bogus"], "No such option"),
]


@pytest.mark.parametrize(("args", "needle"), BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_one_stderr_line_exit_2(runner, args, needle, tmp_path):
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert needle in lines[0]
    assert "Traceback" not in result.output
    assert result.stdout == ""


def test_bad_input_in_a_real_process():
    cmd = [sys.executable, "-m", "crossent.cli", "explain", "--probs", "0.5,0.6", "--target", "0"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2
    assert done.stderr.strip() == "crossent explain: error: probs must sum to 1 (they sum to 1.1)"
    assert done.stdout == ""


def test_console_script_and_cli_extra_are_declared():
    (script,) = entry_points(group="console_scripts", name="crossent")
    assert script.value == "crossent.cli:main"
    cli_extra = {r.split(">")[0] for r in requires("crossent") or [] if "extra == \"cli\"" in r}
    assert {"typer", "rich", "matplotlib"} <= cli_extra


def test_core_import_does_not_import_the_cli_extra():
    code = ("import sys, crossent, crossent.teaching.curves; "
            "print(sorted(m for m in ('typer', 'rich', 'matplotlib') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=True)
    assert done.stdout.strip() == "[]"


def test_python_m_crossent_still_prints_the_core_table():
    done = subprocess.run([sys.executable, "-m", "crossent"], capture_output=True, text=True,
                          timeout=120, check=True)
    assert f"{math.log2(1 / 0.001):.6f}" in done.stdout


@settings(max_examples=60, deadline=None)
@given(probs=st.text(max_size=20), target=st.text(max_size=6))
def test_any_text_gives_a_table_or_one_error_line(probs, target):
    from typer.testing import CliRunner

    result = CliRunner().invoke(app, ["explain", f"--probs={probs}", f"--target={target}"])
    assert result.exit_code in (0, 2), result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    if result.exit_code == 2:
        assert len(result.stderr.strip().splitlines()) == 1
