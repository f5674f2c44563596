"""crossent.training: the per-loss logit gradients against finite differences and torch
autograd, the full backward pass (MLP included) against finite differences, ECE against a
straightforward loop, reproducibility, and the article's claim on the digits."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from crossent import training as tr
from crossent.errors import InputError

GAMMAS = [0.0, 0.5, 1.0, 2.0, 5.0]


def random_rows(seed: int, n: int = 7, c: int = 5, scale: float = 3.0):
    rng = np.random.default_rng(seed)
    return rng.normal(0.0, scale, (n, c)), rng.integers(0, c, n)


def fd(loss, z, y, **kw):
    return tr.finite_difference_loss_grad(loss, z, y, h=1e-6, **kw)


# --- the per-loss logit gradients --------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(("loss", "grad"), [
    (tr.softmax_mse_loss, tr.softmax_mse_grad),
    (tr.softmax_abs_loss, tr.softmax_abs_grad),
])
def test_mse_and_abs_gradients_match_finite_differences(seed, loss, grad):
    z, y = random_rows(seed)
    np.testing.assert_allclose(grad(z, y), fd(loss, z, y), atol=1e-8)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("gamma", GAMMAS)
def test_focal_gradient_matches_finite_differences(seed, gamma):
    z, y = random_rows(seed)
    got = tr.softmax_focal_grad(z, y, gamma=gamma)
    np.testing.assert_allclose(got, fd(tr.softmax_focal_loss, z, y, gamma=gamma), atol=1e-8)


def torch_losses(z: torch.Tensor, y: torch.Tensor, gamma: float) -> dict[str, torch.Tensor]:
    """The three losses written directly in torch, differentiated by autograd."""
    p = torch.softmax(z, dim=-1)
    onehot = torch.nn.functional.one_hot(y, z.shape[-1]).to(z.dtype)
    p_y = p.gather(1, y[:, None])[:, 0]
    log_py = torch.log_softmax(z, dim=-1).gather(1, y[:, None])[:, 0]
    return {
        "mse": ((p - onehot) ** 2).sum(-1).mean(),
        "abs": (1 - p_y).mean(),
        "focal": (-((1 - p_y) ** gamma) * log_py).mean(),
    }


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("gamma", [0.0, 1.0, 2.0, 3.5])
def test_gradients_and_values_match_torch_autograd(seed, gamma):
    z, y = random_rows(seed, n=9, c=10)
    ours = {
        "mse": (tr.softmax_mse_loss(z, y), tr.softmax_mse_grad(z, y)),
        "abs": (tr.softmax_abs_loss(z, y), tr.softmax_abs_grad(z, y)),
        "focal": (tr.softmax_focal_loss(z, y, gamma=gamma),
                  tr.softmax_focal_grad(z, y, gamma=gamma)),
    }
    for name, (value, grad) in ours.items():
        zt = torch.tensor(z, dtype=torch.float64, requires_grad=True)
        expected = torch_losses(zt, torch.tensor(y), gamma)[name]
        expected.backward()
        assert value == pytest.approx(expected.item(), rel=1e-12), name
        np.testing.assert_allclose(grad, zt.grad.numpy(), rtol=1e-10, atol=1e-15,
                                   err_msg=name)


def test_focal_with_gamma_0_is_cross_entropy():
    z, y = random_rows(0)
    ce = tr.make_loss("ce")
    assert tr.softmax_focal_loss(z, y, gamma=0.0) == pytest.approx(ce.value(z, y), rel=1e-12)
    np.testing.assert_allclose(tr.softmax_focal_grad(z, y, gamma=0.0), ce.grad(z, y),
                               atol=1e-15)


def test_confident_mistakes_stall_mse_and_abs_but_not_cross_entropy():
    z, y = np.array([[10.0, 0.0, 0.0]]), np.array([1])  # p_y ~ 4.5e-5
    ce = np.abs(tr.make_loss("ce").grad(z, y)).max()
    assert ce > 0.99
    assert np.abs(tr.softmax_mse_grad(z, y)).max() < 1e-3
    assert np.abs(tr.softmax_abs_grad(z, y)).max() < 1e-4


def test_focal_gradient_is_finite_and_zero_at_certainty():
    z, y = np.array([[800.0, 0.0], [0.0, 0.0]]), np.array([0, 0])
    for gamma in GAMMAS:
        g = tr.softmax_focal_grad(z, y, gamma=gamma)
        assert np.all(np.isfinite(g))
        np.testing.assert_array_equal(g[0], 0.0)


@pytest.mark.parametrize("name", tr.LOSSES)
def test_every_training_loss_gradient_matches_finite_differences(name):
    z, y = random_rows(5, n=6, c=4)
    loss = tr.make_loss(name)
    np.testing.assert_allclose(loss.grad(z, y), fd(loss.value, z, y), atol=1e-8)


def test_smoothed_ce_uses_smoothed_targets():
    z, y = np.zeros((1, 4)), np.array([2])
    # uniform prediction: the loss is ln 4 whatever the target; the gradient p - t
    assert tr.make_loss("smoothed-ce").value(z, y) == pytest.approx(math.log(4))
    t = np.full(4, 0.1 / 4)
    t[2] += 0.9
    np.testing.assert_allclose(tr.make_loss("smoothed-ce").grad(z, y)[0], 0.25 - t)


@pytest.mark.parametrize(("call", "needle"), [
    (lambda: tr.make_loss("hinge"), "name: unknown loss 'hinge'"),
    (lambda: tr.softmax_focal_loss([[0.0, 1.0]], [0], gamma=-1.0), "gamma"),
    (lambda: tr.softmax_mse_loss([0.0, 1.0], [0]), "shape (N, C)"),
    (lambda: tr.softmax_abs_grad([[0.0, 1.0]], [2]), "[0, 2)"),
    (lambda: tr.check_losses([]), "losses: no loss"),
    (lambda: tr.check_losses(["ce", "hinge"], argument="--loss"), "--loss: unknown loss"),
    (lambda: tr.check_losses("ce"), "losses must be a sequence"),
    (lambda: tr.softmax_mse_loss(None, [0]), "logits"),
    (lambda: tr.softmax_mse_loss([["a", "b"]], [0]), "logits and labels"),
    (lambda: tr.softmax_mse_loss([[0.0, 1.0]], [0.5]), "integer class indices"),
    (lambda: tr.reliability([[0.5, 0.5]], [0], n_bins=True), "n_bins"),
    (lambda: tr.reliability([0.5, 0.5], [0]), "probs (N, C)"),
    (lambda: tr.init_params("cnn", 2, 2, hidden=1, rng=np.random.default_rng()), "model"),
])
def test_bad_arguments_raise_input_error(call, needle):
    with pytest.raises(InputError) as info:
        call()
    assert needle in str(info.value)


# --- the full backward pass --------------------------------------------------------------------


def random_params(model: str, seed: int):
    rng = np.random.default_rng(seed)
    params = tr.init_params(model, 4, 3, hidden=5, rng=rng)
    return {k: v + rng.normal(0.0, 0.5, v.shape) for k, v in params.items()}


@pytest.mark.parametrize("model", tr.MODELS)
@pytest.mark.parametrize("name", tr.LOSSES)
def test_backward_pass_matches_finite_differences(model, name):
    rng = np.random.default_rng(11)
    x, y = rng.normal(size=(6, 4)), rng.integers(0, 3, 6)
    params = random_params(model, 3)
    loss = tr.make_loss(name)
    z, cache = tr.forward(params, x)
    grads = tr.backward(params, cache, loss.grad(z, y))
    assert set(grads) == set(params)
    h = 1e-6
    for key, w in params.items():
        numeric = np.empty_like(w)
        for i in np.ndindex(w.shape):
            old = w[i]
            w[i] = old + h
            up = loss.value(tr.forward(params, x)[0], y)
            w[i] = old - h
            down = loss.value(tr.forward(params, x)[0], y)
            w[i] = old
            numeric[i] = (up - down) / (2 * h)
        np.testing.assert_allclose(grads[key], numeric, atol=1e-7, err_msg=f"{model} {key}")


def test_optimizer_steps():
    w = {"a": np.array([1.0, -2.0])}
    g = {"a": np.array([0.5, -4.0])}
    tr.SGD(0.1).step(w, g)
    np.testing.assert_allclose(w["a"], [0.95, -1.6])
    w = {"a": np.array([1.0, -2.0])}
    tr.Adam(0.01).step(w, g)  # first step: m_hat / sqrt(v_hat) = sign(g)
    np.testing.assert_allclose(w["a"], [0.99, -1.99], rtol=1e-6)


# --- calibration --------------------------------------------------------------------------------


def straightforward_ece(probs, labels, n_bins=15):
    """ECE written as in Guo et al.'s definition, one Python loop per bin and per row."""
    n = len(labels)
    total = 0.0
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        rows = [i for i in range(n)
                if (lo < max(probs[i]) <= hi) or (b == 0 and max(probs[i]) == 0)]
        if not rows:
            continue
        acc = sum(int(np.argmax(probs[i]) == labels[i]) for i in rows) / len(rows)
        conf = sum(max(probs[i]) for i in rows) / len(rows)
        total += len(rows) / n * abs(acc - conf)
    return total


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 60), c=st.integers(2, 10),
       scale=st.floats(0.1, 8.0), bins=st.sampled_from([1, 5, 10, 15]))
