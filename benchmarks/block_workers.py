"""Issue 16: the row-block kernel with its blocks on worker threads (one OpenMP thread each)
against the same kernel with torch's threading per operation (the kernel before), torch
eager and one ``torch.exp`` pass, idle and with one busy process per core, in one process.

    python benchmarks/block_workers.py [--repeats 7] [--load N] [--dtype float32|bfloat16]

Forward + backward of ``crossent.torch.cross_entropy`` (``backend="rowblock"``) at
4096 x 32000; every round runs each contender once (interleaved); the table gives the medians
and the medians of the per-round ratios, and the 1-min load average before and after.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

import crossent.torch as xt
from crossent.torch import _blockpool
from crossent.torch.bench import CompetingLoad, activation_like


def contenders(z: torch.Tensor, t: torch.Tensor, act: torch.Tensor) -> dict:
    """``act``: an activation (:func:`crossent.torch.bench.activation_like`), what the
    in-place contender overwrites; ``buf``, its memory, is refilled from ``z``."""
    buf = act.detach()
    def eager() -> None:
        a = z.detach().requires_grad_()
        torch.autograd.grad(F.cross_entropy(a, t), a)

    def fused(workers: bool, inplace: bool = False):
        def step() -> None:
            _blockpool.set_block_workers(workers)
            if inplace:
                buf.copy_(z)
            # in place: the activation (inplace_backward never overwrites a leaf)
            a = act if inplace else z.detach().requires_grad_()
            loss = xt.cross_entropy(a, t, backend="rowblock", inplace_backward=inplace)
            torch.autograd.grad(loss, a)
        return step

    return {"exp": lambda: torch.exp(z, out=buf), "eager": eager,
            "crossent (workers)": fused(True), "crossent (before: torch threads)": fused(False),
            "crossent inplace (workers)": fused(True, True)}


def measure(repeats: int, load: int, dtype: torch.dtype, n: int, v: int) -> list[str]:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(n, v, generator=g).to(dtype)
    t = torch.randint(0, v, (n,), generator=g)
    steps = contenders(z, t, activation_like(z))
    with CompetingLoad(load):
        before = os.getloadavg()[0]
        for step in steps.values():  # warm-up, also the pooled buffers
            step()
        runs: dict[str, list[float]] = {k: [] for k in steps}
        for _ in range(repeats):
            for name, step in steps.items():
                t0 = time.perf_counter()
                step()
                runs[name].append(time.perf_counter() - t0)
        after = os.getloadavg()[0]
    _blockpool.set_block_workers(True)
    lines = [f"{n} x {v} {str(dtype).split('.')[-1]}, {load} busy process(es), "
             f"load {before:.1f} -> {after:.1f}, {repeats} rounds, torch "
             f"{torch.__version__}, {torch.get_num_threads()} threads"]
    for name, r in runs.items():
        ratio = statistics.median(a / b for a, b in zip(r, runs["eager"], strict=True))
        per_exp = statistics.median(a / b for a, b in zip(r, runs["exp"], strict=True))
        lines.append(f"  {name:34s} {statistics.median(r) * 1e3:8.1f} ms  {ratio:6.3f}x eager"
                     f"  {per_exp:5.2f}x exp")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--load", type=int, nargs="*", default=[0, os.cpu_count() or 1])
    p.add_argument("--dtype", default="float32")
    p.add_argument("--shape", type=int, nargs=2, default=[4096, 32000])
    args = p.parse_args()
    for load in args.load:
        print("\n".join(measure(args.repeats, load, getattr(torch, args.dtype), *args.shape)),
              flush=True)


if __name__ == "__main__":
    main()
