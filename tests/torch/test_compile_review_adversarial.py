"""Adversarial review (H23) of the compiled backward of ac32687: ``_scale_logits_grad``,
``_scale_head_grads`` and ``_sign_outputs`` in :mod:`crossent.torch._custom_ops`.

The common path (``grad_output`` 1 or finite) must keep eager crossent's and torch's values,
one graph, no break, one trace for a dynamic ``N``, nothing ``C x D`` kept for backward; the
non-finite pattern must be torch's in cases the feature tests miss; backward twice and
``is_grads_batched``; the Hugging Face integration compiled with an AOT backend.
References: ``F.cross_entropy`` (of ``F.linear``) on the same inputs, eager crossent.
Bugs found are in /work/notes/H23-bugs.md; the tests at the end pin their fixes."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

import crossent.torch as xt
from crossent.torch import _custom_ops  # noqa: F401  (registers the crossent:: operators)

IGNORE = -100
NONFINITE = (math.inf, -math.inf, math.nan)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _compiled(fn, backend="aot_eager"):
    return torch.compile(fn, backend=backend, fullgraph=True)


def _head(x, w, b, target, **kwargs):
    return xt.linear_cross_entropy(x, w, target, b, **kwargs)


def _torch_head(x, w, b, target, weight=None, reduction="mean", label_smoothing=0.0,
                ignore_index=IGNORE, **_):
    return F.cross_entropy(F.linear(x, w, b), target, weight, reduction=reduction,
                           label_smoothing=label_smoothing, ignore_index=ignore_index)


def _torch_ce(z, target, **kwargs):
    return F.cross_entropy(z, target, **kwargs)


def assert_same(got, want, what, atol=1e-5, rtol=1e-4):
    """Same NaN positions, same infinities with sign, finite values close."""
    assert (got is None) == (want is None), what
    if got is None:
        return
    assert got.shape == want.shape and got.dtype == want.dtype, what
    assert torch.equal(got.isnan(), want.isnan()), f"{what}: NaN pattern\n{got}\n{want}"
    assert torch.equal(got.isinf(), want.isinf()), f"{what}: inf pattern\n{got}\n{want}"
    assert torch.equal(got[got.isinf()], want[want.isinf()]), f"{what}: signs of inf"
    finite = got.isfinite()
    torch.testing.assert_close(got[finite], want[finite], atol=atol, rtol=rtol, msg=what)


def _grads(fn, inputs, args, grad_output, **kwargs):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    loss = fn(*leaves, *args, **kwargs)
    loss.backward(torch.full_like(loss, grad_output) if not torch.is_tensor(grad_output)
                  else grad_output)
    return [t.grad for t in leaves]


def _documented(want, at_one, value, head):
    """The compiled linear head's documented rule (module docstring of _custom_ops) under
    an infinite grad_output: dx torch's; dW/db the stored (grad_output 1) ones times it,
    +-inf where torch's sums of infinities hold NaN in places. Elsewhere: ``want``."""
    if not head or not math.isinf(float(value)):
        return want
    return [want[0], *((g.double() * float(value)).to(g.dtype) for g in at_one[1:])]


def _check(fn, reference, inputs, args, values, head=False, **kwargs):
    """The compiled call's gradients against torch's and eager crossent's, per value of
    a (loss-shaped) grad_output (``head``: with the documented rule for dW/db under an
    infinite one); one graph, no graph break."""
    compiled = _compiled(fn)
    at_one = _grads(compiled, inputs, args, 1.0, **kwargs)
    for value in values:
        got = _grads(compiled, inputs, args, value, **kwargs)
        for name, ref in (("torch", reference), ("eager crossent", fn)):
            want = _documented(_grads(ref, inputs, args, value, **kwargs), at_one, value,
                               head)
            for i, (a, b) in enumerate(zip(got, want, strict=True)):
                assert_same(a, b, f"grad {i} vs {name}, grad_output {value}")
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["graph_break"]


# ---- (1) the common path: grad_output 1 or finite


