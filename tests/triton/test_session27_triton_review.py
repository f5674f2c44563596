"""Adversarial review (helper H93) of crossent's Triton kernels in triton's CPU interpreter
(this folder's conftest sets ``TRITON_INTERPRET=1``): option combinations the other files
of tests/triton do not pair, through ``backend="triton"`` on ``cross_entropy``,
``linear_cross_entropy`` and the vocab-parallel functions in world 1, and the fused
linear head. No bug was found; everything here is a passing regression guard.

References are independent of crossent: ``F.cross_entropy`` (and ``F.linear``) in float64
on the tested values, softcap as ``c tanh(z / c)``, z-loss as ``z_loss * logsumexp^2`` on
the rows that count, sharing the "mean" denominator; ``num_items`` divides the summed loss.
"""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

import torch.nn.functional as F  # noqa: E402

import crossent.torch as xt  # noqa: E402
import crossent.torch.distributed as xd  # noqa: E402

if torch.cuda.is_available():  # the review targets the CPU interpreter
    pytest.skip("CPU interpreter review", allow_module_level=True)

from crossent.torch._triton.fused_linear import fused_linear_cross_entropy  # noqa: E402

F64 = torch.float64
pytestmark = [pytest.mark.filterwarnings("ignore::RuntimeWarning"),
              pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.timeout(300)]
W7 = [1.0, 0.0, -1.0, 2.0, 0.5, 0.0, 3.0]  # zeros and a negative
W11 = [1.0, 0.0, -1.0, 2.0, 0.5, 0.0, 3.0, 1.0, 1.0, 1.0, 2.0]


def ref(z, y, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0,
        z_loss=0.0, softcap=None, num_items=None):
    z = z.double()
    zc = z if softcap is None else softcap * torch.tanh(z / softcap)
    w = None if weight is None else weight.double()
    rows = F.cross_entropy(zc, y, weight=w, ignore_index=ignore_index, reduction="none",
                           label_smoothing=label_smoothing)
    if y.is_floating_point():
        valid = torch.ones(z.shape[0], dtype=torch.bool)
        den = torch.tensor(float(z.shape[0]), dtype=F64)
    else:
        valid = y != ignore_index
        safe = torch.where(valid, y, 0)
        den = (w[safe] * valid).sum() if w is not None else valid.sum().double()
    if z_loss:
        lse = torch.logsumexp(zc, -1)
        rows = rows + torch.where(valid, z_loss * lse * lse, 0.0)
    if num_items is not None:
        return rows.sum() / float(num_items)
    if reduction == "none":
        return rows
    if reduction == "mean" and not z_loss:  # torch's own mean (0/0 parts give NaN)
        return F.cross_entropy(zc, y, weight=w, ignore_index=ignore_index,
                               label_smoothing=label_smoothing)
    return rows.sum() if reduction == "sum" else rows.sum() / den


def close(got, want, tol):
    got, want = got.detach().double(), want.detach().double()
    assert got.shape == want.shape
    assert torch.equal(got.isnan(), want.isnan()), (got, want)
    assert torch.allclose(got, want, rtol=tol, atol=tol, equal_nan=True), (got, want)


def grad_out(out, go):
    return torch.ones_like(out) if go is None else torch.as_tensor(go).to(out.dtype)


def check_ce(z, y, go=None, tol=2e-4, fn=xt.cross_entropy, **kw):
    zt = z.detach().clone().requires_grad_(True)
    out = fn(zt, y, backend="triton", **kw)
    g = grad_out(out, go)
    out.backward(g)
    rk = {k: v for k, v in kw.items() if k not in ("inplace_backward", "loss_dtype")}
    zr = z.detach().double().requires_grad_(True)
    r = ref(zr, y, **rk)
    r.backward(g.double())
    close(out, r, tol)
    close(zt.grad, zr.grad, tol)
    return out, zt.grad


def _y(*v):
    return torch.tensor(v)


torch.manual_seed(93)
Z37 = torch.randn(3, 7)
ZNF = Z37.clone()
ZNF[0, 1], ZNF[1, 4], ZNF[2] = math.nan, math.inf, -math.inf  # NaN, +inf, all -inf rows

