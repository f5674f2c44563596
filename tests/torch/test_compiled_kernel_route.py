"""``crossent.torch.set_compiled_kernel(True)``: the public entry points route bfloat16 (and
float32) CPU logits with index targets to the compiled kernel
(:mod:`crossent.torch._inductor`, whose own tests are ``test_inductor_kernel.py``) and
everything else to the row-block kernel.
References: float64 ``torch.nn.functional`` autograd; bfloat16 tolerances of one rounding.
Compiling is slow: bfloat16 and float32 only (the graphs ``test_inductor_kernel.py``
compiles too)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import crossent.torch as xt
from crossent.errors import InputError
from crossent.torch import _inductor

pytestmark = [pytest.mark.skipif(not _inductor.available(), reason="no C++ compiler"),
              pytest.mark.timeout(300)]


# compiled_calls (tests/torch/conftest.py): the kernel on, its calls recorded


def _logits(n=40, c=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(n, c, generator=g) * 4).to(torch.bfloat16)
    y = torch.randint(0, c, (n,), generator=g)
    z[0, y[0]] = 30.0  # a confident row: p_y - 1 formed in float32 (PITFALLS 6)
    y[3] = y[7] = -100
    return z, y


def _close(ours, ref):
    torch.testing.assert_close(ours.double(), ref, rtol=2.0 ** -7, atol=1e-5)


@pytest.mark.parametrize("options", [{}, {"reduction": "sum"}, {"reduction": "none"},
                                     {"weight": "w"}, {"ignore_index": 5},
                                     {"inplace_backward": True}])
def test_routed_calls_match_float64_torch(options, compiled_calls):
    z, y = _logits()
    options = dict(options)
    ref_options = {k: v for k, v in options.items() if k != "inplace_backward"}
    if options.get("weight") == "w":
        w = torch.rand(z.shape[1], generator=torch.Generator().manual_seed(1)) + 0.5
        options["weight"], ref_options["weight"] = w.to(torch.bfloat16), w.to(
            torch.bfloat16).double()
    if "ignore_index" in options:
        y = torch.where(y == -100, options["ignore_index"], y)
    x = z.clone().requires_grad_()
    ref_x = z.double().requires_grad_()
    loss = xt.cross_entropy(x, y, backend="rowblock", **options)
    ref = F.cross_entropy(ref_x, y, **ref_options)
    # a grad_output exact in bfloat16, so both sides see the same one
    go = (torch.rand_like(ref) + 0.5).to(torch.bfloat16).double() if ref.dim() else (
        torch.ones((), dtype=torch.float64))
    loss.backward(go.to(loss.dtype))
    ref.backward(go)
    assert compiled_calls, "expected the compiled kernel"
    _close(loss.detach(), ref.detach())
    _close(x.grad, ref_x.grad)


@pytest.mark.parametrize("options", [{"label_smoothing": 0.1}, {"z_loss": 1e-3},
                                     {"softcap": 20.0}, {"statistics": "lse"},
                                     {"probabilities": True}])
def test_other_options_keep_the_row_block_kernel(options, compiled_calls):
    z, y = _logits(8, 50)
    options = dict(options)
    if options.pop("probabilities", False):
        y = torch.softmax(torch.randn(8, 50), 1).to(torch.bfloat16)
    x = z.clone().requires_grad_()
    out = xt.cross_entropy(x, y, backend="rowblock", **options)
    loss = out[0] if isinstance(out, tuple) else out
    loss.backward()
    assert compiled_calls == []


def test_float64_and_no_grad_keep_the_row_block_kernel(compiled_calls):
    z, y = _logits(8, 50)
    xt.cross_entropy(z.double().requires_grad_(), y, backend="rowblock").backward()
    with torch.no_grad():
        xt.cross_entropy(z, y, backend="rowblock")
    assert compiled_calls == []


@pytest.mark.parametrize("options", [{}, {"reduction": "none"}, {"weight": "w"}])
def test_float32_is_routed_and_matches_float64_torch(options, compiled_calls):
    z, y = _logits(37, 300, seed=3)
    z = z.float() + torch.randn(z.shape, generator=torch.Generator().manual_seed(4)) * 1e-2
    options = dict(options)
    if options.get("weight") == "w":
        options["weight"] = torch.rand(300, generator=torch.Generator().manual_seed(5)) + 0.5
    ref_options = {k: (v.double() if isinstance(v, torch.Tensor) else v)
                   for k, v in options.items()}
    x, ref = z.clone().requires_grad_(), z.double().requires_grad_()
    loss = xt.cross_entropy(x, y, backend="rowblock", **options)
    ref_loss = F.cross_entropy(ref, y, **ref_options)
    g = torch.randn(loss.shape, generator=torch.Generator().manual_seed(6))
    loss.backward(g)
    ref_loss.backward(g.double())
    assert compiled_calls == [z.shape]
    torch.testing.assert_close(loss.double(), ref_loss.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), ref.grad, rtol=1e-5, atol=1e-7)


def test_linear_head_bfloat16_matches_float64_torch(compiled_calls):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(24, 16, generator=g).to(torch.bfloat16)
    w = (torch.randn(200, 16, generator=g) / 4).to(torch.bfloat16)
    y = torch.randint(0, 200, (24,), generator=g)
    y[5] = -100
    ours = [x.clone().requires_grad_(), w.clone().requires_grad_()]
    ref = [x.double().requires_grad_(), w.double().requires_grad_()]
    loss = xt.linear_cross_entropy(*ours, y)
    # the unfused bfloat16 matmul rounds the logits once, as crossent's chunk matmul does
    logits = (x.float() @ w.float().T).to(torch.bfloat16).double()
    ref_loss = F.cross_entropy(logits + (F.linear(*ref) - F.linear(*ref).detach()), y)
    loss.backward()
    ref_loss.backward()
    assert compiled_calls
    torch.testing.assert_close(loss.double(), ref_loss.detach(), rtol=1e-2, atol=1e-3)
    for a, r in zip(ours, ref, strict=True):
        torch.testing.assert_close(a.grad.double(), r.grad, rtol=5e-2, atol=5e-3)


def test_set_compiled_kernel_checks_its_argument():
    with pytest.raises(InputError, match="enabled"):
        xt.set_compiled_kernel("yes")  # type: ignore[arg-type]
    assert xt.set_compiled_kernel(False) is False


@pytest.mark.native_dispatch
@pytest.mark.parametrize(("dtype", "shape", "route"), [
    (torch.float32, (1024, 512), "rowblock"),  # 2**19 logits, 512 classes: was "small"
    (torch.bfloat16, (2048, 256), "rowblock"),  # under 2**23: was "small"
    (torch.float32, (1024, 511), None),  # under 2**19: the small kernel, called directly
    (torch.float32, (32768, 21), "small"),  # few classes: the small kernel's rows
    (torch.float64, (1024, 512), "small"),  # not a dtype it takes
])
def test_auto_reaches_the_compiled_kernel_from_2_19_logits(dtype, shape, route,
                                                           compiled_calls, routes):
    """With the compiled kernel on, ``backend="auto"`` sends the calls the row-block
    kernel's rows suit (``2**19`` logits on, 64 classes or more) to it, where the
    small-batch kernel took float32 at any size and bfloat16 under ``2**23`` logits
    (review H83: the opt-in was never reached there). References: float64 torch."""
    g = torch.Generator().manual_seed(7)
    z = torch.randn(shape, generator=g).to(dtype)
    y = torch.randint(0, shape[1], shape[:1], generator=g)
    x, ref = z.clone().requires_grad_(), z.double().requires_grad_()
    loss = xt.cross_entropy(x, y)
    ref_loss = F.cross_entropy(ref, y)
    loss.backward()
    ref_loss.backward()
    assert routes == ([] if route is None else [route])
    assert compiled_calls == ([shape] if route == "rowblock" else [])
    tol = 2.0 ** -7 if dtype == torch.bfloat16 else 1e-6
    torch.testing.assert_close(loss.double(), ref_loss.detach(), rtol=tol, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), ref.grad, rtol=tol, atol=1e-7)
