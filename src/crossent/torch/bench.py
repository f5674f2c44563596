"""Benchmark the fused kernels against torch: ``python -m crossent.torch.bench``.

Every contender of a configuration runs in one process on the same tensors: warm-up, then
``--repeats`` timed forward+backward steps, interleaved round-robin (each round starting one
contender later) so that machine noise hits all contenders alike; the median is reported.
Peak memory (unless ``--no-memory``): on CPU, in a fresh process per contender, the RSS
high-water mark (``VmHWM`` from ``/proc/self/status``, reset through
``/proc/self/clear_refs`` after the warm-up step; ``getrusage`` where ``/proc`` is missing)
minus the RSS once the inputs exist (crossent's reused CPU gradient buffers are released
after the warm-up, so the measured step allocates and counts them); on CUDA, in every
timed step, ``torch.cuda.max_memory_allocated`` minus the memory allocated before it (the
inputs; the caching allocator's reserve is not counted), the largest over the steps.
Prints progress and the estimated time left on stderr, a table per configuration on stdout,
and writes ``<out>/bench.json`` and ``<out>/bench.png`` (time and memory per contender;
default ``--out crossent-bench``, so that a run from the repository root does not replace
the committed ``benchmarks/results``). ``--out`` and ``--device`` are checked before the
first step, and matplotlib (for the figures) is imported then: without it, one line naming
the extra (exit code 1). ``--quick`` shrinks every size (a smoke test, seconds).

On CUDA the default configurations are the GPU sizes (``gpu-*``: N x V = 16384 x 128256
and 8192 x 256000 in bfloat16 and float32, the linear head N=16384 D=4096 V=128256 in
bfloat16), peak memory is measured in the timed steps themselves, Liger Kernel and Cut
Cross-Entropy join when installed (a row with a note when not, or when they fail), and
each cross-entropy configuration gets its HBM floor, ``2 N V itemsize / bandwidth``, with
the bandwidth looked up from the GPU's name or given with ``--bandwidth``.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F

from .._checks import as_float, ascii_integer, ascii_number, check_integer
from .._files import check_files_in, check_output_path, figure_bytes, save_figure, write_atomic
from ..errors import InputError, missing_extra
from . import _inductor
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
    # prompt-masked fine-tuning: every other target is ignore_index (-100)
    "linear-half-ignored": ("linear", 2048, 32000, 512, "float32"),
    # GPU sizes (issue 12): a Llama-3 vocabulary (128256) and a 256000 one (Gemma), a
    # 16384-token batch; the linear head of a 4096-wide model. The default on CUDA
    "gpu-ce-v128k-bf16": ("ce", 16384, 128256, 0, "bfloat16"),
    "gpu-ce-v128k-f32": ("ce", 16384, 128256, 0, "float32"),
    "gpu-ce-v256k-bf16": ("ce", 8192, 256000, 0, "bfloat16"),
    "gpu-ce-v256k-f32": ("ce", 8192, 256000, 0, "float32"),
    "gpu-linear-v128k-bf16": ("linear", 16384, 128256, 4096, "bfloat16"),
}
IGNORED_FRACTION = {"linear-half-ignored": 0.5}
# N x V of the crossover sweep (float32, index targets): where crossent's kernels overtake
# torch's; --crossover
CROSSOVER_SIZES = [(64, 1000), (128, 1000), (256, 1000), (512, 1000), (1024, 1000),
                   (256, 4000), (1024, 4000), (512, 8000), (1024, 16000), (2048, 16000),
                   (2048, 32000), (4096, 32000)]
DEFAULT = ["ce-f32", "ce-bf16", "ce-v128k", "linear-f32"]  # on CPU
DEFAULT_CUDA = ["gpu-ce-v128k-bf16", "gpu-ce-v128k-f32", "gpu-ce-v256k-bf16",
                "gpu-ce-v256k-f32", "gpu-linear-v128k-bf16"]
DEFAULT_OUT = Path("crossent-bench")
CE_CONTENDERS = ["exp-floor", "eager", "compile", "crossent", "crossent-inplace"]
# --compiled-kernel: crossent with crossent.torch.set_compiled_kernel(True) (bfloat16/float16/
# float32 CPU logits; the first step per process and dtype compiles, 5-25 s)
CE_COMPILED_CONTENDERS = ["crossent-compiled", "crossent-compiled-inplace"]
LINEAR_CONTENDERS = ["unfused", "torch-lce", "torch-lce-chunk256", "crossent", "crossent-chunk64",
                     "crossent-chunk256"]
# On CUDA: the Triton kernels of other packages join (EXTERNAL), torch.compile times the
# unfused head too, and the CPU chunk-size variants stay out (a GPU run has minutes).
CE_CUDA_CONTENDERS = [*CE_CONTENDERS, "liger"]
# crossent-compact: torch's acc_policy="compact" (dW summed in bf16 per chunk, no float32
# V x D buffer; float32 on CPU, so only here)
LINEAR_CUDA_CONTENDERS = ["unfused", "compile", "torch-lce", "crossent", "crossent-compact",
                          "liger", "cce"]
# Contenders from other packages (never dependencies of crossent): imported when a run
# needs them; a missing or failing one is a row with a note. The pip name of each:
EXTERNAL = {"liger": "liger-kernel", "cce": "cut-cross-entropy"}
EXTERNAL_DEVICES = ("cuda",)  # device types they run on (Triton kernels for CUDA)
# HBM bandwidth (bytes/s) of GPUs by name (vendor datasheets), for the floor of a
# cross-entropy step: one read of the logits and one write of the gradient. The first
# pattern that matches torch.cuda.get_device_name() (case-insensitive) wins.
GPU_BANDWIDTH = [
    (r"\bH200\b", 4.8e12, "H200"),
    (r"\bH100\b.*\bPCIe\b", 2.0e12, "H100 PCIe"),
    (r"\bH100\b.*\b(SXM\w*|HBM3)\b", 3.35e12, "H100 SXM"),
    (r"\bA100\b.*\b80GB\b", 2.0e12, "A100 80GB"),
    (r"\bA100\b.*\b40GB\b", 1.555e12, "A100 40GB"),
]


@dataclass
class Case:
    """The tensors of one configuration and a ``step(name)`` for each contender."""

    kind: str
    device: str
    # Empty placeholders, not None: a "ce" case fills logits/buf, a "linear" case x/w.
    logits: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    buf: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    # buf's memory as an activation (a non-leaf, as the head's output is in a model):
    # what the in-place contenders overwrite (inplace_backward leaves a leaf's memory alone)
    act: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    x: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    w: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    target: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.int64))
    shape: tuple = ()
    # the loss function of each EXTERNAL contender, imported by load_external
    external: dict[str, Callable[..., Any]] = field(default_factory=dict)


def make_case(config: str, device: str, quick: bool) -> Case:
    kind, n, v, d, dtype = CONFIGS[config]
    if quick:
        n, v, d = max(n // 64, 8), max(v // 64, 16), max(d // 16, 4)
    dtype = getattr(torch, dtype)
    g = torch.Generator(device=device).manual_seed(0)
    target = torch.randint(0, v, (n,), generator=g, device=device)
    ignored = IGNORED_FRACTION.get(config, 0.0)
    if ignored:
        target[torch.arange(n, device=device) % round(1 / ignored) == 0] = -100
    case = Case(kind, device, target=target, shape=(kind, n, v, d, str(dtype).split(".")[-1]))
    if kind == "ce":
        case.logits = torch.randn(n, v, generator=g, device=device).to(dtype)
        case.act = activation_like(case.logits)
        case.buf = case.act.detach()
    else:
        case.x = torch.randn(n, d, generator=g, device=device).to(dtype)
        case.w = (torch.randn(v, d, generator=g, device=device) / d**0.5).to(dtype)
    return case


_compiled: dict[str, Callable[..., torch.Tensor]] = {}


def load_external(name: str, kind: str) -> Callable[..., Any]:
    """The loss function of the EXTERNAL contender ``name`` for a ``kind`` configuration,
    imported now (an ImportError when its package is missing): called as ``fn(logits,
    target)`` for ``"ce"``, ``fn(x, w, target)`` for ``"linear"`` (``w`` is V x D)."""
    import importlib

    if name == "liger" and kind == "ce":
        module = importlib.import_module("liger_kernel.transformers.functional")
        return module.liger_cross_entropy  # type: ignore[no-any-return]
    if name == "liger":
        module = importlib.import_module("liger_kernel.transformers.fused_linear_cross_entropy")
        head = module.LigerFusedLinearCrossEntropyLoss()
        return lambda x, w, target: head(w, x, target)  # Liger takes the weight first
    if name == "cce" and kind == "linear":
        module = importlib.import_module("cut_cross_entropy")
        return module.linear_cross_entropy  # type: ignore[no-any-return]
    raise ValueError(f"no external contender {name!r} for {kind!r}")  # a bug: see contenders


def _external(case: Case, name: str) -> Callable[..., Any]:
    """The EXTERNAL contender's loss function, imported once per case (by
    ``time_config``'s preparation, or here on a direct :func:`step`)."""
    if name not in case.external:
        case.external[name] = load_external(name, case.kind)
    return case.external[name]


