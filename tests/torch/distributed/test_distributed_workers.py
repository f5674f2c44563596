"""The vocab-parallel functions' local work on crossent's CPU worker threads
(crossent.torch._blockpool, backend="rowblock"/"auto" on CPU): on 2 and 3 gloo ranks with an
uneven split, every option, several row blocks per call (the block size is lowered in the
children) and two torch threads per rank, the losses and gradients are bit-identical to the
same blocks run in the calling thread (crossent.torch.set_block_workers(False)) and equal
single-process torch.nn.functional.cross_entropy / F.linear in float64 (z_loss and softcap
added by hand). The blocks really ran on worker threads, and every collective in the calling
thread. Ranks disagreeing on backend= raise the same error together."""

from __future__ import annotations

import functools
import re
import threading

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from dist_harness import run_group, torch_reference

import crossent.torch as xt
from crossent.errors import InputError, UnsupportedError
from crossent.torch import _blockpool
from crossent.torch.distributed import (
    _common,
    vocab_parallel_cross_entropy,
    vocab_parallel_linear_cross_entropy,
)

pytestmark = pytest.mark.timeout(120)

N, D = 21, 5
SIZES = {2: [23, 17], 3: [19, 0, 25]}  # uneven; an empty slice on the middle rank
TOL = {torch.float64: 1e-11, torch.float32: 2e-5, torch.bfloat16: 3e-2}


def bits(t):
    t = t.detach()
    return t.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])


def identical(a, b, what):
    assert a.dtype == b.dtype and a.shape == b.shape, what
    assert torch.equal(bits(a), bits(b)), f"{what}: workers differ from the calling thread"


def close(got, want, dtype, what):
    tol = TOL[dtype]
    torch.testing.assert_close(got.detach().double(), want.detach(), rtol=tol, atol=tol,
                               equal_nan=True, msg=lambda m: f"{what}: {m}")


class Spy:
    """Which threads ran the local blocks and the collectives (inside a child)."""

    def __init__(self):
        self.block_threads: set[int] = set()
        self.current = self.block_threads  # where the next blocks' threads are recorded
        self.collective_threads: set[int] = set()

    def install(self):
        # the local work reaches the workers through _blockpool.run_blocks (run_row_blocks)
        run_blocks, all_reduce = _blockpool.run_blocks, dist.all_reduce

        def spied_run_blocks(fn, blocks):
            def traced(*block):
                self.current.add(threading.get_ident())
                return fn(*block)
            return run_blocks(traced, blocks)

        def spied_all_reduce(*args, **kwargs):
            self.collective_threads.add(threading.get_ident())
            return all_reduce(*args, **kwargs)

        _blockpool.run_blocks, dist.all_reduce = spied_run_blocks, spied_all_reduce


def _data(world, dtype, g):
    sizes = SIZES[world]
    v = sum(sizes)
    full = (torch.randn(N, v, generator=g, dtype=torch.float64) * 3).to(dtype).double()
    t = torch.randint(0, v, (N,), generator=g)
    t[::5] = -100
    t[1] = v - 1  # the last class (the last rank's slice)
    w = (torch.rand(v, generator=g, dtype=torch.float64) + 0.5).to(dtype).double()
    w[int(t[3])] = 0.0  # a counted row whose target weighs 0
    return sizes, full, t, w


_SPY: Spy | None = None  # set in the children


def _both(fn):
    """``fn()`` with the workers, then with every block in the calling thread (checked)."""
    out = []
    for enabled in (True, False):
        xt.set_block_workers(enabled)
        threads: set[int] = set()
        if _SPY is not None:
            _SPY.current = threads
        try:
            out.append(fn())
        finally:
            xt.set_block_workers(True)
        if _SPY is not None:
            _SPY.current = _SPY.block_threads
            _SPY.block_threads |= threads
            if not enabled:
                assert threads <= {threading.get_ident()}, "a block ran on a worker thread"
    return out


