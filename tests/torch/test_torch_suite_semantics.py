"""The cross-entropy cases of PyTorch's own test suite, applied to ``crossent.torch``.

Derived (no code copied) from what torch 2.13 ships and tests:

* ``torch.testing._internal.common_modules``: every ``ModuleInfo`` sample of
  ``nn.CrossEntropyLoss`` (2-d, 3-d, 4-d and 6-d inputs, unbatched ``(C,)`` input, signed
  class weights, ``ignore_index``, label smoothing, probability targets, every
  reduction: values, first and second derivatives, forward-mode AD) and a stratified
  subset of ``nn.LinearCrossEntropyLoss``'s, and the error inputs of both modules and of
  ``NLLLoss``;
* ``common_methods_invocations``: the error inputs of the ``linear_cross_entropy`` OpInfo
  (the OpInfo *samples* are ``test_opinfo.py``'s);
* ``test/test_nn.py`` / ``test/nn/test_loss.py`` / ``test/nn/test_linear_cross_entropy.py``:
  K-dimensional losses with class weights, ``ignore_index`` (inside and outside
  ``[0, C)``) and label smoothing together on strided and channels-last logits; one-hot,
  soft, unnormalised and signed probability targets with weights (gradients of the
  logits, the target and the weights); empty batches and ``C = 0``; all targets ignored;
  a zero weight sum; ``C = 1``; uint8 targets with ``ignore_index=255``; 0-d and 1-d
  inputs; large and infinite logits; float16/bfloat16 accuracy and long reductions; the
  deprecated ``size_average``/``reduce``; out-of-range class indices;
* module API parity: constructor signature, ``state_dict`` both ways, pickle,
  ``torch.save``, deepcopy, ``.to(dtype)`` of the weight buffer, attributes changed after
  construction, legacy constructor arguments, hooks, ``extra_repr``, ``isinstance``,
  ``torch.jit.script``.

The reference is torch on the same (rounded) values in float64; torch in the tested dtype
only sets the tolerance: crossent's largest error may not exceed four times torch's own
plus about one unit in the last place of the terms' size, NaN/inf where torch's float64
answer has them, and elsewhere either a finite number or torch's own overflow.
Every case runs on every CPU route: ``backend="auto"`` (torch's own dispatch thresholds),
the row-block kernel (16-row blocks, so most cases span several), the small-batch fused
kernel (``SMALL_MIN_LOGITS`` lowered; a spy asserts it ran) and ``backend="native"``.
One OpenMP thread (tiny tensors; a shared machine's barriers would otherwise dominate).
Each discrepancy found (nine) failed here before its fix in crossent; the tests name it.
"""

from __future__ import annotations

import copy
import inspect
import io
import math
import pickle
import re
import warnings
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import crossent.torch as xt
from crossent.errors import InputError, UnsupportedError
from crossent.torch import _backends, _rules, _small

pytest.importorskip("expecttest")  # torch.testing._internal needs it (the test extra)

pytestmark = [pytest.mark.native_dispatch, pytest.mark.timeout(120)]

