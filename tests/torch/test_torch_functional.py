"""crossent.torch.cross_entropy against torch.nn.functional.cross_entropy (float64) and
crossent's core softmax_cross_entropy (z_loss, softcap), loss and gradient, every option."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from fused_testing import DEVICES, close

import crossent as xe
import crossent.torch as xt

C = 7


def make(device, *, kdim=False, prob=False, ignore=False, n=13, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (n, C, 3) if kdim else (n, C)
    z = torch.randn(shape, generator=g, dtype=torch.float64) * 2
    if prob:
        y = torch.softmax(torch.randn(shape, generator=g, dtype=torch.float64), 1)
    else:
        y = torch.randint(0, C, (n, 3) if kdim else (n,), generator=g)
        if ignore:
            y.view(-1)[::3] = -100
    w = torch.rand(C, generator=g, dtype=torch.float64) + 0.5
    return z.to(device), y.to(device), w.to(device)


def run_ours(z, y, w, dtype, go, **kw):
    leaf = z.to(dtype).clone().requires_grad_()
    inp = leaf * 1 if kw.get("inplace_backward") else leaf  # in place: logits are destroyed
    out = xt.cross_entropy(inp, y if not y.is_floating_point() else y.to(dtype), w, **kw)
    out.backward(go.to(out.dtype))
    return out, leaf.grad


def run_ref(z, y, w, go, reduction, label_smoothing):
    leaf = z.clone().requires_grad_()
    out = F.cross_entropy(leaf, y, w, reduction=reduction, label_smoothing=label_smoothing)
    out.backward(torch.ones_like(out) if go is None else go)
    return out, leaf.grad


def grad_output(ref, seed=1):
    g = torch.Generator().manual_seed(seed)  # random, never all ones (PITFALLS 12)
    return (torch.rand(ref.shape, generator=g, dtype=torch.float64) + 0.25).to(ref.device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "reduction,weighted,smoothing,ignore,kdim,inplace",
    list(itertools.product(["mean", "sum", "none"], [False, True], [0.0, 0.2], [False, True],
                           [False, True], [False, True])),
)
def test_index_targets_match_torch(device, reduction, weighted, smoothing, ignore, kdim,
                                   inplace):
    z, y, w = make(device, kdim=kdim, ignore=ignore)
    w = w if weighted else None
    ref, _ = run_ref(z, y, w, None, reduction, smoothing)
    go = grad_output(ref)
    ref, ref_grad = run_ref(z, y, w, go, reduction, smoothing)
    out, grad = run_ours(z, y, None if w is None else w.float(), torch.float32, go,
                         reduction=reduction, label_smoothing=smoothing, inplace_backward=inplace)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    close(out, ref)
    close(grad, ref_grad)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "reduction,weighted,smoothing,kdim",
    list(itertools.product(["mean", "sum", "none"], [False, True], [0.0, 0.2], [False, True])),
)
def test_probability_targets_match_torch(device, reduction, weighted, smoothing, kdim):
    z, y, w = make(device, kdim=kdim, prob=True)
    w = w if weighted else None
    ref, ref_grad = run_ref(z, y, w, None, reduction, smoothing)
    out, grad = run_ours(z, y, None if w is None else w.float(), torch.float32,
                         torch.ones_like(ref), reduction=reduction, label_smoothing=smoothing)
    close(out, ref)
    close(grad, ref_grad)
    go = grad_output(ref)
    _, ref_grad = run_ref(z, y, w, go, reduction, smoothing)
    _, grad = run_ours(z, y, None if w is None else w.float(), torch.float32, go,
                       reduction=reduction, label_smoothing=smoothing)
    close(grad, ref_grad)


def core_ref(z, y, w, go, **kw):
    """crossent's core loss (the semantic reference), differentiated by torch autograd."""
    leaf = z.clone().requires_grad_()
    out = xe.softmax_cross_entropy(leaf, y, axis=1, weight=w, **kw)
    out.backward(go)
    return out, leaf.grad


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "reduction,z_loss,softcap,smoothing,weighted,target",
    list(itertools.product(["mean", "sum", "none"], [0.0, 1e-2], [None, 3.0], [0.0, 0.2],
                           [False, True], ["index", "ignore", "prob"])),
)
def test_z_loss_and_softcap_match_core(device, reduction, z_loss, softcap, smoothing, weighted,
                                       target):
    z, y, w = make(device, prob=target == "prob", ignore=target == "ignore")
    w = w if weighted else None
    kw = dict(reduction=reduction, z_loss=z_loss, softcap=softcap, label_smoothing=smoothing)
    shape = (len(z),) if reduction == "none" else ()
    ref, _ = core_ref(z, y, w, torch.ones(shape, dtype=torch.float64, device=device), **kw)
    go = grad_output(ref)
    ref, ref_grad = core_ref(z, y, w, go, **kw)
    out, grad = run_ours(z, y, None if w is None else w.float(), torch.float32, go, **kw)
    close(out, ref)
    close(grad, ref_grad)
    out, grad = run_ours(z, y, None if w is None else w.float(), torch.float32, go,
                         inplace_backward=True, **kw)
    close(out, ref)
    close(grad, ref_grad)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction,smoothing,inplace",
                         list(itertools.product(["mean", "none"], [0.0, 0.1], [False, True])))
