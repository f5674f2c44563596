"""optax-style class-axis ``where`` on the softmax losses (issue 14): a mask with the logits'
number of dimensions takes the masked classes out of the softmax and drops their target
terms; one with fewer dimensions masks rows. References: optax (softmax_cross_entropy,
softmax_cross_entropy_with_integer_labels, poly_loss_cross_entropy, all with ``where``),
jax.nn (softmax, log_softmax, logsumexp with ``where``) and a float64 NumPy formula
written out here; hypothesis properties. Nothing here calls crossent for an expected value.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import crossent as xe

N = C = 5  # one shape for (almost) every test, so that JAX compiles few programs
RTOL, ATOL = 1e-10, 1e-12


def run(backend, fn, *arrays, **kw):
    """``fn`` on NumPy ``arrays`` moved to ``backend``; the result back in NumPy."""
    return backend.to_numpy(fn(*[None if a is None else backend.asarray(a) for a in arrays],
                               **kw))


def close(got, want, rtol=RTOL, atol=ATOL):
    np.testing.assert_allclose(np.asarray(got, dtype=float), np.asarray(want, dtype=float),
                               rtol=rtol, atol=atol)


@pytest.fixture
def case(rng):
    """Logits (a NaN at a masked class), index targets on kept classes, soft targets,
    a class mask with one row fully masked and one row keeping a single class."""
    z = 1.5 * rng.normal(size=(N, C))
    mask = rng.random((N, C)) > 0.35
    mask[:, 0] = True
    mask[2] = False  # nothing kept: a masked-out row
    mask[4] = np.arange(C) == 2  # one class kept
    z[3, 1] = np.nan  # masked out: it reaches neither the loss nor the gradient
    mask[3, 1] = False
    y = np.array([rng.choice(np.flatnonzero(r)) if r.any() else 0 for r in mask])
    soft = rng.dirichlet(np.ones(C), size=N)
    return z, y, soft, mask


def optax_rows(z, labels, mask):
    return np.asarray(optax.softmax_cross_entropy(jnp.asarray(z), jnp.asarray(labels),
                                                  where=jnp.asarray(mask)))


def np_masked_ce(z, t, mask, *, weight=None, eps=0.0, z_loss=0.0, index=False, sw=None,
                 reduction="none"):
    """float64 NumPy: masked classes at -inf in the normaliser, smoothed (over all C) and
    weighted targets zeroed there, rows with no class kept dropped; "mean" divides by the
    summed sample weights times the class weight of the target (index) or 1 (soft)."""
    num_classes = z.shape[-1]
    w = np.ones(num_classes) if weight is None else weight
    live = mask.any(axis=-1)
    zm = np.where(mask, z, -np.inf)
    top = np.where(live, np.max(np.where(mask, z, -np.inf), axis=-1), 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        lse = top + np.log(np.sum(np.where(mask, np.exp(zm - top[:, None]), 0.0), axis=-1))
        log_p = np.where(mask, z - lse[:, None], 0.0)
    hot = np.eye(num_classes)[t] if index else t
    target = ((1 - eps) * hot + eps / num_classes) * w
    per_row = -np.sum(np.where(mask, target * log_p, 0.0), axis=-1)
    per_row = np.where(live, per_row + z_loss * np.where(live, lse, 0.0) ** 2, 0.0)
    sw = np.ones(len(z)) if sw is None else sw
    share = sw * live * (w[t] if index else 1.0)
    per_row = per_row * sw
    if reduction == "none":
        return per_row
    return per_row.sum() if reduction == "sum" else per_row.sum() / share.sum()


# ---- against optax and the NumPy formula ----------------------------------------------------


def test_class_mask_matches_optax_for_soft_and_one_hot_targets(backend, case):
    z, y, soft, mask = case
    for target, labels in [(soft, soft), (y, np.eye(C)[y])]:
        got = run(backend, lambda z, t, m: xe.softmax_cross_entropy(
            z, t, where=m, reduction="none"), z, target, mask)
        close(got, optax_rows(z, labels, mask))
        mean = run(backend, lambda z, t, m: xe.softmax_cross_entropy(z, t, where=m),
                   z, target, mask)
        close(mean, optax_rows(z, labels, mask).sum() / mask.any(axis=-1).sum())
    integer = optax.softmax_cross_entropy_with_integer_labels(
        jnp.asarray(np.where(mask, z, 0.0)), jnp.asarray(y), where=jnp.asarray(mask))
    got = run(backend, lambda z, t, m: xe.softmax_cross_entropy(z, t, where=m, reduction="none"),
              z, y, mask)
    close(got, np.asarray(integer))


@pytest.mark.parametrize(("kind", "weighted", "eps", "z_loss"),
                         [("index", True, 0.2, 1e-2), ("prob", True, 0.1, 0.0),
                          ("prob", False, 0.0, 1e-2)])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_class_mask_with_every_option_matches_the_numpy_formula(
    backend, case, rng, kind, weighted, eps, z_loss, reduction
):
    z, y, soft, mask = case
    target = y if kind == "index" else soft
    w = rng.uniform(0.5, 2.0, size=C) if weighted else None
    sw = rng.uniform(0.5, 2.0, size=N)
    got = run(backend, lambda z, t, m, w, sw: xe.softmax_cross_entropy(
        z, t, where=m, weight=w, sample_weight=sw, label_smoothing=eps, z_loss=z_loss,
        reduction=reduction), z, target, mask, w, sw)
    close(got, np_masked_ce(z, target, mask, weight=w, eps=eps, z_loss=z_loss,
                            index=kind == "index", sw=sw, reduction=reduction))


def test_poly1_class_mask_matches_optax(backend, case):
    z, _, soft, mask = case
    ref = np.asarray(optax.losses.poly_loss_cross_entropy(
        jnp.asarray(np.where(mask, z, 0.0)), jnp.asarray(soft), epsilon=1.5,
        where=jnp.asarray(mask)))
    got = run(backend, lambda z, t, m: xe.poly1_cross_entropy(z, t, where=m, epsilon=1.5,
                                                              reduction="none"), z, soft, mask)
    close(got, ref)
    close(run(backend, lambda z, t, m: xe.poly1_cross_entropy(z, t, where=m, epsilon=1.5),
              z, soft, mask), ref.sum() / mask.any(axis=-1).sum())


def np_focal_rows(p, t, mask, alpha, gamma):
    """Keras' categorical focal formula on probabilities ``p`` over the kept classes."""
    terms = alpha * (1 - p) ** gamma * t * np.log(np.where(mask, p, 1.0))
    return -np.sum(np.where(mask, terms, 0.0), axis=-1)