REFUSED = (InputError, UnsupportedError)
LOW = (torch.float16, torch.bfloat16)
# about one unit in the last place of the largest entry, on top of 4x torch's own error
BASE = {torch.float64: 1e-10, torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
REDUCTIONS = ("mean", "sum", "none")
BLOCK_BYTES = _rules._BLOCK_BYTES
_SMALL_CALLS: list[int] = []


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@dataclass(frozen=True)
class Route:
    name: str
    backend: str

    def small_taken_since(self, before: int) -> bool:
        return len(_SMALL_CALLS) > before


@pytest.fixture(params=["auto", "rowblock", "small", "native"])
def route(request, monkeypatch):
    """A CPU route: ``small`` is ``backend="auto"`` with the small-batch kernel's threshold
    lowered to 1 logit; a spy counts the calls that reach that kernel. The row-block kernel
    runs 16-row blocks (its smallest), so that most cases here span several."""
    real = _small._SmallCrossEntropy.apply

    def spy(*args):
        _SMALL_CALLS.append(1)
        return real(*args)

    monkeypatch.setattr(_small._SmallCrossEntropy, "apply", spy)
    monkeypatch.setattr(_rules, "_BLOCK_BYTES", 0)  # 16-row blocks: block edges get tested
    if request.param == "small":
        monkeypatch.setattr(_backends, "SMALL_MIN_LOGITS", 1)
        return Route("small", "auto")
    return Route(request.param, request.param)


def _skip_torch_kernel_in_float64(route: Route, dtype: torch.dtype) -> None:
    """The big grids run float64 on crossent's kernels only ('auto' and 'native' are
    torch's kernel there for most cases; their float32 runs cover the wrappers)."""
    if dtype == torch.float64 and route.name in ("auto", "native"):
        pytest.skip("float64 on torch's own kernel: covered by the float32 run")


# ---- running a loss three ways and comparing


def _cast(t, dtype):
    """A fresh copy of ``t`` in ``dtype`` with ``t``'s strides (a strided view stays one:
    ``clone`` and ``to`` make non-dense tensors contiguous)."""
    v = t.detach().to(dtype).clone()
    if v.stride() != t.stride():
        v = torch.empty((*t.shape, 2), dtype=dtype)[..., 0].copy_(t.detach())
    return v


def _run(fn, x, target, weight, dtype, grads, seed, go_dtype, **kwargs):
    """``fn`` on fresh leaves of ``x``, ``target`` and ``weight`` (floating ones cast to
    ``dtype``); returns the loss and the gradients of the names in ``grads`` for a random,
    non-contiguous ``grad_output`` (from ``seed``, rounded to ``go_dtype``: the same for
    every caller)."""
    leaves = {}

    def leaf(name, t):
        if t is None or not t.is_floating_point():
            return None if t is None else t.clone()
        v = _cast(t, dtype)
        if name in grads:
            leaves[name] = v.requires_grad_()
        return v

    inp, tgt, w = leaf("input", x), leaf("target", target), leaf("weight", weight)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # size_average/reduce deprecation
        out = fn(inp, tgt, weight=w, **kwargs)
    g = torch.Generator().manual_seed(seed)
    go = torch.rand((*out.shape, 2), generator=g, dtype=torch.float64)[..., 0]  # strided
    go = (go + 0.25).to(go_dtype)
    names = list(leaves)
    got = torch.autograd.grad(out, [leaves[n] for n in names], go.to(out.dtype),
                              allow_unused=True)
    return out.detach(), dict(zip(names, got, strict=True))


def _close(got, same, ref, dtype, what, magnitude=None):
    """``got`` (crossent) against ``ref`` (torch, float64) no worse than ``same`` (torch in
    ``dtype``), with torch's NaN/inf entries. ``magnitude``: the size of the terms that
    cancel in ``ref`` (signed weights or targets, ``p - 1`` near 1), for the rounding
    allowance."""
    assert got is not None, f"{what}: no gradient where torch has one"
    assert got.dtype == same.dtype and got.shape == same.shape, (
        what, got.dtype, same.dtype, got.shape, same.shape)
    # NaN/inf: where torch's float64 answer rounded to dtype has them, the same; elsewhere
    # either a finite number (checked below) or torch's own overflow in dtype, reproduced
    rounded = ref.detach().to(dtype).double()
    g, s, r = (t.detach().double() for t in (got, same, ref))
    true_finite = torch.isfinite(rounded)
    torch.testing.assert_close(g[~true_finite], rounded[~true_finite], rtol=0, atol=0,
                               equal_nan=True, msg=lambda m: f"{what}: {m} {g} {rounded}")
    overflow = true_finite & ~torch.isfinite(g)
    torch.testing.assert_close(g[overflow], s[overflow], rtol=0, atol=0, equal_nan=True,
                               msg=lambda m: f"{what}: non-finite where torch is not: {m}")
    both = true_finite & torch.isfinite(g) & torch.isfinite(r)
    if both.any():
        scale = float(r[both].abs().max())
        if magnitude is not None and torch.isfinite(magnitude).any():
            m = magnitude.detach().double()
            scale = max(scale, float(m[torch.isfinite(m)].abs().max()))
        # (the 0.05 floor: where torch's answer is an exact 0, e.g. C = 1, crossent's
        # p - t is rounded)
        ours = float((g[both] - r[both]).abs().max())
        fair = both & torch.isfinite(s)
        theirs = float((s[fair] - r[fair]).abs().max()) if fair.any() else 0.0
        assert ours <= 4 * theirs + BASE[dtype] * max(scale, 0.05), (
            f"{what}: error {ours:.3g} (torch's in {dtype}: {theirs:.3g}, scale {scale:.3g})")


def check(ours, theirs, x, target, weight=None, *, dtype, grads=("input",), seed=0,
          what="", **kwargs):
    """crossent's ``ours`` against torch's ``theirs`` (value and the gradients in ``grads``,
    with a random ``grad_output``) on ``x``, ``target``, ``weight`` rounded to ``dtype``:
    the reference is ``theirs`` in float64 on the rounded values."""
    x = _cast(x, dtype)
    target = _cast(target, dtype) if target.is_floating_point() else target
    weight = None if weight is None else _cast(weight, dtype)
    ref = _run(theirs, x, target, weight, torch.float64, grads, seed, dtype, **kwargs)
    same = ref if dtype == torch.float64 else _run(theirs, x, target, weight, dtype, grads,
                                                    seed, dtype, **kwargs)
    got = _run(ours, x, target, weight, dtype, grads, seed, dtype, **kwargs)
    # the terms' size: uniform softmax (no p - 1 cancellation), |target|, |weight|
    size = _run(theirs, torch.zeros_like(x), target.abs() if target.is_floating_point()
                else target, None if weight is None else weight.abs(), torch.float64, grads,
                seed, dtype, **kwargs)
    _close(got[0], same[0], ref[0], dtype, f"{what} loss", size[0])
    for name, want in ref[1].items():
        if want is None:
            assert got[1][name] is None or not got[1][name].any(), (what, name)
            continue
        _close(got[1][name], same[1][name], want, dtype, f"{what} d/d{name}", size[1][name])


def _ours(route: Route):
    def fn(x, t, weight=None, **kwargs):
        return xt.cross_entropy(x, t, weight, backend=route.backend, **kwargs)
    return fn


def _theirs(x, t, weight=None, **kwargs):
    return F.cross_entropy(x, t, weight, **kwargs)


def _theirs_int64(x, t, weight=None, **kwargs):
    return F.cross_entropy(x, t.long(), weight, **kwargs)


# ---- ModuleInfo: nn.CrossEntropyLoss


@pytest.fixture(scope="module")
def module_db():
    from torch.testing._internal.common_modules import module_db

    return {info.module_cls: info for info in module_db}


@pytest.fixture(scope="module")
def ce_samples(module_db):
    info = module_db[nn.CrossEntropyLoss]
    with torch.random.fork_rng():  # make_tensor draws from the global generator
        torch.manual_seed(0)
        samples = info.module_inputs_func(info, device="cpu", dtype=torch.float64,
                                          requires_grad=True, training=True)
    assert len(samples) > 100
    return samples


def _module_fn(cls, constructor_kwargs, **extra):
    def fn(x, t, weight=None, **_):
        return cls(**constructor_kwargs, weight=weight, **extra)(x, t)
    return fn


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_every_module_info_sample_matches_torch(ce_samples, route, dtype):
    """torch's ModuleInfo lists float32, float64 and float16 for CrossEntropyLoss (bfloat16:
    test_low_precision_at_least_as_accurate_as_torch)."""
    if dtype in LOW and route.name in ("small", "native"):
        pytest.skip("low precision: 'small' is 'auto' there; 'native' covered by 'auto'")
    _skip_torch_kernel_in_float64(route, dtype)
    before = len(_SMALL_CALLS)
    for k, sample in enumerate(ce_samples):
        kwargs = dict(sample.constructor_input.kwargs)
        weight = kwargs.pop("weight", None)
        x, target = sample.forward_input.args
        grads = ("input", "target") if target.is_floating_point() else ("input",)
        check(_module_fn(xt.CrossEntropyLoss, kwargs, backend=route.backend),
              _module_fn(nn.CrossEntropyLoss, kwargs), x.detach(), target.detach(),
              None if weight is None else weight.detach(), dtype=dtype, grads=grads, seed=k,
              what=f"{sample.desc} ({k})")
    if route.name == "small" and dtype in (torch.float32, torch.float64):
        assert route.small_taken_since(before), "the small-batch kernel never ran"


def _second_order(fn, x, target, go, v):
    """Double backward (d/dx and, for a probability target, d/dt of <d loss/dx, v>) and
    forward-mode AD (jvp along v) of ``fn`` at float64 leaves."""
    x = x.detach().clone().requires_grad_()
    t = target.detach().clone().requires_grad_() if target.is_floating_point() else target
    out = fn(x, t)
    (dx,) = torch.autograd.grad(out, x, go.reshape(out.shape), create_graph=True)
    leaves = [x, t] if t.requires_grad else [x]
    hvp = torch.autograd.grad((dx * v).sum(), leaves, allow_unused=True)
    _, tangent = torch.func.jvp(lambda z: fn(z, t.detach()), (x.detach(),), (v,))
    return [h if h is not None else torch.zeros_like(leaf) for h, leaf in zip(hvp, leaves,
                                                                             strict=True)
            ] + [tangent]


@pytest.mark.parametrize("name", ["rowblock", "small"])
def test_module_info_double_backward_and_forward_ad_match_torch(ce_samples, name,
                                                                 monkeypatch):
    """ModuleInfo's test_grad/test_gradgrad/forward-AD checks against torch's own
    analytic second derivatives (float64): Hessian-vector products through the logits and
    a probability target, and jvp, on crossent's kernels."""
    if name == "small":
        monkeypatch.setattr(_backends, "SMALL_MIN_LOGITS", 1)
    backend = "rowblock" if name == "rowblock" else "auto"
    for k, sample in enumerate(ce_samples):
        kwargs = dict(sample.constructor_input.kwargs)
        x, target = (t.detach() for t in sample.forward_input.args)
        ours = xt.CrossEntropyLoss(**kwargs, backend=backend)
        theirs = nn.CrossEntropyLoss(**kwargs)
        g = torch.Generator().manual_seed(k)
        out_shape = theirs(x, target).shape
        go = torch.rand(out_shape, generator=g, dtype=torch.float64) + 0.25
        v = torch.randn(x.shape, generator=g, dtype=torch.float64)
        want = _second_order(theirs, x, target, go, v)
        got = _second_order(ours, x, target, go, v)
        for part, a, b in zip(("d2/dx2 v", "d2/dxdt v", "jvp")[-len(want):], got, want,
                              strict=True):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, equal_nan=True,
                                       msg=lambda m, p=f"{sample.desc} {part}": f"{p}: {m}")


