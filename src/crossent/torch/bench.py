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
Prints progress and the estimated time left on stderr, a table per configuration on stdout,
and writes ``<out>/bench.json`` and ``<out>/bench.png`` (time and memory per contender;
default ``--out crossent-bench``, so that a run from the repository root does not replace
the committed ``benchmarks/results``). ``--out`` and ``--device`` are checked before the
first step. ``--quick`` shrinks every size (a smoke test, seconds).
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
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from .._files import check_output_path, save_figure, write_atomic
from ..errors import InputError
from . import functional as xf
from ._buffers import empty_cache

if TYPE_CHECKING:
    from matplotlib.figure import Figure

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
DEFAULT_OUT = Path("crossent-bench")
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


def time_config(config: str, device: str, repeats: int, warmup: int, quick: bool,
                on_round: Callable[[int, float], None] | None = None):
    """Median and min of ``repeats`` timed steps per contender, after ``warmup`` untimed ones;
    ``on_round(i, seconds)`` is called after round ``i`` (one step of every contender)."""
    case = make_case(config, device, quick)
    names = contenders(config)
    runs: dict[str, list[float]] = {n: [] for n in names}
    for name in names:
        for _ in range(warmup):
            _refill(case)
            step(case, name)
    for i in range(1, repeats + 1):
        started = time.perf_counter()
        for name in names:  # round-robin: noise hits every contender alike
            _refill(case)
            _sync(device)
            t0 = time.perf_counter()
            step(case, name)
            _sync(device)
            runs[name].append((time.perf_counter() - t0) * 1e3)
        if on_round is not None:
            on_round(i, time.perf_counter() - started)
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


