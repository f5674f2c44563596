"""Session 16 trust round, input classes: ``crossent.torch`` probed as an adversarial user
would, against plain torch (``F.cross_entropy``, ``F.linear`` + ``F.cross_entropy``), on
every CPU route (``backend="auto"`` with torch's own dispatch thresholds, ``"auto"`` with the
fused kernel at every size, the small-batch kernel, ``"native"``, ``"rowblock"``; Triton is
another suite's).

What the earlier rounds did not cover, and this file does:

* every integer target dtype torch refuses but crossent accepts (int8, int16, uint16, int32,
  uint32) gives torch's numbers for the same ids in int64, at the dtype's limits too, with
  ``ignore_index`` at a limit, equal to a valid class, positive, far outside the classes;
  uint64 ids past ``2**63`` are refused (they wrapped to negative ids, silently ignored);
* float16/bfloat16/float64 logits with every reduction x class weights x ``ignore_index`` x
  label smoothing, index and probability targets (mixed dtypes), loss dtype and shape,
  gradients of the logits, the target and the weight: torch's in float32 (crossent's
  documented arithmetic), NaN and infinities exactly where torch has them;
* non-finite logits (inf, -inf, NaN, a row of -inf, 1e30, the dtype's max) with a finite,
  negative, infinite or NaN ``grad_output``, non-finite class weights and probability
  targets;
* shapes: unbatched, ``C = 1``, ``N = 0``, ``d1 = 0``, ``(N, C, d1, d2)`` channels-last,
  transposed / stepped / stride-0 / overlapping logits, ``C = 2**20`` with two rows, a row
  count one either side of a kernel block;
* the linear head with narrow targets, low precision, strided and aliased operands;
* the vocab-parallel functions in world size 1 and on 2 gloo ranks (narrow targets,
  non-finite low-precision logits, a strided slice);
* the other public functions' argument checks (``set_buffer_reuse``, ``global_num_items``).

References never come from crossent: torch in float32/float64 on the same values.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from grad_probes import ROUTES, gen, one_thread, use_route

import crossent.torch as xt
from crossent.errors import InputError
from crossent.torch import _rules
from crossent.torch.distributed import (
    global_num_items,
    vocab_parallel_cross_entropy,
    vocab_parallel_linear_cross_entropy,
)

sys.path.insert(0, str(Path(__file__).parent / "distributed"))
from dist_harness import run_group

pytestmark = [pytest.mark.native_dispatch, pytest.mark.timeout(120)]

LOW = (torch.float16, torch.bfloat16)
INF, NAN = math.inf, math.nan


_one_thread = pytest.fixture(autouse=True)(one_thread)


def up(t):
    """A low-precision floating tensor in float32 (torch's reference arithmetic)."""
    if isinstance(t, torch.Tensor) and t.dtype in LOW:
        return t.float()
    return t


def assert_like(got, want, rtol=1e-5):
    """Same dtype and shape, NaN and +-inf at the same places, finite values close
    relative to the reference's largest finite magnitude."""
    assert got.dtype == want.dtype, (got.dtype, want.dtype)
    assert got.shape == want.shape, (got.shape, want.shape)
    g, w = got.detach().double(), want.detach().double()
    assert torch.equal(g.isnan(), w.isnan()), (g, w)
    assert torch.equal(g == INF, w == INF) and torch.equal(g == -INF, w == -INF), (g, w)
    finite = torch.isfinite(w)
    scale = float(w[finite].abs().max()) if finite.any() else 1.0
    torch.testing.assert_close(g[finite], w[finite], rtol=rtol, atol=rtol * max(scale, 1e-2))


def loss_and_grads(fn, leaves, grad_output=None):
    out = fn()
    needed = [t for t in leaves if t is not None and t.requires_grad]
    if not needed or not out.requires_grad:
        return out, []
    go = torch.ones_like(out) if grad_output is None else grad_output(out)
    return out, list(torch.autograd.grad(out, needed, go))


def torch_reference(z, t, w, grad_output=None, **kw):
    """torch in float32 for low-precision operands (the loss rounded to the dtype torch
    itself returns), as is otherwise; (loss, grads of the leaves needing one)."""
    own = F.cross_entropy(z.detach(), t.detach() if t.is_floating_point() else t,
                          None if w is None else w.detach(), **kw)
    out, grads = loss_and_grads(lambda: F.cross_entropy(up(z), up(t), up(w), **kw),
                                [z, t if t.is_floating_point() else None, w],
                                grad_output)
    leaves = [v for v in (z, t, w) if v is not None and v.requires_grad]
    return out.to(own.dtype), [g.to(v.dtype) for g, v in zip(grads, leaves, strict=True)]


def check_route(route, monkeypatch, make, grad_output=None, rtol=1e-5, **kw):
    backend = use_route(route, monkeypatch)
    z, t, w = make()
    want, want_grads = torch_reference(z, t, w, grad_output, **kw)
    z, t, w = make()
    got, grads = loss_and_grads(lambda: xt.cross_entropy(z, t, w, backend=backend, **kw),
                                [z, t if t.is_floating_point() else None, w], grad_output)
    assert_like(got, want, rtol)
    assert len(grads) == len(want_grads)
    for g, r in zip(grads, want_grads, strict=True):
        assert_like(g, r, rtol)


# ---- integer target dtypes


NARROW = (torch.int8, torch.uint8, torch.int16, torch.uint16, torch.int32, torch.uint32)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("dtype", NARROW)
def test_narrow_integer_targets_give_torchs_numbers_for_the_same_ids(route, dtype,
                                                                    monkeypatch):
    """torch takes int64 and uint8 only; crossent converts the rest: the ids must mean
    what they mean in int64, with every option."""
    backend = use_route(route, monkeypatch)
    ids = torch.tensor([0, 4, 2, 1, 1, 3, 2])
    z0 = torch.randn(7, 5, generator=gen(0)) * 3
    w = torch.rand(5, generator=gen(1)) + 0.5
    for kw in (dict(reduction="none"), dict(reduction="sum", weight=w, ignore_index=2),
               dict(reduction="mean", weight=w, ignore_index=4, label_smoothing=0.2)):
        z = z0.clone().requires_grad_()
        got = xt.cross_entropy(z, ids.to(dtype), backend=backend, **kw)
        zr = z0.clone().requires_grad_()
        want = F.cross_entropy(zr, ids, **kw)
        assert_like(got, want)
        got.sum().backward()
        want.sum().backward()
        assert_like(z.grad, zr.grad)


LIMITS = [(torch.int8, -128), (torch.int8, 127), (torch.uint8, 255), (torch.int16, -32768),
          (torch.uint16, 65535), (torch.int32, -(2**31)), (torch.int32, 2**31 - 1),
          (torch.uint32, 2**32 - 1), (torch.int64, -(2**63)), (torch.int64, 2**63 - 1)]


@pytest.mark.parametrize("route", ["auto", "auto_fused", "rowblock"])
@pytest.mark.parametrize(("dtype", "value"), LIMITS)
def test_target_at_its_dtypes_limit_is_ignored_or_refused_as_torch(route, dtype, value,
                                                                  monkeypatch):
    """An id at the dtype's limit: ignored rows when it is ``ignore_index`` (torch: the
    same ids in int64), torch's IndexError otherwise."""
    backend = use_route(route, monkeypatch)
    z0 = torch.randn(4, 5, generator=gen(2))
    ids = torch.tensor([0, value, 3, value])
    z = z0.clone().requires_grad_()
    got = xt.cross_entropy(z, ids.to(dtype), ignore_index=value, label_smoothing=0.1,
                           backend=backend)
    zr = z0.clone().requires_grad_()
    want = F.cross_entropy(zr, ids, ignore_index=value, label_smoothing=0.1)
    assert_like(got, want)
    got.backward()
    want.backward()
    assert_like(z.grad, zr.grad)
    with pytest.raises(IndexError):
        xt.cross_entropy(z0, ids.to(dtype), backend=backend)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("ignore_index", [0, 4, 5, 1000, 2**40, 2**63 - 1, -(2**63)])
def test_ignore_index_a_valid_class_positive_or_far_outside(route, ignore_index,
                                                            monkeypatch):
    def make():
        return (torch.randn(6, 5, generator=gen(3)).mul(3).requires_grad_(),
                torch.tensor([0, 1, 2, 3, 4, 0]), torch.rand(5, generator=gen(4)) + 0.5)

    for reduction in ("none", "mean"):
        check_route(route, monkeypatch, make, reduction=reduction, label_smoothing=0.2,
                    ignore_index=ignore_index)


@pytest.mark.parametrize("route", ROUTES)
def test_negative_target_other_than_ignore_index_is_torchs_index_error(route, monkeypatch):
    backend = use_route(route, monkeypatch)
    with pytest.raises(IndexError):
        xt.cross_entropy(torch.randn(3, 4), torch.tensor([0, -1, 2]), backend=backend)
    with pytest.raises(IndexError):
        xt.cross_entropy(torch.randn(3, 4), torch.tensor([0, -100, 2]), ignore_index=-1,
                         backend=backend)


def uint64_ids(*values):
    """A uint64 tensor holding ``values`` (ids from 2**63 up as their bit patterns)."""
    return torch.tensor([v - 2**64 if v >= 2**63 else v for v in values]).view(torch.uint64)


# uint64 ids past 2**63 wrapped to negative int64 ids (2**64 - 100 became ignore_index):
# now refused by the shared check (_rules.check_index_dtype), also vocab-parallel and in
# global_num_items.


@pytest.mark.parametrize("route", ROUTES)
def test_uint64_target_past_int64_is_refused_not_silently_ignored(route, monkeypatch):
    backend = use_route(route, monkeypatch)
    with pytest.raises(InputError, match="target"):
        xt.cross_entropy(torch.randn(3, 5), uint64_ids(0, 2**64 - 100, 2),
                         reduction="none", backend=backend)


@pytest.mark.parametrize("backend", ["auto", "native", "rowblock"])
def test_uint64_target_past_int64_linear_head(backend):
    with pytest.raises(InputError, match="target"):
        xt.linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4),
                                uint64_ids(0, 2**64 - 100, 2), reduction="none",
                                backend=backend)


