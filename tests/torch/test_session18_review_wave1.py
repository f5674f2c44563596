"""Stop 18, review wave 1 (H52): the session's fixes, read adversarially.

Each bug it found (7, and one older) was a test written as it should pass, marked
``xfail(strict=True)`` with its cause (file:function), and is fixed; the other tests
guard behaviour the fixes could have broken and can fail.
References: torch's ``F.cross_entropy`` and ``nn.LinearCrossEntropyLoss``, torch's
``legacy_get_string`` truth rule, crossent's own checked path (forced by making the direct
path decline), and the contract (a bad argument raises ``InputError`` naming it)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import crossent
import crossent.torch as xt
from crossent.errors import InputError, UnsupportedError
from crossent.torch import _cross_entropy

pytestmark = pytest.mark.native_dispatch  # small inputs: the direct torch-kernel route


def _data(rows=6, classes=5, dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(rows, classes, generator=g, dtype=dtype) * scale
    y = torch.randint(0, classes, (rows,), generator=g)
    return z, y


def _checked(monkeypatch):
    """crossent.torch.cross_entropy with the direct path declining (the checked path)."""
    def checked(*args, **kwargs):
        with monkeypatch.context() as m:
            m.setattr(_cross_entropy, "_torch_kernel_directly", lambda *a, **k: None)
            return xt.cross_entropy(*args, **kwargs)
    return checked


# --------------------------------------------------------------------------------------------
# 1. The direct path with a Python-number num_items
# --------------------------------------------------------------------------------------------

_BAD_REDUCTIONS = ["foo", "MEAN", None, 5, ["none"], torch.tensor([1, 2]),
                   np.array(["none", "sum"])]


@pytest.mark.parametrize("reduction", _BAD_REDUCTIONS,
                         ids=["foo", "MEAN", "None", "5", "list", "tensor", "ndarray"])
def test_a_tensor_count_refuses_a_bad_reduction(reduction):
    """The checked path (a tensor count) names the bad reduction: the reference below."""
    z, y = _data()
    with pytest.raises(InputError, match="reduction"):
        xt.cross_entropy(z, y, reduction=reduction, num_items=torch.tensor(4))


@pytest.mark.parametrize("reduction", _BAD_REDUCTIONS,
                         ids=["foo", "MEAN", "None", "5", "list", "tensor", "ndarray"])
def test_a_python_count_refuses_a_bad_reduction_as_the_checked_path(reduction):
    z, y = _data()
    with pytest.raises(InputError, match="reduction"):
        xt.cross_entropy(z, y, reduction=reduction, num_items=4)


def test_a_huge_int_count_divides_as_torchs_sum_over_n():
    z, y = _data(rows=4, classes=3, scale=100.0)
    n = 2**53 + 2**29 + 1
    want = F.cross_entropy(z, y, reduction="sum") / n
    assert torch.equal(xt.cross_entropy(z, y, num_items=n), want)
    assert torch.equal(xt.cross_entropy(z, y, num_items=torch.tensor(n)), want)


def _double_backward(f, z, y):
    a = z.double().clone().requires_grad_()
    loss = f(a, y, num_items=3)
    (g,) = torch.autograd.grad(loss, a, create_graph=True)
    (gg,) = torch.autograd.grad((g * g).sum(), a)
    return torch.stack([loss.detach(), gg.sum()])


def _vmap(f, z, y):
    return torch.func.vmap(lambda x: f(x, y, num_items=3))(torch.stack([z, 2 * z]))


def _grad(f, z, y):
    return torch.func.grad(lambda x: f(x, y, num_items=3))(z)


def _jvp(f, z, y):
    tangent = torch.linspace(-1, 1, z.numel()).reshape(z.shape)
    return torch.stack(torch.func.jvp(lambda x: f(x, y, num_items=3), (z,), (tangent,)))


def _forward_ad(f, z, y):
    import torch.autograd.forward_ad as fwAD

    tangent = torch.linspace(-1, 1, z.numel()).reshape(z.shape)
    with fwAD.dual_level():
        out = fwAD.unpack_dual(f(fwAD.make_dual(z, tangent), y, num_items=3))
        return torch.stack([out.primal, out.tangent])


def _inference(f, z, y):
    with torch.inference_mode():
        out = f(z, y, num_items=3)
    assert out.is_inference()
    return out


def _no_grad(f, z, y):
    a = z.clone().requires_grad_()
    with torch.no_grad():
        out = f(a, y, num_items=3)
    assert not out.requires_grad
    return out


def _retain_graph(f, z, y):
    a = z.clone().requires_grad_()
    loss = f(a, y, num_items=3, label_smoothing=0.2)
    loss.backward(retain_graph=True)
    loss.backward()
    return a.grad


def _meta(f, z, y):
    out = f(z.to("meta"), y.to("meta"), num_items=3)
    assert out.device.type == "meta" and out.shape == () and out.dtype == z.dtype
    return torch.zeros(())


def _subclass(f, z, y):
    class Sub(torch.Tensor):
        pass

    out = f(z.as_subclass(Sub), y, num_items=3)
    assert type(out) is Sub
    return out.as_subclass(torch.Tensor)


_MODES = [_double_backward, _vmap, _grad, _jvp, _forward_ad, _inference, _no_grad,
          _retain_graph, _meta, _subclass]


@pytest.mark.parametrize("mode", _MODES, ids=[m.__name__.strip("_") for m in _MODES])
def test_python_count_direct_or_declined_gives_the_checked_paths_bits(monkeypatch, mode):
    """Wherever the direct path runs or declines, the result is the checked path's (and
    for a plain loss torch's ``sum / n``)."""
    z, y = _data()
    got = mode(xt.cross_entropy, z, y)
    want = mode(_checked(monkeypatch), z, y)
    assert torch.equal(got, want)


