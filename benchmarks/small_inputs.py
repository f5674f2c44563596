"""Small float32 batches, forward + backward: torch eager against ``crossent.torch.
cross_entropy`` with ``backend="auto"`` (the small-batch kernel ``crossent.torch._small``
from ``_backends.SMALL_MIN_LOGITS`` logits on, torch's own kernel below) and with
``backend="native"`` (torch's kernel through crossent), in one process on the same logits
(issue 16). ``--small-min 1`` sends every size to the small-batch kernel.

Every round runs each contender once, in an order that rotates and reverses from round to
round (the allocator and the caches favour one order by up to 2x at these sizes); per
size it prints the medians and the median of the per-round ratios to eager.

    python benchmarks/small_inputs.py                      # the default sizes
    python benchmarks/small_inputs.py 256x1000 512x1000    # N x V
    python benchmarks/small_inputs.py --small-min 1        # the small kernel at every size
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

import crossent.torch as xt
from crossent.torch import _backends

SIZES = ["64x1000", "128x1000", "192x1000", "256x1000", "384x1000", "512x1000", "64x4000"]


def paired(contenders: dict, rounds: int) -> tuple[dict, dict]:
    names = list(contenders)
    runs: dict[str, list[float]] = {k: [] for k in names}
    for r in range(rounds + 3):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order[::-1] if r % 2 else order:
            t0 = time.perf_counter()
            contenders[name]()
            if r >= 3:  # three warm-up rounds
                runs[name].append(time.perf_counter() - t0)
    medians = {k: statistics.median(v) * 1e6 for k, v in runs.items()}
    ratios = {k: statistics.median(a / b for a, b in zip(runs[k], runs["eager"], strict=True))
              for k in names}
    return medians, ratios


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("sizes", nargs="*", default=SIZES, help="N x V, e.g. 256x1000")
    p.add_argument("--budget", type=float, default=2e7,
                   help="logits per size over all rounds (rounds = budget / (N V), 50-1000)")
    p.add_argument("--label-smoothing", type=float, default=0.0,
                   help="label_smoothing of every contender (default 0)")
    p.add_argument("--small-min", type=int, default=None,
                   help="set _backends.SMALL_MIN_LOGITS (default: as shipped)")
    args = p.parse_args()
    if args.small_min is not None:
        _backends.SMALL_MIN_LOGITS = args.small_min
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average "
          f"{os.getloadavg()[0]:.2f}; small-batch kernel from {_backends.SMALL_MIN_LOGITS} "
          f"logits; label_smoothing {args.label_smoothing}")
    print(f"{'N x V':>10} {'eager us':>9} {'auto us':>9} {'native us':>9} "
          f"{'auto/eager':>11} {'native/eager':>12}")
    for size in args.sizes:
        n, v = (int(k) for k in size.split("x"))
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n, v, generator=g)
        t = torch.randint(0, v, (n,), generator=g)

        def step(fn, x=x, t=t):
            def run():
                z = x.detach().requires_grad_()
                torch.autograd.grad(fn(z, t), z)
            return run

        eps = args.label_smoothing
        contenders = {
            "eager": step(lambda z, t, eps=eps: F.cross_entropy(z, t, label_smoothing=eps)),
            "auto": step(lambda z, t, eps=eps: xt.cross_entropy(z, t, label_smoothing=eps)),
            "native": step(lambda z, t, eps=eps: xt.cross_entropy(z, t, backend="native",
                                                                  label_smoothing=eps)),
        }
        rounds = int(max(50, min(1000, args.budget // (n * v))))
        med, rat = paired(contenders, rounds)
        print(f"{size:>10} {med['eager']:9.0f} {med['auto']:9.0f} {med['native']:9.0f} "
              f"{rat['auto']:11.2f} {rat['native']:12.2f}", flush=True)
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
