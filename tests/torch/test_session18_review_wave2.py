"""Stop 18, review wave 2 (H54): the lead's fixes after wave 1, read adversarially.

Each bug it found (7) was a test written as it should pass, marked ``xfail(strict=True)``
with its cause (file:function), and is fixed; the other tests guard behaviour the fixes
could break and can fail.
References: torch's ``sum / n`` (``F.cross_entropy(..., reduction="sum") / n``: torch
rounds a Python int ``n`` to the loss's dtype once, from int64/uint64), torch's own
``RuntimeError`` for a vmap-batched integer, ``torch.nn.LinearCrossEntropyLoss``'s head
shapes, float64 NumPy for the core's softcap under ``jax.jit``, the core's
``crossent.entropy`` / ``cross_entropy`` for the teaching curves, and ``json`` for the
benchmark's record."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import crossent
import crossent.torch as xt
from crossent.errors import InputError
from crossent.teaching import curves
from crossent.torch import bench

pytestmark = pytest.mark.native_dispatch  # keep the real routes (the direct call included)

# An int count whose float64 value is a tie in float32: float(n) then float32 rounds it to
# 2**60, int64 -> float32 (torch's sum / n) to 2**60 + 2**37. Same for 2**63 + 2**39 + 1
# (past int64: torch takes it as uint64, float64 rounds it to 2**63 + 2**39, a tie again).
TIE = 2**60 + 2**36 + 1
TIE_U64 = 2**63 + 2**39 + 1


def _data(rows=6, classes=5, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, classes, generator=g).to(dtype),
            torch.randint(0, classes, (rows,), generator=g))


def _torch_sum_over(z, y, n):
    """torch's ``sum / n`` (low precision: the float32 sum divided, rounded once)."""
    cdtype = torch.float64 if z.dtype == torch.float64 else torch.float32
    a = z.detach().to(cdtype).requires_grad_()
    loss = F.cross_entropy(a, y, reduction="sum") / n
    (grad,) = torch.autograd.grad(loss, a)
    return loss.detach().to(z.dtype), grad.to(z.dtype)


def _loss_and_grad(f, z):
    a = z.clone().requires_grad_()
    loss = f(a)
    (grad,) = torch.autograd.grad(loss, a)
    return loss.detach(), grad


def test_the_tie_count_tells_single_from_double_rounding():
    """The premise of the tests below (they could pass vacuously without it)."""
    assert torch.tensor(TIE).float().item() == 2**60 + 2**37  # int64 -> float32 once
    assert torch.tensor(TIE, dtype=torch.float32).item() == 2**60  # via float64: twice
    one = torch.tensor(1.0)
    assert (one / TIE).item() == (one / (2**60 + 2**37)).item() != (one / float(TIE)).item()


# --------------------------------------------------------------------------------------------
# 1. An integer num_items: torch's sum / n on every route
# --------------------------------------------------------------------------------------------

_COUNTS = [1, 3, 2**24 + 1, 2**53 + 1, 2**62, 2**63 - 1, TIE, np.int64(TIE), np.uint8(3),
           torch.tensor(3, dtype=torch.uint8), torch.tensor(3, dtype=torch.int16),
           torch.tensor(TIE), 3.0, 2.5, np.float32(3.1), torch.tensor(3.1, dtype=torch.float16)]


def _plain(n):
    return n.item() if isinstance(n, np.generic) else n


@pytest.mark.parametrize("n", _COUNTS, ids=repr)
def test_native_and_direct_routes_divide_as_torch(n):
    """The direct torch-kernel call (float32/float64), the checked native route, and the
    default route of small bfloat16/float16 logits: torch's ``sum / n`` bit for bit, loss
    and gradient (low precision: the float32 result rounded once)."""
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        z, y = _data(dtype=dtype)
        want = _torch_sum_over(z, y, _plain(n))
        for backend in ("auto", "native"):
            def call(a, b=backend, t=y):
                return xt.cross_entropy(a, t, num_items=n, backend=b)

            got = _loss_and_grad(call, z)
            assert got[0].dtype == dtype
            assert torch.equal(got[0], want[0]), (dtype, backend, got[0].item(),
                                                  want[0].item())
            if dtype in (torch.float32, torch.float64):
                assert torch.equal(got[1], want[1]), (dtype, backend)


def _rowblock_ce(z, y, n):
    return xt.cross_entropy(z, y, num_items=n, backend="rowblock")


def _default_route_large(z, y, n):  # 128 x 4200 >= NATIVE_MAX_LOGITS: the fused kernel
    return xt.cross_entropy(z, y, num_items=n)


def _module(z, y, n):
    return xt.CrossEntropyLoss(backend="rowblock")(z, y, num_items=n)