def test_module_info_samples_include_what_this_file_claims(ce_samples):
    descs = " ".join(s.desc for s in ce_samples)
    for part in ("4d_", "3d_", "2d_", "higher_dim_", "no_batch_dim_", "prob_target",
                 "weights", "ignore_index_label_smoothing", "_none", "_sum", "_mean"):
        assert part in descs, part


# ---- error inputs: the modules' (ModuleInfo), NLLLoss's weight dtype, linear's (OpInfo)


# torch's message -> the argument crossent's message must name
_CE_ERROR_ARGUMENT = {
    "Expected floating point type for target": "target",
    "expected target dtype": "target",
    "batch_size": "target",
    "weight tensor should be defined": "weight",
    "ignore_index is not supported": "ignore_index",
    "label_smoothing must be": "label_smoothing",
    "Expected target size": "target",
    "expected scalar type": "weight",
}


def _argument_for(regex, table):
    names = [name for key, name in table.items() if key in regex]
    assert len(names) == 1, f"no argument known for torch's error {regex!r}"
    return names[0]


def _error_inputs(module_db, cls):
    info = module_db[cls]
    return list(info.module_error_inputs_func(info, device="cpu", dtype=torch.float32,
                                              requires_grad=True, training=True))


def test_module_error_inputs_raise_input_error_naming_the_argument(module_db, route):
    cases = _error_inputs(module_db, nn.CrossEntropyLoss) + _error_inputs(module_db,
                                                                           nn.NLLLoss)
    assert len(cases) >= 8
    for case in cases:
        m = case.module_error_input
        kwargs = m.constructor_input.kwargs
        x, target = m.forward_input.args
        with pytest.raises(case.error_type):  # the case is torch's error indeed
            nn.CrossEntropyLoss(**kwargs)(x, target)
        name = _argument_for(case.error_regex, _CE_ERROR_ARGUMENT)
        with pytest.raises(REFUSED, match=name):
            xt.CrossEntropyLoss(**kwargs, backend=route.backend)(x, target)
        with pytest.raises(REFUSED, match=name):
            xt.cross_entropy(x, target, backend=route.backend, **kwargs)


_LINEAR_ERROR_ARGUMENT = {
    "dimensionality 1 or 2": "input",
    "linear_weight with dimensionality": "linear_weight",
    "last dimensions": "linear_weight",
    "ignore_index cannot be specified": "ignore_index",
    "requires batched input": "input",
    "linear_bias shape": "linear_bias",
    "Expected floating point type for target": "target",
    "batch_size": "target",
}


@pytest.mark.parametrize("backend", ["auto", "rowblock", "native"])
def test_linear_error_inputs_raise_input_error_naming_the_argument(module_db, backend):
    from torch.testing._internal.common_methods_invocations import (
        error_inputs_linear_cross_entropy,
    )

    functional = list(error_inputs_linear_cross_entropy(None, "cpu"))
    assert len(functional) >= 6
    for case in functional:
        s = case.sample_input
        with pytest.raises(RuntimeError):
            F.linear_cross_entropy(s.input, *s.args, **s.kwargs)
        name = _argument_for(case.error_regex, _LINEAR_ERROR_ARGUMENT)
        with pytest.raises(REFUSED, match=name):
            xt.linear_cross_entropy(s.input, *s.args, backend=backend, **s.kwargs)
    forward_errors = [c for c in _error_inputs(module_db, nn.LinearCrossEntropyLoss)
                      if c.error_on.name == "FORWARD_ERROR"]
    assert len(forward_errors) >= 3
    for case in forward_errors:
        m = case.module_error_input
        torch_module = nn.LinearCrossEntropyLoss(*m.constructor_input.args,
                                                 **m.constructor_input.kwargs)
        ours = xt.LinearCrossEntropyLoss(*m.constructor_input.args,
                                         **m.constructor_input.kwargs, backend=backend)
        with pytest.raises(case.error_type):
            torch_module(*m.forward_input.args)
        name = _argument_for(case.error_regex, _LINEAR_ERROR_ARGUMENT)
        with pytest.raises(REFUSED, match=name):
            ours(*m.forward_input.args)


def _construction_errors(module_db):
    cases = [c for c in _error_inputs(module_db, nn.LinearCrossEntropyLoss)
             if c.error_on.name == "CONSTRUCTION_ERROR"]
    assert len(cases) >= 2
    return cases


_CONSTRUCTION_ARGUMENT = {"weight shape": "weight", "label_smoothing": "label_smoothing"}


def test_linear_module_bad_options_refused_at_construction(module_db):
    for case in _construction_errors(module_db):
        m = case.module_error_input
        with pytest.raises(case.error_type):
            nn.LinearCrossEntropyLoss(*m.constructor_input.args, **m.constructor_input.kwargs)
        name = _argument_for(case.error_regex, _CONSTRUCTION_ARGUMENT)
        with pytest.raises(REFUSED, match=name):
            xt.LinearCrossEntropyLoss(*m.constructor_input.args, **m.constructor_input.kwargs)


# ---- ModuleInfo: nn.LinearCrossEntropyLoss (a stratified subset: 857 samples in all)


def _linear_outcome(module, x, target, seed, go_dtype):
    """The loss and the gradients of input, linear weight (and bias) of ``module``."""
    x = x.clone().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # options ignored for K-dimensional heads
        out = module(x, target)
    go = torch.rand(out.shape, generator=torch.Generator().manual_seed(seed),
                    dtype=torch.float64) + 0.25
    grads = torch.autograd.grad(out, [x, *module.linear.parameters()],
                                go.to(go_dtype).to(out.dtype))
    return (out, *grads)


@pytest.mark.parametrize(("dtype", "backend", "start"), [
    (torch.float32, "auto", 0), (torch.float32, "rowblock", 3), (torch.float64, "rowblock", 6),
    (torch.float32, "native", 9), (torch.bfloat16, "rowblock", 4),
    (torch.float16, "auto", 5)])
def test_linear_module_info_samples_match_torch(module_db, dtype, backend, start):
    """Every 13th (bfloat16, float16: 29th) ModuleInfo sample of LinearCrossEntropyLoss:
    options, K-dimensional heads, bias, weights, ignore_index in and out of range,
    smoothing, probability targets; loss and the gradients of input, weight and bias."""
    info = module_db[nn.LinearCrossEntropyLoss]
    with torch.random.fork_rng():
        torch.manual_seed(0)
        samples = info.module_inputs_func(info, device="cpu", dtype=dtype,
                                          requires_grad=True, training=True)
    assert len(samples) > 500
    chosen = samples[start::29 if dtype in LOW else 13]
    for k, sample in enumerate(chosen):
        args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
        with torch.random.fork_rng():
            torch.manual_seed(k)
            theirs = nn.LinearCrossEntropyLoss(*args, **kwargs)
        ours = xt.LinearCrossEntropyLoss(*args, **kwargs, backend=backend)
        ours.load_state_dict(theirs.state_dict())
        x, target = (t.detach() for t in sample.forward_input.args)
        ref = _linear_outcome(copy.deepcopy(theirs).double(), x.double(),
                              target.double() if target.is_floating_point() else target, k,
                              dtype)
        same = ref if dtype == torch.float64 else _linear_outcome(theirs, x, target, k, dtype)
        got = _linear_outcome(ours, x, target, k, dtype)
        names = ("loss", "input", "linear.weight", "linear.bias")[:len(ref)]
        for name, g, sm, r in zip(names, got, same, ref, strict=True):
            _close(g, sm, r, dtype, f"{k} {kwargs} {name}")


