"""Adversarial checks of issue 14's ``where=`` / ``sample_weight=`` in the core, as a user
moving from optax, jax.nn, Keras or torch would try them: NaN and inf in masked-out entries
(the ``where`` NaN-gradient trap: torch autograd and jax.grad through the losses must stay
finite and equal the analytic gradient and optax's), softcap with a class mask, broadcast
masks, empty batches, 3-D logits with ``axis=1``, float16/bfloat16, wrongly typed masks, and
traced masks and weights under ``jax.jit``.

References: optax and jax.nn (with ``where``), torch autograd, central finite differences in
float64, and the metamorphic rule that a masked-out entry's value (finite, NaN or inf) changes
no value and no gradient. Nothing here copies an expected value from crossent's output.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import crossent as xe

N = C = 5  # the shape the other issue-14 test files use: JAX compiles each program once
RTOL, ATOL = 1e-10, 1e-12


def close(got, want, rtol=RTOL, atol=ATOL):
    np.testing.assert_allclose(np.asarray(got, dtype=float), np.asarray(want, dtype=float),
                               rtol=rtol, atol=atol)


def _data(seed=7):
    rng = np.random.default_rng(seed)
    z = 1.5 * rng.normal(size=(N, C))
    cls = rng.random((N, C)) > 0.3
    cls[:, 1] = True
    cls[3] = False  # a row with no class kept
    rows = np.array([True, False, True, True, False])
    y = np.array([int(np.flatnonzero(r)[-1]) if r.any() else 0 for r in cls])  # kept classes
    soft = rng.dirichlet(np.ones(C), size=N)
    bits = rng.random((N, C))
    probs = rng.dirichlet(np.ones(C), size=N)
    sw = rng.uniform(0.25, 2.0, size=N)
    return z, cls, rows, y, soft, bits, probs, sw


Z, CLS, ROWS, Y, SOFT, BITS, PROBS, SW = _data()

# (function, first argument, target, mask, keyword options): a mask with the logits' rank
# masks classes / labels / elements, one with fewer dimensions masks rows / samples
NAN_CASES = {
    "sce-index-row": ("softmax_cross_entropy", Z, Y, ROWS, {}),
    "sce-soft-row": ("softmax_cross_entropy", Z, SOFT, ROWS, {"z_loss": 1e-2}),
    "sce-index-class-softcap": ("softmax_cross_entropy", Z, Y, CLS,
                                {"softcap": 3.0, "z_loss": 1e-2, "label_smoothing": 0.1}),
    "sce-soft-class-weighted": ("softmax_cross_entropy", Z, SOFT, CLS,  # row 3 all masked:
                                {"weight": np.linspace(0.5, 2.0, C),  # its weight is NaN
                                 "sample_weight": np.where(CLS.any(1), SW, np.nan)}),
    "poly1-row": ("poly1_cross_entropy", Z, Y, ROWS, {"epsilon": 2.0}),
    "softmax_focal-row": ("softmax_focal_loss", Z, Y, ROWS, {"gamma": 2.0}),
    "softmax_focal-class": ("softmax_focal_loss", Z, SOFT, CLS,
                            {"alpha": np.linspace(0.1, 0.9, C), "gamma": 0.5}),
    "multilabel-label": ("multilabel_cross_entropy", Z, BITS, CLS,
                         {"pos_weight": np.linspace(0.5, 2.0, C), "label_smoothing": 0.1}),
    "multilabel-sample": ("multilabel_cross_entropy", Z, BITS, ROWS, {"sample_weight": SW}),
    "sigmoid_bce-elem": ("sigmoid_binary_cross_entropy", Z, BITS, CLS, {}),
    "sigmoid_bce-bcast": ("sigmoid_binary_cross_entropy", Z, BITS, ROWS[:, None],
                          {"sample_weight": SW[:, None]}),
    "sigmoid_focal-elem": ("sigmoid_focal_loss", Z, BITS, CLS, {"gamma": 2.0}),
    "nll-row": ("nll_loss", Z, Y, ROWS, {}),
    "bce-elem": ("binary_cross_entropy", PROBS, BITS, CLS, {}),
    "categorical_focal-row": ("categorical_focal_loss", PROBS, Y, ROWS, {}),
}


def _entries(x, mask):
    """The boolean mask of ``x``'s masked-out entries (a row mask covers its whole row)."""
    m = np.asarray(mask)
    m = m if m.ndim == x.ndim else m[..., None]
    return ~np.broadcast_to(m, x.shape)


