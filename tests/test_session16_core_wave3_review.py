"""Adversarial review of session 16's third wave (helper H41), core side:
``losses.widened_and_counted`` (shared by ``_index_hot`` and
``integrations.conventions.convention_terms``).

Narrow unsigned class indices (uint8, uint16) hold values that a narrow comparison with
``ignore_index`` would confuse (156 is -100 in uint8); ``ignore_index`` outside the dtype's
range ignores nothing. Every core loss that takes class indices and ``ignore_index`` is
checked on every array library (the ``backend`` fixture) against torch in float64 on int64
copies of the targets (``F.cross_entropy``, ``F.nll_loss``; the poly-1 and focal formulas
written in torch), and the conventions against their published formulas in torch
(``torch``: ``F.cross_entropy``; ``optax``: ``optax.softmax_cross_entropy_with_integer_labels``
masked and averaged over all rows).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from crossent import losses
from crossent.errors import InputError
from crossent.integrations.conventions import convention_loss

C = 300
TARGET = np.array([156, 3, 255, 0, 200])
CASES = [  # (dtype, ignore_index)
    ("uint8", -100), ("uint8", 156), ("uint8", 70000), ("uint16", 255), ("uint16", -(2**63)),
]
CONVENTION_CASES = [("uint8", -100), ("uint8", 156), ("uint16", 2**63 - 1)]


def _logits():
    return np.random.default_rng(41).standard_normal((len(TARGET), C))


def _torch_rows(z, y, ignore_index):
    """Per-row (loss pieces) in float64 torch from int64 targets: kept mask, log p, p_y."""
    zt = torch.tensor(z, dtype=torch.float64)
    yt = torch.tensor(y, dtype=torch.int64)
    if -(2**63) <= ignore_index < 2**63:
        kept = yt != ignore_index
    else:  # no int64 equals it
        kept = torch.ones_like(yt, dtype=torch.bool)
    logp = zt.log_softmax(-1)
    logp_y = logp.gather(1, yt.clamp(0, C - 1)[:, None])[:, 0]
    return zt, yt, kept, logp, logp_y


def _mean_kept(rows, kept):
    return (torch.where(kept, rows, 0.0).sum() / kept.sum()).item()


def _reference(name, z, y, ignore_index):
    zt, yt, kept, logp, logp_y = _torch_rows(z, y, ignore_index)
    ii = ignore_index if -(2**63) <= ignore_index < 2**63 else -100
    if name == "softmax_cross_entropy":
        return F.cross_entropy(zt, yt, ignore_index=ii).item()
    if name == "nll_loss":
        return F.nll_loss(logp, yt, ignore_index=ii).item()
    p_y = logp_y.exp()
    if name == "poly1_cross_entropy":  # CE + epsilon (1 - p_y), epsilon = 2
        return _mean_kept(-logp_y + 2.0 * (1 - p_y), kept)
    # focal, alpha None, gamma 2: -(1 - p_y)^2 log p_y
    return _mean_kept(-((1 - p_y) ** 2) * logp_y, kept)


def _call(name, xp_z, xp_y, ignore_index):
    if name == "nll_loss":
        from crossent.activations import log_softmax
        return losses.nll_loss(log_softmax(xp_z, axis=-1), xp_y, ignore_index=ignore_index)
    if name == "categorical_focal_loss":
        from crossent.activations import softmax
        return losses.categorical_focal_loss(softmax(xp_z, axis=-1), xp_y, alpha=None,
                                             ignore_index=ignore_index)
    if name == "softmax_focal_loss":
        return losses.softmax_focal_loss(xp_z, xp_y, alpha=None, ignore_index=ignore_index)
    return getattr(losses, name)(xp_z, xp_y, ignore_index=ignore_index)


LOSSES = ["softmax_cross_entropy", "nll_loss", "poly1_cross_entropy", "softmax_focal_loss",
          "categorical_focal_loss"]


@pytest.mark.parametrize("dtype,ignore_index", CASES)
@pytest.mark.parametrize("name", LOSSES)
def test_narrow_unsigned_targets_compare_with_ignore_index_widened(backend, name, dtype,
                                                                   ignore_index):
    z = _logits()
    got = _call(name, backend.asarray(z), backend.asarray(TARGET, dtype), ignore_index)
    want = _reference(name, z, TARGET, ignore_index)
    np.testing.assert_allclose(backend.to_numpy(got), want, rtol=1e-9, atol=1e-12)


def _convention_reference(conv, z, y, ignore_index, eps):
    zt, yt, kept, logp, logp_y = _torch_rows(z, y, ignore_index)
    ii = ignore_index if -(2**63) <= ignore_index < 2**63 else -100
    if conv == "torch":
        return F.cross_entropy(zt, yt, ignore_index=ii, label_smoothing=eps).item()
    # optax: smoothed labels (1 - eps) onehot + eps / C, rows masked, mean over every row
    rows = -(1 - eps) * logp_y - eps * logp.mean(-1)
    return (torch.where(kept, rows, 0.0).sum() / len(y)).item()


@pytest.mark.parametrize("dtype,ignore_index", CONVENTION_CASES)
@pytest.mark.parametrize("conv", ["torch", "optax"])
def test_conventions_count_narrow_unsigned_targets_as_the_loss(backend, conv, dtype,
                                                               ignore_index):
    z = _logits()
    got = convention_loss(backend.asarray(z), backend.asarray(TARGET, dtype), conv,
                          label_smoothing=0.1, ignore_index=ignore_index)
    want = _convention_reference(conv, z, TARGET, ignore_index, 0.1)
    np.testing.assert_allclose(backend.to_numpy(got), want, rtol=1e-9, atol=1e-12)


# a uint64 class index >= 2**63 (uint32 >= 2**31 under JAX without x64) was cast to the
# wide dtype and wrapped (2**64 - 100 became -100 = ignore_index): now refused before the
# cast (_array.past_integer_range in losses.widened_and_counted)


@pytest.mark.parametrize("name", ["softmax_cross_entropy", "nll_loss", "softmax_focal_loss"])
def test_uint64_index_wrapping_to_ignore_index_is_refused(backend, name):
    y = backend.asarray(np.array([2**64 - 100, 3, 255, 0, 200], dtype=np.uint64))
    with pytest.raises(InputError, match="target"):
        _call(name, backend.asarray(_logits()), y, -100)


def test_uint64_index_wrapping_to_ignore_index_is_refused_by_conventions(backend):
    y = backend.asarray(np.array([2**64 - 100, 3, 255, 0, 200], dtype=np.uint64))
    with pytest.raises(InputError, match="target"):
        convention_loss(backend.asarray(_logits()), y, "torch")


def test_uint64_index_just_below_int64_max_is_refused(backend):
    y = backend.asarray(np.array([2**63 - 1, 3, 255, 0, 200], dtype=np.uint64))
    with pytest.raises(InputError, match="target"):
        losses.softmax_cross_entropy(backend.asarray(_logits()), y)


_JAX32_SCRIPT = """
import jax.numpy as jnp, numpy as np
from crossent import losses
from crossent.errors import InputError
assert jnp.zeros(1, dtype=int).dtype == jnp.int32  # JAX's default: no x64
z = jnp.asarray(np.random.default_rng(0).standard_normal((5, 300)).astype(np.float32))
y = jnp.asarray(np.array([2**32 - 100, 3, 1, 0, 200], dtype=np.uint32))
try:
    print('RETURNED', float(losses.softmax_cross_entropy(z, y)))
except InputError as error:
    print('INPUTERROR', error)
"""


@pytest.mark.timeout(60)
def test_uint32_index_wrapping_to_ignore_index_is_refused_by_jax_without_x64():
    import os
    import pathlib
    import subprocess
    import sys

    import crossent
    env = dict(os.environ, JAX_ENABLE_X64="0", JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join(
        [str(pathlib.Path(crossent.__file__).parents[1]), env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, "-c", _JAX32_SCRIPT], env=env, capture_output=True,
                         text=True, timeout=50)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("INPUTERROR") and "target" in run.stdout, run.stdout
