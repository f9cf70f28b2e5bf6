"""Triton rotations (soap_kernels.triton.rotate) against soap_kernels.ops and plain math."""

import os

import torch

if not torch.cuda.is_available():  # must precede the first import of triton
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from soap_kernels import ops  # noqa: E402

pytest.importorskip("triton")
from soap_kernels.triton import available  # noqa: E402

if not available()[0]:
    pytest.skip(available()[1], allow_module_level=True)

from soap_kernels.triton.rotate import rotate_back, rotate_back_update, rotate_in, rotate_in_adam  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
gpu_only = pytest.mark.skipif(not CUDA, reason="needs a CUDA device (large shapes, tf32/bf16 tensor-core modes)")

# (atol, rtol) of the fp32 kernels against the torch ops (both fp32 math, different summation order).
TOL_FP32 = (2e-5, 2e-5)
# Parameter write, per parameter dtype: fp32 math, one rounding to the dtype (vs. torch's fp32 result
# rounded once); one ulp of the dtype plus the fp32 GEMM's rounding.
TOL_PARAM = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (1e-2, 8e-3), torch.float16: (1e-3, 1e-3)}
# Low-precision rotation modes (GPU only), flash-attention's rule: the kernel's error against fp64
# must stay within FACTOR x the error of torch's matmul in the same precision, plus a floor.
# tf32 gets 4x: Triton's tf32 dot feeds fp32 bits to the tensor cores, which truncate them to 10
# mantissa bits (see mma_tile), while cuBLAS may round to nearest; emulated at this test's shape,
# truncation's max error was 7.6e-3 against 2.2e-3 for rounding to nearest (3.5x).
LOW_PRECISION_FACTOR = 2.0
LOW_PRECISION_FACTOR_BY_MODE = {"tf32": 4.0, "bf16": LOW_PRECISION_FACTOR}
LOW_PRECISION_FLOOR = {"tf32": 1e-4, "bf16": 1e-3}

SHAPES = [(3, 5, 7), (1, 5, 7), (3, 1, 9), (1, 13, 1), (2, 37, 20)]  # (B, m, n); 37x20: several tiles
SIDES = ["both", "left", "right", "none"]


def check(name: str, got: torch.Tensor, want: torch.Tensor, atol: float, rtol: float) -> None:
    got, want = got.double().cpu(), want.double().cpu()
    err = (got - want).abs()
    print(f"{name}: max {err.max().item():.3e}  mean {err.mean().item():.3e}  (atol {atol:g}, rtol {rtol:g})")
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol)


def orthonormal(b: int, d: int, gen: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(b, d, d, generator=gen, dtype=torch.float64))
    return q.float().to(DEVICE)


def make_qs(b: int, m: int, n: int, sides: str, gen: torch.Generator):
    q_left = orthonormal(b, m, gen) if sides in ("both", "left") else None
    q_right = orthonormal(b, n, gen) if sides in ("both", "right") else None
    return [q_left, q_right]


def randn(*shape, gen, scale=1.0, offset=0.0):
    return (torch.randn(*shape, generator=gen) * scale + offset).to(DEVICE)


