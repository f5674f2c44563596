"""Adversarial review (H28) of session 14's autograd changes on the CPU routes: saved
inputs through ``save_for_backward`` (``_rules.save_inputs``/``saved_inputs``),
``_rules.may_overwrite`` (``inplace_backward`` overwrites only an activation's memory),
``_rules.start_index_check`` and the ``acc_policy="compact"`` plumbing of the linear head.

Attacked as other projects' suites would: ``retain_graph=True`` followed by a recomputing
backward (``create_graph``, ``is_grads_batched``) on every route (the small-batch kernel at
300 x 1000 float32, the row-block kernel, the chunked linear head), backward twice, inputs
changed in place between forward and a recomputing backward, ``saved_tensors_hooks``
(``save_on_cpu``, copying and wrapping hooks), activation checkpointing, leaf-like logits
(parameters, ``.data``, ``detach().requires_grad_()``, views), the deferred index check
with narrow dtypes, 0-d, empty targets and threads, and the compact dW sum with ignored
rows, NaN-filled pooled buffers and ``grad_output`` other than 1. References: torch in
float64 (``F.cross_entropy``, ``F.linear``), never crossent's own output. The Triton
counterpart is ``tests/triton/test_triton_session14_review.py``.
"""

from __future__ import annotations

import contextlib
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
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

import crossent.torch as xt
from crossent.torch import _chunked_head, _linear
from crossent.torch._rules import check_index_target, start_index_check

# torch's dispatch kept: "auto" at 300 x 1000 float32 is the small-batch kernel's
pytestmark = [pytest.mark.native_dispatch, pytest.mark.timeout(120)]

# (rows, classes, backend, the Function's backward node)
ROUTES = {
    "small": (300, 1000, "auto", "_SmallCrossEntropyBackward"),
    "rowblock": (24, 37, "rowblock", "_CrossEntropyFunctionBackward"),
}
HAVE_OPTIONS = hasattr(torch.nn, "LinearCrossEntropyOptions")
LINEAR = "_LinearCrossEntropyFunctionBackward"


def _logits(route: str, seed: int, dtype=torch.float32, ignored: bool = True):
    rows, classes, backend, node = ROUTES[route]
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(rows, classes, generator=g) * 2).to(dtype).requires_grad_()
    y = torch.randint(0, classes, (rows,), generator=g)
    if ignored:
        y[::5] = -100
    return h, y, backend, node


def _go(loss: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(loss.shape, generator=g) + 0.5).to(loss.dtype)


def _close(got, want, rtol=1e-4, atol=1e-6):
    torch.testing.assert_close(got.double(), want.double(), rtol=rtol, atol=atol)


def _head_data(seed: int, dtype=torch.float32, rows=40, feats=16, classes=50):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, feats, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(classes, feats, generator=g) / 4).to(dtype).requires_grad_()
    b = (torch.randn(classes, generator=g) / 4).to(dtype).requires_grad_()
    y = torch.randint(0, classes, (rows,), generator=g)
    y[::6] = -100
    return x, w, b, y


# --------------------------------------------------------------------------- retain_graph


