"""The ``crossent`` command: tour, explain, quiz, plot, train and bench.

What a user can cause ends as ONE line on stderr, never a traceback:

- a bad option or bad numbers (click's usage errors, :class:`crossent.errors.InputError` from
  the library's checks and the CLI's own) and an output that cannot be written (a path that is
  not writable, a full disk, ``/dev/full``): exit code 2;
- Ctrl-C: ``crossent CMD: interrupted``, exit code 130; SIGTERM (``kill``, a job scheduler,
  ``timeout``): ``crossent CMD: terminated``, exit code 143 (128 + 15), after the same clean-up;
- a reader that goes away (``crossent tour | head``): nothing said, exit code 1 (as rich,
  click and Python's documentation do).

Anything else (any other exception, ``ValueError`` included) is a bug and shows its traceback.
Output files are checked before the work starts and written atomically
(:mod:`crossent.cli.files`).
"""

from __future__ import annotations

import contextlib
import errno
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from typer.core import TyperArgument, TyperCommand, TyperGroup

from ..errors import InputError
from . import explain as explain_mod
from . import quiz as quiz_mod
from .common import (
    Base,
    clickx,
    console,
    integer,
    number,
    open_closed_streams,
    parse_numbers,
    parse_target,
    plain_text_streams,
    silence_stdout,
    units,
)
from .files import check_file_apart, check_files_in, check_output_path, write_atomic

EXTRAS = {"typer": "cli", "rich": "cli", "matplotlib": "cli", "sklearn": "cli", "torch": "torch"}
"""Optional dependencies and their extra: a missing one is named with the install command."""

# errors of writing an output (a file, stdout; checked paths can still fail: a full disk, a
# folder made read-only meanwhile): reported in one line, exit code 2
_OUTPUT_ERRNOS = frozenset({
    errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM,
    errno.ENAMETOOLONG, errno.ENOTDIR, errno.EISDIR, errno.EIO,
})
BROKEN_PIPE_EXIT = 1
TERMINATED_EXIT = 128 + signal.SIGTERM  # as the shell reports a process SIGTERM ended


class Terminated(BaseException):
    """SIGTERM, raised where the command is, as Ctrl-C raises KeyboardInterrupt: the clean-ups
    run (:func:`crossent.cli.files.write_atomic` removes its temporary file), where Python's
    default action would end the process at once. A BaseException, so that no ``except
    Exception`` on the way swallows it."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """SIGTERM raises :class:`Terminated` in the block; the previous handler is restored after
    it (the command may run inside a test runner, or another program)."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGTERM) is signal.SIG_IGN):
        # only the main thread may handle signals (a runner's worker thread); a SIGTERM
        # the process was started ignoring stays ignored (as Python's SIGINT handler is
        # not installed where SIGINT is ignored, nohup and `trap '' TERM`)
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:  # None: a handler set outside Python, which cannot be put back; the default
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


class _Failure(Exception):
    """A failure already put into words: ``line`` (None: say nothing), the exit code, and
    whether stdout itself failed."""

    def __init__(self, line: str | None, code: int, *, stdout_failed: bool = False) -> None:
        super().__init__(line)
        self.line, self.code, self.stdout_failed = line, code, stdout_failed


def _failure(err: BaseException, where: str) -> _Failure | None:
    """The one-line report of ``err`` raised by ``crossent CMD`` (``where``), or None for a
    bug (which keeps its traceback)."""
    if isinstance(err, InputError):
        return _Failure(f"{where}: error: {err}", 2)
    if isinstance(err, KeyboardInterrupt):
        return _Failure(f"{where}: interrupted", 130)
    if isinstance(err, Terminated):
        return _Failure(f"{where}: terminated", TERMINATED_EXIT)
    if isinstance(err, BrokenPipeError):
        return _Failure(None, BROKEN_PIPE_EXIT, stdout_failed=True)
    top = (err.name or "").partition(".")[0] if isinstance(err, ModuleNotFoundError) else ""
    if top in EXTRAS:
        return _Failure(f"{where}: error: needs {top}: pip install 'crossent[{EXTRAS[top]}]'", 1)
    if isinstance(err, MemoryError):
        return _Failure(f"{where}: error: not enough memory for these options ({err})", 2)
    if isinstance(err, OSError) and err.errno in _OUTPUT_ERRNOS:
        if err.filename is None:  # a stream: stdout (stderr failing cannot be reported)
            return _Failure(f"{where}: error: cannot write standard output: {err.strerror}", 2,
                            stdout_failed=True)
        return _Failure(f"{where}: error: {err.filename}: {err.strerror}", 2)
    return None


