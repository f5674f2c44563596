"""vocab_parallel_cross_entropy on 2 and 4 gloo processes against single-process
crossent.torch.cross_entropy on the concatenated logits (loss and each rank's gradient)."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.distributed as dist
from dist_harness import CollectiveCounter, run_group

import crossent.torch as xt
from crossent.errors import InputError
from crossent.torch.distributed import vocab_parallel_cross_entropy
from crossent.torch.distributed._common import FIELDS

pytestmark = pytest.mark.timeout(180)  # 2-4 processes on 2 shared cores

N = 12
TOL = {torch.float32: 1e-6, torch.float64: 1e-12}


def close(got, want, dtype):
    tol = TOL[dtype]
    torch.testing.assert_close(got, want, rtol=tol, atol=tol, equal_nan=True)


def targets(kind, starts, sizes, g):
    num_classes = sum(sizes)
    if kind == "mixed":  # random, with ignored rows
        t = torch.randint(0, num_classes, (N,), generator=g)
        t[::4] = -100
    elif kind == "last_slice":  # every target on the last non-empty slice: others own none
        r = max(i for i, s in enumerate(sizes) if s)
        t = torch.randint(starts[r], starts[r] + sizes[r], (N,), generator=g)
        t[1] = -100
    else:  # "all_ignored": "mean" is NaN (0/0), as in PyTorch
        t = torch.full((N,), -100)
    return t


def _check_matches(rank, world, splits, dtypes, kinds):
    counter = CollectiveCounter()
    g = torch.Generator().manual_seed(1234)  # same stream on every rank
    calls = 0
    with counter:
        for sizes, explicit, dtype, kind in itertools.product(
                splits, (False, True), dtypes, kinds):
            if not explicit and len(set(sizes)) > 1:
                continue
            starts = [sum(sizes[:r]) for r in range(world)]
            lo, hi = starts[rank], starts[rank] + sizes[rank]
            for eps, zeta, weighted, reduction in itertools.product(
                    (0.0, 0.1), (0.0, 0.01), (False, True), ("none", "sum", "mean")):
                full = torch.randn(N, sum(sizes), generator=g, dtype=dtype) * 3
                t = targets(kind, starts, sizes, g)
                w = torch.rand(sum(sizes), generator=g, dtype=dtype) + 0.5 if weighted else None
                ref_in = full.clone().requires_grad_()
                ref = xt.cross_entropy(ref_in, t, w, reduction=reduction, label_smoothing=eps,
                                       z_loss=zeta)
                go = (torch.randn(N, generator=g, dtype=dtype) if reduction == "none"
                      else torch.tensor(1.7, dtype=dtype))
                ref.backward(go)
                local = full[:, lo:hi].clone().requires_grad_()
                out = vocab_parallel_cross_entropy(
                    local, t, vocab_start=lo if explicit else None, label_smoothing=eps,
                    z_loss=zeta, weight=None if w is None else w[lo:hi], reduction=reduction)
                fwd = counter.take()
                k = 2 + weighted + (eps > 0)
                assert [(op, n) for op, n, _ in fwd] == [
                    ("SUM", world * len(FIELDS)), ("MAX", N), ("SUM", k * N)]
                out.backward(go)
                assert counter.take() == [], "backward must not communicate"
                close(out, ref, dtype)
                want = ref_in.grad[:, lo:hi]
                if kind == "all_ignored":  # PyTorch's F.cross_entropy: NaN loss, zero gradient
                    want = torch.zeros_like(want)
                close(local.grad, want, dtype)
                calls += 1
        # (N, T, V_r) logits, class dimension last; and the no-grad path
        sizes = splits[0]
        lo = sum(sizes[:rank])
        full = torch.randn(3, 4, sum(sizes), generator=g)
        t = torch.randint(0, sum(sizes), (3, 4), generator=g)
        got = vocab_parallel_cross_entropy(full[..., lo:lo + sizes[rank]], t, vocab_start=lo,
                                           reduction="none")
        want = xt.cross_entropy(full.movedim(-1, 1), t, reduction="none")
        close(got, want, torch.float32)
        counter.take()
    assert calls > 0


ALL_KINDS = ("mixed", "last_slice", "all_ignored")


@pytest.mark.parametrize("world, splits, dtypes, kinds", [
    (2, [[5, 5], [3, 8]], (torch.float32, torch.float64), ALL_KINDS),
    # uneven, one rank with no classes at all; fewer cases: 4 processes share 2 CPU cores
    (4, [[2, 7, 0, 4], [3, 3, 3, 3]], (torch.float32,), ("last_slice",)),
], ids=["2ranks", "4ranks"])
def test_matches_single_process(world, splits, dtypes, kinds):
    """Every combination of label smoothing, z-loss, class weights and reduction, on even
    and uneven splits, with ignored rows, a rank owning none of the targets, and all rows
    ignored; a random grad_output for "none" and 1.7 for "sum"/"mean". Each call makes
    exactly the agreement all_reduce(SUM) of world x F int64, one all_reduce(MAX) of N and
    one all_reduce(SUM) of k N values (k = 2 + [weight] + [eps > 0]) and its backward none."""
    run_group(_check_matches, world, splits, dtypes, kinds)


def _check_errors(rank, world):
    """Bad input on one rank raises InputError on every rank, and the group stays usable."""
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(N, 4, generator=g, requires_grad=True)
    good = torch.randint(0, 4 * world, (N,), generator=g)
    cases = {
        "differs across": (good + (rank == 1)) % (4 * world),  # targets disagree between ranks
        "different numbers of classes": None,  # uneven split without vocab_start
        "weight has shape": None,  # a wrong weight slice on rank 0 only
        "overlap": None,  # explicit starts that overlap
    }
    for message in cases:
        kwargs = {}
        x, t = logits, good
        if message == "differs across":
            t = cases[message]
        elif message == "different numbers of classes":
            x = logits if rank else logits[:, :3]
        elif message == "weight has shape":
            kwargs["weight"] = torch.ones(3 if rank == 0 else 4)
        else:
            kwargs["vocab_start"] = 0 if rank == 0 else 2 + 4 * (rank - 1)
            t = good.clamp(max=4 * world - 3)
        if message == "weight has shape" and rank:
            message = "rank 0 of the group reported invalid input"
        with pytest.raises(InputError, match=message):
            vocab_parallel_cross_entropy(x, t, **kwargs)
    loss = vocab_parallel_cross_entropy(logits, good)  # the group still works
    assert torch.isfinite(loss)
    # finally the error the parent must see: a class id >= V on rank 1 only
    bad = good.clone()
    if rank == 1:
        bad[3] = 4 * world + 5
    vocab_parallel_cross_entropy(logits, bad)
    dist.barrier()  # never reached


def test_bad_target_on_one_rank_is_a_clear_error_not_a_hang():
    with pytest.raises(mp_error(), match="target differs across the ranks"):
        run_group(_check_errors, 2)


def mp_error():
    import torch.multiprocessing as mp

    return mp.ProcessRaisedException


def test_cost_model_matches_the_counted_payload():
    """The bytes the counting wrapper sees in _check_matches are the cost model's."""
    from crossent.torch.distributed.costs import vocab_parallel_costs

    for weighted, smoothing, itemsize in [(False, False, 4), (True, True, 8)]:
        k = 2 + weighted + smoothing
        cost = vocab_parallel_costs(N, 10, 2, itemsize=itemsize, weighted=weighted,
                                    label_smoothing=smoothing)
        assert cost["payload_bytes"] == 8 * 2 * len(FIELDS) + itemsize * (N + k * N)
        assert cost["all_reduces_forward"] == 3 and cost["all_reduces_backward"] == 0