def _poisoned(x, mask, value):
    return np.where(_entries(x, mask), value, x)


def _torch_grad(name, x, t, mask, kw, reduction):
    xt = torch.tensor(x, requires_grad=True)
    kwt = {k: torch.tensor(v) if isinstance(v, np.ndarray) else v for k, v in kw.items()}
    loss = getattr(xe, name)(xt, torch.tensor(t), where=torch.tensor(mask), reduction=reduction,
                             validate=False, **kwt)
    loss.sum().backward()
    return loss.detach().numpy(), xt.grad.numpy()


def _jax_grad(name, x, t, mask, kw, reduction):
    kwj = {k: jnp.asarray(v) if isinstance(v, np.ndarray) else v for k, v in kw.items()}

    def f(v):
        return getattr(xe, name)(v, jnp.asarray(t), where=jnp.asarray(mask), reduction=reduction,
                                 validate=False, **kwj)

    value, grad = jax.jit(jax.value_and_grad(lambda v: f(v).sum()))(jnp.asarray(x))
    return np.asarray(value), np.asarray(grad)


JAX_CASES = {"sce-index-class-softcap", "multilabel-label"}  # each a jit compile: two
GRAD_RUNS = [(label, framework, poison) for label in sorted(NAN_CASES)
             for framework, poison in [("torch", np.nan), ("torch", np.inf), ("jax", np.nan)]
             if framework == "torch" or label in JAX_CASES]


@pytest.mark.parametrize(("label", "framework", "poison"), GRAD_RUNS)
def test_a_masked_nan_or_inf_changes_no_value_and_no_gradient(label, framework, poison):
    """The ``where`` trap: ``where(m, f(x), 0)`` alone has gradient ``0 * f'(NaN) = NaN`` at
    masked entries. The value and the autograd gradient with NaN/inf in every masked entry
    must equal those with finite numbers there, and the gradient is 0 at masked entries."""
    name, x, t, mask, kw = NAN_CASES[label]
    reduction = "mean" if framework == "jax" else "none"
    grad_of = _torch_grad if framework == "torch" else _jax_grad
    clean_value, clean_grad = grad_of(name, x, t, mask, kw, reduction)
    value, grad = grad_of(name, _poisoned(x, mask, poison), t, mask, kw, reduction)
    assert np.isfinite(grad).all(), f"{label}: non-finite gradient {grad}"
    assert np.all(grad[_entries(x, mask)] == 0)
    close(value, clean_value)
    close(grad, clean_grad)
    analytic = getattr(xe, f"{name}_grad", None)
    if analytic is not None:
        want = analytic(_poisoned(x, mask, poison), t, where=mask, reduction=reduction, **kw)
        close(grad, want)


def test_row_masked_nan_gradient_equals_optax_under_jax_grad():
    """optax masks rows with an ``(N, 1)`` mask and gives 0 gradient at NaN rows; crossent's
    ``(N,)`` row mask and its ``(N, 1)`` form must give the same gradient."""
    z = _poisoned(Z, ROWS, np.nan)

    @jax.jit  # one compile for the three gradients
    def grads(v, y, rows):
        hot = jax.nn.one_hot(y, C, dtype=v.dtype)
        return [jax.grad(f)(v) for f in (
            lambda u: optax.softmax_cross_entropy(u, hot, where=rows[:, None]).sum(),
            lambda u: xe.softmax_cross_entropy(u, y, where=rows, reduction="sum",
                                               validate=False),
            lambda u: xe.softmax_cross_entropy(u, y, where=rows[:, None], reduction="sum",
                                               validate=False),
        )]

    want, *got = grads(jnp.asarray(z), jnp.asarray(Y), jnp.asarray(ROWS))
    assert np.isfinite(np.asarray(want)).all()
    for g in got:
        close(g, want)
    for mask in (ROWS, ROWS[:, None]):
        close(xe.softmax_cross_entropy_grad(z, Y, where=mask, reduction="sum"), want)