class OneLineErrors(TyperGroup):
    """Run the commands; report the failures a user can cause in one stderr line."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except (Exception, KeyboardInterrupt, Terminated) as err:
            # here, not in main(): typer turns KeyboardInterrupt into a silent exit 130
            if isinstance(err, clickx.ClickException | typer.Exit | typer.Abort):
                raise
            failure = _failure(err, " ".join(["crossent", ctx.invoked_subcommand or ""]).strip())
            if failure is None:
                raise
            raise failure from None

    def main(  # type: ignore[override]
        self, args: list[str] | None = None, prog_name: str | None = None,
        standalone_mode: bool = True, **extra: Any,
    ) -> Any:
        argv = list(sys.argv[1:] if args is None else args) or ["--help"]  # help once
        if not open_closed_streams():  # crossent ... >&-
            code = _report(_Failure("crossent: error: cannot write standard output: it is "
                                    "closed", 2))
            if standalone_mode:
                sys.exit(code)
            return code
        plain_text_streams()
        try:
            with _sigterm_raises():
                rv = super().main(args=argv, prog_name="crossent",  # also under a test runner
                                  standalone_mode=False, **extra)
                sys.stdout.flush()  # a full disk or a closed pipe shows here, not at exit
            code = rv if isinstance(rv, int) else 0
        except Terminated:  # outside a command: while the options were read
            code = _report(_Failure("crossent: terminated", TERMINATED_EXIT))
        except _Failure as f:
            code = _report(f)
        except clickx.UsageError as e:
            where = e.ctx.command_path if e.ctx else "crossent"
            # typer's choice check words a bad value as pydantic does ("Value error, '3' is
            # not one of ..."): the prefix says nothing a learner can use (review H98-5)
            message = e.format_message().replace(": Value error, ", ": ")
            code = _report(_Failure(f"{where}: error: {message}", 2))
        except clickx.ClickException as e:
            code = _report(_Failure(f"crossent: error: {e.format_message()}", e.exit_code))
        except typer.Abort:
            code = _report(_Failure("crossent: aborted", 1))
        except OSError as e:
            failure = _failure(e, "crossent")
            if failure is None:
                raise
            code = _report(failure)
        if standalone_mode:
            sys.exit(code)
        return code


class PlainCommand(TyperCommand):
    """A command whose help shows its arguments as click does: ``NAME``, not ``{NAME}`` in the
    usage line and ``NAME <str>`` or ``CONFIG <list[str]>`` in the list."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for param in self.params:
            if isinstance(param, TyperArgument):
                name = param.metavar or (param.name or "").upper()
                usage = (name if param.required else f"[{name}]") + (
                    "..." if param.nargs != 1 else "")
                param.display_type_rich = lambda ctx: None  # type: ignore[method-assign]
                param._usage_display_name = lambda usage=usage: usage  # type: ignore[method-assign,misc]


def _report(f: _Failure) -> int:
    """Print ``f``'s line on stderr; after a failed stdout, send what is left to /dev/null."""
    if f.stdout_failed:
        silence_stdout()
    if f.line is not None:
        with contextlib.suppress(OSError, ValueError):  # stderr itself failing: say nothing
            sys.stderr.write(" ".join(f.line.split()) + "\n")
            sys.stderr.flush()
    return f.code


app = typer.Typer(
    cls=OneLineErrors,
    help="Cross-entropy, from surprise to the loss: a guided tour, step-by-step "
    "explanations, a quiz and figures, every number computed by crossent.",
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},  # what a new user tries first
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help: no "<bool>" labels, no box drawing, any terminal
)


