"""The fused kernels' saved inputs are freed by backward, as torch frees its own saved
tensors: the loss tensor of one step often lives on into the next step's forward
(``loss = crit(model(x), y)`` in a loop), and inputs kept on ``ctx`` as plain attributes
lived with it (``N x C`` logits, 2 GB at 8192 x 128256 bf16, on top of the next step's).
With ``retain_graph=True`` they are kept and a second, recomputing backward
(``create_graph=True``) still gets torch's numbers. The Triton kernels' counterpart is
``tests/triton/test_triton_saved_inputs_freed.py``."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torch.nn.functional as F

import crossent.torch as xt

# (rows, classes, backend): the small-batch kernel ("auto" in its range), the row-block one
ROUTES = [(300, 1000, "auto"), (600, 1000, "rowblock")]


def _activation(rows: int, cols: int, seed: int):
    """A leaf and a non-leaf activation made from it (the graph holds no reference to the
    activation itself: ``h * 1.0`` saves only the scalar)."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, cols, generator=g).requires_grad_()
    return h, h * 1.0


@pytest.mark.parametrize("rows,cols,backend", ROUTES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cross_entropy_frees_its_logits_in_backward(rows, cols, backend, reduction):
    _h, z = _activation(rows, cols, 0)
    y = torch.randint(0, cols, (rows,))
    ref = weakref.ref(z)
    loss = xt.cross_entropy(z, y, reduction=reduction, backend=backend)
    del z
    gc.collect()
    assert ref() is not None  # saved for backward until then (this test's own check)
    loss.backward(torch.ones_like(loss))
    gc.collect()
    assert ref() is None, "the logits outlived backward (the loss tensor is still alive)"
    assert loss.grad_fn is not None


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_head_frees_its_input_in_backward(reduction):
    g = torch.Generator().manual_seed(1)
    hx = torch.randn(4096, 64, generator=g).requires_grad_()
    w = (torch.randn(2000, 64, generator=g) / 8).requires_grad_()
    y = torch.randint(0, 2000, (4096,), generator=g)
    x = hx * 1.0
    ref = weakref.ref(x)
    loss = xt.linear_cross_entropy(x, w, y, reduction=reduction)
    assert "LinearCrossEntropy" in type(loss.grad_fn).__name__  # the chunked head ran
    del x
    loss.backward(torch.ones_like(loss))
    gc.collect()
    assert ref() is None


def test_probability_targets_and_weight_gradient_read_the_saved_inputs():
    """The row-block route's target and weight gradients come from the saved inputs:
    torch's numbers, and the inputs freed afterwards."""
    g = torch.Generator().manual_seed(2)
    h, z = _activation(600, 1000, 2)
    t = torch.softmax(torch.randn(600, 1000, generator=g), 1).requires_grad_()
    w = (torch.rand(1000, generator=g) + 0.5).requires_grad_()
    ref = weakref.ref(z)
    loss = xt.cross_entropy(z, t, weight=w, backend="rowblock")
    del z
    loss.backward()
    gc.collect()
    assert ref() is None
    hh, tt, ww = (v.detach().double().requires_grad_() for v in (h, t, w))
    F.cross_entropy(hh * 1.0, tt, weight=ww).backward()
    for got, want in ((h.grad, hh.grad), (t.grad, tt.grad), (w.grad, ww.grad)):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("rows,cols,backend", ROUTES)
def test_retained_graph_keeps_them_for_a_recomputing_second_backward(rows, cols, backend):
    h, z = _activation(rows, cols, 3)
    y = torch.randint(0, cols, (rows,))
    loss = xt.cross_entropy(z, y, backend=backend)
    loss.backward(retain_graph=True)
    (gz,) = torch.autograd.grad(loss, z, create_graph=True)
    hh = h.detach().double().requires_grad_()
    zz = hh * 1.0
    (want,) = torch.autograd.grad(F.cross_entropy(zz, y), zz, create_graph=True)
    torch.testing.assert_close(gz.double(), want, rtol=1e-5, atol=1e-8)
    assert gz.requires_grad  # a graph to differentiate again


def test_second_backward_without_retain_graph_raises():
    """torch raises for a second backward through freed saved tensors; the row-block
    kernel raises its own error first (its stored gradient was consumed)."""
    _h, z = _activation(600, 1000, 4)
    loss = xt.cross_entropy(z, torch.randint(0, 1000, (600,)), backend="rowblock")
    loss.backward()
    with pytest.raises(RuntimeError, match="backward"):
        loss.backward()


def test_in_place_change_before_a_recomputing_backward_names_crossent():
    h, z = _activation(600, 1000, 5)
    loss = xt.cross_entropy(z, torch.randint(0, 1000, (600,)), backend="rowblock")
    with torch.no_grad():
        z.add_(1.0)
    with pytest.raises(RuntimeError, match=r"crossent\.torch\.cross_entropy: an input was "
                                           "modified in place"):
        torch.autograd.grad(loss, h, create_graph=True)