@pytest.mark.parametrize("linear", [False, True])
def test_uint64_target_past_int64_vocab_parallel_world_one(linear):
    target = uint64_ids(0, 2**64 - 100, 2)
    with pytest.raises(InputError, match="target"):
        if linear:
            vocab_parallel_linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4), target,
                                                reduction="none")
        else:
            vocab_parallel_cross_entropy(torch.randn(3, 5), target, reduction="none")


def test_uint64_target_past_int64_global_num_items():
    with pytest.raises(InputError, match="target"):
        global_num_items(uint64_ids(0, 2**64 - 100, 2))


# ---- floating dtypes, mixed dtypes, every option


def index_case(dtype, weighted, seed=5):
    def make():
        z = (torch.randn(7, 5, generator=gen(seed)) * 3).to(dtype).requires_grad_()
        w = (torch.rand(5, generator=gen(seed + 1)) + 0.5).to(dtype) if weighted else None
        return z, torch.tensor([0, 4, 2, 2, 1, 3, 2]), w
    return make


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_every_option_in_every_float_dtype_matches_torch(route, dtype, monkeypatch):
    rtol = 1e-2 if dtype in LOW else 1e-9
    for reduction in ("none", "sum", "mean"):
        for weighted in (False, True):
            for eps in (0.0, 0.1):
                check_route(route, monkeypatch, index_case(dtype, weighted), rtol=rtol,
                            reduction=reduction, label_smoothing=eps, ignore_index=2)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize(("zdtype", "tdtype"), [
    (torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16),
    (torch.float32, torch.float16), (torch.float32, torch.float64),
    (torch.float64, torch.bfloat16), (torch.float16, torch.float16)])
