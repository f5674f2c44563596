"""What the CPU gradient-buffer pool's safety rule costs: fused cross-entropy forward +
backward with the pool on (the current rule: use count 1, not shared, same pointer and
size), with the pool on under the old rule (use count only, unsound: see
``crossent.torch._buffers``), and with the pool off (``set_buffer_reuse(False)``).

    python benchmarks/pool_cost.py                    # 4096 x 32000 float32, 7 rounds
    python benchmarks/pool_cost.py --rows 1024 --classes 8000 --rounds 5 --json

The three variants run interleaved in one process on the same data (round-robin; each
timed call follows an untimed one of the same variant, because turning the pool off
empties it and the next "pool on" call would otherwise pay a fresh allocation), so
machine noise hits them alike; the figures are medians and ratios
to "pool on", and the load average is recorded before and after. A second table times
``_buffers.empty`` alone, the only code the rule touches (the checks are a handful of C
calls per pooled buffer).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable

import torch

import crossent.torch as xt
from crossent.torch import _buffers


def _step(z: torch.Tensor, y: torch.Tensor) -> None:
    leaf = z.detach().requires_grad_()
    xt.cross_entropy(leaf, y).backward()
    del leaf  # the gradient goes with it: the buffer is free for the next step


def _variant(name: str) -> Callable[[], None]:
    """Put the pool in the state of ``name``; returns the function that restores it."""
    intact = _buffers._intact
    if name == "pool off":
        xt.set_buffer_reuse(False)
    else:
        xt.set_buffer_reuse(True)
        if name == "pool on, old rule":
            _buffers._intact = lambda entry: True  # type: ignore[assignment]

    def restore() -> None:
        _buffers._intact = intact  # type: ignore[assignment]

    return restore


def measure(rows: int, classes: int, rounds: int) -> dict:
    torch.manual_seed(0)
    z = torch.randn(rows, classes) * 3
    y = torch.randint(0, classes, (rows,))
    names = ["pool on", "pool on, old rule", "pool off"]
    times: dict[str, list[float]] = {n: [] for n in names}
    load_before = os.getloadavg()
    for r in range(rounds + 1):  # round 0 warms up (first allocation, page faults)
        for name in names:
            restore = _variant(name)
            try:
                _step(z, y)  # settles the pool in this variant's state
                start = time.perf_counter()
                _step(z, y)
                elapsed = time.perf_counter() - start
            finally:
                restore()
            if r:
                times[name].append(elapsed)
    xt.set_buffer_reuse(True)
    load_after = os.getloadavg()
    med = {n: statistics.median(t) for n, t in times.items()}
    # the rule alone: empty() on a free pooled buffer, new rule against old
    like = torch.empty(0)
    shape = (rows, classes)
    xt.empty_cache()
    _buffers.empty(shape, torch.float32, like)  # one free buffer in the pool
    micro: dict[str, float] = {}
    for name in ["pool on", "pool on, old rule"]:
        restore = _variant(name)
        try:
            samples = []
            for _ in range(5):
                start = time.perf_counter()
                for _ in range(2000):
                    _buffers.empty(shape, torch.float32, like)
                samples.append((time.perf_counter() - start) / 2000)
        finally:
            restore()
        micro[name] = statistics.median(samples)
    return {
        "config": {"rows": rows, "classes": classes, "dtype": "float32", "rounds": rounds,
                   "torch": torch.__version__, "threads": torch.get_num_threads()},
        "load_average_before": load_before, "load_average_after": load_after,
        "median_s": med,
        "ratio_to_pool_on": {n: med[n] / med["pool on"] for n in names},
        "empty_call_us": {n: v * 1e6 for n, v in micro.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--classes", type=int, default=32000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = measure(args.rows, args.classes, args.rounds)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    cfg = result["config"]
    print(f"fused cross-entropy forward+backward, {cfg['rows']} x {cfg['classes']} float32, "
          f"median of {cfg['rounds']} (load {result['load_average_before'][0]:.2f} -> "
          f"{result['load_average_after'][0]:.2f}, {cfg['threads']} threads)")
    for name, sec in result["median_s"].items():
        print(f"  {name:<18} {sec * 1e3:9.1f} ms   x{result['ratio_to_pool_on'][name]:.3f}")
    print("_buffers.empty on a free pooled buffer:")
    for name, us in result["empty_call_us"].items():
        print(f"  {name:<18} {us:9.2f} us")


if __name__ == "__main__":
    main()
