"""Hypothesis fuzz of the command line's contract over argv, for every command and option.

The contract: bad input prints ONE line on stderr and exits 2; success exits 0; anything else
(a traceback, exit 1, a multi-line error, a half-written or stray output file) is a bug.
test_bad_input.py pins one example per class of bad input; here hypothesis mixes them:
garbage, empty, huge, negative, NaN, inf, Unicode and mistyped numbers, probability lists
that do not sum to 1, mismatched lengths, missing files, folders where files are expected,
unwritable paths, paths inside missing folders, existing files, options repeated, in any
order. The commands run in-process (typer's CliRunner); a few real processes check the shape
of stderr and the exit status as a shell sees them.

``train`` and ``bench`` are fuzzed up to their work: the training (``crossent.cli.train.run``)
and the timing (``bench.time_config``...) are replaced by stand-ins that record the call,
so every check before them runs for real and no example trains or times anything.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from crossent.cli import app

FUZZ = settings(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow, HealthCheck.data_too_large])

pytestmark = pytest.mark.timeout(120)  # a hang fails the test

PNG = b"\x89PNG\r\n\x1a\n" + b"IEND\xaeB`\x82"  # the smallest "whole" PNG for complete()


# --------------------------------------------------------------------------------------------
# The checks
# --------------------------------------------------------------------------------------------


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under ``root`` (links not followed): its kind, a link's target, a regular
    file's SHA-256."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "link " + os.readlink(p)
            elif p.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def complete(path: Path) -> bool:
    """``path`` holds a whole figure or web page (not a truncated one)."""
    data = path.read_bytes()
    suffix = path.suffix.lower()
    if suffix == ".png":
        return data.startswith(b"\x89PNG\r\n\x1a\n") and data.endswith(b"IEND\xaeB`\x82")
    if suffix == ".svg":
        return data.startswith(b"<?xml") and data.rstrip().endswith(b"</svg>")
    if suffix in (".html", ".htm"):
        return data.rstrip().lower().endswith(b"</html>")
    if path.name == "metrics.json":
        return data.rstrip().endswith(b"}")
    return True  # a file we cannot judge: its presence is checked by the caller


def check_contract(result, args: list[str], before: dict[str, str], root: Path,
                   *, allowed: tuple[int, ...] = (0, 2)) -> None:
    """The CLI's contract for one invocation; ``root``'s content ``before`` it ran."""
    where = f"argv={args!r}\nstdout={result.stdout[-2000:]!r}\nstderr={result.stderr!r}"
    exc = result.exception
    assert exc is None or isinstance(exc, SystemExit), f"{where}\nexception: {exc!r}"
    assert result.exit_code in allowed, where
    assert "Traceback" not in result.stderr, where
    after = snapshot(root)
    if result.exit_code == 2:
        assert result.stderr.endswith("\n") and result.stderr.count("\n") == 1, where
        line = result.stderr.strip()
        assert line.startswith("crossent") and ": error: " in line, where
        assert after == before, f"{where}\nfiles changed on error: {diff(before, after)}"
    else:
        # success: whatever was written or rewritten is whole; no temporary file is left
        for rel in diff(before, after):
            p = root / rel
            assert ".tmp" not in p.name and ".crossent-probe." not in p.name, (where, rel)
            if rel in after and p.is_file() and not p.is_symlink():
                assert complete(p), f"{where}\n{rel} is not a whole file"


def diff(before: dict[str, str], after: dict[str, str]) -> list[str]:
    return sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))


@contextlib.contextmanager
def scratch(base: Path):
    """A fresh folder per example, made the working directory (default outputs land in it),
    holding a regular file, a folder, an old figure, broken and looping links and links to
    /dev/full."""
    root = Path(tempfile.mkdtemp(dir=base))
    (root / "file.txt").write_text("a regular file\n")
    (root / "folder").mkdir()
    (root / "old.svg").write_text("the old figure")
    (root / "answers.txt").write_text("0.5\n1\nentropy\n0.36\n0.7\n")
    (root / "latin1.txt").write_bytes("entrop\xeda\n".encode("latin-1"))
    (root / "dangling").symlink_to(root / "missing")
    (root / "loop1").symlink_to(root / "loop2")
    (root / "loop2").symlink_to(root / "loop1")
    for suffix in (".png", ".svg", ".html"):
        (root / f"full{suffix}").symlink_to("/dev/full")
    with contextlib.chdir(root):
        yield root


# --------------------------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------------------------

ODD_NUMBERS = ["", " ", "nan", "NaN", "-inf", "inf", "Infinity", "1e999", "-1e999", "1e-999",
               "5e-324", "1e308", "-0", "-0.0", ".5", "5.", "+.5e-3", "1_0", "0x1", "1/3",
               "0,5", "\uff11", "\u0663", "\u00b2", "\u00bd", "\x00", "True", "1e", "--", "e",
               "\u2212" "1", "1" * 400]
"""Numbers mistyped, out of float range, not ASCII, or not numbers."""

number_text = st.one_of(
    st.floats().map(repr),
    st.floats(0, 1).map(lambda x: f"{x:.3g}"),
    st.integers(-10**30, 10**30).map(str),
    st.sampled_from(ODD_NUMBERS),
    st.text(max_size=5),
)


def _probabilities(xs: list[float]) -> str:
    total = sum(xs)
    return ",".join(repr(x / total) for x in xs) if total > 0 else ",".join(map(repr, xs))


number_list = st.one_of(
    st.lists(number_text, max_size=6).map(",".join),
    st.lists(st.floats(0, 1), min_size=1, max_size=6).map(_probabilities),  # sum to ~1
    st.lists(st.floats(0, 1), min_size=1, max_size=6).map(  # need not sum to 1
        lambda xs: ",".join(map(repr, xs))),
    st.lists(st.floats(-50, 50), min_size=1, max_size=6).map(lambda xs: ",".join(map(repr, xs))),
    st.sampled_from(["0.1,0.2,0.7", "1", "0", "0,1", "1,0", "0.5,0.5", "0.33,0.33,0.33"]),
)

int_text = st.one_of(st.integers(-3, 12).map(str), st.integers(-10**25, 10**25).map(str),
                     st.sampled_from([*ODD_NUMBERS, "1.0", "1.5", "+3", " 4 ", "007"]))
float_text = st.one_of(st.floats().map(repr), st.floats(0, 1).map(repr),
                       st.sampled_from(ODD_NUMBERS))
base_text = st.sampled_from(["2", "e", "10", "E", "3", "", "2.0", "bits"])


def file_path(suffixes: list[str]) -> st.SearchStrategy[str]:
    """An output file path (relative to the scratch folder, or absolute): new, inside
    missing folders, existing, a folder, under a file, a broken link or loop, unwritable,
    too long, empty, /dev/full."""
    suffix = st.sampled_from(suffixes)
    return st.one_of(
        suffix.map(lambda s: "new" + s),
        suffix.map(lambda s: "missing/deeper/new" + s),
        suffix.map(lambda s: "file.txt/x" + s),
        suffix.map(lambda s: "loop1/x" + s),
        suffix.map(lambda s: "dangling/x" + s),
        suffix.map(lambda s: "/proc/crossent/x" + s),
        suffix.map(lambda s: "/sys/x" + s),
        suffix.map(lambda s: "n" * 300 + s),
        suffix.map(lambda s: "\u00e9\u2028x" + s),
        suffix.map(lambda s: "full" + s),
        st.sampled_from(["old.svg", "folder", "folder/", "dangling", "file.txt", "", "-", "."]),
    )


dir_path = st.one_of(
    st.sampled_from(["new", "missing/deeper/new", "folder", "file.txt", "file.txt/x",
                     "dangling", "loop1/x", "/proc/crossent", "/sys/x", "n" * 300, "",
                     ".", "old.svg", "\u00e9"]),
)


@st.composite
def argv(draw, command: list[str], options: dict[str, st.SearchStrategy[str]],
         flags: tuple[str, ...] = (), required: tuple[str, ...] = ()) -> list[str]:
    """``command`` then some of ``options`` (required ones usually present), some given
    twice, some ``flags``, sometimes a stray token, in any order."""
    pairs: list[list[str]] = []
    for name, values in options.items():
        times = draw(st.sampled_from([1, 1, 1, 2]) if name in required
                     else st.sampled_from([0, 0, 1, 1, 2]))
        pairs += [[name, draw(values)] for _ in range(times)]
    pairs += [[f] for f in flags if draw(st.booleans())]
    if draw(st.integers(0, 9)) == 0:
        pairs.append([draw(st.sampled_from(["--bogus", "extra", "-x", "--", "--help=1"]))])
    pairs = draw(st.permutations(pairs))
    return command + [token for pair in pairs for token in pair]


# --------------------------------------------------------------------------------------------
# explain
# --------------------------------------------------------------------------------------------

target_text = st.one_of(int_text, number_list)
EXPLAIN = argv(["explain"], {"--probs": number_list, "--logits": number_list,
                             "--target": target_text, "--label-smoothing": float_text,
                             "--base": base_text},
               flags=("--binary", "--multilabel"), required=("--target",))


@settings(FUZZ, max_examples=120)
@given(args=EXPLAIN)
@example(args=["explain", "--probs", ",".join(["0.0001"] * 10_000), "--target", "9999"])
@example(args=["explain", "--logits", ",".join(["1e308", "-1e308"] * 500), "--target",
               ",".join(["0.001"] * 1000)])
@example(args=["explain", "--probs", "0.5,0.5", "--target", "0", "--probs", "1"])
@example(args=["explain", "--logits", "1e308", "--target", "0.5", "--binary",
               "--label-smoothing", "1"])
def test_explain_fuzz(tmp_path: Path, args: list[str]) -> None:
    with scratch(tmp_path) as root:
        before = snapshot(root)
        result = CliRunner().invoke(app, args)
        check_contract(result, args, before, root)
        if result.exit_code == 0 and "--help=1" not in args:
            assert "loss = " in result.stdout and result.stderr == "", args


# --------------------------------------------------------------------------------------------
# quiz
# --------------------------------------------------------------------------------------------

answers_path = st.sampled_from(["answers.txt", "latin1.txt", "missing.txt", "folder",
                                "file.txt/x", "", "/dev/null", "dangling", "loop1",
                                "written.txt"])
answer_lines = st.one_of(
    st.lists(st.one_of(number_text, st.text(max_size=30)), max_size=12).map("\n".join)
    .map(lambda s: s.encode("utf-8", "surrogatepass")),
    st.binary(max_size=60),
)


@settings(FUZZ, max_examples=60)
@given(args=argv(["quiz"], {"--seed": int_text, "--answers": answers_path}),
       content=answer_lines, stdin=st.text(max_size=200))
def test_quiz_fuzz(tmp_path: Path, args: list[str], content: bytes, stdin: str) -> None:
    with scratch(tmp_path) as root:
        (root / "written.txt").write_bytes(content)
        before = snapshot(root)
        result = CliRunner().invoke(app, args, input=stdin)
        check_contract(result, args, before, root)


# --------------------------------------------------------------------------------------------
# plot (figures are cached by name, format and base: few names keep it quick)
# --------------------------------------------------------------------------------------------

PLOT_NAMES = st.sampled_from(["log-loss", "surprisal", "log-loss", "", "LOG-LOSS", "log_loss",
                              "training ", "\u00e9", "-h"])
PLOT_BASES = st.sampled_from(["2", "e", "x", ""])


@settings(FUZZ, max_examples=40)
@given(name=PLOT_NAMES, rest=argv([], {"--out": file_path([".svg", ".png", ".PNG", ".pdf",
                                                           "", ".svg."]),
                                       "--base": PLOT_BASES}, required=("--out",)))
def test_plot_fuzz(tmp_path: Path, name: str, rest: list[str]) -> None:
    args = ["plot", name, *rest]
    with scratch(tmp_path) as root:
        before = snapshot(root)
        result = CliRunner().invoke(app, args)
        check_contract(result, args, before, root)
        if result.exit_code == 0 and "-h" not in args and "--help=1" not in args:
            out = rest[len(rest) - 1 - rest[::-1].index("--out") + 1]  # the last --out wins
            target = Path(os.path.realpath(out))
            assert target.is_file() and complete(target), (args, out)


# --------------------------------------------------------------------------------------------
# tour (always --no-plots: the figures are plot's; the web page is fuzzed)
# --------------------------------------------------------------------------------------------


@settings(FUZZ, max_examples=8)
@given(args=argv(["tour", "--no-plots"], {"--html": file_path([".html", ".htm", ""]),
                                          "--out": dir_path, "--base": base_text}))
def test_tour_fuzz(tmp_path: Path, args: list[str]) -> None:
    with scratch(tmp_path) as root:
        before = snapshot(root)
        result = CliRunner().invoke(app, args)
        check_contract(result, args, before, root)


# --------------------------------------------------------------------------------------------
# train (everything up to the training itself)
# --------------------------------------------------------------------------------------------

LOSS_TEXT = st.one_of(st.sampled_from(["ce", "mse", "abs", "smoothed-ce", "focal", "ce,mse",
                                       "ce,,mse", ",", "", "CE", " ce ", "ce,bogus"]),
                      st.text(max_size=6))


@settings(FUZZ, max_examples=60)
@given(args=argv(["train"], {
    "--loss": LOSS_TEXT, "--model": st.sampled_from(["softmax", "mlp", "cnn", "", "MLP"]),
    "--epochs": int_text, "--seed": int_text, "--lr": float_text,
    "--optimizer": st.sampled_from(["sgd", "adam", "rmsprop", "", "SGD"]),
    "--batch-size": int_text, "--hidden": int_text, "--out": dir_path}, flags=("--no-plots",)))
def test_train_fuzz(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str]) -> None:
    from crossent.cli import train as train_mod

    calls: list[tuple] = []
    monkeypatch.setattr(train_mod, "run", lambda *a, **kw: calls.append((a, kw)) or {})
    with scratch(tmp_path) as root:
        before = snapshot(root)
        result = CliRunner().invoke(app, args)
        check_contract(result, args, before, root)
        if result.exit_code == 2:
            assert calls == [], ("training started on bad input", args)


# --------------------------------------------------------------------------------------------
# bench (everything up to the first timed step)
# --------------------------------------------------------------------------------------------


class _TimingStarted(Exception):
    """Raised by the stand-ins: every check passed and the timing would start now."""


@settings(FUZZ, max_examples=25)
@given(args=argv(["bench"], {
    "--device": st.sampled_from(["cpu", "cuda", "cuda:7", "meta", "mps", "cpu:0", "", "CPU",
                                 "bogus", "cpu,cuda"]),
    "--repeats": int_text, "--warmup": int_text, "--load": int_text,
    "--bandwidth": float_text, "--out": dir_path,
}, flags=("--quick", "--crossover", "--no-memory", "ce-small", "ce-f64", "linear-f32")))
def test_bench_fuzz(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str]) -> None:
    bench = pytest.importorskip("crossent.torch.bench")

    def started(*a, **kw):
        raise _TimingStarted

    monkeypatch.setattr(bench, "time_config", started)
    monkeypatch.setattr(bench, "time_crossover", started)
    monkeypatch.setattr(bench, "CompetingLoad", lambda n: contextlib.nullcontext())
    with scratch(tmp_path) as root:
        before = snapshot(root)
        result = CliRunner().invoke(app, args)
        if isinstance(result.exception, _TimingStarted):
            return  # valid options: the checks all passed (progress lines on stderr)
        check_contract(result, args, before, root)


# --------------------------------------------------------------------------------------------
# any argv: commands, options and words in any order
# --------------------------------------------------------------------------------------------

SOUP = st.lists(st.one_of(
    st.sampled_from(["explain", "quiz", "nonsense", "--version", "-h", "--help", "--target",
                     "--probs", "--logits", "--base", "--seed", "--answers", "2", "0.5,0.5",
                     "e", "--binary", "--", "-", "", "\u00e9", "--install-completion"]),
    st.text(max_size=6)), max_size=7)


@settings(FUZZ, max_examples=80)
@given(args=SOUP)
def test_any_argv_fuzz(tmp_path: Path, args: list[str]) -> None:
    with scratch(tmp_path) as root:
        before = snapshot(root)
        result = CliRunner().invoke(app, args)
        check_contract(result, args, before, root)


# --------------------------------------------------------------------------------------------
# Found by the fuzz (each failed before its fix in this change)
# --------------------------------------------------------------------------------------------


def test_tour_html_and_out_on_the_same_path_is_refused_before_work(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from crossent.cli import plots
    from crossent.cli.files import write_atomic

    def quick_save(name: str, path: Path, base: float = 2.0, unit: str = "bits") -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)  # as plots.save does, small bytes
        write_atomic(path, b"<?xml version='1.0'?><svg></svg>")
        return path

    monkeypatch.setattr(plots, "save", quick_save)
    monkeypatch.setattr(plots, "render", lambda name, fmt="png", base=2.0, unit="bits":
                        b"<?xml version='1.0'?><svg></svg>" if fmt == "svg" else PNG)
    same = str(tmp_path / "tour")
    args = ["tour", "--out", same, "--html", same]
    result = CliRunner().invoke(app, args)
    check_contract(result, args, {}, tmp_path, allowed=(2,))
    assert "--html" in result.stderr or "--out" in result.stderr, result.stderr


def test_a_folder_in_the_way_of_an_output_file_is_found_before_work(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from crossent.cli import plots

    monkeypatch.setattr(plots, "render", lambda name, fmt="png", base=2.0, unit="bits": PNG)
    (tmp_path / "figs" / "log-loss.png").mkdir(parents=True)
    before = snapshot(tmp_path)
    args = ["tour", "--out", str(tmp_path / "figs")]
    result = CliRunner().invoke(app, args)
    check_contract(result, args, before, tmp_path, allowed=(2,))
    assert "log-loss.png" in result.stderr and ".tmp" not in result.stderr, result.stderr


def test_write_atomic_names_the_target_when_the_replace_fails(tmp_path: Path) -> None:
    from crossent import _files

    target = tmp_path / "metrics.json"
    target.mkdir()
    with pytest.raises(OSError) as err:
        _files.write_atomic(target, "{}")
    assert err.value.filename == str(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


MISTYPED = [
    pytest.param(["explain", "--probs", "0.5,0.5", "--target", "0", "--label-smoothing",
                  "0.0_1"], "--label-smoothing", id="label-smoothing-underscore"),
    pytest.param(["quiz", "--seed", "1_0", "--answers", "answers.txt"], "--seed",
                 id="seed-underscore"),
    pytest.param(["train", "--lr", "1_0", "--epochs", "1"], "--lr", id="lr-underscore"),
]


@pytest.mark.parametrize(("args", "option"), MISTYPED)
def test_mistyped_numbers_are_refused_in_every_option(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str], option: str) -> None:
    from crossent.cli import train as train_mod

    monkeypatch.setattr(train_mod, "run", lambda *a, **kw: {})
    with scratch(tmp_path) as root:
        before = snapshot(root)
        result = CliRunner().invoke(app, args)
        check_contract(result, args, before, root, allowed=(2,))
        assert option in result.stderr, result.stderr


# --------------------------------------------------------------------------------------------
# Real processes: the shape a shell sees
# --------------------------------------------------------------------------------------------

CLI = [sys.executable, "-m", "crossent.cli"]


@pytest.mark.parametrize("args", [
    ["explain", "--probs", "0.5,0.6", "--target", "0"],  # does not sum to 1
    ["plot", "log-loss", "--out", "missing/x.pdf"],  # an unknown format, in a missing folder
    ["quiz", "--seed", "-1", "--answers", "folder"],  # click's range check
], ids=["explain-sum", "plot-format", "quiz-seed"])
def test_real_process_one_line_exit_2(tmp_path: Path, args: list[str]) -> None:
    with scratch(tmp_path) as root:
        before = snapshot(root)
        done = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120,
                              check=False, cwd=root)
        assert done.returncode == 2, done
        assert done.stderr.count("\n") == 1 and done.stderr.startswith(f"crossent {args[0]}"), \
            done.stderr
        assert "Traceback" not in done.stderr and done.stdout == ""
        assert snapshot(root) == before


def test_real_process_non_utf8_path_bytes(tmp_path: Path) -> None:
    """A file name that is not UTF-8 (``$'\\xff.svg'``) reaches Python as a surrogate; the
    figure is written under that very name and the confirmation line does not fail."""
    name = os.fsencode(str(tmp_path)) + b"/\xff.svg"
    done = subprocess.run([os.fsencode(sys.executable), b"-m", b"crossent.cli", b"plot",
                           b"log-loss", b"--out", name], capture_output=True, timeout=120,
                          check=False)
    assert done.returncode == 0 and done.stderr == b"", done
    assert os.path.isfile(name) and complete(Path(os.fsdecode(name)))
