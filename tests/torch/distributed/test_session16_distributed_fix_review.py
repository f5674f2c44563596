"""Adversarial review of session 16's distributed fixes (helper H39), on 2 and 3 gloo ranks
with the bad argument or the non-finite class weight on ONE rank only.

- vocab-parallel (``_common.Partials.fill``/``_finish``/``_weight_total``): a non-finite
  class weight in one rank's slice with label smoothing raises UnsupportedError on every
  rank (also ``+inf`` and ``-inf`` on two ranks, whose float sum is NaN); without smoothing
  the loss and every rank's gradient slice are torch's (float64, NaN-exact).
- uint64 class ids of ``2**63`` or more on one rank (``_common.check_target``) and
  ``global_num_items``'s argument checks (``accumulate._checked_targets``): every rank
  raises InputError together, no rank is left waiting, the group stays usable.

Each child checks its own outcome and compares it with every other rank's
(``all_gather_object``); a rank left in a collective fails with gloo's timeout error
(dist_harness.COLLECTIVE_TIMEOUT) and the launch is killed at the harness deadline.
References: ``torch.nn.functional.cross_entropy`` on the whole float64 logits.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from dist_harness import agree, outcome, run_group

import crossent.torch as xt
from crossent.errors import InputError
from crossent.torch.distributed import (
    accumulate,
    global_num_items,
    vocab_parallel_cross_entropy,
    vocab_parallel_linear_cross_entropy,
)

pytestmark = pytest.mark.timeout(120)

N, VR, D = 5, 3, 4  # rows, classes per rank, features
F64 = torch.float64


def _data(world):
    g = torch.Generator().manual_seed(7)  # the same on every rank
    full = torch.randn(N, VR * world, generator=g, dtype=F64)
    x = torch.randn(N, D, generator=g, dtype=F64)
    lin = torch.randn(VR * world, D, generator=g, dtype=F64)
    last = VR * (world - 1)
    # row 0 targets the last rank's first class (the non-finite weight below), row 1 rank
    # 0's, row 2 is ignored, rows 3 and 4 other classes of the last and the first rank
    t = torch.tensor([last, 1, -100, last + 2, 0])
    return full, x, lin, t


def _weights(world, bad, where):
    """Full class weights: ones, with ``bad`` at the last rank's first class (``where`` =
    "last"), or ``+inf`` on rank 0 and ``-inf`` on the last rank ("split")."""
    w = torch.ones(VR * world, dtype=F64)
    w[1] = 2.0
    if where == "last":
        w[VR * (world - 1)] = bad
    else:
        w[0], w[VR * (world - 1) + 1] = math.inf, -math.inf
    return w


def _same_nan(got, want, what):
    got, want = got.detach().double(), want.detach().double()
    assert got.shape == want.shape, what
    assert torch.equal(got.isnan(), want.isnan()), (what, got, want)
    torch.testing.assert_close(torch.nan_to_num(got, nan=0.0), torch.nan_to_num(want, nan=0.0),
                               rtol=1e-9, atol=1e-12, msg=what)


def _check_nonfinite_weight_smoothing_raises_together(rank, world):
    full, x, lin, t = _data(world)
    lo = VR * rank
    for bad, where in [(math.inf, "last"), (math.nan, "last"), (-math.inf, "last"),
                       (None, "split")]:
        w = _weights(world, bad, where)[lo:lo + VR]  # finite on every other rank
        for name, call in [
            ("vocab_parallel_cross_entropy", lambda w=w: vocab_parallel_cross_entropy(
                full[:, lo:lo + VR].clone().requires_grad_(), t, weight=w,
                label_smoothing=0.1)),
            ("vocab_parallel_linear_cross_entropy",
             lambda w=w: vocab_parallel_linear_cross_entropy(
                 x, lin[lo:lo + VR].clone().requires_grad_(), t, weight=w,
                 label_smoothing=0.1)),
        ]:
            agree(outcome(call), "UnsupportedError", (name, bad, where), world)
    # the group is still usable: a finite call on every rank returns torch's loss
    w = _weights(world, 3.0, "last")
    loss = vocab_parallel_cross_entropy(full[:, lo:lo + VR], t, weight=w[lo:lo + VR],
                                        label_smoothing=0.1)
    _same_nan(loss, F.cross_entropy(full, t, weight=w, label_smoothing=0.1), "after")


def _check_nonfinite_weight_without_smoothing_is_torchs(rank, world):
    full, x, lin, t = _data(world)
    lo = VR * rank
    for bad in (math.inf, math.nan):
        w = _weights(world, bad, "last")
        for reduction in ("none", "sum", "mean"):
            # torch's w_y (lse - z_y): inf (or NaN) on the row of that class, its
            # gradient row NaN; "mean" divides by an infinite (NaN) denominator
            ref = full.clone().requires_grad_()
            want = F.cross_entropy(ref, t, weight=w, reduction=reduction)
            (want_g,) = torch.autograd.grad(want.sum(), ref)
            mine = full[:, lo:lo + VR].clone().requires_grad_()
            got = vocab_parallel_cross_entropy(mine, t, weight=w[lo:lo + VR],
                                               reduction=reduction)
            (got_g,) = torch.autograd.grad(got.sum(), mine)
            what = (bad, reduction, rank)
            _same_nan(got, want, ("loss", *what))
            _same_nan(got_g, want_g[:, lo:lo + VR], ("grad", *what))
            # the linear head: dx (all-reduced) and this rank's dW slice
            xs, ls = x.clone().requires_grad_(), lin.clone().requires_grad_()
            want = F.cross_entropy(xs @ ls.T, t, weight=w, reduction=reduction)
            want_dx, want_dw = torch.autograd.grad(want.sum(), (xs, ls))
            xm, lm = x.clone().requires_grad_(), lin[lo:lo + VR].clone().requires_grad_()
            got = vocab_parallel_linear_cross_entropy(xm, lm, t, weight=w[lo:lo + VR],
                                                      reduction=reduction)
            got_dx, got_dw = torch.autograd.grad(got.sum(), (xm, lm))
            _same_nan(got, want, ("linear loss", *what))
            _same_nan(got_dx, want_dx, ("linear dx", *what))
            _same_nan(got_dw, want_dw[lo:lo + VR], ("linear dW", *what))


def _check_bad_argument_on_one_rank_raises_together(rank, world):
    last = world - 1
    full, _, _, t = _data(world)
    lo = VR * rank
    huge = torch.tensor([0, 2**63, 1, 2, 0], dtype=torch.uint64)  # wraps to int64's min
    wraps = torch.tensor([0, 2**64 - 100, 1, 2, 0], dtype=torch.uint64)  # wraps to -100
    fine = t.clamp(min=0).to(torch.uint64)
    for name, target in [("uint64 2**63", huge), ("uint64 wrapping to -100", wraps)]:
        mine = target if rank == last else fine
        agree(outcome(lambda mine=mine: vocab_parallel_cross_entropy(
            full[:, lo:lo + VR], mine)), "InputError", name, world)
    good = torch.tensor([1, -100, 2])  # 2 counted per rank
    bad_args = [
        ("uint64 2**63", dict(target=torch.tensor([2**63], dtype=torch.uint64))),
        ("float target", dict(target=torch.tensor([1.0, 2.0]))),
        ("bool target", dict(target=torch.tensor([True]))),
        ("ignore_index 1.5", dict(target=good, ignore_index=1.5)),
        ("ignore_index bool", dict(target=good, ignore_index=True)),
        ("empty list", dict(target=[])),
        ("a string inside", dict(target=[good, "x"])),
    ]
    for name, kw in bad_args:
        args = kw if rank == last else dict(target=good)
        agree(outcome(lambda args=args: global_num_items(**args)), "InputError", name, world)
    # the group is still usable and counts as before
    assert int(global_num_items(good)) == 2 * world
    assert int(global_num_items([good, torch.tensor([0], dtype=torch.uint8)])) == 3 * world


def _check_all(rank, world):
    """One launch per world size (a process start with torch costs seconds)."""
    _check_nonfinite_weight_smoothing_raises_together(rank, world)
    _check_nonfinite_weight_without_smoothing_is_torchs(rank, world)
    _check_bad_argument_on_one_rank_raises_together(rank, world)


@pytest.mark.parametrize("world", [2, 3])
def test_one_bad_rank_raises_together_and_nonfinite_weights_are_torchs(world):
    """Smoothing with a non-finite weight on one rank: UnsupportedError everywhere; without
    smoothing torch's loss and gradients; a bad target or ``global_num_items`` argument on
    one rank: InputError everywhere; the group usable afterwards."""
    run_group(_check_all, world, timeout=100)


def test_global_num_items_problem_flag_is_made_on_the_targets_device(monkeypatch):
    # the tensor handed to the all-reduce must sit where header_device puts it (the
    # target's device: CUDA for NCCL) on a bad rank as on a good one. (A meta target
    # stood in for CUDA until stop 18; a meta target is refused now and the bad rank
    # reads the table back, so header_device's answer is watched instead: a device
    # object of its own, equal to the CPU's.)
    seen, asked = [], []
    monkeypatch.setattr(accumulate.dist, "is_available", lambda: True)
    monkeypatch.setattr(accumulate.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(accumulate.dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(accumulate.dist, "get_rank", lambda group=None: 0)

    answer = torch.device("cpu", 0)  # an object of its own, told apart from "cpu" below
    zeros = torch.zeros

    def header_device(group, *tensors):
        asked.append([t.device.type for t in tensors])
        return answer

    def table_on(*shape, device=None, **kwargs):  # where the (world, 3) table is made
        if shape == ((2, 3),):
            seen.append(device)
        return zeros(*shape, device=device, **kwargs)

    def all_reduce(tensor, op=None, group=None):
        pass

    monkeypatch.setattr(accumulate.torch, "zeros", table_on)

    monkeypatch.setattr(accumulate, "header_device", header_device)
    monkeypatch.setattr(accumulate.dist, "all_reduce", all_reduce)
    target = torch.zeros(3, dtype=torch.int64)
    with pytest.raises(InputError, match="ignore_index"):
        global_num_items(target, ignore_index=1.5)
    assert asked == [["cpu"]] and seen == [answer]


@pytest.mark.parametrize("dtype,wrapped", [(torch.uint8, 156), (torch.uint16, 65436)])
def test_global_num_items_narrow_unsigned_targets_count_like_the_loss(dtype, wrapped):
    t = torch.tensor([wrapped, 1, 2], dtype=dtype)
    counted = int((t.to(torch.int64) != -100).sum())  # what the losses count: 3
    z = torch.randn(3, wrapped + 1, generator=torch.Generator().manual_seed(0), dtype=F64)
    total = xt.cross_entropy(z, t, reduction="sum")
    _same_nan(total / counted, F.cross_entropy(z, t.to(torch.int64)), "the loss counts 3")
    assert int(global_num_items(t)) == counted
