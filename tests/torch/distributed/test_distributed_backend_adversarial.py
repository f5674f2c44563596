"""Adversarial checks of the vocab-parallel functions' local work (backend= "auto" /
"rowblock" on CPU through crossent's worker threads; the Triton route is checked in
tests/triton/test_triton_vocab_parallel_adversarial.py).

References are independent of crossent: torch.nn.functional.cross_entropy / F.linear in
float64 on the gathered logits (dist_harness.torch_reference: z_loss and softcap by hand).

1. Single process (no process group): degenerate denominators (every class weight 0,
   weights summing to 0, every row ignored) for the loss and every gradient; non-finite
   logits (1e4, -1e4, a row of -inf, +inf, NaN); every dtype; N = 0 and one row; strided,
   transposed and expanded logits and views sharing memory; grad_output per row; backward
   twice and double backward; requires_grad on the weight; two threads at once; the worker
   threads bit-identical to the calling thread.
2. One 3-rank gloo run (uneven split, an empty slice): NaN in a counted row on one rank
   reaches every rank's loss and gradient; the zero-weight denominator; ranks disagreeing
   on backend= (every pair of values) raise the same InputError; an invalid backend on one
   rank; the group still works afterwards. Under a timeout: a hang fails.
"""

from __future__ import annotations

import math
import threading

import pytest
import torch
import torch.nn.functional as F
from dist_harness import run_group, torch_reference

import crossent.torch as xt
from crossent.errors import InputError, UnsupportedError
from crossent.torch.distributed import (
    _common,
    vocab_parallel_cross_entropy,
    vocab_parallel_linear_cross_entropy,
)

pytestmark = pytest.mark.timeout(120)

TOL = {torch.float64: 1e-10, torch.float32: 3e-5, torch.bfloat16: 3e-2, torch.float16: 3e-3}


def close(got, want, dtype, what):
    tol = TOL[dtype]
    got, want = got.detach().double(), want.detach().double()
    finite = want[torch.isfinite(want)]
    scale = float(finite.abs().max()) if finite.numel() else 1.0
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * max(scale, 1.0),
                               equal_nan=True, msg=lambda m: f"{what}: {m}")


def ce_and_grad(z, t, dtype=torch.float64, go=None, **kw):
    """crossent's loss and logit gradient for the float64 logits ``z`` cast to ``dtype``."""
    local = z.detach().to(dtype).clone().requires_grad_()
    w = kw.pop("weight", None)
    out = vocab_parallel_cross_entropy(local, t, weight=None if w is None else w.to(dtype), **kw)
    out.backward(torch.ones_like(out) if go is None else go.to(dtype))
    return out, local.grad


def ref_and_grad(z, t, go=None, weight=None, label_smoothing=0.0, z_loss=0.0, softcap=None,
                 reduction="mean", ignore_index=-100):
    zin = z.detach().double().clone().requires_grad_()
    out = torch_reference(zin, t, weight, label_smoothing, z_loss, softcap, reduction,
                          ignore_index)
    out.backward(torch.ones_like(out) if go is None else go)
    return out, zin.grad


# ---- 1. single process ----------------------------------------------------------------