@pytest.mark.parametrize("route", ["small", "rowblock"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_retain_then_batched_then_create_graph_match_torch(route, reduction):
    """Plain backward with ``retain_graph=True``, then batched ``grad_outputs``, then a
    Hessian-vector product through ``create_graph=True``: torch's float64 numbers."""
    h, y, backend, node = _logits(route, 1)
    loss = xt.cross_entropy(h * 1.0, y, reduction=reduction, backend=backend)
    assert _node(loss) == node
    go = _go(loss, 2)
    g1, = torch.autograd.grad(loss, h, go, retain_graph=True)
    gb, = torch.autograd.grad(loss, h, torch.stack([go, -2 * go]), is_grads_batched=True,
                              retain_graph=True)
    g2, = torch.autograd.grad(loss, h, go, create_graph=True)
    v = torch.randn(h.shape, generator=torch.Generator().manual_seed(3))
    hvp, = torch.autograd.grad((g2 * v).sum(), h)

    hd = h.detach().double().requires_grad_()
    r, = torch.autograd.grad(F.cross_entropy(hd, y, reduction=reduction), hd, go.double(),
                             create_graph=True)
    rhvp, = torch.autograd.grad((r * v.double()).sum(), hd)
    for got in (g1, gb[0], gb[1] / -2, g2):
        _close(got, r)
    _close(hvp, rhvp, rtol=1e-3, atol=1e-6)


@pytest.mark.skipif(not HAVE_OPTIONS, reason="torch.nn.LinearCrossEntropyOptions needed")
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_linear_head_retain_then_recompute_match_torch(reduction):
    x, w, b, y = _head_data(4)
    opts = (None if reduction == "none" else
            torch.nn.LinearCrossEntropyOptions(batch_chunk_size=16, allow_retain_graph=True))
    loss = xt.linear_cross_entropy(x * 1.0, w, y, b, reduction=reduction, options=opts,
                                   chunk_size=16 if opts is None else None,
                                   backend="rowblock")
    assert _node(loss) == LINEAR
    go = _go(loss, 5)
    ps = (x, w, b)
    g1 = torch.autograd.grad(loss, ps, go, retain_graph=True)
    g1b = torch.autograd.grad(loss, ps, go, retain_graph=True)  # twice: kept or recomputed
    gb = torch.autograd.grad(loss, ps, torch.stack([go, 3 * go]), is_grads_batched=True,
                             retain_graph=True)
    g2 = torch.autograd.grad(loss, ps, go, create_graph=True)
    hvp = torch.autograd.grad(sum((g * g).sum() for g in g2), ps)

    pd = [p.detach().double().requires_grad_() for p in ps]
    want = torch.autograd.grad(F.cross_entropy(F.linear(*pd), y, reduction=reduction), pd,
                               go.double(), create_graph=True)
    whvp = torch.autograd.grad(sum((g * g).sum() for g in want), pd)
    for k in range(3):
        for got in (g1[k], g1b[k], gb[k][0], gb[k][1] / 3, g2[k]):
            _close(got, want[k], rtol=1e-4, atol=1e-5)
        _close(hvp[k], whvp[k], rtol=1e-3, atol=1e-5)


def test_linear_head_mean_plain_after_recompute_is_loud():
    """Without ``allow_retain_graph``: a plain backward consumes the stored gradients; a
    recomputing one after it still works (torch's numbers), a second plain one raises."""
    x, w, b, y = _head_data(6)
    loss = xt.linear_cross_entropy(x * 1.0, w, y, b, chunk_size=16, backend="rowblock")
    assert _node(loss) == LINEAR
    torch.autograd.grad(loss, (x, w), retain_graph=True)
    g2 = torch.autograd.grad(loss, (x, w), create_graph=True)
    pd = [p.detach().double().requires_grad_() for p in (x, w, b)]
    want = torch.autograd.grad(F.cross_entropy(F.linear(*pd), y), pd[:2])
    for got, ref in zip(g2, want, strict=True):
        _close(got, ref, atol=1e-5)
    with pytest.raises(RuntimeError, match="crossent"):
        torch.autograd.grad(loss, (x, w))


# --------------------------------------------------------------------------- backward twice


def _twice_float32(case: str):
    if case in ROUTES:
        h, y, backend, _ = _logits(case, 7, ignored=False)
        loss = xt.cross_entropy(h * 1.0, y, backend=backend)
    else:
        x, w, b, y = _head_data(7)
        loss = xt.linear_cross_entropy(x * 1.0, w, y, b, chunk_size=16, backend="rowblock",
                                       reduction=case.split("-")[1]).sum()
    return loss


@pytest.mark.parametrize("case", ["small", "rowblock", "linear-mean", "linear-none"])
def test_backward_twice_without_retain_is_loud_in_float32(case):
    loss = _twice_float32(case)
    loss.backward()
    with pytest.raises(RuntimeError, match=r"second time|backward ran twice"):
        loss.backward()


@pytest.mark.parametrize("case", ["small", "rowblock", "linear-mean"])
def test_backward_twice_without_retain_is_loud_in_float64(case):
    if case in ROUTES:
        # the leaf itself: only crossent's node is in the graph (h * 1.0 saves the scalar)
        h, y, backend, node = _logits(case, 8, torch.float64, ignored=False)
        loss = xt.cross_entropy(h, y, backend=backend)
        assert _node(loss) == node
    else:
        x, w, b, y = _head_data(8, torch.float64)
        loss = xt.linear_cross_entropy(x, w, y, b, chunk_size=16, backend="rowblock")
        assert _node(loss) == LINEAR
    loss.backward()
    with pytest.raises(RuntimeError):  # torch's F.cross_entropy raises here
        loss.backward()


# --------------------------------------------------------------------------- in-place changes


def _modified_then_backward(case: str):
    """An input changed in place between forward and a backward that recomputes from it."""
    if case in ("small-logits", "rowblock-logits", "small-retained"):
        h, y, backend, node = _logits(case.split("-")[0], 9)
        z = h * 1.0
        loss = xt.cross_entropy(z, y, backend=backend)
        assert _node(loss) == node
        if case == "small-retained":
            torch.autograd.grad(loss, h, retain_graph=True)
        with torch.no_grad():
            z.mul_(2)
        torch.autograd.grad(loss, h, create_graph=case != "small-retained")
    elif case == "rowblock-target":
        h, y, backend, _ = _logits("rowblock", 9)
        loss = xt.cross_entropy(h * 1.0, y, backend=backend)
        y[1] = 3
        torch.autograd.grad(loss, h, create_graph=True)
    elif case in ("prob-logits", "prob-weight"):
        g = torch.Generator().manual_seed(9)
        z = (torch.randn(20, 11, generator=g) * 1.0).requires_grad_()
        t = torch.softmax(torch.randn(20, 11, generator=g), 1).requires_grad_()
        w = torch.rand(11, generator=g) + 0.5
        zz = z * 1.0
        loss = xt.cross_entropy(zz, t, weight=w, backend="rowblock")
        with torch.no_grad():
            (zz if case == "prob-logits" else w).mul_(2)
        torch.autograd.grad(loss, (z, t))  # a plain backward: the target's gradient
    else:  # the linear head
        x, w, b, y = _head_data(9)
        xa = x * 1.0
        reduction = "none" if case.startswith("linear-none") else "mean"
        loss = xt.linear_cross_entropy(xa, w, y, b, reduction=reduction, chunk_size=16,
                                       backend="rowblock")
        assert _node(loss) == LINEAR
        with torch.no_grad():
            {"linear-none-w": w, "linear-none-x": xa, "linear-mean-b": b}[case].mul_(2)
        torch.autograd.grad(loss.sum(), (x, w), create_graph=reduction == "mean")


@pytest.mark.parametrize("case", ["small-logits", "rowblock-logits", "small-retained",
                                  "rowblock-target", "prob-logits", "prob-weight",
                                  "linear-none-w", "linear-none-x", "linear-mean-b"])
def test_input_modified_in_place_raises_naming_crossent(case):
    named = r"crossent\.torch\.(cross_entropy|linear_cross_entropy)"
    with pytest.raises(RuntimeError, match=named):
        _modified_then_backward(case)


def test_probability_target_and_weight_gradients_retained_then_second_order():
    """Target and class-weight gradients (closed forms from the saved logits) on a plain
    retained backward, then all three through create_graph and a second order product."""
    g = torch.Generator().manual_seed(23)
    ps = [torch.randn(20, 11, generator=g).requires_grad_(),
          torch.softmax(torch.randn(20, 11, generator=g), 1).requires_grad_(),
          (torch.rand(11, generator=g) + 0.5).requires_grad_()]
    loss = xt.cross_entropy(ps[0] * 1.0, ps[1] * 1.0, weight=ps[2], label_smoothing=0.1,
                            backend="rowblock")
    assert _node(loss) == ROUTES["rowblock"][3]
    g1 = torch.autograd.grad(loss, ps, retain_graph=True)
    g2 = torch.autograd.grad(loss, ps, create_graph=True)
    hv = torch.autograd.grad(sum((a * a).sum() for a in g2), ps)
    pd = [p.detach().double().requires_grad_() for p in ps]
    want = torch.autograd.grad(F.cross_entropy(pd[0], pd[1], weight=pd[2], label_smoothing=0.1),
                               pd, create_graph=True)
    whv = torch.autograd.grad(sum((a * a).sum() for a in want), pd)
    for k in range(3):
        _close(g1[k], want[k], atol=1e-6)
        _close(g2[k], want[k], atol=1e-6)
        _close(hv[k], whv[k], rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("case", ["rowblock", "linear-mean"])
def test_target_changed_before_a_plain_backward_raises_as_torch(case):
    if case == "rowblock":
        h, y, backend, node = _logits("rowblock", 24, ignored=False)
        loss = xt.cross_entropy(h * 1.0, y, backend=backend)
        ps: tuple = (h,)
    else:
        x, w, b, y = _head_data(24)
        loss = xt.linear_cross_entropy(x * 1.0, w, y, b, chunk_size=16, backend="rowblock")
        node, ps = LINEAR, (x, w)
    assert _node(loss) == node
    y[1] = (int(y[1]) + 1) % 37
    with pytest.raises(RuntimeError, match="crossent"):
        torch.autograd.grad(loss, ps)


# --------------------------------------------------------------------------- saved_tensors_hooks


def _hooks(kind: str):
    if kind == "save_on_cpu":
        return save_on_cpu()
    if kind == "copy":
        return saved_tensors_hooks(lambda t: t.clone(), lambda t: t)
    return saved_tensors_hooks(lambda t: (t.detach().clone(),), lambda p: p[0])  # wrap


@pytest.mark.parametrize("kind", ["save_on_cpu", "copy", "wrap"])
@pytest.mark.parametrize("case", ["small", "rowblock", "prob", "linear-none", "linear-mean"])
def test_saved_tensors_hooks_recomputing_paths_match_torch(kind, case):
    """Packed/unpacked saved inputs: the recomputing backwards (create_graph, target and
    weight gradients, the linear head's "none") still give torch's numbers."""
    if case in ROUTES:
        h, y, backend, node = _logits(case, 10)
        with _hooks(kind):
            loss = xt.cross_entropy(h * 1.0, y, backend=backend)
        assert _node(loss) == node
        assert_grad_and_hvp_match_torch(loss, h, y, _close)
    elif case == "prob":
        g0 = torch.Generator().manual_seed(10)
        ps = [torch.randn(20, 11, generator=g0).requires_grad_(),
              torch.softmax(torch.randn(20, 11, generator=g0), 1).requires_grad_(),
              (torch.rand(11, generator=g0) + 0.5).requires_grad_()]
        with _hooks(kind):
            loss = xt.cross_entropy(ps[0] * 1.0, ps[1] * 1.0, weight=ps[2], backend="rowblock",
                                    label_smoothing=0.1)
        assert _node(loss) == ROUTES["rowblock"][3]
        got = torch.autograd.grad(loss, ps)
        pd = [p.detach().double().requires_grad_() for p in ps]
        want = torch.autograd.grad(F.cross_entropy(pd[0], pd[1], weight=pd[2],
                                                   label_smoothing=0.1), pd)
        for a, e in zip(got, want, strict=True):
            _close(a, e, atol=1e-6)
    else:
        x, w, b, y = _head_data(10)
        reduction = case.split("-")[1]
        with _hooks(kind):
            loss = xt.linear_cross_entropy(x * 1.0, w, y, b, reduction=reduction,
                                           chunk_size=16, backend="rowblock")
        assert _node(loss) == LINEAR
        go = _go(loss, 11)
        got = torch.autograd.grad(loss, (x, w, b), go, create_graph=reduction == "mean")
        pd = [p.detach().double().requires_grad_() for p in (x, w, b)]
        want = torch.autograd.grad(F.cross_entropy(F.linear(*pd), y, reduction=reduction),
                                   pd, go.double())
        for a, e in zip(got, want, strict=True):
            _close(a, e, atol=1e-5)


@pytest.mark.parametrize("route", ["small", "rowblock"])
def test_identity_hooks_and_modified_logits_raise_or_match_torch(route):
    h, y, backend, node = _logits(route, 12)
    z = h * 1.0
    with saved_tensors_hooks(lambda t: t, lambda t: t):
        loss = xt.cross_entropy(z, y, backend=backend)
    assert _node(loss) == node
    hd = h.detach().double().requires_grad_()
    want, = torch.autograd.grad(F.cross_entropy(hd, y), hd)
    with torch.no_grad():
        z.add_(100 * torch.arange(z.shape[1]))
    try:
        got, = torch.autograd.grad(loss, h, create_graph=True)
    except RuntimeError as exc:  # a loud refusal is fine too
        assert "crossent" in str(exc)
        return
    _close(got, want)


def test_save_on_cpu_with_inplace_backward_raises_or_matches_torch():
    g = torch.Generator().manual_seed(13)
    x0 = torch.randn(24, 37, generator=g)
    y = torch.randint(0, 37, (24,), generator=g)
    assert_save_on_cpu_inplace_loud_or_torchs(
        lambda h: xt.cross_entropy(h, y, inplace_backward=True, backend="rowblock"), x0, y,
        _close)


# --------------------------------------------------------------------------- checkpointing


@pytest.mark.parametrize("route", ["small", "rowblock"])
@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("inplace", [False, True])
def test_checkpointed_head_matches_torch(route, reentrant, inplace):
    rows, classes, backend, _ = ROUTES[route]
    g = torch.Generator().manual_seed(14)
    x0 = torch.randn(rows, 8, generator=g)
    w0 = torch.randn(classes, 8, generator=g)
    y = torch.randint(0, classes, (rows,), generator=g)
    y[::4] = -100
    assert_checkpointed_head_matches_torch(
        lambda z: xt.cross_entropy(z, y, backend=backend, inplace_backward=inplace),
        x0, w0, y, reentrant, _close)


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_checkpointed_linear_head_matches_torch(reentrant, reduction):
    """The chunked head inside a checkpointed region after tanh (whose saved output makes
    the non-reentrant checkpoint recompute the region, the head's forward included)."""
    x0, w0, b0, y = (t.detach() for t in _head_data(22))

    def region(x, w, b):
        return xt.linear_cross_entropy(torch.tanh(x), w, y, b, reduction=reduction,
                                       chunk_size=16, backend="rowblock")

    ps = [t.clone().requires_grad_() for t in (x0, w0, b0)]
    out = checkpoint(region, *ps, use_reentrant=reentrant)
    go = torch.linspace(0.5, 1.5, out.numel()).reshape(out.shape)
    out.backward(go)
    pd = [t.double().requires_grad_() for t in (x0, w0, b0)]
    F.cross_entropy(F.linear(torch.tanh(pd[0]), pd[1], pd[2]), y,
                    reduction=reduction).backward(go.double())
    for p, q in zip(ps, pd, strict=True):
        _close(p.grad, q.grad, atol=1e-5)


def test_checkpoint_without_early_stop_inplace_raises_or_matches_torch():
    g = torch.Generator().manual_seed(15)
    x0 = torch.randn(24, 37, generator=g)
    y = torch.randint(0, 37, (24,), generator=g)
    xd = x0.double().requires_grad_()
    F.cross_entropy((xd * 0.5).exp(), y).backward()

    def region(x):
        return xt.cross_entropy((x * 0.5).exp(), y, inplace_backward=True, backend="rowblock")

    x = x0.clone().requires_grad_()
    try:
        with set_checkpoint_early_stop(False):
            checkpoint(region, x, use_reentrant=False).backward()
    except RuntimeError as exc:
        assert "inplace" in str(exc) or "crossent" in str(exc)
        return
    _close(x.grad, xd.grad)


# --------------------------------------------------------------------------- may_overwrite


def _leaf_like(kind: str, base: torch.Tensor):
    """(the tensor whose .grad torch fills, the logits handed to crossent)"""
    if kind == "leaf":
        p = base.clone().requires_grad_()
        return p, p
    if kind == "parameter":
        p = torch.nn.Parameter(base.clone())
        return p, p
    if kind == "parameter-rows":  # a view of a leaf: a non-leaf whose memory is the leaf's
        p = torch.nn.Parameter(torch.cat([torch.zeros(3, base.shape[1]), base]))
        return p, p[3:]
    if kind == "no-grad-made":
        src = base.clone().requires_grad_()
        with torch.no_grad():
            z = src * 1.0
        z.requires_grad_()
        return z, z
    if kind == "data":
        z = (base.clone().requires_grad_() * 1.0).data.requires_grad_()
        return z, z
    if kind == "detached":
        z = (base.clone().requires_grad_() * 1.0).detach().requires_grad_()
        return z, z
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["leaf", "parameter", "parameter-rows", "no-grad-made",
                                  "data", "detached"])
def test_leaf_like_logits_keep_their_values_and_own_grad(kind):
    g = torch.Generator().manual_seed(16)
    base = torch.randn(24, 37, generator=g)
    y = torch.randint(0, 37, (24,), generator=g)
    leaf, z = _leaf_like(kind, base)
    before = leaf.detach().clone()
    xt.cross_entropy(z, y, inplace_backward=True, backend="rowblock").backward()
    assert torch.equal(leaf.detach(), before), "a leaf's memory was overwritten"
    assert leaf.grad.untyped_storage().data_ptr() != leaf.untyped_storage().data_ptr()
    bd = base.double().requires_grad_()
    F.cross_entropy(bd, y).backward()
    got = leaf.grad[3:] if kind == "parameter-rows" else leaf.grad
    _close(got, bd.grad)
    leaf.grad.zero_()  # zero_grad(set_to_none=False): the logits stay
    assert torch.equal(leaf.detach(), before)


def test_view_of_activation_is_overwritten_but_a_saving_op_raises():
    g = torch.Generator().manual_seed(17)
    x0 = torch.randn(24, 37, generator=g)
    y = torch.randint(0, 37, (20,), generator=g)
    # nothing saved h: the rows view is overwritten and x.grad is torch's
    x = x0.clone().requires_grad_()
    h = x * 1.0
    xt.cross_entropy(h[4:], y, inplace_backward=True, backend="rowblock").backward()
    xd = x0.double().requires_grad_()
    F.cross_entropy(xd[4:], y).backward()
    _close(x.grad, xd.grad)
    # exp saved its output h: overwriting h's rows must make exp's backward raise
    x = x0.clone().requires_grad_()
    h = (x * 0.5).exp()
    loss = xt.cross_entropy(h[4:], y, inplace_backward=True, backend="rowblock")
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("inplace", [False, True])
def test_logits_not_requiring_grad_with_a_target_gradient(inplace):
    """A leaf that does not require grad inside a graph (the target's gradient only):
    torch's target and weight gradients, the logits untouched."""
    g = torch.Generator().manual_seed(18)
    z = torch.randn(20, 11, generator=g)
    before = z.clone()
    t = torch.softmax(torch.randn(20, 11, generator=g), 1).requires_grad_()
    w = (torch.rand(11, generator=g) + 0.5).requires_grad_()
    loss = xt.cross_entropy(z, t * 1.0, weight=w, inplace_backward=inplace, backend="rowblock",
                            label_smoothing=0.2)
    got = torch.autograd.grad(loss, (t, w))
    td, wd = t.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    want = torch.autograd.grad(F.cross_entropy(z.double(), td, weight=wd, label_smoothing=0.2),
                               (td, wd))
    assert torch.equal(z, before)
    for a, e in zip(got, want, strict=True):
        _close(a, e, atol=1e-6)


@pytest.mark.parametrize("layout", ["3d", "transposed"])
def test_leaf_logits_in_place_double_backward_as_documented(layout):
    g = torch.Generator().manual_seed(19)
    if layout == "3d":
        base = torch.randn(6, 11, 4, generator=g)
        y = torch.randint(0, 11, (6, 4), generator=g)
    else:
        base = torch.randn(11, 24, generator=g).t()
        y = torch.randint(0, 11, (24,), generator=g)
    z = base.detach().requires_grad_()
    loss = xt.cross_entropy(z, y, inplace_backward=True, backend="rowblock")
    assert torch.equal(z.detach(), base), "the caller's leaf is intact"
    assert_grad_and_hvp_match_torch(loss, z, y, _close)


# --------------------------------------------------------------------------- start_index_check


@pytest.mark.parametrize("dtype,values,ignore_index,classes,bad", [
    (torch.int8, [1, -100, 3], -100, 5, None),  # ignore_index fits int8
    (torch.int8, [1, 44, 3], 300, 40, 44),  # ignore_index outside int8's range
    (torch.int8, [1, -1, 3], 255, 40, -1),  # 255 is not int8's -1
    (torch.uint8, [1, 200, 3], -100, 40, 200),
    (torch.uint8, [1, 156, 3], -100, 200, None),  # uint8 156 is not -100
    (torch.int16, [-100, -100], -100, 3, None),
    (torch.int32, [0, -2**31], -100, 3, -2**31),
    (torch.int64, [0, 2**40], -100, 3, 2**40),
])
def test_start_index_check_agrees_with_the_first_read_check(dtype, values, ignore_index,
                                                             classes, bad):
    t = torch.tensor(values, dtype=dtype)
    finish = start_index_check(t, classes, ignore_index)
    if bad is None:
        assert finish() is None
        check_index_target(t, classes, ignore_index)
        return
    with pytest.raises(IndexError, match=rf"class index {bad}, outside \[0, {classes}\)"):
        finish()
    with pytest.raises(IndexError, match=rf"class index {bad},"):
        check_index_target(t, classes, ignore_index)


@pytest.mark.parametrize("value,bad", [(3, False), (7, True), (-100, False), (-5, True)])
def test_start_index_check_zero_d_and_empty(value, bad):
    t = torch.tensor(value)
    finish = start_index_check(t, 7, -100)
    with pytest.raises(IndexError, match=f"class index {value},") if bad else \
            contextlib.nullcontext():
        finish()
    # torch on the same 1-D input (a 0-d target)
    z = torch.randn(7)
    with pytest.raises(IndexError) if bad else contextlib.nullcontext():
        F.cross_entropy(z, t)
    assert start_index_check(torch.empty(0, dtype=torch.int64), 7, -100)() is None


def test_start_index_check_threads_keep_their_own_result():
    results: dict[int, str] = {}
    barrier = threading.Barrier(6)

    def work(k: int) -> None:
        t = torch.full((50,), k % 3, dtype=torch.int64)
        if k % 2:
            t[k] = 9
        barrier.wait(timeout=10)
        finish = start_index_check(t, 5, -100)
        barrier.wait(timeout=10)  # every check queued before any is read
        try:
            finish()
            results[k] = "ok"
        except IndexError as exc:
            results[k] = str(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=20)
    assert all(not th.is_alive() for th in threads)
    for k in range(6):
        assert (results[k] == "ok") == (k % 2 == 0), (k, results[k])
        if k % 2:
            assert "class index 9," in results[k]


# --------------------------------------------------------------------------- compact dW


def _as_on_cuda(monkeypatch, nan_buffers: bool = False):
    """The policy table answers as on CUDA; optionally every pooled buffer starts NaN."""
    monkeypatch.setattr(_linear, "weight_grad_dtype",
                        lambda policy, x, w: w.dtype if policy in ("compact", "auto") else None)
    if nan_buffers:
        real = _chunked_head._buffers.empty

        def nan_empty(shape, dtype, like):
            return real(shape, dtype, like).fill_(float("nan"))

        monkeypatch.setattr(_chunked_head._buffers, "empty", nan_empty)


def _bf16_head(seed: int, ignored):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(40, 24, generator=g).to(torch.bfloat16)
    w = (torch.randn(70, 24, generator=g) / 5).to(torch.bfloat16)
    b = (torch.randn(70, generator=g) * 0.1).to(torch.bfloat16)
    y = torch.randint(0, 70, (40,), generator=g)
    y[ignored] = -100
    return x, w, b, y


def _torch64_grads(x, w, b, y, reduction, go):
    pd = [t.double().requires_grad_() for t in (x, w, b)]
    loss = F.cross_entropy(F.linear(*pd), y, reduction=reduction)
    loss.backward(go.double())
    return loss.detach(), [p.grad for p in pd]


def _bf16_close(got, want, chunks: int):
    scale = float(want.abs().max())
    err = float((got.double() - want).abs().max())
    assert err <= chunks * 2.0**-8 * scale + 1e-6, (err, scale)


@pytest.mark.skipif(not HAVE_OPTIONS, reason="torch.nn.LinearCrossEntropyOptions needed")
@pytest.mark.parametrize("policy", ["compact", "auto"])
@pytest.mark.parametrize("reduction,ignored", [
    ("none", slice(0, None, 3)), ("mean", slice(0, None, 3)), ("sum", slice(0, 8)),
    ("sum", slice(0, None)),  # every row ignored: dW exactly 0, not a stale buffer
])
def test_compact_dw_with_ignored_rows_nan_buffers_and_grad_output(monkeypatch, policy,
                                                                  reduction, ignored):
    _as_on_cuda(monkeypatch, nan_buffers=True)
    x, w, b, y = _bf16_head(20, ignored)
    opts = torch.nn.LinearCrossEntropyOptions(acc_policy=policy, batch_chunk_size=8)
    ps = [t.clone().requires_grad_() for t in (x, w, b)]
    loss = xt.linear_cross_entropy(ps[0], ps[1], y, ps[2], reduction=reduction, options=opts,
                                   backend="rowblock")
    assert _node(loss) == LINEAR
    if reduction == "none":
        go = torch.full((40,), 0.3)
        go[0] = float("nan")  # an ignored row's grad_output: torch leaves the row at 0
    else:
        go = torch.tensor(0.3)
    loss.backward(go.to(loss.dtype))
    _, want = _torch64_grads(x, w, b, y, reduction, go)
    assert ps[1].grad.dtype == torch.bfloat16
    for p in ps:
        assert torch.isfinite(p.grad).all()
    _bf16_close(ps[1].grad, want[1], chunks=40 // 8 + 1)
    torch.testing.assert_close(ps[0].grad.double(), want[0], rtol=3e-2, atol=3e-3)
    torch.testing.assert_close(ps[2].grad.double(), want[2], rtol=3e-2, atol=3e-3)
    if reduction == "sum" and ignored == slice(0, None):
        assert not ps[1].grad.any() and not ps[0].grad.any()


@pytest.mark.skipif(not HAVE_OPTIONS, reason="torch.nn.LinearCrossEntropyOptions needed")
def test_compact_dw_retained_twice_and_recomputed(monkeypatch):
    """``allow_retain_graph`` under the compact policy: the same bf16 dW on both plain
    backwards, and a create_graph backward (recomputed with torch ops) torch's values."""
    _as_on_cuda(monkeypatch)
    x, w, b, y = _bf16_head(21, slice(0, None, 4))
    opts = torch.nn.LinearCrossEntropyOptions(acc_policy="compact", batch_chunk_size=8,
                                              allow_retain_graph=True)
    ps = [t.clone().requires_grad_() for t in (x, w, b)]
    loss = xt.linear_cross_entropy(ps[0], ps[1], y, ps[2], options=opts, backend="rowblock")
    g1 = torch.autograd.grad(loss, ps, retain_graph=True)
    g2 = torch.autograd.grad(loss, ps, retain_graph=True)
    g3 = torch.autograd.grad(loss, ps, create_graph=True)
    _, want = _torch64_grads(x, w, b, y, "mean", torch.tensor(1.0))
    assert g1[1].dtype == torch.bfloat16
    for a, c in zip(g1, g2, strict=True):
        assert torch.equal(a, c)
    _bf16_close(g1[1], want[1], chunks=40 // 8 + 1)
    _bf16_close(g3[1], want[1], chunks=40 // 8 + 1)
    torch.testing.assert_close(g3[0].double(), want[0], rtol=3e-2, atol=3e-3)


@pytest.mark.parametrize("xd,wd", [(torch.bfloat16, torch.float32),
                                   (torch.float32, torch.bfloat16),
                                   (torch.float64, torch.float64)])
def test_compact_table_mixed_or_wide_dtypes_keep_float32(xd, wd):
    # stand-ins for CUDA tensors (dtype and device.type only)
    class _T:
        def __init__(self, dtype):
            self.dtype, self.device = dtype, type("D", (), {"type": "cuda"})()

    assert _chunked_head.weight_grad_dtype("compact", _T(xd), _T(wd)) is None
