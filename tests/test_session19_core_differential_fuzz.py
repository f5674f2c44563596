"""Differential fuzz of the core (``import crossent as xe``) against independent references.

Each property draws a seed and options with hypothesis (derandomized), builds float64 NumPy
data from the seed, and compares crossent with torch.nn.functional, SciPy, scikit-learn,
optax / jax.nn, or torch autograd of the reference loss. Nothing here uses crossent's output
as an expected value. ``H58_EXAMPLES`` raises the example count for local exploration.
"""

from __future__ import annotations

import math
import os

import array_api_strict
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.special as sp
import scipy.stats
import sklearn.metrics
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import crossent as xe

jax.config.update("jax_enable_x64", True)

N_EX = int(os.environ.get("H58_EXAMPLES", "8"))
FUZZ = settings(derandomize=True, max_examples=N_EX, deadline=None)
JAX_FUZZ = settings(derandomize=True, max_examples=max(3, N_EX // 3), deadline=None)
"""For properties whose reference is JAX/optax: each new shape or dtype compiles, so the file
keeps fewer examples and fixed shapes there (explored locally with variable ones)."""
SEED = st.integers(0, 2**32 - 1)
RED = st.sampled_from(["none", "sum", "mean"])
CPU = torch.device("cpu")

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def tt(a):
    return None if a is None else torch.tensor(np.array(a), device=CPU)


def npy(a):
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().numpy()
    return np.asarray(a)


def close(got, ref, rtol=1e-9, atol=1e-12):
    got, ref = np.asarray(npy(got), dtype=np.float64), np.asarray(npy(ref), dtype=np.float64)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    np.testing.assert_allclose(got, ref, rtol=rtol, atol=atol, equal_nan=True)


def layout(rng, ndim_max=3, c_max=5, allow_empty=False):
    """A random shape, class axis, class count and batch shape."""
    ndim = int(rng.integers(1, ndim_max + 1))
    lo = 0 if allow_empty and rng.random() < 0.15 else 1
    shape = [int(s) for s in rng.integers(lo, 5, size=ndim)]
    axis = int(rng.integers(0, ndim))
    shape[axis] = int(rng.integers(1, c_max + 1))
    batch = tuple(s for i, s in enumerate(shape) if i != axis)
    return tuple(shape), axis, shape[axis], batch


def to_torch_layout(a, axis):
    return np.moveaxis(a, axis, 1) if a.ndim > 1 else a


def soft_target(rng, shape, axis, zeros=True):
    t = rng.dirichlet(np.ones(shape[axis]), size=int(np.prod(shape)) // shape[axis] or 1)
    t = t[: int(np.prod(shape)) // shape[axis]]
    t = np.moveaxis(t.reshape((*tuple(s for i, s in enumerate(shape) if i != axis), shape[axis])),
                    -1, axis)
    if zeros and rng.random() < 0.3:
        t = np.where(rng.random(size=shape) < 0.3, 0.0, t)
        s = t.sum(axis=axis, keepdims=True)
        t = np.where(s > 0, t / np.where(s > 0, s, 1.0), 1.0 / shape[axis])
    return t


# ---- softmax cross-entropy: every option against torch ---------------------------------


def ref_softmax_ce(z, y, axis, *, weight, ignore_index, ls, z_loss, softcap, red, sample_weight,
                   prob):
    """torch's F.cross_entropy (float64, class axis 1) plus the documented z-loss, softcap
    and sample weights, all written out here."""
    if z.ndim == 1:  # torch mistakes a (1,) input and 0-d target for probabilities: batch it
        out = ref_softmax_ce(z[None], np.asarray(y)[None], 1, weight=weight,
                             ignore_index=ignore_index, ls=ls, z_loss=z_loss, softcap=softcap,
                             red=red, sample_weight=sample_weight, prob=prob)
        return out[0] if red == "none" else out
    zt = tt(to_torch_layout(z, axis))
    if softcap is not None:
        zt = softcap * torch.tanh(zt / softcap)
    yt = tt(to_torch_layout(y, axis) if prob else y)
    wt = tt(weight)
    kw = {} if prob else {"ignore_index": ignore_index}
    per = F.cross_entropy(zt, yt, weight=wt, label_smoothing=ls, reduction="none", **kw)
    lse = torch.logsumexp(zt, dim=1 if zt.ndim > 1 else 0)
    if prob:
        counted = torch.ones_like(per)
        share = torch.ones_like(per)
    else:
        counted = (yt != ignore_index).to(per.dtype)
        w = torch.ones(z.shape[axis], dtype=per.dtype) if wt is None else wt
        share = w[yt.clamp(0, z.shape[axis] - 1)] * counted
    if z_loss:
        per = per + z_loss * lse**2 * counted
    s = torch.ones_like(per) if sample_weight is None else tt(np.broadcast_to(sample_weight,
                                                                                 per.shape))
    per = per * s
    if red == "none":
        return per
    if red == "sum":
        return per.sum()
    return per.sum() / (share * s).sum()


@FUZZ
@given(seed=SEED, prob=st.booleans(), red=RED, ls=st.sampled_from([0.0, 0.0, 0.1, 0.7, 1.0]),
       weighted=st.booleans(), z_loss=st.sampled_from([0.0, 1e-3, 0.5]),
       softcap=st.sampled_from([None, None, 0.7, 5.0]), sampled=st.booleans())
def test_softmax_cross_entropy_every_option_matches_torch(seed, prob, red, ls, weighted, z_loss,
                                                          softcap, sampled):
    rng = np.random.default_rng(seed)
    shape, axis, C, batch = layout(rng, allow_empty=True)
    z = rng.normal(size=shape) * rng.choice([0.5, 4.0, 40.0])
    weight = rng.uniform(0.0, 2.0, size=C) if weighted else None
    ignore_index = int(rng.choice([-100, -1, 0, C - 1, 7]))
    if prob:
        y = soft_target(rng, shape, axis)
    else:
        y = rng.integers(0, C, size=batch)
        y = np.where(rng.random(size=batch) < 0.3, ignore_index, y)
        if ignore_index >= C or ignore_index < 0:
            pass
    sw = rng.uniform(0.1, 2.0, size=batch) if sampled else None
    if sampled and len(batch) > 1 and rng.random() < 0.5:  # broadcast sample weight
        sw = sw[..., :1]
    kw = dict(weight=weight, ls=ls, z_loss=z_loss, softcap=softcap, red=red, sample_weight=sw)
    ref = ref_softmax_ce(z, y, axis, ignore_index=ignore_index, prob=prob, **kw)
    extra = {} if prob else {"ignore_index": ignore_index}
    got = xe.softmax_cross_entropy(z, y, axis=axis, weight=weight, sample_weight=sw,
                                   label_smoothing=ls, z_loss=z_loss, softcap=softcap,
                                   reduction=red, **extra)
    close(got, ref)


@FUZZ
@given(seed=SEED, red=RED, weighted=st.booleans(), sampled=st.booleans())
def test_nll_loss_matches_torch(seed, red, weighted, sampled):
    rng = np.random.default_rng(seed)
    shape, axis, C, batch = layout(rng, allow_empty=True)
    logp = np.asarray(sp.log_softmax(rng.normal(size=shape) * 3, axis=axis))
    weight = rng.uniform(0.0, 2.0, size=C) if weighted else None
    ignore_index = int(rng.choice([-100, 0, C - 1]))
    y = np.where(rng.random(size=batch) < 0.3, ignore_index, rng.integers(0, C, size=batch))
    sw = rng.uniform(0.1, 2.0, size=batch) if sampled else None
    per = F.nll_loss(tt(to_torch_layout(logp, axis)), tt(y), weight=tt(weight),
                     ignore_index=ignore_index, reduction="none")
    w = np.ones(C) if weight is None else weight
    share = w[np.clip(y, 0, C - 1)] * (y != ignore_index)
    s = np.ones(batch) if sw is None else sw
    per = npy(per) * s
    ref = {"none": per, "sum": per.sum(), "mean": per.sum() / (share * s).sum()}[red]
    got = xe.nll_loss(logp, y, axis=axis, weight=weight, ignore_index=ignore_index,
                      sample_weight=sw, reduction=red)
    close(got, ref)


@JAX_FUZZ
@given(seed=SEED, red=RED, eps=st.sampled_from([0.0, 1.0, 2.0, -0.5]),
       ls=st.sampled_from([0.0, 0.2]))
def test_poly1_matches_optax(seed, red, eps, ls):
    rng = np.random.default_rng(seed)
    n, C = 3, 4
    z = rng.normal(size=(n, C)) * 3
    prob = bool(rng.random() < 0.5)
    y = soft_target(rng, (n, C), 1) if prob else rng.integers(0, C, size=n)
    onehot = y if prob else np.eye(C)[y]
    smoothed = onehot * (1 - ls) + ls / C
    ref = np.asarray(optax.losses.poly_loss_cross_entropy(jnp.asarray(z), jnp.asarray(smoothed),
                                                          epsilon=eps))
    ref = {"none": ref, "sum": ref.sum(), "mean": ref.mean()}[red]
    got = xe.poly1_cross_entropy(z, y, epsilon=eps, label_smoothing=ls, reduction=red)
    close(got, ref)


@FUZZ
@given(seed=SEED, red=RED, gamma=st.sampled_from([0.0, 0.5, 2.0, 3.7]),
       alpha_kind=st.sampled_from(["none", "scalar", "class"]), from_probs=st.booleans())
def test_softmax_and_categorical_focal_match_formula(seed, red, gamma, alpha_kind, from_probs):
    rng = np.random.default_rng(seed)
    shape, axis, C, batch = layout(rng)
    z = rng.normal(size=shape) * 3
    prob = bool(rng.random() < 0.5)
    y = soft_target(rng, shape, axis) if prob else rng.integers(0, C, size=batch)
    t = y if prob else np.moveaxis(np.eye(C)[y], -1, axis)
    alpha = {"none": None, "scalar": float(rng.uniform(0, 1)),
             "class": rng.uniform(0, 1, size=C)}[alpha_kind]
    logp = np.asarray(sp.log_softmax(z, axis=axis))
    p = np.exp(logp)
    term = -t * (1 - p) ** gamma * logp
    if alpha is not None:
        a = alpha if np.ndim(alpha) == 0 else alpha.reshape([-1 if i == axis else 1
                                                             for i in range(len(shape))])
        term = a * term
    per = term.sum(axis=axis)
    ref = {"none": per, "sum": per.sum(), "mean": per.mean()}[red]
    if from_probs:
        got = xe.categorical_focal_loss(p, y, alpha=alpha, gamma=gamma, axis=axis, reduction=red)
        close(got, ref, rtol=1e-7, atol=1e-10)
    else:
        got = xe.softmax_focal_loss(z, y, alpha=alpha, gamma=gamma, axis=axis, reduction=red)
        close(got, ref)


# ---- binary losses ---------------------------------------------------------------------


def keras_smooth(t, a):
    return t * (1 - a) + a / 2


@FUZZ
@given(seed=SEED, red=RED, weighted=st.booleans(), ls=st.sampled_from([0.0, 0.1, 1.0]),
       sampled=st.booleans(), edges=st.booleans())
def test_binary_cross_entropy_matches_torch(seed, red, weighted, ls, sampled, edges):
    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in rng.integers(0, 4, size=int(rng.integers(0, 3))))
    q = rng.uniform(size=shape)
    t = rng.uniform(size=shape) if rng.random() < 0.5 else (rng.random(size=shape) < 0.5) * 1.0
    if edges:
        q = np.where(rng.random(size=shape) < 0.4, rng.choice([0.0, 1.0, 5e-324, 1 - 2**-53],
                                                                size=shape), q)
    w = rng.uniform(0, 2, size=shape[-1:]) if weighted and shape else None
    sw = rng.uniform(0.1, 2, size=shape) if sampled else None
    per = npy(F.binary_cross_entropy(tt(q), tt(keras_smooth(t, ls)),
                                     weight=None if w is None else tt(np.broadcast_to(w, shape)),
                                     reduction="none"))
    s = np.ones(shape) if sw is None else sw
    per = per * s
    ref = {"none": per, "sum": per.sum(), "mean": per.sum() / s.sum()}[red]
    got = xe.binary_cross_entropy(q, t, weight=w, sample_weight=sw, label_smoothing=ls,
                                  reduction=red)
    close(got, ref)


@FUZZ
@given(seed=SEED, red=RED, weighted=st.booleans(), pos=st.booleans(),
       ls=st.sampled_from([0.0, 0.3]), sampled=st.booleans(), big=st.booleans())
def test_sigmoid_bce_matches_torch_with_logits(seed, red, weighted, pos, ls, sampled, big):
    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in rng.integers(0, 4, size=int(rng.integers(0, 3))))
    x = rng.normal(size=shape) * (300.0 if big else 3.0)
    t = rng.uniform(size=shape)
    w = rng.uniform(0, 2, size=shape[-1:]) if weighted and shape else None
    pw = rng.uniform(0, 3, size=shape[-1:]) if pos and shape else None
    sw = rng.uniform(0.1, 2, size=shape) if sampled else None
    per = npy(F.binary_cross_entropy_with_logits(
        tt(x), tt(keras_smooth(t, ls)), weight=None if w is None else tt(np.broadcast_to(w, shape)),
        pos_weight=None if pw is None else tt(np.broadcast_to(pw, shape)), reduction="none"))
    s = np.ones(shape) if sw is None else sw
    per = per * s
    ref = {"none": per, "sum": per.sum(), "mean": per.sum() / s.sum()}[red]
    got = xe.sigmoid_binary_cross_entropy(x, t, weight=w, pos_weight=pw, sample_weight=sw,
                                          label_smoothing=ls, reduction=red)
    close(got, ref)


@FUZZ
@given(seed=SEED, red=RED, weighted=st.booleans(), ls=st.sampled_from([0.0, 0.3]))
def test_multilabel_matches_torch_multilabel_soft_margin(seed, red, weighted, ls):
    rng = np.random.default_rng(seed)
    n, L = int(rng.integers(1, 5)), int(rng.integers(1, 6))
    x = rng.normal(size=(n, L)) * 4
    t = (rng.random(size=(n, L)) < 0.5) * 1.0
    w = rng.uniform(0, 2, size=L) if weighted else None
    per = L * npy(F.multilabel_soft_margin_loss(tt(x), tt(keras_smooth(t, ls)), weight=tt(w),
                                                reduction="none"))
    ref = {"none": per, "sum": per.sum(), "mean": per.mean()}[red]
    got = xe.multilabel_cross_entropy(x, t, weight=w, label_smoothing=ls, reduction=red)
    close(got, ref)


@JAX_FUZZ
@given(seed=SEED, red=RED, gamma=st.sampled_from([0.0, 0.5, 1.0, 2.0, 4.5]),
       alpha=st.sampled_from([None, 0.0, 0.25, 0.9]), ls=st.sampled_from([0.0, 0.2]),
       big=st.booleans())
def test_sigmoid_focal_matches_optax(seed, red, gamma, alpha, ls, big):
    rng = np.random.default_rng(seed)
    shape = (3, 4)
    x = rng.normal(size=shape) * (60.0 if big else 3.0)
    t = rng.uniform(size=shape) if rng.random() < 0.5 else (rng.random(size=shape) < 0.5) * 1.0
    ref = np.asarray(optax.sigmoid_focal_loss(jnp.asarray(x), jnp.asarray(keras_smooth(t, ls)),
                                              alpha=alpha, gamma=gamma))
    ref = {"none": ref, "sum": ref.sum(), "mean": ref.mean()}[red]
    got = xe.sigmoid_focal_loss(x, t, alpha=alpha, gamma=gamma, label_smoothing=ls, reduction=red)
    close(got, ref, rtol=1e-8, atol=1e-12)


@FUZZ
@given(seed=SEED, binary=st.booleans())
def test_sample_weight_mean_matches_sklearn_log_loss(seed, binary):
    rng = np.random.default_rng(seed)
    n, C = int(rng.integers(2, 9)), int(rng.integers(2, 5))
    sw = rng.uniform(0.1, 3, size=n)
    if binary:
        q = rng.uniform(0.01, 0.99, size=n)
        y = np.r_[0, 1, rng.integers(0, 2, size=n - 2)]
        ref = sklearn.metrics.log_loss(y, q, sample_weight=sw)
        got = xe.binary_cross_entropy(q, y * 1.0, sample_weight=sw)
    else:
        z = rng.normal(size=(n, C))
        y = np.r_[np.arange(C), rng.integers(0, C, size=n)][:n] if n >= C else None
        if y is None:
            return
        ref = sklearn.metrics.log_loss(y, sp.softmax(z, axis=1), sample_weight=sw,
                                       labels=np.arange(C))
        got = xe.softmax_cross_entropy(z, y, sample_weight=sw)
    close(got, ref, rtol=1e-9)


# ---- where= masks against optax / jax.nn -------------------------------------------------


@JAX_FUZZ
@given(seed=SEED, kind=st.sampled_from(["row", "class"]), prob=st.booleans())
def test_softmax_ce_where_matches_optax(seed, kind, prob):
    rng = np.random.default_rng(seed)
    n, C = 3, 4
    z = rng.normal(size=(n, C)) * 3
    if kind == "row":
        m = rng.random(size=n) < 0.6
    else:
        m = rng.random(size=(n, C)) < 0.7
    if prob:
        t = soft_target(rng, (n, C), 1)
        ref = np.asarray(optax.softmax_cross_entropy(jnp.asarray(z), jnp.asarray(t),
                                                     where=jnp.asarray(m)))
    else:
        t = rng.integers(0, C, size=n)
        if kind == "class":
            m[np.arange(n), t] = True
        ref = np.asarray(optax.softmax_cross_entropy_with_integer_labels(
            jnp.asarray(z), jnp.asarray(t), where=jnp.asarray(m)))
    got = xe.softmax_cross_entropy(z, t, where=m, reduction="none")
    if kind == "row":
        ref = np.where(m, ref, 0.0)
    close(got, ref, rtol=1e-9)


@JAX_FUZZ
@given(seed=SEED, fn=st.sampled_from(["softmax", "log_softmax", "logsumexp"]))
def test_activation_where_matches_jax_nn(seed, fn):
    rng = np.random.default_rng(seed)
    shape = (3, 4)
    x = rng.normal(size=shape) * 5
    m = rng.random(size=shape) < 0.6
    x = np.where(m, x, rng.choice([np.nan, np.inf, 1e300], size=shape))
    ref = np.asarray(getattr(jax.nn, fn)(jnp.asarray(x), axis=-1, where=jnp.asarray(m)))
    got = getattr(xe, fn)(x, axis=-1, where=m)
    if fn == "log_softmax":  # jax.nn leaves masked entries as the input; crossent gives -inf
        ref = np.where(m, ref, -np.inf)
    elif fn == "softmax":
        ref = np.where(m, ref, 0.0)
    close(got, ref, rtol=1e-10)


# ---- grad module against torch autograd of the reference --------------------------------


@FUZZ
@given(seed=SEED, prob=st.booleans(), red=RED, ls=st.sampled_from([0.0, 0.2, 1.0]),
       weighted=st.booleans(), z_loss=st.sampled_from([0.0, 0.01]),
       softcap=st.sampled_from([None, 2.0]), sampled=st.booleans())
def test_softmax_ce_grad_matches_torch_autograd(seed, prob, red, ls, weighted, z_loss, softcap,
                                                sampled):
    rng = np.random.default_rng(seed)
    shape, axis, C, batch = layout(rng)
    z = rng.normal(size=shape) * 3
    weight = rng.uniform(0.1, 2.0, size=C) if weighted else None
    ignore_index = int(rng.choice([-100, 0]))
    if prob:
        y = soft_target(rng, shape, axis)
    else:
        y = np.where(rng.random(size=batch) < 0.3, ignore_index, rng.integers(0, C, size=batch))
    sw = rng.uniform(0.1, 2.0, size=batch) if sampled else None
    zt = torch.tensor(z, device=CPU, requires_grad=True)
    zl = zt.movedim(axis, 1) if z.ndim > 1 else zt
    if z.ndim == 1:
        zl = zl[None]
    loss = ref_softmax_ce_t(zl, y, axis, z.ndim, weight, ignore_index, ls, z_loss, softcap, sw,
                            prob)
    loss = loss.sum() if red == "none" else (loss.sum() if red == "sum" else
                                            loss.sum() / den(y, weight, ignore_index, sw, prob,
                                                             batch, C))
    (ref,) = torch.autograd.grad(loss, zt)
    if red == "mean" and den(y, weight, ignore_index, sw, prob, batch, C) == 0:
        ref = torch.zeros_like(ref)  # nothing counted: torch's own "mean" has gradient 0
    extra = {} if prob else {"ignore_index": ignore_index}
    got = xe.softmax_cross_entropy_grad(z, y, axis=axis, weight=weight, sample_weight=sw,
                                        label_smoothing=ls, z_loss=z_loss, softcap=softcap,
                                        reduction=red, **extra)
    close(got, ref, rtol=1e-8, atol=1e-12)


def den(y, weight, ignore_index, sw, prob, batch, C):
    s = np.ones(batch) if sw is None else np.broadcast_to(sw, batch)
    if prob:
        return float(s.sum())
    w = np.ones(C) if weight is None else weight
    return float((w[np.clip(y, 0, C - 1)] * (y != ignore_index) * s).sum())


def ref_softmax_ce_t(zl, y, axis, ndim, weight, ignore_index, ls, z_loss, softcap, sw, prob):
    """Per-row losses (torch layout, batched) written with differentiable torch ops."""
    if softcap is not None:
        zl = softcap * torch.tanh(zl / softcap)
    if prob:
        yt = tt(to_torch_layout(y, axis) if ndim > 1 else np.asarray(y)[None])
        per = F.cross_entropy(zl, yt, weight=tt(weight), label_smoothing=ls, reduction="none")
        counted = torch.ones_like(per)
    else:
        yt = tt(np.asarray(y)[None] if ndim == 1 else y)
        per = F.cross_entropy(zl, yt, weight=tt(weight), label_smoothing=ls,
                              ignore_index=ignore_index, reduction="none")
        counted = (yt != ignore_index).to(per.dtype)
    if z_loss:
        per = per + z_loss * torch.logsumexp(zl, dim=1) ** 2 * counted
    if sw is not None:
        per = per * tt(np.broadcast_to(sw, per.shape[1:] if ndim == 1 else per.shape))
    return per


@FUZZ
@given(seed=SEED, red=RED, weighted=st.booleans(), pos=st.booleans(), multilabel=st.booleans(),
       ls=st.sampled_from([0.0, 0.3]), sampled=st.booleans())
def test_sigmoid_grads_match_torch_autograd(seed, red, weighted, pos, multilabel, ls, sampled):
    rng = np.random.default_rng(seed)
    n, L = int(rng.integers(1, 5)), int(rng.integers(1, 5))
    x = rng.normal(size=(n, L)) * 4
    t = rng.uniform(size=(n, L))
    w = rng.uniform(0, 2, size=L) if weighted else None
    pw = rng.uniform(0, 3, size=L) if pos else None
    sw = rng.uniform(0.1, 2, size=n if multilabel else (n, L)) if sampled else None
    xt = torch.tensor(x, device=CPU, requires_grad=True)
    per = F.binary_cross_entropy_with_logits(
        xt, tt(keras_smooth(t, ls)), weight=tt(w), pos_weight=tt(pw), reduction="none")
    if multilabel:
        per = per.sum(dim=1)
    s = torch.ones_like(per) if sw is None else tt(sw)
    per = per * s
    loss = per.sum() if red != "mean" else per.sum() / s.sum()
    (ref,) = torch.autograd.grad(loss, xt)
    fn = xe.multilabel_cross_entropy_grad if multilabel else xe.sigmoid_binary_cross_entropy_grad
    got = fn(x, t, weight=w, pos_weight=pw, sample_weight=sw, label_smoothing=ls, reduction=red)
    close(got, ref, rtol=1e-9, atol=1e-13)


@JAX_FUZZ
@given(seed=SEED, kind=st.sampled_from(["row", "class"]), red=RED)
def test_softmax_ce_grad_where_matches_jax_grad_of_optax(seed, kind, red):
    rng = np.random.default_rng(seed)
    n, C = 3, 4
    z = rng.normal(size=(n, C)) * 3
    t = soft_target(rng, (n, C), 1)
    m = rng.random(size=n) < 0.6 if kind == "row" else rng.random(size=(n, C)) < 0.7
    rows = m if kind == "row" else m.any(axis=1)

    def loss(zz):
        per = optax.softmax_cross_entropy(zz, jnp.asarray(t), where=jnp.asarray(m))
        per = jnp.where(jnp.asarray(rows), per, 0.0)
        return per.sum() / (rows.sum() if red == "mean" else 1.0)

    ref = np.asarray(jax.grad(loss)(jnp.asarray(z)))
    if red == "mean" and not rows.any():
        ref = np.zeros_like(z)
    got = xe.softmax_cross_entropy_grad(z, t, where=m, reduction=red)
    close(got, ref, rtol=1e-9, atol=1e-13)


# ---- measures and activations against SciPy ---------------------------------------------


@FUZZ
@given(seed=SEED, base=st.sampled_from([math.e, 2.0, 10.0, 3.5]), zeros=st.booleans())
def test_measures_match_scipy(seed, base, zeros):
    rng = np.random.default_rng(seed)
    shape, axis, _C, _batch = layout(rng)
    p = soft_target(rng, shape, axis, zeros=zeros)
    q = soft_target(rng, shape, axis, zeros=False)
    lb = math.log(base)
    close(xe.entropy(p, axis=axis, base=base), scipy.stats.entropy(p, axis=axis, base=base))
    close(xe.kl_divergence(p, q, axis=axis, base=base),
          scipy.stats.entropy(p, q, axis=axis, base=base))
    close(xe.cross_entropy(p, q, axis=axis, base=base),
          -np.sum(sp.xlogy(p, q), axis=axis) / lb)
    close(xe.kl_divergence_terms(p, q, base=base), sp.rel_entr(p, q) / lb)
    m1, m2 = p * rng.uniform(0, 3), q * rng.uniform(0, 3)
    close(xe.generalized_kl_divergence(m1, m2, axis=axis, base=base),
          np.sum(sp.kl_div(m1, m2), axis=axis) / lb)
    b = rng.uniform(size=shape)
    if zeros:
        b = np.where(rng.random(size=shape) < 0.3, rng.choice([0.0, 1.0], size=shape), b)
    close(xe.binary_entropy(b, base=base), (sp.entr(b) + sp.entr(1 - b)) / lb)
    close(xe.surprisal(b, base=base), -np.log(b) / lb)
    # torch's KLDivLoss(reduction="none") of log q
    close(xe.kl_divergence_terms(p, q),
          F.kl_div(tt(np.log(q)), tt(p), reduction="none"))


@FUZZ
@given(seed=SEED, keepdims=st.booleans(), sign=st.booleans(), use_b=st.booleans(),
       axis_kind=st.sampled_from(["int", "tuple", "none"]))
def test_logsumexp_matches_scipy(seed, keepdims, sign, use_b, axis_kind):
    rng = np.random.default_rng(seed)
    ndim = int(rng.integers(0, 4))
    shape = tuple(int(s) for s in rng.integers(1, 4, size=ndim))
    a = rng.normal(size=shape) * rng.choice([1.0, 50.0, 800.0])
    if ndim and rng.random() < 0.3:
        a = np.where(rng.random(size=shape) < 0.3, -np.inf, a)
    if axis_kind == "none" or ndim == 0:
        axis = None
    elif axis_kind == "int":
        axis = int(rng.integers(-ndim, ndim))
    else:
        axis = tuple(sorted(set(int(v) for v in rng.integers(0, ndim, size=2))))
    b = None
    if use_b:
        b = rng.normal(size=shape) if sign else rng.uniform(0, 2, size=shape)
        if ndim and rng.random() < 0.3:
            b = np.where(rng.random(size=shape) < 0.3, 0.0, b)
    ref = sp.logsumexp(a, axis=axis, b=b, keepdims=keepdims, return_sign=sign)
    if ndim == 0:  # SciPy's keepdims makes a 0-d input 1-d; NumPy, JAX and torch keep 0-d
        ref = tuple(np.reshape(r, ()) for r in ref) if sign else np.reshape(ref, ())
    got = xe.logsumexp(a, axis=axis, b=b, keepdims=keepdims, return_sign=sign)
    if sign:
        close(got[0], ref[0], rtol=1e-12)
        close(got[1], ref[1])
    else:
        close(got, ref, rtol=1e-12)


@FUZZ
@given(seed=SEED, axis_kind=st.sampled_from(["int", "tuple", "none"]))
def test_softmax_log_softmax_match_scipy(seed, axis_kind):
    rng = np.random.default_rng(seed)
    ndim = int(rng.integers(0, 4))
    shape = tuple(int(s) for s in rng.integers(1, 4, size=ndim))
    x = rng.normal(size=shape) * rng.choice([1.0, 30.0, 800.0])
    if ndim and rng.random() < 0.3:
        x = np.where(rng.random(size=shape) < 0.2, -np.inf, x)
    if axis_kind == "none" or ndim == 0:
        axis = None
    elif axis_kind == "int":
        axis = int(rng.integers(-ndim, ndim))
    else:
        axis = tuple(sorted(set(int(v) for v in rng.integers(0, ndim, size=2))))
    close(xe.softmax(x, axis=axis), sp.softmax(x, axis=axis), rtol=1e-12, atol=1e-300)
    close(xe.log_softmax(x, axis=axis), sp.log_softmax(x, axis=axis), rtol=1e-12, atol=1e-13)


@FUZZ
@given(seed=SEED)
def test_sigmoid_family_matches_scipy(seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=8) * rng.choice([1.0, 40.0, 1e4])
    x = np.r_[x, 0.0, -0.0, 5e-324, -5e-324, 1e308, -1e308, np.inf, -np.inf, np.nan]
    # SciPy's expit flushes 1 / (1 + exp(745)) to 0; the true value is subnormal
    close(xe.sigmoid(x), sp.expit(x), rtol=1e-14, atol=1e-300)
    close(xe.log_sigmoid(x), sp.log_expit(x), rtol=1e-14, atol=1e-300)
    p = np.r_[rng.uniform(size=8), 0.0, 1.0, 5e-324, 1 - 2**-53, 0.5, np.nan]
    close(xe.logit(p), sp.logit(p), rtol=1e-13, atol=1e-300)
    # signs of zeros: logit(0.5) is +0 in SciPy
    assert np.signbit(np.asarray(xe.sigmoid(np.array(-0.0)))) == np.signbit(sp.expit(-0.0))


# ---- targets against optax / jax.nn -----------------------------------------------------


@JAX_FUZZ
@given(seed=SEED, alpha=st.sampled_from([0.0, 0.1, 0.5, 1.0]))
def test_targets_match_optax_and_jax(seed, alpha):
    rng = np.random.default_rng(seed)
    shape, axis, C, batch = (2, 3, 4), int(rng.integers(0, 3)), None, None
    C = shape[axis]
    batch = tuple(s for i, s in enumerate(shape) if i != axis)
    labels = rng.integers(0, C, size=batch)
    close(xe.one_hot(labels, C), jax.nn.one_hot(jnp.asarray(labels), C))
    t = soft_target(rng, shape, axis)
    ref = np.moveaxis(np.asarray(optax.smooth_labels(jnp.asarray(np.moveaxis(t, axis, -1)),
                                                     alpha)), -1, axis)
    close(xe.smooth_labels(t, alpha, axis=axis), ref, rtol=1e-12)


# ---- array namespaces and dtypes: the namespace's array back, in the input's dtype ------

NAMESPACES = ("numpy", "torch", "jax", "array_api_strict")
FLOATS = ("float16", "float32", "float64")
TOL = {"float16": 3e-3, "float32": 2e-6, "float64": 1e-10}


def as_ns(ns, a):
    a = np.asarray(a)
    if ns == "numpy":
        return a
    if ns == "torch":
        return torch.as_tensor(a, device=CPU)
    if ns == "jax":
        return jnp.asarray(a)
    return array_api_strict.asarray(a)


def ns_of(x):
    if isinstance(x, torch.Tensor):
        return "torch"
    if isinstance(x, jax.Array):
        return "jax"
    if isinstance(x, type(array_api_strict.asarray(0.0))):
        return "array_api_strict"
    if isinstance(x, (np.ndarray, np.generic)):
        return "numpy"
    return type(x).__name__


def back(x):
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    if isinstance(x, type(array_api_strict.asarray(0.0))):
        return np.from_dlpack(x)
    return np.asarray(x)


def _torch_ce(z, y, **kw):
    return npy(F.cross_entropy(tt(z), tt(y), **kw))


def _bce_logits(x, t, **kw):
    return npy(F.binary_cross_entropy_with_logits(tt(x), tt(t), **kw))


# name -> (crossent call on (a, b), float64 reference on NumPy (a, b), data maker)
def _cases():
    def logits_index(rng):
        return rng.normal(size=(4, 3)) * 2, rng.integers(0, 3, size=4)

    def logits_prob(rng):
        return rng.normal(size=(4, 3)) * 2, rng.dirichlet(np.ones(3), size=4)

    def probs_probs(rng):
        return rng.dirichlet(np.ones(3), size=4), rng.dirichlet(np.ones(3), size=4)

    def logits_binary(rng):
        return rng.normal(size=(4, 3)) * 2, rng.uniform(size=(4, 3))

    def rounded_p(p):  # low-precision rows re-normalised in float64 for the reference
        return p / p.sum(axis=-1, keepdims=True)

    ls01 = 0.1
    return {
        "softmax_cross_entropy/index": (
            lambda a, b: xe.softmax_cross_entropy(a, b, label_smoothing=ls01, reduction="none"),
            lambda a, b: _torch_ce(a, b, label_smoothing=ls01, reduction="none"), logits_index),
        "softmax_cross_entropy/prob": (
            lambda a, b: xe.softmax_cross_entropy(a, b, validate=False),
            lambda a, b: _torch_ce(a, b), logits_prob),
        "nll_loss": (
            lambda a, b: xe.nll_loss(a, b, reduction="sum"),
            lambda a, b: npy(F.nll_loss(tt(a), tt(b), reduction="sum")), logits_index),
        "poly1": (
            lambda a, b: xe.poly1_cross_entropy(a, b, reduction="none"),
            lambda a, b: np.asarray(optax.losses.poly_loss_cross_entropy(
                jnp.asarray(a), jnp.asarray(np.eye(3)[b]), epsilon=2.0)), logits_index),
        "sigmoid_bce": (
            lambda a, b: xe.sigmoid_binary_cross_entropy(a, b, reduction="none"),
            lambda a, b: _bce_logits(a, b, reduction="none"), logits_binary),
        "multilabel": (
            lambda a, b: xe.multilabel_cross_entropy(a, b, reduction="none"),
            lambda a, b: _bce_logits(a, b, reduction="none").sum(axis=-1), logits_binary),
        "sigmoid_focal": (
            lambda a, b: xe.sigmoid_focal_loss(a, b, alpha=None, reduction="none"),
            lambda a, b: np.asarray(optax.sigmoid_focal_loss(jnp.asarray(a), jnp.asarray(b))),
            logits_binary),
        "binary_cross_entropy": (
            lambda a, b: xe.binary_cross_entropy(a, b, reduction="none"),
            lambda a, b: npy(F.binary_cross_entropy(tt(a), tt(b), reduction="none")),
            lambda rng: (rng.uniform(0.01, 0.99, size=(4, 3)), rng.uniform(size=(4, 3)))),
        "entropy": (lambda a, b: xe.entropy(a, validate=False),
                    lambda a, b: scipy.stats.entropy(rounded_p(a), axis=-1), probs_probs),
        "kl_divergence": (
            lambda a, b: xe.kl_divergence(a, b, validate=False),
            lambda a, b: np.sum(sp.rel_entr(a, b), axis=-1), probs_probs),
        "logsumexp": (lambda a, b: xe.logsumexp(a), lambda a, b: sp.logsumexp(a, axis=-1),
                      logits_index),
        "log_softmax": (lambda a, b: xe.log_softmax(a), lambda a, b: sp.log_softmax(a, axis=-1),
                        logits_index),
        "softmax": (lambda a, b: xe.softmax(a), lambda a, b: sp.softmax(a, axis=-1),
                    logits_index),
        "log_sigmoid": (lambda a, b: xe.log_sigmoid(a), lambda a, b: sp.log_expit(a),
                        logits_index),
        "softmax_cross_entropy_grad": (
            lambda a, b: xe.softmax_cross_entropy_grad(a, b, reduction="sum"),
            lambda a, b: sp.softmax(a, axis=-1) - np.eye(3)[b], logits_index),
        "sigmoid_bce_grad": (
            lambda a, b: xe.sigmoid_binary_cross_entropy_grad(a, b, reduction="sum"),
            lambda a, b: sp.expit(a) - b, logits_binary),
    }


CASES = _cases()


@JAX_FUZZ
@given(seed=SEED, name=st.sampled_from(sorted(CASES)), ns=st.sampled_from(NAMESPACES),
       dtype=st.sampled_from(FLOATS))
def test_every_namespace_and_dtype_returns_its_own_array_with_reference_values(seed, name, ns,
                                                                               dtype):
    if ns == "array_api_strict" and dtype == "float16":
        dtype = "float32"  # the standard has no float16
    fn, ref_fn, make = CASES[name]
    rng = np.random.default_rng(seed)
    a, b = make(rng)
    a = a.astype(dtype)
    if np.issubdtype(np.asarray(b).dtype, np.floating):
        b = b.astype(dtype)
    got = fn(as_ns(ns, a), as_ns(ns, b))
    assert ns_of(got) == ns, (ns_of(got), ns)
    assert str(got.dtype).endswith(dtype), (got.dtype, dtype)
    ref = ref_fn(a.astype(np.float64), np.asarray(b).astype(np.float64)
                 if np.issubdtype(np.asarray(b).dtype, np.floating) else b)
    close(back(got).astype(np.float64), ref, rtol=TOL[dtype], atol=TOL[dtype])


# ---- the softmax-family losses with every shared option, against one written-out form ----


@FUZZ
@given(seed=SEED, fn=st.sampled_from(["softmax_focal", "categorical_focal", "poly1"]), red=RED,
       ls=st.sampled_from([0.0, 0.25]), sampled=st.booleans(),
       mask=st.sampled_from([None, "row", "class"]), prob=st.booleans())
def test_softmax_family_options_match_written_out_form(seed, fn, red, ls, sampled, mask, prob):
    rng = np.random.default_rng(seed)
    n, C = int(rng.integers(1, 5)), int(rng.integers(1, 5))
    z = rng.normal(size=(n, C)) * 3
    gamma, eps = float(rng.choice([0.0, 1.5, 2.0])), float(rng.choice([-1.0, 2.0]))
    ignore_index = int(rng.choice([-100, 0]))
    if prob:
        y = soft_target(rng, (n, C), 1)
        t, counted = y, np.ones(n, bool)
    else:
        y = np.where(rng.random(size=n) < 0.3, ignore_index, rng.integers(0, C, size=n))
        counted = y != ignore_index
        t = np.eye(C)[np.clip(y, 0, C - 1)] * counted[:, None]
    keep = np.ones((n, C), bool)
    where = None
    if mask == "row":
        where = rng.random(size=n) < 0.7
        counted = counted & where
    elif mask == "class":
        keep = rng.random(size=(n, C)) < 0.7
        if not prob:
            keep[np.arange(n), np.clip(y, 0, C - 1)] = True
        where = keep
        counted = counted & keep.any(axis=1)
    t = np.where(counted[:, None], (1 - ls) * t + ls / C, 0.0)
    t = np.where(keep, t, 0.0)
    zk = np.where(keep, z, -np.inf)
    logp = np.asarray(sp.log_softmax(zk, axis=1))
    p = np.exp(logp)
    logp0 = np.where(keep, logp, 0.0)
    if fn == "poly1":
        # optax's poly term: eps * sum over kept classes of t (1 - p)
        per = -(t * logp0).sum(1) + eps * (t * (1 - p)).sum(1)
    else:
        per = -(t * (1 - p) ** gamma * logp0).sum(1) * 0.25
    per = np.where(counted, per, 0.0)  # ignored, masked rows and rows with no class kept
    s = rng.uniform(0.1, 2.0, size=n) if sampled else np.ones(n)
    per = per * s
    ref = {"none": per, "sum": per.sum(), "mean": per.sum() / (s * counted).sum()}[red]
    kw = dict(sample_weight=s if sampled else None, where=where, label_smoothing=ls,
              reduction=red, **({} if prob else {"ignore_index": ignore_index}))
    if fn == "poly1":
        got = xe.poly1_cross_entropy(z, y, epsilon=eps, **kw)
    elif fn == "softmax_focal":
        got = xe.softmax_focal_loss(z, y, gamma=gamma, **kw)
    else:
        got = xe.categorical_focal_loss(np.asarray(sp.softmax(z, axis=1)), y, gamma=gamma, **kw)
    close(got, ref, rtol=1e-7 if fn == "categorical_focal" else 1e-9, atol=1e-12)


@JAX_FUZZ
@given(seed=SEED, other=st.sampled_from(["torch", "jax"]), low=st.booleans())
def test_mixed_namespaces_compute_in_the_non_numpy_one(seed, other, low):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(3, 4))
    y = rng.integers(0, 4, size=3)
    ref = npy(F.cross_entropy(tt(z), tt(y), reduction="none"))
    if low:  # bfloat16 logits in the other namespace, a NumPy target
        zo = (torch.as_tensor(z, device=CPU).to(torch.bfloat16) if other == "torch"
              else jnp.asarray(z, dtype=jnp.bfloat16))
        got = xe.softmax_cross_entropy(zo, y, reduction="none")
        assert "bfloat16" in str(got.dtype)
        ref = npy(F.cross_entropy(torch.as_tensor(z, device=CPU).to(torch.bfloat16).double(),
                                  tt(y), reduction="none"))
        tol = 2e-2
    else:  # NumPy logits, the other namespace's target
        got = xe.softmax_cross_entropy(z, as_ns(other, y), reduction="none")
        assert "float64" in str(got.dtype)
        tol = 1e-10
    assert ns_of(got) == other
    close(np.asarray(back(got) if other == "jax" else got.float().numpy(), dtype=np.float64)
          if low else back(got), ref, rtol=tol, atol=tol)


# ---- where= on the elementwise and multi-label losses and their gradients ------------------


@FUZZ
@given(seed=SEED, red=RED, kind=st.sampled_from(["label", "sample"]), sampled=st.booleans())
def test_multilabel_where_and_grad_match_torch_autograd(seed, red, kind, sampled):
    rng = np.random.default_rng(seed)
    n, L = int(rng.integers(1, 4)), int(rng.integers(1, 4))
    x, t = rng.normal(size=(n, L)) * 3, rng.uniform(size=(n, L))
    m = rng.random(size=(n, L)) < 0.6 if kind == "label" else rng.random(size=n) < 0.6
    mm = np.broadcast_to(m if kind == "label" else m[:, None], (n, L))
    x = np.where(mm, x, rng.choice([np.nan, np.inf, 5.0], size=(n, L)))  # never read
    sw = rng.uniform(0.1, 2, size=n) if sampled else None
    w, pw = rng.uniform(0, 2, size=L), rng.uniform(0, 2, size=L)
    xt = torch.tensor(np.where(mm, x, 0.0), device=CPU, requires_grad=True)
    per = F.binary_cross_entropy_with_logits(xt, tt(t), weight=tt(w), pos_weight=tt(pw),
                                             reduction="none")
    s = np.ones(n) if sw is None else sw
    per = torch.where(tt(mm), per, 0.0).sum(1) * tt(s)
    loss = per if red == "none" else per.sum()
    if red == "mean":
        loss = loss / (s * mm.any(1)).sum()
    (ref_g,) = torch.autograd.grad(loss.sum(), xt)
    if red == "mean" and not mm.any():
        ref_g = torch.zeros_like(ref_g)
    kw = dict(where=m, sample_weight=sw, weight=w, pos_weight=pw, reduction=red)
    close(xe.multilabel_cross_entropy(x, t, **kw), loss.detach())
    close(xe.multilabel_cross_entropy_grad(x, t, **kw), ref_g)


@JAX_FUZZ
@given(seed=SEED, red=RED, fn=st.sampled_from(["sigmoid_bce", "focal", "bce", "grad"]))
def test_elementwise_where_matches_optax_and_torch(seed, red, fn):
    rng = np.random.default_rng(seed)
    n, L = 3, 4
    t, me = rng.uniform(size=(n, L)), rng.random(size=(n, L)) < 0.6
    s = rng.uniform(0.1, 2, size=(n, L))
    x = np.where(me, rng.normal(size=(n, L)) * 3, np.nan)
    xk = jnp.asarray(np.where(me, x, 0.0))
    if fn == "bce":
        x = np.where(me, rng.uniform(size=(n, L)), np.nan)
        per = npy(F.binary_cross_entropy(tt(np.where(me, x, 0.5)), tt(t), reduction="none"))
    elif fn == "focal":
        per = np.asarray(optax.sigmoid_focal_loss(xk, jnp.asarray(t), alpha=0.25, gamma=2.0))
    else:
        per = np.asarray(optax.sigmoid_binary_cross_entropy(xk, jnp.asarray(t)))
    per = np.where(me, per, 0.0) * s
    ref = {"none": per, "sum": per.sum(), "mean": per.sum() / (s * me).sum()}[red]
    kw = dict(where=me, sample_weight=s, reduction=red)
    if fn == "grad":
        ref = np.where(me, sp.expit(np.where(me, x, 0.0)) - t, 0.0) * s
        if red == "mean":
            ref = ref / (s * me).sum() if me.any() else np.zeros_like(ref)
        got = xe.sigmoid_binary_cross_entropy_grad(x, t, **kw)
    else:
        got = {"bce": xe.binary_cross_entropy, "focal": xe.sigmoid_focal_loss,
               "sigmoid_bce": xe.sigmoid_binary_cross_entropy}[fn](x, t, **kw)
    close(got, ref)
