"""Reliability (issue 9): non-finite gradients, injected factorisation faults, bad inputs, a short soak.

Every fault runs on every backend available here: reference, torch, and triton when
``backend_available("triton")`` says it can run (on a CPU through the interpreter). Where nothing may
change, parameters are compared with ``torch.equal`` and the optimizer state by the bytes of its
serialized ``state_dict()["state"]``.
"""

from __future__ import annotations

import io
import math
import re
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import TOLERANCE, apply_grads, assert_lockstep, clone_params, grad_stream, make_params, report

from soap_kernels import SOAP, Constant, LossThreshold, engine, lapack, reference
from soap_kernels.optimizer import params_device
from soap_kernels.placement import Local
from soap_kernels.select import backend_available, device_problem

TRITON = backend_available("triton")[0]
BACKENDS = ["reference", "torch"] + (["triton"] if TRITON else [])
# Checks made before any backend code runs (argument and checkpoint validation) are the same for
# the torch and triton backends: they run on these two only (the Triton interpreter is slow).
SHARED = ["reference", "torch"]
# Two matrices sharing a bucket (first and last), a 1-D, a 3-D and a second 1-D in the middle.
SHAPES = [(6, 5), (5,), (4, 3, 2), (7,), (6, 5)]
KW = {"lr": 3e-2, "precondition_frequency": 2}
# position -> (parameter index, injected value)
POSITIONS = {"first": (0, math.nan), "middle": (2, math.inf), "last": (4, -math.inf)}


def snapshot(opt: SOAP, params) -> tuple[list[torch.Tensor], bytes]:
    buf = io.BytesIO()
    torch.save(opt.state_dict()["state"], buf)
    return [p.detach().clone() for p in params], buf.getvalue()


def assert_unchanged(before, opt: SOAP, params) -> None:
    params_before, state_before = before
    for a, b in zip(params_before, params):
        assert torch.equal(a, b.detach()), "a parameter changed"
    assert snapshot(opt, params)[1] == state_before, "the optimizer state changed"


def run(opt: SOAP, params, grads_list) -> None:
    for grads in grads_list:
        apply_grads(params, grads)
        opt.step()


def poisoned(grads, index: int, value: float) -> list[torch.Tensor]:
    out = [g.clone() for g in grads]
    flat = out[index].view(-1)
    flat[flat.numel() // 2] = value
    return out


def state_tensors(opt: SOAP):
    for state in opt.state_dict()["state"].values():
        for key, value in state.items():
            for t in value if isinstance(value, list) else [value]:
                if isinstance(t, torch.Tensor):
                    yield key, t


def assert_all_finite(opt: SOAP, params) -> None:
    for i, p in enumerate(params):
        assert torch.isfinite(p).all(), f"parameter {i} is not finite"
    for key, t in state_tensors(opt):
        assert torch.isfinite(t).all(), f"state {key} is not finite"


def q_error(opt: SOAP) -> float:
    worst = 0.0
    for state in opt.state_dict()["state"].values():
        for q in state["Q"]:
            if len(q):
                worst = max(worst, float((q.double().T @ q.double() - torch.eye(q.shape[0])).abs().max()))
    return worst


def bases(opt: SOAP) -> list[torch.Tensor]:
    return [q.clone() for s in opt.state_dict()["state"].values() for q in s["Q"] if len(q)]


def factorisation_warnings(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, RuntimeWarning) and "SOAP:" in str(w.message)]


# ------------------------------------------------------------------------------ non-finite gradients
def _nonfinite_cases(triton_case: tuple[str, int]) -> list:
    """Every position × (first step, later step) on reference and torch; one case on triton (the
    check runs before the backend's code)."""
    cases = [(b, pos, when) for b in SHARED for pos in POSITIONS for when in (0, 3)]
    if TRITON:
        cases.append(("triton", *triton_case))
    return [pytest.param(*c, id=f"{c[0]}-{c[1]}-{'first-step' if c[2] == 0 else 'later-step'}") for c in cases]


@pytest.mark.parametrize("backend,position,when", _nonfinite_cases(("middle", 3)))
def test_nonfinite_gradient_raises_naming_it(backend, position, when):
    params = make_params(SHAPES)
    opt = SOAP(params, backend=backend, **KW)
    grads = list(grad_stream(SHAPES, when + 1))
    run(opt, params, grads[:when])
    index, value = POSITIONS[position]
    apply_grads(params, poisoned(grads[when], index, value))
    before = snapshot(opt, params)
    where = re.escape(f"parameter {index} of param group 0 (shape {SHAPES[index]})")
    with pytest.raises(ValueError, match=f"non-finite gradient for {where}"):
        opt.step()
    assert_unchanged(before, opt, params)