def test_mixed_dtype_probability_targets_promote_and_differentiate_as_torch(
        route, zdtype, tdtype, monkeypatch):
    def make():
        z = (torch.randn(6, 5, generator=gen(7)) * 2).to(zdtype).requires_grad_()
        t = torch.softmax(torch.randn(6, 5, generator=gen(8)), 1).to(tdtype).requires_grad_()
        return z, t, None

    rtol = 1e-2 if zdtype in LOW or tdtype in LOW else 1e-5
    for reduction in ("none", "mean"):
        for eps in (0.0, 0.3):
            check_route(route, monkeypatch, make, rtol=rtol, reduction=reduction,
                        label_smoothing=eps)


@pytest.mark.parametrize("route", ROUTES)
def test_probability_target_and_weight_gradients_in_low_precision(route, monkeypatch):
    def make():
        z = (torch.randn(6, 5, generator=gen(9)) * 2).bfloat16().requires_grad_()
        t = torch.softmax(torch.randn(6, 5, generator=gen(10)), 1).bfloat16().requires_grad_()
        w = (torch.rand(5, generator=gen(11)) + 0.5).bfloat16().requires_grad_()
        return z, t, w

    for reduction in ("none", "sum", "mean"):
        check_route(route, monkeypatch, make, rtol=2e-2, reduction=reduction,
                    label_smoothing=0.1)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("logits", ["complex", "int", "bool"])