@pytest.mark.parametrize("backend", ["auto", "rowblock", "native"])
def test_linear_all_targets_ignored(backend):
    """torch's test_linear_cross_entropy: every target ignore_index=-1 (a (64, 16) head of
    32 classes with bias, chunked and not): NaN "mean", 0 "sum", zeros "none"; the
    gradients of input, linear weight and bias as torch's (NaN included)."""
    g = torch.Generator().manual_seed(18)
    x = torch.randn(64, 16, generator=g, dtype=torch.float64)
    w = torch.randn(32, 16, generator=g, dtype=torch.float64)
    b = torch.randn(32, generator=g, dtype=torch.float64)
    target = torch.full((64,), -1)
    for k, (reduction, ls, chunk) in enumerate(_grid(REDUCTIONS, (0.0, 0.1), (None, 16))):
        if chunk is not None and backend == "native":
            continue  # torch's kernel: no chunks
        want_leaves = [t.clone().requires_grad_() for t in (x, w, b)]
        got_leaves = [t.float().requires_grad_() for t in (x, w, b)]
        want = F.linear_cross_entropy(want_leaves[0], want_leaves[1], target,
                                      linear_bias=want_leaves[2], ignore_index=-1,
                                      reduction=reduction, label_smoothing=ls)
        got = xt.linear_cross_entropy(got_leaves[0], got_leaves[1], target, got_leaves[2],
                                      ignore_index=-1, reduction=reduction,
                                      label_smoothing=ls, chunk_size=chunk, backend=backend)
        go = torch.rand(want.shape, generator=torch.Generator().manual_seed(k),
                        dtype=torch.float64) + 0.25
        want_grads = torch.autograd.grad(want, want_leaves, go)
        got_grads = torch.autograd.grad(got, got_leaves, go.float())
        for name, a, e in zip(("loss", "input", "linear_weight", "linear_bias"),
                              (got, *got_grads), (want, *want_grads), strict=True):
            torch.testing.assert_close(a.double(), e.detach(), rtol=1e-5, atol=1e-6,
                                       equal_nan=True, msg=f"{reduction} ls={ls} {name}")


# ---- test_nn: K-dimensional losses with weights, ignore_index and label smoothing


def _targets(shape, classes, ignore_index, g):
    t = torch.randint(0, classes, shape, generator=g)
    drop = torch.rand(shape, generator=g) < 0.3
    return t.masked_fill(drop, ignore_index)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kdim_weights_ignore_index_label_smoothing(route, dtype):
    """(N, C, d1, d2) logits (channels_last, a transposed view, contiguous), class weights
    (none, positive as a strided view, signed), ignore_index inside and outside [0, C),
    label smoothing 0 / 0.25 / 1, every reduction; d/d logits with a random grad_output."""
    _skip_torch_kernel_in_float64(route, dtype)
    g = torch.Generator().manual_seed(1)
    classes = 5
    before = len(_SMALL_CALLS)
    k = 0
    layouts = {
        "contiguous": torch.randn(3, classes, 4, 2, generator=g, dtype=torch.float64) * 3,
        "channels_last": (torch.randn(3, classes, 4, 2, generator=g, dtype=torch.float64) * 3
                          ).contiguous(memory_format=torch.channels_last),
        "transposed": (torch.randn(3, 2, 4, classes, generator=g, dtype=torch.float64) * 3
                       ).permute(0, 3, 2, 1),
    }
    weights = {"none": None, "positive": (torch.rand(2 * classes, generator=g) + 0.5)[::2],
               "signed": torch.tensor([1.5, -0.5, 2.0, 0.25, 1.0])}
    layout_names, weight_names = list(layouts), list(weights)
    for ignore_index, ls, reduction, wname in _grid((-100, 1, 7), (0.0, 0.25, 1.0),
                                                    REDUCTIONS, weight_names):
        k += 1
        layout = layout_names[k % 3]  # each layout meets every other option over the loop
        target = _targets((3, 2, 4), classes, ignore_index, g).transpose(1, 2)  # strided
        check(_ours(route), _theirs, layouts[layout], target, weights[wname], dtype=dtype,
              seed=k, what=f"{layout} w={wname} ii={ignore_index} ls={ls} {reduction}",
              ignore_index=ignore_index, label_smoothing=ls, reduction=reduction)
    if route.name == "small":
        assert route.small_taken_since(before), "the small-batch kernel never ran"


def _grid(*axes):
    import itertools

    return itertools.product(*axes)


# ---- test_nn: probability targets (soft and one-hot) with weights: every gradient


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_probability_targets_with_weights_every_gradient(route, dtype):
    """Soft and one-hot probability targets, (N, C), (N, C, d) and unbatched (C,), class
    weights that require grad, label smoothing, every reduction: the gradients of the
    logits, the target and the weights."""
    _skip_torch_kernel_in_float64(route, dtype)
    g = torch.Generator().manual_seed(2)
    classes = 4
    k = 0
    for shape, kind, reduction in _grid(((5, classes), (3, classes, 2), (classes,)),
                                        ("soft", "one-hot", "unnormalised", "signed"),
                                        REDUCTIONS):
        k += 1
        ls = 0.3 if k % 2 else 0.0
        x = torch.randn(shape, generator=g, dtype=torch.float64) * 2
        cls_dim = 0 if len(shape) == 1 else 1
        if kind == "soft":
            target = torch.randn(shape, generator=g, dtype=torch.float64).softmax(cls_dim)
        elif kind == "one-hot":
            index = torch.randint(0, classes, x.movedim(cls_dim, -1).shape[:-1], generator=g)
            target = F.one_hot(index, classes).movedim(-1, cls_dim).double()
        elif kind == "unnormalised":
            target = torch.rand(shape, generator=g, dtype=torch.float64) * 2
        else:
            target = torch.randn(shape, generator=g, dtype=torch.float64)
        weight = torch.rand(classes, generator=g, dtype=torch.float64) + 0.5
        check(_ours(route), _theirs, x, target, weight, dtype=dtype, seed=k,
              grads=("input", "target", "weight"),
              what=f"{shape} {kind} ls={ls} {reduction}", label_smoothing=ls,
              reduction=reduction)


def test_weight_gradient_with_class_indices_is_refused_as_torch(route):
    x, y = torch.randn(3, 4, requires_grad=True), torch.tensor([0, 1, 3])
    w = torch.rand(4, requires_grad=True)
    with pytest.raises(RuntimeError):  # torch: nll_loss is not differentiable in weight
        F.cross_entropy(x, y, w).backward()
    with pytest.raises(UnsupportedError, match="weight"):
        xt.cross_entropy(x, y, w, backend=route.backend).backward()


