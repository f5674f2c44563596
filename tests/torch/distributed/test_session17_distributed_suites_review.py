"""Session 17 trust round (helper H42): the vocab-parallel cross-entropy tests and bug
reports of other projects, ported onto ``crossent.torch.distributed`` (facts only; no code
copied), on 2 and 3 gloo ranks under the harness's timeout.

* Dao-AILab/flash-attention ``tests/losses/test_cross_entropy_parallel.py``: its
  ``CrossEntropyLoss(process_group=...)`` on the rank's vocabulary slice against
  ``torch.nn.CrossEntropyLoss(reduction="none")`` on the whole logits (scaled by 10),
  smoothing 0 and 0.9, ten targets ignored, a random per-row ``grad_output``, each rank's
  gradient against its slice of torch's. Also with ``lse_square_scale`` (crossent's
  ``z_loss``), bfloat16 logits, ``"mean"``, and the linear head.
* NVIDIA/Megatron-LM ``tests/unit_tests/tensor_parallel/test_cross_entropy.py``: ``0..7``
  repeated along the vocabulary on every rank, targets ``0, 2, ..., 30``, Megatron's
  ``[s, b, V/p]`` layout; the loss and the gradient in closed form. With 3 ranks the
  vocabulary of 128 is split unevenly (``vocab_start``). Megatron's own function
  subtracts the row max from its input in place; crossent's must leave the caller's
  logits untouched.
* Megatron-LM #737 / #7464 / PR #7466: label smoothing under tensor parallelism must give
  the single-process loss on every rank (crossent smooths over the global vocabulary, as
  torch; documented), also with logits scaled by 1000 (a finite loss, no ``log(0)``).
* Megatron's padded vocabulary (``make_vocab_size_divisible_by``: a rank whose whole
  slice is ``-inf``, or a ``-inf`` bias), class weights with an uneven split, and
  Megatron-LM #7452 item 3 (data-parallel ranks with different token counts:
  ``global_num_items``); the linear head with ``reduce_input_grad=False``.
* pytorch/torchtune ``tests/torchtune/modules/loss/test_dtensor_cross_entropy.py``:
  DTensor logits on a one-rank CPU mesh (in this process): with torch's options torch's
  numbers; on crossent's own kernels (``z_loss``, ``softcap``, ``chunk_size``,
  ``backend="rowblock"``, ``"auto"`` past torch's size) ``UnsupportedError`` naming
  DTensor (torch's internal "mixed torch.Tensor and DTensor" RuntimeError before the
  fix).
* Options that differ across ranks (flash-attention's ``label_smoothing``,
  ``lse_square_scale``, ``ignore_index``, ``reduction``; the logits' dtype; the linear
  head's ``chunk_size``) raise ``InputError`` naming the option on every rank together.

References: ``torch.nn.functional.cross_entropy`` in float64 on the whole logits, or the
closed form; never crossent.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from dist_harness import agree, outcome, run_group

import crossent.torch as xt
from crossent.errors import InputError, UnsupportedError
from crossent.torch.distributed import (
    global_num_items,
    vocab_parallel_cross_entropy,
    vocab_parallel_linear_cross_entropy,
)

pytestmark = pytest.mark.timeout(120)

F64 = torch.float64


def _close(got, want, rtol, atol, what):
    torch.testing.assert_close(got.detach().to(F64), want.detach().to(F64), rtol=rtol,
                               atol=atol, msg=lambda m: f"{what}: {m}")


def _grad_close(got, want, dtype, what):
    scale = want.abs().max().item() or 1.0
    if dtype == torch.float32:
        _close(got, want, 1e-4, 2e-6 * scale, what)
    else:
        _close(got, want, 2e-2, 8e-3 * scale, what)


def _same_nan(got, want, what):
    """Equal NaN/inf patterns and values to float64 rounding."""
    got, want = got.detach().to(F64), want.detach().to(F64)
    assert got.shape == want.shape, what
    assert torch.equal(got.isnan(), want.isnan()), (what, got, want)
    torch.testing.assert_close(torch.nan_to_num(got, nan=0.0), torch.nan_to_num(want, nan=0.0),
                               rtol=1e-9, atol=1e-12, msg=lambda m: f"{what}: {m}")


def _split(vocab, world, rank, even):
    """``(start, size)`` of this rank's slice: even, or the last rank 8 classes short."""
    if even:
        size = vocab // world
        return rank * size, size
    sizes = [vocab // world + 8 - (vocab // world) % 8] * (world - 1)
    sizes.append(vocab - sum(sizes))
    return sum(sizes[:rank]), sizes[rank]


def _flash_attn_parallel(rank, world):
    """flash-attention test_cross_entropy_loss_parallel on a gloo group."""
    vocab, rows = 66 * world, 24
    g = torch.Generator().manual_seed(0)  # the same data on every rank
    full = torch.randn(rows, vocab, generator=g) * 10
    y = torch.randint(0, vocab, (rows,), generator=g)
    y[torch.randperm(rows, generator=g)[:10]] = -100
    go = torch.randn(rows, generator=g)
    lo, size = _split(vocab, world, rank, even=True)
    cases = [(dtype, eps, zeta, red, backend)
             for dtype in (torch.float32, torch.bfloat16)
             for eps, zeta in ((0.0, 0.0), (0.9, 0.0), (0.9, 1e-2))
             for red in ("none", "mean")
             for backend in ("auto", "rowblock")
             if (backend == "auto") == (red == "none") and (dtype == torch.float32 or eps)]
    for dtype, eps, zeta, red, backend in cases:
        what = (rank, world, str(dtype), eps, zeta, red, backend)
        base = full.to(dtype)
        mine = base[:, lo:lo + size].clone().requires_grad_()
        out = vocab_parallel_cross_entropy(mine, y, label_smoothing=eps, z_loss=zeta,
                                           reduction=red, backend=backend)
        ref_in = base.to(F64).requires_grad_()
        per = F.cross_entropy(ref_in, y, label_smoothing=eps, reduction="none")
        kept = y != -100
        if zeta:
            per = per + torch.where(kept, zeta * torch.logsumexp(ref_in, 1) ** 2, 0.0)
        ref = per if red == "none" else per.sum() / kept.sum()
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        _close(out, ref, tol, tol, ("loss", *what))
        grad_out = go if red == "none" else go[0]
        out.backward(grad_out.to(out.dtype))
        ref.backward(grad_out.to(dtype).to(F64))
        _grad_close(mine.grad, ref_in.grad[:, lo:lo + size], dtype, ("grad", *what))


def _flash_attn_parallel_linear(rank, world):
    """The same case through the vocab-parallel linear head (flash-attention's models
    feed ``ColumnParallelLinear`` logits to it): ``dx`` (all-reduced), ``dW`` and ``db``
    slices against float64 torch."""
    vocab, rows, dim = 24 * world, 12, 8
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(rows, dim, generator=g)
    w0 = torch.randn(vocab, dim, generator=g) * 3
    b0 = torch.randn(vocab, generator=g)
    y = torch.randint(0, vocab, (rows,), generator=g)
    y[:3] = -100
    lo, size = _split(vocab, world, rank, even=True)
    for eps, zeta, red in ((0.0, 0.0, "mean"), (0.9, 1e-2, "none"), (0.9, 0.0, "sum")):
        x = x0.clone().requires_grad_()
        w = w0[lo:lo + size].clone().requires_grad_()
        b = b0[lo:lo + size].clone().requires_grad_()
        out = vocab_parallel_linear_cross_entropy(x, w, y, local_bias=b, label_smoothing=eps,
                                                  z_loss=zeta, reduction=red, chunk_size=5)
        rx, rw, rb = (a.to(F64).requires_grad_() for a in (x0, w0, b0))
        z = F.linear(rx, rw, rb)
        per = F.cross_entropy(z, y, label_smoothing=eps, reduction="none")
        kept = y != -100
        if zeta:
            per = per + torch.where(kept, zeta * torch.logsumexp(z, 1) ** 2, 0.0)
        ref = per if red == "none" else per.sum() / (kept.sum() if red == "mean" else 1)
        what = (rank, world, eps, zeta, red)
        _close(out, ref, 1e-5, 1e-5, ("linear loss", *what))
        go = torch.randn(ref.shape, generator=g)
        out.backward(go)
        ref.backward(go.to(F64))
        _grad_close(x.grad, rx.grad, torch.float32, ("dx", *what))
        _grad_close(w.grad, rw.grad[lo:lo + size], torch.float32, ("dW", *what))
        _grad_close(b.grad, rb.grad[lo:lo + size], torch.float32, ("db", *what))
    # reduce_input_grad=False (Megatron's copy_to_tensor_model_parallel_region reduces
    # it): each rank's partial dx, summed over the group, is torch's dx
    x = x0.clone().requires_grad_()
    w = w0[lo:lo + size].clone().requires_grad_()
    out = vocab_parallel_linear_cross_entropy(x, w, y, label_smoothing=0.1,
                                              reduce_input_grad=False, chunk_size=5)
    out.backward()
    dx = x.grad.clone()
    torch.distributed.all_reduce(dx)
    rx, rw = x0.to(F64).requires_grad_(), w0.to(F64).requires_grad_()
    F.cross_entropy(F.linear(rx, rw), y, label_smoothing=0.1).backward()
    _grad_close(dx, rx.grad, torch.float32, ("partial dx summed", rank))
    _grad_close(w.grad, rw.grad[lo:lo + size], torch.float32, ("partial-case dW", rank))


def _megatron_closed_form(rank, world):
    """Megatron-LM test_vocab_parallel_cross_entropy: 10.2309, 8.2309, 6.2309, 4.2309."""
    for even in (True, False):
        vocab = 144 if even and world == 3 else 128  # Megatron's 128 splits evenly in 2
        lo, size = _split(vocab, world, rank, even)
        assert size % 8 == 0
        local = torch.arange(8, dtype=torch.float32).repeat(16, size // 8).reshape(4, 4, size)
        keep = local.clone()
        target = torch.arange(0, 32, 2).reshape(4, 4)
        lse = 7.0 + math.log(vocab / 8 * sum(math.exp(-j) for j in range(8)))
        want = torch.tensor([lse - t % 8 for t in range(0, 32, 2)], dtype=F64).reshape(4, 4)
        start = None if even else lo
        with torch.no_grad():
            out = vocab_parallel_cross_entropy(local, target, reduction="none",
                                               vocab_start=start)
        assert torch.equal(local, keep), ("no-grad call changed the logits", rank, even)
        _close(out, want, 1e-6, 1e-6, ("loss", rank, world, even))
        if vocab == 128:  # Megatron's expected values
            assert [round(v, 4) for v in out.reshape(-1)[:4].tolist()] == \
                [10.2309, 8.2309, 6.2309, 4.2309]
        mine = local.clone().requires_grad_()
        out = vocab_parallel_cross_entropy(mine, target, reduction="none", vocab_start=start)
        out.sum().backward()
        assert torch.equal(mine.detach(), keep), ("forward changed the logits", rank, even)
        p = torch.exp(torch.arange(8, dtype=F64) - lse).repeat(size // 8)
        expected = p.expand(16, size).clone()
        for n, t in enumerate(range(0, 32, 2)):
            if lo <= t < lo + size:
                expected[n, t - lo] -= 1.0
        _close(mine.grad.reshape(16, size), expected, 1e-5, 1e-7, ("grad", rank, even))


def _megatron_label_smoothing(rank, world):
    """Megatron-LM #737 / #7464: the loss with smoothing equals the single-process loss on
    every rank, also with logits scaled by 1000; the gradient slices too."""
    vocab, rows, eps = 8 * world, 6, 0.1
    g = torch.Generator().manual_seed(2)
    base = torch.randn(rows, vocab, generator=g)
    y = torch.randint(0, vocab, (rows,), generator=g)
    y[2] = -100
    lo, size = _split(vocab, world, rank, even=True)
    for scale in (1.0, 1000.0):
        full = base * scale
        mine = full[:, lo:lo + size].clone().requires_grad_()
        out = vocab_parallel_cross_entropy(mine, y, label_smoothing=eps)
        ref_in = full.to(F64).requires_grad_()
        ref = F.cross_entropy(ref_in, y, label_smoothing=eps)
        assert out.isfinite(), (rank, scale)
        seen = [None] * world
        torch.distributed.all_gather_object(seen, out.item())
        assert len(set(seen)) == 1, ("ranks disagree on the loss", seen)
        _close(out, ref, 2e-6, 1e-6 * scale, ("loss", rank, scale))
        out.backward()
        ref.backward()
        _grad_close(mine.grad, ref_in.grad[:, lo:lo + size], torch.float32,
                    ("grad", rank, scale))
    # with class weights, z_loss and an uneven split (vocab_start): torch's weighted mean
    vocab = 8 * world + 5
    full = torch.randn(rows, vocab, generator=g, dtype=F64) * 30
    y = torch.randint(0, vocab, (rows,), generator=g)
    y[4] = -100
    w = torch.rand(vocab, generator=g, dtype=F64) + 0.25
    sizes = [8] * (world - 1) + [vocab - 8 * (world - 1)]
    lo, size = sum(sizes[:rank]), sizes[rank]
    mine = full[:, lo:lo + size].clone().requires_grad_()
    out = vocab_parallel_cross_entropy(mine, y, vocab_start=lo, weight=w[lo:lo + size],
                                       label_smoothing=eps, z_loss=1e-3)
    ref_in = full.clone().requires_grad_()
    kept = y != -100
    per = F.cross_entropy(ref_in, y, weight=w, label_smoothing=eps, reduction="none")
    per = per + torch.where(kept, 1e-3 * torch.logsumexp(ref_in, 1) ** 2, 0.0)
    ref = per.sum() / w[y[kept]].sum()
    _same_nan(out, ref, ("weighted uneven loss", rank))
    out.backward()
    ref.backward()
    _same_nan(mine.grad, ref_in.grad[:, lo:lo + size], ("weighted uneven grad", rank))


def _megatron_padded_vocabulary(rank, world):
    """Megatron pads the vocabulary to a multiple of the tensor-parallel size (its
    ``make_vocab_size_divisible_by``); padded classes carry ``-inf`` logits (or a ``-inf``
    bias), so the last rank can hold a whole slice of ``-inf`` (a row max of ``-inf``
    there). Loss and gradients must stay torch's (finite; inf with smoothing, as torch)."""
    vocab = 6 * world
    g = torch.Generator().manual_seed(4)
    full = torch.randn(4, vocab, generator=g, dtype=F64)
    pad = 6 * (world - 1)
    full[:, pad:] = -math.inf
    full[1, pad + 2] = 0.5  # one real class in the last slice, row 1's target
    y = torch.tensor([0, pad + 2, -100, 5])
    lo = 6 * rank
    for kw in (dict(), dict(z_loss=1e-2), dict(reduction="none"), dict(label_smoothing=0.1)):
        mine = full[:, lo:lo + 6].clone().requires_grad_()
        out = vocab_parallel_cross_entropy(mine, y, **kw)
        ref_in = full.clone().requires_grad_()
        per = F.cross_entropy(ref_in, y, reduction="none",
                              label_smoothing=kw.get("label_smoothing", 0.0))
        kept = y != -100
        if "z_loss" in kw:
            per = per + torch.where(kept, 1e-2 * torch.logsumexp(ref_in, 1) ** 2, 0.0)
        ref = per if kw.get("reduction") == "none" else per.sum() / kept.sum()
        _same_nan(out, ref, ("padded loss", rank, kw))
        out.sum().backward()
        ref.sum().backward()
        _same_nan(mine.grad, ref_in.grad[:, lo:lo + 6], ("padded grad", rank, kw))
    # the linear head, padding as a -inf bias
    x0 = torch.randn(4, 3, generator=g, dtype=F64)
    w0 = torch.randn(vocab, 3, generator=g, dtype=F64)
    b0 = torch.zeros(vocab, dtype=F64)
    b0[pad:] = -math.inf
    b0[pad + 2] = 0.0
    x, w, b = x0.clone().requires_grad_(), w0[lo:lo + 6].clone().requires_grad_(), \
        b0[lo:lo + 6].clone().requires_grad_()
    out = vocab_parallel_linear_cross_entropy(x, w, y, local_bias=b, chunk_size=3)
    rx, rw, rb = (a.clone().requires_grad_() for a in (x0, w0, b0))
    ref = F.cross_entropy(F.linear(rx, rw, rb), y)
    _same_nan(out, ref, ("padded linear loss", rank))
    out.backward()
    ref.backward()
    _same_nan(x.grad, rx.grad, ("padded dx", rank))
    _same_nan(w.grad, rw.grad[lo:lo + 6], ("padded dW", rank))
    _same_nan(b.grad, rb.grad[lo:lo + 6], ("padded db", rank))


def _data_parallel_token_count(rank, world):
    """Megatron-LM #7452 item 3 / torchtune's chunked loss: data-parallel ranks whose
    micro-batches hold different numbers of counted tokens. Each rank sums its
    micro-batches' losses over the global count (``global_num_items``); the losses and the
    gradients summed over ranks equal the full batch's mean (float64 torch)."""
    vocab, rows = 7, 5
    g = torch.Generator().manual_seed(6)
    z_all = torch.randn(world, 2, rows, vocab, generator=g, dtype=F64)
    y_all = torch.randint(0, vocab, (world, 2, rows), generator=g)
    y_all[0, 0, :4] = -100  # rank 0's first micro-batch almost empty
    y_all[world - 1, 1] = -100  # the last rank's second one empty
    count = global_num_items([y_all[rank, 0], y_all[rank, 1]])
    assert int(count) == int((y_all != -100).sum())
    mine = z_all[rank].clone().requires_grad_()
    total = sum(xt.cross_entropy(mine[k], y_all[rank, k], reduction="sum", num_items=count,
                                 backend=backend)
                for k, backend in enumerate(("rowblock", "auto")))
    total.backward()
    loss = total.detach().clone()
    torch.distributed.all_reduce(loss)
    ref_in = z_all.clone().requires_grad_()
    ref = F.cross_entropy(ref_in.reshape(-1, vocab), y_all.reshape(-1))
    ref.backward()
    _same_nan(loss, ref, ("data-parallel loss", rank))
    _same_nan(mine.grad, ref_in.grad[rank], ("data-parallel grad", rank))


def _options_differing_raise_together(rank, world):
    """flash-attention's options set differently on the last rank only."""
    last = world - 1
    g = torch.Generator().manual_seed(3)
    full = torch.randn(5, 4 * world, generator=g)
    y = torch.tensor([0, 1, -100, 4 * world - 1, 2])
    lo = 4 * rank
    local = full[:, lo:lo + 4]
    x, lin = torch.randn(5, 3, generator=g), torch.randn(4 * world, 3, generator=g)
    one = rank == last
    cases = [
        ("label_smoothing", lambda: vocab_parallel_cross_entropy(
            local, y, label_smoothing=0.9 if one else 0.0)),
        ("z_loss", lambda: vocab_parallel_cross_entropy(local, y, z_loss=1e-2 if one else 0.0)),
        ("ignore_index", lambda: vocab_parallel_cross_entropy(
            local, y, ignore_index=-1 if one else -100)),
        ("reduction", lambda: vocab_parallel_cross_entropy(
            local, y, reduction="sum" if one else "mean")),
        ("dtype", lambda: vocab_parallel_cross_entropy(
            local.to(torch.bfloat16) if one else local, y)),
        ("chunk_size", lambda: vocab_parallel_linear_cross_entropy(
            x, lin[lo:lo + 4], y, chunk_size=2 if one else 3)),
    ]
    for name, call in cases:
        seen = outcome(call, message_chars=400)
        agree(seen, "InputError", name, world, prefix=True)
        assert name in seen, (name, rank, seen)
    # the group stays usable
    out = vocab_parallel_cross_entropy(local, y)
    _close(out, F.cross_entropy(full.to(F64), y), 1e-5, 1e-6, "after")


def _check_all(rank, world):
    """One launch per world size (a process start with torch costs seconds)."""
    torch.manual_seed(0)
    _flash_attn_parallel(rank, world)
    _flash_attn_parallel_linear(rank, world)
    _megatron_closed_form(rank, world)
    _megatron_label_smoothing(rank, world)
    _megatron_padded_vocabulary(rank, world)
    _data_parallel_token_count(rank, world)
    _options_differing_raise_together(rank, world)


@pytest.mark.parametrize("world", [3])  # 3 ranks: the uneven split; 2 ranks elsewhere
def test_flash_attn_and_megatron_vocab_parallel_suites(world):
    """flash-attention test_cross_entropy_loss_parallel, Megatron-LM
    test_vocab_parallel_cross_entropy and issues #737/#7464, and flash-attention's options
    differing across ranks, on ``world`` gloo ranks."""
    run_group(_check_all, world, timeout=100)


# ------------------------------------------------- torchtune: DTensor inputs (one rank) ----


def _dtensor_data():
    g = torch.Generator().manual_seed(9)
    z = torch.randn(20, 12, generator=g)
    t = torch.randint(0, 12, (20,), generator=g)
    t[3] = -100
    return z, t, torch.randn(20, 16, generator=g), torch.randn(12, 16, generator=g)


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


@pytest.mark.native_dispatch  # "auto" keeps torch's own kernel at this size
@pytest.mark.parametrize("backend", ["auto", "native"])
@pytest.mark.parametrize("shard", [False, True], ids=["replicate", "shard-classes"])
def test_torchtune_dtensor_logits_with_torchs_options(one_rank_mesh, backend, shard):
    """torchtune test_dtensor_cross_entropy: DTensor logits and targets (replicated, or the
    class dimension sharded as torch's loss_parallel has it) with torch's own options:
    torch's loss and gradient (float64 reference on the plain tensors)."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    z0, t, _, _ = _dtensor_data()
    zd = distribute_tensor(z0, one_rank_mesh, [Shard(1) if shard else Replicate()])
    zd.requires_grad_()
    out = xt.cross_entropy(zd, distribute_tensor(t, one_rank_mesh, [Replicate()]),
                           label_smoothing=0.1, backend=backend)
    out.backward()
    ref_in = z0.to(F64).requires_grad_()
    ref = F.cross_entropy(ref_in, t, label_smoothing=0.1)
    ref.backward()
    _close(_full(out), ref, 1e-5, 1e-6, "loss")
    _close(_full(zd.grad), ref_in.grad, 1e-5, 1e-7, "grad")


_DTENSOR_CASES = {
    # name: (call on (z, t, h, W) DTensors, reference on float64 plain tensors)
    "cross_entropy-rowblock": (
        lambda z, t, h, w: xt.cross_entropy(z, t, backend="rowblock"),
        lambda z, t, h, w: F.cross_entropy(z, t)),
    "cross_entropy-auto-large": (  # conftest: "auto" as past 2**19 logits
        lambda z, t, h, w: xt.cross_entropy(z, t),
        lambda z, t, h, w: F.cross_entropy(z, t)),
    "cross_entropy-z_loss": (
        lambda z, t, h, w: xt.cross_entropy(z, t, z_loss=1e-2),
        lambda z, t, h, w: F.cross_entropy(z, t)
        + 1e-2 * (torch.logsumexp(z, 1)[t != -100] ** 2).mean()),
    "cross_entropy-softcap": (
        lambda z, t, h, w: xt.cross_entropy(z, t, softcap=5.0),
        lambda z, t, h, w: F.cross_entropy(5.0 * torch.tanh(z / 5.0), t)),
    "linear_cross_entropy-chunk_size": (
        lambda z, t, h, w: xt.linear_cross_entropy(h, w, t, chunk_size=4),
        lambda z, t, h, w: F.cross_entropy(F.linear(h, w), t)),
}


@pytest.mark.parametrize("case", list(_DTENSOR_CASES))
def test_torchtune_dtensor_inputs_on_crossents_kernels(one_rank_mesh, case):
    """torchtune test_dtensor_cross_entropy with what only crossent has (its kernels at
    size, z_loss, softcap, chunk_size): torch's formula's value and gradient, or
    UnsupportedError naming DTensor; never torch's internal RuntimeError."""
    from torch.distributed.tensor import Replicate, distribute_tensor

    call, reference = _DTENSOR_CASES[case]
    z0, t, h0, w0 = _dtensor_data()
    dts = [distribute_tensor(a, one_rank_mesh, [Replicate()]) for a in (z0, t, h0, w0)]
    for a in (dts[0], dts[2], dts[3]):
        a.requires_grad_()
    try:
        out = call(*dts)
    except UnsupportedError as error:
        assert "DTensor" in str(error), str(error)
        return
    out.backward()
    refs = [a.to(F64).requires_grad_() if a.is_floating_point() else a
            for a in (z0, t, h0, w0)]
    ref = reference(*refs)
    ref.backward()
    _close(_full(out), ref, 1e-5, 1e-6, "loss")
    for got, want, what in [(dts[0], refs[0], "dz"), (dts[2], refs[2], "dh"),
                            (dts[3], refs[3], "dW")]:
        if want.grad is not None:
            _close(_full(got.grad), want.grad, 1e-5, 1e-7, what)


@pytest.mark.parametrize("entry", ["cross_entropy", "linear"])
def test_dtensor_inputs_to_the_vocab_parallel_functions_are_refused_naming_dtensor(
        one_rank_mesh, entry):
    """A tensor-parallel trainer handing DTensor logits (torch's loss_parallel layout) to
    the vocab-parallel functions: UnsupportedError naming DTensor and ``to_local()``,
    raised after the agreement (every rank together), never torch's "mixed torch.Tensor
    and DTensor" error from inside the kernels."""
    from torch.distributed.tensor import Shard, distribute_tensor

    z0, t, h0, w0 = _dtensor_data()
    if entry == "cross_entropy":
        call = lambda: vocab_parallel_cross_entropy(  # noqa: E731
            distribute_tensor(z0, one_rank_mesh, [Shard(1)]), t)
    else:
        call = lambda: vocab_parallel_linear_cross_entropy(  # noqa: E731
            h0, distribute_tensor(w0, one_rank_mesh, [Shard(0)]), t)
    with pytest.raises(UnsupportedError, match=r"DTensor inputs.*to_local"):
        call()


# ------------------------------- flash-attention / Megatron under torch.autocast ----
# Both projects train under autocast (bf16 matmuls, the loss in float32); torch's autocast
# runs cross_entropy in float32 (float32 loss, a float32 class weight accepted next to
# bf16 logits) and F.linear in bf16. The vocab-parallel functions claim the single-process
# answer; one process (no group) is world 1, the same code path as every rank's.



def _autocast_data():
    g = torch.Generator().manual_seed(10)
    x = torch.randn(16, 32, generator=g)
    w = torch.randn(50, 32, generator=g)
    y = torch.randint(0, 50, (16,), generator=g)
    y[2] = -100
    cw = torch.rand(50, generator=g) + 0.5
    return x, w, y, cw


@pytest.mark.parametrize("entry", [
    "cross_entropy",
    "vocab_parallel_cross_entropy",
])
@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "class-weights"])
def test_flash_attn_megatron_loss_under_autocast(entry, weighted):
    """bfloat16 logits from ``F.linear`` under ``torch.autocast``: torch's float32 loss
    (value and dtype) and gradient, float32 class weights accepted."""
    x, w, y, cw = _autocast_data()
    fn = xt.cross_entropy if entry == "cross_entropy" else vocab_parallel_cross_entropy
    kw = {"weight": cw} if weighted else {}
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = F.cross_entropy(F.linear(xa, w), y, **kw)
        got = fn(F.linear(xb, w), y, **kw)
    assert got.dtype == want.dtype == torch.float32
    _close(got, want, 1e-5, 1e-6, "loss")
    got.backward()
    want.backward()
    _close(xb.grad, xa.grad, 1e-2, 1e-3 * xa.grad.abs().max().item(), "dx")


# The vocab-parallel head forms its logits in float32 from the (autocast-cast) bfloat16
# inputs where torch rounds them to bfloat16 (documented: docs/guarantees.md, its
# docstring): its reference is those float32 logits' loss, torch's formula in float64.


def _float32_logits_loss(x, w, y):
    return F.cross_entropy(F.linear(x.to(torch.bfloat16).to(F64),
                                    w.to(torch.bfloat16).to(F64)), y)


@pytest.mark.parametrize("entry", ["linear_cross_entropy", "vocab_parallel_linear_cross_entropy"])
def test_flash_attn_megatron_linear_head_under_autocast(entry):
    """The LM head under ``torch.autocast(bfloat16)``: torch's ``F.cross_entropy(F.linear(x,
    W), y)`` casts to bfloat16 and multiplies there. The single-process head must give
    torch's loss: closer to it than a float32 matmul's loss is (a quarter of that distance
    at most); the vocab-parallel head the loss of the cast inputs' float32 logits."""
    x, w, y, _ = _autocast_data()
    x, w = x * 4, w * 4  # larger logits: bfloat16 rounding well above float32's
    fn = xt.linear_cross_entropy if entry == "linear_cross_entropy" else \
        vocab_parallel_linear_cross_entropy
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = F.cross_entropy(F.linear(x, w), y)
        got = fn(x, w, y)
    exact32 = F.cross_entropy(F.linear(x, w), y)  # outside autocast: a float32 matmul
    gap = (want - exact32).abs().item()
    assert gap > 1e-4, "the case must tell a bfloat16 matmul from a float32 one"
    assert got.dtype == torch.float32
    if entry == "linear_cross_entropy":
        assert (got - want).abs().item() <= gap / 4, (got.item(), want.item(), exact32.item())
    else:  # the inputs cast as autocast casts them (float32 ones would differ by ~gap)
        _close(got, _float32_logits_loss(x, w, y), 1e-5, 1e-5, "loss")


@pytest.mark.parametrize("entry", ["linear_cross_entropy", "vocab_parallel_linear_cross_entropy"])
def test_megatron_bfloat16_model_head_loss_dtype_under_autocast(entry):
    """A bfloat16 model (Megatron's bf16 params) under ``torch.autocast(bfloat16)``: the
    head's loss is float32; torch's value for the single-process head (the bfloat16 logits
    are the same), the float32 logits' for the vocab-parallel one."""
    x, w, y, _ = _autocast_data()
    x, w = x.to(torch.bfloat16), w.to(torch.bfloat16)
    fn = xt.linear_cross_entropy if entry == "linear_cross_entropy" else \
        vocab_parallel_linear_cross_entropy
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = F.cross_entropy(F.linear(x, w), y)
        got = fn(x, w, y)
    assert got.dtype == want.dtype == torch.float32, got.dtype
    if entry == "vocab_parallel_linear_cross_entropy":
        want = _float32_logits_loss(x, w, y)
    _close(got, want, 1e-5, 1e-5, "loss")


# ------------------------- torch.func / forward-mode AD on the vocab-parallel functions ----
# Megatron-style RL trainers (GRPO log-probabilities through vocab_parallel_cross_entropy,
# ms-swift PR #9947) take per-sample gradients and Jacobians; the contract: torch's
# gradient, or UnsupportedError naming the transform (the single-process functions take a
# composable path). One process (world 1) runs the same code as every rank.


def _func_data():
    g = torch.Generator().manual_seed(12)
    z = torch.randn(6, 5, generator=g, dtype=F64)
    v = torch.randn(6, 5, generator=g, dtype=F64)
    x = torch.randn(6, 3, generator=g, dtype=F64)
    w = torch.randn(5, 3, generator=g, dtype=F64)
    y = torch.tensor([0, 1, 2, 3, 4, -100])
    return z, v, x, w, y


def _forward_ad(fn, primal, tangent):
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        return fwAD.unpack_dual(fn(fwAD.make_dual(primal, tangent))).tangent


def _transform_cases():
    z, v, x, w, y = _func_data()
    vp, vpl = vocab_parallel_cross_entropy, vocab_parallel_linear_cross_entropy
    tf = torch.func
    return {
        # name: (crossent's call, torch's call: the same transform of F.cross_entropy)
        "vp-jvp": (lambda: tf.jvp(lambda a: vp(a, y), (z,), (v,))[1],
                   lambda: tf.jvp(lambda a: F.cross_entropy(a, y), (z,), (v,))[1]),
        "vp-forward_ad": (lambda: _forward_ad(lambda a: vp(a, y, reduction="none"), z, v),
                          lambda: _forward_ad(lambda a: F.cross_entropy(
                              a, y, reduction="none"), z, v)),
        "vp-grad": (lambda: tf.grad(lambda a: vp(a, y))(z),
                    lambda: tf.grad(lambda a: F.cross_entropy(a, y))(z)),
        "vp-vmap": (lambda: tf.vmap(lambda a: vp(a, y))(torch.stack([z, v])),
                    lambda: tf.vmap(lambda a: F.cross_entropy(a, y))(torch.stack([z, v]))),
        "vp-jacrev": (lambda: tf.jacrev(lambda a: vp(a, y, reduction="none"))(z),
                      lambda: tf.jacrev(lambda a: F.cross_entropy(a, y, reduction="none"))(z)),
        "vpl-grad": (lambda: tf.grad(lambda a: vpl(a, w, y))(x),
                     lambda: tf.grad(lambda a: F.cross_entropy(F.linear(a, w), y))(x)),
        "vpl-forward_ad": (lambda: _forward_ad(lambda a: vpl(a, w, y), x, x.flip(0)),
                           lambda: _forward_ad(lambda a: F.cross_entropy(F.linear(a, w), y),
                                               x, x.flip(0))),
    }




@pytest.mark.parametrize("case", [
    "vp-jvp", "vp-forward_ad", "vp-grad", "vp-vmap", "vp-jacrev", "vpl-grad", "vpl-forward_ad",
])
def test_vocab_parallel_under_torch_func_transforms(case):
    """torch.func.grad / vmap / jacrev / jvp and forward-mode AD through the vocab-parallel
    functions: torch's result, or UnsupportedError naming the transform."""
    ours, theirs = _transform_cases()[case]
    want = theirs()
    try:
        got = ours()
    except UnsupportedError as error:
        assert any(k in str(error) for k in ("torch.func", "transform", "forward-mode",
                                             "forward AD")), str(error)
        return
    _close(got, want, 1e-10, 1e-12, case)


# ------------------------------ torch's device and num_items rules, vocab-parallel ----
# crossent.torch's functions refuse a tensor on another device than the input (InputError
# naming it; ``meta`` stands in for a second device, as test_torch_suite_semantics does)
# and a num_items that requires grad (UnsupportedError). The vocab-parallel functions
# claim the single-process answer; one process (world 1) runs every rank's code.

def _device_cases():
    g = torch.Generator().manual_seed(13)
    z = torch.randn(6, 5, generator=g, dtype=F64).requires_grad_()
    x = torch.randn(6, 3, generator=g, dtype=F64).requires_grad_()
    w = torch.randn(5, 3, generator=g, dtype=F64).requires_grad_()
    b = torch.randn(5, generator=g, dtype=F64)
    y = torch.tensor([0, 1, 2, 3, 4, -100])
    meta = {"device": "meta"}
    vp, vpl = vocab_parallel_cross_entropy, vocab_parallel_linear_cross_entropy
    return {
        "vp-target": ("target", lambda: vp(z, y.to(**meta))),
        "vp-weight": ("weight", lambda: vp(z, y, weight=torch.ones(5, dtype=F64, **meta))),
        "vpl-target": ("target", lambda: vpl(x, w, y.to(**meta))),
        "vpl-local_weight": ("local_weight", lambda: vpl(x, w.detach().to(**meta), y)),
        "vpl-local_bias": ("local_bias", lambda: vpl(x, w, y, local_bias=b.to(**meta))),
    }


@pytest.mark.parametrize("case", list(_device_cases()))
def test_vocab_parallel_tensor_on_another_device_is_refused_naming_it(case):
    """flash-attention / Megatron callers with a CPU target or weight next to GPU logits:
    ``InputError`` naming the argument, as ``crossent.torch``'s functions (never a silent
    move, a garbage number, or an error raised by one rank alone)."""
    name, call = _device_cases()[case]
    with pytest.raises(InputError, match=name):
        call()


@pytest.mark.parametrize("entry", ["vp", "vpl"])
def test_vocab_parallel_num_items_that_requires_grad(entry):
    """torchtune / Megatron per-token loss normalisation with a count tensor that carries
    a gradient: torch's ``sum / n`` differentiates ``n``; the contract: that gradient or
    UnsupportedError naming ``num_items`` (as crossent.torch.cross_entropy)."""
    g = torch.Generator().manual_seed(14)
    z = torch.randn(6, 5, generator=g, dtype=F64, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3, 4, -100])
    n = torch.tensor(5.0, dtype=F64, requires_grad=True)
    try:
        if entry == "vp":
            out = vocab_parallel_cross_entropy(z, y, reduction="sum", num_items=n)
        else:
            w = torch.randn(5, 3, generator=g, dtype=F64, requires_grad=True)
            out = vocab_parallel_linear_cross_entropy(z[:, :3], w, y, reduction="sum",
                                                      num_items=n)
    except UnsupportedError as error:
        assert "num_items" in str(error)
        return
    (got,) = torch.autograd.grad(out, n)
    _close(got, -out.detach() / n.detach(), 1e-12, 1e-12, "d loss / d num_items")


