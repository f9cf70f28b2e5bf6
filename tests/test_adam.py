"""The plain-Adam op of every kernel table (conformance, against fp64 math), then the Triton
multi-tensor Adam (soap_kernels.triton.adam) against SOAP's Adam written in torch."""

import os

import torch

if not torch.cuda.is_available():  # must precede the first import of triton
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from kernel_tables import TOLERANCE_PARAM as TABLE_TOL_PARAM  # noqa: E402
from kernel_tables import check as table_check  # noqa: E402

from soap_kernels.kernels import step_scalars  # noqa: E402


# ---------------------------------------------------------------------------------- conformance
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("decay", [0.0, 0.1], ids=["no-wd", "wd"])
def test_table_adam_step(table, dtype, decay):
    """``adam_step`` of an un-preconditioned bucket (3 rows of 6 x 5, steps 3, 4, 5): moments and
    parameters against fp64 math, the parameter rounded once to its dtype. Tolerances: fp32 state
    to 1e-6 (one rounding per op); parameters as ``kernel_tables.TOLERANCE_PARAM`` (one rounding of the
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



def adam64(params, grads, exp_avg, exp_avg_sq, sizes, beta1, beta2, eps, decay, normalize=False):
    """One step of SOAP's Adam in fp64: ``(moments, parameters rounded to their dtype)``."""
    g = torch.stack([x.double() for x in grads])
    m = beta1 * exp_avg.double() + (1 - beta1) * g
    v = beta2 * exp_avg_sq.double() + (1 - beta2) * g**2
    d = m / (v.sqrt() + eps)
    if normalize:  # per row, over the row's elements
        rms = d.reshape(d.shape[0], -1).square().mean(dim=1).sqrt()
        d = d / (rms + 1e-30).view(-1, *(1,) * (d.dim() - 1))
    p = [((x.double() - s * d[r]) * decay).to(x.dtype) for r, (x, s) in enumerate(zip(params, sizes))]
    return m, v, p


def sizes64(steps, lr, betas):
    return [lr * (1 - betas[1] ** t) ** 0.5 / (1 - betas[0] ** t) for t in steps]


@pytest.mark.parametrize("shape", [(300,), (1,), (13, 1), (0,)], ids=str)
def test_table_adam_step_shapes_over_steps(table, shape):
    """Odd, size-1 and empty rows over three steps (state carried, step counts growing per row),
    1-β1 >= 0.5 (torch.lerp's other branch). Tolerance 1e-6: elementwise fp32, no GEMM, each step's
    error feeding the next."""
    ok, why = table.takes(shape, preconditioned=(False,) * len(shape))
    if not ok:
        pytest.skip(why)
    gen = torch.Generator().manual_seed(4)
    dev, rows = table.device, 3
    params = [torch.randn(shape, generator=gen).to(dev) for _ in range(rows)]
    exp_avg = torch.randn(rows, *shape, generator=gen).to(dev)
    exp_avg_sq = (torch.rand(rows, *shape, generator=gen) + 0.05).to(dev)
    want_p, want_m, want_v = [p.clone() for p in params], exp_avg.clone(), exp_avg_sq.clone()
    lr, betas, eps, wd = 0.1, (0.3, 0.6), 1e-3, 0.1
    kernels = table.make()
    for t in range(1, 4):
        grads = [torch.randn(shape, generator=gen).to(dev) for _ in range(rows)]
        steps = [t, t + 5, t + 50]
        want_m, want_v, want_p = adam64(want_p, grads, want_m, want_v, sizes64(steps, lr, betas), *betas, eps,
                                        1 - lr * wd)
        want_m, want_v = want_m.float(), want_v.float()
        scalars = step_scalars(torch.tensor(steps, dtype=torch.float32, device=dev), steps, lr, betas, wd, True)
        kernels.adam_step(params, grads, exp_avg, exp_avg_sq, scalars, *betas, eps, second_moment="adam",
                          normalize=False, views=params, from_work=lambda x: x)
    if exp_avg.numel() == 0:
        assert all(p.shape == shape for p in params)
        return
    table_check("exp_avg", exp_avg, want_m, 1e-6, 1e-6)
    table_check("exp_avg_sq", exp_avg_sq, want_v, 1e-6, 1e-6)
    table_check("params", torch.stack(params), torch.stack(want_p), 1e-6, 1e-6)


