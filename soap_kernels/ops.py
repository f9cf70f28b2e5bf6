"""The torch kernel table: the hot ops of the batched engine in plain PyTorch, on any device.

Every op works on a *bucket*: ``B`` parameters of one shape stacked along a leading batch dim, in
the preconditioner's working layout ``[B, d0, ..., dk]`` (after ``merge_dims`` and the
``channels_last`` permutation). ``qs`` is one entry per working dim: an orthonormal eigenbasis
``Q_i`` of shape ``[B, d_i, d_i]`` (fp32) or ``None`` for a dim that is not preconditioned.

Conventions: "rotate in" is ``x ×_i Q_iᵀ`` for every preconditioned dim (for a matrix,
``Q_Lᵀ X Q_R``); "rotate back" is ``x ×_i Q_i`` (``Q_L X Q_Rᵀ``). State and math are fp32.

:class:`TorchKernels` binds them to the signatures of :class:`soap_kernels.kernels.Kernels`; the
native CPU ops of ``soap_kernels._C`` are its internal fast path where they measured faster. Which
table a bucket uses is decided in :mod:`soap_kernels.select`, nowhere else.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor

from . import _native, lapack
from .kernels import Kernels, StepScalars

# The native CPU ops (soap_kernels._C) replace the torch sequences where they measured faster;
# SOAP_KERNELS_NATIVE_OPS=0 switches them off (A/B measurements, the CI lane without them).
NATIVE_OPS = _native.available() and os.environ.get("SOAP_KERNELS_NATIVE_OPS", "1") != "0"

# SOAP_KERNELS_REFRESH_SCRATCH=0 gives every refresh temporary a fresh allocation (A/B measurements).
REFRESH_SCRATCH = os.environ.get("SOAP_KERNELS_REFRESH_SCRATCH", "1") != "0"
_local = threading.local()


@contextmanager
def refresh_scratch(store: dict | None = None) -> Iterator[None]:
    """Inside the block the refresh's large CPU temporaries (:func:`scratch_empty`) come from
    buffers that live until the block ends, so the refreshes of one step reuse one set of pages.

    A fresh large CPU tensor is fresh pages from the OS (glibc maps and unmaps big blocks): on the
    bench set a refresh step touched 420 MB of fresh pages, ~0.33 ms per MB of page faults
    (benchmarks/NOTES.md 27). Without ``store`` nothing is kept after the block, so the memory
    between steps is unchanged. With ``store`` (a dict the caller keeps: ``SOAP(...,
    keep_refresh_scratch=True)``) the buffers stay in it after the block and the next block reuses
    their pages (NOTES 37). The values are the same (only where they are written changes), so are
    the bits.
    """
    if getattr(_local, "scratch", None) is not None or not REFRESH_SCRATCH:
        yield
        return
    _local.scratch = {} if store is None else store
    try:
        yield
    finally:
        _local.scratch = None


def scratch_empty(tag: str, shape: Sequence[int], like: Tensor) -> Tensor:
    """An uninitialised contiguous ``shape`` tensor of ``like``'s dtype and device: inside
    :func:`refresh_scratch` on the CPU a view of the block's ``tag`` buffer (one live tensor per tag
    at a time), otherwise a fresh one."""
    scratch = getattr(_local, "scratch", None)
    if scratch is None or like.device.type != "cpu" or torch.compiler.is_compiling():
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    n = math.prod(shape)
    key = (tag, like.dtype)
    buf = scratch.get(key)
    if buf is None or buf.numel() < n:
        buf = scratch[key] = torch.empty(n, dtype=like.dtype)
    return buf[:n].view(*shape)

__all__ = [
    "rotate",
    "rotate_in_adam",
    "rotate_in_adafactor",
    "rotate_back_update",
    "permute_along",
    "reexpress",
    "rotate_back",
    "update_statistics",
    "refresh_factor",
    "FLOPS",
    "TorchKernels",
    "apply_update",
    "initial_eigenbasis",
]


def _mode_product(x: Tensor, q: Tensor, axis: int, back: bool) -> Tensor:
    """Contract dim ``axis`` of the batched ``x`` with ``q`` (``[B, d, d]``).

    ``back=False``: ``y[.., j, ..] = Σ_a q[a, j] x[.., a, ..]`` (rotate in);
    ``back=True``:  ``y[.., j, ..] = Σ_a q[j, a] x[.., a, ..]`` (rotate back).
    """
    ndim = x.dim()
    if ndim == 3:  # the matrix case: two plain batched GEMMs, no copies
        if axis == 2:
            return torch.matmul(x, q.mT if back else q)
        return torch.matmul(q if back else q.mT, x)
    moved = x.movedim(axis, -1)
    shape = moved.shape
    flat = moved.reshape(shape[0], -1, shape[-1])
    out = torch.matmul(flat, q.mT if back else q)
    return out.reshape(shape).movedim(-1, axis)


def rotate(x: Tensor, qs: Sequence[Tensor | None], *, back: bool = False) -> Tensor:
    """Rotate a bucket ``x`` into (``back=False``) or out of (``back=True``) the eigenbasis."""
    for i, q in enumerate(qs):
        if q is not None:
            x = _mode_product(x, q, i + 1, back)
    return x


def rotate_in_adam(
    grad: Tensor | Sequence[Tensor],
    qs: Sequence[Tensor | None],
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    *,
    workspace: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Rotate the gradient in and run Adam's moment update in the eigenbasis.

    ``G' = rotate(grad)``; in place ``exp_avg ← β1·exp_avg + (1-β1)·G'`` and
    ``exp_avg_sq ← β2·exp_avg_sq + (1-β2)·G'²``; returns ``(G', exp_avg / (√exp_avg_sq + eps))``.
    Bias correction is not applied here: it is folded into the step size (as the reference does).

    ``workspace``: two bucket-shaped fp32 buffers; the results are written into them (``G'`` and
    the direction) instead of fresh tensors. With a workspace, ``grad`` may be the list of the
    parameters' fp32 gradient matrices instead of their stack.
    """
    if workspace is not None and (not isinstance(grad, Tensor) or grad.dim() == 3):
        rotated, direction = _rotate_matrix_into(grad, qs, workspace)
    else:
        rotated = rotate(grad, qs)
        direction = None
    if _native_moments(rotated, exp_avg, exp_avg_sq):
        # One fused pass (soap_kernels._C) instead of five: measured 2.6-7x faster than the
        # separate torch ops on GPT-2-sized fp32 buckets on the CPU (benchmarks/bench_native.py).
        out = [direction] if direction is not None else None
        return rotated, _native.moment_update([exp_avg], [exp_avg_sq], [rotated], beta1, beta2, eps, out=out)[0]
    exp_avg.lerp_(rotated, 1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(rotated, rotated, value=1.0 - beta2)
    if direction is None:
        return rotated, exp_avg / exp_avg_sq.sqrt().add_(eps)
    torch.sqrt(exp_avg_sq, out=direction).add_(eps)
    torch.div(exp_avg, direction, out=direction)
    return rotated, direction


def _native_moments(rotated: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor) -> bool:
    """Use the native fused moment update? Only where it was measured faster: fp32 CPU tensors.
    The native ops take fp32 only: float64 state stays on the torch ops.

    ``SOAP_KERNELS_NATIVE_OPS=0`` turns it off (for A/B measurements)."""
    if not NATIVE_OPS or rotated.device.type != "cpu":
        return False
    return all(t.dtype == torch.float32 and t.is_contiguous() for t in (rotated, exp_avg, exp_avg_sq))


def _rotate_matrix_into(
    grad: Tensor | Sequence[Tensor], qs: Sequence[Tensor | None], workspace: tuple[Tensor, Tensor]
) -> tuple[Tensor, Tensor]:
    """``Q_Lᵀ G Q_R`` into the two workspace buffers; returns (rotated, the free buffer).

    ``grad`` may be the list of per-parameter matrices: the first GEMM then reads each gradient
    where it lies, which saves stacking them (a full pass over the gradients).
    """
    a, b = workspace
    q_left, q_right = qs
    if not isinstance(grad, Tensor) and (q_left is not None or q_right is not None):
        for i, g in enumerate(grad):
            if q_left is not None:
                torch.matmul(q_left[i].mT, g, out=b[i])
            else:
                torch.matmul(g, q_right[i], out=b[i])
        if q_left is not None and q_right is not None:
            torch.matmul(b, q_right, out=a)
            return a, b
        return b, a
    if not isinstance(grad, Tensor):
        torch.stack(list(grad), out=a)
    if q_left is None and q_right is None:
        return a, b
    if q_left is not None and q_right is not None:
        torch.matmul(q_left.mT, a, out=b)
        torch.matmul(b, q_right, out=a)
        return a, b
    if q_left is not None:
        torch.matmul(q_left.mT, a, out=b)
    else:
        torch.matmul(a, q_right, out=b)
    return b, a


def rotate_back_update(
    direction: Tensor,
    qs: Sequence[Tensor | None],
    params: Sequence[Tensor],
    step_sizes: Sequence[float],
    decay: float,
    *,
    workspace: Tensor | None = None,
) -> None:
    """``p ← (p − s_b·Q_L D Q_Rᵀ)·decay`` for fp32 matrix parameters, the last GEMM writing ``p``.

    ``(p − s·N)·decay = decay·p − s·decay·N`` is exactly ``addmm_``'s ``beta``/``alpha`` epilogue,
    so the update costs no elementwise pass of its own. ``decay`` is ``1 − lr·wd`` (or 1).
    """
    q_left, q_right = qs
    if q_right is not None:
        if q_left is None:
            x = direction
        else:
            x = torch.matmul(q_left, direction, out=workspace) if workspace is not None else torch.matmul(q_left, direction)
        for i, p in enumerate(params):
            p.addmm_(x[i], q_right[i].mT, beta=decay, alpha=-step_sizes[i] * decay)
    elif q_left is not None:
        for i, p in enumerate(params):
            p.addmm_(q_left[i], direction[i], beta=decay, alpha=-step_sizes[i] * decay)
    else:
        for i, p in enumerate(params):
            p.add_(direction[i], alpha=-step_sizes[i])
            if decay != 1.0:
                p.mul_(decay)


def rotate_in_adafactor(
    grad: Tensor,
    qs: Sequence[Tensor | None],
    exp_avg: Tensor,
    factored: Tensor,
    beta1: float,
    beta2: float,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """Like :func:`rotate_in_adam` with Adafactor's factored second moment (the Shampoo mode).

    The rotated gradient is seen as a matrix ``[rows = d0, cols = d1·…·dk]``; ``factored[B, rows +
    cols]`` holds EMAs of its row and column sums of squares, and ``v̂ = r cᵀ / Σ r``. With the
    exact eigenbasis this is Shampoo with exponent 1/2 (the paper's equivalence).
    """
    rotated = rotate(grad, qs)
    exp_avg.lerp_(rotated, 1.0 - beta1)
    batch = rotated.shape[0]
    rows = rotated.shape[1] if rotated.dim() > 1 else 1
    square = rotated.square().reshape(batch, rows, -1)
    row_acc, col_acc = factored[:, :rows], factored[:, rows:]
    row_acc.mul_(beta2).add_(square.sum(dim=2), alpha=1.0 - beta2)
    col_acc.mul_(beta2).add_(square.sum(dim=1), alpha=1.0 - beta2)
    total = row_acc.sum(dim=1).clamp_min(1e-30)
    v_hat = row_acc[:, :, None] * col_acc[:, None, :] / total[:, None, None]
    direction = exp_avg / v_hat.sqrt_().add_(eps).reshape(rotated.shape)
    return rotated, direction


def permute_along(x: Tensor, dim: int, perm: Tensor) -> Tensor:
    """``y[b, .., k, ..] = x[b, .., perm[b, k], ..]`` along working dim ``dim`` (``perm [B, d]``)."""
    return torch.stack([xi.index_select(dim, p) for xi, p in zip(x, perm)])


def reexpress(exp_avg: Tensor, dim: int, perm: Tensor, q_mix: Tensor) -> Tensor:
    """``exp_avg`` in the refreshed basis along ``dim``: ``Q_newᵀ Q_old m = Q_mᵀ Pᵀ m``.

    ``Q_mᵀ Pᵀ = (P Q_m)ᵀ``, and ``P Q_m`` is ``Q_m`` with its rows gathered by the inverse
    permutation: whichever of ``exp_avg`` and ``Q_m`` is smaller gets permuted.
    """
    d = q_mix.shape[-1]
    if d * d >= exp_avg[0].numel():
        return _mode_product(permute_along(exp_avg, dim, perm), q_mix, dim + 1, back=False)
    rows = permute_along(q_mix, 0, torch.argsort(perm, dim=-1))
    return _mode_product(exp_avg, rows, dim + 1, back=False)


def rotate_back(direction: Tensor, qs: Sequence[Tensor | None]) -> Tensor:
    """``N = rotate back(direction)``: the update direction in the parameter's frame."""
    return rotate(direction, qs, back=True)


def update_statistics(stats: Sequence[Tensor | None], rotated_grad: Tensor, shampoo_beta: float) -> None:
    """Rotated-frame Shampoo statistics: ``B_i ← βs·B_i + (1-βs)·G'_(i) G'_(i)ᵀ`` in place.

    ``B_i = Q_iᵀ GG_i Q_i``. Because every ``Q_j`` is orthonormal, contracting the fully rotated
    ``G'`` over the other dims equals rotating ``g_(i) g_(i)ᵀ`` by ``Q_i`` alone.
    """
    for i, s in enumerate(stats):
        if s is None:
            continue
        x = rotated_grad.movedim(i + 1, 1)
        x = x.reshape(x.shape[0], x.shape[1], -1)
        s.baddbmm_(x, x.mT, beta=shampoo_beta, alpha=1.0 - shampoo_beta)


def refresh_factor(stats: Tensor, q: Tensor) -> tuple[Tensor, Tensor]:
    """One refresh of one factor for a batch of rows, in place on ``stats`` and ``q``.

    Reference: ``est = diag(Qᵀ GG Q)``, sort descending (permutation ``P``), ``Q ← qr(GG Q P).Q``.
    In the rotated frame ``GG Q P = (Q P)(Pᵀ B P)``, so ``Q ← (Q P)·Q_m`` with
    ``Q_m R = qr(Pᵀ B P)`` (R's diagonal made positive, so a converged basis stays put) and
    ``B ← Q_mᵀ (Pᵀ B P) Q_m = R Q_m``. Returns ``(perm [R, d], q_mix = Q_m [R, d, d])``: the caller
    permutes ``exp_avg_sq`` by ``perm`` and re-expresses ``exp_avg`` as ``Q_mᵀ Pᵀ exp_avg``.
    """
    est = stats.diagonal(dim1=-2, dim2=-1)
    perm = torch.argsort(est, dim=-1, descending=True)
    # index_select per row: a broadcast take_along_dim builds a d²-sized int64 index (measured
    # 165 ms against a few ms for a batch of six 1024² matrices on the CPU).
    permuted = scratch_empty("permuted", stats.shape, stats)
    for out, s, p in zip(permuted, stats, perm):
        torch.index_select(s.index_select(0, p), 1, p, out=out)
    q_perm = scratch_empty("q_perm", q.shape, q)
    for out, qi, p in zip(q_perm, q, perm):
        torch.index_select(qi, 1, p, out=out)
    q_mix, r = lapack.qr(permuted)
    sign = torch.sign(r.diagonal(dim1=-2, dim2=-1))
    sign[sign == 0] = 1.0
    q_mix.mul_(sign[:, None, :])
    r.mul_(sign[:, :, None])
    _triangular_product_symmetric(r, q_mix, out=stats)
    torch.matmul(q_perm, q_mix, out=q)
    return perm, q_mix


def _triangular_product_symmetric(r: Tensor, q: Tensor, out: Tensor) -> None:
    """``out = R Q`` for upper-triangular ``R`` when the product is known to be symmetric
    (``R Q_m = Q_mᵀ M Q_m``), symmetrised exactly.

    With ``h = d/2`` only the top block row ``R₁₁Q₁ + R₁₂Q₂`` and the corner ``R₂₂Q₂₂`` are
    computed (the bottom-left block is the transpose of the top-right one): ``1.25·d³`` FLOPs
    instead of ``2·d³``, skipping R's zero block.
    """
    d = r.shape[-1]
    h = d // 2
    if h < 64:  # small factors: one GEMM is cheaper than four
        full = torch.matmul(r, q)
        torch.add(full, full.mT, out=out)
        out.mul_(0.5)
        return
    top = torch.matmul(r[:, :h, :h], q[:, :h, :], out=scratch_empty("rq_top", (r.shape[0], h, d), r))
    top.baddbmm_(r[:, :h, h:], q[:, h:, :])
    corner = torch.matmul(r[:, h:, h:], q[:, h:, h:], out=scratch_empty("rq_corner", (r.shape[0], d - h, d - h), r))
    out[:, :h, h:] = top[:, :, h:]
    out[:, h:, :h] = top[:, :, h:].mT
    torch.add(top[:, :, :h], top[:, :, :h].mT, out=out[:, :h, :h])
    torch.add(corner, corner.mT, out=out[:, h:, h:])
    out[:, :h, :h].mul_(0.5)
    out[:, h:, h:].mul_(0.5)


# On the CPU, factors below this size take Householder QR (LAPACK's small QR costs less than the
# first-order correction's dozen ops; measured crossover 128 for one matrix, 48 for six), and
# factors from _REORTH_BLOCKED_FROM on take the correction by 2×2 blocks (the Gram's upper blocks
# and the block-triangular product only: 3·d³ FLOPs instead of 4·d³). benchmarks/NOTES.md 31.
_REORTH_FIRST_ORDER_FROM = 128
_REORTH_BLOCKED_FROM = 512


def reorthonormalize_(q: Tensor) -> None:
    """Re-orthonormalise a product of orthogonal factors in place: ``q`` ← the Q of ``q = Q·R``
    with ``diag R > 0`` (QR), to first order in ``S = qᵀq − I``.

    ``q`` is a few roundings from orthonormal (``‖S‖_F`` ~ 1e-5–1e-4 at d = 256–1024 after
    ``REORTHONORMALIZE_EVERY`` refreshes, benchmarks/NOTES.md 31), so ``R = chol(I + S) = I + U +
    O(S²)`` with ``U = triu(S, 1) + diag(S)/2``, and ``Q = q·R⁻¹ = q − q·U + O(S²)``: GEMMs only.
    Rows with ``‖S‖_F`` above ``√eps`` of the dtype, where the dropped ``O(S²)`` could exceed
    about one rounding, and small CPU factors take Householder QR instead
    (:func:`_householder_reorthonormalize_`)."""
    b, d = q.shape[0], q.shape[-1]
    if b == 0 or d == 0:
        return
    if q.device.type == "cpu" and d < _REORTH_FIRST_ORDER_FROM:
        _householder_reorthonormalize_(q)
        return
    # The scratch tags of refresh_factor, whose temporaries are dead by now (the engine
    # re-orthonormalises after the refresh), so both share pages ("permuted" and "q_perm" are
    # [b, d, d], "rq_top" [b, d/2, d]; a tag's buffer grows when a request is larger).
    u = scratch_empty("permuted", (b, d, d), q)
    h = d // 2 if d >= _REORTH_BLOCKED_FROM else d
    q1, q2 = q[:, :, :h], q[:, :, h:]
    torch.matmul(q1.mT, q, out=u[:, :h, :])  # [S11 S12] + [I 0]
    if h < d:
        torch.matmul(q2.mT, q2, out=u[:, h:, h:])  # S22 + I
        u[:, h:, :h].zero_()
    u.diagonal(dim1=-2, dim2=-1).sub_(1.0).mul_(0.5)
    u[:, :h, :h].triu_()
    if h < d:
        u[:, h:, h:].triu_()
    # ‖S‖_F² = 4·Σ diag(U)² + 2·Σ_{i<j} U_ij² = 2·(‖U‖_F² + ‖diag U‖²)
    drift = (2.0 * (torch.linalg.vector_norm(u, dim=(1, 2)).square()
                    + torch.linalg.vector_norm(u.diagonal(dim1=-2, dim2=-1), dim=1).square())).sqrt()
    far = ~(drift <= torch.finfo(q.dtype).eps ** 0.5)  # a NaN drift included
    saved = q.index_select(0, far.nonzero().squeeze(1)) if bool(far.any()) else None
    # Q·(I − U) by column blocks, each into its own contiguous buffer (batched GEMMs), copied back
    # into q once both are formed (the second block reads both column blocks of q).
    t1 = torch.baddbmm(q1, q1, u[:, :h, :h], alpha=-1.0, out=scratch_empty("rq_top", (b, d, h), q))
    if h < d:
        t2 = torch.baddbmm(q2, q1, u[:, :h, h:], alpha=-1.0, out=scratch_empty("q_perm", (b, d, d - h), q))
        t2.baddbmm_(q2, u[:, h:, h:], alpha=-1.0)
        q2.copy_(t2)
    q1.copy_(t1)
    if saved is not None:
        _householder_reorthonormalize_(saved)
        q.index_copy_(0, far.nonzero().squeeze(1), saved)


def _householder_reorthonormalize_(q: Tensor) -> None:
    """``q`` ← the Q of its Householder QR with a positive diagonal (in place)."""
    q_new, r = lapack.qr(q)
    sign = torch.sign(r.diagonal(dim1=-2, dim2=-1))
    sign[sign == 0] = 1.0
    torch.mul(q_new, sign[:, None, :], out=q)


class FLOPS:
    """The lean FLOP model of docs/DESIGN.md §2 (per step and per refresh, per parameter)."""

    @staticmethod
    def step(work_shape: Sequence[int], preconditioned: Sequence[bool]) -> int:
        """Rotate in + rotate back + statistics: three mode products per preconditioned dim.

        For an m×n matrix with both sides preconditioned this is ``6·m·n·(m+n)``.
        """
        numel = 1
        for d in work_shape:
            numel *= d
        return sum(6 * numel * d for d, pre in zip(work_shape, preconditioned) if pre)

    @staticmethod
    def refresh(work_shape: Sequence[int], preconditioned: Sequence[bool]) -> int:
        """Per refreshed factor of size d: QR (4/3 d³) + Q·Q_m (2 d³) + R·Q_m (2 d³), plus the
        re-expression of ``exp_avg`` (2·numel·d)."""
        numel = 1
        for d in work_shape:
            numel *= d
        return sum(
            int(16 * d**3 / 3) + 2 * numel * d for d, pre in zip(work_shape, preconditioned) if pre
        )


def apply_update(params: Sequence[Tensor], updates: Sequence[Tensor], decay: float | None) -> None:
    """``p ← (p − u)·decay`` in the updates' dtype, written back once in the parameter's dtype."""
    if params[0].dtype == updates[0].dtype:
        torch._foreach_sub_(list(params), list(updates))
        if decay is not None:
            torch._foreach_mul_(list(params), decay)
        return
    for p, u in zip(params, updates):
        wide = p.to(u.dtype).sub_(u)
        if decay is not None:
            wide.mul_(decay)
        p.copy_(wide)


def gram(x: Tensor, dim: int) -> Tensor:
    """``x_(dim) x_(dim)ᵀ``: contraction of ``x`` with itself over every dim but ``dim``."""
    others = [d for d in range(x.dim()) if d != dim]
    return torch.tensordot(x, x, dims=[others, others])


# The jitter of the float64 retry of a failed eigh, relative to the factor's mean eigenvalue
# (trace / d); the reference states the same rule (its RETRY_JITTER).
EIGH_RETRY_JITTER = 1e-12


def initial_eigenbasis(gg: Tensor) -> Tensor | None:
    """Eigenvectors of a first step's factor by descending eigenvalue (``eigh(GG + 1e-30·I)``, as
    soap.py), retried in float64 with a jitter of ``1e-12·trace/d`` if that raises or is not
    finite; ``None`` if both fail. The same calls as the reference's, so the same bits."""
    jitter = 1e-30 * torch.eye(gg.shape[0], device=gg.device, dtype=gg.dtype)
    try:
        _, q = lapack.eigh(gg + jitter)
        if bool(torch.isfinite(q).all()):
            return torch.flip(q, [1])
    except RuntimeError:  # torch.linalg.LinAlgError (no convergence) is a RuntimeError
        pass
    g64 = gg.double()
    if not bool(torch.isfinite(g64).all()):
        return None
    scale = float(torch.diagonal(g64).sum()) / max(g64.shape[0], 1)
    g64.diagonal().add_(EIGH_RETRY_JITTER * scale if scale > 0 else 0.0)
    try:
        _, q = lapack.eigh(g64)
    except RuntimeError:
        return None
    q = q.to(gg.dtype)
    return torch.flip(q, [1]) if bool(torch.isfinite(q).all()) else None


def permute_second_moment(exp_avg_sq: Tensor, dim: int, perm: Tensor, second_moment: str,
                          work_shape: Sequence[int]) -> Tensor:
    """``exp_avg_sq`` permuted along working dim ``dim``; for the factored (adafactor) second
    moment the row accumulator (dim 0) or the column accumulator (the other dims)."""
    if second_moment == "adam":
        return permute_along(exp_avg_sq, dim, perm)
    rows = work_shape[0] if work_shape else 1
    row_acc, col_acc = exp_avg_sq[:, :rows], exp_avg_sq[:, rows:]
    if dim == 0:
        row_acc = row_acc.take_along_dim(perm, dim=1)
    else:
        cols = col_acc.reshape(col_acc.shape[0], *work_shape[1:])
        col_acc = permute_along(cols, dim - 1, perm).reshape(col_acc.shape)
    return torch.cat([row_acc, col_acc], dim=1)


def _scale_rows(update: Tensor, sizes: Tensor) -> None:
    update.mul_(sizes.view(-1, *(1,) * (update.dim() - 1)))


def normalize_rows_(update: Tensor) -> None:
    """Divide each row's update by its RMS (``1e-30`` guards zero). Per row: for 0-D parameters
    (update ``[B]``) a mean over ``dim=()`` would reduce over every row of the bucket."""
    rms = update.reshape(update.shape[0], -1).square().mean(dim=1).sqrt_()
    update.div_(rms.add_(1e-30).view(-1, *(1,) * (update.dim() - 1)))


def _sizes(scalars: StepScalars) -> list[float] | Tensor:
    """The step sizes as host floats (eager: the reference's float64 arithmetic), or as a device
    tensor inside torch.compile (a list of floats given to a tensor factory or a custom op would be
    specialised, one recompile per step)."""
    return scalars.device_sizes() if torch.compiler.is_compiling() else scalars.sizes


class TorchKernels(Kernels):
    """The torch table: the functions above with the table's signatures."""

    name = "torch"

    def rotate_in_moments(self, grads, qs, exp_avg, exp_avg_sq, beta1, beta2, eps, *, second_moment, workspace):
        grads = [g if g.dtype == exp_avg.dtype else g.to(exp_avg.dtype) for g in grads]
        if workspace is not None and exp_avg.dim() == 3 and second_moment == "adam":
            grad = list(grads)  # the first GEMM reads each gradient in place
        elif workspace is not None:
            grad = torch.stack(list(grads), out=workspace[0])
        else:
            grad = torch.stack(list(grads))
        if second_moment == "adam":
            return rotate_in_adam(grad, qs, exp_avg, exp_avg_sq, beta1, beta2, eps, workspace=workspace)
        return rotate_in_adafactor(grad, qs, exp_avg, exp_avg_sq, beta1, beta2, eps)

    def update_statistics(self, stats, rotated, shampoo_beta):
        update_statistics(stats, rotated, shampoo_beta)

    def rotate_back_update(self, direction, qs, params, views, scalars: StepScalars, *, normalize, from_work,
                           workspace):
        fused = (views is not None and not normalize and direction.dim() == 3
                 and all(v.dtype == direction.dtype and v.is_contiguous() for v in views))
        if fused:
            rotate_back_update(direction, qs, views, scalars.sizes, scalars.decay, workspace=workspace)
            return
        update = rotate_back(direction, qs)
        if normalize:
            normalize_rows_(update)
        sizes = _sizes(scalars)
        if not isinstance(sizes, Tensor):
            dtype = torch.float64 if update.dtype == torch.float64 else torch.float32  # fp64 state: fp64 sizes
            sizes = torch.tensor(sizes, dtype=dtype).to(update.device, non_blocking=True)
        _scale_rows(update, sizes)
        apply_update(params, [from_work(u) for u in update.unbind(0)], None if scalars.decay == 1.0 else scalars.decay)

    def adam_step(self, params, grads, exp_avg, exp_avg_sq, scalars: StepScalars, beta1, beta2, eps, *,
                  second_moment, normalize, views, from_work):
        native = (NATIVE_OPS and second_moment == "adam" and not normalize and exp_avg.device.type == "cpu"
                  and exp_avg.dtype == torch.float32
                  and views is not None and all(tuple(v.shape) == tuple(p.shape) for v, p in zip(views, params))
                  and all(p.is_contiguous() and g.is_contiguous() and g.dtype == p.dtype for p, g in zip(params, grads)))
        if native:
            # One fused pass per tensor: measured ~20x faster than the stacked torch ops on the cpu
            # set's LayerNorm/bias parameters (benchmarks/bench_native.py).
            _native.adam_step(list(params), list(grads), list(exp_avg.unbind(0)), list(exp_avg_sq.unbind(0)),
                              _sizes(scalars), beta1=beta1, beta2=beta2, eps=eps,
                              lr_weight_decay=scalars.lr * scalars.weight_decay if scalars.weight_decay > 0 else 0.0)
            return
        _, direction = self.rotate_in_moments(grads, [None] * (exp_avg.dim() - 1), exp_avg, exp_avg_sq, beta1, beta2,
                                              eps, second_moment=second_moment, workspace=None)
        self.rotate_back_update(direction, [None] * (exp_avg.dim() - 1), params, None, scalars, normalize=normalize,
                                from_work=from_work, workspace=None)

    def refresh_factor(self, stats, q):
        return refresh_factor(stats, q)

    def refresh_moments(self, exp_avg, exp_avg_sq, dim, perm, q_mix, *, second_moment, work_shape):
        exp_avg.copy_(reexpress(exp_avg, dim, perm, q_mix))
        exp_avg_sq.copy_(permute_second_moment(exp_avg_sq, dim, perm, second_moment, work_shape))

    def reorthonormalize_(self, q):
        reorthonormalize_(q)


TORCH = TorchKernels()