def test_ece_matches_a_straightforward_computation(seed, n, c, scale, bins):
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, scale, (n, c))
    probs = np.exp(z - z.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    labels = rng.integers(0, c, n)
    got = tr.expected_calibration_error(probs, labels, n_bins=bins)
    assert got == pytest.approx(straightforward_ece(probs.tolist(), labels.tolist(), bins),
                                abs=1e-12)


def test_ece_worked_numbers_and_reliability_bins():
    probs = np.array([[1.0, 0.0], [0.5, 0.5], [0.9, 0.1], [0.2, 0.8]])
    labels = np.array([0, 1, 1, 1])
    rel = tr.reliability(probs, labels)
    # confidences 1.0 (bin 14), 0.5 (bin 7, wrong: argmax 0), 0.9 (bin 13, wrong), 0.8 (bin 11)
    assert rel.count.tolist() == [0] * 7 + [1, 0, 0, 0, 1, 0, 1, 1]
    assert rel.ece == pytest.approx((0.0 + 0.5 + 0.9 + 0.2) / 4)
    assert np.isnan(rel.accuracy[0]) and rel.accuracy[13] == 0.0
    assert tr.expected_calibration_error([[0.3, 0.7]] * 10, [1] * 7 + [0] * 3) == pytest.approx(
        0.0, abs=1e-12)


# --- data, settings, experiment -------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    return tr.load_digits_split()


def test_digits_split_is_fixed_and_stratified(digits):
    assert digits.x_train.shape == (1437, 64) and digits.x_val.shape == (360, 64)
    assert digits.num_classes == 10
    again = tr.load_digits_split()
    np.testing.assert_array_equal(digits.x_val, again.x_val)
    counts = np.bincount(digits.y_val)
    assert counts.min() >= 35 and counts.max() <= 37
    np.testing.assert_allclose(digits.x_train.mean(0), 0.0, atol=1e-12)


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"epochs": 0}, "epochs must be a positive integer"),
    ({"lr": -0.1}, "lr must be a finite number > 0"),
    ({"lr": float("nan")}, "lr must be"),
    ({"model": "cnn"}, "model='cnn': unknown model"),
    ({"optimizer": "rmsprop"}, "optimizer='rmsprop': unknown optimizer"),
    ({"seed": -1}, "seed must be an integer >= 0"),
    ({"batch_size": 0}, "batch_size"),
    ({"gamma": -2.0}, "gamma"),
    ({"gamma": "2"}, "gamma"),
    ({"lr": "0.1"}, "lr must be a number"),
    ({"lr": True}, "lr must be a number"),
    ({"label_smoothing": float("nan")}, "label_smoothing must lie in [0, 1]"),
    ({"label_smoothing": None}, "label_smoothing must be a number"),
    ({"epochs": 2.0}, "epochs must be a positive integer"),
    ({"epochs": True}, "epochs must be a positive integer"),
    ({"hidden": 10**20}, "hidden must be a positive integer and <= 2147483647"),
    ({"n_bins": 0}, "n_bins"),
])
def test_bad_settings(kwargs, needle):
    """Every setting is checked up front, the error an InputError naming it."""
    with pytest.raises(InputError) as info:
        tr.TrainConfig(**kwargs)
    assert needle in str(info.value)


