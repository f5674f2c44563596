"""Session 18 (H51): the bounds and checks added to fix H49's numeric-argument review of the
training, teaching, conventions and bench code. Each bad value raises ``InputError`` naming
the argument; each value at a bound is still taken (the bound is not off by one), and a
NumPy integer or 0-d tensor is taken as the int it holds.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import crossent.training as tr
from crossent import InputError
from crossent.integrations import conventions as cv
from crossent.teaching import curves
from crossent.torch import bench
from crossent.training import metrics

HUGE = 10**400


def _raises_naming(name, fn, *args, **kwargs):
    with pytest.raises(InputError) as info:
        fn(*args, **kwargs)
    assert name in str(info.value), str(info.value)
    return str(info.value)


# ---- training: n_bins, h, optimizers, sizes, make_loss

@pytest.mark.parametrize("n_bins", [metrics.MAX_BINS + 1, 2**63, 0, 2.0, True, np.True_, "3"])
def test_reliability_n_bins_out_of_range_or_not_integer(n_bins):
    _raises_naming("n_bins", tr.expected_calibration_error, [[0.2, 0.8]], [1], n_bins=n_bins)


def test_reliability_n_bins_numpy_and_0d_tensor_as_int():
    probs, labels = [[0.9, 0.1], [0.6, 0.4], [0.3, 0.7]], [0, 1, 1]
    expected = tr.reliability(probs, labels, n_bins=4)
    for n in (np.int64(4), np.uint8(4), torch.tensor(4)):
        got = tr.reliability(probs, labels, n_bins=n)
        assert got.ece == expected.ece and got.count.tolist() == expected.count.tolist()
    # hand-computed: bins (0, .25], (.25, .5], (.5, .75], (.75, 1]; conf .9 -> 3, .6 and .7
    # -> 2 (one right, one wrong): ECE = (|1 - .9| + |1 - 1.3|) / 3
    assert expected.count.tolist() == [0, 0, 2, 1]
    assert expected.ece == pytest.approx((0.1 + 0.3) / 3, rel=1e-12)


def test_train_config_n_bins_bound():
    assert tr.TrainConfig(n_bins=metrics.MAX_BINS).n_bins == metrics.MAX_BINS  # no run: cheap
    _raises_naming("n_bins", tr.TrainConfig, n_bins=metrics.MAX_BINS + 1)


@pytest.mark.parametrize("name,value", [("lr", -HUGE), ("label_smoothing", -HUGE),
                                        ("gamma", -HUGE), ("lr", math.inf)])
def test_train_config_reals_beyond_float_either_sign(name, value):
    _raises_naming(name, tr.TrainConfig, **{name: value})


@pytest.mark.parametrize("h", [-1e-6, math.nan, math.inf, "1e-6", True, 0, -HUGE])
def test_finite_difference_loss_grad_step(h):
    _raises_naming("h", tr.finite_difference_loss_grad, tr.softmax_mse_loss, np.zeros((1, 2)),
                   np.array([0]), h=h)


def test_finite_difference_step_lost_in_a_large_logit_is_refused():
    # ulp(1e12) is 1.2e-4: 1e12 +- 1e-6 rounds back to 1e12, the difference would be 0
    _raises_naming("h", tr.finite_difference_loss_grad, tr.softmax_mse_loss,
                   np.array([[1e12, 0.0]]), np.array([0]), h=1e-6)
    _raises_naming("h", curves.finite_difference_grad, lambda v: float(v.sum()), [1e12],
                   h=1e-6)


def test_finite_difference_huge_step_is_finite():
    # 2 * 1e308 overflows: the step is divided by 2 first. f linear: the slope exactly
    g = tr.finite_difference_loss_grad(lambda z, y: float(z.sum() * 1e-300),
                                       np.zeros((1, 2)), np.array([0]), h=1e308)
    np.testing.assert_allclose(g, [[1e-300, 1e-300]], rtol=1e-12)
    g = curves.finite_difference_grad(lambda v: float(v.sum() * 1e-300), [0.0], h=1e308)
    np.testing.assert_allclose(g, [1e-300], rtol=1e-12)


@pytest.mark.parametrize("make,name", [
    (lambda: tr.SGD(0.0), "lr"), (lambda: tr.SGD(True), "lr"), (lambda: tr.SGD(HUGE), "lr"),
    (lambda: tr.Adam(math.inf), "lr"), (lambda: tr.Adam(0.1, b1=-0.1), "b1"),
    (lambda: tr.Adam(0.1, b2=1.0), "b2"), (lambda: tr.Adam(0.1, b2=math.nan), "b2"),
    (lambda: tr.Adam(0.1, b1="0.9"), "b1"), (lambda: tr.Adam(0.1, eps=0.0), "eps"),
    (lambda: tr.Adam(0.1, eps=-1e-8), "eps"),
])
def test_optimizer_settings_refused(make, name):
    _raises_naming(name, make)


def test_adam_b1_zero_is_rmsprop_like_and_taken():
    # b1 = 0, b2 = 0: m = g, v = g^2, no bias correction left: w -= lr g / (|g| + eps)
    w = {"w": np.array([1.0, 2.0])}
    tr.Adam(0.5, b1=0.0, b2=0.0, eps=1e-300).step(w, {"w": np.array([4.0, -0.25])})
    assert w["w"].tolist() == [0.5, 2.5]
    w = {"w": np.array([1.0])}
    tr.SGD(np.float32(0.5)).step(w, {"w": np.array([2.0])})
    assert w["w"].tolist() == [0.0]


@pytest.mark.parametrize("kw,name", [
    ({"n_in": -1}, "n_in"), ({"n_classes": 0}, "n_classes"), ({"hidden": True}, "hidden"),
    ({"hidden": np.True_}, "hidden"), ({"n_in": 2.0}, "n_in"), ({"hidden": "4"}, "hidden"),
])
def test_init_params_sizes_refused(kw, name):
    args = {"n_in": 3, "n_classes": 2, "hidden": 4} | kw
    _raises_naming(name, tr.init_params, "mlp", args["n_in"], args["n_classes"],
                   hidden=args["hidden"], rng=np.random.default_rng(0))


def test_init_params_numpy_sizes_taken():
    p = tr.init_params("mlp", np.int64(3), np.int32(2), hidden=torch.tensor(4),
                       rng=np.random.default_rng(0))
    assert {k: v.shape for k, v in p.items()} == {"W1": (3, 4), "b1": (4,), "W2": (4, 2),
                                                  "b2": (2,)}


@pytest.mark.parametrize("name,kw", [
    ("label_smoothing", {"label_smoothing": -0.1}), ("label_smoothing", {"label_smoothing": 1.5}),
    ("label_smoothing", {"label_smoothing": math.nan}), ("gamma", {"gamma": HUGE}),
    ("gamma", {"gamma": "2"}),
])
@pytest.mark.parametrize("loss", ["ce", "smoothed-ce", "focal", "mse"])
def test_make_loss_checks_its_settings_for_every_loss(loss, name, kw):
    _raises_naming(name, tr.make_loss, loss, **kw)


def test_make_loss_numpy_label_smoothing_as_float():
    z, y = np.array([[0.3, -1.0, 2.0]]), np.array([1])
    a = tr.make_loss("smoothed-ce", label_smoothing=np.float32(0.25))
    b = tr.make_loss("smoothed-ce", label_smoothing=0.25)
    assert a.value(z, y) == b.value(z, y)
    # against the formula: (1 - eps) (-log p_y) + eps * mean_c (-log p_c)
    logp = z - np.log(np.exp(z).sum())
    assert b.value(z, y) == pytest.approx(-(0.75 * logp[0, 1] + 0.25 * logp[0].mean()),
                                          rel=1e-12)


# ---- teaching: n, lo, truth, vectors

@pytest.mark.parametrize("n", [curves.MAX_POINTS + 1, 0, -3, True, "400"])
@pytest.mark.parametrize("curve", [curves.surprisal_curve, curves.coin_entropy_curve,
                                   curves.log_loss_curves, curves.coin_cross_entropy_curve])
def test_curve_points_refused(curve, n):
    _raises_naming("n", curve, n=n)


def test_curve_points_numpy_integer_taken():
    assert curves.coin_entropy_curve(n=np.int64(3)).x.tolist() == [0.0, 0.5, 0.99, 1.0]


@pytest.mark.parametrize("call,name", [
    (lambda: curves.surprisal_curve(lo=1.0), "lo"),
    (lambda: curves.surprisal_curve(lo=-HUGE), "lo"),
    (lambda: curves.log_loss_curves(lo=math.nan), "lo"),
    (lambda: curves.coin_cross_entropy_curve(lo=0.5), "lo"),
    (lambda: curves.coin_cross_entropy_curve(truth=(0.5, 0.25, 0.25)), "truth"),
    (lambda: curves.coin_cross_entropy_curve(truth=(1.5, -0.5)), "truth"),
    (lambda: curves.coin_cross_entropy_curve(truth=(0.5, 0.4)), "truth"),
    (lambda: curves.coin_cross_entropy_curve(truth=("a", "b")), "truth"),
    (lambda: curves.grid(0.0, HUGE, 3), "hi"),
    (lambda: curves.softmax_gradient_check([HUGE, 1.0], [0.0, 1.0]), "logits"),
    (lambda: curves.multiclass_breakdown(logits=[1.0, -HUGE], target=0), "logits"),
    (lambda: curves.label_breakdown(probs=[None], target=[1.0]), "probs"),
    (lambda: curves.label_breakdown(probs=["0.5"], target=[1.0]), "probs"),
    (lambda: curves.label_breakdown(probs=np.array([0.5 + 0.5j]), target=[1.0]), "probs"),
    (lambda: curves.label_breakdown(probs=[0.5], target=[1 + 0j]), "target"),
    (lambda: curves.label_breakdown(probs=[0.5], target=[[1.0], [0.0, 1.0]]), "target"),
])
def test_teaching_arguments_refused(call, name):
    _raises_naming(name, call)


# ---- conventions: rank and ignore_index as integers

_Z = np.array([[0.3, -1.2, 2.0, 0.1], [1.5, 0.2, -0.7, 0.0]])


@pytest.mark.parametrize("rank", [True, 1.0, "1", -1, 2])
def test_convention_rank_refused(rank):
    _raises_naming("rank", cv.convention_loss, _Z, np.array([1, 2]), "megatron",
                   label_smoothing=0.1, tensor_parallel_size=2, rank=rank)


def test_convention_rank_and_ignore_index_numpy_or_tensor_as_int():
    kw = {"label_smoothing": 0.1, "tensor_parallel_size": 2}
    expected = float(cv.convention_loss(_Z, np.array([1, 2]), "megatron", rank=1, **kw))
    for r in (np.int64(1), torch.tensor(1)):
        assert float(cv.convention_loss(_Z, np.array([1, 2]), "megatron", rank=r, **kw)) \
            == expected
    # ignore_index=2 drops row 1: the loss is row 0's alone
    alone = float(cv.convention_loss(_Z[:1], np.array([1])))
    for ii in (np.int8(2), torch.tensor(2), np.array(2)):
        assert float(cv.convention_loss(_Z, np.array([1, 2]), ignore_index=ii)) == alone


@pytest.mark.parametrize("ii", [1.0, "1", None, True])
def test_convention_ignore_index_refused(ii):
    _raises_naming("ignore_index", cv.convention_loss, _Z, np.array([1, 2]), ignore_index=ii)


# ---- bench: --load bound, --bandwidth

def test_bench_load_bound(monkeypatch):
    monkeypatch.setattr(bench.os, "cpu_count", lambda: 3)
    assert bench.max_load() == 3 * bench.LOAD_PER_CPU
    assert bench.check_load(bench.max_load()) == bench.max_load()
    msg = _raises_naming("--load", bench.check_load, bench.max_load() + 1)
    assert str(bench.max_load()) in msg
    _raises_naming("processes", bench.CompetingLoad, 10**6)
    _raises_naming("processes", bench.CompetingLoad, -1)
    monkeypatch.setattr(bench.os, "cpu_count", lambda: None)  # unknown: 1 CPU assumed
    assert bench.max_load() == bench.LOAD_PER_CPU


def test_bench_run_refuses_a_huge_load_before_starting_anything(tmp_path):
    _raises_naming("--load", bench.run, ["ce-small"], device="cpu", load=10**9,
                   out=tmp_path / "out")
    assert bench.CompetingLoad.active == [] and not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", [-HUGE, HUGE, math.inf, 0, True, "1e12"])
def test_bench_bandwidth_refused(value):
    _raises_naming("--bandwidth", bench.check_bandwidth, value)


def test_bench_bandwidth_big_int_taken():
    assert bench.check_bandwidth(10**12) == 1e12
