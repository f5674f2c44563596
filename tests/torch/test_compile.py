"""``torch.compile(fullgraph=True)`` of models that use crossent.torch's losses: one graph
(the losses are the ``crossent::`` custom operators, :mod:`crossent.torch._custom_ops`),
the values and every parameter's gradient of eager crossent and of torch, bad input
raising crossent's errors when the compiled code runs, dynamic batch sizes without a
recompile, and ``torch.library.opcheck`` of the operators.

Compiling is slow: the models are tiny, most cases use the ``eager`` and ``aot_eager``
backends, inductor runs only on request (``CROSSENT_TEST_INDUCTOR=1``)."""

from __future__ import annotations

import inspect
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

import crossent.torch as xt
from crossent.errors import InputError, UnsupportedError
from crossent.torch import _custom_ops  # registers the crossent:: operators
from crossent.torch._custom_ops import FORMULA

D, C = 6, 11  # features, classes

OPS = {
    "cross_entropy": torch.ops.crossent.cross_entropy_fwd.default,
    "linear_cross_entropy": torch.ops.crossent.linear_cross_entropy_fwd.default,
}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class Classifier(nn.Module):
    """``nn.Linear`` then a cross-entropy module (crossent's or torch's)."""

    def __init__(self, loss: nn.Module, dtype=torch.float32) -> None:
        super().__init__()
        self.linear = nn.Linear(D, C, dtype=dtype)
        self.loss = loss

    def forward(self, x, target, num_items=None):
        logits = self.linear(x)
        if num_items is None:
            return self.loss(logits, target)
        return self.loss(logits, target, num_items=num_items)


class Decoder(nn.Module):
    """Hidden states from a tiny MLP, then :class:`crossent.torch.LinearCrossEntropyLoss`."""

    def __init__(self, dtype=torch.float32, **options) -> None:
        super().__init__()
        self.body = nn.Linear(D, D, dtype=dtype)
        self.head = xt.LinearCrossEntropyLoss(D, C, dtype=dtype, **options)

    def forward(self, x, target, num_items=None):
        hidden = torch.tanh(self.body(x))
        if num_items is None:
            return self.head(hidden, target)
        return self.head(hidden, target, num_items=num_items)


class Recorder:
    """A dynamo backend that records the operators of each graph, then runs it
    (``aot_eager`` or ``eager``)."""

    def __init__(self, backend: str) -> None:
        self.counter = CompileCounterWithBackend(backend)
        self.targets: list[str] = []

    def __call__(self, gm, example_inputs):
        self.targets += [str(node.target) for node in gm.graph.nodes]
        return self.counter(gm, example_inputs)


def grads(owner: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter's gradient (cleared after)."""
    out = {}
    for name, p in owner.named_parameters():
        assert p.grad is not None, f"{name}: no gradient"
        out[name] = p.grad.clone()
    owner.zero_grad(set_to_none=True)
    return out


def run(fn, owner: nn.Module, *args, grad_output=None, **kwargs):
    """The loss of ``fn(*args)`` and the gradients of ``owner``'s parameters
    (``grad_output`` given for ``"none"``)."""
    loss = fn(*args, **kwargs)
    loss.backward(torch.ones_like(loss) if grad_output is None else grad_output)
    return loss.detach(), grads(owner)


def as_double(result):
    loss, named = result
    return loss.double(), {k: v.double() for k, v in named.items()}


def assert_same(a, b, exact: bool = True, **tol) -> None:
    """Same loss and gradients: bit for bit (``exact``) or within ``tol``."""
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    kw = dict(rtol=0, atol=0) if exact else tol
    torch.testing.assert_close(loss_a, loss_b, **kw)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name],
                                   msg=lambda m, n=name: f"{n}: {m}", **kw)


def compiled(model, backend: str):
    recorder = Recorder(backend)
    return torch.compile(model, fullgraph=True, backend=recorder), recorder


def data(rows=10, dtype=torch.float32, probabilities=False, ignore_index=-100, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, D, generator=g).to(dtype)
    if probabilities:
        target = torch.softmax(torch.randn(rows, C, generator=g), 1).to(dtype)
    else:
        target = torch.randint(0, C, (rows,), generator=g)
        target[1] = ignore_index
    return x, target


