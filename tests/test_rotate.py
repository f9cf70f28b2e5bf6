"""The rotation family (``rotate_in_moments``, ``rotate_back_update``; soap_kernels/triton/rotate.py
and soap_kernels/ops.py).

Part 1, conformance: every kernel table of ``tests/kernel_tables.py`` (the ``table`` fixture) through its
:class:`~soap_kernels.kernels.Kernels` methods, against the formulas written out in fp64.
Part 2, the Triton module's own internals: its standalone rotations, launcher forms, validation
messages and the tf32/bf16 rotation modes; and GPU-only shapes.
"""

import pytest
import torch
from kernel_tables import TOLERANCE, TOLERANCE_PARAM, check, make_qs, orthonormal, rotate64, step_sizes64

from soap_kernels import select
from soap_kernels.kernels import step_scalars
from soap_kernels.layout import make_layout

SHAPES = [(3, 5, 7), (1, 5, 7), (3, 1, 9), (1, 13, 1), (2, 37, 20)]  # (B, m, n); 37x20: several tiles
SIDES = ["both", "left", "right", "none"]


def randn(*shape, gen, device, scale=1.0, offset=0.0):
    return (torch.randn(*shape, generator=gen) * scale + offset).to(device)


def moments64(rotated, exp_avg, exp_avg_sq, beta1, beta2, eps):
    """Adam's moment update and direction in fp64 (``G'`` already rotated)."""
    m = beta1 * exp_avg.double() + (1 - beta1) * rotated
    v = beta2 * exp_avg_sq.double() + (1 - beta2) * rotated**2
    return m, v, m / (v.sqrt() + eps)


def skip_unless_takes(table, *args, **kwargs):
    ok, why = table.takes(*args, **kwargs)
    if not ok:
        pytest.skip(f"{table.name}: {why}")


# ================================================================================================
# Part 1: conformance of every table
# ================================================================================================


