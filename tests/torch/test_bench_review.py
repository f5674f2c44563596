"""Review of ``crossent bench``'s GPU additions and ``benchmarks/gpu/run_device.sh`` (H29),
on CPU: the in-place contender overwrites the activation ``case.act`` with torch's gradient
(and the others leave the logits alone), a ``--quick`` run through the CLI with crossent's
own kernels, the availability of the contenders that need torch's
``LinearCrossEntropyOptions``, the progress line of a CUDA run, and what each part of
``run_device.sh`` runs (a stub ``python``, ``timeout`` and ``nvidia-smi`` on PATH record
their arguments) and its exit status."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from crossent.cli import app
from crossent.torch import _backends, bench

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]
RUN_DEVICE = ROOT / "benchmarks" / "gpu" / "run_device.sh"


def torch_grad(case: bench.Case) -> torch.Tensor:
    """torch's gradient of the mean cross-entropy of the case's logits, in float64."""
    z = case.logits.double().requires_grad_()
    F.cross_entropy(z, case.target).backward()
    return z.grad


# --------------------------------------------------------------------------------------------
# the in-place contender
# --------------------------------------------------------------------------------------------


def test_inplace_contender_overwrites_the_activation_with_torchs_gradient(monkeypatch):
    """ce-small's 256 x 1000 logits through crossent's own kernel (torch's kernel threshold
    lowered): each crossent-inplace step leaves torch's gradient in case.act's memory (the
    same memory, still a non-leaf), step after step with the refill between; crossent
    (not in place), eager and exp-floor's input leave the logits in case.buf intact."""
    monkeypatch.setattr(_backends, "NATIVE_MAX_LOGITS", 0)
    case = bench.make_case("ce-small", "cpu", quick=False)
    assert not case.act.is_leaf and case.act.requires_grad
    assert case.buf.data_ptr() == case.act.data_ptr() and not case.buf.requires_grad
    want = torch_grad(case)
    ptr = case.act.data_ptr()
    for name in ("crossent-inplace", "crossent", "crossent-inplace", "eager"):
        bench._refill(case)
        assert torch.equal(case.buf, case.logits)
        bench.step(case, name)
        assert case.act.data_ptr() == ptr and case.buf.data_ptr() == ptr
        if name.endswith("inplace"):
            torch.testing.assert_close(case.buf.double(), want, rtol=1e-5, atol=1e-8)
        else:
            assert torch.equal(case.buf, case.logits), name


def test_case_holds_no_full_size_leaf_behind_the_activation():
    case = bench.make_case("ce-small", "cpu", quick=True)
    node = case.act.grad_fn
    while not hasattr(node, "variable"):  # past the clone and the expand to the leaf
        node = node.next_functions[0][0]
    assert node.variable.numel() < case.act.numel()


def test_quick_cli_run_times_the_inplace_contender(monkeypatch, tmp_path):
    """``crossent bench ce-f32 --quick`` (torch.compile left out: seconds of compiling) with
    crossent's own kernels at the quick size: every CPU contender gets times and ratios,
    crossent-inplace among them."""
    monkeypatch.setattr(_backends, "NATIVE_MAX_LOGITS", 0)
    monkeypatch.setattr(bench, "CE_CONTENDERS", [c for c in bench.CE_CONTENDERS
                                                 if c != "compile"])
    monkeypatch.setattr(bench, "plot", lambda results, path: path.write_bytes(b"png"))
    result = CliRunner().invoke(app, ["bench", "ce-f32", "--quick", "--repeats", "2",
                                      "--warmup", "1", "--no-memory", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "bench.json").read_text())
    timing = saved["configs"]["ce-f32"]["contenders"]
    assert list(timing) == ["exp-floor", "eager", "crossent", "crossent-inplace"]
    for r in timing.values():
        assert r["median_ms"] > 0 and len(r["runs_ms"]) == 2 and r["vs_eager"] > 0
    assert "floor_ms" not in saved["configs"]["ce-f32"]  # CPU without --bandwidth


# --------------------------------------------------------------------------------------------
# contenders that need torch's LinearCrossEntropyOptions
# --------------------------------------------------------------------------------------------


HAVE_LCE = hasattr(F, "linear_cross_entropy")
HAVE_OPTIONS = hasattr(torch.nn, "LinearCrossEntropyOptions")


def test_without_linear_cross_entropy_no_torch_lce_and_no_compact(monkeypatch):
    """torch 2.11 (the lent H200's) has neither F.linear_cross_entropy nor the options."""
    monkeypatch.delattr(F, "linear_cross_entropy", raising=False)
    for device in ("cpu", "cuda"):
        names = bench.contenders("gpu-linear-v128k-bf16", device=device)
        assert "crossent" in names and "unfused" in names
        assert not [n for n in names if n.startswith("torch-lce") or n == "crossent-compact"]


@pytest.mark.skipif(not HAVE_LCE, reason="this torch has no F.linear_cross_entropy")
def test_contenders_need_the_options_class(monkeypatch):
    monkeypatch.delattr(torch.nn, "LinearCrossEntropyOptions")
    for device in ("cpu", "cuda"):
        names = bench.contenders("linear-f32", device=device)
        assert not [n for n in names if n.startswith("torch-lce") or n == "crossent-compact"]


@pytest.mark.skipif(not (HAVE_LCE and HAVE_OPTIONS), reason="no LinearCrossEntropyOptions")
def test_compact_contender_runs_on_cpu_tensors():
    """crossent-compact's step (CUDA-only in the list) computes on CPU too: torch's options
    object with acc_policy='compact' is accepted by crossent's head."""
    case = bench.make_case("linear-bf16", "cpu", quick=True)
    bench.step(case, "crossent-compact")
    bench.step(case, "crossent")


