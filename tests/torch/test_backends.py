"""The kernel seam: ``backend=`` on the functions and modules, and the one function that
chooses (:func:`crossent.torch._backends.choose_backend`). ``"triton"`` runs in
tests/triton/test_backend_seam.py (interpreter mode); here: ``"native"``, ``"rowblock"``,
``"auto"``'s policy (a CUDA device is only named, never needed) and the errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from fused_testing import close

import crossent.torch as xt
from crossent.errors import InputError, UnsupportedError
from crossent.torch import _backends

pytestmark = pytest.mark.native_dispatch  # the real small-input threshold
C = 7


def kind(out: torch.Tensor) -> str:
    """"rowblock" if a fused Function made ``out`` (through a reshape, a division)."""
    fn = out.grad_fn
    for _ in range(3):
        name = type(fn).__name__
        if "LinearCrossEntropyFunction" in name or "_CrossEntropyFunction" in name:
            return "rowblock"
        if fn is None or not fn.next_functions:
            break
        fn = fn.next_functions[0][0]
    return "other"


def data(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, C, generator=g, dtype=torch.float64) * 2
    y = torch.randint(0, C, (n,), generator=g)
    y[::5] = -100
    x = torch.randn(n, 4, generator=g, dtype=torch.float64)
    w = torch.randn(C, 4, generator=g, dtype=torch.float64)
    return z, y, x, w


@pytest.mark.parametrize("backend", ["native", "rowblock", "auto"])
@pytest.mark.parametrize("kw", [{}, dict(label_smoothing=0.2, reduction="sum"),
                                dict(reduction="none")])
def test_every_backend_gives_torchs_numbers(backend, kw):
    z, y, x, w = data()
    ref = z.clone().requires_grad_()
    want = F.cross_entropy(ref, y, **kw)
    want.sum().backward()
    leaf = z.clone().requires_grad_()
    got = xt.cross_entropy(leaf, y, backend=backend, **kw)
    got.sum().backward()
    assert kind(got) == ("rowblock" if backend == "rowblock" else "other")
    close(got, want)
    close(leaf.grad, ref.grad)
    refs = [x.clone().requires_grad_(), w.clone().requires_grad_()]
    want = F.cross_entropy(F.linear(*refs), y, **kw)
    want.sum().backward()
    leaves = [x.clone().requires_grad_(), w.clone().requires_grad_()]
    got = xt.linear_cross_entropy(*leaves, y, backend=backend, **kw)
    got.sum().backward()
    assert kind(got) == ("rowblock" if backend == "rowblock" else "other")
    close(got, want)
    for a, b in zip(leaves, refs, strict=True):
        close(a.grad, b.grad)


def test_native_is_torch_above_the_small_input_threshold_too():
    # past the small kernel's range too (it keeps up to 2^23 float64 logits of 1000
    # classes; float32 at any size)
    rows = _backends.SMALL_MAX_LOGITS // 1000 + 1
    g = torch.Generator().manual_seed(1)
    z = torch.randn(rows, 1000, generator=g, dtype=torch.float64)
    y = torch.randint(0, 1000, (rows,), generator=g)
    assert kind(xt.cross_entropy(z.requires_grad_(), y)) == "rowblock"  # auto: fused
    out = xt.cross_entropy(z, y, backend="native")
    assert kind(out) == "other"
    close(out, F.cross_entropy(z.double(), y))


def test_native_keeps_torchs_probability_target_nan_rowblock_does_not():
    # torch: 0 * log(0) = NaN for a zero target on a -inf logit; crossent: exactly 0
    z = torch.randn(3, C)
    z[:, 0] = -float("inf")
    t = torch.softmax(torch.randn(3, C), 1)
    t[:, 0] = 0.0
    t = t / t.sum(1, keepdim=True)
    assert torch.isnan(F.cross_entropy(z, t))
    assert torch.isnan(xt.cross_entropy(z, t, backend="native"))
    assert torch.isfinite(xt.cross_entropy(z, t, backend="rowblock"))


def test_native_gives_torchs_target_weight_and_double_backward_gradients():
    z, _, _, _ = data(seed=2)
    t = torch.softmax(torch.randn(12, C, dtype=torch.float64), 1)
    cw = torch.rand(C, dtype=torch.float64) + 0.5
    refs = [z.clone().requires_grad_(), t.clone().requires_grad_(), cw.clone().requires_grad_()]
    F.cross_entropy(*refs, label_smoothing=0.1).backward()
    leaves = [z.clone().requires_grad_(), t.clone().requires_grad_(),
              cw.clone().requires_grad_()]
    xt.cross_entropy(*leaves, label_smoothing=0.1, backend="native").backward()
    for a, b in zip(leaves, refs, strict=True):
        close(a.grad, b.grad)
    want = torch.autograd.functional.hessian(lambda z: F.cross_entropy(z, t), z)
    got = torch.autograd.functional.hessian(
        lambda z: xt.cross_entropy(z, t, backend="native"), z)
    close(got, want)


@pytest.mark.parametrize("backend", ["native", "rowblock"])
def test_transforms_work_on_every_cpu_backend(backend):
    z, y, _, _ = data(seed=3)
    want = torch.func.grad(lambda z: F.cross_entropy(z, y))(z)
    close(torch.func.grad(lambda z: xt.cross_entropy(z, y, backend=backend))(z), want)


def test_rowblock_runs_the_fused_kernel_at_every_size_and_native_raises_for_its_extras():
    z, y, x, w = data()
    z.requires_grad_()
    w.requires_grad_()
    assert kind(xt.cross_entropy(z, y)) == "other"  # auto: small input, torch's kernel
    assert kind(xt.cross_entropy(z, y, backend="rowblock")) == "rowblock"
    assert kind(xt.linear_cross_entropy(x, w, y, backend="rowblock")) == "rowblock"
    for kw in (dict(z_loss=1e-3), dict(softcap=5.0)):
        name = next(iter(kw))
        with pytest.raises(UnsupportedError, match=f"backend='native'.*{name}"):
            xt.cross_entropy(z, y, backend="native", **kw)
        with pytest.raises(UnsupportedError, match=f"backend='native'.*{name}"):
            xt.linear_cross_entropy(x, w, y, backend="native", **kw)


@pytest.mark.parametrize("bad", ["cuda", "Native", "", None, 3])
def test_unknown_backend_raises_naming_it(bad):
    z, y, x, w = data()
    with pytest.raises(InputError, match="backend"):
        xt.cross_entropy(z, y, backend=bad)
    with pytest.raises(InputError, match="backend"):
        xt.linear_cross_entropy(x, w, y, backend=bad)
    with pytest.raises(InputError, match="backend"):
        xt.CrossEntropyLoss(backend=bad)
    with pytest.raises(InputError, match="backend"):
        xt.LinearCrossEntropyLoss(4, C, backend=bad)


def test_modules_pass_their_backend():
    z, y, x, _ = data()
    loss = xt.CrossEntropyLoss(backend="rowblock")
    assert "backend='rowblock'" in repr(loss)
    assert kind(loss(z.requires_grad_(), y)) == "rowblock"
    head = xt.LinearCrossEntropyLoss(4, C, dtype=torch.float64, backend="native")
    with pytest.raises(UnsupportedError, match="z_loss"):
        xt.LinearCrossEntropyLoss(4, C, z_loss=1e-3, dtype=torch.float64,
                                  backend="native")(x, y)
    close(head(x, y), F.cross_entropy(F.linear(x, head.linear.weight), y))


def test_triton_without_a_gpu_or_the_interpreter_raises(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    z, y, x, w = data()
    with pytest.raises(UnsupportedError, match=r"backend='triton'.*(TRITON_INTERPRET|triton)"):
        xt.cross_entropy(z, y, backend="triton")
    with pytest.raises(UnsupportedError, match="backend='triton'"):
        xt.linear_cross_entropy(x, w, y, backend="triton")


# ---------------------------------------------------------------- the policy itself


def call(device="cpu", num_logits=10, **kw):
    base = dict(function="cross_entropy", device=torch.device(device), num_logits=num_logits,
                index_target=True, z_loss=0.0, softcap=None)
    return _backends.Call(**(base | kw))


BIG = 1 << 22


@pytest.mark.parametrize("triton", [False, True])
def test_auto_policy(monkeypatch, triton):
    monkeypatch.setattr(_backends, "triton_importable", lambda: triton)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the interpreter never makes auto pick it
    choose = _backends.choose_backend
    assert choose("auto", call(), 100) == "native"
    assert choose("auto", call(num_logits=BIG), 100) == "rowblock"
    assert choose("auto", call(z_loss=0.1), 100) == "rowblock"
    assert choose("auto", call(index_target=False), 100) == "rowblock"
    assert choose("auto", call(sized=True), 100) == "rowblock"
    assert choose("auto", call(composite="vmap"), 100) == "composite"
    assert choose("auto", call("cuda"), 100) == "native"
    assert choose("auto", call("cuda", BIG), 100) == ("triton" if triton else "rowblock")
    assert choose("auto", call("cuda", BIG, triton_refusal="x"), 100) == "rowblock"
    assert choose("auto", call("cuda", BIG, composite="vmap"), 100) == "composite"
    assert choose("rowblock", call("cuda"), 100) == "rowblock"
    assert choose("rowblock", call(composite="vmap"), 100) == "composite"
    assert choose("native", call(composite="vmap", num_logits=BIG), 100) == "native"


def test_forced_triton_policy(monkeypatch):
    monkeypatch.setattr(_backends, "triton_importable", lambda: True)
    choose = _backends.choose_backend
    assert choose("triton", call("cuda"), 100) == "triton"
    with pytest.raises(UnsupportedError, match="target gradient"):
        choose("triton", call("cuda", triton_refusal="target gradient"), 100)
    with pytest.raises(UnsupportedError, match="vmap"):
        choose("triton", call("cuda", composite="vmap"), 100)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(UnsupportedError, match="TRITON_INTERPRET"):
        choose("triton", call("cpu"), 100)
    with pytest.raises(UnsupportedError, match="mps"):
        choose("triton", call("mps"), 100)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert choose("triton", call("cpu"), 100) == "triton"
    monkeypatch.setattr(_backends, "triton_importable", lambda: False)
    with pytest.raises(UnsupportedError, match="not installed"):
        choose("triton", call("cuda"), 100)


@pytest.mark.parametrize("backend", ["auto", "native", "rowblock"])
def test_ignore_index_with_probability_targets_raises_as_torch(backend):
    z = torch.randn(3, C)
    t = torch.softmax(torch.randn(3, C), 1)
    with pytest.raises(RuntimeError, match="ignore_index"):
        F.cross_entropy(z, t, ignore_index=2)
    with pytest.raises(InputError, match="ignore_index=2"):
        xt.cross_entropy(z, t, ignore_index=2, backend=backend)
    close(xt.cross_entropy(z, t, ignore_index=-1, backend=backend), F.cross_entropy(z, t))