def _rowblock_probabilities(z, y, n):  # probability targets: prepare_rows' other branch
    return xt.cross_entropy(z, F.one_hot(y, z.shape[1]).to(z.dtype), num_items=n,
                            backend="rowblock")


_ROWBLOCK_ENTRIES = [_rowblock_ce, _rowblock_probabilities, _default_route_large, _module]


@pytest.mark.parametrize("n", [TIE, np.int64(TIE), torch.tensor(TIE)], ids=repr)
@pytest.mark.parametrize("entry", _ROWBLOCK_ENTRIES, ids=lambda f: f.__name__)
def test_the_fused_kernel_divides_an_int_count_as_torch(entry, n):
    """The fused kernel scales each row by ``1 / n`` before it sums (not torch's order of
    operations, so not torch's bits; within its tolerance): the count it uses must be
    torch's float32 rounding of ``n`` (once), so the same call with that float32 value as
    the count gives the same bits, and the wrongly rounded count (twice) does not."""
    rows, classes = (128, 4200) if entry is _default_route_large else (6, 5)
    z, y = _data(rows, classes)
    once = int(torch.tensor(TIE).float().item())  # 2**60 + 2**37
    got = _loss_and_grad(lambda a: entry(a, y, n), z)
    want = _loss_and_grad(lambda a: entry(a, y, once), z)
    twice = _loss_and_grad(lambda a: entry(a, y, 2**60), z)
    assert torch.equal(got[0], want[0]), (got[0].item(), want[0].item())
    assert torch.equal(got[1], want[1])
    assert not torch.equal(twice[0], want[0])  # the test tells the two apart
    ref = _torch_sum_over(z, y, _plain(n))
    torch.testing.assert_close(got[0], ref[0], rtol=1e-6, atol=0)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-30)


def test_the_linear_rowblock_head_divides_an_int_count_as_torch():
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(6, 4, generator=g), torch.randn(5, 4, generator=g)
    y = torch.randint(0, 5, (6,), generator=g)
    want = F.cross_entropy(x @ w.T, y, reduction="sum") / TIE
    assert torch.equal(xt.linear_cross_entropy(x, w, y, num_items=TIE, backend="rowblock"),
                       want)


def test_the_linear_native_head_divides_an_int_count_as_torch():
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(6, 4, generator=g), torch.randn(5, 4, generator=g)
    y = torch.randint(0, 5, (6,), generator=g)
    want = F.cross_entropy(x @ w.T, y, reduction="sum") / TIE
    assert torch.equal(xt.linear_cross_entropy(x, w, y, num_items=TIE, backend="native"), want)


@pytest.mark.parametrize("n", [TIE_U64, np.uint64(TIE_U64),
                               torch.tensor(TIE_U64, dtype=torch.uint64)], ids=repr)
@pytest.mark.parametrize("backend", ["auto", "native", "rowblock"])
def test_a_count_past_int64_divides_as_torch(backend, n):
    z, y = _data()
    want = F.cross_entropy(z, y, reduction="sum") / TIE_U64
    assert torch.equal(xt.cross_entropy(z, y, num_items=n, backend=backend), want)


def test_vocab_parallel_tensor_count_divides_as_torch():
    from crossent.torch.distributed import vocab_parallel_cross_entropy

    z, y = _data()
    want = F.cross_entropy(z, y, reduction="sum") / TIE
    got = vocab_parallel_cross_entropy(z, y, reduction="sum", num_items=torch.tensor(TIE))
    assert torch.equal(got, want)


@pytest.mark.parametrize("n", [TIE, np.int64(TIE)], ids=repr)
def test_vocab_parallel_int_count_divides_as_torch(n):
    from crossent.torch.distributed import vocab_parallel_cross_entropy

    z, y = _data()
    want = F.cross_entropy(z, y, reduction="sum") / TIE
    assert torch.equal(vocab_parallel_cross_entropy(z, y, reduction="sum", num_items=n), want)


def test_compiled_call_takes_a_count_past_uint64_as_eager():
    """``compiled_cross_entropy`` is what dynamo traces for ``crossent.torch.cross_entropy``
    (the ``crossent::cross_entropy_fwd`` operator); called here directly, without dynamo's
    import (torch.compile(backend="eager", fullgraph=True) raises the same, seen once)."""
    from crossent.torch._custom_ops import compiled_cross_entropy

    z, y = _data()
    n = 2**64 + 1
    assert torch.equal(compiled_cross_entropy(z, y, num_items=n),
                       xt.cross_entropy(z, y, num_items=n))


# --------------------------------------------------------------------------------------------
# 2. RuntimeError from operator.index: meant for meta tensors only
# --------------------------------------------------------------------------------------------

def test_a_meta_ignore_index_is_an_input_error():
    z, y = _data()
    with pytest.raises(InputError, match="ignore_index"):
        xt.cross_entropy(z, y, ignore_index=torch.tensor(1, device="meta"))