# ---- test_nn: empty batches, all targets ignored


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_empty_batches(route, dtype):
    """(0, C), (0, C, 3), (2, C, 0) and C = 0 logits, index and probability targets,
    weights and label smoothing: torch's NaN for "mean", 0 for "sum", empty or zero
    "none"; the gradients' shapes and values."""
    _skip_torch_kernel_in_float64(route, dtype)
    g = torch.Generator().manual_seed(15)
    k = 0
    for shape, prob, ls, reduction in _grid(((0, 3), (0, 3, 3), (2, 3, 0), (4, 0), (0, 0)),
                                            (False, True), (0.0, 0.2), REDUCTIONS):
        k += 1
        weighted = k % 2 == 1
        x = torch.randn(shape, generator=g, dtype=torch.float64)
        # C = 0 (torch's test_cross_entropy_loss_zero_div): index targets all ignored
        target = (torch.rand(shape, generator=g, dtype=torch.float64) if prob
                  else torch.full((shape[0], *shape[2:]), -100, dtype=torch.long))
        classes = shape[1]
        weight = torch.linspace(0.5, 2.0, classes, dtype=torch.float64) if weighted else None
        check(_ours(route), _theirs, x, target, weight, dtype=dtype, seed=k,
              grads=("input", "target") if prob else ("input",),
              what=f"{shape} prob={prob} w={weighted} ls={ls} {reduction}",
              label_smoothing=ls, reduction=reduction)


def test_no_rows_no_classes_with_smoothing():
    x = torch.randn(0, 0, requires_grad=True)
    target = torch.zeros(0, dtype=torch.long)
    want = F.cross_entropy(x, target, label_smoothing=0.2, reduction="sum")
    assert want.isnan()
    for backend in ("auto", "rowblock"):
        got = xt.cross_entropy(x, target, label_smoothing=0.2, reduction="sum",
                               backend=backend)
        assert got.isnan(), (backend, got)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_all_targets_ignored(route, dtype):
    """Every target ignored (torch's 0/0: NaN for "mean", 0 for "sum"), with weights and
    label smoothing, 2-d and K-d: torch's values and gradients, NaN included."""
    _skip_torch_kernel_in_float64(route, dtype)
    g = torch.Generator().manual_seed(16)
    k = 0
    for shape, weighted, ls, reduction in _grid(((4, 3), (2, 3, 2)), (False, True),
                                                (0.0, 0.2), REDUCTIONS):
        k += 1
        x = torch.randn(shape, generator=g, dtype=torch.float64)
        target = torch.full((shape[0], *shape[2:]), 2)
        weight = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64) if weighted else None
        check(_ours(route), _theirs, x, target, weight, dtype=dtype, seed=k,
              what=f"{shape} w={weighted} ls={ls} {reduction}", ignore_index=2,
              label_smoothing=ls, reduction=reduction)


def _zero_total_weight_case():
    x = torch.randn(2, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(11))
    target = torch.tensor([[0, 0, -100, 0], [0, -100, 0, 0]])
    return x, target, torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_zero_total_weight(route, dtype):
    """Counted targets whose class weights are all 0: torch's 0/0 for "mean" (NaN), and
    its gradients, with and without smoothing (the next test: crossent's other kernels)."""
    _skip_torch_kernel_in_float64(route, dtype)
    x, target, weight = _zero_total_weight_case()
    for k, (ls, reduction) in enumerate(_grid((0.0, 0.2), REDUCTIONS)):
        check(_ours(route), _theirs, x, target, weight, dtype=dtype, seed=k,
              what=f"ls={ls} {reduction}", label_smoothing=ls, reduction=reduction)


def test_zero_total_weight_with_smoothing_on_crossent_kernels():
    x, target, weight = _zero_total_weight_case()
    x, weight = x.float(), weight.float()
    want = F.cross_entropy(x, target, weight, label_smoothing=0.2)
    assert want.isnan()
    got = {"rowblock": xt.cross_entropy(x, target, weight, label_smoothing=0.2,
                                        backend="rowblock"),
           "composable (vmap)": torch.func.vmap(
               lambda z: xt.cross_entropy(z, target, weight, label_smoothing=0.2))(x[None])[0]}
    h = torch.randn(8, 5, generator=torch.Generator().manual_seed(12))
    w = torch.randn(3, 5, generator=torch.Generator().manual_seed(13))
    flat = target.reshape(-1)
    assert F.linear_cross_entropy(h, w, flat, weight=weight, label_smoothing=0.2).isnan()
    got["linear rowblock"] = xt.linear_cross_entropy(h, w, flat, weight=weight,
                                                     label_smoothing=0.2, backend="rowblock")
    assert {name: bool(v.isnan()) for name, v in got.items()} == dict.fromkeys(got, True), got


def test_one_class(route):
    """C = 1: every log-probability is 0; index and probability targets, weights,
    ignore_index, smoothing."""
    g = torch.Generator().manual_seed(9)
    x = torch.randn(6, 1, 2, generator=g, dtype=torch.float64)
    index = torch.tensor([[0, 0], [-100, 0], [0, 0], [0, -100], [0, 0], [0, 0]])
    prob = torch.rand(6, 1, 2, generator=g, dtype=torch.float64)
    weight = torch.tensor([1.5], dtype=torch.float64)
    for k, (target, w, ls, reduction) in enumerate(_grid((index, prob), (None, weight),
                                                         (0.0, 0.3), REDUCTIONS)):
        check(_ours(route), _theirs, x, target, w, dtype=torch.float32, seed=k,
              what=f"prob={target.is_floating_point()} w={w is not None} ls={ls} {reduction}",
              label_smoothing=ls, reduction=reduction)


def test_uint8_targets_with_ignore_index_255(route):
    """Segmentation-style uint8 class maps with 255 as ignore_index, weights and
    smoothing (torch's kernel takes Byte targets only for 2-d input without smoothing:
    the reference gets them as int64)."""
    g = torch.Generator().manual_seed(10)
    x = torch.randn(2, 4, 3, 5, generator=g, dtype=torch.float64)
    target = torch.randint(0, 4, (2, 3, 5), generator=g).to(torch.uint8)
    target[torch.rand(2, 3, 5, generator=g) < 0.3] = 255
    weight = torch.rand(4, generator=g, dtype=torch.float64) + 0.5
    for k, (w, ls, reduction) in enumerate(_grid((None, weight), (0.0, 0.1), REDUCTIONS)):
        check(_ours(route), _theirs_int64, x, target, w, dtype=torch.float32, seed=k,
              what=f"w={w is not None} ls={ls} {reduction}", ignore_index=255,
              label_smoothing=ls, reduction=reduction)


def test_probability_target_of_a_wider_dtype_promotes_the_loss():
    g = torch.Generator().manual_seed(17)
    x = torch.randn(3, 4, generator=g, dtype=torch.float64)
    target = torch.rand(3, 4, generator=g, dtype=torch.float64)
    for (x_dtype, t_dtype), backend in _grid(((torch.float32, torch.float64),
                                              (torch.bfloat16, torch.float32),
                                              (torch.float16, torch.float32)),
                                             ("auto", "rowblock", "native")):
        z, t = x.to(x_dtype), target.to(t_dtype)
        want = F.cross_entropy(z, t)
        got = xt.cross_entropy(z, t, backend=backend)
        assert got.dtype == want.dtype, (x_dtype, t_dtype, backend, got.dtype, want.dtype)
        # torch rounds the log-probabilities to the logits' dtype before the product;
        # crossent keeps them in float32 (docs/guarantees.md): float64 of the same inputs
        # decides, and torch is within its own rounding of it
        exact = F.cross_entropy(z.double(), t.double())
        torch.testing.assert_close(got.double(), exact, rtol=1e-6, atol=1e-6)
        slack = 1e-6 if x_dtype == torch.float32 else 4 * torch.finfo(x_dtype).eps
        torch.testing.assert_close(want.double(), exact, rtol=slack, atol=slack)