def _print_version(value: bool) -> None:
    if value:
        from .. import __version__

        print(f"crossent {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="Show crossent's version and exit.")] = False,
) -> None:
    """Cross-entropy, from surprise to the loss: a guided tour, step-by-step explanations, a
    quiz and figures, every number computed by crossent."""


BaseOpt = Annotated[Base, typer.Option(
    "--base", help="log base: 2 (bits), e (nats), 10 (hartleys)")]


@app.command(short_help="The article step by step, every worked example computed.")
def tour(
    base: BaseOpt = Base.two,
    out_dir: Annotated[str, typer.Option("--out", metavar="DIR", help="folder for the "
                                         "figures (created if missing)")] = "crossent-figures",
    html_file: Annotated[str | None, typer.Option("--html", metavar="FILE", help="write the "
                                                  "tour as one self-contained web page "
                                                  "(missing folders are created)")
                         ] = None,
    no_plots: Annotated[bool, typer.Option("--no-plots", help="draw no figures")] = False,
) -> None:
    """Walk through surprise, entropy, cross-entropy and the loss, with every worked example."""
    # paths are str, not Path: typer turns "" into Path("."), and an empty path is an error
    out = check_output_path(out_dir, "--out", directory=True) if not no_plots else Path()
    html = None if html_file is None else check_output_path(html_file, "--html")
    from . import plots
    from . import tour as tour_mod

    content = tour_mod.build_tour(base)
    files = {} if no_plots else {name: f"{name}.png" for s in content.sections
                                 for name in s.figures}
    if files:  # before the first figure is drawn
        check_files_in(out, files.values(), "--out")
        if html is not None:
            check_file_apart(html, "--html", out, "--out", files.values())
    figures: dict[str, Path] = {}
    unit = units(base)[0]
    # every figure and the page drawn before the first file is written: Ctrl-C while
    # drawing (seconds) leaves the folder as it was, not holding some of the outputs
    drawn = {name: plots.draw(name, out / file, unit.base, unit.name)
             for name, file in files.items()}
    if html is not None:
        from . import html as html_mod

        page = html_mod.page(content, with_figures=not no_plots)
    # and every file written before the tour is printed: a reader that leaves while it
    # prints (crossent tour --html page.html | head) must not leave the figures without page
    for name, file in files.items():
        figures[name] = plots.write(out / file, drawn[name])
    if html is not None:
        html_mod.write_page(html, page)
    con = console()
    tour_mod.render(content, con, figures)
    if html is not None:
        con.print(f"\nweb page written: {escape(str(html))}")


@app.command(short_help="One loss, every intermediate: softmax, terms, sum, gradient.")
def explain(
    target: Annotated[str, typer.Option("--target", metavar="T", help="class index (2) or "
                                        "probabilities (0,0,1)")],
    probs: Annotated[str | None, typer.Option("--probs", metavar="Q", help="predicted "
                                              "probabilities, e.g. 0.1,0.2,0.7")] = None,
    logits: Annotated[str | None, typer.Option("--logits", metavar="A", help="logits, e.g. "
                                               "1.2,0.3,2.0")] = None,
    label_smoothing: Annotated[float, typer.Option("--label-smoothing", parser=number,
                                                   metavar="ALPHA", help="alpha in [0, 1]")
                               ] = 0.0,
    base: BaseOpt = Base.two,
    binary: Annotated[bool, typer.Option("--binary", help="binary cross-entropy (one "
                                         "probability of the positive class)")] = False,
    multilabel: Annotated[bool, typer.Option("--multilabel", help="multi-label: a sum of "
                                             "binary cross-entropies")] = False,
) -> None:
    """Show every intermediate of one loss: softmax, target, each term, the sum, the gradient."""
    opts: dict[str, Any] = {
        "probs": None if probs is None else parse_numbers(probs, "--probs"),
        "logits": None if logits is None else parse_numbers(logits, "--logits"),
        "target": parse_target(target), "label_smoothing": label_smoothing,
        "binary": binary, "multilabel": multilabel,
    }
    unit, beside = units(base)
    result = explain_mod.compute(base=unit.base, **opts)
    other = explain_mod.compute(base=beside.base, **opts)
    explain_mod.render(result, other.loss, base, console())


