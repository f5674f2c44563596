"""The ``crossent`` command: tour, explain, quiz, plot, train and bench.

Every error a user can cause (a bad option, numbers that are not probabilities, a class
index out of range, an unknown plot) ends as ONE line on stderr and exit code 2, never a
traceback: usage errors come from click, value errors from the library's checks.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

try:  # typer >= 0.20 ships its own copy of click
    from typer._click import exceptions as clickx
except ImportError:  # pragma: no cover - older typer runs on click itself
    from click import exceptions as clickx  # type: ignore[no-redef]

from . import explain as explain_mod
from . import quiz as quiz_mod
from .common import Base, console, parse_numbers, parse_target, units


class OneLineErrors(TyperGroup):
    """Run the commands; turn usage and value errors into one stderr line and exit code 2."""

    def main(  # type: ignore[override]
        self, args: list[str] | None = None, prog_name: str | None = None,
        standalone_mode: bool = True, **extra: Any,
    ) -> Any:
        argv = list(sys.argv[1:] if args is None else args)
        try:
            rv = super().main(args=argv, prog_name=prog_name or "crossent",
                              standalone_mode=False, **extra)
        except clickx.NoArgsIsHelpError as e:
            print(e.ctx.get_help() if e.ctx else "")
            rv = 0
        except clickx.UsageError as e:
            where = e.ctx.command_path if e.ctx else "crossent"
            _fail(f"{where}: error: {e.format_message()}")
        except clickx.ClickException as e:
            _fail(f"crossent: error: {e.format_message()}", e.exit_code)
        except typer.Abort:
            _fail("crossent: aborted", 1)
        except ValueError as e:
            name = next((a for a in argv if a in self.commands), "")
            _fail(f"crossent{' ' + name if name else ''}: error: {e}")
        code = rv if isinstance(rv, int) else 0
        if standalone_mode:
            sys.exit(code)
        return code


def _fail(message: str, code: int = 2) -> None:
    sys.stderr.write(" ".join(message.split()) + "\n")
    sys.exit(code)


app = typer.Typer(
    cls=OneLineErrors,
    help="Cross-entropy, from surprise to the loss: a guided tour, step-by-step "
    "explanations, a quiz and figures, every number computed by crossent.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

BaseOpt = Annotated[Base, typer.Option("--base", help="log base: 2 (bits), e (nats), 10")]


@app.command()
def tour(
    base: BaseOpt = Base.two,
    out: Annotated[Path, typer.Option("--out", help="folder for the figures")] = Path(
        "crossent-figures"),
    html: Annotated[Path | None, typer.Option("--html", help="write the tour as one "
                                              "self-contained web page")] = None,
    no_plots: Annotated[bool, typer.Option("--no-plots", help="draw no figures")] = False,
) -> None:
    """Walk through surprise, entropy, cross-entropy and the loss, with every worked example."""
    from . import plots
    from . import tour as tour_mod

    content = tour_mod.build_tour(base)
    figures: dict[str, Path] = {}
    if not no_plots:
        unit = units(base)[0]
        for s in content.sections:
            for name in s.figures:
                figures[name] = plots.save(name, out / f"{name}.png", unit.base, unit.name)
    con = console()
    tour_mod.render(content, con, figures)
    if html is not None:
        from . import html as html_mod

        html_mod.write(content, html, with_figures=not no_plots)
        con.print(f"\nweb page written: {html}")


@app.command()
def explain(
    target: Annotated[str, typer.Option("--target", help="class index (2) or probabilities "
                                        "(0,0,1)")],
    probs: Annotated[str | None, typer.Option("--probs", help="predicted probabilities, "
                                              "e.g. 0.1,0.2,0.7")] = None,
    logits: Annotated[str | None, typer.Option("--logits", help="logits, e.g. 1.2,0.3,2.0")
                      ] = None,
    label_smoothing: Annotated[float, typer.Option("--label-smoothing", help="alpha in "
                                                   "[0, 1]")] = 0.0,
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


@app.command()
def quiz(
    seed: Annotated[int | None, typer.Option("--seed", help="seed for the generated "
                                             "questions (random if omitted)")] = None,
    answers: Annotated[Path | None, typer.Option("--answers", help="file with one answer "
                                                 "per line (non-interactive)")] = None,
) -> None:
    """The article's five questions plus generated numeric ones, answers checked."""
    import secrets

    con = console()
    if seed is None:
        seed = secrets.randbelow(10_000)
    if answers is not None:
        try:
            lines = answers.read_text(encoding="utf-8").splitlines()
        except OSError as e:
            raise ValueError(f"--answers: cannot read {str(answers)!r}: {e.strerror}") from None
        read = quiz_mod.file_reader(iter(lines), con)
    else:
        read = quiz_mod.stdin_reader(con)
    code = quiz_mod.run(seed, con, read)
    if code:
        raise typer.Exit(code)


