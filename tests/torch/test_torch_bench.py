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
