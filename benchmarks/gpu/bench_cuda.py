"""crossent's Triton cross-entropy and linear head against torch, torch.compile, Liger Kernel
and Cut Cross-Entropy on one CUDA GPU: time (median), peak extra memory, HBM floor.

    python benchmarks/gpu/bench_cuda.py                      # check + benchmark, H200
    python benchmarks/gpu/bench_cuda.py --bandwidth 3.35e12  # H100 SXM
    python benchmarks/gpu/bench_cuda.py --check-only         # correctness on the GPU only
    python benchmarks/gpu/bench_cuda.py --tiny --interpret   # smoke test on a CPU
    python benchmarks/gpu/bench_cuda.py --sweep-only         # launch variants only (~3 min)
    python benchmarks/gpu/bench_cuda.py --head-sweep-only    # the head's chunk rows, dW dtype

Every contender runs in this one process on the same tensors, forward + backward
(``loss.backward()``, ``grad_output`` 1), ``--repeats`` timed runs after ``--warmup``
untimed ones (``torch.compile``'s compilation happens in the warm-up), timed with CUDA
events; the table gives the median, its ratio to crossent, the peak memory allocated
during the run beyond what existed before it (``torch.cuda.max_memory_allocated``; inputs
and, for in-place kernels, their fresh copy of the logits excluded), and, for the
cross-entropy configurations, the HBM floor: one read of the logits plus one write of the
gradient, ``2 N V itemsize / bandwidth``. Liger Kernel and Cut Cross-Entropy are optional
imports (skipped with a note if missing or failing). ``--json PATH`` writes everything.
The check mode compares crossent with torch in float64 on large shapes (including one
with more than 2**31 logits: 64-bit offsets) before any timing. The vocab-parallel loss
(``crossent.torch.distributed``, Triton backend) is checked and timed in world 1: this
process never initialises torch.distributed, so the whole vocabulary is the local slice.
"""

from __future__ import annotations

import os
import sys

if "--interpret" in sys.argv:  # before triton is imported (torch._dynamo imports it)
    os.environ["TRITON_INTERPRET"] = "1"

import argparse
import functools
import json
import math
import statistics
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from crossent.torch._triton import (
    triton_cross_entropy,
    triton_linear_cross_entropy,
)
from crossent.torch._triton.fused_linear import fused_linear_cross_entropy

CE_CONFIGS = [  # (N, V, dtype)
    (16384, 128256, torch.bfloat16),
    (16384, 128256, torch.float32),
    (8192, 256000, torch.bfloat16),
    (8192, 256000, torch.float32),
]
LINEAR_CONFIGS = [(16384, 4096, 128256, torch.bfloat16)]  # (N, D, V, dtype)
TINY_CE = [(24, 300, torch.bfloat16), (16, 500, torch.float32)]
TINY_LINEAR = [(24, 32, 300, torch.bfloat16)]


DEADLINE = [math.inf]  # perf_counter() after which contenders are skipped


@dataclass
class Result:
    config: str
    contender: str
    times_ms: list[float] = field(default_factory=list)
    peak_extra_bytes: int | None = None
    note: str = ""

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms) if self.times_ms else math.nan


class Timer:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def measure(self, fn: Callable[[], Any]) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3


# ---------------------------------------------------------------- contenders (CE)
# each: prepare() -> state (untimed: fresh copies of in-place inputs), run(state) timed


def _ce_contenders(z0: torch.Tensor, y: torch.Tensor, compile_ok: bool):
    def leaf():
        z = z0.detach().clone().requires_grad_()  # the copy is outside the timed region
        return z

    def plain(fn):
        def run(z):
            fn(z, y).backward()
        return run

    # torch.compile last: its compilation is the slowest part of the run (--max-minutes)
    yield "torch", leaf, plain(F.cross_entropy)
    yield "crossent-triton", leaf, plain(triton_cross_entropy)
    def activation():
        # in place needs an activation's memory (a leaf's is never overwritten): the head
        # matmul's output in a model; here a clone of a leaf, made outside the timed region
        return z0.detach().requires_grad_().clone()

    yield "crossent-triton-inplace", activation, _inplace_run(y)
    try:
        import crossent.torch as xt
        yield "crossent-torchops", leaf, plain(xt.cross_entropy)
    except Exception as exc:  # pragma: no cover - the package is importable here
        yield "crossent-torchops", None, f"unavailable: {exc!r}"
    try:
        # world 1 (torch.distributed is never initialised here): see _vocab_parallel_world1
        yield "crossent-vocab-parallel", leaf, plain(_vocab_parallel_world1())
    except Exception as exc:  # pragma: no cover - the package is importable here
        yield "crossent-vocab-parallel", None, f"unavailable: {exc!r}"
    try:
        from liger_kernel.transformers.functional import liger_cross_entropy

        yield "liger", leaf, plain(lambda z, t: liger_cross_entropy(z, t))
    except Exception as exc:
        yield "liger", None, f"not installed: {type(exc).__name__}"
    if compile_ok:
        compiled = torch.compile(lambda z, t: F.cross_entropy(z, t), dynamic=False)
        yield "torch.compile", leaf, plain(compiled)