def test_complex_integer_and_bool_logits_are_refused_naming_input(route, logits,
                                                                  monkeypatch):
    backend = use_route(route, monkeypatch)
    z = {"complex": torch.randn(3, 4, dtype=torch.complex64),
         "int": torch.ones(3, 4, dtype=torch.int64),
         "bool": torch.ones(3, 4, dtype=torch.bool)}[logits]
    with pytest.raises(NotImplementedError):  # torch's own refusal
        F.cross_entropy(z, torch.tensor([0, 1, 2]))
    with pytest.raises(InputError, match="input"):
        xt.cross_entropy(z, torch.tensor([0, 1, 2]), backend=backend)


@pytest.mark.parametrize("route", ROUTES)
def test_complex_or_integer_weight_is_refused_naming_weight(route, monkeypatch):
    backend = use_route(route, monkeypatch)
    for w in (torch.ones(4, dtype=torch.complex64), torch.ones(4, dtype=torch.int64)):
        with pytest.raises(InputError, match="weight"):
            xt.cross_entropy(torch.randn(3, 4), torch.tensor([0, 1, 2]), w, backend=backend)


# ---- non-finite values


def nonfinite_logits(dtype):
    z = torch.randn(7, 5, generator=gen(12)).double() * 2
    z[0, 1], z[1, 2], z[2, 0] = INF, -INF, NAN
    z[3, :] = -INF
    z[4, 3], z[4, 4] = 1e30, -1e30
    z[5, 0] = torch.finfo(dtype).max
    return z.to(dtype)


GRAD_OUTPUTS = {
    "ones": None,
    "negative": lambda o: (torch.full_like(o, -2.5) if o.dim() == 0
                           else torch.linspace(-2, 2, o.numel()).reshape(o.shape).to(o)),
    "inf": lambda o: torch.full_like(o, INF),
    "nan": lambda o: torch.full_like(o, NAN),
}


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16,
                                   torch.float16])
def test_nonfinite_logits_and_grad_outputs_match_torch(route, dtype, monkeypatch):
    rtol = 1e-2 if dtype in LOW else 1e-5

    def make(weighted):
        return lambda: (nonfinite_logits(dtype).requires_grad_(),
                        torch.tensor([1, 2, 3, 0, 4, 0, -100]),
                        (torch.rand(5, generator=gen(13)) + 0.5).to(dtype) if weighted
                        else None)

    for reduction in ("none", "sum", "mean"):
        for weighted in (False, True):
            for eps in (0.0, 0.1):
                for go in GRAD_OUTPUTS.values():
                    check_route(route, monkeypatch, make(weighted), grad_output=go,
                                rtol=rtol, reduction=reduction, label_smoothing=eps)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("what", ["weight_nan", "weight_minus_inf", "target_inf",
                                  "target_nan", "target_negative"])