def test_low_precision_within_rounding(device, dtype, reduction, smoothing, inplace):
    z, y, _ = make(device, n=64, ignore=True)
    z = z.to(dtype).double()  # the values the low-precision kernel sees
    ref, ref_grad = run_ref(z, y, None, None, reduction, smoothing)
    go = grad_output(ref)
    ref, ref_grad = run_ref(z, y, None, go, reduction, smoothing)
    out, grad = run_ours(z, y, None, dtype, go, reduction=reduction, label_smoothing=smoothing,
                         inplace_backward=inplace)
    assert out.dtype == dtype and grad.dtype == dtype
    close(out, ref, rtol=1e-2)
    close(grad, ref_grad, rtol=1e-2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_confident_true_class_gradient_survives_rounding(device, dtype):
    # p_y = 1 - 1e-3: p - 1 must be formed in float32, then rounded (PITFALLS 6)
    z = torch.zeros(4, C, device=device)
    z[:, 0] = torch.log(torch.tensor((1 - 1e-3) * (C - 1) / 1e-3))
    y = torch.zeros(4, dtype=torch.long, device=device)
    leaf = z.to(dtype).requires_grad_()
    xt.cross_entropy(leaf, y, reduction="sum").backward()
    ref = torch.autograd.grad(F.cross_entropy(z.requires_grad_(), y, reduction="sum"), z)[0]
    assert torch.all(leaf.grad[:, 0] != 0)
    close(leaf.grad, ref, rtol=1e-2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("inplace", [False, True])
def test_low_precision_underflowing_and_masked_targets(device, dtype, inplace):
    # low-precision logits skip the row max; rows whose p_y underflows (or whose target
    # logit is -inf) must still get lse from their max, z-loss included
    z, y, _ = make(device, n=40)
    z[2, y[2]] -= 120.0
    z[5, y[5]] = -float("inf")
    z = z.to(dtype).double()
    kw = dict(reduction="none", z_loss=1e-2, softcap=None, label_smoothing=0.0)
    ref, _ = core_ref(z, y, None, torch.ones(len(z), dtype=torch.float64, device=device), **kw)
    go = grad_output(ref)
    ref, ref_grad = core_ref(z, y, None, go, **kw)
    out, grad = run_ours(z, y, None, dtype, go, inplace_backward=inplace, **kw)
    assert out[5] == float("inf") and torch.isfinite(out[2])
    finite = torch.isfinite(ref)
    close(out[finite], ref[finite], rtol=1e-2)
    close(grad, ref_grad, rtol=1e-2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction,weighted", itertools.product(["mean", "sum", "none"],
                                                                 [False, True]))
def test_all_ignored_batch(device, reduction, weighted):
    z, _, w = make(device)
    y = torch.full((len(z),), -100, device=device)
    w = w if weighted else None
    ref, ref_grad = run_ref(z, y, w, None, reduction, 0.1)
    out, grad = run_ours(z, y, None if w is None else w.float(), torch.float32,
                         torch.ones_like(ref), reduction=reduction, label_smoothing=0.1)
    if reduction == "mean":
        assert torch.isnan(out) and torch.isnan(ref)  # 0/0 on purpose, like torch
    close(out, ref)
    close(grad, ref_grad)
    assert torch.all(grad == 0)  # torch's gradient is 0, not NaN, even for "mean"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("smoothing,inplace", itertools.product([0.0, 0.1], [False, True]))
def test_minus_inf_logits(device, smoothing, inplace):
    z, y, _ = make(device)
    z[0, y[0]] = -float("inf")  # the target class itself is masked: loss +inf
    z[1, (y[1] + 1) % C] = -float("inf")  # a masked non-target class
    ref, ref_grad = run_ref(z, y, None, None, "none", smoothing)
    out, grad = run_ours(z, y, None, torch.float32, torch.ones_like(ref), reduction="none",
                         label_smoothing=smoothing, inplace_backward=inplace)
    assert out[0] == float("inf")
    close(out, ref)
    close(grad, ref_grad)
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("device", DEVICES)
def test_large_logits_and_underflowing_target(device):
    z, y, _ = make(device)
    z = (z + 1e4).float().double()  # the float32 values the kernel sees
    z[2, y[2]] -= 200.0  # p_y underflows float32: lse from the row max instead
    for smoothing in (0.0, 0.1):
        ref, ref_grad = run_ref(z, y, None, None, "none", smoothing)
        out, grad = run_ours(z, y, None, torch.float32, torch.ones_like(ref),
                             reduction="none", label_smoothing=smoothing)
        close(out, ref, rtol=1e-4)  # float32 logits near 1e4 carry 1e-3 absolute rounding
        close(grad, ref_grad)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("target,reduction", itertools.product(["index", "ignore", "prob"],
                                                               ["mean", "none"]))
def test_gradcheck_float64(device, target, reduction):
    z, y, w = make(device, n=5, prob=target == "prob", ignore=target == "ignore")
    z.requires_grad_()

    def f(logits):
        return xt.cross_entropy(logits, y, w, reduction=reduction, label_smoothing=0.1,
                                z_loss=1e-2, softcap=4.0)

    assert torch.autograd.gradcheck(f, (z,))


@pytest.mark.parametrize("device", DEVICES)
def test_no_grad_computes_no_gradient(device):
    z, y, _ = make(device)
    keep = z.float().clone()
    z32 = keep.clone()
    with torch.no_grad():
        out = xt.cross_entropy(z32.requires_grad_(), y, inplace_backward=True)
    assert out.grad_fn is None
    assert torch.equal(z32, keep)  # nothing written into the logits
    out = xt.cross_entropy(z32.detach(), y, inplace_backward=True)
    assert out.grad_fn is None and torch.equal(z32, keep)
    close(out, F.cross_entropy(keep, y))


@pytest.mark.parametrize("device", DEVICES)
def test_inplace_backward_reuses_the_logits_storage(device):
    z, y, _ = make(device)
    leaf = z.float().requires_grad_()
    logits = leaf * 2
    ptr = logits.data_ptr()
    seen = {}

    def hook(grad):
        seen["ptr"] = grad.data_ptr()

    logits.register_hook(hook)
    xt.cross_entropy(logits, y, inplace_backward=True).backward()
    assert seen["ptr"] == ptr  # the gradient lives where the logits were
    ref_leaf = z.float().requires_grad_()
    F.cross_entropy(ref_leaf * 2, y).backward()
    close(leaf.grad, ref_leaf.grad)


@pytest.mark.parametrize("device", DEVICES)
def test_one_dimensional_input_and_scalar_target(device):
    z, y, _ = make(device)
    for reduction in ("mean", "none"):
        ref, ref_grad = run_ref(z[0], y[0], None, None, reduction, 0.0)
        out, grad = run_ours(z[0], y[0], None, torch.float32, torch.ones_like(ref),
                             reduction=reduction)
        assert out.shape == ref.shape
        close(out, ref)
        close(grad, ref_grad)


def test_backward_twice_raises():  # float32: the stored gradient was consumed
    z, y, _ = make("cpu")
    leaf = z.float().requires_grad_()
    out = xt.cross_entropy(leaf, y)
    out.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        out.backward()


def test_bad_arguments_raise():
    z, y, w = make("cpu")
    with pytest.raises(IndexError, match="outside"):
        xt.cross_entropy(z, torch.full_like(y, C))
    with pytest.raises(ValueError, match="shape"):
        xt.cross_entropy(z, y[:-1])
    with pytest.raises(ValueError, match="weight"):
        xt.cross_entropy(z, y, w[:-1])
    with pytest.raises(ValueError, match="reduction"):
        xt.cross_entropy(z, y, reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing"):
        xt.cross_entropy(z, y, label_smoothing=1.5)
    with pytest.raises(ValueError, match="softcap"):
        xt.cross_entropy(z, y, softcap=0.0)


def test_many_blocks_match_torch():
    # more rows than one block, with a ragged last block
    z = torch.randn(300, 5000)
    y = torch.randint(0, 5000, (300,))
    y[::7] = -100
    leaf = z.clone().requires_grad_()
    out = xt.cross_entropy(leaf, y, label_smoothing=0.1)
    out.backward()
    ref_leaf = z.double().requires_grad_()
    ref = F.cross_entropy(ref_leaf, y, label_smoothing=0.1)
    ref.backward()
    close(out, ref)
    close(leaf.grad, ref_leaf.grad)


def test_positional_signature_is_torchs():
    import inspect

    ours = list(inspect.signature(xt.cross_entropy).parameters)[:8]
    assert ours == list(inspect.signature(F.cross_entropy).parameters)[:8]
    z, y, w = make("cpu")
    y[0] = 2
    leaf = z.float().requires_grad_()
    got = xt.cross_entropy(leaf, y, w.float(), None, 2, None, "sum", 0.1)  # ignore_index=2
    close(got, F.cross_entropy(z, y, w, None, 2, None, "sum", 0.1))


@pytest.mark.parametrize("size_average,reduce,reduction", [
    (False, None, "sum"), (None, False, "none"), (True, True, "mean"), (False, False, "none")])
def test_deprecated_size_average_and_reduce_map_as_in_torch(size_average, reduce, reduction):
    z, y, _ = make("cpu")
    with pytest.warns(UserWarning, match=f"reduction='{reduction}'"):
        got = xt.cross_entropy(z.float(), y, size_average=size_average, reduce=reduce)
    close(got, F.cross_entropy(z, y, reduction=reduction))
