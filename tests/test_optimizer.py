"""The torch.optim.Optimizer contract: signature, errors before modification, closures, LR
schedulers, state_dict round trips within and across backends, schedules."""

from __future__ import annotations

import inspect
import io

import pytest
import torch
from conftest import TOLERANCE, apply_grads, assert_lockstep, clone_params, grad_stream, make_params, report

from soap_kernels import SOAP, Constant, Doubling, DriftAdaptive, LossThreshold

BACKENDS = ["reference", "torch"]
SHAPES = [(10, 6), (6,), (10, 6), (4, 3, 2)]


def snapshot(opt: SOAP, params) -> tuple:
    sd = opt.state_dict()
    buf = io.BytesIO()
    torch.save(sd["state"], buf)
    return [p.detach().clone() for p in params], buf.getvalue()


def assert_unchanged(before: tuple, opt: SOAP, params) -> None:
    params_before, state_before = before
    for a, b in zip(params_before, params):
        assert torch.equal(a, b.detach())
    assert snapshot(opt, params)[1] == state_before, "optimizer state changed"


def test_signature_matches_reference():
    sig = inspect.signature(SOAP.__init__)
    expected = {
        "lr": 3e-3, "betas": (0.95, 0.95), "shampoo_beta": -1, "eps": 1e-8, "weight_decay": 0.01,
        "precondition_frequency": 10, "max_precond_dim": 10000, "merge_dims": False, "precondition_1d": False,
        "normalize_grads": False, "data_format": "channels_first", "correct_bias": True,
    }
    positional = [n for n, p in sig.parameters.items() if p.kind == p.POSITIONAL_OR_KEYWORD][1:]
    assert positional == ["params", *expected]
    for name, default in expected.items():
        assert sig.parameters[name].default == default
    for name in ("backend", "schedule", "second_moment"):
        assert sig.parameters[name].kind == inspect.Parameter.KEYWORD_ONLY


@pytest.mark.parametrize("kwargs,match", [
    ({"lr": -1.0}, "learning rate"),
    ({"eps": -1e-8}, "eps"),
    ({"betas": (1.0, 0.9)}, "beta parameter at index 0"),
    ({"betas": (0.9, -0.1)}, "beta parameter at index 1"),
    ({"betas": (0.9,)}, "pair"),
    ({"shampoo_beta": 1.0}, "shampoo_beta"),
    ({"weight_decay": -0.1}, "weight_decay"),
    ({"precondition_frequency": 0}, "precondition_frequency"),
    ({"precondition_frequency": 2.5}, "precondition_frequency"),
    ({"max_precond_dim": 0}, "max_precond_dim"),
    ({"data_format": "nhwc"}, "data_format"),
    ({"backend": "jax"}, "backend"),
    ({"second_moment": "lion"}, "second_moment"),
    ({"schedule": 10}, "schedule"),
    ({"merge_dims": "yes"}, "merge_dims"),
])
def test_bad_hyperparameters_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SOAP(make_params([(3, 3)]), **kwargs)


def test_bad_param_group_is_not_added():
    p = make_params([(3, 3), (2,)])
    opt = SOAP(p[:1])
    with pytest.raises(ValueError, match="learning rate"):
        opt.add_param_group({"params": p[1:], "lr": -1})
    assert len(opt.param_groups) == 1


def test_complex_parameters_rejected():
    with pytest.raises(ValueError, match="complex"):
        SOAP([torch.nn.Parameter(torch.randn(3, 3, dtype=torch.complex64))])


@pytest.mark.parametrize("backend", BACKENDS)
def test_rejected_step_changes_nothing(backend):
    """A sparse gradient or a bad hyperparameter set after construction fails before any change."""
    params = make_params(SHAPES)
    opt = SOAP(params, backend=backend, precondition_frequency=2)
    for grads in grad_stream(SHAPES, 4):
        apply_grads(params, grads)
        opt.step()
    apply_grads(params, next(grad_stream(SHAPES, 1, seed=9)))
    before = snapshot(opt, params)
    params[1].grad = torch.randn(6).to_sparse()
    with pytest.raises(ValueError, match="sparse"):
        opt.step()
    assert_unchanged(before, opt, params)
    params[1].grad = torch.randn(6)
    opt.param_groups[0]["lr"] = -0.1
    with pytest.raises(ValueError, match="learning rate"):
        opt.step()
    assert_unchanged(before, opt, params)


