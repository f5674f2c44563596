"""Adversarial review of session 15's CLI changes: the ASCII ``integer``/``number`` parsers
on every numeric option, and the output files checked before the work (``check_files_in``).

tests/cli/test_cli_fuzz.py fuzzes argv and pins one mistyped number in three options; here
every numeric option gets every mistyped spelling, the defaults and the help text are pinned
against the values the options had before the change, and ``python -m crossent.torch.bench``
(documented as "the same options as crossent bench") is held to the same parsing. A bug is
a test written as it should pass, marked ``xfail(strict=True)`` with the cause.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from crossent.cli import app
from crossent.errors import InputError

pytestmark = pytest.mark.timeout(60)

INT_OPTIONS = [("train", "--epochs"), ("train", "--seed"), ("train", "--batch-size"),
               ("train", "--hidden"), ("quiz", "--seed"), ("bench", "--repeats"),
               ("bench", "--warmup"), ("bench", "--load")]
FLOAT_OPTIONS = [("train", "--lr"), ("explain", "--label-smoothing"), ("bench", "--bandwidth")]
MISTYPED = ["1_0", "\uff11", "\u0663", "\U0001d7d9"]
"""Underscore, full-width 1, Arabic-Indic 3, mathematical bold 1: all taken by int() and
float(), refused by crossent's ASCII rule."""


def one_line_exit_2(result, option: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.stderr, result.exception)
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    assert option in result.stderr, result.stderr


