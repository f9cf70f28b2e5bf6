"""pytest-benchmark entry point: small cases of every benchmark family, on the CPU (or the GPU).

    pytest benchmarks --benchmark-only            # time them (pytest-benchmark's table, --benchmark-json ...)
    pytest benchmarks                             # each case runs once, untimed: a quick plumbing check

Benchmarks measure, tests assert: nothing here checks a speed. ``pytest tests`` does not collect
this file (``testpaths = ["tests"]``). Parameter set: ``tiny`` (d 64, 2 layers, vocab 1000).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("pytest_benchmark")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

from soap_kernels import SOAP, ops  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SHAPES = harness.gpt_shapes(*harness.PRESETS["tiny"])
OPTIMIZERS = ["adamw", "adamw-foreach", *harness.soap_backends(DEVICE)[0]]


@pytest.fixture
def run(benchmark, request):
    """``run(fn)``: many rounds under ``--benchmark-only``, one untimed-ish round otherwise."""
    timed = request.config.getoption("benchmark_only", False)

    def go(fn, warmup: int = 2, rounds: int = 30):
        if not timed:
            return benchmark.pedantic(fn, rounds=1, iterations=1, warmup_rounds=0)
        return benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=warmup)

    return go


def _make(name: str, params):
    if name == "adamw":
        return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01, fused=True)
    if name == "adamw-foreach":
        return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01, foreach=True)
    return SOAP(params, lr=1e-3, precondition_frequency=10, backend=name)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_step(run, name):
    """One optimizer step on the tiny set (refresh every 10th step, as in bench_step.py)."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).mul_(0.02).to(DEVICE)) for s in SHAPES]
    grads = [[torch.randn(s, generator=gen).mul_(1e-2).to(DEVICE) for s in SHAPES] for _ in range(2)]
    opt = _make(name, params)
    count = iter(range(10**9))

    def step():
        for p, g in zip(params, grads[next(count) % 2]):
            p.grad = g
        opt.step()
        harness.sync(DEVICE)

    step()  # the initialising step
    run(step, rounds=20)


def _bucket(m: int, n: int, b: int = 4):
    gen = torch.Generator().manual_seed(1)
    qs = [harness.orthonormal(b, m, DEVICE, gen), harness.orthonormal(b, n, DEVICE, gen)]
    grad = torch.randn(b, m, n, generator=gen).to(DEVICE)
    return qs, grad


def test_rotate_in_adam(run):
    qs, grad = _bucket(192, 64)
    exp_avg, exp_avg_sq = torch.zeros_like(grad), torch.ones_like(grad)
    run(lambda: ops.rotate_in_adam(grad, qs, exp_avg, exp_avg_sq, 0.95, 0.95, 1e-8))


def test_rotate_back_update(run):
    qs, direction = _bucket(192, 64)
    params = [torch.zeros(192, 64, device=DEVICE) for _ in range(direction.shape[0])]
    run(lambda: ops.rotate_back_update(direction, qs, params, [1e-3] * len(params), 0.9999))


def test_update_statistics(run):
    qs, rotated = _bucket(192, 64)
    stats = [torch.zeros_like(q) for q in qs]
    run(lambda: ops.update_statistics(stats, rotated, 0.95))


def test_moment_update_torch(run):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_moments

    g = torch.randn(4, 192, 64, device=DEVICE)
    m, v, out = torch.zeros_like(g), torch.ones_like(g), torch.empty_like(g)
    run(lambda: bench_moments.torch_moments(m, v, g, out))


def test_moment_update_native(run):
    ok, why = harness.native_status()
    if not ok:
        pytest.skip(why)
    from soap_kernels import _native

    g = torch.randn(4, 192, 64, device=DEVICE)
    m, v, out = torch.zeros_like(g), torch.ones_like(g), torch.empty_like(g)
    run(lambda: _native.moment_update([m], [v], [g], 0.95, 0.95, 1e-8, out=[out]))


def test_refresh_factor(run):
    d, rows = 128, 4
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(rows, d, d, generator=gen).to(DEVICE)
    stats0 = x @ x.mT / d
    q0 = harness.orthonormal(rows, d, DEVICE, gen)
    stats, q = stats0.clone(), q0.clone()

    def refresh():
        stats.copy_(stats0)
        q.copy_(q0)
        ops.refresh_factor(stats, q)

    run(refresh, rounds=10)