def memory_config(config: str, device: str, quick: bool,
                  on_start: Callable[[str, int], None] | None = None) -> dict[str, float | None]:
    """Peak MiB of each contender, each in a fresh process; ``on_start(name, i)`` is called
    before the ``i``-th (from 1)."""
    out: dict[str, float | None] = {}
    for i, name in enumerate(contenders(config), 1):
        if on_start is not None:
            on_start(name, i)
        cmd = [sys.executable, "-m", "crossent.torch.bench", "--_memory-child", config, name,
               "--device", device] + (["--quick"] if quick else [])
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        try:
            out[name] = float(res.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            out[name] = None
            print(f"memory {config}/{name} failed: {res.stderr[-500:]}", file=sys.stderr)
    return out


# --------------------------------------------------------------------------------------------
# Report: the table, the figure
# --------------------------------------------------------------------------------------------


def _columns(rows: list[list[str]]) -> list[str]:
    """Rows of cells as lines: the first column left-aligned, the others right-aligned, two
    spaces between columns however wide the numbers get."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                      for i, (cell, w) in enumerate(zip(row, widths, strict=True))).rstrip()
            for row in rows]


def table(results: dict) -> str:
    """One block per configuration: medians, minima, ratios to the baseline (and to the
    exp-floor for ``ce``), peak memory."""
    lines = []
    for config, res in results["configs"].items():
        kind, n, v, d, dtype = res["shape"]
        base = "eager" if kind == "ce" else "unfused"
        lines.append(f"\n{config}: {kind} N={n} V={v}" + (f" D={d}" if d else "") +
                     f" {dtype}, forward+backward, {results['repeats']} runs; ratios of medians"
                     f" (min-based in brackets) to {base}" + (" and to exp-floor" if
                                                              kind == "ce" else ""))
        entries = res["contenders"].values()
        with_exp = any("vs_exp" in r for r in entries)
        with_mem = any(r.get("peak_mib") is not None for r in entries)
        rows = [["contender", "median ms", "min ms", f"x {base} [min]"]
                + (["x exp [min]"] if with_exp else [])
                + (["peak MiB", "x mem"] if with_mem else [])]
        for name, r in res["contenders"].items():
            row = [name, f"{r['median_ms']:.1f}", f"{r['min_ms']:.1f}",
                   f"{r['vs_' + base]:.3f} [{r['min_vs_' + base]:.3f}]"]
            if with_exp:
                row.append(f"{r['vs_exp']:.2f} [{r['min_vs_exp']:.2f}]" if "vs_exp" in r else "")
            if with_mem:
                mem, ratio = r.get("peak_mib"), r.get("mem_vs_" + base)
                row += [f"{mem:.1f}" if mem is not None else "-",
                        f"{ratio:.3f}" if ratio is not None else ""]
            rows.append(row)
        lines += _columns(rows)
    return "\n".join(lines)


def figure(results: dict) -> Figure:
    """Median time per contender, one column per configuration, and below it the peak memory
    (a row left out when no memory was measured, ``--no-memory``)."""
    from matplotlib.figure import Figure

    configs = list(results["configs"])
    with_mem = any(r.get("peak_mib") is not None for c in configs
                   for r in results["configs"][c]["contenders"].values())
    rows = 2 if with_mem else 1
    width = max(4.2 * len(configs), 6.4)
    fig = Figure(figsize=(width, 3.4 * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, len(configs), squeeze=False)
    for col, config in enumerate(configs):
        res = results["configs"][config]["contenders"]
        names = list(res)
        axes[0, col].bar(names, [res[n]["median_ms"] for n in names], color="tab:blue")
        axes[0, col].set_title(config)
        axes[0, col].set_ylabel("forward+backward, ms (median)")
        if with_mem:
            axes[1, col].bar(names, [res[n].get("peak_mib") or 0.0 for n in names],
                             color="tab:orange")
            axes[1, col].set_ylabel("peak MiB above inputs")
        for ax in axes[:, col]:
            ax.tick_params(axis="x", rotation=45, labelsize=8)
    title = f"crossent.torch vs torch {results['torch']} on {results['device_name']}"
    fig.suptitle(textwrap.fill(title, width=int(width * 9)))  # ~9 characters per inch at 12 pt
    return fig


def plot(results: dict, path: Path) -> None:
    """:func:`figure`, written to ``path`` atomically."""
    save_figure(figure(results), path, dpi=110)


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def check_device(device: str | None) -> str:
    """``--device``: ``cpu``, ``cuda`` or ``cuda:N`` present on this machine (default: cuda
    when present); an :class:`~crossent.errors.InputError` naming ``--device`` otherwise."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise InputError(f"--device {device!r} is not a device; use cpu or cuda") from None
    if parsed.type == "cpu":
        return "cpu"
    if parsed.type != "cuda":
        raise InputError(f"--device {device!r}: the benchmark runs on cpu or cuda")
    if not torch.cuda.is_available():
        raise InputError(f"--device {device!r}: no CUDA device here (torch {torch.__version__}"
                         ", torch.cuda.is_available() is False); use --device cpu")
    if parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise InputError(f"--device {device!r}: this machine has "
                         f"{torch.cuda.device_count()} CUDA device(s)")
    return str(parsed)


def _work(config: str) -> float:
    """A size to scale measured durations by: N x V logits (x D for the linear head)."""
    kind, n, v, d, _ = CONFIGS[config]
    return float(n * v * (d if kind == "linear" else 1))


def _duration(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f} s"
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


class _Progress:
    """Progress lines and the estimated time left, on stderr (stdout keeps the tables)."""

    def __init__(self, configs: list[str], say: Callable[[str], None]) -> None:
        self.configs, self.say = configs, say
        self.spent: dict[str, float] = {}  # seconds per finished configuration
        self.started = time.perf_counter()

    def left(self, after: str) -> float:
        """Seconds for the configurations after ``after``: each scaled by :func:`_work` from
        the finished ones of its kind, or the mean of all finished ones when none of its kind
        has run (``ce`` and ``linear`` steps do not scale alike)."""
        rest = self.configs[self.configs.index(after) + 1:]
        mean = sum(self.spent.values()) / len(self.spent)
        total = 0.0
        for c in rest:
            same = [f for f in self.spent if CONFIGS[f][0] == CONFIGS[c][0]]
            total += (sum(self.spent[f] / _work(f) for f in same) / len(same) * _work(c)
                      if same else mean)
        return total

    def finished(self, config: str, seconds: float) -> None:
        self.spent[config] = seconds
        left = self.left(config)
        elapsed = time.perf_counter() - self.started
        more = (f"; about {_duration(left)} left (estimated from the finished ones)"
                if config != self.configs[-1] else "")
        self.say(f"  {config} done in {_duration(seconds)} ({_duration(elapsed)} in all){more}")


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def run(configs: list[str] | None = None, *, device: str | None = None, repeats: int = 5,
        warmup: int = 1, memory: bool = True, quick: bool = False,
        out: Path | str = DEFAULT_OUT, say: Callable[[str], None] | None = None) -> dict:
    """Benchmark ``configs`` (default :data:`DEFAULT`); print a table per configuration, write
    ``out/bench.json`` and ``out/bench.png`` and return the results.

    The options are checked before the first step (an :class:`~crossent.errors.InputError`
    naming the option); progress goes to ``say`` (default: a line on stderr)."""
    configs = list(DEFAULT if configs is None else configs)
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown or not configs:
        what = f"unknown configuration {unknown[0]!r}" if unknown else "no configuration"
        raise InputError(f"{what}; choose from {', '.join(CONFIGS)}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise InputError(f"--repeats must be an integer >= 1 (got {repeats!r})")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise InputError(f"--warmup must be an integer >= 0 (got {warmup!r})")
    device = check_device(device)
    out = check_output_path(out, "--out", directory=True)
    say = say or _to_stderr
    results: dict[str, Any] = {
        "torch": torch.__version__, "python": platform.python_version(),
        "device": device, "threads": torch.get_num_threads(),
        "device_name": (torch.cuda.get_device_name(device) if device.startswith("cuda")
                        else f"{platform.processor() or platform.machine()} "
                             f"{os.cpu_count()} CPUs"),
        "repeats": repeats, "warmup": warmup, "quick": quick,
        "loadavg_before": os.getloadavg(), "configs": {},
    }
    memory_note = (", peak memory in one fresh process per contender" if memory else "")
    say(f"crossent bench: {len(configs)} configuration(s) on {results['device_name']}: "
        f"{warmup} warm-up and {repeats} timed step(s) per contender{memory_note}. "
        "torch.compile compiles on its first step (seconds to a minute); the time left is "
        "estimated after each configuration (--quick: a smoke test).")
    progress = _Progress(configs, say)
    for i, config in enumerate(configs, 1):
        kind = CONFIGS[config][0]
        started = time.perf_counter()
        names = contenders(config)
        say(f"[{i}/{len(configs)}] {config}: {len(names)} contenders, "
            f"{'warm-up, then ' if warmup else ''}timing...")

        def on_round(r: int, seconds: float, config: str = config) -> None:
            if r == 1 or r == repeats:
                left = (repeats - r) * seconds
                say(f"  {config}: timed round {r}/{repeats} took {_duration(seconds)}"
                    + (f"; about {_duration(left)} more of timing" if r < repeats else ""))

        timing, shape = time_config(config, device, repeats, warmup, quick, on_round)

        def on_start(name: str, j: int, config: str = config, k: int = len(names)) -> None:
            say(f"  {config}: peak memory {j}/{k} ({name}, a fresh process)")

        mem = memory_config(config, device, quick, on_start) if memory else {}
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
        print(table({"configs": {config: results["configs"][config]}, "repeats": repeats}),
              flush=True)
        progress.finished(config, time.perf_counter() - started)
    results["loadavg_after"] = os.getloadavg()
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "bench.json", json.dumps(results, indent=1) + "\n")
    plot(results, out / "bench.png")
    print(f"\nwrote {out / 'bench.json'} and {out / 'bench.png'}; load average "
          f"{results['loadavg_before']} -> {results['loadavg_after']}", flush=True)
    return results


def main(argv: list[str] | None = None) -> dict | None:
    """``python -m crossent.torch.bench``: the same options as ``crossent bench``."""
    p = argparse.ArgumentParser(prog="python -m crossent.torch.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("configs", nargs="*", default=DEFAULT,
                   help=f"any of {', '.join(CONFIGS)}; default: {' '.join(DEFAULT)}")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--no-memory", dest="memory", action="store_false")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    p.add_argument("--out", default=str(DEFAULT_OUT),
                   help=f"folder for bench.json and bench.png (default: {DEFAULT_OUT})")
    p.add_argument("--_memory-child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._memory_child:
        config, name = args._memory_child
        print(memory_child(config, name, check_device(args.device), args.quick))
        return None
    try:
        return run(args.configs, device=args.device, repeats=args.repeats, warmup=args.warmup,
                   memory=args.memory, quick=args.quick, out=args.out)
    except InputError as e:
        p.exit(2, f"{p.prog}: error: {e}\n")
    except KeyboardInterrupt:
        p.exit(130, f"{p.prog}: interrupted\n")


if __name__ == "__main__":
    main()