@pytest.fixture
def no_work(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """train and bench stop at their work: the calls are recorded, nothing is trained/timed."""
    from crossent.cli import train as train_mod
    from crossent.torch import bench as bench_mod

    calls: list[tuple[str, tuple, dict]] = []
    monkeypatch.setattr(train_mod, "run", lambda *a, **k: calls.append(("train", a, k)))
    monkeypatch.setattr(bench_mod, "run", lambda *a, **k: calls.append(("bench", a, k)))
    monkeypatch.chdir(tmp_path)
    return calls


@pytest.mark.parametrize("text", MISTYPED, ids=["underscore", "fullwidth", "arabic",
                                                "math-bold"])
@pytest.mark.parametrize(("command", "option"), INT_OPTIONS + FLOAT_OPTIONS,
                         ids=[f"{c}{o}" for c, o in INT_OPTIONS + FLOAT_OPTIONS])
def test_every_numeric_option_refuses_non_ascii_and_mistyped_numbers(
        no_work, command: str, option: str, text: str) -> None:
    result = CliRunner().invoke(app, [command, option, text])
    one_line_exit_2(result, option)
    assert no_work == []


@pytest.mark.parametrize(("command", "option", "low"), [
    ("train", "--epochs", "0"), ("train", "--seed", "-1"), ("train", "--batch-size", "0"),
    ("train", "--hidden", "0"), ("quiz", "--seed", "-1"), ("bench", "--repeats", "0"),
    ("bench", "--warmup", "-1"), ("bench", "--load", "-1")])
def test_the_ranges_are_the_old_ones(no_work, command: str, option: str, low: str) -> None:
    result = CliRunner().invoke(app, [command, option, low])
    one_line_exit_2(result, option)
    assert "range" in result.stderr or ">=" in result.stderr, result.stderr


def test_ascii_spellings_still_parse_to_the_same_values(no_work) -> None:
    result = CliRunner().invoke(app, ["train", "--epochs", "+3", "--seed", "-0", "--lr",
                                      " .5e-1 ", "--batch-size", "007", "--hidden", "2"])
    assert result.exit_code == 0, result.stderr
    config = no_work[0][1][1]
    assert (config.epochs, config.seed, config.lr, config.batch_size, config.hidden) == \
        (3, 0, 0.05, 7, 2)
    assert all(type(v) is int for v in (config.epochs, config.seed, config.hidden))


def test_defaults_are_unchanged_and_none_stays_none(no_work) -> None:
    """The defaults the options had before the change (git HEAD's app.py)."""
    assert CliRunner().invoke(app, ["train"]).exit_code == 0
    config = no_work[0][1][1]
    assert (config.epochs, config.seed, config.lr, config.batch_size, config.hidden) == \
        (30, 0, 0.1, 32, 64)
    assert CliRunner().invoke(app, ["bench"]).exit_code == 0
    kw = no_work[1][2]
    assert (kw["repeats"], kw["warmup"], kw["load"], kw["bandwidth"]) == (5, 1, 0, None)
    command = typer.main.get_command(app)
    seed = next(p for p in command.commands["quiz"].params if p.name == "seed")
    assert seed.default is None and not seed.required


def test_help_still_shows_the_ranges() -> None:
    env = {"COLUMNS": "200", "TERM": "dumb"}
    for command, ranges in (("train", 4), ("bench", 3), ("quiz", 1)):
        out = CliRunner().invoke(app, [command, "--help"], env=env).stdout
        assert out.count("x>=") == ranges, (command, out)


def test_a_huge_integer_is_refused_in_the_users_words(no_work) -> None:
    result = CliRunner().invoke(app, ["train", "--epochs", "9" * 5000])
    one_line_exit_2(result, "--epochs")
    assert "set_int_max_str_digits" not in result.stderr and len(result.stderr) < 300


@pytest.mark.parametrize("args", [["--repeats", "1_0"], ["--load", "\u0663"],
                                  ["--bandwidth", "1_0e9"]], ids=["underscore", "arabic",
                                                                  "float-underscore"])
def test_python_m_bench_refuses_what_crossent_bench_refuses(
        no_work, args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    from crossent.torch import bench as bench_mod

    with pytest.raises(SystemExit) as done:
        bench_mod.main([*args, "--out", "b"])
    assert done.value.code == 2 and no_work == []


@pytest.mark.skipif(not os.path.isfile("/proc/version"), reason="needs /proc")
def test_train_refuses_an_unwritable_link_target_before_the_work(no_work, tmp_path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.json").symlink_to("/proc/version")
    result = CliRunner().invoke(app, ["train", "--out", str(out), "--no-plots"])
    one_line_exit_2(result, "--out")
    assert no_work == []


def test_train_refuses_a_folder_named_like_a_figure_before_the_work(no_work, tmp_path) -> None:
    out = tmp_path / "run"
    (out / "reliability-ce.png").mkdir(parents=True)
    result = CliRunner().invoke(app, ["train", "--out", str(out), "--loss", "ce"])
    if result.exit_code == 2 and "--loss" in result.stderr:
        pytest.skip(f"loss names differ: {result.stderr}")
    one_line_exit_2(result, "--out")
    assert "reliability-ce.png" in result.stderr and no_work == []


def test_bench_refuses_a_folder_in_the_way_of_bench_png_before_the_work(tmp_path) -> None:
    from crossent.torch import bench as bench_mod

    (tmp_path / "bench.png").mkdir()
    with pytest.raises(bench_mod.InputError, match=r"bench\.png"):
        bench_mod.run(["ce-small"] if "ce-small" in bench_mod.CONFIGS
                      else [next(iter(bench_mod.CONFIGS))], device="cpu", out=tmp_path)


def test_tour_html_inside_a_figures_path_is_refused_before_the_work(tmp_path: Path) -> None:
    """At the function tour calls before drawing (the whole tour costs seconds): with the
    real command, ``crossent tour --out figs --html figs/log-loss.png/page.html`` draws the
    six figures, then exits 1 with FileExistsError's traceback."""
    from crossent.cli.files import check_file_apart

    out = tmp_path / "figs"
    with pytest.raises(InputError, match="--html"):
        check_file_apart(out / "log-loss.png" / "page.html", "--html", out, "--out",
                         ["log-loss.png", "surprisal.png"])