@app.command(short_help="The article's questions plus numeric ones, answers checked.")
def quiz(
    seed: Annotated[int | None, typer.Option("--seed", parser=integer(0), metavar="N",
                                             help="seed for the generated questions "
                                             "(random if omitted) [x>=0]")
                    ] = None,
    answers: Annotated[str | None, typer.Option("--answers", metavar="FILE", help="file with "
                                                "one answer per line (non-interactive)")
                       ] = None,
) -> None:
    """The article's five questions plus generated numeric ones, answers checked."""
    import secrets

    con = console()
    if seed is None:
        seed = secrets.randbelow(10_000)
    if answers is not None:
        lines = quiz_mod.read_answers(answers, "--answers")
        read = quiz_mod.file_reader(iter(lines), con)
    else:
        read = quiz_mod.stdin_reader(con)
    code = quiz_mod.run(seed, con, read)
    if code:
        raise typer.Exit(code)


@app.command(cls=PlainCommand)
def plot(
    name: Annotated[str, typer.Argument(metavar="NAME", help="surprisal, coin-entropy, "
                                        "log-loss, cross-entropy-vs-entropy, gradient or "
                                        "training")],
    out_file: Annotated[str, typer.Option("--out", metavar="FILE", help="FILE.png or "
                                          "FILE.svg; missing folders are created")],
    base: BaseOpt = Base.two,
) -> None:
    """Draw one of the tour's figures to a PNG or SVG file."""
    from . import plots

    if name not in plots.NAMES:
        raise InputError(f"unknown plot {name!r}; choose one of {', '.join(plots.NAMES)}")
    fmt = Path(out_file).suffix.lower().lstrip(".")
    if fmt not in ("png", "svg"):
        raise InputError(f"--out {out_file!r} must end in .png or .svg")
    out = check_output_path(out_file, "--out")
    unit = units(base)[0]
    data = plots.render(name, fmt, unit.base, unit.name)
    out.parent.mkdir(parents=True, exist_ok=True)  # documented: --out creates its folders
    write_atomic(out, data)
    console().print(f"figure written: {escape(str(out))}")  # a path is no rich markup


@app.command(short_help="Train on the digits with each loss: accuracy, calibration.")
def train(
    loss: Annotated[list[str] | None, typer.Option(
        "--loss", metavar="LOSS", help="ce, mse, abs, smoothed-ce or focal; repeat it or "
        "separate with commas (default: every loss, compared)")] = None,
    model: Annotated[str, typer.Option("--model", metavar="MODEL", help="softmax "
                                       "(regression) or mlp (one hidden layer)")] = "mlp",
    epochs: Annotated[int, typer.Option("--epochs", parser=integer(1), metavar="N",
                                        help="passes over the training set [x>=1]")] = 30,
    seed: Annotated[int, typer.Option("--seed", parser=integer(0), metavar="N", help="seed of the "
                                      "initial weights and the batch order (same seed, same "
                                      "numbers) [x>=0]")] = 0,
    lr: Annotated[float, typer.Option("--lr", parser=number, metavar="LR",
                                      help="learning rate")] = 0.1,
    optimizer: Annotated[str, typer.Option("--optimizer", metavar="OPT", help="sgd or adam")
                         ] = "sgd",
    batch_size: Annotated[int, typer.Option("--batch-size", parser=integer(1), metavar="N",
                                            help="mini-batch size [x>=1]")] = 32,
    hidden: Annotated[int, typer.Option("--hidden", parser=integer(1), metavar="N",
                                        help="hidden units of the mlp [x>=1]")] = 64,
    out_dir: Annotated[str, typer.Option("--out", metavar="DIR", help="folder for "
                                         "metrics.json and the figures (created if missing)")
                       ] = "crossent-train",
    no_plots: Annotated[bool, typer.Option("--no-plots", help="draw no figures")] = False,
) -> None:
    """Train on scikit-learn's digits with each loss and compare: accuracy, calibration."""
    from . import train as train_mod

    out = check_output_path(out_dir, "--out", directory=True)
    losses = train_mod.parse_losses(loss)
    check_files_in(out, train_mod.output_files(losses, plots=not no_plots), "--out")
    config = train_mod.tr.TrainConfig(model=model, epochs=epochs, lr=lr, optimizer=optimizer,
                                      batch_size=batch_size, hidden=hidden, seed=seed)
    train_mod.run(losses, config, out, console(), plots=not no_plots)