CE_CASES = {
    # (logits, target, grad_output, options)
    "none_per_row_go_w_ls_zl_cap": (Z37 * 4, _y(1, -100, 2), [2.0, 3.0, -1.0],
                                    dict(reduction="none", weight=torch.tensor(W7),
                                         label_smoothing=0.2, z_loss=1e-2, softcap=5.0)),
    "mean_neg_go_w_zero_target_weight": (Z37, _y(1, 5, 1), -2.5,
                                         dict(weight=torch.tensor(W7))),
    # only a zero-weight row counts: torch's "mean" is NaN (0/0), loss and gradient
    "ignore_index_is_a_class_w_ls": (Z37, _y(1, 5, 5), 3.0,
                                     dict(ignore_index=5, weight=torch.tensor(W7),
                                          label_smoothing=0.1)),
    "ignore_index_2pow40_weighted": (Z37, _y(1, 5, 2), None,
                                     dict(ignore_index=2**40, weight=torch.rand(7))),
    "all_ignored_sum_zl": (Z37, _y(-100, -100, -100), -1.0,
                           dict(reduction="sum", z_loss=1.0)),
    "all_ignored_mean_nan": (Z37, _y(-100, -100, -100), None, {}),
    "nonfinite_rows_ignored_none": (ZNF, _y(-100, -100, -100), [1.0, 2.0, 3.0],
                                    dict(reduction="none")),
    "nonfinite_rows_counted_ls": (ZNF, _y(1, 2, 3), None, dict(label_smoothing=0.1)),
    "nonfinite_rows_cap_zl_none": (ZNF, _y(0, -100, 3), [1.0, -1.0, 2.0],
                                   dict(reduction="none", softcap=2.0, z_loss=1e-2)),
    "cap_tiny_zl": (Z37, _y(1, 5, 2), None, dict(softcap=1e-3, z_loss=1e-2)),
    "cap_huge_ls": (Z37, _y(1, 5, 2), None, dict(softcap=1e30, label_smoothing=0.1)),
    "num_items_tensor_int_w": (Z37, _y(1, -100, 2), 2.0,
                               dict(num_items=torch.tensor(5), weight=torch.tensor(W7))),
    "num_items_int_zl": (Z37, _y(1, -100, 2), None, dict(num_items=4, z_loss=1e-2)),
    "colslice_ls_w": (torch.randn(3, 10)[:, 2:9], _y(0, 6, 3), None,
                      dict(label_smoothing=0.3, weight=torch.tensor(W7))),
    "transposed_none": (torch.randn(7, 3).t(), _y(0, 6, -100), [1.0, -2.0, 4.0],
                        dict(reduction="none", softcap=1.5)),
    "rows0_none": (torch.randn(0, 5), torch.zeros(0, dtype=torch.long), torch.zeros(0),
                   dict(reduction="none")),
    "rows1_V1_ls": (torch.randn(1, 1), _y(0), None, dict(label_smoothing=0.5)),
    "V127": (torch.randn(2, 127), _y(126, 0), None, dict(label_smoothing=0.1, z_loss=1e-3)),
    "V129": (torch.randn(2, 129), _y(128, 64), -1.0, dict(softcap=3.0)),
    "V1025": (torch.randn(1, 1025), _y(1024), None, dict(label_smoothing=0.1)),
    "uint8_target": (Z37, _y(1, 5, 2).to(torch.uint8), None, {}),
    "f64_everything_none": (Z37.double(), _y(1, -100, 2), [1.0, 2.0, -3.0],
                            dict(reduction="none", softcap=2.0, z_loss=1e-2,
                                 label_smoothing=0.3,
                                 weight=torch.tensor(W7, dtype=F64))),
    "3d_input_none": (torch.randn(2, 5, 3), torch.tensor([[1, 2, -100], [4, 0, 0]]),
                      torch.tensor([[1.0, -2.0, 3.0], [0.5, 0.0, 2.0]]),
                      dict(reduction="none", label_smoothing=0.1)),
}


@pytest.mark.parametrize("case", sorted(CE_CASES))
def test_cross_entropy_combinations(case):
    z, y, go, kw = CE_CASES[case]
    check_ce(z, y, go, tol=1e-9 if z.dtype == F64 else 2e-4, **kw)


