"""The plain-Adam op of every kernel table (conformance, against fp64 math), then the Triton
multi-tensor Adam (soap_kernels.triton.adam) against SOAP's Adam written in torch."""

import os

import torch

if not torch.cuda.is_available():  # must precede the first import of triton
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from tables import TOLERANCE_PARAM as TABLE_TOL_PARAM  # noqa: E402
from tables import check as table_check  # noqa: E402

from soap_kernels.kernels import step_scalars  # noqa: E402


# ---------------------------------------------------------------------------------- conformance
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("decay", [0.0, 0.1], ids=["no-wd", "wd"])
def test_table_adam_step(table, dtype, decay):
    """``adam_step`` of an un-preconditioned bucket (3 rows of 6 x 5, steps 3, 4, 5): moments and
    parameters against fp64 math, the parameter rounded once to its dtype. Tolerances: fp32 state
    to 1e-6 (one rounding per op); parameters as ``tables.TOLERANCE_PARAM`` (one rounding of the
    stored dtype)."""
    ok, why = table.takes((6, 5), preconditioned=(False, False))
    if not ok:
        pytest.skip(why)
    gen = torch.Generator().manual_seed(3)
    dev, rows, shape = table.device, 3, (6, 5)
    params = [torch.randn(shape, generator=gen).to(dev, dtype) for _ in range(rows)]
    grads = [torch.randn(shape, generator=gen).to(dev, dtype) for _ in range(rows)]
    exp_avg = torch.randn(rows, *shape, generator=gen).to(dev)
    exp_avg_sq = (torch.rand(rows, *shape, generator=gen) + 0.05).to(dev)
    lr, betas, eps, steps = 1e-2, (0.9, 0.95), 1e-8, [3, 4, 5]
    want_m = betas[0] * exp_avg.double() + (1 - betas[0]) * torch.stack([g.double() for g in grads])
    want_v = betas[1] * exp_avg_sq.double() + (1 - betas[1]) * torch.stack([g.double() ** 2 for g in grads])
    sizes = [lr * (1 - betas[1] ** t) ** 0.5 / (1 - betas[0] ** t) for t in steps]
    want_p = [((p.double() - sizes[r] * want_m[r] / (want_v[r].sqrt() + eps)) * (1 - lr * decay))
              for r, p in enumerate(params)]
    scalars = step_scalars(torch.tensor(steps, dtype=torch.float32, device=dev), steps, lr, betas, decay, True)
    table.make().adam_step(params, grads, exp_avg, exp_avg_sq, scalars, *betas, eps, second_moment="adam",
                           normalize=False, views=params, from_work=lambda t: t)
    table_check("exp_avg", exp_avg, want_m, 1e-6, 1e-6)
    table_check("exp_avg_sq", exp_avg_sq, want_v, 1e-6, 1e-6)
    for r, p in enumerate(params):
        table_check(f"param {r} {dtype}", p, want_p[r].to(dtype), *TABLE_TOL_PARAM[dtype])


# ---------------------------------------------------------------------------------- Triton internals
try:
    from soap_kernels.triton import available

    TRITON = available()
except ImportError as err:  # triton not installed
    TRITON = (False, str(err))
triton_only = pytest.mark.skipif(not TRITON[0], reason=f"Triton unavailable: {TRITON[1]}")
if TRITON[0]:
    from soap_kernels.triton.adam import adam_step

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
gpu_only = pytest.mark.skipif(not CUDA, reason="needs a CUDA device (large tensors)")

# (atol, rtol) per parameter dtype against the fp32 torch reference rounded once to the dtype;
# state is fp32 in every case.
TOL_PARAM = {torch.float32: (1e-6, 1e-6), torch.bfloat16: (1e-2, 8e-3), torch.float16: (1e-3, 1e-3)}
TOL_STATE = (1e-6, 1e-6)

# Odd sizes, several chunks (300 > the interpreter's 128-element chunk), size 1, and an empty tensor.
SHAPES = [(5, 7), (300,), (1,), (13, 1), (1, 9), (0,)]


def check(name: str, got: torch.Tensor, want: torch.Tensor, atol: float, rtol: float) -> None:
    got, want = got.double().cpu(), want.double().cpu()
    if got.numel() == 0:
        assert want.numel() == 0
        return
    err = (got - want).abs()
    print(f"{name}: max {err.max().item():.3e}  mean {err.mean().item():.3e}  (atol {atol:g}, rtol {rtol:g})")
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol)


def reference_step(p, g, m, v, step_size, beta1, beta2, eps, decay):
    """SOAP's Adam for an un-preconditioned parameter (fp32 math), in place on fp32 copies."""
    m.lerp_(g.float(), 1 - beta1)
    v.mul_(beta2).addcmul_(g.float(), g.float(), value=1 - beta2)
    p.add_(m / (v.sqrt() + eps), alpha=-step_size)
    p.mul_(decay)


def make_state(shapes, dtype, gen, grad_dtype=None):
    params = [torch.randn(s, generator=gen).to(DEVICE, dtype) for s in shapes]
    grads = [torch.randn(s, generator=gen).to(DEVICE, grad_dtype or dtype) for s in shapes]
    exp_avgs = [torch.randn(s, generator=gen).to(DEVICE) for s in shapes]
    exp_avg_sqs = [(torch.rand(s, generator=gen) + 0.05).to(DEVICE) for s in shapes]
    return params, grads, exp_avgs, exp_avg_sqs