def test_focal_losses_with_a_class_mask_match_the_formula_on_the_kept_softmax(backend, case):
    z, y, soft, mask = case
    live = mask.any(axis=-1)
    zm = np.where(mask, np.nan_to_num(z), -np.inf)
    with np.errstate(invalid="ignore"):
        p = np.exp(zm - zm.max(axis=-1, keepdims=True))
        p = p / p.sum(axis=-1, keepdims=True)
    want = np.where(live, np_focal_rows(np.where(live[:, None], p, 0.5), soft, mask, 0.25, 2.0),
                    0.0)
    got = run(backend, lambda z, t, m: xe.softmax_focal_loss(z, t, where=m, reduction="none"),
              z, soft, mask)
    close(got, want)
    # from probabilities: the kept classes renormalised, the same numbers
    probs = np.exp(z - np.nanmax(z, axis=-1, keepdims=True))
    probs = np.where(np.isnan(probs), 0.3, probs)
    probs /= probs.sum(axis=-1, keepdims=True)
    kept = np.where(mask, probs, 0.0)
    with np.errstate(invalid="ignore"):
        renorm = kept / kept.sum(axis=-1, keepdims=True)
    want = np.where(live, np_focal_rows(np.where(live[:, None], renorm, 0.5), soft, mask,
                                        0.25, 2.0), 0.0)
    got = run(backend, lambda p, t, m: xe.categorical_focal_loss(p, t, where=m, reduction="none"),
              probs, soft, mask)
    close(got, want)
    for target in (soft, y):
        close(run(backend, lambda p, t, m: xe.categorical_focal_loss(p, t, where=m),
                  probs, target, mask),
              run(backend, lambda z, t, m: xe.softmax_focal_loss(z, t, where=m),
                  np.log(probs), target, mask))