def test_adam_foreach(run):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_adam

    plain = [s for s in SHAPES if len(s) == 1]
    inputs = bench_adam.Inputs(plain, DEVICE, 0)
    with torch.no_grad():
        run(lambda: bench_adam.foreach_adam(inputs))


# ---------------------------------------------------------------- suite plumbing (untimed)
def _tiny_step_args(tmp_path, *extra):
    return ["--shapes", "2*16x8,12x8,8", "--cycles", "2", "--frequency", "2", "--out-dir", str(tmp_path),
            "--no-plot", *extra]


class _FakePeers:
    """The API of python/lm/peers.py, building plain optimizers (the suite's plumbing is checked,
    not the peers)."""

    PEERS = ("heavyball_soap", "pytorch_optimizer_soap", "upstream_soap")

    def __init__(self):
        self.made = {}

    def peer_available(self, name, upstream_path=None):
        if name == "upstream_soap" and not upstream_path:
            return False, "no path"
        return (name != "pytorch_optimizer_soap", "pytorch_optimizer is not installed")

    def make_peer(self, name, params, *, lr, **hyper):
        self.made[name] = hyper
        return torch.optim.AdamW(params, lr=lr, betas=hyper["betas"], eps=hyper["eps"],
                                 weight_decay=hyper["weight_decay"])

    def state_bytes(self, opt):
        return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                   if isinstance(t, torch.Tensor))


def test_bench_step_peers_interleaved(tmp_path, monkeypatch):
    import bench_step

    fake = _FakePeers()
    monkeypatch.setattr(bench_step, "load_peers", lambda: (fake, ""))
    payload = bench_step.main(_tiny_step_args(tmp_path, "--peers", "--optimizers", "adamw,torch"))[0]
    rows = {r["optimizer"]: r for r in payload["results"]}
    assert set(rows) == {"adamw", "torch", "heavyball_soap"}
    assert "pytorch_optimizer" in payload["skipped"]["pytorch_optimizer_soap"]
    assert "pip install --no-deps heavyball==3.2.1 pytorch-optimizer==4.1.0" in payload["skipped"]["pytorch_optimizer_soap"]
    assert "upstream_soap" in payload["skipped"]
    # the same hyperparameters as our rows
    assert fake.made["heavyball_soap"]["precondition_frequency"] == 2
    assert fake.made["heavyball_soap"]["merge_dims"] is False
    assert payload["order"] == "interleaved"
    for r in rows.values():
        assert r["steps_timed"] == 4 and r["state_bytes_per_param"] > 0
    assert rows["torch"]["x_fastest_peer"] is not None and rows["heavyball_soap"]["x_fastest_peer"] == 1.0
    assert rows["torch"]["workspace_bytes"] >= 0 and rows["adamw"]["workspace_bytes"] == 0


def test_bench_step_without_peers_module(tmp_path, monkeypatch):
    import bench_step

    monkeypatch.setattr(bench_step, "load_peers", lambda: (None, "python/lm/peers.py is not importable (x)"))
    payload = bench_step.main(_tiny_step_args(tmp_path, "--peers", "--optimizers", "adamw,reference",
                                              "--order", "sequential"))[0]
    assert [r["optimizer"] for r in payload["results"]] == ["adamw", "reference"]
    assert set(payload["skipped"]) == set(bench_step.PEERS)
    ref = payload["results"][1]
    assert ref["state_bytes"] > 0 and ref["workspace_bytes"] == 0


def test_bench_load_tiny(tmp_path):
    import bench_load

    payload = bench_load.main(["--shapes", "2*12x8,8", "--rounds", "2", "--frequency", "2", "--busy-procs", "1",
                               "--optimizers", "torch,reference", "--out-dir", str(tmp_path), "--no-plot"])
    cases = {(r["case"], r["backend"]) for r in payload["results"]}
    assert cases == {(c, n) for c in ("quiet", "busy") for n in ("torch", "reference")}
    assert all(r["reps"] == 2 for r in payload["results"])
    assert (tmp_path / "load_custom_cpu.json").exists()