@pytest.mark.parametrize("backend", ["auto", "rowblock"])
@pytest.mark.parametrize("case", ["zero_weights", "weights_sum_to_zero", "all_ignored"])
def test_degenerate_mean_denominator_matches_torch(case, backend):
    """torch: every class weight 0 -> loss 0/0 = NaN and a NaN gradient on every counted
    row (its nll backward divides by the zero total weight); weights summing to 0 -> +-inf
    loss; every row ignored -> NaN loss, zero gradient. The linear head: dx NaN on counted
    rows, 0 on ignored ones, dW NaN (0 when every row is ignored)."""
    g = torch.Generator().manual_seed(1)
    z = torch.randn(5, 7, generator=g, dtype=torch.float64)
    t = torch.tensor([1, -100, 3, 4, 6])
    w = torch.rand(7, generator=g, dtype=torch.float64) + 0.5
    if case == "zero_weights":
        w = torch.zeros(7, dtype=torch.float64)
    elif case == "weights_sum_to_zero":
        w = torch.tensor([1.0, 2.0, -1.0, 0.5, 0.25, 3.0, -1.75], dtype=torch.float64)
    else:
        t = torch.full((5,), -100)
    out, grad = ce_and_grad(z, t, weight=w, backend=backend)
    ref, rgrad = ref_and_grad(z, t, weight=w)
    close(out, ref, torch.float64, f"{case} loss")
    close(grad, rgrad, torch.float64, f"{case} gradient")
    x = torch.randn(5, 3, generator=g, dtype=torch.float64)
    lw = torch.randn(7, 3, generator=g, dtype=torch.float64)
    b = torch.randn(7, generator=g, dtype=torch.float64)
    xs, ws, bs = (p.clone().requires_grad_() for p in (x, lw, b))
    lin = vocab_parallel_linear_cross_entropy(xs, ws, t, local_bias=bs, weight=w,
                                              backend=backend)
    lin.backward(torch.tensor(0.5, dtype=torch.float64))
    xr, wr, br = (p.clone().requires_grad_() for p in (x, lw, b))
    rl = torch_reference(F.linear(xr, wr, br), t, w)
    rl.backward(torch.tensor(0.5, dtype=torch.float64))
    close(lin, rl, torch.float64, f"{case} linear loss")
    for name, a, want in (("dx", xs.grad, xr.grad), ("dW", ws.grad, wr.grad),
                          ("db", bs.grad, br.grad)):
        close(a, want, torch.float64, f"{case} linear {name}")


def _nonfinite_logits():
    """Rows: 1e4 and -1e4 logits, a row of -inf (counted: loss inf/NaN as torch), a +inf
    logit, a NaN in a counted row and in an ignored one, an ordinary row."""
    g = torch.Generator().manual_seed(2)
    z = torch.randn(8, 11, generator=g, dtype=torch.float64)
    z[0, 3], z[0, 7] = 1e4, -1e4
    z[1] = -1e4
    z[1, 5] = 1e4
    z[2] = -math.inf
    z[3, 2] = math.inf
    z[4, 9] = math.nan
    z[5, 0] = math.nan
    z[6, :5] = -math.inf  # the target's logit -inf: loss +inf
    t = torch.tensor([3, 5, 4, 1, 2, -100, 2, 10])
    return z, t


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16,
                                   torch.float16])
def test_nonfinite_and_huge_logits_every_dtype(dtype):
    z, t = _nonfinite_logits()
    z = z.to(dtype).double()  # values exact in dtype (1e4 rounds in bf16/fp16)
    w = torch.linspace(0.5, 1.5, 11, dtype=torch.float64).to(dtype).double()
    go = torch.linspace(-1.0, 2.0, 8, dtype=torch.float64)
    for kw in (dict(), dict(weight=w, label_smoothing=0.2), dict(reduction="none"),
               dict(reduction="sum", label_smoothing=1.0), dict(weight=w, reduction="none")):
        red = kw.get("reduction", "mean")
        gout = go if red == "none" else None
        out, grad = ce_and_grad(z, t, dtype, gout, **kw)
        ref, rgrad = ref_and_grad(z, t, gout, **kw)
        assert out.dtype == dtype and grad.dtype == dtype
        close(out, ref, dtype, f"{dtype} {kw} loss")
        # torch's own low-precision gradient rounds to dtype; the reference is float64
        close(grad, rgrad.to(dtype), dtype, f"{dtype} {kw} gradient")


def test_empty_batch_one_row_and_one_class():
    for n, v in ((0, 5), (1, 5), (3, 1), (1, 1)):
        g = torch.Generator().manual_seed(n * 10 + v)
        z = torch.randn(n, v, generator=g, dtype=torch.float64)
        t = torch.randint(0, v, (n,), generator=g)
        for red in ("mean", "sum", "none"):
            go = torch.linspace(-1, 1, n, dtype=torch.float64) if red == "none" else None
            out, grad = ce_and_grad(z, t, go=go, reduction=red, label_smoothing=0.3)
            ref, rgrad = ref_and_grad(z, t, go, reduction=red, label_smoothing=0.3)
            assert out.shape == ref.shape and grad.shape == z.shape
            close(out, ref, torch.float64, f"N={n} V={v} {red} loss")
            close(grad, rgrad, torch.float64, f"N={n} V={v} {red} gradient")