@pytest.mark.parametrize("backend,position,when", _nonfinite_cases(("last", 3)))
def test_nonfinite_gradient_skips_the_whole_step(backend, position, when):
    """A skipped step leaves everything as it was: the run then continues exactly like a run
    that never saw the bad gradient."""
    params = make_params(SHAPES)
    twin = clone_params(params)
    opt = SOAP(params, backend=backend, nonfinite="skip", **KW)
    clean = SOAP(twin, backend=backend, nonfinite="skip", **KW)
    grads = list(grad_stream(SHAPES, when + 4))
    run(opt, params, grads[:when])
    run(clean, twin, grads[:when])
    index, value = POSITIONS[position]
    apply_grads(params, poisoned(grads[when], index, value))
    before = snapshot(opt, params)
    assert opt.step() is None
    assert_unchanged(before, opt, params)
    assert opt.skipped_steps == 1 and opt.state_dict()["skipped_steps"] == 1
    run(opt, params, grads[when:])
    run(clean, twin, grads[when:])
    for a, b in zip(params, twin):
        assert torch.equal(a, b)
    assert snapshot(opt, params)[1] == snapshot(clean, twin)[1]
    assert clean.skipped_steps == 0


def test_nonfinite_names_the_group_and_skips_with_a_closure():
    params = make_params([(4, 4), (3,), (4, 4)])
    groups = [{"params": params[:1]}, {"params": params[1:], "lr": 1e-2}]
    opt = SOAP(groups, backend="torch", precondition_frequency=2)
    run(opt, params, list(grad_stream([(4, 4), (3,), (4, 4)], 3)))
    params[2].grad = torch.full((4, 4), math.inf)
    with pytest.raises(ValueError, match=r"parameter 1 of param group 1 \(shape \(4, 4\)\): 0 NaN and 16 inf"):
        opt.step()
    opt.nonfinite = "skip"
    loss = torch.tensor(math.nan)
    before = snapshot(opt, params)
    assert opt.step(lambda: loss) is loss, "a skipped step still returns the closure's loss"
    assert_unchanged(before, opt, params)
    assert opt.skipped_steps == 1


def test_skip_counter_round_trips_and_a_bad_counter_is_refused():
    params = make_params([(4, 4)])
    opt = SOAP(params, nonfinite="skip")
    for value in (1.0, math.nan, 2.0, math.inf):
        params[0].grad = torch.full((4, 4), value)
        opt.step()
    assert opt.skipped_steps == 2
    other = SOAP(clone_params(params), nonfinite="skip")
    other.load_state_dict(opt.state_dict())
    assert other.skipped_steps == 2


def test_nonfinite_check_is_one_fused_reduction(monkeypatch):
    """One torch._foreach_norm per (device, dtype) of gradients, whatever the parameter count."""
    params = make_params([(4, 4)] * 6 + [(3,)] * 5)
    params += make_params([(5, 2)] * 3, dtype=torch.bfloat16)
    opt = SOAP(params, backend="torch")
    calls = []
    original = torch._foreach_norm

    def counting(tensors, *args, **kwargs):
        calls.append(len(tensors))
        return original(tensors, *args, **kwargs)

    monkeypatch.setattr(torch, "_foreach_norm", counting)
    for grads in grad_stream([tuple(p.shape) for p in params], 3):
        apply_grads(params, grads)
        opt.step()
    assert calls == [11, 3] * 3
    params[0].grad = torch.zeros(0, 4).new_empty(4, 4).fill_(math.nan)
    assert opt._placement.local_nonfinite_flag().item() == 1.0
    empty = torch.nn.Parameter(torch.zeros(0))
    empty.grad = torch.zeros(0)
    assert SOAP([empty])._placement.local_nonfinite_flag().item() == 0.0


def test_nonfinite_decision_is_the_placements():
    """The sharded placement all-reduces the flag: another rank's NaN must stop this one too."""

    class OtherRankFoundNaN(Local):
        def any_nonfinite(self, local_flag: torch.Tensor) -> bool:
            assert local_flag.item() == 0.0
            return True

    def make(**kw):
        opt = SOAP(params, **kw)
        opt._placement = OtherRankFoundNaN()
        opt._placement.bind(opt)
        return opt

    params = make_params([(4, 3)])
    params[0].grad = torch.randn(4, 3)
    with pytest.raises(ValueError, match="another process"):
        make().step()
    opt = make(nonfinite="skip")
    opt.step()
    assert opt.skipped_steps == 1 and not opt.state


def test_nonfinite_ignore_does_not_check():
    params = make_params([(3, 3)])
    opt = SOAP(params, backend="torch", nonfinite="ignore")
    opt._placement.any_nonfinite = None  # would fail if called
    params[0].grad = torch.randn(3, 3)
    opt.step()


