"""python/train_lm.py: the tiny preset end to end (results.json, the plot), peers, schedules,
checkpoint/resume (bit for bit, crash-safe), and its helpers."""

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
from lm import CharCorpus, load_text, peers  # noqa: E402
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


# ------------------------------------------------------------------------------------------ peers
def peer_skip_reason(name: str) -> str | None:
    """Why the peer ``name`` cannot run here (``pytest.importorskip`` for the installed ones,
    ``$UPSTREAM_SOAP``, the path of the authors' soap.py, for upstream_soap), or None."""
    if name == "upstream_soap":
        path = os.environ.get("UPSTREAM_SOAP")
        ok, why = peers.peer_available(name, path)
        return None if ok else f"set UPSTREAM_SOAP to the authors' soap.py to run this ({why})"
    pytest.importorskip({"heavyball_soap": "heavyball", "pytorch_optimizer_soap": "pytorch_optimizer"}[name])
    return None


def peer_args(name: str) -> list[str]:
    return ["--upstream-soap", os.environ["UPSTREAM_SOAP"]] if name == "upstream_soap" else []


@pytest.mark.parametrize("name", peers.PEERS)
def test_peer_tiny_smoke(tmp_path: Path, name: str) -> None:
    reason = peer_skip_reason(name)
    if reason:
        pytest.skip(reason)
    results = run_tiny(tmp_path, "--optimizers", f"adamw,{name}", "--steps", "3", *peer_args(name))
    check_runs_finite(results, "adamw")
    check_runs_finite(results, name)
    # Built with soap's hyperparameters and, without a grid of its own, soap's LR grid.
    assert results["config"]["lr_grid"][name] == [train_lm.PRESETS["tiny"].lr["soap"]]
    assert name in results["config"]["peers"] and name in results["table"]
    run = next(r for r in results["runs"] if r["optimizer"] == name)
    assert run["optimizer_state_bytes"] > 0 and run["schedule"] is None


