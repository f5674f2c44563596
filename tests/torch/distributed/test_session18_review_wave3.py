"""Review wave 3 (H55, session 18) of the fixes of commit 3e3769f (review waves 1-2 and H53's
distributed combination fuzz), on 2 and 3 gloo ranks and in this process.

Passing tests pin the fixes (one exception type on every rank, whatever mix of
``InputError`` / ``UnsupportedError`` the ranks note; meta tensors noted, no hang;
``global_num_items`` agreeing on ``ignore_index`` in every spelling; a rank with no classes
or no rows; the linear head's skip of ignored rows only where the weight and bias are
finite). The 6 bugs it found in those fixes were ``xfail(strict=True)`` tests written as
they should pass, and are fixed.

Cases of one world size share one group (``run_group``; each rank records its outcome and
the ranks compare them with ``all_gather_object``); a case that leaves one rank outside a
collective gets a group of its own, where the failing rank exits at once (its peers then
fail on the closed connection instead of waiting for gloo's timeout).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from dist_harness import outcome, run_group

import crossent.torch as xt
from crossent.errors import InputError, UnsupportedError
from crossent.torch.distributed import (
    global_num_items,
    vocab_parallel_cross_entropy,
    vocab_parallel_linear_cross_entropy,
)

pytestmark = pytest.mark.timeout(60)

_OURS = (InputError, UnsupportedError)


def _same_everywhere(name: str, here: str, world: int, expected: str | None = None) -> None:
    seen: list = [None] * world
    dist.all_gather_object(seen, here)
    assert len(set(seen)) == 1 and not seen[0].startswith("OTHER"), (name, seen)
    if expected is not None:
        assert seen[0] == expected, (name, seen)


def _gathered(t: torch.Tensor, world: int, dim: int) -> torch.Tensor:
    """The ranks' slices of ``t`` (equal sizes) concatenated along ``dim``."""
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, dim)


# ------------------------------------------------------------ one group per world size ----

def _kinds_and_meta(rank: int, world: int) -> None:
    """Item 1: every mix of a rank-local InputError and UnsupportedError, and every meta
    tensor argument, raises one type on every rank (the first bad rank's)."""
    torch.manual_seed(0)
    V = 3
    z, x, w, b = torch.randn(4, V), torch.randn(4, 5), torch.randn(V, 5), torch.randn(V)
    y = torch.tensor([0, 1, 2, 5]) % (V * world)
    meta = torch.device("meta")

    def ce(**kw):
        args = dict(local_logits=z, target=y) | kw
        return lambda: vocab_parallel_cross_entropy(**args)

    def lin(**kw):
        args = dict(input=x, local_weight=w, target=y) | kw
        return lambda: vocab_parallel_linear_cross_entropy(**args)

    bad_input, bad_feature = dict(target=y[:2]), dict(backend="native")
    cases = []
    for make, fname in ((ce, "ce"), (lin, "lin")):
        for a in range(world):
            for c in range(world):
                if a != c:  # the lower rank's kind wins
                    cases.append((f"{fname} InputError@{a} UnsupportedError@{c}", make,
                                  {a: bad_input, c: bad_feature},
                                  "InputError" if a < c else "UnsupportedError"))
        cases.append((f"{fname} both kinds on rank 1", make,
                      {1: bad_feature | dict(target=y[:2])}, None))
        cases += [
            (f"{fname} meta target@1", make, {1: dict(target=y.to(meta))}, None),
            (f"{fname} meta target everywhere", make,
             {r: dict(target=y.to(meta)) for r in range(world)}, None),
            (f"{fname} meta class weight@0", make, {0: dict(weight=torch.ones(V, device=meta))},
             None),
            (f"{fname} meta ignore_index@0", make,
             {0: dict(ignore_index=torch.tensor(1, device=meta))}, None),
            (f"{fname} meta vocab_start@1", make,
             {r: dict(vocab_start=torch.tensor(r * V, device=meta) if r == 1 else r * V)
              for r in range(world)}, None),
            (f"{fname} meta label_smoothing@1", make,
             {1: dict(label_smoothing=torch.tensor(0.1, device=meta))}, None),
        ]
    cases += [
        ("ce meta logits@0", ce, {0: dict(local_logits=z.to(meta))}, None),
        ("ce meta logits and target@0", ce, {0: dict(local_logits=z.to(meta), target=y.to(meta))},
         None),
        ("ce meta logits everywhere", ce, {r: dict(local_logits=z.to(meta)) for r in range(world)},
         None),
        ("ce meta logits@1, bad target@0", ce,
         {0: dict(target=y[:1]), 1: dict(local_logits=z.to(meta))}, "InputError"),
        ("lin meta input@0", lin, {0: dict(input=x.to(meta))}, None),
        ("lin meta weight@1", lin, {1: dict(local_weight=w.to(meta))}, None),
        ("lin meta bias@1", lin, {1: dict(local_bias=b.to(meta))}, None),
        ("lin meta bias everywhere", lin, {r: dict(local_bias=b.to(meta)) for r in range(world)},
         None),
        ("lin all meta@0", lin, {0: dict(input=x.to(meta), local_weight=w.to(meta),
                                         target=y.to(meta))}, None),
    ]
    # a meta tensor's kind (InputError or UnsupportedError) is the code's choice; one kind
    # on every rank, and no hang, is the contract
    for name, make, per_rank, expected in cases:
        _same_everywhere(name, outcome(make(**per_rank.get(rank, {}))), world, expected)
    # the group is still usable: a valid call returns torch's loss
    full = _gathered(z, world, 1)
    got = vocab_parallel_cross_entropy(z, y)
    torch.testing.assert_close(got, F.cross_entropy(full, y))


