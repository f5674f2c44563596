"""Review H88: inputs changed in place between forward and backward under saved-tensor
hooks (``save_on_cpu``, a copying ``saved_tensors_hooks``) and activation checkpointing.

torch checks no saved-tensor version under hooks: its backward reads whatever the unpack
hook returns. ``save_on_cpu`` on a CPU tensor packs the tensor itself, so torch's backward
reads the changed value (a class-index target changed: ``nll_loss``'s backward puts the
``-1`` at the new class; a class weight: the new weights; the linear head: ``F.linear``'s
backward reads the changed ``x`` / ``W``). A copying hook gives torch the forward-time
values. torch's ``log_softmax`` saves its output, so a change of the logits themselves
never reaches torch's backward. Non-reentrant checkpointing re-runs the region in
backward, from the tensors as they are then (and saves the region's inputs, so their
change raises); reentrant checkpointing re-runs it from scratch.

Each case runs crossent and torch the same way (same hook, same change) and requires
torch's gradient, or an exception where torch raises; a loud ``RuntimeError`` from
crossent is accepted where torch gives a number (the contract: the reference's result or
an exception). ``num_items`` is H87's and is not tested here. The module keeps the real
size dispatch (``native_dispatch``): the auto routes by size are part of the topic.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch.autograd.graph import save_on_cpu, saved_tensors_hooks
from torch.utils.checkpoint import checkpoint

import crossent.torch as xt
from crossent.torch.distributed import (
    vocab_parallel_cross_entropy,
    vocab_parallel_linear_cross_entropy,
)

pytestmark = pytest.mark.native_dispatch


# route -> (rows, classes, backend). "auto": few classes (or < 240000 logits) go to torch's
# kernel; float32 class indices from 240000 logits to the small kernel at any size
# (SMALL_MAX_LOGITS_FLOAT32), so "auto-large" is the small kernel for index targets and
# the row-block kernel for probability targets and class weights, which the small kernel
# does not take (the "auto-small" weighted / probability calls are torch's kernel)
ROUTES = {
    "auto-few": (8, 5, "auto"),
    "auto-small": (256, 1000, "auto"),
    "auto-large": (64, 10000, "auto"),
    "native": (16, 50, "native"),
    "rowblock": (16, 50, "rowblock"),
    "vocab-parallel": (16, 50, "vp"),
}


def _hooks(kind: str):
    if kind == "none":
        return contextlib.nullcontext()
    if kind == "save_on_cpu":
        return save_on_cpu()
    return saved_tensors_hooks(lambda t: t.clone(), lambda t: t)  # "copying"


def _outcome(run):
    """``"raise"`` for a ``RuntimeError`` at forward or backward, else the gradients."""
    try:
        return run()
    except RuntimeError:
        return "raise"


def _torchs_or_loud(got, want):
    """torch's gradients, or an exception; an exception wherever torch raises."""
    if isinstance(want, str):
        assert got == "raise", "torch raises here; crossent gave a gradient silently"
        return
    if isinstance(got, str):
        return  # loud: allowed by the contract
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def _loss_fn(backend: str):
    if backend == "torch":
        return lambda z, t, w: F.cross_entropy(z, t, w, reduction="sum")
    if backend == "vp":
        return lambda z, t, w: vocab_parallel_cross_entropy(z, t, weight=w, reduction="sum")
    return lambda z, t, w: xt.cross_entropy(z, t, w, reduction="sum", backend=backend)


def _inputs(rows, classes, change):
    g = torch.Generator().manual_seed(rows * 7 + classes)
    z = torch.randn(rows, classes, generator=g)
    if change == "probability target":
        t = torch.softmax(torch.randn(rows, classes, generator=g), 1)
    else:
        t = torch.randint(0, classes, (rows,), generator=g)
    w = torch.rand(classes, generator=g) + 0.5 if change == "class weight" else None
    return z, t, w


def _change(change, t, w, classes):
    with torch.no_grad():
        if change == "index target":
            t[0] = (t[0] + 1) % classes
        elif change == "probability target":
            t[0] = torch.roll(t[0].clone(), 1)
        elif change == "class weight":
            w.mul_(3.0)
            w[int(t[0])] += 5.0


def _ce_grads(backend, route, change, kind):
    rows, classes, _ = ROUTES[route]
    z0, t, w = _inputs(rows, classes, change)
    z = z0.clone().requires_grad_()
    with _hooks(kind):
        loss = _loss_fn(backend)(z, t, w)
    _change(change, t, w, classes)
    loss.backward()
    return (z.grad,)


