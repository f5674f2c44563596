"""Adversarial review of the core's namespace handling (helper H70): one call mixing
array libraries, Python lists and scalars; dtype preservation and promotion; integer
targets of every width; the ``axis`` argument; empty arrays; torch tensors that require
grad, live on the ``meta`` device or are non-contiguous views; NumPy arrays that are
read-only, Fortran-ordered, reversed, masked, big-endian or of object dtype; results that
must not alias or modify their inputs.

References are independent of crossent: ``torch.nn.functional`` in float64, SciPy
(``softmax``, ``logsumexp``, ``entropy``), and float64 NumPy formulas. Tests marked
``xfail(strict=True)`` record bugs (each reason says what is wrong and what the
reference does); the others guard behaviour checked and found right.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special as sp
import scipy.stats as ss
import torch
import torch.nn.functional as F

import crossent as xe
from crossent.errors import InputError

Z = np.array([[1.0, 2.0, 0.5, -1.0], [0.1, -1.0, 3.0, 0.0], [2.0, 2.0, -0.5, 1.5]])
T = np.array([1, 2, 0])
P = sp.softmax(Z[:, ::-1] * 0.7, axis=-1)


def _np(x):
    """A result as a float64 NumPy array (any library)."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().double().numpy()
    if type(x).__module__.startswith("array_api_strict"):
        return np.from_dlpack(x).astype(np.float64)
    return np.asarray(x, dtype=np.float64)


def _ref_ce(z, t, **kw):
    """torch's float64 cross-entropy of NumPy logits and int64 (or probability) targets."""
    zt = torch.tensor(np.asarray(z, dtype=np.float64))
    tt = torch.tensor(np.asarray(t, dtype=np.int64 if np.asarray(t).dtype.kind in "iub"
                                 else np.float64))
    return F.cross_entropy(zt, tt, **kw).item()


# ---------------------------------------------------------------- mixed namespaces (correct)

MIXES = {
    "numpy logits, torch target": (lambda: Z, lambda: torch.tensor(T), torch.Tensor),
    "torch logits, numpy target": (lambda: torch.tensor(Z), lambda: T, torch.Tensor),
    "list logits, torch target": (lambda: Z.tolist(), lambda: torch.tensor(T), torch.Tensor),
    "torch logits, list target": (lambda: torch.tensor(Z), lambda: T.tolist(), torch.Tensor),
    "numpy logits, jax target": (lambda: Z, lambda: jnp.asarray(T), jax.Array),
    "jax logits, numpy target": (lambda: jnp.asarray(Z), lambda: T, jax.Array),
    "torch logits, jax target": (lambda: torch.tensor(Z), lambda: jnp.asarray(T), torch.Tensor),
    "jax logits, torch target": (lambda: jnp.asarray(Z), lambda: torch.tensor(T), jax.Array),
}


@pytest.mark.parametrize("case", list(MIXES))
def test_mixed_namespaces_compute_in_the_first_non_numpy_library(case):
    make_z, make_t, kind = MIXES[case]
    out = xe.softmax_cross_entropy(make_z(), make_t(), weight=np.array([1.0, 2.0, 0.5, 1.0]))
    assert isinstance(out, kind)
    ref = _ref_ce(Z, T, weight=torch.tensor([1.0, 2.0, 0.5, 1.0], dtype=torch.float64))
    np.testing.assert_allclose(_np(out), ref, rtol=1e-12)


def test_array_api_strict_mixed_with_numpy_and_torch_gives_torchs_value():
    import array_api_strict as xs

    for t in (T, torch.tensor(T), xs.asarray(T)):
        out = xe.softmax_cross_entropy(xs.asarray(Z), t)
        assert type(out).__module__.startswith("array_api_strict")
        np.testing.assert_allclose(_np(out), _ref_ce(Z, T), rtol=1e-12)


