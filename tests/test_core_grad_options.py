"""``sample_weight=`` and ``where=`` (row and class masks) on the analytic gradients
(issue 14), on every backend, against torch autograd through losses written out in torch
here, central finite differences of crossent's own losses, and jax.grad under jit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import crossent as xe

N = C = 5  # the shape tests/test_core_where_class_axis.py uses: JAX compiles it once
RTOL, ATOL = 1e-10, 1e-13


def on(backend, *arrays):
    return [None if a is None else backend.asarray(a) for a in arrays]


def close(got, want, rtol=RTOL, atol=ATOL):
    np.testing.assert_allclose(np.asarray(got, dtype=float), np.asarray(want, dtype=float),
                               rtol=rtol, atol=atol)


def autograd(loss, z):
    zt = torch.tensor(z, requires_grad=True)
    loss(zt).backward()
    return zt.grad.numpy()


def reduce(per_item, share, reduction):
    if reduction == "none":
        return per_item.sum()  # the gradient of the sum: row n's holds dl_n/dz_n
    return per_item.sum() if reduction == "sum" else per_item.sum() / share.sum()


def torch_softmax_ce(z, target, mask, *, weight, eps, z_loss, softcap, sw, reduction, index):
    """Softmax CE in plain torch with a class mask (all-False rows dropped), class weights,
    label smoothing over all C, z-loss, softcap, sample weights; "mean" divides by
    sum_n s_n [row kept and counted] w[y_n] (index) or s_n [row kept] (soft)."""
    m = torch.tensor(mask)
    live = m.any(-1)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    z = torch.where(live[:, None], z.masked_fill(~m, -torch.inf), 0.0)
    log_p = torch.log_softmax(z, -1).masked_fill(~m, 0.0)
    w = torch.ones(C, dtype=z.dtype) if weight is None else torch.tensor(weight)
    if index:
        y = torch.tensor(target)
        counted = live & (y != -100)
        kept = counted[:, None].to(z.dtype)  # (a bool times a float is float32 in torch)
        t = ((1 - eps) * F.one_hot(y.clamp(0), C).to(z.dtype) * kept + eps / C * kept) * w
        row_share = w[y.clamp(0)] * counted
    else:
        counted = live
        t = ((1 - eps) * torch.tensor(target) + eps / C) * w
        row_share = counted.to(z.dtype)
    per_row = -(t.masked_fill(~m, 0.0) * log_p).sum(-1)
    per_row = per_row + z_loss * torch.logsumexp(z, -1) ** 2
    s = torch.tensor(sw)
    per_row = torch.where(counted, per_row, 0.0) * s
    return reduce(per_row, s * row_share, reduction)


@pytest.fixture
def case(rng):
    z = 2.0 * rng.normal(size=(N, C))
    mask = rng.random((N, C)) > 0.3
    mask[:, 1] = True
    mask[3] = False  # a fully masked row
    y = np.array([rng.choice(np.flatnonzero(r)) if r.any() else 0 for r in mask])
    y[0] = -100  # ignored
    soft = rng.dirichlet(np.ones(C), size=N)
    sw = rng.uniform(0.25, 2.0, size=N)
    w = rng.uniform(0.5, 2.0, size=C)
    return z, y, soft, mask, sw, w


SOFTMAX_GRID = [  # (kind, mask kind, weighted, eps, z_loss, softcap)
    ("index", "class", True, 0.2, 1e-2, None),
    ("index", "row", False, 0.0, 0.0, 3.0),
    ("prob", "class", True, 0.1, 1e-2, 3.0),
    ("prob", "row", False, 0.0, 0.0, None),
    ("prob", None, True, 0.0, 1e-2, None),
]


@pytest.mark.parametrize(("kind", "mask_kind", "weighted", "eps", "z_loss", "softcap"),
                         SOFTMAX_GRID)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_softmax_ce_grad_with_sample_weight_and_where_matches_torch_autograd(
    backend, case, kind, mask_kind, weighted, eps, z_loss, softcap, reduction
):
    z, y, soft, mask, sw, w = case
    target = y if kind == "index" else soft
    w = w if weighted else None
    where = {"class": mask, "row": mask.any(-1), None: None}[mask_kind]
    ref_mask = np.broadcast_to(mask if mask_kind == "class" else
                               (mask.any(-1) if mask_kind else np.ones(N, bool))[:, None], (N, C))
    kw = dict(label_smoothing=eps, z_loss=z_loss, softcap=softcap, reduction=reduction)
    got = xe.softmax_cross_entropy_grad(*on(backend, z, target), **kw, **dict(zip(
        ("weight", "sample_weight", "where"), on(backend, w, sw, where), strict=True)))
    want = autograd(lambda zt: torch_softmax_ce(
        zt, target, ref_mask, weight=w, eps=eps, z_loss=z_loss, softcap=softcap, sw=sw,
        reduction=reduction, index=kind == "index"), z)
    close(backend.to_numpy(got), want)


def torch_sigmoid(x, t, mask, sw, weight, pos_weight, reduction, per_sample):
    out = F.binary_cross_entropy_with_logits(
        x, torch.tensor(t), weight=None if weight is None else torch.tensor(weight),
        pos_weight=None if pos_weight is None else torch.tensor(pos_weight), reduction="none")
    out = out.sum(-1) if per_sample else out
    m = torch.tensor(np.broadcast_to(mask, out.shape).copy())
    s = torch.tensor(np.broadcast_to(sw, out.shape).copy())
    return reduce(torch.where(m, out * s, 0.0), s * m, reduction)


SIGMOID = {"sigmoid_binary_cross_entropy": False, "multilabel_cross_entropy": True}


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_multilabel_grad_with_a_label_mask_matches_torch_autograd(backend, case, reduction):
    z, _, soft, mask, sw, _ = case
    x = np.where(mask, z, np.nan)

    def loss(xt):
        out = F.binary_cross_entropy_with_logits(xt, torch.tensor(soft), reduction="none")
        per_sample = torch.where(torch.tensor(mask), out, 0.0).sum(-1)
        live = torch.tensor(mask.any(-1))
        return reduce(per_sample * torch.tensor(sw), torch.tensor(sw) * live, reduction)

    got = xe.multilabel_cross_entropy_grad(*on(backend, x, soft), reduction=reduction,
                                           **dict(zip(("sample_weight", "where"),
                                                      on(backend, sw, mask), strict=True)))
    close(backend.to_numpy(got), autograd(loss, z))


@pytest.mark.parametrize("name", sorted(SIGMOID))
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_sigmoid_grads_with_sample_weight_and_where_match_torch_autograd(
    backend, case, name, reduction
):
    z, _, soft, mask, sw, w = case
    per_sample = SIGMOID[name]
    where, s = (mask.any(-1), sw) if per_sample else (mask, np.repeat(sw[:, None], C, axis=1))
    x = np.where(np.broadcast_to(where[:, None] if per_sample else where, (N, C)), z, np.nan)
    got = getattr(xe, f"{name}_grad")(*on(backend, x, soft), reduction=reduction,
                                      **dict(zip(("sample_weight", "where", "pos_weight"),
                                                 on(backend, s, where, w), strict=True)))
    want = autograd(lambda xt: torch_sigmoid(xt, soft, where, s, None, w, reduction, per_sample),
                    z)
    got = backend.to_numpy(got)
    assert np.isfinite(got).all()  # a masked NaN logit has gradient exactly 0
    close(got, want)


# ---- finite differences and jax.grad of crossent's own losses -----------------------------

FD_CASES = {
    "softmax_cross_entropy": lambda c: (c[0], c[1], dict(where=c[3], sample_weight=c[4],
                                                         weight=c[5], label_smoothing=0.1,
                                                         z_loss=1e-2, softcap=4.0)),
    "softmax_cross_entropy-prob": lambda c: (c[0], c[2], dict(where=c[3].any(-1),
                                                              sample_weight=c[4])),
    "sigmoid_binary_cross_entropy": lambda c: (c[0], c[2], dict(where=c[3],
                                                                sample_weight=c[5])),
    "multilabel_cross_entropy": lambda c: (c[0], c[2], dict(where=c[3].any(-1),
                                                            sample_weight=c[4])),
    "multilabel_cross_entropy-labels": lambda c: (c[0], c[2], dict(where=c[3],
                                                                   sample_weight=c[4])),
}


def central_difference(loss, z, h=1e-6):
    grad = np.zeros_like(z)
    for i in np.ndindex(z.shape):
        step = np.zeros_like(z)
        step[i] = h
        grad[i] = (np.sum(loss(z + step)) - np.sum(loss(z - step))) / (2 * h)
    return grad


@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("label", sorted(FD_CASES))
def test_grad_equals_central_differences_of_the_loss(case, label, reduction):
    name = label.split("-")[0]
    z, t, kw = FD_CASES[label](case)
    kw = dict(kw, reduction=reduction)
    want = central_difference(lambda v: getattr(xe, name)(v, t, **kw), z)
    close(getattr(xe, f"{name}_grad")(z, t, **kw), want, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("label", sorted(FD_CASES))
def test_jitted_jax_grad_of_the_loss_equals_the_analytic_grad(case, label):
    name = label.split("-")[0]
    z, t, kw = FD_CASES[label](case)
    kw = {k: jnp.asarray(v) if isinstance(v, np.ndarray) else v for k, v in kw.items()}
    kw["validate"] = False
    t = jnp.asarray(t)
    got = jax.jit(jax.grad(lambda v: getattr(xe, name)(v, t, **kw)))(jnp.asarray(z))
    close(np.asarray(got), np.asarray(getattr(xe, f"{name}_grad")(jnp.asarray(z), t, **kw)))


def test_torch_autograd_through_the_loss_equals_the_analytic_grad_at_masked_nan(case):
    z, y, _, mask, sw, w = case
    z = np.where(mask, z, np.nan)
    kw = dict(weight=w, sample_weight=sw, where=mask, label_smoothing=0.1, z_loss=1e-2)
    got = autograd(lambda zt: xe.softmax_cross_entropy(
        zt, torch.tensor(y), **{k: torch.tensor(v) if isinstance(v, np.ndarray) else v
                                for k, v in kw.items()}), z)
    want = xe.softmax_cross_entropy_grad(z, y, **kw)
    assert np.isfinite(want).all() and np.all(want[~mask] == 0)
    close(got, want)


# ---- properties and bad input ----------------------------------------------------------------

GRADS = {  # the target and the shape of the per-example loss
    "softmax_cross_entropy_grad": (lambda rng: rng.integers(0, C, size=N), (N,)),
    "sigmoid_binary_cross_entropy_grad": (lambda rng: rng.random((N, C)), (N, C)),
    "multilabel_cross_entropy_grad": (lambda rng: rng.random((N, C)), (N,)),
}


@settings(max_examples=20, deadline=None)
@given(name=st.sampled_from(sorted(GRADS)), seed=st.integers(0, 2**16),
       reduction=st.sampled_from(["none", "sum", "mean"]))
def test_a_mask_of_all_ones_and_sample_weights_of_ones_equal_neither(name, seed, reduction):
    rng = np.random.default_rng(seed)
    make_target, shape = GRADS[name]
    z, t = 4.0 * rng.normal(size=(N, C)), make_target(rng)
    fn = getattr(xe, name)
    plain = fn(z, t, reduction=reduction)
    close(fn(z, t, where=np.ones(shape, dtype=bool), reduction=reduction), plain, 1e-12, 1e-14)
    close(fn(z, t, sample_weight=np.ones(shape), reduction=reduction), plain, 1e-12, 1e-14)


@pytest.mark.parametrize("name", sorted(GRADS))
def test_bad_sample_weight_or_where_on_a_grad_is_an_input_error_naming_it(backend, name):
    make_target, shape = GRADS[name]
    z, t = on(backend, np.zeros((N, C)), make_target(np.random.default_rng(0)))
    fn = getattr(xe, name)
    for arg, bad in [("sample_weight", np.ones(N + 1)), ("sample_weight", "heavy"),
                     ("where", np.ones(shape)), ("where", np.ones((2, 1, 1), dtype=bool))]:
        with pytest.raises(xe.InputError, match=arg):
            fn(z, t, **{arg: backend.asarray(bad) if isinstance(bad, np.ndarray) else bad})
