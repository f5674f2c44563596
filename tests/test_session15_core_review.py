"""Adversarial review of session 15's core changes: ``_array.silent_infinities``, the NaN
row of ``softmax``/``log_softmax`` and the losses at a +inf logit, the +0.0 of the measures,
``_checks``'s repr of a bad probability, and ``_files.write_atomic``/``check_files_in``.

Every expected value comes from torch, jax.nn, SciPy or the operating system, never from
crossent. A bug found here is a test written as it should pass, marked
``xfail(strict=True)`` with the cause in its reason.
"""

from __future__ import annotations

import inspect
import math
import os
import threading
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special as sp
import scipy.stats
import torch

import crossent as xe
from crossent import _files
from crossent.errors import InputError

INF = math.inf
INF_ROWS = np.array([[INF, 0.0, 1.0], [0.0, 1.0, 2.0]])
LABELS = np.array([1, 2])


def close(got, want, rtol=1e-12):
    np.testing.assert_allclose(np.asarray(got, dtype=np.float64),
                               np.asarray(want, dtype=np.float64), rtol=rtol)


def same_nan_pattern(got, want):
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert np.array_equal(np.isnan(got), np.isnan(want)), (got, want)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)


# --------------------------------------------------------------------------------------------
# silent_infinities: transparent, scoped, thread-local; NaN warnings stay on
# --------------------------------------------------------------------------------------------

DECORATED = ["surprisal", "entropy", "cross_entropy", "kl_divergence", "kl_divergence_terms",
             "generalized_kl_divergence", "binary_entropy", "softmax_cross_entropy",
             "nll_loss", "binary_cross_entropy", "softmax_cross_entropy_grad"]


@pytest.mark.parametrize("name", DECORATED)
def test_the_decorator_keeps_signature_doc_and_module(name):
    fn = getattr(xe, name)
    inner = fn.__wrapped__
    assert inspect.signature(fn) == inspect.signature(inner)
    assert fn.__doc__ == inner.__doc__ and ">>>" in fn.__doc__
    assert fn.__module__ == inner.__module__ and fn.__name__ == name


def test_error_state_is_restored_after_an_exception_and_nested_calls():
    before = np.geterr()
    with pytest.raises(InputError):
        xe.entropy([0.5, 0.6])  # raises inside the errstate block
    assert np.geterr() == before
    with np.errstate(divide="raise", over="raise"):
        # the documented infinity, silently, under the caller's "raise" ...
        assert float(xe.kl_divergence([0.5, 0.5], [1.0, 0.0])) == INF
        with pytest.raises(FloatingPointError):  # ... which is back right after
            np.float64(1.0) / np.float64(0.0)
    assert np.geterr() == before


def test_nan_warnings_are_not_silenced():
    """inf - inf inside a decorated loss still says 'invalid value' (only divide/over off)."""
    with pytest.warns(RuntimeWarning, match="invalid value"):
        xe.softmax_cross_entropy(INF_ROWS, LABELS)


def test_the_error_state_is_per_thread():
    """np.errstate is context-local: a thread inside a measure does not turn off the
    divide-by-zero check of another thread."""
    inside = threading.Event()
    release = threading.Event()
    seen: list[str] = []

    class Slow:  # an array-like whose conversion waits, so the thread sits inside the call
        def __array__(self, dtype=None, copy=None):
            inside.set()
            release.wait(10)
            return np.array([1.0, 0.0])

    t = threading.Thread(target=lambda: seen.append(str(xe.entropy(Slow()))))
    t.start()
    try:
        assert inside.wait(10)
        with np.errstate(divide="raise"), pytest.raises(FloatingPointError):
            np.float64(1.0) / np.float64(0.0)
        assert np.geterr()["divide"] == "warn"
    finally:
        release.set()
        t.join(10)
    assert seen == ["0.0"]


def test_jit_grad_and_torch_autograd_pass_through_the_decorator():
    p = np.array([0.2, 0.3, 0.5])
    q = np.array([0.1, 0.6, 0.3])
    f = jax.jit(lambda a, b: xe.kl_divergence(a, b, validate=False))
    close(f(jnp.asarray(p), jnp.asarray(q)), scipy.stats.entropy(p, q))
    g = jax.grad(lambda b: xe.cross_entropy(jnp.asarray(p), b, validate=False))(jnp.asarray(q))
    close(g, -p / q)
    qt = torch.tensor(q, requires_grad=True)
    xe.cross_entropy(torch.tensor(p), qt).backward()
    close(qt.grad, -p / q)


def test_torch_compile_fullgraph_of_a_core_function_on_tensors():
    f = torch.compile(lambda p: xe.surprisal(p, validate=False), fullgraph=True,
                      backend="eager")
    p = torch.tensor([0.5, 0.25], dtype=torch.float64)
    close(f(p), -np.log([0.5, 0.25]))


