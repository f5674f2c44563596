"""Adversarial review of the ``crossent`` command (session 20).

What the other CLI tests leave out: every number ``explain`` prints (q, the smoothed target,
each term, the loss in both units, the gradient) against torch float64 autograd for option
combinations not pinned elsewhere (soft target + smoothing in hartleys, a binary logit with
Keras smoothing, multi-label probabilities with smoothing, logits at float64's edge); numeric
spellings at the edge; the environment (NO_COLOR, COLUMNS, TERM=dumb, the C locale, a reader
that leaves mid-output); Ctrl-C while the tour writes its figures; the quiz's answers over
many seeds; huge seeds and sizes; ``bench --quick`` on CPU with a known --bandwidth.

The five bugs this review found (stop 29: explain's loss beside its terms, COLUMNS=0, a quiz
stdin that is not UTF-8, a subnormal --bandwidth, Ctrl-C in the tour's figures) are fixed;
their tests pass.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from crossent.cli import app

pytestmark = pytest.mark.timeout(60)

CLI = [sys.executable, "-m", "crossent.cli"]
LN = {"2": math.log(2.0), "e": 1.0, "10": math.log(10.0)}
UNIT = {"2": "bits", "e": "nats", "10": "hartleys"}
BESIDE = {"2": ("nats", "e"), "e": ("bits", "2"), "10": ("nats", "e")}


# --------------------------------------------------------------------------------------------
# Reading explain's output
# --------------------------------------------------------------------------------------------


def table(out: str) -> dict[str, list[float]]:
    """explain's table as columns: header -> the numbers printed under it."""
    lines = out.splitlines()
    rule = next(i for i, line in enumerate(lines) if line and set(line) == {"-"})
    headers = re.split(r"\s{2,}", lines[rule - 1].strip())
    cols: dict[str, list[float]] = {h: [] for h in headers}
    for line in lines[rule + 1:]:
        cells = line.split()
        if len(cells) != len(headers):
            break
        for h, c in zip(headers, cells, strict=True):
            cols[h].append(float(c))
    return cols


def loss_line(out: str) -> tuple[float, str, float, str]:
    """The loss line's numbers and units, whitespace ignored (a narrow terminal wraps it,
    at 1 column between every character)."""
    compact = "".join(out.split())
    unit = "(bits|nats|hartleys)"
    m = re.search(r"loss=(?:sumoftheterms|theterm)=([-+0-9.e]+?|inf)" + unit +
                  r"\(([-+0-9.e]+?|inf)" + unit + r"\)", compact)
    assert m, out
    return float(m.group(1)), m.group(2), float(m.group(3)), m.group(4)


def close(printed: float, exact: float) -> bool:
    """``printed`` is ``exact`` as the CLI writes it: 6 decimals (scientific from 1e15)."""
    if math.isinf(exact) or math.isnan(exact):
        return printed == exact or (math.isnan(printed) and math.isnan(exact))
    return abs(printed - exact) <= 5.01e-7 + 5e-7 * abs(exact)


def assert_all_close(printed: list[float], exact, what: str) -> None:
    exact = [float(x) for x in exact]
    assert len(printed) == len(exact), (what, printed, exact)
    bad = [(p, e) for p, e in zip(printed, exact, strict=True) if not close(p, e)]
    assert not bad, f"{what}: printed vs exact {bad}"


def explain(*args: str) -> str:
    result = CliRunner().invoke(app, ["explain", *args])
    assert result.exit_code == 0, (result.stderr, result.exception)
    assert result.stderr == ""
    return result.stdout


def one_line_exit_2(result, needle: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr,
                                   result.exception)
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    assert needle in result.stderr, result.stderr


def t64(xs) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float64)