@pytest.mark.parametrize("entry", ["cross_entropy"])  # the linear head: 5 s more of CI
def test_vocab_parallel_functions_under_torch_compile_run_eagerly(entry):
    """A training step under ``torch.compile`` calling the vocab-parallel functions (H42
    saw dynamo fail there): graph breaks inside the call (the agreement reads values on
    the host), eager's loss and gradient; ``fullgraph=True`` raises dynamo's refusal,
    whose user-code traceback names the function."""
    import torch._dynamo

    g = torch.Generator().manual_seed(15)
    z = torch.randn(6, 5, generator=g, dtype=F64, requires_grad=True)
    w = torch.randn(5, 3, generator=g, dtype=F64, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3, 4, -100])

    def step(a):
        out = (vocab_parallel_cross_entropy(a, y) if entry == "cross_entropy"
               else vocab_parallel_linear_cross_entropy(a, w, y.clamp(max=4)))
        return 2 * out

    a = z if entry == "cross_entropy" else z[:, :3].detach().requires_grad_()
    torch._dynamo.reset()
    try:
        got = torch.compile(step, backend="eager")(a)
        got_grad, = torch.autograd.grad(got, a)
        want = 2 * (F.cross_entropy(a, y) if entry == "cross_entropy"
                    else F.cross_entropy(F.linear(a, w), y.clamp(max=4)))
        want_grad, = torch.autograd.grad(want, a)
        _close(got, want, 1e-12, 1e-12, "loss")
        _close(got_grad, want_grad, 1e-12, 1e-12, "grad")
        torch._dynamo.reset()
        with pytest.raises(torch._dynamo.exc.Unsupported, match="vocab_parallel"):
            torch.compile(step, backend="eager", fullgraph=True)(a)
    finally:
        torch._dynamo.reset()