def row_grad_output(shape, dtype):
    return torch.rand(shape, generator=torch.Generator().manual_seed(1)).to(dtype) + 0.5


# ---- CrossEntropyLoss: compiled == eager crossent == torch

CE_CASES = [
    # (crossent options, torch has them, backend, dtype, probability targets)
    (dict(), True, "aot_eager", torch.float32, False),
    (dict(label_smoothing=0.1, reduction="sum"), True, "eager", torch.float32, False),
    (dict(reduction="none", ignore_index=3), True, "aot_eager", torch.float32, False),
    (dict(label_smoothing=0.2), True, "aot_eager", torch.float32, True),
    (dict(z_loss=1e-2, softcap=4.0), False, "aot_eager", torch.float32, False),
    (dict(label_smoothing=0.1, z_loss=1e-3), False, "eager", torch.bfloat16, False),
    (dict(reduction="none"), True, "aot_eager", torch.bfloat16, True),
]


@pytest.mark.parametrize(("opts", "torch_has", "backend", "dtype", "prob"), CE_CASES)
def test_cross_entropy_loss_module(opts, torch_has, backend, dtype, prob):
    torch.manual_seed(0)
    model = Classifier(xt.CrossEntropyLoss(**opts), dtype)
    fn, recorder = compiled(model, backend)
    x, target = data(dtype=dtype, probabilities=prob, ignore_index=opts.get("ignore_index",
                                                                              -100))
    go = row_grad_output(10, dtype) if opts.get("reduction") == "none" else None
    got = run(fn, model, x, target, grad_output=go)
    assert_same(got, run(model, model, x, target, grad_output=go))
    assert "crossent.cross_entropy_fwd" in recorder.targets
    if not torch_has:
        return
    # torch's own loss module on the same parameters, in float64
    ref = Classifier(nn.CrossEntropyLoss(**opts), torch.float64)
    ref.load_state_dict(model.state_dict())
    want = run(ref, ref, x.double(), target.double() if prob else target,
               grad_output=None if go is None else go.double())
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5,
                                                                           atol=1e-6)
    assert_same(as_double(got), want, exact=False, **tol)


def test_z_loss_softcap_against_formula():
    """No torch equivalent: a float64 formula (``c tanh(z / c)``, then the
    cross-entropy plus ``z_loss * lse^2`` over the counted rows, their mean)."""
    model = Classifier(xt.CrossEntropyLoss(z_loss=1e-2, softcap=3.0, ignore_index=4))
    fn, _ = compiled(model, "aot_eager")
    x, target = data(ignore_index=4)
    got = run(fn, model, x, target)
    ref = nn.Linear(D, C, dtype=torch.float64)
    ref.load_state_dict(model.linear.state_dict())

    def formula(x, target):
        z = 3.0 * torch.tanh(ref(x) / 3.0)
        keep = target != 4
        lse = torch.logsumexp(z[keep], 1)
        return (F.cross_entropy(z[keep], target[keep], reduction="sum")
                + 1e-2 * lse.square().sum()) / keep.sum()

    want = run(formula, ref, x.double(), target)
    got_loss, got_grads = as_double(got)
    assert_same((got_loss, {k.removeprefix("linear."): v for k, v in got_grads.items()}),
                want, exact=False, rtol=1e-5, atol=1e-6)


@pytest.mark.native_dispatch
def test_small_input_native_route():
    """Small inputs take torch's own kernel, at run time, inside the operator."""
    model = Classifier(xt.CrossEntropyLoss(label_smoothing=0.1))
    fn, _ = compiled(model, "aot_eager")
    x, target = data()
    assert_same(run(fn, model, x, target), run(model, model, x, target))