def test_strided_transposed_expanded_logits_and_shared_memory():
    g = torch.Generator().manual_seed(3)
    base = torch.randn(6, 20, generator=g, dtype=torch.float32)
    t = torch.tensor([0, 3, -100, 7, 2, 1])
    w = torch.rand(8, generator=g) + 0.5
    go = torch.linspace(-2, 1, 6, dtype=torch.float64)
    views = {
        "column slice": lambda b: b[:, 5:13],
        "every other column": lambda b: b[:, ::2][:, :8],
        "transposed": lambda b: b[:, :8].t().contiguous().t(),
        "expanded row": lambda b: b[0, :8].expand(6, 8),
        "3-d view": lambda b: b[:, :8].reshape(2, 3, 8),
    }
    for name, view in views.items():
        for backend in ("auto", "rowblock"):
            leaf = base.clone().requires_grad_()
            local = view(leaf)
            tt = t.reshape(local.shape[:-1])
            out = vocab_parallel_cross_entropy(local, tt, weight=w, softcap=5.0, z_loss=1e-3,
                                               reduction="none", backend=backend)
            out.backward(go.float().reshape(out.shape))
            ref_leaf = base.double().clone().requires_grad_()
            rl = view(ref_leaf).reshape(6, 8)
            ref = torch_reference(rl, t, w.double(), 0.0, 1e-3, 5.0, "none")
            ref.backward(go)
            close(out.reshape(-1), ref, torch.float32, f"{name} {backend} loss")
            close(leaf.grad, ref_leaf.grad, torch.float32, f"{name} {backend} gradient")
    # the weight a view of the logits' own storage: read, never written
    storage = torch.randn(4, 9, generator=g, dtype=torch.float64)
    logits, weight = storage[:, :8].clone().requires_grad_(), storage[0, 1:9].abs()
    before = storage.clone()
    tt = torch.tensor([1, 2, 3, 4])
    out = vocab_parallel_cross_entropy(logits, tt, weight=weight, label_smoothing=0.1)
    out.backward()
    assert torch.equal(storage, before)
    ref, rgrad = ref_and_grad(logits, tt, weight=weight.clone(), label_smoothing=0.1)
    close(out, ref, torch.float64, "weight sharing memory: loss")
    close(logits.grad, rgrad, torch.float64, "weight sharing memory: gradient")


def test_grad_output_backward_twice_and_double_backward():
    g = torch.Generator().manual_seed(4)
    z = torch.randn(5, 6, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 5, -100, 2, 3])
    for red in ("mean", "sum", "none"):
        local = z.clone().requires_grad_()
        out = vocab_parallel_cross_entropy(local, t, reduction=red, z_loss=0.01)
        go = (torch.linspace(-3, 3, 5, dtype=torch.float64) if red == "none"
              else torch.tensor(-2.5, dtype=torch.float64))
        out.backward(go, retain_graph=True)
        first = local.grad.clone()
        out.backward(go)  # twice: the same gradient again, accumulated
        _, rgrad = ref_and_grad(z, t, go, reduction=red, z_loss=0.01)
        close(first, rgrad, torch.float64, f"{red} first backward")
        close(local.grad, 2 * rgrad, torch.float64, f"{red} second backward")
        if red == "none":  # grad_output expanded from a scalar (stride 0)
            local.grad = None
            out = vocab_parallel_cross_entropy(local, t, reduction=red, z_loss=0.01)
            (out * 1.5).sum().backward()
            _, rgrad = ref_and_grad(z, t, torch.full((5,), 1.5, dtype=torch.float64),
                                    reduction=red, z_loss=0.01)
            close(local.grad, rgrad, torch.float64, "none, grad_output of a sum")
        local2 = z.clone().requires_grad_()
        out2 = vocab_parallel_cross_entropy(local2, t, reduction=red)
        with pytest.raises(UnsupportedError, match="double backward"):
            torch.autograd.grad(out2, local2, torch.ones_like(out2), create_graph=True)
    # the linear head: "none" recomputes (twice is fine), the others refuse a second
    x = torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    lw = torch.randn(6, 3, generator=g, dtype=torch.float64, requires_grad=True)
    lin = vocab_parallel_linear_cross_entropy(x, lw, t)
    lin.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="vocab_parallel_linear_cross_entropy"):
        lin.backward()
    lin = vocab_parallel_linear_cross_entropy(x, lw, t)
    with pytest.raises(UnsupportedError, match="double backward"):
        torch.autograd.grad(lin, (x, lw), create_graph=True)


