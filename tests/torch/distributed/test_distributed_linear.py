"""vocab_parallel_linear_cross_entropy on 2 gloo processes against single-process
crossent.torch.linear_cross_entropy with the full output weight; its collective count and
bytes against the formulas of docs/scaling.md; num_items and gradient accumulation on a
2 x 2 (tensor x data parallel) group of 4 processes."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.distributed as dist
from dist_harness import CollectiveCounter, run_group

import crossent.torch as xt
from crossent.errors import InputError
from crossent.torch.distributed import global_num_items, vocab_parallel_linear_cross_entropy
from crossent.torch.distributed._common import FIELDS
from crossent.torch.distributed.costs import vocab_parallel_costs

pytestmark = pytest.mark.timeout(180)  # 2-4 processes on 2 shared cores

N, D = 10, 6


def close(got, want, dtype):
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(got, want, rtol=tol, atol=tol, equal_nan=True)


def expected_calls(n, chunk, k, itemsize, input_grad, world=2):
    """docs/scaling.md: forward the agreement SUM of world x F int64, then 2 ceil(N/B)
    all-reduces, MAX of B and SUM of k B; backward one SUM of N x D when the input gradient
    is reduced."""
    fwd = [("SUM", world * len(FIELDS))]
    for i in range(0, max(n, 1), chunk):
        b = min(chunk, n - i)
        fwd += [("MAX", b), ("SUM", k * b)]
    bwd = [("SUM", n * D)] if input_grad else []
    nbytes = 8 * world * len(FIELDS) + itemsize * (
        sum(c for _, c in fwd[1:]) + sum(c for _, c in bwd))
    return fwd, bwd, nbytes


class LogitsChunkSpy:
    """Records the shapes of the matmul outputs with V_r columns (the logits chunk)."""

    def __init__(self, cols):
        self.cols, self.peak = cols, 0

    def __enter__(self):
        self._mm, self._addmm = torch.mm, torch.addmm

        def mm(*a, out=None, **kw):
            if out is not None and out.dim() == 2 and out.shape[1] == self.cols:
                self.peak = max(self.peak, out.numel() * out.element_size())
            return self._mm(*a, out=out, **kw)

        def addmm(*a, out=None, **kw):
            if out is not None and out.dim() == 2 and out.shape[1] == self.cols:
                self.peak = max(self.peak, out.numel() * out.element_size())
            return self._addmm(*a, out=out, **kw)

        torch.mm, torch.addmm = mm, addmm
        return self

    def __exit__(self, *exc):
        torch.mm, torch.addmm = self._mm, self._addmm


def _check_linear(rank, world):
    g = torch.Generator().manual_seed(99)
    counter = CollectiveCounter()
    for sizes, dtype, chunk, bias, eps, zeta, weighted, reduction in itertools.product(
            ([4, 4], [3, 6]), (torch.float32, torch.float64), (3, 64), (False, True),
            (0.0, 0.1), (0.0, 0.01), (False, True), ("none", "sum", "mean")):
        if dtype == torch.float64 and (chunk == 64 or bias):
            continue
        num_classes = sum(sizes)
        lo = sum(sizes[:rank])
        hi = lo + sizes[rank]
        x = torch.randn(N, D, generator=g, dtype=dtype)
        w = torch.randn(num_classes, D, generator=g, dtype=dtype)
        b = torch.randn(num_classes, generator=g, dtype=dtype) if bias else None
        t = torch.randint(0, num_classes, (N,), generator=g)
        t[::3] = -100
        cw = torch.rand(num_classes, generator=g, dtype=dtype) + 0.5 if weighted else None
        go = (torch.randn(N, generator=g, dtype=dtype) if reduction == "none"
              else torch.tensor(0.6, dtype=dtype))
        ref_p = [p.clone().requires_grad_() if p is not None else None for p in (x, w, b)]
        ref = xt.linear_cross_entropy(ref_p[0], ref_p[1], t, ref_p[2], weight=cw,
                                      reduction=reduction, label_smoothing=eps, z_loss=zeta)
        ref.backward(go)
        p = [x.clone().requires_grad_(), w[lo:hi].clone().requires_grad_(),
             b[lo:hi].clone().requires_grad_() if bias else None]
        with counter, LogitsChunkSpy(hi - lo) as spy:
            out = vocab_parallel_linear_cross_entropy(
                p[0], p[1], t, local_bias=p[2], vocab_start=lo, weight=None if cw is None
                else cw[lo:hi], reduction=reduction, label_smoothing=eps, z_loss=zeta,
                chunk_size=chunk)
            fwd = counter.take()
            out.backward(go)
            bwd = counter.take()
        k = 2 + weighted + (eps > 0)
        want_fwd, want_bwd, nbytes = expected_calls(N, chunk, k, x.element_size(), True)
        assert [(op, n) for op, n, _ in fwd] == want_fwd
        assert [(op, n) for op, n, _ in bwd] == want_bwd
        assert sum(nb for *_, nb in fwd + bwd) == nbytes
        assert spy.peak == min(chunk, N) * (hi - lo) * x.element_size()
        assert len(fwd) == 1 + 2 * math.ceil(N / chunk)
        if sizes[0] == sizes[1]:  # the cost model of docs/scaling.md (even split)
            cost = vocab_parallel_costs(N, num_classes, world, hidden=D, chunk_size=chunk,
                                        itemsize=x.element_size(), weighted=weighted,
                                        label_smoothing=eps > 0)
            assert cost["all_reduces_forward"] == len(fwd)
            assert cost["all_reduces_backward"] == len(bwd)
            assert cost["payload_bytes"] == sum(nb for *_, nb in fwd + bwd)
            assert cost["logits_chunk_bytes"] == spy.peak
        close(out, ref, dtype)
        close(p[0].grad, ref_p[0].grad, dtype)
        close(p[1].grad, ref_p[1].grad[lo:hi], dtype)
        if bias:
            close(p[2].grad, ref_p[2].grad[lo:hi], dtype)
    # reduce_input_grad=False: each rank's partial G_r W_r; their sum is the gradient
    x = torch.randn(N, D, generator=g, requires_grad=True)
    w = torch.randn(8, D, generator=g)
    t = torch.randint(0, 8, (N,), generator=g)
    ref = xt.linear_cross_entropy(x, w, t)
    ref.backward()
    xr = x.detach().clone().requires_grad_()
    with counter:
        vocab_parallel_linear_cross_entropy(xr, w[4 * rank:4 * rank + 4], t,
                                            reduce_input_grad=False).backward()
        assert len(counter.take()) == 3
    partial = xr.grad.clone()
    dist.all_reduce(partial)
    close(partial, x.grad, torch.float32)


def test_linear_matches_single_process():
    """Every combination of options, chunk sizes 3 (several chunks) and 64 (one), with and
    without bias, even and uneven splits; gradients of the input, the local weight slice and
    the local bias; collective count, all-reduced bytes and peak logits-chunk bytes against
    the formulas."""
    run_group(_check_linear, 2)


def _check_accumulation(rank, world):
    """Tensor parallel 2 x data parallel 2; each data-parallel rank runs 2 micro-batches with
    very different numbers of ignored targets."""
    tp_groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    dp_groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    tp, dp = rank % 2, rank // 2
    tp_group, dp_group = tp_groups[dp], dp_groups[tp]
    g = torch.Generator().manual_seed(5)
    num_classes, mb = 8, 6
    w = torch.randn(num_classes, D, generator=g)
    xs = torch.randn(2, 2, mb, D, generator=g)  # [dp rank, micro-batch]
    ts = torch.randint(0, num_classes, (2, 2, mb), generator=g)
    ts[0, 0, 1:] = -100  # one counted target in this micro-batch, 6 in the others
    ts[1, 1, ::2] = -100
    full = xt.linear_cross_entropy(xs.reshape(-1, D), w.clone().requires_grad_(),
                                   ts.reshape(-1))
    w_ref = w.clone().requires_grad_()
    xt.linear_cross_entropy(xs.reshape(-1, D), w_ref, ts.reshape(-1)).backward()
    lo, hi = 4 * tp, 4 * tp + 4

    counter = CollectiveCounter()
    with counter:
        num_items = global_num_items(list(ts[dp]), group=dp_group)
        # each rank's count, problem flag and ignore_index
        assert [(op, n) for op, n, _ in counter.take()] == [
            ("SUM", 3 * dist.get_world_size(dp_group))]
    assert int(num_items) == int((ts != -100).sum())

    def accumulate(reduction, num_items=None):
        local = w[lo:hi].clone().requires_grad_()
        total = 0.0
        for k in range(2):
            loss = vocab_parallel_linear_cross_entropy(
                xs[dp, k], local, ts[dp, k], group=tp_group, reduction=reduction,
                num_items=num_items)
            if num_items is None:
                loss = loss / 4  # the usual mean of micro-batch means over 2 x 2
            loss.backward()
            total += loss.detach()
        grad = local.grad.clone()
        dist.all_reduce(grad, group=dp_group)  # summed over data-parallel ranks
        total = total.clone().reshape(1)
        dist.all_reduce(total, group=dp_group)
        return total[0], grad

    loss, grad = accumulate("sum", num_items)
    close(grad, w_ref.grad[lo:hi], torch.float32)
    close(loss, full.detach(), torch.float32)
    naive_loss, naive_grad = accumulate("mean")
    assert not torch.allclose(naive_grad, w_ref.grad[lo:hi], rtol=1e-2, atol=1e-3)
    assert abs(float(naive_loss) - float(full)) > 1e-2


def test_num_items_gives_the_full_batch_gradient_under_accumulation():
    """PITFALLS 11: the mean of micro-batch means differs from the full-batch mean when
    micro-batches hold different numbers of counted targets; reduction="sum" with
    num_items=global_num_items(...) gives exactly the full-batch loss and gradient."""
    run_group(_check_accumulation, 4)


def _check_inf_on_one_rank(rank, world):
    """An ignored row whose hidden state is inf on rank 0 only: the ranks hold different
    inputs, so every rank raises InputError together (nothing hangs); with the inf on every
    rank, the shared chunk loop makes the same collectives on every rank (no per-rank row
    skipping) and the call returns the loss torch gives for that input."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(N, D, generator=g)
    w = torch.randn(8, D, generator=g)
    t = torch.randint(0, 8, (N,), generator=g)
    t[2] = -100
    lo, hi = 4 * rank, 4 * rank + 4
    one = x.clone()
    if rank == 0:
        one[2] = math.inf
    with pytest.raises(InputError, match="input differs across the ranks"):
        vocab_parallel_linear_cross_entropy(one, w[lo:hi], t, vocab_start=lo, chunk_size=3)
    x[2] = math.inf
    xr = x.clone().requires_grad_()
    out = vocab_parallel_linear_cross_entropy(xr, w[lo:hi].clone().requires_grad_(), t,
                                              vocab_start=lo, chunk_size=3)
    out.backward()
    finite = x.clone()
    finite[2] = 0.0  # the ignored row contributes nothing to the loss
    xf = finite.clone().requires_grad_()
    ref = torch.nn.functional.cross_entropy(torch.nn.functional.linear(xf, w), t)
    ref.backward()
    close(out.detach(), ref.detach(), torch.float32)
    keep = torch.arange(N) != 2
    close(xr.grad[keep], xf.grad[keep], torch.float32)


