"""An infinite "mean" scale in the vocab-parallel linear head (row-block route): class
weights of mixed signs whose counted sum is 0 (``num_items=0`` is refused). torch's gradient is
``+-inf`` with NaN where ``inf - inf`` meets (the target entries, then every sum through
them); the stored gradients times ``+-inf`` gave ``+-inf`` everywhere (stop 29, H63). Each
rank's input gradient and weight-gradient slice must be torch's float64 values, NaN and
infinities in the same places, on 2 and 3 gloo ranks (a timeout fails a hang)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from dist_harness import run_group

from crossent.torch.distributed import vocab_parallel_linear_cross_entropy

F64 = torch.float64
CLASS_WEIGHT = [1.0, -1.0, 2.0, -2.0, 0.5, -0.5]  # each target pair sums to 0
CASES = {"signed weights": dict(ignored=False), "signed weights, an ignored row":
         dict(ignored=True)}


def _inputs(ignored):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(5, 3, generator=g, dtype=F64)
    w = torch.randn(6, 3, generator=g, dtype=F64)
    # weights 1, -1, 2, -2: the counted sum is 0 (the fifth row is ignored or class 4, 0.5)
    y = torch.tensor([0, 1, 2, 3, -100 if ignored else 4])
    weight = torch.tensor([*CLASS_WEIGHT[:4], 0.5 if ignored else 0.0, -0.5], dtype=F64)
    return x, w, y, weight


def _torch_grads(case):
    x, w, y, weight = (t.clone() for t in _inputs(case["ignored"]))
    x.requires_grad_(), w.requires_grad_()
    F.cross_entropy(x @ w.t(), y, weight).backward()
    return x.grad, w.grad


def _rank(rank, world, name):
    case = CASES[name]
    x, w, y, weight = _inputs(case["ignored"])
    rows = 6 // world
    local_w = w[rank * rows:(rank + 1) * rows].clone().requires_grad_()
    x = x.clone().requires_grad_()
    vocab_parallel_linear_cross_entropy(x, local_w, y, weight=weight[rank * rows:(rank + 1) * rows],
                                        backend="rowblock").backward()
    dx, dw = _torch_grads(case)
    torch.testing.assert_close(x.grad, dx, equal_nan=True, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(local_w.grad, dw[rank * rows:(rank + 1) * rows],
                               equal_nan=True, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("name", list(CASES))
def test_infinite_mean_scale_gives_torchs_nan_and_inf(name, world):
    dx, _ = _torch_grads(CASES[name])
    assert dx[:4].isnan().all()  # the case is the one meant (an ignored row's is 0)
    if world == 1:
        _rank(0, 1, name)
    else:
        run_group(_rank, world, name, timeout=60)
