"""The preconditioner refresh: batched CholeskyQR in fp64, and the GEMMs around it in Triton.

Drop-in version of :func:`soap_kernels.ops.refresh_factor` (same in-place effect, same returns),
plus the moment re-expression the caller does after it and a re-orthonormalisation.

The QR of the permuted rotated-frame statistics ``A = Pᵀ B P`` (``[R, d, d]``) is a shifted
CholeskyQR3 in fp64 (Fukaya et al., "Shifted CholeskyQR for computing the QR factorization of
ill-conditioned matrices", SISC 2020): pass 1 factors ``AᵀA + s·I`` (``s ≈ 11·(2d²+d)·u64·‖A‖_F²``),
so the Cholesky succeeds for any ``cond(A) ≲ 1/u64`` (every numerically nonsingular fp32 matrix);
passes 2 and 3 are plain CholeskyQR and restore orthogonality to fp64 rounding. ``R`` comes out
with a positive diagonal, as ``ops.refresh_factor`` requires. Rows where a Cholesky fails, the
result is non-finite, or the last Gram is far from the identity (exactly rank-deficient input,
e.g. a zero row/column of statistics) are recomputed with Householder ``torch.linalg.qr`` (via
``soap_kernels.lapack``), sign-fixed the same way; that check costs one host sync per call.

The fp64 Grams, Cholesky factors and triangular solves use cuBLAS/cuSOLVER through torch:
Triton 3.6 has no dependable fp64 ``tl.dot`` on sm90. The fp32 GEMMs (``Q ← Q P Q_m`` with the
permutation fused into the load, ``B ← R Q_m`` skipping R's zero lower triangle, and
``exp_avg ← Q_mᵀ Pᵀ exp_avg``) and the permutation of ``exp_avg_sq`` are Triton kernels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import lapack
from ._common import bmm, check_tensor

__all__ = [
    "cholesky_qr",
    "refresh_factor",
    "reexpress_exp_avg",
    "permute_along",
    "refresh_moments_",
    "reorthonormalize_",
    "FALLBACKS",
]

FALLBACKS = {"rows": 0, "calls": 0}
"""Counts of CholeskyQR rows that fell back to Householder QR, and of calls (for diagnostics)."""

_U64 = 2.0**-53


def _householder_positive(a: Tensor) -> tuple[Tensor, Tensor]:
    q, r = lapack.qr(a)
    sign = torch.sign(r.diagonal(dim1=-2, dim2=-1))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return q * sign[..., None, :], r * sign[..., :, None]


def _cholesky_pass(x: Tensor, shift: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One CholeskyQR pass in x's dtype: ``(Q = x L⁻ᵀ, Lᵀ, info, Gram)`` with ``LLᵀ = xᵀx (+ s·I)``."""
    gram = torch.matmul(x.mT, x)
    if shift is not None:
        gram.diagonal(dim1=-2, dim2=-1).add_(shift[:, None])
    lower, info = torch.linalg.cholesky_ex(gram)
    q = torch.linalg.solve_triangular(lower.mT, x, upper=True, left=False)
    return q, lower.mT, info, gram