@pytest.mark.parametrize("backend", BACKENDS)
def test_closure_zero_grad_and_lr_scheduler(backend):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    x, y = torch.randn(64, 6), torch.randn(64, 1)
    opt = SOAP(model.parameters(), lr=1e-2, backend=backend, precondition_frequency=3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)
    calls = []

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        calls.append(loss.item())
        return loss

    losses = []
    for _ in range(20):
        losses.append(opt.step(closure).item())
        sched.step()
    assert len(calls) == 20
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.5**4)
    assert losses[-1] < losses[0]
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_lr_scheduler_lockstep_across_backends():
    params = make_params(SHAPES)
    other = clone_params(params)
    ref = SOAP(params, backend="reference", lr=3e-2, precondition_frequency=4)
    eng = SOAP(other, backend="torch", lr=3e-2, precondition_frequency=4)
    s_ref = torch.optim.lr_scheduler.CosineAnnealingLR(ref, T_max=20)
    s_eng = torch.optim.lr_scheduler.CosineAnnealingLR(eng, T_max=20)
    for grads in grad_stream(SHAPES, 20):
        apply_grads(params, grads)
        apply_grads(other, grads)
        ref.step()
        eng.step()
        s_ref.step()
        s_eng.step()
    assert_lockstep(ref, eng)


def run(opt, params, grads_list):
    for grads in grads_list:
        apply_grads(params, grads)
        opt.step()


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_dict_round_trip_continues_identically(backend):
    grads = list(grad_stream(SHAPES, 32))
    params = make_params(SHAPES)
    opt = SOAP(params, backend=backend, lr=3e-2, precondition_frequency=5)
    run(opt, params, grads[:13])
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    resumed_params = clone_params(params)
    resumed = SOAP(resumed_params, backend=backend, lr=1.0, precondition_frequency=99)  # overwritten by the load
    buf.seek(0)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    assert resumed.param_groups[0]["lr"] == 3e-2 and resumed.param_groups[0]["precondition_frequency"] == 5
    run(opt, params, grads[13:])
    run(resumed, resumed_params, grads[13:])
    for a, b in zip(params, resumed_params):
        assert torch.equal(a, b), "same backend: the continuation must be identical"


@pytest.mark.parametrize("source,target", [("reference", "torch"), ("torch", "reference")])
def test_checkpoint_moves_between_backends(source, target):
    grads = list(grad_stream(SHAPES, 32))
    params = make_params(SHAPES)
    opt = SOAP(params, backend=source, lr=3e-2, precondition_frequency=5)
    run(opt, params, grads[:13])
    moved_params = clone_params(params)
    moved = SOAP(moved_params, backend=target, lr=3e-2, precondition_frequency=5)
    moved.load_state_dict(opt.state_dict())
    run(opt, params, grads[13:])
    run(moved, moved_params, grads[13:])
    for a, b in zip(params, moved_params):
        assert report("param", b.detach(), a.detach()) < TOLERANCE[torch.float32]["param"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mutate,match", [
    (lambda sd: sd["param_groups"].append(dict(sd["param_groups"][0])), "param groups"),
    (lambda sd: sd["param_groups"][0]["params"].pop(), "parameters"),
    (lambda sd: sd["state"][0].__setitem__("exp_avg", torch.zeros(3, 3)), "shape"),
    (lambda sd: sd["state"][0]["Q"].pop(), "factors"),
    # GG, or the engine's exact GG_eigenbasis, must be there (either is enough).
    (lambda sd: [sd["state"][0].pop(k, None) for k in ("GG", "GG_eigenbasis")], "missing"),
    (lambda sd: sd.__setitem__("format", 99), "newer"),
    (lambda sd: sd["param_groups"][0].__setitem__("lr", -1.0), "learning rate"),
    (lambda sd: sd["state"][0]["exp_avg_sq"].fill_(float("nan")), "non-finite"),
])
def test_load_state_dict_that_does_not_fit_changes_nothing(backend, mutate, match):
    params = make_params(SHAPES)
    opt = SOAP(params, backend=backend, precondition_frequency=2)
    run(opt, params, list(grad_stream(SHAPES, 5)))
    bad = opt.state_dict()
    mutate(bad)
    before = snapshot(opt, params)
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(bad)
    assert_unchanged(before, opt, params)


def test_add_param_group_mid_run_keeps_state():
    params = make_params(SHAPES + [(5, 5)])
    other = clone_params(params)
    ref = SOAP(params[:4], backend="reference", lr=3e-2, precondition_frequency=4)
    eng = SOAP(other[:4], backend="torch", lr=3e-2, precondition_frequency=4)
    shapes = SHAPES + [(5, 5)]
    for t, grads in enumerate(grad_stream(shapes, 25)):
        if t == 9:
            ref.add_param_group({"params": params[4:], "lr": 1e-2})
            eng.add_param_group({"params": other[4:], "lr": 1e-2})
        apply_grads(params, grads)
        apply_grads(other, grads)
        ref.step()
        eng.step()
    assert_lockstep(ref, eng)


