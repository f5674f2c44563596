"""The Triton kernels' saved inputs are freed by backward (torch frees its own saved
tensors), so a loss tensor that lives on does not keep the logits or the linear head's
input alive; with ``retain_graph=True`` a recomputing second backward still works. The
row-block kernels' counterpart is ``tests/torch/test_saved_inputs_freed.py``."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torch.nn.functional as F

import crossent.torch as xt

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: interpreter


def _activation(rows, cols, seed):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, cols, generator=g).to(DEVICE).requires_grad_()
    return h, h * 1.0


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cross_entropy_frees_its_logits_in_backward(reduction):
    _h, z = _activation(7, 50, 0)
    y = torch.randint(0, 50, (7,)).to(DEVICE)
    ref = weakref.ref(z)
    loss = xt.cross_entropy(z, y, reduction=reduction, backend="triton")
    del z
    gc.collect()
    assert ref() is not None
    loss.backward(torch.ones_like(loss))
    gc.collect()
    assert ref() is None


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_head_frees_its_input_in_backward(reduction):
    g = torch.Generator().manual_seed(1)
    hx = torch.randn(6, 8, generator=g).to(DEVICE).requires_grad_()
    w = torch.randn(30, 8, generator=g).to(DEVICE).requires_grad_()
    y = torch.randint(0, 30, (6,), generator=g).to(DEVICE)
    x = hx * 1.0
    ref = weakref.ref(x)
    loss = xt.linear_cross_entropy(x, w, y, reduction=reduction, backend="triton")
    del x
    loss.backward(torch.ones_like(loss))
    gc.collect()
    assert ref() is None


def test_retained_graph_keeps_them_for_a_recomputing_second_backward():
    h, z = _activation(7, 50, 2)
    y = torch.randint(0, 50, (7,)).to(DEVICE)
    loss = xt.cross_entropy(z, y, backend="triton")
    loss.backward(retain_graph=True)
    (gz,) = torch.autograd.grad(loss, z, create_graph=True)
    zz = h.detach().double().requires_grad_()
    (want,) = torch.autograd.grad(F.cross_entropy(zz, y), zz, create_graph=True)
    torch.testing.assert_close(gz.double(), want, rtol=1e-5, atol=1e-7)
    assert gz.requires_grad