def test_gradient_accumulation_num_items():
    """num_items (a tensor: no recompile per value): micro-batches add up to the full
    batch's mean, compiled as eagerly."""
    model = Classifier(xt.CrossEntropyLoss())
    fn, recorder = compiled(model, "aot_eager")
    x, target = data(rows=12)
    count = torch.tensor(float((target != -100).sum()))
    for i in range(0, 12, 4):
        fn(x[i:i + 4], target[i:i + 4], num_items=count).backward()
    accumulated = grads(model)
    full = run(model, model, x, target)[1]
    for name, g in accumulated.items():
        torch.testing.assert_close(g, full[name], rtol=1e-5, atol=1e-6)
    assert recorder.counter.frame_count == 1


# ---- LinearCrossEntropyLoss: compiled == eager crossent == torch's unfused head

LINEAR_CASES = [
    (dict(shift=True, bias=True), "aot_eager", torch.float32),
    (dict(reduction="none", label_smoothing=0.1, z_loss=1e-3), "eager", torch.float32),
    (dict(reduction="sum", softcap=5.0, chunk_size=4), "aot_eager", torch.float32),
    (dict(shift=True, reduction="none", ignore_index=2), "aot_eager", torch.float32),
    (dict(bias=True, label_smoothing=0.1), "aot_eager", torch.bfloat16),
]


def unfused_decoder(ref: Decoder, opts: dict):
    """The same model with torch's unfused head: ``F.linear`` then ``F.cross_entropy``."""
    shift, reduction = opts.get("shift", False), opts.get("reduction", "mean")

    def forward(x, target):
        hidden = torch.tanh(ref.body(x))
        if shift:
            hidden, target = hidden[:, :-1].reshape(-1, D), target[:, 1:].reshape(-1)
        logits = F.linear(hidden, ref.head.linear.weight, ref.head.linear.bias)
        out = F.cross_entropy(logits, target, ignore_index=opts.get("ignore_index", -100),
                              reduction=reduction,
                              label_smoothing=opts.get("label_smoothing", 0.0))
        return out.reshape(x.shape[0], -1) if shift and reduction == "none" else out

    return forward


@pytest.mark.parametrize(("opts", "backend", "dtype"), LINEAR_CASES)
def test_linear_cross_entropy_loss_module(opts, backend, dtype):
    torch.manual_seed(0)
    model = Decoder(dtype, **opts)
    fn, recorder = compiled(model, backend)
    none = opts.get("reduction") == "none"
    if opts.get("shift"):
        x = torch.randn(2, 5, D).to(dtype)
        target = torch.randint(0, C, (2, 5))
        target[0, 2] = opts.get("ignore_index", -100)
        go = row_grad_output((2, 4), dtype) if none else None
    else:
        x, target = data(dtype=dtype)
        go = row_grad_output(10, dtype) if none else None
    got = run(fn, model, x, target, grad_output=go)
    assert_same(got, run(model, model, x, target, grad_output=go))
    assert "crossent.linear_cross_entropy_fwd" in recorder.targets
    if "z_loss" in opts or "softcap" in opts:
        return
    ref = Decoder(torch.float64, **opts)
    ref.load_state_dict(model.state_dict())
    want = run(unfused_decoder(ref, opts), ref, x.double(), target,
               grad_output=None if go is None else go.double())
    tol = dict(rtol=3e-2, atol=3e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5,
                                                                           atol=1e-6)
    assert_same(as_double(got), want, exact=False, **tol)


@pytest.mark.parametrize("make", [lambda: Classifier(xt.CrossEntropyLoss(reduction="sum")),
                                  lambda: Decoder(bias=True, label_smoothing=0.1)])
def test_grad_output_other_than_one(make):
    """The gradients stored in forward are scaled by the real ``grad_output``."""
    model = make()
    fn, _ = compiled(model, "aot_eager")
    x, target = data()
    go = torch.tensor(0.37)
    assert_same(run(fn, model, x, target, grad_output=go),
                run(model, model, x, target, grad_output=go))