def _vocab_parallel_world1() -> Callable[..., torch.Tensor]:
    """``vocab_parallel_cross_entropy(z, y, **options)`` on the Triton kernels, in this
    process where torch.distributed is never initialised: world 1, the whole vocabulary
    is the local slice, no collective runs. Its time is the partials + gradient kernels
    plus the per-call agreement (target hashes, one host synchronisation), to compare
    with ``crossent-triton`` (the single-process kernel) on the same tensors."""
    import torch.distributed as dist

    from crossent.torch.distributed import vocab_parallel_cross_entropy

    if dist.is_available() and dist.is_initialized():  # would split nothing: refuse
        raise RuntimeError("torch.distributed is initialised; the world-1 contender "
                           "needs a process without a default group")
    return functools.partial(vocab_parallel_cross_entropy, backend="triton")


def _inplace_run(y):
    def run(z):
        # the gradient overwrites the activation z (as Liger's kernel overwrites its
        # logits); backward passes it through the clone to the leaf without a copy
        loss = triton_cross_entropy(z, y, inplace_backward=True)
        loss.backward()
    return run


# ------------------------------------------------------------ contenders (linear head)


def _linear_contenders(x0, w0, y, compile_ok: bool):
    def prep():
        return (x0.detach().clone().requires_grad_(), w0.detach().clone().requires_grad_())

    def unfused(state):
        x, w = state
        F.cross_entropy(F.linear(x, w), y).backward()

    yield "torch", prep, unfused
    if hasattr(F, "linear_cross_entropy"):
        yield "torch.linear_cross_entropy", prep, \
            lambda s: F.linear_cross_entropy(s[0], s[1], y).backward()
    yield "crossent-triton", prep, \
        lambda s: triton_linear_cross_entropy(s[0], s[1], y).backward()
    yield "crossent-fused (no NxV chunk)", prep, \
        lambda s: fused_linear_cross_entropy(s[0], s[1], y).backward()
    try:
        import crossent.torch as xt
        yield "crossent-torchops", prep, \
            lambda s: xt.linear_cross_entropy(s[0], s[1], y).backward()
    except Exception as exc:  # pragma: no cover
        yield "crossent-torchops", None, f"unavailable: {exc!r}"
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import (
            LigerFusedLinearCrossEntropyLoss,
        )

        liger = LigerFusedLinearCrossEntropyLoss()
        yield "liger", prep, lambda s: liger(s[1], s[0], y).backward()
    except Exception as exc:
        yield "liger", None, f"not installed: {type(exc).__name__}"
    try:
        from cut_cross_entropy import linear_cross_entropy as cce

        yield "cce", prep, lambda s: cce(s[0], s[1], y).backward()
    except Exception as exc:
        yield "cce", None, f"not installed: {type(exc).__name__}"
    if compile_ok:
        compiled = torch.compile(lambda x, w, t: F.cross_entropy(F.linear(x, w), t),
                                 dynamic=False)
        yield "torch.compile", prep, lambda s: compiled(s[0], s[1], y).backward()


# ----------------------------------------------------------------------- measurement


def measure(config: str, name: str, prepare, run, timer: Timer, device, warmup: int,
            repeats: int) -> Result:
    res = Result(config, name)
    if prepare is None:
        res.note = run
        return res
    if time.perf_counter() > DEADLINE[0]:
        res.note = "skipped: --max-minutes reached"
        return res
    try:
        for _ in range(warmup):
            state = prepare()
            run(state)
            del state
        for _ in range(repeats):
            state = prepare()
            timer.sync()
            if device.type == "cuda":
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            res.times_ms.append(timer.measure(lambda s=state: run(s)))
            if device.type == "cuda":
                peak = torch.cuda.max_memory_allocated() - base
                res.peak_extra_bytes = max(res.peak_extra_bytes or 0, peak)
            del state
    except Exception as exc:  # a contender failing must not end the run
        res.note = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
        res.times_ms.clear()
        traceback.print_exc(limit=2)
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return res


def ce_floor_ms(n: int, v: int, dtype: torch.dtype, bandwidth: float) -> float:
    """One read of the logits plus one write of the gradient at ``bandwidth`` bytes/s."""
    return 2 * n * v * dtype.itemsize / bandwidth * 1e3


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def run_benchmarks(args, device) -> list[dict]:
    timer = Timer(device)
    gen = torch.Generator(device=device).manual_seed(0)
    rows: list[dict] = []
    compile_ok = device.type == "cuda" and not args.no_compile
    ce_configs = TINY_CE if args.tiny else CE_CONFIGS
    lin_configs = TINY_LINEAR if args.tiny else LINEAR_CONFIGS
    if args.only in (None, "ce"):
        for n, v, dtype in ce_configs:
            config = f"ce {n}x{v} {_name(dtype)}"
            z0 = torch.randn(n, v, device=device, generator=gen, dtype=torch.float32)
            z0 = z0.mul_(2.0).to(dtype)
            y = torch.randint(0, v, (n,), device=device, generator=gen)
            floor = ce_floor_ms(n, v, dtype, args.bandwidth)
            results = [measure(config, name, prep, run, timer, device, args.warmup,
                               args.repeats)
                       for name, prep, run in _ce_contenders(z0, y, compile_ok)]
            rows += report(config, results, floor, args)
            del z0, y
    if args.only in (None, "linear"):
        for n, d, v, dtype in lin_configs:
            config = f"linear {n}x{d}->{v} {_name(dtype)}"
            x0 = torch.randn(n, d, device=device, generator=gen, dtype=torch.float32)
            w0 = torch.randn(v, d, device=device, generator=gen, dtype=torch.float32)
            x0, w0 = x0.to(dtype), w0.div_(math.sqrt(d)).to(dtype)
            y = torch.randint(0, v, (n,), device=device, generator=gen)
            results = [measure(config, name, prep, run, timer, device, args.warmup,
                               args.repeats)
                       for name, prep, run in _linear_contenders(x0, w0, y, compile_ok)]
            rows += report(config, results, None, args)
            del x0, w0, y
    return rows