@pytest.mark.parametrize("backend", SHARED)
def test_grad_scaler_skips_overflowing_steps_and_soap_cooperates(backend):
    """torch.amp.GradScaler("cpu") unscales, finds the inf and does not call step(): SOAP (default
    nonfinite="raise") sees only finite gradients, and its state is untouched by skipped steps."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    params = list(model.parameters())
    opt = SOAP(params, backend=backend, lr=1e-2, precondition_frequency=3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=3)
    x, y = torch.randn(64, 6), torch.randn(64, 1)
    losses = []
    for it in range(24):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = torch.nn.functional.mse_loss(model(x).float(), y)
        scaler.scale(loss).backward()
        overflow = it in (4, 15)
        if overflow:  # what an fp16 overflow of the scaled gradient looks like
            params[0].grad[0, 0] = math.inf
            before, scale = snapshot(opt, params), scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        if overflow:
            assert_unchanged(before, opt, params)
            assert scaler.get_scale() == scale / 2
        losses.append(loss.item())
    assert opt.skipped_steps == 0
    assert losses[-1] < losses[0]


# ------------------------------------------------------------------------------ factorisation faults
def _raise(*args, **kwargs):
    raise torch.linalg.LinAlgError("injected: the algorithm failed to converge")


def _nan_in_fp32(fn):
    def wrapped(x):
        out = fn(x)
        if x.dtype == torch.float32:
            return tuple(torch.full_like(t, math.nan) for t in out)
        return out
    return wrapped


def _patch_lapack(monkeypatch, name: str, fn) -> None:
    """Replace ``eigh``/``qr`` for the engine (``lapack``) and the reference (its own ``_eigh``/
    ``_qr``: the oracle shares no code with the engine)."""
    monkeypatch.setattr(lapack, name, fn)
    monkeypatch.setattr(reference, f"_{name}", fn)


def _fail_refresh(monkeypatch, how: str) -> None:
    """Make every refresh QR fail (how="raise" or "nan", always) or fail in fp32 only ("nan32")."""
    if how == "nan32":
        _patch_lapack(monkeypatch, "qr", _nan_in_fp32(lapack.qr))
    elif how == "nan":
        _patch_lapack(monkeypatch, "qr", lambda x: tuple(torch.full_like(t, math.nan) for t in torch.linalg.qr(x)))
    else:
        _patch_lapack(monkeypatch, "qr", _raise)
    if TRITON:  # the Triton refresh is a CholeskyQR that only falls back to lapack.qr
        from soap_kernels.triton import refresh as triton_refresh

        original = triton_refresh.cholesky_qr
        if how == "nan32":
            monkeypatch.setattr(triton_refresh, "cholesky_qr", _raise)  # then the engine's fp64 retry
        elif how == "nan":
            monkeypatch.setattr(triton_refresh, "cholesky_qr",
                                lambda a, shift=True: tuple(torch.full_like(t, math.nan) for t in original(a, shift)))
        else:
            monkeypatch.setattr(triton_refresh, "cholesky_qr", _raise)


FACTOR_PARAMS = 3  # parameters of SHAPES with a factor: the two matrices and the 3-D tensor


@pytest.mark.parametrize("backend,how", [(b, h) for b in SHARED for h in ("raise", "nan")]
                         + ([("triton", "nan")] if TRITON else []))
def test_failed_refresh_keeps_the_previous_basis(backend, how, monkeypatch):
    params = make_params(SHAPES)
    opt = SOAP(params, backend=backend, lr=3e-2, precondition_frequency=3)
    grads = list(grad_stream(SHAPES, 9))
    run(opt, params, grads[:3])  # step() calls 1-3: initialised, updates 1 and 2
    q_before = bases(opt)
    _fail_refresh(monkeypatch, how)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        run(opt, params, grads[3:])  # refreshes at updates 3 and 6: all fail
    for a, b in zip(q_before, bases(opt)):
        assert torch.equal(a, b), "a failed refresh must keep the basis exactly"
    messages = factorisation_warnings(record)
    print("\n".join(messages))
    assert len(messages) == FACTOR_PARAMS, "one warning per parameter, not per failure"
    assert all("refresh" in m and "shape" in m for m in messages)
    assert opt.factorization_failures >= 2 * FACTOR_PARAMS
    assert_all_finite(opt, params)


@pytest.mark.parametrize("backend", BACKENDS)
def test_refresh_failing_in_fp32_is_redone_in_fp64(backend, monkeypatch):
    params = make_params(SHAPES)
    twin = clone_params(params)
    opt = SOAP(params, backend=backend, **KW)
    clean = SOAP(twin, backend=backend, **KW)
    grads = list(grad_stream(SHAPES, 6))
    run(clean, twin, grads)
    _fail_refresh(monkeypatch, "nan32")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        run(opt, params, grads)
    assert not factorisation_warnings(record)
    assert opt.factorization_failures == 0
    assert q_error(opt) < 1e-5
    for a, b in zip(params, twin):
        assert report("param", a.detach(), b.detach()) < TOLERANCE[torch.float32]["param"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_failed_initial_eigh_starts_from_the_identity(backend, monkeypatch):
    _patch_lapack(monkeypatch, "eigh", _raise)
    params = make_params(SHAPES)
    opt = SOAP(params, backend=backend, **KW)
    grads = list(grad_stream(SHAPES, 7))
    with pytest.warns(RuntimeWarning, match="eigh") as record:
        run(opt, params, grads[:1])
    assert len(factorisation_warnings(record)) == FACTOR_PARAMS
    for q in bases(opt):
        assert torch.equal(q, torch.eye(q.shape[0]))
    run(opt, params, grads[1:])  # the refreshes (QR) then move away from the identity
    assert_all_finite(opt, params)
    assert q_error(opt) < 1e-5
    assert not any(torch.equal(q, torch.eye(q.shape[0])) for q in bases(opt))


def test_failed_initial_eigh_same_on_reference_and_engine(monkeypatch):
    _patch_lapack(monkeypatch, "eigh", _raise)
    shapes = [(5, 5), (4, 3, 2)]
    params = make_params(shapes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from conftest import run_lockstep

        ref, eng = run_lockstep(params, clone_params(params), shapes, 12, KW)
    assert_lockstep(ref, eng)


@pytest.mark.parametrize("backend", BACKENDS)
def test_eigh_failing_in_fp32_is_redone_in_fp64(backend, monkeypatch):
    shapes = [(5, 5), (6,)]
    params = make_params(shapes)
    twin = clone_params(params)
    clean = SOAP(twin, backend=backend, **KW)
    opt = SOAP(params, backend=backend, **KW)
    grads = list(grad_stream(shapes, 8))
    run(clean, twin, grads)
    _patch_lapack(monkeypatch, "eigh", _nan_in_fp32(lapack.eigh))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        run(opt, params, grads)
    assert not factorisation_warnings(record)
    for a, b in zip(params, twin):
        assert report("param", a.detach(), b.detach()) < TOLERANCE[torch.float32]["param"]


def test_retry_jitter_is_relative_and_only_on_the_retry(monkeypatch):
    """The first eigh sees soap.py's GG + 1e-30·I; the fp64 retry GG + RETRY_JITTER·trace/d·I."""
    gg = torch.diag(torch.tensor([4.0, 2.0, 0.0]))
    seen = []
    real = torch.linalg.eigh

    def spy(x):
        seen.append(x.clone())
        if x.dtype == torch.float32:
            raise torch.linalg.LinAlgError("injected")
        return real(x)

    _patch_lapack(monkeypatch, "eigh", spy)
    q = reference.try_eigenbasis(gg)
    assert torch.equal(seen[0], gg + 1e-30 * torch.eye(3))
    assert seen[1].dtype == torch.float64
    jitter = reference.RETRY_JITTER * 2.0
    assert torch.allclose(seen[1], gg.double() + jitter * torch.eye(3, dtype=torch.float64), rtol=0, atol=1e-18)
    assert torch.allclose(q.abs(), torch.eye(3))
    assert reference.try_eigenbasis(torch.full((3, 3), math.nan)) is None
    assert torch.equal(reference.eigenbasis(torch.full((3, 3), math.nan)), torch.eye(3))


