"""``crossent train``: metrics.json, figures, reproducibility, bad options, and the tour's
last chapter."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from matplotlib.image import imread

from crossent import training as tr
from crossent.cli import app

FAST = ["--epochs", "2", "--hidden", "16"]


def train(runner, tmp_path, *args):
    result = runner.invoke(app, ["train", *FAST, "--out", str(tmp_path), *args])
    assert result.exit_code == 0, result.output
    return result, json.loads((tmp_path / "metrics.json").read_text())


def test_help(runner):
    assert "train" in runner.invoke(app, ["--help"]).stdout
    result = runner.invoke(app, ["train", "--help"])
    assert result.exit_code == 0
    for option in ("--loss", "--model", "--epochs", "--seed", "--lr", "--out"):
        assert option in result.stdout


def test_every_loss_by_default(runner, tmp_path):
    result, data = train(runner, tmp_path, "--no-plots")
    assert list(data) == list(tr.LOSSES)
    for name, entry in data.items():
        assert len(entry["epochs"]) == 2
        assert "epochs_to_95" in entry
        final = entry["epochs"][-1]
        row = (f"{name} {entry['epochs_to_95'] or 'never'} {final['val_accuracy']:.4f} "
               f"{final['val_cross_entropy']:.4f} {final['val_ece']:.4f} "
               f"{final['train_loss']:.4f}")
        assert row in " ".join(result.stdout.replace("│", " ").split()), row
        assert f"{name} 2/2 train loss {final['train_loss']:.4f}" in " ".join(
            result.stdout.split())
    assert not list(tmp_path.glob("*.png"))


def test_chosen_losses_model_and_figures(runner, tmp_path):
    _, data = train(runner, tmp_path, "--loss", "ce,mse", "--loss", "focal",
                    "--model", "softmax", "--optimizer", "adam", "--lr", "0.01")
    assert list(data) == ["ce", "mse", "focal"]
    assert data["ce"]["settings"]["model"] == "softmax"
    assert data["ce"]["settings"]["optimizer"] == "adam"
    names = ["accuracy", "reliability-ce", "reliability-mse", "reliability-focal"]
    assert sorted(p.stem for p in tmp_path.glob("*.png")) == sorted(names)
    for name in names:
        pixels = imread(tmp_path / f"{name}.png")
        assert pixels.shape[:2] == (400, 640)
        assert np.ptp(pixels[..., :3]) > 0.5


def test_same_seed_identical_json(runner, tmp_path):
    args = ["--loss", "ce", "--loss", "abs", "--no-plots", "--seed", "7"]
    train(runner, tmp_path / "a", *args)
    train(runner, tmp_path / "b", *args)
    train(runner, tmp_path / "c", *args[:-1], "8")
    a, b, c = ((tmp_path / d / "metrics.json").read_bytes() for d in "abc")
    assert a == b
    assert a != c


BAD = [
    (["--loss", "hinge"], "--loss: unknown loss 'hinge'"),
    (["--loss", "ce,"], "unknown loss ''"),
    (["--epochs", "0"], "'--epochs'"),
    (["--epochs", "x"], "--epochs"),
    (["--lr", "-0.1"], "lr must be a finite number > 0"),
    (["--lr", "0"], "lr must be a finite number > 0"),
    (["--lr", "nan"], "lr must be"),
    (["--model", "cnn"], "model='cnn': unknown model"),
    (["--optimizer", "rmsprop"], "optimizer='rmsprop': unknown optimizer"),
    (["--seed", "-1"], "'--seed'"),
    (["--batch-size", "0"], "'--batch-size'"),
    (["--hidden", "0"], "'--hidden'"),
    (["--hidden", str(10**20)], "hidden must be a positive integer and <= 2147483647"),
    (["--lr", "inf"], "lr must be a finite number > 0"),
    (["--bogus"], "No such option"),
]


@pytest.mark.parametrize(("args", "needle"), BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_options_one_stderr_line_exit_2(runner, tmp_path, args, needle):
    result = runner.invoke(app, ["train", "--out", str(tmp_path), *args])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert needle in lines[0]
    assert "Traceback" not in result.output and result.stdout == ""
    assert not (tmp_path / "metrics.json").exists()


def test_tour_ends_with_the_training_chapter(runner):
    out = runner.invoke(app, ["tour", "--no-plots"]).stdout
    assert out.index("8. Why cross-entropy") < out.index("9. Training with each loss")
    results = tr.compare(tr.LOSSES, tr.TOUR_CONFIG)  # computed again, not from the cache
    flat = " ".join(out.replace("│", " ").split())
    for name, r in results.items():
        row = f"{name} {r.epochs_to() or 'never'} {r.final.val_accuracy:.4f} {r.final.val_ece:.4f}"
        assert row in flat, row


def test_tour_html_has_the_training_figure(runner, tmp_path):
    page = tmp_path / "tour.html"
    result = runner.invoke(app, ["tour", "--html", str(page), "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    html = page.read_text()
    assert 'id="figure-training"' in html and "9. Training with each loss" in html
    assert imread(tmp_path / "training.png").shape[:2] == (400, 640)


def test_tour_setting_is_quick():
    start = time.perf_counter()
    tr.compare(tr.LOSSES, tr.TOUR_CONFIG)
    assert time.perf_counter() - start < 20


def test_command_defaults_are_the_library_defaults():
    import inspect

    from crossent.cli.app import train as command

    params = inspect.signature(command).parameters
    defaults = tr.TrainConfig()
    for name in ("model", "epochs", "seed", "lr", "optimizer", "batch_size", "hidden"):
        assert params[name].default == getattr(defaults, name), name


def test_a_diverged_run_is_said_and_stored_as_null(runner, tmp_path):
    """lr 1e308: NaN weights after the first step. The command says which losses diverged;
    metrics.json (strict JSON) holds null, not the 10% NumPy's argmax of NaN would give."""
    result, data = train(runner, tmp_path, "--no-plots", "--loss", "ce,mse", "--lr", "1e308",
                         "--epochs", "1")
    assert "diverged (the training loss became NaN or infinite): ce, mse; a smaller --lr" in (
        " ".join(result.stdout.split()))
    for entry in data.values():
        assert entry["final_accuracy"] is None and entry["epochs_to_95"] is None
