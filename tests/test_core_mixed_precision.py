"""Mixed precision in the core: an input and a floating target of different dtypes promote
as torch and NumPy promote them (the loss in ``result_type``, computed in it, float32 for
narrower), while a list, a Python number or another library's array takes the input's
dtype (as ``torch.tensor(list)`` takes torch's default, not NumPy's float64). Gradients
keep the logits' dtype, as autograd's. References: torch's own functions in float64 on
the same (rounded) numbers, torch's and NumPy's promotion tables."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import crossent as xe

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
G = torch.Generator().manual_seed(7)
Z = torch.randn(6, 5, generator=G, dtype=F64) * 2
PROBS = torch.softmax(torch.randn(6, 5, generator=G, dtype=F64), -1)
TARGET = torch.softmax(torch.randn(6, 5, generator=G, dtype=F64), -1)
BINARY = torch.rand(6, 5, generator=G, dtype=F64)
PAIRS = [(F16, F64), (BF16, F32), (F32, F64), (F64, F32), (F16, BF16), (F32, F16)]


def _focal_free_ce_of_probs(p, t):
    return -(t * p.log()).sum(-1).mean()


def _sigmoid_focal(x, t, gamma=2.0, alpha=0.25):
    p = torch.sigmoid(x)
    ce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
    p_t = p * t + (1 - p) * (1 - t)
    alpha_t = alpha * t + (1 - alpha) * (1 - t)
    return (alpha_t * ce * (1 - p_t) ** gamma).mean()


# name: (crossent call, float64 torch reference, the input's data, the target's data)
CASES = {
    "cross_entropy": (xe.cross_entropy, lambda p, q: -(p * q.log()).sum(-1), TARGET, PROBS),
    "kl_divergence": (xe.kl_divergence, lambda p, q: (p * (p / q).log()).sum(-1), TARGET, PROBS),
    "kl_divergence_terms": (xe.kl_divergence_terms, lambda p, q: p * (p / q).log(),
                            TARGET, PROBS),
    "softmax_cross_entropy": (xe.softmax_cross_entropy, F.cross_entropy, Z, TARGET),
    "poly1_cross_entropy eps 0": (
        lambda z, t: xe.poly1_cross_entropy(z, t, epsilon=0.0), F.cross_entropy, Z, TARGET),
    "softmax_focal_loss gamma 0": (
        lambda z, t: xe.softmax_focal_loss(z, t, alpha=None, gamma=0.0), F.cross_entropy,
        Z, TARGET),
    "binary_cross_entropy": (xe.binary_cross_entropy, F.binary_cross_entropy,
                             torch.sigmoid(Z), BINARY),
    "sigmoid_binary_cross_entropy": (xe.sigmoid_binary_cross_entropy,
                                     F.binary_cross_entropy_with_logits, Z, BINARY),
    "multilabel_cross_entropy": (
        xe.multilabel_cross_entropy,
        lambda x, t: F.binary_cross_entropy_with_logits(x, t, reduction="sum") / x.shape[0],
        Z, BINARY),
    "sigmoid_focal_loss": (xe.sigmoid_focal_loss, _sigmoid_focal, Z, BINARY),
    "categorical_focal_loss gamma 0": (
        lambda p, t: xe.categorical_focal_loss(p, t, alpha=None, gamma=0.0),
        _focal_free_ce_of_probs, PROBS, TARGET),
}


def _rtol(dtype):
    return 1e-12 if dtype == F64 else 2e-6


@pytest.mark.parametrize(("a", "b"), PAIRS, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("name", list(CASES))
def test_torch_input_and_target_promote_as_torch(name, a, b):
    fn, ref_fn, x, t = CASES[name]
    x, t = x.to(a), t.to(b)
    got = fn(x, t)
    want_dtype = torch.promote_types(a, b)
    assert got.dtype == want_dtype
    ref = ref_fn(x.double(), t.double())
    torch.testing.assert_close(got.double(), ref, rtol=_rtol(want_dtype), atol=1e-12)


@pytest.mark.parametrize("name", ["softmax_cross_entropy", "sigmoid_binary_cross_entropy",
                                  "binary_cross_entropy"])
def test_the_promoted_dtype_is_torchs_own_where_torch_takes_the_pair(name):
    fn, ref_fn, x, t = CASES[name]
    for a, b in [(F32, F64), (BF16, F32), (F16, F32)]:
        try:
            torch_dtype = ref_fn(x.to(a), t.to(b)).dtype
        except RuntimeError:  # F.binary_cross_entropy refuses a mixed pair
            continue
        assert fn(x.to(a), t.to(b)).dtype == torch_dtype, (a, b)


@pytest.mark.parametrize(("a", "b"), [(np.float32, np.float64), (np.float16, np.float32),
                                      (np.float64, np.float16)])
@pytest.mark.parametrize("name", ["cross_entropy", "softmax_cross_entropy",
                                  "sigmoid_binary_cross_entropy", "kl_divergence_terms"])
def test_numpy_input_and_target_promote_as_numpy(name, a, b):
    fn, ref_fn, x, t = CASES[name]
    x_np, t_np = x.numpy().astype(a), t.numpy().astype(b)
    got = fn(x_np, t_np)
    assert got.dtype == np.result_type(a, b)
    ref = ref_fn(torch.from_numpy(x_np).double(), torch.from_numpy(t_np).double())
    np.testing.assert_allclose(got, ref.numpy(), rtol=1e-12 if got.dtype == np.float64 else 2e-6)


@pytest.mark.parametrize("how", ["list", "numpy float64", "numpy float16"])
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_a_target_from_outside_the_library_takes_the_inputs_dtype(how, dtype):
    z = Z.to(dtype)
    t = TARGET.numpy()
    t = t.tolist() if how == "list" else t.astype(np.float64 if "64" in how else np.float16)
    got = xe.softmax_cross_entropy(z, t)
    assert got.dtype == dtype
    t64 = torch.tensor(np.asarray(t, dtype=np.float64))
    ref = F.cross_entropy(z.double(), t64)
    torch.testing.assert_close(got.double(), ref, rtol=1e-2 if dtype == BF16 else 2e-6, atol=0)


def test_a_numpy_input_with_a_list_target_keeps_its_float32():
    got = xe.softmax_cross_entropy(Z.numpy().astype(np.float32), TARGET.tolist())
    assert got.dtype == np.float32


def test_index_targets_do_not_promote():
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    for dtype in (F16, BF16, F32):
        assert xe.softmax_cross_entropy(Z.to(dtype), y).dtype == dtype


def test_class_weights_take_the_inputs_dtype_as_torchs_binary_loss():
    # torch's binary_cross_entropy_with_logits keeps the input's dtype under a float64
    # weight (its cross_entropy refuses one); the core follows the weak rule for weights
    w = torch.rand(5, generator=G, dtype=F64)
    got = xe.sigmoid_binary_cross_entropy(Z.float(), BINARY.float(), weight=w)
    assert got.dtype == F.binary_cross_entropy_with_logits(
        Z.float(), BINARY.float(), weight=w).dtype == F32


def test_a_float16_distribution_keeps_its_own_sum_tolerance_after_promotion():
    # rows that sum to 1 in float16 (not in float64) with a float64 target: not refused
    p16 = PROBS.to(F16)
    assert abs(float(p16.double().sum(-1).sub(1).abs().max())) > 1e-6
    got = xe.categorical_focal_loss(p16, TARGET, alpha=None, gamma=0.0)
    assert got.dtype == F64
    got = xe.cross_entropy(TARGET, p16)
    assert got.dtype == F64


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_autograd_through_a_promoted_loss_gives_the_logits_dtype(dtype):
    z = Z.to(dtype).requires_grad_()
    zr = Z.to(dtype).double().requires_grad_()
    xe.softmax_cross_entropy(z, TARGET).backward()
    F.cross_entropy(zr, TARGET).backward()
    assert z.grad.dtype == dtype
    torch.testing.assert_close(z.grad, zr.grad.to(dtype))


def test_analytic_gradient_keeps_the_logits_dtype_and_torchs_value():
    z = Z.float()
    got = xe.softmax_cross_entropy_grad(z, TARGET, reduction="sum")
    assert got.dtype == F32
    zr = z.double().requires_grad_()
    F.cross_entropy(zr, TARGET, reduction="sum").backward()
    torch.testing.assert_close(got, zr.grad.float())
