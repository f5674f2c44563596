"""Worst relative error of every core function against its independent reference, on
every array library, in float64 and float32.

    python benchmarks/accuracy.py            # table
    python benchmarks/accuracy.py --json     # machine-readable

Inputs: random data plus adversarial rows (logits scaled to 1e4, -inf masked classes where
the function allows them, probabilities of exactly 0 and 1). The reference is computed
in float64 from the inputs rounded to the dtype under test, so the figures measure
crossent's arithmetic, not the rounding of its inputs. The relative error of an element is
|ours - ref| / |ref| over the reference's finite entries with |ref| >= 1e-8 * max|ref| (smaller
entries are below the reference's own rounding noise: torch's autograd returns 1.7e-19 where
the exact gradient underflows to 0); non-finite entries must match exactly (same inf, same
NaN) and are counted as mismatches otherwise. The tests assert the tolerances; this
script reports the figures.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import array_api_strict
import jax
import numpy as np
import optax
import scipy.special as sp
import scipy.stats
import torch
import torch.nn.functional as F

import crossent as xe

jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp  # noqa: E402

RNG = np.random.default_rng(0)
N, C = 64, 10


def to_backend(name: str, a: Any) -> Any:
    a = np.asarray(a)
    if name == "torch":
        return torch.as_tensor(a)
    if name == "jax":
        return jnp.asarray(a)
    if name == "array_api_strict":
        return array_api_strict.asarray(a)
    return a


def to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().numpy()
    if type(x).__module__.startswith("array_api_strict"):
        return np.from_dlpack(x)
    return np.asarray(x)


def t64(a: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a, dtype=np.float64))


def logits_data() -> np.ndarray:
    z = RNG.normal(size=(N, C)) * 3
    z[0] *= 1e4 / np.abs(z[0]).max()  # |logits| = 1e4
    z[1, 3] = -np.inf  # a masked class
    return z


def probs_data() -> np.ndarray:
    p = RNG.dirichlet(np.full(C, 0.5), size=N)
    p[0] = 0.0
    p[0, 2] = 1.0  # an exactly one-hot row (zeros and a one)
    return p


def labels_data() -> np.ndarray:
    y = RNG.integers(0, C, size=N)
    y[1] = 0  # not the masked class
    return y


def torch_grad(fn: Callable[[torch.Tensor], torch.Tensor], z: np.ndarray) -> np.ndarray:
    zt = t64(z).requires_grad_(True)
    fn(zt).backward()
    return zt.grad.numpy()


@dataclass
class Case:
    function: str
    reference: str
    ours: Callable[..., Any]  # called with backend arrays
    ref: Callable[..., Any]  # called with NumPy float64 arrays
    args: tuple[np.ndarray, ...]
    float_args: tuple[bool, ...]


def cases() -> list[Case]:
    z, p, q, y = logits_data(), probs_data(), probs_data(), labels_data()
    q[0] = np.full(C, 1.0 / C)  # q must be > 0 where p > 0 for a finite reference
    zf = np.where(np.isfinite(z), z, -50.0)  # finite logits for BCE-style losses
    t01 = RNG.integers(0, 2, size=(N, C)).astype(float)
    u = RNG.uniform(size=(N, C))
    u[0, :2] = [0.0, 1.0]
    w = RNG.uniform(0.5, 2.0, size=C)
    ce_opts = dict(weight=w, ignore_index=4, label_smoothing=0.1)
    zs = z.copy()
    zs[1, 3] = -30.0  # label smoothing with a -inf logit is +inf by definition
    out = [
        Case("surprisal", "-numpy.log2", lambda a: xe.surprisal(a, base=2),
             lambda a: -np.log2(a), (u,), (True,)),
        Case("entropy", "scipy.stats.entropy", lambda a: xe.entropy(a, base=2),
             lambda a: scipy.stats.entropy(a, base=2, axis=-1), (p,), (True,)),
        Case("cross_entropy", "-sum scipy.special.xlogy", lambda a, b: xe.cross_entropy(a, b),
             lambda a, b: -sp.xlogy(a, b).sum(-1), (p, q), (True, True)),
        Case("kl_divergence", "sum scipy.special.rel_entr", lambda a, b: xe.kl_divergence(a, b),
             lambda a, b: sp.rel_entr(a, b).sum(-1), (p, q), (True, True)),
        Case("binary_entropy", "scipy.special.entr(p) + entr(1-p)", xe.binary_entropy,
             lambda a: sp.entr(a) + sp.entr(1 - a), (u,), (True,)),
        Case("softmax", "scipy.special.softmax", xe.softmax,
             lambda a: sp.softmax(a, axis=-1), (z,), (True,)),
        Case("log_softmax", "scipy.special.log_softmax", xe.log_softmax,
             lambda a: sp.log_softmax(a, axis=-1), (z,), (True,)),
        Case("logsumexp", "scipy.special.logsumexp", xe.logsumexp,
             lambda a: sp.logsumexp(a, axis=-1), (z,), (True,)),
        Case("sigmoid", "scipy.special.expit", xe.sigmoid, sp.expit, (zf,), (True,)),
        Case("log_sigmoid", "scipy.special.log_expit", xe.log_sigmoid, sp.log_expit,
             (zf,), (True,)),
        Case("smooth_labels", "optax.smooth_labels", lambda a: xe.smooth_labels(a, 0.1),
             lambda a: np.asarray(optax.smooth_labels(jnp.asarray(a), 0.1)), (p,), (True,)),
        Case("softmax_cross_entropy", "torch F.cross_entropy (index, no options)",
             lambda a, b: xe.softmax_cross_entropy(a, b, reduction="none"),
             lambda a, b: F.cross_entropy(t64(a), torch.as_tensor(b), reduction="none"),
             (z, y), (True, False)),
        Case("softmax_cross_entropy", "torch F.cross_entropy (weight+ignore+smoothing, mean)",
             lambda a, b: xe.softmax_cross_entropy(a, b, **ce_opts),
             lambda a, b: F.cross_entropy(t64(a), torch.as_tensor(b), weight=t64(w),
                                          ignore_index=4, label_smoothing=0.1),
             (zs, y), (True, False)),
        Case("softmax_cross_entropy", "optax.softmax_cross_entropy (soft targets)",
             lambda a, b: xe.softmax_cross_entropy(a, b, reduction="none"),
             lambda a, b: np.asarray(optax.softmax_cross_entropy(jnp.asarray(a), jnp.asarray(b))),
             (zf, p), (True, True)),
        Case("softmax_cross_entropy_grad", "torch autograd of F.cross_entropy (all options)",
             lambda a, b: xe.softmax_cross_entropy_grad(a, b, **ce_opts),
             lambda a, b: torch_grad(lambda t: F.cross_entropy(
                 t, torch.as_tensor(b), weight=t64(w), ignore_index=4, label_smoothing=0.1), a),
             (zs, y), (True, False)),
        Case("softmax_cross_entropy_grad", "torch autograd of CE + z-loss, soft targets",
             lambda a, b: xe.softmax_cross_entropy_grad(a, b, z_loss=1e-3),
             lambda a, b: torch_grad(lambda t: F.cross_entropy(t, t64(b)) + 1e-3 * (
                 torch.logsumexp(t, -1) ** 2).mean(), a),
             (zf, p), (True, True)),
        Case("binary_cross_entropy", "torch F.binary_cross_entropy",
             lambda a, b: xe.binary_cross_entropy(a, b, reduction="none"),
             lambda a, b: F.binary_cross_entropy(t64(a), t64(b), reduction="none"),
             (u, t01), (True, True)),
        Case("binary_cross_entropy", "sklearn.metrics.log_loss (interior probabilities)",
             lambda a, b: xe.binary_cross_entropy(a, b),
             lambda a, b: _sklearn_log_loss(a, b), (np.clip(u, 0.01, 0.99), t01), (True, True)),
        Case("sigmoid_binary_cross_entropy", "torch F.binary_cross_entropy_with_logits",
             lambda a, b: xe.sigmoid_binary_cross_entropy(a, b, pos_weight=w, reduction="none"),
             lambda a, b: F.binary_cross_entropy_with_logits(
                 t64(a), t64(b), pos_weight=t64(w), reduction="none"), (zf, t01), (True, True)),
        Case("sigmoid_binary_cross_entropy_grad", "torch autograd of BCE-with-logits",
             lambda a, b: xe.sigmoid_binary_cross_entropy_grad(a, b, pos_weight=w),
             lambda a, b: torch_grad(lambda t: F.binary_cross_entropy_with_logits(
                 t, t64(b), pos_weight=t64(w)), a), (zf, t01), (True, True)),
        Case("multilabel_cross_entropy", "L * torch BCEWithLogits mean",
             xe.multilabel_cross_entropy,
             lambda a, b: C * F.binary_cross_entropy_with_logits(t64(a), t64(b)),
             (zf, t01), (True, True)),
        Case("multilabel_cross_entropy_grad", "torch autograd of L * BCEWithLogits mean",
             xe.multilabel_cross_entropy_grad,
             lambda a, b: torch_grad(lambda t: C * F.binary_cross_entropy_with_logits(t, t64(b)),
                                     a), (zf, t01), (True, True)),
        Case("sigmoid_focal_loss", "optax.sigmoid_focal_loss",
             lambda a, b: xe.sigmoid_focal_loss(a, b, reduction="none"),
             lambda a, b: np.asarray(optax.sigmoid_focal_loss(
                 jnp.asarray(a), jnp.asarray(b), alpha=0.25, gamma=2.0)),
             (RNG.normal(size=(N, C)) * 3, t01), (True, True)),
    ]
    return out


def _sklearn_log_loss(probs: np.ndarray, target: np.ndarray) -> float:
    from sklearn.metrics import log_loss

    flat_p, flat_t = probs.ravel(), target.ravel()
    return log_loss(flat_t, np.stack([1 - flat_p, flat_p], axis=1), labels=[0, 1])


def worst_error(ours: np.ndarray, ref: np.ndarray) -> tuple[float, int]:
    ours = np.asarray(ours, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    finite = np.isfinite(ref)
    mismatched = int(np.sum(~finite & ~((ours == ref) | (np.isnan(ours) & np.isnan(ref)))))
    scale = np.max(np.abs(ref[finite]), initial=0.0)
    sel = finite & (np.abs(ref) >= 1e-8 * scale) & (ref != 0)
    rel = float(np.max(np.abs(ours[sel] - ref[sel]) / np.abs(ref[sel]))) if sel.any() else 0.0
    return rel, mismatched


def run() -> list[dict[str, Any]]:
    rows = []
    backends = ("numpy", "torch", "jax", "array_api_strict")
    for case in cases():
        for dtype in ("float64", "float32"):
            rounded = [
                a.astype(dtype) if is_float else a
                for a, is_float in zip(case.args, case.float_args, strict=True)
            ]
            ref = to_numpy(case.ref(*[
                a.astype(np.float64) if is_float else a
                for a, is_float in zip(rounded, case.float_args, strict=True)
            ]))
            worst, bad = 0.0, 0
            for backend in backends:
                args = [to_backend(backend, a) for a in rounded]
                got = to_numpy(case.ours(*args))
                err, mism = worst_error(got, ref)
                worst, bad = max(worst, err), bad + mism
            rows.append(dict(function=case.function, reference=case.reference, dtype=dtype,
                             worst_rel_error=worst, nonfinite_mismatches=bad))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = run()
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'function':<36} {'reference':<58} {'float64':>9} {'float32':>9}")
    for i in range(0, len(rows), 2):
        r64, r32 = rows[i], rows[i + 1]
        flag = "" if r64["nonfinite_mismatches"] + r32["nonfinite_mismatches"] == 0 else " !inf"
        print(f"{r64['function']:<36} {r64['reference']:<58} "
              f"{r64['worst_rel_error']:>9.1e} {r32['worst_rel_error']:>9.1e}{flag}")
    print(f"\nbackends: numpy, torch, jax, array_api_strict; N={N}, C={C}; "
          f"relative error vs the float64 reference (math.ulp(1.0) = {math.ulp(1.0):.1e})")


if __name__ == "__main__":
    main()