def test_every_softmax_loss_gives_0_for_masked_rows_and_nan_mean_when_all_are(backend, case):
    z, y, _, _ = case
    none = np.zeros((N, C), dtype=bool)
    for fn in (xe.softmax_cross_entropy, xe.poly1_cross_entropy, xe.softmax_focal_loss):
        got = run(backend, lambda z, t, m, f=fn: f(z, t, where=m, reduction="none"), z, y, none)
        np.testing.assert_array_equal(got, 0.0)
        assert run(backend, lambda z, t, m, f=fn: f(z, t, where=m, reduction="sum"),
                   z, y, none) == 0
        with np.errstate(invalid="ignore"):
            assert np.isnan(run(backend, lambda z, t, m, f=fn: f(z, t, where=m), z, y, none))


def test_multilabel_label_mask_drops_labels_from_the_sum_as_torch_bce(backend, case):
    z, _, soft, mask = case
    x = np.where(mask, z, np.nan)  # a masked NaN logit does not reach the loss
    terms = torch.nn.functional.binary_cross_entropy_with_logits(
        torch.tensor(np.nan_to_num(x)), torch.tensor(soft), reduction="none").numpy()
    want = np.where(mask, terms, 0.0).sum(axis=-1)
    got = run(backend, lambda x, t, m: xe.multilabel_cross_entropy(x, t, where=m,
                                                                   reduction="none"),
              x, soft, mask)
    close(got, want)
    close(run(backend, lambda x, t, m: xe.multilabel_cross_entropy(x, t, where=m), x, soft, mask),
          want.sum() / mask.any(axis=-1).sum())


# ---- telling a class mask from a row mask ------------------------------------------------


def test_mask_rank_decides_row_or_class_even_when_rows_equal_classes(backend, rng):
    z = rng.normal(size=(C, C))
    y = np.arange(C)[::-1].copy()
    rows = np.arange(C) % 3 != 1
    plain = run(backend, lambda z, t: xe.softmax_cross_entropy(z, t, reduction="none"), z, y)
    got = run(backend, lambda z, t, m: xe.softmax_cross_entropy(z, t, where=m, reduction="none"),
              z, y, rows)  # (C,) on (C, C) logits: a row mask
    close(got, np.where(rows, plain, 0.0))
    close(run(backend, lambda z, t, m: xe.softmax_cross_entropy(z, t, where=m), z, y, rows),
          plain[rows].mean())
    same = run(backend, lambda z, t, m: xe.softmax_cross_entropy(z, t, where=m, reduction="none"),
               z, y, rows[:, None])  # (C, 1): a class mask that is a row mask
    close(same, got)
    soft = np.eye(C)[y] * 0.7 + 0.3 / C
    shared = rows[None, :]  # (1, C): the same classes kept in every row
    got = run(backend, lambda z, t, m: xe.softmax_cross_entropy(z, t, where=m, reduction="none"),
              z, soft, shared)
    close(got, optax_rows(z, soft, np.broadcast_to(shared, (C, C))))


def test_class_mask_follows_the_class_axis(backend, case):
    z, _, soft, mask = case  # transposed: classes on axis 0, in the shape JAX has compiled
    got = run(backend, lambda z, t, m: xe.softmax_cross_entropy(
        z, t, axis=0, where=m, reduction="none"), z.T, soft.T, mask.T)
    close(got, optax_rows(z, soft, mask))
    assert xe.softmax_cross_entropy(z.T, soft.T, axis=0, where=mask[:, :1].T,
                                    reduction="none").shape == (N,)


# ---- index targets on masked classes, bad masks ---------------------------------------------