def report(config: str, results: list[Result], floor: float | None, args) -> list[dict]:
    ours = next((r.median_ms for r in results if r.contender == "crossent-triton"), math.nan)
    print(f"\n== {config}" + (f"   HBM floor {floor:.3f} ms at {args.bandwidth / 1e12:.2f} TB/s"
                            if floor else ""))
    print(f"{'contender':28s} {'median ms':>10s} {'vs crossent':>11s} {'x floor':>8s} "
          f"{'peak extra GB':>13s}  note")
    out = []
    for r in results:
        med = r.median_ms
        mem = "" if r.peak_extra_bytes is None else f"{r.peak_extra_bytes / 1e9:.2f}"
        ratio = med / ours if ours == ours and med == med else math.nan
        xf = med / floor if floor else math.nan
        print(f"{r.contender:28s} {med:10.3f} {ratio:11.2f} {xf:8.2f} {mem:>13s}  {r.note}")
        out.append({"config": config, "contender": r.contender, "median_ms": med,
                    "times_ms": r.times_ms, "ratio_to_crossent": ratio,
                    "hbm_floor_ms": floor, "peak_extra_bytes": r.peak_extra_bytes,
                    "note": r.note})
    sys.stdout.flush()
    return out


# ------------------------------------------------------------------------- checks


def _close(name, got, want, rtol) -> str:
    got, want = got.detach().double(), want.detach().double()
    scale = float(want[torch.isfinite(want)].abs().max())
    err = float((got - want).abs().max()) / scale
    status = "ok" if err <= rtol else "FAIL"
    return f"{status} {name}: max error {err:.2e} of max |ref| (tolerance {rtol:.0e})"


def _reference_all_options(z: torch.Tensor, y: torch.Tensor, w: torch.Tensor):
    """torch in float64 with every option on (class weights ``w``, ignore_index -100,
    label smoothing 0.1, z-loss 1e-3, softcap 30): the float64 leaf, the per-row losses
    (ignored rows 0) and the weighted mean's denominator ``sum w[y]`` over counted rows."""
    zz = z.double().requires_grad_()
    zc = 30.0 * torch.tanh(zz / 30.0)
    rows = F.cross_entropy(zc, y, weight=w.double(), label_smoothing=0.1, reduction="none")
    counted = (y != -100).double()
    rows = rows + 1e-3 * torch.logsumexp(zc, 1).square() * counted
    safe = torch.where(y != -100, y, 0)
    return zz, rows, (w.double()[safe] * counted).sum()


def _vocab_parallel_checks(args, device, gen, tol) -> list[str]:
    """``vocab_parallel_cross_entropy(backend="triton")`` in world 1 (no process group:
    the whole vocabulary is the local slice, the weight vector is the whole one) against
    torch in float64, every option it takes at once (class weights, ignore_index, label
    smoothing, z-loss, softcap; none is refused in world 1) under each reduction
    (``"mean"``, ``"sum"`` with ``num_items``, ``"none"`` with a random ``grad_output``),
    for bf16 / fp16 / fp32 logits. A call that raises is a FAIL line, never a crash."""
    n, v = (33, 700) if args.tiny else (2048, 50257)  # V not a multiple of any tile width
    lines: list[str] = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        z = (torch.randn(n, v, device=device, generator=gen) * 3).to(dtype)
        y = torch.randint(0, v, (n,), device=device, generator=gen)
        y[::9] = -100
        w = (torch.rand(v, device=device, generator=gen) + 0.5).to(dtype)  # logits' dtype
        g = torch.randn(n, device=device, generator=gen).to(dtype)  # "none"'s grad_output
        num_items = float((y != -100).sum()) + 7.0  # as if counted over more micro-batches
        cases = [("mean", {}), ("sum", dict(reduction="sum", num_items=num_items)),
                 ("none", dict(reduction="none"))]
        for reduction, extra in cases:
            name = f"vocab-parallel ce {n}x{v} {_name(dtype)} all options {reduction}"
            try:
                leaf = z.clone().requires_grad_()
                loss = _vocab_parallel_world1()(leaf, y, weight=w, label_smoothing=0.1,
                                                z_loss=1e-3, softcap=30.0, **extra)
                loss.backward(g if reduction == "none" else None)
                zz, rows, denominator = _reference_all_options(z, y, w)
                if reduction == "none":
                    rows.backward(g.double())
                    want = rows
                else:
                    want = rows.sum() / (denominator if reduction == "mean" else num_items)
                    want.backward()
                # the loss is rounded once into the input dtype (at most 2^-9 relative in
                # bf16, 2^-11 in fp16: inside tol / 4); "none" rounds each row
                lines.append(_close(f"{name} loss", loss, want, max(1e-4, tol[dtype] / 4)))
                lines.append(_close(f"{name} grad", leaf.grad, zz.grad, tol[dtype]))
            except Exception as exc:  # a failing call is reported, the run goes on
                lines.append(f"FAIL {name}: raised {type(exc).__name__}: "
                             f"{str(exc).splitlines()[0][:120] if str(exc) else ''}")
                traceback.print_exc(limit=2)
        del z
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return lines


