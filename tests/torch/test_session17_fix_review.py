"""Review (H45, session 17) of the three ``_custom_ops`` fixes of H43's round, against
``torch.nn.functional.cross_entropy`` (on ``F.linear`` for the linear head) in float64:

1. ``_run_time_requires``: an exported program gives every gradient its run needs, though
   ``torch.export`` baked the example inputs' ``requires_grad`` into the operators;
2. fake tensors (``FakeTensorMode`` without dynamo): first routed to the custom operators,
   which lost the checks, transforms and double backward (below); now the eager entry
   points run and send fake tensors to torch's kernel or the composable path
   (``_rules.fake_values``);
3. ``_without_callers_hooks()``: no shielding hooks under ``disable_saved_tensors_hooks``.

What holds (and is not already in ``test_session17_training_review.py``): every
``grad_output`` (2, NaN, inf, per row) and reduction on the recompute path an exported loss
takes for run-time gradients, probability target and class weight gradients at run time
with a retained second backward, the refusals (class weight with class indices,
``num_items`` that requires grad) still naming crossent, double backward refused by name,
``torch.compile`` (AOT) of an exported module, a dynamic ``shift=True`` head, fake-tensor
shapes of target/weight gradients and statistics, real tensors under
``allow_non_fake_inputs``, and eager ``backend="native"`` under disabled hooks.

What the review found, fixed since (each test failed before): under ``FakeTensorMode``
crossent's argument checks had stopped running (a wrong shape or option gave a loss
instead of crossent's error), ``torch.func`` transforms failed inside torch, double
backward was refused as "under torch.compile"; an exported model run under
``torch.inference_mode`` failed inside torch (``want_grads`` baked in by the example's
parameters). The vocab-parallel functions refuse fake tensors by name.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.autograd.graph import disable_saved_tensors_hooks

import crossent.torch as xt
from crossent.errors import InputError, UnsupportedError

pytestmark = pytest.mark.timeout(120)

F64 = torch.float64
N, D, C = 6, 4, 5


def _data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(N, C, generator=g)
    y = torch.randint(0, C, (N,), generator=g)
    y[0] = -100
    p = torch.softmax(torch.randn(N, C, generator=g), 1)
    x = torch.randn(N, D, generator=g)
    w = torch.randn(C, D, generator=g)
    b = torch.randn(C, generator=g)
    cw = torch.rand(C, generator=g) + 0.5
    return z, y, p, x, w, b, cw


def _close(got, want, atol=1e-6, rtol=1e-5, msg=None):
    assert got is not None, msg
    torch.testing.assert_close(got.double(), want.double(), atol=atol, rtol=rtol,
                               equal_nan=True, msg=msg)


def _leaves(*ts, dtype=None):
    return [t.detach().clone().to(dtype or t.dtype).requires_grad_() for t in ts]


class _Loss(nn.Module):
    """``cross_entropy`` (``kind="logits"``: ``forward(z, t, w=None, n=None)``) or
    ``linear_cross_entropy`` (``forward(x, lw, t, lb, w=None, n=None)``) as a module."""

    def __init__(self, kind: str, **options) -> None:
        super().__init__()
        self.kind, self.options = kind, options

    def forward(self, *args):
        if self.kind == "logits":
            z, t, w, n = (*args, None, None)[:4]
            return xt.cross_entropy(z, t, weight=w, num_items=n, backend="rowblock",
                                    **self.options)
        x, lw, t, lb, w, n = (*args, None, None)[:6]
        return xt.linear_cross_entropy(x, lw, t, lb, weight=w, num_items=n,
                                       backend="rowblock", **self.options)


def _export(module, example, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.export.export(module, example, **kw).module()


# ------------------------------------------------- 1. run-time requires in exported programs


def _grad_outputs(reduction: str):
    if reduction == "none":  # per row: finite, NaN, +-inf (row 0 is ignored)
        return [torch.tensor([float("inf"), 1.5, float("nan"), float("inf"), -2.0,
                              float("-inf")])]
    return [torch.tensor(v) for v in (2.0, float("nan"), float("inf"))]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("kind", ["logits", "linear"])
def test_exported_loss_recomputing_run_time_gradients_scales_grad_output_as_torch(
        kind, reduction):
    """Exported with data tensors, run on tensors that require grad: the gradients are
    recomputed in backward (``want_grads`` off). With ``grad_output`` 2, NaN, inf (0-d) or a
    per-row mix: torch's values and NaN/inf pattern, label smoothing and softcap included."""
    z0, y, _, x0, w0, b0, _ = _data(1)
    if kind == "logits":
        options = {"reduction": reduction, "label_smoothing": 0.1, "softcap": 4.0}
        run = _export(_Loss(kind, **options), (z0, y))
        data = (z0,)
    else:
        options = {"reduction": reduction, "label_smoothing": 0.1}
        run = _export(_Loss(kind, **options), (x0, w0, y, b0))
        data = (x0, w0, b0)
    for go in _grad_outputs(reduction):
        ours, ref = _leaves(*data), _leaves(*data, dtype=F64)
        if kind == "logits":
            out = run(ours[0], y)
            want = F.cross_entropy(4.0 * torch.tanh(ref[0] / 4.0), y, reduction=reduction,
                                   label_smoothing=0.1)
        else:
            out = run(ours[0], ours[1], y, ours[2])
            want = F.cross_entropy(F.linear(*ref), y, reduction=reduction,
                                   label_smoothing=0.1)
        _close(out, want)
        out.backward(go)
        want.backward(go.double())
        for i, (a, e) in enumerate(zip(ours, ref, strict=True)):
            _close(a.grad, e.grad, msg=f"input {i}, grad_output {go}")