def _global_counts(rank: int, world: int) -> None:
    """Item 2: ``global_num_items``'s table with every ``ignore_index`` spelling, bad values
    on one rank, lists and narrow targets; the count is torch's (``!= ignore_index`` over
    every rank's targets)."""
    y = torch.tensor([0, 1, -100, 3, 255]) + rank  # differs by rank: the sum is checked
    meta = torch.device("meta")

    def torch_count(targets, ii):
        return sum(int((t.to(torch.int64) != ii).sum()) for t in targets)

    returned = [
        ("np.int64", dict(ignore_index=np.int64(-100)), [y], -100),
        ("0-d tensor", dict(ignore_index=torch.tensor(-100)), [y], -100),
        ("mixed spellings", dict(ignore_index=[np.int64(3), torch.tensor(3), 3][rank % 3]), [y], 3),
        ("int64 max", dict(ignore_index=2**63 - 1), [y], 2**63 - 1),
        ("int64 min", dict(ignore_index=-(2**63)), [y], -(2**63)),
        ("uint8 target", dict(ignore_index=255), [y.to(torch.uint8)], 255),
        ("uint8 target, -100", dict(), [torch.tensor([156, 1], dtype=torch.uint8)], -100),
        ("list", dict(), [y, y[:2], y.to(torch.int32)], -100),
    ]
    for name, kw, targets, ii in returned:
        given = targets[0] if len(targets) == 1 else list(targets)
        count = global_num_items(given, **kw)
        assert count.dtype == torch.int64 and count.dim() == 0, name
        counts = [None] * world
        dist.all_gather_object(counts, torch_count(targets, ii))
        assert int(count) == sum(counts), (name, int(count), counts)
    raised = [
        ("ignore_index past int64@1", {1: dict(ignore_index=2**63)}),
        ("float ignore_index@0", {0: dict(ignore_index=3.0)}),
        ("bool tensor ignore_index@1", {1: dict(ignore_index=torch.tensor(True))}),
        ("text ignore_index@1", {1: dict(ignore_index="3")}),
        ("float tensor ignore_index@0", {0: dict(ignore_index=torch.tensor(3.0))}),
        ("meta ignore_index@0", {0: dict(ignore_index=torch.tensor(3, device=meta))}),
        ("ignore_index differs@0", {0: dict(ignore_index=3)}),
        ("ignore_index -100 vs its int64 wrap", {0: dict(ignore_index=156)}),
        ("meta target@1", {1: dict(target=y.to(meta))}),
        ("meta target everywhere", {r: dict(target=y.to(meta)) for r in range(world)}),
        ("meta second target@0", {0: dict(target=[y, y.to(meta)])}),
        ("empty list@1", {1: dict(target=[])}),
        ("float target@1", {1: dict(target=y.float())}),
        ("not a list@0", {0: dict(target=3)}),
    ]
    for name, per_rank in raised:
        kw = dict(target=y) | per_rank.get(rank, {})
        _same_everywhere(name, outcome(lambda kw=kw: global_num_items(**kw)), world, "InputError")
    assert int(global_num_items(y)) == sum(torch_count([y + r - rank], -100) for r in range(world))