def _compiled_float16_checks(args, device, gen) -> list[str]:
    """Under ``torch.compile`` (inductor on the GPU) float16 logits and a float16-autocast
    linear head at a ``GradScaler``'s 2**16 take eager crossent's gradients bit for bit
    (the backward recomputes with the real grad_output, review H105), on the Triton
    route."""
    import crossent.torch as xt

    n, v = (16, 300) if args.tiny else (2048, 32000)
    z = (torch.randn(n, v, device=device, generator=gen) * 3).half()
    y = torch.randint(0, v, (n,), device=device, generator=gen)
    y[::7] = -100

    def loss(z, y):
        return xt.cross_entropy(z, y, loss_dtype=torch.float32, backend="triton")

    torch._dynamo.reset()
    compiled = torch.compile(loss, backend="inductor" if device.type == "cuda" else "aot_eager")
    grads = []
    for fn in (loss, compiled):
        leaf = z.clone().requires_grad_()
        (fn(leaf, y) * 2.0**16).backward()
        grads.append(leaf.grad)
    lines = [_bitwise_line(f"compiled ce {n}x{v} float16 grad at 2**16", grads)]
    # the linear head under float16 autocast (float32 masters), Triton route
    n, d, v = (16, 32, 300) if args.tiny else (2048, 1024, 32000)
    x = torch.randn(n, d, device=device, generator=gen)
    w = torch.randn(v, d, device=device, generator=gen) / math.sqrt(d)

    def head(x, w, y):
        with torch.autocast(device.type, dtype=torch.float16):
            return xt.linear_cross_entropy(x, w, y, backend="triton")

    y = torch.randint(0, v, (n,), device=device, generator=gen)
    torch._dynamo.reset()
    compiled = torch.compile(head, backend="inductor" if device.type == "cuda" else "aot_eager")
    runs = []
    for fn in (head, compiled):
        xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
        (fn(xx, ww, y) * 2.0**16).backward()
        runs.append((xx.grad, ww.grad))
    for i, name in enumerate(("dx", "dW")):
        lines.append(_bitwise_line(f"compiled float16-autocast head {n}x{d}->{v} {name} at "
                                   f"2**16", [r[i] for r in runs]))
    return lines


def _bitwise_line(what: str, pair) -> str:
    a, b = pair
    same = bool(((a == b) | (a.isnan() & b.isnan())).all())
    return f"{'ok' if same else 'FAIL'} {what} is eager's bit for bit"


