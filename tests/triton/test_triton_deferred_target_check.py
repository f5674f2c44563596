"""The Triton cross-entropy's class-index bounds check with its host read queued behind
the kernel (``_rules.start_index_check``): on a GPU, reading the check first left the GPU
idle while the host prepared and launched the kernel. What must hold: the same
``IndexError`` (torch's type, the first bad index named), raised before anything is
returned; the logits intact when it raises (in place: read before the kernel, which would
overwrite them); the read after the launch out of place, before it in place; no read
with ``check_targets=False``. (On CPU the same code runs; the pinned copy and event are
CUDA's only.)"""

from __future__ import annotations

import traceback

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import crossent.torch as xt
from crossent.errors import InputError
from crossent.torch._rules import start_index_check
from crossent.torch._triton import autograd as triton_autograd
from crossent.torch._triton import triton_cross_entropy

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: interpreter


class _Events(TorchDispatchMode):
    """Records host reads of device values (aten's ``_local_scalar_dense``) made by
    crossent, in order with the kernel launches recorded by the spy below."""

    def __init__(self, log: list[str]) -> None:
        super().__init__()
        self.log = log

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.startswith("_local_scalar_dense") and any(
                "crossent" in f.filename and "tests" not in f.filename
                for f in traceback.extract_stack()):
            self.log.append("read")
        return func(*args, **(kwargs or {}))


@pytest.fixture
def log(monkeypatch):
    events: list[str] = []
    real = triton_autograd.ops.cross_entropy_forward

    def spy(*args, **kwargs):
        events.append("kernel")
        return real(*args, **kwargs)

    monkeypatch.setattr(triton_autograd.ops, "cross_entropy_forward", spy)
    return events


def _data(bad: bool):
    g = torch.Generator().manual_seed(3)
    z = torch.randn(5, 40, generator=g).to(DEVICE)
    t = torch.tensor([0, 39, -100, 7, 3], device=DEVICE)
    if bad:
        t[3] = 40
    return z, t


@pytest.mark.parametrize("grad", [True, False])
def test_out_of_place_reads_after_the_launch_and_matches_torch(log, grad):
    z, t = _data(bad=False)
    a = z.clone().requires_grad_(grad)
    with _Events(log):
        loss = triton_cross_entropy(a, t)
    assert log == ["kernel", "read"]
    want = F.cross_entropy(z.double(), t)
    torch.testing.assert_close(loss.double(), want, rtol=1e-6, atol=1e-6)


def test_in_place_reads_before_the_launch(log):
    z, t = _data(bad=False)
    a = z.clone().requires_grad_()
    with _Events(log):
        triton_cross_entropy(a, t, inplace_backward=True)
    assert log == ["read", "kernel"]


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("grad", [True, False])
def test_bad_index_raises_with_the_logits_intact(log, inplace, grad):
    z, t = _data(bad=True)
    src = z.clone().requires_grad_(grad)
    # in place: an activation (a leaf's memory is never overwritten anyway)
    a = src * 1.0 if inplace else src
    with pytest.raises(IndexError, match=r"class index 40, outside \[0, 40\)"):
        triton_cross_entropy(a, t, inplace_backward=inplace)
    assert torch.equal(a.detach(), z), "the logits were changed by a call that raised"
    assert src.grad is None
    # in place the kernel never ran; out of place it ran and its work was discarded
    assert log == ([] if inplace else ["kernel"])


def test_public_triton_route_raises_the_same(log):
    z, t = _data(bad=True)
    a = z.clone().requires_grad_()
    with pytest.raises(IndexError, match="class index 40"):
        xt.cross_entropy(a, t, backend="triton")
    assert torch.equal(a.detach(), z)
    with pytest.raises(IndexError):  # torch's own type for the same input
        F.cross_entropy(z.cpu(), t.cpu())


def test_no_check_no_read(log):
    z, t = _data(bad=True)
    with _Events(log):
        loss = triton_cross_entropy(z.clone().requires_grad_(), t, check_targets=False)
    assert log == ["kernel"]
    assert torch.isnan(loss)  # the documented NaN for an unchecked bad index


@pytest.mark.parametrize("dtype,value", [(torch.uint8, 255), (torch.int16, -7),
                                         (torch.int32, 2**31 - 1)])
def test_start_index_check_narrow_dtypes(dtype, value):
    t = torch.tensor([1, value, 2], dtype=dtype, device=DEVICE)
    finish = start_index_check(t, 40, -100)
    with pytest.raises(IndexError, match=f"class index {value},"):
        finish()
    ok = start_index_check(torch.tensor([1, 2], dtype=dtype, device=DEVICE), 40, -100)
    assert ok() is None


def test_start_index_check_refuses_a_bool_target_now():
    with pytest.raises(InputError, match="target"):
        start_index_check(torch.tensor([True, False], device=DEVICE), 40, -100)