def test_a_vmap_batched_ignore_index_is_not_called_a_non_integer():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 6, 5, generator=g)
    y = torch.randint(0, 5, (2, 6), generator=g)
    ignore = torch.tensor([-100, 1])
    with pytest.raises(RuntimeError):  # torch's own, or UnsupportedError (a RuntimeError)
        torch.func.vmap(lambda a, b, i: xt.cross_entropy(a, b, ignore_index=i))(z, y, ignore)


class _IndexFails:
    """An integer-like object whose ``__index__`` fails with a bug of its own."""

    def __index__(self):
        raise RuntimeError("boom: the caller's own bug")


def _ce_ignore(bad):
    z, y = _data()
    xt.cross_entropy(z, y, ignore_index=bad)


def _core_ignore(bad):
    crossent.softmax_cross_entropy(np.zeros((2, 3)), np.array([0, 1]), ignore_index=bad)


def _linear_chunk(bad):
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(4, 3, generator=g), torch.randn(5, 3, generator=g)
    xt.linear_cross_entropy(x, w, torch.tensor([0, 1, 2, 3]), chunk_size=bad)


def _module_size(bad):
    xt.LinearCrossEntropyLoss(bad, 3)


@pytest.mark.parametrize("call", [_ce_ignore, _core_ignore, _linear_chunk, _module_size],
                         ids=lambda f: f.__name__)
def test_a_failing_index_method_is_not_swallowed(call):
    with pytest.raises(RuntimeError, match="boom"):
        call(_IndexFails())


# --------------------------------------------------------------------------------------------
# 3. LinearCrossEntropyLoss(out_features=<an iterator>)
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("out_features", [iter((2,)), (k for k in (2,)), [2]],
                         ids=["iterator", "generator", "list"])
def test_out_features_read_once_builds_torchs_head(out_features):
    ours = xt.LinearCrossEntropyLoss(4, 3, out_features=out_features, bias=True)
    ref = torch.nn.LinearCrossEntropyLoss(4, 3, out_features=(2,), bias=True)
    assert ours.out_features == (2,)
    assert ours.linear.weight.shape == ref.linear.weight.shape == (6, 4)
    ref.load_state_dict(ours.state_dict())
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(5, 4, generator=g), torch.randint(0, 3, (5, 2), generator=g)
    torch.testing.assert_close(ours(x, y), ref(x, y))


# --------------------------------------------------------------------------------------------
# 4. The core's softcap traced by jax.jit
# --------------------------------------------------------------------------------------------

def _capped_reference(z, y, c):
    """float64 NumPy: the mean loss ``mean_n (lse(c tanh(z_n / c)) - c tanh(z_ny / c))`` and
    its gradients with respect to ``z`` and ``c`` (chain rule through ``c tanh(z / c)``)."""
    t = np.tanh(z / c)
    capped = c * t
    top = capped.max(axis=1, keepdims=True)
    e = np.exp(capped - top)
    lse = np.log(e.sum(axis=1)) + top[:, 0]
    rows = np.arange(len(y))
    loss = float(np.mean(lse - capped[rows, y]))
    d_capped = e / e.sum(axis=1, keepdims=True)
    d_capped[rows, y] -= 1.0
    d_capped /= len(y)
    grad_z = d_capped * (1.0 - t**2)
    grad_c = float((d_capped * (t - (z / c) * (1.0 - t**2))).sum())
    return loss, grad_z, grad_c


def test_a_traced_softcap_gives_the_float64_loss_and_gradients():
    """``softcap`` traced by ``jax.jit`` (``float(softcap)`` raised before), the loss and
    both gradients (the logits' and the cap's own) against float64 NumPy."""
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    z = np.random.default_rng(0).normal(size=(4, 5)) * 5
    y = np.array([0, 3, 4, 1])
    zj, yj = jnp.asarray(z, jnp.float32), jnp.asarray(y)
    cap = 2.0

    def loss(a, c):
        return crossent.softmax_cross_entropy(a, yj, softcap=c, validate=False)

    want, want_z, want_c = _capped_reference(np.asarray(zj, np.float64), y, cap)
    assert float(jax.jit(loss)(zj, cap)) == pytest.approx(want, rel=1e-6)
    got_z, got_c = jax.jit(jax.grad(loss, argnums=(0, 1)))(zj, cap)
    np.testing.assert_allclose(np.asarray(got_z), want_z, rtol=1e-5, atol=1e-7)
    assert float(got_c) == pytest.approx(want_c, rel=1e-5)


def test_a_concrete_bad_softcap_is_still_refused():
    pytest.importorskip("jax")
    import jax.numpy as jnp

    for cap in (0.0, -1.0, jnp.float32(0.0), float("nan")):
        with pytest.raises(InputError, match="softcap"):
            crossent.softmax_cross_entropy(jnp.zeros((2, 3)), jnp.asarray([0, 1]), softcap=cap)


