"""Adversarial tests of the Triton kernels' ``inplace_backward=True`` under
``_rules.may_overwrite`` (a leaf, or a view of one, stays intact and gets a fresh,
adopted ``.grad``; a non-leaf activation is overwritten by its gradient;
``test_triton_inplace_adoption.py`` pins the rule itself), and an audit of the Triton
autograd Functions (the linear heads, the fused linear head, the vocab-parallel kernels)
for a returned gradient that autograd silently copies, or an input kept alive after
backward. The row-block counterpart is ``tests/torch/test_inplace_adoption_adversarial.py``
(its docstring has the probe); tiny shapes, the interpreter is slow on CPU. Reference:
torch's ``F.cross_entropy`` on a float64 copy."""

from __future__ import annotations

import weakref

import pytest
import torch
import torch.nn.functional as F
from grad_probes import Identity as _Identity
from grad_probes import assert_own_grad as _own_grad
from grad_probes import returned_grad_ptrs as _returned_ptrs
from grad_probes import torch_grad as _torch_grad

import crossent
import crossent.torch as xt
from crossent.torch._triton import triton_cross_entropy, triton_linear_cross_entropy

pytestmark = pytest.mark.timeout(120)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: interpreter
N, C = 9, 130  # 130 classes with block=64: ragged tiles


def _data(seed: int, dtype=torch.float32, shape=(N, C)):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(*shape, generator=g) * 2).to(dtype).to(DEVICE)
    y = torch.randint(0, shape[1], (shape[0], *shape[2:]), generator=g)
    y.view(-1)[::4] = -100
    return z, y.to(DEVICE)


def _close(got, want, dtype=torch.float32):
    tol = dict(rtol=2e-2, atol=2e-3) if dtype == torch.bfloat16 else dict(rtol=1e-5,
                                                                         atol=1e-6)
    torch.testing.assert_close(got.double(), want, **tol)


def _loss(a, y, entry, **kw):
    if entry == "kernel":
        return triton_cross_entropy(a, y, inplace_backward=True, block=64, **kw)
    return xt.cross_entropy(a, y, inplace_backward=True, backend="triton", **kw)


@pytest.mark.parametrize("entry, disguise", [("kernel", "n_c_1"), ("backend", "n_c_1"),
                                             ("kernel", "identity_function")])
def test_a_leafs_memory_in_disguise_stays_intact(entry, disguise):
    """``(N, C, 1)`` logits, whose flattening is a view of the leaf (not a copy), and a
    custom Function returning its input: the leaf's memory, never written."""
    z, y = _data(17)
    if disguise == "n_c_1":
        z, y = z.unsqueeze(2), y.unsqueeze(1)
    a = z.clone().requires_grad_()
    _loss(a if disguise == "n_c_1" else _Identity.apply(a), y, entry).backward()
    _own_grad(a, z)
    _close(a.grad, _torch_grad(z, y))


def test_non_saving_ops_on_the_leaf_add_torchs_gradient():
    z, y = _data(1)
    a = z.clone().requires_grad_()
    first = (a * 0.1).exp().sum() + 2 * a[0].sum()  # exp saves its output; select nothing
    (first + _loss(a, y, "kernel")).backward()
    ref = z.double().requires_grad_()
    ((ref * 0.1).exp().sum() + 2 * ref[0].sum() + F.cross_entropy(ref, y)).backward()
    _own_grad(a, z)
    _close(a.grad, ref.grad)


@pytest.mark.parametrize("entry", ["kernel", "backend"])
def test_an_op_that_saved_the_leaf_gets_the_intact_leaf(entry):
    """sin saves the leaf; the leaf is never overwritten: no error, torch's gradient.
    (Aliasing back: autograd's version error.)"""
    z, y = _data(2)
    a = z.clone().requires_grad_()
    (a.sin().sum() + _loss(a, y, entry)).backward()
    ref = z.double().requires_grad_()
    (ref.sin().sum() + F.cross_entropy(ref, y)).backward()
    _own_grad(a, z)
    _close(a.grad, ref.grad)


@pytest.mark.parametrize("entry, op", [("kernel", "sin"), ("backend", "exp_as_logits")])
def test_an_op_that_saved_the_overwritten_activation_raises(entry, op):
    """The activation now holds the gradient: an op that saved it (sin of it; ``exp``
    that produced it, saving its output) must raise autograd's version error."""
    z, y = _data(3)
    h = z.clone().requires_grad_()
    if op == "sin":
        logits = h * 1.0
        loss = logits.sin().sum() + _loss(logits, y, entry)
    else:
        loss = _loss((h * 0.1).exp(), y, entry)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("entry", ["kernel", "backend"])
def test_bad_class_index_raises_before_writing_the_activation(entry):
    """In place the targets are read before the launch: torch's IndexError, and the
    activation that would have been overwritten is intact."""
    z, y = _data(18)
    y[3] = C
    logits = z.clone().requires_grad_() * 1.0
    with pytest.raises(IndexError, match=f"class index {C}"):
        _loss(logits, y, entry)
    assert torch.equal(logits.detach(), z)