def test_live_state_views_follow_the_engine():
    params = make_params([(6, 4)])
    opt = SOAP(params, backend="torch")
    run(opt, params, list(grad_stream([(6, 4)], 3)))
    state = opt.state[params[0]]
    assert set(state) >= {"step", "exp_avg", "exp_avg_sq", "Q"}
    before = state["exp_avg"].clone()
    run(opt, params, list(grad_stream([(6, 4)], 1, seed=5)))
    assert not torch.equal(before, opt.state[params[0]]["exp_avg"])
    assert int(opt.state[params[0]]["step"]) == 3


@pytest.mark.parametrize("schedule", [lambda: Constant(5), lambda: Doubling(1, 8)], ids=["constant", "doubling"])
def test_schedules_lockstep_across_backends(schedule):
    shapes = [(8, 6), (6,), (8, 6)]
    params = make_params(shapes)
    other = clone_params(params)
    ref = SOAP(params, backend="reference", lr=3e-2, schedule=schedule())
    eng = SOAP(other, backend="torch", lr=3e-2, schedule=schedule())
    run(ref, params, list(grad_stream(shapes, 30)))
    run(eng, other, list(grad_stream(shapes, 30)))
    assert_lockstep(ref, eng)


@pytest.mark.parametrize("backend", BACKENDS)
def test_constant_schedule_equals_reference_rule(backend):
    params = make_params(SHAPES)
    other = clone_params(params)
    plain = SOAP(params, backend=backend, lr=3e-2, precondition_frequency=5)
    scheduled = SOAP(other, backend=backend, lr=3e-2, precondition_frequency=999, schedule=Constant(5))
    run(plain, params, list(grad_stream(SHAPES, 24)))
    run(scheduled, other, list(grad_stream(SHAPES, 24)))
    for a, b in zip(params, other):
        if backend == "torch":
            assert torch.equal(a, b)
        else:  # the reference refreshes after all updates: one more exp_avg round trip per refresh
            assert report("param", b.detach(), a.detach()) < 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_loss_schedule_needs_the_loss(backend):
    params = make_params([(4, 4)])
    opt = SOAP(params, backend=backend, schedule=LossThreshold(0.1))
    params[0].grad = torch.randn(4, 4)
    opt.step()  # the first step only initialises (DCP's helpers make one without a loss)
    before = (params[0].detach().clone(), {k: v.clone() for k, v in opt.state[params[0]].items() if torch.is_tensor(v)})
    with pytest.raises(ValueError, match="needs the loss"):
        opt.step()
    assert torch.equal(params[0], before[0])  # the rejected step changed nothing
    assert all(torch.equal(opt.state[params[0]][k], v) for k, v in before[1].items())
    opt.step(loss=torch.tensor(1.0))
    params[0].grad = torch.randn(4, 4)
    opt.step(closure=lambda: 0.5)
    with pytest.raises(ValueError, match="number"):
        opt.step(closure=lambda: "not a loss")


def test_drift_schedule_refreshes_only_drifted_factors():
    """With a huge threshold nothing refreshes until max_every; the basis is then updated."""
    params = make_params([(8, 6)])
    opt = SOAP(params, backend="torch", schedule=DriftAdaptive(threshold=10.0, min_every=1, max_every=6))
    q_history = []
    for grads in grad_stream([(8, 6)], 14):
        apply_grads(params, grads)
        opt.step()
        q_history.append(opt.state[params[0]]["Q"][0].clone())
    changed = [t for t in range(1, len(q_history)) if not torch.equal(q_history[t], q_history[t - 1])]
    # step() call k performs update t = k (the first call initialises): max_every=6 forces t = 6, 12.
    assert changed == [6, 12]


def test_memory_info_counts_the_algorithms_state_and_one_shared_workspace():
    """``memory_info``: state = the reference's tensors (two moments per parameter, a statistic and
    a basis per preconditioned dim) plus a 4-byte step counter per parameter; workspace = two
    buffers of the largest bucket, shared (not a pair per bucket)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    params = list(model.parameters())
    opt, ref = SOAP(params, lr=1e-3), SOAP([p.detach().clone().requires_grad_() for p in params], lr=1e-3,
                                            backend="reference")
    for _ in range(3):
        x = torch.randn(4, 16)
        for o in (opt, ref):
            o.zero_grad()
            torch.func.functional_call(model, dict(zip([n for n, _ in model.named_parameters()],
                                                       o.param_groups[0]["params"])), (x,)).sum().backward()
            o.step()
    algorithm = sum(4 * (2 * p.numel() + (2 * sum(d * d for d in p.shape) if p.dim() == 2 else 0)) for p in params)
    assert ref.memory_info() == {"state_bytes": algorithm, "workspace_bytes": 0}
    assert opt.memory_info() == {"state_bytes": algorithm + 4 * len(params), "workspace_bytes": 2 * 4 * 16 * 8}