def test_weight_requiring_grad_is_refused_and_integer_target():
    z = torch.randn(3, 4, requires_grad=True)
    w = torch.ones(4, requires_grad=True)
    t = torch.tensor([0, 1, 2])
    for backend in ("auto", "rowblock", "triton"):
        with pytest.raises(UnsupportedError, match="weight"):
            vocab_parallel_cross_entropy(z, t, weight=w, backend=backend)
    with torch.no_grad():  # nothing to differentiate: accepted
        out = vocab_parallel_cross_entropy(z, t, weight=w)
    close(out, torch_reference(z.detach().double(), t, w.detach().double()),
          torch.float32, "no_grad weight")
    with pytest.raises(InputError, match="target"):
        vocab_parallel_cross_entropy(z, t.float())


@pytest.mark.parametrize("bad", ["cuda", "Triton", None, 3, ["auto"]])
def test_invalid_backend_names_the_argument(bad):
    z = torch.randn(3, 4)
    t = torch.tensor([0, 1, 2])
    with pytest.raises(InputError, match="backend="):
        vocab_parallel_cross_entropy(z, t, backend=bad)
    with pytest.raises(InputError, match="backend="):
        vocab_parallel_linear_cross_entropy(torch.randn(3, 2), torch.randn(4, 2), t,
                                            backend=bad)


def _worker_data(seed):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(37, 50, generator=g, dtype=torch.float32) * 4
    t = torch.randint(0, 50, (37,), generator=g)
    t[::4] = -100
    z[5, 7] = math.nan
    w = torch.rand(50, generator=g) + 0.25
    return z, t, w


def test_workers_bit_identical_and_two_threads_at_once(monkeypatch):
    """Many row blocks (the block size lowered): workers on / off give the same bits; two
    Python threads calling at once (no process group) both get torch's numbers."""
    monkeypatch.setattr(_common, "_BLOCK_ELEMS", 150)  # 3 rows a block: 13 blocks
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        z, t, w = _worker_data(5)
        kw = dict(weight=w, label_smoothing=0.1, z_loss=1e-3, softcap=6.0, reduction="none")
        got = []
        for enabled in (True, False):
            xt.set_block_workers(enabled)
            try:
                got.append(ce_and_grad(z, t, torch.float32,
                                       torch.linspace(-1, 1, 37, dtype=torch.float64), **kw))
            finally:
                xt.set_block_workers(True)
        for a, b in zip(got[0], got[1], strict=True):
            assert torch.equal(a.view(torch.int32), b.view(torch.int32))
        ref, rgrad = ref_and_grad(z, t, torch.linspace(-1, 1, 37, dtype=torch.float64),
                                  w.double(), 0.1, 1e-3, 6.0, "none")
        close(got[0][0], ref, torch.float32, "workers loss")
        close(got[0][1], rgrad, torch.float32, "workers gradient")

        results: dict[int, tuple] = {}
        errors: list[BaseException] = []
        start = threading.Barrier(2)

        def call(seed):
            try:
                zs, ts, ws = _worker_data(seed)
                start.wait()
                for _ in range(3):
                    results[seed] = ce_and_grad(zs, ts, torch.float32, weight=ws,
                                                label_smoothing=0.2)
            except BaseException as e:  # handed to the test thread
                errors.append(e)

        workers = [threading.Thread(target=call, args=(s,)) for s in (11, 12)]
        for th in workers:
            th.start()
        for th in workers:
            th.join(60)
        assert not errors, errors
        for seed in (11, 12):
            zs, ts, ws = _worker_data(seed)
            ref, rgrad = ref_and_grad(zs, ts, None, ws.double(), 0.2)
            close(results[seed][0], ref, torch.float32, f"thread {seed} loss")
            close(results[seed][1], rgrad, torch.float32, f"thread {seed} gradient")
    finally:
        torch.set_num_threads(threads)


