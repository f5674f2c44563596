"""Review H101 (huge inputs on CPU): the backward of a bfloat16/float16 ``reduction="none"``
(or any per-row ``grad_output``) multiplies the stored gradient by a float32 factor per row.
One ``grad.mul_(factor)`` made torch's CPU TensorIterator compute in float32 through
whole-tensor temporaries: 4x the gradient's bytes extra (a 16800 x 128256 bfloat16 backward
was killed for memory on a 24 GiB machine). ``_rules.scale_stored`` multiplies blocks of rows
now; each block is one float32 multiplication rounded once, as the whole-tensor one."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import crossent.torch as xt
from crossent.torch import _rules


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_blocks_of_rows_give_the_whole_multiplication(monkeypatch, dtype):
    monkeypatch.setattr(_rules, "_MUL_BLOCK", 64)  # 37 rows of 50: many blocks, a ragged last
    gen = torch.Generator().manual_seed(0)
    grad = torch.randn(37, 50, generator=gen).to(dtype)
    factor = torch.rand(37, generator=gen) * 3
    factor[[3, 11, 30]] = torch.tensor([float("nan"), float("inf"), 0.0])
    want = (grad.float() * factor[:, None]).to(dtype)  # one float32 product, rounded once
    got = grad.clone()
    _rules.scale_stored(got, factor, "none")
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


def test_bfloat16_none_backward_in_blocks_is_torchs(monkeypatch):
    monkeypatch.setattr(_rules, "_MUL_BLOCK", 300)
    gen = torch.Generator().manual_seed(1)
    z = (2 * torch.randn(40, 97, generator=gen)).to(torch.bfloat16)
    y = torch.randint(0, 97, (40,), generator=gen)
    y[5] = -100
    go = torch.rand(40, generator=gen) + 0.5
    ours = z.clone().requires_grad_()
    xt.cross_entropy(ours, y, reduction="none", backend="rowblock").backward(go.bfloat16())
    ref = z.double().requires_grad_()
    F.cross_entropy(ref, y, reduction="none").backward(go.bfloat16().double())
    torch.testing.assert_close(ours.grad.double(), ref.grad, rtol=2**-7, atol=1e-6)
    assert float(ours.grad[5].abs().max()) == 0.0


_PROBE = textwrap.dedent("""
    import resource, torch
    import crossent.torch as xt
    z = torch.randn(1680, 32768).to(torch.bfloat16).requires_grad_()
    y = torch.randint(0, 32768, (1680,))
    loss = xt.cross_entropy(z, y, reduction="none", backend="rowblock")
    go = torch.rand_like(loss)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    loss.backward(go)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print((after - before) * 1024 / (z.numel() * 2))
""")


def test_bfloat16_none_backward_needs_no_whole_float32_copies():
    """Peak memory the backward adds, in units of the logits' bytes: 4.0 before (two
    float32 temporaries), about 1.1 now (the leaf's ``.grad``)."""
    done = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True,
                          timeout=120, check=True)
    assert float(done.stdout.split()[-1]) < 2.0, done.stdout