def test_tensors_on_another_device_are_refused_naming_them():
    x, index, prob = torch.randn(3, 4), torch.tensor([0, 1, 2]), torch.rand(3, 4)
    cases = [("weight", (x, index), dict(weight=torch.ones(4, device="meta"))),
             ("target", (x, index.to("meta")), {}),
             ("target", (x, prob.to("meta")), {})]
    for (name, args, kwargs), backend in _grid(cases, ("auto", "rowblock", "native")):
        with pytest.raises(RuntimeError):
            F.cross_entropy(*args, **kwargs)
        with pytest.raises(REFUSED, match=name):
            xt.cross_entropy(*args, backend=backend, **kwargs)
    h, w = torch.randn(3, 5), torch.randn(4, 5)
    for backend in ("auto", "rowblock", "native"):
        with pytest.raises(REFUSED, match="linear_weight"):
            xt.linear_cross_entropy(h, w.to("meta"), index, backend=backend)
        with pytest.raises(REFUSED, match="weight"):
            xt.linear_cross_entropy(h, w, index, weight=torch.ones(4, device="meta"),
                                    backend=backend)


def _unused_class_weight_case(bad):
    g = torch.Generator().manual_seed(21)
    x = torch.randn(3, 4, generator=g, dtype=torch.float64)
    h = torch.randn(3, 5, generator=g, dtype=torch.float64)
    w = torch.randn(4, 5, generator=g, dtype=torch.float64)
    target = torch.tensor([0, 0, 2])  # class 3 is nobody's target
    weight = torch.tensor([1.0, 2.0, 3.0, bad], dtype=torch.float64)
    return x, h, w, target, weight


def test_non_finite_weight_of_an_unused_class_on_torch_routes(route):
    """torch's NLL reads w[y] only: a NaN/inf weight of a class no target uses changes
    nothing without smoothing (the row-block kernel once read sum(w) anyway: 0 x inf)."""
    for bad in (math.inf, math.nan):
        x, _, _, target, weight = _unused_class_weight_case(bad)
        for k, reduction in enumerate(REDUCTIONS):
            check(_ours(route), _theirs, x, target, weight, dtype=torch.float64, seed=k,
                  what=f"w[3]={bad} {reduction}", reduction=reduction)


def test_non_finite_weight_of_an_unused_class_keeps_gradients_finite():
    for bad in (math.inf, math.nan):
        x, h, w, target, weight = _unused_class_weight_case(bad)
        for k, reduction in enumerate(REDUCTIONS):
            check(_ours(Route("rowblock", "rowblock")), _theirs, x, target, weight,
                  dtype=torch.float64, seed=k, what=f"w[3]={bad} {reduction}",
                  reduction=reduction)
        lw = w.clone().requires_grad_()
        (want,) = torch.autograd.grad(F.linear_cross_entropy(h, lw, target, weight=weight),
                                      lw)
        (got,) = torch.autograd.grad(xt.linear_cross_entropy(h, lw, target, weight=weight,
                                                             backend="rowblock"), lw)
        torch.testing.assert_close(got, want)


def test_infinite_class_weight_with_smoothing_gives_torchs_inf():
    x, _, _, target, weight = _unused_class_weight_case(math.inf)
    want = F.cross_entropy(x, target, weight, label_smoothing=0.1, reduction="none")
    assert torch.isposinf(want).all()
    got = xt.cross_entropy(x, target, weight, label_smoothing=0.1, reduction="none",
                           backend="rowblock")
    torch.testing.assert_close(got, want)


# ---- test_nn: 0-d and 1-d (unbatched) input


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_unbatched_input(route, dtype):
    """(C,) logits with a 0-d class index (counted or ignored) or a (C,) probability
    target, weights and label smoothing, every reduction: loss shape () and gradients."""
    _skip_torch_kernel_in_float64(route, dtype)
    g = torch.Generator().manual_seed(3)
    k = 0
    for target, weighted, ls, reduction in _grid(
            (torch.tensor(2), torch.tensor(-100), torch.tensor([0.1, 0.2, 0.3, 0.4],
                                                                dtype=torch.float64)),
            (False, True), (0.0, 0.2), REDUCTIONS):
        k += 1
        x = torch.randn(4, generator=g, dtype=torch.float64)
        weight = torch.rand(4, generator=g, dtype=torch.float64) + 0.5 if weighted else None
        check(_ours(route), _theirs, x, target, weight, dtype=dtype, seed=k,
              what=f"target={target.tolist()} w={weighted} ls={ls} {reduction}",
              label_smoothing=ls, reduction=reduction)


def test_unbatched_input_with_a_one_element_target_is_refused(route):
    """torch's forward takes a (1,) class index for (C,) logits, but its backward and its
    label smoothing raise: crossent refuses it up front, naming the target."""
    x = torch.randn(4, requires_grad=True)
    with pytest.raises(RuntimeError):
        F.cross_entropy(x, torch.tensor([2])).backward()
    with pytest.raises(InputError, match="target"):
        xt.cross_entropy(x, torch.tensor([2]), backend=route.backend)


def test_unbatched_input_bad_target_message_quotes_the_callers_shapes():
    x = torch.randn(4)
    for target, backend in _grid((torch.tensor([2]), torch.tensor([2, 1]), torch.rand(3)),
                                 ("auto", "rowblock", "native")):
        with pytest.raises(InputError, match="target") as caught:
            xt.cross_entropy(x, target, backend=backend)
        message = str(caught.value)
        assert f"{tuple(target.shape)}" in message and "(4,)" in message, message
        assert "(1, 4)" not in message, message


def test_zero_d_input_is_refused_naming_input(route):
    with pytest.raises(RuntimeError):
        F.cross_entropy(torch.tensor(1.0), torch.tensor(0))
    for target in (torch.tensor(0), torch.tensor(0.5)):
        with pytest.raises(InputError, match="input"):
            xt.cross_entropy(torch.tensor(1.0), target, backend=route.backend)