# --------------------------------------------------------------------------------------------
# A row holding +inf: NaN throughout, values AND gradients as torch and jax.nn
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("axis", [-1, 0, (0, 1), None])
def test_softmax_and_log_softmax_of_a_plus_inf_row_on_every_axis_form(axis):
    x = np.array([[INF, 0.0, 1.0], [2.0, 1.0, 0.0]])
    with np.errstate(invalid="ignore"):
        want_sm = sp.softmax(x, axis=axis)  # NaN throughout the +inf row, as torch and jax
        jax_lsm = jax.nn.log_softmax(jnp.asarray(x), axis=axis)
        same_nan_pattern(xe.softmax(x, axis=axis), want_sm)
        same_nan_pattern(xe.log_softmax(x, axis=axis), jax_lsm)
    assert float(xe.logsumexp([INF, 0.0])) == INF  # unchanged: torch.logsumexp's +inf


def test_a_masked_plus_inf_does_not_poison_the_row():
    x, m = jnp.asarray([INF, 0.0, 1.0]), jnp.asarray([False, True, True])
    same_nan_pattern(xe.softmax(np.asarray(x), where=np.asarray(m)), jax.nn.softmax(x, where=m))
    same_nan_pattern(xe.log_softmax(np.asarray(x), where=np.asarray(m)),
                     jax.nn.log_softmax(x, where=m))


def test_autograd_through_log_softmax_of_a_plus_inf_row_is_nan_like_torch_and_jax():
    z = torch.tensor(INF_ROWS, requires_grad=True)
    (-xe.log_softmax(z)[0, 1]).backward()
    zr = torch.tensor(INF_ROWS, requires_grad=True)
    (-torch.log_softmax(zr, -1)[0, 1]).backward()
    same_nan_pattern(z.grad, zr.grad)  # torch: [[nan, nan, nan], [0, 0, 0]]
    gj = jax.grad(lambda a: -xe.log_softmax(a)[0, 1])(jnp.asarray(INF_ROWS))
    same_nan_pattern(gj, jax.grad(lambda a: -jax.nn.log_softmax(a)[0, 1])(jnp.asarray(INF_ROWS)))


def test_autograd_through_the_loss_on_a_plus_inf_row_is_torchs():
    z = torch.tensor(INF_ROWS, requires_grad=True)
    with np.errstate(invalid="ignore"):
        xe.softmax_cross_entropy(z, torch.tensor(LABELS), reduction="sum").backward()
        own = xe.softmax_cross_entropy_grad(INF_ROWS, LABELS, reduction="sum")
    zr = torch.tensor(INF_ROWS, requires_grad=True)
    torch.nn.functional.cross_entropy(zr, torch.tensor(LABELS), reduction="sum").backward()
    same_nan_pattern(own, zr.grad)  # the closed form already agrees
    same_nan_pattern(z.grad, zr.grad)


@pytest.mark.parametrize("kw", [dict(weight=[1.0, 2.0, 3.0]), dict(label_smoothing=0.1),
                                dict(reduction="none"), dict(ignore_index=1)],
                         ids=["weight", "smoothing", "none", "ignore"])
def test_the_loss_on_a_plus_inf_row_is_torchs(kw):
    tkw = {k: torch.tensor(v, dtype=torch.float64) if k == "weight" else v
           for k, v in kw.items()}
    want = torch.nn.functional.cross_entropy(torch.tensor(INF_ROWS), torch.tensor(LABELS),
                                             **tkw)
    with np.errstate(invalid="ignore"):
        same_nan_pattern(xe.softmax_cross_entropy(INF_ROWS, LABELS, **kw), want)