def _loss_of(out: Any) -> torch.Tensor:
    """The loss of an external contender's output: a tensor, or (loss, extras...), or an
    object with ``.loss`` (Liger with ``return_z_loss``)."""
    if isinstance(out, torch.Tensor):
        return out
    return out.loss if hasattr(out, "loss") else out[0]


def activation_like(t: torch.Tensor) -> torch.Tensor:
    """An activation (a non-leaf with its own memory, as the head's output is in a
    model) of ``t``'s shape, dtype and device, for in-place contenders:
    ``inplace_backward`` overwrites only an activation's memory, never a leaf's. A
    clone of a one-element leaf, so no full-size leaf is kept alive behind it; refill it
    through ``.detach()``."""
    leaf = torch.zeros((), dtype=t.dtype, device=t.device, requires_grad=True)
    return leaf.expand(t.shape).clone()


def step(case: Case, name: str) -> None:
    """One forward+backward of contender ``name`` (the logits buffer refilled outside)."""
    if case.kind == "ce":
        if name == "exp-floor":  # one elementwise pass over the logits, into a buffer
            torch.exp(case.logits, out=case.buf)
            return
        inplace = name.endswith("inplace")
        z = case.act if inplace else case.buf.detach().requires_grad_()
        if name == "eager":
            loss = F.cross_entropy(z, case.target)
        elif name in EXTERNAL:
            loss = _loss_of(_external(case, name)(z, case.target))
        elif name == "compile":
            fn = _compiled.setdefault("ce", torch.compile(F.cross_entropy))
            loss = fn(z, case.target)
        else:
            previous = _inductor.set_compiled_kernel(name.startswith("crossent-compiled"))
            try:
                loss = xf.cross_entropy(z, case.target, inplace_backward=inplace)
            finally:
                _inductor.set_compiled_kernel(previous)
        torch.autograd.grad(loss, z)  # the gradient itself, as a model's backward sees it
        return
    x = case.x.detach().requires_grad_()
    w = case.w.detach().requires_grad_()
    if name == "unfused":
        loss = F.cross_entropy(x @ w.T, case.target)
    elif name == "compile":
        fn = _compiled.setdefault("linear", torch.compile(_unfused_head))
        loss = fn(x, w, case.target)
    elif name in EXTERNAL:
        loss = _loss_of(_external(case, name)(x, w, case.target))
    elif name.startswith("torch-lce"):
        opts = torch.nn.LinearCrossEntropyOptions()
        if name.endswith("chunk256"):
            opts = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=256, chunking_method=None)
        loss = F.linear_cross_entropy(x, w, case.target, options=opts)
    elif name == "crossent-compact":
        opts = torch.nn.LinearCrossEntropyOptions(acc_policy="compact")
        loss = xf.linear_cross_entropy(x, w, case.target, options=opts)
    else:
        chunk = int(name.rpartition("chunk")[2]) if "chunk" in name else None
        loss = xf.linear_cross_entropy(x, w, case.target, chunk_size=chunk)
    torch.autograd.grad(loss, (x, w))