def test_class_masked_nan_with_softcap_gradient_equals_optax_on_capped_logits():
    """softcap's ``1 - tanh(z/c)^2`` at a masked NaN logit was NaN in the analytic gradient
    and in autograd; the reference is optax's gradient through ``c tanh(z / c)``."""
    cap = 2.5
    z = _poisoned(Z, CLS, np.nan)
    hot = jax.nn.one_hot(jnp.asarray(Y), C, dtype=jnp.float64)

    def ref(v):
        capped = cap * jnp.tanh(jnp.where(jnp.asarray(CLS), v, 0.0) / cap)
        return optax.softmax_cross_entropy(capped, hot, where=jnp.asarray(CLS)).sum()

    want = np.asarray(jax.grad(ref)(jnp.asarray(z)))
    assert np.isfinite(want).all()
    close(xe.softmax_cross_entropy_grad(z, Y, where=CLS, softcap=cap, reduction="sum"), want)
    _, got = _torch_grad("softmax_cross_entropy", z, Y, CLS, {"softcap": cap}, "sum")
    close(got, want)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_masked_rows_nan_or_inf_sample_weight_counts_nowhere(backend, bad):
    """A sample weight at a masked-out row multiplies nothing, not even the "mean"
    denominator: NaN or inf there gives the loss with weight 0 there (Keras, sklearn)."""
    if backend.name == "jax":  # the rule is one function (example_weights); JAX eager is slow
        pytest.skip("JAX runs example_weights in the jax.grad cases above")
    sw = np.where(ROWS, SW, bad)
    zero = np.where(ROWS, SW, 0.0)
    for name, x, t, kw in (("softmax_cross_entropy", Z, Y, {}),
                           ("softmax_cross_entropy", Z, SOFT, {"where": CLS}),
                           ("multilabel_cross_entropy", Z, BITS, {})):
        a = backend.asarray
        kwa = {k: a(v) for k, v in kw.items()}
        mask = ROWS if "where" not in kw else ROWS[:, None] & CLS
        got = backend.to_numpy(getattr(xe, name)(a(x), a(t), sample_weight=a(sw),
                                                 **{**kwa, "where": a(mask)}))
        want = backend.to_numpy(getattr(xe, name)(a(x), a(t), sample_weight=a(zero),
                                                  **{**kwa, "where": a(mask)}))
        assert np.isfinite(got)
        close(got, want)
        grad = backend.to_numpy(getattr(xe, f"{name}_grad")(
            a(x), a(t), sample_weight=a(sw), **{**kwa, "where": a(mask)}))
        assert np.isfinite(grad).all()


ZERO_WEIGHT_CASES = {  # (target, sample weights summing to 0 over the kept examples, where)
    "softmax_cross_entropy": (Y, np.zeros(N), None),
    "multilabel_cross_entropy": (BITS, np.where(ROWS, 0.0, 1.0), ROWS),
    "sigmoid_binary_cross_entropy": (BITS, np.zeros((N, 1)), CLS),
}


@pytest.mark.parametrize("name", sorted(ZERO_WEIGHT_CASES))
def test_sample_weights_summing_to_zero_give_a_nan_mean_and_the_autograd_zero_gradient(name):
    """"mean" over sample weights that sum to 0 is 0/0 (NaN, as torch's all-ignored mean);
    torch autograd through the loss gives 0 there, and so must the analytic gradient (it
    gave 0/0 = NaN, with a NumPy warning)."""
    t, sw, where = ZERO_WEIGHT_CASES[name]
    kw = {"sample_weight": sw} if where is None else {"sample_weight": sw, "where": where}
    value, grad = _torch_grad(name, Z, t, np.ones(N, bool) if where is None else where,
                              {"sample_weight": sw}, "mean")
    assert np.isnan(value) and np.all(grad == 0)
    with np.errstate(all="raise"):
        got = getattr(xe, f"{name}_grad")(Z, t, **kw)
    assert np.all(got == 0)


