"""Rotated-frame Shampoo statistics: ``B ← β·B + (1-β)·X Xᵀ`` in place, symmetric tiles only.

Drop-in version of :func:`soap_kernels.ops.update_statistics` for a matrix bucket: ``B_L`` uses
``X = G'`` (``[B, m, n]``), ``B_R`` uses ``X = G'ᵀ`` (a stride swap, no copy). Always exact fp32
products (``input_precision="ieee"``) with fp32 accumulation: the statistics feed the QR of the
refresh, whose small eigenvalues must not drown in TF32/bf16 rounding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import check_tensor, mma_tile, pick_config

__all__ = ["update_statistics"]


@triton.jit
def _gram_update_kernel(
    x_ptr,
    s_ptr,
    D,
    K,
    stride_xb,
    stride_xd,
    stride_xk,
    stride_sb,
    stride_sr,
    stride_sc,
    beta,
    one_minus_beta,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``S[b] ← β·S[b] + (1-β)·X[b] X[b]ᵀ`` for one upper-triangular tile pair.

    Shapes: X ``[Bt, D, K]`` fp32 (strided), S ``[Bt, D, D]`` fp32 (strided), updated in place.
    The program for tile ``(i, j)``, ``i < j``, computes ``P = X_i X_jᵀ`` once and updates both
    ``S_ij ← β S_ij + (1-β) P`` and ``S_ji ← β S_ji + (1-β) Pᵀ`` (each from its own old value,
    so a not-exactly-symmetric S is treated exactly like ``torch.baddbmm``); a diagonal tile's
    lower triangle takes its upper triangle's products, so ``X Xᵀ`` comes out bitwise symmetric;
    programs with ``i > j`` exit at once. fp32 products and accumulation.
    FLOPs ``Bt·D·(D+BLOCK)·K`` (half of the ``2·Bt·D²·K`` of a full GEMM, plus the diagonal
    tiles); bytes ≈ ``4·Bt·(D·K·D/BLOCK + 2·D²)``.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_m > pid_n:
        return
    pid_b = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    x_b = x_ptr + pid_b * stride_xb
    acc = mma_tile(
        x_b, x_b, x_ptr, x_ptr,
        offs_m, offs_n, D, D, K, 0,
        stride_xd, stride_xk, stride_xk, stride_xd,
        "ieee", False, False, False, BLOCK_M, BLOCK_N, BLOCK_K,
    )  # fmt: skip
    if pid_m == pid_n:
        # A diagonal tile's product need not come out bitwise symmetric (the interpreter's numpy
        # GEMM on an AVX2 CPU did not): its lower triangle takes the upper one's bits, as the
        # mirrored off-diagonal tiles do. Square tiles (BLOCK_M == BLOCK_N), so offs_n = offs_m.
        acc = tl.where(offs_m[:, None] <= offs_n[None, :], acc, tl.trans(acc))
    mask = (offs_m[:, None] < D) & (offs_n[None, :] < D)
    s_b = s_ptr + pid_b * stride_sb
    upper = s_b + offs_m[:, None] * stride_sr + offs_n[None, :] * stride_sc
    s = tl.load(upper, mask=mask, other=0.0)
    tl.store(upper, beta * s + one_minus_beta * acc, mask=mask)
    if pid_m != pid_n:
        # Element (r, c) of this block is S[offs_n[c], offs_m[r]]: the mirrored tile, read and
        # written through transposed addresses (no register transpose needed).
        lower = s_b + offs_n[None, :] * stride_sr + offs_m[:, None] * stride_sc
        s_t = tl.load(lower, mask=mask, other=0.0)
        tl.store(lower, beta * s_t + one_minus_beta * acc, mask=mask)


def _gram_update(s: Tensor, x: Tensor, beta: float) -> None:
    bt, d, k = x.shape

    def launch(cfg, target: Tensor) -> None:
        tiles = triton.cdiv(d, cfg.block_m)
        _gram_update_kernel[(tiles, tiles, bt)](
            x, target, d, k, *x.stride(), *target.stride(), beta, 1.0 - beta,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip

    scratch: list[Tensor] = []

    def bench(cfg) -> None:  # tuning updates a copy, never the real statistics
        if not scratch:
            scratch.append(s.clone())
        launch(cfg, scratch[0])

    cfg = pick_config(("gram_update", bt, d, k, x.stride(), s.device), bench, square=True)
    launch(cfg, s)


def update_statistics(stats: Sequence[Tensor | None], rotated_grad: Tensor, shampoo_beta: float) -> None:
    """Triton :func:`soap_kernels.ops.update_statistics` for a matrix bucket, in place.

    ``stats = [B_L | None, B_R | None]``: ``B_L [B, m, m] ← β·B_L + (1-β)·G' G'ᵀ`` and
    ``B_R [B, n, n] ← β·B_R + (1-β)·G'ᵀ G'``. ``rotated_grad`` ``G'``: fp32 contiguous
    ``[B, m, n]``; stats fp32 (any strides). ``shampoo_beta`` is a runtime float.
    """
    check_tensor(rotated_grad, "rotated_grad")
    if rotated_grad.dim() != 3:
        raise ValueError(
            f"rotated_grad must be a bucket of matrices [B, m, n], got shape {tuple(rotated_grad.shape)}; "
            "other ranks go through soap_kernels.ops"
        )
    if len(stats) != 2:
        raise ValueError(f"stats must be [B_L | None, B_R | None] for a [B, m, n] bucket, got {len(stats)}")
    bt, m, n = rotated_grad.shape
    s_left, s_right = stats
    for s, d, name in ((s_left, m, "stats[0] (B_L)"), (s_right, n, "stats[1] (B_R)")):
        if s is not None:
            check_tensor(s, name, (bt, d, d), device=rotated_grad.device, contiguous=False)
    if rotated_grad.numel() == 0:
        return
    if s_left is not None:
        _gram_update(s_left, rotated_grad, float(shampoo_beta))
    if s_right is not None:
        _gram_update(s_right, rotated_grad.mT, float(shampoo_beta))


def gram(x: Tensor) -> Tensor:
    """``X Xᵀ`` for a bucket ``x [B, d, k]`` (fp32, exact products), a new ``[B, d, d]`` tensor."""
    check_tensor(x, "x", contiguous=False)
    out = torch.zeros(x.shape[0], x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
    if x.numel():
        _gram_update(out, x, 0.0)
    return out