def run_checks(args, device) -> list[str]:
    """crossent vs torch in float64 on large shapes, every option on; returns lines."""
    gen = torch.Generator(device=device).manual_seed(1)
    lines: list[str] = []
    shapes = [(40, 3000, torch.bfloat16), (33, 1000, torch.float32)] if args.tiny else [
        (4096, 128256, torch.bfloat16), (2048, 32000, torch.float32),
        (1024, 50000, torch.float16), (17000, 128256, torch.bfloat16)]  # > 2**31 logits
    tol = {torch.bfloat16: 1.6e-2, torch.float16: 2e-3, torch.float32: 1e-4}
    for n, v, dtype in shapes:
        z = (torch.randn(n, v, device=device, generator=gen) * 3).to(dtype)
        y = torch.randint(0, v, (n,), device=device, generator=gen)
        y[::9] = -100
        w = (torch.rand(v, device=device, generator=gen) + 0.5).to(dtype)  # torch: same dtype
        big = n * v > 2**31
        opts = ({} if big else
                dict(weight=w, label_smoothing=0.1, z_loss=1e-3, softcap=30.0))
        leaf = z.clone().requires_grad_()
        loss = triton_cross_entropy(leaf, y, **opts)
        loss.backward()
        if big:  # float64 reference row chunks (memory)
            want_rows, grads = [], []
            for i in range(0, n, 2048):
                zz = z[i:i + 2048].double().requires_grad_()
                r = F.cross_entropy(zz, y[i:i + 2048], reduction="sum")
                r.backward()
                want_rows.append(r.detach())
                grads.append(zz.grad.to(dtype))
            cnt = (y != -100).sum().double()
            want = torch.stack(want_rows).sum() / cnt
            gmax = max(float(g.double().abs().max()) for g in grads) / float(cnt)
            err = max(float((leaf.grad[i:i + 2048].double() - g.double() / cnt).abs().max())
                      for i, g in zip(range(0, n, 2048), grads, strict=True))
            # the loss comes back in the logits' dtype, as torch's: bfloat16 rounds a loss
            # of ~11.8 to within 2^-9 (H200 run: 1.96e-3 against a 1e-4 tolerance)
            lines.append(_close(f"ce {n}x{v} {_name(dtype)} (>2^31) loss", loss, want,
                                max(1e-4, tol[dtype] / 4)))
            lines.append(f"{'ok' if err <= tol[dtype] * gmax else 'FAIL'} ce {n}x{v} grad: "
                         f"max error {err / gmax:.2e} of max |ref|")
            del grads
        else:
            zz, rows, denominator = _reference_all_options(z, y, w)
            want = rows.sum() / denominator
            want.backward()
            lines.append(_close(f"ce {n}x{v} {_name(dtype)} all options loss", loss, want,
                                max(1e-4, tol[dtype] / 4)))
            lines.append(_close(f"ce {n}x{v} {_name(dtype)} all options grad", leaf.grad,
                                zz.grad, tol[dtype]))
        del z, leaf
        if device.type == "cuda":
            torch.cuda.empty_cache()
    lines += _vocab_parallel_checks(args, device, gen, tol)
    lines += _compiled_float16_checks(args, device, gen)
    # linear head against the unfused float64 head (every gradient)
    n, d, v = (24, 32, 300) if args.tiny else (1024, 1024, 32000)
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.randn(n, d, device=device, generator=gen).to(dtype)
        wt = (torch.randn(v, d, device=device, generator=gen) / math.sqrt(d)).to(dtype)
        b = (torch.randn(v, device=device, generator=gen) * 0.1).to(dtype)
        y = torch.randint(0, v, (n,), device=device, generator=gen)
        y[::5] = -100
        # the experimental fused head (no logits buffer): index targets, no smoothing
        fs = [t.clone().requires_grad_() for t in (x, wt, b)]
        fused = fused_linear_cross_entropy(fs[0], fs[1], y, fs[2], z_loss=1e-3)
        fused.backward()
        ps = [t.clone().requires_grad_() for t in (x, wt, b)]
        loss = triton_linear_cross_entropy(ps[0], ps[1], y, ps[2], label_smoothing=0.1,
                                           chunk_size=max(8, n // 3))
        loss.backward()
        ds = [t.double().requires_grad_() for t in (x, wt, b)]
        want = F.cross_entropy(F.linear(*ds[:2], ds[2]), y, label_smoothing=0.1)
        want.backward()
        t = 3e-2 if dtype == torch.bfloat16 else 1e-4
        lines.append(_close(f"linear {n}x{d}->{v} {_name(dtype)} loss", loss, want, t))
        for name, p, q in zip(("dx", "dW", "db"), ps, ds, strict=True):
            lines.append(_close(f"linear {_name(dtype)} {name}", p.grad, q.grad, t))
        ds = [t.double().requires_grad_() for t in (x, wt, b)]
        z = F.linear(*ds[:2], ds[2])
        want = (F.cross_entropy(z, y, reduction="sum") + 1e-3 * (
            torch.logsumexp(z, 1).square() * (y != -100)).sum()) / (y != -100).sum()
        want.backward()
        lines.append(_close(f"fused linear {_name(dtype)} loss", fused, want, t))
        for name, p, q in zip(("dx", "dW", "db"), fs, ds, strict=True):
            lines.append(_close(f"fused linear {_name(dtype)} {name}", p.grad, q.grad, t))
    return lines


SWEEP_CONFIGS = [(16384, 128256, torch.bfloat16), (16384, 128256, torch.float32)]
TINY_SWEEP = [(24, 300, torch.bfloat16), (16, 500, torch.float32)]
# (name, crossent.torch._triton.ops.override_ce_launch fields); the first is today's
# default launch and every other variant's gradient is checked against it. REVERSE: pass 2
# walks the row's tiles last to first (the freshest in L2 first); persistent: a grid of
# programs_per_sm x SMs programs striding over the rows (fewer rows in flight, so a row's
# second read can come from the 50 MB L2 instead of HBM). 32768 / 32 warps: Liger's tile.
# Registers (ptxas, sm_90a) already bound the rows in flight: 2 programs per SM for the
# default tile (64 registers x 512 threads), one for 16384 / 16 warps and 32768 / 32 warps,
# so persistent grids beyond 1x SMs are tried with the default tile only.
SWEEP_VARIANTS: list[tuple[str, dict[str, Any]]] = [
    ("default", {}),
    ("reverse", dict(reverse=True)),
    ("persistent 1x", dict(programs_per_sm=1)),
    ("persistent 2x", dict(programs_per_sm=2)),
    ("reverse persistent 1x", dict(reverse=True, programs_per_sm=1)),
    ("reverse persistent 2x", dict(reverse=True, programs_per_sm=2)),
    ("B16384 w16", dict(block=16384, warps=16)),
    ("B16384 w32", dict(block=16384, warps=32)),
    ("B32768 w16", dict(block=32768, warps=16)),
    ("B32768 w32 (Liger's)", dict(block=32768, warps=32)),
    ("B32768 w32 reverse", dict(block=32768, warps=32, reverse=True)),
    ("w32 reverse persistent 1x", dict(warps=32, reverse=True, programs_per_sm=1)),
    ("B16384 w16 reverse", dict(block=16384, warps=16, reverse=True)),
    ("B16384 w16 reverse persistent 1x", dict(block=16384, warps=16, reverse=True,
                                              programs_per_sm=1)),
    ("B16384 w32 reverse persistent 1x", dict(block=16384, warps=32, reverse=True,
                                              programs_per_sm=1)),
    ("B32768 w32 reverse persistent 1x", dict(block=32768, warps=32, reverse=True,
                                              programs_per_sm=1)),
]
# --tiny (the CPU smoke test in the interpreter): the first six, every constexpr path of the
# kernel (forward / reverse pass 2, one program per row / persistent); the wider tiles only
# cost interpreter time here (the sm_90 compile tests in tests/triton compile them)
TINY_SWEEP_VARIANTS = 6
# a variant's gradient may differ from the default's by a rounding of the gradient's dtype
# (another tile width changes the float32 max / sum-exp by an ulp), relative to max |g|
SWEEP_TOL = {torch.bfloat16: 8e-3, torch.float16: 1e-3, torch.float32: 1e-5}


def _compiled_ce_kernels() -> dict[Any, Any]:
    """Best effort: the cross-entropy kernel's compiled variants so far, from Triton's
    per-device JIT cache (empty under the interpreter, or where a Triton keeps them
    elsewhere): their registers and spills tell how many programs an SM holds."""
    try:
        from crossent.torch._triton import kernels

        found: dict[Any, Any] = {}
        for caches in kernels.compiled()["ce"].device_caches.values():
            found.update(caches[0])
        return found
    except Exception:
        return {}


def _max_abs_diff(a: torch.Tensor, b: torch.Tensor, rows: int = 1024) -> float:
    """max |a - b| in float32, a block of rows at a time (no full float32 copy)."""
    return max(float((a[i:i + rows].float() - b[i:i + rows].float()).abs().max())
               for i in range(0, a.shape[0], rows))


def _sweep_variant(config: str, name: str, fields: dict[str, Any], z0, y, ref, timer,
                   device, args) -> tuple[dict[str, Any], Any]:
    """Check one launch variant against the default's loss and gradient (``ref``; None for
    the default itself, which becomes the reference), then time it. Returns its JSON
    entry and the reference."""
    from crossent.torch._triton import ops

    with ops.override_ce_launch(**fields):
        launch = ops.ce_launch_config(z0.shape[1], z0.element_size(), z0.device)
        entry: dict[str, Any] = {"config": config, "variant": name, "override": fields,
                                 "launch": launch._asdict(), "median_ms": math.nan,
                                 "times_ms": [], "max_abs_grad_diff": math.nan, "note": ""}
        if time.perf_counter() > DEADLINE[0]:
            entry["note"] = "skipped: --max-minutes reached"
            return entry, ref
        if ref is None and name != SWEEP_VARIANTS[0][0]:
            entry["note"] = "FAIL: no reference (the default launch failed)"
            return entry, ref
        try:  # the check run is also the compilation
            before = set(_compiled_ce_kernels())
            leaf = z0.detach().clone().requires_grad_()
            loss = triton_cross_entropy(leaf, y)
            loss.backward()
            new = [k for key, k in _compiled_ce_kernels().items() if key not in before]
            if len(new) == 1:
                entry["regs"] = getattr(new[0], "n_regs", None)
                entry["spills"] = getattr(new[0], "n_spills", None)
            if ref is None:
                ref = (loss.detach(), leaf.grad, float(leaf.grad.abs().max()))
            diff = _max_abs_diff(leaf.grad, ref[1])
            loss_diff = abs(float(loss.detach()) - float(ref[0]))
            del leaf, loss
        except Exception as exc:
            entry["note"] = f"FAIL: raised {type(exc).__name__}: {str(exc).splitlines()[0][:100]}"
            traceback.print_exc(limit=2)
            return entry, ref
        entry["max_abs_grad_diff"], entry["loss_diff"] = diff, loss_diff
        tol = SWEEP_TOL[z0.dtype] * ref[2]
        if not (diff <= tol and loss_diff <= 1e-2 * abs(float(ref[0])) + 1e-6):
            entry["note"] = (f"FAIL: differs from the default's: gradient by {diff:.3g} "
                             f"(tolerance {tol:.3g}), loss by {loss_diff:.3g}")
            return entry, ref
        r = measure(config, name, lambda: z0.detach().clone().requires_grad_(),
                    lambda z: triton_cross_entropy(z, y).backward(), timer, device,
                    args.warmup, args.repeats)
    entry.update(median_ms=r.median_ms, times_ms=r.times_ms, note=r.note)
    return entry, ref


def sweep(args, device) -> dict[str, Any]:
    """The launch variants of crossent's cross-entropy kernel (SWEEP_VARIANTS) on the bf16
    and fp32 16384 x 128256 configurations, forward + backward: each checked against the
    default launch's gradient, then timed (median ms, x HBM floor, x default); a "best"
    line per configuration. Variants after --max-minutes are skipped. Returns
    ``{"variants": [one entry per variant and configuration], "best": {config: ...}}``."""
    from crossent.torch._triton import ops

    timer = Timer(device)
    gen = torch.Generator(device=device).manual_seed(2)
    entries: list[dict[str, Any]] = []
    best_by_config: dict[str, Any] = {}
    for n, v, dtype in TINY_SWEEP if args.tiny else SWEEP_CONFIGS:
        config = f"ce {n}x{v} {_name(dtype)}"
        z0 = (torch.randn(n, v, device=device, generator=gen) * 2.0).to(dtype)
        y = torch.randint(0, v, (n,), device=device, generator=gen)
        floor = ce_floor_ms(n, v, dtype, args.bandwidth)
        print(f"\n== sweep {config} (forward+backward; HBM floor {floor:.3f} ms at "
              f"{args.bandwidth / 1e12:.2f} TB/s; {ops.sm_count(z0.device)} SMs)")
        print(f"{'variant':34s} {'BLOCK':>6s} {'warps':>5s} {'rev':>3s} {'grid':>6s} "
              f"{'regs':>4s} {'spill':>5s} {'median ms':>10s} {'x floor':>8s} {'x default':>9s} "
              f"{'max|dg|':>9s}  note")
        ref = None
        rows: list[dict[str, Any]] = []
        for name, fields in SWEEP_VARIANTS[:TINY_SWEEP_VARIANTS] if args.tiny else SWEEP_VARIANTS:
            entry, ref = _sweep_variant(config, name, fields, z0, y, ref, timer, device, args)
            base = rows[0]["median_ms"] if rows else entry["median_ms"]
            entry.update(hbm_floor_ms=floor, x_floor=entry["median_ms"] / floor,
                         x_default=entry["median_ms"] / base)
            rows.append(entry)
            lc = entry["launch"]
            rev, grid = "yes" if lc["reverse"] else "no", lc["programs"] or "N"
            regs, spills = entry.get("regs"), entry.get("spills")
            print(f"{name:34s} {lc['block']:6d} {lc['warps']:5d} {rev:>3s} {grid:>6}"
                  f" {'?' if regs is None else regs:>4} {'?' if spills is None else spills:>5}"
                  f" {entry['median_ms']:10.3f} {entry['x_floor']:8.3g} {entry['x_default']:9.3f}"
                  f" {entry['max_abs_grad_diff']:9.2e}  {entry['note']}", flush=True)
        timed = [e for e in rows if e["median_ms"] == e["median_ms"]]
        if timed:
            best = min(timed, key=lambda e: e["median_ms"])
            print(f"best variant for {config}: {best['variant']} (override_ce_launch("
                  + ", ".join(f"{k}={val!r}" for k, val in best["override"].items())
                  + f")): {best['median_ms']:.3f} ms, {best['x_floor']:.3g}x floor, "
                  f"{best['x_default']:.3f}x default", flush=True)
            best_by_config[config] = {k: best[k] for k in ("variant", "override", "median_ms",
                                                             "x_floor", "x_default")}
        entries += rows
        del z0, y, ref
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"variants": entries, "best": best_by_config}


# the linear head's row chunk and dW accumulation (crossent-triton, N = 16384, D = 4096,
# V = 128256 bf16): the chunk's logits are the head's extra memory (rows x V x 2 bytes) and
# every chunk reads and writes the whole dW once (beta=1 addmm; 2.1 GB in float32), so fewer,
# larger chunks trade memory for time. Rows, then dw_dtype (None: float32 sums, one rounding at
# the end; bf16: summed in the weight's dtype, Liger's memory); the first is today's default
# (crossent.torch._rules.default_chunk: 2048 rows here).
HEAD_SWEEP: list[tuple[int | None, torch.dtype | None]] = [
    (None, None), (None, torch.bfloat16),
    (512, None), (512, torch.bfloat16), (1024, None), (1024, torch.bfloat16),
    (4096, None), (4096, torch.bfloat16), (8192, None), (8192, torch.bfloat16),
]
TINY_HEAD_SWEEP: list[tuple[int | None, torch.dtype | None]] = [
    (None, None), (8, None), (8, torch.bfloat16)]
# a variant's gradients against the default's, relative to max |g|: dW summed in bf16 rounds
# once per chunk (up to 32 chunks here), the rest differ by a rounding of bf16
HEAD_SWEEP_TOL = {None: 8e-3, torch.bfloat16: 4e-2}


def head_sweep(args, device) -> dict[str, Any]:
    """crossent's Triton linear head over HEAD_SWEEP (chunk rows x dW accumulation dtype)
    on LINEAR_CONFIGS, forward + backward, with the unfused torch head first as the
    baseline: each variant's loss and dx, dW checked against the default's, then its
    median ms, ratio to unfused torch, and peak memory beyond the inputs and beyond the
    returned gradients (dx and dW in the input's dtype). Variants after --max-minutes are
    skipped. Returns ``{"variants": [...]}``."""
    timer = Timer(device)
    gen = torch.Generator(device=device).manual_seed(3)
    variants = TINY_HEAD_SWEEP if args.tiny else HEAD_SWEEP
    entries: list[dict[str, Any]] = []
    for n, d, v, dtype in TINY_LINEAR if args.tiny else LINEAR_CONFIGS:
        x0 = torch.randn(n, d, device=device, generator=gen).to(dtype)
        w0 = (torch.randn(v, d, device=device, generator=gen) / math.sqrt(d)).to(dtype)
        y = torch.randint(0, v, (n,), device=device, generator=gen)
        entries += _head_sweep_config(f"linear {n}x{d}->{v} {_name(dtype)}", x0, w0, y,
                                      variants, timer, device, args)
        del x0, w0, y
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"variants": entries}