# ---- gradients with every option against central differences (float64) -------------------

def _central(f, z, h=1e-6):
    g = np.zeros_like(z)
    for i in np.ndindex(z.shape):
        e = np.zeros_like(z)
        e[i] = h
        g[i] = (f(z + e) - f(z - e)) / (2 * h)
    return g


def test_softmax_ce_grad_on_3d_logits_axis_1_equals_central_differences_of_the_loss():
    rng = np.random.default_rng(3)
    z = rng.normal(size=(2, 4, 3))
    mask = rng.random((2, 4, 3)) > 0.3
    mask[:, 2] = True
    mask[1, :, 0] = False  # a position with nothing kept
    y = np.full((2, 3), 2)
    kw = dict(axis=1, where=mask, weight=np.array([0.5, 1.0, 1.5, 2.0]),
              sample_weight=rng.uniform(0.5, 2.0, size=(2, 1)), label_smoothing=0.1,
              z_loss=0.05, softcap=4.0, reduction="mean")
    fd = _central(lambda v: float(xe.softmax_cross_entropy(v, y, **kw)), z)
    close(xe.softmax_cross_entropy_grad(z, y, **kw), fd, rtol=1e-6, atol=1e-8)
    hot = np.moveaxis(np.eye(4)[y], -1, 1)  # optax, no options: only the masks
    want = jax.grad(lambda v: optax.softmax_cross_entropy(
        v, jnp.asarray(hot), axis=1, where=jnp.asarray(mask)).sum())(jnp.asarray(z))
    close(xe.softmax_cross_entropy_grad(z, y, axis=1, where=mask, reduction="sum"), want)


BROADCAST_CASES = {  # logits (3, 2, 4): (where, sample_weight) shapes
    "sigmoid_binary_cross_entropy": [((3, 1, 4), (2, 1)), ((2, 1), (3, 1, 1))],
    "multilabel_cross_entropy": [((3, 1, 4), (2,)), ((2,), (3, 1))],  # label, sample masks
}


@pytest.mark.parametrize("name", sorted(BROADCAST_CASES))
def test_sigmoid_grads_with_broadcast_masks_and_weights_equal_central_differences(name):
    rng = np.random.default_rng(4)
    z, t = rng.normal(size=(3, 2, 4)), rng.random((3, 2, 4))
    for mask_shape, sw_shape in BROADCAST_CASES[name]:
        mask = rng.random(mask_shape) > 0.3
        mask.flat[0] = False
        kw = dict(where=mask, sample_weight=rng.uniform(0.5, 2, size=sw_shape),
                  pos_weight=np.linspace(0.5, 2, 4), label_smoothing=0.2, reduction="mean")
        fd = _central(lambda v, kw=kw: float(getattr(xe, name)(v, t, **kw)), z)
        close(getattr(xe, f"{name}_grad")(z, t, **kw), fd, rtol=1e-6, atol=1e-8)


# ---- broadcasting ------------------------------------------------------------------------

@functools.cache
def _optax_grads():
    """optax's gradients for the masks (N, 1) rows, all out, (1, C) shared: one compile."""
    shared = (CLS[0] | np.isin(np.arange(C), Y))[None, :]
    masks = [np.broadcast_to(m, (N, C)) for m in (ROWS[:, None], np.asarray(False), shared)]
    hot = jax.nn.one_hot(jnp.asarray(Y), C, dtype=jnp.float64)
    grad = jax.jit(jax.vmap(jax.grad(lambda v, m: optax.softmax_cross_entropy(
        v, hot, where=m).sum()), in_axes=(None, 0)))
    return list(np.asarray(grad(jnp.asarray(Z), jnp.asarray(np.stack(masks)))))


