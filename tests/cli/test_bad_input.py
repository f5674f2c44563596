"""Every command x every class of bad input: ONE line on stderr naming the option, exit code
2, no traceback, nothing on stdout, no file left behind. Then what needs a real process: a
closed pipe, ``/dev/full``, Ctrl-C, a stdout that cannot encode Unicode, a missing extra."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import pytest
from typer.testing import CliRunner

from crossent import _files
from crossent.cli import app
from crossent.errors import InputError

LONG = "n" * 300  # longer than NAME_MAX (255)
PROBS = ["--probs", "0.1,0.2,0.7"]


def cases(tmp: Path) -> list[tuple[str, list[str], str]]:
    """(id, arguments, a piece of the message) for every command and class of bad input.
    ``tmp`` holds a regular file ``file`` and a non-UTF-8 file ``latin1``."""
    f = str(tmp / "file")
    return [
        # explain: not a number, empty, non-finite, out of range, wrong shape, unicode digit
        ("explain-nan", ["explain", "--logits", "nan,1", "--target", "0"], "--logits"),
        ("explain-inf", ["explain", "--logits", "inf,1", "--target", "0"], "--logits"),
        ("explain-binary-inf", ["explain", "--logits", "-inf", "--target", "1", "--binary"],
         "--logits"),
        ("explain-word", ["explain", *PROBS, "--target", "two"], "--target"),
        ("explain-superscript", ["explain", *PROBS, "--target", "\u00b2"], "--target"),
        ("explain-empty", ["explain", "--probs", " , ", "--target", "0"], "--probs"),
        # float() takes these; a user who typed them did not mean 10, 1 and 3
        ("explain-underscore", ["explain", "--logits", "1_0,2", "--target", "0"], "--logits"),
        ("explain-fullwidth", ["explain", "--logits", "\uff11,2", "--target", "0"], "--logits"),
        ("explain-arabic-digit", ["explain", "--probs", "0.5,0.\u0665", "--target", "0"],
         "--probs"),
        ("explain-range", ["explain", *PROBS, "--target", "-1"], "out of range"),
        ("explain-shape", ["explain", *PROBS, "--target", "0.5,0.5"], "target"),
        ("explain-smoothing-nan", ["explain", *PROBS, "--target", "1", "--label-smoothing",
                                   "nan"], "label_smoothing"),
        ("explain-none", ["explain", "--target", "1"], "--probs"),
        ("explain-both", ["explain", *PROBS, "--logits", "1,2,3", "--target", "1"], "--probs"),
        ("explain-base", ["explain", *PROBS, "--target", "1", "--base", "3"], "--base"),
        # quiz: a bad seed, an answers file that is missing, a folder, endless, not UTF-8
        ("quiz-seed-negative", ["quiz", "--seed", "-1"], "--seed"),
        ("quiz-seed-word", ["quiz", "--seed", "x"], "--seed"),
        ("quiz-answers-missing", ["quiz", "--answers", str(tmp / "none.txt")], "--answers"),
        ("quiz-answers-folder", ["quiz", "--answers", str(tmp)], "--answers"),
        ("quiz-answers-endless", ["quiz", "--answers", "/dev/zero"], "--answers"),
        ("quiz-answers-latin1", ["quiz", "--answers", str(tmp / "latin1")], "not UTF-8"),
        ("quiz-answers-empty", ["quiz", "--answers", ""], "--answers: the path is empty"),
        # plot: unknown name, format, and every kind of unwritable --out
        ("plot-name", ["plot", "nonsense", "--out", str(tmp / "x.png")], "unknown plot"),
        ("plot-format", ["plot", "log-loss", "--out", str(tmp / "x.pdf")], "--out"),
        ("plot-folder", ["plot", "log-loss", "--out", str(tmp / "d.png")], "--out"),
        ("plot-under-file", ["plot", "log-loss", "--out", f + "/x.png"], "--out"),
        ("plot-too-long", ["plot", "log-loss", "--out", str(tmp / LONG / "x.png")], "--out"),
        ("plot-proc", ["plot", "log-loss", "--out", "/proc/crossent/x.png"], "--out"),
        ("plot-broken-link", ["plot", "log-loss", "--out", str(tmp / "dangling" / "x.png")],
         "is a symbolic link to"),
        ("plot-link-loop", ["plot", "log-loss", "--out", str(tmp / "loop1" / "x.svg")],
         "loop of symbolic links"),
        # train: an unwritable --out is found before the training starts
        ("train-out-file", ["train", "--out", f], "--out"),
        ("train-under-file", ["train", "--out", f + "/run"], "--out"),
        ("train-too-long", ["train", "--out", str(tmp / LONG)], "--out"),
        ("train-proc", ["train", "--out", "/proc/crossent"], "--out"),
        ("train-empty", ["train", "--out", ""], "--out"),
        ("train-epochs", ["train", "--epochs", "x"], "--epochs"),
        ("train-broken-link", ["train", "--out", str(tmp / "dangling")], "symbolic link"),
        ("train-link-loop", ["train", "--out", str(tmp / "loop1" / "run")], "loop"),
        ("train-hidden-huge", ["train", "--hidden", str(10**20)], "hidden"),
        # tour: --out and --html checked before the tour is built
        ("tour-out-file", ["tour", "--out", f], "--out"),
        ("tour-html-folder", ["tour", "--no-plots", "--html", str(tmp)], "--html"),
        ("tour-html-under-file", ["tour", "--no-plots", "--html", f + "/t.html"], "--html"),
        ("tour-html-proc", ["tour", "--no-plots", "--html", "/proc/t.html"], "--html"),
        ("tour-html-broken-link", ["tour", "--no-plots", "--html", str(tmp / "dangling")],
         "--html"),
        ("tour-base", ["tour", "--base", "x"], "--base"),
        # bench: an unknown configuration or device, a bad --out, before any timing
        ("bench-config", ["bench", "ce-f64"], "ce-f64"),
        ("bench-device", ["bench", "--device", "bogus"], "--device"),
        ("bench-device-meta", ["bench", "--device", "meta"], "--device"),
        ("bench-out", ["bench", "--out", f], "--out"),
        ("bench-repeats", ["bench", "--repeats", "0"], "--repeats"),
    ]


IDS = [case[0] for case in cases(Path("/tmp"))]


@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    (tmp_path / "file").write_text("a regular file\n")
    (tmp_path / "latin1").write_bytes("0.5\nentrop\xeda\n".encode("latin-1"))
    (tmp_path / "d.png").mkdir()
    (tmp_path / "dangling").symlink_to(tmp_path / "missing")
    (tmp_path / "loop1").symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(tmp_path / "loop1")
    return tmp_path


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))  # symlinks: not followed


@pytest.mark.parametrize("which", IDS)
def test_bad_input_one_line_exit_2_nothing_written(runner, tmp, which, monkeypatch):
    if which.startswith("bench"):
        pytest.importorskip("torch")
    monkeypatch.chdir(tmp)  # default output folders would land here
    (_, args, needle), = [c for c in cases(tmp) if c[0] == which]
    before = listing(tmp)
    result = runner.invoke(app, args)
    assert result.exit_code == 2, (result.output, result.exception)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"crossent {args[0]}: error: ")
    assert needle in lines[0]
    assert "Traceback" not in result.output
    assert result.stdout == ""
    assert listing(tmp) == before


def test_cuda_without_cuda_is_one_line(runner, tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = runner.invoke(app, ["bench", "--device", "cuda", "--out", str(tmp_path / "b")])
    assert result.exit_code == 2
    assert result.stderr == ("crossent bench: error: --device 'cuda': no CUDA device here "
                             f"(torch {torch.__version__}, torch.cuda.is_available() is "
                             "False); use --device cpu\n")
    assert not (tmp_path / "b").exists()


def test_a_library_bug_keeps_its_traceback(runner, monkeypatch):
    """A ValueError that is not an InputError is a bug: not reported as bad input."""
    from crossent.cli import explain

    def broken(**kwargs):
        raise ValueError("a bug")

    monkeypatch.setattr(explain, "compute", broken)
    result = runner.invoke(app, ["explain", *PROBS, "--target", "1"])
    assert result.exit_code == 1
    assert isinstance(result.exception, ValueError) and str(result.exception) == "a bug"
    assert result.stderr == ""


def test_memory_error_is_one_line(runner, monkeypatch, tmp_path):
    from crossent.cli import train

    def huge(*args, **kwargs):
        raise MemoryError("Unable to allocate 47.7 GiB")

    monkeypatch.setattr(train, "run", huge)
    result = runner.invoke(app, ["train", "--hidden", "100000000", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert result.stderr == ("crossent train: error: not enough memory for these options "
                             "(Unable to allocate 47.7 GiB)\n")


def test_full_disk_while_writing_keeps_the_old_file(runner, tmp_path, monkeypatch):
    """A write that fails half-way leaves the previous file whole and no temporary file."""
    target = tmp_path / "x.svg"
    target.write_text("the good old figure")
    real_fdopen = os.fdopen

    class Full:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            self.f.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")  # as write() does

    monkeypatch.setattr(_files.os, "fdopen", lambda fd, mode: Full(real_fdopen(fd, mode)))
    result = runner.invoke(app, ["plot", "log-loss", "--out", str(target)])
    assert result.exit_code == 2
    assert result.stderr == f"crossent plot: error: {target}: No space left on device\n"
    assert target.read_text() == "the good old figure"
    assert listing(tmp_path) == ["x.svg"]


def test_plot_creates_missing_folders(runner, tmp_path):
    """Documented: ``plot --out new/dir/x.png`` creates ``new/dir``."""
    out = tmp_path / "new" / "dir" / "x.svg"
    result = runner.invoke(app, ["plot", "log-loss", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert out.read_bytes().startswith(b"<?xml")


def test_a_symbolic_link_is_written_through(runner, tmp_path):
    """``--out link.svg``: the file the link points to gets the figure, the link stays."""
    (tmp_path / "real.svg").write_text("old")
    (tmp_path / "link.svg").symlink_to("real.svg")
    result = runner.invoke(app, ["plot", "log-loss", "--out", str(tmp_path / "link.svg")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "link.svg").is_symlink()
    assert (tmp_path / "real.svg").read_bytes().startswith(b"<?xml")
    assert listing(tmp_path) == ["link.svg", "real.svg"]


def test_a_rewritten_file_keeps_its_permissions(tmp_path):
    """The temporary file is made 0o600: the file replaced keeps its mode, a new one gets
    0o666 less the umask, as open() would give it."""
    old, new = tmp_path / "private.json", tmp_path / "new.json"
    old.write_text("{}")
    old.chmod(0o600)
    umask = os.umask(0o027)
    try:
        _files.write_atomic(old, "[]")
        _files.write_atomic(new, "[]")
    finally:
        os.umask(umask)
    assert (old.stat().st_mode & 0o777, new.stat().st_mode & 0o777) == (0o600, 0o640)
    assert old.read_text() == new.read_text() == "[]"


@pytest.mark.timeout(60)
def test_a_fifo_is_written_in_place_not_replaced(runner, tmp_path):
    """``--out /dev/stdout`` or ``--html /dev/null``: a device or FIFO gets the bytes; replacing it
    with a regular file (as root: /dev/null for the whole machine) must not happen. A FIFO
    stands in for the device here, so that a regression cannot harm the machine."""
    fifo = tmp_path / "figure.svg"
    os.mkfifo(fifo)
    received: list[bytes] = []

    def drain() -> None:  # read while it is written: a figure can exceed the pipe's buffer
        with open(fifo, "rb") as f:  # waits for the writer
            received.append(f.read())

    thread = threading.Thread(target=drain, daemon=True)
    thread.start()
    result = runner.invoke(app, ["plot", "log-loss", "--out", str(fifo)])
    thread.join(30)
    assert result.exit_code == 0, result.output
    assert fifo.is_fifo() and b"".join(received).startswith(b"<?xml")
    assert b"".join(received).rstrip().endswith(b"</svg>")
    assert listing(tmp_path) == ["figure.svg"]


def test_a_nul_byte_in_a_path_is_bad_input(tmp_path):
    """Python callers (crossent.torch.bench.run) can pass one; argv cannot."""
    with pytest.raises(InputError, match="--out"):
        _files.check_output_path(str(tmp_path / "a\0b"), "--out", directory=True)


def test_huge_logits_print_in_scientific_notation_without_warnings(runner):
    """Logits 2e308 apart: the loss is inf (float64's value), no NumPy overflow warning, and
    no column 309 digits wide; -0.0 prints as 0.000000."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning would end the command with its traceback
        result = runner.invoke(app, ["explain", "--logits", "1e308,-1e308", "--target", "1"])
    assert result.exit_code == 0, result.output
    assert "1.000000e+308" in result.stdout and "-1.000000e+308" in result.stdout
    assert "loss = sum of the terms = inf bits (inf nats)" in result.stdout
    assert max(len(line) for line in result.stdout.splitlines()) < 100
    one = runner.invoke(app, ["explain", "--probs", "1", "--target", "0"]).stdout
    assert "-0.000000" not in one and "0      1.000000  1.000000  0.000000  0.000000" in one


def test_binary_clamp_is_said(runner):
    """q = 0 for a positive label costs 100 nats (torch's clamp of the log at -100), not inf:
    the legend says so, and only then."""
    clamped = runner.invoke(app, ["explain", "--probs", "0", "--target", "1", "--binary",
                                  "--base", "e"])
    assert "loss = the term = 100.000000 nats" in clamped.stdout
    assert "clamped at -100" in clamped.stdout
    plain = runner.invoke(app, ["explain", "--probs", "0.5", "--target", "1", "--binary"])
    assert plain.exit_code == 0 and "clamped" not in plain.stdout


def test_help_reads_plainly(runner):
    """``-h`` works; arguments show as ``NAME`` (no ``{NAME}``, ``<str>``, ``<list[str]>``)."""
    assert runner.invoke(app, ["-h"]).stdout == runner.invoke(app, ["--help"]).stdout
    for command in ("plot", "bench"):
        text = runner.invoke(app, [command, "-h"]).stdout
        assert "<str>" not in text and "<list" not in text and "{" not in text, text
    assert "Usage: crossent plot [OPTIONS] NAME\n" in runner.invoke(app, ["plot", "-h"]).stdout


def test_bench_runs_each_configuration_once(runner, monkeypatch, tmp_path):
    """``bench ce-small ce-small``: bench.json is keyed by configuration; a second run of one
    would silently replace the first."""
    bench = pytest.importorskip("crossent.torch.bench")
    seen = []
    monkeypatch.setattr(bench, "run", lambda configs, **kw: seen.append(configs))
    result = runner.invoke(app, ["bench", "ce-small", "ce-f32", "ce-small", "--out",
                                 str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert seen == [["ce-small", "ce-f32"]]


def test_ascii_stdout_gets_plain_text(tmp_path):
    ascii_runner = CliRunner(charset="ascii")
    result = ascii_runner.invoke(app, ["explain", *PROBS, "--target", "2"])
    assert result.exit_code == 0, result.output
    assert "term = t*log2(1/q)" in result.stdout
    # what the user typed is escaped, not folded: "e" would be a value, or a file, not theirs
    bad = ascii_runner.invoke(app, ["explain", "--probs", "\u00e9", "--target", "1"])
    assert bad.stderr == "crossent explain: error: --probs: '\\xe9' is not a number\n"
    out = tmp_path / "\u00e9.svg"
    written = ascii_runner.invoke(app, ["plot", "log-loss", "--out", str(out)])
    assert " ".join(written.stdout.split()) == f"figure written: {tmp_path}/\\xe9.svg"
    assert out.exists()


# --------------------------------------------------------------------------------------------
# Real processes
# --------------------------------------------------------------------------------------------

CLI = [sys.executable, "-m", "crossent.cli"]
EXPLAIN = [*CLI, "explain", *PROBS, "--target", "2"]


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=kwargs.pop("stdout", None) is None, text=True,
                          timeout=120, check=False, **kwargs)


@pytest.mark.parametrize("cmd", [[sys.executable, "-m", "crossent"], EXPLAIN],
                         ids=["python -m crossent", "crossent explain"])
def test_closed_pipe_is_quiet(cmd):
    """``... | head -1``: the reader is gone before the first write."""
    read, write = os.pipe()
    os.close(read)
    try:
        done = subprocess.run(cmd, stdout=write, stderr=subprocess.PIPE, text=True,
                              timeout=120, check=False)
    finally:
        os.close(write)
    assert done.returncode == 1
    assert done.stderr == ""


@pytest.mark.parametrize("cmd", [[sys.executable, "-m", "crossent"], EXPLAIN],
                         ids=["python -m crossent", "crossent explain"])
def test_dev_full_is_one_line_exit_2(cmd):
    with open("/dev/full", "w") as full:
        done = subprocess.run(cmd, stdout=full, stderr=subprocess.PIPE, text=True,
                              timeout=120, check=False)
    assert done.returncode == 2
    assert done.stderr.endswith(": error: cannot write standard output: No space left on "
                                "device\n")
    assert done.stderr.count("\n") == 1


@pytest.mark.timeout(120)  # a child that never shows an epoch fails the test, then is killed
def test_ctrl_c_in_train_exits_130_and_writes_nothing(tmp_path):
    out = tmp_path / "run"
    child = subprocess.Popen([*CLI, "train", "--epochs", "100000", "--loss", "ce", "--out",
                              str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:
        assert child.stdout is not None
        for line in child.stdout:  # interrupt once the training runs
            if " 1/100000 " in line:
                break
        child.send_signal(signal.SIGINT)
        _, err = child.communicate(timeout=60)
    finally:
        child.kill()
    assert child.returncode == 130
    assert err == "crossent train: interrupted\n"
    assert not out.exists()


@pytest.mark.parametrize("command", ["explain", "tour"])
def test_bad_choice_is_worded_for_a_learner(command):
    """Review H98-5: typer 0.29 words a bad choice "Value error, '3' is not one of ...";
    the line names the option and the choices, without the prefix."""
    args = ["--probs", "0.7,0.3", "--target", "0"] if command == "explain" else ["--no-plots"]
    done = run([*CLI, command, *args, "--base", "3"])
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == (f"crossent {command}: error: Invalid value for '--base': '3' is not "
                           "one of '2', 'e', '10'.\n")


def test_missing_cli_extra_names_it():
    code = ("import sys; sys.modules['typer'] = None; "
            "from crossent.cli import main; main()")
    done = run([sys.executable, "-c", code])
    assert done.returncode == 1
    assert done.stderr == ("crossent: the command line needs the cli extra (typer is missing):"
                           " pip install 'crossent[cli]'\n")


def test_version_needs_no_cli_extra():
    """Review H98-4: ``crossent --version`` on a core-only install printed the missing-extra
    line; the version is the package's and needs no extra. Other arguments still name it."""
    from crossent import __version__

    code = ("import sys; sys.modules['typer'] = None; sys.argv = ['crossent'{}]; "
            "from crossent.cli import main; main()")
    done = run([sys.executable, "-c", code.format(", '--version'")])
    assert (done.returncode, done.stdout, done.stderr) == (0, f"crossent {__version__}\n", "")
    done = run([sys.executable, "-c", code.format(", '--version', 'tour'")])
    assert done.returncode == 1 and "needs the cli extra" in done.stderr


def shell(line: str) -> subprocess.CompletedProcess:
    """``line`` run by sh, with ``$CLI`` the command: for redirections such as ``>&-``."""
    env = {**os.environ, "CLI": " ".join(CLI)}
    return subprocess.run(["sh", "-c", line], capture_output=True, text=True, env=env,
                          timeout=120, check=False)


def test_closed_standard_streams():
    """``>&-``: one line, exit 2 (no ``'NoneType' object has no attribute 'write'``);
    ``<&-``: the quiz reads an empty stdin; ``2>&-``: bad input still exits 2 quietly."""
    no_stdout = shell("$CLI explain --probs 1 --target 0 >&-")
    assert (no_stdout.returncode, no_stdout.stderr) == (
        2, "crossent: error: cannot write standard output: it is closed\n")
    no_stdin = shell("$CLI quiz --seed 1 <&-")
    assert no_stdin.returncode == 0 and no_stdin.stderr == "", no_stdin.stderr
    assert "Quiz ended (end of input)" in no_stdin.stdout
    no_stderr = shell("$CLI explain --probs x --target 0 2>&-")
    assert (no_stderr.returncode, no_stderr.stdout) == (2, "")
    module = shell(f"{sys.executable} -m crossent >&-")
    assert (module.returncode, module.stderr) == (
        2, "crossent: error: cannot write standard output: it is closed\n")


def test_non_utf8_stdout_prints_ascii():
    env = {**os.environ, "PYTHONIOENCODING": "ascii"}
    done = run(EXPLAIN, env=env)
    assert done.returncode == 0, done.stderr
    assert "term = t*log2(1/q)" in done.stdout and done.stderr == ""


def test_endless_answer_on_stdin_is_one_line(runner):
    """``crossent quiz < /dev/zero``: a bounded read, then one line."""
    result = runner.invoke(app, ["quiz", "--seed", "1"], input="0" * 100_000)
    assert result.exit_code == 2
    assert result.stderr == ("crossent quiz: error: standard input: an answer longer than "
                             "10000 characters; give one short answer per line\n")


def test_missing_optional_module_names_its_extra(runner, tmp_path, monkeypatch):
    from crossent.cli import plots

    getattr(plots.render, "cache_clear", lambda: None)()  # a figure drawn before is cached
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # as if not installed
    result = runner.invoke(app, ["plot", "log-loss", "--out", str(tmp_path / "x.png")])
    assert result.exit_code == 1
    assert result.stderr == ("crossent plot: error: needs matplotlib: pip install "
                             "'crossent[cli]'\n")
    assert listing(tmp_path) == []


@pytest.mark.parametrize("command", ["tour", "bench"])
def test_ctrl_c_in_tour_and_bench_says_so(runner, tmp_path, monkeypatch, command):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    if command == "tour":
        from crossent.cli import tour

        monkeypatch.setattr(tour, "build_tour", interrupted)
        args = ["tour", "--out", str(tmp_path / "figures")]
    else:
        bench = pytest.importorskip("crossent.torch.bench")
        monkeypatch.setattr(bench, "time_config", interrupted)
        args = ["bench", "ce-small", "--quick", "--out", str(tmp_path / "bench")]
    result = runner.invoke(app, args)
    assert result.exit_code == 130
    assert result.stderr.endswith(f"crossent {command}: interrupted\n")
    assert listing(tmp_path) == []