def test_exported_probability_target_and_class_weight_get_run_time_gradients_twice():
    """Exported with data tensors (probability target, class weight): at run time the
    logits, the target and the weight require grad; backward twice through the retained
    graph gives twice torch's gradients (the recomputing backward keeps its inputs)."""
    z0, _, p0, _, _, _, cw = _data(2)
    run = _export(_Loss("logits", label_smoothing=0.2, reduction="sum"), (z0, p0, cw))
    ours, ref = _leaves(z0, p0, cw), _leaves(z0, p0, cw, dtype=F64)
    out = run(*ours)
    out.backward(retain_graph=True)
    out.backward()
    (2 * F.cross_entropy(ref[0], ref[1], weight=ref[2], label_smoothing=0.2,
                         reduction="sum")).backward()
    for i, (a, e) in enumerate(zip(ours, ref, strict=True)):
        _close(a.grad, e.grad, msg=f"input {i}")


@pytest.mark.parametrize("case", ["logits-weight", "linear-weight", "logits-num_items",
                                  "linear-num_items"])
def test_exported_loss_refuses_by_name_what_only_the_run_requires(case):
    """A class weight that requires grad only at run time (with class indices: torch
    raises), or a ``num_items`` tensor that does: crossent's ``UnsupportedError`` naming
    itself, never a silent ``None`` gradient."""
    z0, y, _, x0, w0, b0, cw = _data(3)
    kind, what = case.split("-")
    count = torch.tensor(4.0)
    options = {"reduction": "sum"} if what == "num_items" else {}
    if kind == "logits":
        example = (z0, y, cw, None) if what == "weight" else (z0, y, None, count)
        run = _export(_Loss(kind, **options), example)
        first = _leaves(z0)
        args = [first[0], y]
    else:
        example = ((x0, w0, y, b0, cw, None) if what == "weight"
                   else (x0, w0, y, b0, None, count))
        run = _export(_Loss(kind, **options), example)
        first = _leaves(x0)
        args = [first[0], w0, y, b0]
    args += [_leaves(cw)[0], None] if what == "weight" else [None, _leaves(count)[0]]
    with pytest.raises(UnsupportedError, match="crossent"):
        run(*args).backward()


@pytest.mark.parametrize("traced_grad", [False, True])
@pytest.mark.parametrize("kind", ["logits", "linear"])
def test_exported_double_backward_is_refused_by_name(kind, traced_grad):
    """``create_graph=True`` through an exported loss (example with or without
    ``requires_grad``): crossent's ``UnsupportedError`` naming the function."""
    z0, y, _, x0, w0, b0, _ = _data(4)
    first = z0 if kind == "logits" else x0
    example_first = _leaves(first)[0] if traced_grad else first
    rest = () if kind == "logits" else (w0,)
    after = () if kind == "logits" else (b0,)
    run = _export(_Loss(kind), (example_first, *rest, y, *after))
    leaf = _leaves(first)[0]
    out = run(leaf, *rest, y, *after)
    with pytest.raises(UnsupportedError, match=r"crossent\.torch\.(linear_)?cross_entropy"):
        torch.autograd.grad(out, leaf, create_graph=True)