def test_mask_shapes_broadcast_as_documented(backend):
    """(1, C) is one class mask for every row; (N, 1) has the logits' rank, so it is a class
    mask whose class axis broadcasts: the same as the row mask (N,); (C,) is a row mask even
    when N == C; a 0-d True is no mask; a 0-d False masks everything."""
    a = backend.asarray

    def loss(mask, fn=xe.softmax_cross_entropy, **kw):
        return backend.to_numpy(fn(a(Z), a(Y), where=None if mask is None else a(mask),
                                   reduction="none", **kw))

    shared = (CLS[0] | np.isin(np.arange(C), Y))[None, :]  # (1, C), every target kept
    close(loss(shared), loss(np.broadcast_to(shared, (N, C)).copy()))
    ref = optax.softmax_cross_entropy(jnp.asarray(Z), jax.nn.one_hot(jnp.asarray(Y), C),
                                      where=jnp.asarray(shared))
    close(loss(shared), ref)
    close(loss(ROWS[:, None]), loss(ROWS))
    close(loss(ROWS), np.where(ROWS, loss(None), 0.0))  # (N,) == (C,): rows, not classes
    close(loss(np.asarray(True)), loss(None))
    close(loss(np.asarray(False)), np.zeros(N))
    assert np.isnan(backend.to_numpy(xe.softmax_cross_entropy(a(Z), a(Y), where=a(np.asarray(
        False)))))
    for mask, want in zip((ROWS[:, None], np.asarray(False), shared), _optax_grads(),
                          strict=True):
        g = backend.to_numpy(xe.softmax_cross_entropy_grad(a(Z), a(Y), where=a(mask),
                                                           reduction="sum"))
        close(g, want)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_an_empty_batch_with_a_class_mask_is_torchs_empty_batch(backend, reduction):
    a = backend.asarray
    z, y = np.zeros((0, C)), np.zeros(0, dtype=np.int64)
    want = torch.nn.functional.cross_entropy(torch.tensor(z), torch.tensor(y),
                                             reduction=reduction).numpy()
    for name in ("softmax_cross_entropy", "poly1_cross_entropy", "softmax_focal_loss"):
        got = backend.to_numpy(getattr(xe, name)(a(z), a(y), where=a(np.zeros((0, C), bool)),
                                                 sample_weight=a(np.zeros(0)),
                                                 reduction=reduction))
        assert got.shape == want.shape
        close(got, want)
    g = xe.softmax_cross_entropy_grad(a(z), a(y), where=a(np.zeros((0, C), bool)),
                                      sample_weight=a(np.zeros(0)), reduction=reduction)
    assert tuple(g.shape) == (0, C)


def test_one_dimensional_logits_take_a_class_mask_as_optax_integer_labels(backend):
    """optax's ``softmax_cross_entropy_with_integer_labels(z, y, where=keep)`` on one row,
    written out in NumPy: ``logsumexp(z[keep]) - z[y]``, gradient ``softmax_kept - e_y``."""
    if backend.name == "jax":  # JAX eager compiles every op anew for a 1-D shape: slow
        pytest.skip("1-D logits: the backend-independent code runs on the other backends")
    a = backend.asarray
    z, keep = Z[0], CLS[0]
    y = int(np.flatnonzero(keep)[-1])
    p = np.where(keep, np.exp(z - z[keep].max()), 0.0)
    p /= p.sum()
    value = np.log(np.sum(np.exp(z[keep]))) - z[y]
    grad = p - np.eye(C)[y]
    close(backend.to_numpy(xe.softmax_cross_entropy(a(z), a(np.asarray(y)), where=a(keep))),
          value)
    close(backend.to_numpy(xe.softmax_cross_entropy_grad(a(z), a(np.asarray(y)), where=a(keep))),
          grad)


# ---- dtypes --------------------------------------------------------------------------------

