"""Adversarial review of session 16's third wave (helper H41), Triton side, in the
interpreter on tiny shapes: ``ops.cross_entropy_forward`` passes the smoothing's target
mass ``(eps / V) sum_c w_c`` (each term scaled, summed in float64, cast to the accumulate
dtype) as ``PARAMS[3]`` and ``ce_kernel`` forms ``a = (1 - eps) w_y + w_smooth``.
Class weights near the dtype's largest (float32, float64, bfloat16 logits), mixed signs,
no weights, ``eps = 1``, ``V = 1``; every reduction. References:
``torch.nn.functional.cross_entropy`` in the logits' dtype (its gradient, which stays finite
where the loss overflows) and in float64 for the values where they are finite."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

import torch.nn.functional as F  # noqa: E402
from grad_probes import smoothed_loss_and_grad, smoothing_weights  # noqa: E402

import crossent.torch as xt  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: the interpreter
F64 = torch.float64
pytestmark = [pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")]


@pytest.mark.parametrize("dtype,kind,eps,reduction", [
    (torch.float32, "near_max", 0.1, "sum"),
    (torch.float32, "mixed_huge", 0.1, "none"),
    (torch.float32, "mixed_huge", 1.0, "sum"),
    (F64, "near_max", 1.0, "none"),
    (F64, "mixed_huge", 0.1, "sum"),
    (torch.bfloat16, "near_max", 0.1, "none"),
    (torch.float32, "mixed", 0.1, "mean"),
    (F64, None, 1.0, "mean"),
    (torch.float32, None, 0.1, "none"),
])
def test_triton_smoothing_mass_is_torchs(dtype, kind, eps, reduction):
    g = torch.Generator().manual_seed(3)
    c = 4
    z = torch.randn(4, c, generator=g, dtype=F64).to(dtype).to(DEVICE)
    y = torch.tensor([0, 3, -100, 1], device=DEVICE)
    w = smoothing_weights(kind, dtype, c, DEVICE)
    ours_v, ours_g = smoothed_loss_and_grad(xt.cross_entropy, z, y, w, eps, reduction,
                                            backend="triton")
    ref_v, ref_g = smoothed_loss_and_grad(F.cross_entropy, z, y, w, eps, reduction)
    assert torch.isfinite(ref_g).all() and torch.isfinite(ours_g).all()
    tol = 2e-2 if dtype == torch.bfloat16 else (1e-5 if dtype == torch.float32 else 1e-12)
    assert (ours_g - ref_g).abs().max() <= tol * ref_g.abs().max(), (ours_g, ref_g)
    if torch.isfinite(ref_v).all():
        exact = F.cross_entropy(z.double(), y, weight=None if w is None else w.double(),
                                reduction=reduction, label_smoothing=eps)
        torch.testing.assert_close(ours_v, exact, rtol=tol, atol=tol)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_triton_single_class_smoothing_is_torchs(weighted, reduction):
    z = torch.tensor([[0.7], [-1.2], [3.0]], dtype=F64, device=DEVICE)
    y = torch.tensor([0, -100, 0], device=DEVICE)
    w = torch.tensor([2.5], dtype=F64, device=DEVICE) if weighted else None
    ours = smoothed_loss_and_grad(xt.cross_entropy, z, y, w, 1.0, reduction, backend="triton")
    ref = smoothed_loss_and_grad(F.cross_entropy, z, y, w, 1.0, reduction)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, equal_nan=True)
