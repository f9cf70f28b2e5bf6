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