def test_python_count_plain_loss_and_gradient_are_torchs_sum_over_n():
    z, y = _data(rows=9, classes=7, seed=3)
    y[2] = -100
    a, b = z.clone().requires_grad_(), z.clone().requires_grad_()
    loss = xt.cross_entropy(a, y, num_items=11, label_smoothing=0.3)
    want = F.cross_entropy(b, y, reduction="sum", label_smoothing=0.3) / 11
    (loss * 2).backward()
    (want * 2).backward()
    assert torch.equal(loss, want) and torch.equal(a.grad, b.grad)


# --------------------------------------------------------------------------------------------
# 2. size_average / reduce read by truth, as torch reads them
# --------------------------------------------------------------------------------------------

_FLAGS = [None, 0, "False", "", np.False_, torch.tensor(0.0), torch.tensor([1]), []]


@pytest.mark.parametrize("size_average", _FLAGS, ids=repr)
@pytest.mark.parametrize("reduce", _FLAGS, ids=repr)
def test_legacy_pair_as_torch(size_average, reduce):
    z, y = _data(dtype=torch.float64)
    y[0] = -100
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = F.cross_entropy(z, y, size_average=size_average, reduce=reduce)
        got = xt.cross_entropy(z, y, size_average=size_average, reduce=reduce)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


@pytest.mark.parametrize("size_average, reduce, name, torch_error", [
    (torch.tensor([1, 0]), None, "size_average", RuntimeError),
    (None, np.array([True, False]), "reduce", ValueError),
    (0, torch.tensor([0, 0]), "reduce", RuntimeError)], ids=["sa-tensor", "rd-array", "rd-tensor"])
def test_legacy_value_without_one_truth_is_refused_naming_it(size_average, reduce, name,
                                                             torch_error):
    z, y = _data()
    with pytest.raises(torch_error):  # torch raises too, with no name
        F.cross_entropy(z, y, size_average=size_average, reduce=reduce)
    with pytest.raises(InputError, match=name):
        xt.cross_entropy(z, y, size_average=size_average, reduce=reduce)


def test_legacy_pair_under_torch_compile_as_torch():
    z, y = _data(dtype=torch.float64)
    y[1] = -100
    torch._dynamo.reset()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            want = F.cross_entropy(z, y, size_average=np.False_, reduce=1)  # "sum"
            f = torch.compile(lambda a, b: xt.cross_entropy(a, b, size_average=np.False_,
                                                            reduce=1), backend="eager")
            got = f(z, y)
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


# --------------------------------------------------------------------------------------------
# 3. Numeric checks: nothing refused that the compute dtype holds; no raw errors
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype, cap", [(torch.bfloat16, 30.0), (torch.float16, 1e5),
                                        (torch.float32, 1.2e-38), (torch.float32, 3e38),
                                        (torch.float64, 1e-300), (torch.float64, 1e300)])