# --------------------------------------------------------------------------------------------
# explain's numbers against torch float64 (autograd for the gradient)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("base", ["2", "e", "10"])
def test_explain_soft_target_with_smoothing_matches_torch(base: str) -> None:
    logits, target, alpha = [0.5, -1.25, 3.0, 0.0], [0.1, 0.2, 0.3, 0.4], 0.3
    out = explain("--logits", ",".join(map(str, logits)), "--target",
                  ",".join(map(str, target)), "--label-smoothing", str(alpha), "--base", base)
    z = t64(logits).requires_grad_()
    t = t64(target)
    loss = F.cross_entropy(z[None], t[None], label_smoothing=alpha, reduction="sum")
    (grad,) = torch.autograd.grad(loss, z)
    q = torch.softmax(z.detach(), -1)
    smoothed = (1 - alpha) * t + alpha / len(logits)
    cols = table(out)
    assert_all_close(cols["q"], q, "q")
    assert_all_close(cols["target t"], t, "t")
    assert_all_close(cols["smoothed t"], smoothed, "smoothed t")
    assert_all_close(cols["term"], -smoothed * torch.log_softmax(z.detach(), -1) / LN[base],
                     "term")
    assert_all_close(cols["gradient"], grad, "gradient")
    value, unit, beside, beside_unit = loss_line(out)
    assert (unit, beside_unit) == (UNIT[base], BESIDE[base][0])
    assert close(value, loss.item() / LN[base]), (value, loss.item() / LN[base])
    assert close(beside, loss.item() / LN[BESIDE[base][1]])


@pytest.mark.parametrize(("x", "t", "alpha"), [(2.5, 1, 0.2), (-30.0, 1, 0.0),
                                               (40.0, 0, 0.5), (0.0, 0, 1.0)])
def test_explain_binary_logit_with_smoothing_matches_torch(x: float, t: int,
                                                           alpha: float) -> None:
    """Keras' binary smoothing t (1 - a) + a / 2, then BCE with logits; in nats."""
    out = explain("--logits", repr(x), "--target", str(t), "--binary", "--label-smoothing",
                  repr(alpha), "--base", "e")
    z = t64([x]).requires_grad_()
    ts = t64([t * (1 - alpha) + alpha / 2])
    loss = F.binary_cross_entropy_with_logits(z, ts, reduction="sum")
    (grad,) = torch.autograd.grad(loss, z)
    cols = table(out)
    assert_all_close(cols["q"], torch.sigmoid(z.detach()), "q")
    assert_all_close(cols["term"], [loss.item()], "term")
    assert_all_close(cols["gradient"], grad, "gradient")
    value, unit, beside, _ = loss_line(out)
    assert unit == "nats" and close(value, loss.item()), (value, loss.item())
    assert close(beside, loss.item() / math.log(2))


def test_explain_multilabel_probabilities_with_smoothing_match_torch() -> None:
    q, t, alpha = [0.9, 0.25, 0.5, 0.001], [1.0, 0.0, 0.5, 1.0], 0.1
    out = explain("--probs", ",".join(map(str, q)), "--target", ",".join(map(str, t)),
                  "--multilabel", "--label-smoothing", str(alpha))
    ts = t64(t) * (1 - alpha) + alpha / 2
    per_label = F.binary_cross_entropy(t64(q), ts, reduction="none")
    cols = table(out)
    assert_all_close(cols["smoothed t"], ts, "smoothed t")
    assert_all_close(cols["term"], per_label / math.log(2), "term")
    assert_all_close(cols["pos"], -ts * torch.log(t64(q)) / math.log(2), "pos")
    assert_all_close(cols["neg"], -(1 - ts) * torch.log1p(-t64(q)) / math.log(2), "neg")
    assert_all_close(cols["gradient"], t64(q) - ts, "gradient")  # sigmoid(logit(q)) - t
    value, unit, beside, _ = loss_line(out)
    assert unit == "bits" and close(value, per_label.sum().item() / math.log(2))
    assert close(beside, per_label.sum().item())