def _poison_statistics(opt: SOAP, p: torch.Tensor) -> None:
    if opt.backend == "reference":
        opt.state[p]["GG"][0][0, 0] = math.nan
    else:
        # The live view of the engine's rotated-frame statistics of the first factor.
        next(b for b in opt.state[p]["GG_eigenbasis"] if len(b))[0, 0] = math.nan


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_statistics_never_reaches_q(backend):
    params = make_params(SHAPES)
    opt = SOAP(params, backend=backend, **KW)
    grads = list(grad_stream(SHAPES, 7))
    run(opt, params, grads[:2])
    _poison_statistics(opt, params[4])
    q_before = [q.clone() for q in opt.state[params[4]]["Q"]]
    with pytest.warns(RuntimeWarning, match=r"parameter 4 of param group 0 \(shape \(6, 5\)\)") as record:
        run(opt, params, grads[2:])  # refreshes at updates 2, 4, 6, each failing for factor 0 of parameter 4
    assert len(factorisation_warnings(record)) == 1
    assert torch.equal(opt.state[params[4]]["Q"][0], q_before[0]), "the poisoned factor keeps its basis"
    assert not torch.equal(opt.state[params[4]]["Q"][1], q_before[1]), "the healthy factor still refreshes"
    for p in params:
        assert torch.isfinite(p).all()
    for state in opt.state_dict()["state"].values():
        for q in state["Q"]:
            assert torch.isfinite(q).all() if len(q) else True
    assert q_error(opt) < 1e-5


REORTHONORMALIZE_STEPS = engine.REORTHONORMALIZE_EVERY + 2  # refreshes 1..9 at f = 1: one re-orthonormalisation