def test_compiled_exported_module_gets_run_time_gradients():
    """``torch.compile`` (AOT autograd) of an exported linear head traced with data
    tensors, fed tensors that require grad: torch's gradients for x, W and b."""
    _, y, _, x0, w0, b0, _ = _data(5)
    run = _export(_Loss("linear", label_smoothing=0.1), (x0, w0, y, b0))
    torch._dynamo.reset()
    try:
        compiled = torch.compile(run, backend="aot_eager", fullgraph=True)
        ours, ref = _leaves(x0, w0, b0), _leaves(x0, w0, b0, dtype=F64)
        compiled(ours[0], ours[1], y, ours[2]).backward()
    finally:
        torch._dynamo.reset()
    F.cross_entropy(F.linear(*ref), y, label_smoothing=0.1).backward()
    for i, (a, e) in enumerate(zip(ours, ref, strict=True)):
        _close(a.grad, e.grad, msg=f"input {i}")


def test_exported_dynamic_shifted_head_gets_run_time_gradients():
    """A ``shift=True`` head exported with a dynamic sequence length and data tensors,
    run at two other lengths with ``x``, ``W``, ``b`` requiring grad and a per-position
    ``grad_output``: torch's gradients of the shifted loss."""
    from torch.export import Dim

    g = torch.Generator().manual_seed(6)
    w0, b0 = torch.randn(C, D, generator=g), torch.randn(C, generator=g)
    steps = Dim("steps", min=3, max=32)
    run = _export(_Loss("linear", shift=True, reduction="none"),
                  (torch.randn(2, 5, D, generator=g), w0,
                   torch.randint(0, C, (2, 5), generator=g), b0),
                  dynamic_shapes={"args": ({1: steps}, None, {1: steps}, None)})
    for t in (4, 9):
        x0, y = torch.randn(2, t, D, generator=g), torch.randint(0, C, (2, t), generator=g)
        ours, ref = _leaves(x0, w0, b0), _leaves(x0, w0, b0, dtype=F64)
        out = run(ours[0], ours[1], y, ours[2])
        go = torch.rand(2, t - 1, generator=g)
        out.backward(go)
        logits = F.linear(*ref)[:, :-1].reshape(-1, C)
        want = F.cross_entropy(logits, y[:, 1:].reshape(-1), reduction="none")
        _close(out, want.reshape(2, t - 1))
        want.reshape(2, t - 1).backward(go.double())
        for i, (a, e) in enumerate(zip(ours, ref, strict=True)):
            _close(a.grad, e.grad, msg=f"T={t}, input {i}")