def test_nonfinite_probability_targets_and_weights_match_torch(route, what, monkeypatch):
    def make():
        z = (torch.randn(6, 5, generator=gen(14)) * 2).requires_grad_()
        t = torch.softmax(torch.randn(6, 5, generator=gen(15)), 1)
        w = torch.rand(5, generator=gen(16)) + 0.5
        if what == "weight_nan":
            w[2] = NAN
        elif what == "weight_minus_inf":
            w[3] = -INF
        elif what == "target_inf":
            t[1, 1] = INF
        elif what == "target_nan":
            t[2, 2] = NAN
        else:
            t[2, 2] = -3.0
        return z, t.requires_grad_(), w

    for reduction in ("none", "sum", "mean"):
        for eps in (0.0, 0.1):
            check_route(route, monkeypatch, make, reduction=reduction, label_smoothing=eps)


# _cross_entropy._target_weight_grads: the target's gradient of a zero target facing a -inf
# logit is torch's +inf (any t > 0 makes the loss infinite); the weight's stays 0, the
# derivative of crossent's documented 0 term (PITFALLS 4; torch's is NaN, as its loss)
@pytest.mark.parametrize("route", ["auto", "rowblock"])
def test_target_gradient_at_a_zero_target_facing_minus_inf(route, monkeypatch):
    backend = use_route(route, monkeypatch)
    z0 = torch.tensor([[0.5, -INF, 1.0], [0.2, 0.1, -0.3]])
    t0 = torch.tensor([[0.4, 0.0, 0.6], [0.2, 0.3, 0.5]])
    t = t0.clone().requires_grad_()
    xt.cross_entropy(z0, t, reduction="sum", backend=backend).backward()
    tr = t0.clone().requires_grad_()
    F.cross_entropy(z0, tr, reduction="sum").backward()
    assert tr.grad[0, 1] == INF
    assert_like(t.grad, tr.grad)


# ---- shapes and strides


def shape_cases():
    def z_of(*shape, seed=17):
        return torch.randn(*shape, generator=gen(seed))

    def prob_like(z, dim=1):
        return torch.softmax(torch.randn(z.shape, generator=gen(18)), dim)

    yield "unbatched", z_of(5), torch.tensor(3), prob_like(z_of(5), 0)
    yield "one_class", z_of(4, 1), torch.tensor([0, 0, -100, 0]), torch.ones(4, 1)
    yield "no_rows", z_of(0, 5), torch.zeros(0, dtype=torch.long), torch.zeros(0, 5)
    yield "d1_zero", z_of(3, 5, 0), torch.zeros(3, 0, dtype=torch.long), torch.zeros(3, 5, 0)
    z4 = z_of(2, 5, 3, 2).contiguous(memory_format=torch.channels_last)
    yield ("channels_last", z4, torch.randint(0, 5, (2, 3, 2), generator=gen(19)),
           prob_like(z4).contiguous(memory_format=torch.channels_last))
    yield ("transposed", z_of(5, 6).t(), torch.randint(0, 5, (6,), generator=gen(19)),
           prob_like(z_of(6, 5)).t().contiguous().t())
    yield ("stepped", z_of(12, 10)[::2, ::2], torch.randint(0, 5, (6,), generator=gen(19)),
           prob_like(z_of(12, 10))[::2, ::2])
    yield ("stride_zero", z_of(1, 5).expand(6, 5), torch.tensor([0, 1, 2, 3, 4, 0]),
           prob_like(z_of(1, 5)).expand(6, 5))
    yield ("overlapping", z_of(20).as_strided((6, 5), (2, 1)),
           torch.tensor([2, 2, 2, 2, 2, 2]).as_strided((6,), (0,)),
           torch.softmax(z_of(20, seed=20), 0).as_strided((6, 5), (2, 1)))