def run_and_compare(params, grads, exp_avgs, exp_avg_sqs, step_sizes, beta1, beta2, eps, decay, steps=1):
    ref_p = [p.float().clone() for p in params]
    ref_m = [m.clone() for m in exp_avgs]
    ref_v = [v.clone() for v in exp_avg_sqs]
    sizes = step_sizes.tolist() if isinstance(step_sizes, torch.Tensor) else step_sizes
    if isinstance(sizes, float):
        sizes = [sizes] * len(params)
    for _ in range(steps):
        for i in range(len(params)):
            reference_step(ref_p[i], grads[i], ref_m[i], ref_v[i], sizes[i], beta1, beta2, eps, decay)
            ref_p[i] = ref_p[i].to(params[i].dtype).float()  # the stored parameter is rounded each step
        adam_step(params, grads, exp_avgs, exp_avg_sqs, step_sizes, beta1, beta2, eps, decay)
    for i, p in enumerate(params):
        check(f"param {i} {tuple(p.shape)} {p.dtype}", p, ref_p[i], *TOL_PARAM[p.dtype])
        check(f"exp_avg {i}", exp_avgs[i], ref_m[i], *TOL_STATE)
        check(f"exp_avg_sq {i}", exp_avg_sqs[i], ref_v[i], *TOL_STATE)


@triton_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_adam_step_matches_torch(dtype):
    gen = torch.Generator().manual_seed(0)
    state = make_state(SHAPES, dtype, gen)
    step_sizes = torch.linspace(0.01, 0.3, len(SHAPES), device=DEVICE)  # a different step per tensor
    run_and_compare(*state, step_sizes, 0.9, 0.95, 1e-8, 0.9)


@triton_only
def test_adam_step_several_steps_fp32():
    gen = torch.Generator().manual_seed(1)
    state = make_state(SHAPES, torch.float32, gen)
    run_and_compare(*state, [0.1, 0.2, 0.05, 0.3, 0.01, 0.1], 0.95, 0.95, 1e-8, 0.99, steps=3)


@triton_only
def test_adam_step_mixed_dtypes_and_fp32_grads():
    """bf16 and fp32 params in one call (one launch per dtype pair), fp32 grads for bf16 params."""
    gen = torch.Generator().manual_seed(2)
    a = make_state([(5, 7), (300,)], torch.bfloat16, gen, grad_dtype=torch.float32)
    b = make_state([(13, 1), (1,)], torch.float32, gen)
    c = make_state([(9,)], torch.float16, gen)
    state = [x + y + z for x, y, z in zip(a, b, c)]
    run_and_compare(*state, 0.1, 0.3, 0.6, 1e-3, 1.0)  # 1-β1 >= 0.5: torch.lerp's other branch


@triton_only
def test_adam_step_pointer_tables_follow_new_tensors():
    """Same shapes, new allocations: the cached tables must not point at the old tensors."""
    gen = torch.Generator().manual_seed(3)
    for _ in range(2):
        state = make_state([(5, 7), (300,)], torch.float32, gen)
        run_and_compare(*state, 0.1, 0.9, 0.95, 1e-8, 0.95)


@triton_only
def test_validation_messages():
    p = [torch.zeros(3, device=DEVICE)]
    with pytest.raises(ValueError, match="equal lengths"):
        adam_step(p, [], p, p, 0.1, 0.9, 0.9, 1e-8, 1.0)
    with pytest.raises(ValueError, match=r"grads\[0\] must have shape"):
        adam_step(p, [torch.zeros(4, device=DEVICE)], p, p, 0.1, 0.9, 0.9, 1e-8, 1.0)
    with pytest.raises(TypeError, match=r"exp_avgs\[0\] must have dtype"):
        adam_step(p, p, [torch.zeros(3, device=DEVICE, dtype=torch.bfloat16)], p, 0.1, 0.9, 0.9, 1e-8, 1.0)
    with pytest.raises(ValueError, match=r"params\[0\] must be contiguous"):
        adam_step([torch.zeros(3, 2, device=DEVICE).mT], [torch.zeros(2, 3, device=DEVICE)], [torch.zeros(2, 3, device=DEVICE)],
                  [torch.zeros(2, 3, device=DEVICE)], 0.1, 0.9, 0.9, 1e-8, 1.0)  # fmt: skip
    with pytest.raises(ValueError, match="step_sizes must have shape"):
        adam_step(p, p, p, p, torch.ones(2, device=DEVICE), 0.9, 0.9, 1e-8, 1.0)


@gpu_only
@triton_only
def test_gpu_large_mixed():
    gen = torch.Generator().manual_seed(4)
    shapes = [(768,), (3072,), (50257 * 3,), (768, 768), (1,)]
    state = make_state(shapes, torch.bfloat16, gen)
    run_and_compare(*state, torch.full((len(shapes),), 3e-3, device=DEVICE), 0.95, 0.95, 1e-8, 1 - 3e-3 * 0.01)
