"""python/schedule_study.py: the CI-sized run writes its JSON and plot; the refresh meter counts what
the engine counts. No timing is asserted."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn", reason="the cnn task needs scikit-learn's digits data (pip install scikit-learn)")
pytest.importorskip("matplotlib")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

import schedule_study  # noqa: E402
from study_meter import RefreshMeter, engine_refresh_count  # noqa: E402

from soap_kernels import SOAP  # noqa: E402
from soap_kernels.engine import Bucket  # noqa: E402
from soap_kernels.schedules import Constant, Doubling  # noqa: E402


def test_quick_cnn_run_writes_json_and_plot(tmp_path: Path) -> None:
    out = tmp_path / "study"
    argv = ["--quick", "--task", "cnn", "--schedules", "const1,doubling", "--steps", "12", "--out", str(out), "--no-progress"]
    results = schedule_study.main(argv)
    assert (out / "cnn_study.png").stat().st_size > 0
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["schedules"] == ["const1", "doubling"]
    task = on_disk["tasks"]["cnn"]
    assert task["config"]["steps"] == 12
    assert set(task["summary"]["schedules"]) == {"const1", "doubling"}
    for run in task["runs"]:
        assert run["status"] == "ok", run["error"]
        assert len(run["train_loss"]) == len(run["time_s"]) == len(run["refreshed_factors"]) == 12
        # The meter (wrapped Bucket.refresh) and the engine's own counters agree.
        assert run["factor_refreshes"] == run["engine_refresh_count"] == sum(run["refreshed_factors"])
    rows = task["summary"]["schedules"]
    # const1 refreshes every updated factor on every step; Doubling(1, clip) far fewer.
    assert rows["const1"]["factor_refreshes"] > rows["doubling"]["factor_refreshes"] > 0
    assert {c["key"] for c in task["claims"]["final_loss"]} == {"doubling_matches_const1"}
    assert results["tasks"]["cnn"]["table"] == task["table"]


def test_meter_counts_and_restores() -> None:
    original = Bucket.refresh
    params = [torch.nn.Parameter(torch.randn(6, 4)), torch.nn.Parameter(torch.randn(6, 4)), torch.nn.Parameter(torch.randn(5))]
    opt = SOAP(params, lr=1e-3, backend="torch", schedule=Constant(2))
    with RefreshMeter() as meter:
        for _ in range(5):  # the initialising step, then updates 1..4: refreshes at 2 and 4
            for p in params:
                p.grad = torch.randn_like(p)
            opt.step()
    assert Bucket.refresh is original
    # Two 6x4 matrices, two factors each, refreshed twice; the vector has no factor.
    assert meter.factor_refreshes == engine_refresh_count(opt) == 2 * 2 * 2
    assert meter.refresh_s > 0


def test_schedules_scale_with_run_length() -> None:
    assert schedule_study.slot_length(1250) == 256  # the study's interval / clip for its 1250 steps
    assert schedule_study.slot_length(240) == 64
    assert schedule_study.slot_length(80) == 16
    assert schedule_study.slot_length(10) == 2
    args = schedule_study.build_parser().parse_args([])
    doubling = schedule_study.make_schedule("doubling", 240, 40, args)
    assert isinstance(doubling, Doubling) and doubling.clip == 64
    budgeted = schedule_study.make_schedule("budgeted", 240, 41, args)
    assert budgeted.budget == 5 and budgeted.max_every == 20
    with pytest.raises(ValueError):
        schedule_study.make_schedule("sometimes", 240, 40, args)