def test_probability_target_zero_at_minus_inf_with_cap_and_zloss():
    z = torch.randn(3, 6) * 4
    z[0, 2] = -math.inf
    t = torch.softmax(torch.randn(3, 6), -1)
    t[0, 2] = 0.0
    t[0] /= t[0].sum()
    zt = z.clone().requires_grad_(True)
    out = xt.cross_entropy(zt, t, backend="triton", reduction="none", z_loss=1e-2)
    out.backward(torch.tensor([1.0, -2.0, 0.5]))
    zr = z.double().clone()
    zr[0, 2] = -1e300  # torch's 0 x -inf is NaN; crossent documents the term as exactly 0
    zr.requires_grad_(True)
    r = ref(zr, t, reduction="none", z_loss=1e-2)
    r.backward(torch.tensor([1.0, -2.0, 0.5], dtype=F64))
    close(out, r, 2e-4)
    close(zt.grad, zr.grad, 2e-4)
    # softcap maps -inf to -c: finite, ordinary
    check_ce(z, t, -3.0, softcap=2.0, z_loss=1e-2, reduction="sum",
             label_smoothing=0.1, weight=torch.tensor([1.0, 0.0, 2.0, -1.0, 1.0, 0.5]))


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float16, 3e-3)])
def test_low_precision_none_per_row_go(dtype, tol):
    z = (torch.randn(3, 9) * 3).to(dtype)
    check_ce(z, _y(1, 8, -100), [1.0, -2.0, 3.0], tol=tol, reduction="none",
             label_smoothing=0.1, z_loss=1e-3)


def test_float16_overflowing_logits_loss_dtype():
    z = torch.tensor([[6e4, 6.5e4, -6e4, 0.0], [6.5e4] * 4], dtype=torch.float16)
    check_ce(z, _y(0, 3), None, tol=2e-3, label_smoothing=0.1)
    # the z-loss of these rows (~4e5) is past float16's range: float32 via loss_dtype
    out, _ = check_ce(z, _y(0, 3), None, tol=2e-3, z_loss=1e-4, loss_dtype=torch.float32)
    assert out.dtype == torch.float32 and torch.isfinite(out)


def test_inplace_backward_on_activation_neg_go():
    z = torch.randn(3, 6)
    a = z.clone().requires_grad_(True)
    out = xt.cross_entropy(a * 2, _y(1, -100, 3), backend="triton", inplace_backward=True,
                           label_smoothing=0.1, softcap=4.0)
    out.backward(torch.tensor(-3.0))
    ar = z.double().requires_grad_(True)
    r = ref(ar * 2, _y(1, -100, 3), label_smoothing=0.1, softcap=4.0)
    r.backward(torch.tensor(-3.0, dtype=F64))
    close(out, r, 2e-4)
    close(a.grad, ar.grad, 2e-4)


def test_statistics_refused_by_triton_backend():
    with pytest.raises(Exception, match="statistics"):
        xt.cross_entropy(Z37, _y(1, 2, 3), backend="triton", statistics="lse")


# ------------------------------------------------------------------------- linear heads

X45 = torch.randn(4, 5)
WL = torch.randn(11, 5)
BL = torch.randn(11)
YL = _y(1, -100, 10, 3)


def check_linear(fn, x, w, y, b, go, dtype=torch.float32, tol=2e-4, bias_kw="linear_bias",
                 **kw):
    xs = [t.detach().to(dtype).clone().requires_grad_(True) for t in (x, w, b)
          if t is not None]
    extra = {bias_kw: xs[2]} if b is not None else {}
    out = fn(xs[0], xs[1], y, **extra, **kw)
    g = grad_out(out, go)
    out.backward(g)
    rs = [t.detach().double().requires_grad_(True) for t in xs]
    rk = {k: v for k, v in kw.items() if k not in ("backend", "chunk_size")}
    if rk.get("ignore_index", -100) is None:
        rk.pop("ignore_index")
    r = ref(F.linear(*rs), y, **rk)
    r.backward(g.double())
    close(out, r, tol)
    for a, c in zip(xs, rs, strict=True):
        close(a.grad, c.grad, tol)


