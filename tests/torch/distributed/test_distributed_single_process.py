"""The vocab-parallel functions without torch.distributed initialized (world = 1) and their
argument checks: fast, no processes spawned."""

from __future__ import annotations

import pytest
import torch
from dist_harness import run_group

import crossent.torch as xt
from crossent.torch.distributed import (
    global_num_items,
    vocab_parallel_cross_entropy,
    vocab_parallel_linear_cross_entropy,
)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_is_computed_in_float32(dtype):
    g = torch.Generator().manual_seed(0)
    full = torch.randn(16, 50, generator=g) * 4
    t = torch.randint(0, 50, (16,), generator=g)
    t[3] = -100
    low = full.to(dtype)
    a = low.clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(a, t, label_smoothing=0.1, z_loss=1e-3)
    loss.backward()
    ref_in = low.float().requires_grad_()  # float32 on the same (rounded) logits
    ref = xt.cross_entropy(ref_in, t, label_smoothing=0.1, z_loss=1e-3)
    ref.backward()
    assert loss.dtype == dtype and a.grad.dtype == dtype
    torch.testing.assert_close(loss, ref.to(dtype))
    torch.testing.assert_close(a.grad, ref_in.grad.to(dtype))  # rounded once, from float32


def test_no_grad_and_options_single_process():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(7, 9, generator=g)
    t = torch.randint(0, 9, (7,), generator=g)
    w = torch.rand(9, generator=g)
    with torch.no_grad():
        got = vocab_parallel_cross_entropy(x, t, weight=w, reduction="sum", num_items=5)
    want = xt.cross_entropy(x, t, w, reduction="sum") / 5
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_argument_errors():
    x, t = torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    with pytest.raises(ValueError, match="reduction"):
        vocab_parallel_cross_entropy(x, t, reduction="avg")
    with pytest.raises(ValueError, match="num_items"):
        vocab_parallel_cross_entropy(x, t, reduction="mean", num_items=3)
    with pytest.raises(ValueError, match="label_smoothing"):
        vocab_parallel_cross_entropy(x, t, label_smoothing=1.5)
    with pytest.raises(ValueError, match=r"class index 5, outside \[0, 5\)"):
        vocab_parallel_cross_entropy(x, torch.tensor([0, 1, 2, 5]))
    with pytest.raises(ValueError, match="class index -3"):
        vocab_parallel_cross_entropy(x, torch.tensor([0, 1, 2, -3]))
    with pytest.raises(ValueError, match="weight has shape"):
        vocab_parallel_cross_entropy(x, t, weight=torch.ones(4))
    with pytest.raises(ValueError, match="target has 3 entries"):
        vocab_parallel_cross_entropy(x, t[:3])
    with pytest.raises(ValueError, match="target has shape"):
        vocab_parallel_cross_entropy(x, t.reshape(2, 2))
    with pytest.raises(ValueError, match="integer class ids"):
        vocab_parallel_cross_entropy(x, t.float())
    with pytest.raises(ValueError, match="start at 0"):
        vocab_parallel_cross_entropy(x, t, vocab_start=2)
    with pytest.raises(ValueError, match="chunk_size"):
        vocab_parallel_linear_cross_entropy(x, torch.randn(6, 5), t, chunk_size=0)
    with pytest.raises(ValueError, match="not initialized"):
        global_num_items(t, group=object())


def test_linear_backward_twice_raises():
    x = torch.randn(4, 3, requires_grad=True)
    loss = vocab_parallel_linear_cross_entropy(x, torch.randn(5, 3), torch.tensor([0, 1, 2, 3]))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def test_global_num_items_local():
    assert int(global_num_items(torch.tensor([[1, -100], [2, 3]]))) == 3
    assert int(global_num_items([torch.tensor([-1, 0]), torch.tensor([4])],
                                ignore_index=-1)) == 2


def _sleep_forever(rank, world):
    import time

    time.sleep(3600)


def test_harness_kills_a_hung_group_and_fails_clearly():
    """A child that never returns (as a rank stuck in a collective would) is killed at the
    deadline and the test fails with TimeoutError instead of hanging CI."""
    with pytest.raises(TimeoutError, match="did not finish"):
        run_group(_sleep_forever, 2, timeout=4)


def test_scaling_doc_shows_the_cost_table_the_code_prints():
    from pathlib import Path

    from crossent.torch.distributed import costs

    doc = (Path(__file__).resolve().parents[3] / "docs" / "scaling.md").read_text()
    rows = [r for r in costs.table().splitlines() if r.startswith("|")]
    assert len(rows) > 5
    for row in rows:
        assert row in doc, row
