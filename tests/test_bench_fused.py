"""The fused-loss benchmark (``research/bench_fused.py``): its quick mode runs end to end and
writes its report, and the memory bar of the issue (fused temporary memory at most 1/16 of the
materialised ``x @ w`` + optax loss, both with gradients for x and w) holds on a moderate shape.
Timing is reported by the benchmark, never asserted (the machine is shared)."""

from __future__ import annotations

import json

from research import bench_fused


def test_quick_mode_runs_and_writes_its_report(tmp_path):
    result = bench_fused.main(["--quick", "--repeats", "1", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "result.json").read_text())
    assert saved["shape"] == result["shape"] == {"N": 1024, "D": 128, "V": 8192, "dtype": "float32"}
    for key in ("temp_ratio", "time_ratio", "time_ratio_min"):
        assert saved[key] > 0
    for name in ("fused", "materialised"):
        assert saved[name]["compile_s"] > 0 and len(saved[name]["time_s"]) == 1
    assert max(saved["agreement"].values()) <= 1e-5
    report = (tmp_path / "result.md").read_text()
    assert "temp MiB" in report and "time median s" in report


def test_memory_bar_on_a_moderate_shape():
    # Compile only: N x V = 128M logits (512 MiB) for the materialised version.
    result = bench_fused.run(8192, 64, 16384, execute=False)
    assert result["materialised"]["temp_bytes"] >= 8192 * 16384 * 4
    assert result["temp_ratio"] <= bench_fused.MEMORY_BAR, result["temp_ratio"]
    assert result["meets_memory_bar"]
