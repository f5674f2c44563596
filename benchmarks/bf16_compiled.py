"""Issue 16: a compiled (inductor CPU C++) softmax cross-entropy gradient against one
``torch.exp`` pass, crossent's row-block kernel and torch eager, in one process.

    python benchmarks/bf16_compiled.py [--repeats 5] [--shape 4096 32000] [--dtype bfloat16]
    python benchmarks/bf16_compiled.py --compile-times   # cold and warm first calls, 3 processes

Every round runs each contender once (interleaved, each round starting one contender
later); the table gives medians and medians of per-round ratios, and the 1-min load
average before and after. Contenders (forward + backward, gradient of the mean loss):

* ``exp``: ``torch.exp(z, out=buf)``, the floor the issue measures against,
* ``eager``: ``F.cross_entropy`` + ``autograd.grad``,
* ``refill``: ``buf.copy_(z)``, included in every in-place contender (subtract it to get
  the in-place kernel alone),
* ``crossent`` / ``crossent inplace``: ``backend="rowblock"`` (``inplace_backward``),
  also with ``crossent.torch.set_compiled_kernel(True)`` (the public route to the
  compiled kernel; crossent's pooled gradient buffer is its reused output),
* ``compiled``: :func:`crossent.torch._inductor.softmax_grad_rows` (blocks of
  ``--direct-block-elements`` logits on crossent's block workers, each one ctypes call of
  the generated one-thread function; ``--block-elements``: blocks of the fallback) into a
  new buffer / a reused one (as crossent's pooled gradient buffers) / into ``z`` itself
  (``buf``, refilled from ``z`` first, as for ``crossent inplace``; timed in both).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

import crossent.torch as xt
from crossent.torch import _inductor
from crossent.torch.bench import activation_like


def contenders(z: torch.Tensor, t: torch.Tensor, act: torch.Tensor) -> dict:
    """``act``: an activation (:func:`crossent.torch.bench.activation_like`), what the
    in-place contenders overwrite; ``buf``, its memory, is refilled from ``z``."""
    buf = act.detach()
    n = z.shape[0]
    a = torch.full((n,), 1.0 / n)
    c = -a

    def eager() -> None:
        x = z.detach().requires_grad_()
        torch.autograd.grad(F.cross_entropy(x, t), x)

    def fused(inplace: bool, use_compiled: bool = False):
        def step() -> None:
            if inplace:
                buf.copy_(z)
            # in place: the activation (inplace_backward never overwrites a leaf)
            x = act if inplace else z.detach().requires_grad_()
            previous = xt.set_compiled_kernel(use_compiled)
            try:
                loss = xt.cross_entropy(x, t, backend="rowblock", inplace_backward=inplace)
            finally:
                xt.set_compiled_kernel(previous)
            torch.autograd.grad(loss, x)
        return step

    reused = torch.empty_like(z)

    def compiled(inplace: bool, into: torch.Tensor | None = None):
        def step() -> None:
            if inplace:
                buf.copy_(z)
            x = buf if inplace else z
            _, _, nll = _inductor.softmax_grad_rows(x, t, a, c, out=x if inplace else into)
            nll.mean()
        return step

    return {"exp": lambda: torch.exp(z, out=buf), "refill (buf.copy_(z))": lambda: buf.copy_(z),
            "eager": eager,
            "crossent": fused(False), "crossent inplace": fused(True),
            "crossent, set_compiled_kernel(True)": fused(False, True),
            "crossent inplace, set_compiled_kernel(True)": fused(True, True),
            "compiled": compiled(False), "compiled (reused out)": compiled(False, reused),
            "compiled inplace": compiled(True)}


def check(z: torch.Tensor, t: torch.Tensor) -> str:
    """Largest gradient error of the compiled kernel against float64 torch, in bf16 ulps."""
    n = z.shape[0]
    a = torch.full((n,), 1.0 / n)
    g, lse, _ = _inductor.softmax_grad_rows(z, t, a, -a)
    x = z.double().requires_grad_()
    ref = torch.autograd.grad(F.cross_entropy(x, t), x)[0]
    ulp = ref.abs().clamp_min(1e-30) * 2.0 ** -8
    return (f"max |g - g64| / ulp(bf16) = {float(((g.double() - ref).abs() / ulp).max()):.2f}, "
            f"max |lse - lse64| = {float((lse - x.detach().logsumexp(1)).abs().max()):.2g}")


def measure(repeats: int, dtype: torch.dtype, n: int, v: int, load: int = 0) -> list[str]:
    """The table; ``load`` busy processes run from after the warm-up to the end."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(n, v, generator=g).to(dtype)
    t = torch.randint(0, v, (n,), generator=g)
    steps = contenders(z, t, activation_like(z))
    t0 = time.perf_counter()
    for step in steps.values():  # warm-up (and compilation)
        step()
    warm = time.perf_counter() - t0
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(load)]
    try:
        time.sleep(1.0 if busy else 0.0)  # the busy processes running before the first round
        before = os.getloadavg()[0]
        names = list(steps)
        runs: dict[str, list[float]] = {k: [] for k in steps}
        for r in range(repeats):
            for k in range(len(names)):
                name = names[(k + r) % len(names)]
                t1 = time.perf_counter()
                steps[name]()
                runs[name].append(time.perf_counter() - t1)
        after = os.getloadavg()[0]
    finally:
        for process in busy:
            process.kill()
    lines = [f"{n} x {v} {str(dtype).split('.')[-1]}, {load} busy processes, "
             f"load {before:.1f} -> {after:.1f}, "
             f"{repeats} rounds, blocks of {_inductor._DIRECT_BLOCK_ELEMENTS} logits (direct), "
             f"torch "
             f"{torch.__version__}, "
             f"{torch.get_num_threads()} threads, warm-up incl. compile {warm:.1f} s",
             "  " + check(z[:256], t[:256])]
    for name, r in runs.items():
        ratio = statistics.median(a / b for a, b in zip(r, runs["eager"], strict=True))
        per_exp = statistics.median(a / b for a, b in zip(r, runs["exp"], strict=True))
        lines.append(f"  {name:34s} {statistics.median(r) * 1e3:8.1f} ms  {ratio:6.3f}x eager"
                     f"  {per_exp:5.2f}x exp")
    return lines


