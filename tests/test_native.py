"""The native extension soap_kernels._C (csrc/): moment_update and adam_step against the PyTorch math.

The reference is the op sequence the engine runs today (soap_kernels/ops.py ``rotate_in_adam``
without the rotation) and SOAP's reference parameter update, in fp32. Skipped as a whole when the
extension is not built.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Sequence

import pytest
import torch
from torch import Tensor

from soap_kernels import _native

if not _native.available():
    pytest.skip(f"native extension not available: {_native.load_error()}", allow_module_level=True)

# Kernel vs the fp32 PyTorch math, per parameter dtype (one table; state is always fp32).
# fp32: the same formulas with the same roundings; torch's CPU sqrt on large tensors is MKL's, which
# can be one ulp off the correctly rounded sqrt the kernels use, so not bitwise (measured: ≤ 2e-7).
# Where the update cancels most of the parameter the result is small and one ulp of the operands
# (values of order 1) is a large relative error: atol = two ulps at 1 (CI's machine: 4e-9 absolute,
# 4.7e-6 relative on a parameter that came out near 1e-3).
# bf16/fp16: the parameter is rounded once from fp32 math that can differ in its last bit, so a
# result may land one ulp of the low-precision type away (rtol = 2^-(mantissa bits); atol covers
# fp16 subnormals).
TOLERANCE: dict[torch.dtype, dict[str, float]] = {
    torch.float32: {"rtol": 1e-6, "atol": 2.0**-22},
    torch.bfloat16: {"rtol": 2.0**-7, "atol": 0.0},
    torch.float16: {"rtol": 2.0**-10, "atol": 2.0**-24},
}
# The moments do not cancel (lerp and a sum of squares): relative only.
STATE_TOLERANCE = {"rtol": 1e-6, "atol": 0.0}

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
        ],
    ),
]
# Odd and prime sizes, size 1, a size that is not a multiple of any vector width, and one that
# spans several 16 Ki-element chunks with a ragged tail.
SHAPES: list[list[tuple[int, ...]]] = [
    [(1,)],
    [(1, 1, 1)],
    [(7,)],
    [(3, 37, 53)],
    [(2, 129, 257)],
    [(5, 3), (1,), (17, 31), (4, 8, 8)],
]


def report(name: str, actual: Tensor, expected: Tensor) -> None:
    """Print max/mean absolute and max relative error (before any assertion)."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    if a.numel() == 0:
        print(f"{name}: empty")
        return
    diff = (a - e).abs()
    rel = diff / e.abs().clamp_min(1e-30)
    print(f"{name}: max abs {diff.max().item():.3e}  mean abs {diff.mean().item():.3e}  max rel {rel.max().item():.3e}")


def assert_close(name: str, actual: Tensor, expected: Tensor, tol: dict[str, float]) -> None:
    report(name, actual, expected)
    torch.testing.assert_close(actual, expected, rtol=tol["rtol"], atol=tol["atol"], msg=lambda m: f"{name}: {m}")