# ---- 2. one 3-rank gloo run ------------------------------------------------------------

SIZES = [9, 0, 14]  # uneven, an empty slice on the middle rank


def _outcome(fn):
    try:
        fn()
        return "no error"
    except (InputError, UnsupportedError) as e:
        return f"{type(e).__name__}: {e}"


def _group_data():
    g = torch.Generator().manual_seed(21)  # the same stream on every rank
    v = sum(SIZES)
    z = torch.randn(10, v, generator=g, dtype=torch.float64) * 3
    t = torch.randint(0, v, (10,), generator=g)
    t[7] = -100
    z[1, 12] = math.nan  # a counted row: NaN on the last rank's slice only
    z[2, 3] = math.inf  # a counted row: +inf on rank 0's slice only
    z[3, :9] = -math.inf  # rank 0's whole slice -inf, the last rank's finite
    z[7, 10] = math.nan  # an ignored row holding NaN
    w = torch.rand(v, generator=g, dtype=torch.float64) + 0.5
    return z, t, w


def _check_nan_reaches_every_rank(rank, lo, hi, backend):
    z, t, w = _group_data()
    assert t[1] != -100 and t[2] != -100 and t[3] >= 9
    go = torch.linspace(-1, 2, 10, dtype=torch.float64)
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        for kw in (dict(reduction="none", weight=w, label_smoothing=0.1),
                   dict(reduction="mean", z_loss=1e-3, softcap=8.0),
                   dict(reduction="sum", weight=w)):
            red = kw["reduction"]
            local = z[:, lo:hi].to(dtype).clone().requires_grad_()
            wt = kw.get("weight")
            out = vocab_parallel_cross_entropy(
                local, t, vocab_start=lo, backend=backend,
                **{**kw, "weight": None if wt is None else wt[lo:hi].to(dtype)})
            out.backward(go.to(dtype) if red == "none" else torch.tensor(0.7, dtype=dtype))
            zin = z.to(dtype).double().clone().requires_grad_()
            ref = torch_reference(zin, t, None if wt is None else wt.to(dtype).double(),
                                  kw.get("label_smoothing", 0.0), kw.get("z_loss", 0.0),
                                  kw.get("softcap"), red)
            ref.backward(go if red == "none" else torch.tensor(0.7, dtype=torch.float64))
            what = f"rank {rank} {dtype} {kw}"
            if red == "none":
                assert torch.isnan(out[1]) and torch.isnan(out[2]), what
                assert out[7] == 0, what
            else:
                assert torch.isnan(out), what  # every rank, whichever slice held it
            if hi > lo:
                assert torch.isnan(local.grad[1]).all(), what
                assert torch.isnan(local.grad[7]).all(), what  # as torch: ignored, NaN
            close(out, ref, dtype, what + " loss")
            close(local.grad, zin.grad[:, lo:hi].to(dtype), dtype, what + " gradient")
    # the linear head: NaN in one rank's weight slice reaches every rank's loss and dx
    g = torch.Generator().manual_seed(22)
    x = torch.randn(10, 4, generator=g, dtype=torch.float64)
    lw = torch.randn(sum(SIZES), 4, generator=g, dtype=torch.float64)
    lw[11, 2] = math.nan
    xs, ws = x.clone().requires_grad_(), lw[lo:hi].clone().requires_grad_()
    out = vocab_parallel_linear_cross_entropy(xs, ws, t, vocab_start=lo, chunk_size=4,
                                              backend=backend)
    out.backward()
    assert torch.isnan(out) and torch.isnan(xs.grad[:7]).all(), f"rank {rank} linear"


