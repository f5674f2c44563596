"""The GPU side of the benchmark (issue 12), checked on CPU: the issue's configurations and
the default set per device, the HBM floor against hand arithmetic and the bandwidth looked
up from the GPU's name, a bad ``--bandwidth`` as one line and exit 2, and the contenders
from other packages (Liger Kernel, Cut Cross-Entropy): missing or failing ones are rows
with a note, present ones (fakes injected into ``sys.modules``) are called with the same
tensors as the others. No 16384 x 128256 tensor is ever made here: CUDA runs are faked
by replacing the timing (or the CUDA memory counters) and the configurations are tiny."""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from crossent.cli import app
from crossent.torch import bench

MiB = 2**20


# --------------------------------------------------------------------------------------------
# configurations and defaults
# --------------------------------------------------------------------------------------------


def test_gpu_configurations_are_the_issues_shapes_and_dtypes():
    assert {c: bench.CONFIGS[c] for c in bench.CONFIGS if c.startswith("gpu-")} == {
        "gpu-ce-v128k-bf16": ("ce", 16384, 128256, 0, "bfloat16"),
        "gpu-ce-v128k-f32": ("ce", 16384, 128256, 0, "float32"),
        "gpu-ce-v256k-bf16": ("ce", 8192, 256000, 0, "bfloat16"),
        "gpu-ce-v256k-f32": ("ce", 8192, 256000, 0, "float32"),
        "gpu-linear-v128k-bf16": ("linear", 16384, 128256, 4096, "bfloat16"),
    }


def test_default_set_per_device():
    assert bench.default_configs("cpu") == ["ce-f32", "ce-bf16", "ce-v128k", "linear-f32"]
    assert bench.default_configs("cpu") == bench.DEFAULT
    gpu = [c for c in bench.CONFIGS if c.startswith("gpu-")]
    assert bench.default_configs("cuda") == gpu
    assert bench.default_configs("cuda:1") == gpu
    assert not set(gpu) & set(bench.DEFAULT)


def test_contenders_per_device():
    """The CPU lists are as before; on CUDA Liger (both kinds), CCE (linear head) and
    torch.compile of the unfused head join, whether installed or not."""
    assert bench.contenders("ce-f32") == bench.CE_CONTENDERS
    assert "liger" not in bench.contenders("linear-f32", device="cpu")
    ce = bench.contenders("gpu-ce-v128k-bf16", device="cuda")
    assert ce == ["exp-floor", "eager", "compile", "crossent", "crossent-inplace", "liger"]
    linear = bench.contenders("gpu-linear-v128k-bf16", device="cuda:0")
    assert set(linear) >= {"unfused", "compile", "crossent", "liger", "cce"}
    assert linear[0] == "unfused"


# --------------------------------------------------------------------------------------------
# the HBM floor and the bandwidth
# --------------------------------------------------------------------------------------------


def test_floor_against_hand_arithmetic():
    # 16384 x 128256 bfloat16 logits: 2,101,346,304 values, 2 bytes each, read once and
    # their gradient written once: 8,405,385,216 bytes; at 4.8e12 B/s 1.7511219 ms
    assert bench.floor_ms(16384, 128256, 2, 4.8e12) == pytest.approx(1.7511219, rel=1e-7)
    # 8192 x 256000 float32 at 3.35e12: 2 * 2,097,152,000 * 4 / 3.35e12 s = 5.0081242 ms
    assert bench.floor_ms(8192, 256000, 4, 3.35e12) == pytest.approx(5.0081242, rel=1e-7)


@pytest.mark.parametrize(("name", "bandwidth"), [
    ("NVIDIA H200", 4.8e12),
    ("NVIDIA H200 NVL", 4.8e12),
    ("NVIDIA H100 80GB HBM3", 3.35e12),  # the SXM part's name
    ("NVIDIA H100 SXM5 80GB", 3.35e12),
    ("NVIDIA H100 PCIe", 2.0e12),
    ("NVIDIA A100-SXM4-80GB", 2.0e12),
    ("NVIDIA A100 80GB PCIe", 2.0e12),
    ("NVIDIA A100-SXM4-40GB", 1.555e12),
    ("NVIDIA A100-PCIE-40GB", 1.555e12),
    ("nvidia h200", 4.8e12),
    # not in the table: no guess (GH200 is not an H200, H100 NVL is not an SXM part)
    ("NVIDIA GH200 480GB", None),
    ("NVIDIA H100 NVL", None),
    ("NVIDIA GeForce RTX 4090", None),
    ("Tesla V100-SXM2-16GB", None),
    ("", None),
])
def test_bandwidth_looked_up_from_the_device_name(name, bandwidth):
    found, source = bench.gpu_bandwidth(name)
    assert found == bandwidth
    assert (source is None) == (bandwidth is None)