def _empty_slices(rank: int, world: int) -> None:
    """Item 3: a rank with no classes (uneven split) and a batch with no rows, in both
    vocab-parallel functions: forward, backward twice (retain_graph), a softcap of the
    caller's own before the loss (an op that saved the logits), double backward refused or
    computed on every rank alike; gradients torch's."""
    torch.manual_seed(1)
    sizes = [3] + [0] * (world - 2) + [2]  # rank 0: 3 classes, the last: 2, the rest: none
    V, D, N = sum(sizes), 4, 5
    start = sum(sizes[:rank])
    full = torch.randn(N, V, dtype=torch.float64)
    y = torch.tensor([0, 4, -100, 2, 3])
    for rows in (N, 0):
        z = full[:rows, start:start + sizes[rank]].clone().requires_grad_()
        capped = 3.0 * torch.tanh(z / 3.0)  # tanh saves its output: an in-place write shows
        loss = vocab_parallel_cross_entropy(capped, y[:rows], vocab_start=start)
        ref_z = full[:rows].clone().requires_grad_()
        ref = F.cross_entropy(3.0 * torch.tanh(ref_z / 3.0), y[:rows])
        torch.testing.assert_close(loss, ref, equal_nan=True)
        ref.backward()
        for _ in range(2):  # twice: the saved logits were left alone
            z.grad = None
            loss.backward(retain_graph=True)
            torch.testing.assert_close(z.grad, ref_z.grad[:, start:start + sizes[rank]],
                                       equal_nan=True)
        loss2 = vocab_parallel_cross_entropy(z, y[:rows], vocab_start=start)
        here = outcome(lambda loss2=loss2, z=z: torch.autograd.grad(
            loss2, z, create_graph=True)[0].sum().backward())
        _same_everywhere(f"double backward, {rows} rows", here, world)
    # the linear head: a rank with a (0, D) weight slice and a (0,) bias
    x = torch.randn(N, D, dtype=torch.float64, requires_grad=True)
    W = torch.randn(V, D, dtype=torch.float64)
    B = torch.randn(V, dtype=torch.float64)
    w = W[start:start + sizes[rank]].clone().requires_grad_()
    b = B[start:start + sizes[rank]].clone().requires_grad_()
    loss = vocab_parallel_linear_cross_entropy(x, w, y, local_bias=b, vocab_start=start,
                                              chunk_size=2)
    rx, rW, rB = (t.clone().requires_grad_() for t in (x.detach(), W, B))
    ref = F.cross_entropy(F.linear(rx, rW, rB), y)
    torch.testing.assert_close(loss, ref)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(x.grad, rx.grad)  # reduce_input_grad: the full dx
    torch.testing.assert_close(w.grad, rW.grad[start:start + sizes[rank]])
    torch.testing.assert_close(b.grad, rB.grad[start:start + sizes[rank]])


def _count_spellings(rank: int, world: int) -> None:
    """Item 5: one count spelled as an int, a float, a NumPy integer or a 0-d tensor on
    different ranks agrees (as before the int counts) and divides as torch's ``sum / n``
    on every rank; counts that differ are refused on every rank."""
    torch.manual_seed(2)
    full = torch.randn(4, 2 * world, dtype=torch.float64)
    y = torch.tensor([0, 1, -100, 3])
    z = full[:, 2 * rank:2 * rank + 2]
    total = F.cross_entropy(full, y, reduction="sum")
    spellings = [4, 4.0, np.int64(4), torch.tensor(4), torch.tensor(4.0, dtype=torch.float64)]
    for n, given in ((4, spellings[rank % len(spellings)]),
                     (4, spellings[(rank + 2) % len(spellings)]),
                     (2**64 - 1, 2**64 - 1),
                     (float(2**64 + 5), [2**64 + 5, float(2**64 + 5)][rank % 2])):
        loss = vocab_parallel_cross_entropy(z, y, reduction="sum", num_items=given)
        torch.testing.assert_close(loss, total / n)
    for per_rank in ({0: 5}, {1: 4.5}, {world - 1: torch.tensor(3)}):
        given = per_rank.get(rank, 4)
        _same_everywhere(f"num_items {per_rank}", outcome(
            lambda given=given: vocab_parallel_cross_entropy(z, y, reduction="sum",
                                                             num_items=given)),
            world, "InputError")


