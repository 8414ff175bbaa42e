"""benchmarks.throughput runs end to end at its smallest settings and writes consistent results."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.throughput import main


def test_throughput_benchmark_writes_matching_naive_and_radai_rows(tmp_path: Path) -> None:
    argv = ["--quick", "--studies", "1,2", "--repeats", "1", "--stat-repeats", "1", "--limit-batches", "1,2"]
    argv += ["--volume", "40,40,32", "--out-dir", str(tmp_path)]
    assert main(argv) == 0
    (js,) = tmp_path.glob("throughput-*.json")
    (md,) = tmp_path.glob("throughput-*.md")
    result = json.loads(js.read_text())
    assert [(r["studies"], r["mode"]) for r in result["rows"]] == [
        (1, "naive"),
        (1, "radai"),
        (2, "naive"),
        (2, "radai"),
    ]
    assert result["max_abs_diff_radai_vs_naive"] < 1e-4
    windows = result["rows"][0]["patches"]  # per study: the same windows in both modes
    assert [r["patches"] for r in result["rows"]] == [windows, windows, 2 * windows, 2 * windows]
    assert all(0.0 < r["busy_fraction"] <= 1.0 for r in result["rows"])
    assert [r["background"] for r in result["stat"]] == [0, 1, 2]
    assert result["machine"]["backend"] == "onnx"
    assert "| studies | mode |" in md.read_text()