def test_a_plus_inf_entry_masked_by_where_gives_jaxs_loss_and_a_finite_gradient():
    """optax's where= is jax.nn.log_softmax's: the masked +inf leaves the normaliser."""
    m = np.ones_like(INF_ROWS, dtype=bool)
    m[0, 0] = False
    lsm = jax.nn.log_softmax(jnp.asarray(INF_ROWS), where=jnp.asarray(m))
    want = -np.take_along_axis(np.asarray(lsm), LABELS[:, None], axis=1)[:, 0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        close(xe.softmax_cross_entropy(INF_ROWS, LABELS, where=m, reduction="none"), want)
        assert np.isfinite(xe.softmax_cross_entropy_grad(INF_ROWS, LABELS, where=m)).all()


# --------------------------------------------------------------------------------------------
# +0.0, not -0.0, for certain distributions; gradients unchanged
# --------------------------------------------------------------------------------------------


def test_certain_distributions_give_plus_zero_like_scipy():
    for got in (xe.entropy([1.0, 0.0]), xe.surprisal(1.0), xe.binary_entropy(1.0),
                xe.binary_entropy(0.0), xe.kl_divergence([1.0, 0.0], [1.0, 0.0])):
        assert math.copysign(1.0, float(got)) == 1.0, got
    assert math.copysign(1.0, float(scipy.stats.entropy([1.0, 0.0]))) == 1.0


def test_cross_entropy_of_a_certain_distribution_with_itself_is_plus_zero():
    want = scipy.stats.entropy([1.0, 0.0]) + scipy.stats.entropy([1.0, 0.0], [1.0, 0.0])
    got = float(xe.cross_entropy([1.0, 0.0], [1.0, 0.0]))
    assert got == want == 0.0
    assert math.copysign(1.0, got) == math.copysign(1.0, float(want))


def test_gradients_of_the_zero_sign_change_are_unchanged():
    p = np.array([0.25, 0.75])
    pt = torch.tensor(p, requires_grad=True)
    xe.entropy(pt).backward()
    close(pt.grad, -(np.log(p) + 1.0))
    close(jax.grad(lambda a: xe.surprisal(a, validate=False))(0.25), -4.0)
    close(jax.grad(lambda a: xe.binary_entropy(a, validate=False))(0.25), np.log(0.75 / 0.25))


def test_a_bad_probability_is_shown_with_all_its_digits():
    with pytest.raises(InputError, match=r"found 1\.0000000001\b"):
        xe.surprisal(1.0000000001)


# --------------------------------------------------------------------------------------------
# _files: the caller's path in every failure; link targets checked before the work
# --------------------------------------------------------------------------------------------


def test_write_atomic_names_the_callers_path_when_the_temporary_file_cannot_be_made(
        tmp_path: Path):
    target = tmp_path / "missing" / "x.json"
    with pytest.raises(FileNotFoundError) as err:
        _files.write_atomic(target, "{}")
    assert err.value.filename == str(target)


@pytest.mark.skipif(not os.path.isfile("/proc/version"), reason="needs /proc")
def test_check_files_in_refuses_a_link_whose_target_folder_cannot_be_written(tmp_path: Path):
    (tmp_path / "metrics.json").symlink_to("/proc/version")
    with pytest.raises(OSError):  # the write at the end fails: the OS's answer
        _files.write_atomic(tmp_path / "metrics.json", "{}")
    with pytest.raises(InputError, match=r"metrics\.json"):
        _files.check_files_in(tmp_path, ["metrics.json"], "--out")


def test_check_file_apart_follows_links(tmp_path: Path):
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "alias").symlink_to(out)
    with pytest.raises(InputError, match="--html"):
        _files.check_file_apart(tmp_path / "alias" / "a.png", "--html", out, "--out", ["a.png"])
    with pytest.raises(InputError, match="--html"):
        _files.check_file_apart(tmp_path, "--html", tmp_path / "alias", "--out", ["a.png"])
    _files.check_file_apart(out / "page.html", "--html", out, "--out", ["a.png"])


# --------------------------------------------------------------------------------------------
# Found by a torch float64 fuzz of softmax_cross_entropy (not new in this change)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("eps, w0", [(1.0, 1.0), (0.0, 0.0), (0.1, 0.0)])
def test_zero_target_mass_on_a_minus_inf_logit_is_torchs_probability_target_form(eps, w0):
    """The documented convention (docstring "Edge cases", PITFALLS 4): a class whose
    effective target mass is 0 contributes 0 even where its logit is ``-inf``. For index
    targets the target class's mass is ``((1 - eps) + eps / C) w[y]``: 0 for ``w[y] = 0``;
    at ``eps = 1`` it is ``w[y] / C``, so the loss is +inf. torch's index path gives NaN
    in all three (its ``0 * inf``); the reference is torch's own loss on the
    same effective target ``T = ((1 - eps) e_y + eps / C) w`` as ``-sum_c T_c log p_c``
    with ``0 log 0 = 0``: ``+inf`` where smoothed mass meets the ``-inf``, finite where no
    mass does."""
    z = np.array([[-INF, 2.0, 3.0], [0.0, 1.0, 2.0]])
    w = np.array([w0, 1.0, 0.5])
    y = np.array([0, 1])
    mass = torch.tensor(((1.0 - eps) * np.eye(3)[y] + eps / 3.0) * w)  # effective target
    logp = torch.log_softmax(torch.tensor(z), dim=1)
    want = -torch.where(mass == 0, 0.0, mass * logp).sum(1)  # 0 log 0 = 0, by hand
    got = np.asarray(xe.softmax_cross_entropy(z, y, weight=w, label_smoothing=eps,
                                              reduction="none"))
    torch_index = torch.nn.functional.cross_entropy(
        torch.tensor(z), torch.tensor(y), weight=torch.tensor(w), label_smoothing=eps,
        reduction="none")
    assert torch.isnan(torch_index[0])  # the difference documented
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-12)  # +inf where mass meets -inf
    assert (eps > 0 and w0 > 0) == bool(np.isinf(got[0]))
    # where no zero mass meets -inf, torch's own index-target loss agrees
    np.testing.assert_allclose(got[1], torch_index[1].item(), rtol=1e-12)