class _Model(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        torch.manual_seed(7)
        self.kind = kind
        self.body = nn.Linear(D, D)
        if kind == "logits":
            self.head = nn.Linear(D, C)
            self.loss = xt.CrossEntropyLoss(backend="rowblock")
        else:
            self.head = xt.LinearCrossEntropyLoss(D, C, bias=True, backend="rowblock")

    def forward(self, x, y):
        h = torch.tanh(self.body(x))
        return self.loss(self.head(h), y) if self.kind == "logits" else self.head(h, y)


@pytest.mark.parametrize("kind", ["logits", "linear"])
def test_exported_model_runs_under_inference_mode_as_torch(kind):
    """The common deployment: a model exported from training code (parameters require
    grad) evaluated under ``torch.inference_mode()``: torch's loss."""
    _, y, _, x0, *_ = _data(8)
    model = _Model(kind)
    run = _export(model, (x0, y))
    ps = {n: p.detach().double() for n, p in model.named_parameters()}
    h = torch.tanh(F.linear(x0.double(), ps["body.weight"], ps["body.bias"]))
    head = "head" if kind == "logits" else "head.linear"
    want = F.cross_entropy(F.linear(h, ps[f"{head}.weight"], ps[f"{head}.bias"]), y)
    with torch.inference_mode():
        got = run(x0, y)
    _close(got, want)


# ------------------------------------------------- 2. FakeTensorMode without dynamo


def _bad_call(case: str):
    """``(call, args)``: ``call(*args)`` is bad input crossent refuses eagerly."""
    z0, y, _, _, w0, _, _ = _data(9)
    ce, lin = xt.cross_entropy, xt.linear_cross_entropy
    return {
        "target-rows": (lambda z, t: ce(z, t), (z0, torch.cat([y, y[:1]]))),
        "reduction": (lambda z, t: ce(z, t, reduction="foo"), (z0, y)),
        "label_smoothing": (lambda z, t: ce(z, t, label_smoothing=2.0), (z0, y)),
        "target-list": (lambda z, t: ce(z, [1, 2, 3, 4, 0, 1]), (z0, y)),
        "weight-size": (lambda z, t, w: ce(z, t, weight=w), (z0, y, torch.rand(C + 1))),
        "backend": (lambda z, t: ce(z, t, backend="foo"), (z0, y)),
        "native-z_loss": (lambda z, t: ce(z, t, backend="native", z_loss=1e-3), (z0, y)),
        "none-num_items": (lambda z, t: ce(z, t, reduction="none", num_items=3), (z0, y)),
        "statistics": (lambda z, t: ce(z, t, statistics="foo"), (z0, y)),
        "linear-features": (lambda x, w, t: lin(x, w, t), (torch.randn(N, D + 1), w0, y)),
    }[case]


BAD = ["target-rows", "reduction", "label_smoothing", "target-list", "weight-size",
       "backend", "native-z_loss", "none-num_items", "statistics", "linear-features"]


@pytest.mark.parametrize("case", BAD)
def test_fake_tensor_mode_raises_crossents_error_for_bad_input(case):
    """Bad input under ``FakeTensorMode`` (shape propagation): the error eager crossent
    raises for the same call (torch's fake mode raises for these too), not a fake loss."""
    call, args = _bad_call(case)
    with pytest.raises((InputError, UnsupportedError)) as eager:
        call(*args)
    with FakeTensorMode() as mode:
        fakes = [mode.from_tensor(a) for a in args]
        with pytest.raises(type(eager.value)) as fake:
            call(*fakes)
    assert str(fake.value) == str(eager.value)


@pytest.mark.parametrize("kind", ["logits", "linear"])
def test_torch_func_grad_under_fake_tensor_mode_gives_torchs_shapes(kind):
    z0, y, _, x0, w0, _, _ = _data(10)
    with FakeTensorMode() as mode:
        yf, lw = mode.from_tensor(y), mode.from_tensor(w0)
        if kind == "logits":
            arg = mode.from_tensor(z0)
            got = torch.func.grad(lambda a: xt.cross_entropy(a, yf, backend="rowblock"))(arg)
            want = torch.func.grad(lambda a: F.cross_entropy(a, yf))(arg)
        else:
            arg = mode.from_tensor(x0)
            got = torch.func.grad(
                lambda a: xt.linear_cross_entropy(a, lw, yf, backend="rowblock"))(arg)
            want = torch.func.grad(lambda a: F.cross_entropy(F.linear(a, lw), yf))(arg)
    assert isinstance(got, FakeTensor)
    assert (got.shape, got.dtype) == (want.shape, want.dtype)


@pytest.mark.native_dispatch
def test_double_backward_under_fake_tensor_mode_on_torchs_kernel():
    z0, y, *_ = _data(11)
    with FakeTensorMode() as mode:
        z, yf = mode.from_tensor(z0).requires_grad_(), mode.from_tensor(y)
        g, = torch.autograd.grad(xt.cross_entropy(z, yf, backend="native"), z,
                                 create_graph=True)
        got, = torch.autograd.grad(g.pow(2).sum(), z)
    assert (got.shape, got.dtype) == (z.shape, z.dtype)


def test_fake_tensor_mode_target_weight_gradients_statistics_and_real_inputs():
    """Under ``FakeTensorMode``: a probability target's and a class weight's gradients
    (the backward operator's fake implementation) and the statistics have torch's shapes
    and dtypes; with ``allow_non_fake_inputs`` a module's real parameters and real inputs
    give fake results of torch's shapes."""
    z0, y, p0, x0, _, _, cw = _data(12)
    with FakeTensorMode() as mode:
        z, p, w = (mode.from_tensor(t).requires_grad_() for t in (z0, p0, cw))
        yf = mode.from_tensor(y)
        for reduction in ("mean", "none"):
            got = xt.cross_entropy(z, p, weight=w, reduction=reduction, label_smoothing=0.1)
            want = F.cross_entropy(z, p, weight=w, reduction=reduction, label_smoothing=0.1)
            grads = torch.autograd.grad(got.sum(), (z, p, w))
            wants = torch.autograd.grad(want.sum(), (z, p, w))
            for a, e in zip((got, *grads), (want, *wants), strict=True):
                assert isinstance(a, FakeTensor)
                assert (a.shape, a.dtype) == (e.shape, e.dtype), reduction
        loss, stats = xt.cross_entropy(z, yf, statistics=("lse", "accuracy", "entropy"))
        assert loss.shape == () and stats.z_loss is None
        for field, dtype in (("lse", torch.float32), ("accuracy", torch.bool),
                             ("entropy", torch.float32), ("counted", torch.bool)):
            t = getattr(stats, field)
            assert (t.shape, t.dtype) == ((N,), dtype), field
    head = xt.LinearCrossEntropyLoss(D, C, bias=True, reduction="none")
    x = _leaves(x0)[0]
    with FakeTensorMode(allow_non_fake_inputs=True):
        out = head(x, y)
        grads = torch.autograd.grad(out.sum(), (x, head.linear.weight, head.linear.bias))
    assert isinstance(out, FakeTensor) and out.shape == (N,)
    assert [g.shape for g in grads] == [(N, D), (C, D), (C,)]
    assert x.grad is None and head.linear.weight.grad is None


# ------------------------------------------------- 3. disable_saved_tensors_hooks, eagerly


@pytest.mark.native_dispatch
@pytest.mark.parametrize("inplace", [False, True])
def test_native_backend_under_disabled_hooks_with_double_backward_as_torch(inplace):
    """Eager ``backend="native"`` (torch's kernel; the other backends are in H43's file)
    inside ``disable_saved_tensors_hooks``, two steps with buffer reuse on, first and
    second order gradients: torch's."""
    z0, y, *_ = _data(13)
    previous = xt.set_buffer_reuse(True)
    try:
        got = []
        with disable_saved_tensors_hooks("H45: no hooks"):
            for _step in range(2):
                z = _leaves(z0)[0]
                loss = xt.cross_entropy(z * 2.0, y, backend="native", label_smoothing=0.1,
                                        inplace_backward=inplace)
                g, = torch.autograd.grad(loss, z, create_graph=True)
                got.append((g.detach(), torch.autograd.grad(g.pow(2).sum(), z)[0]))
    finally:
        xt.set_buffer_reuse(previous)
    zd = _leaves(z0, dtype=F64)[0]
    g, = torch.autograd.grad(F.cross_entropy(zd * 2.0, y, label_smoothing=0.1), zd,
                             create_graph=True)
    h, = torch.autograd.grad(g.pow(2).sum(), zd)
    for a, b in got:
        _close(a, g)
        _close(b, h)


@pytest.mark.parametrize("entry", ["vocab_parallel_cross_entropy",
                                   "vocab_parallel_linear_cross_entropy"])
def test_vocab_parallel_functions_refuse_fake_tensors_by_name(entry):
    """No collective can run on fake tensors (the agreement reads values): refused by
    name at once, never torch's DataDependentOutputException (world 1: no group)."""
    from crossent.torch import distributed

    fn = getattr(distributed, entry)
    with FakeTensorMode() as mode:
        z = mode.from_tensor(torch.randn(4, 5))
        y = mode.from_tensor(torch.tensor([0, 1, 2, 3]))
        args = (z, y) if entry == "vocab_parallel_cross_entropy" else (
            z, mode.from_tensor(torch.randn(3, 5)), y.clamp(max=2))
        with pytest.raises(UnsupportedError, match="FakeTensorMode"):
            fn(*args)