def test_index_target_on_a_masked_class_raises_unless_validate_false(backend, case):
    z, y, _, mask = case
    bad = mask.copy()
    bad[0, y[0]] = False
    bad[0, (y[0] + 1) % C] = True  # the row keeps another class
    for fn in (xe.softmax_cross_entropy, xe.poly1_cross_entropy, xe.softmax_focal_loss):
        with pytest.raises(xe.InputError, match=r"target holds class index \d+ .*where"):
            fn(backend.asarray(z), backend.asarray(y), where=backend.asarray(bad))
    with pytest.raises(xe.InputError, match="where"):
        xe.categorical_focal_loss(backend.asarray(xe.softmax(np.nan_to_num(z))),
                                  backend.asarray(y), where=backend.asarray(bad))
    got = run(backend, lambda z, t, m: xe.softmax_cross_entropy(
        z, t, where=m, reduction="none", validate=False), z, y, bad)
    close(got, optax_rows(z, np.eye(C)[y], bad))  # the one-hot rule: its term dropped


@pytest.mark.parametrize("bad", ["float", "row_shape", "class_shape", "too_many_dims"])
def test_a_bad_where_is_an_input_error_naming_it(backend, case, bad):
    z, y, _, mask = case
    where = {"float": mask.astype(float), "row_shape": np.ones(N + 1, dtype=bool),
             "class_shape": np.ones((N, C + 1), dtype=bool),
             "too_many_dims": np.ones((1, N, C), dtype=bool)}[bad]
    for fn, x in [(xe.softmax_cross_entropy, z), (xe.poly1_cross_entropy, z),
                  (xe.softmax_focal_loss, z), (xe.categorical_focal_loss, xe.softmax(z)),
                  (xe.softmax_cross_entropy_grad, z)]:
        with pytest.raises(xe.InputError, match="where"):
            fn(backend.asarray(x), backend.asarray(y), where=backend.asarray(where))


def test_nll_loss_takes_row_masks_only(backend, case, rng):
    _, y, _, mask = case
    log_p = np.log(xe.softmax(rng.normal(size=(N, C))))
    with pytest.raises(xe.InputError, match="where"):
        xe.nll_loss(backend.asarray(log_p), backend.asarray(y), where=backend.asarray(mask))
    rows = mask.any(axis=-1)
    got = run(backend, lambda lp, t, m: xe.nll_loss(lp, t, where=m, reduction="none"),
              log_p, y, rows[:, None])
    close(got, np.where(rows, -log_p[np.arange(N), y], 0.0))


@pytest.mark.parametrize("name", ["softmax_focal_loss", "categorical_focal_loss",
                                  "poly1_cross_entropy", "softmax_cross_entropy"])
def test_probability_targets_refuse_an_ignore_index(backend, case, name):
    z, _, soft, _ = case
    x = xe.softmax(np.nan_to_num(z)) if name == "categorical_focal_loss" else z
    fn = getattr(xe, name)
    with pytest.raises(xe.InputError, match=r"ignore_index=0 applies to class-index targets"):
        fn(backend.asarray(x), backend.asarray(soft), ignore_index=0)
    fn(backend.asarray(x), backend.asarray(soft), ignore_index=-1)  # "not used": fine


# ---- the activations agree with the losses and with jax.nn ----------------------------------


def test_activations_where_matches_jax_nn_and_the_loss(backend, case):
    z, _, soft, mask = case
    zj, mj = jnp.asarray(z), jnp.asarray(mask)
    close(run(backend, lambda x, m: xe.softmax(x, where=m), z, mask),
          np.asarray(jax.nn.softmax(zj, where=mj)))
    log_p = run(backend, lambda x, m: xe.log_softmax(x, where=m), z, mask)
    np.testing.assert_array_equal(np.isneginf(log_p), ~mask)
    close(np.where(mask, log_p, 0.0), np.where(mask, jax.nn.log_softmax(zj, where=mj), 0.0))
    close(run(backend, lambda x, m: xe.logsumexp(x, where=m), z, mask),
          np.asarray(jax.nn.logsumexp(zj, axis=-1, where=mj)))
    close(run(backend, lambda z, t, m: xe.softmax_cross_entropy(z, t, where=m, reduction="none"),
              z, soft, mask),
          -np.sum(np.where(mask, soft * log_p, 0.0), axis=-1))