def test_numpy_secondary_arguments_follow_a_torch_loss_and_keep_its_graph():
    z = torch.tensor(Z, requires_grad=True)
    loss = xe.softmax_cross_entropy(z, T.tolist(), weight=[1.0, 2.0, 0.5, 1.0],
                                    sample_weight=np.array([1.0, 1.0, 1.0]),
                                    where=np.array([True, True, True]))
    loss.backward()
    z2 = torch.tensor(Z, requires_grad=True)
    F.cross_entropy(z2, torch.tensor(T), weight=torch.tensor([1.0, 2.0, 0.5, 1.0],
                                                             dtype=torch.float64)).backward()
    torch.testing.assert_close(loss.detach(), F.cross_entropy(
        z2.detach(), torch.tensor(T), weight=torch.tensor([1.0, 2.0, 0.5, 1.0],
                                                          dtype=torch.float64)))
    torch.testing.assert_close(z.grad, z2.grad, rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------- autograd (correct)

def test_torch_autograd_through_the_measures_matches_the_closed_forms():
    p = torch.tensor(P, requires_grad=True)
    q = torch.tensor(P[::-1].copy(), requires_grad=True)
    xe.cross_entropy(p, q).sum().backward()
    # d/dp -sum p log q = -log q ; d/dq = -p / q
    torch.testing.assert_close(p.grad, -torch.log(q.detach()), rtol=1e-12, atol=0)
    torch.testing.assert_close(q.grad, -p.detach() / q.detach(), rtol=1e-12, atol=0)
    p.grad = None
    xe.entropy(p).sum().backward()
    torch.testing.assert_close(p.grad, -(torch.log(p.detach()) + 1), rtol=1e-12, atol=0)


def test_low_precision_torch_logits_keep_the_graph_through_the_float32_compute():
    z = torch.tensor(Z, dtype=torch.bfloat16, requires_grad=True)
    loss = xe.softmax_cross_entropy(z, torch.tensor(T))
    assert loss.dtype == torch.bfloat16 and loss.requires_grad
    loss.backward()
    assert z.grad is not None and z.grad.dtype == torch.bfloat16
    ref = torch.tensor(Z, dtype=torch.bfloat16).double().softmax(-1)
    ref[torch.arange(3), torch.tensor(T)] -= 1
    torch.testing.assert_close(z.grad.double(), ref / 3, rtol=0, atol=4e-3)


# ---------------------------------------------------------------- integer targets (correct)

INT_DTYPES = ["int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64"]


@pytest.mark.parametrize("dtype", INT_DTYPES)
def test_every_integer_target_width_gives_torchs_loss(backend, dtype):
    out = xe.softmax_cross_entropy(backend.asarray(Z), backend.asarray(T, dtype),
                                   label_smoothing=0.1)
    np.testing.assert_allclose(_np(out), _ref_ce(Z, T, label_smoothing=0.1), rtol=1e-12)


@pytest.mark.parametrize("target,ignore_index,kept", [
    ([2**53 + 1, 1, 0], 2**53 + 1, [1, 2]),  # one past float64's integers: exact
    ([2**63 - 1, 1, 0], 2**63 - 1, [1, 2]),
    ([-(2**63), 1, 0], -(2**63), [1, 2]),
])
def test_int64_targets_beyond_2_to_the_53_compare_with_ignore_index_exactly(
        backend, target, ignore_index, kept):
    out = xe.softmax_cross_entropy(backend.asarray(Z), backend.asarray(target, "int64"),
                                   ignore_index=ignore_index)
    np.testing.assert_allclose(_np(out), _ref_ce(Z[kept], np.asarray(target)[kept]),
                               rtol=1e-12)


def test_an_int64_target_one_past_an_ignore_index_of_2_to_the_53_is_not_ignored(backend):
    with pytest.raises(InputError, match="target"):
        xe.softmax_cross_entropy(backend.asarray(Z), backend.asarray([2**53 + 1, 1, 0], "int64"),
                                 ignore_index=2**53)


# ---------------------------------------------------------------- axis (correct)

@pytest.mark.parametrize("axis", [2, -3, 1.0, True, "1", None, (1,)])
def test_a_bad_axis_of_a_distribution_function_raises_naming_axis(axis):
    for call in (lambda: xe.entropy(P, axis=axis), lambda: xe.kl_divergence(P, P, axis=axis),
                 lambda: xe.softmax_cross_entropy(Z, T, axis=axis),
                 lambda: xe.smooth_labels(P, 0.1, axis=axis)):
        with pytest.raises(InputError, match="axis"):
            call()


@pytest.mark.parametrize("axis", [3, -3, 1.5, True, np.True_])
def test_a_bad_axis_of_an_activation_raises_naming_axis(axis):
    for fn in (xe.softmax, xe.log_softmax, xe.logsumexp):
        with pytest.raises(InputError, match="axis"):
            fn(Z, axis=axis)


def test_numpy_integer_axis_works_on_numpy():
    np.testing.assert_allclose(xe.entropy(P, axis=np.int64(-1)), ss.entropy(P, axis=-1),
                               rtol=1e-12)
    np.testing.assert_allclose(xe.softmax(Z, axis=np.int64(0)), sp.softmax(Z, axis=0),
                               rtol=1e-12)


@pytest.mark.parametrize("fn", ["entropy", "cross_entropy", "softmax", "logsumexp"])
def test_numpy_integer_axis_works_on_torch(fn):
    x = torch.tensor(P)
    args = (x, x) if fn == "cross_entropy" else (x,)
    out = getattr(xe, fn)(*args, axis=np.int64(-1))
    np.testing.assert_allclose(_np(out), _np(getattr(xe, fn)(*args, axis=-1)), rtol=0)


@pytest.mark.parametrize("fn", ["softmax", "log_softmax", "logsumexp"])
def test_numpy_integer_axis_on_a_0d_input(fn):
    expected = {"softmax": 1.0, "log_softmax": 0.0, "logsumexp": 1.5}[fn]
    assert float(getattr(xe, fn)(np.float64(1.5), axis=np.int64(0))) == expected


@pytest.mark.parametrize("fn", ["softmax", "log_softmax", "logsumexp"])
def test_a_repeated_axis_raises_input_error_naming_axis(fn):
    with pytest.raises(InputError, match="axis"):
        getattr(xe, fn)(torch.tensor(Z), axis=(1, -1))


# ---------------------------------------------------------------- empty arrays (correct)

def test_empty_batches_follow_torch(backend):
    z = backend.asarray(np.zeros((0, 4)))
    t = backend.asarray(np.zeros((0,), dtype=np.int64))
    ref_mean = F.cross_entropy(torch.zeros(0, 4, dtype=torch.float64),
                               torch.zeros(0, dtype=torch.long))
    assert np.isnan(_np(xe.softmax_cross_entropy(z, t))) and bool(ref_mean.isnan())
    assert _np(xe.softmax_cross_entropy(z, t, reduction="sum")) == 0.0
    assert _np(xe.softmax_cross_entropy(z, t, reduction="none")).shape == (0,)
    assert _np(xe.entropy(z)).shape == (0,)
    np.testing.assert_array_equal(_np(xe.logsumexp(backend.asarray(np.zeros((2, 0))))),
                                  sp.logsumexp(np.zeros((2, 0)), axis=-1))
    assert _np(xe.softmax(backend.asarray(np.zeros((2, 0))))).shape == (2, 0)


def test_zero_classes_raise_naming_the_argument(backend):
    with pytest.raises(InputError, match="logits"):
        xe.softmax_cross_entropy(backend.asarray(np.zeros((2, 0))),
                                 backend.asarray(np.zeros(2, dtype=np.int64)))
    with pytest.raises(InputError, match="p"):
        xe.entropy(backend.asarray(np.zeros((2, 0))))


# ---------------------------------------------------------------- memory layouts (correct)

def test_numpy_layouts_give_the_contiguous_result():
    ro = P.copy()
    ro.setflags(write=False)
    for p in (ro, np.asfortranarray(P), P[::-1, ::-1]):
        np.testing.assert_allclose(xe.entropy(p), ss.entropy(np.ascontiguousarray(p), axis=-1),
                                   rtol=1e-12)
        np.testing.assert_allclose(xe.softmax(p, axis=0),
                                   sp.softmax(np.ascontiguousarray(p), axis=0), rtol=1e-12)
    assert not ro.flags.writeable


def test_torch_views_give_the_contiguous_result():
    base = torch.tensor(np.random.default_rng(70).standard_normal((5, 4, 6)))
    for v in (base.transpose(0, 2), base[:, ::2, 1::2], base.flip(0), base[:1].expand(3, 4, 6)):
        c = v.contiguous()
        t = torch.zeros(v.shape[0], *v.shape[2:], dtype=torch.long)
        torch.testing.assert_close(
            xe.softmax_cross_entropy(v, t, axis=1, reduction="none"),
            F.cross_entropy(c, t, reduction="none"), rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(xe.softmax(v, axis=1), torch.softmax(c, 1), rtol=1e-12,
                                   atol=1e-15)


# ---------------------------------------------------------------- no aliasing (correct)

def _public_calls(mk):
    u = np.random.default_rng(7).uniform(0.1, 0.9, Z.shape)
    z, p, t, uu = mk(Z), mk(P), mk(T), mk(u)
    return [
        lambda: xe.surprisal(uu), lambda: xe.entropy(p), lambda: xe.cross_entropy(p, p),
        lambda: xe.kl_divergence(p, p), lambda: xe.kl_divergence_terms(p, uu),
        lambda: xe.generalized_kl_divergence(p, uu), lambda: xe.binary_entropy(uu),
        lambda: xe.softmax(z), lambda: xe.log_softmax(z), lambda: xe.logsumexp(z, b=uu),
        lambda: xe.sigmoid(z), lambda: xe.log_sigmoid(z), lambda: xe.logit(uu),
        lambda: xe.one_hot(t, 4), lambda: xe.smooth_labels(p, 0.0),
        lambda: xe.mixup(z, p, alpha=0.3, seed=1)[1],
        lambda: xe.softmax_cross_entropy(z, p, reduction="none"),
        lambda: xe.nll_loss(z, t, reduction="none"),
        lambda: xe.binary_cross_entropy(uu, uu, reduction="none"),
        lambda: xe.sigmoid_binary_cross_entropy(z, uu, reduction="none"),
        lambda: xe.multilabel_cross_entropy(z, uu, reduction="none"),
        lambda: xe.categorical_focal_loss(p, t, reduction="none"),
        lambda: xe.softmax_cross_entropy_grad(z, p),
        lambda: xe.sigmoid_binary_cross_entropy_grad(z, uu),
    ], (z, p, t, uu)


@pytest.mark.parametrize("lib", ["numpy", "torch"])
def test_results_neither_alias_nor_modify_their_inputs(lib):
    mk = np.array if lib == "numpy" else torch.tensor
    calls, inputs = _public_calls(mk)
    before = [_np(x).copy() for x in inputs]
    for call in calls:
        out = call()
        for x in inputs:
            if lib == "numpy":
                assert not np.shares_memory(out, x)
            else:
                assert out.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()
    for x, b in zip(inputs, before, strict=True):
        np.testing.assert_array_equal(_np(x), b)


# ---------------------------------------------------------------- scalars and bad dtypes

@pytest.mark.parametrize("value,dtype", [
    (np.float32(0.25), np.float32), (np.float16(0.25), np.float16),
    (np.array(0.25, dtype=np.float32), np.float32), (0.25, np.float64), (1, np.float64),
])
def test_numpy_scalars_and_0d_arrays_keep_their_dtype(value, dtype):
    out = xe.surprisal(value)
    assert np.asarray(out).dtype == dtype
    np.testing.assert_allclose(float(out), -np.log(float(value)), rtol=1e-3)
    assert np.asarray(xe.sigmoid(value)).dtype == dtype


@pytest.mark.parametrize("value", [np.array([0.5, 0.5], dtype=object), ["0.5", "0.5"],
                                   (x for x in (0.5, 0.5)), [0.5, None]])
def test_object_and_text_arrays_raise_naming_the_argument(value):
    with pytest.raises(InputError, match="p"):
        xe.entropy(value)


@pytest.mark.parametrize("fn", ["softmax", "logsumexp", "sigmoid"])
def test_a_masked_array_is_refused_or_taken_as_its_data(fn):
    masked = np.ma.masked_array(Z, mask=[[False, False, True, False]] * 3)
    ref = {"softmax": sp.softmax(Z, axis=-1), "logsumexp": sp.logsumexp(Z, axis=-1),
           "sigmoid": sp.expit(Z)}[fn]
    try:
        out = getattr(xe, fn)(masked)
    except InputError as err:
        assert "x" in str(err)
        return
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-12)


def test_a_numpy_bfloat16_array_gives_a_result_or_an_input_error():
    import ml_dtypes

    x = Z.astype(ml_dtypes.bfloat16)
    try:
        out = xe.softmax(x)
    except InputError as err:
        assert "x" in str(err)
        return
    np.testing.assert_allclose(np.asarray(out, dtype=np.float64),
                               sp.softmax(x.astype(np.float64), axis=-1), rtol=1e-2)


# ---------------------------------------------------------------- conversion between libraries

@pytest.mark.parametrize("case", ["big-endian target torch", "big-endian weight jax",
                                  "ulonglong target torch"])
def test_numpy_byte_orders_and_integer_aliases_join_another_library(case):
    weight = None
    if case == "big-endian target torch":
        z, t = torch.tensor(Z), P.astype(">f8")
        ref = _ref_ce(Z, P)
    elif case == "big-endian weight jax":
        z, t, weight = jnp.asarray(Z), T, np.array([1.0, 2.0, 0.5, 1.0], dtype=">f8")
        ref = _ref_ce(Z, T, weight=torch.tensor([1.0, 2.0, 0.5, 1.0], dtype=torch.float64))
    else:
        z, t = torch.tensor(Z), T.astype(np.ulonglong)
        ref = _ref_ce(Z, T)
    np.testing.assert_allclose(_np(xe.softmax_cross_entropy(z, t, weight=weight)), ref,
                               rtol=1e-12)


@pytest.mark.parametrize("case", ["requires grad", "bfloat16", "list"])
def test_a_torch_tensor_that_cannot_become_numpy_raises_input_error(case):
    if case == "requires grad":
        call = lambda: xe.cross_entropy(jnp.asarray(P), torch.tensor(P, requires_grad=True))  # noqa: E731
        name = "q"
    elif case == "bfloat16":
        call = lambda: xe.softmax_cross_entropy(  # noqa: E731
            jnp.asarray(Z), torch.tensor(P, dtype=torch.bfloat16))
        name = "target"
    else:
        call = lambda: xe.entropy([torch.tensor(0.5, requires_grad=True), torch.tensor(0.5)])  # noqa: E731
        name = "p"
    try:
        out = call()
    except InputError as err:
        assert name in str(err)
        return
    assert case == "bfloat16"  # computing is fine for a tensor without a graph
    ref = _ref_ce(Z, torch.tensor(P, dtype=torch.bfloat16).double().numpy())
    np.testing.assert_allclose(_np(out), ref, rtol=1e-6)


@pytest.mark.parametrize("value", [2**32 + 1, 2**32 - 100, 2**40])
@pytest.mark.parametrize("fn", ["softmax_cross_entropy", "nll_loss"])
def test_jax_without_x64_refuses_numpy_targets_past_int32(fn, value):
    with jax.enable_x64(False):
        z = jnp.asarray(Z[:1], dtype=jnp.float32)
        with pytest.raises(InputError, match="target"):
            getattr(xe, fn)(z, np.array([value]))


def test_jax_without_x64_computes_int64_numpy_targets_in_range():
    with jax.enable_x64(False):
        out = xe.softmax_cross_entropy(jnp.asarray(Z, dtype=jnp.float32), T.astype(np.int64))
        assert out.dtype == jnp.float32
    np.testing.assert_allclose(float(out), _ref_ce(Z, T), rtol=1e-6)


# ---------------------------------------------------------------- values unknown at call time

@pytest.mark.parametrize("fn", ["softmax_cross_entropy", "nll_loss"])
def test_uint64_target_under_jit_with_validate_false(fn):
    f = jax.jit(lambda z, t: getattr(xe, fn)(z, t, validate=False))
    out = f(jnp.asarray(Z), jnp.asarray(T, dtype=jnp.uint64))
    ref = getattr(xe, fn)(Z, T.astype(np.int64))
    np.testing.assert_allclose(float(out), float(ref), rtol=1e-12)


def test_validate_false_runs_on_meta_tensors():
    z = torch.empty(3, 4, device="meta")
    t = torch.empty(3, dtype=torch.long, device="meta")
    assert xe.softmax_cross_entropy(z, t, validate=False).device.type == "meta"
    assert xe.entropy(torch.empty(3, 4, device="meta"), validate=False).shape == (3,)
    assert xe.softmax(z).device.type == "meta"


@pytest.mark.parametrize("case", ["meta loss", "meta entropy", "meta one_hot", "fake loss",
                                  "meta focal alpha, validate=False"])
def test_values_that_cannot_be_read_raise_input_error_naming_validate(case):
    if case.startswith("fake"):
        from torch._subclasses.fake_tensor import FakeTensorMode

        with FakeTensorMode(), pytest.raises(InputError, match="validate"):
            xe.softmax_cross_entropy(torch.randn(3, 4), torch.zeros(3, dtype=torch.long))
        return
    z = torch.empty(3, 4, device="meta")
    t = torch.empty(3, dtype=torch.long, device="meta")
    if case == "meta focal alpha, validate=False":
        out = xe.softmax_focal_loss(z, t, alpha=[0.1, 0.2, 0.3, 0.4], validate=False)
        assert out.device.type == "meta"
        return
    call = {"meta loss": lambda: xe.softmax_cross_entropy(z, t),
            "meta entropy": lambda: xe.entropy(z),
            "meta one_hot": lambda: xe.one_hot(t, 4)}[case]
    with pytest.raises(InputError, match="validate"):
        call()


@pytest.mark.parametrize("arg", ["target", "weight"])
def test_a_torch_argument_on_another_device_raises_input_error_naming_it(arg):
    z = torch.tensor(Z)
    t = torch.tensor(T)
    w = None
    if arg == "target":
        t = torch.empty(3, dtype=torch.long, device="meta")
    else:
        w = torch.empty(4, dtype=torch.float64, device="meta")
    with pytest.raises(InputError, match=arg):
        xe.softmax_cross_entropy(z, t, weight=w, validate=False)


# ---------------------------------------------------------------- dtype promotion

def test_narrow_floats_are_computed_in_float32_and_returned_in_their_dtype(backend):
    if backend.name == "array_api_strict":
        pytest.skip("array-api-strict has no float16")
    z = backend.asarray(Z, "float16")
    out = xe.softmax_cross_entropy(z, backend.asarray(T))
    assert out.dtype == backend.dtype("float16")
    ref = _ref_ce(Z.astype(np.float16).astype(np.float64), T)
    np.testing.assert_allclose(_np(out), ref, rtol=1e-3)


@pytest.mark.parametrize("case", ["cross_entropy f16 p, f64 q", "loss bf16 z, f32 target",
                                  "sigmoid bce f32 z, f64 target"])
def test_mixed_precision_inputs_promote_like_torch(case):
    if case.startswith("cross_entropy"):
        p, q = torch.tensor(P[0], dtype=torch.float16), torch.tensor(P[1])
        out = xe.cross_entropy(p, q)
        ref = -(p.double() * q.log()).sum()
    elif case.startswith("loss"):
        z, t = torch.tensor(Z, dtype=torch.bfloat16), torch.tensor(P, dtype=torch.float32)
        out = xe.softmax_cross_entropy(z, t)
        ref = F.cross_entropy(z.double(), t.double()).to(F.cross_entropy(z, t).dtype)
    else:
        z, t = torch.tensor(Z, dtype=torch.float32), torch.tensor(P)
        out = xe.sigmoid_binary_cross_entropy(z, t)
        ref = F.binary_cross_entropy_with_logits(z.double(), t).to(
            F.binary_cross_entropy_with_logits(z, t).dtype)
    assert out.dtype == ref.dtype
    torch.testing.assert_close(out, ref, rtol=2e-6, atol=0)


# ---------------------------------------------------------------- messages

def test_one_hot_reports_a_huge_unsigned_label_as_it_is():
    with pytest.raises(InputError) as err:
        xe.one_hot(np.array([2**64 - 1], dtype=np.uint64), 3)
    assert "-1" not in str(err.value)