def reference_moment_update(m: Tensor, v: Tensor, g: Tensor, beta1: float, beta2: float, eps: float) -> Tensor:
    """The engine's math today, in place on m and v (fp32)."""
    m.lerp_(g, 1.0 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    return m / v.sqrt().add_(eps)


def reference_adam_step(
    p: Tensor, g: Tensor, m: Tensor, v: Tensor, step_size: float, beta1: float, beta2: float, eps: float, lr_wd: float
) -> Tensor:
    """SOAP's reference update in fp32 math, decay after the update; returns p in its dtype."""
    direction = reference_moment_update(m, v, g.float(), beta1, beta2, eps)
    p32 = p.float()
    p32.add_(direction, alpha=-step_size)
    if lr_wd != 0.0:
        p32.add_(p32, alpha=-lr_wd)
    return p32.to(p.dtype)


def make_state(shapes: Sequence[tuple[int, ...]], device: str, seed: int, dtype: torch.dtype = torch.float32):
    """Parameters, gradients (dtype) and fp32 moments with realistic magnitudes."""
    gen = torch.Generator().manual_seed(seed)
    params, grads, exp_avgs, exp_avg_sqs = [], [], [], []
    for shape in shapes:
        params.append(torch.randn(shape, generator=gen).to(device=device, dtype=dtype))
        grads.append((1e-2 * torch.randn(shape, generator=gen)).to(device=device, dtype=dtype))
        exp_avgs.append((1e-2 * torch.randn(shape, generator=gen)).to(device))
        exp_avg_sqs.append((1e-4 * torch.rand(shape, generator=gen)).to(device))
    return params, grads, exp_avgs, exp_avg_sqs


def clones(tensors: Sequence[Tensor]) -> list[Tensor]:
    return [t.clone() for t in tensors]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shapes", SHAPES, ids=str)
@pytest.mark.parametrize("beta1", [0.95, 0.3])  # both branches of torch's lerp (weight < or >= 0.5)
def test_moment_update_matches_torch_ops(device: str, shapes: list[tuple[int, ...]], beta1: float) -> None:
    beta2, eps = 0.95, 1e-8
    _, grads, exp_avgs, exp_avg_sqs = make_state(shapes, device, seed=1)
    ref_m, ref_v = clones(exp_avgs), clones(exp_avg_sqs)
    ref_d = [reference_moment_update(m, v, g, beta1, beta2, eps) for m, v, g in zip(ref_m, ref_v, grads)]

    direction = _native.moment_update(exp_avgs, exp_avg_sqs, grads, beta1, beta2, eps)

    assert len(direction) == len(shapes)
    for i in range(len(shapes)):
        assert direction[i].shape == ref_d[i].shape and direction[i].is_contiguous()
        assert_close(f"exp_avg[{i}]", exp_avgs[i], ref_m[i], STATE_TOLERANCE)
        assert_close(f"exp_avg_sq[{i}]", exp_avg_sqs[i], ref_v[i], STATE_TOLERANCE)
        assert_close(f"direction[{i}]", direction[i], ref_d[i], STATE_TOLERANCE)


@pytest.mark.parametrize("device", DEVICES)
def test_moment_update_many_tensors_of_many_sizes(device: str) -> None:
    """More tensors and chunks than one CUDA launch table holds; sizes around the chunk size."""
    gen = torch.Generator().manual_seed(3)
    sizes = [int(s) for s in torch.randint(1, 3000, (45,), generator=gen)] + [16384, 16385, 3 * 16384 + 7, 400_003]
    shapes = [(s,) for s in sizes]
    _, grads, exp_avgs, exp_avg_sqs = make_state(shapes, device, seed=4)
    ref_m, ref_v = clones(exp_avgs), clones(exp_avg_sqs)
    ref_d = [reference_moment_update(m, v, g, 0.9, 0.999, 1e-8) for m, v, g in zip(ref_m, ref_v, grads)]
    direction = _native.moment_update(exp_avgs, exp_avg_sqs, grads, 0.9, 0.999, 1e-8)
    assert_close("exp_avg (all)", torch.cat(exp_avgs), torch.cat(ref_m), STATE_TOLERANCE)
    assert_close("exp_avg_sq (all)", torch.cat(exp_avg_sqs), torch.cat(ref_v), STATE_TOLERANCE)
    assert_close("direction (all)", torch.cat(direction), torch.cat(ref_d), STATE_TOLERANCE)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("step_size_as", ["list", "tensor"])
@pytest.mark.parametrize("beta1", [0.9, 0.3])
def test_adam_step_matches_reference(
    device: str, dtype: torch.dtype, weight_decay: float, step_size_as: str, beta1: float
) -> None:
    shapes = [(3, 37, 53), (1,), (129,), (2, 16385)]
    beta2, eps, lr = 0.95, 1e-8, 3e-3
    # Different step counts per parameter: bias corrections differ, so do the step sizes.
    steps = [1, 7, 100, 3]
    step_sizes = [lr * (1 - beta2**t) ** 0.5 / (1 - beta1**t) for t in steps]
    lr_wd = lr * weight_decay
    params, grads, exp_avgs, exp_avg_sqs = make_state(shapes, device, seed=5, dtype=dtype)
    ref_p, ref_m, ref_v = clones(params), clones(exp_avgs), clones(exp_avg_sqs)
    ref_p = [
        reference_adam_step(p, g, m, v, s, beta1, beta2, eps, lr_wd)
        for p, g, m, v, s in zip(ref_p, grads, ref_m, ref_v, step_sizes)
    ]
    step_size = torch.tensor(step_sizes, dtype=torch.float32, device=device) if step_size_as == "tensor" else step_sizes

    _native.adam_step(params, grads, exp_avgs, exp_avg_sqs, step_size, beta1=beta1, beta2=beta2, eps=eps, lr_weight_decay=lr_wd)

    for i in range(len(shapes)):
        assert params[i].dtype == dtype
        assert_close(f"param[{i}] {dtype}", params[i], ref_p[i], TOLERANCE[dtype])
        assert_close(f"exp_avg[{i}]", exp_avgs[i], ref_m[i], STATE_TOLERANCE)
        assert_close(f"exp_avg_sq[{i}]", exp_avg_sqs[i], ref_v[i], STATE_TOLERANCE)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_adam_step_low_precision_error_within_twice_torch(device: str, dtype: torch.dtype) -> None:
    """Precision rule: against fp64 math, the kernel's parameter error is at most 2x the error of the
    same update run by torch ops on the low-precision parameter (which rounds after each op)."""
    shape = [(64, 257)]
    beta1, beta2, eps, step_size, lr_wd = 0.9, 0.95, 1e-8, 1e-2, 1e-2 * 0.1
    params, grads, exp_avgs, exp_avg_sqs = make_state(shape, device, seed=6, dtype=dtype)
    p0, g0, m0, v0 = params[0].clone(), grads[0].clone(), exp_avgs[0].clone(), exp_avg_sqs[0].clone()

    m64, v64, g64 = m0.double(), v0.double(), g0.double()
    d64 = reference_moment_update(m64, v64, g64, beta1, beta2, eps)
    p64 = p0.double() - step_size * d64
    p64 = p64 - lr_wd * p64

    p_torch = p0.clone()
    d32 = reference_moment_update(m0.clone(), v0.clone(), g0.float(), beta1, beta2, eps)
    p_torch.add_(d32, alpha=-step_size)
    p_torch.add_(p_torch, alpha=-lr_wd)

    _native.adam_step(params, grads, exp_avgs, exp_avg_sqs, [step_size], beta1=beta1, beta2=beta2, eps=eps, lr_weight_decay=lr_wd)
    kernel_err = (params[0].double() - p64).abs().max().item()
    torch_err = (p_torch.double() - p64).abs().max().item()
    print(f"{dtype}: kernel max err {kernel_err:.3e}, torch {dtype} ops max err {torch_err:.3e}")
    assert kernel_err <= 2.0 * torch_err


@pytest.mark.parametrize("device", DEVICES)
def test_adam_step_mixed_dtypes_in_one_call(device: str) -> None:
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float32]
    lists = [make_state([(33, 65)], device, seed=10 + i, dtype=dt) for i, dt in enumerate(dtypes)]
    params, grads, exp_avgs, exp_avg_sqs = ([lst[k][0] for lst in lists] for k in range(4))
    step_sizes = [1e-3, 2e-3, 3e-3, 4e-3]
    ref_p, ref_m, ref_v = clones(params), clones(exp_avgs), clones(exp_avg_sqs)
    ref_p = [
        reference_adam_step(p, g, m, v, s, 0.9, 0.95, 1e-8, 1e-4) for p, g, m, v, s in zip(ref_p, grads, ref_m, ref_v, step_sizes)
    ]
    _native.adam_step(params, grads, exp_avgs, exp_avg_sqs, step_sizes, beta1=0.9, beta2=0.95, eps=1e-8, lr_weight_decay=1e-4)
    for i, dt in enumerate(dtypes):
        assert_close(f"param[{i}] {dt}", params[i], ref_p[i], TOLERANCE[dt])
        assert_close(f"exp_avg_sq[{i}]", exp_avg_sqs[i], ref_v[i], STATE_TOLERANCE)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_lists_and_empty_tensors(device: str) -> None:
    assert _native.moment_update([], [], [], 0.9, 0.95, 1e-8) == []
    _native.adam_step([], [], [], [], [], beta1=0.9, beta2=0.95, eps=1e-8, lr_weight_decay=0.0)
    params, grads, exp_avgs, exp_avg_sqs = make_state([(0, 3), (5,)], device, seed=7)
    ref_m, ref_v = clones(exp_avgs), clones(exp_avg_sqs)
    ref_d = [reference_moment_update(m, v, g, 0.9, 0.95, 1e-8) for m, v, g in zip(ref_m, ref_v, grads)]
    direction = _native.moment_update(exp_avgs, exp_avg_sqs, grads, 0.9, 0.95, 1e-8)
    assert direction[0].shape == (0, 3)
    assert_close("direction[1]", direction[1], ref_d[1], STATE_TOLERANCE)
    _native.adam_step(params, grads, exp_avgs, exp_avg_sqs, [1e-3, 1e-3], beta1=0.9, beta2=0.95, eps=1e-8, lr_weight_decay=0.0)