def test_peer_gets_soap_hyperparameters(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = {}

    def fake_make_peer(name, params, **kwargs):
        seen.update(kwargs, name=name)
        return torch.optim.SGD(params, lr=kwargs["lr"])

    monkeypatch.setattr(train_lm.peers, "make_peer", fake_make_peer)
    args = ["--preset", "tiny", "--betas", "0.9,0.99", "--shampoo-beta", "0.9", "--eps", "1e-7", "--weight-decay",
            "0.2", "--precondition-frequency", "7", "--max-precond-dim", "64", "--merge-dims",
            "--upstream-soap", "/x/soap.py"]  # fmt: skip
    config = train_lm.resolve_config(train_lm.build_parser().parse_args(args))
    train_lm.make_optimizer("upstream_soap", [torch.nn.Parameter(torch.zeros(2))], 0.01, config)
    assert seen == {"name": "upstream_soap", "lr": 0.01, "betas": (0.9, 0.99), "shampoo_beta": 0.9, "eps": 1e-7,
                    "weight_decay": 0.2, "precondition_frequency": 7, "max_precond_dim": 64, "merge_dims": True,
                    "upstream_path": "/x/soap.py"}  # fmt: skip


def test_absent_peer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def absent(name):
        raise ImportError(f"No module named {name!r} (simulated)")

    monkeypatch.setattr(train_lm.peers, "_import", absent)
    out = tmp_path / "out"
    # Named explicitly: an error with the install command, before any training.
    with pytest.raises(SystemExit, match="pip install --no-deps heavyball"):
        train_lm.main(["--preset", "tiny", "--no-progress", "--out", str(out), "--optimizers", "adamw,heavyball_soap"])
    assert not out.exists()
    with pytest.raises(SystemExit, match="--upstream-soap PATH"):
        train_lm.main(["--preset", "tiny", "--no-progress", "--out", str(out), "--optimizers", "upstream_soap"])
    # Through the 'peers' alias: skipped with the same message, the others run.
    results = run_tiny(tmp_path, "--optimizers", "adamw,peers", "--steps", "2")
    assert results["config"]["optimizers"] == ["adamw"]
    assert set(results["config"]["skipped_peers"]) == set(peers.PEERS)
    assert peers.INSTALL in results["config"]["skipped_peers"]["heavyball_soap"]
    assert "skipping heavyball_soap: heavyball_soap: heavyball is not installed" in capsys.readouterr().err


def test_lr_grid_for_peers() -> None:
    args = train_lm.build_parser().parse_args(
        ["--optimizers", "soap,pytorch_optimizer_soap", "--lr-grid", "soap=1e-3,2e-3", "heavyball_soap=5e-3"]
    )
    assert dict(args.lr_grid) == {"soap": [1e-3, 2e-3], "heavyball_soap": [5e-3]}
    names, _, _ = train_lm.resolve_optimizers("adamw,peers,adamw", None)
    assert names[0] == "adamw" and names.count("adamw") == 1


# --------------------------------------------------------------------------------------- schedule
def test_schedule_option() -> None:
    schedules = pytest.importorskip("soap_kernels.schedules")
    parse = train_lm.parse_schedule
    assert repr(parse("Staggered:10")) == repr(schedules.Staggered(10))
    assert repr(parse("staggered:every=4,blocks=[2,2]")) == repr(schedules.Staggered(4, blocks=[2, 2]))
    assert repr(parse("Staggered:10,together=2")) == repr(schedules.Staggered(10, together=2))
    assert repr(parse("Doubling:start=2,clip=16")) == repr(schedules.Doubling(2, 16))
    assert repr(parse("Doubling:2,clip=None")) == repr(schedules.Doubling(2, None))
    assert repr(parse("Budgeted:2,by=flops,min_drift=0.1")) == repr(schedules.Budgeted(2, by="flops", min_drift=0.1))
    assert repr(parse("Constant")) == repr(schedules.Constant())
    with pytest.raises(argparse.ArgumentTypeError, match="choose from Constant, Doubling, .*Staggered"):
        parse("Sometimes:3")
    with pytest.raises(argparse.ArgumentTypeError, match=r"Staggered\(every=10, blocks=None, together=1\)"):
        parse("Staggered:0")
    with pytest.raises(argparse.ArgumentTypeError, match="after key=value"):
        parse("Doubling:start=2,16")
    # Unknown names are an argparse error (exit 2) listing the choices.
    with pytest.raises(SystemExit) as exit_info:
        train_lm.build_parser().parse_args(["--schedule", "Sometimes"])
    assert exit_info.value.code == 2


@pytest.mark.parametrize("schedule", ["LossThreshold:0.01"])  # Staggered: test_resume_with_schedule
def test_schedule_tiny(tmp_path: Path, schedule: str) -> None:
    reason = soap_skip_reason("adam")
    if reason:
        pytest.skip(reason)
    results = run_tiny(tmp_path, "--optimizers", "adamw,soap", "--schedule", schedule)
    check_runs_finite(results, "soap")
    assert results["config"]["schedule"] == schedule
    assert [r["schedule"] for r in results["runs"]] == [None, schedule]


# ---------------------------------------------------------------------------- checkpoint / resume
CURVE_KEYS = ("status", "steps_done", "train_loss", "eval_steps", "val_loss")


def curves(results: dict) -> list[tuple]:
    return [
        tuple(str(run[k]) for k in ("optimizer", "lr", "seed")) + tuple(repr(run[k]) for k in CURVE_KEYS)
        for run in results["runs"]
    ]


def tiny_args(out: Path, optimizers: str, *extra: str) -> list[str]:
    # soap_kernels' default LAPACK choice (one thread or the split) gives the same bits either way,
    # so no --lapack-threads. --precondition-frequency 2: refreshes before and after the resumed
    # step. --threads 1: tiny ops, and a busy machine does not slow the test down by much (two
    # threads spin waiting for each other there).
    return ["--preset", "tiny", "--no-progress", "--out", str(out), "--optimizers", optimizers,
            "--threads", "1", "--precondition-frequency", "2", *extra]  # fmt: skip


def interrupted_then_resumed(tmp_path: Path, optimizers: str, stops: list[int], *extra: str) -> dict:
    """Run with checkpoints every 2 steps, stopped after ``stops[0]`` steps, resumed and stopped
    again after ``stops[1]`` steps of that session, ..., then resumed to the end."""
    out = tmp_path / "interrupted"
    args = tiny_args(out, optimizers, *extra)
    for i, stop in enumerate(stops):
        before = json.loads((out / "results.json").read_text())["runs"] if (out / "results.json").exists() else []
        again = ["--resume", str(out)] if i else ["--checkpoint-every", "2"]
        with pytest.raises(SystemExit, match=f"stopped after {stop} steps"):
            train_lm.main([*args, *again, "--stop-after-steps", str(stop)])
        after = json.loads((out / "results.json").read_text())["runs"] if (out / "results.json").exists() else []
        assert after[: len(before)] == before  # finished runs are kept, not run again
    resumed = train_lm.main([*args, "--resume", str(out)])
    assert resumed["complete"] and len(resumed["earlier_commands"]) == len(stops)
    return resumed


def test_resume_is_bit_identical(tmp_path: Path) -> None:
    """adamw, soap, shampoo, each interrupted one step past a checkpoint (at step 3) and resumed."""
    for second_moment in ("adam", "adafactor"):
        reason = soap_skip_reason(second_moment)
        if reason:
            pytest.skip(reason)
    uninterrupted = train_lm.main(tiny_args(tmp_path / "whole", "adamw,soap,shampoo"))
    steps = uninterrupted["config"]["steps"]
    # Session 1 stops in adamw's run at step 3; session 2 resumes it at 2 and stops in soap's at 3, ...
    resumed = interrupted_then_resumed(tmp_path, "adamw,soap,shampoo", [3, steps + 1, steps + 1])
    print(*curves(uninterrupted), *curves(resumed), sep="\n")
    assert curves(resumed) == curves(uninterrupted)
    assert [run["resumed_at_steps"] for run in resumed["runs"]] == [[2], [2], [2]]


def test_resume_with_schedule(tmp_path: Path) -> None:
    """The schedule's state (Staggered's phases) is saved with SOAP's state_dict and resumed."""
    reason = soap_skip_reason("adam")
    if reason:
        pytest.skip(reason)
    extra = ("--schedule", "Staggered:3")
    uninterrupted = train_lm.main(tiny_args(tmp_path / "whole", "soap", *extra))
    resumed = interrupted_then_resumed(tmp_path, "soap", [5], *extra)
    assert curves(resumed) == curves(uninterrupted)
    assert resumed["runs"][0]["resumed_at_steps"] == [4] and resumed["config"]["schedule"] == "Staggered:3"


def test_resume_peers(tmp_path: Path) -> None:
    """Every peer that runs here, in one invocation: stopped in the last one's run, resumed."""
    names = [name for name in peers.PEERS if peers.peer_available(name, os.environ.get("UPSTREAM_SOAP"))[0]]
    if not names:
        pytest.skip(f"no peer runs here (install them with {peers.INSTALL}; UPSTREAM_SOAP for the authors' soap.py)")
    extra = peer_args("upstream_soap") if "upstream_soap" in names else []
    uninterrupted = train_lm.main(tiny_args(tmp_path / "whole", ",".join(names), *extra))
    stop = uninterrupted["config"]["steps"] * (len(names) - 1) + 5
    resumed = interrupted_then_resumed(tmp_path, ",".join(names), [stop], *extra)
    assert curves(resumed) == curves(uninterrupted)
    assert [run["resumed_at_steps"] for run in resumed["runs"]] == [[]] * (len(names) - 1) + [[4]]


def test_crash_while_writing_a_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    uninterrupted = train_lm.main(tiny_args(tmp_path / "whole", "adamw"))
    out = tmp_path / "crashed"
    real_save = torch.save
    calls = []

    def crashing_save(obj, f, *args, **kwargs):
        calls.append(obj["current"]["step"] if obj["current"] else None)
        if len(calls) == 2:  # the checkpoint of step 4: half a file, then the crash
            f.write(b"PK\x03\x04 torn")
            raise OSError("simulated crash while writing")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(train_lm.CheckpointError, match="simulated crash"):
        train_lm.main(tiny_args(out, "adamw", "--checkpoint-every", "2"))
    monkeypatch.setattr(torch, "save", real_save)
    assert calls == [2, 4]
    assert [p.name for p in out.iterdir() if p.name.endswith(".tmp")] == []  # the torn file is gone
    assert ckpt.load(out / train_lm.CHECKPOINT)["current"]["step"] == 2  # the previous one is whole
    (out / ".checkpoint.pt.killed.tmp").write_bytes(b"a writer killed mid-way leaves this")  # ignored
    resumed = train_lm.main([*tiny_args(out, "adamw"), "--resume", str(out)])
    assert curves(resumed) == curves(uninterrupted)
    assert resumed["runs"][0]["resumed_at_steps"] == [2]


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


def test_resume_refuses_other_options(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match="no checkpoint.pt"):
        train_lm.main(["--preset", "tiny", "--resume", str(out)])
    with pytest.raises(SystemExit, match="stopped after 2 steps"):
        train_lm.main(tiny_args(out, "adamw", "--checkpoint-every", "2", "--stop-after-steps", "2"))
    with pytest.raises(SystemExit, match=r"steps: 6 then, 8 now"):
        train_lm.main([*tiny_args(out, "adamw", "--steps", "8"), "--resume", str(out)])
    with pytest.raises(SystemExit, match="drop --out"):
        train_lm.main(["--preset", "tiny", "--resume", str(out), "--out", str(tmp_path / "elsewhere")])


def test_keep_refresh_scratch_option() -> None:
    parser = train_lm.build_parser()
    assert train_lm.resolve_config(parser.parse_args(["--preset", "tiny"]))["keep_refresh_scratch"] is False
    config = train_lm.resolve_config(parser.parse_args(["--preset", "tiny", "--keep-refresh-scratch"]))
    assert config["keep_refresh_scratch"] is True
    groups = [{"params": [torch.nn.Parameter(torch.zeros(4, 4))]}]
    assert train_lm.make_optimizer("soap", groups, 0.01, config).keep_refresh_scratch
    # A config written before the option (a resumed run's) builds the default.
    del config["keep_refresh_scratch"]
    groups = [{"params": [torch.nn.Parameter(torch.zeros(4, 4))]}]
    assert not train_lm.make_optimizer("shampoo", groups, 0.01, config).keep_refresh_scratch
