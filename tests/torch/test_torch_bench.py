"""The benchmark entry point runs end to end at tiny sizes (no timing assertions)."""

from __future__ import annotations

import json

from crossent.torch import bench


def test_bench_quick_writes_table_json_and_plot(tmp_path, capsys):
    results = bench.main(["ce-f32", "linear-f32", "--quick", "--repeats", "1", "--warmup", "0",
                          "--no-memory", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "crossent" in printed and "eager" in printed and "unfused" in printed
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert set(saved["configs"]) == {"ce-f32", "linear-f32"}
    assert saved["configs"]["ce-f32"]["contenders"]["crossent"]["median_ms"] > 0
    assert (tmp_path / "bench.png").stat().st_size > 0
    assert results is not None


def test_memory_child_reports_a_number():
    assert bench.memory_child("ce-f32", "crossent", "cpu", quick=True) >= 0.0


def test_crossent_bench_command_runs_the_benchmark(tmp_path):
    from typer.testing import CliRunner

    from crossent.cli import app

    result = CliRunner().invoke(app, ["bench", "ce-f32", "--quick", "--repeats", "1",
                                      "--warmup", "0", "--no-memory", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "crossent-inplace" in result.stdout
    assert json.loads((tmp_path / "bench.json").read_text())["repeats"] == 1


def test_crossent_bench_unknown_configuration_is_one_line_exit_2(tmp_path):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "crossent.cli", "bench", "ce-f64"],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "ce-f64" in done.stderr and "ce-f32" in done.stderr
    assert "Traceback" not in done.stderr