def _head_sweep_config(config, x0, w0, y, variants, timer, device, args) -> list[dict]:
    grads_bytes = (x0.numel() + w0.numel()) * x0.element_size()

    def prep():
        return (x0.detach().clone().requires_grad_(), w0.detach().clone().requires_grad_())

    base = measure(config, "torch (unfused)", prep,
                   lambda s: F.cross_entropy(F.linear(s[0], s[1]), y).backward(),
                   timer, device, args.warmup, args.repeats)
    print(f"\n== head sweep {config} (forward+backward; returned gradients "
          f"{grads_bytes / 1e9:.2f} GB)")
    print(f"{'variant':32s} {'median ms':>10s} {'x torch':>8s} {'peak GB':>8s} "
          f"{'beyond grads GB':>15s} {'max|dW|err':>10s}  note")
    rows = [_head_row(config, "torch (unfused)", None, None, base, base, grads_bytes)]
    ref = None
    for chunk, dw_dtype in variants:
        name = (f"chunk {chunk or 'default'} dW "
                f"{'float32 sums' if dw_dtype is None else _name(dw_dtype)}")
        ref, err, note = _head_check(x0, w0, y, chunk, dw_dtype, ref)
        if note:
            r = Result(config, name, note=note)
        else:
            r = measure(config, name, prep,
                        lambda s, c=chunk, dd=dw_dtype: triton_linear_cross_entropy(
                            s[0], s[1], y, chunk_size=c, dw_dtype=dd).backward(),
                        timer, device, args.warmup, args.repeats)
        rows.append(_head_row(config, name, chunk, dw_dtype, r, base, grads_bytes, err))
    return rows