# --------------------------------------------------------------------------------------------
# 5. The teaching curves' sum-to-one check in the caller's dtype
# --------------------------------------------------------------------------------------------

_F16_TRUTHS = [np.float16([0.99, 0.01]), torch.tensor([0.99, 0.01], dtype=torch.float16),
               [np.float16(0.99), np.float16(0.01)]]


@pytest.mark.parametrize("truth", _F16_TRUTHS, ids=["ndarray", "tensor", "list"])
def test_a_float16_truth_is_taken_as_the_core_takes_it(truth):
    """[0.99, 0.01] in float16 sums to 0.99974: the core takes it in float16; the curve
    takes it too and plots the normalised distribution, exactly as float64's core does."""
    crossent.entropy(np.float16([0.99, 0.01]))  # the core's float16 tolerance takes it
    c = curves.coin_cross_entropy_curve(truth, n=5)
    p = np.float16([0.99, 0.01]).astype(np.float64)
    p = p / p.sum()
    beliefs = np.stack([c.x, 1.0 - c.x], axis=-1)
    np.testing.assert_allclose(c.series["cross-entropy"],
                               crossent.cross_entropy(p, beliefs, base=2.0), rtol=1e-12)
    np.testing.assert_allclose(c.series["entropy"], float(crossent.entropy(p, base=2.0)),
                               rtol=1e-12)
    assert np.all(c.series["cross-entropy"] >= c.series["entropy"] - 1e-12)  # Gibbs


@pytest.mark.parametrize("truth", [np.float16([0.6, 0.6]), np.float16([0.5, 0.49]),
                                   np.float32([0.5, 0.4995]), [0.5, 0.4995],
                                   torch.tensor([0.7, 0.2], dtype=torch.float16)],
                         ids=["f16-1.2", "f16-0.99", "f32", "list", "tensor"])
def test_a_bad_truth_is_still_refused_as_the_core_refuses_it(truth):
    arr = truth.numpy() if isinstance(truth, torch.Tensor) else np.asarray(truth)
    with pytest.raises(InputError):
        crossent.entropy(arr)
    with pytest.raises(InputError, match="truth must sum to 1"):
        curves.coin_cross_entropy_curve(truth, n=3)


def test_a_truth_tensor_that_requires_grad_is_read_or_refused_by_name():
    t = torch.tensor([0.99, 0.01], requires_grad=True)
    try:
        c = curves.coin_cross_entropy_curve(t, n=3)
    except InputError as error:
        assert "truth" in str(error)
    else:
        ref = curves.coin_cross_entropy_curve(t.detach(), n=3)
        np.testing.assert_array_equal(c.series["cross-entropy"], ref.series["cross-entropy"])


def test_a_float16_probs_breakdown_sums_its_terms_to_its_loss():
    b = curves.multiclass_breakdown(probs=np.float16([0.1, 0.2, 0.7]), target=2)
    assert math.isclose(float(b.terms.sum()), b.loss, rel_tol=1e-12)
    with pytest.raises(InputError, match="probs must sum to 1"):
        curves.multiclass_breakdown(probs=np.float16([0.1, 0.2, 0.6]), target=2)


# --------------------------------------------------------------------------------------------
# 6. bench: --load as a NumPy integer
# --------------------------------------------------------------------------------------------

def test_check_load_takes_numpy_integers_and_refuses_the_rest():
    assert bench.check_load(np.int64(0)) == 0 and type(bench.check_load(np.int64(0))) is int
    for bad in (True, 1.0, "1", -1, np.int64(-1), bench.max_load() + 1):
        with pytest.raises(InputError, match="--load"):
            bench.check_load(bad)


def _stub_crossover(monkeypatch):
    monkeypatch.setattr(bench, "time_crossover", lambda device, repeats, sizes, say: [])
    monkeypatch.setattr(bench, "crossover_table", lambda results: "")
    monkeypatch.setattr(bench, "crossover_figure", lambda results, title: None)
    monkeypatch.setattr(bench, "figure_bytes", lambda fig, fmt, dpi=None: b"")


def test_run_records_a_python_load(monkeypatch, tmp_path):
    _stub_crossover(monkeypatch)
    results = bench.run([], crossover=True, device="cpu", out=tmp_path, load=0, repeats=1,
                        warmup=0, say=lambda line: None)
    assert results["load"] == 0 and (tmp_path / "bench.json").exists()


def test_run_records_a_numpy_load(monkeypatch, tmp_path):
    _stub_crossover(monkeypatch)
    results = bench.run([], crossover=True, device="cpu", out=tmp_path, load=np.int64(0),
                        repeats=1, warmup=0, say=lambda line: None)
    assert results["load"] == 0 and (tmp_path / "bench.json").exists()