# ---- test_nn: large and infinite logits


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_large_and_infinite_logits(route, dtype):
    """Rows with huge logits (1e4, 3e38), -inf beside the target and at the target, +inf,
    NaN, for class indices and soft probability targets: torch's values, gradients and
    NaN/inf pattern, with weights and smoothing."""
    _skip_torch_kernel_in_float64(route, dtype)
    inf, nan = math.inf, math.nan
    big = 3e38 if dtype == torch.float32 else 1e300
    x = torch.tensor([[1e4, -1e4, 0.0, 5.0],
                      [big, big / 2, -big, 0.0],
                      [-inf, 1.0, 2.0, 3.0],
                      [-inf, -inf, 0.0, 1.0],
                      [88.0, 89.0, 90.0, -88.0],
                      [-1e4, -1e4, -1e4, -1e4]], dtype=torch.float64)
    target = torch.tensor([0, 1, 2, 3, 2, 1])
    weight = torch.tensor([0.5, 1.0, 2.0, 1.5], dtype=torch.float64)
    k = 0
    for rows, ls, reduction in _grid(("finite", "-inf target", "+inf", "nan"), (0.0, 0.1),
                                     REDUCTIONS):
        k += 1
        w = weight if k % 2 else None
        z, t = x.clone(), target.clone()
        if rows == "-inf target":
            t[2] = 0  # its logit is -inf: an infinite loss
        elif rows == "+inf":
            z[4, 1] = inf
        elif rows == "nan":
            z[5, 3] = nan
        check(_ours(route), _theirs, z, t, w, dtype=dtype, seed=k,
              what=f"{rows} w={w is not None} ls={ls} {reduction}",
              label_smoothing=ls, reduction=reduction)
        # soft targets with no zero entry (a zero entry at a -inf logit is a documented
        # difference: crossent's 0 against torch's NaN)
        soft = torch.rand(z.shape, generator=torch.Generator().manual_seed(k),
                          dtype=torch.float64) + 0.1
        check(_ours(route), _theirs, z, soft / soft.sum(1, keepdim=True), w, dtype=dtype,
              seed=k, grads=("input", "target"),
              what=f"soft {rows} w={w is not None} ls={ls} {reduction}",
              label_smoothing=ls, reduction=reduction)


# ---- test_nn: float16 / bfloat16 accuracy


@pytest.mark.parametrize("dtype", LOW)
def test_low_precision_at_least_as_accurate_as_torch(route, dtype):
    """float16/bfloat16 logits (wide range: rounding matters), index and probability
    targets, weights, ignore_index and smoothing: loss and gradient in torch's dtype, no
    further from torch's float64 answer than torch's own low-precision result."""
    if route.name == "small" and dtype == torch.float16:
        pytest.skip("the small-batch kernel takes float32/float64/bfloat16: same as 'auto'")
    g = torch.Generator().manual_seed(4)
    k = 0
    for shape, prob, ls, reduction in _grid(((64, 257), (4, 33, 5)), (False, True),
                                            (0.0, 0.1), REDUCTIONS):
        k += 1
        weighted = k % 2 == 0
        x = torch.randn(shape, generator=g, dtype=torch.float64) * 4
        if prob:
            target = torch.randn(shape, generator=g, dtype=torch.float64).softmax(1)
        else:
            target = _targets((shape[0], *shape[2:]), shape[1], -100, g)
        weight = (torch.rand(shape[1], generator=g, dtype=torch.float64) + 0.5
                  if weighted else None)
        check(_ours(route), _theirs, x, target, weight, dtype=dtype, seed=k,
              what=f"{shape} prob={prob} w={weighted} ls={ls} {reduction}",
              label_smoothing=ls, reduction=reduction)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_long_reductions_precision(route, dtype, monkeypatch):
    """A (2, 3, 64, 96) loss (12 288 rows summed: torch's test_cross_entropy_loss_precision
    in small): "sum" and "mean" no further from torch's float64 answer than torch's own."""
    if route.name == "native" or (route.name == "small" and dtype in LOW):
        pytest.skip("torch's kernel: the same as 'auto' here")
    monkeypatch.setattr(_rules, "_BLOCK_BYTES", BLOCK_BYTES)  # 800 16-row blocks: slow
    g = torch.Generator().manual_seed(14)
    x = torch.randn(2, 3, 64, 96, generator=g, dtype=torch.float64) * 3
    target = torch.randint(0, 3, (2, 64, 96), generator=g)
    for k, (ls, reduction) in enumerate(_grid((0.0, 0.1), ("sum", "mean"))):
        check(_ours(route), _theirs, x, target, dtype=dtype, seed=k,
              what=f"ls={ls} {reduction}", label_smoothing=ls, reduction=reduction)


# ---- deprecated size_average / reduce; out-of-range class indices


def test_legacy_size_average_and_reduce(route):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 3, 2, generator=g, dtype=torch.float64)
    target = torch.tensor([[0, 1], [2, -100], [1, 1], [0, 2]])
    for k, (size_average, reduce) in enumerate(_grid((None, True, False), (None, True,
                                                                            False))):
        check(_ours(route), _theirs, x, target, dtype=torch.float64, seed=k,
              what=f"size_average={size_average} reduce={reduce}",
              size_average=size_average, reduce=reduce)


def test_class_index_out_of_range_raises_index_error(route):
    """torch's IndexError for a class outside [0, C) that is not ignore_index (2-d and
    K-d, with and without smoothing and weights)."""
    g = torch.Generator().manual_seed(20)
    x2 = torch.randn(3, 4, generator=g, requires_grad=True)
    xk = torch.randn(2, 4, 3, generator=g, requires_grad=True)
    for (bad, ignore_index), kdim, ls in _grid(((4, -100), (-1, -100), (7, 3), (-100, 5)),
                                               (False, True), (0.0, 0.1)):
        x = xk if kdim else x2
        target = torch.tensor([[0, bad, 1], [2, 3, 0]]) if kdim else torch.tensor([0, bad, 1])
        weight = torch.ones(4) if ls else None
        with pytest.raises(IndexError):
            F.cross_entropy(x, target, weight, ignore_index=ignore_index, label_smoothing=ls)
        with pytest.raises(IndexError):
            xt.cross_entropy(x, target, weight, ignore_index=ignore_index, label_smoothing=ls,
                             backend=route.backend)


# ---- module API parity


def _parameters(fn):
    return [p for p in inspect.signature(fn).parameters.values() if p.name != "self"]


@pytest.mark.parametrize(("ours", "theirs"), [
    (xt.CrossEntropyLoss.__init__, nn.CrossEntropyLoss.__init__),
    (xt.LinearCrossEntropyLoss.__init__, nn.LinearCrossEntropyLoss.__init__),
    (xt.CrossEntropyLoss.forward, nn.CrossEntropyLoss.forward),
    (xt.LinearCrossEntropyLoss.forward, nn.LinearCrossEntropyLoss.forward),
    (xt.cross_entropy, F.cross_entropy),
    (xt.linear_cross_entropy, F.linear_cross_entropy)], ids=lambda f: f.__qualname__)
def test_signatures_take_every_torch_call(ours, theirs):
    """Every call torch's signature accepts, crossent's accepts the same way: torch's
    positional arguments at torch's positions, its keyword arguments by name, torch's
    defaults; crossent's extra arguments all have defaults."""
    mine = {p.name: p for p in _parameters(ours)}
    positional = [p.name for p in _parameters(ours) if p.kind is p.POSITIONAL_OR_KEYWORD]
    for k, p in enumerate(_parameters(theirs)):
        assert p.name in mine, p.name
        q = mine[p.name]
        assert q.default == p.default, p.name
        if p.kind is p.POSITIONAL_OR_KEYWORD:
            assert positional[k] == p.name, (k, p.name, positional)
        else:
            assert p.kind is p.KEYWORD_ONLY
            assert q.kind in (q.POSITIONAL_OR_KEYWORD, q.KEYWORD_ONLY), p.name
    extras = set(mine) - {p.name for p in _parameters(theirs)}
    assert all(mine[n].default is not inspect.Parameter.empty for n in extras), extras


def _ce_pair(weight):
    kwargs = dict(weight=weight, ignore_index=1, reduction="sum", label_smoothing=0.1)
    return xt.CrossEntropyLoss(**kwargs), nn.CrossEntropyLoss(**kwargs)