# (eps, zeta, weighted, softcap, reduction): every option on and off, in pairs
COMBOS = [
    (0.0, 0.0, False, None, "mean"), (0.1, 0.0, False, None, "none"),
    (0.0, 0.01, True, None, "sum"), (0.1, 0.01, True, 4.0, "mean"),
    (0.1, 0.0, True, None, "mean"), (0.0, 0.01, False, 4.0, "none"),
    (0.1, 0.01, False, 4.0, "sum"), (0.0, 0.0, True, 4.0, "mean"),
    (0.1, 0.01, True, None, "none"), (0.0, 0.0, False, 4.0, "sum"),
]


def _run_ce(logits, t, lo, hi, dtype, wt, eps, zeta, cap, reduction, go):
    local = logits[:, lo:hi].detach().to(dtype).clone().requires_grad_()
    out = vocab_parallel_cross_entropy(
        local, t, vocab_start=lo, label_smoothing=eps, z_loss=zeta, softcap=cap,
        weight=None if wt is None else wt[lo:hi].to(dtype), reduction=reduction)
    out.backward(go.to(dtype))
    return out, local.grad


def _check_cross_entropy(rank, world):
    g = torch.Generator().manual_seed(7)  # the same stream on every rank
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        sizes, full, t, w = _data(world, dtype, g)
        lo = sum(sizes[:rank])
        hi = lo + sizes[rank]
        nan_rows = full.clone()
        nan_rows[2, 0] = float("nan")  # a counted row (rank 0's slice) ...
        nan_rows[5, -1] = float("nan")  # ... and an ignored one (the last rank's)
        assert t[5] == -100 and t[2] != -100
        for k, (eps, zeta, weighted, cap, reduction) in enumerate(COMBOS):
            if dtype != torch.float64 and k % 3:  # low precision: some of the combos
                continue
            logits = nan_rows if k % 2 else full
            wt = w if weighted else None
            go = (torch.randn(N, generator=g, dtype=torch.float64) if reduction == "none"
                  else torch.tensor(1.3, dtype=torch.float64))
            what = f"{dtype} eps={eps} zeta={zeta} weighted={weighted} cap={cap} {reduction}"
            run = functools.partial(_run_ce, logits, t, lo, hi, dtype, wt, eps, zeta, cap,
                                    reduction, go)
            (out, grad), (out_serial, grad_serial) = _both(run)
            identical(out, out_serial, what + " loss")
            identical(grad, grad_serial, what + " grad")
            ref_in = logits.clone().requires_grad_()
            ref = torch_reference(ref_in, t, wt, eps, zeta, cap, reduction)
            ref.backward(go)
            close(out, ref, dtype, what + " loss")
            close(grad, ref_in.grad[:, lo:hi], dtype, what + " grad")


def _run_linear(x, w, b, t, lo, hi, dtype, wt, eps, zeta, cap, reduction, go):
    xr, wr, br = (p.detach().to(dtype).clone().requires_grad_()
                  for p in (x, w[lo:hi], b[lo:hi]))
    out = vocab_parallel_linear_cross_entropy(
        xr, wr, t, local_bias=br, vocab_start=lo, label_smoothing=eps, z_loss=zeta,
        softcap=cap, weight=None if wt is None else wt[lo:hi].to(dtype), reduction=reduction,
        chunk_size=8)  # 3 chunks, each of several blocks
    out.backward(go.to(dtype))
    return out, xr.grad, wr.grad, br.grad


