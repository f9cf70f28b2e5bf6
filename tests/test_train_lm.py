"""python/train_lm.py: the tiny preset end to end (results.json, the plot), and its helpers."""

from __future__ import annotations

import argparse
import gzip
import json
import lzma
import math
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

import train_lm  # noqa: E402
from lm import CharCorpus, load_text  # noqa: E402
from lm import checkpoint as ckpt  # noqa: E402
from lm.report import first_crossing  # noqa: E402


def soap_skip_reason(second_moment: str) -> str | None:
    """Why SOAP with this second moment cannot run yet, or None when it can.

    Skips only for the two states the package passes through while it is being written: SOAP not
    importable, or the second-moment mode raising NotImplementedError. Any other error fails the test.
    """
    try:
        from soap_kernels import SOAP
    except ImportError as exc:
        return f"soap_kernels.SOAP is not importable yet ({exc})"
    weight = torch.nn.Parameter(torch.randn(4, 3))
    try:
        optimizer = SOAP([weight], second_moment=second_moment)
        for _ in range(2):
            weight.grad = torch.randn(4, 3)
            optimizer.step()
    except NotImplementedError as exc:
        return f"SOAP(second_moment={second_moment!r}) is not implemented yet ({exc})"
    return None


def run_tiny(tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / "out"
    results = train_lm.main(["--preset", "tiny", "--no-progress", "--out", str(out), *extra])
    assert (out / "loss_curves.png").stat().st_size > 0
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["summary"] == json.loads(json.dumps(results["summary"]))
    for key in ("date", "config", "environment", "runs", "summary"):
        assert key in on_disk
    return on_disk


def check_runs_finite(results: dict, optimizer: str) -> None:
    runs = [r for r in results["runs"] if r["optimizer"] == optimizer]
    assert runs
    steps = results["config"]["steps"]
    for run in runs:
        assert run["status"] == "ok", run["error"]
        assert len(run["train_loss"]) == steps
        assert all(math.isfinite(x) for x in run["train_loss"] + run["val_loss"])
        assert run["eval_steps"][0] == 0 and run["eval_steps"][-1] == steps
        assert len(run["val_loss"]) == len(run["eval_steps"]) == len(run["train_time_at_eval_s"])
        assert 0.0 < run["optimizer_share"] < 1.0
        assert run["optimizer_state_bytes"] > 0 and run["peak_memory_bytes"] > 0
    entry = results["summary"]["optimizers"][optimizer]
    assert entry["best_lr"] in results["config"]["lr_grid"][optimizer]
    assert math.isfinite(entry["final_val_loss"])


def test_adamw_tiny_writes_results_and_plot(tmp_path: Path) -> None:
    lapack_threads = os.environ.get("SOAP_LAPACK_THREADS")
    results = run_tiny(tmp_path, "--optimizers", "adamw", "--seeds", "0,1", "--lr-grid", "adamw=1e-3,3e-3")
    # main() pins SOAP's LAPACK thread count for its runs only (other tests see the environment unchanged).
    assert os.environ.get("SOAP_LAPACK_THREADS") == lapack_threads
    assert results["config"]["lapack_threads"] == int(lapack_threads or 0)
    check_runs_finite(results, "adamw")
    assert len(results["runs"]) == 4
    adamw = results["summary"]["optimizers"]["adamw"]
    assert adamw["seeds"] == [0, 1]
    assert results["summary"]["target_val_loss"] == adamw["final_val_loss"]
    # The target is AdamW's own final loss, so AdamW reaches it by its last step at the latest.
    assert adamw["steps_to_target"] <= results["config"]["steps"]
    assert adamw["steps_ratio"] == 1.0
    assert "adamw" in results["table"]


def test_same_seed_same_run() -> None:
    config = train_lm.resolve_config(train_lm.build_parser().parse_args(["--preset", "tiny"]))
    corpus = CharCorpus(load_text(config["corpus"]))
    val = corpus.val_batches(config["eval_batches"], config["batch_size"], config["ctx"])
    first, second, other = (train_lm.train_run("adamw", 3e-3, seed, corpus, val, config, progress=False) for seed in (0, 0, 1))
    assert first["train_loss"] == second["train_loss"]
    assert first["val_loss"] == second["val_loss"]
    assert first["train_loss"] != other["train_loss"]


@pytest.mark.parametrize(("optimizer", "second_moment"), [("soap", "adam"), ("shampoo", "adafactor")])
def test_soap_family_tiny(tmp_path: Path, optimizer: str, second_moment: str) -> None:
    reason = soap_skip_reason(second_moment)
    if reason:
        pytest.skip(reason)
    results = run_tiny(tmp_path, "--optimizers", f"adamw,{optimizer}")
    check_runs_finite(results, "adamw")
    check_runs_finite(results, optimizer)
    entry = results["summary"]["optimizers"][optimizer]
    assert entry["steps_to_target"] is None or entry["steps_ratio"] > 0


def test_help_exits_cleanly(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        train_lm.main(["--help"])
    assert exit_info.value.code == 0
    assert "--lr-grid" in capsys.readouterr().out


def test_lr_grid_option() -> None:
    args = train_lm.build_parser().parse_args(["--lr-grid", "adamw=1e-3,3e-3", "soap=0.01", "--seeds", "0"])
    assert dict(args.lr_grid) == {"adamw": [1e-3, 3e-3], "soap": [0.01]}
    config = train_lm.resolve_config(args)
    assert config["lr_grid"]["adamw"] == [1e-3, 3e-3]
    assert config["lr_grid"]["shampoo"] == [train_lm.PRESETS["cpu"].lr["shampoo"]]
    for bad in ("adam=1e-3", "adamw", "adamw=", "adamw=x", "adamw=-1"):
        with pytest.raises(argparse.ArgumentTypeError, match="NAME=LR"):
            train_lm.parse_lr_item(bad)


def test_warmup_cosine() -> None:
    factor = train_lm.warmup_cosine(warmup_steps=4, total_steps=20, min_ratio=0.1)
    assert [factor(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert factor(4) == pytest.approx(1.0)
    assert factor(12) == pytest.approx(0.55)
    assert factor(20) == pytest.approx(0.1)


def test_first_crossing_interpolates() -> None:
    steps = [0, 10, 20, 30]
    curve = [4.0, 3.0, 2.0, 1.5]
    assert first_crossing(steps, curve, 2.5) == pytest.approx(15.0)
    assert first_crossing(steps, curve, 3.0) == pytest.approx(10.0)
    assert first_crossing(steps, curve, 5.0) == 0
    assert first_crossing(steps, curve, 1.0) is None


@pytest.mark.parametrize("suffix", ["", ".gz", ".xz"])
def test_corpus_any_utf8_file(tmp_path: Path, suffix: str) -> None:
    text = "To be, or not to be — ça, 日本語.\n" * 40
    raw = text.encode("utf-8")
    path = tmp_path / f"corpus.txt{suffix}"
    path.write_bytes({"": raw, ".gz": gzip.compress(raw), ".xz": lzma.compress(raw)}[suffix])
    corpus = CharCorpus(load_text(path), val_fraction=0.1)
    assert corpus.decode(torch.cat([corpus.train, corpus.val])) == text
    assert len(corpus.val) == len(text) - int(len(text) * 0.9)
    x, y = corpus.train_batch(3, 8, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (3, 8) and torch.equal(x[:, 1:], y[:, :-1])
    val = corpus.val_batches(2, 3, 8)
    assert len(val) == 2 and val[0][0].shape == (3, 8)


# ------------------------------------------------------------------------------------ checkpoint
def test_atomic_save_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "state.pt"
    ckpt.atomic_save({"format": ckpt.FORMAT, "n": 1}, path)

    def failing_replace(src, dst):
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="before the rename"):
        ckpt.atomic_save({"format": ckpt.FORMAT, "n": 2}, path)
    monkeypatch.undo()
    assert ckpt.load(path)["n"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.pt"]
    ckpt.atomic_save({"format": ckpt.FORMAT, "n": 3}, path)
    assert ckpt.load(path)["n"] == 3
    torch.save({"format": 99}, path)
    with pytest.raises(ValueError, match="format"):
        ckpt.load(path)


def test_rng_state_round_trip(tmp_path: Path) -> None:
    import random

    np = pytest.importorskip("numpy")
    ckpt.atomic_save({"format": ckpt.FORMAT, "rng": ckpt.rng_state()}, tmp_path / "rng.pt")
    first = (torch.rand(3), random.random(), np.random.rand(3))
    ckpt.set_rng_state(ckpt.load(tmp_path / "rng.pt")["rng"])  # through the file: weights_only loads it
    assert torch.equal(torch.rand(3), first[0]) and random.random() == first[1]
    assert (np.random.rand(3) == first[2]).all()
