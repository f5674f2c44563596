"""Adversarial review (H69) of what the ``crossent`` command writes and reads on disk: the
atomic writes (``crossent._files``), ``plot``, ``tour --html``, ``train`` and ``bench --out``.

Paths a user can type (rich markup or emoji codes in a folder name, a 250-byte file name, a
trailing slash, a newline, a C locale), signals mid-write (SIGINT, SIGTERM), an interruption
while the figures are drawn, a reader that leaves, a narrow terminal, numbers at their
bounds. A bug is a test written as it should pass, marked ``xfail(strict=True)``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from crossent import _files
from crossent.cli import app

pytestmark = pytest.mark.timeout(120)

WIDE = {"COLUMNS": "10000"}  # one path, one line: rich wraps at 80 columns otherwise
TINY_TRAIN = ["train", "--epochs", "1", "--model", "softmax", "--no-plots"]
CLI = [sys.executable, "-m", "crossent.cli"]


def invoke(args: list[str], **kwargs):
    return CliRunner().invoke(app, args, **kwargs)


def one_line_exit_2(result, needle: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.stderr, result.exception)
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    assert needle in result.stderr, result.stderr


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# --------------------------------------------------------------------------------------------
# The path printed is the path written: rich markup and emoji codes in names
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("parts", [("[draft]", "x.svg"), ("a[", "b]x.svg")],
                         ids=["style-tag", "closing-tag"])
def test_plot_prints_a_path_with_brackets_as_given(tmp_path: Path, parts) -> None:
    out = tmp_path.joinpath(*parts)
    result = invoke(["plot", "log-loss", "--out", str(out)], env=WIDE)
    assert result.exit_code == 0, (result.stderr, result.exception)
    assert out.read_bytes().rstrip().endswith(b"</svg>")
    assert f"figure written: {out}\n" in result.stdout, result.stdout


def test_tour_html_prints_a_path_with_brackets_as_given(tmp_path: Path, monkeypatch) -> None:
    from crossent.cli import html as html_mod

    monkeypatch.setattr(html_mod, "page", lambda content, **k: "<!DOCTYPE html>page\n")
    page = tmp_path / "[draft]" / "page.html"
    result = invoke(["tour", "--no-plots", "--html", str(page)], env=WIDE)
    assert result.exit_code == 0, (result.stderr, result.exception)
    assert page.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert f"web page written: {page}\n" in result.stdout


@pytest.mark.parametrize("command", ["plot", "train", "quiz"])
def test_emoji_codes_in_names_are_printed_as_typed(tmp_path: Path, command: str) -> None:
    folder = tmp_path / ":smile:"
    if command == "plot":
        args, shown = ["plot", "log-loss", "--out", str(folder / "x.svg")], folder / "x.svg"
    elif command == "train":
        args = [*TINY_TRAIN, "--loss", "ce", "--out", str(folder)]
        shown = folder / "metrics.json"
    else:
        answers = tmp_path / "answers.txt"
        answers.write_text(":smile:\n", encoding="utf-8")
        args, shown = ["quiz", "--seed", "0", "--answers", str(answers)], Path(":smile:")
    result = invoke(args, env=WIDE)
    assert result.exit_code in (0, 1), (result.stderr, result.exception)  # quiz: 1 = wrong
    assert "\U0001f604" not in result.stdout
    assert str(shown) in result.stdout


# --------------------------------------------------------------------------------------------
# Names the file system takes
# --------------------------------------------------------------------------------------------

NAME_250 = "n" * 246 + ".svg"  # 250 bytes: under NAME_MAX (255)


def test_the_file_system_takes_a_250_byte_name(tmp_path: Path) -> None:
    """The premise of the next test: the name is legal here (as the shell's > writes it)."""
    (tmp_path / NAME_250).write_bytes(b"x")
    assert [p.name for p in tmp_path.iterdir()] == [NAME_250]


@pytest.mark.parametrize("via", ["write_atomic", "plot"])
def test_a_250_byte_file_name_is_written(tmp_path: Path, via: str) -> None:
    target = tmp_path / NAME_250
    if via == "write_atomic":
        _files.write_atomic(target, b"<svg></svg>\n")
    else:
        result = invoke(["plot", "log-loss", "--out", str(target)])
        assert result.exit_code == 0, result.stderr
    assert target.read_bytes().rstrip().endswith(b"</svg>")
    assert [p.name for p in tmp_path.iterdir()] == [NAME_250]


def test_a_name_over_name_max_is_one_line_before_the_work(tmp_path: Path) -> None:
    result = invoke(["plot", "log-loss", "--out", str(tmp_path / ("n" * 300 + ".svg"))])
    one_line_exit_2(result, "--out")
    assert tree(tmp_path) == []


def test_a_trailing_slash_is_not_a_file_name(tmp_path: Path) -> None:
    result = invoke(["plot", "log-loss", "--out", str(tmp_path / "new.svg") + "/"])
    one_line_exit_2(result, "--out")
    assert tree(tmp_path) == []


def test_a_newline_in_a_name_is_written_as_given(tmp_path: Path) -> None:
    out = tmp_path / "two\nlines.svg"
    result = invoke(["plot", "log-loss", "--out", str(out)])
    assert result.exit_code == 0, result.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["two\nlines.svg"]
    assert out.read_bytes().rstrip().endswith(b"</svg>")


def test_a_non_ascii_path_in_the_c_locale_is_written_with_its_bytes(tmp_path: Path) -> None:
    """No UTF-8 mode, no locale coercion: argv arrives as surrogate escapes, and the file
    must get the very bytes typed; stdout (ASCII) gets a one-line, escaped report."""
    name = "\u00e9\u4e2d.svg"
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0",
           "PYTHONCOERCECLOCALE": "0"}
    env.pop("PYTHONIOENCODING", None)
    done = subprocess.run([*CLI, "plot", "log-loss", "--out",
                           os.fsencode(tmp_path) + b"/" + name.encode("utf-8")],
                          capture_output=True, env=env, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stderr == b""
    assert os.listdir(os.fsencode(tmp_path)) == [name.encode("utf-8")]
    done.stdout.decode("ascii")  # nothing the ASCII stdout could not hold


# --------------------------------------------------------------------------------------------
# Signals mid-write, an interruption while drawing, a reader that leaves
# --------------------------------------------------------------------------------------------

SLOW_FSYNC = r"""
import sys, time
from crossent import _files
real = _files.os.fsync
def slow(fd):
    sys.stderr.write("READY\n")
    sys.stderr.flush()
    time.sleep(60)
    real(fd)
_files.os.fsync = slow
from crossent.cli import main
sys.argv = ["crossent", *sys.argv[1:]]
main()
"""


def _signal_mid_write(tmp_path: Path, sig: signal.Signals) -> tuple[int, bytes, list[str]]:
    """plot over an old figure; ``sig`` once the bytes are in the temporary file."""
    target = tmp_path / "x.svg"
    target.write_text("the good old figure")
    child = subprocess.Popen([sys.executable, "-c", SLOW_FSYNC, "plot", "log-loss", "--out",
                              str(target)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert child.stderr is not None
        assert child.stderr.readline() == b"READY\n"
        child.send_signal(sig)
        _, err = child.communicate(timeout=60)
    finally:
        child.kill()
        child.wait()
    assert target.read_text() == "the good old figure"
    return child.returncode, err, sorted(os.listdir(tmp_path))


def test_sigint_mid_write_keeps_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    code, err, names = _signal_mid_write(tmp_path, signal.SIGINT)
    assert (code, err) == (130, b"crossent plot: interrupted\n")
    assert names == ["x.svg"]


def test_sigterm_mid_write_leaves_no_temporary_file(tmp_path: Path) -> None:
    code, _, names = _signal_mid_write(tmp_path, signal.SIGTERM)
    assert code != 0
    assert names == ["x.svg"]


def test_train_interrupted_while_drawing_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    from crossent.cli import train as train_mod

    def interrupted(fig, result) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "draw_reliability", interrupted)
    out = tmp_path / "new" / "run"
    result = invoke(["train", "--epochs", "1", "--model", "softmax", "--loss", "ce",
                     "--out", str(out)])
    assert result.exit_code == 130 and result.stderr == "crossent train: interrupted\n"
    assert tree(tmp_path) == []


def test_train_failing_before_any_figure_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    """Ctrl-C in the training itself (after the checks): no folder made."""
    from crossent import training

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "compare", interrupted)
    out = tmp_path / "new" / "run"
    result = invoke(["train", "--epochs", "1", "--loss", "ce", "--out", str(out)])
    assert result.exit_code == 130 and result.stderr == "crossent train: interrupted\n"
    assert tree(tmp_path) == []


def test_tour_reader_leaving_writes_all_outputs_or_none(tmp_path: Path, monkeypatch) -> None:
    from crossent.cli import html as html_mod
    from crossent.cli import plots
    from crossent.cli import tour as tour_mod

    monkeypatch.setattr(plots, "draw", lambda name, path, *a, **k: b"\x89PNG fake")
    monkeypatch.setattr(html_mod, "page", lambda content, **k: "<!DOCTYPE html>fake\n")

    def reader_left(*args, **kwargs) -> None:
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(tour_mod, "render", reader_left)
    figs, page = tmp_path / "figs", tmp_path / "page.html"
    result = invoke(["tour", "--out", str(figs), "--html", str(page)])
    assert result.exit_code == 1 and result.stderr == ""
    assert page.exists() == figs.exists(), tree(tmp_path)


def test_train_to_a_closed_pipe_is_quiet_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "run"
    read, write = os.pipe()
    os.close(read)
    try:
        done = subprocess.run([*CLI, *TINY_TRAIN, "--loss", "ce", "--out", str(out)],
                              stdout=write, stderr=subprocess.PIPE, timeout=120, check=False)
    finally:
        os.close(write)
    assert (done.returncode, done.stderr) == (1, b"")
    assert not out.exists()


# --------------------------------------------------------------------------------------------
# bench: an interruption while the figures are written
# --------------------------------------------------------------------------------------------


def test_bench_interrupted_while_drawing_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("torch")
    from crossent.torch import bench as bench_mod

    monkeypatch.setattr(bench_mod, "CE_CONTENDERS", ["exp-floor", "eager", "crossent"])
    point = {"N": 4, "V": 16, "logits": 64, "rounds": 1, "eager_ms": 1.0,
             "crossent_ms": 1.0, "ratio": 1.0}
    monkeypatch.setattr(bench_mod, "time_crossover", lambda *a, **k: [point])

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(bench_mod, "crossover_figure", interrupted)
    out = tmp_path / "new"
    result = invoke(["bench", "ce-small", "--crossover", "--device", "cpu", "--quick",
                     "--repeats", "1", "--warmup", "0", "--no-memory", "--out", str(out)])
    assert result.exit_code == 130, (result.stderr, result.exception)
    assert result.stderr.endswith("crossent bench: interrupted\n")
    assert tree(tmp_path) == []


# --------------------------------------------------------------------------------------------
# train: the summary at a narrow terminal, numbers at their bounds
# --------------------------------------------------------------------------------------------


def _summary_rows(stdout: str) -> list[str]:
    """The body rows of rich's summary table (between its header rule and its bottom)."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("\u2521"))
    end = next(i for i, line in enumerate(lines) if line.startswith("\u2514"))
    return lines[start + 1:end]


def test_train_summary_at_a_narrow_terminal_shows_every_number(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = invoke([*TINY_TRAIN, "--loss", "smoothed-ce", "--out", str(out)],
                    env={"COLUMNS": "50"})
    assert result.exit_code == 0, (result.stderr, result.exception)
    run = json.loads((out / "metrics.json").read_text())["smoothed-ce"]
    expected = ["smoothed-ce", str(run["epochs_to_95"] or "never"),
                f"{run['final_accuracy']:.4f}", f"{run['final_cross_entropy']:.4f}",
                f"{run['final_ece']:.4f}", f"{run['epochs'][-1]['train_loss']:.4f}"]
    cells = "".join(_summary_rows(result.stdout)).replace("\u2502", " ").split()
    assert "\u2026" not in "".join(cells)
    assert [c for c in expected if c not in cells] == [], cells


def test_train_summary_at_a_wide_terminal_matches_the_json(tmp_path: Path) -> None:
    """The same check where the table fits: what the table shows is what metrics.json holds
    (the reference above is sound)."""
    out = tmp_path / "run"
    result = invoke([*TINY_TRAIN, "--loss", "smoothed-ce", "--out", str(out)], env=WIDE)
    assert result.exit_code == 0, (result.stderr, result.exception)
    run = json.loads((out / "metrics.json").read_text())["smoothed-ce"]
    cells = "".join(_summary_rows(result.stdout)).replace("\u2502", " ").split()
    assert cells == ["smoothed-ce", str(run["epochs_to_95"] or "never"),
                     f"{run['final_accuracy']:.4f}", f"{run['final_cross_entropy']:.4f}",
                     f"{run['final_ece']:.4f}", f"{run['epochs'][-1]['train_loss']:.4f}"]


def test_a_batch_beyond_the_data_is_one_full_batch(tmp_path: Path) -> None:
    """--batch-size 10**30: every epoch is one step over all 1437 training images, exactly as
    --batch-size 1437 (and no OverflowError in the slicing)."""
    runs = {}
    for size in (str(10**30), "1437"):
        out = tmp_path / size
        result = invoke(["train", "--epochs", "2", "--model", "softmax", "--loss", "ce",
                         "--no-plots", "--batch-size", size, "--out", str(out)])
        assert result.exit_code == 0, (result.stderr, result.exception)
        runs[size] = json.loads((out / "metrics.json").read_text())["ce"]
    assert runs[str(10**30)]["settings"]["batch_size"] == 10**30
    assert runs[str(10**30)]["epochs"] == runs["1437"]["epochs"]


@pytest.mark.parametrize(("args", "needle"), [
    (["--lr", "-0.0"], "lr"), (["--lr", "1e-400"], "lr"), (["--lr", "1e400"], "lr"),
    (["--epochs", "1.0"], "--epochs"), (["--epochs", "1e3"], "--epochs"),
    (["--batch-size", "0"], "--batch-size"), (["--hidden", "-1"], "--hidden"),
    (["--hidden", str(10**30)], "hidden"), (["--seed", "0.5"], "--seed"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_train_numbers_out_of_bounds_are_one_line_and_write_nothing(
        tmp_path: Path, args: list[str], needle: str) -> None:
    out = tmp_path / "run"
    result = invoke([*TINY_TRAIN, "--loss", "ce", *args, "--out", str(out)])
    one_line_exit_2(result, needle)
    assert tree(tmp_path) == []


def test_train_outputs_that_are_one_file_are_refused_before_the_work(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "accuracy.png").write_bytes(b"old figure")
    (out / "metrics.json").symlink_to("accuracy.png")
    result = invoke(["train", "--epochs", "1", "--model", "softmax", "--loss", "ce",
                     "--out", str(out)])
    one_line_exit_2(result, "--out")
    assert (out / "accuracy.png").read_bytes() == b"old figure"


def test_train_out_through_a_link_to_a_folder_writes_in_the_folder(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    result = invoke([*TINY_TRAIN, "--loss", "ce", "--out", str(tmp_path / "link")])
    assert result.exit_code == 0, (result.stderr, result.exception)
    assert (tmp_path / "link").is_symlink()
    assert [p.name for p in real.iterdir()] == ["metrics.json"]


# --------------------------------------------------------------------------------------------
# After the fixes: SIGTERM's report, the handler given back, '/.' as a trailing slash
# --------------------------------------------------------------------------------------------


def test_sigterm_mid_write_is_one_line_and_exit_143(tmp_path: Path) -> None:
    """As Ctrl-C (130), with the shell's code for a SIGTERM (128 + 15)."""
    code, err, names = _signal_mid_write(tmp_path, signal.SIGTERM)
    assert (code, err) == (143, b"crossent plot: terminated\n")
    assert names == ["x.svg"]


def test_the_sigterm_handler_is_given_back(tmp_path: Path) -> None:
    """The command sets its SIGTERM handler for its own run only (here: inside pytest)."""
    before = signal.getsignal(signal.SIGTERM)
    result = invoke(["plot", "log-loss", "--out", str(tmp_path / "x.svg")])
    assert result.exit_code == 0, result.stderr
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.parametrize("end", ["/.", "//"])
def test_a_folder_ending_is_not_a_file_name(tmp_path: Path, end: str) -> None:
    result = invoke(["plot", "log-loss", "--out", str(tmp_path / "new.svg") + end])
    one_line_exit_2(result, "--out")
    assert tree(tmp_path) == []


def test_write_atomic_leaves_only_the_file(tmp_path: Path) -> None:
    """The short temporary name is still made beside the target and removed by the replace."""
    _files.write_atomic(tmp_path / "a.json", "{}\n")
    _files.write_atomic(tmp_path / "a.json", "[]\n")
    assert tree(tmp_path) == ["a.json"]
    assert (tmp_path / "a.json").read_text() == "[]\n"
