"""The fixed cost of ``crossent.torch._blockpool.run_blocks`` and what it does to the
row-block kernel: the module as it is against another version of it (by default the one
committed at ``HEAD``), in one process, interleaved rounds, medians.

    python benchmarks/blockpool_latency.py [--before FILE] [--rounds 9] [--load 2]
        [--skip-latency] [--skip-kernel] [--big-only]

1. ``run_blocks`` latency: 2, 4 and 16 no-op blocks, and 2 blocks of one ~80 us
   ``torch.exp`` each (also run inline, in order in the caller with torch's threads);
   each figure is the mean of a batch of calls, the table the median over rounds.
2. Forward + backward of ``crossent.torch.cross_entropy(backend="rowblock")`` with each
   version's ``run_row_blocks`` against ``torch.nn.functional.cross_entropy`` (eager),
   float32, idle; 4096 x 32000 also with ``--load`` busy processes (started and killed
   here). Ratios (to eager; after / before) are medians of the per-round ratios.

The 1-minute load average is printed before and after each part (the machine may be
shared: the figures only compare contenders measured in the same rounds).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import crossent.torch as xt
from crossent.torch import _blockpool, _rowblock
from crossent.torch.bench import CompetingLoad


def load_before(path: str | None):
    """The other version of the module, imported as ``crossent.torch._blockpool_before``
    (its relative imports resolve in the package); from ``git show HEAD:...`` by default."""
    handle = None
    if path is None:
        source = subprocess.run(["git", "show", "HEAD:src/crossent/torch/_blockpool.py"],
                                capture_output=True, text=True, check=True,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout
        handle = tempfile.NamedTemporaryFile("w", suffix=".py", delete=False)
        handle.write(source)
        handle.close()
        path = handle.name
    name = "crossent.torch._blockpool_before"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        if handle is not None:
            os.unlink(path)
    return module


def load() -> str:
    return f"{os.getloadavg()[0]:.2f}"


def interleaved(steps: dict[str, Callable[[], None]], rounds: int, batch: int
                ) -> dict[str, list[float]]:
    """Seconds per call of each step: ``batch`` calls timed together, once per round."""
    for step in steps.values():
        step()
    runs: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            t0 = time.perf_counter()
            for _ in range(batch):
                step()
            runs[name].append((time.perf_counter() - t0) / batch)
    return runs


def latency(before, rounds: int) -> None:
    print(f"## run_blocks latency (us per call, median of {rounds} rounds), "
          f"{torch.get_num_threads()} threads, load {load()}")

    def noop(*block: int) -> None:
        pass

    x = torch.randn(2, 1 << 16)
    y = torch.empty_like(x)

    def exp(i: int) -> None:
        torch.exp(x[i], out=y[i])

    steps: dict[str, Callable[[], None]] = {}
    for count in (2, 4, 16):
        blocks = [(i, i + 1) for i in range(count)]
        for label, module in (("before", before), ("after", _blockpool)):
            steps[f"{count} no-op blocks, {label}"] = (
                lambda m=module, b=blocks: m.run_blocks(noop, b))
    pair = [(0,), (1,)]

    def one_thread_exp() -> float:
        out: list[float] = []

        def probe() -> None:
            torch.set_num_threads(1)  # a fresh thread: its own count only (OpenMP)
            t0 = time.perf_counter()
            for _ in range(200):
                exp(0)
            out.append((time.perf_counter() - t0) / 200)

        import threading
        th = threading.Thread(target=probe)
        th.start()
        th.join()
        return out[0]

    for label, module in (("before", before), ("after", _blockpool)):
        steps[f"2 exp blocks, {label}"] = lambda m=module: m.run_blocks(exp, pair)

    def inline() -> None:
        for block in pair:
            exp(*block)

    steps["2 exp blocks, inline (torch threads)"] = inline
    runs = interleaved(steps, rounds, batch=200)
    print(f"one exp block, one thread: {one_thread_exp() * 1e6:.0f} us")
    for name, times in runs.items():
        line = (f"{name:42s} {statistics.median(times) * 1e6:8.1f}   "
                f"(min {min(times) * 1e6:.1f}, max {max(times) * 1e6:.1f})")
        if name.endswith(", after"):
            was = runs[name.replace(", after", ", before")]
            change = statistics.median(a / b for a, b in zip(times, was, strict=True))
            line += f"   after / before {change:.2f}"
        print(line)
    print(f"load after {load()}\n")


def kernel_steps(before, z: torch.Tensor, t: torch.Tensor) -> dict[str, Callable[[], None]]:
    real = _rowblock.run_row_blocks

    def eager() -> None:
        a = z.detach().requires_grad_()
        torch.autograd.grad(F.cross_entropy(a, t), a)

    def fused(run_row_blocks) -> Callable[[], None]:
        def step() -> None:
            _rowblock.run_row_blocks = run_row_blocks
            try:
                a = z.detach().requires_grad_()
                torch.autograd.grad(xt.cross_entropy(a, t, backend="rowblock"), a)
            finally:
                _rowblock.run_row_blocks = real
        return step

    return {"eager": eager, "crossent before": fused(before.run_row_blocks),
            "crossent after": fused(real)}


def kernel(before, rounds: int, competing: int, big_only: bool) -> None:
    shapes = [(4096, 32000)] if big_only else [(1024, 1000), (2048, 1000), (512, 8000),
                                                (4096, 32000)]
    for n, v in shapes:
        g = torch.Generator().manual_seed(0)
        steps = kernel_steps(before, torch.randn(n, v, generator=g),
                             torch.randint(0, v, (n,), generator=g))
        big = n * v >= 1 << 26
        for busy in ((0, competing) if big else (0,)):
            with CompetingLoad(busy):
                start = load()
                runs = interleaved(steps, rounds if big else 3 * rounds, batch=1 if big else 10)
                end = load()
            print(f"## {n} x {v} float32 fwd+bwd, {busy} busy processes, load {start} -> {end}")
            for name, times in runs.items():
                ratio = statistics.median(e / s for e, s in zip(runs["eager"], times,
                                                                strict=True))
                print(f"{name:18s} {statistics.median(times) * 1e3:9.3f} ms   "
                      f"{ratio:5.2f}x eager's speed")
            change = statistics.median(a / b for a, b in zip(runs["crossent after"],
                                                             runs["crossent before"],
                                                             strict=True))
            print(f"after / before: {change:.3f} (median of the per-round ratios)\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", help="file of the other _blockpool version (default: HEAD)")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--load", type=int, default=2, help="busy processes for 4096 x 32000")
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--skip-kernel", action="store_true")
    parser.add_argument("--big-only", action="store_true", help="kernel: 4096 x 32000 only")
    args = parser.parse_args()
    before = load_before(args.before)
    if not args.skip_latency:
        latency(before, args.rounds)
    if not args.skip_kernel:
        kernel(before, args.rounds, args.load, args.big_only)


if __name__ == "__main__":
    main()
