"""What the crossent.torch tests share: the devices to run on and the closeness check."""

from __future__ import annotations

import pytest
import torch

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
