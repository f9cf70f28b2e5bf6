"""Shared test helpers: tolerances, lockstep runs, sign-invariant state comparison."""

from __future__ import annotations

import os

# The Triton kernels run on CPU tensors through the interpreter when no GPU is present; this must
# be set before triton is imported anywhere.
try:
    import torch as _torch

    if not _torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover
    pass

import copy
from collections.abc import Callable, Sequence

import pytest
import torch
from kernel_tables import TABLES

from soap_kernels import SOAP, ops
from soap_kernels.reference import make_layout

# One table of tolerances per parameter dtype: relative error of the parameter trajectory and of
# each state tensor, torch engine vs reference (both fp32 math; bf16/fp16 differ by one rounding of
# the parameter when fp32 results straddle a rounding boundary).
TOLERANCE = {
    torch.float32: {"param": 1e-4, "state": 1e-3},
    torch.bfloat16: {"param": 2e-2, "state": 5e-2},
    torch.float16: {"param": 5e-3, "state": 2e-2},
}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def report(name: str, a: torch.Tensor, b: torch.Tensor) -> float:
    diff = (a.detach().double() - b.detach().double()).abs()
    err = rel_err(a, b)
    worst = float(diff.max()) if diff.numel() else 0.0
    mean = float(diff.mean()) if diff.numel() else 0.0
    print(f"{name}: rel {err:.2e}  max {worst:.2e}  mean {mean:.2e}")
    return err


def make_params(shapes: Sequence[tuple], dtype=torch.float32, seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in shapes]


def clone_params(params: Sequence[torch.Tensor]) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def grad_stream(shapes: Sequence[tuple], steps: int, seed: int = 1, skip: Callable[[int, int], bool] | None = None):
    """Deterministic gradients; ``skip(step, index)`` leaves that gradient as None."""
    g = torch.Generator().manual_seed(seed)
    for t in range(steps):
        grads = []
        for i, s in enumerate(shapes):
            grad = torch.randn(s, generator=g)
            grads.append(None if skip is not None and skip(t, i) else grad)
        yield grads


def apply_grads(params, grads) -> None:
    for p, grad in zip(params, grads):
        p.grad = None if grad is None else grad.to(p.dtype).clone()


def run_lockstep(groups_a, groups_b, shapes, steps, opt_kwargs, backends=("reference", "torch"), skip=None):
    """Run two optimizers side by side on the same gradients; return them."""
    opt_a = SOAP(groups_a, backend=backends[0], **opt_kwargs)
    opt_b = SOAP(groups_b, backend=backends[1], **opt_kwargs)
    params_a = [p for g in opt_a.param_groups for p in g["params"]]
    params_b = [p for g in opt_b.param_groups for p in g["params"]]
    for grads in grad_stream(shapes, steps, skip=skip):
        apply_grads(params_a, grads)
        apply_grads(params_b, grads)
        opt_a.step()
        opt_b.step()
    return opt_a, opt_b


def param_trajectory(shapes: Sequence[tuple], steps: int, opt_kwargs: dict, backend: str, seed: int = 0) -> list:
    """Snapshots of every parameter after each of ``steps`` steps of a fresh SOAP on ``grad_stream``."""
    params = make_params(shapes, seed=seed)
    opt = SOAP(params, backend=backend, **opt_kwargs)
    snapshots = []
    for grads in grad_stream(shapes, steps, seed=seed + 1):
        apply_grads(params, grads)
        opt.step()
        snapshots.append([p.detach().clone() for p in params])
    return snapshots


def max_trajectory_error(snapshots: list, snapshots_ref: list) -> float:
    """The largest relative parameter error (``rel_err`` per parameter) over all steps."""
    assert len(snapshots) == len(snapshots_ref)
    return max(rel_err(p, p_ref) for step, step_ref in zip(snapshots, snapshots_ref) for p, p_ref in zip(step, step_ref))


def column_signs(q_ref: torch.Tensor, q_other: torch.Tensor) -> torch.Tensor:
    """Signs that align the columns of ``q_other`` with ``q_ref`` (eigenvectors carry arbitrary signs)."""
    s = torch.sign((q_ref * q_other).sum(dim=0))
    return torch.where(s == 0, torch.ones_like(s), s)


def compare_states(state_ref: dict, state_other: dict, param: torch.Tensor, group: dict, data_format: str,
                   tol: float, second_moment: str = "adam") -> None:
    """Every state tensor agrees, sign-invariantly for the basis-dependent ones."""
    layout = make_layout(param.shape, max_precond_dim=group["max_precond_dim"], merge_dims=group["merge_dims"],
                         precondition_1d=group["precondition_1d"], channels_last=data_format == "channels_last")
    assert state_ref["step"] == state_other["step"]
    exp_avg = layout.to_work(state_other["exp_avg"]).clone()
    for i, (q_ref, q_other) in enumerate(zip(state_ref["Q"], state_other["Q"])):
        if len(q_ref) == 0:
            assert len(q_other) == 0
            continue
        signs = column_signs(q_ref, q_other)
        assert report(f"Q[{i}]", q_other * signs, q_ref) < tol
        assert report(f"GG[{i}]", state_other["GG"][i], state_ref["GG"][i]) < tol
        shape = [1] * exp_avg.dim()
        shape[i] = -1
        exp_avg = exp_avg * signs.reshape(shape)
    assert report("exp_avg", exp_avg, layout.to_work(state_ref["exp_avg"])) < tol
    assert report("exp_avg_sq", state_other["exp_avg_sq"], state_ref["exp_avg_sq"]) < tol


def assert_lockstep(opt_ref: SOAP, opt_other: SOAP, dtype=torch.float32) -> None:
    tol = TOLERANCE[dtype]
    sd_ref, sd_other = opt_ref.state_dict(), opt_other.state_dict()
    params_ref = [p for g in opt_ref.param_groups for p in g["params"]]
    params_other = [p for g in opt_other.param_groups for p in g["params"]]
    groups = [g for g in opt_ref.param_groups for _ in g["params"]]
    for i, (p_ref, p_other) in enumerate(zip(params_ref, params_other)):
        assert report(f"param {i} {tuple(p_ref.shape)}", p_other.float(), p_ref.float()) <= tol["param"]
        assert (i in sd_ref["state"]) == (i in sd_other["state"])
        if i in sd_ref["state"]:
            compare_states(sd_ref["state"][i], sd_other["state"][i], p_ref, groups[i], opt_ref.data_format,
                           tol["state"], opt_ref.second_moment)


@pytest.fixture
def deepcopy():
    return copy.deepcopy


@pytest.fixture(autouse=True)
def _restore_thread_count():
    """Every test starts and ends with the process's intra-op thread count (some tests pin one
    thread; a leaked setting changes other tests' GEMM bits)."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=TABLES, ids=[t.name for t in TABLES])
def table(request, monkeypatch):
    """Each kernel table of ``tests/kernel_tables.py`` in turn (skipped, with the reason, where it cannot
    run); the torch table's native fast path is switched on or off for the test's duration."""
    entry = request.param
    ok, why = entry.available()
    if not ok:
        pytest.skip(f"{entry.name} table unavailable: {why}")
    if entry.native is not None:
        monkeypatch.setattr(ops, "NATIVE_OPS", entry.native)
    return entry
