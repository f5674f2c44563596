"""Cross-rank agreement: every option differing across 2 and 3 gloo ranks raises the same
crossent.InputError on every rank at once (no abort, no hang, the group still usable);
adversarial targets and slice layouts cannot pass the checks; NaN on any rank makes the
loss NaN on every rank; the default chunk of an uneven split is the same on every rank.

Many cases run in one launch per world size (process start-up with torch costs seconds).
Each child compares its outcome with every other rank's (all_gather_object), so a rank that
raised something else, or nothing, fails the test. A rank left waiting in a collective
would raise gloo's timeout error after dist_harness.COLLECTIVE_TIMEOUT seconds (not an
InputError: the test fails), and the whole launch is killed at the harness deadline.
References: single-process crossent.torch in float64.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.distributed as dist
from dist_harness import run_group

import crossent.torch as xt
from crossent.errors import InputError
from crossent.torch.distributed import (
    vocab_parallel_cross_entropy,
    vocab_parallel_linear_cross_entropy,
)

pytestmark = pytest.mark.timeout(180)

N, VR, D = 6, 3, 4  # rows, classes per rank, features


def _data(world):
    g = torch.Generator().manual_seed(11)  # the same on every rank
    full = torch.randn(N, VR * world, generator=g, dtype=torch.float64) * 2
    t = torch.randint(0, VR * world, (N,), generator=g)
    t[2] = -100
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    w = torch.randn(VR * world, D, generator=g, dtype=torch.float64)
    return full, t, x, w


def _call(rank, world, kind="ce", **kw):
    """One call with the base arguments, ``kw`` overriding them on this rank."""
    full, t, x, w = _data(world)
    lo = VR * rank
    if kind == "ce":
        args = dict(local_logits=full[:, lo:lo + VR], target=t)
        args.update(kw)
        return vocab_parallel_cross_entropy(args.pop("local_logits"), args.pop("target"),
                                            **args)
    args = dict(input=x, local_weight=w[lo:lo + VR], target=t)
    args.update(kw)
    return vocab_parallel_linear_cross_entropy(args.pop("input"), args.pop("local_weight"),
                                               args.pop("target"), **args)


def _swapped(t):  # same multiset, same sum, different order
    t = t.clone()
    t[0], t[1] = t[1].clone(), t[0].clone()
    return t


def _nudged(x, at):  # the next float64 above one element: a difference of one ulp
    x = x.clone()
    x[at] = torch.nextafter(x[at], torch.tensor(math.inf, dtype=x.dtype))
    return x


def _cases(world):
    """(name, kwargs(rank) on each rank, expected message regex (same on every rank, or a
    function of the rank for a problem local to one rank))."""
    last = world - 1
    full, t, _, _ = _data(world)
    t_sum = t.clone()
    # two changes that keep the sum: +1 at row 0 and -1 at row 3 (both counted, in range)
    t_sum[0], t_sum[3] = t[0] + (1 if t[0] < VR * world - 1 else -1), 0
    t_sum[3] = t[3] - (t_sum[0] - t[0])
    assert int(t_sum.sum()) == int(t.sum()) and not torch.equal(t_sum, t)
    assert bool(((t_sum >= 0) & (t_sum < VR * world) | (t_sum == -100)).all())

    def on_last(**kw):
        return lambda r: kw if r == last else {}

    def lin_on_last(**kw):  # the linear head on every rank, kw on the last
        return lambda r: dict(kind="lin", **(kw if r == last else {}))

    def local(message):  # a problem on the last rank: its own message; the others name it
        return lambda r: message if r == last else f"rank {last} of the group reported"

    def ce_rows(r):
        if r != last:
            return {}
        g = torch.Generator().manual_seed(3)
        return dict(local_logits=torch.randn(N + 1, VR, generator=g, dtype=torch.float64),
                    target=torch.zeros(N + 1, dtype=torch.int64))

    cases = [
        ("vocab_start None on one rank", lambda r: {} if r == 0 else dict(vocab_start=VR * r),
         "vocab_start is None on ranks"),
        ("different N", ce_rows, r"number of rows N \(of local_logits / input and target\) "
                                 r"differs across the ranks"),
        ("label_smoothing", on_last(label_smoothing=0.1), "label_smoothing differs"),
        ("weight presence", on_last(weight=torch.ones(VR, dtype=torch.float64)),
         r"weight given \(not None\) differs"),
        ("z_loss", on_last(z_loss=1e-3), "z_loss differs"),
        ("softcap", on_last(softcap=5.0), r"softcap \(0: None\) differs"),
        ("softcap value", lambda r: dict(softcap=5.0 + (r == last)),
         r"softcap \(0: None\) differs"),
        ("ignore_index", on_last(ignore_index=-1), "ignore_index differs"),
        ("reduction", on_last(reduction="sum"), "reduction differs"),
        ("num_items value", lambda r: dict(reduction="sum", num_items=5 + (r == last)),
         "num_items differs"),
        ("num_items tensor value", lambda r: dict(reduction="sum",
                                                 num_items=torch.tensor(5 + (r == last))),
         "num_items differs"),
        ("num_items presence", lambda r: dict(reduction="sum", num_items=None if r == last
                                              else 4), r"num_items given \(not None\) differs"),
        ("num_items 0 everywhere", lambda r: dict(reduction="sum", num_items=0),
         "num_items=0 must be"),
        ("num_items tensor -1 everywhere",
         lambda r: dict(reduction="sum", num_items=torch.tensor(-1)),
         r"num_items=-1\.0 must be"),
        ("dtype float32/float64", on_last(local_logits=full[:, VR * last:].float()),
         "dtype of local_logits / input differs"),
        ("dtype bfloat16/float64", on_last(local_logits=full[:, VR * last:].bfloat16()),
         "dtype of local_logits / input differs"),
        ("bad label_smoothing on one rank", on_last(label_smoothing=1.5),
         local("label_smoothing=1.5")),
        ("bad reduction on one rank", on_last(reduction="avg"), local("reduction='avg'")),
        ("num_items 0 on one rank", lambda r: dict(reduction="sum",
                                                   num_items=0 if r == last else 3),
         local("num_items=0 must be")),
        ("float target on one rank", on_last(target=t.double()), local("integer class ids")),
        ("None logits on one rank", on_last(local_logits=None),
         local("local_logits must be a tensor")),
        ("weight shape on one rank", on_last(weight=torch.ones(VR + 1, dtype=torch.float64)),
         local("weight has shape")),
        ("weight requiring grad on one rank",
         on_last(weight=torch.ones(VR, dtype=torch.float64, requires_grad=True)),
         local("UnsupportedError: crossent.torch.distributed: no gradient for the class")),
        ("targets swapped on one rank", on_last(target=_swapped(t)), "target differs"),
        ("targets with the same sum", on_last(target=t_sum), "target differs"),
        ("targets shifted by 2^31", on_last(target=t + (1 << 31)), "target differs"),
        ("uneven split without vocab_start",
         on_last(local_logits=full[:, VR * last:VR * last + 2]),
         "different numbers of classes"),
        ("linear on one rank, logits on the others", lambda r: dict(kind="lin") if r == last
         else {}, "the function called differs"),
        ("linear: chunk_size", lambda r: dict(kind="lin", chunk_size=2 + (r == last)),
         r"chunk_size \(0: None\) differs"),
        ("linear: chunk_size None on one rank",
         lambda r: dict(kind="lin", chunk_size=None if r == last else 4),
         r"chunk_size \(0: None\) differs"),
        ("linear: reduce_input_grad", lambda r: dict(
            kind="lin", reduce_input_grad=r != last,
            input=_data(world)[2].clone().requires_grad_()), "reduce_input_grad differs"),
        ("linear: input grad on one rank only", lambda r: dict(
            kind="lin", input=_data(world)[2].clone().requires_grad_(r == last)),
         r"input.requires_grad \(its gradient is all-reduced in backward\) differs"),
        ("linear: features", lambda r: dict(
            kind="lin", input=torch.zeros(N, D + 1, dtype=torch.float64),
            local_weight=torch.zeros(VR, D + 1, dtype=torch.float64)) if r == last
         else dict(kind="lin"), r"D \(the last dimension of input\) differs"),
        ("linear: input one ulp apart on one rank",
         lin_on_last(input=_nudged(_data(world)[2], (4, 1))), "input differs"),
        ("linear: input rows swapped on one rank",
         lin_on_last(input=_swapped(_data(world)[2])), "input differs"),
        ("linear: input of another batch on one rank",
         lin_on_last(input=torch.randn(N, D, dtype=torch.float64,
                                       generator=torch.Generator().manual_seed(99))),
         "input differs"),
        ("linear: local_weight dtype on one rank", lambda r: dict(
            kind="lin", local_weight=torch.zeros(VR, D)) if r == last else dict(kind="lin"),
         local("local_weight has dtype")),
    ]
    # slice layouts that do not tile [0, V): overlap, gap (and both at once on 3 ranks)
    if world == 2:
        cases += [
            ("overlap", lambda r: dict(vocab_start=[0, 2][r]), "overlap"),
            ("gap", lambda r: dict(vocab_start=[0, 4][r]), r"gap: classes \[3, 4\)"),
        ]
    else:
        def slices(starts, sizes):
            return lambda r: dict(vocab_start=starts[r],
                                  local_logits=full[:, starts[r]:starts[r] + sizes[r]])
        cases += [
            # the example: [0, 3), [2, 4), [5, 6): an overlap and a gap of equal size
            ("overlap and gap", slices([0, 2, 5], [3, 2, 1]), "overlap"),
            ("gap then overlap", slices([0, 4, 3], [2, 2, 2]), r"gap: classes \[2, 3\)"),
            ("two ranks on one slice", slices([0, 0, 3], [3, 3, 3]), "overlap"),
            ("empty slice past the end", slices([0, 3, 9], [3, 3, 0]), "holds no classes"),
            ("bad vocab_start on one rank", lambda r: dict(vocab_start=-1 if r == last
                                                           else VR * r),
             local("vocab_start=-1 must be >= 0")),
        ]
    return cases


def _same_everywhere(value):
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def _check_agreement(rank, world):
    full, t, _, _ = _data(world)
    ref = xt.cross_entropy(full, t)
    for name, kwargs, expected in _cases(world):
        want = expected(rank) if callable(expected) else expected
        try:
            _call(rank, world, **kwargs(rank))
            outcome = "no error"
        except InputError as e:  # bad-input errors are InputError (a ValueError)
            outcome = str(e)
        except Exception as e:  # reported below, on every rank
            outcome = f"{type(e).__name__}: {e}"
        outcomes = _same_everywhere(outcome)
        assert re.search(want, outcome), f"{name}: rank {rank} got {outcome!r}"
        if not callable(expected):
            assert len(set(outcomes)) == 1, f"{name}: the ranks raised {outcomes}"
        # the group still works, with the right number
        got = _call(rank, world)
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    _check_nan(rank, world)
    _check_adversarial_targets_pass_when_equal(rank, world)
    _check_equal_inputs_in_other_layouts_pass(rank, world)


def _check_equal_inputs_in_other_layouts_pass(rank, world):
    """Control for the input hashes: the same values held differently on each rank (a
    transposed copy's view, a slice of a wider tensor, -0.0 for 0.0, NaNs of other signs and
    payloads, bfloat16 in slices of rows) pass and give single-process crossent's loss and
    gradients."""
    from crossent.torch.distributed import _common

    _, t, x, w = _data(world)
    x = x.clone()
    x[0, 0], x[5, 3] = 0.0, math.nan
    held = [x.t().contiguous().t(), torch.cat([x, x], 1)[:, :D], x.clone()][rank % 3]
    if rank == world - 1:
        held = held.clone()
        held[0, 0] = -0.0
        held[5, 3] = -math.nan
    lo = VR * rank
    mine = held.clone().requires_grad_()
    local_w = w[lo:lo + VR].clone().requires_grad_()
    got = vocab_parallel_linear_cross_entropy(mine, local_w, t, reduction="none")
    ref_x, ref_w = x.clone().requires_grad_(), w.clone().requires_grad_()
    want = xt.linear_cross_entropy(ref_x, ref_w, t, reduction="none")
    go = torch.arange(1.0, N + 1, dtype=torch.float64)
    got.backward(go)
    want.backward(go)
    torch.testing.assert_close(got, want, equal_nan=True)
    torch.testing.assert_close(local_w.grad, ref_w.grad[lo:lo + VR], equal_nan=True)
    # bfloat16 hidden states hashed in slices of two rows (the slicing cannot matter)
    saved = _common._HASH_WORDS
    _common._HASH_WORDS = 2 * D
    try:
        xb = torch.cat([x, x], 1)[:, :D].bfloat16() if rank else x.bfloat16()
        out = vocab_parallel_linear_cross_entropy(xb, w[lo:lo + VR].bfloat16(), t)
    finally:
        _common._HASH_WORDS = saved
    assert torch.isnan(out)  # the NaN row counts


def _check_adversarial_targets_pass_when_equal(rank, world):
    """Control for the hashes: large, negative-ignored and repeated ids identical on every
    rank pass, and give the reference number."""
    g = torch.Generator().manual_seed(5)
    full = torch.randn(64, VR * world, generator=g, dtype=torch.float64)
    t = torch.randint(0, VR * world, (64,), generator=g)
    t[::7] = -100
    lo = VR * rank
    got = vocab_parallel_cross_entropy(full[:, lo:lo + VR], t, reduction="none")
    torch.testing.assert_close(got, xt.cross_entropy(full, t, reduction="none"))
    # every option at once, softcap included, loss and gradient
    w = torch.rand(VR * world, generator=g, dtype=torch.float64) + 0.5
    opts = dict(softcap=1.5, z_loss=0.01, label_smoothing=0.1)
    local = (full[:, lo:lo + VR] * 3).requires_grad_()
    ref_in = (full * 3).requires_grad_()
    got = vocab_parallel_cross_entropy(local, t, weight=w[lo:lo + VR], **opts)
    want = xt.cross_entropy(ref_in, t, w, **opts)
    got.backward()
    want.backward()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(local.grad, ref_in.grad[:, lo:lo + VR], rtol=1e-12, atol=1e-12)


def _check_nan(rank, world):
    """A NaN (or +inf) logit on a rank that neither owns the target nor holds the row max:
    the row's loss is NaN on every rank, as single-process; an ignored NaN row contributes
    nothing to the loss (z_loss too) and gets a NaN gradient, as crossent.torch / torch."""
    full, t, x, w = _data(world)
    t = t.clone()
    t[0], t[1] = 0, 0  # rank 0 owns the targets of rows 0 and 1
    full = full.clone()
    full[0, VR] = full[1, VR] = 30.0  # rank 1 holds the row max
    full[0, VR * world - 1] = math.nan  # the last rank holds a NaN in row 0
    full[1, VR * world - 1] = math.inf  # ... and +inf in row 1
    full[3, VR * world - 2] = math.nan  # a NaN on an ignored row (z_loss: issue 11 item 4)
    t[3] = -100
    lo = VR * rank
    for reduction in ("mean", "sum", "none"):
        for zeta in (0.0, 0.01):
            for tt in (t, torch.where(torch.arange(N) < 2, -100, t)):  # rows 0, 1 ignored too
                local = full[:, lo:lo + VR].clone().requires_grad_()
                out = vocab_parallel_cross_entropy(local, tt, reduction=reduction,
                                                   z_loss=zeta)
                ref_in = full.clone().requires_grad_()
                ref = xt.cross_entropy(ref_in, tt, reduction=reduction, z_loss=zeta)
                go = torch.ones_like(ref)
                out.backward(go)
                ref.backward(go)
                torch.testing.assert_close(out, ref, equal_nan=True)
                torch.testing.assert_close(local.grad, ref_in.grad[:, lo:lo + VR],
                                           equal_nan=True)
                if reduction != "none" and int((tt[:2] != -100).sum()):
                    assert torch.isnan(out), "NaN must reach every rank's loss"
                every = _same_everywhere(repr(out.detach()))
                assert len(set(every)) == 1, every
    # the linear head: a NaN weight row on the last rank only makes every row's loss NaN
    wn = w.clone()
    wn[-1, 0] = math.nan
    out = vocab_parallel_linear_cross_entropy(x, wn[lo:lo + VR], t, reduction="none")
    ref = xt.linear_cross_entropy(x, wn, t, reduction="none")
    torch.testing.assert_close(out, ref, equal_nan=True)
    assert torch.isnan(out[t != -100]).all()


@pytest.mark.parametrize("world", [2, 3])
def test_every_option_differing_across_ranks_raises_together(world):
    """Each option differing (or bad) on one rank: every rank raises the same InputError at
    once (messages compared across ranks), then a good call still gives the reference;
    adversarial targets (same sum, swapped, shifted by 2^31) and slice layouts (overlap +
    gap of equal size on 3 ranks) are caught; NaN / +inf on a third rank propagate."""
    run_group(_check_agreement, world)


def _check_uneven_default_chunk(rank, world):
    """4097 / 4096 classes with the default chunk_size: the chunks (and so the collectives)
    are the same on both ranks, and the loss and gradients are single-process's."""
    from crossent.torch.distributed.linear import default_chunk

    sizes = [4097, 4096]
    rows, feat = 1100, 3  # > the default chunk of either slice (992 or 1024 rows)
    # a test only if the local defaults differ and the rows need more than one chunk: then
    # chunking by the local default sends all-reduces of different sizes (992 vs 1024)
    assert default_chunk(4097) != default_chunk(4096) and rows > default_chunk(4097)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(rows, feat, generator=g)
    w = torch.randn(sum(sizes), feat, generator=g)
    t = torch.randint(0, sum(sizes), (rows,), generator=g)
    lo = sizes[0] * rank
    local = w[lo:lo + sizes[rank]].clone().requires_grad_()
    xr = x.clone().requires_grad_()
    out = vocab_parallel_linear_cross_entropy(xr, local, t, vocab_start=lo)
    out.backward()
    ref_x, ref_w = x.double().requires_grad_(), w.double().requires_grad_()
    ref = xt.linear_cross_entropy(ref_x, ref_w, t)
    ref.backward()
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(local.grad.double(), ref_w.grad[lo:lo + sizes[rank]],
                               rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(xr.grad.double(), ref_x.grad, rtol=1e-4, atol=1e-7)


def test_uneven_split_default_chunk_is_the_same_on_every_rank():
    run_group(_check_uneven_default_chunk, 2)