def cholesky_qr(a: Tensor, shift: bool = True) -> tuple[Tensor, Tensor]:
    """Batched QR ``a = Q R`` (``[R, d, d]``, R upper-triangular with a positive diagonal).

    ``shift=True``: shifted CholeskyQR3 (for any, possibly ill-conditioned, matrix);
    ``shift=False``: CholeskyQR2 (for a nearly orthonormal ``a``, e.g. re-orthonormalising Q).
    Computed in fp64; returned in ``a``'s dtype. Rows that fail fall back to Householder QR.
    FLOPs (fp64) per matrix: ``6·d³`` (3 Grams) + ``3·d³`` (3 triangular solves) + ``4·d³``
    (R products), two passes fewer for ``shift=False``.
    """
    check_tensor(a, "a", dtype=(torch.float32, torch.float64), contiguous=False)
    if a.dim() != 3 or a.shape[-1] != a.shape[-2]:
        raise ValueError(f"a must be a batch of square matrices [R, d, d], got {tuple(a.shape)}")
    x = a.to(torch.float64)
    rows, d, _ = x.shape
    bad = torch.zeros(rows, dtype=torch.bool, device=a.device)
    r_total = None
    passes = 3 if shift else 2
    gram = None
    for i in range(passes):
        s = None
        if shift and i == 0:
            s = (11.0 * (2 * d * d + d) * _U64) * x.square().sum(dim=(-2, -1))
        x, r, info, gram = _cholesky_pass(x, s)
        bad |= info != 0
        r_total = r if r_total is None else torch.matmul(r, r_total)
    # The last Gram is of an already nearly orthonormal matrix: far from I means an earlier pass
    # lost orthogonality (cond beyond what the passes can repair), so that row is redone.
    eye = torch.eye(d, dtype=torch.float64, device=a.device)
    bad |= (gram - eye).abs().amax(dim=(-2, -1)) > 0.1
    bad |= ~torch.isfinite(x).all(dim=(-2, -1)) | ~torch.isfinite(r_total).all(dim=(-2, -1))
    FALLBACKS["calls"] += 1
    if bool(bad.any()):  # the one host sync of the refresh
        idx = bad.nonzero().squeeze(1)
        q_h, r_h = _householder_positive(a[idx].to(torch.float64))
        x[idx] = q_h
        r_total[idx] = r_h
        FALLBACKS["rows"] += int(idx.numel())
    return x.to(a.dtype), r_total.triu_().to(a.dtype)


def refresh_factor(stats: Tensor, q: Tensor) -> tuple[Tensor, Tensor]:
    """Triton/CholeskyQR :func:`soap_kernels.ops.refresh_factor`, in place on ``stats`` and ``q``.

    ``stats`` (rotated-frame ``B``) and ``q``: fp32 ``[R, d, d]``; ``q`` contiguous.
    Sort ``diag(B)`` descending (``perm``), ``Q_m R = qr(Pᵀ B P)`` (positive diag R),
    ``q ← (q P)·Q_m``, ``stats ← sym(R·Q_m)``. Returns ``(perm [R, d] int64, q_mix = Q_m [R, d, d])``.
    """
    check_tensor(stats, "stats", contiguous=False)
    if stats.dim() != 3 or stats.shape[-1] != stats.shape[-2]:
        raise ValueError(f"stats must be [R, d, d], got {tuple(stats.shape)}")
    check_tensor(q, "q", stats.shape, device=stats.device)
    est = stats.diagonal(dim1=-2, dim2=-1)
    perm = torch.argsort(est, dim=-1, descending=True)
    permuted = stats.take_along_dim(perm[:, :, None], dim=1).take_along_dim(perm[:, None, :], dim=2)
    q_mix, r = cholesky_qr(permuted.to(torch.float64))
    q_mix = q_mix.to(torch.float32).contiguous()
    r = r.to(torch.float32).contiguous()
    new_stats = bmm(r, q_mix, torch.empty_like(r), "fp32", a_upper=True)
    stats.copy_(0.5 * (new_stats + new_stats.mT))
    perm = perm.contiguous()
    q_new = bmm(q, q_mix, torch.empty_like(q), "fp32", index=perm, gather="a")
    q.copy_(q_new)
    return perm, q_mix


def reexpress_exp_avg(exp_avg: Tensor, perm: Tensor, q_mix: Tensor, axis: int) -> Tensor:
    """``exp_avg`` in the refreshed basis of working dim ``axis`` (1: rows, 2: columns), a new tensor.

    ``axis=1``: ``Q_mᵀ (Pᵀ X)``, i.e. ``out[i, j] = Σ_k Q_m[k, i]·X[perm[k], j]``;
    ``axis=2``: ``(X P) Q_m``, i.e. ``out[i, j] = Σ_k X[i, perm[k]]·Q_m[k, j]``.
    The permutation is fused into the GEMM's operand load. exp_avg fp32 contiguous ``[B, m, n]``;
    ``perm`` int64 ``[B, d]``; ``q_mix`` fp32 ``[B, d, d]``. fp32 products (ieee). FLOPs ``2·B·m·n·d``.
    """
    check_tensor(exp_avg, "exp_avg")
    bt, m, n = _bucket_shape(exp_avg, "exp_avg")
    d = _axis_size(exp_avg, axis)
    check_tensor(perm, "perm", (bt, d), dtype=torch.int64, device=exp_avg.device)
    check_tensor(q_mix, "q_mix", (bt, d, d), device=exp_avg.device, contiguous=False)
    out = torch.empty_like(exp_avg)
    if exp_avg.numel() == 0:
        return out
    if axis == 1:
        return bmm(q_mix.mT, exp_avg, out, "fp32", index=perm, gather="b")
    return bmm(exp_avg, q_mix, out, "fp32", index=perm, gather="a")