LIN_CASES = {
    "none_go_w_ls_zl_cap": (X45, WL, YL, BL, [1.0, 5.0, -2.0, 0.5],
                            dict(reduction="none", weight=torch.tensor(W11),
                                 label_smoothing=0.1, z_loss=1e-2, softcap=3.0)),
    "sum_neg_go_chunk1": (X45, WL, YL, BL, -2.0, dict(reduction="sum", chunk_size=1,
                                                      label_smoothing=0.2)),
    "num_items_tensor": (X45, WL, YL, BL, None, dict(num_items=torch.tensor(7))),
    "ignore_index_is_class": (X45, WL, _y(1, 3, 10, 3), BL, None, dict(ignore_index=3)),
    "all_ignored_sum": (X45, WL, _y(-100, -100, -100, -100), BL, 2.0,
                        dict(reduction="sum")),
    "V1": (X45, torch.randn(1, 5), _y(0, 0, -100, 0), torch.randn(1), None,
           dict(label_smoothing=0.1)),
    "rows0_sum": (torch.randn(0, 5), WL, torch.zeros(0, dtype=torch.long), BL, None,
                  dict(reduction="sum")),
    "prob_targets_cap": (X45, WL, torch.softmax(torch.randn(4, 11), -1), BL, -1.0,
                         dict(softcap=2.0)),
    "noncontig_x_and_W": (torch.randn(5, 4).t(), torch.randn(5, 11).t(), YL, BL, None,
                          dict(z_loss=1e-2)),
}


@pytest.mark.parametrize("case", sorted(LIN_CASES))
def test_linear_cross_entropy_combinations(case):
    x, w, y, b, go, kw = LIN_CASES[case]
    if not y.is_floating_point():
        kw = {"ignore_index": -100, **kw}
    check_linear(xt.linear_cross_entropy, x, w, y, b, go, backend="triton", **kw)


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 3e-2), (torch.float16, 1e-2),
                                       (F64, 1e-9)])
def test_linear_dtypes_none(dtype, tol):
    check_linear(xt.linear_cross_entropy, X45, WL, YL, BL, [1.0, 5.0, -2.0, 0.5],
                 dtype=dtype, tol=tol, backend="triton", reduction="none",
                 ignore_index=-100, label_smoothing=0.1, z_loss=1e-3, softcap=2.0)


@pytest.mark.parametrize("reduction,go", [("mean", -1.5), ("sum", 2.0),
                                          ("none", [1.0, 5.0, -2.0, 0.5])])
def test_fused_linear_weights_zloss(reduction, go):
    check_linear(fused_linear_cross_entropy, X45, WL, YL, BL, go,
                 weight=torch.tensor(W11), reduction=reduction, ignore_index=-100,
                 z_loss=1e-2)


# ----------------------------------------------------------------- vocab parallel, world 1

VP_CASES = {
    "none_go_w_ls_zl_cap": (Z37 * 4, _y(1, -100, 6), [2.0, 3.0, -1.0],
                            dict(reduction="none", weight=torch.tensor(W7),
                                 label_smoothing=0.1, z_loss=1e-2, softcap=2.0)),
    "sum_neg_go": (Z37, _y(1, -100, 6), -2.0, dict(reduction="sum")),
    "ignore_index_is_class": (Z37, _y(1, 2, 2), None, dict(ignore_index=2)),
    "nonfinite_rows_ignored": (ZNF, _y(-100, 2, -100), [1.0, 2.0, 3.0],
                               dict(reduction="none")),
    "V129_ls": (torch.randn(2, 129), _y(128, 0), None, dict(label_smoothing=0.1)),
    "transposed_cap_tiny": (torch.randn(7, 3).t(), _y(1, -100, 6), None,
                            dict(softcap=1e-3)),
    "fp16_big": (torch.tensor([[6e4, 6.5e4, -6e4, 0.0]], dtype=torch.float16), _y(0),
                 None, {}),
}


@pytest.mark.parametrize("case", sorted(VP_CASES))
def test_vocab_parallel_world1(case):
    z, y, go, kw = VP_CASES[case]
    check_ce(z, y, go, tol=2e-3 if z.dtype == torch.float16 else 2e-4,
             fn=xd.vocab_parallel_cross_entropy, **kw)


def test_vocab_parallel_linear_world1_none():
    check_linear(xd.vocab_parallel_linear_cross_entropy, X45, WL, YL, BL,
                 [1.0, 5.0, -2.0, 0.5], bias_kw="local_bias", backend="triton",
                 reduction="none", label_smoothing=0.1, z_loss=1e-2, softcap=3.0)
