"""The small-input fast path of ``crossent.torch.cross_entropy`` (issue 16: small inputs at
torch eager's speed): the common call goes straight to the C++ operator that
``torch.nn.functional.cross_entropy`` calls. Checked here:

* it is taken exactly for the calls it claims (a spy on the checked path's option builder),
* its results and gradients are torch's, bit for bit, for every option it serves,
* every other call (bad options, narrow targets, subclasses, transforms, forward AD,
  tracing, torch-function modes, the size limit) takes the checked path and behaves as
  before: crossent's errors, crossent's numbers.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import crossent.torch as ct
from crossent.errors import InputError
from crossent.torch import _backends

pytestmark = pytest.mark.native_dispatch  # keep the small-input dispatch (conftest.py)




def _data(n=7, c=5, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, generator=g, dtype=dtype) * 3
    y = torch.randint(0, c, (n,), generator=g)
    return x, y


FAST_OPTIONS = [
    {},
    {"reduction": "sum"},
    {"reduction": "none"},
    {"ignore_index": 2},
    {"ignore_index": -100, "reduction": "none"},
    {"label_smoothing": 0.3},
    {"label_smoothing": 1.0, "reduction": "sum"},
    {"label_smoothing": 0},
    {"z_loss": 0.0},
    {"z_loss": 0},
    {"backend": "native"},
    {"inplace_backward": True},  # torch's kernel leaves the logits intact anyway
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("options", FAST_OPTIONS)
def test_fast_path_is_torch_bit_for_bit(options, dtype, checked_calls):
    x, y = _data(dtype=dtype)
    y[1] = options.get("ignore_index", -100)
    torch_options = {k: v for k, v in options.items()
                     if k in ("reduction", "ignore_index", "label_smoothing")}
    a = x.clone().requires_grad_()
    b = x.clone().requires_grad_()
    ours = ct.cross_entropy(a, y, **options)
    ref = F.cross_entropy(b, y, **torch_options)
    assert checked_calls == []  # the fast path served it
    assert ours.dtype == ref.dtype and ours.shape == ref.shape
    assert torch.equal(ours, ref)
    grad_out = torch.rand_like(ref) + 0.5
    ours.backward(grad_out)
    ref.backward(grad_out)
    assert torch.equal(a.grad, b.grad)
    assert torch.equal(a.detach(), x)  # logits intact


def test_fast_path_double_backward_is_torch(checked_calls):
    x, y = _data(dtype=torch.float64)
    a = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(ct.cross_entropy(a, y), a, create_graph=True)
    (h,) = torch.autograd.grad(g.pow(2).sum(), a)
    b = x.clone().requires_grad_()
    (g_ref,) = torch.autograd.grad(F.cross_entropy(b, y), b, create_graph=True)
    (h_ref,) = torch.autograd.grad(g_ref.pow(2).sum(), b)
    assert checked_calls == []
    assert torch.equal(g, g_ref) and torch.equal(h, h_ref)


@pytest.mark.parametrize("special", ["nan", "inf", "-inf", "all_ignored", "empty"])
def test_fast_path_edge_values_match_torch(special, checked_calls):
    x, y = _data()
    if special == "nan":
        x[2, 1] = math.nan
    elif special == "inf":
        x[3, 0] = math.inf
    elif special == "-inf":
        x[4, :] = -math.inf
    elif special == "all_ignored":
        y[:] = -100
    else:
        x, y = x[:0], y[:0]
    for reduction in ("mean", "sum", "none"):
        ours = ct.cross_entropy(x, y, reduction=reduction)
        ref = F.cross_entropy(x, y, reduction=reduction)
        torch.testing.assert_close(ours, ref, equal_nan=True, rtol=0, atol=0)
    assert checked_calls == []


def test_out_of_range_target_raises_as_torch(checked_calls):
    x, y = _data()
    y[0] = 5
    with pytest.raises(IndexError) as theirs:
        F.cross_entropy(x, y)
    with pytest.raises(IndexError) as ours:
        ct.cross_entropy(x, y)
    assert str(ours.value) == str(theirs.value)


@pytest.mark.parametrize("options, argument", [
    ({"label_smoothing": math.nan}, "label_smoothing"),
    ({"label_smoothing": 1.5}, "label_smoothing"),
    ({"label_smoothing": -0.1}, "label_smoothing"),
    ({"reduction": "avg"}, "reduction"),
    ({"reduction": None}, "reduction"),
    ({"ignore_index": 3.0}, "ignore_index"),
    ({"backend": "fast"}, "backend"),
    ({"z_loss": -1.0}, "z_loss"),
])
def test_bad_options_still_raise_crossents_error(options, argument, checked_calls):
    x, y = _data()
    with pytest.raises(InputError, match=argument):
        ct.cross_entropy(x, y, **options)


@pytest.mark.parametrize("case", ["int32", "uint8", "int16", "parameter", "bfloat16",
                                  "float16", "3d", "1d", "weight", "num_items",
                                  "loss_dtype", "statistics", "size_average"])
def test_other_calls_take_the_checked_path(case, checked_calls):
    x, y = _data()
    ref = F.cross_entropy(x.double(), y).float()
    kwargs: dict = {}
    if case in ("int32", "uint8", "int16"):
        y = y.to(getattr(torch, case))
    elif case == "parameter":
        x = torch.nn.Parameter(x)
    elif case in ("bfloat16", "float16"):
        x = x.to(getattr(torch, case))
        ref = F.cross_entropy(x.double(), y).to(x.dtype)
    elif case == "3d":
        x, y = x.T.unsqueeze(0), y.unsqueeze(0)
    elif case == "1d":
        x, y = x[0], y[0]
        ref = F.cross_entropy(x.double(), y).float()
    elif case == "weight":
        kwargs["weight"] = torch.ones(5)
    elif case == "num_items":  # a tensor count (a Python number goes direct: stop 18)
        kwargs["num_items"] = torch.tensor(7)
    elif case == "loss_dtype":
        kwargs["loss_dtype"] = torch.float64
        ref = F.cross_entropy(x.double(), y)
    elif case == "statistics":
        kwargs["statistics"] = "lse"
    else:
        kwargs["size_average"] = True
    if case == "size_average":
        with pytest.warns(UserWarning, match="deprecated"):
            out = ct.cross_entropy(x, y, **kwargs)
    else:
        out = ct.cross_entropy(x, y, **kwargs)
    if case == "statistics":
        out, stats = out
        torch.testing.assert_close(stats.lse, torch.logsumexp(x, 1))
    assert checked_calls, "expected the checked path"
    torch.testing.assert_close(out.detach(), ref, rtol=1e-2 if x.dtype != torch.float32
                               else 1e-6, atol=1e-6)


def test_size_limit_is_read_at_every_call(monkeypatch, checked_calls):
    x, y = _data(4, 8)
    monkeypatch.setattr(_backends, "NATIVE_MAX_LOGITS", 32)  # 4 x 8 = 32: not below
    out = ct.cross_entropy(x, y)
    assert checked_calls == [1]
    torch.testing.assert_close(out, F.cross_entropy(x, y))
    monkeypatch.setattr(_backends, "NATIVE_MAX_LOGITS", 33)
    ct.cross_entropy(x, y)
    assert checked_calls == [1]


def test_subclass_takes_the_checked_path(checked_calls):
    class Tagged(torch.Tensor):
        pass

    x, y = _data()
    out = ct.cross_entropy(x.as_subclass(Tagged), y)
    assert checked_calls
    torch.testing.assert_close(out.as_subclass(torch.Tensor), F.cross_entropy(x, y))


def test_torch_function_mode_sees_the_call(checked_calls):
    seen = []

    class Record(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(getattr(func, "__name__", str(func)))
            return func(*args, **(kwargs or {}))

    x, y = _data()
    with Record():
        out = ct.cross_entropy(x, y)
    assert checked_calls  # not the fast path: the mode must see torch's public functions
    assert any("cross_entropy" in name for name in seen)
    torch.testing.assert_close(out, F.cross_entropy(x, y))


def test_transforms_take_the_checked_path(checked_calls):
    x, y = _data(dtype=torch.float64)
    g = torch.func.grad(lambda z: ct.cross_entropy(z, y))(x)
    g_ref = torch.func.grad(lambda z: F.cross_entropy(z, y))(x)
    torch.testing.assert_close(g, g_ref)
    assert checked_calls
    batched = torch.func.vmap(lambda z, t: ct.cross_entropy(z, t))(x.unsqueeze(1).expand(7, 3, 5),
                                                                    y[:, None].expand(7, 3))
    # each sample: 3 copies of one row, so its mean is that row's loss
    torch.testing.assert_close(batched, F.cross_entropy(x, y, reduction="none"))


def test_forward_ad_takes_the_checked_path(checked_calls):
    x, y = _data(dtype=torch.float64)
    t = torch.randn_like(x)
    with fwAD.dual_level():
        out = ct.cross_entropy(fwAD.make_dual(x, t), y)
        tangent = fwAD.unpack_dual(out).tangent
    with fwAD.dual_level():
        ref = fwAD.unpack_dual(F.cross_entropy(fwAD.make_dual(x, t), y)).tangent
    assert checked_calls
    torch.testing.assert_close(tangent, ref)


def test_jit_trace_takes_the_checked_path(checked_calls):
    x, y = _data()
    traced = torch.jit.trace(lambda z, t: ct.cross_entropy(z, t), (x, y), check_trace=False)
    assert checked_calls
    x2, y2 = _data(seed=1)
    torch.testing.assert_close(traced(x2, y2), F.cross_entropy(x2, y2))


def test_module_uses_the_fast_path(checked_calls):
    x, y = _data()
    loss = ct.CrossEntropyLoss(label_smoothing=0.1)(x, y)
    assert checked_calls == []
    assert torch.equal(loss, F.cross_entropy(x, y, label_smoothing=0.1))


@pytest.mark.parametrize("backend", ["auto", "rowblock"])
@pytest.mark.parametrize("value", [1 << 63, -(1 << 63) - 1, 1 << 70])
def test_ignore_index_outside_int64_raises_input_error(value, backend):
    x, y = _data()
    with pytest.raises(InputError, match="ignore_index"):
        ct.cross_entropy(x, y, ignore_index=value, backend=backend)


@pytest.mark.parametrize("backend", ["auto", "rowblock"])
@pytest.mark.parametrize("which", ["input", "target"])
def test_sparse_tensors_are_refused_naming_the_layout(which, backend):
    from crossent.errors import UnsupportedError

    x, y = _data()
    if which == "input":
        x = x.to_sparse()
    else:
        y = y.to_sparse()
    with pytest.raises(UnsupportedError, match=f"{which} with layout torch.sparse_coo"):
        ct.cross_entropy(x, y, backend=backend)