def _check_zero_total_weight(rank, world):
    """Every counted target's class weight 0 (a pad class of weight 0 and a batch of padding),
    each rank holding a vocabulary slice: "mean" is torch's on every rank, NaN with label
    smoothing (torch's unsmoothed part is 0/0: crossent.torch._rules.reduce_rows, shared with
    the single-process kernels), NaN without; the logits' gradient NaN on the counted rows
    and 0 on the ignored one, as torch's."""
    v = 3 * world
    g = torch.Generator().manual_seed(11)
    z = torch.randn(5, v, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 0, 4, -100, 4])
    w = torch.rand(v, generator=g, dtype=torch.float64) + 0.5
    w[0] = w[4] = 0.0
    lo, hi = 3 * rank, 3 * (rank + 1)
    for eps in (0.0, 0.1):
        ref = z.clone().requires_grad_()
        want = torch.nn.functional.cross_entropy(ref, y, w, label_smoothing=eps)
        want.backward()
        local = z[:, lo:hi].clone().requires_grad_()
        got = vocab_parallel_cross_entropy(local, y, vocab_start=lo, weight=w[lo:hi],
                                           label_smoothing=eps)
        got.backward()
        assert want.isnan() and got.isnan(), (rank, eps, got, want)
        assert torch.equal(local.grad.isnan(), ref.grad[:, lo:hi].isnan()), (rank, eps)
        assert not local.grad[3].any()  # the ignored row


@pytest.mark.parametrize("world", [2, 3])
def test_zero_total_class_weight_is_torchs_nan_on_every_rank(world):
    run_group(_check_zero_total_weight, world, timeout=120)