def _check_linear(rank, world):
    g = torch.Generator().manual_seed(8)
    for dtype in (torch.float64, torch.float32):
        sizes, _, t, cw = _data(world, dtype, g)
        v = sum(sizes)
        lo = sum(sizes[:rank])
        hi = lo + sizes[rank]
        x, w, b = (torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).double()
                   for shape in ((N, D), (v, D), (v,)))
        for eps, zeta, weighted, cap, reduction in COMBOS[3::2] if dtype == torch.float64 \
                else COMBOS[:2]:
            wt = cw if weighted else None
            go = (torch.randn(N, generator=g, dtype=torch.float64) if reduction == "none"
                  else torch.tensor(0.7, dtype=torch.float64))
            what = f"linear {dtype} eps={eps} zeta={zeta} weighted={weighted} cap={cap}"
            run = functools.partial(_run_linear, x, w, b, t, lo, hi, dtype, wt, eps, zeta, cap,
                                    reduction, go)
            got, serial = _both(run)
            for name, a, s in zip(("loss", "dx", "dW", "db"), got, serial, strict=True):
                identical(a, s, f"{what} {name}")
            rx, rw, rb = (p.clone().requires_grad_() for p in (x, w, b))
            ref = torch_reference(F.linear(rx, rw, rb), t, wt, eps, zeta, cap, reduction)
            ref.backward(go)
            for name, a, want in zip(("loss", "dx", "dW", "db"), got,
                                     (ref, rx.grad, rw.grad[lo:hi], rb.grad[lo:hi]),
                                     strict=True):
                close(a, want, dtype, f"{what} {name}")


def _check_workers(rank, world):
    torch.set_num_threads(2)  # the harness sets 1: the workers need two
    _common._BLOCK_ELEMS = 120  # blocks of 4-6 rows: several per call (two per chunk)
    global _SPY
    spy = _SPY = Spy()
    spy.install()
    main = threading.get_ident()
    _check_cross_entropy(rank, world)
    _check_linear(rank, world)
    assert spy.collective_threads == {main}, "a collective ran outside the calling thread"
    if _blockpool.workers_enabled() and SIZES[world][rank]:  # an OpenMP build of torch
        assert spy.block_threads - {main}, "no block ran on a worker thread"
    if world == 3:  # one process start-up for both checks
        _check_backend_agreement(rank, world)


@pytest.mark.parametrize("world", [2, 3])
def test_workers_bit_identical_and_equal_to_torch(world):
    """On 3 ranks also: ranks disagreeing on backend= raise the same error together."""
    run_group(_check_workers, world, timeout=100)


def _outcome(fn):
    try:
        fn()
        return "no error"
    except (InputError, UnsupportedError) as e:
        return f"{type(e).__name__}: {e}"


def _check_backend_agreement(rank, world):
    last = world - 1
    g = torch.Generator().manual_seed(9)
    full = torch.randn(4, 3 * world, generator=g, dtype=torch.float64)
    t = torch.randint(0, 3 * world, (4,), generator=g)
    local = full[:, 3 * rank:3 * rank + 3]
    x = torch.randn(4, 2, generator=g, dtype=torch.float64)
    w = torch.randn(3 * world, 2, generator=g, dtype=torch.float64)[3 * rank:3 * rank + 3]

    def ce(backend):
        return lambda: vocab_parallel_cross_entropy(local, t, backend=backend)

    def lin(backend):
        return lambda: vocab_parallel_linear_cross_entropy(x, w, t, backend=backend)

    for call in (ce, lin):
        # every rank raises the same InputError, naming the ranks' values
        got = _outcome(call("rowblock" if rank == last else "auto"))
        want = (r"InputError: backend differs across the ranks of the group \(rank 0: 'auto'"
                rf".*rank {last}: 'rowblock'\)")
        assert re.search(want, got), got
        # a bad value on one rank: its own message there, the others name that rank
        got = _outcome(call("cuda" if rank == last else "auto"))
        want = "backend='cuda' must be one of" if rank == last else \
            f"InputError: rank {last} of the group reported invalid input"
        assert re.search(want, got), got
        # torch has no vocab-parallel kernel: refused on every rank, naming the feature
        got = _outcome(call("native"))
        assert got.startswith("UnsupportedError") and "backend='native'" in got, got
        # the group still works, and every rank agrees on the value
        assert torch.isfinite(call("rowblock")())

