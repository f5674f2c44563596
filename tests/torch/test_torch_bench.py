"""The benchmark entry point runs end to end at tiny sizes (no timing assertions), and what a
user sees of it: progress and the time left on stderr, a table whose columns never run
together, a figure whose title fits, the default output folder, options checked first."""

from __future__ import annotations

import json
import re

import pytest

from crossent.torch import bench


def test_bench_quick_writes_table_json_and_plot(tmp_path, capsys):
    results = bench.main(["ce-f32", "linear-f32", "--quick", "--repeats", "1", "--warmup", "0",
                          "--no-memory", "--out", str(tmp_path)])
    captured = capsys.readouterr()
    printed = captured.out
    assert "crossent" in printed and "eager" in printed and "unfused" in printed
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert set(saved["configs"]) == {"ce-f32", "linear-f32"}
    assert saved["configs"]["ce-f32"]["contenders"]["crossent"]["median_ms"] > 0
    assert (tmp_path / "bench.png").stat().st_size > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.json", "bench.png"]
    assert results is not None
    progress = captured.err.splitlines()
    assert progress[0].startswith("crossent bench: 2 configuration(s) on ")
    assert progress[1] == "[1/2] ce-f32: 5 contenders, timing..."
    assert "ce-f32: timed round 1/1 took " in captured.err
    assert re.search(r"ce-f32 done in [\d.]+ (s|min) \([\d.]+ (s|min) in all\); about "
                     r"[\d.]+ (s|min) left", captured.err), captured.err
    assert "[2/2] linear-f32: 6 contenders, timing..." in progress


def test_memory_child_reports_a_number():
    assert bench.memory_child("ce-f32", "crossent", "cpu", quick=True) >= 0.0


def test_crossent_bench_command_writes_to_crossent_bench_by_default(tmp_path, monkeypatch):
    """Run from a repository root, the default output is not benchmarks/results."""
    from typer.testing import CliRunner

    from crossent.cli import app

    def no_timing(config, device, repeats, warmup, quick, on_round,  # the plumbing only
                  compiled_kernel=False):
        names = bench.contenders(config)
        return ({n: {"median_ms": 1.0, "min_ms": 1.0, "runs_ms": [1.0]} for n in names},
                bench.CONFIGS[config])

    monkeypatch.setattr(bench, "time_config", no_timing)
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["bench", "ce-small", "--repeats", "1", "--no-memory"])
    assert result.exit_code == 0, result.output
    assert "crossent-inplace" in result.stdout
    assert json.loads((tmp_path / "crossent-bench" / "bench.json").read_text())["repeats"] == 1
    assert not any((tmp_path / "benchmarks" / "results").iterdir())
    assert bench.DEFAULT_OUT.as_posix() == "crossent-bench"


def fake_results(configs: dict[str, float], memory: bool, device_name: str) -> dict:
    """Results as ``run`` makes them, with chosen medians (ms) for every contender."""
    out: dict = {"torch": "2.13.0", "device_name": device_name, "repeats": 5, "configs": {}}
    for config, ms in configs.items():
        kind, n, v, d, dtype = bench.CONFIGS[config]
        base = "eager" if kind == "ce" else "unfused"
        contenders = {}
        for i, name in enumerate(bench.contenders(config)):
            r = {"median_ms": ms * (i + 1), "min_ms": ms * (i + 1) * 0.9,
                 "vs_" + base: float(i + 1), "min_vs_" + base: float(i + 1),
                 "peak_mib": 123456.7 * (i + 1) if memory else None}
            if kind == "ce":
                r.update(vs_exp=12345.678 * (i + 1), min_vs_exp=12345.678)
            if memory:
                r["mem_vs_" + base] = float(i + 1)
            contenders[name] = r
        out["configs"][config] = {"shape": [kind, n, v, d, dtype], "contenders": contenders}
    return out


@pytest.mark.parametrize("memory", [True, False])
def test_table_columns_never_run_together(memory):
    text = bench.table(fake_results({"ce-f32": 98765432.1, "linear-f32": 1.0}, memory, "cpu"))
    blocks = [b.splitlines() for b in text.strip().split("\n\n")]
    for block in blocks:
        header, *rows = block[1:]
        n = len(re.split(r"\s{2,}", header.strip()))
        assert n == (7 if memory else 5) - ("linear" in block[0] and 1)
        for row in rows:
            cells = re.split(r"\s{2,}", row.strip())
            assert len(cells) == n, row
    assert "98765432.1" in text and ("123456.7" in text) == memory


@pytest.mark.parametrize("memory", [True, False])
def test_figure_title_fits_and_no_empty_memory_panel(memory):
    long_name = "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz 208 CPUs"
    fig = bench.figure(fake_results({"ce-f32": 5.0}, memory, long_name))
    assert len(fig.axes) == (2 if memory else 1)
    fig.canvas.draw()
    box = fig._suptitle.get_window_extent()
    assert box.x0 >= 0 and box.x1 <= fig.bbox.x1 and box.y1 <= fig.bbox.y1
    assert "208 CPUs" in fig._suptitle.get_text()