@pytest.mark.parametrize("shift", [False, True])
def test_statistics(shift):
    """``statistics=``: the same per-token values (and loss, gradients) as eagerly."""
    x, w = torch.randn(2, 5, D), torch.randn(C, D, requires_grad=True)
    target = torch.randint(0, C, (2, 5))
    target[0, 1] = -100
    names = ("lse", "z_loss", "target_logprob", "accuracy", "entropy")

    def step(x, w, t):
        if shift:
            return xt.linear_cross_entropy(x, w, t, shift=True, z_loss=1e-3,
                                           statistics=names[1:])
        return xt.cross_entropy(x.reshape(-1, D) @ w.T, t.reshape(-1), statistics=names[:2])

    got_loss, got = torch.compile(step, fullgraph=True, backend="aot_eager")(x, w, target)
    want_loss, want = step(x, w, target)
    torch.testing.assert_close(got_loss, want_loss, rtol=0, atol=0)
    for field, a, b in zip(type(want)._fields, got, want, strict=True):
        if b is None:
            assert a is None, field
        else:
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True,
                                       msg=lambda m, f=field: f"{f}: {m}")
    torch.testing.assert_close(torch.autograd.grad(got_loss, w)[0],
                               torch.autograd.grad(want_loss, w)[0], rtol=0, atol=0)


def test_functional_entry_points_and_target_gradient():
    """The functional forms; a probability target that requires grad (its gradient comes
    from the backward operator) and class weights."""
    x, _ = data()
    w = torch.randn(C, D, requires_grad=True)
    t = torch.softmax(torch.randn(10, C), 1).requires_grad_()
    cw = torch.rand(C) + 0.5

    def step(x, w, t):
        logits = x @ w.T
        return (xt.cross_entropy(logits, t, cw, label_smoothing=0.1)
                + xt.linear_cross_entropy(x, w, t, weight=cw, reduction="sum", z_loss=1e-3))

    fn = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(fn(x, w, t), (w, t))
    want = torch.autograd.grad(step(x, w, t), (w, t))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ---- one graph, no recompiles

def test_no_graph_break_explain():
    model = Decoder(shift=True, label_smoothing=0.1)
    x = torch.randn(2, 5, D)
    target = torch.randint(0, C, (2, 5))
    explained = torch._dynamo.explain(model)(x, target)
    assert explained.graph_count == 1
    assert explained.graph_break_count == 0


def test_dynamic_batch_no_recompile():
    model = Decoder(shift=True, bias=True)
    fn, recorder = compiled(model, "aot_eager")
    for batch in (2, 3, 5):
        x = torch.randn(batch, 7, D)
        target = torch.randint(0, C, (batch, 7))
        torch._dynamo.mark_dynamic(x, 0)
        torch._dynamo.mark_dynamic(target, 0)
        assert_same(run(fn, model, x, target), run(model, model, x, target))
    assert recorder.counter.frame_count == 1


def test_autocast_and_no_grad():
    model = Classifier(xt.CrossEntropyLoss(z_loss=1e-3))
    fn, _ = compiled(model, "aot_eager")
    x, target = data()

    def under_autocast(m):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return m(x, target)

    got, want = run(under_autocast, model, fn), run(under_autocast, model, model)
    assert got[0].dtype == want[0].dtype == torch.float32
    assert_same(got, want)
    with torch.no_grad():
        torch.testing.assert_close(fn(x, target), model(x, target), rtol=0, atol=0)


def test_retain_graph_and_inplace_backward_ignored():
    """Backward twice works (nothing consumed); inplace_backward leaves the logits
    intact under compile (an operator may not mutate its input)."""
    z = torch.randn(10, C, requires_grad=True)
    _, target = data()

    def step(z, t):
        logits = z * 2.0
        return xt.cross_entropy(logits, t, inplace_backward=True), logits

    loss, logits = torch.compile(step, fullgraph=True, backend="aot_eager")(z, target)
    (first,) = torch.autograd.grad(loss, z, retain_graph=True)
    (second,) = torch.autograd.grad(loss, z)
    torch.testing.assert_close(logits, z.detach() * 2.0, rtol=0, atol=0)
    (want,) = torch.autograd.grad(xt.cross_entropy(z * 2.0, target), z)
    torch.testing.assert_close(first, want, rtol=0, atol=0)
    torch.testing.assert_close(second, want, rtol=0, atol=0)