def test_explain_multilabel_probabilities_zero_and_one_are_clamped_as_torch() -> None:
    """q of exactly 0 and 1 against the wrong labels, smoothed: torch's BCE clamps each log
    at -100; terms, loss and the gradient q - t as torch's."""
    q, t, alpha = [0.0, 1.0, 0.0, 1.0], [1.0, 0.0, 0.0, 1.0], 0.2
    out = explain("--probs", ",".join(map(str, q)), "--target", ",".join(map(str, t)),
                  "--multilabel", "--label-smoothing", str(alpha), "--base", "e")
    ts = t64(t) * (1 - alpha) + alpha / 2
    per_label = F.binary_cross_entropy(t64(q), ts, reduction="none")
    cols = table(out)
    assert_all_close(cols["term"], per_label, "term")
    assert_all_close(cols["gradient"], t64(q) - ts, "gradient")
    assert close(loss_line(out)[0], per_label.sum().item())


@pytest.mark.parametrize(("logits", "target"), [
    (["1e300", "1e300"], 0),  # equal huge logits: ln 2, not 0 (lse absorbed into the max)
    (["1000", "-1000"], 1),  # exp overflows float64: 2000 nats
    (["-0", "0", "-0.0"], 2),  # negative zeros: ln 3
    (["5e-324", "-5e-324"], 0),  # subnormals: ln 2
    (["1E2", "+.5", "5."], 0),
], ids=["equal-huge", "overflow", "neg-zero", "subnormal", "spellings"])
def test_explain_logits_at_float64_edges_match_torch(logits: list[str], target: int) -> None:
    out = explain("--logits", ",".join(logits), "--target", str(target), "--base", "e")
    z = t64([float(v) for v in logits]).requires_grad_()
    loss = F.cross_entropy(z[None], torch.tensor([target]), reduction="sum")
    (grad,) = torch.autograd.grad(loss, z)
    value, _, _, _ = loss_line(out)
    assert close(value, loss.item()), (value, loss.item())
    cols = table(out)
    assert_all_close(cols["gradient"], grad, "gradient")
    assert_all_close(cols["q"], torch.softmax(z.detach(), -1), "q")


def test_explain_probability_zero_at_the_target_costs_infinity_as_torch() -> None:
    out = explain("--probs", "0,0.25,0.75", "--target", "0")
    ref = F.nll_loss(torch.log(t64([[0.0, 0.25, 0.75]])), torch.tensor([0]), reduction="sum")
    assert math.isinf(ref.item())
    value, _, beside, _ = loss_line(out)
    assert value == math.inf and beside == math.inf
    assert_all_close(table(out)["gradient"], [-1.0, 0.25, 0.75], "gradient")  # q - t


@pytest.mark.parametrize(("probs", "target", "alpha"), [
    ("0.5,0.50009", "1", "0"), ("0.2,0.3,0.50009", "0,0,1", "0.3"),
    ("0.25,0.25,0.25,0.24992", "3", "0")])
def test_explain_loss_is_the_sum_of_the_printed_terms(probs: str, target: str,
                                                      alpha: str) -> None:
    """The output says ``loss = sum of the terms``; with q as given (``q: as given``) every
    term is t log2(1/q), so the loss is their sum, as torch's nll_loss of log q."""
    out = explain("--probs", probs, "--target", target, "--label-smoothing", alpha)
    q = t64([float(v) for v in probs.split(",")])
    t = (F.one_hot(torch.tensor(int(target)), len(q)).double() if "," not in target
         else t64([float(v) for v in target.split(",")]))
    t = t * (1 - float(alpha)) + float(alpha) / len(q)
    terms = -t * torch.log(q) / math.log(2)
    cols = table(out)
    assert_all_close(cols["term"], terms, "term")
    value = loss_line(out)[0]
    assert abs(value - sum(cols["term"])) <= 5e-6, (value, sum(cols["term"]))
    assert close(value, terms.sum().item()), (value, terms.sum().item())