@pytest.mark.parametrize(("argv", "needle"), [
    (["--device", "bogus"], "--device 'bogus'"),
    (["--out", ""], "--out"),
    (["ce-f64"], "unknown configuration 'ce-f64'"),
    (["--repeats", "0"], "--repeats"),
    (["--load", "-1"], "--load"),
])
def test_python_m_bench_bad_options_one_line_exit_2(argv, needle, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--quick", "--no-memory", "--out", str(tmp_path / "b"), *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("python -m crossent.torch.bench: error: ")
    assert needle in err
    assert not (tmp_path / "b").exists()


def test_load_runs_busy_processes_records_load_and_kills_them(tmp_path, capsys, monkeypatch):
    """--load N: N busy children exist while the steps are timed and are gone afterwards;
    every contender's load average is in the JSON and the table."""
    seen = []
    real = bench.time_config

    def spy(*args, **kwargs):
        load = bench.CompetingLoad.active
        seen.append([c.poll() for c in load])  # None: still running
        return real(*args, **kwargs)

    monkeypatch.setattr(bench, "time_config", spy)
    results = bench.main(["ce-small", "--quick", "--repeats", "2", "--warmup", "0",
                          "--no-memory", "--load", "1", "--out", str(tmp_path)])
    assert seen == [[None]]  # one: more slow the other test worker
    assert bench.CompetingLoad.active == []
    assert results is not None and results["load"] == 1
    entry = results["configs"]["ce-small"]["contenders"]["crossent"]
    assert entry["loadavg_before"] >= 0 and entry["loadavg_after"] >= 0
    assert entry["paired_vs_eager"] > 0
    out = capsys.readouterr().out
    assert "1 competing process(es)" in out and "->" in out


def test_competing_load_kills_its_children_after_an_error():
    with pytest.raises(ZeroDivisionError), bench.CompetingLoad(1) as load:
        child = load.active[0]
        raise ZeroDivisionError
    assert child.poll() is not None  # killed and reaped


def test_crossover_sweep_writes_its_table_and_figure(tmp_path, capsys):
    results = bench.main(["--crossover", "--quick", "--repeats", "1", "--no-memory",
                          "--out", str(tmp_path)])
    assert results is not None and results["configs"] == {}
    points = results["crossover"]
    assert [(p["N"], p["V"]) for p in points] == [
        (max(n // 16, 4), max(v // 16, 16)) for n, v in bench.CROSSOVER_SIZES]
    assert all(p["ratio"] > 0 and p["rounds"] >= 1 for p in points)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.json", "crossover.png"]
    assert "x eager (paired median)" in capsys.readouterr().out


def test_half_ignored_configuration_ignores_every_other_target():
    case = bench.make_case("linear-half-ignored", "cpu", quick=True)
    ignored = case.target == -100
    assert bool(ignored[::2].all()) and not bool(ignored[1::2].any())


def test_each_round_starts_one_contender_later(monkeypatch):
    """No contender always runs right after the same one (order effects of up to 2x were
    measured at small sizes)."""
    seen: list[str] = []
    monkeypatch.setattr(bench, "step", lambda case, name: seen.append(name))
    bench.time_config("ce-small", "cpu", repeats=3, warmup=0, quick=True)
    names = bench.contenders("ce-small")
    k = len(names)
    assert seen[:k] == names and seen[k:2 * k] == names[1:] + names[:1]
    assert seen[2 * k:] == names[2:] + names[:2]


def test_compiled_kernel_contenders_only_on_cross_entropy_of_served_dtypes():
    assert bench.contenders("ce-bf16") == bench.CE_CONTENDERS
    assert bench.contenders("ce-bf16", True) == (bench.CE_CONTENDERS
                                                 + bench.CE_COMPILED_CONTENDERS)
    assert bench.contenders("ce-f32", True) == (bench.CE_CONTENDERS
                                                + bench.CE_COMPILED_CONTENDERS)
    assert bench.contenders("ce-f32") == bench.CE_CONTENDERS
    assert "crossent-compiled" not in bench.contenders("linear-bf16", True)


def test_compiled_kernel_refuses_a_cuda_device_before_any_step(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "check_device", lambda device: "cuda")
    monkeypatch.setattr(bench, "time_config", lambda *a, **k: pytest.fail("timed"))
    with pytest.raises(bench.InputError, match="--compiled-kernel"):
        bench.run(["ce-bf16"], device="cuda", compiled_kernel=True, out=tmp_path)


@pytest.mark.skipif(not bench._inductor.available(), reason="no C++ compiler")
@pytest.mark.timeout(300)
def test_compiled_kernel_contenders_run_and_leave_the_switch_off(tmp_path, capsys):
    import crossent.torch as xt

    results = bench.main(["ce-bf16", "--quick", "--repeats", "1", "--warmup", "0",
                          "--no-memory", "--compiled-kernel", "--out", str(tmp_path)])
    assert results is not None
    timing = results["configs"]["ce-bf16"]["contenders"]
    assert timing["crossent-compiled"]["median_ms"] > 0
    assert timing["crossent-compiled-inplace"]["median_ms"] > 0
    assert "crossent-compiled" in capsys.readouterr().out
    assert xt.set_compiled_kernel(False) is False  # the bench put the setting back
