"""Session 16 trust round: torch.func over every public entry point and every CPU backend
("auto", and the forced "native" and "rowblock"; "triton" has its own suite), where
test_autograd_contract.py (default backend, logits only) does not look: batched targets
and class weights, vmap's in_dims, hessians of the linear head, jvp through every input,
functional_call on the modules, and ``num_items`` under transforms.

Reference: the same transform of ``F.cross_entropy`` / ``F.linear`` in float64, or a
per-sample loop of it where torch's own vmap cannot run. Each result equals torch's or
raises crossent's UnsupportedError naming the feature.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, hessian, jacfwd, jacrev, jvp, vmap

import crossent.torch as xt
from crossent import UnsupportedError

F64 = torch.float64
BACKENDS = ["auto", "native", "rowblock"]


def close(a, b):
    torch.testing.assert_close(a, b, equal_nan=True)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def ce_data():
    z = torch.randn(5, 4, generator=_gen(0), dtype=F64)
    y = torch.tensor([0, 3, -100, 2, 1])
    p = torch.rand(5, 4, generator=_gen(1), dtype=F64).softmax(1)
    w = torch.rand(4, generator=_gen(2), dtype=F64) + 0.5
    return z, y, p, w


def head_data():
    x = torch.randn(6, 3, generator=_gen(3), dtype=F64)
    lw = torch.randn(5, 3, generator=_gen(4), dtype=F64)
    b = torch.randn(5, generator=_gen(5), dtype=F64)
    y = torch.tensor([0, 4, -100, 2, 1, 3])
    cw = torch.rand(5, generator=_gen(6), dtype=F64) + 0.5
    return x, lw, b, y, cw


# ---------------------------------------------------------------- cross_entropy


@pytest.mark.parametrize("backend", BACKENDS)
def test_vmap_over_index_targets_and_class_weights(backend):
    """Batched targets (one batch entry all ignored: NaN, as torch's mean of nothing) and
    batched class weights, with index and with probability targets."""
    z, y, p, w = ce_data()
    targets = torch.stack([y, torch.tensor([1, 1, 1, -100, 0]), torch.full((5,), -100)])
    close(vmap(lambda t: xt.cross_entropy(z, t, backend=backend))(targets),
          vmap(lambda t: F.cross_entropy(z, t))(targets))
    weights = torch.stack([w, w * 2, w + 1])
    for target in (y, p):
        close(vmap(lambda v, t=target: xt.cross_entropy(z, t, v, backend=backend,
                                                        label_smoothing=0.1))(weights),
              vmap(lambda v, t=target: F.cross_entropy(z, t, v, label_smoothing=0.1))(weights))


@pytest.mark.parametrize("backend", BACKENDS)
def test_vmap_over_logits_and_targets_with_weights_and_smoothing_where_torch_cannot(backend):
    """torch's own vmap raises for class weights + label smoothing with batched index
    targets (masked_select); crossent must give the per-sample loop's numbers or raise
    naming the feature (never a different number); backend="native" is torch's kernel
    and raises torch's error."""
    z, y, _, w = ce_data()
    logits = torch.stack([z, z * 2, z - 1])
    targets = torch.stack([y, torch.tensor([1, 1, 1, -100, 0]), torch.full((5,), -100)])
    with pytest.raises(RuntimeError, match="vmap"):  # torch's limit, so the loop below
        vmap(lambda a, t: F.cross_entropy(a, t, w, label_smoothing=0.1))(logits, targets)
    want = torch.stack([F.cross_entropy(a, t, w, label_smoothing=0.1)
                        for a, t in zip(logits, targets, strict=True)])
    def ours(a, t):
        return xt.cross_entropy(a, t, w, label_smoothing=0.1, backend=backend)

    if backend == "native":
        with pytest.raises(RuntimeError, match="vmap"):
            vmap(ours)(logits, targets)
        return
    try:
        got = vmap(ours)(logits, targets)
    except UnsupportedError as e:
        assert "vmap" in str(e) or "torch.func" in str(e)
    else:
        close(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_vmap_in_dims_one_and_unbatched_rows(backend):
    z, y, _, _ = ce_data()
    stacked = torch.stack([z, z * 2, z - 1], dim=1)  # (N, B, C): the batch in dim 1
    close(vmap(lambda a: xt.cross_entropy(a, y, backend=backend), in_dims=1)(stacked),
          vmap(lambda a: F.cross_entropy(a, y), in_dims=1)(stacked))
    counted = y.clamp(min=0)  # every row a (C,) input with a 0-d target
    close(vmap(lambda a, t: xt.cross_entropy(a, t, backend=backend))(z, counted),
          vmap(lambda a, t: F.cross_entropy(a, t))(z, counted))


@pytest.mark.parametrize("backend", BACKENDS)
def test_second_order_and_forward_mode_through_targets_and_weights(backend):
    z, y, p, w = ce_data()
    close(hessian(lambda a: xt.cross_entropy(a, y, w, reduction="sum", backend=backend))(z),
          hessian(lambda a: F.cross_entropy(a, y, w, reduction="sum"))(z))
    close(grad(lambda t: xt.cross_entropy(z, t, w, label_smoothing=0.2, backend=backend))(p),
          grad(lambda t: F.cross_entropy(z, t, w, label_smoothing=0.2))(p))
    close(grad(lambda v: xt.cross_entropy(z, p, v, backend=backend))(w),
          grad(lambda v: F.cross_entropy(z, p, v))(w))
    tangents = (torch.ones_like(z), torch.randn(5, 4, generator=_gen(7), dtype=F64),
                torch.randn(4, generator=_gen(8), dtype=F64))
    close(jvp(lambda a, t, v: xt.cross_entropy(a, t, v, backend=backend), (z, p, w),
              tangents),
          jvp(lambda a, t, v: F.cross_entropy(a, t, v), (z, p, w), tangents))
    spatial_z = torch.stack([z, z.flip(0)], dim=2)  # (N, C, 2)
    spatial_y = torch.stack([y.clamp(min=0), y], dim=1)
    close(jacfwd(lambda a: xt.cross_entropy(a, spatial_y, reduction="none",
                                            backend=backend))(spatial_z),
          jacfwd(lambda a: F.cross_entropy(a, spatial_y, reduction="none"))(spatial_z))


@pytest.mark.parametrize("backend", BACKENDS)
def test_weight_gradient_with_index_targets_is_refused_under_transforms_as_torch(backend):
    z, y, _, w = ce_data()
    with pytest.raises(RuntimeError):
        jacrev(lambda v: F.cross_entropy(z, y, v))(w)
    with pytest.raises(UnsupportedError, match="weight"):
        jacrev(lambda v: xt.cross_entropy(z, y, v, backend=backend))(w)


@pytest.mark.parametrize("backend", BACKENDS)
def test_num_items_that_requires_grad_is_refused_by_name(backend):
    """Documented: ``num_items`` is a constant count; differentiating through it raises
    naming it (torch's ``sum / n`` would give d/dn)."""
    z, y, _, _ = ce_data()
    with pytest.raises(UnsupportedError, match="num_items"):
        grad(lambda n: xt.cross_entropy(z, y, reduction="sum", num_items=n,
                                        backend=backend))(torch.tensor(7.0, dtype=F64))


@pytest.mark.parametrize("fn", ["cross_entropy", "linear_cross_entropy"])
def test_vmap_over_num_items_gives_torchs_numbers_or_names_num_items(fn):
    z, y, _, _ = ce_data()
    x, lw, b, y6, _ = head_data()
    counts = torch.tensor([3.0, 7.0, 11.0], dtype=F64)
    if fn == "cross_entropy":
        def ours(n):
            return xt.cross_entropy(z, y, reduction="sum", num_items=n)

        def ref(n):
            return F.cross_entropy(z, y, reduction="sum") / n
    else:
        def ours(n):
            return xt.linear_cross_entropy(x, lw, y6, b, reduction="sum", num_items=n,
                                           chunk_size=2)

        def ref(n):
            return F.cross_entropy(F.linear(x, lw, b), y6, reduction="sum") / n
    want = vmap(ref)(counts)
    try:
        got = vmap(ours)(counts)
    except UnsupportedError as e:
        assert "num_items" in str(e)
    else:
        close(got, want)


# ---------------------------------------------------------------- linear_cross_entropy


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunk_size", [None, 2])
def test_linear_head_under_every_transform(backend, chunk_size):
    x, lw, b, y, cw = head_data()
    kw = {"backend": backend, "chunk_size": chunk_size}

    def ref(a, v, c, t, **extra):
        return F.cross_entropy(F.linear(a, v, c), t, **extra)

    targets = torch.stack([y, torch.tensor([1, 1, 1, -100, 0, 0]),
                           torch.tensor([4, 3, 2, 1, 0, -100])])
    close(vmap(lambda t: xt.linear_cross_entropy(x, lw, t, b, **kw))(targets),
          vmap(lambda t: ref(x, lw, b, t))(targets))
    inputs = torch.stack([x, 2 * x, x - 1])
    close(vmap(lambda a: xt.linear_cross_entropy(a, lw, y, b, weight=cw,
                                                 label_smoothing=0.1, **kw))(inputs),
          vmap(lambda a: ref(a, lw, b, y, weight=cw, label_smoothing=0.1))(inputs))
    close(hessian(lambda a: xt.linear_cross_entropy(a, lw, y, b, reduction="sum", **kw))(x),
          hessian(lambda a: ref(a, lw, b, y, reduction="sum"))(x))
    close(hessian(lambda c: xt.linear_cross_entropy(x, lw, y, c, **kw))(b),
          hessian(lambda c: ref(x, lw, c, y))(b))
    close(jacrev(lambda v: xt.linear_cross_entropy(x, v, y, b, reduction="none", **kw))(lw),
          jacrev(lambda v: ref(x, v, b, y, reduction="none"))(lw))
    primals = (x, lw, b)
    tangents = tuple(torch.randn(t.shape, generator=_gen(9 + i), dtype=F64)
                     for i, t in enumerate(primals))
    close(jvp(lambda a, v, c: xt.linear_cross_entropy(a, v, y, c, **kw), primals, tangents),
          jvp(lambda a, v, c: ref(a, v, c, y), primals, tangents))
    seq_x, seq_y = x.view(2, 3, 3), y.view(2, 3)
    close(grad(lambda v: xt.linear_cross_entropy(seq_x, v, seq_y, b, shift=True, **kw))(lw),
          grad(lambda v: ref(seq_x[:, :-1].reshape(-1, 3), v, b,
                             seq_y[:, 1:].reshape(-1)))(lw))
    probs = torch.rand(6, 5, generator=_gen(12), dtype=F64).softmax(1)
    close(grad(lambda t: xt.linear_cross_entropy(x, lw, t, b, **kw))(probs),
          grad(lambda t: ref(x, lw, b, t))(probs))


# ---------------------------------------------------------------- modules


def test_functional_call_on_both_modules_with_buffers_and_parameter_ensembles():
    """``functional_call`` replacing the class-weight buffer and the head's parameters,
    its gradient, and a vmapped ensemble of heads (stack_module_state's pattern)."""
    x, lw, b, y, cw = head_data()
    z = torch.randn(6, 5, generator=_gen(13), dtype=F64)
    ours = xt.CrossEntropyLoss(weight=cw, label_smoothing=0.1)
    theirs = nn.CrossEntropyLoss(weight=cw, label_smoothing=0.1)
    new_cw = cw.flip(0) * 3
    close(functional_call(ours, {"weight": new_cw}, (z, y)),
          functional_call(theirs, {"weight": new_cw}, (z, y)))
    close(grad(lambda a: functional_call(ours, {"weight": new_cw}, (a, y)))(z),
          grad(lambda a: functional_call(theirs, {"weight": new_cw}, (a, y)))(z))
    heads = [cls(3, 5, bias=True, dtype=F64, weight=cw, **extra)
             for cls, extra in ((xt.LinearCrossEntropyLoss, {"chunk_size": 2}),
                                (nn.LinearCrossEntropyLoss, {}))]
    params = {"linear.weight": lw, "linear.bias": b, "weight": new_cw}
    results = [(functional_call(h, params, (x, y)),
                grad(lambda p, h=h: functional_call(h, p, (x, y)))(
                    {"linear.weight": lw, "linear.bias": b}))
               for h in heads]
    close(results[0][0], results[1][0])
    for name in ("linear.weight", "linear.bias"):
        close(results[0][1][name], results[1][1][name])
    ensemble = torch.stack([lw, lw * 2, -lw])
    close(*[vmap(lambda v, h=h: functional_call(h, {"linear.weight": v, "linear.bias": b},
                                                (x, y)))(ensemble) for h in heads])


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_backward_under_transforms_is_torchs_and_leaves_the_input(backend):
    """``inplace_backward=True`` (function and module) under grad, vmap, jvp and hessian:
    the composable path, torch's numbers, the caller's logits untouched."""
    z, y, _, _ = ce_data()
    before = z.clone()
    module = xt.CrossEntropyLoss(inplace_backward=True, backend=backend)

    def ours(a):
        return xt.cross_entropy(a * 1.0, y, inplace_backward=True, backend=backend)

    def ref(a):
        return F.cross_entropy(a, y)

    close(grad(ours)(z), grad(ref)(z))
    close(grad(lambda a: module(a * 2.0, y))(z), grad(lambda a: ref(a * 2.0))(z))
    close(vmap(ours)(torch.stack([z, -z])), vmap(ref)(torch.stack([z, -z])))
    close(jvp(ours, (z,), (torch.ones_like(z),)), jvp(ref, (z,), (torch.ones_like(z),)))
    close(hessian(ours)(z), hessian(ref)(z))
    assert torch.equal(z, before)