# --------------------------------------------------------------------------------------------
# the progress line of a CUDA run
# --------------------------------------------------------------------------------------------


def test_cuda_progress_counts_the_cuda_contenders(monkeypatch, tmp_path):
    monkeypatch.setattr(bench, "check_device", lambda device: "cuda")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    monkeypatch.setattr(bench, "plot", lambda results, path: path.write_bytes(b"png"))

    def no_timing(config, device, repeats, warmup, quick, on_round, compiled_kernel=False):
        names = bench.contenders(config, compiled_kernel, device)
        return ({n: {"median_ms": 1.0, "min_ms": 1.0, "runs_ms": [1.0] * repeats,
                     "loadavg_before": 0.0, "loadavg_after": 0.0, "peak_mib": 1.0}
                 for n in names}, bench.CONFIGS[config])

    monkeypatch.setattr(bench, "time_config", no_timing)
    said: list[str] = []
    bench.run(["gpu-ce-v128k-bf16"], device="cuda", repeats=1, out=tmp_path, say=said.append)
    count = len(bench.contenders("gpu-ce-v128k-bf16", device="cuda"))
    assert f"[1/1] gpu-ce-v128k-bf16: {count} contenders, warm-up, then timing..." in said


# --------------------------------------------------------------------------------------------
# benchmarks/gpu/run_device.sh with stubs
# --------------------------------------------------------------------------------------------

_STUBS = {
    "python": 'echo "python $*" >> "$STUB_LOG"\nexit "${STUB_RC:-0}"\n',
    "timeout": 'echo "timeout $1" >> "$STUB_LOG"\nshift\nexec "$@"\n',
    "nvidia-smi": 'echo "nvidia-smi $*" >> "$STUB_LOG"\n',
}


def run_device(tmp_path: Path, *args: str, rc: int = 0) -> tuple[int, list[str], Path]:
    """run_device.sh with ``args``: its exit status, the stub commands it ran (one line
    each: ``timeout SECONDS`` before the command it wraps) and its OUT folder."""
    if shutil.which("bash") is None:
        pytest.skip("no bash")
    bin_dir, out = tmp_path / "bin", tmp_path / "out"
    bin_dir.mkdir(exist_ok=True)
    for name, body in _STUBS.items():
        path = bin_dir / name
        path.write_text("#!/bin/sh\n" + body)
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    log = tmp_path / "log"
    log.unlink(missing_ok=True)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "OUT": str(out), "STUB_LOG": str(log), "STUB_RC": str(rc)}
    proc = subprocess.run(["bash", str(RUN_DEVICE), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=30)
    return proc.returncode, log.read_text().splitlines(), out


def test_run_device_script_parses():
    if shutil.which("bash") is None:
        pytest.skip("no bash")
    subprocess.run(["bash", "-n", str(RUN_DEVICE)], check=True, timeout=30)


def _head(out: Path) -> list[str]:
    return ["nvidia-smi --query-gpu=name,memory.total,clocks.max.memory --format=csv",
            "python -c import torch, triton; print(torch.__version__, triton.__version__, "
            "torch.cuda.get_device_name())"]


def _bench(out: Path, *extra: str) -> list[str]:
    return ["timeout 330", " ".join(["python benchmarks/gpu/bench_cuda.py --max-minutes 4.5",
                                     f"--json {out}/bench.json", *extra])]


def _tests() -> list[str]:
    return ["timeout 240",
            "python -m pytest tests/triton -q -rfEX --tb=short -p no:cacheprovider"]


@pytest.mark.parametrize(("args", "expected"), [
    ((), lambda out: _bench(out)),
    (("bench", "--only", "ce"), lambda out: _bench(out, "--only", "ce")),
    (("--sweep", "--repeats", "3"), lambda out: _bench(out, "--sweep", "--repeats", "3")),
    (("sweep", "--repeats", "3"), lambda out: [
        "timeout 330", "python benchmarks/gpu/bench_cuda.py --sweep-only --head-sweep "
        f"--max-minutes 5 --json {out}/sweep.json --repeats 3",
        "timeout 200", "python -m pytest tests/triton/test_triton_kernel_variants.py -q "
        "-p no:cacheprovider"]),
    (("tests",), lambda out: _tests()),
    (("all", "--no-compile"), lambda out: _bench(out, "--no-compile") + _tests()),
], ids=["default", "bench", "flag-first", "sweep", "tests", "all"])
def test_run_device_parts_run_their_commands(tmp_path, args, expected):
    """Each part: the GPU and version lines, then its commands under their timeouts, extra
    arguments after the part passed to bench_cuda.py (a first argument that is not a part
    is the bench's); the tests part writes the pytest exit status."""
    _, ran, out = run_device(tmp_path, *args)
    assert ran == _head(out) + expected(out)
    assert (out / "versions.txt").exists() and (out / "gpu.txt").exists()
    if "tests" in args or "all" in args:
        assert "pytest exit status: 0" in (out / "tests_full.txt").read_text()


def test_run_device_bench_part_exits_0_after_a_clean_run(tmp_path):
    rc, _, _ = run_device(tmp_path, "bench")
    assert rc == 0


@pytest.mark.parametrize("part", ["sweep", "tests", "all"])
def test_run_device_reports_a_failing_step(tmp_path, part):
    rc, _, _ = run_device(tmp_path, part, rc=1)
    assert rc != 0