@pytest.mark.parametrize("backend", BACKENDS)
def test_failed_reorthonormalisation_keeps_the_basis(backend, monkeypatch):
    """Re-orthonormalisation (engine only, every REORTHONORMALIZE_EVERY refreshes) failing in fp32
    and fp64 keeps the nearly orthonormal basis as it is."""
    if backend == "reference":
        pytest.skip("the reference recomputes Q by a fresh QR at every refresh; nothing to re-orthonormalise")
    params = make_params([(5, 5)])
    opt = SOAP(params, backend=backend, lr=1e-2, precondition_frequency=1)
    grads = list(grad_stream([(5, 5)], REORTHONORMALIZE_STEPS))
    calls = []

    def failing(q):
        calls.append(1)
        q.fill_(math.nan)

    from soap_kernels import ops

    monkeypatch.setattr(ops, "reorthonormalize_", failing)
    if TRITON:
        from soap_kernels import triton as tk

        monkeypatch.setattr(tk.refresh, "reorthonormalize_", failing)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        run(opt, params, grads)
    assert calls, "re-orthonormalisation was never attempted"
    assert any("re-orthonormalisation" in m for m in factorisation_warnings(record))
    assert_all_finite(opt, params)
    assert q_error(opt) < 1e-5


# ------------------------------------------------------------------------------ zero gradients, spikes
@pytest.mark.parametrize("backend", BACKENDS)
def test_always_zero_gradient_stays_finite(backend):
    """A parameter whose gradient is always zero (alone in its bucket, and sharing one): eigh of
    zeros, QR of zeros and the 0/0 drift stay finite; the parameter only decays."""
    shapes = [(6, 5), (6, 5), (4, 3, 2), (7,)]
    params = make_params(shapes)
    start = [p.detach().clone() for p in params]
    opt = SOAP(params, backend=backend, lr=3e-2, weight_decay=0.1, precondition_frequency=2, precondition_1d=True)
    steps = 7
    for grads in grad_stream(shapes, steps):
        grads[1] = torch.zeros(6, 5)
        grads[2] = torch.zeros(4, 3, 2)
        grads[3] = torch.zeros(7)
        apply_grads(params, grads)
        opt.step()
    assert_all_finite(opt, params)
    assert q_error(opt) < 1e-5
    decay = (1 - 3e-2 * 0.1) ** (steps - 1)
    for i in (1, 2, 3):
        assert torch.allclose(params[i].detach(), start[i] * decay, rtol=1e-5, atol=0)
    if backend != "reference":
        for _, bucket in opt._engine.buckets:
            drift = bucket.drift()
            assert torch.isfinite(drift).all()
        bucket, row = opt._engine.where[params[2]]
        assert (bucket.drift()[:, row] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_large_gradient_spike_is_absorbed(backend):
    """A 1e15× spike at one step (squares up to ~1e32, inside fp32): everything stays finite, no
    factorisation fails, the run goes on."""
    params = make_params(SHAPES)
    opt = SOAP(params, backend=backend, **KW)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for t, grads in enumerate(grad_stream(SHAPES, 8)):
            if t == 3:
                grads = [g * 1e15 for g in grads]
            apply_grads(params, grads)
            opt.step()
    assert not factorisation_warnings(record)
    assert_all_finite(opt, params)
    assert q_error(opt) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_whose_square_overflows_is_refused_or_skipped(backend):
    """A finite spike whose squared norm overflows fp32 (1e20) would make the fp32 statistics
    inf/NaN for good: the check treats it as non-finite (raise: named, nothing changes; skip)."""
    params = make_params(SHAPES)
    opt = SOAP(params, backend=backend, **KW)
    grads = list(grad_stream(SHAPES, 4))
    run(opt, params, grads[:3])
    spike = [g.clone() for g in grads[3]]
    spike[2] = spike[2] * 1e20
    apply_grads(params, spike)
    before = snapshot(opt, params)
    with pytest.raises(ValueError, match=r"gradient too large for parameter 2 of param group 0 \(shape \(4, 3, 2\)\): "
                                         r"its squared norm overflows float32"):
        opt.step()
    assert_unchanged(before, opt, params)
    opt.nonfinite = "skip"
    opt.step()
    assert_unchanged(before, opt, params)
    assert opt.skipped_steps == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_overflowing_spike_unchecked_keeps_params_and_q_finite(backend):
    """The same spike with nonfinite="ignore": the statistics saturate (inf/NaN, as AdamW's second
    moment would), but no parameter and no Q becomes non-finite; every refresh of a saturated
    factor then fails and keeps the basis, and each affected parameter warns once."""
    params = make_params(SHAPES)
    opt = SOAP(params, backend=backend, nonfinite="ignore", **KW)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for t, grads in enumerate(grad_stream(SHAPES, 7)):
            if t == 3:
                grads = [g * 1e20 for g in grads]
            apply_grads(params, grads)
            opt.step()
    assert len(factorisation_warnings(record)) == FACTOR_PARAMS
    for p in params:
        assert torch.isfinite(p).all()
    for state in opt.state_dict()["state"].values():
        for q in state["Q"]:
            assert torch.isfinite(q).all() if len(q) else True
    assert q_error(opt) < 1e-5


# ------------------------------------------------------------------------------ regressions
@pytest.mark.parametrize("backend", BACKENDS[1:])
@pytest.mark.parametrize("shapes,kwargs", [
    ([(2, 3, 2, 2)], {"merge_dims": True, "max_precond_dim": 6}),
    ([(2, 2, 2, 3)], {"merge_dims": True, "max_precond_dim": 6, "data_format": "channels_last"}),
    ([(20, 3, 4), (), ()], {"merge_dims": True, "max_precond_dim": 2, "normalize_grads": True}),
], ids=["merged-to-matrix", "merged-to-matrix-channels-last", "normalize-unpreconditioned"])
def test_merged_and_normalized_layouts_match_reference(backend, shapes, kwargs):
    """Regression: a conv weight that merge_dims turns into a matrix crashed the fused update after
    the moments had moved; normalize_grads was ignored (triton) or taken over the whole bucket (0-D)."""
    from conftest import run_lockstep

    params = make_params(shapes)
    ref, eng = run_lockstep(params, clone_params(params), shapes, 6, {"lr": 3e-2, "precondition_frequency": 2, **kwargs},
                            backends=("reference", backend))
    assert_lockstep(ref, eng)


# ------------------------------------------------------------------------------ bad inputs
def _p():
    return make_params([(3, 3)])


@pytest.mark.parametrize("make,error,match", [
    (lambda: SOAP(None), TypeError, "iterable"),
    (lambda: SOAP("weights"), TypeError, "iterable"),
    (lambda: SOAP(3.0), TypeError, "iterable"),
    (lambda: SOAP([1.0, 2.0]), TypeError, "can only optimize Tensors, but one of the params is float"),  # torch's
    (lambda: SOAP([_p()[0], "bias"]), TypeError, "one of the params is str"),
    (lambda: SOAP([{"lr": 0.1}]), ValueError, "no 'params'"),
    (lambda: SOAP([{"params": "w"}]), TypeError, "one of the params is str"),
    (lambda: SOAP([]), ValueError, "empty"),
    (lambda: SOAP(_p(), lr="0.1"), ValueError, "lr must be a finite real number"),
    (lambda: SOAP(_p(), lr=math.inf), ValueError, "lr must be a finite"),
    (lambda: SOAP(_p(), lr=math.nan), ValueError, "lr must be a finite"),
    (lambda: SOAP(_p(), eps=None), ValueError, "eps"),
    (lambda: SOAP(_p(), weight_decay="0"), ValueError, "weight_decay"),
    (lambda: SOAP(_p(), betas=(0.9, "0.99")), ValueError, "beta parameter at index 1"),
    (lambda: SOAP(_p(), betas=0.9), ValueError, "pair"),
    (lambda: SOAP(_p(), shampoo_beta=math.nan), ValueError, "shampoo_beta"),
    (lambda: SOAP(_p(), precondition_frequency=True), ValueError, "precondition_frequency"),
    (lambda: SOAP(_p(), max_precond_dim=1.5), ValueError, "max_precond_dim"),
    (lambda: SOAP(_p(), normalize_grads=1), ValueError, "normalize_grads"),
    (lambda: SOAP(_p(), nonfinite="warn"), ValueError, "nonfinite"),
    (lambda: SOAP(_p(), backend=None), ValueError, "backend"),
    (lambda: SOAP([torch.randn(3, requires_grad=True) * 2]), ValueError, "non-leaf"),
    (lambda: SOAP([torch.nn.Parameter(torch.randn(2, 2, dtype=torch.complex64))]), ValueError, "complex"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_bad_construction_is_refused(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_bad_param_group_added_later_is_refused_and_not_kept():
    p = make_params([(3, 3), (2, 2), (2, 2)])
    opt = SOAP(p[:1])
    with pytest.raises(TypeError, match="dict"):
        opt.add_param_group(p[1])
    with pytest.raises(ValueError, match="param group 1, parameter 0: SOAP does not support complex"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(2, 2, dtype=torch.complex64))]})
    with pytest.raises(ValueError, match="lr must be a finite"):
        opt.add_param_group({"params": p[1:2], "lr": "fast"})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_parameter_resized_after_its_state_is_refused(backend):
    params = make_params(SHAPES)
    opt = SOAP(params, backend=backend, **KW)
    run(opt, params, list(grad_stream(SHAPES, 3)))
    with torch.no_grad():
        params[2].data = torch.randn(4, 3, 3)
    grads = next(grad_stream([tuple(p.shape) for p in params], 1, seed=7))
    apply_grads(params, grads)
    before = snapshot(opt, params[:2] + params[3:])
    with pytest.raises(ValueError, match=re.escape("parameter 2 of param group 0 (shape (4, 3, 3)) had shape (4, 3, 2)")):
        opt.step()
    assert_unchanged(before, opt, params[:2] + params[3:])


@pytest.mark.parametrize("backend", SHARED)
def test_parameter_resized_before_it_has_state_just_works(backend):
    params = make_params(SHAPES)
    opt = SOAP(params, backend=backend, **KW)
    params[3].grad = None
    grads = list(grad_stream(SHAPES, 3))
    for g in grads:
        g[3] = None
    run(opt, params, grads)
    with torch.no_grad():
        params[3].data = torch.randn(9)
    shapes = [tuple(p.shape) for p in params]
    run(opt, params, list(grad_stream(shapes, 4, seed=3)))
    assert opt.state_dict()["state"][3]["exp_avg"].shape == (9,)
    assert_all_finite(opt, params)


def test_parameter_moved_to_another_device_after_its_state_is_refused():
    """The 'meta' device stands in for a second device here (no GPU needed)."""
    params = make_params([(4, 3), (5,)])
    for backend in ("reference", "torch"):
        opt = SOAP(params, backend=backend, **KW)
        run(opt, params, list(grad_stream([(4, 3), (5,)], 2)))
        before = snapshot(opt, params)
        moved = torch.nn.Parameter(params[0].detach().to("meta"))
        torch.utils.swap_tensors(params[0], moved)  # what module.to(device) does to a parameter
        params[0].grad = torch.zeros(4, 3, device="meta")
        params[1].grad = torch.randn(5)
        with pytest.raises(ValueError, match=r"parameter 0 of param group 0 \(shape \(4, 3\)\) is on meta but its "
                                             r"optimizer state is on cpu"):
            opt.step()
        torch.utils.swap_tensors(params[0], moved)
        params[0].grad = None
        assert_unchanged(before, opt, params)


def test_parameter_cast_after_its_state_continues_like_the_reference():
    """Casting a parameter (model.to(bfloat16)) moves it to a new bucket; the state follows exactly."""
    shapes = [(6, 5), (6, 5), (5,)]
    params = make_params(shapes)
    twin = clone_params(params)
    ref = SOAP(params, backend="reference", **KW)
    eng = SOAP(twin, backend="torch", **KW)
    for t, grads in enumerate(grad_stream(shapes, 9)):
        if t == 4:
            for p in (params[0], twin[0], params[2], twin[2]):
                p.data = p.data.to(torch.bfloat16)
        apply_grads(params, grads)
        apply_grads(twin, grads)
        ref.step()
        eng.step()
    assert twin[0].dtype == torch.bfloat16 and eng.state_dict()["state"][0]["step"] == 8
    assert_lockstep(ref, eng, torch.bfloat16)


def test_device_rules(monkeypatch):
    """Mixed devices: the reference and torch backends run any mix (one bucket per device); compiled
    Triton kernels need CUDA tensors, the interpreter CPU tensors. Checked with device objects."""

    def _device_problem(devices, backend, interpreted):
        monkeypatch.setenv("TRITON_INTERPRET", "1" if interpreted else "0")
        return device_problem(devices, backend)

    cpu, gpu0, gpu1 = torch.device("cpu"), torch.device("cuda", 0), torch.device("cuda", 1)
    for backend in ("reference", "torch"):
        assert _device_problem([cpu, gpu0, gpu1], backend, interpreted=False) is None
    assert _device_problem([gpu0, gpu1], "triton", interpreted=False) is None
    assert "CUDA tensors only" in _device_problem([gpu0, cpu], "triton", interpreted=False)
    assert "CPU tensors only" in _device_problem([cpu, gpu0], "triton", interpreted=True)
    assert _device_problem([cpu], "triton", interpreted=True) is None
    # params_device picks one device for backend="auto", none when they are mixed (auto -> torch).
    a, b = torch.zeros(1), torch.zeros(1, device="meta")
    assert params_device([a, {"params": [a]}]) == cpu
    assert params_device([a, {"params": [b]}]) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: mixes CPU and GPU parameters")
def test_mixed_cpu_and_gpu_parameters():
    params = make_params([(4, 3), (5,)])
    params[1] = torch.nn.Parameter(params[1].detach().cuda())
    opt = SOAP(params, backend="torch", nonfinite="skip")
    for _ in range(4):
        params[0].grad = torch.randn(4, 3)
        params[1].grad = torch.randn(5, device="cuda")
        opt.step()
    params[1].grad[0] = math.nan
    opt.step()
    assert opt.skipped_steps == 1


@pytest.mark.parametrize("backend", SHARED)
def test_closures_returning_anything(backend):
    params = make_params([(4, 3)])
    opt = SOAP(params, backend=backend)
    marker = {"loss": "not a tensor"}

    def closure(value):
        def inner():
            params[0].grad = torch.randn(4, 3)
            return value
        return inner

    assert opt.step(closure(None)) is None
    assert opt.step(closure("a string")) == "a string", "returned unchanged, as torch optimizers do"
    assert opt.step(closure(marker)) is marker
    scheduled = SOAP(params, backend=backend, schedule=LossThreshold(0.1))
    for grads in grad_stream([(4, 3)], 2):
        apply_grads(params, grads)
        scheduled.step(loss=1.0)
    before = snapshot(scheduled, params)
    with pytest.raises(ValueError, match="the loss must be a number"):
        scheduled.step(closure("a string"))
    assert_unchanged(before, scheduled, params)

    def failing():
        raise RuntimeError("the forward pass failed")

    before = snapshot(opt, params)
    with pytest.raises(RuntimeError, match="forward pass"):
        opt.step(failing)
    assert_unchanged(before, opt, params)


def _other_model_state(kwargs=None, shapes=None):
    shapes = shapes or [(5, 6), (5,), (4, 3, 2), (7,), (6, 5)]
    other = make_params(shapes, seed=4)
    opt = SOAP(other, **{**KW, **(kwargs or {})})
    run(opt, other, list(grad_stream(shapes, 3)))
    return opt.state_dict()


def _set(path, value):
    """A function setting ``sd[path...] = value`` and returning ``sd``."""
    def mutate(sd):
        target = sd
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        return sd
    return mutate


@pytest.mark.parametrize("backend", SHARED)
@pytest.mark.parametrize("bad,match", [
    (lambda sd: _other_model_state(), "shape"),
    (lambda sd: _set(("param_groups", 0, "max_precond_dim"), 10000)(_other_model_state({"max_precond_dim": 5}, SHAPES)),
     r"(Q|GG)\[0\] must be a tensor"),
    (lambda sd: _set(("param_groups", 0, "merge_dims"), False)(_other_model_state({"merge_dims": True}, SHAPES)),
     "factors"),
    (lambda sd: _set(("state", 0, "Q", 0), sd["state"][0]["Q"][0] * 2)(sd), "orthonormal"),
    (lambda sd: _set(("state",), [])(sd), "'state' a dict"),
    (lambda sd: _set(("param_groups", 0), [0, 1])(sd), "must be a dict"),
    (lambda sd: _set(("param_groups", 0, "params", 1), 0)(sd), "twice"),
    (lambda sd: _set(("skipped_steps",), -1)(sd), "skipped_steps"),
    (lambda sd: _set(("updates",), "3")(sd), "updates"),
    (lambda sd: _set(("state", 0, "step"), -1)(sd), "step"),
    (lambda sd: _set(("state", 2, "exp_avg"), torch.full((4, 3, 2), math.inf))(sd), "non-finite"),
    (lambda sd: _set(("state", 0, "GG"), "GG")(sd), "factors"),
    (lambda sd: _set(("state", 0), torch.zeros(3))(sd), "expected a dict"),
    (lambda sd: _set(("second_moment",), "adafactor")(sd), "second_moment"),
    (lambda sd: "not a state dict", "not an optimizer state_dict"),
], ids=["other-model", "layout-not-of-its-max-precond-dim", "layout-not-of-its-merge-dims", "q-not-orthonormal", "state-not-dict",
        "group-not-dict", "duplicate-index", "negative-skipped", "updates-not-int", "negative-step",
        "inf-exp-avg", "gg-not-list", "state-entry-not-dict", "other-second-moment", "not-a-dict"])
def test_state_dict_that_does_not_fit_changes_nothing(backend, bad, match):
    params = make_params(SHAPES)
    opt = SOAP(params, backend=backend, **KW)
    run(opt, params, list(grad_stream(SHAPES, 4)))
    before = snapshot(opt, params)
    groups_before = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(bad(opt.state_dict()))
    assert_unchanged(before, opt, params)
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == groups_before


def test_schedule_state_that_does_not_fit_changes_nothing():
    params = make_params([(4, 3)])
    opt = SOAP(params, schedule=Constant(3))
    run(opt, params, list(grad_stream([(4, 3)], 4)))
    sd = opt.state_dict()
    sd["schedule"] = {"bogus": 1}
    sd["param_groups"][0]["lr"] = 0.5
    with pytest.raises(ValueError, match="Constant"):
        opt.load_state_dict(sd)
    assert opt.param_groups[0]["lr"] == 3e-3
    sd["schedule"] = None  # no schedule state: the schedule keeps its own
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["lr"] == 0.5


# ------------------------------------------------------------------------------ soak (CI version)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))


@pytest.fixture
def one_thread():
    """Tiny matrices: one thread (OpenMP on a busy 2-core machine made small ops ~100x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("frequency", [1, 10, 100])
def test_soak(frequency, dtype, one_thread):
    import soak

    steps = {1: 600, 10: 1000, 100: 1000}[frequency]  # ~35 s in all on a busy 2-core machine
    result = soak.run_soak(frequency, dtype, steps, dims=(16, 32, 8), samples=256, check_every=5)
    print({k: v for k, v in result.items() if k != "window_means"})
    print("window means:", [f"{w:.4g}" for w in result["window_means"]])
    assert result["ok"], result["failures"]
    assert result["max_q_error_fro"] < soak.Q_BOUND
    assert result["final_loss"] < 0.5 * result["initial_loss"]
    if frequency == 1:
        assert result["reorthonormalize_calls"] >= steps // engine.REORTHONORMALIZE_EVERY
