"""Session 18 review (H49): every numeric scalar argument against hostile numbers.

The contract: a bad number raises ``crossent.InputError`` (a ValueError) naming the
argument (the CLI: one stderr line, exit 2); never a raw OverflowError / TypeError /
ZeroDivisionError / IndexError, never a silently wrong result. Where torch takes a value,
``crossent.torch`` gives torch's result. The class of bug this hunts was found by the lead:
``float(10**400)`` raises OverflowError inside a check. The cousins found here are marked
``xfail(strict=True)`` with the place to fix; the rest are regression guards.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import crossent as xe
import crossent.torch as xt
import crossent.training as tr
from crossent import InputError
from crossent.integrations import conventions as cv
from crossent.teaching import curves
from crossent.torch import bench

HUGE = 10**400  # beyond float: float(HUGE) raises OverflowError


def _raises_naming(name, fn, *args, **kwargs):
    with pytest.raises(InputError) as info:
        fn(*args, **kwargs)
    assert name in str(info.value), str(info.value)


# --------------------------------------------------------------------------------------------
# The core (array API): regression guards for the lead's as_float fix, and the int sizes
# --------------------------------------------------------------------------------------------

_P = np.array([[0.2, 0.3, 0.5]])
_LOGITS = np.array([[1.0, 2.0, 0.5], [0.1, -0.3, 0.2]])
_LABELS = np.array([2, 0])

CORE_REAL_ARGS = [
    ("base", lambda v: xe.entropy(_P, base=v)),
    ("base", lambda v: xe.surprisal(_P, base=v)),
    ("label_smoothing", lambda v: xe.softmax_cross_entropy(_LOGITS, _LABELS, label_smoothing=v)),
    ("z_loss", lambda v: xe.softmax_cross_entropy(_LOGITS, _LABELS, z_loss=v)),
    ("softcap", lambda v: xe.softmax_cross_entropy(_LOGITS, _LABELS, softcap=v)),
    ("epsilon", lambda v: xe.poly1_cross_entropy(_LOGITS, _LABELS, epsilon=v)),
    ("gamma", lambda v: xe.softmax_focal_loss(_LOGITS, _LABELS, gamma=v)),
    ("alpha", lambda v: xe.smooth_labels(_P, v)),
    ("alpha", lambda v: xe.mixup_params(2, alpha=v, seed=0)),
]


@pytest.mark.parametrize("value", [HUGE, -HUGE, np.longdouble(10) ** 4000])
@pytest.mark.parametrize("name,call", CORE_REAL_ARGS)
def test_core_real_beyond_float_is_refused_naming_it(name, call, value):
    _raises_naming(name, call, value)


@pytest.mark.parametrize("num_classes", [2**63, 2**64, HUGE])
def test_one_hot_num_classes_beyond_int64_is_refused(num_classes):
    _raises_naming("num_classes", xe.one_hot, np.array([1]), num_classes)


def test_mixup_num_classes_beyond_int64_is_refused():
    _raises_naming("num_classes", xe.mixup, np.array([[1.0], [2.0]]), np.array([0, 1]),
                   alpha=0.2, seed=0, num_classes=2**63)


@pytest.mark.parametrize("batch_size", [2**63, 2**64])
def test_mixup_params_batch_size_beyond_int64_is_refused(batch_size):
    _raises_naming("batch_size", xe.mixup_params, batch_size, alpha=0.2, seed=0)


def test_core_integer_argument_refuses_a_bool_tensor():
    _raises_naming("batch_size", xe.mixup_params, torch.tensor(True), alpha=0.2, seed=0)


def test_core_integer_argument_refuses_python_and_numpy_bools():
    for value in (True, np.bool_(True)):
        _raises_naming("batch_size", xe.mixup_params, value, alpha=0.2, seed=0)


# --------------------------------------------------------------------------------------------
# crossent.torch: torch's result where torch takes the value
# --------------------------------------------------------------------------------------------

_X = torch.tensor([[0.3, -1.2, 2.0, 0.1, 0.5], [1.5, 0.2, -0.7, 0.0, 0.9],
                   [-0.4, 0.8, 0.6, -2.0, 1.1], [0.0, 0.3, -0.1, 0.4, -0.6]],
                  dtype=torch.float64)
_Y = torch.tensor([0, 1, 4, 2])


@pytest.mark.parametrize("kw", [
    {"ignore_index": np.int64(1)}, {"ignore_index": np.int8(4)}, {"ignore_index": 2**40},
    {"label_smoothing": np.float32(0.1)}, {"label_smoothing": np.float16(0.3)},
    {"label_smoothing": 1e-320}, {"label_smoothing": -0.0},
    {"size_average": False}, {"reduce": False}, {"size_average": 1}, {"reduce": True},
])
def test_torch_values_torch_takes_give_torch_result(kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = F.cross_entropy(_X, _Y, **kw)
        got = xt.cross_entropy(_X, _Y, **kw)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", ["size_average", "reduce"])
@pytest.mark.parametrize("value", [0, -0.0, np.bool_(False), torch.tensor(False)],
                         ids=["0", "-0.0", "np.False_", "tensor(False)"])
def test_torch_legacy_reduction_falsy_values_as_torch(name, value):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = F.cross_entropy(_X, _Y, **{name: value})
        got = xt.cross_entropy(_X, _Y, **{name: value})
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)


def test_torch_label_smoothing_0d_tensor_is_refused_naming_it():
    """torch takes a 0-d tensor (``float()`` of it); crossent refuses it by name (a
    documented refusal: under torch.compile and vocab-parallel agreement the option must
    be a Python number), never a different number."""
    _raises_naming("label_smoothing", xt.cross_entropy, _X, _Y,
                   label_smoothing=torch.tensor(0.25))


@pytest.mark.parametrize("name,value", [
    ("label_smoothing", HUGE), ("z_loss", HUGE), ("softcap", HUGE), ("num_items", HUGE),
    ("num_items", -HUGE), ("ignore_index", HUGE), ("ignore_index", -(2**63) - 1),
])
def test_torch_int_beyond_range_is_refused_naming_it(name, value):
    _raises_naming(name, xt.cross_entropy, _X, _Y, **{name: value})


def test_torch_num_items_huge_but_finite_divides_as_torch():
    expected = F.cross_entropy(_X, _Y, reduction="sum") / float(2**64)
    torch.testing.assert_close(xt.cross_entropy(_X, _Y, num_items=2**64), expected,
                               rtol=1e-12, atol=0)


def test_torch_ignore_index_refuses_a_bool_tensor():
    _raises_naming("ignore_index", xt.cross_entropy, _X, _Y, ignore_index=torch.tensor(True))


def test_torch_chunk_size_refuses_a_bool_tensor():
    w = torch.ones(5, 3, dtype=torch.float64)
    _raises_naming("chunk_size", xt.linear_cross_entropy, torch.ones(4, 3, dtype=torch.float64),
                   w, _Y, chunk_size=torch.tensor(True))


@pytest.mark.parametrize("value", [torch.tensor(1), np.array(0)], ids=["tensor", "ndarray"])
def test_torch_statistics_0d_is_refused_naming_it(value):
    _raises_naming("statistics", xt.cross_entropy, _X, _Y, statistics=value)


@pytest.mark.parametrize("kw", [
    {"in_features": 2**63, "num_classes": 5}, {"in_features": 1.5, "num_classes": 5},
    {"in_features": 3, "num_classes": -1}, {"in_features": 3, "num_classes": HUGE},
], ids=["in_2**63", "in_1.5", "classes_-1", "classes_huge"])
def test_linear_module_sizes_are_checked(kw):
    name = "in_features" if kw["num_classes"] == 5 else "num_classes"
    _raises_naming(name, xt.LinearCrossEntropyLoss, **kw)


_X32 = np.array([[0.0, 1.0, -2.0], [0.5, 0.25, 3.0]], dtype=np.float32)
_Y32 = np.array([0, 2])


def _softcap_float32(kind, cap):
    if kind == "core":
        return float(xe.softmax_cross_entropy(_X32, _Y32, softcap=cap))
    x, y = torch.from_numpy(_X32), torch.from_numpy(_Y32)
    if kind == "torch":
        return xt.cross_entropy(x, y, softcap=cap).item()
    return xt.linear_cross_entropy(torch.eye(2), x.T.contiguous(), y, softcap=cap).item()


@pytest.mark.parametrize("kind", ["core", "torch", "linear"])
def test_softcap_within_float32_as_float64(kind):
    expected = float(xe.softmax_cross_entropy(_X32.astype(np.float64), _Y32, softcap=1e38))
    assert math.isclose(_softcap_float32(kind, 1e38), expected, rel_tol=1e-5)


@pytest.mark.parametrize("kind", ["core", "torch", "linear"])
@pytest.mark.parametrize("cap", [1e300, 1e-300])
def test_softcap_beyond_float32_is_refused_or_exact(kind, cap):
    expected = float(xe.softmax_cross_entropy(_X32.astype(np.float64), _Y32, softcap=cap))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = _softcap_float32(kind, cap)
    except InputError as err:
        assert "softcap" in str(err)
        return
    assert math.isclose(got, expected, rel_tol=1e-5), (got, expected)


@pytest.fixture(scope="module")
def one_rank_group(tmp_path_factory):
    """A one-rank gloo group in this process (a FileStore), destroyed afterwards."""
    import datetime

    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build")
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    store = dist.FileStore(str(tmp_path_factory.mktemp("h49") / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=30))
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("name,value", [
    ("ignore_index", 2**63), ("ignore_index", HUGE), ("label_smoothing", HUGE),
    ("z_loss", -HUGE), ("num_items", HUGE), ("vocab_start", HUGE),
])
def test_vocab_parallel_beyond_range_is_refused(one_rank_group, name, value):
    from crossent.torch.distributed import vocab_parallel_cross_entropy

    _raises_naming(name, vocab_parallel_cross_entropy, _X, _Y, **{name: value})


def test_vocab_parallel_ignore_index_refuses_a_bool_tensor(one_rank_group):
    from crossent.torch.distributed import vocab_parallel_cross_entropy

    _raises_naming("ignore_index", vocab_parallel_cross_entropy, _X, _Y,
                   ignore_index=torch.tensor(True))


# --------------------------------------------------------------------------------------------
# Teaching and training code
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["lr", "label_smoothing", "gamma"])
def test_train_config_real_beyond_float_is_refused(name):
    _raises_naming(name, tr.TrainConfig, **{name: HUGE})


def test_training_focal_gamma_beyond_float_is_refused():
    _raises_naming("gamma", tr.softmax_focal_loss, _LOGITS, _LABELS, gamma=HUGE)


@pytest.mark.parametrize("value", [HUGE, "0.1", True], ids=["huge", "str", "bool"])
def test_make_loss_label_smoothing_is_checked(value):
    _raises_naming("label_smoothing", tr.make_loss, "smoothed-ce", label_smoothing=value)


@pytest.mark.parametrize("n_bins", [2**63, 2**64])
def test_reliability_n_bins_beyond_int64_is_refused(n_bins):
    _raises_naming("n_bins", tr.reliability, [[0.2, 0.8]], [1], n_bins=n_bins)


@pytest.mark.parametrize("h", [0.0, HUGE], ids=["zero", "huge"])
def test_finite_difference_step_is_checked(h):
    _raises_naming("h", tr.finite_difference_loss_grad, tr.softmax_mse_loss, np.zeros((1, 2)),
                   np.array([0]), h=h)


@pytest.mark.parametrize("make,name", [
    (lambda: tr.SGD("0.1"), "lr"), (lambda: tr.SGD(math.nan), "lr"),
    (lambda: tr.Adam(0.1, b1=1.0), "b1"),
], ids=["sgd-str", "sgd-nan", "adam-b1"])
def test_optimizer_settings_are_checked(make, name):
    _raises_naming(name, make)


@pytest.mark.parametrize("n_in,hidden,name", [(0, 4, "n_in"), (3, 0, "hidden"),
                                              (3, 1.5, "hidden")])
def test_init_params_sizes_are_checked(n_in, hidden, name):
    _raises_naming(name, tr.init_params, "mlp", n_in, 3, hidden=hidden,
                   rng=np.random.default_rng(0))


@pytest.mark.parametrize("n", [2**63, 1.5])
def test_teaching_curve_sizes_are_checked(n):
    _raises_naming("n", curves.surprisal_curve, n=n)


@pytest.mark.parametrize("name,call", [
    ("target", lambda: curves.label_breakdown(target=[HUGE], probs=[0.3])),
    ("lo", lambda: curves.coin_cross_entropy_curve(lo=HUGE)),
    ("truth", lambda: curves.coin_cross_entropy_curve(truth=(HUGE, 0.01))),
    ("h", lambda: curves.softmax_gradient_check([1.0, 2.0], [0.0, 1.0], h=0.0)),
    ("h", lambda: curves.finite_difference_grad(sum, [1.0], h=0.0)),
], ids=["label-target", "coin-lo", "coin-truth", "gradcheck-h", "fd-h"])
def test_teaching_real_arguments_are_checked(name, call):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _raises_naming(name, call)


@pytest.mark.parametrize("value", [HUGE, "0.1"], ids=["huge", "str"])
def test_convention_label_smoothing_is_checked(value):
    _raises_naming("label_smoothing", cv.convention_loss, np.zeros((2, 4)), np.array([1, 2]),
                   "torch", label_smoothing=value)


def test_convention_rank_must_be_an_integer():
    _raises_naming("rank", cv.convention_loss, np.zeros((2, 4)), np.array([1, 2]), "megatron",
                   label_smoothing=0.1, tensor_parallel_size=2, rank=0.5)


_CONV_LOGITS = np.array([[0.3, -1.2, 2.0, 0.1], [1.5, 0.2, -0.7, 0.0]])


def test_convention_ignore_index_numpy_integer():
    expected = cv.convention_loss(_CONV_LOGITS, np.array([1, 2]), ignore_index=1)
    got = cv.convention_loss(_CONV_LOGITS, np.array([1, 2]), ignore_index=np.int64(1))
    assert float(got) == float(expected) != float(cv.convention_loss(_CONV_LOGITS,
                                                                      np.array([1, 2])))


def test_convention_ignore_index_0d_tensor():
    expected = cv.convention_loss(_CONV_LOGITS, np.array([1, 2]), ignore_index=1)
    got = cv.convention_loss(_CONV_LOGITS, np.array([1, 2]), ignore_index=torch.tensor(1))
    assert float(got) == float(expected)


def test_bench_bandwidth_beyond_float_is_refused():
    _raises_naming("--bandwidth", bench.check_bandwidth, HUGE)


# --------------------------------------------------------------------------------------------
# The CLI: one stderr line, exit 2
# --------------------------------------------------------------------------------------------

def _cli(args):
    from typer.testing import CliRunner

    from crossent.cli.app import app

    return CliRunner().invoke(app, args)


@pytest.mark.parametrize("args,name", [
    (["explain", "--target", "2", "--probs", "0.1,0.2,0.7", "--label-smoothing", "1e999"],
     "label_smoothing"),
    (["explain", "--target", "9" * 20, "--probs", "0.1,0.2,0.7"], "target"),
    (["explain", "--target", "0", "--logits", "1" + "0" * 400 + ",1"], "--logits"),
    (["bench", "ce-small", "--bandwidth", "1e999"], "--bandwidth"),
], ids=["ls-1e999", "target-20-digits", "logits-401-digits", "bandwidth-1e999"])
def test_cli_huge_numbers_one_line_exit_2(args, name):
    res = _cli(args)
    lines = res.stderr.strip().splitlines()
    assert res.exit_code == 2 and len(lines) == 1 and name in lines[0], (res.exit_code, lines)


@pytest.mark.parametrize("flag", ["--binary", "--multilabel"])
def test_cli_explain_binary_target_beyond_float(flag):
    res = _cli(["explain", flag, "--target", "1" + "0" * 400, "--probs", "0.3"])
    lines = res.stderr.strip().splitlines()
    assert res.exit_code == 2 and len(lines) == 1 and "target" in lines[0], (res.exit_code,
                                                                              lines)