def _all_cases(rank: int, world: int) -> None:
    _kinds_and_meta(rank, world)
    _count_spellings(rank, world)
    _global_counts(rank, world)
    _empty_slices(rank, world)


@pytest.mark.parametrize("world", [2, 3])
def test_fixes_hold_on_a_group(world):
    run_group(_all_cases, world, timeout=45)


# ------------------------------------------------------------------- bugs (own groups) ----

def _meta_num_items(rank: int, world: int) -> None:
    x, w = torch.randn(4, 5), torch.randn(3, 5)
    z = torch.randn(4, 3)
    y = torch.tensor([0, 1, 2, 5])
    count = torch.tensor(4.0, device="meta" if rank == 0 else "cpu")
    calls = {
        "cross_entropy": lambda: vocab_parallel_cross_entropy(z, y, reduction="sum",
                                                              num_items=count),
        "linear": lambda: vocab_parallel_linear_cross_entropy(x, w, y, reduction="sum",
                                                              num_items=count),
    }
    for name, call in calls.items():
        try:
            call()
        except _OURS as error:
            here = type(error).__name__
        # anything else (torch's NotImplementedError on rank 0) leaves this rank: its peers
        # fail on the closed connection at once rather than after gloo's timeout
        else:
            here = "returned"
        # InputError, as single-process crossent.torch (_rules.check_num_items) names it
        _same_everywhere(f"{name}: meta num_items@0", here, world, "InputError")


def test_meta_num_items_on_one_rank_raises_on_every_rank():
    run_group(_meta_num_items, 2, timeout=20)


def _batched_ignore_index(rank: int, world: int) -> None:
    from dist_harness import CollectiveCounter

    y = torch.tensor([0, 1, -100])
    with CollectiveCounter() as counter:
        try:
            if rank == 0:
                torch.func.vmap(lambda ii: global_num_items(y, ignore_index=ii))(
                    torch.tensor([-100, 1]))
            else:
                global_num_items(y)
        except _OURS as error:
            here = type(error).__name__
        else:
            here = "returned"
    # a rank that raised before the count's all-reduce left its peers waiting in it
    assert counter.take(), f"rank {rank} raised {here} before the collective"
    _same_everywhere("vmap-batched ignore_index@0", here, world)


def test_global_num_items_batched_ignore_index_on_one_rank_does_not_hang():
    run_group(_batched_ignore_index, 2, timeout=20)


_TIE = 2**54 + 2**30  # a float32 midpoint, exact in float64 (ulp 4 there)


def _int_and_float_counts(rank: int, world: int) -> None:
    torch.manual_seed(0)
    full = torch.randn(4, 2 * world)
    y = torch.tensor([0, 1, 2, 3])
    z = full[:, 2 * rank:2 * rank + 2]
    # the agreement compares float64 bits: int _TIE + 1, its float and int _TIE - 1 agree
    # (all round to _TIE in float64); float32 rounds them (once) to different numbers
    count = [_TIE + 1, float(_TIE + 1), _TIE - 1][rank % 3]
    here = outcome(lambda: vocab_parallel_cross_entropy(z, y, reduction="sum",
                                                        num_items=count))
    _same_everywhere("int / float num_items", here, world)
    if here == "returned":
        loss = vocab_parallel_cross_entropy(z, y, reduction="sum", num_items=count)
        losses = [None] * world
        dist.all_gather_object(losses, loss.item())
        assert len(set(losses)) == 1, losses  # one loss on every rank


def test_int_and_float_num_items_agree_on_one_loss():
    run_group(_int_and_float_counts, 3, timeout=20)


# --------------------------------------------------------------------- single process ----