@pytest.mark.parametrize("value", ["abc", "0", "-1", "nan", "inf", "-inf", "1e400", "4.8TB"])
def test_bad_bandwidth_one_line_exit_2(value, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "time_config", lambda *a, **k: pytest.fail("timed"))
    result = CliRunner().invoke(app, ["bench", "ce-small", "--quick", "--bandwidth", value,
                                      "--out", str(tmp_path / "b")])
    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("crossent bench: error: "), result.stderr
    assert "--bandwidth" in lines[0]
    assert "Traceback" not in result.output and result.stdout == ""
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("value", [0, -4.8e12, float("nan"), True, "4.8e12"])
def test_bad_bandwidth_from_python_names_the_option(value, tmp_path):
    with pytest.raises(bench.InputError, match="--bandwidth"):
        bench.run(["ce-small"], device="cpu", bandwidth=value, out=tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_python_m_bad_bandwidth_one_line_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["ce-small", "--quick", "--bandwidth", "0", "--out", str(tmp_path / "b")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--bandwidth" in err


# --------------------------------------------------------------------------------------------
# a CUDA run, faked: the default set, the floor, the memory, missing contenders
# --------------------------------------------------------------------------------------------


def fake_cuda(monkeypatch, device_name: str, timed: list[str]) -> None:
    """``run`` believes it is on a CUDA GPU named ``device_name``; each configuration's
    timing is made up (medians 10, 20, ... ms per contender, peak 100, 200, ... MiB; Liger
    and CCE missing) and recorded in ``timed``; no fresh memory process may start."""
    monkeypatch.setattr(bench, "check_device", lambda device: "cuda")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: device_name)
    monkeypatch.setattr(bench, "memory_config", lambda *a, **k: pytest.fail("a process"))
    monkeypatch.setattr(bench, "plot", lambda results, path: path.write_bytes(b"png"))

    def no_timing(config, device, repeats, warmup, quick, on_round, compiled_kernel=False):
        timed.append(config)
        timing = {}
        for i, name in enumerate(bench.contenders(config, device=device), 1):
            if name in bench.EXTERNAL:
                timing[name] = {"note": f"not installed (pip install {bench.EXTERNAL[name]})"}
                continue
            runs = [10.0 * i] * repeats
            timing[name] = {"median_ms": 10.0 * i, "min_ms": 10.0 * i, "runs_ms": runs,
                            "loadavg_before": 0.0, "loadavg_after": 0.0,
                            "peak_mib": 100.0 * i}
        return timing, bench.CONFIGS[config]

    monkeypatch.setattr(bench, "time_config", no_timing)


def test_cuda_run_defaults_floor_memory_and_notes(monkeypatch, tmp_path, capsys):
    timed: list[str] = []
    fake_cuda(monkeypatch, "NVIDIA H200", timed)
    results = bench.main(["--device", "cuda", "--repeats", "2", "--out", str(tmp_path)])
    assert results is not None
    assert timed == bench.DEFAULT_CUDA
    assert results["bandwidth"] == 4.8e12 and "H200" in results["bandwidth_source"]
    ce = results["configs"]["gpu-ce-v128k-bf16"]
    floor = 2 * 16384 * 128256 * 2 / 4.8e12 * 1e3
    assert ce["floor_ms"] == pytest.approx(floor)
    eager = ce["contenders"]["eager"]  # the second contender: 20 ms, 200 MiB
    assert eager["vs_floor"] == pytest.approx(20.0 / floor)
    assert eager["peak_mib"] == 200.0
    assert ce["contenders"]["crossent"]["mem_vs_eager"] == pytest.approx(400.0 / 200.0)
    f32 = results["configs"]["gpu-ce-v256k-f32"]
    assert f32["floor_ms"] == pytest.approx(2 * 8192 * 256000 * 4 / 4.8e12 * 1e3)
    assert "floor_ms" not in results["configs"]["gpu-linear-v128k-bf16"]
    out = capsys.readouterr().out
    assert "x floor" in out and f"HBM floor {floor:.4g} ms" in out
    # every missing contender is a row with its note, never left out
    linear_block = out[out.index("gpu-linear-v128k-bf16:"):]
    for name, package in (("liger", "liger-kernel"), ("cce", "cut-cross-entropy")):
        row = next(line for line in linear_block.splitlines() if line.startswith(name))
        assert row.endswith(f"not installed (pip install {package})")
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["configs"]["gpu-ce-v128k-f32"]["contenders"]["liger"] == {
        "note": "not installed (pip install liger-kernel)"}


def test_cuda_run_no_memory_drops_the_peaks(monkeypatch, tmp_path):
    fake_cuda(monkeypatch, "NVIDIA H200", [])
    results = bench.run(["gpu-ce-v128k-bf16"], device="cuda", memory=False, out=tmp_path,
                        say=lambda line: None)
    assert all(r.get("peak_mib") is None
               for r in results["configs"]["gpu-ce-v128k-bf16"]["contenders"].values())


def test_unknown_gpu_has_no_floor_and_says_so(monkeypatch, tmp_path, capsys):
    fake_cuda(monkeypatch, "NVIDIA GeForce RTX 4090", [])
    said: list[str] = []
    results = bench.run(["gpu-ce-v128k-bf16"], device="cuda", out=tmp_path, say=said.append)
    entry = results["configs"]["gpu-ce-v128k-bf16"]
    assert results["bandwidth"] is None and entry["floor_ms"] is None
    assert not any("vs_floor" in r for r in entry["contenders"].values())
    out = capsys.readouterr().out
    assert "no HBM floor" in out and "--bandwidth" in out and "x floor" not in out
    assert any("no HBM floor" in line and "RTX 4090" in line for line in said)


def test_bandwidth_option_overrides_the_lookup(monkeypatch, tmp_path):
    fake_cuda(monkeypatch, "NVIDIA H200", [])
    results = bench.run(["gpu-ce-v256k-bf16"], device="cuda", bandwidth=2e12, out=tmp_path,
                        say=lambda line: None)
    assert results["bandwidth_source"] == "--bandwidth"
    floor = results["configs"]["gpu-ce-v256k-bf16"]["floor_ms"]
    assert floor == pytest.approx(2 * 8192 * 256000 * 2 / 2e12 * 1e3)


def test_crossent_bench_cli_passes_bandwidth_and_the_device_default(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(bench, "run", lambda configs, **kw: seen.append((configs, kw)))
    result = CliRunner().invoke(app, ["bench", "--device", "cuda", "--bandwidth", "3.35e12",
                                      "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    (configs, kw), = seen
    assert configs is None  # run picks the default of the device
    assert kw["bandwidth"] == 3.35e12 and kw["device"] == "cuda"


# --------------------------------------------------------------------------------------------
# the contenders from other packages, on tiny CPU tensors
# --------------------------------------------------------------------------------------------


@pytest.fixture
def external_on_cpu(monkeypatch):
    """Liger and CCE listed on CPU too, among few contenders (no torch.compile: seconds)."""
    monkeypatch.setattr(bench, "EXTERNAL_DEVICES", ("cpu", "cuda"))
    monkeypatch.setattr(bench, "CE_CUDA_CONTENDERS", ["eager", "crossent", "liger"])
    monkeypatch.setattr(bench, "LINEAR_CUDA_CONTENDERS", ["unfused", "crossent", "liger",
                                                          "cce"])
    made: list[bench.Case] = []
    real = bench.make_case

    def keep(config, device, quick):
        made.append(real(config, device, quick))
        return made[-1]

    monkeypatch.setattr(bench, "make_case", keep)
    return made


@pytest.fixture
def no_external_packages(monkeypatch):
    for name in ("liger_kernel", "liger_kernel.transformers",
                 "liger_kernel.transformers.functional",
                 "liger_kernel.transformers.fused_linear_cross_entropy", "cut_cross_entropy"):
        monkeypatch.setitem(sys.modules, name, None)  # import raises ModuleNotFoundError


def test_missing_packages_are_rows_with_a_note(external_on_cpu, no_external_packages,
                                               tmp_path, capsys):
    results = bench.main(["ce-small", "linear-f32", "--quick", "--repeats", "1", "--warmup",
                          "0", "--no-memory", "--out", str(tmp_path)])
    assert results is not None
    ce = results["configs"]["ce-small"]["contenders"]
    linear = results["configs"]["linear-f32"]["contenders"]
    assert list(ce) == ["eager", "crossent", "liger"]
    assert ce["liger"] == {"note": "not installed (pip install liger-kernel)"}
    assert linear["liger"] == {"note": "not installed (pip install liger-kernel)"}
    assert linear["cce"] == {"note": "not installed (pip install cut-cross-entropy)"}
    assert ce["crossent"]["median_ms"] > 0 and linear["crossent"]["median_ms"] > 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith(("liger", "cce"))]
    assert len(rows) == 3 and all("-" in row and "not installed" in row for row in rows)
    assert (tmp_path / "bench.png").stat().st_size > 0  # the figure leaves them out


class Recorder:
    """A stand-in for another package's loss: records the tensors it is called with and
    returns the unfused loss (torch), so that the gradient exists."""

    def __init__(self, kind: str, weight_first: bool = False, wrap: bool = False) -> None:
        self.kind, self.weight_first, self.wrap = kind, weight_first, wrap
        self.calls: list[tuple[torch.Tensor, ...]] = []

    def __call__(self, *args: torch.Tensor) -> object:
        self.calls.append(args)
        if self.kind == "ce":
            loss = F.cross_entropy(args[0], args[1])
        else:
            w, x = (args[0], args[1]) if self.weight_first else (args[1], args[0])
            loss = F.cross_entropy(x @ w.T, args[2])
        return (loss, None) if self.wrap else loss  # older Liger: (loss, z_loss)


def inject(monkeypatch, liger_ce=None, liger_linear=None, cce=None) -> None:
    """Fake ``liger_kernel`` and ``cut_cross_entropy`` modules in ``sys.modules``."""
    modules = {"liger_kernel": {}, "liger_kernel.transformers": {},
               "liger_kernel.transformers.functional": {"liger_cross_entropy": liger_ce},
               "liger_kernel.transformers.fused_linear_cross_entropy": {
                   "LigerFusedLinearCrossEntropyLoss": lambda: liger_linear},
               "cut_cross_entropy": {"linear_cross_entropy": cce}}
    for name, attrs in modules.items():
        module = types.ModuleType(name)
        for attr, value in attrs.items():
            setattr(module, attr, value)
        monkeypatch.setitem(sys.modules, name, module)


def data(t: torch.Tensor) -> tuple:
    return (t.data_ptr(), tuple(t.shape), t.dtype)


def test_liger_cross_entropy_gets_the_same_tensors_as_crossent(external_on_cpu, monkeypatch):
    liger = Recorder("ce")
    inject(monkeypatch, liger_ce=liger)
    ours: list[tuple[torch.Tensor, torch.Tensor]] = []
    real = bench.xf.cross_entropy

    def spy(z, target, **kwargs):
        ours.append((z, target))
        return real(z, target, **kwargs)

    monkeypatch.setattr(bench.xf, "cross_entropy", spy)
    timing, _ = bench.time_config("ce-bf16", "cpu", repeats=2, warmup=1, quick=True)
    case, = external_on_cpu
    assert len(liger.calls) == 3 and len(ours) == 3  # one warm-up, two timed
    for (z, target), (z_ours, target_ours) in zip(liger.calls, ours, strict=True):
        # the logits buffer every contender reads (refilled before each step), as a leaf
        assert data(z) == data(z_ours) == data(case.buf)
        assert z.dtype == torch.bfloat16 and z.requires_grad
        assert target is target_ours is case.target
    assert timing["liger"]["median_ms"] > 0 and "note" not in timing["liger"]
    assert len(timing["liger"]["runs_ms"]) == 2


def test_liger_and_cce_heads_get_the_same_tensors_as_crossent(external_on_cpu, monkeypatch):
    liger = Recorder("linear", weight_first=True, wrap=True)
    cce = Recorder("linear")
    inject(monkeypatch, liger_linear=liger, cce=cce)
    ours: list[tuple[torch.Tensor, ...]] = []
    real = bench.xf.linear_cross_entropy

    def spy(x, w, target, **kwargs):
        ours.append((x, w, target))
        return real(x, w, target, **kwargs)

    monkeypatch.setattr(bench.xf, "linear_cross_entropy", spy)
    timing, _ = bench.time_config("linear-f32", "cpu", repeats=2, warmup=0, quick=True)
    case, = external_on_cpu
    assert len(liger.calls) == len(cce.calls) == len(ours) == 2
    for (lw, lx, lt), (cx, cw, ct), (ox, ow, ot) in zip(liger.calls, cce.calls, ours,
                                                        strict=True):
        assert data(lx) == data(cx) == data(ox) == data(case.x)  # Liger: weight first
        assert data(lw) == data(cw) == data(ow) == data(case.w)
        assert lt is ct is ot is case.target
    assert timing["liger"]["median_ms"] > 0 and timing["cce"]["median_ms"] > 0


def test_a_failing_external_contender_is_noted_and_the_run_goes_on(external_on_cpu,
                                                                   monkeypatch):
    def broken(*args):
        raise RuntimeError("Triton kernel failed\nsecond line")

    inject(monkeypatch, liger_linear=Recorder("linear", weight_first=True), cce=broken)
    timing, _ = bench.time_config("linear-f32", "cpu", repeats=2, warmup=1, quick=True)
    assert timing["cce"] == {"note": "failed: RuntimeError: Triton kernel failed"}
    assert timing["liger"]["median_ms"] > 0 and timing["crossent"]["median_ms"] > 0
    assert list(timing) == ["unfused", "crossent", "liger", "cce"]


def test_an_external_contender_failing_after_its_warm_up_is_noted(external_on_cpu,
                                                                  monkeypatch):
    calls = []

    def fails_second_time(z, target):
        calls.append(1)
        if len(calls) > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return F.cross_entropy(z, target)

    inject(monkeypatch, liger_ce=fails_second_time)
    timing, _ = bench.time_config("ce-small", "cpu", repeats=3, warmup=1, quick=True)
    assert timing["liger"] == {"note": "failed: OutOfMemoryError: CUDA out of memory"}
    assert len(calls) == 2  # out of the rotation after the failure
    assert len(timing["crossent"]["runs_ms"]) == 3


def test_a_failing_crossent_or_torch_contender_is_not_hidden(external_on_cpu, monkeypatch):
    inject(monkeypatch, liger_ce=Recorder("ce"))

    def broken(*args, **kwargs):
        raise RuntimeError("a crossent bug")

    monkeypatch.setattr(bench.xf, "cross_entropy", broken)
    with pytest.raises(RuntimeError, match="a crossent bug"):
        bench.time_config("ce-small", "cpu", repeats=1, warmup=0, quick=True)


def test_cuda_peak_memory_is_above_the_inputs_per_contender(external_on_cpu, monkeypatch):
    """On CUDA the timed step's max_memory_allocated minus what was allocated before it,
    the largest over the steps: faked counters, tiny CPU tensors."""
    inject(monkeypatch, liger_ce=Recorder("ce"))
    extra = {"eager": 30 * MiB, "crossent": 10 * MiB, "liger": 5 * MiB}
    state = {"allocated": 700 * MiB, "peak": 0, "step": 0}
    real_step = bench.step

    def step(case, name):
        state["step"] += 1
        state["peak"] = max(state["peak"], state["allocated"] + extra[name] * state["step"])
        real_step(case, name)

    def reset(device=None):
        state["peak"] = state["allocated"]

    monkeypatch.setattr(bench, "step", step)
    monkeypatch.setattr(bench, "_sync", lambda device: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: state["allocated"])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", reset)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: state["peak"])
    real_make = bench.make_case
    monkeypatch.setattr(bench, "make_case", lambda config, device, quick:
                        real_make(config, "cpu", quick))
    timing, _ = bench.time_config("ce-small", "cuda", repeats=2, warmup=0, quick=True)
    # steps 1-3 in round 1 (eager, crossent, liger), 4-6 in round 2 (crossent, liger,
    # eager): each contender's largest is its round-2 step
    assert timing["crossent"]["peak_mib"] == 10 * 4
    assert timing["liger"]["peak_mib"] == 5 * 5
    assert timing["eager"]["peak_mib"] == 30 * 6


@pytest.mark.skipif(not hasattr(torch.nn, "LinearCrossEntropyOptions"),
                    reason="torch.nn.LinearCrossEntropyOptions needed")
def test_compact_contender_passes_torchs_compact_policy(external_on_cpu, monkeypatch):
    """``crossent-compact`` (CUDA's linear head list) is crossent's head with torch's
    ``acc_policy="compact"`` on the same tensors as ``crossent``."""
    monkeypatch.setattr(bench, "LINEAR_CUDA_CONTENDERS", ["crossent", "crossent-compact"])
    assert "crossent-compact" in bench.contenders("gpu-linear-v128k-bf16", device="cuda")
    seen: list[tuple] = []
    real = bench.xf.linear_cross_entropy

    def spy(x, w, target, **kwargs):
        options = kwargs.get("options")
        seen.append((data(x), data(w), getattr(options, "acc_policy", None)))
        return real(x, w, target, **kwargs)

    monkeypatch.setattr(bench.xf, "linear_cross_entropy", spy)
    bench.time_config("linear-f32", "cpu", repeats=1, warmup=0, quick=True)
    case, = external_on_cpu
    assert sorted(str(p) for *_, p in seen) == ["None", "compact"]
    assert all(x == data(case.x) and w == data(case.w) for x, w, _ in seen)