def test_numpy_settings_become_python_numbers():
    """Settings go into metrics.json: NumPy integers and floats are taken, stored as Python's."""
    config = tr.TrainConfig(epochs=np.int64(3), lr=np.float32(0.5), seed=np.uint8(7))
    assert (config.epochs, config.lr, config.seed) == (3, 0.5, 7)
    assert [type(v) for v in (config.epochs, config.lr, config.seed)] == [int, float, int]
    json.dumps(dataclasses.asdict(config))


def small(**kw) -> tr.TrainConfig:
    return tr.TrainConfig(**{"epochs": 2, "hidden": 16, **kw})


def test_same_seed_gives_identical_json_and_another_seed_does_not(digits):
    def run(seed):
        out = tr.compare(["ce", "focal"], small(seed=seed), digits)
        return json.dumps(tr.metrics_json(out), allow_nan=False)

    first = run(3)
    assert run(3) == first
    assert run(4) != first


def test_results_json_shape(digits):
    seen = []
    res = tr.compare(["mse", "ce", "mse"], small(model="softmax", optimizer="adam", lr=0.01),
                     digits, on_epoch=lambda name, m: seen.append((name, m.epoch)))
    assert seen == [("mse", 1), ("mse", 2), ("ce", 1), ("ce", 2)]
    data = tr.metrics_json(res)
    assert list(data) == ["mse", "ce"]
    entry = data["ce"]
    assert [e["epoch"] for e in entry["epochs"]] == [1, 2]
    assert set(entry["epochs"][0]) == {"epoch", "train_loss", "val_accuracy",
                                       "val_cross_entropy", "val_ece"}
    assert entry["settings"]["model"] == "softmax" and entry["settings"]["optimizer"] == "adam"
    assert entry["final_accuracy"] == entry["epochs"][-1]["val_accuracy"]
    accs = [e["val_accuracy"] for e in entry["epochs"]]
    expected = next((i + 1 for i, a in enumerate(accs) if a >= 0.95), None)
    assert entry["epochs_to_95"] == expected
    assert sum(entry["reliability"]["count"]) == 360