def _ce_cases():
    torch.manual_seed(0)
    z, t = torch.randn(6, 5), torch.tensor([1, IGNORE, 0, 4, 4, 2])
    z4, t4 = torch.randn(2, 5, 3, 2), torch.randint(0, 5, (2, 3, 2))
    t4[0, 1, 1] = IGNORE
    probs = torch.softmax(torch.randn(6, 5), 1)
    return {
        "none, class weights": ([z], [t], dict(reduction="none", weight=torch.rand(5))),
        "probabilities, none": ([z], [probs], dict(reduction="none")),
        "(N, C, d1, d2), weights, smoothing": (
            [z4], [t4], dict(weight=torch.rand(5), label_smoothing=0.1)),
        "(N, C, d1, d2), none": ([z4], [t4], dict(reduction="none")),
        "ignore_index 3": ([z], [torch.tensor([1, 3, 0, 3, 4, 2])], dict(ignore_index=3)),
        "all ignored": ([z], [torch.full((6,), IGNORE)], {}),
        "N = 0, sum": ([torch.randn(0, 5)], [torch.zeros(0, dtype=torch.long)],
                       dict(reduction="sum")),
        "int32 targets": ([z], [t.int()], {}),
    }


@pytest.mark.parametrize("case", list(_ce_cases()))
def test_cross_entropy_common_path(case):
    inputs, args, kwargs = _ce_cases()[case]

    def reference(z, target, **kw):
        return F.cross_entropy(z, target.long() if not target.is_floating_point() else target,
                               **kw)

    _check(xt.cross_entropy, reference, inputs, args, (1.0, -2.5), **kwargs)


