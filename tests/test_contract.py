"""The torch.optim contract items of issue 13, one test each, on the reference and the engine."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch

from soap_kernels import SOAP, Doubling

BACKENDS = ["reference", "torch"]


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).to(dtype)


def _steps(model, opt, n, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.randn(8, 6, generator=g).to(next(model.parameters()).dtype)
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_parameters_get_float64_state_and_mix_with_others(backend):
    params = [torch.nn.Parameter(torch.randn(4, 3, dtype=dt)) for dt in
              (torch.float64, torch.float32, torch.bfloat16, torch.float16)]
    opt = SOAP(params, backend=backend, precondition_frequency=2)
    for _ in range(5):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    state = opt.state[params[0]]
    assert state["exp_avg"].dtype == torch.float64 and state["Q"][0].dtype == torch.float64
    assert opt.state[params[1]]["exp_avg"].dtype == torch.float32
    assert opt.state[params[2]]["exp_avg"].dtype == torch.float32  # bf16: fp32 state, as the reference
    assert all(torch.isfinite(p).all() for p in params)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_size_and_0d_parameters_step(backend):
    params = [torch.nn.Parameter(torch.randn(0, 4)), torch.nn.Parameter(torch.randn(())),
              torch.nn.Parameter(torch.randn(3, 0, 2)), torch.nn.Parameter(torch.randn(3, 2))]
    opt = SOAP(params, backend=backend, precondition_frequency=2)
    before = params[1].detach().clone()
    for _ in range(4):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    assert not torch.equal(params[1], before)  # the 0-d parameter moves (plain Adam)
    assert params[0].shape == (0, 4) and params[2].shape == (3, 0, 2)
    opt.load_state_dict(opt.state_dict())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_continue_bit_identically(backend, how):
    model = _model()
    opt = SOAP(model.parameters(), backend=backend, precondition_frequency=3, lr=1e-2)
    _steps(model, opt, 5)
    if how == "deepcopy":
        model2, opt2 = copy.deepcopy((model, opt))
    else:
        model2, opt2 = pickle.loads(pickle.dumps((model, opt)))
    _steps(model, opt, 7, seed=2)
    _steps(model2, opt2, 7, seed=2)
    assert _same(model, model2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_named_parameters_give_param_names(backend):
    model = _model()
    opt = SOAP(model.named_parameters(), backend=backend)
    names = [n for n, _ in model.named_parameters()]
    assert opt.param_groups[0]["param_names"] == names
    _steps(model, opt, 2)
    assert opt.state_dict()["param_groups"][0]["param_names"] == names


def test_bad_params_raise_torchs_type_errors():
    with pytest.raises(TypeError, match="iterable of Tensors or dicts"):
        SOAP(torch.nn.Parameter(torch.randn(3)))
    with pytest.raises(TypeError, match="can only optimize Tensors"):
        SOAP([1.0])


def test_state_has_the_reference_names_on_every_backend():
    keys = {}
    for backend in BACKENDS:
        model = _model()
        opt = SOAP(model.parameters(), backend=backend, precondition_frequency=2)
        _steps(model, opt, 3)
        keys[backend] = [set(opt.state[p]) for p in model.parameters()]
    for ref, eng in zip(keys["reference"], keys["torch"]):
        assert {"step", "exp_avg", "exp_avg_sq", "Q"} <= ref & eng


@pytest.mark.parametrize("backend", BACKENDS)
def test_dcp_helpers_keep_schedule_progress(backend, tmp_path):
    """get/set_optimizer_state_dict keep only "state" and "param_groups": SOAP's progress (update
    count, the schedule's state) travels in the param groups, and the resumed run is identical."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    model = _model()
    opt = SOAP(model.parameters(), backend=backend, schedule=Doubling(1, 8))
    _steps(model, opt, 6)
    saved = get_optimizer_state_dict(model, opt)
    assert set(saved) == {"state", "param_groups"}
    buf = io.BytesIO()
    torch.save(saved, buf)
    model2 = copy.deepcopy(model)
    opt2 = SOAP(model2.parameters(), backend=backend, schedule=Doubling(1, 8))
    buf.seek(0)
    set_optimizer_state_dict(model2, opt2, torch.load(buf, weights_only=False))
    assert opt2.state_dict()["updates"] == opt.state_dict()["updates"] == 5
    _steps(model, opt, 12, seed=3)
    _steps(model2, opt2, 12, seed=3)
    assert _same(model, model2)