@app.command(cls=PlainCommand,
             short_help="Time crossent.torch against torch: a table, JSON and a figure.")
def bench(
    configs: Annotated[list[str] | None, typer.Argument(
        metavar="CONFIG", help="configurations, e.g. ce-small (the quickest) or "
        "linear-bf16; a wrong name lists them all (default on CPU: ce-f32 ce-bf16 ce-v128k "
        "linear-f32; on CUDA: the gpu-* sizes of 16384 x 128256 and 8192 x 256000 logits "
        "and the 16384 x 4096 x 128256 linear head)")] = None,
    device: Annotated[str | None, typer.Option("--device", metavar="DEVICE", help="cpu or "
                                               "cuda (default: cuda when present)")] = None,
    repeats: Annotated[int, typer.Option("--repeats", parser=integer(1), metavar="N",
                                         help="timed runs per contender (the median is "
                                         "reported) [x>=1]")] = 5,
    warmup: Annotated[int, typer.Option("--warmup", parser=integer(0), metavar="N",
                                        help="untimed runs first [x>=0]")] = 1,
    memory: Annotated[bool, typer.Option("--memory/--no-memory", help="peak memory (CPU: "
                                         "one fresh process per contender; CUDA: "
                                         "max_memory_allocated in the timed steps)")] = True,
    quick: Annotated[bool, typer.Option("--quick", help="tiny sizes: a smoke test")] = False,
    out_dir: Annotated[str, typer.Option("--out", metavar="DIR", help="folder for bench.json "
                                         "and bench.png (created if missing)")
                       ] = "crossent-bench",
    load: Annotated[int, typer.Option("--load", parser=integer(0), metavar="N",
                                      help="N busy processes compete for the cores "
                                      "while timing (one per core: a busy training "
                                      "machine); the load average before and after each "
                                      "contender is recorded either way [x>=0]")] = 0,
    crossover: Annotated[bool, typer.Option("--crossover", help="sweep N x V from tiny to "
                                            "large: crossent / torch eager against the size, "
                                            "crossover.png (alone unless CONFIGs are named)")
                         ] = False,
    compiled_kernel: Annotated[bool, typer.Option(
        "--compiled-kernel", help="also time crossent with set_compiled_kernel(True) on the "
        "cross-entropy configurations (CPU; compiles 5-25 s per dtype)")] = False,
    bandwidth: Annotated[float | None, typer.Option(
        "--bandwidth", parser=number, metavar="BYTES_PER_S", help="memory bandwidth for "
        "the floor of the cross-entropy steps, 2 N V itemsize / bandwidth (default on "
        "CUDA: looked up from the GPU's name, e.g. H200 4.8e12, H100 SXM 3.35e12; none for "
        "an unknown GPU)")
                         ] = None,
) -> None:
    """Time crossent.torch against torch (eager, compiled, unfused, chunked).

    On CUDA also Liger Kernel and Cut Cross-Entropy when installed, and the HBM floor.
    Prints progress and an estimate of the time left on stderr, a table on stdout, and writes
    bench.json and bench.png to --out. The same as python -m crossent.torch.bench.
    """
    from ..torch import bench as bench_mod  # needs torch: a missing one is named, exit 1

    # each once: one JSON entry; --crossover alone runs only the sweep; none named: the
    # default of the device (bench_mod.default_configs)
    chosen = list(dict.fromkeys(configs)) if configs else ([] if crossover else None)
    bench_mod.run(chosen, device=device, repeats=repeats, warmup=warmup,
                  memory=memory, quick=quick, out=out_dir, load=load, crossover=crossover,
                  compiled_kernel=compiled_kernel, bandwidth=bandwidth)


def main() -> None:
    """Entry point of the ``crossent`` console script."""
    app()