SHAPES = list(shape_cases())


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("case", SHAPES, ids=[c[0] for c in SHAPES])
def test_shapes_and_strides_match_torch(route, case, monkeypatch):
    _, z0, y0, p0 = case
    num_classes = z0.shape[0] if z0.dim() == 1 else z0.shape[1]
    for prob in (False, True):
        for weighted in (False, True):
            def make(prob=prob, weighted=weighted):
                w = torch.rand(num_classes, generator=gen(21)) + 0.5 if weighted else None
                return z0.detach().requires_grad_(), p0 if prob else y0, w

            for reduction in ("none", "sum", "mean"):
                for eps in (0.0, 0.1):
                    check_route(route, monkeypatch, make, reduction=reduction,
                                label_smoothing=eps)


@pytest.mark.parametrize("route", ["auto", "rowblock"])
def test_a_vocabulary_of_2_to_the_20_with_two_rows(route, monkeypatch):
    """crossent's error against float64 torch at most torch's own float32 error (plus a
    unit in the last place of the largest probability)."""
    backend = use_route(route, monkeypatch)
    classes = 1 << 20
    z0 = torch.randn(2, classes, generator=gen(22)) * 4
    y = torch.tensor([classes - 1, 7])
    z = z0.clone().requires_grad_()
    loss = xt.cross_entropy(z, y, label_smoothing=0.1, backend=backend)
    loss.backward()
    zd = z0.double().requires_grad_()
    want = F.cross_entropy(zd, y, label_smoothing=0.1)
    want.backward()
    zt = z0.clone().requires_grad_()
    F.cross_entropy(zt, y, label_smoothing=0.1).backward()
    torch_error = float((zt.grad.double() - zd.grad).abs().max())
    assert float((z.grad.double() - zd.grad).abs().max()) <= 2 * torch_error + 1e-7
    assert abs(loss.item() - want.item()) <= 1e-5 * want.item()


@pytest.mark.parametrize("route", ["auto_fused", "rowblock"])
@pytest.mark.parametrize("extra", [-1, 0, 1])
def test_rows_one_either_side_of_a_kernel_block(route, extra, monkeypatch):
    classes = 2053
    rows = _rules.block_rows(classes) + extra

    def make():
        z = torch.randn(rows, classes, generator=gen(23)).requires_grad_()
        y = torch.randint(0, classes, (rows,), generator=gen(24))
        y[-1] = -100
        return z, y, torch.rand(classes, generator=gen(25)) + 0.5

    check_route(route, monkeypatch, make, reduction="mean", label_smoothing=0.05)


# ---- the linear head


def linear_reference(x, w, b, t, weight=None, **kw):
    logits = F.linear(x, w, b)
    out = F.cross_entropy(up(logits), up(t) if t.is_floating_point() else t, up(weight), **kw)
    return out.to(torch.promote_types(x.dtype, t.dtype) if t.is_floating_point() else x.dtype)


LINEAR_ROUTES = ("auto", "auto_fused", "native", "rowblock", "chunked")


def linear_call(route, monkeypatch):
    backend = use_route("auto_fused" if route == "chunked" else route, monkeypatch)
    extra = {"chunk_size": 2} if route == "chunked" else {}
    return lambda *a, **k: xt.linear_cross_entropy(*a, backend="rowblock" if extra
                                                    else backend, **extra, **k)


