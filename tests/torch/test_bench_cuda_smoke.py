"""The prepared GPU benchmark (``benchmarks/gpu/bench_cuda.py``) runs end to end on a CPU.

A GPU is lent to a few sessions only, for minutes: a script that breaks there wastes the
run. Here every part of it runs once, on its tiny shapes in Triton's interpreter, in a
subprocess (``--interpret`` sets ``TRITON_INTERPRET`` before triton is imported): the
float64 checks, every contender, the kernel's launch-variant sweep and the linear head's
chunk / dW sweep. Timings are meaningless here; what is checked is that each part ran,
checked its numbers against the reference and wrote them to the JSON file."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu" / "bench_cuda.py"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_cuda") / "all.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", "--interpret", "--sweep", "--head-sweep",
         "--repeats", "1", "--warmup", "0", "--json", str(out)],
        capture_output=True, text=True, timeout=400, env=env)
    return proc, json.loads(out.read_text()) if out.exists() else None


def test_every_part_runs_and_exits_0(smoke):
    proc, data = smoke
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "FAIL" not in proc.stdout
    assert set(data) == {"header", "checks", "results", "sweep", "head_sweep"}


def test_the_checks_ran_against_float64_torch(smoke):
    lines = smoke[1]["checks"]
    assert len(lines) >= 20 and all(line.startswith("ok ") for line in lines), lines
    assert any("linear" in line and "dW" in line for line in lines)


def test_crossent_contenders_were_timed(smoke):
    rows = smoke[1]["results"]
    ours = [r for r in rows if r["contender"].startswith("crossent")]
    assert {r["config"] for r in ours} == {"ce 24x300 bfloat16", "ce 16x500 float32",
                                           "linear 24x32->300 bfloat16"}
    assert all(math.isfinite(r["median_ms"]) and not r["note"] for r in ours), ours


def test_the_launch_sweep_checked_and_timed_every_variant(smoke):
    sweep = smoke[1]["sweep"]
    assert set(sweep["best"]) == {"ce 24x300 bfloat16", "ce 16x500 float32"}
    for entry in sweep["variants"]:
        assert entry["note"] == "" and math.isfinite(entry["median_ms"]), entry
        assert entry["max_abs_grad_diff"] == entry["max_abs_grad_diff"]


def test_the_head_sweep_checked_each_chunk_and_dw_dtype_against_the_default(smoke):
    rows = smoke[1]["head_sweep"]["variants"]
    assert [(r["chunk_size"], r["dw_dtype"]) for r in rows] == [
        (None, None), (None, None), (8, None), (8, "bfloat16")]
    assert rows[0]["variant"] == "torch (unfused)"
    assert all(math.isfinite(r["median_ms"]) and not r["note"] for r in rows), rows
    # 8-row chunks of 24 rows: the variants really differ from the default's one chunk
    # (dW summed over 3 chunks), by less than the sweep's tolerance
    assert all(0 < r["max_dw_rel_diff"] < 4e-2 for r in rows[2:]), rows
