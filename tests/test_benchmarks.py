"""The benchmark suite runs in --quick mode and writes valid JSON (timings are not asserted)."""
import functools
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench  # noqa: E402


def test_quick_benchmark_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench.main(["--quick", "--device", "cpu", "--profile", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["quick"] is True and report["device"] == "cpu"
    r = report["results"]
    assert set(r) == {"B1_dense_pgd10_step", "B2_flying_bird_step", "B3_topology_update", "B4_channel_ticket",
                      "B5_data_path", "B6_bf16_step"}
    for entry in r.values():
        assert entry["peak_memory_mb"] > 0
    memory = r["B1_dense_pgd10_step"]["step"]["memory"]
    assert (memory["increase_mb"] >= 0 and memory["peak_mb"] >= memory["increase_mb"]
            and "cpu peak RSS" in memory["measure"])
    assert r["B6_bf16_step"]["ratio_bf16_over_fp32"] > 0 and isinstance(r["B6_bf16_step"]["fast_bf16"], bool)
    assert r["B2_flying_bird_step"]["density"] == 0.2 or abs(r["B2_flying_bird_step"]["density"] - 0.2) < 1e-4
    for key in ("ratio_step_over_floor", "ratio_step_over_eleven_full"):
        assert r["B1_dense_pgd10_step"][key] > 0
    assert r["B4_channel_ticket"]["flops_ratio"] > 1 and r["B4_channel_ticket"]["params_ratio"] < 1
    assert "aten::" in report["profile"]["fp32_step"] and "aten::" in report["profile"]["bf16_step"]
    printed = capsys.readouterr().out
    assert ("B1 dense PGD-10 step / floor" in printed and "B6 bf16 step / fp32 step" in printed
            and "peak memory" in printed)
    assert "B7" not in printed


def test_compile_adds_the_compiled_step(tmp_path, monkeypatch):
    # the traced step without inductor's C++ code generation, which would take a minute here
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    out = tmp_path / "bench.json"
    assert bench.main(["--quick", "--device", "cpu", "--compile", "--out", str(out)]) == 0
    b7 = json.loads(out.read_text())["results"]["B7_compiled_step"]
    assert b7["ratio_compiled_over_eager"] == b7["step"]["median_s"] / b7["eager_step"]["median_s"] > 0
    assert b7["first_step_s"] > 0 and b7["peak_memory_mb"] > 0


def test_peak_memory_counts_the_rss_above_a_lazily_updated_high_water_mark(monkeypatch):
    """The kernel updates VmHWM lazily: read right after an allocation, the current RSS can be above it,
    and the peak is the larger of the two, so the rise from the reset is never negative."""
    meter = bench.PeakMemory(torch.device("cpu"))
    meter.reset()
    if not meter.measure.startswith("cpu peak RSS (VmHWM"):
        pytest.skip("/proc/self/clear_refs cannot be written here")
    status = {"VmHWM": 100.0, "VmRSS": 130.0}
    monkeypatch.setattr(bench.PeakMemory, "_status_mb", staticmethod(lambda field: status[field]))
    meter.start_mb = 100.0  # what reset read: VmHWM := RSS at the reset
    read = meter.read()
    assert (read["peak_mb"], read["increase_mb"]) == (130.0, 30.0)