def _unfused_head(x: torch.Tensor, w: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(x @ w.T, target)


def _external_here(device: str) -> bool:
    return torch.device(device).type in EXTERNAL_DEVICES


def contenders(config: str, compiled_kernel: bool = False, device: str = "cpu") -> list[str]:
    """The contenders of ``config`` on ``device``; ``compiled_kernel`` adds the
    compiled-kernel ones to the cross-entropy configurations whose dtype it serves. On CUDA
    the EXTERNAL ones are listed whether installed or not (a missing one is a row with a
    note, not an omission)."""
    cuda = _external_here(device)
    if CONFIGS[config][0] == "ce":
        served = getattr(torch, CONFIGS[config][4]) in _inductor.SERVED
        names = CE_CUDA_CONTENDERS if cuda else CE_CONTENDERS
        return names + (CE_COMPILED_CONTENDERS if compiled_kernel and served else [])
    names = LINEAR_CUDA_CONTENDERS if cuda else LINEAR_CONTENDERS
    return [c for c in names if _runs_here(c)]


def _runs_here(contender: str) -> bool:
    """torch's linear head and the compact policy need torch's function and its options
    class (with ``acc_policy`` for ``crossent-compact``)."""
    if not (contender.startswith("torch-lce") or contender == "crossent-compact"):
        return True
    options = getattr(torch.nn, "LinearCrossEntropyOptions", None)
    if not hasattr(F, "linear_cross_entropy") or options is None:
        return False
    return contender != "crossent-compact" or \
        "acc_policy" in inspect.signature(options).parameters


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _refill(case: Case) -> None:
    if case.kind == "ce":
        case.buf.copy_(case.logits)


def _failure_note(exc: BaseException, name: str) -> str:
    """The note of an EXTERNAL contender that could not run: ``not installed (pip install
    ...)`` for a missing package, ``failed: Type: first line`` for anything else."""
    if isinstance(exc, ImportError):
        return f"not installed (pip install {EXTERNAL[name]})"
    first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
    return f"failed: {type(exc).__name__}" + (f": {first}" if first else "")


def _prepare_external(case: Case, names: list[str]) -> dict[str, str]:
    """Import the EXTERNAL contenders among ``names`` into ``case``; the note of each one
    that cannot be imported (its package missing or broken)."""
    notes = {}
    for name in names:
        if name in EXTERNAL:
            try:
                case.external[name] = load_external(name, case.kind)
            except Exception as exc:  # a broken install must not end the run
                notes[name] = _failure_note(exc, name)
    return notes


def time_config(config: str, device: str, repeats: int, warmup: int, quick: bool,
                on_round: Callable[[int, float], None] | None = None,
                compiled_kernel: bool = False):
    """Median and min of ``repeats`` timed steps per contender, after ``warmup`` untimed ones;
    ``on_round(i, seconds)`` is called after round ``i`` (one step of every contender).

    On CUDA each timed step also records ``torch.cuda.max_memory_allocated`` above the
    memory allocated before it (the inputs): ``peak_mib``, the largest over the steps. An
    EXTERNAL contender that is missing or raises gets ``{"note": ...}`` instead of times
    (and leaves the rotation); any other contender's exception ends the run."""
    case = make_case(config, device, quick)
    names = contenders(config, compiled_kernel, device)
    notes = _prepare_external(case, names)
    active = [n for n in names if n not in notes]
    runs: dict[str, list[float]] = {n: [] for n in active}
    load: dict[str, list[float]] = {n: [] for n in active}  # 1-min load average, first/last
    peaks: dict[str, list[int]] = {n: [] for n in active}  # CUDA bytes above the inputs
    cuda = device.startswith("cuda")

    def timed(name: str) -> bool:
        """One step of ``name``, False when an EXTERNAL contender raised (noted)."""
        try:
            step(case, name)
        except Exception as exc:
            if name not in EXTERNAL:
                raise
            notes[name] = _failure_note(exc, name)
            print(f"{config}/{name} {notes[name]}", file=sys.stderr)
            return False
        return True

    for name in list(active):
        for _ in range(warmup):
            _refill(case)
            if not timed(name):
                active.remove(name)
                break
    for i in range(1, repeats + 1):
        started = time.perf_counter()
        # round-robin, each round starting one contender later: noise hits every contender
        # alike, and none always runs right after the same one (the allocator and caches
        # favoured one order by up to 2x at small sizes)
        shift = (i - 1) % max(len(active), 1)
        for name in active[shift:] + active[:shift]:
            _refill(case)
            _sync(device)
            if i == 1:
                load[name].append(os.getloadavg()[0])
            if cuda:
                base = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            ok = timed(name)
            _sync(device)
            seconds = time.perf_counter() - t0
            if not ok:
                continue
            runs[name].append(seconds * 1e3)
            if cuda:
                peaks[name].append(torch.cuda.max_memory_allocated(device) - base)
            if i == repeats:
                load[name].append(os.getloadavg()[0])
        active = [n for n in active if n not in notes]
        if on_round is not None:
            on_round(i, time.perf_counter() - started)
    timing: dict[str, dict[str, Any]] = {}
    for n in names:  # in the contenders' order, noted ones included
        if n in notes:
            timing[n] = {"note": notes[n]}
            continue
        r = runs[n]
        timing[n] = {"median_ms": statistics.median(r), "min_ms": min(r), "runs_ms": r,
                     "loadavg_before": load[n][0], "loadavg_after": load[n][-1]}
        if cuda:
            timing[n]["peak_mib"] = max(peaks[n]) / 2**20
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
                  on_start: Callable[[str, int], None] | None = None,
                  compiled_kernel: bool = False) -> dict[str, float | None]:
    """Peak MiB of each contender, each in a fresh process; ``on_start(name, i)`` is called
    before the ``i``-th (from 1)."""
    out: dict[str, float | None] = {}
    for i, name in enumerate(contenders(config, compiled_kernel), 1):
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
    exp-floor for ``ce``, and to the memory floor where the bandwidth is known), peak memory;
    an external contender that is missing or failed is a row of dashes with its note; the
    floor (or why there is none) closes the block."""
    lines = []
    for config, res in results["configs"].items():
        kind, n, v, d, dtype = res["shape"]
        base = "eager" if kind == "ce" else "unfused"
        lines.append(f"\n{config}: {kind} N={n} V={v}" + (f" D={d}" if d else "") +
                     f" {dtype}, forward+backward, {results['repeats']} runs"
                     + (f", {results['load']} competing process(es)" if results.get("load")
                        else "") + "; ratios of medians"
                     f" (min-based in brackets) to {base}" + (" and to exp-floor" if
                                                              kind == "ce" else ""))
        entries = res["contenders"].values()
        with_exp = any("vs_exp" in r for r in entries)
        with_floor = any("vs_floor" in r for r in entries)
        with_mem = any(r.get("peak_mib") is not None for r in entries)
        with_load = any("loadavg_before" in r for r in entries)
        with_note = any("note" in r for r in entries)
        rows = [["contender", "median ms", "min ms", f"x {base} [min]"]
                + (["x exp [min]"] if with_exp else [])
                + (["x floor"] if with_floor else [])
                + (["peak MiB", "x mem"] if with_mem else [])
                + (["load"] if with_load else [])
                + (["note"] if with_note else [])]
        for name, r in res["contenders"].items():
            if "median_ms" not in r:  # missing or failed: a row of dashes and the note
                rows.append([name] + ["-"] * (len(rows[0]) - 2) + [r.get("note", "")])
                continue
            row = [name, f"{r['median_ms']:.1f}", f"{r['min_ms']:.1f}",
                   f"{r['vs_' + base]:.3f} [{r['min_vs_' + base]:.3f}]"]
            if with_exp:
                row.append(f"{r['vs_exp']:.2f} [{r['min_vs_exp']:.2f}]" if "vs_exp" in r else "")
            if with_floor:
                row.append(f"{r['vs_floor']:.2f}" if "vs_floor" in r else "")
            if with_mem:
                mem, ratio = r.get("peak_mib"), r.get("mem_vs_" + base)
                row += [f"{mem:.1f}" if mem is not None else "-",
                        f"{ratio:.3f}" if ratio is not None else ""]
            if with_load:  # the 1-min load average at its first and after its last step
                row.append(f"{r['loadavg_before']:.1f}->{r['loadavg_after']:.1f}"
                           if "loadavg_before" in r else "")
            if with_note:
                row.append(r.get("note", ""))
            rows.append(row)
        lines += _columns(rows)
        if res.get("floor_note"):
            lines.append(res["floor_note"])
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
        names = [n for n in res if "median_ms" in res[n]]  # not the missing or failed
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


def check_matplotlib() -> None:
    """Import matplotlib now: the figures are drawn after the timing (minutes), and a missing
    matplotlib must not throw the timings away. Without it: ``ModuleNotFoundError``
    (``name='matplotlib'``, which the ``crossent`` command maps to its extra)."""
    try:
        import matplotlib.figure  # noqa: F401
    except ModuleNotFoundError as err:
        missing_extra(err, "matplotlib", "the benchmark's figures need matplotlib: pip "
                                         "install 'crossent[cli]' (or matplotlib)")


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


def time_crossover(device: str, repeats: int, sizes: list[tuple[int, int]] | None = None,
                   say: Callable[[str], None] | None = None) -> list[dict]:
    """Forward+backward of ``crossent.torch.cross_entropy`` against torch eager on float32
    logits and index targets at each ``(N, V)`` of ``sizes`` (default
    :data:`CROSSOVER_SIZES`): per size the medians and the median of the per-round ratios
    (crossent / eager; below 1: crossent is faster)."""
    out = []
    for n, v in sizes or CROSSOVER_SIZES:
        g = torch.Generator(device=device).manual_seed(0)
        logits = torch.randn(n, v, generator=g, device=device)
        target = torch.randint(0, v, (n,), generator=g, device=device)

        def eager(logits: torch.Tensor = logits, target: torch.Tensor = target) -> None:
            z = logits.detach().requires_grad_()
            torch.autograd.grad(F.cross_entropy(z, target), z)

        def fused(logits: torch.Tensor = logits, target: torch.Tensor = target) -> None:
            z = logits.detach().requires_grad_()
            torch.autograd.grad(xf.cross_entropy(z, target), z)

        runs: dict[str, list[float]] = {"eager": [], "crossent": []}
        # short steps: many rounds, so that a median means something
        rounds = repeats * max(1, min(50, 2_000_000 // (n * v)))
        pair = (("eager", eager), ("crossent", fused))
        for r in range(rounds + 2):
            # alternate who goes first: at these sizes the allocator and the caches favour
            # one order (measured up to 2x), and the paired ratio would inherit it
            for name, fn in pair if r % 2 else pair[::-1]:
                _sync(device)
                t0 = time.perf_counter()
                fn()
                _sync(device)
                if r >= 2:  # two warm-up rounds
                    runs[name].append((time.perf_counter() - t0) * 1e3)
        ratio = statistics.median(a / b for a, b in zip(runs["crossent"], runs["eager"],
                                                         strict=True))
        out.append({"N": n, "V": v, "logits": n * v, "rounds": rounds,
                    "eager_ms": statistics.median(runs["eager"]),
                    "crossent_ms": statistics.median(runs["crossent"]), "ratio": ratio})
        if say is not None:
            say(f"  crossover N={n} V={v}: crossent {ratio:.2f}x eager")
    return out


def crossover_table(points: list[dict]) -> str:
    rows = [["N x V", "eager ms", "crossent ms", "x eager (paired median)"]]
    rows += [[f"{p['N']} x {p['V']}", f"{p['eager_ms']:.3f}", f"{p['crossent_ms']:.3f}",
              f"{p['ratio']:.3f}"] for p in points]
    title = "\ncrossover: cross_entropy float32, index targets, forward+backward"
    return "\n".join([title, *_columns(rows)])


def crossover_figure(points: list[dict], title: str) -> Figure:
    """crossent's time over torch eager's against the number of logits (log scale)."""
    from matplotlib.figure import Figure

    from ._backends import NATIVE_MAX_LOGITS

    fig = Figure(figsize=(6.4, 4.0), layout="constrained")
    ax = fig.subplots()
    ordered = sorted(points, key=lambda p: p["logits"])
    ax.plot([p["logits"] for p in ordered], [p["ratio"] for p in ordered], "o-")
    ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)
    ax.axvline(NATIVE_MAX_LOGITS, color="tab:orange", linestyle=":", linewidth=1,
               label="below: torch's own kernel (backend='auto')")
    ax.legend(loc="upper right", fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("logits N x V (float32)")
    ax.set_ylabel("crossent time / torch eager time")
    ax.set_ylim(bottom=0)
    ax.set_title(textwrap.fill(title, 60), fontsize=10)
    return fig


class CompetingLoad:
    """``processes`` busy processes (a Python loop each) while the block runs: the machine of
    a training job that also runs data loaders or a second job per core. ``with
    CompetingLoad(os.cpu_count()):`` puts one on every core; they are killed on exit, also
    after an error or ^C. ``processes`` is an integer in [0, :func:`max_load`], refused
    otherwise (an :class:`~crossent.errors.InputError` naming it)."""

    active: ClassVar[list[subprocess.Popen]] = []  # the running children (the tests look)

    def __init__(self, processes: int) -> None:
        self.processes = check_load(processes, "processes")

    def __enter__(self) -> CompetingLoad:
        try:
            for _ in range(self.processes):
                self.active.append(subprocess.Popen(
                    [sys.executable, "-c", "while True: pass"], stdin=subprocess.DEVNULL))
        except BaseException:
            self.__exit__()
            raise
        if self.processes:
            time.sleep(1.0)  # let them start spinning before the first timed step
        return self

    def __exit__(self, *exc: object) -> None:
        for child in self.active:
            child.kill()
        for child in self.active:
            child.wait()
        self.active.clear()


def _check_count(value: object, name: str, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise InputError(f"{name} must be an integer >= {least} (got {value!r})")
    return value


LOAD_PER_CPU = 4
"""At most this many competing processes per CPU (:func:`max_load`)."""


def max_load() -> int:
    """The most busy processes ``--load`` (:class:`CompetingLoad`) starts:
    :data:`LOAD_PER_CPU` per CPU (``os.cpu_count()``). One per core is the heavy load the
    option is for; a few per core still measures a crowded machine, while thousands would
    only exhaust the process table and memory (each child is a Python interpreter, ~10 MB)
    before the first timed step."""
    return LOAD_PER_CPU * (os.cpu_count() or 1)


def check_load(value: object, name: str = "--load") -> int:
    """``--load``: an integer in [0, :func:`max_load`] (an :class:`InputError` naming
    ``name`` otherwise)."""
    count = check_integer(value, name, minimum=0)  # NumPy integers too
    if count > max_load():
        raise InputError(f"{name} must be an integer <= {max_load()} ({LOAD_PER_CPU} busy "
                         f"processes per CPU, {os.cpu_count() or 1} CPUs here; got {value!r})")
    return count


def default_configs(device: str) -> list[str]:
    """The configurations run when none is named: :data:`DEFAULT_CUDA` on a CUDA device,
    :data:`DEFAULT` otherwise."""
    return list(DEFAULT_CUDA if device.startswith("cuda") else DEFAULT)


def check_bandwidth(value: object) -> float | None:
    """``--bandwidth``: None, or a finite number of bytes per second, at least 1 (a
    subnormal one would make the floor infinite, which strict JSON cannot hold)."""
    if value is None:
        return None
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or not math.isfinite(as_float(value)) or value < 1):  # 10**400: not OverflowError
        raise InputError(f"--bandwidth must be a number of bytes per second, at least 1, "
                         f"e.g. 4.8e12 (got {value!r})")
    return float(value)


def gpu_bandwidth(device_name: str) -> tuple[float | None, str | None]:
    """The HBM bandwidth (bytes/s) of the GPU named ``device_name`` from
    :data:`GPU_BANDWIDTH` and where it came from, or ``(None, None)`` for a GPU not in it.

    >>> gpu_bandwidth("NVIDIA H100 80GB HBM3")
    (3350000000000.0, 'H100 SXM (looked up from the device name)')
    >>> gpu_bandwidth("NVIDIA GH200 480GB")
    (None, None)
    """
    for pattern, bandwidth, label in GPU_BANDWIDTH:
        if re.search(pattern, device_name, re.IGNORECASE):
            return bandwidth, f"{label} (looked up from the device name)"
    return None, None


def floor_ms(n: int, v: int, itemsize: int, bandwidth: float) -> float:
    """The memory floor of one cross-entropy forward+backward, in ms: one read of the
    ``n x v`` logits plus one write of their gradient, ``2 n v itemsize / bandwidth``
    (every other byte moved is above it).

    >>> round(floor_ms(16384, 128256, 2, 4.8e12), 3)  # bfloat16 on an H200
    1.751
    """
    return 2 * n * v * itemsize / bandwidth * 1e3


def _floor_entry(shape: tuple, results: dict, cuda: bool) -> dict[str, Any]:
    """``floor_ms`` and ``floor_note`` of a cross-entropy configuration of ``shape``: the
    floor at the run's bandwidth; on CUDA without one, a note that there is none."""
    _, n, v, _, dtype = shape
    bandwidth = results["bandwidth"]
    memory = "HBM" if cuda else "memory"
    if bandwidth is None:
        return ({"floor_ms": None, "floor_note": (
            f"no {memory} floor: the bandwidth of {results['device_name']} is not known; "
            "give --bandwidth BYTES_PER_S")} if cuda else {})
    floor = floor_ms(n, v, getattr(torch, dtype).itemsize, bandwidth)
    return {"floor_ms": floor, "floor_note": (
        f"{memory} floor {floor:.4g} ms: one read of the logits + one write of the gradient "
        f"(2 N V itemsize) at {bandwidth / 1e12:.4g} TB/s, {results['bandwidth_source']}")}


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def run(configs: list[str] | None = None, *, device: str | None = None, repeats: int = 5,
        warmup: int = 1, memory: bool = True, quick: bool = False,
        out: Path | str = DEFAULT_OUT, say: Callable[[str], None] | None = None,
        load: int = 0, crossover: bool = False, compiled_kernel: bool = False,
        bandwidth: float | None = None) -> dict:
    """Benchmark ``configs`` (default :func:`default_configs`: :data:`DEFAULT` on CPU,
    :data:`DEFAULT_CUDA` on CUDA); print a table per configuration, write
    ``out/bench.json`` and ``out/bench.png`` and return the results.

    ``load``: that many busy processes compete for the cores while the steps are timed
    (:class:`CompetingLoad`; ``os.cpu_count()`` puts one on every core; at most
    :func:`max_load`, 4 per CPU); every contender's
    1-min load average at its first timed step and after its last is recorded either way.
    ``crossover``: also sweep :data:`CROSSOVER_SIZES` (:func:`time_crossover`), a table and
    ``out/crossover.png``; ``configs=[]`` with it runs the sweep alone.
    ``compiled_kernel``: the bfloat16/float16/float32 cross-entropy configurations also time
    crossent with :func:`crossent.torch.set_compiled_kernel` on (CPU only; needs a C++
    compiler; each process compiles on its first step, 10-25 s).
    ``bandwidth``: memory bytes/s for the floor of the cross-entropy configurations
    (:func:`floor_ms`); on CUDA by default looked up from the GPU's name
    (:data:`GPU_BANDWIDTH`; an unknown GPU gets no floor, and the table says so).
    Peak memory: on CPU one fresh process per contender (:func:`memory_config`), on CUDA
    ``torch.cuda.max_memory_allocated`` above the inputs in the timed steps.
    The options are checked before the first step (an :class:`~crossent.errors.InputError`
    naming the option), and so is matplotlib (:func:`check_matplotlib`); progress goes to
    ``say`` (default: a line on stderr)."""
    device = check_device(device)
    configs = list(default_configs(device) if configs is None else configs)
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown or not (configs or crossover):
        what = f"unknown configuration {unknown[0]!r}" if unknown else "no configuration"
        raise InputError(f"{what}; choose from {', '.join(CONFIGS)}")
    _check_count(repeats, "--repeats", 1)
    _check_count(warmup, "--warmup", 0)
    load = check_load(load)  # a plain int: the results are written as JSON
    bandwidth = check_bandwidth(bandwidth)
    if compiled_kernel and not device.startswith("cpu"):
        raise InputError(f"--compiled-kernel: the compiled kernel runs on CPU tensors only "
                         f"(--device {device})")
    if compiled_kernel and not _inductor.available():
        raise InputError("--compiled-kernel: needs a C++ compiler (g++ or clang++ on PATH) "
                         "for torch's inductor")
    out = check_output_path(out, "--out", directory=True)
    check_files_in(out, ["bench.json", *(["bench.png"] if configs else []),
                         *(["crossover.png"] if crossover else [])], "--out")
    check_matplotlib()  # every run draws bench.png or crossover.png
    say = say or _to_stderr
    results: dict[str, Any] = {
        "torch": torch.__version__, "python": platform.python_version(),
        "device": device, "threads": torch.get_num_threads(),
        "device_name": (torch.cuda.get_device_name(device) if device.startswith("cuda")
                        else f"{platform.processor() or platform.machine()} "
                             f"{os.cpu_count()} CPUs"),
        "repeats": repeats, "warmup": warmup, "quick": quick, "load": load,
        "loadavg_before": os.getloadavg(), "configs": {},
    }
    cuda = device.startswith("cuda")
    results["bandwidth"], results["bandwidth_source"] = (
        (bandwidth, "--bandwidth") if bandwidth is not None
        else gpu_bandwidth(results["device_name"]) if cuda else (None, None))
    memory_note = ((", peak memory in the timed steps" if cuda else
                    ", peak memory in one fresh process per contender") if memory else "")
    if load:
        memory_note += f", {load} busy process(es) competing while timing"
    say(f"crossent bench: {len(configs)} configuration(s) on {results['device_name']}: "
        f"{warmup} warm-up and {repeats} timed step(s) per contender{memory_note}. "
        "torch.compile compiles on its first step (seconds to a minute); the time left is "
        "estimated after each configuration (--quick: a smoke test).")
    if cuda and results["bandwidth"] is None:
        say(f"no HBM floor: the memory bandwidth of {results['device_name']} is not known; "
            "give it with --bandwidth BYTES_PER_S (e.g. 3.35e12)")
    progress = _Progress(configs, say)
    for i, config in enumerate(configs, 1):
        kind = CONFIGS[config][0]
        started = time.perf_counter()
        names = contenders(config, compiled_kernel, device)
        say(f"[{i}/{len(configs)}] {config}: {len(names)} contenders, "
            f"{'warm-up, then ' if warmup else ''}timing...")

        def on_round(r: int, seconds: float, config: str = config) -> None:
            if r == 1 or r == repeats:
                left = (repeats - r) * seconds
                say(f"  {config}: timed round {r}/{repeats} took {_duration(seconds)}"
                    + (f"; about {_duration(left)} more of timing" if r < repeats else ""))

        with CompetingLoad(load):
            timing, shape = time_config(config, device, repeats, warmup, quick, on_round,
                                        compiled_kernel)

        def on_start(name: str, j: int, config: str = config, k: int = len(names)) -> None:
            say(f"  {config}: peak memory {j}/{k} ({name}, a fresh process)")

        if cuda:  # measured in the timed steps
            mem = {n: r.pop("peak_mib", None) for n, r in timing.items()}
            mem = mem if memory else {}
        else:
            mem = (memory_config(config, device, quick, on_start, compiled_kernel) if memory
                   else {})
        entry = {"shape": list(shape), "contenders": timing}
        if kind == "ce":
            entry.update(_floor_entry(shape, results, cuda))
        base = "eager" if kind == "ce" else "unfused"
        for name, r in timing.items():
            if "median_ms" not in r:  # an external contender, missing or failed: its note
                continue
            if entry.get("floor_ms"):
                r["vs_floor"] = r["median_ms"] / entry["floor_ms"]
            r["vs_" + base] = r["median_ms"] / timing[base]["median_ms"]
            r["min_vs_" + base] = r["min_ms"] / timing[base]["min_ms"]
            if "exp-floor" in timing:
                r["vs_exp"] = r["median_ms"] / timing["exp-floor"]["median_ms"]
                r["min_vs_exp"] = r["min_ms"] / timing["exp-floor"]["min_ms"]
            r["paired_vs_" + base] = statistics.median(  # per-round ratios: noise cancels
                a / b for a, b in zip(r["runs_ms"], timing[base]["runs_ms"], strict=True))
            peak, peak_base = mem.get(name), mem.get(base)
            r["peak_mib"] = peak
            if peak is not None and peak_base:
                r["mem_vs_" + base] = peak / peak_base
        results["configs"][config] = entry
        print(table({"configs": {config: results["configs"][config]}, "repeats": repeats,
                     "load": load}), flush=True)
        progress.finished(config, time.perf_counter() - started)
    written = []
    if crossover:
        say(f"crossover: {len(CROSSOVER_SIZES)} sizes, crossent against torch eager...")
        sizes = [(max(n // 16, 4), max(v // 16, 16)) for n, v in CROSSOVER_SIZES] if quick else None
        with CompetingLoad(load):
            results["crossover"] = time_crossover(device, repeats, sizes, say)
        print(crossover_table(results["crossover"]), flush=True)
    results["loadavg_after"] = os.getloadavg()
    # every figure drawn before the first file is written: an interruption (Ctrl-C,
    # SIGTERM) while drawing leaves the --out folder as it was
    files: dict[str, bytes] = {}
    if configs:
        files["bench.png"] = figure_bytes(figure(results), "png", dpi=110)
    if crossover:
        title = (f"crossent.torch.cross_entropy vs torch {results['torch']} eager on "
                 f"{results['device_name']}" + (f", {load} competing process(es)" if load
                                                else ""))
        files["crossover.png"] = figure_bytes(crossover_figure(results["crossover"], title),
                                              "png", dpi=110)
    report = json.dumps(results, indent=1) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        write_atomic(out / name, data)
        written.append(out / name)
    write_atomic(out / "bench.json", report)
    print(f"\nwrote {out / 'bench.json'} and {' and '.join(map(str, written))}; load average "
          f"{results['loadavg_before']} -> {results['loadavg_after']}", flush=True)
    return results


def main(argv: list[str] | None = None) -> dict | None:
    """``python -m crossent.torch.bench``: the same options as ``crossent bench``."""
    p = argparse.ArgumentParser(prog="python -m crossent.torch.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("configs", nargs="*", default=None,
                   help=f"any of {', '.join(CONFIGS)}; default: {' '.join(DEFAULT)} on CPU, "
                        f"{' '.join(DEFAULT_CUDA)} on CUDA")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument("--repeats", type=ascii_integer, default=5)
    p.add_argument("--warmup", type=ascii_integer, default=1)
    p.add_argument("--no-memory", dest="memory", action="store_false")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    p.add_argument("--load", type=ascii_integer, default=0, metavar="N",
                   help="N busy processes compete while timing (one per core: "
                        f"{os.cpu_count()} here; at most {max_load()})")
    p.add_argument("--crossover", action="store_true",
                   help="sweep small to large N x V: crossent / eager against the size "
                        "(alone unless configurations are named)")
    p.add_argument("--compiled-kernel", action="store_true",
                   help="also time crossent with set_compiled_kernel(True) on the bfloat16/"
                        "float16 cross-entropy configurations (CPU; compiles 10-25 s)")
    p.add_argument("--bandwidth", type=ascii_number, default=None, metavar="BYTES_PER_S",
                   help="memory bandwidth for the floor of the cross-entropy steps "
                        "(2 N V itemsize / bandwidth); default on CUDA: looked up from the "
                        "GPU's name (H200 4.8e12, H100 SXM 3.35e12, ...)")
    p.add_argument("--out", default=str(DEFAULT_OUT),
                   help=f"folder for bench.json and bench.png (default: {DEFAULT_OUT})")
    p.add_argument("--_memory-child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._memory_child:
        config, name = args._memory_child
        print(memory_child(config, name, check_device(args.device), args.quick))
        return None
    try:
        configs = args.configs or ([] if args.crossover else None)  # None: per device
        return run(configs, device=args.device, repeats=args.repeats, warmup=args.warmup,
                   memory=args.memory, quick=args.quick, out=args.out, load=args.load,
                   crossover=args.crossover, compiled_kernel=args.compiled_kernel,
                   bandwidth=args.bandwidth)
    except InputError as e:
        p.exit(2, f"{p.prog}: error: {e}\n")
    except ModuleNotFoundError as e:  # as crossent bench: one line, exit code 1
        # (torch: crossent.torch itself fails first, when it is imported)
        if (e.name or "").partition(".")[0] != "matplotlib":
            raise
        p.exit(1, f"{p.prog}: error: needs matplotlib: pip install 'crossent[cli]'\n")
    except KeyboardInterrupt:
        p.exit(130, f"{p.prog}: interrupted\n")


if __name__ == "__main__":
    main()
