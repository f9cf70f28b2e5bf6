"""python/lm_merge.py: runs of two train_lm.py invocations (one seed each) merge into the
comparison one invocation with both seeds reports."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

import lm_merge  # noqa: E402
import train_lm  # noqa: E402


def tiny(out: Path, *extra: str) -> dict:
    train_lm.main(["--preset", "tiny", "--no-progress", "--optimizers", "adamw", "--steps", "3", "--out", str(out),
                   *extra])
    return json.loads((out / "results.json").read_text())


def test_merge_of_split_seeds_equals_one_invocation(tmp_path):
    grid = ["--lr-grid", "adamw=1e-3,3e-3"]
    both = tiny(tmp_path / "both", "--seeds", "0,1", *grid)
    seed0 = tiny(tmp_path / "s0", "--seeds", "0", *grid)
    seed1 = tiny(tmp_path / "s1", "--seeds", "1", *grid)
    merged = lm_merge.main([str(tmp_path / "s0" / "results.json"), str(tmp_path / "s1" / "results.json"),
                            "--out", str(tmp_path / "merged"), "--no-wall-clock"])
    assert (tmp_path / "merged" / "loss_curves.png").stat().st_size > 0
    assert merged["config"]["seeds"] == [0, 1]
    assert len(merged["runs"]) == 4
    got, want = merged["summary"]["optimizers"]["adamw"], both["summary"]["optimizers"]["adamw"]
    assert got["best_lr"] == want["best_lr"]
    assert got["lr_grid"] == want["lr_grid"]  # same data, same seeds: the same final losses
    assert got["val_loss"] == pytest.approx(want["val_loss"])
    assert seed0["summary"]["optimizers"]["adamw"]["seeds"] == [0]
    assert seed1["summary"]["optimizers"]["adamw"]["seeds"] == [1]


def test_merge_refuses_different_training_configs(tmp_path):
    a = tiny(tmp_path / "a", "--seeds", "0")
    b = tiny(tmp_path / "b", "--seeds", "1", "--batch-size", "8")
    with pytest.raises(ValueError, match="batch_size"):
        lm_merge.merge([a, b])
    with pytest.raises(SystemExit, match="no such file"):
        lm_merge.main([str(tmp_path / "missing.json"), "--out", str(tmp_path / "m")])
