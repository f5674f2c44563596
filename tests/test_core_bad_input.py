"""Bad input to every public core function, on every backend: crossent.InputError naming the
argument, never a wrong number, a library's own error or a bare StopIteration.

The table: every public function x every argument x the input classes that are bad for it
(None, wrong type, wrong shape, empty, non-finite, out of range, narrow or complex dtype).
Hypothesis then throws arbitrary values at every argument: the call either works or raises
InputError naming one of the function's arguments; any other exception is a bug.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays as np_arrays

import crossent as xe

P = np.array([[0.2, 0.3, 0.5], [0.1, 0.6, 0.3]])
Z = np.array([[0.5, -1.0, 2.0], [0.0, 0.3, -0.2]])
Y = np.array([2, 0])
Q = np.array([[0.1, 0.6, 0.3], [0.2, 0.3, 0.5]])
T = np.array([[1.0, 0.0, 0.5], [0.0, 1.0, 0.25]])
W = np.array([1.0, 2.0, 0.5])
M = np.array([[True, True, False], [True, False, True]])
SW = np.array([0.5, 2.0])

# The good call of each public function: (function, {argument: value}). NumPy arrays are
# moved to the backend under test; other values are passed as they are.
SOFTMAX_CE_ARGS = dict(logits=Z, target=Y, axis=-1, weight=W, ignore_index=-100,
                       label_smoothing=0.1, z_loss=1e-4, softcap=30.0, reduction="mean",
                       validate=True)
SIGMOID_ARGS = dict(logits=Z, target=T, weight=W, pos_weight=W, label_smoothing=0.1,
                    reduction="mean", validate=True)
MULTILABEL_ARGS = dict(logits=Z, targets=T, weight=W, pos_weight=W, label_smoothing=0.1,
                       reduction="mean", validate=True)
ROW_OPTIONS = dict(sample_weight=SW, where=SW > 1)
INDEX_ARGS = dict(axis=-1, ignore_index=-100, label_smoothing=0.1, reduction="mean",
                  validate=True)
GOOD: dict[str, tuple[Callable[..., Any], dict[str, Any]]] = {
    "surprisal": (xe.surprisal, dict(p=P, base=2.0, validate=True)),
    "entropy": (xe.entropy, dict(p=P, axis=-1, base=2.0, validate=True)),
    "cross_entropy": (xe.cross_entropy, dict(p=P, q=Q, axis=-1, base=2.0, validate=True)),
    "kl_divergence": (xe.kl_divergence, dict(p=P, q=Q, axis=-1, base=2.0, validate=True)),
    "binary_entropy": (xe.binary_entropy, dict(p=P, base=2.0, validate=True)),
    "softmax": (xe.softmax, dict(x=Z, axis=-1, where=M)),
    "log_softmax": (xe.log_softmax, dict(x=Z, axis=-1, where=M)),
    "logsumexp": (xe.logsumexp, dict(x=Z, axis=-1, b=W, keepdims=False, return_sign=False,
                                         where=M)),
    "logit": (xe.logit, dict(p=P, validate=True)),
    "kl_divergence_terms": (xe.kl_divergence_terms, dict(p=P, q=Q, base=2.0, validate=True)),
    "generalized_kl_divergence": (xe.generalized_kl_divergence,
                                  dict(p=2 * P, q=Q, axis=-1, base=2.0, validate=True)),
    "nll_loss": (xe.nll_loss, dict(log_probs=np.log(P), target=Y, axis=-1, weight=W,
                                   **ROW_OPTIONS, ignore_index=-100, reduction="mean",
                                   validate=True)),
    "poly1_cross_entropy": (xe.poly1_cross_entropy,
                            dict(logits=Z, target=Y, epsilon=1.0, **ROW_OPTIONS,
                                 **INDEX_ARGS)),
    "softmax_focal_loss": (xe.softmax_focal_loss,
                           dict(logits=Z, target=Y, alpha=0.25, gamma=2.0, **ROW_OPTIONS,
                                **INDEX_ARGS)),
    "categorical_focal_loss": (xe.categorical_focal_loss,
                               dict(probs=P, target=Y, alpha=0.25, gamma=2.0, **ROW_OPTIONS,
                                    **INDEX_ARGS)),
    "sigmoid": (xe.sigmoid, dict(x=Z)),
    "log_sigmoid": (xe.log_sigmoid, dict(x=Z)),
    "softmax_cross_entropy": (xe.softmax_cross_entropy, SOFTMAX_CE_ARGS),
    "softmax_cross_entropy_grad": (xe.softmax_cross_entropy_grad, SOFTMAX_CE_ARGS),
    "binary_cross_entropy": (xe.binary_cross_entropy,
                             dict(probs=P, target=T, weight=W, label_smoothing=0.1,
                                  sample_weight=W, where=M, reduction="mean", validate=True)),
    "sigmoid_binary_cross_entropy": (xe.sigmoid_binary_cross_entropy, SIGMOID_ARGS),
    "sigmoid_binary_cross_entropy_grad": (xe.sigmoid_binary_cross_entropy_grad, SIGMOID_ARGS),
    "multilabel_cross_entropy": (xe.multilabel_cross_entropy, MULTILABEL_ARGS),
    "multilabel_cross_entropy_grad": (xe.multilabel_cross_entropy_grad, MULTILABEL_ARGS),
    "sigmoid_focal_loss": (xe.sigmoid_focal_loss, dict(logits=Z, target=T, alpha=0.25, gamma=2.0,
                                                       label_smoothing=0.1, sample_weight=W,
                                                       where=M, reduction="mean",
                                                       validate=True)),
    "one_hot": (xe.one_hot, dict(labels=Y, num_classes=3, validate=True)),
    "smooth_labels": (xe.smooth_labels, dict(targets=P, alpha=0.1, axis=-1, validate=True)),
    "mixup": (xe.mixup, dict(x=Z, targets=Y, alpha=0.4, seed=0, num_classes=3)),
    "mixup_params": (xe.mixup_params, dict(batch_size=2, alpha=0.4, seed=0)),
}

# ---- the bad values, by input class ------------------------------------------------------

NOT_AN_ARRAY = {"None": None, "text": "0.5", "object": object(), "ragged": [[0.5], [0.5, 0.5]],
                "complex": P + 1j, "object_list": [0.5, None]}
"""Bad for every array argument (optional ones accept None, and skip that entry)."""

NOT_A_NUMBER = {"None": None, "text": "2", "bool": True, "list": [2.0], "complex": 2 + 0j}
NOT_AN_INTEGER = {"None": None, "text": "2", "float": 1.5, "bool": True, "list": [1]}
NOT_A_FLAG = {"None": None, "text": "yes", "int": 1}
NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def _with(a: np.ndarray, **changes: float) -> np.ndarray:
    a = a.astype(float)
    for where, value in changes.items():
        a.flat[int(where[1:])] = value
    return a


# Extra bad values per (function, argument): wrong shape, empty, non-finite, out of range.
PROB_VALUES = {"above_1": _with(P, i0=1.5), "below_0": _with(P, i0=-0.5),
               "inf": _with(P, i0=math.inf), "-inf": _with(P, i0=-math.inf)}
DIST_VALUES = {**PROB_VALUES, "not_summing_to_1": P * 1.01, "no_classes": np.zeros((2, 0)),
               "0d": np.float64(1.0)}
EXTRA: dict[tuple[str, str], dict[str, Any]] = {
    ("surprisal", "p"): PROB_VALUES,
    ("binary_entropy", "p"): PROB_VALUES,
    ("entropy", "p"): DIST_VALUES,
    ("cross_entropy", "p"): {**DIST_VALUES, "other_classes": np.full((2, 2), 0.5)},
    ("cross_entropy", "q"): {**DIST_VALUES, "one_class": np.ones((2, 1))},
    ("kl_divergence", "p"): {**DIST_VALUES, "one_class": np.ones(1)},
    ("kl_divergence", "q"): {**DIST_VALUES, "other_rows": np.full((3, 3), 1 / 3)},
    ("logsumexp", "b"): {"shape": np.ones(4), "rows": np.ones((3, 1))},
    ("logit", "p"): PROB_VALUES,
    ("kl_divergence_terms", "p"): {**PROB_VALUES, "shape": np.full((3, 3), 1 / 3)},
    ("kl_divergence_terms", "q"): {**PROB_VALUES, "shape": np.ones(2)},
    ("generalized_kl_divergence", "p"): {"negative": _with(P, i0=-0.5),
                                         "-inf": _with(P, i0=-np.inf), "shape": np.ones((3, 3))},
    ("generalized_kl_divergence", "q"): {"negative": _with(Q, i0=-0.5), "shape": np.ones(2)},
    ("nll_loss", "log_probs"): {"0d": np.float64(-1.0), "no_classes": np.zeros((2, 0)),
                                "integer": np.zeros((2, 3), dtype=np.int64), "bool": Z > 0},
    ("nll_loss", "target"): {"index_too_large": np.array([3, 0]), "float": np.array([0.0, 1.0]),
                             "index_negative": np.array([-1, 0]), "bool": np.array([True, False]),
                             "index_shape": np.array([0, 1, 2])},
    ("nll_loss", "weight"): {"shape": np.ones(4), "0d": np.float64(1.0)},
    ("softmax_cross_entropy", "logits"): {
        "0d": np.float64(1.0), "integer": Y[:, None] * np.ones((1, 3), dtype=np.int64),
        "no_classes": np.zeros((2, 0)), "bool": Z > 0},
    ("softmax_cross_entropy", "target"): {
        "index_too_large": np.array([3, 0]), "index_negative": np.array([-1, 0]),
        "index_2**40": np.array([2**40, 0]), "index_shape": np.array([0, 1, 2]),
        "prob_shape": P[:, :2], "prob_above_1": _with(P, i0=1.5),
        "prob_inf": _with(P, i0=math.inf), "prob_not_summing_to_1": P * 1.01,
        "bool": np.array([True, False]), "empty_rows": np.zeros(0, dtype=np.int64)},
    ("softmax_cross_entropy", "weight"): {"shape": np.ones(4), "0d": np.float64(1.0),
                                          "empty": np.zeros(0)},
    ("binary_cross_entropy", "probs"): {
        **PROB_VALUES, "integer": np.ones((2, 3), dtype=np.int64), "shape": P[:, :2]},
    ("binary_cross_entropy", "target"): {**PROB_VALUES, "shape": P[:1]},
    ("binary_cross_entropy", "weight"): {"shape": np.ones(2), "too_many_dims": np.ones((1, 2, 3))},
    ("sigmoid_binary_cross_entropy", "logits"): {"integer": np.ones((2, 3), dtype=np.int64)},
    ("sigmoid_binary_cross_entropy", "target"): {**PROB_VALUES, "shape": T[:, :2]},
    ("sigmoid_binary_cross_entropy", "weight"): {"shape": np.ones(2)},
    ("sigmoid_binary_cross_entropy", "pos_weight"): {"shape": np.ones(5)},
    ("multilabel_cross_entropy", "logits"): {"0d": np.float64(0.0)},
    ("multilabel_cross_entropy", "targets"): {**PROB_VALUES, "shape": T[:1]},
    ("multilabel_cross_entropy", "pos_weight"): {"shape": np.ones(2)},
    ("sigmoid_focal_loss", "logits"): {"integer": np.ones((2, 3), dtype=np.int64)},
    ("sigmoid_focal_loss", "target"): {**PROB_VALUES, "shape": T[:, :1]},
    ("one_hot", "labels"): {"float": np.array([0.0, 1.0]), "too_large": np.array([0, 3]),
                            "negative": np.array([-1, 0]), "bool": np.array([True, False])},
    ("smooth_labels", "targets"): {
        **DIST_VALUES, "integer": np.array([2, 0]), "integer_rows": np.eye(3, dtype=np.int64)},
    ("mixup", "x"): {"0d": np.float64(1.0), "rows": np.zeros((3, 2)), "bool": Z > 0},
    ("mixup", "targets"): {"0d": np.int64(1), "float_0d": np.float64(1.0),
                           "bool": np.array([True, False]), "labels_too_large": np.array([0, 7])},
}
EXTRA[("categorical_focal_loss", "probs")] = {
    **DIST_VALUES, "integer": np.ones((2, 3), dtype=np.int64), "bool": P > 0.2}
EXTRA[("categorical_focal_loss", "target")] = EXTRA[("nll_loss", "target")] | {
    "prob_not_summing_to_1": P * 1.01, "prob_shape": P[:, :2], "float": np.array([0.0, 1.0])}
for loss in ("poly1_cross_entropy", "softmax_focal_loss"):
    for arg in ("logits", "target"):
        EXTRA[(loss, arg)] = EXTRA[("softmax_cross_entropy", arg)]
# The grads share their losses' array checks.
for loss in ("softmax_cross_entropy", "sigmoid_binary_cross_entropy", "multilabel_cross_entropy"):
    for (fn, arg), values in list(EXTRA.items()):
        if fn == loss:
            EXTRA[(loss + "_grad", arg)] = values

SCALARS: dict[str, dict[str, Any]] = {
    "base": {**NOT_A_NUMBER, **NON_FINITE, "zero": 0.0, "one": 1, "negative": -2.0},
    "axis": {"None_for_int_axis": None, "text": "0", "float": 1.0, "bool": True, "out_of_range": 2,
             "below_range": -3},
    "keepdims": NOT_A_FLAG,
    "return_sign": NOT_A_FLAG,
    "epsilon": {**NOT_A_NUMBER, **NON_FINITE},
    "validate": NOT_A_FLAG,
    "ignore_index": NOT_AN_INTEGER,
    "label_smoothing": {**NOT_A_NUMBER, **NON_FINITE, "negative": -0.1, "above_1": 1.5},
    "z_loss": {**NOT_A_NUMBER, **NON_FINITE, "negative": -1e-4},
    "softcap": {**{k: v for k, v in NOT_A_NUMBER.items() if k != "None"}, **NON_FINITE,
                "zero": 0.0, "negative": -1.0},
    "reduction": {"None": None, "unknown": "avg", "batchmean": "batchmean", "list": ["mean"],
                  "int": 0},
    "alpha": {**NOT_A_NUMBER, **NON_FINITE, "negative": -0.5, "above_1": 1.5},
    "gamma": {**NOT_A_NUMBER, **NON_FINITE, "negative": -1.0},
    "num_classes": {**NOT_AN_INTEGER, "zero": 0, "negative": -1},
    "seed": {**NOT_AN_INTEGER, "negative": -1},
    "batch_size": {**NOT_AN_INTEGER, "negative": -1},
}
# Where an argument of the same name has other valid values.
SCALAR_EXCEPTIONS = {
    ("sigmoid_focal_loss", "alpha", "None"),  # alpha=None: no alpha weighting
    ("softmax_focal_loss", "alpha", "None"), ("categorical_focal_loss", "alpha", "None"),
    ("mixup", "alpha", "above_1"), ("mixup_params", "alpha", "above_1"),  # Beta(1.5, 1.5)
    ("logsumexp", "axis", "None_for_int_axis"),  # axis=None: every axis
    ("softmax", "axis", "None_for_int_axis"), ("log_softmax", "axis", "None_for_int_axis"),
}
MIXUP_ALPHA = {"zero": 0.0}  # alpha of a Beta distribution must be > 0


OPTIONAL_ARRAYS = ("weight", "pos_weight", "b", "where", "sample_weight")
MASK_VALUES = {"not_boolean": Z, "shape": np.ones((3, 3), dtype=bool)}
SAMPLE_WEIGHT_VALUES = {"shape": np.ones(5), "too_many_dims": np.ones((1, 2, 3, 3))}
for fn_name, (_, good) in list(GOOD.items()):
    if "where" in good:
        EXTRA[(fn_name, "where")] = MASK_VALUES
    if "sample_weight" in good:
        EXTRA[(fn_name, "sample_weight")] = SAMPLE_WEIGHT_VALUES


def _cases() -> list[Any]:
    cases = []
    for fn_name, (_, good) in GOOD.items():
        for arg, value in good.items():
            if isinstance(value, np.ndarray):
                bad = {k: v for k, v in NOT_AN_ARRAY.items()
                       if not (k == "None" and arg in OPTIONAL_ARRAYS)}
                bad.update(EXTRA.get((fn_name, arg), {}))
            else:
                bad = dict(SCALARS[arg])
                if fn_name.startswith("mixup") and arg == "alpha":
                    bad.update(MIXUP_ALPHA)
            for kind, v in bad.items():
                if (fn_name, arg, kind) in SCALAR_EXCEPTIONS:
                    continue
                cases.append(pytest.param(fn_name, arg, v, id=f"{fn_name}-{arg}-{kind}"))
    return cases


CASES = _cases()


def _on(backend: Any, value: Any) -> Any:
    if isinstance(value, np.ndarray) and value.dtype.kind in "biufc":
        return backend.asarray(value)
    return value


def _call(backend: Any, fn_name: str, **changes: Any) -> Any:
    """The good call of ``fn_name`` with ``changes``, every argument by keyword."""
    fn, good = GOOD[fn_name]
    return fn(**{k: _on(backend, v) for k, v in {**good, **changes}.items()})


def _names(message: str, arg: str) -> bool:
    return re.search(rf"(?<![\w.]){re.escape(arg)}(?!\w)", message) is not None


def test_every_good_call_works(backend):
    for fn_name in GOOD:
        _call(backend, fn_name)


def test_the_table_covers_every_public_function():
    public = {n for n in xe.__all__ if callable(getattr(xe, n)) and n[0].islower()}
    assert public == set(GOOD)
    assert len(CASES) > 400


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize(("fn_name", "arg", "value"), CASES)
def test_bad_input_raises_input_error_naming_the_argument(backend, fn_name, arg, value):
    with pytest.raises(xe.InputError) as info:
        _call(backend, fn_name, **{arg: value})
    assert _names(str(info.value), arg), f"{info.value!s} does not name {arg}"


def test_none_inside_map_raises_instead_of_truncating():
    with pytest.raises(xe.InputError, match=r"^p is None"):
        list(map(xe.surprisal, [0.5, None, 0.25]))


# ---- hypothesis: anything at all is a result or an InputError naming an argument ---------

JUNK_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=3),
    st.complex_numbers(), st.lists(st.floats(), max_size=2), st.just(object()),
)
JUNK_DTYPES = st.sampled_from(["float64", "float32", "float16", "int8", "uint8", "int16",
                               "int64", "bool", "complex64"])
JUNK_ARRAYS = JUNK_DTYPES.flatmap(lambda dtype: np_arrays(
    dtype, st.sampled_from([(), (0,), (2,), (3,), (2, 3), (3, 2), (2, 0), (1, 3)]),
    elements=st.floats(-3, 3, width=16) if dtype[0] in "fc" else None))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@settings(max_examples=300, deadline=None)
@given(fn_name=st.sampled_from(sorted(GOOD)), data=st.data())
def test_any_argument_value_gives_a_result_or_an_input_error_naming_an_argument(fn_name, data):
    _, good = GOOD[fn_name]
    arg = data.draw(st.sampled_from(sorted(good)), label="arg")
    junk = JUNK_ARRAYS if isinstance(good[arg], np.ndarray) else JUNK_SCALARS
    value = data.draw(junk, label="value")
    try:
        _call(NUMPY, fn_name, **{arg: value})
    except xe.InputError as err:
        assert any(_names(str(err), name) for name in good), f"{err!s} names no argument"


class _NumPy:
    name = "numpy"

    @staticmethod
    def asarray(a: Any) -> Any:
        return np.asarray(a)


NUMPY = _NumPy()


def test_integer_logits_from_a_list_are_refused_with_the_fix_a_learner_can_type():
    """Review H98-6: integer logits are refused (as torch's ``cross_entropy`` refuses a
    LongTensor), and for a Python list the fix is a decimal point, which the message says."""
    with pytest.raises(xe.InputError, match=r"logits must be a floating-point array, got dtype "
                                         r"int64.*write 1\.0 rather than 1"):
        xe.softmax_cross_entropy([[1, 2]], [0])
    assert float(xe.softmax_cross_entropy([[1.0, 2.0]], [0])) == pytest.approx(
        math.log(1 + math.e))  # -log(e^1 / (e^1 + e^2))