@app.command()
def plot(
    name: Annotated[str, typer.Argument(help="surprisal, coin-entropy, log-loss, "
                                        "cross-entropy-vs-entropy, gradient or training")],
    out: Annotated[Path, typer.Option("--out", help="FILE.png or FILE.svg")],
    base: BaseOpt = Base.two,
) -> None:
    """Draw one of the tour's figures to a PNG or SVG file."""
    from . import plots

    unit = units(base)[0]
    path = plots.save(name, out, unit.base, unit.name)
    console().print(f"figure written: {path}")


@app.command()
def train(
    loss: Annotated[list[str] | None, typer.Option(
        "--loss", help="ce, mse, abs, smoothed-ce or focal; repeat it or separate with commas "
        "(default: every loss, compared)")] = None,
    model: Annotated[str, typer.Option("--model", help="softmax (regression) or mlp (one "
                                       "hidden layer)")] = "mlp",
    epochs: Annotated[int, typer.Option("--epochs", help="passes over the training set")] = 30,
    seed: Annotated[int, typer.Option("--seed", help="seed of the initial weights and the "
                                      "batch order (same seed, same numbers)")] = 0,
    lr: Annotated[float, typer.Option("--lr", help="learning rate")] = 0.1,
    optimizer: Annotated[str, typer.Option("--optimizer", help="sgd or adam")] = "sgd",
    batch_size: Annotated[int, typer.Option("--batch-size", help="mini-batch size")] = 32,
    hidden: Annotated[int, typer.Option("--hidden", help="hidden units of the mlp")] = 64,
    out: Annotated[Path, typer.Option("--out", help="folder for metrics.json and the "
                                      "figures")] = Path("crossent-train"),
    no_plots: Annotated[bool, typer.Option("--no-plots", help="draw no figures")] = False,
) -> None:
    """Train on scikit-learn's digits with each loss and compare: accuracy, calibration."""
    from .. import training
    from . import train as train_mod

    losses = train_mod.parse_losses(loss)
    config = training.TrainConfig(model=model, epochs=epochs, lr=lr, optimizer=optimizer,
                                  batch_size=batch_size, hidden=hidden, seed=seed)
    train_mod.run(losses, config, out, console(), plots=not no_plots)


@app.command()
def bench(
    configs: Annotated[list[str] | None, typer.Argument(
        help="configurations, e.g. ce-f32 linear-bf16 (default: ce-f32 ce-bf16 ce-v128k "
             "linear-f32)")] = None,
    device: Annotated[str | None, typer.Option("--device", help="cpu or cuda (default: "
                                               "cuda when present)")] = None,
    repeats: Annotated[int, typer.Option("--repeats", min=1, help="timed runs per "
                                         "contender (the median is reported)")] = 5,
    warmup: Annotated[int, typer.Option("--warmup", min=0, help="untimed runs first")] = 1,
    memory: Annotated[bool, typer.Option("--memory/--no-memory", help="peak memory, one "
                                         "fresh process per contender")] = True,
    quick: Annotated[bool, typer.Option("--quick", help="tiny sizes: a smoke test")] = False,
    out: Annotated[Path, typer.Option("--out", help="folder for bench.json and bench.png")
                   ] = Path("benchmarks/results"),
) -> None:
    """Time crossent.torch against torch (eager, compiled, unfused, chunked): a table,
    bench.json and bench.png. Same as ``python -m crossent.torch.bench``."""
    try:
        from ..torch import bench as bench_mod
    except ImportError as e:
        raise ValueError(f"needs PyTorch ({e}); pip install 'crossent[torch]'") from None
    unknown = [c for c in configs or [] if c not in bench_mod.CONFIGS]
    if unknown:
        raise ValueError(f"unknown configuration {unknown[0]!r}; choose from "
                         f"{', '.join(bench_mod.CONFIGS)}")
    argv = [*(configs or []), "--repeats", str(repeats), "--warmup", str(warmup),
            "--out", str(out)]
    argv += (["--device", device] if device else []) + ([] if memory else ["--no-memory"])
    bench_mod.main(argv + (["--quick"] if quick else []))


def main() -> None:
    """Entry point of the ``crossent`` console script."""
    app()