@pytest.mark.parametrize(("args", "needle"), [
    (["--probs", "-0.1,1.1", "--target", "0"], "probs"),
    (["--probs", "0.5,0.5002", "--target", "0"], "sum to 1"),
    (["--probs", "0.2,0.8", "--target", "-0.5,1.5"], "target"),
    (["--probs", "0.2,0.8", "--target", "0.5,0.6"], "target"),
    (["--probs", "0.2,0.3,0.5", "--target", "0.5,0.5"], "target"),
    (["--logits", "1,2", "--target", "1,0,1", "--multilabel"], "target"),
    (["--probs", "0.5,0.5", "--target", "1", "--binary"], "binary"),
    (["--logits", "1e309", "--target", "0"], "--logits"),
    (["--logits", "0x10", "--target", "0"], "--logits"),
    (["--logits", "1,,2", "--target", "0"], "--logits"),
    (["--logits", "1,2", "--target", "2"], "out of range"),
    (["--logits", "1,2", "--target", "1e309"], "--target"),
    (["--logits", "1,2", "--target", "\u0661"], "--target"),
    (["--logits", "1,2", "--target", "0", "--label-smoothing", "1.0000001"],
     "label_smoothing"),
    (["--logits", "1,2", "--target", "0", "--label-smoothing", "-1e-300"], "label_smoothing"),
    (["--logits", "1,2", "--target", "0", "--label-smoothing", "1e309"], "label_smoothing"),
    (["--logits", "1,2", "--target", "0", "--binary", "--multilabel"], "--binary"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_explain_bad_numbers_are_one_line(args: list[str], needle: str) -> None:
    one_line_exit_2(CliRunner().invoke(app, ["explain", *args]), needle)


def test_explain_a_long_logit_list_matches_torch() -> None:
    """5000 logits in one option: every gradient entry and the loss as torch's."""
    gen = torch.Generator().manual_seed(3)
    z = (torch.randn(5000, generator=gen, dtype=torch.float64) * 7).round(decimals=3)
    out = explain("--logits", ",".join(f"{v:.3f}" for v in z.tolist()), "--target", "4321",
                  "--base", "e")
    zg = z.clone().requires_grad_()
    loss = F.cross_entropy(zg[None], torch.tensor([4321]), reduction="sum")
    (grad,) = torch.autograd.grad(loss, zg)
    assert close(loss_line(out)[0], loss.item())
    assert_all_close(table(out)["gradient"], grad, "gradient")


# --------------------------------------------------------------------------------------------
# The quiz's answers over many seeds, huge seeds
# --------------------------------------------------------------------------------------------


def test_quiz_answers_are_right_for_many_seeds() -> None:
    """Every generated question's answer (nats and bits), from the question's own text."""
    runner = CliRunner()
    for seed in range(0, 60, 3):
        out = runner.invoke(app, ["quiz", "--seed", str(seed)], input="x\n" * 7).stdout
        flat = " ".join(out.split())
        m = re.search(r"predicts \[([^\]]*)\] for an example of class (\d+)", flat)
        b = re.search(r"gives q0 = ([\d.]+) for an image that (is|is not) a cat", flat)
        assert m and b, flat
        probs = [float(v) for v in m.group(1).split(",")]
        assert abs(sum(probs) - 1) < 1e-9 and min(probs) > 0, probs
        q0 = float(b.group(1))
        exact = [-math.log(probs[int(m.group(2))]),
                 -math.log(q0) if b.group(2) == "is" else -math.log1p(-q0)]
        shown = [(float(a), float(c)) for a, c in re.findall(
            r"the answer is (\S+) nats \((\S+) bits\)", flat)]
        assert len(shown) == 3, flat
        for (nats, bits), e in zip(shown[1:], exact, strict=True):
            assert close(nats, e) and close(bits, e / math.log(2)), (seed, nats, bits, e)


Q4 = math.log(1 / 0.7)  # the article's quiz 4 in nats


@pytest.mark.parametrize(("answer", "verdict"), [
    (f"{Q4 + 0.0049:.7f}", "Correct!"), (f"{Q4 - 0.0049:.7f}", "Correct!"),
    (f"{Q4 + 0.0051:.7f}", "Not quite"), (f"{Q4 - 0.0051:.7f}", "Not quite"),
    (f"{math.log2(1 / 0.7) - 0.0049:.7f}", "Correct!"),  # bits
    (f"{math.log2(1 / 0.7) + 0.0051:.7f}", "Not quite"),
    ("nan", "Not quite"), ("inf", "Not quite"), ("1e309", "Not quite"), ("-0", "Not quite"),
])
def test_quiz_tolerance_is_0005_in_either_unit(answer: str, verdict: str) -> None:
    result = CliRunner().invoke(app, ["quiz", "--seed", "2"], input=f"a\nb\nc\n{answer}\n")
    assert result.exit_code == 0, (result.stderr, result.exception)
    flat = " ".join(result.stdout.split())
    assert verdict in flat and ("Score: 1/1" if verdict == "Correct!" else "Score: 0/1") in flat


def test_quiz_stdin_that_is_not_utf8_is_one_line() -> None:
    env = {**os.environ, "PYTHONIOENCODING": "utf-8:strict"}
    done = subprocess.run([*CLI, "quiz", "--seed", "1"], input=b"a\n\xff\xfe\nc\n0.357\n",
                          capture_output=True, timeout=60, env=env, check=False)
    err = done.stderr.decode(errors="replace")
    assert done.returncode == 2 and "Traceback" not in err, err[-300:]
    assert err.count("\n") == 1 and err.startswith("crossent quiz: error: "), err


def test_quiz_huge_seed_runs() -> None:
    result = CliRunner().invoke(app, ["quiz", "--seed", "9" * 400], input="")
    assert result.exit_code == 0, (result.stderr, result.exception)
    assert "Quiz ended (end of input)" in result.stdout


# --------------------------------------------------------------------------------------------
# The environment, as a shell gives it
# --------------------------------------------------------------------------------------------

EXPLAIN_ARGS = ["explain", "--logits", "1.2,0.3,2.0", "--target", "0,0,1",
                "--label-smoothing", "0.1", "--base", "e"]


def _explain_reference() -> float:
    return F.cross_entropy(t64([[1.2, 0.3, 2.0]]), t64([[0.0, 0.0, 1.0]]),
                           label_smoothing=0.1).item()


@pytest.mark.parametrize("env", [
    {"NO_COLOR": "1"}, {"COLUMNS": "10"}, {"COLUMNS": "1"},
    {"COLUMNS": "0"},
    {"COLUMNS": "abc"}, {"COLUMNS": "-5", "LINES": "x"}, {"TERM": "dumb"},
    {"LANG": "C", "LC_ALL": "C"}, {"LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"},
], ids=["no-color", "columns-10", "columns-1", "columns-0", "columns-abc", "columns-negative",
        "term-dumb", "lang-c", "c-locale-no-coercion"])
def test_explain_in_odd_environments_prints_the_same_numbers(env: dict[str, str]) -> None:
    full = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "PYTHONIOENCODING")}
    done = subprocess.run([*CLI, *EXPLAIN_ARGS], capture_output=True, timeout=60,
                          env={**full, **env}, check=False)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    assert done.stderr == b"" and b"\x1b" not in done.stdout
    ascii_only = env.get("PYTHONUTF8") == "0"  # stdout is ASCII: the CLI must write ASCII
    out = done.stdout.decode("ascii", errors="strict" if ascii_only else "replace")
    assert close(loss_line(out)[0], _explain_reference())


@pytest.mark.parametrize("columns", [
    "0", "1", "100000"])
def test_tour_at_any_terminal_width(columns: str) -> None:
    result = CliRunner().invoke(app, ["tour", "--no-plots"], env={"COLUMNS": columns})
    assert result.exit_code == 0, (result.stderr, result.exception)
    assert "Traceback" not in result.output
    compact = "".join(result.stdout.split())
    assert compact.count("result:") >= 10 and "crossenttour" in compact, result.stdout[:500]


def _reader_leaves_after_one_byte(cmd: list[str], stdin: bytes = b"") -> tuple[int, bytes]:
    child = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
    try:
        assert child.stdin is not None and child.stdout is not None
        child.stdin.write(stdin)
        child.stdin.close()
        assert child.stdout.read(1)
        child.stdout.close()  # `| head -c1`
        err = child.stderr.read() if child.stderr else b""
        child.wait(timeout=60)
    finally:
        child.kill()
        child.wait()
    return child.returncode, err


def test_a_reader_that_leaves_mid_output_is_quiet() -> None:
    """``crossent explain ... | head -c1``: the reader goes after the first byte, while the
    command still writes (the pipe's 64 KiB buffer is far exceeded): exit 1, stderr silent."""
    probs = ",".join(["0.0001"] * 10_000)
    code, err = _reader_leaves_after_one_byte(
        [*CLI, "explain", "--probs", probs, "--target", "9"])
    assert (code, err) == (1, b""), err.decode(errors="replace")


# --------------------------------------------------------------------------------------------
# Files: paths with spaces and Unicode, '-', Ctrl-C mid-way
# --------------------------------------------------------------------------------------------


def test_plot_to_a_path_with_spaces_and_unicode(tmp_path: Path) -> None:
    out = tmp_path / "a folder \u00e9\u4e2d" / "log loss \u00fc.svg"
    result = CliRunner().invoke(app, ["plot", "log-loss", "--out", str(out)])
    assert result.exit_code == 0, result.stderr
    assert out.read_bytes().rstrip().endswith(b"</svg>")
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]