def _ce_inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(6)
    return (torch.randn(5, 3, generator=g).to(dtype), torch.tensor([0, 1, 2, 1, 0]))


def _assert_same_loss(ours, theirs, dtype=torch.float32):
    x, t = _ce_inputs(dtype)
    torch.testing.assert_close(ours(x, t), theirs(x, t), rtol=1e-6, atol=1e-6)


def test_cross_entropy_loss_module_state_dict_pickle_copy_and_dtype():
    """The weight is a buffer under torch's key; state dicts load both ways; pickle,
    torch.save/load and deepcopy keep every option; .double() / .half() convert the
    weight as torch's module does; attributes set after construction are honoured."""
    ours, theirs = _ce_pair(torch.tensor([0.5, 1.0, 2.0]))
    assert dict(ours.named_buffers()).keys() == dict(theirs.named_buffers()).keys()
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    other = xt.CrossEntropyLoss(torch.ones(3), ignore_index=1, reduction="sum",
                                label_smoothing=0.1)
    other.load_state_dict(theirs.state_dict())
    _assert_same_loss(other, theirs)
    back = nn.CrossEntropyLoss(torch.ones(3), ignore_index=1, reduction="sum",
                               label_smoothing=0.1)
    back.load_state_dict(ours.state_dict())
    _assert_same_loss(ours, back)
    buffer = io.BytesIO()
    torch.save(ours, buffer)
    buffer.seek(0)
    for clone in (pickle.loads(pickle.dumps(ours)), copy.deepcopy(ours),
                  torch.load(buffer, weights_only=False)):
        assert type(clone) is xt.CrossEntropyLoss
        _assert_same_loss(clone, theirs)
    reference = copy.deepcopy(theirs).double()
    for dtype, tol in ((torch.float64, 1e-12), (torch.float16, 2e-3),
                       (torch.bfloat16, 1.6e-2)):
        a, b = copy.deepcopy(ours).to(dtype), copy.deepcopy(theirs).to(dtype)
        assert a.weight.dtype == b.weight.dtype == dtype
        x, t = _ce_inputs(dtype)
        got = a(x, t)
        assert got.dtype == b(x, t).dtype == dtype
        want = reference(x.double(), t)
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * float(want.abs()))
    for name, value in (("label_smoothing", 0.3), ("ignore_index", 2), ("reduction", "none"),
                        ("weight", torch.tensor([2.0, 1.0, 0.5]))):
        setattr(ours, name, value)
        setattr(theirs, name, value)
        _assert_same_loss(ours, theirs)
    ours.eval()
    theirs.eval()
    _assert_same_loss(ours, theirs)
    none_weight = xt.CrossEntropyLoss()
    assert none_weight.state_dict().keys() == nn.CrossEntropyLoss().state_dict().keys()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # size_average/reduce deprecation
        for legacy in (dict(size_average=False), dict(reduce=False),
                       dict(size_average=True, reduce=True)):
            a, b = xt.CrossEntropyLoss(**legacy), nn.CrossEntropyLoss(**legacy)
            assert a.reduction == b.reduction
            _assert_same_loss(a, b)


def test_module_hooks_see_torch_gradients():
    """Forward pre-hooks and full backward hooks (ModuleInfo's hook tests): the hook's
    grad_input and the activation's gradient as with torch's module, in place or not."""
    def run(module):
        seen = []
        module.register_forward_pre_hook(lambda m, args: (args[0] * 1.5, args[1]))
        module.register_full_backward_hook(lambda m, gi, go: seen.append(gi[0].clone()))
        x = torch.randn(20, 3, generator=torch.Generator().manual_seed(19), requires_grad=True)
        y = torch.tensor([0, 1, 2, -100] * 5)
        loss = module(x * 2, y)  # an activation (a non-leaf): in place is allowed
        loss.backward(torch.tensor(2.0))
        return loss.detach(), x.grad, seen[0]

    want = run(nn.CrossEntropyLoss(label_smoothing=0.1))
    for backend, inplace in _grid(("auto", "rowblock"), (False, True)):
        got = run(xt.CrossEntropyLoss(label_smoothing=0.1, backend=backend,
                                      inplace_backward=inplace))
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def _linear_pair(**kwargs):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        theirs = nn.LinearCrossEntropyLoss(3, 4, **kwargs)
    ours = xt.LinearCrossEntropyLoss(3, 4, **kwargs)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def test_linear_module_state_dict_pickle_copy_and_factory_kwargs():
    kwargs = dict(bias=True, out_features=(2,), weight=torch.tensor([0.5, 1.0, 2.0, 1.5]),
                  label_smoothing=0.1, reduction="sum")
    ours, theirs = _linear_pair(**kwargs)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(7))
    t = torch.randint(0, 4, (5, 2), generator=torch.Generator().manual_seed(8))
    want = theirs(x, t)
    for clone in (pickle.loads(pickle.dumps(ours)), copy.deepcopy(ours)):
        assert type(clone) is xt.LinearCrossEntropyLoss
        torch.testing.assert_close(clone(x, t), want, rtol=1e-5, atol=1e-5)
    a = xt.LinearCrossEntropyLoss(3, 4, dtype=torch.float64, bias=True)
    b = nn.LinearCrossEntropyLoss(3, 4, dtype=torch.float64, bias=True)
    assert [p.dtype for p in a.parameters()] == [p.dtype for p in b.parameters()]
    a.load_state_dict(b.state_dict())
    x64 = x.double()
    torch.testing.assert_close(a(x64, t[:, 0]), b(x64, t[:, 0]), rtol=1e-12, atol=1e-12)
    c, d = copy.deepcopy(ours).double(), copy.deepcopy(theirs).double()
    assert c.weight.dtype == d.weight.dtype == torch.float64
    torch.testing.assert_close(c(x64, t), d(x64, t), rtol=1e-12, atol=1e-12)


def _fields(extra_repr: str) -> dict[str, str]:
    """``name=value`` pairs of an ``extra_repr`` (values may hold commas in brackets)."""
    return dict(re.findall(r"(\w+)=((?:\([^)]*\)|[^,(])+)", extra_repr))


def test_linear_module_repr_fields_parser():
    fields = _fields("in_features=3, out_features=(2, 4), options=None, bias=True")
    assert fields == {"in_features": "3", "out_features": "(2, 4)", "options": "None",
                      "bias": "True"}


def test_linear_module_repr_keeps_torch_fields():
    options = nn.LinearCrossEntropyOptions(batch_chunk_size=2)
    ours, theirs = _linear_pair(out_features=(2,), bias=True, options=options)
    mine = {k: v.strip() for k, v in _fields(ours.extra_repr()).items()}
    for name, value in _fields(theirs.extra_repr()).items():
        assert mine.get(name) == value.strip(), (name, value, ours.extra_repr())


def test_linear_module_is_a_torch_linear_cross_entropy_loss():
    assert isinstance(xt.LinearCrossEntropyLoss(3, 4), nn.LinearCrossEntropyLoss)


def test_scripting_a_module_is_refused_by_name():
    torch.jit.script(nn.CrossEntropyLoss())  # torch's module scripts
    for module in (xt.CrossEntropyLoss(), xt.LinearCrossEntropyLoss(3, 4)):
        with pytest.raises(UnsupportedError, match=r"(?i)torchscript|jit\.script"):
            torch.jit.script(module)