def _ce_case(route, change, kind):
    want = _outcome(lambda: _ce_grads("torch", route, change, kind))
    got = _outcome(lambda: _ce_grads(ROUTES[route][2], route, change, kind))
    _torchs_or_loud(got, want)


def _skip_vp_probabilities(route, change):
    if route == "vocab-parallel" and change == "probability target":
        pytest.skip("vocab_parallel_cross_entropy takes class indices only")


# ------------------------------------------------------------ cross_entropy: copying hooks

@pytest.mark.parametrize("change", ["index target", "probability target"])
@pytest.mark.parametrize("route", list(ROUTES))
def test_copying_hook_target_change_gives_forward_time_gradient(route, change):
    """A copying hook hands torch the forward's target: every route agrees."""
    _skip_vp_probabilities(route, change)
    _ce_case(route, change, "copying")


# H88-5 (fixed at stop 35): vocab_parallel_cross_entropy read a class weight changed in
# place after forward again in backward, for the target entry only (the rest of the row
# kept the forward's weight): a silent gradient where torch raises (no hook), not torch's
# forward-time gradient (copying hook), not torch's whole-row rescale (save_on_cpu)


@pytest.mark.parametrize("route", list(ROUTES))
def test_copying_hook_class_weight_change_gives_forward_time_gradient(route):
    _ce_case(route, "class weight", "copying")


@pytest.mark.parametrize("route", list(ROUTES))
def test_class_weight_change_without_hooks_raises_as_torch(route):
    _ce_case(route, "class weight", "none")


# --------------------------------------------------- cross_entropy: save_on_cpu (no copy)

# H88-1..3 (fixed at stop 35): under save_on_cpu (a hook that returns the CPU tensor
# itself) a class-index target, probability target or class weight changed in place
# before backward gave the gradient the fused kernels stored in forward, silently
# (remember_target skipped its watch under hooks); torch's backward reads the new values


def _save_on_cpu_params():
    return [pytest.param(route, change, id=f"{route}-{change}")
            for change in ("index target", "probability target", "class weight")
            for route in ROUTES
            if not (route == "vocab-parallel" and change == "probability target")]


@pytest.mark.parametrize(("route", "change"), _save_on_cpu_params())
def test_save_on_cpu_input_change_follows_torch(route, change):
    """torch reads the changed target/weight under save_on_cpu; crossent must too, or
    raise. Guards: torch's kernel (few classes, native, the small kernel's weighted
    fallback) and the vocab-parallel index target already follow torch."""
    _ce_case(route, change, "save_on_cpu")


# ------------------------------------------------------------------- the logits themselves

def _logit_grads(backend, route, kind):
    rows, classes, _ = ROUTES[route]
    z0, t, _ = _inputs(rows, classes, "index target")
    leaf = z0.clone().requires_grad_()
    z = leaf * 1.0  # an activation: in place allowed
    with _hooks(kind):
        loss = _loss_fn(backend)(z, t, None)
    with torch.no_grad():
        z.mul_(3.0)
    loss.backward()
    return (leaf.grad,)


# H88-6 (fixed at stop 35): vocab_parallel_cross_entropy under save_on_cpu recomputed
# from logits changed in place after forward; torch's log_softmax saved its output, so
# torch gives the forward-time gradient (crossent now raises: loud, allowed)
@pytest.mark.parametrize(("route", "kind"), [
    pytest.param(route, kind, id=f"{route}-{kind}")
    for route in ROUTES for kind in ("none", "save_on_cpu", "copying")])
def test_logits_changed_in_place_give_torchs_forward_time_gradient(route, kind):
    """torch's cross_entropy saves log_softmax's output, not the logits: a later change of
    the logits does not reach its backward, under any hook."""
    want = _outcome(lambda: _logit_grads("torch", route, kind))
    got = _outcome(lambda: _logit_grads(ROUTES[route][2], route, kind))
    _torchs_or_loud(got, want)


# ------------------------------------------------------------------------ the linear head

def _head_fn(backend):
    if backend == "torch":
        return lambda x, w, t: F.cross_entropy(F.linear(x, w), t, reduction="sum")
    if backend == "vp":
        return lambda x, w, t: vocab_parallel_linear_cross_entropy(x, w, t, reduction="sum")
    return lambda x, w, t: xt.linear_cross_entropy(x, w, t, reduction="sum", backend=backend)