def test_int_counts_round_once_as_torch():
    """Item 5: an int count divides as torch's ``sum / n`` (one rounding to float32), below
    2**63, in [2**63, 2**64) (uint64) and past 2**64 (a float); a float count as torch's
    ``sum / float``."""
    torch.manual_seed(0)
    z, y = torch.randn(4, 5), torch.tensor([0, 1, 2, -100])
    total = F.cross_entropy(z, y, reduction="sum")
    for n in (_TIE + 1, _TIE - 1, 2**63 + 2**40 + 1, 2**64 - 1):
        got = xt.cross_entropy(z, y, reduction="sum", num_items=n)
        assert torch.equal(got, total / n), n
        count = torch.tensor(n, dtype=torch.int64 if n < 2**63 else torch.uint64)
        got = xt.cross_entropy(z, y, reduction="sum", num_items=count)
        assert torch.equal(got, total / n), n
        got = xt.cross_entropy(z, y, reduction="sum", num_items=float(n))
        assert torch.equal(got, total / float(n)), n
    got = xt.cross_entropy(z, y, reduction="sum", num_items=2**64 + 5)
    assert torch.equal(got, total / float(2**64 + 5))
    assert torch.equal(xt.cross_entropy(z, y, reduction="sum", num_items=np.uint64(2**64 - 1)),
                       total / (2**64 - 1))


def _train_step(fn, x, w, b, y):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    b = None if b is None else b.clone().requires_grad_()
    loss = fn(x, w, b, y)
    loss.backward()
    return [loss.detach(), x.grad, w.grad] + ([] if b is None else [b.grad])


_INF, _NAN = math.inf, math.nan


@pytest.mark.parametrize("where,value", [("w", -_INF), ("w", _INF), ("w", _NAN), ("b", _INF),
                                         ("b", -_INF), ("b", _NAN), (None, 0.0)])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_head_ignored_rows_with_non_finite_weights_are_torch(where, value, reduction,
                                                                    monkeypatch):
    """Item 4: with a small chunk_size, dx, dW, db (and the loss) are torch's unfused
    ``F.cross_entropy(F.linear(x, W, b), y)``'s, NaN where torch's are (a -inf in W makes
    the ignored rows' ``dx = 0 x -inf`` NaN); finite weights still skip the ignored rows."""
    from crossent.torch import _linear

    torch.manual_seed(0)
    x = torch.randn(6, 4, dtype=torch.float64)
    w = torch.randn(5, 4, dtype=torch.float64)
    b = torch.randn(5, dtype=torch.float64)
    if where == "w":
        w[2, 1] = value
    elif where == "b":
        b[1] = value
    y = torch.tensor([0, -100, 2, -100, 4, 1])
    splits = []
    real = _linear.split_rows

    def spy(*args, **kwargs):
        got = real(*args, **kwargs)
        splits.append(got is not None)
        return got

    monkeypatch.setattr(_linear, "split_rows", spy)

    def ours(x, w, b, y):
        return xt.linear_cross_entropy(x, w, y, b, chunk_size=2, reduction=reduction).sum()

    def ref(x, w, b, y):
        return F.cross_entropy(F.linear(x, w, b), y, reduction=reduction).sum()

    for got, want in zip(_train_step(ours, x, w, b, y), _train_step(ref, x, w, b, y),
                         strict=True):
        torch.testing.assert_close(got, want, equal_nan=True)
    assert splits and all(s == (where is None) for s in splits), splits
    if where == "w" and value == -_INF:  # the case the fix is about: torch has NaN here
        assert torch.isnan(_train_step(ref, x, w, b, y)[1][1]).any()


def test_constant_ignore_index_under_vmap_still_works():
    """Item 6: a Python int or an unbatched 0-d tensor ``ignore_index`` under vmap (and
    vmap of grad) is torch's."""
    from torch.func import grad, vmap

    torch.manual_seed(0)
    X = torch.randn(3, 4, 5, dtype=torch.float64)
    Y = torch.tensor([[0, 1, 2, 3], [1, 1, 4, 3], [2, 0, 0, 2]])
    for ii in (2, torch.tensor(2)):
        def ours(x, y, ii=ii):
            return xt.cross_entropy(x, y, ignore_index=ii)

        def ref(x, y):
            return F.cross_entropy(x, y, ignore_index=2)

        torch.testing.assert_close(vmap(ours)(X, Y), vmap(ref)(X, Y))
        torch.testing.assert_close(vmap(grad(ours))(X, Y), vmap(grad(ref))(X, Y))
    with pytest.raises(UnsupportedError, match="ignore_index"):
        vmap(lambda x, y, ii: xt.cross_entropy(x, y, ignore_index=ii))(
            X, Y, torch.tensor([2, 1, 0]))
    with pytest.raises(InputError, match="ignore_index"):
        xt.cross_entropy(X[0], Y[0], ignore_index=torch.tensor(2, device="meta"))


