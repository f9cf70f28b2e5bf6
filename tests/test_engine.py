"""The batched torch engine in lockstep with the reference, over runs that cross several refreshes."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_lockstep, clone_params, make_params, run_lockstep

from soap_kernels import SOAP

STEPS = 35  # with precondition_frequency=10: refreshes at 10, 20 and 30

# (id, shapes, extra SOAP kwargs)
CASES = [
    ("square", [(16, 16)], {}),
    ("tall", [(24, 10)], {}),
    ("wide", [(10, 24)], {}),
    ("prime", [(13, 7)], {}),
    ("size-one", [(1, 9), (9, 1)], {}),
    ("above-max-dim", [(40, 8), (8, 40)], {"max_precond_dim": 32}),
    ("1d", [(11,)], {}),
    ("1d-preconditioned", [(11,)], {"precondition_1d": True}),
    ("1d-above-max", [(40,)], {"precondition_1d": True, "max_precond_dim": 32}),
    ("0d", [()], {}),
    ("0d-merge", [()], {"merge_dims": True}),
    ("3d", [(6, 5, 3)], {}),
    ("conv", [(6, 4, 3, 3)], {}),
    ("conv-merge", [(6, 4, 3, 3)], {"merge_dims": True, "max_precond_dim": 16}),
    ("conv-merge-channels-last", [(6, 3, 3, 4)], {"merge_dims": True, "max_precond_dim": 16, "data_format": "channels_last"}),
    ("bucket-of-four", [(8, 12)] * 4, {}),
    ("normalize-grads", [(12, 9), (7,)], {"normalize_grads": True}),
    ("no-bias-correction", [(12, 9)], {"correct_bias": False}),
    ("no-weight-decay", [(12, 9)], {"weight_decay": 0.0}),
    ("shampoo-beta", [(12, 9)], {"shampoo_beta": 0.9}),
    ("mixed-model", [(16, 8), (8,), (8, 16), (16, 8), ()], {"precondition_frequency": 7}),
]


@pytest.mark.parametrize("shapes,kwargs", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_torch_matches_reference(shapes, kwargs):
    params = make_params(shapes)
    opts = {"lr": 3e-2, "precondition_frequency": 10, **kwargs}
    ref, eng = run_lockstep(params, clone_params(params), shapes, STEPS, opts)
    assert ref.state_dict()["state"][0]["step"] == STEPS - 1
    assert_lockstep(ref, eng)


def test_parameters_without_gradient_some_steps():
    """Rows of a bucket with no gradient are left alone (and do not count a step)."""
    shapes = [(8, 12)] * 3 + [(5,)]
    params = make_params(shapes)

    def skip(t, i):
        return (i == 1 and t % 3 == 0) or (i == 2 and t < 4) or (i == 3 and t % 2 == 1)

    ref, eng = run_lockstep(params, clone_params(params), shapes, STEPS, {"lr": 3e-2, "precondition_frequency": 5},
                            skip=skip)
    steps = [ref.state_dict()["state"][i]["step"] for i in range(4)]
    assert len(set(steps)) > 1, "the parameters should have different step counts"
    assert_lockstep(ref, eng)


def test_two_groups_with_different_hyperparameters():
    shapes = [(10, 6), (10, 6), (6,)]
    params = make_params(shapes)
    other = clone_params(params)

    def groups(ps):
        return [
            {"params": ps[:1], "lr": 1e-2, "betas": (0.9, 0.99), "precondition_frequency": 4},
            {"params": ps[1:], "lr": 3e-2, "weight_decay": 0.1, "shampoo_beta": 0.8},
        ]

    ref, eng = run_lockstep(groups(params), groups(other), shapes, STEPS, {"precondition_frequency": 10})
    assert_lockstep(ref, eng)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_parameters(dtype):
    shapes = [(12, 8), (8,)]
    params = make_params(shapes, dtype=dtype)
    ref, eng = run_lockstep(params, clone_params(params), shapes, STEPS, {"lr": 3e-2})
    for p in [*ref.param_groups[0]["params"], *eng.param_groups[0]["params"]]:
        assert p.dtype == dtype
    for s in eng.state_dict()["state"].values():
        assert s["exp_avg"].dtype == torch.float32
    assert_lockstep(ref, eng, dtype)


def test_adafactor_mode_matches_reference():
    shapes = [(12, 9), (6, 4, 3), (7,)]
    params = make_params(shapes)
    ref, eng = run_lockstep(params, clone_params(params), shapes, STEPS,
                            {"lr": 3e-2, "second_moment": "adafactor", "precondition_1d": True})
    assert_lockstep(ref, eng)


def test_rotated_statistics_give_eigenvalues_and_drift():
    """diag(B) are the eigenvalue estimates; the drift is zero right after an exact basis."""
    p = make_params([(10, 6)])
    opt = SOAP(p, backend="torch", precondition_frequency=1000)
    p[0].grad = torch.randn(10, 6)
    opt.step()
    bucket = opt._engine.buckets[0][1]
    drift = bucket.drift()
    print("drift after eigh:", drift)
    assert drift.max() < 1e-5
    gg = opt.state_dict()["state"][0]["GG"][0]
    expected = torch.linalg.eigvalsh(gg).flip(0)
    assert torch.allclose(bucket.stats[0][0].diagonal(), expected, rtol=1e-4, atol=1e-6)
    for _ in range(3):
        p[0].grad = torch.randn(10, 6)
        opt.step()
    assert bucket.drift().min() > 1e-3, "new gradients rotate the statistics away from the basis"


def test_basis_stays_orthonormal_over_many_refreshes():
    p = make_params([(12, 20)])
    opt = SOAP(p, backend="torch", precondition_frequency=1, lr=1e-3)
    for _ in range(60):
        p[0].grad = torch.randn(12, 20)
        opt.step()
    for q in opt.state[p[0]]["Q"]:
        err = (q.T @ q - torch.eye(q.shape[0])).abs().max().item()
        print("||QᵀQ − I||_max =", err)
        assert err < 1e-5


def test_finite_rows_reads_column_major_batches_as_they_lie():
    """The refresh guard's check on LAPACK's column-major Q: per matrix, NaN and inf found in
    either layout, and no copy of the batch is made for it."""
    from soap_kernels.engine import _finite_rows

    q = torch.randn(3, 5, 5).mT  # column-major matrices, as geqrf/orgqr return them
    q[1, 4, 0] = float("nan")
    q[2, 0, 3] = float("inf")
    assert _finite_rows(q).tolist() == [True, False, False]
    assert _finite_rows(q.contiguous()).tolist() == [True, False, False]
    assert _finite_rows(torch.tensor([1.0, float("nan")])).tolist() == [True, False]


def test_reorthonormalisation_cadence_is_spread_over_the_factors():
    from soap_kernels.engine import REORTHONORMALIZE_EVERY as EVERY
    from soap_kernels.engine import reorthonormalize_due, reorthonormalize_phase

    for phase in range(EVERY):
        due = [n for n in range(1, 6 * EVERY) if reorthonormalize_due(n, phase)]
        assert due[0] >= EVERY and due[0] < 2 * EVERY  # never in the first EVERY - 1 refreshes
        assert all(b - a == EVERY for a, b in zip(due, due[1:]))
        assert all(n % EVERY == phase for n in due)
    # The bench set's factors (d 256 GPT): not all at one refresh, and the two largest apart.
    factors = [((16384, 256), 1), ((256, 256), 0), ((256, 256), 1), ((768, 256), 0), ((768, 256), 1),
               ((1024, 256), 0), ((1024, 256), 1), ((256, 1024), 0), ((256, 1024), 1)]
    phases = {f: reorthonormalize_phase(*f) for f in factors}
    assert len(set(phases.values())) >= 4
    assert phases[((1024, 256), 0)] != phases[((256, 1024), 1)]
    assert reorthonormalize_phase((1024, 256), 0) == reorthonormalize_phase([1024, 256], 0)


def test_each_factor_reorthonormalises_at_its_own_refresh(monkeypatch):
    from soap_kernels import SOAP, ops
    from soap_kernels.engine import REORTHONORMALIZE_EVERY as EVERY
    from soap_kernels.engine import reorthonormalize_due, reorthonormalize_phase

    calls = []
    real = ops.TorchKernels.reorthonormalize_

    def spy(self, q):
        calls.append((len(steps), q.shape[-1]))
        return real(self, q)

    monkeypatch.setattr(ops.TorchKernels, "reorthonormalize_", spy)
    gen = torch.Generator().manual_seed(0)
    shapes = [(12, 5), (7, 12)]  # factors (12, 5)/0, (12, 5)/1, (7, 12)/0, (7, 12)/1
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    opt = SOAP(params, lr=1e-2, precondition_frequency=1, backend="torch")
    steps = []
    for _ in range(3 * EVERY + 2):
        steps.append(None)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    # f = 1: the first step initialises, refresh n happens at step n + 1.
    want = sorted((n + 1, s[dim]) for s in shapes for dim in (0, 1)
                  for n in range(1, 3 * EVERY + 2) if reorthonormalize_due(n, reorthonormalize_phase(s, dim)))
    assert sorted(calls) == want
    assert len({step for step, _ in calls}) > len(want) // 4  # spread over several steps