def _head_grads(backend, change, kind, reentrant=None):
    g = torch.Generator().manual_seed(3)
    x_leaf = torch.randn(16, 8, generator=g).requires_grad_()
    w_leaf = (torch.randn(50, 8, generator=g) * 0.3).requires_grad_()
    t = torch.randint(0, 50, (16,), generator=g)
    x, w = x_leaf * 1.0, w_leaf * 1.0  # activations: in place allowed
    fn = _head_fn(backend)
    if reentrant is None:
        with _hooks(kind):
            loss = fn(x, w, t)
    else:
        loss = checkpoint(lambda x, w: fn(x, w, t), x, w, use_reentrant=reentrant)
    with torch.no_grad():
        if change == "input":
            x.mul_(2.0)
        elif change == "linear_weight":
            w.mul_(2.0)
        else:
            t[0] = (t[0] + 1) % 50
    loss.backward()
    return x_leaf.grad, w_leaf.grad


# H88-4 (fixed at stop 35): the row-block head and vocab_parallel_linear_cross_entropy
# under save_on_cpu gave the forward-time gradients for an input / linear_weight / target
# changed in place after forward; torch's F.linear backward reads the new x and W
@pytest.mark.parametrize("change", ["input", "linear_weight", "target"])
@pytest.mark.parametrize("backend", ["auto", "rowblock", "vp"])
@pytest.mark.parametrize("kind", ["save_on_cpu", "copying", "none"])
def test_linear_head_input_change_under_hooks_follows_torch(backend, kind, change):
    want = _outcome(lambda: _head_grads("torch", change, kind))
    got = _outcome(lambda: _head_grads(backend, change, kind))
    _torchs_or_loud(got, want)


# ---------------------------------------------------------------- activation checkpointing

def _checkpoint_grads(backend, route, change, reentrant):
    rows, classes, _ = ROUTES[route]
    z0, t, w = _inputs(rows, classes, "class weight" if change == "class weight"
                       else change if change != "logits" else "index target")
    leaf = z0.clone().requires_grad_()
    z = leaf * 1.0
    fn = _loss_fn(backend)
    loss = checkpoint(lambda z: fn(z, t, w), z, use_reentrant=reentrant)
    if change == "logits":  # a region input: torch's checkpoint saved it, and raises
        with torch.no_grad():
            z.mul_(3.0)
    else:
        _change(change, t, w, classes)
    loss.backward()
    return (leaf.grad,)


# H88-7 (fixed at stop 35): under non-reentrant checkpointing a target or class weight
# the region closes over, changed in place before backward, gave the gradient stored by
# the first forward; torch's backward re-runs the region with the new values.
# H88-8: a region input (the logits; the head's x or W) changed in place: torch's
# checkpoint raises on the recompute; crossent's backward unpacked nothing, so no
# recompute ran and it returned the first forward's gradient silently


def _checkpoint_params():
    return [pytest.param(route, change, reentrant,
                         id=f"{route}-{change}-{'reentrant' if reentrant else 'nonreentrant'}")
            for reentrant in (False, True)
            for change in ("index target", "probability target", "class weight", "logits")
            for route in ROUTES
            if not (route == "vocab-parallel" and change == "probability target")]


@pytest.mark.parametrize(("route", "change", "reentrant"), _checkpoint_params())
def test_checkpointed_loss_input_change_follows_torch(route, change, reentrant):
    want = _outcome(lambda: _checkpoint_grads("torch", route, change, reentrant))
    got = _outcome(lambda: _checkpoint_grads(ROUTES[route][2], route, change, reentrant))
    _torchs_or_loud(got, want)


def _checkpointed_head_params():
    return [pytest.param(backend, reentrant, change,
                         id=f"{backend}-{'reentrant' if reentrant else 'nonreentrant'}-{change}")
            for backend in ("auto", "rowblock", "vp") for reentrant in (False, True)
            for change in ("input", "linear_weight", "target")]


@pytest.mark.parametrize(("backend", "reentrant", "change"), _checkpointed_head_params())
def test_checkpointed_linear_head_input_change_follows_torch(backend, reentrant, change):
    want = _outcome(lambda: _head_grads("torch", change, "none", reentrant))
    got = _outcome(lambda: _head_grads(backend, change, "none", reentrant))
    _torchs_or_loud(got, want)
