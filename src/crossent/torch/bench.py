"""Benchmark the fused kernels against torch: ``python -m crossent.torch.bench``.

Every contender of a configuration runs in one process on the same tensors: warm-up, then
``--repeats`` timed forward+backward steps, interleaved round-robin so that machine noise
hits all contenders alike; the median is reported. Peak memory is measured in a fresh
process per contender (unless ``--no-memory``): on CPU the RSS high-water mark
(``VmHWM`` from ``/proc/self/status``, reset through ``/proc/self/clear_refs`` after the
warm-up step; ``getrusage`` where ``/proc`` is missing) minus the RSS
once the inputs exist (crossent's reused CPU gradient buffers are released after the
warm-up, so the measured step allocates and counts them); on CUDA
``torch.cuda.max_memory_allocated`` minus the inputs.
Prints a table, writes ``<out>/bench.json`` and ``<out>/bench.png`` (time and memory per
contender). ``--quick`` shrinks every size (a smoke test).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from . import functional as xf
from ._buffers import empty_cache

# name: (kind, N, V, D, dtype)
CONFIGS = {
    "ce-f32": ("ce", 4096, 32000, 0, "float32"),
    "ce-bf16": ("ce", 4096, 32000, 0, "bfloat16"),
    "ce-v128k": ("ce", 1024, 128256, 0, "float32"),
    "ce-v128k-bf16": ("ce", 1024, 128256, 0, "bfloat16"),
    "ce-small": ("ce", 256, 1000, 0, "float32"),  # torch's own kernel: dispatch overhead
    "linear-f32": ("linear", 2048, 32000, 512, "float32"),
    "linear-bf16": ("linear", 2048, 32000, 512, "bfloat16"),
    "linear-v128k": ("linear", 1024, 128256, 512, "float32"),
}
DEFAULT = ["ce-f32", "ce-bf16", "ce-v128k", "linear-f32"]
CE_CONTENDERS = ["exp-floor", "eager", "compile", "crossent", "crossent-inplace"]
LINEAR_CONTENDERS = ["unfused", "torch-lce", "torch-lce-chunk256", "crossent", "crossent-chunk64",
                     "crossent-chunk256"]


@dataclass
class Case:
    """The tensors of one configuration and a ``step(name)`` for each contender."""

    kind: str
    device: str
    # Empty placeholders, not None: a "ce" case fills logits/buf, a "linear" case x/w.
    logits: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    buf: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    x: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    w: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    target: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.int64))
    shape: tuple = ()


def make_case(config: str, device: str, quick: bool) -> Case:
    kind, n, v, d, dtype = CONFIGS[config]
    if quick:
        n, v, d = max(n // 64, 8), max(v // 64, 16), max(d // 16, 4)
    dtype = getattr(torch, dtype)
    g = torch.Generator(device=device).manual_seed(0)
    target = torch.randint(0, v, (n,), generator=g, device=device)
    case = Case(kind, device, target=target, shape=(kind, n, v, d, str(dtype).split(".")[-1]))
    if kind == "ce":
        case.logits = torch.randn(n, v, generator=g, device=device).to(dtype)
        case.buf = torch.empty_like(case.logits)
    else:
        case.x = torch.randn(n, d, generator=g, device=device).to(dtype)
        case.w = (torch.randn(v, d, generator=g, device=device) / d**0.5).to(dtype)
    return case


_compiled: dict[str, Callable[..., torch.Tensor]] = {}


def step(case: Case, name: str) -> None:
    """One forward+backward of contender ``name`` (the logits buffer refilled outside)."""
    if case.kind == "ce":
        if name == "exp-floor":  # one elementwise pass over the logits, into a buffer
            torch.exp(case.logits, out=case.buf)
            return
        z = case.buf.detach().requires_grad_()
        if name == "eager":
            loss = F.cross_entropy(z, case.target)
        elif name == "compile":
            fn = _compiled.setdefault("ce", torch.compile(F.cross_entropy))
            loss = fn(z, case.target)
        else:
            loss = xf.cross_entropy(z, case.target, inplace_backward=name.endswith("inplace"))
        torch.autograd.grad(loss, z)  # the gradient itself, as a model's backward sees it
        return
    x = case.x.detach().requires_grad_()
    w = case.w.detach().requires_grad_()
    if name == "unfused":
        loss = F.cross_entropy(x @ w.T, case.target)
    elif name.startswith("torch-lce"):
        opts = torch.nn.LinearCrossEntropyOptions()
        if name.endswith("chunk256"):
            opts = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=256, chunking_method=None)
        loss = F.linear_cross_entropy(x, w, case.target, options=opts)
    else:
        chunk = int(name.rpartition("chunk")[2]) if "chunk" in name else None
        loss = xf.linear_cross_entropy(x, w, case.target, chunk_size=chunk)
    torch.autograd.grad(loss, (x, w))


def contenders(config: str) -> list[str]:
    if CONFIGS[config][0] == "ce":
        return CE_CONTENDERS
    have = hasattr(F, "linear_cross_entropy")
    return [c for c in LINEAR_CONTENDERS if have or not c.startswith("torch-lce")]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _refill(case: Case) -> None:
    if case.kind == "ce":
        case.buf.copy_(case.logits)


def time_config(config: str, device: str, repeats: int, warmup: int, quick: bool):
    case = make_case(config, device, quick)
    names = contenders(config)
    runs: dict[str, list[float]] = {n: [] for n in names}
    for name in names:
        for _ in range(warmup):
            _refill(case)
            step(case, name)
    for _ in range(repeats):
        for name in names:  # round-robin: noise hits every contender alike
            _refill(case)
            _sync(device)
            t0 = time.perf_counter()
            step(case, name)
            _sync(device)
            runs[name].append((time.perf_counter() - t0) * 1e3)
    timing = {n: {"median_ms": statistics.median(r), "min_ms": min(r), "runs_ms": r}
              for n, r in runs.items()}
    return timing, case.shape


def _rss_kib() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _hwm_kib() -> int:
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def memory_child(config: str, name: str, device: str, quick: bool) -> float:
    """MiB above the inputs at the peak of one forward+backward (run in a fresh process)."""
    case = make_case(config, device, quick)
    _refill(case)
    step(case, name)  # warm-up: torch.compile's compiler memory is not the kernel's
    empty_cache()  # the measured step allocates its buffers: they count in its peak
    _refill(case)
    _sync(device)
    if device.startswith("cuda"):
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step(case, name)
        _sync(device)
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
    except OSError:
        pass
    base = _rss_kib()
    step(case, name)
    return (_hwm_kib() - base) / 1024


def memory_config(config: str, device: str, quick: bool) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for name in contenders(config):
        cmd = [sys.executable, "-m", "crossent.torch.bench", "--_memory-child", config, name,
               "--device", device] + (["--quick"] if quick else [])
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        try:
            out[name] = float(res.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            out[name] = None
            print(f"memory {config}/{name} failed: {res.stderr[-500:]}", file=sys.stderr)
    return out


def table(results: dict) -> str:
    lines = []
    for config, res in results["configs"].items():
        kind, n, v, d, dtype = res["shape"]
        base = "eager" if kind == "ce" else "unfused"
        lines.append(f"\n{config}: {kind} N={n} V={v}" + (f" D={d}" if d else "") +
                     f" {dtype}, forward+backward, {results['repeats']} runs; ratios of medians"
                     f" (min-based in brackets) to {base}" + (" and to exp-floor" if
                                                              kind == "ce" else ""))
        lines.append(f"{'contender':<20}{'median ms':>10}{'min ms':>9}{'x ' + base:>17}"
                     f"{'x exp':>15}{'peak MiB':>10}{'x mem':>8}")
        for name, r in res["contenders"].items():
            mem = r.get("peak_mib")
            mem_ratio = r.get("mem_vs_" + base)
            vs_exp = (f"{r['vs_exp']:>7.2f} [{r['min_vs_exp']:.2f}]" if "vs_exp" in r
                      else f"{'':>15}")
            lines.append(
                f"{name:<20}{r['median_ms']:>10.1f}{r['min_ms']:>9.1f}"
                f"{r['vs_' + base]:>8.3f} [{r['min_vs_' + base]:.3f}]{vs_exp}"
                + (f"{mem:>10.1f}" if mem is not None else f"{'-':>10}")
                + (f"{mem_ratio:>8.3f}" if mem_ratio is not None else f"{'':>8}")
            )
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = list(results["configs"])
    fig, axes = plt.subplots(2, len(configs), figsize=(4.2 * len(configs), 6.5), squeeze=False)
    for col, config in enumerate(configs):
        res = results["configs"][config]["contenders"]
        names = list(res)
        axes[0, col].bar(names, [res[n]["median_ms"] for n in names], color="tab:blue")
        axes[0, col].set_title(config)
        axes[0, col].set_ylabel("forward+backward, ms (median)")
        mems = [res[n].get("peak_mib") or 0.0 for n in names]
        axes[1, col].bar(names, mems, color="tab:orange")
        axes[1, col].set_ylabel("peak MiB above inputs")
        for ax in axes[:, col]:
            ax.tick_params(axis="x", rotation=45, labelsize=8)
    fig.suptitle(f"crossent.torch vs torch {torch.__version__} on {results['device_name']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict | None:
    p = argparse.ArgumentParser(prog="python -m crossent.torch.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("configs", nargs="*", default=DEFAULT,
                   help=f"any of {', '.join(CONFIGS)}; default: {' '.join(DEFAULT)}")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--no-memory", dest="memory", action="store_false")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--_memory-child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    unknown = [c for c in args.configs if c not in CONFIGS]
    if unknown:
        p.error(f"unknown configs {unknown}; choose from {', '.join(CONFIGS)}")
    if args._memory_child:
        config, name = args._memory_child
        print(memory_child(config, name, args.device, args.quick))
        return None
    results = {
        "torch": torch.__version__, "python": platform.python_version(),
        "device": args.device, "threads": torch.get_num_threads(),
        "device_name": (torch.cuda.get_device_name() if args.device.startswith("cuda")
                        else f"{platform.processor() or platform.machine()} "
                             f"{os.cpu_count()} CPUs"),
        "repeats": args.repeats, "warmup": args.warmup, "quick": args.quick,
        "loadavg_before": os.getloadavg(), "configs": {},
    }
    for config in args.configs:
        kind = CONFIGS[config][0]
        timing, shape = time_config(config, args.device, args.repeats, args.warmup, args.quick)
        mem = memory_config(config, args.device, args.quick) if args.memory else {}
        base = "eager" if kind == "ce" else "unfused"
        for name, r in timing.items():
            r["vs_" + base] = r["median_ms"] / timing[base]["median_ms"]
            r["min_vs_" + base] = r["min_ms"] / timing[base]["min_ms"]
            if "exp-floor" in timing:
                r["vs_exp"] = r["median_ms"] / timing["exp-floor"]["median_ms"]
                r["min_vs_exp"] = r["min_ms"] / timing["exp-floor"]["min_ms"]
            peak, peak_base = mem.get(name), mem.get(base)
            r["peak_mib"] = peak
            if peak is not None and peak_base:
                r["mem_vs_" + base] = peak / peak_base
        results["configs"][config] = {"shape": list(shape), "contenders": timing}
        print(table({"configs": {config: results["configs"][config]},
                     "repeats": args.repeats}), flush=True)
    results["loadavg_after"] = os.getloadavg()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(results, indent=1))
    plot(results, out / "bench.png")
    print(f"\nwrote {out / 'bench.json'} and {out / 'bench.png'}; load average "
          f"{results['loadavg_before']} -> {results['loadavg_after']}")
    return results


if __name__ == "__main__":
    main()
