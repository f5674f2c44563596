"""``num_items=``: the summed loss divided by a caller's count, so gradient-accumulation
micro-batches add up to the full batch's mean (where the mean of micro-batch means does
not). Every backend and autograd path (fused, torch's own kernel, composable path,
double backward, target/weight gradients) against torch in float64:
``F.cross_entropy(..., reduction="sum") / num_items``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fused_testing import close

import crossent.torch as xt
from crossent.errors import InputError, UnsupportedError

N, C, D = 24, 11, 5
BACKENDS = ["auto", "native", "rowblock"]  # "triton": tests/triton/test_backend_seam.py


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(N, C, generator=g, dtype=torch.float64) * 2
    y = torch.randint(0, C, (N,), generator=g)
    y[[0, 1, 2, 3, 4, 9, 20]] = -100  # micro-batches of 6 hold 5, 1, 0 and 1 ignored rows
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    w = torch.randn(C, D, generator=g, dtype=torch.float64)
    b = torch.randn(C, generator=g, dtype=torch.float64)
    cw = torch.rand(C, generator=g, dtype=torch.float64) + 0.5
    t = torch.softmax(torch.randn(N, C, generator=g, dtype=torch.float64), 1)
    return z, y, x, w, b, cw, t


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weighted", [False, True])
def test_accumulated_micro_batches_equal_the_full_batch(backend, weighted):
    z, y, _, _, _, cw, _ = batch()
    cw = cw if weighted else None
    ref = z.clone().requires_grad_()
    want = F.cross_entropy(ref, y, cw, label_smoothing=0.1)  # torch's full-batch mean
    want.backward()
    counted = y != -100
    count = float(cw[y[counted]].sum()) if weighted else int(counted.sum())
    leaf = z.float().requires_grad_()
    wf = None if cw is None else cw.float()
    total, means = 0.0, []
    for part in range(4):
        rows = slice(6 * part, 6 * part + 6)
        loss = xt.cross_entropy(leaf[rows], y[rows], wf, label_smoothing=0.1,
                                num_items=count, backend=backend)
        loss.backward()  # accumulates into leaf.grad
        total += float(loss.detach())
        means.append(float(xt.cross_entropy(z[rows].float(), y[rows], wf,
                                            label_smoothing=0.1)))
    assert total == pytest.approx(float(want.detach()), rel=1e-5)
    close(leaf.grad, ref.grad)
    # the mean of micro-batch means is another number (5, 1, 0 and 1 rows ignored)
    assert abs(np.mean(means) - float(want.detach())) > 1e-2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunk_size", [None, 4])
def test_accumulated_linear_head_equals_the_full_batch(backend, chunk_size):
    _, y, x, w, b, _, _ = batch(1)
    refs = [t.clone().requires_grad_() for t in (x, w, b)]
    want = F.cross_entropy(F.linear(*refs), y, label_smoothing=0.2)
    want.backward()
    leaves = [t.float().requires_grad_() for t in (x, w, b)]
    count = torch.tensor(int((y != -100).sum()))  # a 0-d tensor, as the HF Trainer passes
    total = 0.0
    for part in range(3):
        rows = slice(8 * part, 8 * part + 8)
        loss = xt.linear_cross_entropy(leaves[0][rows], leaves[1], y[rows], leaves[2],
                                       label_smoothing=0.2, num_items=count,
                                       chunk_size=chunk_size, backend=backend)
        loss.backward()
        total += float(loss.detach())
    assert total == pytest.approx(float(want.detach()), rel=1e-5)
    for got, ref in zip(leaves, refs, strict=True):
        close(got.grad, ref.grad)


def reference(z, y, num_items, **kw):
    """torch's sum over num_items, float64."""
    return F.cross_entropy(z, y, reduction="sum", **kw) / num_items


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("kw", [{}, dict(label_smoothing=0.3), dict(prob=True)])
def test_value_and_gradient_are_the_sum_over_num_items(backend, reduction, kw):
    z, y, _, _, _, _, t = batch(2)
    target = t if kw.pop("prob", False) else y
    ref = z.clone().requires_grad_()
    want = reference(ref, target, 7.5, **kw)
    want.backward(torch.tensor(2.0, dtype=torch.float64))  # a grad_output other than 1
    leaf = z.clone().requires_grad_()
    got = xt.cross_entropy(leaf, target, reduction=reduction, num_items=7.5,
                           backend=backend, **kw)
    got.backward(torch.tensor(2.0, dtype=torch.float64))
    close(got, want)
    close(leaf.grad, ref.grad)


def test_every_ignored_micro_batch_gives_zero_not_nan():
    z, y, *_ = batch()
    y = torch.full_like(y, -100)
    for backend in BACKENDS:
        leaf = z.clone().requires_grad_()
        loss = xt.cross_entropy(leaf, y, num_items=10, backend=backend)
        loss.backward()
        assert float(loss.detach()) == 0.0 and torch.all(leaf.grad == 0)