@triton.jit
def _permute_kernel(
    x_ptr,
    out_ptr,
    perm_ptr,
    M,
    N,
    stride_perm_b,
    AXIS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """``out[b, i, j] = x[b, perm[b, i], j]`` (AXIS 1) or ``x[b, i, perm[b, j]]`` (AXIS 2).

    x/out ``[Bt, M, N]`` contiguous (any dtype), perm int64. Bytes ``2·Bt·M·N·sizeof(x)``.
    """
    pid_b = tl.program_id(2).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    mask = mask_m[:, None] & mask_n[None, :]
    base = pid_b * M * N
    if AXIS == 1:
        src_m = tl.load(perm_ptr + pid_b * stride_perm_b + offs_m, mask=mask_m, other=0)
        src = x_ptr + base + src_m[:, None] * N + offs_n[None, :]
    else:
        src_n = tl.load(perm_ptr + pid_b * stride_perm_b + offs_n, mask=mask_n, other=0)
        src = x_ptr + base + offs_m[:, None] * N + src_n[None, :]
    tl.store(out_ptr + base + offs_m[:, None] * N + offs_n[None, :], tl.load(src, mask=mask), mask=mask)


def permute_along(x: Tensor, perm: Tensor, axis: int) -> Tensor:
    """``x`` with working dim ``axis`` (1 or 2) reordered by ``perm`` (``[B, d]``), a new tensor.

    For ``exp_avg_sq`` after a refresh: ``x.take_along_dim`` along ``axis`` with ``perm``.
    """
    check_tensor(x, "x", dtype=None)
    bt, m, n = _bucket_shape(x, "x")
    d = _axis_size(x, axis)
    check_tensor(perm, "perm", (bt, d), dtype=torch.int64, device=x.device)
    out = torch.empty_like(x)
    if x.numel() == 0:
        return out
    block_m, block_n = 32, 64
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n), bt)
    _permute_kernel[grid](x, out, perm, m, n, perm.stride(0), AXIS=axis, BLOCK_M=block_m, BLOCK_N=block_n)
    return out


def refresh_moments_(exp_avg: Tensor, exp_avg_sq: Tensor, perm: Tensor, q_mix: Tensor, axis: int) -> None:
    """After :func:`refresh_factor` of dim ``axis``: re-express ``exp_avg``, permute ``exp_avg_sq`` (in place)."""
    exp_avg.copy_(reexpress_exp_avg(exp_avg, perm, q_mix, axis))
    check_tensor(exp_avg_sq, "exp_avg_sq", exp_avg.shape, device=exp_avg.device)
    exp_avg_sq.copy_(permute_along(exp_avg_sq, perm, axis))


def reorthonormalize_(q: Tensor) -> None:
    """Re-orthonormalise a product of orthogonal factors in place (CholeskyQR2, positive-diagonal R).

    Same result as :func:`soap_kernels.ops.reorthonormalize_` for a nearly orthonormal ``q``.
    """
    check_tensor(q, "q", contiguous=False)
    q_new, _ = cholesky_qr(q, shift=False)
    q.copy_(q_new)


def _bucket_shape(x: Tensor, name: str) -> tuple[int, int, int]:
    if x.dim() != 3:
        raise ValueError(f"{name} must be a bucket of matrices [B, m, n], got shape {tuple(x.shape)}")
    return x.shape[0], x.shape[1], x.shape[2]


def _axis_size(x: Tensor, axis: int) -> int:
    if axis not in (1, 2):
        raise ValueError(f"axis must be 1 (rows, Q_L) or 2 (columns, Q_R) of a [B, m, n] bucket, got {axis}")
    return x.shape[axis]
