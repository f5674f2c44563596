"""What the crossent.torch tests share: the devices to run on, the closeness check, and the
buffer-pool tests' pooled gradient (their ``fresh_pool`` fixture is in conftest.py)."""

from __future__ import annotations

import pytest
import torch

import crossent.torch as xt

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                  reason="no CUDA device")),
]


def close(got, want, rtol=1e-5):
    """Relative to the reference's largest magnitude (gradients hold tiny entries)."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    scale = want[torch.isfinite(want)].abs().max() if torch.isfinite(want).any() else 1.0
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * float(scale) + 1e-30,
                               equal_nan=True)


def pooled_grad(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """d cross_entropy / d z from the fused kernel: its buffer comes from the pool."""
    leaf = z.detach().requires_grad_()
    (g,) = torch.autograd.grad(xt.cross_entropy(leaf, y), leaf)
    return g