@pytest.mark.parametrize("backend", ["auto", "native"])
def test_double_backward_divides_by_num_items(backend):
    z, y, x, w, b, cw, _ = batch(3)
    want = torch.autograd.functional.hessian(
        lambda z: reference(z, y, 9, weight=cw, label_smoothing=0.1), z)
    got = torch.autograd.functional.hessian(
        lambda z: xt.cross_entropy(z, y, cw, label_smoothing=0.1, num_items=9,
                                   backend=backend), z)
    assert float(want.abs().sum()) > 0.1
    close(got, want)

    def penalty(fn, x, w):  # gradient penalty through the linear head
        loss = fn(x, w)
        (gx,) = torch.autograd.grad(loss, x, create_graph=True)
        return gx.square().sum()

    xs = [x.clone().requires_grad_(), w.clone().requires_grad_()]
    penalty(lambda x, w: reference(F.linear(x, w, b), y, 9), *xs).backward()
    leaves = [x.clone().requires_grad_(), w.clone().requires_grad_()]
    penalty(lambda x, w: xt.linear_cross_entropy(x, w, y, b, num_items=9, chunk_size=5,
                                                 backend=backend), *leaves).backward()
    for got_t, ref_t in zip(leaves, xs, strict=True):
        close(got_t.grad, ref_t.grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_target_and_weight_gradients_divide_by_num_items(backend):
    z, _, x, w, _, cw, t = batch(4)
    refs = [z.clone().requires_grad_(), t.clone().requires_grad_(), cw.clone().requires_grad_()]
    reference(refs[0], refs[1], 6, weight=refs[2], label_smoothing=0.1).backward()
    leaves = [z.clone().requires_grad_(), t.clone().requires_grad_(),
              cw.clone().requires_grad_()]
    xt.cross_entropy(leaves[0], leaves[1], leaves[2], label_smoothing=0.1, num_items=6,
                     backend=backend).backward()
    for got, ref in zip(leaves, refs, strict=True):
        close(got.grad, ref.grad)
    # linear head: the composable path (whole logits)
    refs = [x.clone().requires_grad_(), t.clone().requires_grad_(),
            cw.clone().requires_grad_()]
    reference(F.linear(refs[0], w), refs[1], 6, weight=refs[2]).backward()
    leaves = [x.clone().requires_grad_(), t.clone().requires_grad_(),
              cw.clone().requires_grad_()]
    xt.linear_cross_entropy(leaves[0], w, leaves[1], weight=leaves[2], num_items=6,
                            backend=backend).backward()
    for got, ref in zip(leaves, refs, strict=True):
        close(got.grad, ref.grad)


def test_torch_func_transforms_divide_by_num_items():
    z, y, *_ = batch(5)
    want = torch.func.grad(lambda z: reference(z, y, 4))(z)
    close(torch.func.grad(lambda z: xt.cross_entropy(z, y, num_items=4))(z), want)
    batched = torch.stack([z, 2 * z])
    want = torch.func.vmap(lambda z: reference(z, y, 4))(batched)
    close(torch.func.vmap(lambda z: xt.cross_entropy(z, y, num_items=4))(batched), want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_gradient_is_formed_in_float32(dtype):
    z, y, *_ = batch(6)
    ref = z.to(dtype).double().requires_grad_()
    reference(ref, y, 1000).backward()  # tiny entries: 1/1000 of p - onehot
    leaf = z.to(dtype).requires_grad_()
    out = xt.cross_entropy(leaf, y, num_items=1000, backend="rowblock")
    out.backward()
    assert out.dtype == dtype and leaf.grad.dtype == dtype
    close(leaf.grad, ref.grad, rtol=1e-2)


def test_modules_take_num_items_in_forward():
    z, y, x, w, b, _, _ = batch(7)
    loss = xt.CrossEntropyLoss(label_smoothing=0.1)
    close(loss(z, y, num_items=3), reference(z, y, 3, label_smoothing=0.1))
    head = xt.LinearCrossEntropyLoss(D, C, bias=True, dtype=torch.float64)
    with torch.no_grad():
        head.linear.weight.copy_(w)
        head.linear.bias.copy_(b)
    close(head(x, y, num_items=torch.tensor(3.0)), reference(F.linear(x, w, b), y, 3))


@pytest.mark.parametrize("bad", [0, -1, 0.0, float("nan"), float("inf"), "3", True, [3],
                                 torch.tensor([3]), torch.tensor(True), torch.tensor(0),
                                 torch.tensor(float("nan"))])
def test_bad_num_items_raise_naming_it(bad):
    z, y, x, w, *_ = batch()
    with pytest.raises(InputError, match="num_items"):
        xt.cross_entropy(z, y, num_items=bad)
    with pytest.raises(InputError, match="num_items"):
        xt.linear_cross_entropy(x, w, y, num_items=bad)


def test_num_items_with_reduction_none_or_a_gradient_raises():
    z, y, x, w, *_ = batch()
    for fn, args in ((xt.cross_entropy, (z, y)), (xt.linear_cross_entropy, (x, w, y))):
        with pytest.raises(InputError, match=r"num_items.*reduction='none'"):
            fn(*args, reduction="none", num_items=3)
        with pytest.raises(UnsupportedError, match="num_items"):
            fn(*args, num_items=torch.tensor(3.0, requires_grad=True))
    with pytest.raises(InputError, match="num_items"):
        xt.CrossEntropyLoss(reduction="none")(z, y, num_items=2)