@pytest.mark.parametrize("route", LINEAR_ROUTES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_linear_head_every_option_in_every_float_dtype(route, dtype, monkeypatch):
    call = linear_call(route, monkeypatch)
    rtol = 3e-2 if dtype in LOW else 1e-9
    for reduction in ("none", "sum", "mean"):
        for weighted in (False, True):
            for eps in (0.0, 0.1):
                leaves = [(torch.randn(6, 4, generator=gen(26))).to(dtype).requires_grad_(),
                          (torch.randn(5, 4, generator=gen(27))).to(dtype).requires_grad_(),
                          (torch.randn(5, generator=gen(28))).to(dtype).requires_grad_()]
                ref = [t.detach().clone().requires_grad_() for t in leaves]
                y = torch.tensor([0, 4, 2, -100, 1, 3])
                weight = (torch.rand(5, generator=gen(29)) + 0.5).to(dtype) if weighted else None
                kw = dict(reduction=reduction, label_smoothing=eps)
                got = call(*leaves[:2], y, leaves[2], weight=weight, **kw)
                want = linear_reference(ref[0], ref[1], ref[2], y, weight, **kw)
                assert_like(got, want, rtol)
                got.sum().backward()
                want.sum().backward()
                for a, b in zip(leaves, ref, strict=True):
                    assert_like(a.grad, b.grad, rtol)


@pytest.mark.parametrize("route", LINEAR_ROUTES)
@pytest.mark.parametrize("case", ["narrow_int8", "narrow_int32", "x_transposed",
                                  "w_transposed", "x_stride_zero", "x_is_w", "bias_stepped",
                                  "nonfinite_x", "huge_w_row"])
def test_linear_head_targets_strides_aliases_and_nonfinite(route, case, monkeypatch):
    call = linear_call(route, monkeypatch)
    x0 = torch.randn(6, 4, generator=gen(30))
    w0 = torch.randn(5, 4, generator=gen(31))
    b0 = torch.randn(5, generator=gen(32))
    y = torch.tensor([0, 4, 2, -100, 1, 3])
    target = y
    if case == "narrow_int8":
        target = y.to(torch.int8)
    if case == "narrow_int32":
        target = y.to(torch.int32)
    if case == "nonfinite_x":
        x0[0, 0], x0[1, 1] = INF, NAN
    if case == "huge_w_row":
        w0[2] = 1e30

    def operands():
        x, w, b = (t.clone().requires_grad_() for t in (x0, w0, b0))
        xs, ws, bs = x, w, b
        if case == "x_transposed":
            x = x0.t().contiguous().requires_grad_()
            xs = x.t()
        if case == "w_transposed":
            w = w0.t().contiguous().requires_grad_()
            ws = w.t()
        if case == "x_stride_zero":
            x = x0[:1].clone().requires_grad_()
            xs = x.expand(6, 4)
        if case == "x_is_w":
            w = w0.clone().requires_grad_()
            x, xs, ws = w, w, w
        if case == "bias_stepped":
            b = torch.randn(10, generator=gen(33)).requires_grad_()
            bs = b[::2]
        return (x, w, b), (xs, ws, bs)

    ys = y[:5] if case == "x_is_w" else y
    ts = target[:5] if case == "x_is_w" else target
    for reduction in ("none", "sum"):
        leaves, (xs, ws, bs) = operands()
        got = call(xs, ws, ts, bs, reduction=reduction, label_smoothing=0.1)
        rleaves, (rx, rw, rb) = operands()
        want = linear_reference(rx, rw, rb, ys, reduction=reduction, label_smoothing=0.1)
        assert_like(got, want)
        got.sum().backward()
        want.sum().backward()
        for a, b in zip(leaves, rleaves, strict=True):
            if b.grad is not None:
                assert_like(a.grad, b.grad)


@pytest.mark.parametrize("backend", ["auto", "native", "rowblock"])
def test_linear_head_bool_and_complex_targets_refused_naming_target(backend):
    x, w = torch.randn(3, 4), torch.randn(5, 4)
    for t in (torch.tensor([True, False, True]), torch.ones(3, dtype=torch.complex64)):
        with pytest.raises(InputError, match="target"):
            xt.linear_cross_entropy(x, w, t, backend=backend)


# ---- the vocab-parallel functions


@pytest.mark.parametrize("backend", ["auto", "rowblock"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_vocab_parallel_world_one_nonfinite_and_narrow_targets(backend, dtype):
    rtol = 1e-2 if dtype in LOW else 1e-5
    z0 = nonfinite_logits(dtype)
    for target in (torch.tensor([1, 2, 3, 0, 4, 0, -100]),
                   torch.tensor([1, 2, 3, 0, 4, 0, 2], dtype=torch.int8),
                   torch.tensor([1, 2, 3, 0, 4, 0, 2], dtype=torch.int32)):
        for reduction in ("none", "sum", "mean"):
            for eps in (0.0, 0.1):
                for go in GRAD_OUTPUTS.values():
                    z = z0.clone().requires_grad_()
                    kw = dict(reduction=reduction, label_smoothing=eps)
                    got, (g,) = loss_and_grads(lambda z=z, target=target, kw=kw: (
                        vocab_parallel_cross_entropy(z, target, backend=backend, **kw)),
                        [z], go)
                    zr = z0.clone().requires_grad_()
                    want, (gr,) = loss_and_grads(lambda zr=zr, target=target, kw=kw: (
                        F.cross_entropy(up(zr), target.long(), **kw).to(dtype)), [zr], go)
                    assert_like(got, want, rtol)
                    assert_like(g, gr, rtol)


def _two_rank_nonfinite_strided(rank, world):
    """Each rank holds a transposed (strided) bfloat16 slice with inf/NaN/-inf, int32
    targets, a per-row grad_output; loss and slice gradient against torch in float32 on the
    gathered logits."""
    full = nonfinite_logits(torch.bfloat16)[:, :4]  # 4 classes: 2 per rank
    target = torch.tensor([1, 2, 3, 0, 2, 0, -100], dtype=torch.int32)
    go = torch.linspace(-2, 2, 7).bfloat16()
    local = full[:, 2 * rank:2 * rank + 2].t().contiguous().t().detach().requires_grad_()
    for eps in (0.0, 0.1):
        out = vocab_parallel_cross_entropy(local, target, reduction="none",
                                           label_smoothing=eps)
        (g,) = torch.autograd.grad(out, local, go)
        ref = full.float().requires_grad_()
        want = F.cross_entropy(ref, target.long(), reduction="none", label_smoothing=eps)
        (gr,) = torch.autograd.grad(want, ref, go.float())
        assert_like(out, want.bfloat16(), 1e-2)
        assert_like(g, gr[:, 2 * rank:2 * rank + 2].bfloat16(), 1e-2)


def test_vocab_parallel_two_gloo_ranks_nonfinite_strided_int32():
    run_group(_two_rank_nonfinite_strided, 2, timeout=90)


# ---- the other public functions


def test_global_num_items_counts_narrow_and_strided_targets():
    y = torch.tensor([[1, -100, 3], [2, 2, -100]])
    assert int(global_num_items(y.t())) == 4
    assert int(global_num_items([y.to(torch.int8), y[:, ::2]])) == 7
    assert int(global_num_items(y, ignore_index=2)) == 4


@pytest.mark.parametrize("bad", ["float_target", "bool_target", "list_of_ints",
                                 "ignore_index_past_int64", "float_ignore_index"])
def test_global_num_items_refuses_bad_arguments_by_name(bad):
    name = "ignore_index" if "ignore_index" in bad else "target"
    args = {"float_target": (torch.tensor([0.0, 1.0]),),
            "bool_target": (torch.tensor([True, False]),),
            "list_of_ints": ([1, 2],),
            "ignore_index_past_int64": (torch.tensor([1, 2]), 2**70),
            "float_ignore_index": (torch.tensor([1, 2]), 2.5)}[bad]
    with pytest.raises(InputError, match=name):
        global_num_items(*args)


@pytest.mark.parametrize("value", ["no", None, 0, 1.0])
def test_set_buffer_reuse_refuses_a_non_bool_as_its_siblings(value):
    previous = xt.set_buffer_reuse(True)
    try:
        for setter in (xt.set_block_workers, xt.set_compiled_kernel):
            with pytest.raises(InputError):
                setter(value)
        with pytest.raises(InputError, match="enabled"):
            xt.set_buffer_reuse(value)
    finally:
        xt.set_buffer_reuse(previous)
        xt.set_block_workers(True)
