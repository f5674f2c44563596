"""``crossent train``: train on the digits with each loss, compare them, draw the results.

All the numbers come from :mod:`crossent.training`; this module shows the progress, prints
the tables, writes ``metrics.json`` and draws the figures (accuracy against epoch for every
loss on one plot, and one reliability diagram per loss).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table as RichTable

from .. import training as tr
from .files import figure_bytes, write_atomic

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _epochs(value: int | None) -> str:
    return "never" if value is None else str(value)


def _check_matplotlib() -> None:
    # imported before the training, not at the figures after it: without matplotlib,
    # ModuleNotFoundError 'matplotlib' (reported in one line with the extra) loses no run
    import matplotlib.figure  # noqa: F401


def _dataset() -> tr.Dataset:
    # without scikit-learn: ModuleNotFoundError 'sklearn', which the command reports in one
    # line with the extra to install
    return tr.load_digits_split()


def parse_losses(values: list[str] | None) -> list[str]:
    """``--loss ce --loss mse`` or ``--loss ce,mse``; every loss when none is given."""
    if not values:
        return list(tr.LOSSES)
    return tr.check_losses([v.strip() for value in values for v in value.split(",")],
                           argument="--loss")


def summary_rows(results: dict[str, tr.RunResult]) -> list[list[str]]:
    """One row per loss: name, epochs to 95%, the last epoch's validation accuracy,
    cross-entropy and ECE, and its training loss."""
    return [[name, _epochs(r.epochs_to()), f"{r.final.val_accuracy:.4f}",
             f"{r.final.val_cross_entropy:.4f}", f"{r.final.val_ece:.4f}",
             f"{r.final.train_loss:.4f}"] for name, r in results.items()]


SUMMARY_HEADERS = ["loss", "epochs to 95%", "val accuracy", "val CE (nats)", "val ECE",
                   "train loss"]


def summary_table(results: dict[str, tr.RunResult], config: tr.TrainConfig) -> RichTable:
    """The :func:`summary_rows` as a table. Each column is at least as wide as its widest
    cell: rich would otherwise crop the numbers of metrics.json to fit a narrow terminal
    ('0.91...'); only the headers wrap (or fold)."""
    rows = summary_rows(results)
    table = RichTable(title=f"{config.model}, seed {config.seed}: after epoch {config.epochs} "
                      "(ECE: 15 bins)")
    for i, h in enumerate(SUMMARY_HEADERS):
        table.add_column(h, justify="right", overflow="fold",
                         min_width=max((len(row[i]) for row in rows), default=None))
    for row in rows:
        table.add_row(*row)
    return table


def _epoch_line(name: str, m: tr.EpochMetrics, epochs: int, width: int) -> str:
    return (f"{name:<{width}} {m.epoch:>{len(str(epochs))}}/{epochs}  train loss "
            f"{m.train_loss:.4f}  val acc {m.val_accuracy:.4f}  CE "
            f"{m.val_cross_entropy:.4f}  ECE {m.val_ece:.4f}")


def run(losses: list[str], config: tr.TrainConfig, out: Path, con: Console, *,
        plots: bool = True) -> dict[str, tr.RunResult]:
    """Train, report each epoch, print the summary, write metrics.json and the figures.

    ``out`` is created (with its parents) after the training and the drawing, so a failed
    or interrupted run leaves nothing behind; the caller checks beforehand that it can be
    written (:func:`crossent.cli.files.check_output_path`). Every file is written
    atomically. With ``plots``, matplotlib is imported before the training starts."""
    if plots:
        _check_matplotlib()
    data = _dataset()
    con.print(f"[bold]crossent train[/]: {config.model} on the digits "
              f"({data.x_train.shape[0]} training / {data.x_val.shape[0]} validation images, "
              f"{data.num_classes} classes), {config.optimizer} lr {config.lr:g}, batch "
              f"{config.batch_size}, {config.epochs} epochs, seed {config.seed}")
    width = max(len(n) for n in losses)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    with Progress(*columns, console=con) as progress:
        tasks = {n: progress.add_task(f"{n:<{width}}", total=config.epochs) for n in losses}

        def on_epoch(name: str, m: tr.EpochMetrics) -> None:
            progress.console.print(escape(_epoch_line(name, m, config.epochs, width)))
            progress.advance(tasks[name])

        results = tr.compare(losses, config, data, on_epoch)
    # crop=False: at a narrow terminal the table is wider than it (see summary_table), and
    # its lines wrap there rather than lose their ends
    con.print(summary_table(results, config), crop=False)
    diverged = [n for n, r in results.items() if not math.isfinite(r.final.train_loss)]
    if diverged:
        con.print(f"diverged (the training loss became NaN or infinite): "
                  f"{', '.join(diverged)}; a smaller --lr may help")
    # every output in memory before the first is written: Ctrl-C while drawing (seconds)
    # leaves no folder holding metrics.json and some of the figures
    metrics = json.dumps(tr.metrics_json(results), indent=2, allow_nan=False) + "\n"
    outputs = {METRICS_FILE: metrics.encode("utf-8"),
               **(draw_figures(results) if plots else {})}
    out.mkdir(parents=True, exist_ok=True)
    for name, payload in outputs.items():
        write_atomic(out / name, payload)
    for name in outputs:
        what = "metrics" if name == METRICS_FILE else "figure"
        con.print(f"{what} written: {escape(str(out / name))}")
    return results


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------


def draw_accuracy(fig: Figure, results: dict[str, tr.RunResult]) -> None:
    """Validation accuracy against epoch, one line per loss, the 95% level dashed."""
    ax = fig.add_subplot()
    config = next(iter(results.values())).config
    ax.set_title(f"Validation accuracy per epoch ({config.model}, {config.optimizer} "
                 f"lr {config.lr:g}, seed {config.seed})")
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy")
    ax.grid(alpha=0.3)
    for name, r in results.items():
        ax.plot([m.epoch for m in r.history], [m.val_accuracy for m in r.history],
                marker="o", markersize=3, label=name)
    ax.axhline(tr.TARGET_ACCURACY, color="black", linestyle="--", linewidth=0.8, label="95%")
    ax.legend()


def draw_reliability(fig: Figure, result: tr.RunResult) -> None:
    """Accuracy per confidence bin as bars, the mean confidence as dots, the diagonal."""
    rel = result.reliability
    assert rel is not None
    ax = fig.add_subplot()
    ax.set_title(f"Reliability diagram: {result.loss} ({result.config.model}, epoch "
                 f"{result.final.epoch}), ECE = {rel.ece:.4f}")
    ax.set_xlabel("confidence (top-class probability)")
    ax.set_ylabel("accuracy")
    ax.grid(alpha=0.3)
    width = rel.edges[1] - rel.edges[0]
    filled = rel.count > 0
    ax.bar(rel.edges[:-1][filled], rel.accuracy[filled], width=width, align="edge",
           edgecolor="black", label="accuracy in bin")
    centres = (rel.edges[:-1] + width / 2)[filled]
    ax.plot(centres, rel.confidence[filled], "o", color="tab:red", label="mean confidence")
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left")


def _new_figure() -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(6.4, 4.0), layout="constrained")


METRICS_FILE = "metrics.json"


def output_files(losses: list[str], *, plots: bool) -> list[str]:
    """The files :func:`run` writes in ``out``: ``metrics.json``, then with ``plots``
    ``accuracy.png`` and ``reliability-LOSS.png`` per loss (checked before the training)."""
    return [METRICS_FILE, *(_figure_files(losses) if plots else [])]


def _figure_files(losses: Iterable[str]) -> list[str]:
    return ["accuracy.png", *(f"reliability-{name}.png" for name in losses)]


def draw_figures(results: dict[str, tr.RunResult]) -> dict[str, bytes]:
    """``accuracy.png`` and ``reliability-LOSS.png`` for every loss: file name -> PNG bytes."""
    names = _figure_files(results)
    fig = _new_figure()
    draw_accuracy(fig, results)
    figures = {names[0]: figure_bytes(fig, "png", dpi=100)}
    for name, r in zip(names[1:], results.values(), strict=True):
        fig = _new_figure()
        draw_reliability(fig, r)
        figures[name] = figure_bytes(fig, "png", dpi=100)
    return figures