def test_plot_dash_is_refused_in_one_line_and_writes_nothing(tmp_path: Path,
                                                             monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["plot", "log-loss", "--out", "-"])
    one_line_exit_2(result, "--out")
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_during_an_atomic_write_keeps_the_old_file(tmp_path: Path, monkeypatch) -> None:
    """Ctrl-C between the bytes and the rename: exit 130 in one line, the old figure whole,
    no temporary file beside it."""
    from crossent import _files

    target = tmp_path / "x.svg"
    target.write_text("the good old figure")

    def interrupted(fd: int) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(_files.os, "fsync", interrupted)
    result = CliRunner().invoke(app, ["plot", "log-loss", "--out", str(target)])
    assert result.exit_code == 130 and result.stderr == "crossent plot: interrupted\n"
    assert target.read_text() == "the good old figure"
    assert [p.name for p in tmp_path.iterdir()] == ["x.svg"]


def test_ctrl_c_while_the_tour_writes_its_figures_leaves_nothing(tmp_path: Path,
                                                                 monkeypatch) -> None:
    from crossent.cli import plots

    real_draw, calls = plots.draw, []

    def draw(name, path, *args, **kwargs):
        calls.append(name)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_draw(name, path, *args, **kwargs)

    monkeypatch.setattr(plots, "draw", draw)
    out = tmp_path / "figs"
    result = CliRunner().invoke(app, ["tour", "--out", str(out)])
    assert result.exit_code == 130 and result.stderr.endswith("crossent tour: interrupted\n")
    assert list(tmp_path.iterdir()) == [], sorted(map(str, tmp_path.rglob("*")))