def test_softcap_the_compute_dtype_holds_is_taken(dtype, cap):
    """bf16/fp16 logits compute c tanh(z / c) in float32: a cap float32 holds is taken."""
    z, y = _data(dtype=dtype)
    zc = z.to(torch.float64 if dtype == torch.float64 else torch.float32)
    want = F.cross_entropy((cap * torch.tanh(zc.double() / cap)), y)
    got = xt.cross_entropy(z, y, softcap=cap)
    assert torch.isfinite(got)
    tol = 1e-12 if dtype == torch.float64 else 2e-2 if dtype in (torch.bfloat16,
                                                                 torch.float16) else 1e-5
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


def test_core_float16_logits_take_a_softcap_float32_holds():
    z = np.array([[0.5, -1.0, 2.0], [0.0, 0.25, -0.5]], dtype=np.float16)
    got = float(crossent.softmax_cross_entropy(z, np.array([2, 0]), softcap=1e5))
    zc = 1e5 * np.tanh(z.astype(np.float64) / 1e5)
    lse = np.log(np.exp(zc).sum(-1))
    want = float(np.mean(lse - zc[[0, 1], [2, 0]]))
    assert abs(got - want) < 5e-3


_META_CALLS = {
    "ignore_index": lambda z, y, m: xt.cross_entropy(z, y, ignore_index=m),
    "num_classes": lambda z, y, m: crossent.one_hot([0, 1], m),
    "chunk_size": lambda z, y, m: xt.linear_cross_entropy(z, torch.ones(3, 5), y[:3],
                                                          chunk_size=m),
    "in_features": lambda z, y, m: xt.LinearCrossEntropyLoss(m, 3),
}


@pytest.mark.parametrize("name", list(_META_CALLS))
def test_a_meta_0d_integer_is_refused_naming_the_argument(name):
    z, y = _data()
    with pytest.raises(InputError, match=name):
        _META_CALLS[name](z, y, torch.tensor(1, device="meta"))


def test_vocab_parallel_meta_ignore_index_is_noted_not_raised_raw():
    from crossent.torch.distributed import _common

    with pytest.raises(InputError, match="ignore_index"):
        _common._index(torch.tensor(1, device="meta"), "ignore_index")


def test_linear_module_out_features_as_a_tuple_like_torch():
    torch.manual_seed(0)
    ours = xt.LinearCrossEntropyLoss(4, 3, out_features=(2,))
    assert ours.linear.weight.shape == torch.nn.LinearCrossEntropyLoss(
        4, 3, out_features=(2,)).linear.weight.shape == (6, 4)


def test_linear_module_out_features_iterator_is_not_dropped():
    head = xt.LinearCrossEntropyLoss(4, 3, out_features=iter((2,)))
    assert head.out_features == (2,)
    assert head.linear.weight.shape == (6, 4)  # torch's: nn.Linear(4, 3 * 2)


def test_jax_traced_softcap_is_computed_or_refused_naming_it():
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    z = jnp.asarray([[0.5, -1.0, 2.0], [0.0, 0.25, -0.5]], dtype=jnp.float32)
    y = jnp.asarray([2, 0])
    want = float(crossent.softmax_cross_entropy(z, y, softcap=3.0))
    try:
        got = float(jax.jit(lambda a, c: crossent.softmax_cross_entropy(
            a, y, softcap=c, validate=False))(z, 3.0))
    except (InputError, UnsupportedError) as error:
        assert "softcap" in str(error)
    else:
        assert abs(got - want) < 1e-6


# --------------------------------------------------------------------------------------------
# 4. H51's fixes: valid calls still taken
# --------------------------------------------------------------------------------------------

def test_competing_load_takes_a_python_zero():
    from crossent.torch.bench import CompetingLoad

    with CompetingLoad(0) as load:
        assert load.processes == 0 and not CompetingLoad.active
    with pytest.raises(InputError, match="processes"):
        CompetingLoad(-1)


def test_competing_load_takes_a_numpy_integer():
    from crossent.torch.bench import CompetingLoad

    with CompetingLoad(np.int64(0)) as load:
        assert load.processes == 0


def test_coin_curve_takes_the_float16_distribution_the_core_takes():
    from crossent.teaching import curves

    truth = np.array([0.99, 0.01], dtype=np.float16)
    assert np.isfinite(float(crossent.entropy(truth)))  # the core takes it
    c = curves.coin_cross_entropy_curve(truth=truth, n=5)
    assert np.all(np.isfinite(c.series["cross-entropy"]))