def test_double_backward_refused():
    z = torch.randn(10, C, requires_grad=True)
    _, target = data()
    fn = torch.compile(xt.cross_entropy, fullgraph=True, backend="eager")
    loss = fn(z, target)
    with pytest.raises(UnsupportedError, match="double backward"):
        torch.autograd.grad(loss, z, create_graph=True)


# ---- bad input raises crossent's errors when the compiled code runs

BAD = [
    (dict(label_smoothing=1.5), InputError, "label_smoothing"),
    (dict(reduction="average"), InputError, "reduction"),
    (dict(num_items=torch.tensor(0.0)), InputError, "num_items"),
    (dict(ignore_index=2.5), InputError, "ignore_index"),
    (dict(backend="fast"), InputError, "backend"),
    # types an operator cannot carry: found while tracing, raised when the code runs
    (dict(reduction=None), InputError, "reduction"),
    (dict(loss_dtype="float32"), InputError, "loss_dtype"),
    (dict(num_items=torch.tensor(4.0, requires_grad=True)), UnsupportedError, "num_items"),
    (dict(weight=torch.ones(C, requires_grad=True)), UnsupportedError, "weight"),
]


@pytest.mark.parametrize(("kwargs", "error", "name"), BAD)
def test_bad_input_raises_at_run_time(kwargs, error, name):
    z = torch.randn(10, C, requires_grad=True)
    _, target = data()
    fn = torch.compile(lambda z, t: xt.cross_entropy(z, t, **kwargs), fullgraph=True,
                       backend="eager")
    with pytest.raises(error, match=name):
        fn(z, target)


def test_bad_target_under_compile():
    fn = torch.compile(xt.linear_cross_entropy, fullgraph=True, backend="aot_eager")
    x, w = torch.randn(4, D), torch.randn(C, D, requires_grad=True)
    with pytest.raises(InputError, match="target"):
        fn(x, w, torch.zeros(5, dtype=torch.long))
    with pytest.raises(IndexError, match="class index"):
        fn(x, w, torch.full((4,), C))
    with pytest.raises(InputError, match="target"):
        fn(x, w, [0, 1, 2, 3])
    with pytest.raises(InputError, match="shift"):
        fn(x, w, torch.zeros(4, dtype=torch.long), shift="yes")


# ---- the operators themselves

@pytest.mark.parametrize("name", ["cross_entropy", "linear_cross_entropy"])
def test_compiled_entry_has_the_public_signature(name):
    """Under compile the public function's arguments go to ``compiled_<name>`` as given."""

    def params(fn):
        return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]

    assert params(getattr(_custom_ops, f"compiled_{name}")) == params(getattr(xt, name))


def _ce_args(z, t, requires, want_grads, reduction="mean", weight=None, statistics=None,
             copy_input=False):
    return (z, t, weight, None, requires, want_grads, copy_input, None, -100, None, reduction,
            0.1, 1e-3, None, z.dtype, None, "auto", None, statistics, FORMULA)


def _linear_args(x, w, b, t, requires, want_grads, reduction, statistics=None,
                 copy_inputs=False, autocast=None):
    return (x, w, b, t, None, None, requires, want_grads, copy_inputs, reduction, None, 0.0,
            1e-3, 4.0, 3, None, None, None, None, None, False, torch.float32, None, "auto",
            False, autocast, statistics, FORMULA)