@pytest.mark.parametrize("sides", SIDES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_rotate_in_adam_matches_ops(shape, sides):
    b, m, n = shape
    gen = torch.Generator().manual_seed(m * 100 + n)
    grad = randn(b, m, n, gen=gen)
    qs = make_qs(b, m, n, sides, gen)
    exp_avg = randn(b, m, n, gen=gen)
    exp_avg_sq = randn(b, m, n, gen=gen).abs() + 0.1
    ref_m, ref_v = exp_avg.clone(), exp_avg_sq.clone()
    want_rot, want_dir = ops.rotate_in_adam(grad, qs, ref_m, ref_v, 0.9, 0.95, 1e-8)
    got_rot, got_dir = rotate_in_adam(grad, qs, exp_avg, exp_avg_sq, 0.9, 0.95, 1e-8)
    check("rotated", got_rot, want_rot, *TOL_FP32)
    check("exp_avg", exp_avg, ref_m, *TOL_FP32)
    check("exp_avg_sq", exp_avg_sq, ref_v, *TOL_FP32)
    check("direction", got_dir, want_dir, *TOL_FP32)


def test_rotate_in_adam_plain_math_and_large_beta1_weight():
    """Against the formula written out (fp64), with 1-β1 >= 0.5 (the other branch of torch.lerp)."""
    gen = torch.Generator().manual_seed(7)
    b, m, n = 2, 6, 3
    grad = randn(b, m, n, gen=gen)
    qs = make_qs(b, m, n, "both", gen)
    exp_avg, exp_avg_sq = randn(b, m, n, gen=gen), randn(b, m, n, gen=gen).abs() + 0.1
    beta1, beta2, eps = 0.3, 0.6, 1e-3
    g64 = qs[0].double().mT @ grad.double() @ qs[1].double()
    m64 = beta1 * exp_avg.double() + (1 - beta1) * g64
    v64 = beta2 * exp_avg_sq.double() + (1 - beta2) * g64**2
    rot, direction = rotate_in_adam(grad, qs, exp_avg, exp_avg_sq, beta1, beta2, eps)
    check("rotated", rot, g64, *TOL_FP32)
    check("exp_avg", exp_avg, m64, *TOL_FP32)
    check("exp_avg_sq", exp_avg_sq, v64, *TOL_FP32)
    check("direction", direction, m64 / (v64.sqrt() + eps), *TOL_FP32)


@pytest.mark.parametrize("sides", SIDES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_rotate_back_and_rotate_in_match_ops(shape, sides):
    b, m, n = shape
    gen = torch.Generator().manual_seed(m * 10 + n)
    x = randn(b, m, n, gen=gen)
    qs = make_qs(b, m, n, sides, gen)
    check("rotate_back", rotate_back(x, qs), ops.rotate_back(x, qs), *TOL_FP32)
    check("rotate_in", rotate_in(x, qs), ops.rotate(x, qs), *TOL_FP32)


def _reference_update(p, direction, qs, step_size, decay):
    update = ops.rotate_back(direction, qs).double()
    return ((p.double() - step_size.double()[:, None, None] * update) * decay).to(p.dtype)


@pytest.mark.parametrize("sides", SIDES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_rotate_back_update_stacked_fp32(shape, sides):
    b, m, n = shape
    gen = torch.Generator().manual_seed(m + n)
    direction = randn(b, m, n, gen=gen)
    qs = make_qs(b, m, n, sides, gen)
    params = randn(b, m, n, gen=gen)
    step_size = (torch.rand(b, generator=gen) * 0.5 + 0.1).to(DEVICE)  # a different step per row
    want = _reference_update(params, direction, qs, step_size, 0.9)
    rotate_back_update(direction, qs, params, step_size, 0.9)
    check("params", params, want, *TOL_PARAM[torch.float32])


@pytest.mark.parametrize("form", ["list", "stacked", "strided"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_rotate_back_update_param_dtypes_and_forms(dtype, form):
    gen = torch.Generator().manual_seed(3)
    b, m, n = 3, 13, 6
    direction = randn(b, m, n, gen=gen)
    qs = make_qs(b, m, n, "both", gen)
    start = randn(b, m, n, gen=gen).to(dtype)
    step_size = torch.tensor([0.05, 0.2, 0.5], device=DEVICE)
    want = _reference_update(start, direction, qs, step_size, 0.95)
    if form == "list":  # separate allocations, through the pointer table
        params = [start[i].clone() for i in range(b)]
        rotate_back_update(direction, qs, params, step_size, 0.95)
        got = torch.stack(params)
    elif form == "stacked":
        got = start.clone()
        rotate_back_update(direction, qs, got, step_size, 0.95)
    else:  # a non-contiguous [B, m, n] view into one column-major buffer
        buffer = start.mT.contiguous()
        got = buffer.mT
        assert not got.is_contiguous()
        rotate_back_update(direction, qs, got, step_size, 0.95)
    assert got.dtype == dtype
    check(f"params {dtype} {form}", got, want, *TOL_PARAM[dtype])


def test_rotate_back_update_changing_runtime_values():
    gen = torch.Generator().manual_seed(5)
    b, m, n = 1, 5, 7
    direction = randn(b, m, n, gen=gen)
    qs = make_qs(b, m, n, "both", gen)
    for decay, step in [(1.0, 0.1), (0.99, 0.3)]:  # different runtime values, same results as torch
        params = randn(b, m, n, gen=gen)
        step_size = torch.full((b,), step, device=DEVICE)
        want = _reference_update(params, direction, qs, step_size, decay)
        rotate_back_update(direction, qs, params, step_size, decay)
        check(f"params decay={decay}", params, want, *TOL_PARAM[torch.float32])


def test_validation_messages():
    gen = torch.Generator().manual_seed(0)
    b, m, n = 2, 4, 3
    grad = randn(b, m, n, gen=gen)
    qs = make_qs(b, m, n, "both", gen)
    state = [torch.zeros(b, m, n, device=DEVICE) for _ in range(2)]
    with pytest.raises(ValueError, match="q_left must have shape"):
        rotate_in_adam(grad, [qs[1], None], *state, 0.9, 0.9, 1e-8)
    with pytest.raises(TypeError, match="grad must have dtype"):
        rotate_in_adam(grad.double(), qs, *state, 0.9, 0.9, 1e-8)
    with pytest.raises(ValueError, match="grad must be contiguous"):
        rotate_in_adam(grad.mT.contiguous().mT, qs, *state, 0.9, 0.9, 1e-8)
    with pytest.raises(ValueError, match="exp_avg_sq must have shape"):
        rotate_in_adam(grad, qs, state[0], state[1][:1], 0.9, 0.9, 1e-8)
    with pytest.raises(ValueError, match="bucket of matrices"):
        rotate_back(grad[0], qs)
    with pytest.raises(ValueError, match="precision"):
        rotate_back(grad, qs, precision="fp8")
    with pytest.raises(ValueError, match="expected 2 tensors"):
        rotate_back_update(grad, qs, [grad[0].clone()], torch.ones(b, device=DEVICE), 1.0)
    with pytest.raises(TypeError, match="one dtype"):
        rotate_back_update(grad, qs, [grad[0].clone(), grad[1].half()], torch.ones(b, device=DEVICE), 1.0)
    with pytest.raises(ValueError, match="step_size must have shape"):
        rotate_back_update(grad, qs, grad.clone(), torch.ones(b + 1, device=DEVICE), 1.0)


# ------------------------------------------------------------------------------------------------
# tf32 / bf16 rotation modes, every lane (the interpreter emulates the tensor cores' input rounding)
# ------------------------------------------------------------------------------------------------


def truncate_tf32(x: torch.Tensor) -> torch.Tensor:
    """fp32 with the low 13 mantissa bits cleared (tf32 by truncation, what the tensor cores do to
    fp32 operands; see ``round_mantissa`` in soap_kernels/triton/_common.py). NaN passes through."""
    bits = x.float().view(torch.int32) & ~0x1FFF
    return torch.where(torch.isnan(x), x, bits.view(torch.float32))


ROUND_INPUT = {"tf32": truncate_tf32, "bf16": lambda x: x.float().bfloat16().float()}

# Normwise distance of the kernels from the torch emulation, relative to |exact|. Interpreter: the
# same reduced operands and exact products, only the fp32 summation order differs (measured
# <= 7.4e-8, both modes). GPU (not yet measured): bf16 allows a one-ulp flip of the bf16
# intermediate where fp32 sums straddle a rounding boundary; tf32 allows hardware that rounds the
# operands instead of truncating them (distance measured on the interpreter between the two: <= 1.4e-3).
LOW_PRECISION_MATCH = {"tf32": 1e-6, "bf16": 1e-6} if not CUDA else {"tf32": 3e-3, "bf16": 1e-3}
LOW_PRECISION_SHAPES = [(3, 5, 7), (2, 19, 11)]  # (B, m, n): odd sizes; 19 spans two tiles and two K blocks


def emulated_rotate(x: torch.Tensor, qs, precision: str, back: bool) -> torch.Tensor:
    """The kernels' arithmetic in torch: every GEMM operand reduced to the mode's input format,
    exact products, sums in fp64 rounded to fp32; the two-sided intermediate ``x Q_R`` is stored
    in bf16 in bf16 mode (as rotate.py does)."""
    rnd = ROUND_INPUT[precision]
    q_left, q_right = qs
    if q_right is not None:
        x = (rnd(x).double() @ rnd(q_right.mT if back else q_right).double()).float()
        if precision == "bf16" and q_left is not None:
            x = rnd(x)
    if q_left is not None:
        x = (rnd(q_left if back else q_left.mT).double() @ rnd(x).double()).float()
    return x


@pytest.mark.parametrize("sides", ["both", "left", "right"])
@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_low_precision_modes_match_emulation(precision, sides):
    """rotate_in, rotate_back, rotate_in_adam's rotation and rotate_back_update's update in
    tf32/bf16 mode equal the torch emulation of the mode (tightly, on the interpreter) and differ
    from the exact product by what the mode's rounding predicts: an unrounded (fp32) result is
    ~1e4 times closer to the exact one and fails."""
    for shape in LOW_PRECISION_SHAPES:
        b, m, n = shape
        gen = torch.Generator().manual_seed(m * 31 + n)
        x = randn(b, m, n, gen=gen)
        qs = make_qs(b, m, n, sides, gen)
        zeros = torch.zeros(b, m, n, device=DEVICE)
        rotated, _ = rotate_in_adam(x, qs, zeros.clone(), zeros.clone(), 0.9, 0.95, 1e-8, precision=precision)
        update = zeros.clone()  # p <- (0 - 1 * U) * 1 = -U, exactly
        rotate_back_update(x, qs, update, torch.ones(b, device=DEVICE), 1.0, precision=precision)
        outputs = {
            "rotate_in": (rotate_in(x, qs, precision=precision), False),
            "rotate_back": (rotate_back(x, qs, precision=precision), True),
            "rotate_in_adam": (rotated, False),
            "rotate_back_update": (-update, True),
        }
        for name, (got, back) in outputs.items():
            exact = ops.rotate(x.double(), [q.double() if q is not None else None for q in qs], back=back).cpu()
            want = emulated_rotate(x, qs, precision, back).double().cpu()
            got = got.double().cpu()
            scale = exact.norm().item()
            err_mode = (want - exact).norm().item() / scale  # what the mode's rounding costs
            err_kernel = (got - exact).norm().item() / scale
            dist = (got - want).norm().item() / scale
            print(
                f"{precision} {sides} {shape} {name}: |kernel-emulation| {dist:.2e}  "
                f"|kernel-exact| {err_kernel:.2e}  |emulation-exact| {err_mode:.2e}"
            )
            assert dist <= LOW_PRECISION_MATCH[precision]
            assert 0.1 * err_mode <= err_kernel <= LOW_PRECISION_FACTOR * err_mode


# ------------------------------------------------------------------------------------------------
# GPU only: realistic shapes and the tensor-core precision modes
# ------------------------------------------------------------------------------------------------


@gpu_only
@pytest.mark.parametrize("sides", ["both", "left", "right"])
@pytest.mark.parametrize("shape", [(4, 256, 384), (2, 768, 96), (1, 200, 768)], ids=lambda s: "x".join(map(str, s)))
def test_gpu_large_fp32(shape, sides):
    b, m, n = shape
    gen = torch.Generator().manual_seed(11)
    grad = randn(b, m, n, gen=gen)
    qs = make_qs(b, m, n, sides, gen)
    exp_avg, exp_avg_sq = randn(b, m, n, gen=gen), randn(b, m, n, gen=gen).abs() + 0.1
    ref_m, ref_v = exp_avg.clone(), exp_avg_sq.clone()
    torch.backends.cuda.matmul.allow_tf32 = False
    want_rot, want_dir = ops.rotate_in_adam(grad, qs, ref_m, ref_v, 0.95, 0.95, 1e-8)
    got_rot, got_dir = rotate_in_adam(grad, qs, exp_avg, exp_avg_sq, 0.95, 0.95, 1e-8)
    check("rotated", got_rot, want_rot, 1e-4, 1e-4)
    check("direction", got_dir, want_dir, 1e-4, 1e-4)
    params = randn(b, m, n, gen=gen).bfloat16()
    step_size = torch.full((b,), 0.01, device=DEVICE)
    want_p = _reference_update(params, got_dir, qs, step_size, 0.999)
    rotate_back_update(got_dir, qs, params, step_size, 0.999)
    check("params bf16", params, want_p, *TOL_PARAM[torch.bfloat16])


def _torch_low_precision_rotate(x, qs, precision, back):
    if precision == "tf32":
        old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        try:
            return ops.rotate(x, qs, back=back)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = old
    low = [q.bfloat16() if q is not None else None for q in qs]
    return ops.rotate(x.bfloat16(), low, back=back).float()


@gpu_only
@pytest.mark.parametrize("precision", ["tf32", "bf16"])
@pytest.mark.parametrize("back", [False, True])
def test_gpu_low_precision_modes(precision, back):
    gen = torch.Generator().manual_seed(13)
    b, m, n = 2, 384, 512
    x = randn(b, m, n, gen=gen)
    qs = make_qs(b, m, n, "both", gen)
    exact = ops.rotate(x.double(), [q.double() for q in qs], back=back)
    got = rotate_back(x, qs, precision=precision) if back else rotate_in(x, qs, precision=precision)
    baseline = _torch_low_precision_rotate(x, qs, precision, back)
    err_kernel = (got.double() - exact).abs().max().item()
    err_torch = (baseline.double() - exact).abs().max().item()
    print(f"{precision} back={back}: kernel max err {err_kernel:.3e}, torch {precision} max err {err_torch:.3e}")
    assert err_kernel <= LOW_PRECISION_FACTOR_BY_MODE[precision] * err_torch + LOW_PRECISION_FLOOR[precision]