def test_masked_entries_have_exactly_zero_gradient_in_torch_and_jax(case):
    z, y, soft, mask = case
    for fn, kw in [(xe.softmax_cross_entropy, {"z_loss": 1e-2, "label_smoothing": 0.1}),
                   (xe.poly1_cross_entropy, {}), (xe.softmax_focal_loss, {"gamma": 0.5})]:
        zt = torch.tensor(z, requires_grad=True)
        fn(zt, torch.tensor(soft), where=torch.tensor(mask), **kw).backward()
        grad = zt.grad.numpy()
        assert np.isfinite(grad).all()
        np.testing.assert_array_equal(grad[~mask], 0.0)
    for act in (xe.softmax, xe.log_softmax):
        zt = torch.tensor(z, requires_grad=True)
        out = act(zt, where=torch.tensor(mask))
        torch.where(torch.tensor(mask), out, 0.0).sum().backward()
        assert np.isfinite(zt.grad.numpy()).all()
        np.testing.assert_array_equal(zt.grad.numpy()[~mask], 0.0)
    grad = jax.jit(jax.grad(lambda v: xe.softmax_cross_entropy(
        v, jnp.asarray(y), where=jnp.asarray(mask), validate=False)))(jnp.asarray(z))
    assert np.isfinite(np.asarray(grad)).all()
    np.testing.assert_array_equal(np.asarray(grad)[~mask], 0.0)


# ---- properties -------------------------------------------------------------------------------

LOSSES = {
    "softmax_cross_entropy": lambda z, t, **kw: xe.softmax_cross_entropy(z, t, z_loss=1e-2, **kw),
    "poly1_cross_entropy": lambda z, t, **kw: xe.poly1_cross_entropy(z, t, epsilon=1.5, **kw),
    "softmax_focal_loss": lambda z, t, **kw: xe.softmax_focal_loss(z, t, **kw),
    "categorical_focal_loss": lambda z, t, **kw: xe.categorical_focal_loss(
        xe.softmax(z), t, validate=False, **kw),
}


@settings(max_examples=25, deadline=None)
@given(name=st.sampled_from(sorted(LOSSES)), seed=st.integers(0, 2**16),
       reduction=st.sampled_from(["none", "sum", "mean"]), index=st.booleans())
def test_a_class_mask_of_all_ones_equals_no_mask(name, seed, reduction, index):
    rng = np.random.default_rng(seed)
    z = 4.0 * rng.normal(size=(3, C))
    t = rng.integers(0, C, size=3) if index else rng.dirichlet(np.ones(C), size=3)
    fn = LOSSES[name]
    close(fn(z, t, where=np.ones((3, C), dtype=bool), reduction=reduction),
          fn(z, t, reduction=reduction), rtol=1e-12, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(name=st.sampled_from(sorted(LOSSES)), seed=st.integers(0, 2**16),
       dropped=st.integers(0, C - 1), reduction=st.sampled_from(["none", "mean"]),
       index=st.booleans())
def test_masking_a_class_without_target_mass_equals_dropping_its_column(
    name, seed, dropped, reduction, index
):
    rng = np.random.default_rng(seed)
    z = 4.0 * rng.normal(size=(3, C))
    if name != "categorical_focal_loss":  # its softmax(z) would carry a NaN to every class
        z[:, dropped] = rng.choice([np.nan, np.inf, 1e4, 0.0])  # masked: whatever it holds
    kept = np.delete(np.arange(C), dropped)
    if index:
        t = rng.choice(kept, size=3)
        t_small = np.searchsorted(kept, t)
    else:
        t = rng.dirichlet(np.ones(C), size=3)
        t[:, dropped] = 0.0
        t /= t.sum(axis=-1, keepdims=True)
        t_small = t[:, kept]
    mask = np.arange(C) != dropped
    fn = LOSSES[name]
    got = fn(z, t, where=np.broadcast_to(mask, (3, C)), reduction=reduction)
    alpha = {"alpha": 0.5} if "focal" in name else {}
    close(got, fn(z[:, kept], t_small, reduction=reduction), rtol=1e-9, atol=1e-12)
    if alpha:  # per-class alpha: the dropped class's entry goes with it
        a = rng.uniform(0.1, 1.0, size=C)
        close(fn(z, t, where=mask[None, :], alpha=a, reduction=reduction),
              fn(z[:, kept], t_small, alpha=a[kept], reduction=reduction), rtol=1e-9,
              atol=1e-12)