def test_opcheck():
    z = torch.randn(6, 5, requires_grad=True)
    t = torch.randint(0, 5, (6,))
    t_ignored = t.clone()
    t_ignored[1] = -100
    p = torch.softmax(torch.randn(6, 5), 1).requires_grad_()
    cw = torch.rand(5)
    x, w, b = (torch.randn(6, 4, requires_grad=True), torch.randn(5, 4, requires_grad=True),
               torch.randn(5, requires_grad=True))
    cases = [
        (OPS["cross_entropy"], _ce_args(z, t, [True, False, False, False], True,
                                        statistics="lse,accuracy")),
        (OPS["cross_entropy"], _ce_args(z, p, [True, True, False, False], False, "none",
                                        cw)),
        # float16: a copy of the logits for backward's recompute (_recomputes_float16)
        (OPS["cross_entropy"], _ce_args(z.detach().half().requires_grad_(), t,
                                        [True, False, False, False], False, "sum",
                                        copy_input=True)),
        (OPS["linear_cross_entropy"], _linear_args(x, w, b, t, [True] * 3 + [False] * 3,
                                                   True, "sum")),
        (OPS["linear_cross_entropy"], _linear_args(x, w, None, t, [True, True] + [False] * 4,
                                                   False, "none", "entropy,target_logprob")),
        # a float16 head: copies of x and b (under autocast x, W and b cast) for the
        # backward's recompute (_head_copy_dtypes)
        *((OPS["linear_cross_entropy"], _linear_args(
            *(t.detach().to(dtype).requires_grad_() for t in (x, w, b)), t,
            [True] * 3 + [False] * 3, False, "sum", copy_inputs=True, autocast=cast))
          for dtype, cast in ((torch.float16, None), (torch.float32, torch.float16))),
        # the backward operators (no autograd of their own)
        (torch.ops.crossent.cross_entropy_bwd.default,
         (torch.rand(6), *_ce_args(z.detach(), p.detach(), [True, True, False, False],
                                   False, "none", cw))),
        # the CPU scaling of the stored gradient (an infinite grad_output on an ignored
        # row: opcheck's comparison takes no NaN)
        *((torch.ops.crossent.scale_stored_grad_cpu.default,
           (torch.rand(6, 5), go, t_ignored, -100, smoothing, whole))
          for go, smoothing, whole in (
              (torch.tensor([1.0, -float("inf"), 2, 3, 4, 5]), False, None),
              (torch.tensor(2.0), True, None),
              (torch.tensor(3.0), False, torch.rand(6) < 0.5))),
        # what a backward that scales stored gradients reads for its versions
        *((torch.ops.crossent.read_saved.default, (go, saved))
          for go, saved in ((torch.rand(6)[::2], [cw, None]),
                            (torch.tensor(2.0), [torch.tensor(3), None, cw]))),
        (torch.ops.crossent.linear_cross_entropy_bwd.default,
         (torch.rand(6), *_linear_args(x.detach(), w.detach(), b.detach(), t,
                                       [True] * 3 + [False] * 3, False, "none"))),
    ]
    for op, args in cases:
        result = torch.library.opcheck(op, args)
        assert set(result.values()) == {"SUCCESS"}, (op, result)


@pytest.mark.skipif(os.environ.get("CROSSENT_TEST_INDUCTOR") != "1",
                    reason="inductor's first compile takes 6-14 s on a 2-core CPU (measured: "
                           "too slow for the suite); set CROSSENT_TEST_INDUCTOR=1")
def test_inductor():
    model = Decoder(shift=True, bias=True, z_loss=1e-3)
    fn = torch.compile(model, fullgraph=True)
    x = torch.randn(2, 5, D)
    target = torch.randint(0, C, (2, 5))
    assert_same(run(fn, model, x, target), run(model, model, x, target), exact=False,
                rtol=1e-5, atol=1e-6)


def test_the_formula_digest_is_in_the_graph_dynamo_hands_on():
    """torch's AOTAutograd cache keys on dynamo's graph and trusts an operator's name: the
    digest of crossent's traced code is an argument there, so a crossent whose autograd
    formulas changed compiles afresh instead of reusing a stale backward graph."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    z = torch.randn(4, 5, requires_grad=True)
    torch.compile(xt.cross_entropy, backend=backend, fullgraph=True)(z, torch.tensor([0, 1, 2,
                                                                                      3]))
    w = torch.randn(5, 3, requires_grad=True)
    torch.compile(xt.linear_cross_entropy, backend=backend, fullgraph=True)(
        torch.randn(4, 3), w, torch.tensor([0, 1, 2, 3]))
    torch._dynamo.reset()
    assert len(graphs) == 2
    for gm in graphs:
        assert FORMULA in str([n.args for n in gm.graph.nodes])
    assert FORMULA.startswith("crossent ") and len(FORMULA.split()[-1]) == 16