def test_half_precision_class_masks_keep_the_dtype_and_the_float64_value():
    mask = CLS.copy()
    kw = dict(where=mask, sample_weight=SW, label_smoothing=0.1)
    want = xe.softmax_cross_entropy(Z, Y, **kw)
    want_grad = xe.softmax_cross_entropy_grad(Z, Y, **kw)
    for dtype in (torch.float16, torch.bfloat16):
        zt = torch.tensor(Z, dtype=dtype, requires_grad=True)
        loss = xe.softmax_cross_entropy(zt, torch.tensor(Y), where=torch.tensor(mask),
                                        sample_weight=torch.tensor(SW), label_smoothing=0.1)
        loss.backward()
        assert loss.dtype == dtype and zt.grad.dtype == dtype
        close(loss.detach().float(), want, rtol=2e-2, atol=0)
        close(zt.grad.float(), want_grad, rtol=0, atol=2e-2)
        assert torch.all(zt.grad[torch.tensor(~mask)] == 0)
    zj = jnp.asarray(Z, dtype=jnp.bfloat16)
    value, grad = jax.jit(jax.value_and_grad(lambda v: xe.softmax_cross_entropy(
        v, jnp.asarray(Y), where=jnp.asarray(mask), sample_weight=jnp.asarray(SW),
        label_smoothing=0.1, validate=False)))(zj)
    assert value.dtype == jnp.bfloat16 and grad.dtype == jnp.bfloat16
    close(np.asarray(value, dtype=float), want, rtol=2e-2, atol=0)
    close(np.asarray(grad, dtype=float), want_grad, rtol=0, atol=2e-2)


WHERE_TAKERS = {
    "softmax_cross_entropy": lambda a, m: xe.softmax_cross_entropy(a(Z), a(Y), where=m),
    "poly1_cross_entropy": lambda a, m: xe.poly1_cross_entropy(a(Z), a(Y), where=m),
    "softmax_focal_loss": lambda a, m: xe.softmax_focal_loss(a(Z), a(Y), where=m),
    "categorical_focal_loss": lambda a, m: xe.categorical_focal_loss(a(PROBS), a(Y), where=m),
    "nll_loss": lambda a, m: xe.nll_loss(a(Z), a(Y), where=m),
    "multilabel_cross_entropy": lambda a, m: xe.multilabel_cross_entropy(a(Z), a(BITS), where=m),
    "sigmoid_binary_cross_entropy": lambda a, m: xe.sigmoid_binary_cross_entropy(
        a(Z), a(BITS), where=m),
    "softmax_cross_entropy_grad": lambda a, m: xe.softmax_cross_entropy_grad(a(Z), a(Y), where=m),
    "multilabel_cross_entropy_grad": lambda a, m: xe.multilabel_cross_entropy_grad(
        a(Z), a(BITS), where=m),
    "sigmoid_binary_cross_entropy_grad": lambda a, m: xe.sigmoid_binary_cross_entropy_grad(
        a(Z), a(BITS), where=m),
    "softmax": lambda a, m: xe.softmax(a(Z), where=m),
    "log_softmax": lambda a, m: xe.log_softmax(a(Z), where=m),
    "logsumexp": lambda a, m: xe.logsumexp(a(Z), where=m),
}


@pytest.mark.parametrize("name", sorted(WHERE_TAKERS))
@pytest.mark.parametrize("dtype", ["int64", "uint8", "float64"])
def test_a_non_boolean_mask_is_an_input_error_naming_where(backend, name, dtype):
    """A 0/1 mask is the classic port from Keras' float ``mask``: refused, not cast."""
    if backend.name == "array_api_strict" and dtype == "uint8":
        dtype = "int8"
    for shape in ((N, C), (N,)):
        mask = backend.asarray(np.ones(shape), dtype)
        with pytest.raises(xe.InputError, match="where"):
            WHERE_TAKERS[name](backend.asarray, mask)


# ---- jax.jit with traced masks and weights -------------------------------------------------