# --------------------------------------------------------------------------------------------
# Huge sizes and seeds: a bound, or a one-line refusal, never a traceback
# --------------------------------------------------------------------------------------------


def test_train_with_a_huge_seed_runs_and_records_it(tmp_path: Path) -> None:
    seed = 10**40
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "--seed", str(seed), "--epochs", "1", "--model",
                                      "softmax", "--loss", "ce", "--no-plots", "--out",
                                      str(out)])
    assert result.exit_code == 0, (result.stderr, result.exception)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["ce"]["settings"]["seed"] == seed


def test_train_hidden_beyond_memory_is_one_line(tmp_path: Path) -> None:
    """A real allocation failure (1 TiB for the first layer), not a monkeypatched one."""
    if Path("/proc/sys/vm/overcommit_memory").read_text().strip() == "1":
        pytest.skip("overcommit_memory=1: the allocation would not fail at once")
    out = tmp_path / "run"
    done = subprocess.run([*CLI, "train", "--hidden", str(2**31 - 1), "--epochs", "1",
                           "--loss", "ce", "--no-plots", "--out", str(out)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("crossent train: error: not enough memory")
    assert done.stderr.count("\n") == 1 and not out.exists()


# --------------------------------------------------------------------------------------------
# bench --quick on CPU
# --------------------------------------------------------------------------------------------


@pytest.fixture
def fast_bench(monkeypatch):
    """ce-small --quick without torch.compile (seconds of compiling per run)."""
    from crossent.torch import bench as bench_mod

    monkeypatch.setattr(bench_mod, "CE_CONTENDERS", ["exp-floor", "eager", "crossent"])
    return bench_mod


def _strict_json(text: str):
    def refuse(name: str):
        raise ValueError(f"not JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def test_bench_quick_floor_is_the_bandwidth_formula(fast_bench, tmp_path: Path) -> None:
    out = tmp_path / "b"
    result = CliRunner().invoke(app, ["bench", "ce-small", "--device", "cpu", "--quick",
                                      "--repeats", "2", "--warmup", "0", "--no-memory",
                                      "--bandwidth", "2.5e10", "--out", str(out)])
    assert result.exit_code == 0, (result.stderr, result.exception)
    data = _strict_json((out / "bench.json").read_text())
    entry = data["configs"]["ce-small"]
    _, n, v, _, dtype = entry["shape"]
    itemsize = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    assert math.isclose(entry["floor_ms"], 2 * n * v * itemsize / 2.5e10 * 1e3, rel_tol=1e-12)
    eager = entry["contenders"]["eager"]
    assert len(eager["runs_ms"]) == 2
    for r in entry["contenders"].values():
        assert math.isclose(r["vs_eager"], r["median_ms"] / eager["median_ms"], rel_tol=1e-12)
        assert math.isclose(r["vs_floor"], r["median_ms"] / entry["floor_ms"], rel_tol=1e-12)
    assert "ce-small" in result.stdout
    assert sorted(p.name for p in out.iterdir()) == ["bench.json", "bench.png"]


@pytest.mark.parametrize(("args", "needle"), [
    (["--load", str(4 * (os.cpu_count() or 1) + 1)], "--load"),
    (["--bandwidth", "0"], "--bandwidth"),
    (["--bandwidth", "-1e12"], "--bandwidth"),
    (["--bandwidth", "nan"], "--bandwidth"),
    (["--bandwidth", "inf"], "--bandwidth"),
    (["--bandwidth", "1e309"], "--bandwidth"),
    (["--bandwidth", "0x10"], "--bandwidth"),
    (["--device", ""], "--device"),
    (["--device", "cuda:-1"], "--device"),
    (["--device", "cpu", "--repeats", "-0"], "--repeats"),
    (["--crossover", "--quick", "--warmup", "-1"], "--warmup"),
    (["ce-small", ""], "''"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bench_bad_options_are_one_line_before_any_work(fast_bench, tmp_path: Path,
                                                        monkeypatch, args: list[str],
                                                        needle: str) -> None:
    def no_timing(*a, **k):
        raise AssertionError("timed before the options were checked")

    monkeypatch.setattr(fast_bench, "time_config", no_timing)
    monkeypatch.setattr(fast_bench, "time_crossover", no_timing)
    out = tmp_path / "b"
    result = CliRunner().invoke(app, ["bench", *args, "--out", str(out)])
    one_line_exit_2(result, needle)
    assert not out.exists()


@pytest.mark.parametrize("bandwidth", ["1e-300", "5e-324", "0.5"])
def test_bench_tiny_bandwidth_writes_strict_json(fast_bench, tmp_path: Path,
                                                 bandwidth: str) -> None:
    """A bandwidth so small that the floor overflows float64: refused in one line, or a
    bench.json that is still JSON (no ``Infinity``)."""
    out = tmp_path / "b"
    result = CliRunner().invoke(app, ["bench", "ce-small", "--device", "cpu", "--quick",
                                      "--repeats", "1", "--warmup", "0", "--no-memory",
                                      "--bandwidth", bandwidth, "--out", str(out)])
    if result.exit_code == 2:
        one_line_exit_2(result, "--bandwidth")
        assert not out.exists()
        return
    assert result.exit_code == 0, (result.stderr, result.exception)
    _strict_json((out / "bench.json").read_text())