def test_retain_graph_second_backward_raises_and_keeps_the_first_grad():
    z, y = _data(4)
    a = z.clone().requires_grad_()
    loss = _loss(a, y, "kernel")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()
    _close(a.grad, _torch_grad(z, y))
    _own_grad(a, z)


@pytest.mark.parametrize("entry", ["kernel", "backend"])
def test_double_backward_on_a_leaf_is_torchs_hessian_vector_product(entry):
    """The leaf is intact, so create_graph=True recomputes from it: the gradient and the
    Hessian-vector product are torch's (double backward in float64)."""
    z, y = _data(5)
    v = torch.randn(N, C, generator=torch.Generator().manual_seed(6),
                    dtype=torch.float64).to(DEVICE)
    a = z.clone().requires_grad_()
    (g,) = torch.autograd.grad(_loss(a, y, entry), a, create_graph=True)
    (hv,) = torch.autograd.grad((g * v.float()).sum(), a)
    ref = z.double().requires_grad_()
    (rg,) = torch.autograd.grad(F.cross_entropy(ref, y), ref, create_graph=True)
    (rhv,) = torch.autograd.grad((rg * v).sum(), ref)
    assert torch.equal(a.detach(), z)
    _close(g, rg)
    _close(hv, rhv)
    assert float(rhv.abs().max()) > 1e-3  # (not a vanishing product)


@pytest.mark.parametrize("entry", ["kernel", "backend"])
def test_double_backward_through_an_overwritten_activation_raises_unsupported(entry):
    z, y = _data(7)
    h = z.clone().requires_grad_()
    with pytest.raises(crossent.UnsupportedError, match="inplace_backward"):
        torch.autograd.grad(_loss(h * 1.0, y, entry), h, create_graph=True)


def test_autograd_grad_returns_a_separate_torch_gradient():
    z, y = _data(8)
    a = z.clone().requires_grad_()
    go = torch.linspace(-1, 2, N, device=DEVICE)
    (g,) = torch.autograd.grad(_loss(a, y, "kernel", reduction="none"), a, go)
    assert g is not a and not g.requires_grad and a.grad is None
    assert g.untyped_storage().data_ptr() != a.untyped_storage().data_ptr()
    assert torch.equal(a.detach(), z)
    _close(g, _torch_grad(z, y, "none", go))


def test_transforms_raise_loudly():
    """torch.func on the Triton path: crossent's error on the entry point, torch's own
    (no setup_context) on the kernel function; never a silent number."""
    z, y = _data(9)
    with pytest.raises(crossent.UnsupportedError, match="transforms"):
        torch.func.grad(lambda t: _loss(t, y, "backend"))(z.clone())
    with pytest.raises(RuntimeError, match="setup_context"):
        torch.func.grad(lambda t: _loss(t, y, "kernel"))(z.clone())


def test_k_dimensional_and_non_contiguous_leaves_get_torchs_gradient():
    """The kernel works on (and may overwrite) its own copy; the leaves stay intact."""
    z, y = _data(10, shape=(N, C, 2))
    a = z.clone().requires_grad_()
    _loss(a, y, "kernel").backward()
    _own_grad(a, z)
    _close(a.grad, _torch_grad(z, y))
    assert a.grad.stride() == a.stride()
    zt = _data(11, shape=(C, N))[0]
    b = zt.clone().t().requires_grad_()  # strides (1, N)
    _loss(b, y[:, 0], "kernel").backward()
    _own_grad(b, zt.t())
    _close(b.grad, _torch_grad(zt.t(), y[:, 0]))
    assert b.grad.stride() == b.stride()


@pytest.mark.xfail(strict=True, reason="(N, C, d1) logits: _unflatten returns a permuted "
                   "view of the (M, C) gradient, which AccumulateGrad copies into the leaf's "
                   "layout (an extra N*C*d1 allocation and pass)")
def test_k_dimensional_leaf_gradient_is_adopted():
    z, y = _data(12, shape=(3, C, 2))
    a = z.clone().requires_grad_()
    loss = triton_cross_entropy(a, y, block=64)
    seen = _returned_ptrs(loss)
    loss.backward()
    assert seen[0][0] == a.grad.data_ptr()


def test_row_slices_of_one_leaf_stay_intact():
    z, y = _data(13, shape=(2 * N, C))
    big = z.clone().requires_grad_()
    (_loss(big[:N], y[:N], "kernel") + _loss(big[N:], y[N:], "backend")).backward()
    ref = z.double().requires_grad_()
    (F.cross_entropy(ref[:N], y[:N]) + F.cross_entropy(ref[N:], y[N:])).backward()
    _own_grad(big, z)
    _close(big.grad, ref.grad)


