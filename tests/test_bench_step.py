"""benchmarks/bench_step.py's split of the timed steps into refresh steps and the rest."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _refresh_steps(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bench_step

    return bench_step.refresh_steps


def test_refresh_steps_per_round(monkeypatch):
    refresh_steps = _refresh_steps(monkeypatch)
    times = [0.1] * 30
    for i in (9, 19, 29):
        times[i] = 1.0
    assert refresh_steps(times, 10) == ([9, 19, 29], 9)


def test_refresh_steps_follow_a_cadence_that_moves(monkeypatch):
    """HeavyBall's float cadence moved by one step within a run (positions 8, 18, 28, 39, 49, 59):
    every real refresh is found, no plain step is taken for one."""
    refresh_steps = _refresh_steps(monkeypatch)
    times = [0.2] * 60
    for i in (8, 18, 28, 39, 49, 59):
        times[i] = 1.2
    at, phase = refresh_steps(times, 10)
    assert at == [8, 18, 28, 39, 49, 59]
    assert phase in (8, 9)
    assert refresh_steps(times[:5], 10) == ([], None)