def _head_check(x0, w0, y, chunk, dw_dtype, ref):
    """One call of the head variant against the default's (``ref``; None: this is the
    default, which becomes the reference). Returns (ref, relative max dW error, note)."""
    try:
        x, w = x0.detach().clone().requires_grad_(), w0.detach().clone().requires_grad_()
        loss = triton_linear_cross_entropy(x, w, y, chunk_size=chunk, dw_dtype=dw_dtype)
        loss.backward()
    except Exception as exc:
        traceback.print_exc(limit=2)
        return ref, math.nan, f"FAIL: raised {type(exc).__name__}: {str(exc)[:100]}"
    if ref is None:
        return (loss.detach(), x.grad, w.grad), 0.0, ""
    tol = HEAD_SWEEP_TOL[dw_dtype]
    errs = [_max_abs_diff(got, want) / max(float(want.abs().max()), 1e-30)
            for got, want in ((x.grad, ref[1]), (w.grad, ref[2]))]
    loss_err = abs(float(loss.detach()) - float(ref[0])) / max(abs(float(ref[0])), 1e-30)
    if max(errs) > tol or loss_err > 1e-2:
        return ref, errs[1], (f"FAIL: differs from the default's: dx {errs[0]:.2e}, dW "
                              f"{errs[1]:.2e} (tolerance {tol:.0e}), loss {loss_err:.2e}")
    return ref, errs[1], ""