@pytest.mark.parametrize("between", ["accumulate", "zero_"])
def test_refilled_leaf_gets_torchs_gradient(between):
    """A leaf buffer refilled for each micro-batch: with ``.grad`` aliasing it the refill
    overwrote the accumulated gradient and the next backward added the new one to itself
    (2 G2)."""
    (z1, y1), (z2, y2) = _data(14), _data(15)
    buf = torch.empty(N, C, device=DEVICE, requires_grad=True)
    for z, y in ((z1, y1), (z2, y2)):
        if buf.grad is not None and between == "zero_":
            buf.grad.zero_()
        with torch.no_grad():
            buf.copy_(z)
        _loss(buf, y, "kernel").backward()
        _own_grad(buf, z)
    want = _torch_grad(z2, y2)
    _close(buf.grad, want + _torch_grad(z1, y1) if between == "accumulate" else want)


def test_parameter_sgd_step_and_zero_grad_in_place_are_torchs():
    """A Parameter fed to the loss: the step leaves ``.grad`` alone and
    ``zero_grad(set_to_none=False)`` leaves the parameter alone (with ``.grad`` aliasing
    it, neither held)."""
    z, y = _data(16)
    p = torch.nn.Parameter(z.clone())
    opt = torch.optim.SGD([p], lr=0.5, weight_decay=0.1)
    _loss(p, y, "backend").backward()
    want = _torch_grad(z, y)
    opt.step()
    _close(p.grad, want)
    opt.zero_grad(set_to_none=False)
    assert not p.grad.any()
    _close(p.detach(), z.double() * (1 - 0.5 * 0.1) - 0.5 * want)


# ---------------------------------------------------------------- the other Functions


def _head(seed: int, n=12, d=16, c=100):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g).to(DEVICE)
    w = (torch.randn(c, d, generator=g) * 0.3).to(DEVICE)
    b = torch.randn(c, generator=g).to(DEVICE)
    y = torch.randint(0, c, (n,), generator=g)
    y[::5] = -100
    return x, w, b, y.to(DEVICE)


@pytest.mark.parametrize("head", ["triton_linear", "fused_linear", "backend"])
def test_linear_head_gradients_are_adopted_not_copied(head):
    """dx, dW, db go to autograd unreferenced (no N x D / V x D copy by AccumulateGrad)."""
    from crossent.torch._triton.fused_linear import fused_linear_cross_entropy

    x0, w0, b0, y = _head(20)
    x, w, b = (t.clone().requires_grad_() for t in (x0, w0, b0))
    if head == "triton_linear":
        loss = triton_linear_cross_entropy(x, w, y, b, chunk_size=5, block=64)
    elif head == "fused_linear":
        loss = fused_linear_cross_entropy(x, w, y, b)
    else:
        loss = xt.linear_cross_entropy(x, w, y, b, backend="triton", ignore_index=-100)
    seen = _returned_ptrs(loss)
    loss.backward()
    assert seen[0][:3] == [x.grad.data_ptr(), w.grad.data_ptr(), b.grad.data_ptr()]
    refs = [t.double().requires_grad_() for t in (x0, w0, b0)]
    F.cross_entropy(F.linear(*refs), y).backward()
    for got, ref in zip((x.grad, w.grad, b.grad), refs, strict=True):
        torch.testing.assert_close(got.double(), ref.grad, rtol=1e-4, atol=1e-5)


def test_vocab_parallel_triton_gradients_are_adopted():
    from crossent.torch.distributed import (
        vocab_parallel_cross_entropy,
        vocab_parallel_linear_cross_entropy,
    )

    z, y = _data(21)
    a = z.clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(a, y, backend="triton")
    seen = _returned_ptrs(loss)
    loss.backward()
    assert seen[0][0] == a.grad.data_ptr()
    _close(a.grad, _torch_grad(z, y))
    x0, w0, b0, yh = _head(22)
    x, w, b = (t.clone().requires_grad_() for t in (x0, w0, b0))
    loss = vocab_parallel_linear_cross_entropy(x, w, yh, local_bias=b, chunk_size=5,
                                               backend="triton")
    seen = _returned_ptrs(loss)
    loss.backward()
    assert seen[0][:3] == [x.grad.data_ptr(), w.grad.data_ptr(), b.grad.data_ptr()]


# kept as plain ctx attributes the N x C logits (the head's N x D input) lived as long
# as the loss; saved with ctx.save_for_backward, backward frees them
@pytest.mark.parametrize("function", ["cross_entropy", "linear_head"])
def test_out_of_place_kernels_free_their_input_after_backward(function):
    z, y = _data(23)
    src = z.clone().requires_grad_()
    w = torch.randn(50, C, device=DEVICE, requires_grad=True)
    h = src * 1.0
    ref = weakref.ref(h)
    if function == "cross_entropy":
        loss = triton_cross_entropy(h, y, block=64)
    else:
        loss = triton_linear_cross_entropy(h, w, y.clamp(-100, 49), chunk_size=4, block=64)
    loss.backward()
    del h
    assert ref() is None