def _check_zero_weight_denominator(rank, lo, hi, backend):
    z, t, _ = _group_data()
    z = torch.nan_to_num(z, nan=0.5, posinf=30.0, neginf=-30.0)
    w = torch.zeros(sum(SIZES), dtype=torch.float64)
    local = z[:, lo:hi].clone().requires_grad_()
    out = vocab_parallel_cross_entropy(local, t, vocab_start=lo, weight=w[lo:hi],
                                       backend=backend)
    out.backward()
    ref, rgrad = ref_and_grad(z, t, weight=w)
    close(out, ref, torch.float64, f"rank {rank} zero weights loss")
    close(local.grad, rgrad[:, lo:hi], torch.float64, f"rank {rank} zero weights gradient")
    g = torch.Generator().manual_seed(23)
    x = torch.randn(10, 3, generator=g, dtype=torch.float64)
    lw = torch.randn(sum(SIZES), 3, generator=g, dtype=torch.float64)
    xs, ws = x.clone().requires_grad_(), lw[lo:hi].clone().requires_grad_()
    out = vocab_parallel_linear_cross_entropy(xs, ws, t, vocab_start=lo, weight=w[lo:hi],
                                              chunk_size=4, backend=backend)
    out.backward()
    xr, wr = x.clone().requires_grad_(), lw.clone().requires_grad_()
    want = torch_reference(F.linear(xr, wr), t, w)
    want.backward()
    close(out, want, torch.float64, f"rank {rank} zero weights linear loss")
    close(xs.grad, xr.grad, torch.float64, f"rank {rank} zero weights linear dx")
    close(ws.grad, wr.grad[lo:hi], torch.float64, f"rank {rank} zero weights linear dW")


def _check_backend_disagreement(rank, world, lo, hi):
    z, t, _ = _group_data()
    local = z[:, lo:hi]
    x = torch.randn(10, 3, dtype=torch.float64)
    lw = torch.ones(hi - lo, 3, dtype=torch.float64)

    def calls(backend):
        return (lambda: vocab_parallel_cross_entropy(local, t, vocab_start=lo, backend=backend),
                lambda: vocab_parallel_linear_cross_entropy(x, lw, t, vocab_start=lo,
                                                            backend=backend))

    for values in (("auto", "auto", "rowblock"), ("rowblock", "auto", "auto"),
                   ("auto", "rowblock", "auto"), ("rowblock", "auto", "rowblock")):
        for call in calls(values[rank]):
            got = _outcome(call)
            shown = ", ".join(f"rank {r}: {v!r}" for r, v in enumerate(values))
            assert got == (f"InputError: backend differs across the ranks of the group "
                           f"({shown}); every rank must pass the same value"), got
    for bad in ("Rowblock", None, 1):  # an invalid value on the middle rank only
        for call in calls(bad if rank == 1 else "auto"):
            got = _outcome(call)
            if rank == 1:
                assert got.startswith(f"InputError: backend={bad!r} must be one of"), got
            else:
                assert got.startswith("InputError: rank 1 of the group reported invalid "
                                      "input"), got
    # "triton" on rank 0 only: usable (interpreter) -> the disagreement; else refused there
    # with UnsupportedError and the others name rank 0, raising the same type (stop 18):
    # every rank raises, nothing hangs
    for call in calls("triton" if rank == 0 else "rowblock"):
        got = _outcome(call)
        assert got != "no error"
        if "backend differs" not in got:
            want = ("UnsupportedError: " if rank == 0
                    else "UnsupportedError: rank 0 of the group")
            assert got.startswith(want), got
    # the group still works: every rank the same finite result
    out = vocab_parallel_cross_entropy(torch.nan_to_num(local, nan=0.0, posinf=9.0), t,
                                       vocab_start=lo, backend="rowblock")
    gathered = [torch.zeros((), dtype=torch.float64) for _ in range(world)]
    torch.distributed.all_gather(gathered, out)
    assert torch.isfinite(out) and all(torch.equal(o, out) for o in gathered)


def _check_group(rank, world):
    torch.set_num_threads(2)  # the worker threads need two
    lo = sum(SIZES[:rank])
    hi = lo + SIZES[rank]
    _check_nan_reaches_every_rank(rank, lo, hi, "auto")  # on CPU: the row blocks
    _check_zero_weight_denominator(rank, lo, hi, "rowblock")
    _check_backend_disagreement(rank, world, lo, hi)


def test_three_gloo_ranks_nan_denominators_and_backend_agreement():
    run_group(_check_group, len(SIZES), timeout=90)