def test_cross_entropy_num_items_tensor_statistics_autocast():
    torch.manual_seed(1)
    z, t = torch.randn(6, 5), torch.tensor([1, IGNORE, 0, 4, 4, 2])
    count = torch.tensor(7.0)

    def ours(z, t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = xt.cross_entropy(z, t, num_items=count, statistics=("lse",))
        return loss

    def reference(z, t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return F.cross_entropy(z, t, reduction="sum") / 7.0

    compiled = _compiled(ours)
    for value in (1.0, 2.5, *NONFINITE):
        got = _grads(compiled, [z], [t], value)[0]
        assert_same(got, _grads(reference, [z], [t], value)[0], f"vs torch, {value}")
        assert_same(got, _grads(ours, [z], [t], value)[0], f"vs eager, {value}")


def _head_cases():
    torch.manual_seed(2)
    x, w, b = torch.randn(7, 5), torch.randn(6, 5), torch.randn(6)
    t = torch.tensor([1, IGNORE, 0, 4, 5, 5, 2])
    return {
        "chunked, class weights": ([x, w, b], [t], dict(chunk_size=3, weight=torch.rand(6))),
        "none, chunked": ([x, w, b], [t], dict(reduction="none", chunk_size=3)),
        "probabilities": ([x, w, b], [torch.softmax(torch.randn(7, 6), 1)],
                          dict(chunk_size=3)),
        "ignore_index 2": ([x, w, b], [torch.tensor([1, 2, 0, 4, 5, 2, 2])],
                           dict(ignore_index=2, chunk_size=3)),
        "all ignored, sum": ([x, w, b], [torch.full((7,), IGNORE)], dict(reduction="sum")),
        "N = 0, sum": ([torch.randn(0, 5), w, b], [torch.zeros(0, dtype=torch.long)],
                       dict(reduction="sum", chunk_size=3)),
    }


@pytest.mark.parametrize("case", list(_head_cases()))
def test_linear_head_common_path(case):
    inputs, args, kwargs = _head_cases()[case]
    _check(_head, _torch_head, inputs, args, (1.0, 2.5), **kwargs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_head_and_autocast_match_torch(dtype):
    """bfloat16/float16 heads and autocast: close to torch at 1 and 2.5 (one rounding more
    is documented for bfloat16), torch's NaN/inf pattern under non-finite grad_outputs."""
    torch.manual_seed(3)
    x, w, b = torch.randn(7, 5), torch.randn(6, 5), torch.randn(6)
    t = torch.tensor([1, IGNORE, 0, 4, 5, 5, 2])
    low = [x.to(dtype), w.to(dtype), b.to(dtype)]

    def reference(x, w, b, t):
        return F.cross_entropy(F.linear(x, w, b).float(), t)

    def ours_autocast(x, w, b, t):
        with torch.autocast("cpu", dtype=dtype):
            return _head(x, w, b, t, chunk_size=3)

    def torch_autocast(x, w, b, t):
        with torch.autocast("cpu", dtype=dtype):
            return F.cross_entropy(F.linear(x, w, b), t)

    for ours, ref, inputs in (((lambda *a: _head(*a, chunk_size=3)), reference, low),
                              (ours_autocast, torch_autocast, [x, w, b])):
        torch._dynamo.reset()
        compiled = _compiled(ours)
        at_one = _grads(compiled, inputs, [t], 1.0)
        for value in (1.0, 2.5, *NONFINITE):
            got = _grads(compiled, inputs, [t], value)
            # float16 heads recompute with the real grad_output (review H105), so their
            # dW/db are torch's under an infinite one, not the documented stored rule
            want = _documented(_grads(ref, inputs, [t], value), at_one, value,
                               dtype != torch.float16)
            for a, c in zip(got, want, strict=True):
                assert_same(a.float(), c.float(), f"{dtype}, {value}", atol=3e-2, rtol=3e-2)


def test_head_k_dimensional_weight_shift_and_num_items_tensor():
    torch.manual_seed(4)
    x, wk, bk = torch.randn(7, 5), torch.randn(6, 2, 5), torch.randn(6, 2)
    tk = torch.randint(0, 6, (7, 2))
    tk[1] = IGNORE
    tk[3, 0] = IGNORE
    signed = torch.tensor([1.0, -1.0, 2.0, 0.0, 1.0, 0.5])

    def k_reference(x, w, b, t, **kw):
        logits = F.linear(x, w.reshape(12, 5), b.reshape(12)).reshape(7, 6, 2)
        return F.cross_entropy(logits, t, **kw)

    values = (1.0, -2.5, *NONFINITE)
    _check(_head, k_reference, [x, wk, bk], [tk], values, head=True, weight=signed)
    torch._dynamo.reset()
    counters.clear()
    xs, w, b = torch.randn(2, 4, 5), torch.randn(6, 5), torch.randn(6)
    ts = torch.tensor([[9, 1, IGNORE, 5], [9, IGNORE, IGNORE, 0]]) % 6

    def shift_reference(x, w, b, t, shift=None, weight=None):
        return F.cross_entropy(F.linear(x[:, :-1].reshape(-1, 5), w, b),
                               t[:, 1:].reshape(-1), weight)

    _check(_head, shift_reference, [xs, w, b], [ts], values, head=True, shift=True,
           weight=signed)
    torch._dynamo.reset()
    counters.clear()
    x, t = torch.randn(7, 5), torch.tensor([1, IGNORE, 0, 4, 5, 5, 2])
    count = torch.tensor(9.0)

    def counted_reference(x, w, b, t):
        return F.cross_entropy(F.linear(x, w, b), t, signed, reduction="sum") / 9.0

    _check(lambda x, w, b, t: _head(x, w, b, t, num_items=count, weight=signed, chunk_size=3),
           counted_reference, [x, w, b], [t], values, head=True)


def test_dynamic_n_traces_once():
    """mark_dynamic on N: one graph for every N (cross_entropy; the head with shift=True),
    no graph break; the gradients stay eager crossent's."""
    for name in ("cross_entropy", "head, shift"):
        torch._dynamo.reset()
        counters.clear()
        fn = (xt.cross_entropy if name == "cross_entropy"
              else (lambda x, w, b, t: _head(x, w, b, t, shift=True, chunk_size=3)))
        compiled = _compiled(fn)
        for n in (5, 8, 11):
            g = torch.Generator().manual_seed(n)
            if name == "cross_entropy":
                inputs = [torch.randn(n, 7, generator=g)]
                target = torch.randint(0, 7, (n,), generator=g)
                dims = [(inputs[0], 0), (target, 0)]
            else:
                inputs = [torch.randn(2, n, 5, generator=g), torch.randn(7, 5, generator=g),
                          torch.randn(7, generator=g)]
                target = torch.randint(0, 7, (2, n), generator=g)
                dims = [(inputs[0], 1), (target, 1)]
            target[..., 1] = IGNORE
            leaves = [t.clone().requires_grad_() for t in inputs]
            for tensor, dim in [(leaves[0], dims[0][1]), (target, dims[1][1])]:
                torch._dynamo.mark_dynamic(tensor, dim)
            value = math.inf if name == "cross_entropy" else math.nan  # (head: documented)
            compiled(*leaves, target).backward(torch.tensor(value))
            want = _grads(fn, inputs, [target], value)
            for a, b in zip((t.grad for t in leaves), want, strict=True):
                assert_same(a, b, f"{name}, N={n}")
        assert counters["stats"]["unique_graphs"] == 1, name
        assert not counters["graph_break"], name


@pytest.mark.parametrize("backend", ["aot_eager", "eager"])  # eager: B6 in ac32687
def test_head_keeps_no_weight_for_backward(backend):
    """An intermediate linear weight (here W * 2) is not kept alive for backward: the
    backward needs only its shape (AOT partitions it away)."""
    saved: list[torch.Tensor] = []

    def pack(t):
        saved.append(t)
        return t

    x, w0 = torch.randn(6, 4, requires_grad=True), torch.randn(50, 4, requires_grad=True)
    t = torch.tensor([1, IGNORE, 0, 4, 4, 2])
    compiled = _compiled(lambda x, w0, t: xt.linear_cross_entropy(x, w0 * 2, t), backend)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = compiled(x, w0, t)
    loss.backward()
    doubled = (w0 * 2).detach()
    assert not any(s.shape == doubled.shape and torch.equal(s, doubled) for s in saved)


# ---- (3) the non-finite pattern in cases the feature tests miss


def test_cross_entropy_mixed_zero_weights_and_minus_inf_logits():
    torch.manual_seed(5)
    z = torch.randn(5, 4)
    z[0, 1] = -math.inf  # a counted row's target logit -inf (loss inf)
    z[2, 3] = -math.inf
    z[3, 0] = -math.inf  # an ignored row with a -inf logit
    t = torch.tensor([1, 2, 0, IGNORE, 3])
    values = (1.0, 0.0, -2.5, *NONFINITE)
    _check(xt.cross_entropy, _torch_ce, [z], [t], values,
           weight=torch.tensor([1.0, -2.0, 0.0, 3.0]))
    torch._dynamo.reset()
    counters.clear()
    _check(xt.cross_entropy, _torch_ce, [z], [t], values, reduction="none")


def _signed_features():
    # column 0 positive, 1 all zero, 2 mixed, 3 negative with a 0 in an ignored row
    return torch.tensor([[1.0, 0.0, -1.0, -1.0], [2.0, 0.0, 2.0, -3.0],
                         [0.5, 0.0, 5.0, 0.0], [3.0, 0.0, -3.0, -0.5],
                         [1.5, 0.0, -1.0, -2.0]])


@pytest.mark.parametrize("case", ["mixed-sign weights", "zero weight", "one counted row",
                                  "duplicate targets", "-inf bias"])
def test_linear_head_signs(case):
    torch.manual_seed(6)
    x, w, b = _signed_features(), torch.randn(5, 4), torch.randn(5)
    t = torch.tensor([0, 1, IGNORE, 1, 0])
    kwargs: dict = {"chunk_size": 2}
    if case == "mixed-sign weights":
        kwargs["weight"] = torch.tensor([2.0, -0.5, 1.0, 0.5, 3.0])
    elif case == "zero weight":
        kwargs["weight"] = torch.tensor([0.0, 1.0, 1.0, 0.5, 3.0])
    elif case == "one counted row":
        t = torch.tensor([IGNORE, IGNORE, IGNORE, 2, IGNORE])
    elif case == "duplicate targets":
        t = torch.full((5,), 3)
    else:
        b[4] = -math.inf  # class 4's probability is 0 in every row
    _check(_head, _torch_head, [x, w, b], [t], (1.0, 0.0, -2.5, *NONFINITE), head=True,
           **kwargs)


# ---- (4) backward twice, is_grads_batched


@pytest.mark.parametrize("which", ["cross_entropy", "head"])
def test_backward_twice_with_retain_graph(which):
    torch.manual_seed(7)
    t = torch.tensor([1, IGNORE, 0, 3, 3])
    inputs = [torch.randn(5, 4)] if which == "cross_entropy" else [
        torch.randn(5, 3), torch.randn(4, 3), torch.randn(4)]
    fn, ref = (xt.cross_entropy, _torch_ce) if which == "cross_entropy" else (_head, _torch_head)
    leaves = [v.clone().requires_grad_() for v in inputs]
    loss = _compiled(fn)(*leaves, t)
    values = (2.0, math.inf if which == "cross_entropy" else math.nan, 2.0)
    mine = [torch.autograd.grad(loss, leaves, torch.tensor(g), retain_graph=True)
            for g in values]
    for g, got in zip(values, mine, strict=True):
        for a, c in zip(got, _grads(ref, inputs, [t], g), strict=True):
            assert_same(a, c, f"{which}, grad_output {g}")


@pytest.mark.parametrize("backend", ["aot_eager"])
def test_is_grads_batched_follows_torch(backend):
    """aot_eager: torch's batched gradients (NaN/inf included); the same outcome as
    torch's compiled loss. (inductor, checked by hand: its C++ backward cannot read vmap's
    batched tensors, "Cannot access data pointer of Tensor that doesn't have storage",
    exactly as torch's own compiled F.cross_entropy; 9 s of compiling, left out.)"""
    torch.manual_seed(8)
    z, t = torch.randn(5, 4), torch.tensor([1, IGNORE, 0, 3, 3])
    grads = torch.tensor([1.0, -3.0, math.inf])

    def outcome(fn):
        leaf = z.clone().requires_grad_()
        loss = fn(leaf, t)
        try:
            return torch.autograd.grad(loss, leaf, grads, is_grads_batched=True)[0]
        except RuntimeError as error:
            return type(error)

    got = outcome(_compiled(xt.cross_entropy, backend))
    want = outcome(_compiled(F.cross_entropy, backend))
    if isinstance(want, type) or isinstance(got, type):
        assert got is want
    else:
        assert_same(got, want, backend)
    if backend == "aot_eager":
        assert_same(got, outcome(F.cross_entropy), "vs torch eager")


# ---- (2) the Hugging Face integration compiled with an AOT backend


def test_hf_patched_model_under_aot_eager():
    transformers = pytest.importorskip("transformers")
    from crossent.integrations import transformers as xhf

    config = transformers.LlamaConfig(
        vocab_size=61, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
        tie_word_embeddings=True)
    torch.manual_seed(9)
    model = transformers.LlamaForCausalLM(config).train()
    ours = _compiled(xhf.patch(copy.deepcopy(model), chunk_size=5))
    ids = torch.randint(0, 61, (2, 8), generator=torch.Generator().manual_seed(9))
    labels = ids.clone()
    labels[0, :3] = IGNORE
    count = torch.tensor(11)
    for scale in (0.5, math.nan):  # (an infinite one: dW of the head as documented)
        steps = []
        for m in (model, ours):
            m.zero_grad()
            loss = m(input_ids=ids, labels=labels, num_items_in_batch=count).loss
            (loss * scale).backward()
            steps.append((loss.detach(), {n.removeprefix("_orig_mod."): p.grad.clone()
                                          for n, p in m.named_parameters()}))
        assert_same(steps[1][0], steps[0][0], "loss")
        for name, grad in steps[0][1].items():
            assert_same(steps[1][1][name], grad, f"{name}, scale {scale}", atol=1e-5,
                        rtol=1e-4)
    assert not counters["graph_break"]


# ---- bugs found in ac32687 (/work/notes/H23-bugs.md), fixed in the working tree since


@pytest.mark.parametrize("which", ["cross_entropy", "head"])
def test_float64_loss_huge_grad_output(which):
    """B1 (fixed in the working tree after ac32687): a float64 grad_output finite in
    float64 but inf in float32 (1e300) is rounded first: torch's NaN at the targets."""
    torch.manual_seed(10)
    t = torch.tensor([0, IGNORE, 2, 1])
    inputs = [torch.randn(4, 3)] if which == "cross_entropy" else [
        torch.randn(4, 3), torch.randn(5, 3), torch.randn(5)]
    if which == "cross_entropy":
        def ours(z, t):
            return xt.cross_entropy(z, t, loss_dtype=torch.float64)

        def reference(z, t):
            return F.cross_entropy(z, t).double()
    else:
        def ours(x, w, b, t):
            return _head(x, w, b, t, loss_dtype=torch.float64)

        def reference(x, w, b, t):
            return _torch_head(x, w, b, t).double()
    g = torch.tensor(1e300, dtype=torch.float64)
    compiled = _compiled(ours)
    got = _grads(compiled, inputs, [t], g)
    at_one = _grads(compiled, inputs, [t], torch.tensor(1.0, dtype=torch.float64))
    want = _documented(_grads(reference, inputs, [t], g), at_one, math.inf, which == "head")
    for a, c in zip(got, want, strict=True):
        assert_same(a, c, which)


def test_cross_entropy_ignore_index_none_compiles():
    """B3 (ac32687: BackendCompilerFailed tracing the backward): None is -100, as eager."""
    torch.manual_seed(12)
    z, t = torch.randn(5, 4), torch.tensor([1, IGNORE, 0, 3, 3])
    def reference(z, t, ignore_index):
        return F.cross_entropy(z, t, ignore_index=IGNORE if ignore_index is None
                               else ignore_index)

    _check(xt.cross_entropy, reference, [z], [t], (1.0, math.inf), ignore_index=None)


def test_float16_head_grad_scaler_grad_output():
    """B5 (older than ac32687): a float16 head with a float32 loss rounded grad_output to
    float16 before the product: GradScaler's 65536 was inf, every gradient non-finite."""
    torch.manual_seed(14)
    x, w = torch.randn(6, 4).half(), (torch.randn(5, 4) * 0.1).half()
    b, t = torch.randn(5).half(), torch.tensor([1, 0, IGNORE, 1, 3, 4])

    def ours(x, w, b, t):
        return _head(x, w, b, t, loss_dtype=torch.float32, chunk_size=2)

    def reference(x, w, b, t):
        return F.cross_entropy(F.linear(x, w, b).float(), t)

    got = _grads(_compiled(ours), [x, w, b], [t], 65536.0)
    want = _grads(reference, [x, w, b], [t], 65536.0)
    for a, c in zip(got, want, strict=True):
        assert bool(c.isfinite().all())
        assert_same(a.float(), c.float(), "float16 head", atol=64.0, rtol=2e-2)


@pytest.mark.parametrize("case", ["D = 0", "C = 0"])
def test_head_zero_features_or_classes(case):
    """B7/B8 (ac32687: 'cannot reshape tensor of 0 elements' at grad_output 1)."""
    torch.manual_seed(15)
    if case == "D = 0":
        inputs, t, kwargs = ([torch.randn(4, 0), torch.randn(3, 0), torch.randn(3)],
                             torch.tensor([1, IGNORE, 0, 2]), {})
    else:
        inputs, t, kwargs = ([torch.randn(4, 2), torch.randn(0, 2), torch.randn(0)],
                             torch.full((4,), IGNORE), {"reduction": "sum"})
    _check(_head, _torch_head, inputs, [t], (1.0, math.inf), head=True, **kwargs)


def test_head_k_dimensional_position_nothing_counts_nan_grad_output():
    torch.manual_seed(16)
    x, wk, bk = torch.randn(4, 3), torch.randn(5, 2, 3), torch.randn(5, 2)
    tk = torch.tensor([[1, IGNORE], [IGNORE, IGNORE], [3, IGNORE], [0, IGNORE]])

    def reference(x, w, b, t):
        return F.cross_entropy(F.linear(x, w.reshape(10, 3), b.reshape(10)).reshape(4, 5, 2),
                               t)

    _check(_head, reference, [x, wk, bk], [tk], (2.0, math.nan), head=True)


def test_head_statistics_under_compile():
    """B10 (a working-tree state after ac32687 unpacked six operator outputs before the
    statistics where four came back: statistics= failed while tracing)."""
    torch.manual_seed(17)
    x, w, b = torch.randn(7, 5), torch.randn(6, 5), torch.randn(6)
    t = torch.tensor([1, IGNORE, 0, 4, 5, 5, 2])

    def ours(x, w, b, t):
        loss, stats = _head(x, w, b, t, chunk_size=3, statistics=("lse", "accuracy"))
        return loss, stats

    leaves = [v.clone().requires_grad_() for v in (x, w, b)]
    loss, stats = _compiled(ours)(*leaves, t)
    loss.backward(torch.tensor(2.5))
    want_loss, want_stats = ours(x, w, b, t)
    assert_same(loss.detach(), want_loss.detach(), "loss")
    assert_same(stats.lse, want_stats.lse, "lse")
    assert torch.equal(stats.accuracy, want_stats.accuracy)
    assert torch.equal(stats.counted, want_stats.counted)
    for a, c in zip((v.grad for v in leaves), _grads(_torch_head, [x, w, b], [t], 2.5),
                    strict=True):
        assert_same(a, c, "grads")
