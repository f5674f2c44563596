"""Review H102 (Triton side, triton's CPU interpreter set up by this folder's conftest):
fa99c6c's ``_rules.split_scale`` on the Triton kernel (``cross_entropy(backend="triton")``)
and the Triton linear head with float16 chunks (as on GPUs; here ``matmul_dtype`` patched,
as tests/triton/test_float16_loss_scale.py does). References: torch's float32 gradient
rounded once to float16, or float64. "before": the split of stops 31-37 (stored 1)."""

from __future__ import annotations

import functools
import math
import pathlib
import sys

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

import torch.nn.functional as F  # noqa: E402
from test_float16_loss_scale import _float16_chunks  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "torch"))
from test_session28_float16_scale_review import (  # noqa: E402
    _assert_torchs,
    _big_weight_case,
    _crossent_grad,
    _float16_batch,
    _old_split,
    _torch_grad,
)

import crossent.torch as xt  # noqa: E402

if torch.cuda.is_available():  # the interpreter's tests
    pytest.skip("CPU interpreter tests", allow_module_level=True)


def _patch_old_split(m):
    from crossent.torch import _rules
    from crossent.torch._triton import autograd as ta
    from crossent.torch._triton import ops

    for module in (_rules, ta, ops):
        m.setattr(module, "split_scale", _old_split)


_triton_grad = functools.partial(_crossent_grad, backend="triton")


@pytest.mark.fixed_bug("H102-1: Triton float16 mean, class weight 40000: stored (p-1) w "
                       "significand overflowed to -inf, torch's gradient is -1")
def test_triton_large_class_weight_is_finite_as_torchs(monkeypatch):
    z, y, w = _big_weight_case()
    want = _torch_grad(z, y, weight=w)
    with monkeypatch.context() as m:
        _patch_old_split(m)
        assert torch.isfinite(_triton_grad(z, y, weight=w)).all()  # before: finite
    got = _triton_grad(z, y, weight=w)
    assert torch.isfinite(got).all(), got[0]
    assert got[0, 1] == want[0, 1] == -1.0


@pytest.mark.fixed_bug("H102-1: float16-chunk linear heads (triton, rowblock), class weight "
                       "40000: dx inf, dW -inf/NaN where torch's are finite")
def test_float16_chunk_heads_large_class_weight(monkeypatch):
    _float16_chunks(monkeypatch)
    _, y, w = _big_weight_case()
    # row 0's target logit -8.8 from entries of magnitude <= 1.1, so that before fa99c6c the
    # stored (p - 1) w = -40000 times them stayed finite in float16 chunks
    x = torch.ones(4, 8, dtype=torch.float16)
    lw = torch.zeros(8, 8, dtype=torch.float16)
    lw[1] = -1.1
    x64, w64 = x.double().requires_grad_(), lw.double().requires_grad_()
    F.cross_entropy(x64 @ w64.T, y, weight=w.double()).backward()
    assert torch.isfinite(x64.grad).all() and torch.isfinite(w64.grad).all()

    def head(backend):
        xx, ww = x.clone().requires_grad_(), lw.clone().requires_grad_()
        xt.linear_cross_entropy(xx, ww, y, weight=w, backend=backend).backward()
        return xx.grad, ww.grad

    with monkeypatch.context() as m:
        _patch_old_split(m)
        for backend in ("triton", "rowblock"):  # before: finite
            assert all(torch.isfinite(g).all() for g in head(backend)), backend
    bad = [b for b in ("triton", "rowblock") if not all(torch.isfinite(g).all()
                                                       for g in head(b))]
    assert not bad, bad


@pytest.mark.parametrize("go", [1.0, 2.0 ** 16])
def test_triton_power_of_two_grad_output_is_torchs(go):
    z, y, w = _float16_batch(24, 40)
    for kw in ({}, {"weight": w, "label_smoothing": 0.1}):
        want = _torch_grad(z, y, go, **kw)
        got = _triton_grad(z, y, go, **kw)
        assert torch.equal(want.isfinite(), got.isfinite())
        _assert_torchs(got, want, go, kw)


def test_triton_nan_grad_output_and_every_row_ignored():
    gen = torch.Generator().manual_seed(5)
    z = (torch.randn(6, 16, generator=gen) * 3).half()
    y = torch.randint(0, 16, (6,), generator=gen)
    y[2] = -100
    got = _triton_grad(z, y, math.nan)
    want = _torch_grad(z, y, math.nan)
    assert torch.equal(got.isnan(), want.isnan()) and (got[2] == 0).all()
    y0 = torch.full((6,), -100)
    zz = z.clone().requires_grad_()
    loss = xt.cross_entropy(zz, y0, backend="triton")
    loss.backward()
    assert loss.isnan() and torch.equal(zz.grad.isnan(), _torch_grad(z, y0).isnan())
