"""Rotations into and out of the eigenbasis, with the Adam and parameter-update epilogues fused.

Drop-in versions of :func:`soap_kernels.ops.rotate_in_adam` and :func:`soap_kernels.ops.rotate_back`
for the matrix case (a bucket ``[B, m, n]``, ``qs = [q_left | None, q_right | None]``), plus
:func:`rotate_back_update`, which writes the update straight into the parameters.

Each two-sided rotation is two batched GEMMs: the first writes an intermediate ``T`` (fp32, or
bf16 when ``precision="bf16"``: the second GEMM would round it to bf16 anyway), the second carries
the epilogue. A one-sided rotation is one GEMM with the epilogue; with no side preconditioned the
epilogue runs on the input directly (no GEMM).

Precision of the rotation GEMMs: ``"fp32"`` (default, exact fp32 products, ``input_precision=
"ieee"``), ``"tf32"`` (tensor cores, 10-bit mantissa inputs), ``"bf16"`` (operands rounded to bf16);
accumulation is fp32 in every mode. The Adam epilogue uses correctly rounded ``sqrt`` and division,
so in fp32 mode the moments match PyTorch's to the GEMM's rounding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import (
    PointerTableCache,
    bmm,
    check_tensor,
    mma_tile,
    pick_config,
    tile_ids,
    tl_dtype,
    tl_precision,
    to_storage,
)

__all__ = ["rotate_in_adam", "rotate_back", "rotate_back_update", "rotate_in"]

_param_tables = PointerTableCache()


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _rotate_adam_kernel(
    a_ptr,
    b_ptr,
    rotated_ptr,
    direction_ptr,
    exp_avg_ptr,
    exp_avg_sq_ptr,
    M,
    N,
    K,
    stride_ab,
    stride_am,
    stride_ak,
    stride_bb,
    stride_bk,
    stride_bn,
    one_minus_beta1,
    beta2,
    one_minus_beta2,
    eps,
    ROTATE: tl.constexpr,
    PRECISION: tl.constexpr,
    CAST_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """``G' = A @ B`` per batch, then Adam's moment update and direction in the epilogue.

    Math (per element of ``G'``, ``w1 = 1-β1``, ``w2 = 1-β2`` precomputed on the host):
    ``m ← lerp(m, G', w1)`` (torch.lerp's formula), ``v ← β2·v + w2·G'²``,
    ``direction = m / (√v + eps)`` (IEEE sqrt and division); stores G', direction, m, v.
    ``ROTATE=False``: no GEMM, ``G' = B`` (the both-sides-unpreconditioned case).
    Shapes: A ``[Bt, M, K]`` (strided: ``Q_Lᵀ`` or the gradient), B ``[Bt, K, N]`` (strided),
    G'/direction/m/v ``[Bt, M, N]`` fp32 contiguous. Accumulation fp32.
    FLOPs ``2·Bt·M·N·K + 8·Bt·M·N``; epilogue bytes ``24·Bt·M·N`` (read m, v; write m, v, G', dir)
    on top of the GEMM's operand traffic.
    """
    pid_m, pid_n = tile_ids(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_b = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if ROTATE:
        g = mma_tile(
            a_ptr + pid_b * stride_ab, b_ptr + pid_b * stride_bb, a_ptr, b_ptr,
            offs_m, offs_n, M, N, K, 0,
            stride_am, stride_ak, stride_bk, stride_bn,
            PRECISION, CAST_BF16, False, False, BLOCK_M, BLOCK_N, BLOCK_K,
        )  # fmt: skip
    else:
        g = tl.load(
            b_ptr + pid_b * stride_bb + offs_m[:, None] * stride_bk + offs_n[None, :] * stride_bn,
            mask=mask,
            other=0.0,
        ).to(tl.float32)
    offs = pid_b * M * N + offs_m[:, None] * N + offs_n[None, :]
    m = tl.load(exp_avg_ptr + offs, mask=mask, other=0.0)
    v = tl.load(exp_avg_sq_ptr + offs, mask=mask, other=0.0)
    # torch.lerp's two-branch formula, so exp_avg matches ops.rotate_in_adam bit for bit.
    if one_minus_beta1 < 0.5:
        m = m + one_minus_beta1 * (g - m)
    else:
        m = g - (g - m) * (1.0 - one_minus_beta1)
    v = v * beta2 + one_minus_beta2 * g * g
    direction = tl.math.div_rn(m, tl.math.sqrt_rn(v) + eps)
    tl.store(exp_avg_ptr + offs, m, mask=mask)
    tl.store(exp_avg_sq_ptr + offs, v, mask=mask)
    tl.store(rotated_ptr + offs, g, mask=mask)
    tl.store(direction_ptr + offs, direction, mask=mask)


@triton.jit
def _rotate_update_kernel(
    a_ptr,
    b_ptr,
    param_ptr,
    step_size_ptr,
    M,
    N,
    K,
    stride_ab,
    stride_am,
    stride_ak,
    stride_bb,
    stride_bk,
    stride_bn,
    stride_pb,
    stride_pm,
    stride_pn,
    decay,
    ROTATE: tl.constexpr,
    PARAM_TABLE: tl.constexpr,
    PARAM_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    CAST_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """``U = A @ B`` per batch; epilogue ``p ← (p − step_size[b]·U)·decay`` written into ``p``.

    ``p`` is read and written in its own dtype (fp32/bf16/fp16; math in fp32, one rounding on
    store). ``PARAM_TABLE``: ``param_ptr`` is an int64 ``[Bt]`` table of data pointers (separate
    allocations, each contiguous ``[M, N]``); otherwise a strided ``[Bt, M, N]`` tensor.
    ``ROTATE=False``: ``U = B`` (no GEMM). ``step_size`` fp32 ``[Bt]``; ``decay`` a runtime float.
    FLOPs ``2·Bt·M·N·K + 3·Bt·M·N``; epilogue bytes ``2·Bt·M·N·sizeof(p)``.
    """
    pid_m, pid_n = tile_ids(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_b = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if ROTATE:
        u = mma_tile(
            a_ptr + pid_b * stride_ab, b_ptr + pid_b * stride_bb, a_ptr, b_ptr,
            offs_m, offs_n, M, N, K, 0,
            stride_am, stride_ak, stride_bk, stride_bn,
            PRECISION, CAST_BF16, False, False, BLOCK_M, BLOCK_N, BLOCK_K,
        )  # fmt: skip
    else:
        u = tl.load(
            b_ptr + pid_b * stride_bb + offs_m[:, None] * stride_bk + offs_n[None, :] * stride_bn,
            mask=mask,
            other=0.0,
        ).to(tl.float32)
    if PARAM_TABLE:
        p_base = tl.load(param_ptr + pid_b).to(tl.pointer_type(PARAM_DTYPE))
    else:
        p_base = param_ptr + pid_b * stride_pb
    p_ptrs = p_base + offs_m[:, None] * stride_pm + offs_n[None, :] * stride_pn
    p = tl.load(p_ptrs, mask=mask, other=0.0).to(tl.float32)
    step_size = tl.load(step_size_ptr + pid_b)
    p = (p - step_size * u) * decay
    tl.store(p_ptrs, to_storage(p, PARAM_DTYPE), mask=mask)


# --------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------


def _split_qs(qs: Sequence[Tensor | None], x: Tensor, name: str) -> tuple[Tensor | None, Tensor | None]:
    if x.dim() != 3:
        raise ValueError(
            f"{name} must be a bucket of matrices [B, m, n], got shape {tuple(x.shape)}; other ranks go through soap_kernels.ops"
        )
    if len(qs) != 2:
        raise ValueError(f"qs must be [q_left | None, q_right | None] for a [B, m, n] bucket, got {len(qs)}")
    b, m, n = x.shape
    q_left, q_right = qs
    if q_left is not None:
        check_tensor(q_left, "q_left", (b, m, m), device=x.device, contiguous=False)
    if q_right is not None:
        check_tensor(q_right, "q_right", (b, n, n), device=x.device, contiguous=False)
    return q_left, q_right


def _first_gemm_out(x: Tensor, precision: str) -> Tensor:
    # bf16 mode: the second GEMM rounds its operand to bf16 anyway, so store it that way.
    return torch.empty_like(x, dtype=torch.bfloat16 if precision == "bf16" else torch.float32)


def _operands(
    x: Tensor, q_left: Tensor | None, q_right: Tensor | None, back: bool, precision: str
) -> tuple[Tensor | None, Tensor]:
    """``(A, B)`` of the last GEMM (``A = None``: no GEMM, the epilogue reads ``B`` as is).

    Rotate in: ``Q_Lᵀ (X Q_R)``; rotate back: ``Q_L (X Q_Rᵀ)``. Transposes are stride swaps.
    """
    if q_right is not None:
        qr_op = q_right.mT if back else q_right
        if q_left is None:
            return x, qr_op
        x = bmm(x, qr_op, _first_gemm_out(x, precision), precision)
    if q_left is None:
        return None, x
    return (q_left if back else q_left.mT), x


def _strides(a: Tensor | None, b: Tensor) -> tuple[int, ...]:
    sa = a.stride() if a is not None else (0, 0, 0)
    return (*sa, *b.stride())


def rotate_in_adam(
    grad: Tensor,
    qs: Sequence[Tensor | None],
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    precision: str = "fp32",
) -> tuple[Tensor, Tensor]:
    """Triton :func:`soap_kernels.ops.rotate_in_adam` for a matrix bucket.

    ``G' = Q_Lᵀ grad Q_R``; in place ``exp_avg ← β1·exp_avg + (1-β1)·G'``,
    ``exp_avg_sq ← β2·exp_avg_sq + (1-β2)·G'²``; returns ``(G', exp_avg / (√exp_avg_sq + eps))``
    (new fp32 ``[B, m, n]`` tensors). grad, exp_avg, exp_avg_sq: fp32 contiguous ``[B, m, n]``;
    ``q_left [B, m, m]`` / ``q_right [B, n, n]`` fp32 contiguous or ``None``.
    """
    tl_precision(precision)
    check_tensor(grad, "grad")
    q_left, q_right = _split_qs(qs, grad, "grad")
    check_tensor(exp_avg, "exp_avg", grad.shape, device=grad.device)
    check_tensor(exp_avg_sq, "exp_avg_sq", grad.shape, device=grad.device)
    bt, m, n = grad.shape
    rotated = torch.empty_like(grad)
    direction = torch.empty_like(grad)
    if grad.numel() == 0:
        return rotated, direction
    a, b = _operands(grad, q_left, q_right, back=False, precision=precision)
    k = b.shape[1] if a is not None else 0
    input_precision, cast_bf16 = tl_precision(precision)

    def launch(cfg, outs) -> None:
        grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n), bt)
        _rotate_adam_kernel[grid](
            a if a is not None else b, b, *outs, m, n, k, *_strides(a, b),
            1.0 - float(beta1), float(beta2), 1.0 - float(beta2), float(eps),
            ROTATE=a is not None, PRECISION=input_precision, CAST_BF16=cast_bf16, GROUP_M=8,
            **cfg.meta(),
        )  # fmt: skip

    scratch: list[Tensor] = []

    def bench(cfg) -> None:  # tuning must not touch the real moments
        if not scratch:
            scratch.extend((torch.empty_like(grad), torch.empty_like(grad), exp_avg.clone(), exp_avg_sq.clone()))
        launch(cfg, scratch)

    key = ("rotate_adam", bt, m, n, k, _strides(a, b), precision, grad.device)
    cfg = pick_config(key, bench)
    launch(cfg, (rotated, direction, exp_avg, exp_avg_sq))
    return rotated, direction


def rotate_in(x: Tensor, qs: Sequence[Tensor | None], precision: str = "fp32") -> Tensor:
    """``Q_Lᵀ x Q_R`` (``ops.rotate(x, qs)`` for a matrix bucket), a new fp32 tensor."""
    return _rotate(x, qs, back=False, precision=precision)


def rotate_back(direction: Tensor, qs: Sequence[Tensor | None], precision: str = "fp32") -> Tensor:
    """Triton :func:`soap_kernels.ops.rotate_back`: ``Q_L direction Q_Rᵀ``, a new fp32 tensor.

    For when the full update is needed before the parameter write (``normalize_grads``).
    """
    return _rotate(direction, qs, back=True, precision=precision)


def _rotate(x: Tensor, qs: Sequence[Tensor | None], back: bool, precision: str) -> Tensor:
    tl_precision(precision)
    check_tensor(x, "direction" if back else "x")
    q_left, q_right = _split_qs(qs, x, "direction" if back else "x")
    if x.numel() == 0:
        return torch.empty_like(x)
    a, b = _operands(x, q_left, q_right, back=back, precision=precision)
    if a is None:
        return x.clone()
    return bmm(a, b, torch.empty_like(x), precision)


def _param_operand(params: Tensor | Sequence[Tensor], shape: torch.Size, device: torch.device):
    """``(tensor or pointer table, is_table, dtype, strides)`` for the parameter write."""
    bt, m, n = shape
    allowed = (torch.float32, torch.bfloat16, torch.float16)
    if isinstance(params, Tensor):
        check_tensor(params, "params", (bt, m, n), dtype=allowed, device=device, contiguous=False)
        return params, False, params.dtype, params.stride()
    params = list(params)
    if len(params) != bt:
        raise ValueError(f"params: expected {bt} tensors (one per bucket row), got {len(params)}")
    dtype = params[0].dtype
    for i, p in enumerate(params):
        check_tensor(p, f"params[{i}]", (m, n), dtype=allowed, device=device)
        if p.dtype != dtype:
            raise TypeError(f"params[{i}] has dtype {p.dtype} but params[0] has {dtype}: a bucket has one dtype")
    table = _param_tables.get(tuple(p.data_ptr() for p in params), [[p.data_ptr()] for p in params], device)
    return table.view(-1), True, dtype, (0, n, 1)


def rotate_back_update(
    direction: Tensor,
    qs: Sequence[Tensor | None],
    params: Tensor | Sequence[Tensor],
    step_size: Tensor,
    decay: float,
    precision: str = "fp32",
) -> None:
    """``p_b ← (p_b − step_size[b]·(Q_L direction Q_Rᵀ)_b)·decay`` for every bucket row, in place.

    direction: fp32 contiguous ``[B, m, n]``. ``params``: either a ``[B, m, n]`` tensor (any
    strides, e.g. a stacked view of one flat buffer) or a sequence of ``B`` contiguous ``[m, n]``
    tensors (separate allocations; a device pointer table is built once per distinct set of
    pointers and cached). Params are fp32, bf16 or fp16 (one dtype per bucket), updated in their
    dtype with a single rounding. ``step_size``: fp32 ``[B]`` on the same device (bias correction
    and lr folded in by the caller); ``decay = 1 − lr·wd`` (or 1.0), a runtime float.
    """
    tl_precision(precision)
    check_tensor(direction, "direction")
    q_left, q_right = _split_qs(qs, direction, "direction")
    bt, m, n = direction.shape
    check_tensor(step_size, "step_size", (bt,), device=direction.device)
    p_arg, is_table, p_dtype, p_strides = _param_operand(params, direction.shape, direction.device)
    if direction.numel() == 0:
        return
    a, b = _operands(direction, q_left, q_right, back=True, precision=precision)
    k = b.shape[1] if a is not None else 0
    input_precision, cast_bf16 = tl_precision(precision)

    def launch(cfg, p, p_table: bool, strides) -> None:
        grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n), bt)
        _rotate_update_kernel[grid](
            a if a is not None else b, b, p, step_size, m, n, k, *_strides(a, b), *strides,
            float(decay),
            ROTATE=a is not None, PARAM_TABLE=p_table, PARAM_DTYPE=tl_dtype(p_dtype, "params"),
            PRECISION=input_precision, CAST_BF16=cast_bf16, GROUP_M=8, **cfg.meta(),
        )  # fmt: skip

    scratch: list[Tensor] = []

    def bench(cfg) -> None:  # tuning writes a scratch parameter, never the real one
        if not scratch:
            scratch.append(torch.zeros((bt, m, n), dtype=p_dtype, device=direction.device))
        launch(cfg, scratch[0], False, scratch[0].stride())

    key = ("rotate_update", bt, m, n, k, _strides(a, b), precision, p_dtype, direction.device)
    cfg = pick_config(key, bench)
    launch(cfg, p_arg, is_table, p_strides)