def test_epoch_metrics_match_independent_computations(digits):
    res = tr.train("mse", small(epochs=1), digits)
    m, params = res.final, res.params
    z_val = torch.tensor(tr.forward(params, digits.x_val)[0])
    y_val = torch.tensor(digits.y_val)
    assert m.val_accuracy == pytest.approx((z_val.argmax(1) == y_val).double().mean().item())
    ce = torch.nn.functional.cross_entropy(z_val, y_val).item()
    assert m.val_cross_entropy == pytest.approx(ce, rel=1e-12)
    probs = torch.softmax(z_val, 1).numpy()
    assert m.val_ece == pytest.approx(straightforward_ece(probs.tolist(), digits.y_val.tolist()),
                                      abs=1e-12)
    z_train = tr.forward(params, digits.x_train)[0]
    assert m.train_loss == pytest.approx(tr.softmax_mse_loss(z_train, digits.y_train))


def test_non_finite_numbers_become_null():
    assert tr._finite({"a": [float("nan"), 1.0], "b": float("inf")}) == {"a": [None, 1.0],
                                                                        "b": None}


def test_cross_entropy_reaches_95_percent_before_mse_at_the_default_settings(digits):
    """The article's claim, at ``crossent train``'s defaults (mlp, sgd lr 0.1, seed 0)."""
    res = tr.compare(["ce", "mse"], tr.TrainConfig(), digits)
    ce, mse = res["ce"].epochs_to(), res["mse"].epochs_to()
    assert ce is not None
    assert mse is None or ce < mse


def test_a_diverged_run_reports_nan_accuracy_not_class_0(digits):
    """NaN logits predict nothing: NumPy's argmax would call every row class 0 (10% right)."""
    result = tr.train("ce", tr.TrainConfig(epochs=1, hidden=4, lr=1e308), digits)
    assert math.isnan(result.final.train_loss)
    assert math.isnan(result.final.val_accuracy)
    assert result.epochs_to() is None
    assert tr.metrics_json({"ce": result})["ce"]["final_accuracy"] is None
