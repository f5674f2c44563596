"""Adversarial review (H28) of session 14's changes on the Triton kernels (CPU:
triton's interpreter, tiny shapes): the saved inputs of ``_CrossEntropy`` and
``_LinearCrossEntropy`` through ``save_for_backward`` (retain_graph then recomputing
backwards, backward twice, inputs changed in place, saved-tensor hooks),
``_rules.may_overwrite`` (leaf-like logits, ``(N, C, d)`` and non-contiguous leaves,
``save_on_cpu``), the deferred class-index check (``_start_target_check``: 0-d, empty,
narrow dtypes, negative indices, no-grad, threads) and ``dw_dtype`` (the compact dW sum)
with ignored rows and a NaN ``grad_output`` on one. References: torch in float64. The
CPU routes' counterpart is ``tests/torch/test_session14_review_adversarial.py``."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F
from grad_probes import (
    assert_checkpointed_head_matches_torch,
    assert_grad_and_hvp_match_torch,
    assert_save_on_cpu_inplace_loud_or_torchs,
)
from grad_probes import (
    grad_node_name as _node,
)
from torch.autograd.graph import save_on_cpu, saved_tensors_hooks

import crossent.torch as xt
from crossent.torch._triton import triton_cross_entropy, triton_linear_cross_entropy

pytestmark = pytest.mark.timeout(120)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: interpreter
N, C = 6, 20
CE, LINEAR = "_CrossEntropyBackward", "_LinearCrossEntropyBackward"


def _data(seed: int, dtype=torch.float32, shape=(N, C)):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(*shape, generator=g) * 2).to(dtype).to(DEVICE).requires_grad_()
    y = torch.randint(0, shape[1], (shape[0], *shape[2:]), generator=g)
    y.view(-1)[::4] = -100
    return h, y.to(DEVICE)


def _head(seed: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(7, 8, generator=g).to(dtype).to(DEVICE).requires_grad_()
    w = (torch.randn(C, 8, generator=g) / 3).to(dtype).to(DEVICE).requires_grad_()
    b = (torch.randn(C, generator=g) / 3).to(dtype).to(DEVICE).requires_grad_()
    y = torch.randint(0, C, (7,), generator=g)
    y[2] = -100
    return x, w, b, y.to(DEVICE)


def _close(got, want, rtol=1e-4, atol=1e-6):
    torch.testing.assert_close(got.double().cpu(), want.double().cpu(), rtol=rtol, atol=atol,
                               equal_nan=True)


# --------------------------------------------------------------------------- retain_graph


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_retain_then_batched_then_create_graph_match_torch(reduction):
    h, y = _data(1)
    loss = xt.cross_entropy(h * 1.0, y, reduction=reduction, backend="triton")
    assert _node(loss) == CE
    go = (torch.rand(loss.shape, generator=torch.Generator().manual_seed(2)) + 0.5).to(DEVICE)
    g1, = torch.autograd.grad(loss, h, go, retain_graph=True)
    gb, = torch.autograd.grad(loss, h, torch.stack([go, -2 * go]), is_grads_batched=True,
                              retain_graph=True)
    _, r = assert_grad_and_hvp_match_torch(loss, h, y, _close, go, reduction=reduction)
    for got in (g1, gb[0], gb[1] / -2):
        _close(got, r)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_head_retain_then_recompute_then_plain(reduction):
    """"none" recomputes every backward (twice, batched, create_graph: torch's); "mean"
    consumes its stored gradients: a recomputing backward after it still works, a second
    plain one raises naming crossent."""
    x, w, b, y = _head(3)
    ps = (x, w, b)
    loss = xt.linear_cross_entropy(x * 1.0, w, y, b, reduction=reduction, backend="triton")
    assert _node(loss) == LINEAR
    go = torch.linspace(0.5, 2.0, 7).to(DEVICE) if reduction == "none" else torch.tensor(
        1.5, device=DEVICE)
    pd = [p.detach().double().requires_grad_() for p in ps]
    want = torch.autograd.grad(F.cross_entropy(F.linear(*pd), y, reduction=reduction), pd,
                               go.double())
    got = [torch.autograd.grad(loss, ps, go, retain_graph=True)]
    if reduction == "none":
        got.append(torch.autograd.grad(loss, ps, go, retain_graph=True))
        gb = torch.autograd.grad(loss, ps, torch.stack([go, 2 * go]), is_grads_batched=True,
                                 retain_graph=True)
        got.append([g[1] / 2 for g in gb])
    got.append(torch.autograd.grad(loss, ps, go, create_graph=True, retain_graph=True))
    for gs in got:
        for a, e in zip(gs, want, strict=True):
            _close(a, e, atol=1e-5)
    if reduction == "mean":
        with pytest.raises(RuntimeError, match="crossent"):
            torch.autograd.grad(loss, ps, go)


def test_backward_twice_without_retain_is_loud_in_float32():
    h, y = _data(4)
    loss = xt.cross_entropy(h, y, backend="triton")
    loss.backward()
    with pytest.raises(RuntimeError, match=r"crossent|second time"):
        loss.backward()


def test_backward_twice_without_retain_is_loud_in_float64():
    h, y = _data(4, torch.float64)
    loss = xt.cross_entropy(h, y, backend="triton")  # the leaf: no other node saves
    assert _node(loss) == CE
    loss.backward()
    with pytest.raises(RuntimeError):
        loss.backward()


# --------------------------------------------------------------------------- in-place changes


@pytest.mark.parametrize("case", ["logits", "target", "linear-none-w", "linear-none-x"])
def test_input_modified_in_place_raises_naming_crossent(case):
    if case in ("logits", "target"):
        h, y = _data(5)
        z = h * 1.0
        loss = xt.cross_entropy(z, y, backend="triton")
        with torch.no_grad():
            if case == "logits":
                z.mul_(2)
            else:
                y[0] = 1
        with pytest.raises(RuntimeError, match=r"crossent\.torch\.cross_entropy"):
            torch.autograd.grad(loss, h, create_graph=True)
    else:
        x, w, b, y = _head(5)
        xa = x * 1.0
        loss = xt.linear_cross_entropy(xa, w, y, b, reduction="none", backend="triton")
        assert _node(loss) == LINEAR
        with torch.no_grad():
            (w if case == "linear-none-w" else xa).mul_(2)
        with pytest.raises(RuntimeError, match=r"crossent\.torch\.linear_cross_entropy"):
            torch.autograd.grad(loss.sum(), (x, w))  # a plain backward recomputes


# --------------------------------------------------------------------------- hooks


@pytest.mark.parametrize("kind", ["save_on_cpu", "copy"])
def test_saved_tensors_hooks_recomputing_paths_match_torch(kind):
    hooks = (save_on_cpu() if kind == "save_on_cpu"
             else saved_tensors_hooks(lambda t: t.clone(), lambda t: t))
    h, y = _data(6)
    x, w, b, yl = _head(6)
    with hooks:
        loss = xt.cross_entropy(h * 1.0, y, backend="triton")
        head = xt.linear_cross_entropy(x * 1.0, w, yl, b, reduction="none", backend="triton")
    assert _node(loss) == CE and _node(head) == LINEAR
    assert_grad_and_hvp_match_torch(loss, h, y, _close)
    got = torch.autograd.grad(head.sum(), (x, w, b))
    pd = [p.detach().double().requires_grad_() for p in (x, w, b)]
    want = torch.autograd.grad(F.cross_entropy(F.linear(*pd), yl, reduction="sum"), pd)
    for a, e in zip(got, want, strict=True):
        _close(a, e, atol=1e-5)


@pytest.mark.skipif(DEVICE != "cpu", reason="save_on_cpu copies CUDA tensors")
def test_save_on_cpu_with_inplace_backward_raises_or_matches_torch():
    g = torch.Generator().manual_seed(7)
    x0 = torch.randn(N, C, generator=g)
    y = torch.randint(0, C, (N,), generator=g)
    assert_save_on_cpu_inplace_loud_or_torchs(
        lambda h: xt.cross_entropy(h, y, inplace_backward=True, backend="triton"), x0, y,
        _close)


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("inplace", [False, True])
def test_checkpointed_triton_loss_matches_torch(reentrant, inplace):
    g = torch.Generator().manual_seed(14)
    x0 = torch.randn(N, 5, generator=g).to(DEVICE)
    w0 = torch.randn(C, 5, generator=g).to(DEVICE)
    y = torch.randint(0, C, (N,), generator=g).to(DEVICE)
    assert_checkpointed_head_matches_torch(
        lambda z: xt.cross_entropy(z, y, backend="triton", inplace_backward=inplace),
        x0, w0, y, reentrant, _close)


# --------------------------------------------------------------------------- may_overwrite


@pytest.mark.parametrize("kind", ["parameter", "parameter-rows", "detached", "one-d"])
def test_leaf_like_logits_keep_their_values_and_own_grad(kind):
    g = torch.Generator().manual_seed(8)
    base = torch.randn(N, C, generator=g).to(DEVICE)
    y = torch.randint(0, C, (N,), generator=g).to(DEVICE)
    if kind == "parameter":
        leaf = torch.nn.Parameter(base.clone())
        z = leaf
    elif kind == "parameter-rows":
        leaf = torch.nn.Parameter(torch.cat([torch.zeros(2, C, device=DEVICE), base]))
        z = leaf[2:]
    elif kind == "detached":
        leaf = (base.clone().requires_grad_() * 1.0).detach().requires_grad_()
        z = leaf
    else:
        base, y = base[0], y[0]
        leaf = base.clone().requires_grad_()
        z = leaf
    before = leaf.detach().clone()
    triton_cross_entropy(z, y, inplace_backward=True).backward()
    assert torch.equal(leaf.detach(), before)
    assert leaf.grad.untyped_storage().data_ptr() != leaf.untyped_storage().data_ptr()
    bd = base.double().requires_grad_()
    F.cross_entropy(bd, y).backward()
    _close(leaf.grad[2:] if kind == "parameter-rows" else leaf.grad, bd.grad)


@pytest.mark.parametrize("layout", ["3d", "transposed"])
def test_leaf_logits_in_place_double_backward_as_documented(layout):
    g = torch.Generator().manual_seed(9)
    if layout == "3d":
        base = torch.randn(3, C, 2, generator=g).to(DEVICE)
        y = torch.randint(0, C, (3, 2), generator=g).to(DEVICE)
    else:
        base = torch.randn(C, N, generator=g).to(DEVICE).t()
        y = torch.randint(0, C, (N,), generator=g).to(DEVICE)
    z = base.detach().requires_grad_()
    loss = xt.cross_entropy(z, y, inplace_backward=True, backend="triton")
    assert _node(loss) == CE
    assert torch.equal(z.detach(), base)
    gz, = torch.autograd.grad(loss, z, create_graph=True)
    zd = base.double().requires_grad_()
    r, = torch.autograd.grad(F.cross_entropy(zd, y), zd, create_graph=True)
    _close(gz, r)


# --------------------------------------------------------------------------- deferred check


@pytest.mark.parametrize("value,bad", [(3, False), (C, True), (-100, False), (-5, True)])
@pytest.mark.parametrize("grad", [True, False])
def test_deferred_check_zero_d_target(value, bad, grad):
    """A 1-D input and a 0-d target, on the autograd and the no-grad paths: torch's
    IndexError or torch's loss, the logits intact."""
    g = torch.Generator().manual_seed(10)
    base = torch.randn(C, generator=g).to(DEVICE)
    z = base.clone().requires_grad_(grad)
    t = torch.tensor(value, device=DEVICE)
    if bad:
        with pytest.raises(IndexError, match=f"class index {value},"):
            triton_cross_entropy(z, t)
        with pytest.raises(IndexError):
            F.cross_entropy(base.cpu(), t.cpu())
        assert torch.equal(z.detach(), base)
        return
    _close(triton_cross_entropy(z, t), F.cross_entropy(base.double(), t))


@pytest.mark.parametrize("dtype,values,ignore_index,bad", [
    (torch.int8, [1, 44, 3, 2], 300, 44),  # ignore_index outside int8's range
    (torch.int8, [1, -1, 3, 2], 255, -1),  # 255 is not int8's -1
    (torch.int16, [-7, -7, 3, 2], -7, None),
    (torch.int32, [1, -5, 3, 2], -100, -5),  # a negative index: read safely, then raised
])
def test_deferred_check_narrow_dtypes_through_the_kernel(dtype, values, ignore_index, bad):
    g = torch.Generator().manual_seed(11)
    base = torch.randn(4, C, generator=g).to(DEVICE)
    z = base.clone().requires_grad_()
    t = torch.tensor(values, dtype=dtype, device=DEVICE)
    if bad is not None:
        with pytest.raises(IndexError, match=rf"class index {bad}, outside \[0, {C}\)"):
            triton_cross_entropy(z, t, ignore_index=ignore_index)
        assert torch.equal(z.detach(), base) and z.grad is None
        return
    loss = triton_cross_entropy(z, t, ignore_index=ignore_index)
    _close(loss, F.cross_entropy(base.double(), t.long(), ignore_index=ignore_index))


def test_deferred_check_empty_target_matches_torch():
    z = torch.randn(0, C, device=DEVICE, requires_grad=True)
    t = torch.empty(0, dtype=torch.int64, device=DEVICE)
    for reduction in ("sum", "none"):
        got = triton_cross_entropy(z, t, reduction=reduction)
        want = F.cross_entropy(z.detach().double(), t, reduction=reduction)
        assert got.shape == want.shape
        _close(got, want)


def test_deferred_check_threads_raise_only_their_own():
    g = torch.Generator().manual_seed(12)
    base = torch.randn(3, C, generator=g).to(DEVICE)
    results: dict[int, object] = {}
    barrier = threading.Barrier(3)

    def work(k: int) -> None:
        t = torch.tensor([1, 2, 3], device=DEVICE)
        if k == 1:
            t[2] = C + 5
        barrier.wait(timeout=30)
        try:
            results[k] = triton_cross_entropy(base.clone().requires_grad_(), t)
        except IndexError as exc:
            results[k] = exc

    threads = [threading.Thread(target=work, args=(k,)) for k in range(3)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    assert all(not th.is_alive() for th in threads)
    assert isinstance(results[1], IndexError) and f"class index {C + 5}," in str(results[1])
    want = F.cross_entropy(base.double(), torch.tensor([1, 2, 3], device=DEVICE))
    for k in (0, 2):
        assert isinstance(results[k], torch.Tensor), results[k]
        _close(results[k], want)


# --------------------------------------------------------------------------- compact dW


@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_bf16_dw_with_ignored_rows_and_nan_grad_output_on_one(reduction):
    g = torch.Generator().manual_seed(13)
    x = torch.randn(8, 16, generator=g).to(torch.bfloat16).to(DEVICE)
    w = (torch.randn(C, 16, generator=g) / 4).to(torch.bfloat16).to(DEVICE)
    y = torch.randint(0, C, (8,), generator=g)
    y[[0, 5]] = -100
    y = y.to(DEVICE)
    ps = [x.clone().requires_grad_(), w.clone().requires_grad_()]
    loss = triton_linear_cross_entropy(ps[0], ps[1], y, reduction=reduction, chunk_size=3,
                                       dw_dtype=torch.bfloat16)
    go = torch.full(loss.shape, 0.3, device=DEVICE)
    if reduction == "none":
        go[0] = float("nan")  # an ignored row: torch keeps its gradient 0
    loss.backward(go.to(loss.dtype))
    pd = [t.double().requires_grad_() for t in (x, w)]
    F.cross_entropy(F.linear(*pd), y, reduction=reduction).backward(go.double())
    assert ps[1].grad.dtype == torch.bfloat16
    assert torch.isfinite(ps[1].grad).all() and torch.isfinite(ps[0].grad).all()
    scale = float(pd[1].grad.abs().max())
    err = float((ps[1].grad.double() - pd[1].grad).abs().max())
    assert err <= (8 // 3 + 1) * 2.0**-8 * scale + 1e-6, (err, scale)
    torch.testing.assert_close(ps[0].grad.double(), pd[0].grad, rtol=3e-2, atol=3e-3)
    assert not ps[0].grad[[0, 5]].any()