def test_jit_with_traced_masks_and_sample_weights_equals_numpy():
    """Masks and weights as traced arguments (validate=False); the reference is the same
    calls on NumPy arrays (eager, float64) and, for the gradient, the analytic gradients."""
    options = [dict(where=CLS, z_loss=1e-2, label_smoothing=0.1), dict(where=ROWS, softcap=3.0)]

    def losses(z, y, bits, m, rows, sw):
        return jnp.stack([
            xe.softmax_cross_entropy(z, y, where=m, z_loss=1e-2, label_smoothing=0.1,
                                     sample_weight=sw, validate=False),
            xe.softmax_cross_entropy(z, y, where=rows, softcap=3.0, sample_weight=sw,
                                     validate=False),
            xe.multilabel_cross_entropy(z, bits, where=m, sample_weight=sw, validate=False),
        ])

    @jax.jit  # one compile
    def run(z, y, bits, m, rows, sw):
        value, grad = jax.value_and_grad(lambda v: losses(v, y, bits, m, rows, sw).sum())(z)
        return value, grad, xe.softmax_cross_entropy_grad(z, y, where=m, sample_weight=sw,
                                                          validate=False)

    value, grad, traced_grad = run(*[jnp.asarray(v) for v in (Z, Y, BITS, CLS, ROWS, SW)])
    want = [xe.softmax_cross_entropy(Z, Y, sample_weight=SW, **kw) for kw in options]
    want.append(xe.multilabel_cross_entropy(Z, BITS, where=CLS, sample_weight=SW))
    close(value, np.sum(want))
    want_grad = sum(xe.softmax_cross_entropy_grad(Z, Y, sample_weight=SW, **kw) for kw in options)
    want_grad = want_grad + xe.multilabel_cross_entropy_grad(Z, BITS, where=CLS, sample_weight=SW)
    close(grad, want_grad)
    close(traced_grad, xe.softmax_cross_entropy_grad(Z, Y, where=CLS, sample_weight=SW))


# ---- the documented rules ------------------------------------------------------------------

def test_label_smoothing_with_a_class_mask_is_optax_smooth_labels_then_the_masked_loss(backend):
    a = backend.asarray
    got = backend.to_numpy(xe.softmax_cross_entropy(a(Z), a(Y), where=a(CLS),
                                                    label_smoothing=0.3, reduction="none"))
    labels = optax.smooth_labels(jax.nn.one_hot(jnp.asarray(Y), C, dtype=jnp.float64), 0.3)
    want = optax.softmax_cross_entropy(jnp.asarray(Z), labels, where=jnp.asarray(CLS))
    close(got, np.asarray(want))


@pytest.mark.parametrize("ignore_index", [0, 3])
def test_probability_targets_refuse_a_nonnegative_ignore_index_as_torch(ignore_index):
    with pytest.raises(RuntimeError):
        torch.nn.functional.cross_entropy(torch.tensor(Z), torch.tensor(SOFT),
                                          ignore_index=ignore_index)
    for call in (
        lambda: xe.categorical_focal_loss(PROBS, SOFT, ignore_index=ignore_index),
        lambda: xe.softmax_cross_entropy_grad(Z, SOFT, ignore_index=ignore_index),
        lambda: xe.softmax_cross_entropy(Z, SOFT, where=CLS, ignore_index=ignore_index),
    ):
        with pytest.raises(xe.InputError, match="ignore_index"):
            call()
    # a negative one is torch's "not used": accepted, the same number as the default
    want = torch.nn.functional.cross_entropy(torch.tensor(Z), torch.tensor(SOFT),
                                             ignore_index=-1).item()
    close(xe.softmax_cross_entropy(Z, SOFT, ignore_index=-1), want)
    close(xe.categorical_focal_loss(PROBS, SOFT, ignore_index=-1, gamma=0.0, alpha=None),
          torch.nn.functional.cross_entropy(torch.tensor(np.log(PROBS)), torch.tensor(SOFT),
                                            ignore_index=-1).item())