@pytest.mark.parametrize("device", DEVICES)
def test_moment_update_into_caller_buffer(device: str) -> None:
    _, grads, exp_avgs, exp_avg_sqs = make_state([(9, 11), (3,)], device, seed=13)
    ref_m, ref_v = clones(exp_avgs), clones(exp_avg_sqs)
    ref_d = [reference_moment_update(m, v, g, 0.9, 0.95, 1e-6) for m, v, g in zip(ref_m, ref_v, grads)]
    out = [torch.full_like(m, float("nan")) for m in exp_avgs]
    direction = _native.moment_update(exp_avgs, exp_avg_sqs, grads, 0.9, 0.95, 1e-6, out=out)
    assert all(d is o for d, o in zip(direction, out))
    for i in range(2):
        assert_close(f"direction[{i}]", out[i], ref_d[i], STATE_TOLERANCE)


def test_rejects_non_contiguous_and_mismatched_inputs() -> None:
    _, grads, exp_avgs, exp_avg_sqs = make_state([(8, 6)], "cpu", seed=8)
    with pytest.raises(ValueError, match="not contiguous"):
        _native.moment_update([exp_avgs[0].t().contiguous().t()], exp_avg_sqs, grads, 0.9, 0.95, 1e-8)
    with pytest.raises(ValueError, match="not contiguous"):
        _native.moment_update(exp_avgs, exp_avg_sqs, [torch.randn(16, 6)[::2]], 0.9, 0.95, 1e-8)
    with pytest.raises(ValueError, match="shape"):
        _native.moment_update(exp_avgs, exp_avg_sqs, [torch.randn(6, 8)], 0.9, 0.95, 1e-8)
    with pytest.raises(ValueError, match="one entry per tensor"):
        _native.moment_update(exp_avgs, exp_avg_sqs, [], 0.9, 0.95, 1e-8)
    with pytest.raises(TypeError, match="float32"):
        _native.moment_update(exp_avgs, exp_avg_sqs, [grads[0].double()], 0.9, 0.95, 1e-8)
    with pytest.raises(ValueError, match="overlaps"):
        _native.moment_update(exp_avgs, exp_avg_sqs, grads, 0.9, 0.95, 1e-8, out=exp_avgs)

    params, grads, exp_avgs, exp_avg_sqs = make_state([(8, 6)], "cpu", seed=9, dtype=torch.bfloat16)
    kwargs = {"beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "lr_weight_decay": 0.0}
    with pytest.raises(ValueError, match="not contiguous"):
        _native.adam_step([params[0].t()], [grads[0].t()], exp_avgs, exp_avg_sqs, [1e-3], **kwargs)
    with pytest.raises(TypeError, match="cast the gradient"):
        _native.adam_step(params, [grads[0].float()], exp_avgs, exp_avg_sqs, [1e-3], **kwargs)
    with pytest.raises(TypeError, match="float32"):
        _native.adam_step(params, grads, [exp_avgs[0].bfloat16()], exp_avg_sqs, [1e-3], **kwargs)
    with pytest.raises(ValueError, match="one step size per parameter"):
        _native.adam_step(params, grads, exp_avgs, exp_avg_sqs, [1e-3, 1e-3], **kwargs)
    with pytest.raises(ValueError, match="1-D tensor"):
        _native.adam_step(params, grads, exp_avgs, exp_avg_sqs, torch.ones(2), **kwargs)
    with pytest.raises(TypeError, match="float32"):
        _native.adam_step(params, grads, exp_avgs, exp_avg_sqs, torch.ones(1, dtype=torch.float64), **kwargs)


def _opcheck_args(device: str) -> dict[str, tuple]:
    params, grads, exp_avgs, exp_avg_sqs = make_state([(3, 5), (17,)], device, seed=11)
    hyper = (0.9, 0.95, 1e-8)
    return {
        "moment_update": (exp_avgs, exp_avg_sqs, grads, [torch.empty_like(m) for m in exp_avgs], *hyper),
        "adam_step": (params, grads, exp_avgs, exp_avg_sqs, [1e-3, 2e-3], *hyper, 1e-4),
        "adam_step.tensor": (params, grads, exp_avgs, exp_avg_sqs, torch.tensor([1e-3, 2e-3], device=device), *hyper, 1e-4),
    }


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op_name", ["moment_update", "adam_step", "adam_step.tensor"])
def test_opcheck(device: str, op_name: str) -> None:
    """Schema (declared mutations), fake/meta implementation, and AOT dispatch, as torch checks them."""
    name, _, overload = op_name.partition(".")
    op = getattr(getattr(torch.ops.soap_kernels, name), overload or "default")
    torch.library.opcheck(op, _opcheck_args(device)[op_name])


def test_torch_compile_traces_the_ops() -> None:
    """fullgraph compile (AOT autograd with functionalisation, no codegen) gives the eager result."""

    def step(m: list[Tensor], v: list[Tensor], g: list[Tensor]) -> list[Tensor]:
        return _native.moment_update(m, v, g, 0.9, 0.95, 1e-8)

    _, grads, exp_avgs, exp_avg_sqs = make_state([(4, 9), (31,)], "cpu", seed=12)
    eager_m, eager_v = clones(exp_avgs), clones(exp_avg_sqs)
    eager_d = step(eager_m, eager_v, grads)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    compiled_d = compiled(exp_avgs, exp_avg_sqs, grads)
    for a, b in zip([*compiled_d, *exp_avgs, *exp_avg_sqs], [*eager_d, *eager_m, *eager_v]):
        assert torch.equal(a, b)


_VARIANT_SCRIPT = textwrap.dedent(
    """
    import json, torch
    from soap_kernels import _native
    gen = torch.Generator().manual_seed(0)
    m, v, g = (torch.randn(100_003, generator=gen) * 1e-2 for _ in range(3))
    v = v.abs()
    rm, rv = m.clone(), v.clone()
    rm.lerp_(g, 0.1); rv.mul_(0.95).addcmul_(g, g, value=0.05)
    rd = rm / rv.sqrt().add_(1e-8)
    d = _native.moment_update([m], [v], [g], 0.9, 0.95, 1e-8)[0]
    rel = lambda a, b: ((a - b).abs() / b.abs().clamp_min(1e-30)).max().item()
    print(json.dumps({"variant": _native.cpu_kernel_variant(), "m_equal": torch.equal(m, rm),
                      "v_equal": torch.equal(v, rv), "d_rel": rel(d, rd)}))
    """
)


@pytest.mark.parametrize("capability", ["default", None], ids=["DEFAULT", "native-ISA"])
def test_cpu_kernel_variants_match_torch(capability: str | None) -> None:
    """Each CPU variant follows torch's own instruction-set choice (ATEN_CPU_CAPABILITY), and its
    moments then match torch's ops bit for bit (the same fused multiply-adds)."""
    env = dict(os.environ)
    env.pop("ATEN_CPU_CAPABILITY", None)
    if capability is not None:
        env["ATEN_CPU_CAPABILITY"] = capability
    out = subprocess.run(
        [sys.executable, "-c", _VARIANT_SCRIPT], env=env, capture_output=True, text=True, check=True, timeout=300
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(result)
    if capability == "default":
        assert result["variant"] == "DEFAULT"
    assert result["m_equal"] and result["v_equal"]
    assert result["d_rel"] <= STATE_TOLERANCE["rtol"]


def test_the_torch_table_fast_path_calls_these_ops(table, monkeypatch) -> None:
    """The conformance tables ``torch-native`` and ``torch-plain`` (tests/kernel_tables.py) really differ:
    the first runs this module's ops for fp32 CPU buckets, the second never does."""
    if table.native is None:
        pytest.skip(f"{table.name} is not the torch table")
    from soap_kernels.kernels import step_scalars

    calls = []
    for name in ("moment_update", "adam_step"):
        real = getattr(_native, name)
        monkeypatch.setattr(_native, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    kernels = table.make()
    _, grads, exp_avgs, exp_avg_sqs = make_state([(4, 3)] * 2, "cpu", seed=14)
    exp_avg, exp_avg_sq = torch.stack(exp_avgs), torch.stack(exp_avg_sqs)
    kernels.rotate_in_moments(grads, [None, None], exp_avg, exp_avg_sq, 0.9, 0.95, 1e-8, second_moment="adam",
                              workspace=None)
    params = [torch.zeros(4, 3), torch.zeros(4, 3)]
    scalars = step_scalars(torch.ones(2), [1, 1], 1e-3, (0.9, 0.95), 0.0, True)
    kernels.adam_step(params, grads, exp_avg, exp_avg_sq, scalars, 0.9, 0.95, 1e-8, second_moment="adam",
                      normalize=False, views=params, from_work=lambda x: x)
    assert calls == (["moment_update", "adam_step"] if table.native else [])