def test_ignored_row_inf_on_one_rank_does_not_hang():
    run_group(_check_inf_on_one_rank, 2)


def _pattern(t):
    """NaN, sign and infinity pattern (what an infinite grad_output leaves comparable)."""
    return t.isnan(), t.nan_to_num(0.0, 1.0, -1.0).sign()


def _check_infinite_grad_output(rank, world):
    """torch's unfused head under an infinite scalar grad_output: NaN where ``inf - inf``
    meets in ``dlogits`` (the targets) and in what sums them, +-inf elsewhere; the
    vocab-parallel head recomputes that backward (no collective) and gives the same
    pattern for x, its W shard and its bias shard, for "mean" and "sum"; ranks whose
    grad_output differs (one infinite, one finite) still return."""
    g = torch.Generator().manual_seed(9)
    v = 3 * world
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    w = torch.randn(v, D, generator=g, dtype=torch.float64)
    b = torch.randn(v, generator=g, dtype=torch.float64)
    t = torch.randint(0, v, (N,), generator=g)
    t[1] = -100
    lo, hi = 3 * rank, 3 * rank + 3
    for reduction, value in itertools.product(("mean", "sum"), (math.inf, -math.inf)):
        ours = [x.clone().requires_grad_(), w[lo:hi].clone().requires_grad_(),
                b[lo:hi].clone().requires_grad_()]
        out = vocab_parallel_linear_cross_entropy(ours[0], ours[1], t, local_bias=ours[2],
                                                  vocab_start=lo, chunk_size=3,
                                                  reduction=reduction)
        out.backward(torch.tensor(value, dtype=torch.float64))
        ref = [x.clone().requires_grad_(), w.clone().requires_grad_(),
               b.clone().requires_grad_()]
        torch.nn.functional.cross_entropy(torch.nn.functional.linear(*ref), t,
                                          reduction=reduction).backward(
            torch.tensor(value, dtype=torch.float64))
        for got, want in zip(ours, (ref[0].grad, ref[1].grad[lo:hi], ref[2].grad[lo:hi]),
                             strict=True):
            for a, r in zip(_pattern(got.grad), _pattern(want), strict=True):
                assert torch.equal(a, r), (reduction, value, rank)
    xr = x.clone().requires_grad_()
    out = vocab_parallel_linear_cross_entropy(xr, w[lo:hi].clone().requires_grad_(), t,
                                              vocab_start=lo, chunk_size=3)
    out.backward(torch.tensor(math.inf if rank == 0 else 1.0, dtype=torch.float64))
    assert xr.grad is not None


@pytest.mark.parametrize("world", [2, 3])
def test_infinite_grad_output_gives_torchs_nan_pattern(world):
    run_group(_check_infinite_grad_output, world)