_COMPILE_ONCE = """
import time, torch
from crossent.torch import _inductor
z = torch.randn(64, 1000).bfloat16(); y = torch.randint(0, 1000, (64,))
a = torch.full((64,), 1 / 64)
t0 = time.perf_counter(); _inductor.softmax_grad_rows(z, y, a, -a)
t1 = time.perf_counter(); _inductor.softmax_grad_rows(z, y, a, -a, out=z)
print(f"{t1 - t0:.3f} {time.perf_counter() - t1:.3f}")
"""


def compile_times() -> list[str]:
    """First-call time (the compilation, or loading the remembered library; the in-place
    call after it compiles nothing), each in a fresh process: with inductor's and crossent's
    caches empty (cold), with inductor's cache filled but crossent's emptied, and with both
    filled (a later process on the same machine)."""
    lines = []
    with tempfile.TemporaryDirectory() as cache:
        inductor, ours = os.path.join(cache, "inductor"), os.path.join(cache, "crossent")
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=inductor, CROSSENT_CACHE_DIR=ours)
        for label in ("cold", "inductor's cache warm", "both caches warm"):
            if label == "inductor's cache warm":
                shutil.rmtree(ours, ignore_errors=True)
            before = os.getloadavg()[0]
            t0 = time.perf_counter()
            out = subprocess.run([sys.executable, "-c", _COMPILE_ONCE], env=env, check=True,
                                 capture_output=True, text=True, timeout=600).stdout.split()
            total = time.perf_counter() - t0
            lines.append(f"{label}: first call {out[0]} s, then in place {out[1]} s, "
                         f"whole process {total:.1f} s, load {before:.1f}")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--shape", type=int, nargs=2, default=[4096, 32000])
    p.add_argument("--block-elements", type=int, default=_inductor._BLOCK_ELEMENTS,
                   help="logits per block of the compiled kernel")
    p.add_argument("--direct-block-elements", type=int,
                   default=_inductor._DIRECT_BLOCK_ELEMENTS,
                   help="logits per block of the direct kernel on the block workers")
    p.add_argument("--load", type=int, default=0,
                   help="this many busy processes (python -c 'while True: pass') while timing")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads first")
    p.add_argument("--compile-times", action="store_true")
    args = p.parse_args()
    _inductor._BLOCK_ELEMENTS = args.block_elements
    _inductor._DIRECT_BLOCK_ELEMENTS = args.direct_block_elements
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.compile_times:
        print("\n".join(compile_times()), flush=True)
        return
    lines = measure(args.repeats, getattr(torch, args.dtype), *args.shape, load=args.load)
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