def _head_row(config, name, chunk, dw_dtype, r: Result, base: Result, grads_bytes: int,
              err: float = 0.0) -> dict[str, Any]:
    peak = r.peak_extra_bytes
    beyond = None if peak is None else peak - grads_bytes
    ratio = r.median_ms / base.median_ms if base.times_ms else math.nan
    def gb(b):
        return "" if b is None else f"{b / 1e9:.2f}"

    print(f"{name:32s} {r.median_ms:10.3f} {ratio:8.3f} {gb(peak):>8s} {gb(beyond):>15s} "
          f"{err:10.2e}  {r.note}", flush=True)
    return {"config": config, "variant": name, "chunk_size": chunk,
            "dw_dtype": None if dw_dtype is None else _name(dw_dtype),
            "median_ms": r.median_ms, "times_ms": r.times_ms, "x_torch": ratio,
            "peak_extra_bytes": peak, "beyond_grads_bytes": beyond,
            "max_dw_rel_diff": err, "note": r.note}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bandwidth", type=float, default=4.8e12,
                   help="HBM bytes/s for the floor (H200 4.8e12, H100 SXM 3.35e12)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--only", choices=["ce", "linear"], default=None)
    p.add_argument("--check-only", action="store_true", help="correctness checks, no timing")
    p.add_argument("--no-check", action="store_true", help="skip the correctness checks")
    p.add_argument("--sweep", action="store_true",
                   help="also sweep the kernel's launch variants (tile, warps, reverse, grid)")
    p.add_argument("--sweep-only", action="store_true",
                   help="only the launch-variant sweep: no checks, no contenders")
    p.add_argument("--head-sweep", action="store_true",
                   help="also sweep the linear head's chunk rows and dW dtype (HEAD_SWEEP)")
    p.add_argument("--head-sweep-only", action="store_true",
                   help="only the linear head's sweep: no checks, contenders or kernel sweep")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    p.add_argument("--tiny", action="store_true", help="small shapes (CPU smoke test)")
    p.add_argument("--interpret", action="store_true",
                   help="run the Triton kernels in triton's CPU interpreter")
    p.add_argument("--json", default=None, help="write the results to this file")
    p.add_argument("--max-minutes", type=float, default=6.5,
                   help="skip the remaining contenders after this long (default 6.5)")
    args = p.parse_args(argv)
    DEADLINE[0] = time.perf_counter() + 60 * args.max_minutes
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.interpret:
        p.error("no CUDA device: use --tiny --interpret for a CPU smoke test")
    header = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "bandwidth": args.bandwidth,
              "load": os.getloadavg()}
    try:
        import triton
        header["triton"] = triton.__version__
    except ImportError:
        pass
    print(json.dumps(header))
    out: dict[str, Any] = {"header": header}
    failed = False
    if args.head_sweep or args.head_sweep_only:  # first: short, and not cut by the deadline
        out["head_sweep"] = head_sweep(args, device)
        failed = any(e["note"].startswith("FAIL") for e in out["head_sweep"]["variants"])
    only_sweeps = args.sweep_only or args.head_sweep_only
    if args.sweep_only:
        out["sweep"] = sweep(args, device)
        failed |= any(e["note"].startswith("FAIL") for e in out["sweep"]["variants"])
    if not args.no_check and not only_sweeps:
        t0 = time.perf_counter()
        lines = run_checks(args, device)
        print("\n== checks (crossent Triton vs torch float64)\n" + "\n".join(lines))
        print(f"checks took {time.perf_counter() - t0:.1f} s", flush=True)
        out["checks"] = lines
        failed |= any(line.startswith("FAIL") for line in lines)
    if not args.check_only and not only_sweeps:
        out["results"] = run_benchmarks(args, device)
        if args.sweep:
            out["sweep"] = sweep(args, device)
            failed |= any(e["note"].startswith("FAIL") for e in out["sweep"]["variants"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1, default=str)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