@pytest.mark.parametrize("views", ["views", "no-views"])
@pytest.mark.parametrize("normalize", [False, True], ids=["plain", "normalize"])
def test_table_adam_step_normalize_and_no_views(table, normalize, views):
    """``normalize_grads`` (each row's update divided by its RMS) and parameters without
    working-shaped views (written through ``from_work``: a [2, 3] working shape of [6] parameters)."""
    gen = torch.Generator().manual_seed(5)
    dev, rows, work = table.device, 2, (2, 3)
    params = [torch.randn(6, generator=gen).to(dev) for _ in range(rows)]
    grads = [torch.randn(work, generator=gen).to(dev) for _ in range(rows)]
    exp_avg = torch.randn(rows, *work, generator=gen).to(dev)
    exp_avg_sq = (torch.rand(rows, *work, generator=gen) + 0.05).to(dev)
    lr, betas, eps, steps = 0.05, (0.9, 0.95), 1e-8, [1, 2]
    work_params = [p.view(work) for p in params]
    want_m, want_v, want_p = adam64(work_params, grads, exp_avg, exp_avg_sq, sizes64(steps, lr, betas), *betas, eps,
                                    1.0, normalize=normalize)
    scalars = step_scalars(torch.tensor(steps, dtype=torch.float32, device=dev), steps, lr, betas, 0.0, True)
    table.make().adam_step(params, grads, exp_avg, exp_avg_sq, scalars, *betas, eps, second_moment="adam",
                           normalize=normalize, views=work_params if views == "views" else None,
                           from_work=lambda x: x.reshape(6))
    table_check("exp_avg", exp_avg, want_m, 1e-6, 1e-6)
    table_check("exp_avg_sq", exp_avg_sq, want_v, 1e-6, 1e-6)
    table_check("params", torch.stack(params), torch.stack(want_p).reshape(rows, 6), 1e-6, 1e-6)


@pytest.mark.parametrize("case", ["fp64", "adafactor"])
def test_table_adam_step_torch_only_buckets(table, case):
    """fp64 state (fp64 math, tolerance a few fp64 ulps) and the factored (adafactor) second moment
    of a [5, 4] working shape: buckets select never gives the Triton table."""
    dtype = torch.float64 if case == "fp64" else torch.float32
    second_moment = "adafactor" if case == "adafactor" else "adam"
    ok, why = table.takes((5, 4), second_moment, dtype, preconditioned=(False, False))
    if not ok:
        pytest.skip(why)
    gen = torch.Generator().manual_seed(6)
    dev, rows, shape = table.device, 2, (5, 4)
    params = [torch.randn(shape, generator=gen).to(dev, dtype) for _ in range(rows)]
    grads = [torch.randn(shape, generator=gen).to(dev, dtype) for _ in range(rows)]
    exp_avg = torch.randn(rows, *shape, generator=gen).to(dev, dtype)
    lr, betas, eps, steps, wd = 0.1, (0.9, 0.95), 1e-8, [2, 3], 0.01
    sizes = sizes64(steps, lr, betas)
    if case == "fp64":
        exp_avg_sq = (torch.rand(rows, *shape, generator=gen) + 0.05).to(dev, dtype)
        want_m, want_v, want_p = adam64(params, grads, exp_avg, exp_avg_sq, sizes, *betas, eps, 1 - lr * wd)
        tol = (1e-12, 1e-12)
    else:  # [rows, 5 + 4]: EMAs of the row and column sums of g², v̂ = r cᵀ / Σ r
        exp_avg_sq = (torch.rand(rows, 9, generator=gen) + 0.5).to(dev)
        g = torch.stack([x.double() for x in grads])
        want_m = betas[0] * exp_avg.double() + (1 - betas[0]) * g
        r = betas[1] * exp_avg_sq[:, :5].double() + (1 - betas[1]) * (g**2).sum(dim=2)
        c = betas[1] * exp_avg_sq[:, 5:].double() + (1 - betas[1]) * (g**2).sum(dim=1)
        want_v = torch.cat([r, c], dim=1)
        d = want_m / ((r[:, :, None] * c[:, None, :] / r.sum(dim=1)[:, None, None]).sqrt() + eps)
        want_p = [((x.double() - s * d[i]) * (1 - lr * wd)).to(dtype) for i, (x, s) in enumerate(zip(params, sizes))]
        tol = (1e-6, 1e-6)  # elementwise fp32 and two short fp32 sums
    scalars = step_scalars(torch.tensor(steps, dtype=torch.float32, device=dev), steps, lr, betas, wd, True)
    table.make().adam_step(params, grads, exp_avg, exp_avg_sq, scalars, *betas, eps, second_moment=second_moment,
                           normalize=False, views=params, from_work=lambda x: x)
    assert all(p.dtype == dtype for p in params)
    table_check("exp_avg", exp_avg, want_m, *tol)
    table_check("second moment", exp_avg_sq, want_v, *tol)
    table_check("params", torch.stack(params), torch.stack(want_p), *tol)

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