def test_masked_activations_of_a_fully_masked_row_are_jax_nns_with_zero_gradient(backend):
    a = backend.asarray
    x = _poisoned(Z, CLS, np.nan)  # row 3 has nothing kept: all NaN
    close(backend.to_numpy(xe.softmax(a(x), where=a(CLS))),
          jax.nn.softmax(jnp.asarray(x), where=jnp.asarray(CLS)))
    got = backend.to_numpy(xe.log_softmax(a(x), where=a(CLS)))
    want = np.asarray(jax.nn.log_softmax(jnp.asarray(x), where=jnp.asarray(CLS)))
    assert np.all(got[~CLS] == -np.inf) and np.all(want[~CLS] == -np.inf)
    close(got[CLS], want[CLS])
    close(backend.to_numpy(xe.logsumexp(a(x), where=a(CLS))),
          jax.nn.logsumexp(jnp.asarray(x), axis=-1, where=jnp.asarray(CLS)))
    if backend.name == "torch":
        xt = torch.tensor(x, requires_grad=True)
        (xe.softmax(xt, where=torch.tensor(CLS)) * torch.arange(N * C).reshape(N, C)).sum(
        ).backward()
        assert torch.isfinite(xt.grad).all() and torch.all(xt.grad[torch.tensor(~CLS)] == 0)


# ---- property: the analytic gradient is the loss's, for any mix of options -----------------

@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**16), kind=st.sampled_from(["row", "class", "class-bcast"]),
       index=st.booleans(), weighted=st.booleans(), sample_weighted=st.booleans(),
       eps=st.sampled_from([0.0, 0.15]), z_loss=st.sampled_from([0.0, 0.03]),
       softcap=st.sampled_from([None, 2.0]), axis=st.sampled_from([-1, 1]),
       reduction=st.sampled_from(["none", "sum", "mean"]))
def test_softmax_ce_grad_equals_central_differences_for_any_options(
    seed, kind, index, weighted, sample_weighted, eps, z_loss, softcap, axis, reduction
):
    rng = np.random.default_rng(seed)
    shape = (2, 3, 4)  # class axis 1 or 2
    z = 2.0 * rng.normal(size=shape)
    classes = shape[axis]
    rows = tuple(n for i, n in enumerate(shape) if i != axis % 3)
    if kind == "row":
        mask = rng.random(rows[1:]) > 0.3  # broadcast against the per-example loss
    else:
        mask_shape = shape if kind == "class" else tuple(
            1 if i != axis % 3 else n for i, n in enumerate(shape))
        mask = rng.random(mask_shape) > 0.35
    target = (rng.integers(0, classes, size=rows) if index
              else np.moveaxis(rng.dirichlet(np.ones(classes), size=rows), -1, axis))
    kw = dict(axis=axis, where=mask, label_smoothing=eps, z_loss=z_loss, softcap=softcap,
              reduction=reduction, validate=False,
              weight=rng.uniform(0.5, 2.0, size=classes) if weighted else None,
              sample_weight=rng.uniform(0.5, 2.0, size=rows[-1:]) if sample_weighted else None)
    fd = _central(lambda v: float(np.sum(xe.softmax_cross_entropy(v, target, **kw))), z)
    got = xe.softmax_cross_entropy_grad(z, target, **kw)
    if reduction == "mean" and not np.isfinite(fd).all():  # every row masked: NaN mean
        assert not np.any(np.broadcast_to(mask, shape if mask.ndim == 3 else rows))
        assert np.all(got == 0)  # what autograd gives through the loss's 0/0 mean
        return
    close(got, fd, rtol=1e-5, atol=1e-7)


def test_logsumexp_leaves_a_masked_entrys_scale_out_of_the_sum_as_jax_nn(backend):
    """``b`` NaN (or any value) at a masked entry: jax.nn.logsumexp ignores it; crossent
    gave NaN (the masked x became -inf but ``b * exp(-inf)`` is NaN * 0)."""
    a = backend.asarray
    b = np.where(CLS, np.linspace(-1.0, 2.0, N * C).reshape(N, C), np.nan)
    got, sign = xe.logsumexp(a(Z), b=a(b), where=a(CLS), return_sign=True)
    want, want_sign = jax.nn.logsumexp(jnp.asarray(Z), axis=-1, b=jnp.asarray(b),
                                       where=jnp.asarray(CLS), return_sign=True)
    close(backend.to_numpy(got), want)
    close(backend.to_numpy(sign), want_sign)