@pytest.mark.parametrize("inner", ["grad", "jacrev"])
def test_batched_ignore_index_under_vmap_of_grad_is_refused_by_name(inner):
    from torch.func import vmap

    transform = getattr(torch.func, inner)
    X = torch.randn(3, 4, 5, dtype=torch.float64)
    Y = torch.tensor([[0, 1, 2, 3], [1, 1, 4, 3], [2, 0, 0, 2]])
    with pytest.raises(UnsupportedError, match="ignore_index"):
        vmap(transform(lambda x, y, ii: xt.cross_entropy(x, y, ignore_index=ii)))(
            X, Y, torch.tensor([2, 1, 0]))


def test_batched_chunk_size_under_vmap_is_refused_by_name():
    from torch.func import vmap

    X, W = torch.randn(3, 4, 5), torch.randn(6, 5)
    Y = torch.tensor([[0, 1, 2, 3], [1, 1, 4, 3], [2, 0, 5, 2]])
    with pytest.raises((UnsupportedError, InputError), match="chunk_size"):
        vmap(lambda x, y, c: xt.linear_cross_entropy(x, W, y, chunk_size=c))(
            X, Y, torch.tensor([1, 2, 3]))


@pytest.mark.parametrize("which", ["coin", "multiclass"])
def test_curves_take_a_list_of_tensors_that_require_grad(which):
    from crossent.teaching import curves

    p = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    if which == "coin":
        want = curves.coin_cross_entropy_curve([0.3, 0.7], n=5).series
        try:
            got = curves.coin_cross_entropy_curve([p, 1 - p], n=5).series
        except InputError:
            return  # refused by name: also the contract
        for key in want:
            np.testing.assert_allclose(got[key], want[key])
    else:
        want = curves.multiclass_breakdown(target=0, probs=[0.3, 0.7])
        try:
            got = curves.multiclass_breakdown(target=0, probs=[p, 1 - p])
        except InputError:
            return
        np.testing.assert_allclose(got.grad, want.grad)


def test_curves_take_a_tensor_that_requires_grad_in_its_dtype():
    """Item 7: a requires-grad tensor given whole is detached; a float16 distribution summing
    to 1 within float16's tolerance is taken (not float64's)."""
    from crossent.teaching import curves

    truth = torch.tensor([0.3, 0.7], dtype=torch.float64, requires_grad=True)
    got = curves.coin_cross_entropy_curve(truth, n=5).series
    want = curves.coin_cross_entropy_curve([0.3, 0.7], n=5).series
    for key in want:
        np.testing.assert_allclose(got[key], want[key])
    half = torch.tensor([0.1, 0.2, 0.7], dtype=torch.float16)  # sums to 1.000122 in float64
    assert abs(float(half.double().sum()) - 1.0) > 1e-4
    curves.multiclass_breakdown(target=half, probs=[0.2, 0.3, 0.5])
    with pytest.raises(InputError, match="sum to 1"):
        curves.multiclass_breakdown(target=torch.tensor([0.1, 0.2, 0.69], dtype=torch.float16),
                                    probs=[0.2, 0.3, 0.5])


def test_bench_load_is_a_plain_int():
    """Item 7: ``check_load`` (which ``run`` now keeps) returns a Python int for a NumPy or
    0-d tensor integer (JSON-serialisable); bools and floats are refused by name."""
    import json

    from crossent.torch import bench

    for value in (np.int64(0), torch.tensor(0), 0):
        got = bench.check_load(value)
        assert type(got) is int and json.dumps(got) == "0"
    for bad in (True, 1.0, -1, bench.max_load() + 1, "1"):
        with pytest.raises(InputError, match="--load"):
            bench.check_load(bad)