@pytest.mark.parametrize("sides", SIDES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_rotate_in_moments(table, shape, sides):
    b, m, n = shape
    dev = table.device
    gen = torch.Generator().manual_seed(m * 100 + n)
    grads = [randn(m, n, gen=gen, device=dev) for _ in range(b)]
    qs = make_qs(b, (m, n), sides, gen, dev)
    exp_avg = randn(b, m, n, gen=gen, device=dev)
    exp_avg_sq = randn(b, m, n, gen=gen, device=dev).abs() + 0.1
    want_rot = rotate64(torch.stack(grads), qs)
    want_m, want_v, want_dir = moments64(want_rot, exp_avg, exp_avg_sq, 0.9, 0.95, 1e-8)
    rotated, direction = table.make().rotate_in_moments(grads, qs, exp_avg, exp_avg_sq, 0.9, 0.95, 1e-8,
                                                        second_moment="adam", workspace=None)
    tol = TOLERANCE["gemm"] if sides != "none" else TOLERANCE["elementwise"]
    check("rotated", rotated, want_rot, *tol)
    check("exp_avg", exp_avg, want_m, *tol)
    check("exp_avg_sq", exp_avg_sq, want_v, *tol)
    check("direction", direction, want_dir, *tol)


@pytest.mark.parametrize("workspace", [False, True], ids=["no-workspace", "workspace"])
def test_rotate_in_moments_bf16_grads_large_beta1(table, workspace):
    """bf16 gradients (the state dtype is fp32), 1-β1 >= 0.5 (the other branch of torch.lerp), and
    the engine's CPU workspace (two bucket-shaped buffers the results may be written into)."""
    dev = table.device
    gen = torch.Generator().manual_seed(7)
    b, m, n = 2, 6, 3
    grads = [randn(m, n, gen=gen, device=dev).bfloat16() for _ in range(b)]
    qs = make_qs(b, (m, n), "both", gen, dev)
    exp_avg, exp_avg_sq = randn(b, m, n, gen=gen, device=dev), randn(b, m, n, gen=gen, device=dev).abs() + 0.1
    beta1, beta2, eps = 0.3, 0.6, 1e-3
    want_rot = rotate64(torch.stack(grads).float(), qs)
    want_m, want_v, want_dir = moments64(want_rot, exp_avg, exp_avg_sq, beta1, beta2, eps)
    buffers = (torch.empty(b, m, n, device=dev), torch.empty(b, m, n, device=dev)) if workspace else None
    rotated, direction = table.make().rotate_in_moments(grads, qs, exp_avg, exp_avg_sq, beta1, beta2, eps,
                                                        second_moment="adam", workspace=buffers)
    check("rotated", rotated, want_rot, *TOLERANCE["gemm"])
    check("exp_avg", exp_avg, want_m, *TOLERANCE["gemm"])
    check("exp_avg_sq", exp_avg_sq, want_v, *TOLERANCE["gemm"])
    check("direction", direction, want_dir, *TOLERANCE["gemm"])


# Buckets only the torch table is given: (working shape, factors, state dtype, second moment).
TORCH_ONLY_CASES = {
    "3d-adam": ((3, 4, 5), (True, False, True), torch.float32, "adam"),
    "1d-adam": ((7,), (True,), torch.float32, "adam"),
    "matrix-fp64": ((5, 7), (True, True), torch.float64, "adam"),
    "matrix-adafactor": ((5, 7), (True, True), torch.float32, "adafactor"),
    "3d-adafactor": ((3, 4, 5), (False, True, True), torch.float32, "adafactor"),
}
# fp64 state: fp64 GEMMs against fp64 math, a few ulps of fp64 times K.
TOLERANCE_FP64 = (1e-12, 1e-12)


@pytest.mark.parametrize("case", list(TORCH_ONLY_CASES))
def test_rotate_in_moments_tensor_fp64_adafactor_buckets(table, case):
    work, sides, dtype, second_moment = TORCH_ONLY_CASES[case]
    skip_unless_takes(table, work, second_moment, dtype, sides)
    dev, b = table.device, 2
    gen = torch.Generator().manual_seed(17)
    grads = [randn(*work, gen=gen, device=dev).to(dtype) for _ in range(b)]
    qs = [q.to(dtype) if q is not None else None for q in make_qs(b, work, sides, gen, dev)]
    exp_avg = randn(b, *work, gen=gen, device=dev).to(dtype)
    rows = work[0]
    cols = torch.Size(work[1:]).numel()
    if second_moment == "adam":
        exp_avg_sq = (randn(b, *work, gen=gen, device=dev).abs() + 0.1).to(dtype)
    else:  # row and column EMAs of the squared rotated gradient seen as [rows, cols]
        exp_avg_sq = (torch.rand(b, rows + cols, generator=gen) + 0.5).to(dev, dtype)
    beta1, beta2, eps = 0.9, 0.95, 1e-8
    want_rot = rotate64(torch.stack(grads), qs)
    if second_moment == "adam":
        want_m, want_v, want_dir = moments64(want_rot, exp_avg, exp_avg_sq, beta1, beta2, eps)
    else:
        want_m = beta1 * exp_avg.double() + (1 - beta1) * want_rot
        square = (want_rot**2).reshape(b, rows, cols)
        row_acc = beta2 * exp_avg_sq[:, :rows].double() + (1 - beta2) * square.sum(dim=2)
        col_acc = beta2 * exp_avg_sq[:, rows:].double() + (1 - beta2) * square.sum(dim=1)
        want_v = torch.cat([row_acc, col_acc], dim=1)
        v_hat = row_acc[:, :, None] * col_acc[:, None, :] / row_acc.sum(dim=1)[:, None, None]
        want_dir = want_m / (v_hat.sqrt() + eps).reshape(want_rot.shape)
    rotated, direction = table.make().rotate_in_moments(grads, qs, exp_avg, exp_avg_sq, beta1, beta2, eps,
                                                        second_moment=second_moment, workspace=None)
    tol = TOLERANCE_FP64 if dtype == torch.float64 else TOLERANCE["gemm"]
    assert rotated.dtype == direction.dtype == exp_avg.dtype == dtype
    check("rotated", rotated, want_rot, *tol)
    check("exp_avg", exp_avg, want_m, *tol)
    check("second moment", exp_avg_sq, want_v, *tol)
    check("direction", direction, want_dir, *tol)


def update64(start, direction, qs, sizes, decay, normalize=False):
    """``(p − s_b·N)·decay`` in fp64, ``N = rotate back(direction)`` (divided by its per-row RMS if
    ``normalize``), rounded once to the parameter's dtype."""
    update = rotate64(direction, qs, back=True)
    if normalize:
        rms = update.reshape(update.shape[0], -1).square().mean(dim=1).sqrt()
        update = update / (rms + 1e-30).view(-1, *(1,) * (update.dim() - 1))
    sizes = sizes.to(update).view(-1, *(1,) * (update.dim() - 1))
    want = (start.double() - sizes * update) * decay
    return want.to(start.dtype)


def scalars_for(steps, lr, betas, weight_decay, device, correct_bias=True):
    return step_scalars(torch.tensor(steps, dtype=torch.float32, device=device), steps, lr, betas, weight_decay,
                        correct_bias)


@pytest.mark.parametrize("sides", SIDES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_rotate_back_update(table, shape, sides):
    b, m, n = shape
    dev = table.device
    gen = torch.Generator().manual_seed(m + n)
    direction = randn(b, m, n, gen=gen, device=dev)
    qs = make_qs(b, (m, n), sides, gen, dev)
    params = [randn(m, n, gen=gen, device=dev) for _ in range(b)]  # separate allocations
    steps = list(range(1, b + 1))  # a different bias correction, so step size, per row
    lr, betas, wd = 0.1, (0.9, 0.95), 0.1
    want = update64(torch.stack(params), direction, qs, step_sizes64(steps, lr, betas), 1 - lr * wd)
    table.make().rotate_back_update(direction, qs, params, params, scalars_for(steps, lr, betas, wd, dev),
                                    normalize=False, from_work=lambda u: u, workspace=None)
    check("params", torch.stack(params), want, *TOLERANCE_PARAM[torch.float32])


@pytest.mark.parametrize("views", ["views", "no-views"])
@pytest.mark.parametrize("normalize", [False, True], ids=["plain", "normalize"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_rotate_back_update_dtypes_normalize_views(table, dtype, normalize, views):
    """Parameter dtypes, ``normalize_grads`` and parameters without working-shaped views (written
    through ``from_work``), with the engine's workspace buffer."""
    dev = table.device
    gen = torch.Generator().manual_seed(3)
    b, m, n = 3, 13, 6
    direction = randn(b, m, n, gen=gen, device=dev)
    qs = make_qs(b, (m, n), "both", gen, dev)
    start = randn(b, m, n, gen=gen, device=dev).to(dtype)
    steps, lr, betas, wd = [1, 10, 100], 0.05, (0.95, 0.99), 0.2
    want = update64(start, direction, qs, step_sizes64(steps, lr, betas), 1 - lr * wd, normalize=normalize)
    params = [start[i].clone() for i in range(b)]
    table.make().rotate_back_update(direction, qs, params, params if views == "views" else None,
                                    scalars_for(steps, lr, betas, wd, dev), normalize=normalize,
                                    from_work=lambda u: u, workspace=torch.empty(b, m, n, device=dev))
    assert all(p.dtype == dtype for p in params)
    check(f"params {dtype}", torch.stack(params), want, *TOLERANCE_PARAM[dtype])


def test_rotate_back_update_merged_layout_and_changing_scalars(table):
    """A conv weight that ``merge_dims`` makes a matrix (views are reshapes of the parameters), and
    two calls with different runtime scalars (no weight decay and no bias correction, then both)."""
    dev = table.device
    layout = make_layout((4, 3, 2, 2), max_precond_dim=12, merge_dims_=True, precondition_1d=False,
                         channels_last=False)
    assert layout.work_shape == (12, 4)
    gen = torch.Generator().manual_seed(5)
    b, (m, n) = 2, layout.work_shape
    params = [randn(*layout.shape, gen=gen, device=dev) for _ in range(b)]
    qs = make_qs(b, (m, n), "both", gen, dev)
    kernels = table.make()
    for steps, wd, correct_bias in [([1, 2], 0.0, False), ([5, 9], 0.1, True)]:
        direction = randn(b, m, n, gen=gen, device=dev)
        lr, betas = 0.3, (0.9, 0.95)
        start = torch.stack([layout.to_work(p) for p in params])
        want = update64(start, direction, qs, step_sizes64(steps, lr, betas, correct_bias), 1 - lr * wd)
        views = [p.view(layout.work_shape) for p in params]
        kernels.rotate_back_update(direction, qs, params, views, scalars_for(steps, lr, betas, wd, dev, correct_bias),
                                   normalize=False, from_work=layout.from_work, workspace=None)
        assert all(tuple(p.shape) == layout.shape for p in params)
        check(f"params wd={wd}", torch.stack([layout.to_work(p) for p in params]), want,
              *TOLERANCE_PARAM[torch.float32])


# ================================================================================================
# Part 2: the Triton module's internals (not part of the Kernels interface)
# ================================================================================================

TRITON_OK, TRITON_WHY = select.backend_available("triton")
triton_only = pytest.mark.skipif(not TRITON_OK, reason=f"Triton module internals: {TRITON_WHY}")
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
gpu_only = pytest.mark.skipif(not (CUDA and TRITON_OK),
                              reason="needs a CUDA device and Triton (large shapes, tf32/bf16 tensor-core modes)")

if TRITON_OK:
    from soap_kernels.triton.rotate import rotate_back, rotate_back_update, rotate_in, rotate_in_adam

# Low-precision rotation modes (GPU only), flash-attention's rule: the kernel's error against fp64
# must stay within FACTOR x the error of torch's matmul in the same precision, plus a floor.
# tf32 gets 4x: Triton's tf32 dot feeds fp32 bits to the tensor cores, which truncate them to 10
# mantissa bits (see mma_tile), while cuBLAS may round to nearest; emulated at this test's shape,
# truncation's max error was 7.6e-3 against 2.2e-3 for rounding to nearest (3.5x).
LOW_PRECISION_FACTOR = 2.0
LOW_PRECISION_FACTOR_BY_MODE = {"tf32": 4.0, "bf16": LOW_PRECISION_FACTOR}
LOW_PRECISION_FLOOR = {"tf32": 1e-4, "bf16": 1e-3}


@triton_only
@pytest.mark.parametrize("sides", SIDES)
def test_standalone_rotate_in_and_rotate_back(sides):
    """``rotate_in`` (no table method uses it) and ``rotate_back`` (the table's unfused path) alone."""
    for b, m, n in SHAPES:
        gen = torch.Generator().manual_seed(m * 10 + n)
        x = randn(b, m, n, gen=gen, device=DEVICE)
        qs = make_qs(b, (m, n), sides, gen, DEVICE)
        check(f"rotate_back {b}x{m}x{n}", rotate_back(x, qs), rotate64(x, qs, back=True), *TOLERANCE["gemm"])
        check(f"rotate_in {b}x{m}x{n}", rotate_in(x, qs), rotate64(x, qs), *TOLERANCE["gemm"])


@triton_only
@pytest.mark.parametrize("form", ["stacked", "strided"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_rotate_back_update_launcher_forms(dtype, form):
    """The launcher also writes one stacked tensor, or a non-contiguous [B, m, n] view (the table
    passes a list of views; the list form is part 1)."""
    gen = torch.Generator().manual_seed(3)
    b, m, n = 3, 13, 6
    direction = randn(b, m, n, gen=gen, device=DEVICE)
    qs = make_qs(b, (m, n), "both", gen, DEVICE)
    start = randn(b, m, n, gen=gen, device=DEVICE).to(dtype)
    step_size = torch.tensor([0.05, 0.2, 0.5], device=DEVICE)
    want = update64(start, direction, qs, step_size.double().cpu(), 0.95)
    if form == "stacked":
        got = start.clone()
    else:  # a non-contiguous [B, m, n] view into one column-major buffer
        got = start.mT.contiguous().mT
        assert not got.is_contiguous()
    rotate_back_update(direction, qs, got, step_size, 0.95)
    assert got.dtype == dtype
    check(f"params {dtype} {form}", got, want, *TOLERANCE_PARAM[dtype])


@triton_only
def test_validation_messages():
    gen = torch.Generator().manual_seed(0)
    b, m, n = 2, 4, 3
    grad = randn(b, m, n, gen=gen, device=DEVICE)
    qs = make_qs(b, (m, n), "both", gen, DEVICE)
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


@triton_only
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
        x = randn(b, m, n, gen=gen, device=DEVICE)
        qs = make_qs(b, (m, n), sides, gen, DEVICE)
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
            exact = rotate64(x, qs, back=back).cpu()
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
    grad = randn(b, m, n, gen=gen, device=DEVICE)
    qs = make_qs(b, (m, n), sides, gen, DEVICE)
    exp_avg, exp_avg_sq = randn(b, m, n, gen=gen, device=DEVICE), randn(b, m, n, gen=gen, device=DEVICE).abs() + 0.1
    want_rot = rotate64(grad, qs)
    _, _, want_dir = moments64(want_rot, exp_avg, exp_avg_sq, 0.95, 0.95, 1e-8)
    got_rot, got_dir = rotate_in_adam(grad, qs, exp_avg, exp_avg_sq, 0.95, 0.95, 1e-8)
    # fp32 GEMMs with K up to 768 against fp64: ~√K·2⁻²⁴ relative per entry, 1e-4 leaves room.
    check("rotated", got_rot, want_rot, 1e-4, 1e-4)
    check("direction", got_dir, want_dir, 1e-4, 1e-4)
    params = randn(b, m, n, gen=gen, device=DEVICE).bfloat16()
    step_size = torch.full((b,), 0.01, device=DEVICE)
    want_p = update64(params, got_dir, qs, step_size.double().cpu(), 0.999)
    rotate_back_update(got_dir, qs, params, step_size, 0.999)
    check("params bf16", params, want_p, *TOLERANCE_PARAM[torch.bfloat16])


def _torch_low_precision_rotate(x, qs, precision, back):
    """The same two-sided rotation by torch's matmul in the mode's precision (the baseline)."""
    q_left, q_right = qs
    if precision == "tf32":
        old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        try:
            return (q_left if back else q_left.mT) @ x @ (q_right.mT if back else q_right)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = old
    low_l, low_r, low_x = q_left.bfloat16(), q_right.bfloat16(), x.bfloat16()
    return ((low_l if back else low_l.mT) @ low_x @ (low_r.mT if back else low_r)).float()


@gpu_only
@pytest.mark.parametrize("precision", ["tf32", "bf16"])
@pytest.mark.parametrize("back", [False, True])
def test_gpu_low_precision_modes(precision, back):
    gen = torch.Generator().manual_seed(13)
    b, m, n = 2, 384, 512
    x = randn(b, m, n, gen=gen, device=DEVICE)
    qs = [orthonormal(b, m, gen, DEVICE), orthonormal(b, n, gen, DEVICE)]
    exact = rotate64(x, qs, back=back)
    got = rotate_back(x, qs, precision=precision) if back else rotate_in(x, qs, precision=precision)
    baseline = _torch_low_precision_rotate(x, qs, precision, back)
    err_kernel = (got.double() - exact).abs().max().item()
    err_torch = (baseline.double() - exact).abs().max().item()
    print(f"{precision} back={back}: kernel max err {err_kernel:.3e}, torch {precision} max err {err_torch:.3e}")
    assert err_kernel <= LOW_PRECISION_FACTOR_BY_MODE[precision] * err_torch + LOW_PRECISION_FLOOR[precision]
