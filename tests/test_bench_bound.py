"""benchmarks/bench_bound.py end to end on the tiny set: it runs, and what it writes adds up."""

from __future__ import annotations

import json
from pathlib import Path


def test_bench_bound_tiny(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import bench_bound

    bench_bound.main(["--preset", "tiny", "--reps", "1", "--frequency", "4", "--out-dir", str(tmp_path)])
    (path,) = tmp_path.glob("bound_tiny_cpu.json")
    result = json.loads(path.read_text())
    parts = result["bare_step_gemms_s"] + (result["bare_qr_per_refresh_s"] + result["bare_refresh_gemms_s"]) / 4
    assert abs(result["bound_amortized_s"] - parts) <= 1e-12
    assert result["bound_over_floor"] == result["bound_amortized_s"] / result["floor_s"]
    assert "lower bound of the amortized step at f=4" in capsys.readouterr().out


def test_bench_bound_tag_names_the_file(tmp_path, monkeypatch):
    # A run without a tag overwrote the committed results/bound_cpu_cpu.json on a new VM.
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import bench_bound

    bench_bound.main(["--preset", "tiny", "--reps", "1", "--out-dir", str(tmp_path), "--tag", "zen5"])
    assert [p.name for p in tmp_path.iterdir()] == ["bound_tiny_cpu_zen5.json"]
